"""Model behaviour beyond the fixture: gradients, joint passes, padding, dtypes, config, raw inputs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

import onepeace
from conftest import ASSETS, random_tiny_model, require
from onepeace.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_random():
    return random_tiny_model()


@pytest.mark.slow  # > 10 s
def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = onepeace.create_model("one-peace-tiny").train()
    tokens = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]])
    images = torch.randn(2, 3, 64, 64)
    audio = torch.randn(2, 16000)
    single = model(text=tokens, image=images, audio=audio)
    joint = model(text=tokens, image=images, audio=audio, joint=True)
    loss = sum(e.sum() for e in single.embeddings.values()) + sum(h.pow(2).mean() for h in joint.hidden_states.values())
    loss = loss + model.logit_scale
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # the audio mask token exists in the released layout but only masked pretraining uses it
    assert no_grad == ["adapters.audio.mask_token"], no_grad


def test_three_modality_joint_pass_text_first(tiny_random):
    tokens = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]])
    images = torch.randn(2, 3, 64, 64)
    audio = torch.randn(2, 16000)
    with torch.no_grad():
        out = tiny_random(audio=audio, image=images, text=tokens, joint=True)
    assert list(out.hidden_states) == ["text", "image", "audio"]
    assert out.hidden_states["text"].shape == (2, 5, 64)
    assert out.hidden_states["image"].shape == (2, 17, 64)
    assert out.hidden_states["audio"].shape == (2, 50, 64)
    assert out.embeddings == {}  # joint passes have no retrieval embedding
    # the joint pass really mixes modalities: text states differ from the text-only pass
    with torch.no_grad():
        alone = tiny_random(text=tokens)
    assert not torch.allclose(alone.hidden_states["text"], out.hidden_states["text"])


def test_padding_does_not_change_results(tiny_random):
    short = torch.tensor([[5, 6, 2]])
    padded = torch.tensor([[5, 6, 2, 1, 1, 1], [8, 9, 10, 11, 12, 2]])
    with torch.no_grad():
        a = tiny_random(text=short).embeddings["text"][0]
        b = tiny_random(text=padded).embeddings["text"][0]
    assert torch.allclose(a, b, atol=1e-6)
    wave = torch.randn(16000)
    long = torch.randn(24000)
    from onepeace.data.audio import collate_waveforms

    spec = tiny_random.config.adapters["audio"].feature_encoder_spec
    audio, mask = collate_waveforms([wave, long], spec)
    with torch.no_grad():
        alone = tiny_random(audio=wave[None]).embeddings["audio"][0]
        batched = tiny_random(audio=audio, audio_padding_mask=mask).embeddings["audio"][0]
    # the conv positions see the zero padding (as the reference): close, not identical
    assert torch.nn.functional.cosine_similarity(alone, batched, dim=0) > 0.99


def test_encode_api_from_raw_inputs(tiny_random):
    texts = ["a dog", "a photo of a cow in a field with a long caption", "an elephant"]
    emb = tiny_random.encode_text(texts)
    assert emb.shape == (3, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # input order is kept although batches are sorted by length
    for i, t in enumerate(texts):
        assert torch.allclose(tiny_random.encode_text([t])[0], emb[i], atol=1e-5)
    dog = require(ASSETS / "dog.JPEG")
    pil = Image.open(dog)
    images = tiny_random.encode_image([str(dog), pil])
    assert images.shape == (2, 64) and torch.allclose(images[0], images[1], atol=1e-6)
    import soundfile as sf

    wave, sr = sf.read(require(ASSETS / "cow.flac"), dtype="float32")
    audios = tiny_random.encode_audio([str(ASSETS / "cow.flac"), (wave, sr)])
    assert audios.shape == (2, 64) and torch.allclose(audios[0], audios[1], atol=1e-5)


def test_bfloat16_compute(tiny_expected):
    from conftest import TINY_CKPT, fixture_embedding_errors

    model = onepeace.load(TINY_CKPT, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    for m, err in fixture_embedding_errors(model, tiny_expected).items():
        print(f"bf16 {m}_embed max rel error {err:.2e}")
        assert err < 0.1


def test_config_json_round_trip(tmp_path):
    for name in onepeace.list_models():
        config = onepeace.get_config(name)
        path = tmp_path / f"{name}.json"
        config.save(path)
        again = ModelConfig.load(path)
        assert again == config, name
        json.loads(path.read_text())  # plain JSON
    assert onepeace.get_config("one-peace-4b").encoder.layers == 40


def test_config_errors_are_clear():
    with pytest.raises(KeyError, match="one-peace-huge.*known"):
        onepeace.get_config("one-peace-huge")
    with pytest.raises(ValueError, match="not divisible"):
        dataclasses.replace(onepeace.get_config("one-peace-tiny").encoder, attention_heads=5)
    with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
        ModelConfig.from_dict({"encoder": {"embed_dims": 3}})
    with pytest.raises(ValueError, match="not in this model"):
        onepeace.get_config("one-peace-tiny").select(["video"])


def test_bad_tensor_inputs_are_explained(tiny_random):
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_random(text=torch.tensor([[60000, 2]]))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        tiny_random(image=torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_random(image=torch.randn(1, 3, 70, 70))
    with pytest.raises(ValueError, match="audio_padding_mask"):
        tiny_random(audio=torch.randn(1, 16000), audio_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no inputs"):
        tiny_random()


def test_other_image_sizes_resample_positions(tiny_random):
    """Our extension: a 128-pixel input on a model built for 64 (positions and bias resampled)."""
    with torch.no_grad():
        out = tiny_random(image=torch.randn(1, 3, 128, 128))
    assert out.hidden_states["image"].shape == (1, 65, 64)
    assert torch.isfinite(out.embeddings["image"]).all()


def test_named_sizes_build_on_meta():
    for name in onepeace.list_models():
        model = onepeace.create_model(name, device="meta")
        assert all(p.is_meta for p in model.parameters())

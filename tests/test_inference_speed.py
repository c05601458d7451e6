"""The speed features keep the numbers: fused projections, reference mode, length-sorted batches with a
token budget (results in input order), windowed long audio (deterministic)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import onepeace
from conftest import TINY_CKPT, max_rel_error, random_tiny_model
from onepeace.inference import length_sorted_batches
from onepeace.modalities.audio import audio_window_starts


@pytest.fixture(scope="module")
def model():
    return random_tiny_model()


def test_reference_mode_matches_the_fixture_and_the_fast_path(tiny_expected):
    fast = onepeace.load(TINY_CKPT, fuse=True)
    plain = onepeace.load(TINY_CKPT, fuse=False)
    plain.reference_mode = True
    i = tiny_expected["inputs"]
    with torch.no_grad():
        a = fast(text=i["src_tokens"], image=i["src_images"], audio=i["src_audios"], audio_padding_mask=i["audio_padding_masks"])
        b = plain(text=i["src_tokens"], image=i["src_images"], audio=i["src_audios"], audio_padding_mask=i["audio_padding_masks"])
    for m in ("text", "image", "audio"):
        err = max_rel_error(b.embeddings[m], tiny_expected["outputs"][f"{m}_embed"])
        print(f"reference mode {m}_embed vs fixture: {err:.2e}; fast vs reference: "
              f"{max_rel_error(a.embeddings[m], b.embeddings[m]):.2e}")
        assert err <= 1e-5 and max_rel_error(a.embeddings[m], b.embeddings[m]) <= 1e-5


def test_real_rows_equal_the_padded_computation(model, monkeypatch):
    """At inference a padded one-modality batch runs its row-wise ops on the real rows only; the
    result equals the padded computation (grad enabled takes the padded path) on every real row."""
    from onepeace.modeling import attention, model as model_module

    made = []

    class SpyRealRows(attention.RealRows):
        def __init__(self, padding_mask):
            super().__init__(padding_mask)
            made.append(int(self.index.numel()))

    monkeypatch.setattr(model_module, "RealRows", SpyRealRows)
    text = torch.tensor([[5, 6, 2, 1, 1, 1], [8, 9, 10, 11, 12, 2], [7, 2, 1, 1, 1, 1]])
    from onepeace.data.audio import collate_waveforms

    audio, audio_mask = collate_waveforms([torch.randn(16000), torch.randn(30000)],
                                          model.config.adapters["audio"].feature_encoder_spec)
    with torch.inference_mode():
        unpadded = model(text=text, audio=audio, audio_padding_mask=audio_mask)
    assert made == [(3 + 1) + (6 + 1) + (2 + 1),  # real ids + a CLS per row
                    int((~unpadded.padding_masks["audio"]).sum())]  # real rows incl. CLS
    with torch.enable_grad():
        padded = model(text=text, audio=audio, audio_padding_mask=audio_mask)
    for m in ("text", "audio"):
        real = ~padded.padding_masks[m]
        err = max_rel_error(unpadded.hidden_states[m][real], padded.hidden_states[m][real].detach())
        print(f"real rows vs padded {m} hidden (real rows): {err:.1e}")
        assert err <= 1e-5
        assert max_rel_error(unpadded.embeddings[m], padded.embeddings[m].detach()) <= 1e-5
        assert not unpadded.hidden_states[m][~real].any()  # padding rows come back as zeros


def test_time_major_audio_front_end_equals_the_conv_front_end(model):
    """Inference runs the conv feature extractor as strided matrix products; training keeps Conv1d."""
    adapter = model.adapters["audio"]
    waves = torch.randn(2, 16000)
    with torch.inference_mode():
        fast = adapter.extract_features(waves)
    with torch.enable_grad():
        conv = adapter.extract_features(waves)
    err = max_rel_error(fast, conv.detach())
    print(f"time-major vs Conv1d audio features: {err:.1e}")
    assert fast.shape == conv.shape == (2, adapter.num_frames(16000), model.config.encoder.embed_dim)
    assert err <= 1e-5
    model.reference_mode = True  # the benchmarks' baseline keeps Conv1d, also at inference
    try:
        assert model.adapters["audio"].reference_mode
        with torch.inference_mode():
            assert torch.equal(adapter.extract_features(waves), conv.detach())
    finally:
        model.reference_mode = False


def test_fused_weights_share_storage_and_follow_training_updates(model):
    import copy

    m = copy.deepcopy(model)
    m.fuse_for_inference()
    attn = m.encoder.layers[0].attn
    assert attn.q_proj.weight.data_ptr() == attn._qkv_weight.data_ptr()
    tokens = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        before = m(text=tokens).embeddings["text"]
    # a training step (grad mode uses the separate Linear layers) updates the fused tensor in place
    m.train()
    loss = m(text=tokens).embeddings["text"].sum()
    loss.backward()
    assert attn.q_proj.weight.grad is not None
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    m.eval()
    with torch.no_grad():
        fused_after = m(text=tokens).embeddings["text"]
        attn._qkv_weight = None  # force the unfused path
        for layer in m.encoder.layers:
            layer.attn._qkv_weight = None
            for e in layer.ffn.values():
                e._wi_weight = None
        plain_after = m(text=tokens).embeddings["text"]
    assert not torch.allclose(before, fused_after)
    assert torch.allclose(fused_after, plain_after, atol=1e-6)


def test_replaced_parameters_disable_a_stale_fusion(model):
    import copy

    m = copy.deepcopy(model).fuse_for_inference()
    tokens = torch.tensor([[5, 6, 7, 2]])
    other = onepeace.create_model("one-peace-tiny").eval()
    m.load_state_dict(other.state_dict(), assign=True)  # new tensors: the old fused copy is stale
    with torch.no_grad():
        assert torch.allclose(m(text=tokens).embeddings["text"], other(text=tokens).embeddings["text"], atol=1e-6)


def test_token_budget_batches():
    lengths = [5, 70, 12, 12, 40, 3, 70, 8]
    batches = list(length_sorted_batches(lengths, batch_size=4, max_tokens=150))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 150
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert list(length_sorted_batches(lengths, 3, sort=False)) == [[0, 1, 2], [3, 4, 5], [6, 7]]


@pytest.mark.slow  # > 10 s
def test_results_come_back_in_input_order(model):
    rng = np.random.default_rng(0)
    words = "a dog cat cow in the field running under blue sky with long grass and trees".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, size=17)]
    batched = model.encode_text(texts, batch_size=5)
    one_by_one = torch.cat([model.encode_text([t]) for t in texts])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    waves = [(rng.standard_normal(int(16000 * s)).astype(np.float32), 16000) for s in (2.5, 1.0, 4.0, 1.5, 3.0)]
    batched = model.encode_audio(waves, batch_size=2)
    for i, w in enumerate(waves):
        # padding reaches the conv positions of the last frames (as in the reference): close, not equal
        assert torch.nn.functional.cosine_similarity(batched[i], model.encode_audio([w])[0], dim=0) > 0.999


def test_windowed_long_audio_is_deterministic_and_covers_the_clip(model):
    rng = np.random.default_rng(1)
    long_clip = (rng.standard_normal(16000 * 40).astype(np.float32), 16000)
    short_clip = (rng.standard_normal(16000 * 5).astype(np.float32), 16000)
    assert audio_window_starts(16000 * 40, 240000, 160000) == [0, 160000, 320000, 400000]
    assert audio_window_starts(16000 * 5, 240000, 160000) == [0]
    a = model.encode_audio([long_clip, short_clip], long_audio="windows")
    b = model.encode_audio([long_clip, short_clip], long_audio="windows")
    assert torch.equal(a, b)
    crop = model.encode_audio([long_clip, short_clip], batch_size=1)  # unpadded, like the lone short window
    assert torch.allclose(a[1], crop[1], atol=1e-5)  # one window == the reference crop
    assert not torch.allclose(a[0], crop[0], atol=1e-3)  # the rest of a 40-s clip counts
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="long_audio"):
        model.encode_audio([short_clip], long_audio="stretch")

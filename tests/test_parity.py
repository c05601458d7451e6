"""Parity with the published model code: official-tiny fixture, float32, all ten outputs."""
from __future__ import annotations

import pytest
import torch

from conftest import max_rel_error

TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=["default", "fused", "reference"])
def outputs(request, tiny_expected):
    """The ten outputs with the default CPU path (weights packed for oneDNN, real rows only, time-major
    audio front end), with the fused projections, and in reference mode (plain weights)."""
    import onepeace
    from conftest import TINY_CKPT

    tiny_model = onepeace.load(TINY_CKPT, fuse=request.param == "fused", pack=request.param == "default")
    tiny_model.reference_mode = request.param == "reference"
    from onepeace.modeling.packed import cpu_can_pack

    assert tiny_model.is_packed == (request.param == "default" and cpu_can_pack(torch.float32))
    i = tiny_expected["inputs"]
    with torch.inference_mode():
        single = tiny_model(text=i["src_tokens"], image=i["src_images"], audio=i["src_audios"],
                            audio_padding_mask=i["audio_padding_masks"])
        vl = tiny_model(text=i["src_tokens"][:2], image=i["src_images"], joint=True)
        al = tiny_model(text=i["src_tokens"][:2], audio=i["src_audios"],
                        audio_padding_mask=i["audio_padding_masks"], joint=True)
    return {
        "mode": request.param,
        "text_embed": (single.embeddings["text"], None),
        "image_embed": (single.embeddings["image"], None),
        "audio_embed": (single.embeddings["audio"], None),
        "text_hidden": (single.hidden_states["text"], single.padding_masks["text"]),
        "image_hidden": (single.hidden_states["image"], single.padding_masks["image"]),
        "audio_hidden": (single.hidden_states["audio"], single.padding_masks["audio"]),
        "vl_text_hidden": (vl.hidden_states["text"], vl.padding_masks["text"]),
        "vl_image_hidden": (vl.hidden_states["image"], vl.padding_masks["image"]),
        "al_text_hidden": (al.hidden_states["text"], al.padding_masks["text"]),
        "al_audio_hidden": (al.hidden_states["audio"], al.padding_masks["audio"]),
    }


NAMES = ["text_embed", "image_embed", "audio_embed", "text_hidden", "image_hidden", "audio_hidden",
         "vl_text_hidden", "vl_image_hidden", "al_text_hidden", "al_audio_hidden"]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_output(outputs, tiny_expected, name):
    actual, mask = outputs[name]
    expected = tiny_expected["outputs"][name]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_error(actual, expected, mask)
    print(f"{name}: max rel error {err:.3e}")
    assert err <= TOLERANCE, f"{name}: max |a-b|/max|b| = {err:.3e} > {TOLERANCE}"


def test_padding_masks_match_fixture(outputs, tiny_expected):
    i = tiny_expected["inputs"]
    assert torch.equal(outputs["audio_hidden"][1], i["audio_padding_masks"])
    assert torch.equal(outputs["text_hidden"][1][:, 1:], i["src_tokens"].eq(1))
    assert not outputs["text_hidden"][1][:, 0].any()  # CLS is never padding


def test_all_errors_summary(outputs, tiny_expected, capsys):
    """One line with every error, for the CI log."""
    errors = {n: max_rel_error(outputs[n][0], tiny_expected["outputs"][n], outputs[n][1]) for n in NAMES}
    with capsys.disabled():
        print(f"\nofficial-tiny parity, {outputs['mode']} path (max |a-b|/max|b|): "
              + ", ".join(f"{n}={e:.1e}" for n, e in errors.items()))
    assert max(errors.values()) <= TOLERANCE


def test_relative_bucket_indices_equal_released_buffers():
    """Our recomputed indices are the `rp_bucket` buffers stored in the released file."""
    from conftest import TINY_CKPT, require
    from onepeace.modeling.relative_position import bucket_index_1d, bucket_index_2d
    from onepeace.serialization import read_checkpoint

    obj, archive = read_checkpoint(require(TINY_CKPT))
    try:
        state = obj["model"]
        text = state["encoder_wrapper.text_adapter.rp_bucket"].load()
        audio = state["encoder_wrapper.audio_adapter.rp_bucket"].load()
        image = state["encoder_wrapper.image_adapter.rp_bucket"].load()
    finally:
        archive.close()
    assert torch.equal(bucket_index_1d(256), text)
    assert torch.equal(bucket_index_1d(512), audio)
    assert torch.equal(bucket_index_2d(4), image)

"""int8 CPU inference (`onepeace.load(..., quantize="int8")`, `onepeace convert --quantize int8`):
the official-tiny fixture error in int8, the converted folder's round trip, and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import onepeace
from onepeace.modeling.quantized import Int8Linear, int8_layers, quantize_weight, reduce_range

from conftest import ASSETS, TINY_CKPT, fixture_embedding_errors, require

#: bound on max |int8 - published| / max |published| of the fixture's text/image/audio embeddings. We
#: measured 0.018 / 0.022 / 0.019 with 8-bit activations (VNNI CPUs) and 0.036 / 0.035 / 0.039 with
#: torch.ao's 7-bit x86 default (CPUs without VNNI); float32 is ~5e-7.
FIXTURE_BOUND = 0.03 if not reduce_range() else 0.05


@pytest.fixture(scope="module")
def int8_model():
    return onepeace.load(require(TINY_CKPT), quantize="int8")


def _embed(model, expected) -> dict[str, torch.Tensor]:
    i = expected["inputs"]
    with torch.inference_mode():
        return model(text=i["src_tokens"], image=i["src_images"], audio=i["src_audios"],
                     audio_padding_mask=i["audio_padding_masks"]).embeddings


def test_fixture_error_in_int8(int8_model, tiny_expected):
    layers = int8_layers(int8_model)
    assert len(layers) == sum(1 for m in onepeace.create_model("one-peace-tiny", device="meta").encoder.modules()
                              if type(m) is torch.nn.Linear)  # every encoder linear, nothing else
    assert not any(name.startswith(("adapters.", "proj")) for name in layers)
    errors = fixture_embedding_errors(int8_model, tiny_expected)
    cosines = {m: torch.nn.functional.cosine_similarity(e, tiny_expected["outputs"][f"{m}_embed"]).min().item()
               for m, e in _embed(int8_model, tiny_expected).items()}
    print(f"\nofficial-tiny in int8 (reduce_range={reduce_range()}): max rel error "
          + ", ".join(f"{m} {e:.4f}" for m, e in errors.items()) + f" (bound {FIXTURE_BOUND}); min cosine "
          + ", ".join(f"{m} {c:.5f}" for m, c in cosines.items()))
    assert all(e < FIXTURE_BOUND for e in errors.values()), errors
    assert all(e > 1e-4 for e in errors.values()), f"int8 should not equal float32 exactly: {errors}"
    assert all(c > 0.999 for c in cosines.values()), cosines


def test_weight_quantisation_is_symmetric_per_channel():
    w = torch.randn(6, 10) * torch.tensor([1e-3, 1, 10, 0, 5, 2])[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and q.abs().max() == 127
    assert torch.all(q[3] == 0)  # an all-zero row stays zero (no division by zero)
    err = ((q.float() * scale[:, None] - w).abs() / scale[:, None].clamp_min(1e-30)).max().item()
    assert err <= 0.5 + 1e-4, err  # rounding: within half a step of each channel's own scale


def test_convert_round_trip(tmp_path, int8_model, tiny_expected, capsys):
    from safetensors import safe_open

    from onepeace.cli import main

    out = tmp_path / "int8"
    assert main(["convert", str(require(TINY_CKPT)), str(out), "--quantize", "int8"]) == 0
    assert "quantised 39 encoder linear layers to int8" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantize"] == "int8"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # our writer, safetensors' reader
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        q_proj = f.get_tensor("encoder.layers.0.attn.q_proj.weight"), f.get_tensor("encoder.layers.0.attn.q_proj.bias")
    assert dtypes["encoder.layers.0.attn.q_proj.weight"] == "I8"
    assert dtypes["encoder.layers.0.attn.q_proj.weight_scale"] == "F32"
    assert sum(d == "I8" for d in dtypes.values()) == 39

    reloaded = onepeace.load(out)
    layer = reloaded.encoder.layers[0].attn.q_proj
    assert torch.equal(layer.int8_weight()[0], q_proj[0]) and torch.equal(layer.bias, q_proj[1])
    assert isinstance(reloaded.encoder.layers[0].ffn["text"].wi_0, Int8Linear)
    assert reloaded.load_report.storage_dtypes["int8"] == 39
    assert any("int8" in note for note in reloaded.load_report.config_notes)
    a, b = _embed(int8_model, tiny_expected), _embed(reloaded, tiny_expected)
    for m in a:  # the folder holds exactly the in-memory model's int8 weights and scales
        assert torch.equal(a[m], b[m]), (m, (a[m] - b[m]).abs().max().item())
    # a text-only load reads the text branch and the shared layers only
    text_only = onepeace.load(out, modalities=["text"])
    assert "image" in text_only.load_report.skipped_modalities
    tokens = tiny_expected["inputs"]["src_tokens"]
    with torch.inference_mode():
        assert torch.equal(text_only(text=tokens).embeddings["text"], reloaded(text=tokens).embeddings["text"])


def test_folder_size_and_state_dict_round_trip(tmp_path, int8_model, tiny_expected):
    from onepeace.checkpoint import save_converted

    fp32 = save_converted(onepeace.load(require(TINY_CKPT), pack=False), tmp_path / "fp32")
    q8 = save_converted(int8_model, tmp_path / "int8")  # from a packed (fbgemm) model: unpacked per layer
    ratio = (q8 / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    print(f"\nint8 folder / float32 folder: {ratio:.2f}")
    assert ratio < 0.6
    clone = copy.deepcopy(int8_model)  # packed weights do not pickle: the int8 tensors travel
    a, b = _embed(int8_model, tiny_expected), _embed(clone, tiny_expected)
    assert all(torch.equal(a[m], b[m]) for m in a)


def test_refusals(int8_model):
    path = require(TINY_CKPT)
    for kwargs, words in [(dict(device="cuda"), "CPU only"), (dict(dtype=torch.bfloat16), "dtype"),
                          (dict(pack=True), "pack=True"), (dict(fuse=True), "fuse=True"),
                          (dict(compile=True), "compile=True")]:
        with pytest.raises(ValueError, match=words):
            onepeace.load(path, quantize="int8", **kwargs)
    with pytest.raises(ValueError, match="'int4' is not supported"):
        onepeace.load(path, quantize="int4")
    with pytest.raises(RuntimeError, match="cannot train"):
        int8_model.train()
    with pytest.raises(RuntimeError, match="cannot convert"):
        int8_model.to(torch.bfloat16)
    layer = int8_layers(int8_model)["encoder.layers.0.attn.q_proj"]
    with pytest.raises(RuntimeError, match="no backward"):
        layer(torch.randn(2, layer.in_features, requires_grad=True))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():  # the layer computes x (int8 W * scale)^T + b, up to activation rounding
        ref = x @ layer.dense_weight().T + layer.bias
        rel = ((layer(x) - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.02, rel


def test_convert_refuses_before_reading(tmp_path, capsys):
    from onepeace.cli import main

    assert main(["convert", str(require(TINY_CKPT)), str(tmp_path / "x"), "--quantize", "int8",
                 "--dtype", "bfloat16"]) == 2
    assert "dtype" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- calibrated smoothing (SmoothQuant)
CALIBRATION_TEXTS = ["a photo of a dog", "a cow in a field", "an elephant", "two birds on a wire",
                     "a red car", "someone playing the piano", "the number seven", "a cat asleep"]


def _calibration():
    return {"text": CALIBRATION_TEXTS, "image": [str(require(ASSETS / n)) for n in ("dog.JPEG", "elephant.JPEG")],
            "audio": [str(require(ASSETS / n)) for n in ("dog.flac", "cow.flac")]}


def _embeddings(model) -> dict[str, torch.Tensor]:
    c = _calibration()
    with torch.inference_mode():
        return {"text": model.encode_text(c["text"] + ["a horse", "rain on a roof"]),
                "image": model.encode_image(c["image"] + [str(require(ASSETS / "pokemons.jpg"))]),
                "audio": model.encode_audio(c["audio"])}


def test_smoothing_keeps_the_float_function(tiny_model_dir):
    from onepeace.modeling.smoothing import calibrate_for_int8

    model = onepeace.load(tiny_model_dir, pack=False)  # the test size with the real vocabulary
    before = _embeddings(model)
    norm_before = model.encoder.layers[0].ffn["text"].norm.weight.clone()
    note = calibrate_for_int8(model, _calibration())
    after = _embeddings(model)
    for m in before:
        err = (after[m] - before[m]).abs().max().item()
        print(f"{m}: max |smoothed - float| = {err:.2e}")
        assert err < 1e-5
    assert not torch.equal(model.encoder.layers[0].ffn["text"].norm.weight, norm_before)  # it did fold something
    assert "smoothed" in note and "8 text" in note and "2 image" in note and "2 audio" in note


def test_calibration_removes_the_outlier_channels_error(tiny_model_dir):
    # a channel range like the trained models' (27-73x the median channel at fc_out's input): plain
    # int8 loses the other channels to the outliers' scale, calibrated int8 does not
    from onepeace.modeling.smoothing import calibrate_for_int8

    def with_outliers():
        model = onepeace.load(tiny_model_dir, pack=False)
        with torch.no_grad():
            for layer in model.encoder.layers:
                norm = layer.ffn["text"].norm
                norm.weight[:3] *= 60.0
                layer.ffn["text"].fc_out.weight[:, :3] /= 60.0  # the float function stays comparable
        return model

    texts = CALIBRATION_TEXTS + ["a horse", "rain on a roof"]
    with torch.inference_mode():
        reference = with_outliers().encode_text(texts)
    plain = with_outliers()
    from onepeace.modeling.quantized import quantize_int8
    quantize_int8(plain)
    calibrated = with_outliers()
    calibrate_for_int8(calibrated, {"text": CALIBRATION_TEXTS})
    quantize_int8(calibrated)

    def error(model):
        with torch.inference_mode():
            got = model.encode_text(texts)
        return (1 - torch.nn.functional.cosine_similarity(got, reference)).max().item()

    e_plain, e_cal = error(plain), error(calibrated)
    print(f"text embeddings, 1 - cosine to float32: plain int8 {e_plain:.2e}, calibrated int8 {e_cal:.2e}")
    assert e_cal < 0.5 * e_plain


def test_load_and_convert_calibrated(tmp_path, tiny_expected, capsys):
    # the released-format fixture (its vocabulary has 120 tokens, so no real texts): images and audio
    from onepeace.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for n in ("dog.JPEG", "elephant.JPEG"):
        (images / n).write_bytes(require(ASSETS / n).read_bytes())
    sources = [str(images), str(require(ASSETS / "dog.flac")), str(require(ASSETS / "cow.flac"))]
    loaded = onepeace.load(require(TINY_CKPT), quantize="int8", calibration=sources)
    assert any("2 image, 2 audio inputs" in n for n in loaded.load_report.config_notes)
    out = tmp_path / "int8-calibrated"
    assert main(["convert", str(require(TINY_CKPT)), str(out), "--quantize", "int8", "--calibrate", *sources]) == 0
    assert "FFN output projections smoothed" in capsys.readouterr().out
    a, b = _embed(loaded, tiny_expected), _embed(onepeace.load(out), tiny_expected)
    for m in ("text", "image", "audio"):
        assert torch.allclose(a[m], b[m], atol=1e-6), m
    errors = fixture_embedding_errors(loaded, tiny_expected)
    print("official-tiny in calibrated int8, max relative error:", {m: f"{e:.4f}" for m, e in errors.items()})
    assert max(errors.values()) <= FIXTURE_BOUND


def test_calibration_refusals(tmp_path, int8_model, capsys):
    from onepeace.cli import main
    from onepeace.modeling.smoothing import calibrate_for_int8, calibration_inputs

    with pytest.raises(ValueError, match="quantize='int8'"):
        onepeace.load(require(TINY_CKPT), calibration={"text": ["a dog"]})
    with pytest.raises(ValueError, match="already int8"):
        calibrate_for_int8(int8_model, {"text": ["a dog"]})
    bad = tmp_path / "notes.docx"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="notes.docx"):
        calibration_inputs([str(bad)])
    with pytest.raises(ValueError, match="no calibration inputs"):
        calibration_inputs({"text": []})
    with pytest.raises(ValueError, match="no branch for"):
        calibrate_for_int8(onepeace.load(require(TINY_CKPT), pack=False, modalities=["text"]),
                           {"image": [str(require(ASSETS / "dog.JPEG"))]})
    assert main(["convert", str(require(TINY_CKPT)), str(tmp_path / "x"), "--calibrate", str(bad)]) != 0
    assert "--quantize int8" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_loud_row_costs_the_other_rows_no_precision():
    """Each row (token) is quantised on its own range: a row 100x louder than the rest (an end token, a
    loud frame) leaves the other rows' int8 error where it is alone. With one scale per call (fbgemm's
    own), those rows would get ~1/100 of the levels; the comparison shows the difference."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    layer = Int8Linear.from_linear(linear)
    quiet = torch.randn(8, 256)
    with torch.no_grad():
        exact = quiet @ layer.dense_weight().T + layer.bias  # the int8 weight's own product: activation error only

        def error(y):
            return ((y - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()

        alone = error(layer(quiet))
        beside_loud = error(layer(torch.cat([quiet, 100 * torch.randn(1, 256)]))[:8])
        q, scale = layer.int8_weight()
        one_scale = error(torch.ops.quantized.linear_dynamic(
            torch.cat([quiet, 100 * torch.randn(1, 256)]), _fbgemm_packed(q, scale, layer.bias), reduce_range())[:8])
    print(f"\nint8 relative error of 8 rows: alone {alone:.4f}, beside a 100x row {beside_loud:.4f}, "
          f"with one scale for the call {one_scale:.4f}")
    assert alone < 0.02 and beside_loud < 1.5 * alone, (alone, beside_loud)
    assert one_scale > 5 * beside_loud  # what per-row scaling avoids


def _fbgemm_packed(q, scale, bias):
    from onepeace.modeling.quantized import _prepack

    return _prepack(q, scale, bias)

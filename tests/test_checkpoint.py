"""Loading released checkpoints: safety, strictness, dtypes, partial loading, conversion, 4B layout."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import onepeace
from conftest import SHARED, TINY_CKPT, max_rel_error, require
from onepeace.checkpoint import (
    CheckpointError,
    load_released_checkpoint,
    released_key_map,
    save_released_checkpoint,
)
from onepeace.serialization import LazyTensor, read_checkpoint


def _fixture_object():
    """The fixture checkpoint as plain Python objects (tensors read, meters as placeholders)."""
    obj, archive = read_checkpoint(require(TINY_CKPT))
    try:
        obj["model"] = {k: v.load() for k, v in obj["model"].items()}
        obj["extra_state"] = {}  # the meters came back as placeholders, which cannot be re-pickled
    finally:
        archive.close()
    return obj


def _run_model(model, inputs):
    with torch.no_grad():
        return model(text=inputs["src_tokens"], image=inputs["src_images"], audio=inputs["src_audios"],
                     audio_padding_mask=inputs["audio_padding_masks"])


# ------------------------------------------------------------------------------ 4B layout
def test_4b_meta_model_has_exactly_the_released_parameters():
    rows = (require(SHARED / "spec" / "one-peace-4b-retrieval-keys.tsv")).read_text().splitlines()[1:]
    params, buffers = {}, {}
    for row in rows:
        key, shape, kind = row.split("\t")
        dims = tuple(int(d) for d in shape.split("x")) if shape else ()
        (params if kind == "param" else buffers)[key] = dims
    model = onepeace.create_model("one-peace-4b", device="meta")
    key_map = released_key_map(model)
    ours = {key_map[name]: tuple(p.shape) for name, p in model.state_dict().items()}
    assert set(ours) == set(params), (sorted(set(params) - set(ours))[:5], sorted(set(ours) - set(params))[:5])
    wrong = {k: (ours[k], params[k]) for k in params if ours[k] != params[k]}
    assert not wrong, wrong
    n = sum(p.numel() for p in model.parameters())
    print(f"one-peace-4b: {len(ours)} parameters, {n / 1e9:.3f}e9 values")
    assert 3.8e9 < n < 3.95e9
    # buffers are recomputed, not stored: same shapes as the released ones
    from onepeace.modeling.relative_position import bucket_index_1d, bucket_index_2d

    assert tuple(bucket_index_1d(256).shape) == buffers["encoder_wrapper.text_adapter.rp_bucket"]
    assert tuple(bucket_index_1d(512).shape) == buffers["encoder_wrapper.audio_adapter.rp_bucket"]
    assert tuple(bucket_index_2d(16).shape) == buffers["encoder_wrapper.image_adapter.rp_bucket"]
    assert set(buffers) == {"encoder_wrapper.text_adapter.rp_bucket", "encoder_wrapper.audio_adapter.rp_bucket",
                            "encoder_wrapper.image_adapter.rp_bucket", "encoder_wrapper.image_adapter.position_idx",
                            "encoder_wrapper.fusion_model.version"}


@pytest.mark.slow  # a subprocess loading torch
# ------------------------------------------------------------------------------ safety
def test_loads_without_fairseq_importable(tmp_path):
    """A subprocess where any `fairseq` import fails still loads the fixture and reports the meters."""
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fairseq" or name.startswith("fairseq."):
                    raise ImportError("fairseq is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import fairseq
            raise SystemExit("fairseq was importable")
        except ImportError:
            pass
        import onepeace
        model = onepeace.load({str(TINY_CKPT)!r})
        assert "fairseq" not in sys.modules
        print("placeholders:", model.load_report.placeholders)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fairseq.logging.meters.AverageMeter" in result.stdout


class _RunsACommand:
    """Pickles to `os.system(<command>)`: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_neutralised(tmp_path):
    marker = tmp_path / "pwned"
    obj = _fixture_object()
    obj["extra_state"] = {"meters": _RunsACommand(f"touch {marker}")}
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    model = onepeace.load(path)
    assert not marker.exists(), "the pickled command ran"
    assert any(name.endswith("system") for name in model.load_report.placeholders)
    # and the weights are still the real ones
    ref = onepeace.load(TINY_CKPT)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_malicious_object_in_place_of_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    obj = _fixture_object()
    obj["model"]["logit_scale"] = _RunsACommand(f"touch {marker}")
    path = tmp_path / "evil2.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="logit_scale is not a tensor"):
        onepeace.load(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------ strictness
def test_missing_key_is_named(tmp_path):
    obj = _fixture_object()
    key = "encoder_wrapper.fusion_model.layers.1.image_ffn.3.bias"
    del obj["model"][key]
    path = tmp_path / "missing.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"missing.*" + key.replace(".", r"\.")):
        onepeace.load(path)


def test_unexpected_key_is_named(tmp_path):
    obj = _fixture_object()
    obj["model"]["encoder_wrapper.fusion_model.layers.0.mystery.weight"] = torch.zeros(3)
    path = tmp_path / "unexpected.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"unexpected.*mystery"):
        onepeace.load(path)


def test_wrong_shape_is_named(tmp_path):
    obj = _fixture_object()
    obj["model"]["text_proj.bias"] = torch.zeros(63)
    path = tmp_path / "shape.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"text_proj|projections\.text"):
        onepeace.load(path)


def test_pretraining_keys_are_reported_not_loaded():
    path = require(SHARED / "fixtures" / "official-pretrain-tiny" / "checkpoint.pt")
    model = onepeace.load(path)
    report = model.load_report
    assert any(k.startswith("decoder_wrapper.") for k in report.pretraining_only)
    assert "text_mask_token" in report.pretraining_only
    assert any(k.startswith("decoder_image_embed.") for k in report.pretraining_only)
    assert model.modalities == ("text", "image", "audio")


def test_task_checkpoint_has_a_head_and_no_embeddings():
    path = require(SHARED / "fixtures" / "official-classify-tiny" / "checkpoint.pt")
    model = onepeace.load(path)
    assert model.head_type == "vl" and model.projections is None and model.modalities == ("text", "image")
    with torch.no_grad():
        out = model(text=torch.tensor([[5, 6, 2]]))
    assert out.embeddings == {} and out.hidden_states["text"].shape == (1, 4, 64)
    with pytest.raises(RuntimeError, match="no projection heads"):
        model.project("text", out.hidden_states["text"][:, 0])


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ValueError, match="bad.pt"):
        onepeace.load(bad)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        onepeace.load(tmp_path / "nope.pt")


def test_cfg_disagreeing_with_tensors_warns_and_tensors_win(tmp_path, tiny_expected):
    obj = _fixture_object()
    obj["cfg"]["model"]["encoder"]["embed_dim"] = 999
    obj["cfg"]["model"]["encoder"]["layers"] = 7
    path = tmp_path / "cfg.pt"
    torch.save(obj, path)
    with pytest.warns(UserWarning, match="embed_dim=999.*64"):
        model = onepeace.load(path)
    assert model.config.encoder.embed_dim == 64 and model.config.encoder.layers == 3
    out = _run_model(model, tiny_expected["inputs"])
    assert max_rel_error(out.embeddings["text"], tiny_expected["outputs"]["text_embed"]) < 1e-5


# ------------------------------------------------------------------------------ dtypes, partial loading
@pytest.mark.parametrize("cpu", ["this CPU", "AVX2-only"])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads(tmp_path, tiny_expected, storage, cpu, monkeypatch):
    """Stored in half precision, computed in float32 or in the stored dtype, on this CPU and on one whose
    oneDNN packs float32 only (AVX2 without AVX-512: packing a bfloat16 weight would raise there)."""
    from onepeace.modeling import packed

    if cpu == "AVX2-only":
        monkeypatch.setattr(packed, "cpu_can_pack", lambda dtype: dtype == torch.float32)
    obj = _fixture_object()
    obj["model"] = {k: (v.to(storage) if v.is_floating_point() else v) for k, v in obj["model"].items()}
    path = tmp_path / f"{storage}.pt"
    torch.save(obj, path)
    kept = onepeace.load(path, dtype=None)
    assert kept.dtype == storage
    assert kept.load_report.storage_dtypes[str(storage).replace("torch.", "")] > 100
    model = onepeace.load(path, dtype=torch.float32)
    assert model.dtype == torch.float32
    out = _run_model(model, tiny_expected["inputs"])
    err = max_rel_error(out.embeddings["image"], tiny_expected["outputs"]["image_embed"])
    print(f"{storage} weights, float32 compute: image_embed max rel error {err:.2e}")
    assert err < 0.05  # weight rounding only
    assert kept.is_packed == packed.cpu_can_pack(storage)  # plain weights where the CPU cannot pack
    with torch.no_grad():  # compute in the stored dtype too
        half = kept(image=tiny_expected["inputs"]["src_images"])
    err = max_rel_error(half.embeddings["image"], tiny_expected["outputs"]["image_embed"])
    print(f"{storage} weights, {storage} compute ({cpu}): image_embed max rel error {err:.2e}")
    assert err < 0.05


def test_modalities_subset_never_reads_other_branches(monkeypatch, tiny_expected):
    read = []
    original = LazyTensor.load

    def spy(self, *args, **kwargs):
        read.append(self.storage.key)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LazyTensor, "load", spy)
    model = onepeace.load(TINY_CKPT, modalities=("text", "image"))
    assert model.modalities == ("text", "image")
    assert not [n for n in model.state_dict() if "audio" in n]
    assert model.load_report.skipped_modalities["audio"] == 61
    # the storages read are exactly those of the model's parameters
    obj, archive = read_checkpoint(TINY_CKPT)
    archive.close()
    audio_storages = {v.storage.key for k, v in obj["model"].items() if "audio" in k}
    assert audio_storages and not (audio_storages & set(read))
    out = _run_model(model, {**tiny_expected["inputs"], "src_audios": None, "audio_padding_masks": None})
    assert max_rel_error(out.embeddings["text"], tiny_expected["outputs"]["text_embed"]) < 1e-5
    with pytest.raises(ValueError, match="no \\['audio'\\] branch"):
        model(audio=tiny_expected["inputs"]["src_audios"])


# ------------------------------------------------------------------------------ conversion
def test_convert_then_load_is_bit_exact(tmp_path, tiny_model, tiny_expected):
    from onepeace.cli import main

    out_dir = tmp_path / "converted"
    assert main(["convert", str(TINY_CKPT), str(out_dir)]) == 0
    assert (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists()
    converted = onepeace.load(out_dir)
    a = _run_model(tiny_model, tiny_expected["inputs"])
    b = _run_model(converted, tiny_expected["inputs"])
    for m in ("text", "image", "audio"):
        assert torch.equal(a.embeddings[m], b.embeddings[m]), m
        assert torch.equal(a.hidden_states[m], b.hidden_states[m]), m
    partial = onepeace.load(out_dir, modalities=["audio"])
    assert partial.modalities == ("audio",) and partial.load_report.skipped_modalities["text"] > 0


def test_convert_keeps_or_casts_storage_dtype(tmp_path):
    from onepeace.cli import main

    assert main(["convert", str(TINY_CKPT), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    model = onepeace.load(tmp_path / "bf16", dtype=None)
    assert model.dtype == torch.bfloat16
    assert model.load_report.storage_dtypes == {"bfloat16": sum(1 for _ in model.state_dict())}


# ------------------------------------------------------------------------------ every flag round-trips
FLAG_VARIANTS = {
    "released-like": {},
    "scale_attn+scale_heads, no magneto/layer-scale/scale_fc": dict(
        encoder=dict(scale_attn=True, scale_heads=True, magneto_scale_attn=False, use_layer_scale=False,
                     scale_fc=False)),
    "per-layer tables, mlp stem, embedding LN and type embeddings": dict(
        encoder=dict(rel_pos_tables=3),
        text=dict(layernorm_embedding=True, add_type_embedding=True),
        image=dict(vision_encoder_type="mlp", layernorm_embedding=True, add_type_embedding=True),
        audio=dict(layernorm_embedding=True, add_type_embedding=True, conv_bias=True, conv_pos_pre_ln=True)),
    "fixed audio positions, no attention bias": dict(
        text=dict(use_attn_bias=False), image=dict(use_attn_bias=False),
        audio=dict(abs_pos_type="fixed", use_attn_bias=False)),
}


def _variant_config(changes):
    import dataclasses

    base = onepeace.get_config("one-peace-tiny")
    adapters = {m: dataclasses.replace(c, **changes.get(m, {})) for m, c in base.adapters.items()}
    return dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, **changes.get("encoder", {})),
                               adapters=adapters)


@pytest.mark.parametrize("variant", list(FLAG_VARIANTS))
def test_every_flag_round_trips_through_the_released_layout(tmp_path, variant):
    torch.manual_seed(0)
    config = _variant_config(FLAG_VARIANTS[variant])
    model = onepeace.create_model(config).eval()
    with torch.no_grad():  # non-trivial values everywhere (many parameters start at 0 or 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "variant.pt"
    save_released_checkpoint(model, path)
    loaded, report = load_released_checkpoint(path)
    assert loaded.config.encoder == config.encoder
    assert loaded.config.adapters == config.adapters, (loaded.config.adapters, config.adapters)
    tokens = torch.tensor([[5, 6, 7, 2, 1], [8, 9, 10, 11, 2]])
    images = torch.randn(2, 3, 64, 64)
    audio = torch.randn(2, 16000)
    for joint in (False, True):
        with torch.no_grad():
            a = model(text=tokens, image=images, audio=audio, joint=joint)
            b = loaded(text=tokens, image=images, audio=audio, joint=joint)
        for m in a.hidden_states:
            assert torch.equal(a.hidden_states[m], b.hidden_states[m]), (variant, m, joint)
            assert torch.isfinite(a.hidden_states[m]).all()

"""The trainer: stages, torchrun data parallelism, exact resume after a kill, checkpoints, bad items."""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import onepeace
from conftest import BPE_DIR, FIXTURES, require
from onepeace.checkpoint import (
    load_pretrain_checkpoint,
    pretrain_key_map,
    save_converted,
    save_released_pretrain_checkpoint,
)
from onepeace.train.config import STAGES, TrainConfig
from onepeace.train.loop import Trainer
from onepeace.train.optim import apply_freezing, build_optimizer, wants_decay

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 coloured squares with captions and 16 tones with captions, as manifests."""
    import soundfile as sf
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with open(root / "vl.jsonl", "w") as f:
        for i in range(24):
            arr = np.zeros((40, 40, 3), np.uint8)
            arr[...] = rng.integers(0, 255, 3)
            Image.fromarray(arr).save(root / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "text": f"a {COLORS[i % 8]} square", "label": COLORS[i % 8]}) + "\n")
    with open(root / "al.jsonl", "w") as f:
        for i in range(16):
            t = np.arange(16000) / 16000  # equal lengths: padding then cannot differ between ranks
            sf.write(root / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 100 * (i % 8)) * t)).astype(np.float32), 16000)
            f.write(json.dumps({"audio": f"tone{i}.wav", "text": f"a {COLORS[i % 8]} tone", "label": COLORS[i % 8]}) + "\n")
    return root


def _config(data, out, **overrides) -> dict:
    raw = {"train_manifest": str(data / "vl.jsonl"), "output_dir": str(out), "model": "one-peace-tiny",
           "batch_size": 8, "steps": 3, "warmup_steps": 1, "lr": 1e-5, "save_every": 100, "log_every": 1,
           "bpe_dir": str(require(BPE_DIR)), "progress": False}
    raw.update(overrides)
    return raw


def _write(raw: dict, path) -> str:
    with open(path, "w") as f:
        json.dump(raw, f)
    return str(path)


def _final_params(out) -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------ stages
def _reference_stage2_trainable(released_keys: list[str]) -> list[str]:
    """The reference rule, written on the RELEASED names: frozen = encoder_wrapper.* except the audio
    adapter, audio FFN experts and audio final LayerNorm; plus text_proj. Everything else trains."""
    trainable = []
    for key in released_keys:
        frozen = key.startswith("encoder_wrapper.") and not (
            key.startswith("encoder_wrapper.audio_adapter.")
            or fnmatch.fnmatchcase(key, "encoder_wrapper.fusion_model.layers.*.audio_ffn.*")
            or key.startswith("encoder_wrapper.fusion_model.audio_layer_norm."))
        frozen = frozen or key.startswith("text_proj.")
        if not frozen:
            trainable.append(key)
    return sorted(trainable)


def test_stage2_trainable_parameters_are_the_reference_set():
    pm, _ = load_pretrain_checkpoint(require(FIXTURES / "official-pretrain-tiny" / "checkpoint.pt"))
    key_map = pretrain_key_map(pm)
    stage = STAGES["stage2"]
    ours = sorted(key_map[n] for n in apply_freezing(pm, stage.frozen, stage.trainable))
    reference = _reference_stage2_trainable(list(key_map.values()))
    print(f"stage 2 trains {len(ours)} of {len(key_map)} parameters:")
    for name in ours:
        print("  ", name)
    assert ours == reference
    assert "logit_scale" in ours and "audio_proj.weight" in ours and "text_proj.weight" not in ours
    assert "encoder_wrapper.fusion_model.layers.0.self_attn.q_proj.weight" not in ours
    assert "encoder_wrapper.fusion_model.layers.2.audio_ffn.0.wi_0.weight" in ours
    # stage 1 trains everything
    assert len(apply_freezing(pm, STAGES["stage1"].frozen, STAGES["stage1"].trainable)) == len(key_map)


def test_no_weight_decay_on_biases_norms_positions_and_cls():
    model = onepeace.create_model("one-peace-tiny")
    names = {n for n, p in model.named_parameters() if not wants_decay(n, p)}
    assert "encoder.layers.0.attn.q_proj.bias" in names
    assert "encoder.layers.0.attn_norm.weight" in names
    assert "adapters.text.pos_embed.weight" in names and "adapters.image.pos_embed" in names
    assert "adapters.text.cls_token" in names and "adapters.audio.cls_pos_embed" in names
    assert "logit_scale" in names and "encoder.layers.0.layer_scale_attn" in names
    assert "encoder.layers.0.attn.q_proj.weight" not in names
    assert "adapters.text.token_embed.weight" not in names
    opt = build_optimizer(model, 1e-3, 0.05)
    decays = [g["weight_decay"] for g in opt.param_groups]
    assert decays == [0.05, 0.0]


@pytest.mark.slow
# ------------------------------------------------------------------------------ distributed
@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_end_with_the_same_parameters_as_one(data, tmp_path, sharding):
    raw = _config(data, tmp_path / "ddp", fsdp=sharding == "fsdp")
    cfg_path = _write(raw, tmp_path / "cfg.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         "29517" if sharding == "ddp" else "29518",
         "-m", "onepeace.train", cfg_path], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    single = Trainer(TrainConfig.from_dict({**raw, "output_dir": str(tmp_path / "single")}))
    single.fit()
    diff = _max_diff(_final_params(tmp_path / "ddp"), _final_params(tmp_path / "single"))
    print(f"2 processes ({sharding}) vs 1 after {raw['steps']} steps: max |param difference| {diff:.2e}")
    assert diff <= 1e-5
    two = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    one = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
    assert abs(two[0]["loss"] - one[0]["loss"]) < 1e-5  # the same global batch, the same loss


# ------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_killed_run_resumes_exactly(data, tmp_path):
    raw = _config(data, tmp_path / "killed", steps=5, save_every=2, drop_path_rate=0.3, lr=5e-4,
                  batch_size=8, train_manifest=str(data / "vl.jsonl"))
    cfg_path = _write(raw, tmp_path / "cfg.json")
    # kill the run for real (SIGKILL: no cleanup) as soon as its first checkpoint (step 2) is there
    ckpts = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "onepeace.train", cfg_path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not list(ckpts.glob("step_*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    stderr = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == -9, f"the run ended before the kill (rc {proc.returncode}): {stderr[-2000:]}"
    kept = sorted(p.name for p in ckpts.glob("step_*.pt"))
    assert kept and "step_00000005.pt" not in kept, kept  # killed mid-run (at step 2, or 4 on a slow machine)
    resumed = Trainer(TrainConfig.from_dict(raw))
    assert resumed.resumed_from.endswith(kept[-1]) and resumed.step == int(kept[-1][5:13])
    print(f"killed with checkpoints {kept}; resuming at step {resumed.step}")
    resumed.fit()
    straight = Trainer(TrainConfig.from_dict({**raw, "output_dir": str(tmp_path / "straight")}))
    straight.fit()
    diff = _max_diff(_final_params(tmp_path / "killed"), _final_params(tmp_path / "straight"))
    print(f"killed and resumed vs uninterrupted, step 5: max |param difference| {diff:.2e}")
    assert diff == 0.0
    # the run crossed an epoch boundary (24 items / 8 = 3 steps per epoch) and kept only the last 3
    assert len(list((tmp_path / "straight" / "checkpoints").glob("step_*.pt"))) == 3
    assert not list((tmp_path / "straight" / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------------------------ stages end to end
def test_stage2_from_a_stage1_checkpoint(data, tmp_path):
    stage1 = Trainer(TrainConfig.from_dict(_config(data, tmp_path / "s1", steps=2)))
    stage1.fit()
    start = sorted((tmp_path / "s1" / "checkpoints").glob("step_*.pt"))[-1]
    raw = _config(data, tmp_path / "s2", stage="stage2", train_manifest=str(data / "al.jsonl"), init_from=str(start),
                  steps=2, lr=1e-3)
    stage2 = Trainer(TrainConfig.from_dict(raw))
    before = {k: v.clone() for k, v in stage2.pm.state_dict().items()}
    assert abs(stage2.pm.model.logit_scale.item() - np.log(1 / 0.07)) < 1e-6  # re-initialised
    stage2.fit()
    after = stage2.pm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.encoder.layers.0.attn.q_proj.weight" not in changed
    assert "model.projections.text.weight" not in changed
    assert "model.adapters.text.token_embed.weight" not in changed
    assert "model.encoder.layers.0.ffn.audio.wi_0.weight" in changed
    assert "model.adapters.audio.feature_proj.weight" in changed
    assert "decoder.encoder.layers.0.attn.q_proj.weight" in changed
    metrics = [json.loads(line) for line in open(tmp_path / "s2" / "metrics.jsonl")]
    assert {"atc_loss", "dcl_audio_loss", "dcl_al_text_loss", "dcl_al_audio_loss"} <= set(metrics[-1])


def test_start_from_an_embedding_model_gets_a_new_decoder(data, tmp_path):
    torch.manual_seed(1)
    model = onepeace.create_model("one-peace-tiny")
    save_converted(model, tmp_path / "converted")
    trainer = Trainer(TrainConfig.from_dict(_config(data, tmp_path / "run", init_from=str(tmp_path / "converted"),
                                                    steps=1, decoder_embed_dim=32)))
    assert trainer.pm.config.decoder.encoder.embed_dim == 32
    for k, v in model.state_dict().items():
        assert torch.equal(trainer.pm.model.state_dict()[k], v), k
    trainer.fit()


@pytest.mark.slow  # a training run
def test_bad_items_are_logged_and_skipped(data, tmp_path, caplog):
    lines = open(data / "vl.jsonl").read().splitlines()
    lines[3] = json.dumps({"image": str(tmp_path / "missing.png"), "text": "a lost square"})
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    lines[5] = json.dumps({"image": str(tmp_path / "corrupt.png"), "text": "a broken square"})
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(f"{line}" if line.startswith("{") and "missing" in line or "corrupt" in line
                                  else line.replace('"img', f'"{data}/img') for line in lines) + "\n")
    with caplog.at_level("WARNING", logger="onepeace.data"):
        trainer = Trainer(TrainConfig.from_dict(_config(data, tmp_path / "run", train_manifest=str(manifest), steps=3)))
        last = trainer.fit()
    assert trainer.step == 3 and np.isfinite(last["loss"])
    assert "missing.png" in caplog.text and "corrupt.png" in caplog.text


@pytest.mark.slow  # a training run
def test_bf16_autocast_and_activation_checkpointing(data, tmp_path):
    base = _config(data, tmp_path / "a", steps=1)
    plain = Trainer(TrainConfig.from_dict(base)).fit()
    ckpt = Trainer(TrainConfig.from_dict({**base, "output_dir": str(tmp_path / "b"), "grad_checkpointing": True})).fit()
    assert abs(plain["loss"] - ckpt["loss"]) < 1e-5 and abs(plain["grad_norm"] - ckpt["grad_norm"]) < 1e-3
    bf16 = Trainer(TrainConfig.from_dict({**base, "output_dir": str(tmp_path / "c"), "precision": "bf16"})).fit()
    assert np.isfinite(bf16["loss"]) and abs(bf16["loss"] - plain["loss"]) < 0.2


def test_gradient_accumulation_runs_and_logs(data, tmp_path):
    trainer = Trainer(TrainConfig.from_dict(_config(data, tmp_path / "acc", steps=2, grad_accum=2)))
    last = trainer.fit()
    assert trainer.step == 2 and np.isfinite(last["loss"])
    assert len(open(tmp_path / "acc" / "metrics.jsonl").read().splitlines()) == 2


def test_pretraining_checkpoint_round_trips_in_the_released_layout(tmp_path):
    pm, _ = load_pretrain_checkpoint(require(FIXTURES / "official-pretrain-tiny" / "checkpoint.pt"))
    save_released_pretrain_checkpoint(pm, tmp_path / "again.pt")
    again, report = load_pretrain_checkpoint(tmp_path / "again.pt")
    for (k, a), (_, b) in zip(pm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.config.decoder.encoder == pm.config.decoder.encoder


def test_config_errors_are_clear(data):
    with pytest.raises(ValueError, match="unknown stage"):
        TrainConfig.from_dict(_config(data, "x", stage="stage3"))
    with pytest.raises(ValueError, match="unknown TrainConfig fields.*learning_rate"):
        TrainConfig.from_dict(_config(data, "x", learning_rate=1))
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict(_config(data, "x", precision="fp8"))


@pytest.mark.slow  # DataLoader worker processes, two runs
def test_dataloader_workers_do_not_change_the_batches(data, tmp_path):
    """Masks depend only on (seed, epoch, item): 2 worker processes give what 0 workers give."""
    base = _config(data, tmp_path / "w0", steps=2)
    zero = Trainer(TrainConfig.from_dict(base)).fit()
    two = Trainer(TrainConfig.from_dict({**base, "output_dir": str(tmp_path / "w2"), "num_workers": 2})).fit()
    assert zero["loss"] == two["loss"] and zero["grad_norm"] == two["grad_norm"]

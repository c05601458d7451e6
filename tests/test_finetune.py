"""onepeace finetune: layer-wise lr decay groups, the three modes, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import onepeace
from onepeace.finetune import FinetuneConfig, finetune
from onepeace.train.optim import layer_decay_groups, parameter_depth

from conftest import random_tiny_model


@pytest.fixture
def shapes_manifests(tmp_path):
    """Two classes of 64-pixel PNGs (a bright bar on the left / on the top), train 24 and test 8."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 24), ("test", 8)):
        lines = []
        for i in range(n):
            label = ("left", "top")[i % 2]
            pixels = rng.integers(0, 60, (64, 64), dtype=np.uint8)
            if label == "left":
                pixels[:, 4:20] = 255
            else:
                pixels[4:20, :] = 255
            path = tmp_path / f"{split}{i}.png"
            Image.fromarray(pixels).save(path)
            lines.append({"image": str(path), "text": f"a bar on the {label}", "label": label})
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return paths


def _config(paths, tmp_path, **changes) -> FinetuneConfig:
    base = dict(model="(in memory)", train_manifest=str(paths["train"]), test_manifest=str(paths["test"]),
                output_dir=str(tmp_path / "out"), batch_size=8, steps=12, lr=1e-3, warmup_steps=2, progress=False,
                probe_steps=60)
    return FinetuneConfig(**{**base, **changes})


def test_layer_decay_groups_scale_lr_by_depth():
    model = random_tiny_model()  # 3 layers
    L = len(model.encoder.layers)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("adapters.audio."))
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["adapters.image.patch_embed.conv1.weight"]["lr"] == 0.5 ** (L + 1)
    assert by_name["encoder.layers.0.attn.q_proj.weight"]["lr"] == 0.5 ** L
    assert by_name[f"encoder.layers.{L - 1}.ffn.text.wi_0.weight"]["lr"] == 0.5
    assert by_name["projections.text.weight"]["lr"] == 1.0 and by_name["logit_scale"]["lr"] == 1.0
    assert by_name["encoder.final_norms.image.weight"]["depth"] == L + 1
    # no weight decay on biases, norms, positions; decay on matrices
    assert by_name["encoder.layers.0.attn.q_proj.bias"]["weight_decay"] == 0.0
    assert by_name["adapters.image.pos_embed"]["weight_decay"] == 0.0
    assert by_name["encoder.layers.0.attn.q_proj.weight"]["weight_decay"] == 0.05
    # frozen parameters are in no group; every trainable one is in exactly one
    assert not any(n.startswith("adapters.audio.") for n in by_name)
    assert len(by_name) == sum(1 for p in model.parameters() if p.requires_grad)
    assert parameter_depth("classify_head.fc2.weight", L) == L + 1
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_groups(model, 1.0, 0.0, layer_decay=0.0)


def test_linear_probe_leaves_the_model_unchanged_and_learns(shapes_manifests, tmp_path):
    model = random_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = finetune(_config(shapes_manifests, tmp_path, mode="linear-probe"), model=model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert metrics["last_loss"] < metrics["first_loss"] and 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "out" / "linear_head.safetensors").exists()
    assert FinetuneConfig.load(tmp_path / "out" / "finetune.json").mode == "linear-probe"


@pytest.mark.parametrize("pooling", ["attention", "cls"])
def test_classify_reduces_the_loss_and_saves_a_loadable_head(shapes_manifests, tmp_path, pooling):
    model = random_tiny_model()
    metrics = finetune(_config(shapes_manifests, tmp_path, mode="classify", pooling=pooling), model=model)
    assert metrics["last_loss"] < metrics["first_loss"]
    assert "zero_shot_accuracy_before" in metrics and 0 <= metrics["accuracy"] <= 1
    loaded = onepeace.load(tmp_path / "out" / "model")
    assert loaded.head_type == "image" and loaded.config.classify_head.attn_pooling == (pooling == "attention")
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["left", "top"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.classify(image=x), model.classify(image=x), atol=1e-5)


@pytest.mark.slow  # > 10 s
def test_retrieval_reduces_the_contrastive_loss_and_freezing_patterns_hold(shapes_manifests, tmp_path):
    model = random_tiny_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = _config(shapes_manifests, tmp_path, mode="retrieval", steps=15, frozen=("*text*",), save_model=False)
    metrics = finetune(cfg, model=model)
    assert metrics["last_loss"] < metrics["first_loss"]
    params = dict(model.named_parameters())
    text = [n for n in before if ".text." in n]
    assert len(text) > 10 and all(torch.equal(params[n], before[n]) for n in text)  # the frozen patterns held
    assert not torch.equal(params["projections.image.weight"], before["projections.image.weight"])
    assert not torch.equal(params["encoder.layers.0.attn.q_proj.weight"], before["encoder.layers.0.attn.q_proj.weight"])


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="mode must be one of"):
        FinetuneConfig(model="m", train_manifest="t", mode="lora")
    with pytest.raises(ValueError, match="unknown FinetuneConfig fields: \\['stepz'\\]"):
        FinetuneConfig.from_dict({"model": "m", "train_manifest": "t", "stepz": 3})


def test_cli_finetune_linear_probe(shapes_manifests, tmp_path, capsys):
    from onepeace.checkpoint import save_converted
    from onepeace.cli import main

    save_converted(random_tiny_model(), tmp_path / "m")
    code = main(["finetune", "--model", str(tmp_path / "m"), "--train", str(shapes_manifests["train"]),
                 "--test", str(shapes_manifests["test"]), "--mode", "linear-probe", "--out", str(tmp_path / "ft"),
                 "--set", "probe_steps=30", "progress=false", "batch_size=8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mode linear-probe on image: 24 training items, 2 classes" in out and "test accuracy after (8 items)" in out
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["mode"] == "linear-probe"

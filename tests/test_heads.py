"""Fine-tuned task checkpoints (one_peace_classify): parity, other head kinds, ground and classify CLIs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

import onepeace
from conftest import ASSETS, BPE_DIR, FIXTURES, max_rel_error, require
from onepeace.checkpoint import CheckpointError, save_released_checkpoint
from onepeace.modeling.heads import ClassifyHeadConfig
from onepeace.serialization import read_checkpoint

CLASSIFY = FIXTURES / "official-classify-tiny"


def test_classify_fixture_logits():
    model = onepeace.load(require(CLASSIFY / "checkpoint.pt"))
    assert model.head_type == "vl" and model.config.encoder.rel_pos_tables == 3  # one table per layer
    expected = torch.load(CLASSIFY / "expected.pt", weights_only=True)
    with torch.no_grad():
        logits = model.classify(text=expected["inputs"]["src_tokens"], image=expected["inputs"]["src_images"])
    err = max_rel_error(logits, expected["outputs"]["logits"])
    print(f"official-classify-tiny logits: max rel error {err:.2e}")
    assert logits.shape == (2, 4) and err <= 1e-5


def _head_model(head: ClassifyHeadConfig, **adapter_changes) -> onepeace.OnePeaceModel:
    base = onepeace.get_config("one-peace-tiny")
    adapters = {m: dataclasses.replace(c, **adapter_changes.get(m, {})) for m, c in base.adapters.items()}
    config = dataclasses.replace(base, adapters=adapters, projections=False, classify_head=head)
    torch.manual_seed(0)
    model = onepeace.create_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["audio", "two-image"])
def test_other_heads_round_trip_through_the_released_layout(tmp_path, kind):
    if kind == "audio":
        model = _head_model(ClassifyHeadConfig(head_type="audio", num_classes=7, attn_pooling=False, use_pooler=False,
                                               head_scale_ratio=1.5))
        inputs = dict(audio=torch.randn(2, 16000))
    else:
        model = _head_model(ClassifyHeadConfig(head_type="vl", num_classes=2, use_two_images=True),
                            image={"add_type_embedding": True})
        inputs = dict(text=torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]]), image=torch.randn(2, 3, 64, 64),
                      image_2=torch.randn(2, 3, 64, 64))
    save_released_checkpoint(model, tmp_path / "head.pt")
    obj, archive = read_checkpoint(tmp_path / "head.pt")
    archive.close()
    assert obj["cfg"]["model"]["_name"] == "one_peace_classify"
    assert any(k.startswith("classify_head.classifier.3") for k in obj["model"])
    loaded = onepeace.load(tmp_path / "head.pt", pack=False)  # plain weights: bit-identical outputs
    assert loaded.config.classify_head == model.config.classify_head
    with torch.no_grad():
        a, b = model.classify(**inputs), loaded.classify(**inputs)
    assert a.shape == (2, model.config.classify_head.num_classes) and torch.equal(a, b)
    if kind == "two-image":  # the second image really matters
        with torch.no_grad():
            swapped = loaded.classify(text=inputs["text"], image=inputs["image"], image_2=inputs["image"])
        assert not torch.allclose(b, swapped)


def test_missing_classify_head_key_is_named(tmp_path):
    obj, archive = read_checkpoint(require(CLASSIFY / "checkpoint.pt"))
    try:
        obj["model"] = {k: v.load() for k, v in obj["model"].items() if k != "classify_head.pooler.1.bias"}
        obj["extra_state"] = {}
    finally:
        archive.close()
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"classify_head\.pooler\.1\.bias"):
        onepeace.load(tmp_path / "broken.pt")


def test_ground_cli_draws_the_box(tmp_path, capsys):
    from onepeace.cli import main

    model = _head_model(ClassifyHeadConfig(head_type="vl", num_classes=4))
    save_released_checkpoint(model, tmp_path / "grounding.pt")
    image = require(ASSETS / "pokemons.jpg")
    out = tmp_path / "box.png"
    assert main(["ground", "--model", str(tmp_path / "grounding.pt"), str(image), "a blue turtle-like pokemon",
                 "--out", str(out), "--bpe-dir", str(BPE_DIR)]) == 0
    printed = capsys.readouterr().out
    assert "box x1=" in printed
    drawn, original = Image.open(out), Image.open(image)
    assert drawn.size == original.size
    # the drawn rectangle is pure red-ish where the original was not
    diff = sum(1 for a, b in zip(drawn.convert("RGB").getdata(), original.convert("RGB").getdata()) if a != b)
    assert diff > 100
    loaded = onepeace.load(tmp_path / "grounding.pt")
    loaded.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    boxes = loaded.ground([str(image)], ["a blue turtle-like pokemon"])
    assert boxes.shape == (1, 4) and (boxes[0, 0::2] <= original.width).all() and (boxes[0, 1::2] <= original.height).all()


def test_classify_cli_ranks_labels_for_audio(tmp_path, capsys):
    from onepeace.cli import main

    model = _head_model(ClassifyHeadConfig(head_type="audio", num_classes=5))
    save_released_checkpoint(model, tmp_path / "audio-head.pt")
    (tmp_path / "labels.json").write_text(json.dumps(["dog", "cow", "rain", "engine", "bird"]))
    (tmp_path / "bad.flac").write_bytes(b"")
    rc = main(["classify", "--model", str(tmp_path / "audio-head.pt"), str(require(ASSETS / "cow.flac")), str(ASSETS / "dog.flac"),
               str(tmp_path / "bad.flac"), "--labels", str(tmp_path / "labels.json"), "-k", "3"])
    captured = capsys.readouterr()
    assert rc == 1 and "bad.flac" in captured.err  # reported and skipped, the others done
    lines = captured.out.splitlines()
    assert lines[0].endswith("cow.flac") and lines[4].endswith("dog.flac")
    probs = [float(line.split()[-1]) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
    assert all(line.split()[1] in {"dog", "cow", "rain", "engine", "bird"} for line in lines[1:4])


def test_heads_survive_conversion(tmp_path):
    from onepeace.checkpoint import save_converted

    model = _head_model(ClassifyHeadConfig(head_type="image", num_classes=3))
    save_converted(model, tmp_path / "converted")
    loaded = onepeace.load(tmp_path / "converted")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.classify(image=images), loaded.classify(image=images))
    assert loaded.head_type == "image"

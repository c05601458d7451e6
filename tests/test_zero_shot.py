"""Zero-shot classification on any labels: model.zero_shot, the reusable classifier, `onepeace zero-shot`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import onepeace
from conftest import ASSETS, random_tiny_model, require
from onepeace.zero_shot import (AUDIO_TEMPLATES, IMAGE_TEMPLATES, ZeroShotClassifier, build_zero_shot_classifier,
                                infer_modality)

SOUNDS = [str(ASSETS / "cow.flac"), str(ASSETS / "dog.flac")]
IMAGES = [str(ASSETS / "dog.JPEG"), str(ASSETS / "elephant.JPEG")]
LABELS = ["dog", "siren", "rain"]


@pytest.fixture(scope="module")
def model():
    for path in SOUNDS + IMAGES:
        require(ASSETS / os.path.basename(path))
    return random_tiny_model()


def test_probabilities_have_shape_n_by_c_and_sum_to_one(model):
    probs, clf = model.zero_shot(SOUNDS, LABELS)
    assert probs.shape == (2, 3) and isinstance(clf, ZeroShotClassifier)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)
    assert (probs > 0).all()
    assert clf.labels == LABELS and clf.modality == "audio" and clf.class_embeddings.shape == (3, 64)
    # the default audio ensemble was used: every template filled with every label
    assert clf.prompts[1] == [t.replace("{}", "siren") for t in AUDIO_TEMPLATES]


def test_reused_classifier_gives_the_same_probabilities_as_a_fresh_call(model):
    probs, clf = model.zero_shot(IMAGES, ["dog", "elephant", "cow"])
    again = clf.classify(model, IMAGES)
    from_embeddings = clf(model.encode_image(IMAGES))
    fresh, _ = model.zero_shot(IMAGES, ["dog", "elephant", "cow"])
    assert torch.allclose(again, probs, atol=1e-6) and torch.allclose(fresh, probs, atol=1e-6)
    assert torch.allclose(from_embeddings, probs, atol=1e-6)
    # one image at a time gives its own row of the batch result
    assert torch.allclose(clf.classify(model, IMAGES[1]), probs[1:], atol=1e-5)


def test_class_embeddings_are_the_normalised_mean_of_normalised_template_embeddings(model):
    templates = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild"]
    clf = build_zero_shot_classifier(model, ["dog", "elephant"], templates, modality="image")
    for row, label in zip(clf.class_embeddings, ["dog", "elephant"]):
        texts = [t.format(label) for t in templates]
        emb = torch.stack([F.normalize(model.encode_text([t])[0], dim=-1) for t in texts])  # one at a time
        expected = F.normalize(emb.mean(0), dim=-1)
        assert torch.allclose(row, expected, atol=1e-5)
    # probabilities: softmax of the model's temperature times the cosine similarity
    image = model.encode_image(IMAGES[:1])
    expected = (model.temperature.item() * image @ clf.class_embeddings.T).softmax(-1)
    assert torch.allclose(clf(image), expected, atol=1e-5)
    assert clf.temperature == pytest.approx(model.temperature.item())


def test_per_label_captions_and_default_image_templates(model):
    captions = {"dog": ["a dog", "a puppy"], "cow": ["a cow"]}
    clf = build_zero_shot_classifier(model, ["dog", "cow"], captions, modality="image")
    assert clf.prompts == [["a dog", "a puppy"], ["a cow"]]
    default = build_zero_shot_classifier(model, ["dog"], modality="image")
    assert default.prompts == [[t.replace("{}", "dog") for t in IMAGE_TEMPLATES]]
    assert len(IMAGE_TEMPLATES) >= 20 and all("{}" in t for t in IMAGE_TEMPLATES)


def test_modality_comes_from_file_suffixes_or_the_argument(model):
    assert infer_modality(SOUNDS) == "audio" and infer_modality(IMAGES) == "image"
    assert infer_modality(["a/b/RAIN.WAV", "c.Flac"]) == "audio" and infer_modality(["x.PNG"]) == "image"
    from PIL import Image

    pil = Image.open(IMAGES[0]).convert("RGB")
    with pytest.raises(ValueError, match="modality="):
        model.zero_shot([pil], LABELS)
    probs, clf = model.zero_shot([pil], LABELS, modality="image")
    assert clf.modality == "image" and torch.allclose(probs, model.zero_shot(IMAGES[:1], LABELS)[0], atol=1e-5)
    with pytest.raises(ValueError, match="mix modalities"):
        infer_modality(SOUNDS + IMAGES)
    with pytest.raises(ValueError, match="notes.xyz"):
        infer_modality(["notes.xyz"])


def test_clear_errors_for_unknown_modality_empty_labels_and_bad_templates(model):
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        model.zero_shot(SOUNDS, LABELS, modality="smell")
    with pytest.raises(ValueError, match="at least one label"):
        model.zero_shot(SOUNDS, [])
    with pytest.raises(ValueError, match="single string"):
        model.zero_shot(SOUNDS, "dog,siren")
    with pytest.raises(ValueError, match="distinct"):
        model.zero_shot(SOUNDS, ["dog", "dog"])
    with pytest.raises(ValueError, match="'{}'"):
        model.zero_shot(SOUNDS, LABELS, templates=["the sound of"])
    with pytest.raises(ValueError, match="no captions for labels \\['rain'\\]"):
        model.zero_shot(SOUNDS, LABELS, templates={"dog": ["a dog"], "siren": ["a siren"]})


def test_zero_shot_top1_equals_eval_on_a_manifest(model, tmp_path):
    """The public API and `onepeace eval` share the ensemble: the same predictions on the same data."""
    from onepeace.eval.zero_shot import evaluate

    labels = ["dog", "elephant", "cow"]
    concepts = {"concepts": labels, "templates": {c: [f"a photo of a {c}", f"a drawing of a {c}"] for c in labels}}
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("".join(json.dumps({"image": p, "text": f"a {c}", "label": c}) + "\n"
                                for p, c in zip(IMAGES, ["dog", "elephant"])))
    result = evaluate(model, [manifest], concepts=concepts)
    probs, _ = model.zero_shot(IMAGES, labels, templates=concepts["templates"])
    top1 = (probs.argmax(1) == torch.tensor([0, 1])).float().mean().item()
    assert top1 == result["zero_shot"]["image"]
    assert probs.argmax(1).tolist() == [row.index(max(row)) for row in _predictions(result)]


def _predictions(result):
    """One-hot rows of eval's predictions, from its confusion matrix (rows: truth, columns: predicted)."""
    rows = []
    for truth, counts in enumerate(result["confusion"]["image"]):
        for pred, n in enumerate(counts):
            rows += [[int(j == pred) for j in range(len(counts))]] * n
    return rows


# ---- the command line ----
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onepeace", "zero-shot", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_json_schema_and_bad_files_skipped(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = _cli(*SOUNDS, str(bad), IMAGES[0], str(tmp_path / "missing.flac"), "-m", str(tiny_model_dir),
                  "--labels", "dog, siren ,rain", "-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert f"skipped {bad}" in result.stderr and "missing.flac: no such file" in result.stderr
    out = json.loads(result.stdout)
    assert out["labels"] == LABELS
    assert [r["file"] for r in out["results"]] == SOUNDS + IMAGES[:1]  # input order, bad ones out
    assert [r["modality"] for r in out["results"]] == ["audio", "audio", "image"]
    assert {s["file"] for s in out["skipped"]} == {str(bad), str(tmp_path / "missing.flac")}
    for r in out["results"]:
        assert set(r) == {"file", "modality", "top", "probs"} and len(r["top"]) == 2
        assert set(r["probs"]) == set(LABELS) and abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["top"][0]["prob"] >= r["top"][1]["prob"] and r["top"][0]["prob"] == max(r["probs"].values())
    # the same numbers as the library on the same model
    model = onepeace.load(tiny_model_dir)
    probs, _ = model.zero_shot(SOUNDS, LABELS)
    assert [r["probs"]["dog"] for r in out["results"][:2]] == pytest.approx(probs[:, 0].tolist(), abs=1e-5)


def test_cli_labels_file_templates_file_text_output_and_all_bad(tiny_model_dir, tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["cow", "dog"]))
    (tmp_path / "templates.txt").write_text("the sound of a {}\na {} is heard\n")
    result = _cli(SOUNDS[0], "-m", str(tiny_model_dir), "--labels-file", str(tmp_path / "labels.json"),
                  "--templates-file", str(tmp_path / "templates.txt"), "-k", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == SOUNDS[0] and len(lines) == 3 and {ln.split()[1] for ln in lines[1:]} == {"cow", "dog"}
    model = onepeace.load(tiny_model_dir)
    probs, _ = model.zero_shot(SOUNDS[:1], ["cow", "dog"], templates=["the sound of a {}", "a {} is heard"])
    assert float(lines[1].split()[0]) == pytest.approx(probs.max().item(), abs=1e-3)
    (tmp_path / "labels.txt").write_text("cow\n\ndog\n")
    bad = tmp_path / "text.flac"
    bad.write_text("not audio")
    result = _cli(str(bad), "-m", str(tiny_model_dir), "--labels-file", str(tmp_path / "labels.txt"))
    assert result.returncode == 1 and f"skipped {bad}" in result.stderr and "no file could be classified" in result.stderr
    result = _cli(SOUNDS[0], "-m", str(tiny_model_dir), "--labels", " , ")
    assert result.returncode == 2 and "at least one label" in result.stderr

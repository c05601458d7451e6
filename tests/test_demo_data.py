"""The offline demo data set (onepeace.demo.data): built once, quick, into a temporary folder."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from onepeace.data.audio import load_audio
from onepeace.data.datasets import read_manifest
from onepeace.data.image import load_image
from onepeace.demo import data as demo
from onepeace.demo.data import build_demo_data, check_requirements

MANIFESTS = ("train_vl.jsonl", "test_vl.jsonl", "train_al.jsonl", "test_al.jsonl", "test_al_engine.jsonl",
             "test_al_words.jsonl", "test_al_engine_words.jsonl")
WORD_VOICES = 4  # the quick build's words come from every training voice (~1,900 clips); 4 test the same code


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_demo_data(tmp_path_factory.mktemp("demo") / "quick", quick=True, progress=False,
                           word_voices=WORD_VOICES)


def lines(root: Path, name: str) -> list[dict]:
    with open(root / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_concepts_and_templates(built):
    concepts = json.loads((built / "concepts.json").read_text())
    assert len(concepts["concepts"]) == len(set(concepts["concepts"])) == 20
    assert concepts["groups"]["animal"] == ["bear", "bird", "cat", "cow", "dog", "elephant",
                                            "giraffe", "horse", "sheep", "zebra"]
    assert concepts["groups"]["digit"] == ["zero", "one", "two", "three", "four", "five", "six",
                                           "seven", "eight", "nine"]
    templates = concepts["templates"]
    assert set(templates) == set(concepts["concepts"])
    for concept, texts in templates.items():
        assert len(set(texts)) == len(texts) >= 8, concept
        assert all(concept in text for text in texts)
    # articles by sound, and the animal / digit wordings differ
    assert "a silhouette of an elephant" in templates["elephant"]
    assert "a picture of an eight" in templates["eight"]
    assert "a picture of a one" in templates["one"]
    assert not any(" a elephant" in t or " a eight" in t or "an one" in t
                   for texts in templates.values() for t in texts)
    assert "the number seven" in templates["seven"] and "the number seven" == templates["seven"][0]
    assert not any(t.startswith("the number") for t in templates["cat"])


def test_every_line_is_a_valid_single_modality_pair(built):
    for name in MANIFESTS:
        raw = lines(built, name)
        assert raw, name
        for line in raw:
            assert ("image" in line) != ("audio" in line), line  # never an audio-image pair
            assert isinstance(line["text"], str) and line["text"]
            assert line["label"] in demo.CONCEPTS
            if line.get("kind") == "word":  # the concept's name alone
                assert line["template"] == -1 and line["text"] == line["label"], line
            else:
                assert line["template"] >= 0 and line["text"] == demo.captions(line["label"])[line["template"]]
        # the trainer's reader accepts it and resolves the paths relative to the data folder
        entries = read_manifest(built / name)
        assert len(entries) == len(raw)
    assert all("image" in line for name in ("train_vl.jsonl", "test_vl.jsonl")
               for line in lines(built, name))
    assert all("audio" in line for name in ("train_al.jsonl", "test_al.jsonl")
               for line in lines(built, name))
    assert all(line["template"] == 0 for line in lines(built, "test_vl.jsonl"))


def test_images_load_balanced_and_disjoint(built):
    info = json.loads((built / "manifest_info.json").read_text())
    sizes = info["params"]["sizes"]
    train = read_manifest(built / "train_vl.jsonl")
    test = read_manifest(built / "test_vl.jsonl")
    assert set(Counter(e["label"] for e in train).values()) == {sizes["images_per_class_train"]}
    assert set(Counter(e["label"] for e in test).values()) == {sizes["images_per_class_test"]}
    assert len(Counter(e["label"] for e in train)) == 20

    def digest(entry: dict) -> str:
        image = load_image(entry["image"])
        side = 28 if entry["group"] == "animal" else 8
        assert image.size == (side, side)
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 1]).all()  # grayscale
        # light figure on a dark background: the border is darker than the image as a whole
        gray = pixels[..., 0].astype(float)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        assert border.mean() < gray.mean(), entry["image"]
        return hashlib.sha1(pixels.tobytes()).hexdigest()

    train_hashes = {digest(e) for e in train}
    test_hashes = [digest(e) for e in test]
    assert len(set(test_hashes)) == len(test_hashes)  # no duplicate inside test either
    assert not train_hashes & set(test_hashes)


def test_audio_loads_at_16k_and_is_not_silent(built):
    for name in ("train_al.jsonl", "test_al.jsonl"):
        for entry in read_manifest(built / name):
            meta = sf.info(entry["audio"])
            assert (meta.samplerate, meta.channels, meta.subtype) == (16_000, 1, "PCM_16")
            wave = load_audio(entry["audio"], 16_000)
            assert 0.3 < len(wave) / 16_000 < 6.0, entry["audio"]
            assert float(np.sqrt(np.mean(wave ** 2))) > 1e-3, entry["audio"]


def test_voices_split(built):
    voices = json.loads((built / "voices.json").read_text())
    train, heldout = set(voices["train"]), set(voices["heldout"])
    assert train and heldout and not train & heldout
    train_al = [e for e in read_manifest(built / "train_al.jsonl") if e["kind"] == "caption"]
    test_al = read_manifest(built / "test_al.jsonl")
    assert {e["voice"] for e in train_al} == train
    assert {e["voice"] for e in test_al} == heldout
    # both engines on both sides (the quick subset alternates engines)
    assert {voices["details"][v]["engine"] for v in train} == {"espeak", "flite"}
    assert {voices["details"][v]["engine"] for v in heldout} == {"espeak", "flite"}
    # every concept is heard in training and in the test
    assert {e["label"] for e in train_al} == {e["label"] for e in test_al} == set(demo.CONCEPTS)
    assert len(set(Counter(e["label"] for e in train_al).values())) == 1  # balanced


def test_heldout_engine_split(built):
    """The held-out-engine test clips come from an engine (festival) no training clip comes from."""
    voices = json.loads((built / "voices.json").read_text())
    engine_test = read_manifest(built / "test_al_engine.jsonl")
    train_engines = {voices["details"][v]["engine"] for v in voices["train"]}
    assert {e["engine"] for e in engine_test} == {"festival"}
    assert "festival" not in train_engines
    assert {e["voice"] for e in engine_test} == set(voices["heldout_engine"]) and voices["heldout_engine"]
    assert {e["label"] for e in engine_test} == set(demo.CONCEPTS)
    for entry in engine_test[:10]:
        wave = load_audio(entry["audio"], 16_000)
        assert 0.3 < len(wave) / 16_000 < 6.0 and float(np.sqrt(np.mean(wave ** 2))) > 1e-3, entry["audio"]


def test_spoken_words_split(built):
    """The words alone: training lines from `word_voices` training voices (text = the word), and one
    clip per concept for every held-out voice and every held-out-engine voice."""
    voices = json.loads((built / "voices.json").read_text())
    words = [e for e in read_manifest(built / "train_al.jsonl") if e["kind"] == "word"]
    assert len(words) == WORD_VOICES * 20 and len({e["voice"] for e in words}) == WORD_VOICES
    assert {e["voice"] for e in words} <= {v.id for v in demo.TRAIN_VOICES}
    assert all(e["text"] == e["label"] and e["template"] == -1 and e["audio"].endswith("-word.wav") for e in words)
    for name, held in (("test_al_words.jsonl", voices["heldout"]), ("test_al_engine_words.jsonl", voices["heldout_engine"])):
        test = read_manifest(built / name)
        assert {e["voice"] for e in test} == set(held) and len(test) == 20 * len(held), name
        assert Counter(e["label"] for e in test) == Counter({c: len(held) for c in demo.CONCEPTS}), name
        assert all(e["kind"] == "word" and e["text"] == e["label"] for e in test), name
        assert not {e["voice"] for e in test} & {e["voice"] for e in words}, name
        for entry in test[:5]:
            wave = load_audio(entry["audio"], 16_000)
            assert 0.1 < len(wave) / 16_000 < 3.0 and float(np.sqrt(np.mean(wave ** 2))) > 1e-3, entry["audio"]


def test_fixed_voice_list():
    train = {v.id for v in demo.TRAIN_VOICES}
    heldout = {v.id for v in demo.HELDOUT_VOICES}
    assert not train & heldout
    espeak_total = sum(v.engine == "espeak" for v in (*demo.TRAIN_VOICES, *demo.HELDOUT_VOICES))
    espeak_held = sum(v.engine == "espeak" for v in demo.HELDOUT_VOICES)
    assert 0.15 <= espeak_held / espeak_total <= 0.25
    assert {v.name for v in demo.HELDOUT_VOICES if v.engine == "flite"} == {"slt"}
    assert {v.name for v in demo.TRAIN_VOICES if v.engine == "flite"} >= {"kal16", "awb", "rms"}
    assert {v.engine for v in demo.TRAIN_VOICES + demo.HELDOUT_VOICES} == {"espeak", "flite"}
    assert {v.engine for v in demo.HELDOUT_ENGINE_VOICES} == {"festival"}
    banned = ("demonic", "shelby", "ricishaymax")
    assert not any(b in v.name.lower() for v in demo.TRAIN_VOICES + demo.HELDOUT_VOICES
                   for b in banned)


def test_cache_hit_is_immediate(built):
    info_before = (built / "manifest_info.json").read_text()
    start = time.perf_counter()
    again = build_demo_data(built, quick=True, progress=False, word_voices=WORD_VOICES)
    assert time.perf_counter() - start < 1.0
    assert again == built
    assert (built / "manifest_info.json").read_text() == info_before


def test_rebuild_on_new_sizes_then_deterministic(built, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(built, root)
    (root / "stale.txt").write_text("from the old build")
    out = build_demo_data(root, quick=True, progress=False, images_per_class_test=5, word_voices=WORD_VOICES)
    assert out == root
    assert not (root / "stale.txt").exists()  # old contents were removed
    info = json.loads((root / "manifest_info.json").read_text())
    assert info["params"]["sizes"]["images_per_class_test"] == 5
    assert set(Counter(e["label"] for e in lines(root, "test_vl.jsonl")).values()) == {5}
    assert not list(tmp_path.glob(".copy.partial-*"))  # no temporary folder left behind
    # back to the original sizes: a rebuild with the same seed reproduces the manifests exactly
    build_demo_data(root, quick=True, progress=False, word_voices=WORD_VOICES)
    for name in (*MANIFESTS, "concepts.json", "voices.json"):
        assert (root / name).read_text() == (built / name).read_text(), name


def test_refuses_to_delete_an_unrelated_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(RuntimeError, match="refusing to delete"):
        build_demo_data(root, quick=True, progress=False)
    assert (root / "thesis.tex").read_text() == "precious"


def test_invalid_sizes():
    with pytest.raises(TypeError, match="images_per_clas"):
        build_demo_data("/nonexistent/never-built", images_per_clas=3)
    with pytest.raises(ValueError, match="images_per_class_test"):
        build_demo_data("/nonexistent/never-built", images_per_class_test=0)


def test_check_requirements(monkeypatch, tmp_path):
    assert check_requirements() == []  # this environment has everything
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name, *a, **k: None if name == "espeak-ng" else real_which(name))
    problems = check_requirements()
    assert len(problems) == 1
    assert "espeak-ng" in problems[0] and "apt-get install -y espeak-ng flite festival" in problems[0]
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng flite"):
        build_demo_data(tmp_path / "x", quick=True, progress=False)
    assert not (tmp_path / "x").exists()


def test_check_requirements_python_sources(monkeypatch):
    monkeypatch.setattr(demo, "_animal_mnist_dir", lambda: None)
    real_find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real_find_spec(name, *a))
    problems = "\n".join(check_requirements())
    assert "pip install --no-deps animal-mnist" in problems
    assert "pip install scikit-learn" in problems

"""`onepeace demo --quick`: the whole pipeline runs and LEARNS (zero-shot far above chance)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import onepeace
from conftest import ASSETS, BPE_DIR, require

KEYS = ["image_zero_shot_top1", "audio_zero_shot_top1_heldout_voices", "audio_zero_shot_top1_heldout_engine",
        "audio_zero_shot_top1_word_heldout_voices", "audio_zero_shot_top1_word_heldout_engine",
        "audio_to_image_r1", "image_to_text_r1", "audio_to_text_r1", "minutes"]

pytestmark = pytest.mark.slow  # every test here runs (or reuses) the quick demo: minutes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env_cache = tmp_path_factory.mktemp("cache")
    result = subprocess.run(
        [sys.executable, "-m", "onepeace", "demo", "--quick", "--ablation", "--out", str(out / "run"), "--bpe-dir",
         str(require(BPE_DIR))],
        capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "ONEPEACE_CACHE": str(env_cache)})
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run", result.stdout, env_cache / "demo-data" / "quick"


def test_metrics_file_has_every_key_for_both_runs(demo):
    out, _, _ = demo
    metrics = json.loads((out / "metrics.json").read_text())
    for key in KEYS:
        assert key in metrics and key in metrics["ablation_no_dcl"], key
        assert 0 <= metrics[key] <= 1 or key == "minutes"


def test_learning_happened(demo):
    """20 classes: chance is 0.05. The quick run trains for about a minute."""
    out, stdout, _ = demo
    metrics = json.loads((out / "metrics.json").read_text())
    print({k: round(metrics[k], 3) for k in KEYS})
    assert metrics["image_zero_shot_top1"] >= 0.20, metrics["image_zero_shot_top1"]
    assert metrics["image_to_text_r1"] >= 0.20
    # the words alone, held-out voices (40 clips): measured 0.53; 8/40 right has p = 7e-4 by guessing
    assert metrics["audio_zero_shot_top1_word_heldout_voices"] >= 0.20, metrics["audio_zero_shot_top1_word_heldout_voices"]
    assert "image_zero_shot_top1" in stdout


def test_eta_and_expectation_are_printed(demo):
    """Before training the user learns what to expect; after the first steps of each stage, an ETA."""
    _, stdout, _ = demo
    assert "the quick run takes up to" in stdout
    assert re.search(r"stage1: [0-9.]+ s/step; about [0-9]+ min left", stdout), stdout[-2000:]
    assert re.search(r"stage2: [0-9.]+ s/step; about [0-9]+ min left", stdout)


def test_report_and_figures_exist(demo):
    out, _, _ = demo
    report = (out / "report.md").read_text()
    for name in ("losses.png", "confusion_image.png", "confusion_audio.png", "audio_to_image.png"):
        assert (out / "figures" / name).stat().st_size > 10_000, name
        assert name in report
    assert "contrast only" in report


def test_trained_model_embeds_new_files(demo):
    out, _, _ = demo
    model = onepeace.load(out / "model")
    model.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    images = model.encode_image([str(require(ASSETS / "dog.JPEG")), str(ASSETS / "elephant.JPEG")])
    audio = model.encode_audio([str(ASSETS / "cow.flac")])
    texts = model.encode_text(["a silhouette of a cow", "the number seven"])
    for emb in (images, audio, texts):
        assert emb.shape[1] == model.config.encoder.embed_dim
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-4)
    assert np.isfinite((audio @ images.T).numpy()).all()


def test_eval_command_reports_every_modality_pair(demo, tmp_path):
    out, _, data = demo
    result = subprocess.run(
        [sys.executable, "-m", "onepeace", "eval", "-m", str(out / "model"), str(data / "test_vl.jsonl"),
         str(data / "test_al.jsonl"), "--concepts", str(data / "concepts.json"), "--bpe-dir", str(BPE_DIR),
         "-o", str(tmp_path / "eval.json"), "-q"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for pair in ("audio->image", "image->audio", "image->text", "text->audio"):
        assert pair in result.stdout
    numbers = json.loads((tmp_path / "eval.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    # the same model and data: the same numbers as the demo's own evaluation
    assert abs(numbers["zero_shot"]["image"] - metrics["image_zero_shot_top1"]) < 1e-6
    assert set(numbers["retrieval"]["audio->image"]) == {"r1", "r5", "r10", "map"}



def test_zero_shot_public_api_equals_eval_on_the_held_out_images(demo):
    """model.zero_shot on the demo's held-out images (the concepts' caption ensembles) gives eval's
    top-1, in metrics.json, in the report, and when called here; the CLI classifies the shared sounds."""
    out, _, data = demo
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_zero_shot_top1_public_api"] == pytest.approx(metrics["image_zero_shot_top1"], abs=1e-9)
    assert "via `model.zero_shot`" in (out / "report.md").read_text()
    from onepeace.data.datasets import read_manifest

    model = onepeace.load(out / "model")
    concepts = json.loads((data / "concepts.json").read_text())
    entries = read_manifest(data / "test_vl.jsonl")
    probs, clf = model.zero_shot([e["image"] for e in entries], concepts["concepts"], templates=concepts["templates"])
    truth = torch.tensor([concepts["concepts"].index(e["label"]) for e in entries])
    assert probs.shape == (len(entries), 20) and clf.modality == "image"
    assert (probs.argmax(1) == truth).float().mean().item() == pytest.approx(metrics["image_zero_shot_top1"], abs=1e-9)
    result = subprocess.run([sys.executable, "-m", "onepeace", "zero-shot", str(ASSETS / "cow.flac"),
                             str(ASSETS / "dog.flac"), "-m", str(out / "model"), "--labels", "cow,dog,seven", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    print([(r["file"], r["top"][0]) for r in rows])
    assert [r["modality"] for r in rows] == ["audio", "audio"]



def _run_cli(args: list[str], cache) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "onepeace", *args, "--quick", "--bpe-dir", str(BPE_DIR)],
                            capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "ONEPEACE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_video_adds_a_branch_and_leaves_the_others_alone(demo, tmp_path):
    out, _, data = demo
    result = _run_cli(["demo-video", "--model", str(out / "model"), "--out", str(tmp_path / "video")],
                      data.parent.parent)
    assert "pre-existing parameters bit-identical after video training: True" in result.stdout
    video = json.loads((tmp_path / "video" / "metrics.json").read_text())
    demo_metrics = json.loads((out / "metrics.json").read_text())
    assert video["counts"]["video"] == 20 * 4 and (data / "train_video.jsonl").exists()
    for key in ("video_zero_shot_top1", "video_to_audio_r1", "video_to_image_r1", "image_to_video_r1"):
        assert 0 <= video["trained"][key] <= 1
    # the image and audio branches are untouched: their zero-shot numbers are the demo's own
    assert abs(video["trained"]["image_zero_shot_top1"] - demo_metrics["image_zero_shot_top1"]) < 1e-6
    assert abs(video["trained"]["audio_zero_shot_top1"] - demo_metrics["audio_zero_shot_top1_heldout_voices"]) < 1e-6
    assert onepeace.load(tmp_path / "video" / "model").modalities == ("text", "image", "audio", "video")


def test_demo_finetune_tabulates_zero_shot_probe_and_finetuned(demo, tmp_path):
    out, _, data = demo
    result = _run_cli(["demo-finetune", "--model", str(out / "model"), "--out", str(tmp_path / "ft")],
                      data.parent.parent)
    table = json.loads((tmp_path / "ft" / "metrics.json").read_text())["table"]
    assert [row[0].split(" ")[0] for row in table] == ["zero-shot", "linear", "fine-tuned", "fine-tuned", "contrastive"]
    assert all(0 <= acc <= 1 for _, acc, _ in table)
    # the same model, test images and prompts as the demo's own evaluation
    assert abs(table[0][1] - json.loads((out / "metrics.json").read_text())["image_zero_shot_top1"]) < 1e-6
    assert "linear probe" in result.stdout


def test_recorded_voice_reaches_the_model_through_the_fake_microphone(demo):
    """Held-out-engine recordings of the words alone (festival: an engine never heard in training)
    played into Chromium's fake microphone, recorded by the serve page's Record button (silent ends
    trimmed in the page) and searched against the 20 concepts: the page uploads what the microphone
    heard, and the quick model finds the spoken concept far more often than chance (1 in 20)."""
    from math import comb
    from pathlib import Path

    import soundfile as sf

    from conftest import require_module
    from onepeace.demo.microphone import CHROMIUM, microphone_hit_rate

    require_module("playwright.sync_api", "browser-test")
    require_module("faiss", "serve")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (or set ONEPEACE_CHROMIUM)")
    out, _, data = demo
    concepts = json.loads((data / "concepts.json").read_text())["concepts"]
    n = 40  # both festival voices of the quick build, every word
    result = microphone_hit_rate(out / "model", data, clips=n, manifest="test_al_engine_words.jsonl",
                                 bpe_dir=str(BPE_DIR))
    hits = result["hits"]
    # the chance of at least `hits` right answers out of n when guessing 1 of 20
    p_chance = sum(comb(n, k) * 0.05 ** k * 0.95 ** (n - k) for k in range(hits, n + 1))
    print(f"quick model, recorded held-out-engine words: {hits}/{n} concepts right (chance 2/{n}; "
          f"p = {p_chance:.1e} by guessing), {result['found_itself']} found their own clip first")
    assert result["clips"] == n
    for row in result["rows"]:
        assert row["voice"].startswith("festival:"), row  # the held-out engine
        # the page trimmed the recording's silent ends (it recorded the clip + 0.6 s) and kept the word
        assert 0.5 * sf.info(row["audio"]).duration <= row["recorded_seconds"] < sf.info(row["audio"]).duration + 0.3, row
        assert row["envelope_correlation"] > 0.7 and row["recorded_rms"] > 1e-3, row
        assert row["got"] in concepts, row
    assert hits >= 6, f"{hits}/{n}: not above chance (6/40 has p = 0.014 by guessing)"

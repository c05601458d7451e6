"""Shared paths and fixtures. The shared folder (the official fixtures, sample assets, the released BPE
files) sits beside the project. In CI (CI=true) or with ONEPEACE_REQUIRE_SHARED=1, a test that needs it
and does not find it FAILS with a message naming the folder. Elsewhere (a user's fresh clone without
the fixtures) such a test is SKIPPED with that message, so the README's test command still checks
everything that does not depend on the fixtures; no test is skipped when the folder is there."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("ONEPEACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
FIXTURES = SHARED / "fixtures"
ASSETS = SHARED / "assets"
BPE_DIR = Path(os.environ.get("ONEPEACE_BPE_DIR", SHARED / "official-bpe"))
TINY_CKPT = FIXTURES / "official-tiny" / "checkpoint.pt"


# onepeace.load's CPU probe (onepeace.modeling.cpu_choice) stays off in the suite: the tests check
# today's default path (packed) and never write the user's cache; tests/test_cpu_choice.py turns it on
# with a temporary cache. Set here (not in a fixture) so that subprocesses (the CLI tests) inherit it.
os.environ.setdefault("ONEPEACE_CPU_PROBE", "0")

SHARED_REQUIRED = bool(os.environ.get("CI")) or os.environ.get("ONEPEACE_REQUIRE_SHARED") == "1"


def _missing_shared_message(path: Path) -> str:
    return f"{path} is missing: these tests need the project's shared folder at {SHARED} (or set ONEPEACE_SHARED)"


def require(path: Path) -> Path:
    if not path.exists():
        if SHARED_REQUIRED or SHARED.exists():  # CI, or a shared folder that lacks a file: a real failure
            raise FileNotFoundError(_missing_shared_message(path))
        pytest.skip(_missing_shared_message(path), allow_module_level=True)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without the shared folder (and outside CI), a test that failed because it could not open a file
    in that folder is reported as skipped, naming the folder; any other failure stays a failure."""
    outcome = yield
    report = outcome.get_result()
    if SHARED_REQUIRED or SHARED.exists() or call.excinfo is None or not report.failed:
        return
    if str(SHARED) in str(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {_missing_shared_message(SHARED)}")


@pytest.fixture(scope="session")
def tiny_model():
    import onepeace

    return onepeace.load(require(TINY_CKPT))


def random_tiny_model():
    """The test size with the real vocabulary and seeded random weights (nudged away from the
    initialisation's zeros and ones so that every parameter matters), with the released tokenizer."""
    import onepeace

    torch.manual_seed(0)
    model = onepeace.create_model("one-peace-tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.tokenizer = onepeace.get_tokenizer(require(BPE_DIR))
    return model


@pytest.fixture(scope="session")
def tiny_expected():
    return torch.load(require(FIXTURES / "official-tiny" / "expected.pt"), weights_only=True)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor, padding_mask: torch.Tensor | None = None) -> float:
    """max |a - b| / max |b|, over non-padding positions when a mask is given."""
    if padding_mask is not None:
        actual, expected = actual[~padding_mask], expected[~padding_mask]
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def fixture_embedding_errors(model, expected) -> dict[str, float]:
    """max_rel_error of the text/image/audio embeddings of one pass over the official-tiny inputs."""
    i = expected["inputs"]
    with torch.inference_mode():
        out = model(text=i["src_tokens"], image=i["src_images"], audio=i["src_audios"],
                    audio_padding_mask=i["audio_padding_masks"])
    return {m: max_rel_error(out.embeddings[m], expected["outputs"][f"{m}_embed"]) for m in ("text", "image", "audio")}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """random_tiny_model() saved as a converted folder (what `onepeace index --model` takes)."""
    from onepeace.checkpoint import save_converted

    return save_converted(random_tiny_model(), tmp_path_factory.mktemp("tiny-model") / "model")


CAPTIONS = ["a photo of a dog", "an elephant in the grass", "a cow says moo", "the number seven", "a red square"]


def make_collection(root: Path) -> Path:
    """A small mixed folder to index: 2 photos + 6 drawn PNGs, 2 spoken-word FLACs + 2 tones, a
    captions .txt, a manifest .jsonl (text and audio-only lines), a corrupt .jpg and a note (ignored)."""
    import shutil

    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    (root / "photos").mkdir(parents=True)
    (root / "drawings" / "nested").mkdir(parents=True)
    (root / "sounds").mkdir()
    for name in ("dog.JPEG", "elephant.JPEG"):
        shutil.copy(require(ASSETS / name), root / "photos" / name)
    for i in range(6):
        img = Image.new("RGB", (48, 48), (20 * i, 200 - 30 * i, 90))
        ImageDraw.Draw(img).ellipse([4 + 3 * i, 6, 40, 30 + 2 * i], fill=(255, 255 - 40 * i, 40 * i))
        img.save(root / "drawings" / ("nested" if i % 2 else "") / f"shape{i}.png")
    for name in ("cow.flac", "dog.flac"):
        shutil.copy(require(ASSETS / name), root / "sounds" / name)
    t = np.arange(16000) / 16000
    for f in (220, 660):
        sf.write(root / "sounds" / f"tone{f}.wav", 0.3 * np.sin(2 * np.pi * f * t), 16000)
    (root / "captions.txt").write_text("\n".join(CAPTIONS[:3]) + "\n\n")
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"image": "x.png", "text": CAPTIONS[3]}, {"audio": "y.wav"}, {"caption": CAPTIONS[4]}]) + "\n")
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    (root / "notes.md").write_text("not indexed")
    return root


def require_module(name: str, extra: str):
    """Import an optional dependency, or fail the test saying which extra installs it (CI has all)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"{name} is not installed: pip install -e '.[{extra}]' (.ci/run installs it)", pytrace=False)

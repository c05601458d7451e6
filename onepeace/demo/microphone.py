"""The recorded-voice path, measured: spoken clips played into Chromium's fake microphone, recorded
by the `onepeace serve` page's Record button, and searched against the 20 concepts' captions.

This is the path a user takes who presses Record and says "dog": MediaRecorder (Opus in WebM) ->
decoded in the page -> silent ends trimmed -> 16-bit WAV upload -> the server's audio transform ->
the model. By default the clips are held-out-engine (festival) recordings of the words alone. The clip
replaces the speaker and the microphone; everything after the microphone is the real thing.

    python -m onepeace.demo.microphone runs/demo/model --clips 40

needs the `serve` and `browser-test` extras and Debian's chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

CHROMIUM = os.environ.get("ONEPEACE_CHROMIUM", "/usr/bin/chromium")


def _start_server(index: Path, model_dir: str | Path, bpe_dir: str | None) -> tuple[subprocess.Popen, str]:
    """`onepeace serve INDEX --port 0`: the server binds a free port and prints its URL first."""
    cmd = [sys.executable, "-m", "onepeace", "serve", str(index), "--model", str(model_dir), "--port", "0"]
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on it
    server = subprocess.Popen(cmd + (["--bpe-dir", bpe_dir] if bpe_dir else []), stdout=subprocess.PIPE,
                              stderr=log, text=True)
    line = server.stdout.readline()
    if " on http://" not in line:
        server.kill()
        log.seek(0)
        raise RuntimeError(f"onepeace serve did not start: {line}{log.read().decode()[-2000:]}")
    return server, line.split(" on ")[1].split("/ ")[0]


def concept_index(model_dir: str | Path, concepts: dict, folder: Path, clips: Sequence[str | Path] = (),
                  bpe_dir: str | None = None) -> Path:
    """An index of the 20 concept names ("dog", "seven": what a user says into the microphone), which a
    recording is searched against, and of the ``clips`` themselves (to check that a recording is found
    as its own source)."""
    import shutil

    (folder / "items" / "clips").mkdir(parents=True, exist_ok=True)
    lines = list(concepts["concepts"])
    (folder / "items" / "concepts.txt").write_text("\n".join(lines) + "\n")
    for k, clip in enumerate(clips):
        shutil.copyfile(clip, folder / "items" / "clips" / f"{k:03d}-{Path(clip).name}")
    cmd = [sys.executable, "-m", "onepeace", "index", str(folder / "items"), "--out", str(folder / "index"),
           "--model", str(model_dir), "--quiet"] + (["--bpe-dir", bpe_dir] if bpe_dir else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr[-2000:]}")
    return folder / "index"


# the recorded WAV the page uploads, read back from its preview (base64, in chunks: a spread of
# 100k+ bytes into String.fromCharCode overflows the call stack)
_READ_RECORDING = """async () => {
  const a = document.querySelector('#audio-preview audio');
  const bytes = new Uint8Array(await (await fetch(a.src)).arrayBuffer());
  let s = '';
  for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode(...bytes.subarray(i, i + 8192));
  return btoa(s);
}"""


def record_and_search(page_url: str, clip: Path, seconds: float, chromium: str = CHROMIUM
                      ) -> tuple[str, str, bytes]:
    """Play ``clip`` into a fresh Chromium's fake microphone, record ``seconds`` with the page's Record
    button, search the text items and then the audio items with the recording; returns (the first text
    result, the first audio result, the WAV the page uploaded)."""
    import base64

    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={clip}%noloop"])
        try:
            page = browser.new_page(permissions=["microphone"])
            page.goto(page_url)
            page.click("#record")
            sync_api.expect(page.locator("#record")).to_have_class("recording")
            page.wait_for_timeout(int(seconds * 1000))
            page.click("#record")
            sync_api.expect(page.locator("#audio-preview")).to_contain_text("recording.wav")
            wav = base64.b64decode(page.evaluate(_READ_RECORDING))
            found = []
            for modality in ("text", "audio"):
                page.select_option("#modality", modality)
                page.click("#search")
                sync_api.expect(page.locator("#status")).to_contain_text("results", timeout=60_000)
                found.append(page.locator("#results .result").first.inner_text())
                page.evaluate("() => { document.querySelector('#status').textContent = ''; }")
            return found[0], found[1], wav
        finally:
            browser.close()


def _concept_of(text: str, concepts: dict) -> str | None:
    """The concept whose name is the result's text (a result card may add a score or a source line)."""
    words = set(re.findall(r"[a-z]+", text.lower()))  # the card quotes the text: “dog”
    return next((c for c in concepts["concepts"] if c in words), None)


def microphone_hit_rate(model_dir: str | Path, data: str | Path, clips: int = 20,
                        manifest: str = "test_al_engine_words.jsonl", bpe_dir: str | None = None, log=print) -> dict[str, Any]:
    """Top-1 concept hit rate of recordings of ``clips`` held-out clips (spread over the concepts)."""
    import soundfile as sf

    from ..data.datasets import read_manifest

    data = Path(data)
    concepts = json.loads((data / "concepts.json").read_text())
    entries = _spread_over_concepts(read_manifest(data / manifest), concepts["concepts"], clips)
    with tempfile.TemporaryDirectory() as tmp:
        index = concept_index(model_dir, concepts, Path(tmp), [e["audio"] for e in entries], bpe_dir)
        server, url = _start_server(index, model_dir, bpe_dir)
        try:
            rows = []
            for entry in entries:
                seconds = sf.info(entry["audio"]).duration + 0.6
                text, audio, wav = record_and_search(url, Path(entry["audio"]), seconds)
                got = _concept_of(text, concepts)
                rows.append({"audio": entry["audio"], "voice": entry.get("voice"), "label": entry["label"], "got": got,
                             "found_itself": f"-{Path(entry['audio']).name}" in audio and
                             f"{len(rows):03d}-" in audio, **recording_match(wav, entry["audio"])})
                log(f"{Path(entry['audio']).name:<24} {entry.get('voice', ''):<36} -> {got}, itself "
                    f"{'first' if rows[-1]['found_itself'] else 'not first'} "
                    f"(recording {rows[-1]['recorded_seconds']:.1f} s, envelope match {rows[-1]['envelope_correlation']:.2f})")
        finally:
            server.terminate()
            server.wait(timeout=30)
    hits = sum(r["label"] == r["got"] for r in rows)
    return {"hits": hits, "clips": len(rows), "hit_rate": hits / max(1, len(rows)), "chance": 1 / len(concepts["concepts"]),
            "found_itself": sum(r["found_itself"] for r in rows), "rows": rows}


def recording_match(wav: bytes, clip: str | Path) -> dict[str, float]:
    """How much of ``clip`` the recording carries: the recording's seconds and RMS, and the peak
    normalised cross-correlation of the two loudness envelopes (10 ms frames; 1 = same shape)."""
    import io

    import numpy as np
    import soundfile as sf
    import soxr

    rec, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    ref, ref_rate = sf.read(str(clip), dtype="float32", always_2d=True)
    rec16 = soxr.resample(rec.mean(axis=1), rate, 16_000)
    ref16 = soxr.resample(ref.mean(axis=1), ref_rate, 16_000)

    def envelope(x: np.ndarray) -> np.ndarray:
        frames = x[: len(x) // 160 * 160].reshape(-1, 160)
        e = np.sqrt((frames ** 2).mean(axis=1))
        return (e - e.mean()) / (e.std() + 1e-9)

    a, b = envelope(rec16), envelope(ref16)
    # over the shorter of the two: the page trims the recording's silent ends, so it can be the shorter
    corr = np.correlate(a, b, mode="full") / max(1, min(len(a), len(b))) if len(a) and len(b) else np.zeros(1)
    return {"recorded_seconds": len(rec16) / 16_000, "recorded_rms": float(np.sqrt(np.mean(rec16 ** 2))),
            "envelope_correlation": float(corr.max())}


def _spread_over_concepts(entries: Sequence[dict], concepts: Sequence[str], n: int) -> list[dict]:
    """``n`` entries taking the concepts in turn (the k-th clip of each concept in round k)."""
    by_concept = {c: [e for e in entries if e["label"] == c] for c in concepts}
    picked: list[dict] = []
    for round_ in range(max(len(v) for v in by_concept.values())):
        for c in concepts:
            if len(picked) < n and round_ < len(by_concept[c]):
                picked.append(by_concept[c][round_])
    return picked


def main(argv: list[str] | None = None) -> int:
    from .data import default_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder, e.g. runs/demo/model")
    parser.add_argument("--data", default=None, help="the demo data folder (default: the cached full build)")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--manifest", default="test_al_engine_words.jsonl",
                        help="which held-out clips: test_al_engine_words.jsonl (the words alone, default), "
                             "test_al_words.jsonl, test_al_engine.jsonl or test_al.jsonl (spoken captions)")
    args = parser.parse_args(argv)
    result = microphone_hit_rate(args.model, args.data or default_root(), args.clips, args.manifest)
    print(f"hit rate {result['hits']}/{result['clips']} = {result['hit_rate']:.2f} (chance {result['chance']:.2f}); "
          f"the recording found its own clip first: {result['found_itself']}/{result['clips']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

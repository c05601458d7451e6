"""`onepeace serve`: the JSON API, bad uploads, the web page in headless Chromium, a loopback load test."""
from __future__ import annotations

import base64
import http.client
import json
import os
import threading
from pathlib import Path

import pytest

import onepeace
from conftest import ASSETS, BPE_DIR, CAPTIONS, make_collection, require_module
from onepeace.index import IndexConfig, SearchIndex, build_index
from onepeace.serve import ServeConfig, make_server
from onepeace.serve.loadtest import LoadResult, run_load

CHROMIUM = os.environ.get("ONEPEACE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ONEPEACE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"))


@pytest.fixture(autouse=True, scope="module")
def _faiss():
    require_module("faiss", "serve")


def indexed_collection(folder: Path, model_dir: Path):
    """make_collection() under `folder` indexed with the tiny model -> (data root, index folder, model)."""
    root = make_collection(folder / "data")
    model = onepeace.load(model_dir)
    model.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    out = root.parent / "idx"
    build_index(root, out, model, model_dir, IndexConfig(), progress=False, log=lambda m: None)
    return root, out, model


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """The tiny model's index of make_collection(), served on a free loopback port in a thread."""
    root, out, model = indexed_collection(tmp_path_factory.mktemp("serve"), tiny_model_dir)
    srv = make_server(SearchIndex(out), model, ServeConfig(port=0, max_upload_bytes=200_000))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}", root
    srv.shutdown()
    srv.server_close()


def call(url: str, method: str, path: str, body: object = None, raw: bytes | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json"} if data is not None else {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if ctype.startswith("application/json") else payload), ctype


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_binds_loopback_by_default():
    from onepeace.cli import build_parser

    assert ServeConfig().host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_health_stats_search_embed(server):
    url, root = server
    status, health, _ = call(url, "GET", "/api/health")
    assert status == 200 and health["status"] == "ok" and health["items"] == 17
    status, stats, _ = call(url, "GET", "/api/stats")
    assert stats["searchable"] == {"image": 8, "audio": 4, "text": 5} and stats["files_failed"] == 1
    assert stats["faiss"]["image"]["kind"] == "flat-ip"

    status, body, _ = call(url, "POST", "/api/search", {"text": CAPTIONS[2], "k": 3})
    assert status == 200 and body["results"][0]["text"] == CAPTIONS[2] and len(body["results"]) == 3
    parts = [{"modality": "audio", "data": b64(ASSETS / "dog.flac"), "filename": "dog.flac", "weight": 1},
             {"modality": "text", "text": "a dog", "weight": 0.1}]
    status, body, _ = call(url, "POST", "/api/search", {"parts": parts, "modality": "audio", "k": 4})
    top = body["results"][0]
    assert status == 200 and top["display_name"] == "sounds/dog.flac" and top["file_url"] == f"/api/item/{top['id']}/file"
    assert {r["modality"] for r in body["results"]} == {"audio"}

    status, emb, _ = call(url, "POST", "/api/embed", {"parts": parts})
    assert status == 200 and emb["dim"] == 64 and len(emb["embeddings"]) == 2
    assert abs(sum(x * x for x in emb["composed"]) - 1) < 1e-4


def test_item_files_only_for_indexed_items(server):
    url, root = server
    status, body, _ = call(url, "POST", "/api/search", {"parts": [{"modality": "image", "data": b64(
        root / "drawings" / "shape0.png"), "filename": "shape0.png"}], "modality": "image", "k": 1})
    hit = body["results"][0]
    assert hit["display_name"] == "drawings/shape0.png"
    status, png, ctype = call(url, "GET", hit["thumb_url"])
    assert status == 200 and ctype == "image/png" and png.startswith(b"\x89PNG")
    status, raw, _ = call(url, "GET", hit["file_url"])
    assert status == 200 and raw == (root / "drawings" / "shape0.png").read_bytes()
    for path in ("/api/item/999999/file", "/api/item/../../etc/passwd", "/api/item/%2e%2e/file", "/etc/passwd",
                 "/api/item/1/../../../etc/passwd"):
        status, err, _ = call(url, "GET", path)
        assert status == 404 and "error" in err, path
    text_item = call(url, "POST", "/api/search", {"text": CAPTIONS[0], "k": 1})[1]["results"][0]
    assert call(url, "GET", f"/api/item/{text_item['id']}/file")[0] == 404  # texts have no file to serve


@pytest.mark.parametrize("body,status,words", [
    ({"parts": [{"modality": "image", "data": base64.b64encode(b"hello, I am text").decode(), "filename": "a.png"}]},
     415, ["parts[0] (a.png)", "not a supported image"]),
    ({"parts": [{"modality": "audio", "data": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 50).decode(),
                 "filename": "x.wav"}]}, 415, ["parts[0] (x.wav)", "looks like image"]),
    ({"parts": [{"modality": "image", "data": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode(),
                 "filename": "bad.png"}]}, 422, ["bad.png", "cannot read image"]),
    ({"parts": [{"modality": "audio", "data": base64.b64encode(b"RIFF\0\0\0\0WAVEjunk").decode(),
                 "filename": "bad.wav"}]}, 422, ["bad.wav", "cannot read audio"]),
    ({"parts": [{"modality": "image", "data": base64.b64encode(b"\x89PNG" + b"0" * 300_000).decode(),
                 "filename": "huge.png"}]}, 413, ["huge.png", "too large"]),
    ({"parts": [{"modality": "image", "data": "!!!not base64", "filename": "z.png"}]}, 400, ["base64"]),
    ({"parts": [{"modality": "smell", "data": "AAAA"}]}, 400, ["parts[0].modality"]),
    ({"parts": [{"modality": "video", "data": "AAAA", "filename": "v.mp4"}]}, 415,
     ["parts[0] (v.mp4)", "not a supported video file", "MP4"]),
    ({"text": "a dog", "k": 0}, 400, ["k:"]),
    ({"text": "a dog", "modality": "smell"}, 400, ["modality"]),
    ({"parts": []}, 400, ["parts"]),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_running(server, body, status, words):
    url, _ = server
    got, err, _ = call(url, "POST", "/api/search", body)
    assert got == status, err
    for w in words:
        assert w in err["error"], err
    assert call(url, "GET", "/api/health")[0] == 200


def test_malformed_http(server):
    url, _ = server
    assert call(url, "POST", "/api/search", raw=b"{not json")[0] == 400
    assert call(url, "POST", "/api/health", {})[0] == 405
    assert call(url, "GET", "/nowhere")[0] == 404
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/search")
    conn.putheader("Content-Length", str(10 ** 9))  # never sent: refused from the header alone
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "too large" in json.loads(resp.read())["error"]
    assert call(url, "GET", "/api/health")[0] == 200


def test_zero_shot_endpoint_ranks_the_labels_like_the_library(server, tiny_model_dir):
    url, root = server
    labels = ["dog", "siren", "rain"]
    model = onepeace.load(tiny_model_dir)
    for path, kind in ((ASSETS / "dog.flac", "audio"), (ASSETS / "elephant.JPEG", "image")):
        # no "modality": the server tells it from the upload's first bytes
        status, body, _ = call(url, "POST", "/api/zero-shot",
                               {"labels": "dog, siren,rain", "parts": [{"data": b64(path), "filename": path.name}]})
        assert status == 200, body
        assert body["modality"] == kind and body["labels"] == labels and len(body["results"]) == 3
        probs, _ = model.zero_shot([str(path)], labels)
        expected = sorted(zip(labels, probs[0].tolist()), key=lambda x: -x[1])
        assert [r["label"] for r in body["results"]] == [x[0] for x in expected]
        assert [r["prob"] for r in body["results"]] == pytest.approx([x[1] for x in expected], abs=1e-5)
        assert abs(sum(r["prob"] for r in body["results"]) - 1) < 1e-5
    status, body, _ = call(url, "POST", "/api/zero-shot", {"labels": labels, "k": 1, "parts": [
        {"modality": "text", "text": "a dog barks"}]})
    assert status == 200 and body["modality"] == "text" and len(body["results"]) == 1


@pytest.mark.parametrize("body,status,words", [
    ({"labels": [], "parts": [{"text": "x", "modality": "text"}]}, 400, ["at least one label"]),
    ({"labels": " , ", "parts": [{"text": "x", "modality": "text"}]}, 400, ["at least one label"]),
    ({"labels": [1, 2], "parts": [{"text": "x", "modality": "text"}]}, 400, ["labels: expected"]),
    ({"labels": ["a", "a"], "parts": [{"text": "x", "modality": "text"}]}, 400, ["distinct"]),
    ({"labels": ["a", "b"]}, 400, ["exactly one part"]),
    ({"labels": ["a", "b"], "k": 0, "parts": [{"text": "x", "modality": "text"}]}, 400, ["k:"]),
    ({"labels": ["a", "b"], "parts": [{"data": base64.b64encode(b"hello, I am text").decode(), "filename": "n.bin"}]},
     400, ["parts[0].modality"]),
    ({"labels": ["a", "b"], "parts": [{"data": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode(),
                                        "filename": "bad.png"}]}, 422, ["bad.png", "cannot read image"]),
])
def test_zero_shot_bad_requests_get_a_clear_4xx(server, body, status, words):
    url, _ = server
    got, err, _ = call(url, "POST", "/api/zero-shot", body)
    assert got == status, err
    for w in words:
        assert w in err["error"], err
    assert call(url, "GET", "/api/health")[0] == 200


@pytest.mark.slow
def test_web_page_in_headless_chromium(server):
    """Type a text and search; upload an audio file and search; a bad upload shows its error."""
    sync_api = require_module("playwright.sync_api", "browser-test")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (or set ONEPEACE_CHROMIUM)")
    url, root = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # a fake microphone (a beep) so that the record button runs MediaRecorder -> WAV -> upload
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        page = browser.new_page(viewport={"width": 1200, "height": 900}, permissions=["microphone"])
        page.goto(url)
        sync_api.expect(page.locator("#stats")).to_contain_text("8 image, 4 audio, 5 text")

        page.select_option("#modality", "")  # all modalities
        page.fill("#text", CAPTIONS[1])
        page.click("#search")
        first = page.locator("#results .result").first
        sync_api.expect(first).to_contain_text(CAPTIONS[1])
        sync_api.expect(first).to_contain_text("captions.txt:2")

        page.click("#clear")
        page.set_input_files("#audio-file", str(ASSETS / "cow.flac"))
        sync_api.expect(page.locator("#audio-preview audio")).to_have_count(1)
        page.select_option("#modality", "audio")
        page.click("#search")
        sync_api.expect(first).to_contain_text("sounds/cow.flac")
        sync_api.expect(first.locator("audio")).to_have_count(1)
        assert page.locator("#results .result").count() == 4
        assert float(first.locator(".score").inner_text()) > 0.999

        # compose with an image and show images: thumbnails load from the server
        page.set_input_files("#image-file", str(ASSETS / "dog.JPEG"))
        page.select_option("#modality", "image")
        page.click("#search")
        sync_api.expect(first).to_contain_text("photos/dog.JPEG")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)

        # record from the (fake) microphone instead of the file: a WAV upload the server accepts
        page.click("#clear")
        page.click("#record")
        sync_api.expect(page.locator("#record")).to_have_class("recording")
        page.wait_for_timeout(1200)
        page.click("#record")
        sync_api.expect(page.locator("#audio-preview")).to_contain_text("recording.wav")
        page.select_option("#modality", "audio")
        page.click("#search")
        sync_api.expect(page.locator("#status")).to_contain_text("4 results")
        assert page.locator("#error").is_hidden()

        page.set_input_files("#image-file", str(root / "captions.txt"))
        page.click("#search")
        sync_api.expect(page.locator("#error")).to_contain_text("not a supported image file")

        # the zero-shot box: labels in, ranked labels with probabilities out
        page.fill("#zs-labels", "dog, siren, rain")
        page.set_input_files("#zs-file", str(ASSETS / "dog.flac"))
        page.click("#zs-run")
        items = page.locator("#zs-results li")
        sync_api.expect(items).to_have_count(3)
        sync_api.expect(page.locator("#zs-status")).to_contain_text("audio")
        shown = [(items.nth(i).locator(".label").inner_text(), float(items.nth(i).locator(".prob").inner_text()))
                 for i in range(3)]
        assert sorted(label for label, _ in shown) == ["dog", "rain", "siren"]
        assert [p for _, p in shown] == sorted((p for _, p in shown), reverse=True)
        assert abs(sum(p for _, p in shown) - 1) < 0.01
        page.locator("#zero-shot").screenshot(path=str(ARTIFACTS / "serve-zero-shot.png"))
        page.fill("#zs-labels", " , ")
        page.click("#zs-run")
        sync_api.expect(page.locator("#zs-error")).to_contain_text("type some labels")
        page.fill("#zs-labels", "dog, cat")
        page.set_input_files("#zs-file", str(root / "captions.txt"))
        page.click("#zs-run")
        sync_api.expect(page.locator("#zs-error")).to_contain_text("parts[0].modality")
        sync_api.expect(items).to_have_count(0)
        browser.close()
    assert (ARTIFACTS / "serve.png").stat().st_size > 10_000


def test_loopback_load(server):
    url, _ = server
    bodies = [{"text": c, "k": 5} for c in CAPTIONS] + [{"text": "a photo", "modality": "image", "k": 10}]
    result = run_load(url, bodies, clients=8, seconds=3.0)
    print(LoadResult.HEADER)
    print(result.line())
    assert result.errors == 0, result.first_error
    assert result.requests >= 8 and result.rps > 0 and result.p99_ms >= result.p50_ms


@pytest.mark.slow
def test_serve_without_index_uses_the_demo_and_says_how_to_get_it(tmp_path, tiny_model_dir):
    """No INDEX: the demo data (under ONEPEACE_CACHE) is indexed with the demo model on first use,
    then served on 127.0.0.1; with no demo model the error says to run `onepeace demo`."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "ONEPEACE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "onepeace", "serve", "--port", "0", "--bpe-dir", str(BPE_DIR)]
    missing = subprocess.run(cmd + ["--model", str(tmp_path / "no-model")], capture_output=True, text=True,
                             timeout=120, env=env)
    assert missing.returncode == 2 and "run `onepeace demo` first" in missing.stderr

    data = make_collection(tmp_path / "cache" / "demo-data" / "full")
    (data / "manifest_info.json").write_text("{}")
    proc = subprocess.Popen(cmd + ["--model", str(tiny_model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()  # "serving INDEX (...) on http://127.0.0.1:PORT/ ..."
        assert "on http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" on ")[1].split("/ ")[0]
        assert str(tmp_path / "cache" / "index" / "demo-full") in line
        deadline = time.time() + 30
        while True:
            try:
                status, health, _ = call(url, "GET", "/api/health")
                break
            except ConnectionError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert status == 200 and health["items"] == 17
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_page_trims_the_silent_ends_of_a_recording():
    """The page's trimSilence (run in Chromium, taken from page.html): a word between two half-seconds
    of quiet room noise comes back as the word plus 0.1 s each side; steady noise, silence and a
    too-short input come back whole."""
    import re

    sync_api = require_module("playwright.sync_api", "browser-test")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (or set ONEPEACE_CHROMIUM)")
    page_html = (Path(__file__).resolve().parents[1] / "onepeace" / "serve" / "page.html").read_text()
    function = re.search(r"^function trimSilence\(x, rate\) \{.*?^\}$", page_html, re.S | re.M).group(0)
    probe = """(rate) => {
      let seed = 1; const noise = () => ((seed = (seed * 16807) % 2147483647) / 2147483647 - 0.5) * 2e-3;
      const make = (parts) => Float32Array.from(parts.flatMap(([sec, amp]) =>
        Array.from({length: Math.round(sec * rate)}, (_, i) => noise() + amp * Math.sin(i * 0.3))));
      const word = make([[0.5, 0], [0.4, 0.5], [0.5, 0]]);
      return {word: trimSilence(word, rate).length / rate, steady: trimSilence(make([[1.0, 0]]), rate).length / rate,
              zeros: trimSilence(new Float32Array(rate), rate).length / rate,
              short: trimSilence(Float32Array.from([0.5, 0, 0.5]), rate).length};
    }"""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_content(f"<script>{function}</script>")
            got = page.evaluate(probe, 48_000)
        finally:
            browser.close()
    print("trimmed lengths:", got)
    assert abs(got["word"] - 0.6) <= 0.03, got  # 0.4 s of speech + 0.1 s each side (20 ms frames)
    assert got["steady"] == 1.0 and got["zeros"] == 1.0 and got["short"] == 3, got

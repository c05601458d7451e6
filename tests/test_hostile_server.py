"""`onepeace serve` against hostile and unlucky clients (issue 17, "The server" and the server lines of
"Numbers"): every refusal is a JSON 4xx, never a 500 or a traceback; the Host allow-list; JSON bodies
only; idle and slow connections are closed; model work is capped (503 + Retry-After) and batched; no
NaN leaves the API; the API is described by OpenAPI. Servers run in-process with small timeouts, one
in a subprocess (its log and its CLI flags)."""
from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ASSETS, BPE_DIR, CAPTIONS, require_module
from onepeace.index import SearchIndex
from onepeace.serve import ServeConfig, make_server
from test_serve import indexed_collection

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _extras():
    require_module("faiss", "serve")
    require_module("starlette", "serve")
    require_module("uvicorn", "serve")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """(index folder, model) of make_collection() with the tiny model."""
    _, out, model = indexed_collection(tmp_path_factory.mktemp("hostile"), tiny_model_dir)
    return out, model


class Running:
    """An in-process server on a free loopback port, served from a thread."""

    def __init__(self, built, **config):
        index, model = built
        self.srv = make_server(SearchIndex(index), model, ServeConfig(port=0, **config))
        self.service = self.srv.service
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture(scope="module")
def server(built):
    running = Running(built, idle_timeout=1.0, request_timeout=3.0)
    yield running
    running.close()


def exchange(port: int, request: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one answer -> (status, lower-case headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        n = int(headers.get("content-length", -1))
        while len(body) < n or n < 0:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def get(port: int, path: bytes, host: bytes = b"127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    return exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")


def post(port: int, path: bytes, body: bytes, ctype: bytes | None = b"application/json",
         host: bytes = b"127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
    head += (b"Content-Type: " + ctype + b"\r\n" if ctype else b"") + b"Content-Length: %d\r\n\r\n" % len(body)
    return exchange(port, head + body)


def search(port: int, body: dict) -> tuple[int, dict[str, str], dict]:
    status, headers, raw = post(port, b"/api/search", json.dumps(body).encode())
    return status, headers, json.loads(raw)


def assert_json_error(status: int, headers: dict, body: bytes, expected: int, *words: str) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)
    assert set(err) == {"error"} and "Traceback" not in err["error"], err
    for w in words:
        assert w in err["error"], err
    return err


def alive(port: int) -> bool:
    return get(port, b"/api/health")[0] == 200


# ---- 500s instead of 4xx ----
@pytest.mark.parametrize("path", [b"/api/item/9223372036854775808/file", b"/api/item/18446744073709551616/thumb",
                                  b"/api/item/" + b"9" * 40 + b"/file", b"/api/item/%C2%B2/file", b"/api/item/-1/file"])
def test_item_ids_outside_the_sqlite_range_are_404(server, path):
    assert_json_error(*get(server.port, path), 404, "bad item id")
    assert alive(server.port)


@pytest.mark.parametrize("path", [b"/api/item/\xff/file", b"/api/item/\xb2/file", b"/\xc3"])
def test_a_raw_non_utf8_byte_in_the_path_is_a_json_400(server, path):
    assert_json_error(*get(server.port, path), 400, "malformed HTTP request")
    assert alive(server.port)


@pytest.mark.parametrize("body,words", [
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    (b'{"text": "a dog", "k": ' + b"9" * 5001 + b"}", ["not valid JSON", "digits"]),
    (b'{"parts": [{"modality": "text", "text": "a dog", "weight": NaN}]}', ["NaN is not a JSON number"]),
    (b'{"text": "a dog", "k": Infinity}', ["Infinity"]),
    (b'{"text": "a dog", "k": ' + b"9" * 4000 + b"}", ["k: expected an integer in [1, 100]"]),
    (b'{"parts": ' + b"[" * 5000 + b"]" * 5000 + b"}", []),
    (b'\xff\xfe{"text"', ["not valid JSON"]),
    (b"[1, 2]", ["must be a JSON object"]),
])
def test_hostile_json_is_a_400(server, body, words):
    t0 = time.perf_counter()
    status, headers, raw = post(server.port, b"/api/search", body)
    assert_json_error(status, headers, raw, 400, *words)
    assert time.perf_counter() - t0 < 5
    assert alive(server.port)


# ---- numbers that are not numbers ----
@pytest.mark.parametrize("weights", [[1e308, 1e308], [1e39], [-1e300, 1.0], [1e7]])
def test_overflowing_query_weights_are_a_400(server, weights):
    parts = [{"modality": "text", "text": c, "weight": w} for c, w in zip(CAPTIONS, weights)]
    status, headers, body = search(server.port, {"parts": parts, "k": 3})
    assert status == 400 and "weight" in body["error"] and "magnitude at most" in body["error"], body


def test_large_but_allowed_weights_give_the_same_answer_as_small_ones(server):
    big = [{"modality": "text", "text": CAPTIONS[0], "weight": 1e6}, {"modality": "text", "text": CAPTIONS[1], "weight": 1e6}]
    small = [{**p, "weight": 1.0} for p in big]
    a, b = search(server.port, {"parts": big, "k": 5})[2], search(server.port, {"parts": small, "k": 5})[2]
    assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]] and len(a["results"]) == 5
    assert [h["score"] for h in a["results"]] == pytest.approx([h["score"] for h in b["results"]], abs=1e-5)


def test_a_non_finite_embedding_is_a_422_and_never_a_nan(server, monkeypatch):
    import torch

    import onepeace.inference as inference

    monkeypatch.setattr(inference, "embed_prepared", lambda model, modality, items, *a, **k: torch.full((len(items), 64), float("nan")))
    for path in (b"/api/search", b"/api/embed"):
        status, headers, raw = post(server.port, path, json.dumps({"parts": [{"modality": "text", "text": "a dog"}]}).encode())
        assert_json_error(status, headers, raw, 422, "parts[0] (text)", "non-finite embedding")
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    monkeypatch.undo()
    assert search(server.port, {"text": CAPTIONS[0], "k": 1})[0] == 200


def test_an_audio_file_of_huge_samples_gives_finite_vectors_not_nan(server, tmp_path):
    """Finite 1e38 samples overflowed in the model: the API answered 200 with NaN vectors (embed) and
    [] (search). The audio is now normalised in float64 (a finite clip gives a finite embedding), so
    both answer with finite numbers; a non-finite embedding would be a 422 (the next test)."""
    import numpy as np
    import soundfile as sf

    wave = np.where(np.arange(16000) % 80 < 40, 1e38, -1e38).astype(np.float32)
    sf.write(tmp_path / "huge.wav", wave, 16000, subtype="FLOAT")
    part = {"modality": "audio", "data": base64.b64encode((tmp_path / "huge.wav").read_bytes()).decode(),
            "filename": "huge.wav"}
    for path in (b"/api/embed", b"/api/search"):
        status, _, raw = post(server.port, path, json.dumps({"parts": [part], "k": 3}).encode())
        assert status == 200, raw
        body = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
        if path == b"/api/embed":
            assert np.isfinite(body["composed"]).all() and len(body["composed"]) == body["dim"]
        else:
            assert len(body["results"]) == 3  # not [] (the index holds vectors)


# ---- Host allow-list, JSON content type ----
@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:8000", b"127.0.0.1.nip.io", b"localhost.evil.example",
                                  b""])
def test_a_foreign_host_is_refused_before_any_data(server, host):
    status, headers, raw = get(server.port, b"/api/stats", host=host)
    err = assert_json_error(status, headers, raw, 400, "is not served", "--allow-host")
    assert str(server.service.root) not in err["error"] and b"/tmp" not in raw
    assert_json_error(*post(server.port, b"/api/search", b'{"text": "a dog"}', host=host), 400, "--allow-host")


@pytest.mark.parametrize("host", [b"localhost", b"LOCALHOST:1234", b"127.0.0.1", b"[::1]:8000", b"app.localhost"])
def test_loopback_names_are_served(server, host):
    status, _, raw = get(server.port, b"/api/stats", host=host)
    assert status == 200 and json.loads(raw)["searchable"]["image"] == 8


def test_allow_host_adds_names(built):
    running = Running(built, allow_hosts=("search.example",))
    try:
        assert get(running.port, b"/api/health", host=b"search.example:8000")[0] == 200
        assert get(running.port, b"/api/health", host=b"evil.example")[0] == 400
    finally:
        running.close()
    running = Running(built, allow_hosts=("*",))
    try:
        assert get(running.port, b"/api/health", host=b"anything.example")[0] == 200
    finally:
        running.close()


@pytest.mark.parametrize("ctype", [b"text/plain", None, b"application/x-www-form-urlencoded", b"multipart/form-data"])
def test_json_endpoints_require_the_json_content_type(server, ctype):
    for path in (b"/api/search", b"/api/embed", b"/api/zero-shot"):
        assert_json_error(*post(server.port, path, b'{"text": "a dog"}', ctype=ctype), 415, "application/json")
    status, _, _ = post(server.port, b"/api/search", b'{"text": "a dog"}', ctype=b"application/json; charset=utf-8")
    assert status == 200


# ---- timeouts ----
def test_idle_and_slow_connections_are_closed_after_the_timeout(server):
    """200 silent connections, 5 sending their head a byte at a time, 1 idle after a keep-alive answer:
    all closed within the 1-s idle timeout (+ margin); a query is answered meanwhile."""
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    kept = socket.create_connection(("127.0.0.1", server.port))
    kept.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    t0 = time.perf_counter()
    assert search(server.port, {"text": CAPTIONS[0], "k": 1})[0] == 200
    head = b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n"
    open_ = set(silent + slow + [kept])
    while open_ and time.perf_counter() - t0 < 6:
        for i, s in enumerate(slow):
            if s in open_:
                try:
                    s.send(head[int((time.perf_counter() - t0) * 5) % len(head):][:1])
                except OSError:
                    pass
        ready, _, _ = select.select(list(open_), [], [], 0.2)
        for s in ready:
            try:
                if s.recv(65536) == b"":
                    open_.discard(s)
            except OSError:
                open_.discard(s)
    closed_after = time.perf_counter() - t0
    for s in silent + slow + [kept]:
        s.close()
    assert not open_, f"{len(open_)} of 206 connections still open after {closed_after:.1f} s"
    assert closed_after > 0.8  # closed by the timeout, not at once
    assert alive(server.port)


def test_a_body_that_does_not_arrive_is_a_408(built):
    running = Running(built, request_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as s:
            s.sendall(b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"text\": ")
            t0 = time.perf_counter()
            answer = s.recv(65536)
            took = time.perf_counter() - t0
            while chunk := s.recv(65536):  # then the body, then the close
                answer += chunk
    finally:
        running.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in body, answer
    assert 0.8 < took < 8


# ---- the cap on model work, batching, timeouts of model work ----
def _blocked(service) -> threading.Event:
    """Hold the model thread until the returned event is set."""
    release, running = threading.Event(), threading.Event()
    service.worker.call(lambda: (running.set(), release.wait(30)))
    assert running.wait(10)  # the model thread holds it: queued() counts only what comes after
    return release


def test_model_work_beyond_the_cap_gets_503_with_retry_after(built):
    running = Running(built, max_model_requests=2, max_uploads=1, large_body_bytes=20_000, request_timeout=20)
    try:
        release = _blocked(running.service)
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(search, running.port, {"text": CAPTIONS[i], "k": 1}) for i in range(2)]
            deadline = time.time() + 10
            while running.service.worker.queued() < 2 and time.time() < deadline:
                time.sleep(0.05)  # both are queued behind the blocked model
            status, headers, body = search(running.port, {"text": CAPTIONS[2], "k": 1})
            assert status == 503 and "busy" in body["error"] and "2 model requests" in body["error"], body
            assert int(headers["retry-after"]) >= 1
            assert get(running.port, b"/api/health")[0] == 200  # other routes are not capped
            release.set()
            assert [f.result()[0] for f in held] == [200, 200]
        # large bodies: one at a time
        release = _blocked(running.service)
        upload = json.dumps({"parts": [{"modality": "audio", "data": base64.b64encode((ASSETS / "dog.flac").read_bytes()).decode(),
                                        "filename": "dog.flac"}], "k": 1}).encode()
        assert len(upload) > 20_000
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, running.port, b"/api/search", upload)
            deadline = time.time() + 10
            while running.service.worker.queued() < 1 and time.time() < deadline:
                time.sleep(0.05)  # read, decoded, queued behind the blocked model
            status, headers, raw = post(running.port, b"/api/search", upload)
            assert_json_error(status, headers, raw, 503, "1 large uploads in progress (at most 1)")
            assert int(headers["retry-after"]) >= 1
            release.set()
            assert first.result()[0] == 200
        assert post(running.port, b"/api/search", upload)[0] == 200
    finally:
        running.close()


def test_an_answer_not_ready_in_time_is_a_503_and_the_server_recovers(built):
    running = Running(built, request_timeout=1.0)
    try:
        release = _blocked(running.service)
        status, headers, body = search(running.port, {"text": CAPTIONS[0], "k": 1})
        assert status == 503 and "no answer within 1 s" in body["error"] and int(headers["retry-after"]) >= 1
        release.set()
        assert search(running.port, {"text": CAPTIONS[0], "k": 1})[0] == 200
    finally:
        running.close()


def test_concurrent_queries_share_one_model_call_and_get_their_own_answers(server):
    """16 text queries queued behind a busy model are embedded in one batched call; each answer equals
    the one it gets alone."""
    texts = [f"{CAPTIONS[i % 5]} number {i}" for i in range(16)]
    alone = [post(server.port, b"/api/embed", json.dumps({"parts": [{"modality": "text", "text": t}]}).encode())
             for t in texts]
    alone = [json.loads(raw)["composed"] for _, _, raw in alone]
    release = _blocked(server.service)
    calls = server.service.worker.calls
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, server.port, b"/api/embed",
                               json.dumps({"parts": [{"modality": "text", "text": t}]}).encode()) for t in texts]
        deadline = time.time() + 20
        while server.service.worker.queued() < 16 and time.time() < deadline:
            time.sleep(0.05)
        release.set()
        together = [json.loads(f.result()[2])["composed"] for f in futures]
    assert server.service.worker.calls - calls == 1  # one forward for all 16
    for a, b in zip(alone, together):
        assert b == pytest.approx(a, abs=1e-5)


def test_one_bad_input_in_a_batch_fails_only_its_own_request(server, monkeypatch):
    import onepeace.inference as inference

    real = inference.embed_prepared
    poison = server.service.model.tokenizer.encode("poison")

    def picky(model, modality, items, *a, **k):
        if any(t.tolist() == poison for t in items):
            raise ValueError("poisoned input")
        return real(model, modality, items, *a, **k)

    monkeypatch.setattr(inference, "embed_prepared", picky)
    release = _blocked(server.service)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(search, server.port, {"text": t, "k": 1}) for t in ("poison", CAPTIONS[0], CAPTIONS[1])]
        deadline = time.time() + 20
        while server.service.worker.queued() < 3 and time.time() < deadline:
            time.sleep(0.05)
        release.set()
        results = [f.result() for f in futures]
    assert results[0][0] == 422 and "poisoned input" in results[0][2]["error"] and "parts[0]" in results[0][2]["error"]
    assert [r[0] for r in results[1:]] == [200, 200]
    assert results[1][2]["results"][0]["text"] == CAPTIONS[0]


# ---- every exception a JSON answer; the API described ----
def test_a_bug_is_a_json_500_without_a_traceback(server, monkeypatch):
    def broken():
        raise RuntimeError("secret detail at /home/someone/index")

    monkeypatch.setattr(server.service.index, "stats", broken)
    status, headers, raw = get(server.port, b"/api/stats")
    err = assert_json_error(status, headers, raw, 500, "internal error (RuntimeError)")
    assert "secret" not in err["error"] and "/home" not in err["error"]
    monkeypatch.undo()
    assert get(server.port, b"/api/stats")[0] == 200


def test_unknown_routes_and_methods_are_json(server):
    assert_json_error(*get(server.port, b"/nowhere"), 404, "no such resource")
    assert_json_error(*post(server.port, b"/api/health", b"{}"), 405, "no POST endpoint /api/health")
    assert_json_error(*get(server.port, b"/api/search"), 405, "it takes POST")


def test_openapi_describes_every_route(server):
    status, _, raw = get(server.port, b"/openapi.json")
    doc = json.loads(raw)
    assert status == 200 and doc["openapi"].startswith("3.1")
    routes = {(r.path, m.lower()) for r in server.srv.app.app.routes for m in r.methods if m != "HEAD"}
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert described == routes
    schemas = doc["components"]["schemas"]
    assert schemas["SearchRequest"]["properties"]["k"]["maximum"] == 100
    assert schemas["Part"]["properties"]["weight"]["maximum"] == 1e6
    for path, ops in doc["paths"].items():  # every $ref resolves
        for ref in _refs(ops):
            assert ref.removeprefix("#/components/schemas/") in schemas, (path, ref)


def _refs(obj) -> list[str]:
    if isinstance(obj, dict):
        return [obj["$ref"]] if "$ref" in obj else [r for v in obj.values() for r in _refs(v)]
    return [r for v in obj for r in _refs(v)] if isinstance(obj, list) else []


# ---- the CLI server: its flags, and its log after clients that hang up ----
@pytest.fixture(scope="module")
def cli_server(built, tmp_path_factory):
    index, _ = built
    log = tmp_path_factory.mktemp("cli-serve") / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "onepeace", "serve", str(index), "--port", "0", "--bpe-dir", str(BPE_DIR),
           "--allow-host", "search.example", "--idle-timeout", "1", "--request-timeout", "2", "--max-model-requests", "4"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    assert " on http://127.0.0.1:" in line, line + log.read_text()
    yield int(line.split(" on http://127.0.0.1:")[1].split("/")[0]), log
    proc.terminate()
    proc.wait(timeout=30)


def _hang_up(port: int, data: bytes, wait: float = 0.0) -> None:
    """Send `data`, then reset the connection (SO_LINGER 0: RST, like a killed client)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(data)
    time.sleep(wait)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def test_clients_that_hang_up_leave_no_traceback_in_the_log(cli_server):
    port, log = cli_server
    status, _, raw = get(port, b"/api/health")
    assert status == 200
    body = json.dumps({"text": CAPTIONS[0], "k": 3}).encode()
    search_req = (b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
    hit = json.loads(post(port, b"/api/search", json.dumps({"parts": [{"modality": "image", "data": base64.b64encode(
        (ASSETS / "dog.JPEG").read_bytes()).decode()}], "modality": "image", "k": 1}).encode())[2])
    file_url = hit["results"][0]["file_url"].encode()
    for _ in range(5):
        _hang_up(port, (b"GET " + file_url + b" HTTP/1.1\r\nHost: localhost\r\n\r\n") * 30)  # answers unread
        _hang_up(port, b"GET " + file_url.replace(b"file", b"thumb") + b" HTTP/1.1\r\nHost: localhost\r\n\r\n" * 30)
        _hang_up(port, search_req + body)  # gone before the answer
        _hang_up(port, search_req + body[:5], wait=0.1)  # gone in the middle of the body
        _hang_up(port, b"GET /api/hea")  # gone in the middle of the head
        _hang_up(port, b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999\r\n\r\n")
    time.sleep(1.0)
    assert get(port, b"/api/health")[0] == 200
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_cli_flags_reach_the_server(cli_server):
    port, _ = cli_server
    assert get(port, b"/api/health", host=b"search.example")[0] == 200  # --allow-host
    assert get(port, b"/api/health", host=b"evil.example")[0] == 400
    s = socket.create_connection(("127.0.0.1", port))  # --idle-timeout 1
    t0 = time.perf_counter()
    s.settimeout(10)
    assert s.recv(10) == b""
    assert 0.8 < time.perf_counter() - t0 < 5
    s.close()


def test_cli_rejects_non_positive_limits():
    result = subprocess.run([sys.executable, "-m", "onepeace", "serve", "nowhere", "--idle-timeout", "0"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2 and "--idle-timeout must be positive" in result.stderr

"""Released checkpoints by name, against a real HTTP server on localhost serving a fixture checkpoint:
a full download, a connection dropped halfway and resumed, a corrupted body, a refused connection."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

import onepeace
from onepeace import hub

from conftest import TINY_CKPT, require


class CheckpointServer(http.server.ThreadingHTTPServer):
    """Serves `body` at any path, honouring Range requests. mode: "ok"; "drop-once" (the first
    response sends half the body and closes the connection); "corrupt" (one byte flipped)."""

    def __init__(self, body: bytes, mode: str = "ok"):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.body, self.mode, self.requests = body, mode, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/one-peace.pt"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server: CheckpointServer = self.server
        body = server.body
        if server.mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        start = 0
        range_header = self.headers.get("Range")
        server.requests.append(range_header)
        if range_header:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if server.mode == "drop-once" and len(server.requests) == 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops halfway
            return
        self.wfile.write(payload)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def serve(tmp_path, monkeypatch):
    """Start a server in `mode` and point a checkpoint entry "tiny" at it; the cache is tmp_path."""
    monkeypatch.setenv("ONEPEACE_CACHE", str(tmp_path / "cache"))
    servers = []

    def start(mode: str = "ok", sha256: str | None = None) -> CheckpointServer:
        server = CheckpointServer(require(TINY_CKPT).read_bytes(), mode)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        entry = dataclasses.replace(hub.PRETRAINED["one-peace"], name="tiny", url=server.url, sha256=sha256)
        monkeypatch.setitem(hub.PRETRAINED, "tiny", entry)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _cached_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_table_lists_every_released_checkpoint():
    names = [c.name for c in onepeace.list_pretrained()]
    for name in ("one-peace", "one-peace-vision", "refcocog", "vqa", "nlvr2", "vggsound", "fsd50k"):
        assert name in names
    assert all(c.url.startswith("https://") and c.modalities and c.task for c in onepeace.list_pretrained())
    with pytest.raises(KeyError, match="known: one-peace"):
        hub.get_pretrained("one-piece")


def test_full_download_converts_once_and_loads_by_name(serve, tmp_path):
    server = serve("ok")
    model = onepeace.load("tiny")
    reference = onepeace.load(TINY_CKPT)
    with torch.inference_mode():
        tokens = torch.tensor([[10, 20, 30, 2]])
        ours, theirs = model(text=tokens).embeddings["text"], reference(text=tokens).embeddings["text"]
    err = float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-6)).max())
    print("max relative error, loaded by name vs from the file:", err)
    assert err < 1e-5  # same weights; the converted folder's tensors may take another GEMM path
    assert _cached_files(tmp_path) == ["converted", "tiny.pt", "tiny.pt.sha256"]
    recorded = (tmp_path / "cache" / "checkpoints" / "tiny.pt.sha256").read_text().strip()
    assert recorded == hashlib.sha256(TINY_CKPT.read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "checkpoints" / "converted" / "tiny" / "model.safetensors").exists()
    # a second load reads the cache: no request reaches the server
    onepeace.load("tiny")
    assert server.requests == [None]


def test_dropped_connection_resumes_with_a_range_request(serve, tmp_path):
    server = serve("drop-once")
    with pytest.raises(hub.DownloadError, match="resume|Offline"):
        hub.download("tiny", progress=False)
    part = tmp_path / "cache" / "checkpoints" / "tiny.pt.part"
    assert _cached_files(tmp_path) == ["tiny.pt.part"]  # nothing that looks complete
    half = part.stat().st_size
    assert 0 < half < len(server.body)
    path = hub.download("tiny", progress=False)
    assert server.requests == [None, f"bytes={half}-"]
    assert path.read_bytes() == server.body
    assert _cached_files(tmp_path) == ["tiny.pt", "tiny.pt.sha256"]


def test_corrupted_body_fails_its_check_and_leaves_nothing(serve, tmp_path):
    good = hashlib.sha256(require(TINY_CKPT).read_bytes()).hexdigest()
    serve("corrupt", sha256=good)
    with pytest.raises(hub.DownloadError, match="failed its check"):
        hub.download("tiny", progress=False)
    assert _cached_files(tmp_path) == []


def test_recorded_hash_catches_a_file_changed_later(serve, tmp_path):
    serve("ok")
    path = hub.download("tiny", progress=False)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(hub.DownloadError, match="does not match its recorded sha256"):
        hub.download("tiny", progress=False)


def test_refused_connection_names_the_url_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEPEACE_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/one-peace.pt"
    monkeypatch.setitem(hub.PRETRAINED, "tiny", dataclasses.replace(hub.PRETRAINED["one-peace"], name="tiny", url=url))
    with pytest.raises(hub.DownloadError) as info:
        onepeace.load("tiny")
    message = str(info.value)
    print(message)
    assert url in message and str(tmp_path / "cache" / "checkpoints" / "tiny.pt") in message


def test_vision_codebase_checkpoints_are_listed_but_refused():
    with pytest.raises(ValueError, match="does not load"):
        hub.resolve("coco-detection")


def test_cli_download_and_pretrained(serve, tmp_path, capsys):
    from onepeace.cli import main

    serve("ok")
    assert main(["download", "tiny", "-q"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "cache" / "checkpoints" / "converted" / "tiny")
    assert (Path(out) / "config.json").exists()
    assert main(["pretrained"]) == 0
    listing = capsys.readouterr().out
    assert "one-peace " in listing and "refcocog" in listing
    assert main(["download", "no-such-model", "-q"]) == 2
    assert "known: one-peace" in capsys.readouterr().err

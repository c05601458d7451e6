"""`onepeace serve`: an HTTP JSON API and a web page over an index (standard library HTTP server).

    GET  /                       the search page (text, image upload, audio upload or recording, weights)
    GET  /api/health             {"status": "ok", "items": n, "model_id": ...}
    GET  /api/stats              counts per modality, FAISS choice, model, root
    POST /api/search             {"parts": [part, ...], "modality": MODALITY|null, "k": 10} -> {"results": [...]}
    POST /api/embed              {"parts": [part, ...]} -> {"embeddings": [[...], ...], "composed": [...]}
    POST /api/zero-shot          {"labels": ["dog", "siren"] | "dog,siren", "parts": [one part], "k": 5}
                                 -> {"modality": M, "results": [{"label", "prob"}, ...] (best first)}
    GET  /api/item/ID/file       the indexed file of item ID (only whole indexed files are served)
    GET  /api/item/ID/thumb      a PNG thumbnail (longest side <= 256) of item ID, an image file

A part is {"modality": "text", "text": "a cow", "weight": 1} (a part given as a string) or
{"modality": M, "data": "<base64 file>", "filename": "cow.flac", "weight": 1} for any modality M of
the model whose file type the upload's first bytes show (SIGNATURES + the registered suffixes);
{"text": "a cow"} is short for one text part. A zero-shot upload may leave "modality" out: the file's
first bytes give it. Uploads are size-limited; a bad request gets a 4xx
JSON {"error": "..."} naming the part, and the server keeps running.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import mimetypes
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from ..index.search import QueryPart, SearchIndex, embed_query
from ..registry import can_embed, embeddable_modalities

PAGE = Path(__file__).with_name("page.html")
DEMO_MODEL = Path("runs/demo/model")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # this machine only; pass 0.0.0.0 deliberately to expose it
    port: int = 8000
    max_upload_bytes: int = 10 * 1024 * 1024  # per uploaded file (decoded)
    max_parts: int = 8
    max_text_chars: int = 2000
    max_k: int = 100
    max_labels: int = 200  # zero-shot labels per request
    classifier_cache: int = 16  # zero-shot classifiers kept (labels embedded once per label set)
    thumb_size: int = 256
    log_requests: bool = False
    # torch threads for the model (requests embed one at a time under a lock). 1 by default: with the
    # demo model on a busy 2-core machine, 2 OpenMP threads gave p50 ~60-700 ms per text query,
    # 1 thread 4 ms (benchmarks/serve_load.py). 0 = torch's default (worth it for big models on idle cores)
    torch_threads: int = 1


# first bytes -> the file's extension; the extension's modality comes from the suffix table of the
# registered modalities (onepeace.data.files.modality_of), so this file names no modality
SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
    (b"BM", ".bmp"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
    (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"),
]
RIFF_SIGNATURES = {b"WAVE": ".wav", b"WEBP": ".webp"}  # RIFF containers: the type is at bytes 8-12
EBML = b"\x1a\x45\xdf\xa3"  # Matroska / WebM (the doctype string follows within the header)


def _container_ext(data: bytes) -> str | None:
    """ISO media (bytes 4-8 "ftyp": .mov for QuickTime's brand, else .mp4) and Matroska/WebM."""
    if data[4:8] == b"ftyp":
        return ".mov" if data[8:12] == b"qt  " else ".mp4"
    if data.startswith(EBML):
        return ".webm" if b"webm" in data[:64] else ".mkv"
    return None


def _modality_of_suffix(ext: str) -> str | None:
    from ..data.files import modality_of

    return modality_of(f"upload{ext}")


def sniff(data: bytes) -> tuple[str, str] | None:
    """(modality, extension) of an uploaded file from its first bytes, or None."""
    ext = RIFF_SIGNATURES.get(data[8:12]) if data[:4] == b"RIFF" else None
    ext = ext or next((e for magic, e in SIGNATURES if data.startswith(magic)), None) or _container_ext(data)
    modality = _modality_of_suffix(ext) if ext else None
    return (modality, ext) if modality else None


def accepted(modality: str) -> str:
    """The upload types recognised for `modality`, e.g. 'PNG, JPG, GIF, BMP, WEBP'."""
    containers = [".mp4", ".mov", ".webm", ".mkv"]  # what _container_ext recognises
    exts = dict.fromkeys([e for _, e in SIGNATURES] + list(RIFF_SIGNATURES.values()) + containers)
    return ", ".join(e[1:].upper() for e in exts if _modality_of_suffix(e) == modality) or "none"


def _is_image_file(path: str | os.PathLike) -> bool:
    """Whether a thumbnail can be drawn: the file's MIME type (from its name) is image/*."""
    return (mimetypes.guess_type(str(path))[0] or "").startswith("image/")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchService:
    """The model + index behind the HTTP handlers (thread-safe: the model runs under a lock)."""

    def __init__(self, index: SearchIndex, model, config: ServeConfig = ServeConfig()):
        self.index, self.model, self.config = index, model, config
        self.model_lock = threading.Lock()
        self.root = Path(index.info["root"]).resolve()
        self.classifiers: dict[tuple, Any] = {}  # (labels, modality) -> ZeroShotClassifier, oldest first

    # ---- parsing ----
    def parse_parts(self, body: dict[str, Any]) -> list[tuple[QueryPart, str | None]]:
        """The request's parts -> [(QueryPart, temp file to delete or None)]. Raises RequestError."""
        raw = body.get("parts")
        if raw is None and isinstance(body.get("text"), str):
            raw = [{"modality": "text", "text": body["text"]}]
        if not isinstance(raw, list) or not raw:
            raise RequestError(400, 'give "parts": a non-empty list of {"modality", "text" or "data", "weight"}')
        if len(raw) > self.config.max_parts:
            raise RequestError(400, f"too many query parts ({len(raw)}; at most {self.config.max_parts})")
        out: list[tuple[QueryPart, str | None]] = []
        try:
            for i, p in enumerate(raw):
                out.append(self._parse_part(i, p))
        except BaseException:
            for _, tmp in out:
                if tmp:
                    os.unlink(tmp)
            raise
        return out

    def _parse_part(self, i: int, p: Any) -> tuple[QueryPart, str | None]:
        if not isinstance(p, dict):
            raise RequestError(400, f"parts[{i}]: expected an object, got {type(p).__name__}")
        modality = p.get("modality")
        weight = p.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not np.isfinite(weight):
            raise RequestError(400, f"parts[{i}].weight: expected a finite number, got {weight!r}")
        if not isinstance(modality, str) or not can_embed(self.model, modality):
            raise RequestError(400, f"parts[{i}].modality: expected one of the model's modalities "
                                    f"{', '.join(map(repr, embeddable_modalities(self.model)))}, got {modality!r}")
        if "text" in p:  # a part given as a string (the text modality's items)
            return self._text_part(i, p.get("text"), modality, float(weight)), None
        return self._upload_part(i, p, modality, float(weight))

    def _text_part(self, i: int, text: Any, modality: str, weight: float) -> QueryPart:
        if not isinstance(text, str) or not text.strip():
            raise RequestError(400, f"parts[{i}]: a text part needs a non-empty \"text\" string")
        if len(text) > self.config.max_text_chars:
            raise RequestError(413, f"parts[{i}]: text of {len(text)} characters (at most {self.config.max_text_chars})")
        return QueryPart(modality, text, weight, f"parts[{i}] ({modality})")

    def _upload_part(self, i: int, p: dict, modality: str, weight: float) -> tuple[QueryPart, str]:
        """A base64 file part, size-limited and type-checked by its first bytes -> (part, its temp file)."""
        name = f"parts[{i}] ({str(p.get('filename') or 'upload')[:200]})"
        data = p.get("data")
        if not isinstance(data, str) or not data:
            raise RequestError(400, f"{name}: a {modality} part needs \"data\", the file as base64")
        if len(data) > self.config.max_upload_bytes * 4 // 3 + 8:
            raise RequestError(413, f"{name}: upload too large (limit {self.config.max_upload_bytes // 1024} KiB)")
        try:
            blob = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{name}: \"data\" is not valid base64") from None
        if len(blob) > self.config.max_upload_bytes:
            raise RequestError(413, f"{name}: upload too large ({len(blob)} bytes; limit "
                                    f"{self.config.max_upload_bytes} bytes)")
        kind = sniff(blob)
        if kind is None or kind[0] != modality:
            seen = f"looks like {kind[0]} ({kind[1]})" if kind else "unrecognised file type"
            raise RequestError(415, f"{name}: not a supported {modality} file ({seen}); accepted: {accepted(modality)}")
        fd, tmp = tempfile.mkstemp(suffix=kind[1], prefix="onepeace-upload-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return QueryPart(modality, tmp, weight, name), tmp

    def _embed(self, parts: list[tuple[QueryPart, str | None]], each: bool = False):
        """Composed (D,) query vector (and each part's own embedding when `each`). Cleans up temp files."""
        from ..data.image import InputError

        try:
            with self.model_lock:
                composed = embed_query(self.model, [q for q, _ in parts])
                singles = [embed_query(self.model, [q]) for q, _ in parts] if each else None
        except (InputError, ValueError) as e:
            msg = str(e)
            for q, tmp in parts:  # name the upload, not our temp file
                if tmp:
                    msg = msg.replace(f"'{tmp}'", q.name).replace(tmp, q.name)
            raise RequestError(422, msg) from None
        finally:
            for _, tmp in parts:
                if tmp:
                    os.unlink(tmp)
        return composed, singles

    # ---- endpoints ----
    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        k = body.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.config.max_k:
            raise RequestError(400, f"k: expected an integer in [1, {self.config.max_k}], got {k!r}")
        modality = body.get("modality") or None
        known = self.index.info.get("modalities", [])
        if modality is not None and modality not in known:
            raise RequestError(400, f"modality: expected one of {', '.join(map(repr, known))} or null, got {modality!r}")
        vector, _ = self._embed(self.parse_parts(body))
        hits = self.index.search(vector, k=k, modality=modality)
        for h in hits:
            h["display_name"] = self._display(h["name"])
            if h["name"] == h["path"]:  # the item is a whole file (not a line of a text file): servable
                h["file_url"] = f"/api/item/{h['id']}/file"
                if _is_image_file(h["path"]):
                    h["thumb_url"] = f"/api/item/{h['id']}/thumb"
        return {"results": hits, "took_ms": (time.perf_counter() - t0) * 1000}

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        composed, singles = self._embed(self.parse_parts(body), each=True)
        return {"dim": int(composed.shape[0]), "composed": composed.tolist(), "embeddings": [s.tolist() for s in singles]}

    def zero_shot(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ranked labels of one uploaded file (or text): the model's zero-shot classifier of the labels."""
        t0 = time.perf_counter()
        labels = self._zero_shot_labels(body.get("labels"))
        k = body.get("k", len(labels))
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RequestError(400, f"k: expected a positive integer, got {k!r}")
        raw = body.get("parts")
        if not isinstance(raw, list) or len(raw) != 1:
            raise RequestError(400, 'give "parts": a list of exactly one part (the file or text to classify)')
        part = raw[0]
        if isinstance(part, dict) and not part.get("modality") and isinstance(part.get("data"), str):
            part = {**part, "modality": self._sniff_base64(part["data"])}
        parts = self.parse_parts({"parts": [part]})
        modality = parts[0][0].modality
        vector, _ = self._embed(parts)
        with self.model_lock:
            classifier = self._classifier(labels, modality)
        probs = classifier(vector[None])  # (1, C) from the (D,) unit-norm embedding
        top = classifier.top_k(probs, k)[0]
        return {"modality": modality, "labels": labels, "took_ms": (time.perf_counter() - t0) * 1000,
                "results": [{"label": label, "prob": p} for label, p in top]}

    def _zero_shot_labels(self, labels: Any) -> list[str]:
        from ..zero_shot import check_labels

        if isinstance(labels, str):
            labels = [x.strip() for x in labels.split(",") if x.strip()]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise RequestError(400, f'labels: expected a list of strings or "a,b,c", got {labels!r}'[:300])
        if len(labels) > self.config.max_labels:
            raise RequestError(413, f"labels: {len(labels)} labels (at most {self.config.max_labels})")
        if any(len(x) > self.config.max_text_chars for x in labels):
            raise RequestError(413, f"labels: a label longer than {self.config.max_text_chars} characters")
        try:
            return check_labels(labels)
        except ValueError as e:
            raise RequestError(400, f"labels: {e}") from None

    @staticmethod
    def _sniff_base64(data: str) -> str | None:
        """The modality of a base64 upload from its first bytes (None: unknown; parse_parts says so)."""
        try:
            head = base64.b64decode(data[:64] if len(data) >= 64 else data, validate=True)
        except (binascii.Error, ValueError):
            return None
        kind = sniff(head)
        return kind[0] if kind else None

    def _classifier(self, labels: list[str], modality: str):
        """The cached classifier of these labels for this modality (built once; call under model_lock)."""
        from ..zero_shot import build_zero_shot_classifier

        key = (tuple(labels), modality)
        if key not in self.classifiers:
            try:
                self.classifiers[key] = build_zero_shot_classifier(self.model, labels, modality=modality)
            except ValueError as e:  # e.g. a label's tokens outside a toy model's vocabulary
                raise RequestError(422, f"labels: {e}") from None
            while len(self.classifiers) > self.config.classifier_cache:
                self.classifiers.pop(next(iter(self.classifiers)))
        return self.classifiers[key]

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "items": sum(self.index.stats()["searchable"].values()),
                "model_id": self.index.info.get("model_id")}

    def item_file(self, item_id: int) -> Path:
        """The file of an indexed whole-file item (not a line of a text file); only files recorded in
        the index, under its root."""
        item = self.index.item(item_id)
        if item is None or item["name"] != item["path"]:
            raise RequestError(404, f"no item with id {item_id} that is a whole file")
        path = Path(item["path"]).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise RequestError(404, f"item {item_id}: file no longer available")
        return path

    def thumbnail(self, item_id: int) -> bytes:
        from ..data.image import load_image

        path = self.item_file(item_id)
        if not _is_image_file(path):
            raise RequestError(404, f"item {item_id} is not an image file")
        image = load_image(path)
        image.thumbnail((self.config.thumb_size, self.config.thumb_size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    def _display(self, name: str) -> str:
        root = str(self.root)
        return name[len(root) + 1:] if name.startswith(root + os.sep) else name


class Handler(BaseHTTPRequestHandler):
    """The routes of the module docstring over `service` (bound by make_handler)."""

    service: SearchService
    page: bytes

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connection
    # headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (~40 ms per request on loopback)
    disable_nagle_algorithm = True
    server_version = "onepeace"

    def log_message(self, format: str, *args: Any) -> None:
        if self.service.config.log_requests:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if cache:
            self.send_header("Cache-Control", "max-age=3600")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _guard(self, fn) -> None:
        try:
            fn()
        except RequestError as e:
            self._json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug, not the client's fault: report it and keep serving
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _item_id(self, raw: str) -> int:
        if not raw.isdigit():
            raise RequestError(404, f"bad item id {raw!r}")
        return int(raw)

    def do_GET(self) -> None:
        self._guard(self._get)

    do_HEAD = do_GET

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.page, "text/html; charset=utf-8")
        elif path == "/api/health":
            self._json(200, self.service.health())
        elif path == "/api/stats":
            self._json(200, self.service.index.stats())
        elif path.startswith("/api/item/"):
            pieces = path.split("/")  # ['', 'api', 'item', ID, 'file' | 'thumb']
            if len(pieces) != 5 or pieces[4] not in ("file", "thumb"):
                raise RequestError(404, f"no such resource {path}")
            item_id = self._item_id(pieces[3])
            if pieces[4] == "thumb":
                self._send(200, self.service.thumbnail(item_id), "image/png", cache=True)
            else:
                f = self.service.item_file(item_id)
                ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                self._send(200, f.read_bytes(), ctype, cache=True)
        else:
            raise RequestError(404, f"no such resource {path}")

    def do_POST(self) -> None:
        self._guard(self._post)

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        routes = {"/api/search": self.service.search, "/api/embed": self.service.embed,
                  "/api/zero-shot": self.service.zero_shot}
        if path not in routes:
            known = path in ("/", "/index.html", "/api/health", "/api/stats")
            raise RequestError(405 if known else 404,
                               f"no POST endpoint {path} (POST /api/search, /api/embed or /api/zero-shot)")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        limit = self.service.config.max_parts * (self.service.config.max_upload_bytes * 4 // 3 + 4096)
        if int(length) > limit:
            self.close_connection = True  # the body stays unread
            raise RequestError(413, f"request body of {int(length)} bytes is too large (limit {limit})")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        self._json(200, routes[path](body))


def make_handler(service: SearchService) -> type[Handler]:
    """A Handler class bound to `service` (http.server makes one handler instance per request)."""
    return type("BoundHandler", (Handler,), {"service": service, "page": PAGE.read_bytes()})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog (socketserver's default 5 refuses bursts of new clients)


def make_server(index: SearchIndex, model, config: ServeConfig = ServeConfig()) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) server; port 0 picks a free port (server.server_address)."""
    server = _Server((config.host, config.port), make_handler(SearchService(index, model, config)))
    return server


def demo_index(model_path: Path = DEMO_MODEL, progress: bool = True) -> Path:
    """The default of `onepeace serve` with no index: the demo data indexed with the demo model
    (built on first use under the cache, updated incrementally afterwards)."""
    import onepeace
    from ..demo.data import default_root
    from ..index.build import build_index

    if not (model_path / "config.json").exists():
        raise FileNotFoundError(f"no demo model at {model_path}: run `onepeace demo` first (it trains one), "
                                "or pass an index built with `onepeace index`")
    data = next((d for d in (default_root(False), default_root(True)) if (d / "manifest_info.json").exists()), None)
    if data is None:
        raise FileNotFoundError(f"no demo data at {default_root(False)}: run `onepeace demo` first")
    out = data.parent.parent / "index" / f"demo-{data.name}"
    model = onepeace.load(model_path)
    print(f"indexing the demo data {data} into {out} (only new or changed files)", file=sys.stderr)
    report = build_index(data, out, model, model_path, progress=progress)
    print(f"{out}: {report.summary()}", file=sys.stderr)
    return out


def serve(index_path: str | os.PathLike | None = None, model_path: str | os.PathLike | None = None,
          config: ServeConfig = ServeConfig(), device: str = "cpu", bpe_dir: str | None = None) -> int:
    """Serve until interrupted (Ctrl-C). No index: the demo (see :func:`demo_index`)."""
    import onepeace

    if index_path is None:
        index_path = demo_index(Path(model_path) if model_path else DEMO_MODEL)
    index = SearchIndex(index_path)
    model = onepeace.load(index.query_model_path(model_path), device=device)
    if bpe_dir:
        model.tokenizer = onepeace.get_tokenizer(bpe_dir)
    if config.torch_threads > 0:
        import torch

        torch.set_num_threads(config.torch_threads)
    server = make_server(index, model, config)
    host, port = server.server_address[:2]
    stats = index.stats()
    print(f"serving {index_path} ({', '.join(f'{n} {m}' for m, n in stats['searchable'].items())}) "
          f"on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        index.close()
    return 0

"""`onepeace serve`: an HTTP JSON API and a web page over an index (Starlette under uvicorn; the
routes are in :mod:`onepeace.serve.app`, the OpenAPI description at GET /openapi.json).

    GET  /                       the search page (text, image upload, audio upload or recording, weights)
    GET  /api/health             {"status": "ok", "items": n, "model_id": ...}
    GET  /api/stats              counts per modality, FAISS choice, model, root
    POST /api/search             {"parts": [part, ...], "modality": MODALITY|null, "k": 10} -> {"results": [...]}
    POST /api/embed              {"parts": [part, ...]} -> {"embeddings": [[...], ...], "composed": [...]}
    POST /api/zero-shot          {"labels": ["dog", "siren"] | "dog,siren", "parts": [one part], "k": 5}
                                 -> {"modality": M, "results": [{"label", "prob"}, ...] (best first)}
    GET  /api/item/ID/file       the indexed file of item ID (only whole indexed files are served)
    GET  /api/item/ID/thumb      a PNG thumbnail (longest side <= 256) of item ID, an image file
    GET  /openapi.json           the API described as OpenAPI 3.1

A part is {"modality": "text", "text": "a cow", "weight": 1} (a part given as a string) or
{"modality": M, "data": "<base64 file>", "filename": "cow.flac", "weight": 1} for any modality M of
the model whose file type the upload's first bytes show (SIGNATURES + the registered suffixes);
{"text": "a cow"} is short for one text part. A zero-shot upload may leave "modality" out: the file's
first bytes give it. Every limit is a ServeConfig field (and a flag of `onepeace serve`); a bad
request gets a 4xx JSON {"error": "..."} naming the part, and the server keeps running.

Threads: the event loop only reads bodies and writes answers; a request's parsing, decoding and
tokenizing run in a worker thread of the loop's pool, and every forward pass runs on the model's
own thread (:class:`~onepeace.serve.worker.ModelWorker`), which batches concurrent queries.
"""
from __future__ import annotations

import base64
import binascii
import io
import mimetypes
import os
import sys
import threading
import tempfile
import time
from concurrent.futures import CancelledError, TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..index.search import QueryPart, SearchIndex
from ..registry import can_embed, compose_path, embeddable_modalities
from .worker import ModelWorker

PAGE = Path(__file__).with_name("page.html")
DEMO_MODEL = Path("runs/demo/model")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # Host names served by default (DNS rebinding guard)
_thread_state = threading.local()  # per request thread: whether its OpenMP threads were set
MAX_ITEM_ID = 2 ** 63 - 1  # SQLite's INTEGER range: larger ids are not items (404, not an overflow)


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
    # torch (and FAISS) threads of the model thread and of each request thread. 1 by default: with the
    # demo model on a busy 2-core machine, 2 OpenMP threads gave p50 ~60-700 ms per text query,
    # 1 thread 4 ms (benchmarks/serve_load.py). 0 = torch's default (worth it for big models on idle cores)
    torch_threads: int = 1
    # Host headers served besides LOCAL_HOSTS (and the bound address): a web page the user visits
    # cannot reach the API through a DNS name of its own ("*" serves any Host: only behind a proxy)
    allow_hosts: tuple[str, ...] = ()
    # seconds a connection may sit without sending a complete request head (idle keep-alive
    # connections, silent ones, and heads sent byte by byte) before it is closed
    idle_timeout: float = 5.0
    # seconds for a request body to arrive (else 408) and for an answer to be ready (else 503)
    request_timeout: float = 60.0
    # search / embed / zero-shot requests in progress at once (read, queued or on the model);
    # beyond it: 503 with Retry-After. Bounds the memory and the queueing delay of model work
    max_model_requests: int = 64
    # requests with a body over large_body_bytes (uploads) read and decoded at once; beyond: 503
    max_uploads: int = 2
    large_body_bytes: int = 1024 * 1024
    max_batch: int = 32  # items per batched model call (concurrent queries of one modality)
    max_weight: float = 1e6  # |weight| of a query part (weights are relative: larger only overflows)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: max_parts base64 uploads plus their JSON."""
        return self.max_parts * (self.max_upload_bytes * 4 // 3 + 4096)


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
    """A request the server refuses: `status` and a message naming the bad input (sent as JSON)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def parse_item_id(raw: str) -> int:
    """An item id from the URL: ASCII digits below 2^63 (anything else names no item: 404)."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or int(raw) > MAX_ITEM_ID:
        raise RequestError(404, f"bad item id {raw[:40]!r} (expected a number below 2^63)")
    return int(raw)


def compose(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """(D,) float32 sum_i w_i e_i / |sum_i w_i e_i| of unit vectors e_i (summed in float64: the
    weights are bounded by ServeConfig.max_weight, so the sum is finite). ValueError when they cancel."""
    total = sum(w * v.astype(np.float64) for v, w in zip(vectors, weights))
    norm = float(np.linalg.norm(total))
    if not norm >= 1e-6:  # also NaN
        raise ValueError("the query's weighted parts cancel out (zero vector); change the weights")
    return (total / norm).astype(np.float32)


class SearchService:
    """The model + index behind the HTTP routes. Thread-safe: methods run in the request threads and
    hand every forward pass to the model thread (`worker`), which batches concurrent queries."""

    def __init__(self, index: SearchIndex, model, config: ServeConfig = ServeConfig()):
        self.index, self.model, self.config = index, model, config
        self.worker = ModelWorker(model, config.max_batch, config.torch_threads)
        self.root = Path(index.info["root"]).resolve()
        self.classifiers: dict[tuple, Any] = {}  # (labels, modality) -> ZeroShotClassifier, oldest first
        self._classifiers_lock = threading.Lock()
        self._transforms: dict[str, Any] = {}  # modality -> its preprocessing (raw item -> tensor)
        self._transforms_lock = threading.Lock()

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
            _remove_temp(out)
            raise
        return out

    def _parse_part(self, i: int, p: Any) -> tuple[QueryPart, str | None]:
        if not isinstance(p, dict):
            raise RequestError(400, f"parts[{i}]: expected an object, got {type(p).__name__}")
        modality = p.get("modality")
        weight = p.get("weight", 1.0)
        limit = self.config.max_weight
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not np.isfinite(weight)
                or abs(weight) > limit):
            raise RequestError(400, f"parts[{i}].weight: expected a finite number of magnitude at most {limit:g}, "
                                    f"got {str(weight)[:40]}")
        if not isinstance(modality, str) or not can_embed(self.model, modality):
            raise RequestError(400, f"parts[{i}].modality: expected one of the model's modalities "
                                    f"{', '.join(map(repr, embeddable_modalities(self.model)))}, got {str(modality)[:40]!r}")
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

    # ---- model work ----
    def _transform(self, modality: str):
        from ..inference import modality_transform

        found = self._transforms.get(modality)
        if found is None:
            with self._transforms_lock:  # built once: 16 first queries at once would load 16 tokenizers
                found = self._transforms.get(modality)
                if found is None:
                    found = self._transforms[modality] = modality_transform(self.model, modality)
        return found

    def _submit(self, part: QueryPart):
        """Prepare one part here (decode, tokenize: in this request's thread, beside the model) and
        queue its forward pass -> a Future of its (1, D) embedding."""
        if compose_path(self.model, part.modality) is not None:  # e.g. a video file on a model without video
            from ..inference import encode_items

            return self.worker.call(lambda: encode_items(self.model, part.modality, [part.value]).float().cpu().numpy())
        return self.worker.embed(part.modality, [self._transform(part.modality)(part.value)])

    def _wait(self, future):
        """A model future's result within the request timeout (else 503: the model is saturated)."""
        try:
            return future.result(timeout=self.config.request_timeout)
        except (FutureTimeout, CancelledError):
            future.cancel()
            raise RequestError(503, f"the model is busy: no answer within {self.config.request_timeout:g} s; "
                                    "retry later", {"Retry-After": str(self.retry_after())}) from None

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one model call per queued batch, at least 1."""
        return int(min(60, max(1, np.ceil(self.worker.seconds_per_call * 4))))

    def _embed(self, parts: list[tuple[QueryPart, str | None]], each: bool = False):
        """Composed (D,) query vector (and each part's own vector when `each`). Cleans up temp files."""
        from ..data.image import InputError

        def named(q: QueryPart, step, *args):  # an unreadable input: 422 naming the part, not our temp file
            try:
                return step(*args)
            except (InputError, ValueError, OSError) as e:
                msg = str(e)
                for other, tmp in parts:
                    if tmp:
                        msg = msg.replace(f"'{tmp}'", other.name).replace(tmp, other.name)
                raise RequestError(422, msg if q.name in msg else f"{q.name}: {msg}") from None

        try:  # every part is queued before the first wait: the parts of one request share a batch
            futures = [named(q, self._submit, q) for q, _ in parts]
            vectors = [named(q, self._wait, f)[0] for (q, _), f in zip(parts, futures)]
        finally:
            _remove_temp(parts)
        for (q, _), v in zip(parts, vectors):
            if not np.isfinite(v).all():
                raise RequestError(422, f"{q.name}: the model gave a non-finite embedding (NaN or inf) for this input")
        try:
            composed = compose(vectors, [q.weight for q, _ in parts])
            singles = [compose([v], [q.weight]) for (q, _), v in zip(parts, vectors)] if each else None
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        return composed, singles

    def _thread_setup(self) -> None:
        """OpenMP's thread count is per calling thread: give this request thread (preprocessing with
        torch, the FAISS search) the configured count, once. With the default (the core count) each
        pool thread keeps its own spinning OpenMP team: ~2 ms more per query on a busy 2-core machine."""
        n = self.config.torch_threads
        if n > 0 and not getattr(_thread_state, "limited", False):
            import faiss
            import torch

            torch.set_num_threads(n)
            faiss.omp_set_num_threads(n)
            _thread_state.limited = True

    # ---- endpoints ----
    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        self._thread_setup()
        t0 = time.perf_counter()
        k = body.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.config.max_k:
            raise RequestError(400, f"k: expected an integer in [1, {self.config.max_k}], got {str(k)[:40]}")
        modality = body.get("modality") or None
        known = self.index.info.get("modalities", [])
        if modality is not None and modality not in known:
            raise RequestError(400, f"modality: expected one of {', '.join(map(repr, known))} or null, "
                                    f"got {str(modality)[:40]!r}")
        vector, _ = self._embed(self.parse_parts(body))
        # a vector that is not finite (an index from before NaN checks) has no meaningful score
        hits = [h for h in self.index.search(vector, k=k, modality=modality) if np.isfinite(h["score"])]
        for h in hits:
            h["display_name"] = self._display(h["name"])
            if h["name"] == h["path"]:  # the item is a whole file (not a line of a text file): servable
                h["file_url"] = f"/api/item/{h['id']}/file"
                if _is_image_file(h["path"]):
                    h["thumb_url"] = f"/api/item/{h['id']}/thumb"
        return {"results": hits, "took_ms": (time.perf_counter() - t0) * 1000}

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        self._thread_setup()
        composed, singles = self._embed(self.parse_parts(body), each=True)
        return {"dim": int(composed.shape[0]), "composed": composed.tolist(), "embeddings": [s.tolist() for s in singles]}

    def zero_shot(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ranked labels of one uploaded file (or text): the model's zero-shot classifier of the labels."""
        self._thread_setup()
        t0 = time.perf_counter()
        labels = self._zero_shot_labels(body.get("labels"))
        k = body.get("k", len(labels))
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RequestError(400, f"k: expected a positive integer, got {str(k)[:40]}")
        raw = body.get("parts")
        if not isinstance(raw, list) or len(raw) != 1:
            raise RequestError(400, 'give "parts": a list of exactly one part (the file or text to classify)')
        part = raw[0]
        if isinstance(part, dict) and not part.get("modality") and isinstance(part.get("data"), str):
            part = {**part, "modality": self._sniff_base64(part["data"])}
        parts = self.parse_parts({"parts": [part]})
        modality = parts[0][0].modality
        vector, _ = self._embed(parts)
        classifier = self._classifier(labels, modality)
        probs = classifier(vector[None])  # (1, C) from the (D,) unit-norm embedding
        if not bool(np.isfinite(np.asarray(probs)).all()):
            raise RequestError(422, "labels: the classifier gave non-finite probabilities for this input")
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
        """The cached classifier of these labels for this modality (its label embeddings computed once,
        on the model thread)."""
        from ..zero_shot import build_zero_shot_classifier

        key = (tuple(labels), modality)
        with self._classifiers_lock:
            found = self.classifiers.get(key)
        if found is not None:
            return found
        try:
            built = self._wait(self.worker.call(lambda: build_zero_shot_classifier(self.model, labels, modality=modality)))
        except ValueError as e:  # e.g. a label's tokens outside a toy model's vocabulary
            raise RequestError(422, f"labels: {e}") from None
        with self._classifiers_lock:
            self.classifiers[key] = built
            while len(self.classifiers) > self.config.classifier_cache:
                self.classifiers.pop(next(iter(self.classifiers)))
        return built

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


def _remove_temp(parts: list[tuple[QueryPart, str | None]]) -> None:
    for _, tmp in parts:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


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

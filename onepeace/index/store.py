"""An index folder: SQLite metadata, embedding shards, and one FAISS index per modality.

Layout of INDEX/::

    meta.sqlite        info(key, value)       root folder, model path + id, dim, FAISS choice per modality
                       files(path, ...)       one row per file seen: modality, size, mtime_ns, model_id,
                                              status ('ok' | 'failed'), error, rank that embedded it
                       items(id, ...)         one row per embedded item (a file, or one line of a text
                                              file): file, name, modality, text, shard, row
    shards/*.npy       (n, D) float32 L2-normalised embeddings, one file per embedded chunk, written
                       atomically (tmp + os.replace) BEFORE the rows naming them are committed, so a
                       killed run leaves at most an unreferenced shard (deleted on the next run)
    faiss/{modality}.faiss   IndexIDMap(IndexFlatIP) (exact inner product) below `ivf_threshold`
                       vectors, IndexIVFFlat (inner product) above; FAISS ids are items.id

SQLite runs in WAL mode with a long busy timeout so that the ranks of a torchrun job can commit
their chunks to the same database.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..registry import file_modalities

# the modalities files on disk can hold (those that registered suffixes), e.g. image, audio, text;
# a snapshot for build.py / search.py, taken after `import onepeace` registered the bundled ones
MODALITIES = file_modalities()
DB_FILE = "meta.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, modality TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, model_id TEXT NOT NULL, status TEXT NOT NULL, error TEXT, rank INTEGER);
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, file TEXT NOT NULL, name TEXT NOT NULL,
    modality TEXT NOT NULL, text TEXT, shard TEXT NOT NULL, row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS items_file ON items(file);
CREATE INDEX IF NOT EXISTS items_shard ON items(shard);
"""


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("indexing and search need FAISS: pip install 'onepeace[serve]' (or faiss-cpu)") from None
    return faiss


def model_id(path: str | os.PathLike) -> str:
    """A short content id of a model file or folder: a hash of each file's size and first/last MiB
    (cheap for a multi-GB checkpoint; changes when the weights are replaced, not when the model is
    moved or renamed, so a moved model does not re-embed a collection)."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha1()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.suffix}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return f"sha1-{h.hexdigest()[:12]}"


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class FaissChoice:
    """What `build_faiss` chose for one modality (recorded in info['faiss'])."""

    kind: str  # "flat-ip" (exact) or "ivf-flat-ip"
    n: int
    nlist: int = 0
    nprobe: int = 0


def choose_faiss(n: int, ivf_threshold: int, nlist: int | None = None, nprobe: int | None = None) -> FaissChoice:
    """Exact inner product up to `ivf_threshold` vectors; above it an IVF with ~4 sqrt(n) lists
    (at least 39 training points per list, FAISS's minimum) probing 1/8 of them (at least 8)."""
    if n <= ivf_threshold or n < 2 * 39:
        return FaissChoice("flat-ip", n)
    lists = nlist or max(2, min(int(4 * math.sqrt(n)), n // 39))
    probe = nprobe or min(lists, max(8, lists // 8))
    return FaissChoice("ivf-flat-ip", n, lists, probe)


class IndexStore:
    """The metadata database and shards of one index folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        if not (self.path / DB_FILE).exists():
            if not create:
                raise FileNotFoundError(f"{self.path} is not an onepeace index (no {DB_FILE}); "
                                        "build one with `onepeace index DIR --out INDEX`")
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
        self.shard_dir = self.path / "shards"
        self.faiss_dir = self.path / "faiss"
        self._lock = threading.Lock()  # one connection shared by the server's threads
        self.db = sqlite3.connect(self.path / DB_FILE, timeout=120, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout=120000")
        # Switching to WAL needs an exclusive lock, and SQLite answers "database is locked" at once
        # (no busy wait) when another rank's connection is setting up the same new file: retry.
        for attempt in range(200):
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 199:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    # ---- info ----
    def info(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.query("SELECT key, value FROM info")}

    def set_info(self, **values: Any) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    # ---- files and items ----
    def files(self) -> dict[str, tuple[int, int, str, str]]:
        """path -> (size, mtime_ns, model_id, status)."""
        return {p: (s, t, m, st) for p, s, t, m, st in self.query("SELECT path, size, mtime_ns, model_id, status FROM files")}

    def commit_chunk(self, array: np.ndarray, items: Sequence[tuple[str, str, str, str | None]],
                     files: Sequence[tuple[str, str, int, int, str, str, str | None]], rank: int) -> str | None:
        """Write a chunk: `array` (n, D) as a new shard (atomically), then in ONE transaction replace
        the items of `files` by `items` [(file, name, modality, text)] (row i = array[i]) and upsert
        the files [(path, modality, size, mtime_ns, model_id, status, error)]. Returns the shard name."""
        shard = None
        if len(items):
            shard = f"r{rank:03d}-{uuid.uuid4().hex[:12]}.npy"
            atomic_save_npy(self.shard_dir / shard, np.ascontiguousarray(array, dtype=np.float32))
        with self.transaction() as db:
            db.executemany("DELETE FROM items WHERE file = ?", [(f[0],) for f in files])
            db.executemany("INSERT INTO items (file, name, modality, text, shard, row) VALUES (?, ?, ?, ?, ?, ?)",
                           [(*it, shard, row) for row, it in enumerate(items)])
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(*f, rank) for f in files])
        return shard

    def remove_files(self, paths: Sequence[str]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM items WHERE file = ?", [(p,) for p in paths])
            db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])

    def collect_garbage(self, prefix: str = "") -> int:
        """Delete shards (named `prefix`*) that no item refers to (left by a killed run, or whose
        items were all re-embedded) and stale temporary files. Returns how many were deleted."""
        used = {s for (s,) in self.query("SELECT DISTINCT shard FROM items")}
        n = 0
        for f in self.shard_dir.iterdir():
            name = f.name.lstrip(".")
            if name.startswith(prefix) and f.name not in used:
                f.unlink(missing_ok=True)
                n += 1
        return n

    def item_rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        rows = self.query(f"SELECT id, file, name, modality, text FROM items WHERE id IN ({','.join('?' * len(ids))})",
                          [int(i) for i in ids])
        return {r[0]: {"id": r[0], "path": r[1], "name": r[2], "modality": r[3], "text": r[4]} for r in rows}

    def counts(self) -> dict[str, Any]:
        items = dict(self.query("SELECT modality, COUNT(*) FROM items GROUP BY modality"))
        files = dict(self.query("SELECT status, COUNT(*) FROM files GROUP BY status"))
        # the kinds with items, in registration order (an index of photos lists no empty video count)
        kinds = [m for m in dict.fromkeys([*file_modalities(), *items]) if m in items]
        return {"items": {m: items[m] for m in kinds}, "files_ok": files.get("ok", 0),
                "files_failed": files.get("failed", 0)}

    def failed(self) -> list[tuple[str, str]]:
        return self.query("SELECT path, error FROM files WHERE status = 'failed' ORDER BY path")

    # ---- FAISS ----
    def build_faiss(self, model_id: str, ivf_threshold: int, nlist: int | None = None,
                    nprobe: int | None = None) -> dict[str, FaissChoice]:
        """Gather every current item's vector from the shards and (re)write one FAISS index per
        modality; items of files embedded with another model are left out. Records the choice."""
        faiss = require_faiss()
        self.faiss_dir.mkdir(exist_ok=True)
        rows = self.query("SELECT i.id, i.modality, i.shard, i.row FROM items i JOIN files f ON f.path = i.file "
                          "WHERE f.model_id = ? ORDER BY i.shard, i.row", (model_id,))
        by_modality: dict[str, tuple[list[int], list[np.ndarray]]] = {m: ([], []) for m in file_modalities()}
        shard_cache: dict[str, np.ndarray] = {}
        for item_id, modality, shard, row in rows:
            if shard not in shard_cache:
                shard_cache.clear()  # rows are sorted by shard: one shard in memory at a time
                shard_cache[shard] = np.load(self.shard_dir / shard, mmap_mode="r")
            ids, vecs = by_modality.setdefault(modality, ([], []))  # also kinds that registered no suffixes
            ids.append(item_id)
            vecs.append(np.asarray(shard_cache[shard][row]))
        choices = {}
        for modality, (ids, vecs) in by_modality.items():
            target = self.faiss_dir / f"{modality}.faiss"
            if not ids:
                target.unlink(missing_ok=True)
                continue
            x = np.ascontiguousarray(np.stack(vecs), dtype=np.float32)  # (n, D)
            choice = choose_faiss(len(ids), ivf_threshold, nlist, nprobe)
            if choice.kind == "flat-ip":
                index = faiss.IndexIDMap(faiss.IndexFlatIP(x.shape[1]))
            else:
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], choice.nlist,
                                           faiss.METRIC_INNER_PRODUCT)
                index.train(x)
                index.nprobe = choice.nprobe
            index.add_with_ids(x, np.asarray(ids, dtype=np.int64))
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, target)
            choices[modality] = choice
        self.set_info(faiss={m: asdict(c) for m, c in choices.items()},
                      merged={"model_id": model_id, "ivf_threshold": ivf_threshold, "nlist": nlist, "nprobe": nprobe})
        return choices

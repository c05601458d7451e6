"""An index folder: SQLite metadata, embedding shards, and one FAISS index per modality.

Layout of INDEX/::

    meta.sqlite        info(key, value)       root folder, model path + id, dim, FAISS choice per modality
                       files(path, ...)       one row per file seen: modality, size, mtime_ns, model_id,
                                              status ('ok' | 'failed'), error, rank that embedded it
                       items(id, ...)         one row per embedded item (a file, or one line of a text
                                              file): file, name, modality, text, shard, row
                       shards(name, ...)      one row per shard: rows, bytes, sha256 (recorded at commit)
    shards/*.npy       (n, D) float32 L2-normalised embeddings, one file per embedded chunk, written
                       atomically (tmp + os.replace) BEFORE the rows naming them are committed, so a
                       killed run leaves at most an unreferenced shard (deleted on the next run)
    faiss/{modality}.faiss   IndexIDMap(IndexFlatIP) (exact inner product) below `ivf_threshold`
                       vectors, IndexIVFFlat (inner product) above; FAISS ids are items.id; its size,
                       sha256 and vector count are recorded in info['faiss_files']

The folder is a transaction log that heals: every `onepeace index` start checks each shard the rows
name against its record (there, same size, same sha256, enough rows, finite) and re-embeds the files
a bad shard held; every merge checks each FAISS file against its record and the current item count
and rebuilds a missing, corrupt or stale one; a search that finds a FAISS file bad searches the
shards exactly instead (with a warning). Writers take the folder's lock (:mod:`.lock`).

SQLite runs in WAL mode with a long busy timeout so that the ranks of a torchrun job can commit
their chunks to the same database.
"""
from __future__ import annotations

import hashlib
import io
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
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS items_file ON items(file);
CREATE INDEX IF NOT EXISTS items_shard ON items(shard);
"""


class IndexCorruptError(ValueError):
    """meta.sqlite is not a readable SQLite database (or fails its integrity check)."""


def corrupt_db_error(db_path: Path, why: object) -> IndexCorruptError:
    return IndexCorruptError(
        f"{db_path} is corrupt ({why}): the index metadata cannot be read. Rebuild the index: move or delete "
        f"{db_path.parent} and run `onepeace index FOLDER --out {db_path.parent}` again (the files are re-embedded)")


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


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 4 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


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
        db_path = self.path / DB_FILE
        if not db_path.exists():
            if not create:
                raise FileNotFoundError(f"{self.path} is not an onepeace index (no {DB_FILE}); "
                                        "build one with `onepeace index DIR --out INDEX`")
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
        self.shard_dir = self.path / "shards"
        self.shard_dir.mkdir(exist_ok=True)
        self.faiss_dir = self.path / "faiss"
        self._lock = threading.Lock()  # one connection shared by the server's threads
        self.db = sqlite3.connect(db_path, timeout=120, check_same_thread=False, isolation_level=None)
        # Switching to WAL needs an exclusive lock, and SQLite answers "database is locked" at once
        # (no busy wait) when another rank's connection is setting up the same new file: retry.
        # Any other DatabaseError ("file is not a database", "malformed") is a corrupt file.
        for attempt in range(200):
            try:
                self.db.execute("PRAGMA busy_timeout=120000")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                break
            except sqlite3.DatabaseError as e:
                if "locked" not in str(e) or attempt == 199:
                    self.db.close()
                    raise corrupt_db_error(db_path, e) from None
                time.sleep(0.05)

    def check_integrity(self) -> None:
        """SQLite's quick_check (every page readable, indexes consistent): IndexCorruptError if not."""
        try:
            result = [r[0] for r in self.query("PRAGMA quick_check")]
        except sqlite3.DatabaseError as e:
            raise corrupt_db_error(self.path / DB_FILE, e) from None
        if result != ["ok"]:
            raise corrupt_db_error(self.path / DB_FILE, "; ".join(result[:3]))

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
        the items of `files` by `items` [(file, name, modality, text)] (row i = array[i]), record the
        shard's size and sha256, and upsert the files [(path, modality, size, mtime_ns, model_id,
        status, error)]. Returns the shard name."""
        shard, data = None, b""
        if len(items):
            shard = f"r{rank:03d}-{uuid.uuid4().hex[:12]}.npy"
            data = npy_bytes(np.ascontiguousarray(array, dtype=np.float32))
            atomic_write(self.shard_dir / shard, data)
        with self.transaction() as db:
            if shard is not None:
                # garbage collection runs in a transaction too: if another process removed the shard
                # between the write and this commit (a run that bypassed the folder lock), write it again
                target = self.shard_dir / shard
                if not target.exists() or target.stat().st_size != len(data):
                    atomic_write(target, data)
                db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?)",
                           (shard, len(items), len(data), hashlib.sha256(data).hexdigest()))
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
        items were all re-embedded) and stale temporary files. Returns how many were deleted. Runs
        inside a write transaction, so it never sees a shard as unused while a commit naming it is
        half done (commit_chunk re-checks its shard inside its own transaction)."""
        n = 0
        with self.transaction() as db:
            used = {s for (s,) in db.execute("SELECT DISTINCT shard FROM items")}
            for f in self.shard_dir.iterdir():
                name = f.name.lstrip(".")
                if name.startswith(prefix) and f.name not in used:
                    f.unlink(missing_ok=True)
                    n += 1
            db.execute("DELETE FROM shards WHERE substr(name, 1, ?) = ? AND name NOT IN "
                       "(SELECT DISTINCT shard FROM items)", (len(prefix), prefix))
        return n

    # ---- healing: shards ----
    def check_shard(self, shard: str, max_row: int, record: tuple[int, int, str] | None) -> str | None:
        """Why `shard` cannot serve rows 0..max_row (None when it can). `record`: (rows, size,
        sha256) from the commit, or None for a shard of an index written before records existed."""
        path = self.shard_dir / shard
        if not path.is_file():
            return "missing"
        data = path.read_bytes()
        if record is not None:
            rows, size, sha = record
            if len(data) != size:
                return f"{len(data)} bytes, {size} recorded (truncated or replaced)"
            if hashlib.sha256(data).hexdigest() != sha:
                return "checksum differs from the one recorded at commit (corrupt)"
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            return f"unreadable ({e})"
        if array.ndim != 2 or array.shape[0] <= max_row:
            return f"shape {array.shape} cannot hold row {max_row}"
        if not np.isfinite(array).all():
            return "holds non-finite (NaN/inf) vectors"
        if record is None:  # an older index: record what is there now that it checked out
            with self.transaction() as db:
                db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?)",
                           (shard, int(array.shape[0]), len(data), hashlib.sha256(data).hexdigest()))
        return None

    def verify_shards(self, in_share=None) -> list[tuple[str, str, list[str]]]:
        """Check every shard that items refer to (only those holding a file `in_share(path)` accepts,
        when given) and re-queue the files of each bad one: their items and files rows are deleted,
        so the plan embeds them again. Returns [(shard, why, files re-queued)]."""
        refs = self.query("SELECT shard, MAX(row) FROM items GROUP BY shard")
        records = {n: (r, z, h) for n, r, z, h in self.query("SELECT name, rows, size, sha256 FROM shards")}
        healed = []
        for shard, max_row in refs:
            files = self._files_of(shard)
            if in_share is not None and not any(in_share(f) for f in files):
                continue
            why = self.check_shard(shard, max_row, records.get(shard))
            if why is None:
                continue
            with self.transaction() as db:
                db.executemany("DELETE FROM items WHERE file = ?", [(f,) for f in files])
                db.executemany("DELETE FROM files WHERE path = ?", [(f,) for f in files])
                db.execute("DELETE FROM shards WHERE name = ?", (shard,))
                (self.shard_dir / shard).unlink(missing_ok=True)
            healed.append((shard, why, files))
        return healed

    def _files_of(self, shard: str) -> list[str]:
        return [f for (f,) in self.query("SELECT DISTINCT file FROM items WHERE shard = ?", (shard,))]

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
    def item_counts(self, model_id: str) -> dict[str, int]:
        """modality -> items embedded with `model_id` (what its FAISS index must hold)."""
        return dict(self.query("SELECT i.modality, COUNT(*) FROM items i JOIN files f ON f.path = i.file "
                               "WHERE f.model_id = ? GROUP BY i.modality", (model_id,)))

    def gather_vectors(self, model_id: str, modalities: Sequence[str] | None = None
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """modality -> (ids (n,) int64, vectors (n, D) float32) of every current item embedded with
        `model_id` (of `modalities` only, when given), read from the shards one shard at a time.
        Raises IndexCorruptError naming a shard that is missing or too short (heal: `onepeace index`)."""
        rows = self.query("SELECT i.id, i.modality, i.shard, i.row FROM items i JOIN files f ON f.path = i.file "
                          "WHERE f.model_id = ? ORDER BY i.shard, i.row", (model_id,))
        by_modality: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        current, array = None, None
        for item_id, modality, shard, row in rows:
            if modalities is not None and modality not in modalities:
                continue
            if shard != current:  # rows are sorted by shard: one shard in memory at a time
                current = shard
                try:
                    array = np.load(self.shard_dir / shard, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise IndexCorruptError(f"{self.shard_dir / shard} cannot be read ({e}); rerun "
                                            "`onepeace index` on this folder: it re-embeds what the shard held") from None
            if row >= len(array):
                raise IndexCorruptError(f"{self.shard_dir / shard} has {len(array)} rows, row {row} is recorded; "
                                        "rerun `onepeace index` on this folder: it re-embeds what the shard held")
            ids, vecs = by_modality.setdefault(modality, ([], []))
            ids.append(item_id)
            vecs.append(np.asarray(array[row]))
        return {m: (np.asarray(ids, dtype=np.int64), np.ascontiguousarray(np.stack(vecs), dtype=np.float32))
                for m, (ids, vecs) in by_modality.items()}

    def build_faiss(self, model_id: str, ivf_threshold: int, nlist: int | None = None,
                    nprobe: int | None = None) -> dict[str, FaissChoice]:
        """Gather every current item's vector from the shards and (re)write one FAISS index per
        modality; items of files embedded with another model are left out. Records the choice and
        each file's size, sha256 and vector count (info['faiss_files'], checked by `check_faiss`)."""
        faiss = require_faiss()
        self.faiss_dir.mkdir(exist_ok=True)
        vectors = self.gather_vectors(model_id)
        choices, files = {}, {}
        for modality in dict.fromkeys([*file_modalities(), *vectors]):
            target = self.faiss_dir / f"{modality}.faiss"
            if modality not in vectors:
                target.unlink(missing_ok=True)
                continue
            ids, x = vectors[modality]  # (n,), (n, D)
            choice = choose_faiss(len(ids), ivf_threshold, nlist, nprobe)
            data = faiss.serialize_index(make_faiss(faiss, choice, ids, x)).tobytes()
            atomic_write(target, data)
            choices[modality] = choice
            files[modality] = {"n": len(ids), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.set_info(faiss={m: asdict(c) for m, c in choices.items()}, faiss_files=files,
                      merged={"model_id": model_id, "ivf_threshold": ivf_threshold, "nlist": nlist, "nprobe": nprobe})
        return choices

    def check_faiss(self, model_id: str) -> dict[str, str]:
        """modality -> why its FAISS file cannot be trusted (missing, size or sha256 not the recorded
        ones, or a count that is not the current number of items); {} when all are sound."""
        recorded = self.info().get("faiss_files", {})
        problems = {}
        for modality, n in self.item_counts(model_id).items():
            path, rec = self.faiss_dir / f"{modality}.faiss", recorded.get(modality)
            if not path.is_file():
                problems[modality] = f"{path} is missing"
            elif rec is None:
                problems[modality] = f"{path} has no recorded checksum (built by an older version)"
            elif rec["n"] != n:
                problems[modality] = f"{path} holds {rec['n']} vectors, the index has {n} {modality} items"
            elif file_digest(path) != (rec["size"], rec["sha256"]):
                problems[modality] = f"{path} is corrupt (size or sha256 differs from the recorded ones)"
        return problems


def make_faiss(faiss, choice: FaissChoice, ids: np.ndarray, x: np.ndarray):
    """A FAISS index of `choice`'s kind holding vectors x (n, D) under ids (n,)."""
    if choice.kind == "flat-ip":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(x.shape[1]))
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], choice.nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = choice.nprobe
    index.add_with_ids(x, ids)
    return index

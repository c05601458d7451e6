"""`onepeace index`: embed every file of a registered modality (image, audio, video, text ...) under a
folder into an index folder.

Resumable and incremental: files are embedded in chunks, each chunk's shard written atomically and
its files recorded in SQLite in one transaction; a rerun skips files recorded with the same size,
mtime and model id, re-embeds changed ones and drops deleted ones, then rebuilds the FAISS indexes.

Several processes: under torchrun (RANK / WORLD_SIZE) each rank embeds the files whose path hashes
to it (a stable split, so a rerun with any progress gives every rank the same files), writes its own
shards, and rank 0 merges (builds the FAISS indexes) after a barrier. Without torchrun,
`rank`/`world_size` can be given explicitly (e.g. a job array); rank 0 then merges whatever is done,
and a final plain run embeds any remainder and merges.

Locked and self-healing (see :mod:`.lock` and :mod:`.store`): a plain run (or a torchrun job, through
rank 0) holds the folder's lock, so a second run waits for it (saying who holds it) or, with
`lock_timeout`, gives up with IndexLockedError; ranks of a job array lock only their own share. At
the start the run checks the recorded shards (re-embedding the files of a missing, truncated or
corrupt one), at the merge the FAISS files (rebuilding a missing, corrupt or stale one). An item whose
embedding is not finite (NaN/inf) is reported and skipped, never indexed.
"""
from __future__ import annotations

import os
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.files import find_inputs, text_items
from ..registry import embeddable_modalities
from .lock import IndexLock
from .store import IndexStore, model_id as compute_model_id


@dataclass(frozen=True)
class IndexConfig:
    chunk_files: int = 256  # files per shard / per commit: the work a killed run can lose
    batch_size: int | None = None  # per-modality default of onepeace.inference.DEFAULT_BATCH
    ivf_threshold: int = 50_000  # per modality: more vectors than this -> an IVF index instead of exact search
    nlist: int | None = None  # IVF lists (default ~4 sqrt(n))
    nprobe: int | None = None  # IVF lists searched per query (default nlist / 8, at least 8)


@dataclass
class IndexReport:
    scanned: int = 0  # files found under the root (this rank's share)
    unchanged: int = 0  # skipped: already embedded with the same size, mtime and model
    embedded_files: int = 0
    embedded_items: int = 0
    changed: int = 0  # of the embedded files: ones that were indexed before with other contents or model
    removed: int = 0  # deleted from the root since the last run
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0
    faiss: dict = field(default_factory=dict)
    healed: list[tuple[str, str, int]] = field(default_factory=list)  # bad shards: (name, why, files re-queued)
    faiss_rebuilt: dict[str, str] = field(default_factory=dict)  # modality -> why its FAISS file was rebuilt
    seconds: float = 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{m}: {c.kind} ({c.n}" + (f", nlist={c.nlist}, nprobe={c.nprobe}" if c.nlist else "") + ")"
                          for m, c in self.faiss.items())
        return (f"{self.scanned} files: {self.unchanged} unchanged (skipped), {self.embedded_files} embedded "
                f"({self.embedded_items} items, {self.changed} of them changed), {len(self.failed)} failed, "
                f"{self.removed} removed; {self.chunks} chunks in {self.seconds:.1f} s"
                + (f"; healed {len(self.healed)} bad shard(s) ({sum(h[2] for h in self.healed)} files re-embedded)"
                   if self.healed else "")
                + (f"; rebuilt FAISS {', '.join(self.faiss_rebuilt)}" if self.faiss_rebuilt else "")
                + (f"; FAISS {kinds}" if kinds else ""))


def rank_of(path: str, world_size: int) -> int:
    """The rank that embeds `path`: a stable hash, independent of what is already done."""
    return zlib.crc32(path.encode()) % world_size


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_index(root: str | os.PathLike, out: str | os.PathLike, model, model_path: str | os.PathLike,
                config: IndexConfig = IndexConfig(), rank: int | None = None, world_size: int | None = None,
                progress: bool = True, log: Callable[[str], None] | None = None,
                lock_timeout: float | None = None) -> IndexReport:
    """Index every file of a registered modality (and .txt / .jsonl texts) under `root` into the folder
    `out` (see the module docstring). `model` is the loaded model, `model_path` where it came from
    (recorded, and hashed into the model id). Bad files are reported through `log` and recorded as failed.
    `lock_timeout`: seconds to wait for another run holding `out` (None: as long as it takes; 0: none)."""
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    t0 = time.perf_counter()
    env_rank, env_world = _dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dist = _init_distributed() if world_size > 1 and rank == env_rank and "MASTER_ADDR" in os.environ else None
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise FileNotFoundError(f"{root}: no such folder to index")
    # the run owns the whole folder (a plain run; a torchrun job, whose rank 0 locks for all ranks)
    # or, as one share of a job array, only its own rank's shards
    exclusive = world_size == 1 or dist is not None
    owner = dist is None or rank == 0
    lock = IndexLock(Path(out), exclusive, rank, lock_timeout, log) if owner else nullcontext()
    with lock:
        store = IndexStore(out, create=True)
        try:
            report = _run(store, root_path, out, model, model_path, config, rank, world_size, dist, owner, exclusive,
                          progress, log)
        finally:
            store.close()
    report.seconds = time.perf_counter() - t0
    return report


def _run(store: IndexStore, root_path: Path, out, model, model_path, config: IndexConfig, rank: int, world_size: int,
         dist, owner: bool, exclusive: bool, progress: bool, log: Callable[[str], None]) -> IndexReport:
    """build_index's work, under the folder's lock: heal, plan, embed chunk by chunk, merge."""
    from tqdm import tqdm

    mid = compute_model_id(model_path)
    info = _record_info(store, root_path, out, model, model_path, mid, config, rank)
    healed = _heal_shards(store, rank, world_size, exclusive, log) if owner else []
    if dist is not None:
        dist.barrier()  # the other ranks plan once rank 0 holds the lock and has healed the folder

    todo, report = _plan(store, root_path, mid, rank, world_size)
    report.healed = healed
    bar = tqdm(total=len(todo), unit="file", desc=f"indexing (rank {rank})" if world_size > 1 else "indexing",
               disable=not progress, position=rank if world_size > 1 else None)
    for start in range(0, len(todo), config.chunk_files):
        chunk = todo[start:start + config.chunk_files]
        _embed_chunk(store, model, chunk, mid, config.batch_size, rank, report, log)
        bar.update(len(chunk))
    bar.close()

    # ---- merge: rank 0 builds the FAISS indexes once every rank is done ----
    if dist is not None:
        dist.barrier()
    if rank == 0:
        report.faiss = _merge(store, info, mid, config, report, complete=exclusive, force=world_size > 1, log=log)
    if dist is not None:
        dist.barrier()
    return report


def _heal_shards(store: IndexStore, rank: int, world_size: int, exclusive: bool,
                 log: Callable[[str], None]) -> list[tuple[str, str, int]]:
    """Start of a run: check the database, delete the shards no row names (left by a killed run), and
    check every shard the rows name against its record; the files of a bad one are re-queued."""
    store.check_integrity()
    store.collect_garbage(prefix="" if exclusive else f"r{rank:03d}-")
    in_share = None if exclusive else (lambda p: rank_of(p, world_size) == rank)
    healed = []
    for shard, why, files in store.verify_shards(in_share):
        log(f"shard {store.shard_dir / shard}: {why}; re-embedding the {len(files)} file(s) it held")
        healed.append((shard, why, len(files)))
    return healed


def _record_info(store: IndexStore, root_path: Path, out, model, model_path, mid: str, config: IndexConfig,
                 rank: int) -> dict:
    """The index's info before this run (rank 0 records the root, model and settings of this one)."""
    info = store.info()
    if "root" in info and info["root"] != str(root_path):
        raise ValueError(f"{out} indexes {info['root']}, not {root_path}; pass that folder or another --out")
    if rank == 0:
        store.set_info(root=str(root_path), model=str(Path(model_path).resolve()), model_id=mid,
                       dim=model.config.encoder.embed_dim, modalities=list(embeddable_modalities(model)), config=config.__dict__)
    return info


def _plan(store: IndexStore, root_path: Path, mid: str, rank: int, world_size: int
          ) -> tuple[list[tuple[str, str, int, int]], IndexReport]:
    """This rank's files to embed [(modality, path, size, mtime_ns)], new or changed since the last
    run; files deleted since then are removed from the store now."""
    found, _ = find_inputs([str(root_path)])
    found = [(m, p) for m, p in found if world_size == 1 or rank_of(p, world_size) == rank]
    known = {p: v for p, v in store.files().items() if world_size == 1 or rank_of(p, world_size) == rank}
    report = IndexReport(scanned=len(found))
    todo: list[tuple[str, str, int, int]] = []
    for modality, path in found:
        st = os.stat(path)
        old = known.get(path)
        if old is not None and old[:3] == (st.st_size, st.st_mtime_ns, mid) and old[3] == "ok":
            report.unchanged += 1
            continue
        report.changed += old is not None and old[3] == "ok"
        todo.append((modality, path, st.st_size, st.st_mtime_ns))
    gone = sorted(set(known) - {p for _, p in found})
    if gone:
        store.remove_files(gone)
        report.removed = len(gone)
    return todo, report


def _chunk_entries(chunk, on_error) -> tuple[dict[str, list[tuple[str, object]]], dict[str, str], dict[str, str]]:
    """A chunk's files -> ({modality: [(item name, source)]}, {item name: file}, {item name: text}).
    A text file gives one item per line (named path:line); any other file is one item."""
    entries: dict[str, list[tuple[str, object]]] = {}
    file_of: dict[str, str] = {}
    texts: dict[str, str] = {}
    for modality, path, _, _ in chunk:
        if modality == "text":
            try:
                lines = text_items(path)
            except (OSError, UnicodeDecodeError, ValueError) as e:
                on_error(path, f"cannot read text file: {e}")
                continue
            texts.update(lines)
        else:
            lines = [(path, path)]
        entries.setdefault(modality, []).extend(lines)
        file_of.update((name, path) for name, _ in lines)
    return entries, file_of, texts


def _embed_chunk(store: IndexStore, model, chunk, mid: str, batch_size: int | None, rank: int,
                 report: IndexReport, log: Callable[[str], None]) -> None:
    """Embed one chunk of files and commit its shard and rows in one transaction."""
    from ..inference import embed_entries

    paths = {p for _, p, _, _ in chunk}
    errors: dict[str, str] = {}

    def on_error(name: str, why: str) -> None:
        path = name.rsplit(":", 1)[0] if name not in paths else name
        errors.setdefault(path, why)
        log(f"skipped {name}: {why}")

    entries, file_of, texts = _chunk_entries(chunk, on_error)
    vectors, items = [np.zeros((0, model.config.encoder.embed_dim), np.float32)], []
    for modality, group in entries.items():
        names, emb = embed_entries(model, modality, group, on_error, batch_size)
        emb = emb.float().numpy()  # (n, D)
        finite = np.isfinite(emb).all(axis=1)  # a NaN/inf vector is never indexed: report, skip the item
        for name in (n for n, ok in zip(names, finite) if not ok):
            on_error(name, "its embedding is not finite (NaN or inf): the input's values overflow the model")
        names, emb = [n for n, ok in zip(names, finite) if ok], emb[finite]
        vectors.append(emb)
        items += [(file_of[n], n, modality, texts.get(n)) for n in names]
    # a file fails when it gave no item and had an error (a text file with some bad lines is kept)
    with_items = {it[0] for it in items}
    files = [(p, m, size, mtime, mid, "failed" if p in errors and p not in with_items else "ok", errors.get(p))
             for m, p, size, mtime in chunk]
    store.commit_chunk(np.concatenate(vectors), items, files, rank)
    report.chunks += 1
    report.embedded_items += len(items)
    report.embedded_files += sum(f[5] == "ok" for f in files)
    report.failed += [(p, errors[p]) for p, *_, status, _ in files if status == "failed"]


def _merge(store: IndexStore, info: dict, mid: str, config: IndexConfig, report: IndexReport, complete: bool,
           force: bool, log: Callable[[str], None]) -> dict:
    """Rank 0: (re)build the FAISS indexes when anything changed or a FAISS file is missing, corrupt
    or stale, else keep the recorded ones. `complete`: every rank is done, so uncommitted shards of
    any rank are garbage."""
    from .store import FaissChoice

    if complete:
        store.collect_garbage()
    # up to date when built from this model with these FAISS settings (a new --ivf-threshold rebuilds)
    wanted = {"model_id": mid, "ivf_threshold": config.ivf_threshold, "nlist": config.nlist, "nprobe": config.nprobe}
    merged = info.get("merged") == wanted and store.faiss_dir.exists()
    report.faiss_rebuilt = store.check_faiss(mid) if merged else {}
    for modality, why in report.faiss_rebuilt.items():
        log(f"FAISS {modality}: {why}; rebuilding it")
    if report.embedded_items or report.changed or report.removed or report.healed or report.faiss_rebuilt \
            or not merged or force:
        return store.build_faiss(mid, config.ivf_threshold, config.nlist, config.nprobe)
    return {m: FaissChoice(**c) for m, c in info.get("faiss", {}).items()}


def _init_distributed():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist

"""Composed queries over an index: a weighted sum of normalised embeddings, renormalised, searched
in the FAISS index of each target modality."""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..registry import can_embed
from .store import IndexStore, model_id, require_faiss


@dataclass(frozen=True)
class QueryPart:
    """One piece of a query: a text, or an image / audio (a path, PIL image, or (wave, rate))."""

    modality: str
    value: Any
    weight: float = 1.0
    name: str = ""  # for error messages, e.g. the file name or "text[0]"


def parse_weights(raw: Sequence[str] | None, parts: Sequence[tuple[str, Any]]) -> list[float]:
    """--weights values -> one weight per (modality, value) part. Either positional numbers, one per
    part in the parts' order; or modality=number (applied to every part of that modality)."""
    if not raw:
        return [1.0] * len(parts)
    kinds = list(dict.fromkeys(m for m, _ in parts))
    try:
        if all("=" in w for w in raw):
            by = {}
            for w in raw:
                k, v = w.split("=", 1)
                if k not in kinds:
                    raise ValueError(f"--weights {w!r}: no query part has modality {k!r} (parts: {', '.join(kinds)})")
                by[k] = float(v)
            return [by.get(m, 1.0) for m, _ in parts]
        values = [float(w) for w in raw]
    except ValueError as e:
        if "modality" in str(e):
            raise
        raise ValueError(f"--weights: expected numbers or modality=number, got {' '.join(raw)}") from None
    if len(values) != len(parts):
        raise ValueError(f"--weights: {len(values)} weights for {len(parts)} query parts "
                         "(give one per query part, in their order, or modality=number)")
    return values


def embed_query(model, parts: Sequence[QueryPart]) -> np.ndarray:
    """(D,) float32: sum_i w_i e_i / |sum_i w_i e_i| where e_i is part i's L2-normalised embedding.
    Raises ValueError naming the part that cannot be read, or when the weights cancel out."""
    from ..data.image import InputError

    if not parts:
        raise ValueError("empty query: give at least one text, image or audio")
    # weights scaled by the largest |w| first: the direction is the same and the sum cannot overflow
    # (weights of 1e308 would make the float sum inf and the query NaN)
    for i, part in enumerate(parts):
        if not np.isfinite(part.weight):
            raise ValueError(f"query part {part.name or i}: weight must be a finite number, got {part.weight}")
    scale = max(abs(float(p.weight)) for p in parts)
    if scale == 0:
        raise ValueError("every query weight is 0; give at least one non-zero weight")
    total = None
    for i, part in enumerate(parts):
        if not can_embed(model, part.modality):
            raise ValueError(f"query part {part.name or i}: the model has no {part.modality!r} branch "
                             f"(it has {', '.join(model.modalities)})")
        try:  # the modality's registered preprocessing and embedding path
            e = model.encode_items(part.modality, [part.value])[0].float().cpu().numpy()  # (D,), unit norm
        except InputError:
            raise
        except (OSError, ValueError) as exc:
            raise ValueError(f"query part {part.name or i}: {exc}") from exc
        if not np.isfinite(e).all():
            raise ValueError(f"query part {part.name or i}: its embedding is not finite (NaN or inf)")
        w = float(part.weight) / scale
        total = w * e if total is None else total + w * e
    norm = float(np.linalg.norm(total))
    if not norm >= 1e-6:
        raise ValueError("the query's weighted parts cancel out (zero vector); change the weights")
    return (total / norm).astype(np.float32)


class SearchIndex:
    """A built index opened for search (thread-safe: FAISS searches are read-only)."""

    def __init__(self, path: str | os.PathLike, log=None):
        require_faiss()  # before anything else: the error names the extra
        self.path = Path(path)
        self.store = IndexStore(path)
        self.info = self.store.info()
        self.log = log or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self.indexes = self._open_indexes()
        self._paths: set[str] | None = None
        self._paths_lock = threading.Lock()

    def _open_indexes(self) -> dict[str, Any]:
        """modality -> FAISS index, one per modality with items: faiss/{modality}.faiss when it is
        sound (its recorded size, sha256 and count), else an exact index built in memory from the
        shards, with a warning (a search never answers [] where the index holds vectors)."""
        faiss = require_faiss()
        mid = self.info.get("model_id", "")
        counts = self.store.item_counts(mid)
        if not counts:
            raise ValueError(f"{self.path} holds no embedded items yet: run `onepeace index` into it first "
                             "(nothing indexed, or every file failed)")
        problems = self.store.check_faiss(mid)
        indexes = {}
        for modality in counts:
            if modality not in problems:
                try:
                    indexes[modality] = faiss.read_index(str(self.store.faiss_dir / f"{modality}.faiss"))
                    continue
                except RuntimeError as e:  # FAISS's reader raises RuntimeError on a bad file
                    problems[modality] = f"{self.store.faiss_dir / f'{modality}.faiss'} cannot be read ({e})"
        if problems:
            for modality, why in problems.items():
                self.log(f"{why}; searching the {modality} vectors of the shards exactly instead "
                         "(rerun `onepeace index` on this folder to rebuild the FAISS file)")
            from .store import FaissChoice, make_faiss

            for modality, (ids, x) in self.store.gather_vectors(mid, list(problems)).items():
                indexes[modality] = make_faiss(faiss, FaissChoice("flat-ip", len(ids)), ids, x)
        return indexes

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def query_model_path(self, model_path: str | os.PathLike | None = None) -> str:
        """The model to embed queries with: `model_path`, or the one the index was built with. Queries
        are only comparable with the indexed vectors if the weights are the same, so a model whose
        content id differs from the index's is refused (naming both)."""
        path = str(model_path or self.info["model"])
        if not Path(path).exists():
            raise FileNotFoundError(f"the model {path} (recorded in {self.path}) is not there; pass --model")
        found, built = model_id(path), self.info.get("model_id")
        if built and found != built:
            raise ValueError(f"{path} is model {found}, but {self.path} was built with model {built} "
                             f"({self.info.get('model')}): its vectors are not comparable; re-index with this model")
        return path

    def search(self, vector: np.ndarray, k: int = 10, modality: str | None = None) -> list[dict[str, Any]]:
        """Top-k items by inner product with `vector` (D,), among `modality` (or all), best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        known = list(dict.fromkeys([*self.info.get("modalities", []), *self.indexes]))
        if modality is not None and modality not in known:
            raise ValueError(f"unknown target modality {modality!r}; this index has {', '.join(known)}")
        targets = [modality] if modality else list(self.indexes)
        q = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        if not np.isfinite(q).all():
            raise ValueError("the query vector is not finite (NaN or inf)")
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.dim} (another model?)")
        hits: list[tuple[float, int]] = []
        for m in targets:
            if m in self.indexes:
                scores, ids = self.indexes[m].search(q, k)  # (1, k) each; id -1 where fewer than k
                hits += [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        hits = sorted(hits, key=lambda h: -h[0])[:k]
        rows = self.store.item_rows([i for _, i in hits])
        return [{"rank": r, "score": s, **rows[i]} for r, (s, i) in enumerate(hits, 1) if i in rows]

    def stats(self) -> dict[str, Any]:
        counts = self.store.counts()
        return {"index": str(self.path), "root": self.info.get("root"), "model": self.info.get("model"),
                "model_id": self.info.get("model_id"), "dim": self.info.get("dim"),
                "faiss": self.info.get("faiss", {}), **counts,
                "searchable": {m: int(ix.ntotal) for m, ix in self.indexes.items()}}

    def item(self, item_id: int) -> dict[str, Any] | None:
        return self.store.item_rows([item_id]).get(item_id)

    def close(self) -> None:
        self.store.close()


def format_table(hits: Sequence[dict[str, Any]], root: str | None = None) -> str:
    """Hits as an aligned text table (paths relative to the index root)."""
    lines = [f"{'rank':>4}  {'score':>6}  {'modality':<8}  item"]
    for h in hits:
        name = h["name"]
        if root and name.startswith(root.rstrip("/") + "/"):
            name = name[len(root.rstrip("/")) + 1:]
        if h["modality"] == "text" and h.get("text"):
            name = f"{name}  \"{h['text']}\""
        lines.append(f"{h['rank']:>4}  {h['score']:>6.3f}  {h['modality']:<8}  {name}")
    return "\n".join(lines)

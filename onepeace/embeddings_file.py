"""The embeddings file `onepeace embed` writes: one .npz, readable without onepeace.

Arrays (N embedded items, F skipped inputs, D the model's width)::

    embeddings      (N, D) float32, L2-normalised, row i is item i
    files           (N,) str   the item's name: a path, "path:line" for a line of a text file, "--text[i]"
    modalities      (N,) str   the modality it was embedded as
    failed_files    (F,) str   inputs that were skipped
    failed_errors   (F,) str   why, one line each
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class EmbeddingsFile:
    embeddings: np.ndarray  # (N, D) float32
    files: list[str]
    modalities: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, why)

    def __post_init__(self) -> None:
        n = self.embeddings.shape[0]
        if self.embeddings.ndim != 2 or len(self.files) != n or len(self.modalities) != n:
            raise ValueError(f"embeddings {tuple(self.embeddings.shape)} need one file name and one modality per "
                             f"row; got {len(self.files)} names and {len(self.modalities)} modalities")

    def counts(self) -> dict[str, int]:
        """Items per modality, in order of first appearance."""
        return {m: self.modalities.count(m) for m in dict.fromkeys(self.modalities)}


def write_embeddings(path: str | os.PathLike, data: EmbeddingsFile) -> Path:
    """Write `data` as the .npz described above (creating the parent folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, embeddings=data.embeddings.astype(np.float32, copy=False),
             files=np.array(data.files, dtype=str), modalities=np.array(data.modalities, dtype=str),
             failed_files=np.array([p for p, _ in data.failed], dtype=str),
             failed_errors=np.array([w for _, w in data.failed], dtype=str))
    return out


def read_embeddings(path: str | os.PathLike) -> EmbeddingsFile:
    """The inverse of :func:`write_embeddings`."""
    with np.load(path) as z:
        missing = {"embeddings", "files", "modalities"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not an embeddings file (no {', '.join(sorted(missing))} arrays)")
        failed = list(zip(z["failed_files"].tolist(), z["failed_errors"].tolist())) if "failed_files" in z.files else []
        return EmbeddingsFile(z["embeddings"], z["files"].tolist(), z["modalities"].tolist(), failed)


def empty_embeddings(dim: int, failed: Sequence[tuple[str, str]] = ()) -> EmbeddingsFile:
    return EmbeddingsFile(np.zeros((0, dim), np.float32), [], [], list(failed))

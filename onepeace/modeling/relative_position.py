"""Relative-position bucket indices (recomputed, never loaded: the files' `rp_bucket` buffers are these).

Indices are cached per (arguments, device) because every forward needs them. They are always built
outside inference mode: a cached inference tensor would break a later training step on the same model.
"""
from __future__ import annotations

import functools
import math

import torch

MAX_1D_POSITIONS = 1024  # the released tables were built for sequences of up to 1024 positions


def _cached_index(fn):
    @functools.lru_cache(maxsize=32)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


@_cached_index
def bucket_index_1d(bucket_size: int, max_positions: int = MAX_1D_POSITIONS, device: str = "cpu") -> torch.Tensor:
    """(max_positions, max_positions) int64 index into a table of 2*bucket_size + 2 rows.

    Relative distance r = i - j is kept exactly within +-bucket_size//2 and log-bucketed beyond;
    row 0 / column 0 (the CLS token) get three special entries.
    """
    b = bucket_size
    mid = b // 2
    pos = torch.arange(max_positions, dtype=torch.long)
    rel = pos[:, None] - pos[None, :]  # (P, P): i - j
    sign = torch.sign(rel)
    abs_rel = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(
        # float32 on purpose: the released buffers were computed this way (ceil is sensitive to it)
        torch.log(abs_rel / mid) / math.log((max_positions - 1) / mid) * (mid - 1)
    ).long() + mid
    bucket = torch.where(abs_rel <= mid, rel, log_pos * sign)
    index = bucket + b - 1  # in [0, 2b - 2]
    index[0, :] = 2 * b - 1
    index[:, 0] = 2 * b
    index[0, 0] = 2 * b + 1
    return index.to(device)


@_cached_index
def bucket_index_2d(grid: int, device: str = "cpu") -> torch.Tensor:
    """(grid^2 + 1, grid^2 + 1) int64 index into a table of (2*grid - 1)^2 + 3 rows (CLS first)."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)  # (2, g^2)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, g^2, g^2): (y1 - y2, x1 - x2)
    span = 2 * grid - 1
    n = span * span + 3
    index = torch.empty((grid * grid + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = (rel[0] + grid - 1) * span + (rel[1] + grid - 1)
    index[0, :] = n - 3
    index[:, 0] = n - 2
    index[0, 0] = n - 1
    return index.to(device)


def device_key(device: torch.device) -> str:
    return str(device)

"""Retrieval and classification metrics on similarity matrices (class-level matches)."""
from __future__ import annotations

import torch


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """sim (Nq, Nk), positives (Nq, Nk) bool -> {k: fraction of queries with a positive in their top k}."""
    order = sim.argsort(dim=1, descending=True)
    hits = torch.gather(positives, 1, order)  # (Nq, Nk) positives in ranked order
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks if k <= sim.shape[1]}


def mean_average_precision(sim: torch.Tensor, positives: torch.Tensor) -> float:
    """Mean over queries (with at least one positive) of the average precision of their ranking."""
    order = sim.argsort(dim=1, descending=True)
    hits = torch.gather(positives, 1, order).float()
    cum = hits.cumsum(dim=1)
    ranks = torch.arange(1, sim.shape[1] + 1, device=sim.device).float()
    n_pos = hits.sum(dim=1)
    ap = (hits * cum / ranks).sum(dim=1) / n_pos.clamp_min(1)
    return ap[n_pos > 0].mean().item()


def confusion_matrix(truth: torch.Tensor, pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    m = torch.zeros(n_classes, n_classes, dtype=torch.long)
    m.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    return m

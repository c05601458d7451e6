"""Intra-modal denoising contrast (DCL, spec 10.2)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def label_smoothed_nll(lprobs: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """fairseq's form, per row: (1 - eps - eps_i) * nll + eps_i * (-sum log p), eps_i = eps / (K - 1).

    lprobs (M, K) log-probabilities, target (M,) -> (M,) losses.
    """
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    if epsilon == 0.0:
        return nll
    smooth = -lprobs.sum(dim=1)
    eps_i = epsilon / (lprobs.shape[1] - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth


def denoising_contrast_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                            padding_mask: torch.Tensor, scale: float = 2.5, label_smoothing: float = 0.1,
                            global_candidates: bool = False) -> torch.Tensor:
    """Each masked unit's student feature must pick its own teacher feature among all units of the batch.

    student, teacher: (B, L, D) for every position (CLS first); mask: (B, L) True = masked;
    padding_mask: (B, L) True = padding. Candidates are all non-padding positions after 0 (EOS
    included) of every item; logits are `scale` x cosine similarity; the loss is the mean over the
    masked units of the label-smoothed cross-entropy. The teacher is used without gradient.

    global_candidates: under torch.distributed, contrast against the candidates of ALL ranks and
    normalise by the global number of masked units (times the world size, which DDP's gradient
    averaging divides back out), so N processes compute exactly what one process would on the
    whole batch. On one process it changes nothing.
    """
    candidates = ~padding_mask.bool()
    candidates[:, 0] = False
    mask = mask.bool() & candidates
    teacher_feats = F.normalize(teacher.detach()[candidates].float(), dim=-1)  # (K, D)
    student_feats = F.normalize(student[mask].float(), dim=-1)  # (M, D)
    # index of each (item, position) among the candidates, in row-major order
    candidate_index = candidates.flatten().long().cumsum(0).view_as(candidates) - 1
    target = candidate_index[mask]  # (M,)
    rank, world = _world()
    n_masked = torch.tensor(float(mask.sum()), device=student.device)
    if global_candidates and world > 1:
        teacher_feats, offset = _gather_rows(teacher_feats, rank, world)
        target = target + offset
        dist.all_reduce(n_masked)
    if n_masked == 0:
        return student.sum() * 0.0  # nothing masked anywhere; keeps the graph
    logits = scale * student_feats @ teacher_feats.T  # (M, K)
    lprobs = F.log_softmax(logits, dim=-1)
    total = label_smoothed_nll(lprobs, target, label_smoothing).sum()
    if global_candidates and world > 1:
        return total * world / n_masked
    return total / n_masked


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(x: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """All ranks' rows (K_r, D) of different counts, concatenated in rank order, without gradient.
    Returns (rows, number of rows before this rank's)."""
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), x.shape[1])
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    rows = torch.cat([o[:c] for o, c in zip(out, counts)], dim=0)
    return rows, sum(counts[:rank])

"""Intra-modal denoising contrast (DCL, spec 10.2)."""
from __future__ import annotations

import torch
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
                            padding_mask: torch.Tensor, scale: float = 2.5, label_smoothing: float = 0.1
                            ) -> torch.Tensor:
    """Each masked unit's student feature must pick its own teacher feature among all units of the batch.

    student, teacher: (B, L, D) for every position (CLS first); mask: (B, L) True = masked;
    padding_mask: (B, L) True = padding. Candidates are all non-padding positions after 0 (EOS
    included) of every item; logits are `scale` x cosine similarity; the loss is the mean over the
    masked units of the label-smoothed cross-entropy. The teacher is used without gradient.
    """
    candidates = ~padding_mask.bool()
    candidates[:, 0] = False
    mask = mask.bool() & candidates
    if not mask.any():
        return student.sum() * 0.0  # keeps the graph; nothing masked in this batch
    teacher_feats = F.normalize(teacher.detach()[candidates].float(), dim=-1)  # (K, D)
    student_feats = F.normalize(student[mask].float(), dim=-1)  # (M, D)
    logits = scale * student_feats @ teacher_feats.T  # (M, K)
    # index of each (item, position) among the candidates, in row-major order
    candidate_index = candidates.flatten().long().cumsum(0).view_as(candidates) - 1
    target = candidate_index[mask]  # (M,)
    lprobs = F.log_softmax(logits, dim=-1)
    return label_smoothed_nll(lprobs, target, label_smoothing).mean()

"""Cross-modal aligning contrast (ITC / ATC, spec 10.1): symmetric InfoNCE with a learned temperature.

Two forms:
- ``gather="reference"``: each direction contrasts the local features (with gradient) against the
  other modality's features of ALL ranks gathered WITHOUT gradient (the published code's form; on
  one process the other side is just detached).
- ``gather="with_grad"`` (default, open_clip's scalable form): features are all-gathered WITH
  gradient and each rank computes the loss of its local rows against everything (local loss);
  summed over ranks by DDP's gradient averaging this equals the full-batch loss gradient.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice (summed over ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """(n, D) local rows -> (world * n, D) rows of all ranks (rank order). Equal n on every rank."""
    rank, world = _world()
    if world == 1:
        return x if with_grad else x.detach()
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


def temperature(logit_scale: torch.Tensor, max_value: float = 100.0) -> torch.Tensor:
    """exp(logit_scale) with logit_scale clamped to [0, ln max_value]."""
    return logit_scale.clamp(0, math.log(max_value)).exp()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, gather: str = "with_grad",
                     label_smoothing: float = 0.0, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between paired L2-normalised rows a[i] <-> b[i] (n, D) of this rank.

    group_ids (n,) int64, optional: rows with the same id are all positives of each other (e.g. the
    same caption paired with several images), with uniform soft targets over them, instead of
    one-hot targets that would push identical captions apart (our option; the reference has none).
    """
    if gather not in ("with_grad", "reference"):
        raise ValueError(f"gather must be 'with_grad' or 'reference', got {gather!r}")
    rank, _ = _world()
    n = a.shape[0]
    scale = temperature(logit_scale)
    targets = torch.arange(n, device=a.device) + rank * n  # global indices of the local rows
    a_all = gather_features(a, with_grad=gather == "with_grad")
    b_all = gather_features(b, with_grad=gather == "with_grad")
    logits_ab = scale * a.float() @ b_all.float().T  # (n, world * n)
    logits_ba = scale * b.float() @ a_all.float().T
    if group_ids is not None:
        all_ids = gather_features(group_ids.view(-1, 1), with_grad=False).view(-1)  # (world * n,)
        same = group_ids.view(-1, 1).eq(all_ids.view(1, -1)).float()  # (n, world * n)
        soft = same / same.sum(dim=1, keepdim=True)
        targets = soft
    return (F.cross_entropy(logits_ab, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_ba, targets, label_smoothing=label_smoothing)) / 2

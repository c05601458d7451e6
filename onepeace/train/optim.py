"""AdamW with the reference's no-decay set, cosine schedule with linear warm-up, stage freezing."""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable

import torch
from torch import nn

# parameters that get no weight decay besides every bias and every 0-/1-D tensor (norms, LayerScale,
# the temperature): position and CLS-like embeddings
NO_DECAY_NAMES = ("pos_embed", "cls_token", "cls_pos_embed", "type_embed", "rel_pos_tables", "mask_token")


def apply_freezing(model: nn.Module, frozen: Iterable[str], trainable: Iterable[str]) -> list[str]:
    """requires_grad = False for names matching `frozen` unless they match `trainable`.
    Returns the names of the trainable parameters."""
    frozen, trainable = tuple(frozen), tuple(trainable)
    names = []
    for name, p in model.named_parameters():
        is_frozen = any(fnmatch.fnmatchcase(name, pat) for pat in frozen) and not any(
            fnmatch.fnmatchcase(name, pat) for pat in trainable)
        p.requires_grad_(not is_frozen)
        if not is_frozen:
            names.append(name)
    return names


def wants_decay(name: str, p: torch.Tensor) -> bool:
    if p.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(part in name for part in NO_DECAY_NAMES)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-8
                    ) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if wants_decay(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, lr: float,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise learning-rate decay: adapters 0, encoder layer i -> i + 1,
    everything above the layers (final LayerNorms, projections, temperature, task head) num_layers + 1."""
    if name.startswith("adapters."):
        return 0
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float
                       ) -> list[dict]:
    """AdamW parameter groups of an OnePeaceModel's trainable parameters with layer-wise lr decay:
    lr * layer_decay ** (num_layers + 1 - depth), and the no-decay set of :func:`wants_decay`.

    Each group carries "depth" and "lr_scale" (for inspection and tests)."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    num_layers = len(model.encoder.layers)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = parameter_depth(name, num_layers)
        decay = wants_decay(name, p)
        scale = layer_decay ** (num_layers + 1 - depth)
        group = groups.setdefault((depth, decay), {
            "params": [], "names": [], "depth": depth, "lr_scale": scale, "lr": lr * scale,
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]

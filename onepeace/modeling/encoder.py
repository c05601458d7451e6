"""The shared Transformer encoder ("Multiway"): shared attention, one FFN expert per modality.

The encoder never names a modality. It receives a segment layout ``((name, length), ...)`` that
tells which rows of the sequence belong to which expert, and its experts are a ModuleDict keyed by
the names given at construction.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import EncoderConfig
from .attention import RealRows, SelfAttention
from .layers import DropPath, GeGLUFeedForward

Layout = Sequence[tuple[str, int]]  # ((segment name, number of rows), ...) in sequence order


def apply_per_segment(modules: nn.ModuleDict, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Apply ``modules[name]`` to each segment's rows of x (B, S, D) and concatenate back."""
    if len(layout) == 1:
        return modules[layout[0][0]](x)
    outputs, start = [], 0
    for name, length in layout:
        outputs.append(modules[name](x[:, start:start + length]))
        start += length
    return torch.cat(outputs, dim=1)


class EncoderLayer(nn.Module):
    """Pre-LN block: ``x += g1 * attn(ln(x)); x += g2 * ffn_expert(ln(x))``."""

    def __init__(self, cfg: EncoderConfig, experts: Sequence[str], drop_path: float = 0.0):
        super().__init__()
        D = cfg.embed_dim
        self.attn_norm = nn.LayerNorm(D)
        self.attn = SelfAttention(D, cfg.attention_heads, scale_heads=cfg.scale_heads,
                                  magneto_scale_attn=cfg.magneto_scale_attn, dropout=cfg.attention_dropout)
        self.attn_out_norm = nn.LayerNorm(D) if cfg.scale_attn else None
        self.ffn_norm = nn.LayerNorm(D)
        self.ffn = nn.ModuleDict({
            name: GeGLUFeedForward(D, cfg.ffn_embed_dim, scale_fc=cfg.scale_fc,
                                   activation_dropout=cfg.activation_dropout)
            for name in experts
        })
        if cfg.use_layer_scale:
            self.layer_scale_attn = nn.Parameter(torch.full((D,), cfg.layer_scale_init_value))
            self.layer_scale_ffn = nn.Parameter(torch.full((D,), cfg.layer_scale_init_value))
        else:
            self.layer_scale_attn = self.layer_scale_ffn = None
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, layout: Layout, eager: bool = False,
                rows: RealRows | None = None) -> torch.Tensor:
        """x: (B, S, D), or the (N, D) real rows of a one-segment batch with `rows` (inference)."""
        a = self.attn(self.attn_norm(x), attn_mask, eager=eager, rows=rows)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        if not torch.is_grad_enabled() and not self.training:
            # inference: the residual adds in place (x += gamma * a), no intermediate buffers
            if self.layer_scale_attn is not None:
                a.mul_(self.layer_scale_attn)
            x = x + a
            f = apply_per_segment(self.ffn, self.ffn_norm(x), layout)
            if self.layer_scale_ffn is not None:
                f.mul_(self.layer_scale_ffn)
            return x.add_(f)
        a = self.dropout(a)
        if self.layer_scale_attn is not None:
            a = a * self.layer_scale_attn
        x = x + self.drop_path(a)

        f = apply_per_segment(self.ffn, self.ffn_norm(x), layout)
        f = self.dropout(f)
        if self.layer_scale_ffn is not None:
            f = f * self.layer_scale_ffn
        return x + self.drop_path(f)


class Encoder(nn.Module):
    """L layers, then each segment's own final LayerNorm."""

    def __init__(self, cfg: EncoderConfig, experts: Sequence[str]):
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.layers, device="cpu").tolist() if cfg.layers > 1 \
            else [cfg.drop_path_rate] * cfg.layers
        self.layers = nn.ModuleList(EncoderLayer(cfg, experts, drop_path=r) for r in rates)
        self.final_norms = nn.ModuleDict({name: nn.LayerNorm(cfg.embed_dim) for name in experts})
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attn_masks, layout: Layout, eager: bool = False,
                rows: RealRows | None = None) -> torch.Tensor:
        """x: (B, S, D); attn_masks: None, one additive mask for all layers, one per layer, or a
        function of the layer index (the reference mode rebuilds its mask in every layer).
        With `rows` (one segment, inference), x is the (N, D) real rows and so is the result."""
        if rows is not None and len(layout) != 1:
            raise ValueError("real rows need a one-segment layout (the expert of every row is the same)")
        for i, layer in enumerate(self.layers):
            if callable(attn_masks):
                mask = attn_masks(i)
            else:
                mask = None if not attn_masks else attn_masks[i if len(attn_masks) > 1 else 0]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, layout, eager, use_reentrant=False)
            else:
                x = layer(x, mask, layout, eager, rows)
        return apply_per_segment(self.final_norms, x, layout)

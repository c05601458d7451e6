"""Small building blocks: GeGLU feed-forward, drop-path, channel LayerNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed import PackedLinear, require_dense


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # one Bernoulli draw per sample, broadcast over (S, D)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GeGLUFeedForward(nn.Module):
    """``fc_out(norm(GELU(wi_0 h) * wi_1 h))``: the per-modality FFN expert of every layer.

    wi_0 / wi_1 have no bias; `norm` (LayerNorm over the hidden width F) exists iff `scale_fc`.
    """

    def __init__(self, dim: int, hidden_dim: int, scale_fc: bool = True, activation_dropout: float = 0.0):
        super().__init__()
        self.wi_0 = nn.Linear(dim, hidden_dim, bias=False)
        self.wi_1 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(activation_dropout)
        self.norm = nn.LayerNorm(hidden_dim) if scale_fc else None
        self.fc_out = nn.Linear(hidden_dim, dim)

    def fuse_projections(self) -> None:
        """wi_0 / wi_1 as views into one (2F, D) tensor: one matmul at inference (see SelfAttention)."""
        require_dense(self.wi_0, self.wi_1, to="fuse the GeGLU inputs")
        with torch.no_grad():
            fused = torch.cat([self.wi_0.weight, self.wi_1.weight], dim=0)
            F_ = self.wi_0.weight.shape[0]
            self.wi_0.weight.data = fused[:F_]
            self.wi_1.weight.data = fused[F_:]
        self._wi_weight = fused

    def unfuse_projections(self) -> None:
        """Drop the fused tensor (wi_0 / wi_1 keep their values; before packing)."""
        self._wi_weight = None

    def _fused_wi(self) -> torch.Tensor | None:
        fused = getattr(self, "_wi_weight", None)
        if fused is None or torch.is_grad_enabled():
            return None
        if not isinstance(self.wi_0, nn.Linear):  # packed since (pack_linears): the copy is stale
            self._wi_weight = None
            return None
        step = fused[0].numel() * fused.element_size() * self.wi_0.weight.shape[0]
        if self.wi_0.weight.data_ptr() != fused.data_ptr() or self.wi_1.weight.data_ptr() != fused.data_ptr() + step:
            self._wi_weight = None
            return None
        return fused

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        fused = self._fused_wi()
        if isinstance(self.wi_0, PackedLinear) and isinstance(self.wi_1, PackedLinear):
            # CPU inference: GELU and the product inside the packed GEMMs
            hidden = self.wi_1.forward_mul(h, self.wi_0.forward_gelu(h))
        elif fused is not None:
            gate, up = F.linear(h, fused).chunk(2, dim=-1)
            hidden = F.gelu(gate) * up
        elif torch.is_grad_enabled():
            hidden = F.gelu(self.wi_0(h)) * self.wi_1(h)  # exact (erf) GELU, as the reference
        else:  # inference: in place, one (tokens, F) buffer fewer
            hidden = F.gelu(self.wi_0(h)).mul_(self.wi_1(h))
        hidden = self.dropout(hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.fc_out(hidden)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) feature map (the hmlp image stem's norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def layer_norm_no_affine(x: torch.Tensor, dim: int) -> torch.Tensor:
    """LayerNorm over the last axis without weights (eps 1e-5)."""
    return F.layer_norm(x, (dim,))


def shrink_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Same value, gradient scaled by `alpha` (the adapters' `shrink_alpha`)."""
    if alpha == 1.0:
        return x
    return x * alpha + x.detach() * (1.0 - alpha)

"""The shared multi-head self-attention of every encoder layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed import require_dense


class RealRows:
    """The real (non-padding) rows of a padded (B, S, .) batch, kept as one (N, .) matrix.

    At inference, projections, LayerNorms and FFNs run on the N real rows only (a batch of mixed
    lengths then costs what its tokens cost, not B x longest); only the attention itself needs the
    (B, H, S, S) layout, where padded keys are masked anyway."""

    def __init__(self, padding_mask: torch.Tensor):  # (B, S) bool, True = padding
        self.batch, self.length = padding_mask.shape
        self.index = (~padding_mask).reshape(-1).nonzero().squeeze(1)  # (N,) flat b * S + s

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> (N, C)"""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, S, C), zeros at padding"""
        out = rows.new_zeros(self.batch * self.length, rows.shape[-1])
        return out.index_copy_(0, self.index, rows).view(self.batch, self.length, -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, eager: bool,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for (B, H, S, hd) q/k/v and an additive mask broadcastable to
    (B, H, S, S). eager=False: torch's fused kernel (scaled_dot_product_attention); eager=True: the plain
    computation with an explicit float32 softmax (the `reference` mode, and the kernel
    `onepeace.modeling.cpu_choice` picks where it measured it faster)."""
    scale = q.shape[-1] ** -0.5
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    logits = (q * scale) @ k.transpose(-1, -2)
    if attn_mask is not None:
        logits = logits + attn_mask
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    return F.dropout(probs, dropout_p, dropout_p > 0) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive mask (relative bias + key padding as -inf).

    q_proj and v_proj have a bias, k_proj does not (as released). Options:
    `scale_heads`: a learned scalar per head on its output (`head_scale`);
    `magneto_scale_attn`: LayerNorm over D on the merged heads before `out_proj` (`inner_norm`).
    """

    def __init__(self, dim: int, num_heads: int, *, scale_heads: bool = False, magneto_scale_attn: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.head_scale = nn.Parameter(torch.ones(num_heads)) if scale_heads else None
        self.inner_norm = nn.LayerNorm(dim) if magneto_scale_attn else None
        self.dropout = dropout

    # ---- fused q/k/v for inference ----
    def fuse_projections(self) -> None:
        """Make q/k/v weights views into ONE (3D, D) tensor, so inference does one matmul instead of
        three (no extra memory: the parameters share the fused storage). Training (grad enabled)
        still uses the three Linear layers, whose in-place updates also update the fused tensor.
        Packed layers are refused: fusing concatenates dense weights (call model.to_dense() first)."""
        require_dense(self.q_proj, self.k_proj, self.v_proj, to="fuse q/k/v")
        with torch.no_grad():
            fused = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)
            D = self.q_proj.weight.shape[0]
            self.q_proj.weight.data = fused[:D]
            self.k_proj.weight.data = fused[D:2 * D]
            self.v_proj.weight.data = fused[2 * D:]
        self._qkv_weight = fused

    def unfuse_projections(self) -> None:
        """Drop the fused tensor (q/k/v keep their values; before packing, so it is not kept alive)."""
        self._qkv_weight = None

    def _fused_qkv(self) -> torch.Tensor | None:
        fused = getattr(self, "_qkv_weight", None)
        if fused is None or torch.is_grad_enabled():
            return None
        if not isinstance(self.q_proj, nn.Linear):  # packed since (pack_linears): the copy is stale
            self._qkv_weight = None
            return None
        # a load_state_dict(assign=True) or .to() replaces the parameters: never use a stale copy
        ptr, step = fused.data_ptr(), fused[0].numel() * fused.element_size() * self.q_proj.weight.shape[0]
        if (self.q_proj.weight.data_ptr() != ptr or self.k_proj.weight.data_ptr() != ptr + step
                or self.v_proj.weight.data_ptr() != ptr + 2 * step):
            self._qkv_weight = None
            return None
        return fused

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, eager: bool = False,
                rows: RealRows | None = None) -> torch.Tensor:
        """x: (B, S, D), or (N, D) real rows with `rows`; attn_mask: additive, broadcastable to
        (B, H, S, S), or None. Returns x's shape.

        eager=True: the plain computation (explicit float32 softmax), kept as the `reference` mode
        of the benchmarks."""
        H, hd = self.num_heads, self.head_dim
        fused = self._fused_qkv()
        if fused is not None or rows is not None:
            if fused is not None:  # one matmul; k has no bias
                bias = torch.cat([self.q_proj.bias, torch.zeros_like(self.q_proj.bias), self.v_proj.bias])
                qkv = F.linear(x, fused, bias)
            else:
                qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            if rows is not None:
                qkv = rows.scatter(qkv)  # (N, 3D) -> (B, S, 3D)
            B, S, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
            q, k, v = qkv.view(B, S, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        else:
            B, S, D = x.shape
            q = self.q_proj(x).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
            k = self.k_proj(x).view(B, S, H, hd).transpose(1, 2)
            v = self.v_proj(x).view(B, S, H, hd).transpose(1, 2)
        a = attend(q, k, v, attn_mask, eager, self.dropout if self.training else 0.0)  # (B, H, S, hd)
        if self.head_scale is not None:
            a = a * self.head_scale.view(1, H, 1, 1).to(a.dtype)
        a = a.transpose(1, 2).reshape(B, S, D)
        if rows is not None:
            a = rows.gather(a)  # (N, D)
        if self.inner_norm is not None:
            a = self.inner_norm(a)
        return self.out_proj(a)


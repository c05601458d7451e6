"""The shared multi-head self-attention of every encoder layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D); attn_mask: additive, broadcastable to (B, H, S, S), or None."""
        B, S, D = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, H, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, S, H, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, scale=hd ** -0.5
        )  # (B, H, S, hd)
        if self.head_scale is not None:
            a = a * self.head_scale.view(1, H, 1, 1).to(a.dtype)
        a = a.transpose(1, 2).reshape(B, S, D)
        if self.inner_norm is not None:
            a = self.inner_norm(a)
        return self.out_proj(a)

"""The task head of the released fine-tuned checkpoints (`one_peace_classify`, spec 8.1): visual
grounding, VQA, NLVR2 (two images), audio classification."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClassifyHeadConfig

__all__ = ["AttentionPooling", "ClassifyHead", "ClassifyHeadConfig"]


class AttentionPooling(nn.Module):
    """A learned query per head attends over the positions (no 1/sqrt(d) scaling, as released)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Parameter(torch.zeros(1, 1, num_heads, dim // num_heads))
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) without CLS, padding_mask (B, S) -> (B, D)."""
        B, S, D = x.shape
        H = self.num_heads
        k = self.k_proj(x).view(B, S, H, D // H)
        v = self.v_proj(x).view(B, S, H, D // H)
        logits = (self.q * k).sum(-1)  # (B, S, H)
        logits = logits.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(logits.float(), dim=1).to(x.dtype)  # over positions
        pooled = (weights.unsqueeze(-1) * v).sum(1).reshape(B, D)
        return self.out_proj(pooled)


class ClassifyHead(nn.Module):
    def __init__(self, cfg: ClassifyHeadConfig, dim: int, num_heads: int):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(dim)  # used after attention pooling only (present in every file)
        self.attn_pooling = AttentionPooling(dim, num_heads) if cfg.attn_pooling else None
        self.pooler = nn.Linear(dim, dim) if cfg.use_pooler else None
        in_dim = dim * (2 if cfg.use_two_images else 1)
        hidden = int(dim * cfg.head_scale_ratio)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc_norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, cfg.num_classes)

    def pool(self, hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, S, D) final states of the pooled modality (CLS first) -> (B, D)."""
        if self.attn_pooling is not None:
            x = self.norm(self.attn_pooling(hidden[:, 1:], padding_mask[:, 1:]))
        else:
            x = hidden[:, 0]
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return x

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc_norm(self.fc1(pooled))))

    RELEASED_NAMES = [
        (r"^norm\.(weight|bias)$", r"norm.\1"),
        (r"^attn_pooling\.q$", "attn_pooling_func.q"),
        (r"^attn_pooling\.(k_proj|v_proj|out_proj)\.(weight|bias)$", r"attn_pooling_func.\1.\2"),
        (r"^pooler\.(weight|bias)$", r"pooler.1.\1"),
        (r"^fc1\.(weight|bias)$", r"classifier.0.\1"),
        (r"^fc_norm\.(weight|bias)$", r"classifier.1.\1"),
        (r"^fc2\.(weight|bias)$", r"classifier.3.\1"),
    ]

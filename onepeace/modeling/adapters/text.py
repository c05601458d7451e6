"""Text adapter: token embedding + learned absolute positions (CLS at position 0) + 1-D relative bias."""
from __future__ import annotations

import torch
from torch import nn

from ...config import AdapterConfig
from ..relative_position import bucket_index_1d
from .base import Adapter, AdapterOutput

PAD_ID = 1


class TextAdapter(Adapter):
    RELEASED_NAMES = [
        (r"^token_embed\.weight$", "embed_tokens.weight"),
        (r"^pos_embed\.weight$", "embed_positions.weight"),
    ]

    # cfg: TextAdapterConfig (onepeace/modalities/text.py; not imported here: modeling sits below the plugins)
    def __init__(self, cfg: AdapterConfig, embed_dim: int, num_heads: int, num_rel_tables: int = 1):
        super().__init__(cfg, embed_dim, num_heads, num_rel_tables, num_rel_rows=2 * cfg.bucket_size + 2)
        self.token_embed = nn.Embedding(cfg.vocab_size, embed_dim, padding_idx=PAD_ID) if cfg.vocab_size else None
        self.pos_embed = nn.Embedding(cfg.max_positions, embed_dim)

    def bias_index(self, seq_len: int, device: torch.device) -> torch.Tensor:
        return bucket_index_1d(self.cfg.bucket_size, device=str(device))

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embed.weight[: x.shape[1]].unsqueeze(0)

    def forward(self, tokens: torch.Tensor, preserve_ids: torch.Tensor | None = None) -> AdapterOutput:
        """tokens: (B, T) int64 ids, right-padded with 1 -> (B, T + 1, D) with CLS first.

        preserve_ids (B, K): keep only these positions (masked pretraining), -1 = padding slot.
        """
        if self.token_embed is None:
            raise RuntimeError("this text adapter has no token embedding (a decoder adapter)")
        B, T = tokens.shape
        if T + 1 > self.cfg.max_positions:
            raise ValueError(f"text of {T} tokens is longer than the model's {self.cfg.max_positions - 1} positions")
        vocab = self.cfg.vocab_size
        if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            raise ValueError(
                f"token id {int(tokens.max())} is outside this model's vocabulary of {vocab} "
                "(was the text tokenized with another dictionary?)"
            )
        x = self.prepend_cls(self.token_embed(tokens))  # (B, T + 1, D)
        padding_mask = torch.cat([tokens.new_zeros(B, 1, dtype=torch.bool), tokens.eq(PAD_ID)], dim=1)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.finish(x + self.pos_embed.weight[: T + 1].unsqueeze(0))
        if preserve_ids is not None:
            return self.keep_rows(x, preserve_ids)
        return AdapterOutput(x, padding_mask)

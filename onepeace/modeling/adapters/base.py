"""What every modality adapter shares: CLS token, optional type embedding and embedding LayerNorm,
relative-position bias tables, and the output record the model assembles the encoder input from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import AdapterConfig
from ..layers import shrink_gradient


@dataclass
class AdapterOutput:
    tokens: torch.Tensor  # (B, S, D), CLS first
    padding_mask: torch.Tensor  # (B, S) bool, True = padding
    # (B, S) original positions of the rows when units were dropped (masked pretraining), else None
    positions: torch.Tensor | None = None
    full_length: int | None = None  # length of the full sequence `positions` index into


class Adapter(nn.Module):
    """Base class. Subclasses embed raw inputs into (B, S, D) tokens with CLS at position 0.

    `RELEASED_NAMES` maps this adapter's parameter names (relative to the adapter) to the names in the
    released checkpoints (relative to ``{prefix}{modality}_adapter.``): ``[(regex, replacement), ...]``,
    first match wins; names not matched keep their own name. See :mod:`onepeace.checkpoint`.
    """

    RELEASED_NAMES: ClassVar[list[tuple[str, str]]] = []
    # parameters kept only because the released files have them: `forward` never uses them, so no
    # gradient reaches them (tests/test_registry_models.py checks both ways)
    UNUSED_IN_FORWARD: ClassVar[tuple[str, ...]] = ()
    # set by OnePeaceModel.reference_mode: keep the plain computation (benchmarks' baseline)
    reference_mode: bool = False
    _COMMON_RELEASED_NAMES: ClassVar[list[tuple[str, str]]] = [
        (r"^cls_token$", "cls_embedding"),
        (r"^type_embed$", "type_embedding"),
        (r"^type_embed_2$", "type_embedding_2"),
        (r"^embed_norm\.(weight|bias)$", r"layernorm_embedding.\1"),
        (r"^rel_pos_tables\.(\d+)\.weight$", r"rel_pos_table_list.\1.weight"),
    ]

    def __init__(self, cfg: AdapterConfig, embed_dim: int, num_heads: int, num_rel_tables: int,
                 num_rel_rows: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.embed_norm = nn.LayerNorm(embed_dim) if cfg.layernorm_embedding else None
        self.type_embed = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cfg.add_type_embedding else None
        n_tables = num_rel_tables if cfg.use_attn_bias else 0
        # zero-initialised (as released): a new model starts with no positional preference
        self.rel_pos_tables = nn.ModuleList(nn.Embedding(num_rel_rows, num_heads) for _ in range(n_tables))
        for table in self.rel_pos_tables:
            nn.init.zeros_(table.weight)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def num_rel_tables(self) -> int:
        return len(self.rel_pos_tables)

    # ---- to be provided by subclasses ----
    def bias_index(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(S, S) int64 indices into a relative-bias table for a full sequence of S positions."""
        raise NotImplementedError

    def relative_bias_table(self, table: int, seq_len: int) -> torch.Tensor:
        """The rows of table `table` to index with :meth:`bias_index` (image adapters may resample)."""
        return self.rel_pos_tables[table].weight

    # ---- shared ----
    def attention_bias(self, table: int, out: AdapterOutput) -> torch.Tensor:
        """Relative bias of table `table` for this adapter's rows: (1, H, S, S), or (B, H, S, S) when
        rows were dropped (gathered at their original positions)."""
        S = out.tokens.shape[1] if out.positions is None else out.full_length
        if out.positions is None:
            index = self.bias_index(S, out.tokens.device)[:S, :S]
        else:
            full = self.bias_index(S, out.tokens.device)
            pos = out.positions  # (B, K)
            index = full[pos[:, :, None], pos[:, None, :]]  # (B, K, K)
        weight = self.relative_bias_table(table, S)
        bias = nn.functional.embedding(index, weight)  # (..., S, S, H)
        if bias.dim() == 3:
            return bias.permute(2, 0, 1).unsqueeze(0)
        return bias.permute(0, 3, 1, 2)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Type embedding, gradient shrink and dropout: the common tail of every adapter."""
        if self.type_embed is not None:
            x = x + self.type_embed
        x = shrink_gradient(x, self.cfg.shrink_alpha)
        return self.dropout(x)

    def keep_rows(self, x: torch.Tensor, preserve_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
                  ) -> AdapterOutput:
        """Masked (student) pass: keep the rows `preserve_ids` (B, K) of a full (B, S, D) sequence.

        A -1 slot is padding; it takes the row at index K - 1, as the reference does (its value is
        zeroed and masked as a key later). The bias will be gathered at the original positions.
        """
        K = preserve_ids.shape[1]
        pad = preserve_ids.eq(-1)
        positions = preserve_ids.masked_fill(pad, K - 1)  # (B, K)
        rows = torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return AdapterOutput(rows, pad, positions=positions, full_length=x.shape[1])

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder use: add only this adapter's absolute positions to a full (B, S, D) sequence."""
        raise NotImplementedError(f"{type(self).__name__} cannot act as a decoder adapter")

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S + 1, D)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    def released_name_rules(self) -> list:
        """Rules for this instance (an adapter whose names depend on its config overrides this)."""
        return self.released_names()

    @classmethod
    def released_names(cls) -> list[tuple[str, str]]:
        return cls._COMMON_RELEASED_NAMES + cls.RELEASED_NAMES

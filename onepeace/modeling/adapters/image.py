"""Image adapter: patch stem (hmlp or one conv) + learned absolute grid positions + 2-D relative bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig
from ..layers import ChannelLayerNorm
from ..relative_position import bucket_index_2d
from .base import Adapter, AdapterOutput


class HierarchicalMLPStem(nn.Module):
    """hmlp: 16x16 patches in three steps, conv4/4 -> LN -> GELU -> conv2/2 -> LN -> GELU -> conv2/2."""

    def __init__(self, dim: int):
        super().__init__()
        inner = dim // 4
        self.conv1 = nn.Conv2d(3, inner, kernel_size=4, stride=4)
        self.norm1 = ChannelLayerNorm(inner)
        self.conv2 = nn.Conv2d(inner, inner, kernel_size=2, stride=2)
        self.norm2 = ChannelLayerNorm(inner)
        self.conv3 = nn.Conv2d(inner, dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D, S/16, S/16)
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class LinearPatchStem(nn.Module):
    """mlp: one 16x16 stride-16 conv without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=16, stride=16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ImageAdapter(Adapter):
    RELEASED_NAMES = [
        (r"^patch_embed\.proj\.weight$", "embed_images.weight"),
        (r"^patch_embed\.conv1\.(weight|bias)$", r"embed_images.0.\1"),
        (r"^patch_embed\.norm1\.norm\.(weight|bias)$", r"embed_images.1.layer_norm.\1"),
        (r"^patch_embed\.conv2\.(weight|bias)$", r"embed_images.3.\1"),
        (r"^patch_embed\.norm2\.norm\.(weight|bias)$", r"embed_images.4.layer_norm.\1"),
        (r"^patch_embed\.conv3\.(weight|bias)$", r"embed_images.6.\1"),
    ]

    # cfg: ImageAdapterConfig (onepeace/modalities/image.py; not imported here: modeling sits below the plugins)
    def __init__(self, cfg: AdapterConfig, embed_dim: int, num_heads: int, num_rel_tables: int = 1):
        rb = cfg.rel_bucket_size
        super().__init__(cfg, embed_dim, num_heads, num_rel_tables, num_rel_rows=(2 * rb - 1) ** 2 + 3)
        stems = {"hmlp": HierarchicalMLPStem, "mlp": LinearPatchStem}
        if cfg.vision_encoder_type not in (*stems, "none"):
            raise ValueError(f"unknown vision_encoder_type {cfg.vision_encoder_type!r}; known: {[*stems, 'none']}")
        self.patch_embed = stems[cfg.vision_encoder_type](embed_dim) if cfg.vision_encoder_type != "none" else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.bucket_size ** 2 + 1, embed_dim))
        # a second type embedding marks the second image of two-image tasks (NLVR2)
        self.type_embed_2 = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cfg.add_type_embedding else None

    def grid_positions(self, grid: int) -> torch.Tensor:
        """(grid^2 + 1, D) absolute positions: CLS row + the bucket grid, bicubic-resized if needed."""
        b = self.cfg.bucket_size
        if grid == b:
            return self.pos_embed
        cls_pos, table = self.pos_embed[:1], self.pos_embed[1:]
        table = table.float().reshape(1, b, b, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, table], dim=0)

    def bias_index(self, seq_len: int, device: torch.device) -> torch.Tensor:
        return bucket_index_2d(_grid_of(seq_len), device=str(device))

    def relative_bias_table(self, table: int, seq_len: int) -> torch.Tensor:
        weight = self.rel_pos_tables[table].weight
        grid, rb = _grid_of(seq_len), self.cfg.rel_bucket_size
        if grid == rb:
            return weight
        # Our extension (the reference supports only grid == rel_bucket_size): resample the
        # (2rb-1) x (2rb-1) distance table bicubically to (2g-1) x (2g-1); keep the 3 CLS rows.
        span, new_span = 2 * rb - 1, 2 * grid - 1
        dist = weight[:-3].float().T.reshape(1, -1, span, span)
        dist = F.interpolate(dist, size=(new_span, new_span), mode="bicubic", align_corners=False)
        dist = dist.reshape(-1, new_span * new_span).T.to(weight.dtype)
        return torch.cat([dist, weight[-3:]], dim=0)

    def num_patches(self, image_size: int) -> int:
        return (image_size // self.cfg.patch_size) ** 2

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.grid_positions(_grid_of(x.shape[1])).unsqueeze(0)

    def forward(self, images: torch.Tensor, second_image: bool = False,
                preserve_ids: torch.Tensor | None = None) -> AdapterOutput:
        """images: (B, 3, S, S) normalised -> (B, (S/16)^2 + 1, D), CLS first, no padding."""
        if self.patch_embed is None:
            raise RuntimeError("this image adapter has no patch stem (a decoder adapter)")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        if images.shape[-1] % 16:
            raise ValueError(f"image side {images.shape[-1]} is not a multiple of 16 pixels")
        x = self.patch_embed(images)  # (B, D, g, g)
        grid = x.shape[-1]
        x = self.prepend_cls(x.flatten(2).transpose(1, 2))  # (B, g*g + 1, D), patches row-major
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = x + self.grid_positions(grid).unsqueeze(0)
        if second_image:
            if self.type_embed_2 is None:
                raise ValueError("this model has no second-image type embedding")
            x = x + self.type_embed_2
        x = self.finish(x)
        if preserve_ids is not None:
            return self.keep_rows(x, preserve_ids)
        padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        return AdapterOutput(x, padding_mask)


def _grid_of(seq_len: int) -> int:
    grid = int(round((seq_len - 1) ** 0.5))
    if grid * grid + 1 != seq_len:
        raise ValueError(f"an image sequence of {seq_len} rows is not a square grid plus CLS")
    return grid

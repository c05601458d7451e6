"""The image modality, in one file: config, adapter, preprocessing, collate, released
checkpoint format, file suffixes, registration.

An image is a path or PIL image -> ``(3, S, S)`` float32, CLIP-normalised (onepeace/data/image.py:
the reference's bicubic resize); a batch stacks to ``(B, 3, S, S)``. The adapter
(onepeace/modeling/adapters/image.py) cuts 16 x 16 patches and adds CLS and grid positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..config import CLIP_MEAN, CLIP_STD, AdapterConfig
from ..data.image import IMAGE_EXTENSIONS, ImageTransform
from ..inference import require_branch
from ..modeling.adapters.image import ImageAdapter
from ..registry import register_modality


@dataclass(frozen=True)
class ImageAdapterConfig(AdapterConfig):
    image_size: int = 256  # preprocessing: square input side in pixels (16 pixels per patch)
    bucket_size: int = 16  # side of the learned absolute position grid
    rel_bucket_size: int = 16  # side of the grid the 2-D relative bias table was built for
    vision_encoder_type: str = "hmlp"  # "hmlp" (released), "mlp" (one 16x16 conv), "none" (decoder)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    kind: ClassVar[str] = "image"
    patch_size: ClassVar[int] = 16

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def decoder_variant(self) -> "ImageAdapterConfig":
        return ImageAdapterConfig(vision_encoder_type="none", use_attn_bias=False, image_size=self.image_size,
                                  bucket_size=self.bucket_size, rel_bucket_size=self.rel_bucket_size)

    @classmethod
    def from_released(cls, view, args: Mapping[str, Any]) -> "ImageAdapterConfig":
        """Grid side from the (g*g + 1) position rows; the bias grid from the table's (2r-1)^2 + 3 rows;
        the stem from which weights exist; the input side from the task cfg (else 16 pixels a patch)."""
        common = view.common(args)  # first: its notes come before ours
        pos, table = view.require("pos_embed", "the image position table"), view.shape("rel_pos_table_list.0.weight")
        bucket = round((pos[0] - 1) ** 0.5)
        rel_bucket = round(((table[0] - 3) ** 0.5 + 1) / 2) if table else args.get("rel_bucket_size", bucket)
        if view.has("embed_images.0.weight"):
            stem = "hmlp"
        elif view.has("embed_images.weight"):
            stem = "mlp"
        elif view.is_encoder:  # an encoder's patch embedding is required (only the decoder has none)
            key = "embed_images.weight" if args.get("vision_encoder_type") == "mlp" else "embed_images.0.weight"
            view.require(key, "the image branch's patch embedding")
        else:
            stem = "none"
        return cls(
            **common,
            image_size=int(view.task.get("patch_image_size", bucket * 16)),
            bucket_size=view.pick("bucket_size", args.get("bucket_size"), bucket),
            rel_bucket_size=view.pick("rel_bucket_size", args.get("rel_bucket_size"), rel_bucket),
            vision_encoder_type=view.pick("vision_encoder_type", args.get("vision_encoder_type"), stem),
        )

    def to_released(self, task: dict[str, Any]) -> dict[str, Any]:
        task["patch_image_size"] = self.image_size
        return super().to_released(task)


# ---- preprocessing ----
def image_transform(model) -> ImageTransform:
    """path / PIL image -> (3, S, S) float32 at this model's side and normalisation."""
    require_branch(model, "image")
    cfg = model.config.adapters["image"]
    return ImageTransform(size=cfg.image_size, mean=tuple(cfg.mean), std=tuple(cfg.std))


def collate_images(model, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(3, S, S) tensors -> {"image": (B, 3, S, S)} (one forward per batch: no faster path needed)."""
    return {"image": torch.stack(list(items))}


def example_images(model, n: int) -> dict[str, torch.Tensor]:
    """n random normalised images at this model's side."""
    side = model.config.adapters["image"].image_size
    return collate_images(model, list(torch.randn(n, 3, side, side)))


register_modality("image", ImageAdapterConfig, ImageAdapter, image_transform, collate_images,
                  suffixes=IMAGE_EXTENSIONS, batch_size=32, example=example_images)

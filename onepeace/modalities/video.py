"""The video modality, in one file: config, adapter, preprocessing, collate, registration.

A clip is T frames. Each frame goes through an image-style patch stem (the same hmlp / one-conv
stems as the image adapter), gets a learned spatial position (one per patch of the grid, shared by
all frames) and a learned temporal position (one per frame, shared by all patches); the patches of
all frames, in frame order, follow one CLS token::

    (B, T, 3, S, S) --stem per frame--> (B, T, g*g, D) + spatial[g*g] + temporal[T]
                    --flatten, CLS first--> (B, 1 + T*g*g, D)

Nothing else of the model changes: listing ``"video"`` in ``ModelConfig.adapters`` makes the
encoder build a video FFN expert in every layer and a video final LayerNorm, and the model a video
projection head (see onepeace/modeling/model.py and docs/adding-a-modality.md).

Video has no relative attention bias (``use_attn_bias=False``): its tokens carry absolute spatial
and temporal positions only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..config import CLIP_MEAN, CLIP_STD, AdapterConfig
from ..data.image import ImageTransform, InputError
from ..data.video_file import VIDEO_FILE_EXTENSIONS, VideoFileOptions, is_video_file, read_video
from ..modeling.adapters.base import Adapter, AdapterOutput
from ..modeling.adapters.image import HierarchicalMLPStem, ImageAdapter, LinearPatchStem
from ..registry import register_modality

STEMS = {"hmlp": HierarchicalMLPStem, "mlp": LinearPatchStem}


@dataclass(frozen=True)
class VideoAdapterConfig(AdapterConfig):
    num_frames: int = 8  # frames per clip (preprocessing samples this many, evenly spaced)
    image_size: int = 64  # frame side in pixels (16 pixels per patch)
    vision_encoder_type: str = "hmlp"  # the per-frame patch stem: "hmlp" or "mlp"
    use_attn_bias: bool = False  # no relative bias: absolute spatial + temporal positions only
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    kind: ClassVar[str] = "video"
    patch_size: ClassVar[int] = 16

    def __post_init__(self) -> None:
        if self.use_attn_bias:
            raise ValueError("the video adapter has no relative attention bias: use_attn_bias must be False")
        if self.image_size % self.patch_size:
            raise ValueError(f"video image_size {self.image_size} is not a multiple of {self.patch_size} pixels")
        if self.vision_encoder_type not in STEMS:
            raise ValueError(f"unknown video vision_encoder_type {self.vision_encoder_type!r}; known: {sorted(STEMS)}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


class VideoAdapter(Adapter):
    def __init__(self, cfg: VideoAdapterConfig, embed_dim: int, num_heads: int, num_rel_tables: int = 1):
        super().__init__(cfg, embed_dim, num_heads, num_rel_tables, num_rel_rows=0)
        self.patch_embed = STEMS[cfg.vision_encoder_type](embed_dim)
        self.spatial_pos = nn.Parameter(torch.zeros(cfg.grid_size ** 2 + 1, embed_dim))  # row 0: CLS
        self.temporal_pos = nn.Parameter(torch.zeros(cfg.num_frames, embed_dim))
        nn.init.trunc_normal_(self.spatial_pos, std=0.02)
        nn.init.trunc_normal_(self.temporal_pos, std=0.02)

    def forward(self, videos: torch.Tensor) -> AdapterOutput:
        """videos: (B, T, 3, S, S) normalised frames, T <= num_frames -> (B, 1 + T*(S/16)^2, D)."""
        if videos.dim() != 5 or videos.shape[2] != 3 or videos.shape[3] != videos.shape[4]:
            raise ValueError(f"videos must be (B, T, 3, S, S), got {tuple(videos.shape)}")
        B, T, _, S, _ = videos.shape
        if T > self.cfg.num_frames:
            raise ValueError(f"{T} frames but this video adapter has {self.cfg.num_frames} temporal positions")
        if S != self.cfg.image_size:
            raise ValueError(f"frame side {S} but this video adapter takes {self.cfg.image_size}-pixel frames")
        x = self.patch_embed(videos.flatten(0, 1))  # (B*T, D, g, g)
        x = x.flatten(2).transpose(1, 2).reshape(B, -1, self.embed_dim)  # (B, T*g*g, D): frame, then row-major patch
        x = self.prepend_cls(x)  # (B, 1 + T*g*g, D)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        # (T, g*g, D) spatial + temporal positions, flattened in the token order, after the CLS row
        patches = (self.spatial_pos[1:].unsqueeze(0) + self.temporal_pos[:T, None]).flatten(0, 1)
        x = x + torch.cat([self.spatial_pos[:1], patches]).unsqueeze(0)
        x = self.finish(x)
        return AdapterOutput(x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))

    @torch.no_grad()
    def initialize_from(self, other: Adapter) -> None:
        """Start from a trained image adapter: its stem, CLS and grid positions (resized to this grid),
        so that a clip of T identical frames starts close to that image. Temporal positions stay new."""
        if not isinstance(other, ImageAdapter):
            raise TypeError(f"a video adapter initialises from an image adapter, not {type(other).__name__}")
        if other.patch_embed is None or type(other.patch_embed) is not type(self.patch_embed):
            raise ValueError("the image adapter's patch stem differs from this video adapter's "
                             f"({self.cfg.vision_encoder_type!r})")
        self.patch_embed.load_state_dict(other.patch_embed.state_dict())
        self.cls_token.copy_(other.cls_token)
        self.spatial_pos.copy_(other.grid_positions(self.cfg.grid_size))
        self.temporal_pos.zero_()
        if self.embed_norm is not None and other.embed_norm is not None:
            self.embed_norm.load_state_dict(other.embed_norm.state_dict())
        if self.type_embed is not None and other.type_embed is not None:
            self.type_embed.copy_(other.type_embed)


# ---- preprocessing ----
def read_frames(source: Any, num_frames: int = 8) -> list:
    """A clip as a list of PIL images: a path to an animated image (GIF, APNG, WebP), a folder of
    image files (sorted by name), a sequence of paths / PIL images, or a (T, H, W[, 3]) uint8 array.
    A video file (.mp4 .webm .mkv .mov ..., decoded with PyAV) gives its `num_frames` uniformly
    sampled frames only (never the whole file)."""
    from PIL import Image, ImageSequence

    if is_video_file(source):
        return read_video(source, VideoFileOptions(num_frames=num_frames, audio=False)).frames
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith("."))
            if not names:
                raise InputError(f"cannot read video {path!r}: the folder has no frame files")
            return [os.path.join(path, n) for n in names]
        if not os.path.exists(path):
            raise InputError(f"cannot read video {path!r}: file not found")
        try:
            with Image.open(path) as clip:
                return [frame.convert("RGB") for frame in ImageSequence.Iterator(clip)]
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise InputError(f"cannot read video {path!r}: {e}") from e
    if isinstance(source, (np.ndarray, torch.Tensor)):
        arr = np.asarray(source)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
            raise InputError(f"a video array must be uint8 (T, H, W) or (T, H, W, 3), got {arr.dtype} {arr.shape}")
        return [Image.fromarray(frame) for frame in arr]
    if isinstance(source, Sequence) and len(source) > 0:
        return list(source)
    raise InputError(f"cannot read video from {type(source).__name__}: give a path, a folder, frames or an array")


def sample_frame_indices(n_frames: int, num: int) -> list[int]:
    """`num` evenly spaced indices into n_frames frames (repeats when the clip is shorter)."""
    return [min(n_frames - 1, int((i + 0.5) * n_frames / num)) for i in range(num)]


@dataclass(frozen=True)
class VideoTransform:
    """Callable: clip -> (num_frames, 3, S, S) float32, each frame prepared as an image."""

    num_frames: int
    frame: ImageTransform

    def __call__(self, source: Any) -> torch.Tensor:
        frames = read_frames(source, self.num_frames)
        return torch.stack([self.frame(frames[i]) for i in sample_frame_indices(len(frames), self.num_frames)])


def video_transform(model) -> VideoTransform:
    cfg = model.config.adapters["video"]
    return VideoTransform(cfg.num_frames, ImageTransform(size=cfg.image_size, mean=tuple(cfg.mean), std=tuple(cfg.std)))


def collate_videos(model, clips: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prepared clips (T, 3, S, S), all of the same T -> {"video": (B, T, 3, S, S)}."""
    lengths = {c.shape[0] for c in clips}
    if len(lengths) > 1:
        raise ValueError(f"clips of a batch must have the same number of frames, got {sorted(lengths)}")
    return {"video": torch.stack(list(clips))}


def example_videos(model, n: int) -> dict[str, torch.Tensor]:
    """n random clips of normalised frames at this model's frame count and side."""
    cfg = model.config.adapters["video"]
    return collate_videos(model, list(torch.randn(n, cfg.num_frames, 3, cfg.image_size, cfg.image_size)))


def compose_video_files(model, sources: Sequence[Any], batch_size: int = 32, **options: Any) -> torch.Tensor:
    """Without a video branch (the released model): frames through the image branch, averaged, fused
    with the audio track's embedding (onepeace.video_files, imported here: it needs the model's API)."""
    from ..video_files import compose_video_files as compose

    return compose(model, sources, batch_size, **options)


# video files (.mp4 .webm .mkv .mov ...) are this modality's: the trained branch when the model has one,
# else compose_video_files; GIFs stay images (a folder or a GIF is a clip with `--as video`)
register_modality("video", VideoAdapterConfig, VideoAdapter, video_transform, collate_videos, example=example_videos,
                  suffixes=sorted(VIDEO_FILE_EXTENSIONS), batch_size=4, compose=compose_video_files)

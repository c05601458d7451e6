"""Video files with the released weights, no training: the frames' image embeddings averaged, the
audio track's embedding, and their fusion (``model.encode_video``).

The released ONE-PEACE has no video branch; the official maintainers' answer for video is "average
the frame embeddings". Per clip::

    frames  = normalise(mean_t image_branch(frame_t))        over the uniformly sampled frames
    audio   = audio_branch(the audio track, mono, the audio branch's rate, first 15 s)   if any
    fused   = normalise(frames + audio) / normalise(frames) without a track

all in the one shared embedding space, so a text, image or audio query finds the clip. The video
modality registers :func:`compose_video_files` as its path for models without a video branch (its
files: .mp4 .webm .mkv .mov ...), which is what `onepeace embed / index / search / serve` use; a
model WITH a trained video branch (``onepeace demo-video``) embeds the files with that branch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .data.video_file import DecodedVideo, VideoFileOptions, read_video

FUSIONS = ("fused", "frames", "audio")  # which embedding the batch path indexes


@dataclass
class VideoEmbeddings:
    """encode_video's result for N clips (D the model's width), all float32 on the CPU.

    `audio` has a NaN row for a clip without an audio track (or a model without an audio branch);
    `has_audio` is the mask of real rows. `fused` is `frames` for such a clip."""

    frames: torch.Tensor  # (N, D) L2-normalised mean of the sampled frames' image embeddings
    audio: torch.Tensor  # (N, D) L2-normalised audio-track embedding, NaN rows where there is none
    has_audio: torch.Tensor  # (N,) bool
    fused: torch.Tensor  # (N, D) L2-normalised mean of the available embeddings
    times: list[list[float]] = field(default_factory=list)  # per clip: the sampled frames' times (s)
    audio_errors: list[str | None] = field(default_factory=list)  # per clip: why a present track was unusable


def video_options(model, **overrides: Any) -> VideoFileOptions:
    """Decoding options for this model: audio kept up to the audio branch's crop (15 s released)."""
    audio_cfg = model.config.adapters.get("audio")
    base = VideoFileOptions(audio=audio_cfg is not None,
                            max_audio_seconds=getattr(audio_cfg, "max_seconds", VideoFileOptions.max_audio_seconds))
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def decode(model, source: str | os.PathLike | DecodedVideo, options: VideoFileOptions) -> DecodedVideo:
    if isinstance(source, DecodedVideo):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"encode_video takes video file paths (or DecodedVideo), got {type(source).__name__}")
    rate = model.config.adapters["audio"].sample_rate if "audio" in model.adapters else 16000
    return read_video(source, options, audio_rate=rate)


@torch.inference_mode()
def encode_video(model, items: Sequence[Any], num_frames: int | None = None, fps: float | None = None,
                 max_frames: int | None = None, audio: bool | None = None, batch_size: int = 32,
                 options: VideoFileOptions | None = None) -> VideoEmbeddings:
    """Video files -> :class:`VideoEmbeddings` (frames, audio, has_audio, fused), row i for item i.
    Sampling: `num_frames` uniform frames (default 8) or `fps` frames per second, at most
    `max_frames` (default 64); `audio=False` skips the track. Needs the image branch; the audio
    branch is used when the model has one. Raises InputError naming a file that cannot be read."""
    if "image" not in model.adapters:
        raise ValueError(f"video files are embedded with the image branch; this model has {list(model.modalities)}")
    options = options or video_options(model, num_frames=num_frames, fps=fps, max_frames=max_frames,
                                       audio=None if audio is None else (audio and "audio" in model.adapters))
    dim = model.config.encoder.embed_dim
    n = len(items)
    frames, audios = torch.zeros(n, dim), torch.full((n, dim), math.nan)
    has_audio = torch.zeros(n, dtype=torch.bool)
    times, errors = [], []
    for i, source in enumerate(items):
        clip = decode(model, source, options)
        frame_emb = model.encode_items("image", clip.frames, batch_size=batch_size).float().cpu()  # (T, D)
        frames[i] = torch.nn.functional.normalize(frame_emb.mean(0), dim=-1)
        if clip.audio is not None and "audio" in model.adapters and options.audio:
            audios[i] = model.encode_audio([clip.audio])[0].float().cpu()
            has_audio[i] = True
        times.append(clip.times)
        errors.append(clip.audio_error)
    # (a + b) / |a + b| of unit vectors: the normalised mean
    both = torch.nn.functional.normalize(frames + audios.nan_to_num(0.0), dim=-1)
    fused = torch.where(has_audio[:, None], both, frames)  # without a track: exactly the frame average
    return VideoEmbeddings(frames, audios, has_audio, fused, times, errors)


def compose_video_files(model, sources: Sequence[Any], batch_size: int = 32, use: str = "fused",
                        **options: Any) -> torch.Tensor:
    """The video modality's path for models without a video branch: (N, D) `use` embeddings
    ("fused", "frames" or "audio"; a clip without a track falls back to its frames)."""
    if use not in FUSIONS:
        raise ValueError(f"use must be one of {FUSIONS}, got {use!r}")
    out = encode_video(model, sources, batch_size=batch_size, **options)
    if use == "audio":
        return torch.where(out.has_audio[:, None], out.audio, out.frames)
    return out.fused if use == "fused" else out.frames

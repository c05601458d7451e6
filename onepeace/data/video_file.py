"""Video files (mp4, webm, mkv, mov, ...) -> uniformly sampled frames and the audio track, with PyAV.

PyAV (``pip install 'onepeace[video]'``, the `av` package: it ships its own FFmpeg) is imported
inside the functions, so the library imports without it.

Memory is bounded by what is kept, not by the file: only the sampled frames (PIL images) and at
most `max_audio_seconds` of mono audio are held. Frames are found either in one sequential pass that
keeps the last decoded frame before each target time (short files), or by one seek per target to
the keyframe before it and decoding forward from there (long files: a 2-hour film costs
`num_frames` seeks, never a full decode).

Sampling: `count` target times spread uniformly over the clip, target i at (i + 0.5) * duration / count
(the centre of the i-th of `count` equal segments; frame index int((i + 0.5) * n / count) for a
constant-rate clip of n frames, the same rule as onepeace.modalities.video.sample_frame_indices).
`count` is `num_frames`, or round(duration * fps) when a rate is given, capped to [1, max_frames].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .image import InputError

# container suffixes FFmpeg reads (the video modality registers them for files on disk)
VIDEO_FILE_EXTENSIONS = frozenset({".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi"})
_EPS = 1e-4  # seconds: timestamps within this of a target count as at the target (far below a frame)


@dataclass(frozen=True)
class VideoFileOptions:
    num_frames: int = 8  # frames sampled uniformly over the clip (ignored when fps is given)
    fps: float | None = None  # sample this many frames per second instead (e.g. 1.0), capped by max_frames
    max_frames: int = 64  # the cap on the sampled frames (memory: each kept frame is one decoded picture)
    audio: bool = True  # decode the audio track when there is one
    max_audio_seconds: float | None = 15.0  # keep the first N s of audio (the audio branch's crop); None: all
    seek: bool | None = None  # one seek per frame; None: seek when the clip is longer than seek_after_s
    seek_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.max_frames < 1:
            raise ValueError(f"num_frames and max_frames must be >= 1, got {self.num_frames}, {self.max_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    def frame_count(self, duration: float) -> int:
        wanted = self.num_frames if self.fps is None else round(duration * self.fps)
        return max(1, min(self.max_frames, wanted))


@dataclass
class DecodedVideo:
    path: str
    frames: list  # the sampled frames, PIL RGB images, in time order
    times: list[float]  # seconds from the clip's start of each sampled frame
    indices: list[int]  # frame numbers (time * frame rate, rounded) of the sampled frames
    duration: float  # seconds
    fps: float  # the video stream's average frame rate
    audio: tuple[np.ndarray, int] | None  # ((S,) float32 mono waveform, sample rate), None: no audio track
    audio_error: str | None = None  # why a present audio track could not be decoded (audio is then None)


def require_av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding video files needs PyAV: pip install 'onepeace[video]' (or av)") from None
    return av


def sample_times(duration: float, count: int) -> list[float]:
    """`count` uniform target times in [0, duration): the centres of `count` equal segments."""
    return [(i + 0.5) * duration / count for i in range(count)]


def read_video(path: str | os.PathLike, options: VideoFileOptions = VideoFileOptions(),
               audio_rate: int = 16000) -> DecodedVideo:
    """Decode the sampled frames and (options.audio) the audio track, mixed to mono and resampled
    to `audio_rate`, of one video file. Raises InputError naming the file when it cannot be read,
    has no video stream or no decodable frame."""
    av = require_av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        why = ("a folder (a folder of frames needs a model with a trained video branch)" if os.path.isdir(path)
               else "file not found")
        raise InputError(f"cannot read video {path!r}: {why}")
    if os.path.getsize(path) == 0:
        raise InputError(f"cannot read video {path!r}: the file is empty (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise InputError(f"cannot read video {path!r}: the file has no video stream "
                                 f"({len(container.streams.audio)} audio stream(s) only)")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            start, duration = _start_and_duration(container, stream, fps)
            count = options.frame_count(duration)
            targets = [start + t for t in sample_times(duration, count)]
            seek = options.seek if options.seek is not None else duration > options.seek_after_s
            picked = _seek_frames(container, stream, targets) if seek else _scan_frames(container, stream, targets)
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot read video {path!r}: {_why(e)}") from e
    if any(p is None for p in picked):
        raise InputError(f"cannot read video {path!r}: no frame could be decoded")
    times = [t - start for t, _ in picked]
    audio, audio_error = _read_audio(av, path, audio_rate, options) if options.audio else (None, None)
    return DecodedVideo(path, [img for _, img in picked], times, [round(t * fps) for t in times], duration, fps,
                        audio, audio_error)


def _why(e: Exception) -> str:
    """FFmpeg's message without its errno and the repeated path ("Invalid data found when processing input")."""
    return getattr(e, "strerror", None) or str(e)


def _frame_time(frame, stream, fallback: float) -> float:
    return float(frame.pts * stream.time_base) if frame.pts is not None else fallback


def _start_and_duration(container, stream, fps: float) -> tuple[float, float]:
    """(start, duration) in seconds from the stream's header, else the container's; a file that
    declares neither is scanned once (decoding frames without keeping them) to count them."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    if stream.duration:
        return start, float(stream.duration * tb)
    if container.duration:
        return start, container.duration / 1_000_000  # AV_TIME_BASE: microseconds
    n = sum(1 for _ in container.decode(stream))
    container.seek(0)
    if n == 0:
        raise InputError("no frame could be decoded")
    return start, n / fps


def _scan_frames(container, stream, targets: list[float]) -> list:
    """One pass: for each target, the last frame starting at or before it -> [(time, PIL image)].
    Only the previous decoded frame is held; a frame becomes a picture only when it is picked."""
    picked: list = []
    prev = None  # (time, av.VideoFrame) of the last frame decoded
    rate = float(stream.average_rate or 25)
    for k, frame in enumerate(container.decode(stream)):
        t = _frame_time(frame, stream, k / rate)
        while len(picked) < len(targets) and t > targets[len(picked)] + _EPS:
            first = prev if prev is not None else (t, frame)  # a target before the first frame: take it
            picked.append((first[0], first[1].to_image()))
        if len(picked) == len(targets):
            break
        prev = (t, frame)
    while len(picked) < len(targets):  # targets after the last frame (a header longer than the stream)
        picked.append(None if prev is None else (prev[0], prev[1].to_image()))
    return picked


def _seek_frames(container, stream, targets: list[float]) -> list:
    """One seek per target to the keyframe before it, then decode forward to the target."""
    picked = []
    for target in targets:
        container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True, any_frame=False)
        prev = after = None
        for frame in container.decode(stream):
            if _frame_time(frame, stream, target) > target + _EPS:
                after = frame  # the first frame past the target: used when none starts before it
                break
            prev = frame
        chosen = prev if prev is not None else after
        picked.append(None if chosen is None else (_frame_time(chosen, stream, target), chosen.to_image()))
    return picked


def _read_audio(av, path: str, rate: int, options: VideoFileOptions
                ) -> tuple[tuple[np.ndarray, int] | None, str | None]:
    """The first audio track, mono float32 at `rate`, at most max_audio_seconds -> ((S,), rate), or
    (None, None) without a track, or (None, why) when the track cannot be decoded."""
    limit = None if options.max_audio_seconds is None else int(options.max_audio_seconds * rate)
    chunks: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None, None
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
            total = 0
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
                    total += chunks[-1].shape[0]
                if limit is not None and total >= limit:
                    break
            else:
                chunks += [out.to_ndarray()[0] for out in resampler.resample(None)]
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        return None, f"cannot decode the audio track: {_why(e)}"
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.shape[0] == 0:
        return None, "the audio track has no samples"
    return (wave[:limit] if limit is not None else wave, rate), None


def is_video_file(source: Any) -> bool:
    """Whether `source` is a path whose suffix is a video container's."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    return os.path.splitext(os.fspath(source))[1].lower() in VIDEO_FILE_EXTENSIONS

"""Audio loading, preparation and batching for the ONE-PEACE audio adapter.

The reference pipeline (spec section 7.3), for one clip::

    decode to float -> mean over channels (mono) -> resample to 16 kHz (soxr, high quality)
      -> layer_norm over the WHOLE clip (zero mean, unit variance, eps 1e-5, no affine)
      -> keep at most the first 15 s -> if shorter than 1 s, tile to exactly 1 s

and for a batch: right-pad with zeros to the longest clip, plus a padding mask over the
adapter's T'+1 positions (CLS + conv frames), True where padded.

``load_audio`` does the decoding part, ``prepare_waveform`` the normalise/crop/tile part,
``collate_waveforms`` the batching, and ``AudioTransform`` chains the first two.

Note the order: the reference normalises BEFORE cropping, so the statistics come from the full
clip. ``load_audio(max_seconds=...)`` (bounded decoding) therefore changes the normalisation of
clips longer than ``max_seconds`` (+ 0.1 s); ``AudioTransform`` only uses it when asked to
(``decode_seconds``). The model's transform does ask: a model reads at most 15 s, and decoding a
whole file to keep 15 s of it let a small compressed file cost gigabytes (issue 17).

Work per file is bounded: the header is probed first and a decode of more than
:data:`MAX_AUDIO_SAMPLES` samples (frames x channels) is refused with a message saying how to raise
the limit; files are read in blocks that are mixed to mono as they come.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F

from onepeace.data.image import InputError

__all__ = [
    "AUDIO_EXTENSIONS",
    "MAX_AUDIO_SAMPLES",
    "SAMPLE_RATE",
    "InputError",
    "load_audio",
    "normalize_waveform",
    "prepare_waveform",
    "feature_lengths",
    "collate_waveforms",
    "AudioTransform",
]

#: File suffixes (lower case) treated as audio when scanning folders.
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus"})

#: The sample rate ONE-PEACE's audio adapter expects.
SAMPLE_RATE = 16000

#: Accepted source sample rates (Hz); anything outside is almost certainly a mistake
#: (e.g. a rate in kHz, or array and rate swapped).
_MIN_RATE, _MAX_RATE = 1000, 768000

#: Arrays with a dimension this small or smaller may be channels.
_MAX_CHANNELS = 8

AudioSource = Union[str, "os.PathLike[str]", "tuple[np.ndarray, int]", np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------
# helpers


def _describe(source: object) -> str:
    """A short name for ``source`` to put in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, tuple) and len(source) == 2:
        return f"(array, sample_rate) input with {_describe(source[0])}, rate {source[1]!r}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"{type(source).__name__} of shape {tuple(source.shape)} and dtype {source.dtype}"
    return f"<{type(source).__name__}>"


def _check_rate(rate: object, name: str) -> int:
    """Validate a source sample rate: a positive integer in [1000, 768000] Hz."""
    if isinstance(rate, bool):
        raise InputError(f"cannot read audio {name}: sample rate must be an integer, got {rate!r}")
    if isinstance(rate, numbers.Integral):
        value = int(rate)
    elif isinstance(rate, numbers.Real) and math.isfinite(float(rate)) and float(rate).is_integer():
        value = int(rate)  # e.g. 44100.0 from some metadata: harmless
    else:
        raise InputError(
            f"cannot read audio {name}: sample rate must be a positive integer, got {rate!r}"
        )
    if not _MIN_RATE <= value <= _MAX_RATE:
        raise InputError(
            f"cannot read audio {name}: sample rate {value} Hz is outside the supported range "
            f"[{_MIN_RATE}, {_MAX_RATE}] Hz"
        )
    return value


def _check_seconds(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def _resample_margin(rate: int) -> int:
    """Extra source samples to decode beyond a crop so soxr's filter sees the true continuation.

    With 0.1 s (at least 2048 samples) the cropped output equals the full-clip output to float32
    rounding for the usual rates (checked empirically for 8k->16k and 44.1k->16k).
    """
    return max(2048, math.ceil(0.1 * rate))


def _to_float(arr: np.ndarray, name: str) -> np.ndarray:
    """Convert a sample array to float32; integer PCM is scaled to [-1, 1) by its full scale."""
    if arr.dtype == np.bool_ or np.iscomplexobj(arr) or arr.dtype.kind not in "fiu":
        raise InputError(f"cannot read audio {name}: unsupported sample dtype {arr.dtype}")
    if arr.dtype.kind == "i":  # e.g. int16 PCM: /32768
        full_scale = float(2 ** (8 * arr.dtype.itemsize - 1))
        return (arr.astype(np.float64) / full_scale).astype(np.float32)
    if arr.dtype.kind == "u":  # e.g. uint8 PCM, centred on 128
        half = float(2 ** (8 * arr.dtype.itemsize - 1))
        return ((arr.astype(np.float64) - half) / half).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def _to_mono(arr: np.ndarray, name: str, bare: bool) -> np.ndarray:
    """(N,), (N, C) or (C, N) -> (N,) by averaging channels.

    For 2-D input the smaller dimension is the channel axis when it is <= 8 (so both the
    soundfile (frames, channels) and the torch (channels, frames) layouts work). A bare array
    (no sample rate given) must be mono: 1-D, or 2-D with a singleton dimension.
    """
    if arr.ndim == 1:
        return arr
    if arr.ndim != 2:
        raise InputError(
            f"cannot read audio {name}: expected a 1-D (samples,) or 2-D (samples, channels) "
            f"array, got {arr.ndim}-D"
        )
    if bare and min(arr.shape) != 1:
        raise InputError(
            f"cannot read audio {name}: a bare array is taken as mono audio at the target rate; "
            "pass (array, sample_rate) for multi-channel audio"
        )
    ch_axis = 1 if arr.shape[1] <= arr.shape[0] else 0  # ties: (N, C), soundfile's layout
    if arr.shape[ch_axis] > _MAX_CHANNELS:
        raise InputError(
            f"cannot read audio {name}: cannot tell channels from samples in shape {arr.shape} "
            f"(expected one dimension <= {_MAX_CHANNELS})"
        )
    return arr.mean(axis=ch_axis, dtype=np.float64).astype(np.float32)


def _env_limit(name: str, default: int) -> int | None:
    """An integer limit from the environment (``0`` or ``none`` disables it), else ``default``."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("0", "none", "off"):
        return None
    try:
        return int(float(raw))
    except ValueError:
        raise ValueError(f"{name} must be a number of samples (or 0 / none to disable), got {raw!r}") from None


#: Hard limit on the samples (frames x channels) decoded from one audio file. A compressed file can
#: expand enormously (two minutes of 8-channel 192 kHz silence is a 184 KB FLAC and 184 M samples),
#: so files are probed first and refused above this. The default, 100 M samples, is 35 minutes of
#: 48 kHz stereo; the usual crop (15 s) never comes near it. Raise it with
#: ``onepeace.data.audio.MAX_AUDIO_SAMPLES = N`` (None disables it) or the environment variable
#: ``ONEPEACE_MAX_AUDIO_SAMPLES`` (read at import; ``0`` or ``none`` disables it).
MAX_AUDIO_SAMPLES: int | None = _env_limit("ONEPEACE_MAX_AUDIO_SAMPLES", 100_000_000)

#: Frames decoded per block when a whole file is read (blocks are mixed to mono as they come, so
#: a many-channel file never sits in memory with all its channels).
_BLOCK_FRAMES = 1 << 18


def _check_decode_size(name: str, frames: int, channels: int, rate: int, limit: int | None) -> None:
    """Refuse to decode more than `limit` samples (frames x channels) of one file."""
    if limit is not None and frames * channels > limit:
        raise InputError(
            f"cannot read audio {name}: decoding it would produce {frames} frames x {channels} channels "
            f"= {frames * channels} samples ({frames / rate:.1f} s at {rate} Hz), above the limit of "
            f"{limit} samples (a guard against decompression bombs). If you trust this file, raise the "
            "limit: onepeace.data.audio.MAX_AUDIO_SAMPLES = N (None disables it), or the environment "
            "variable ONEPEACE_MAX_AUDIO_SAMPLES=N"
        )


def _read_blocks(f: "sf.SoundFile", frames: int, name: str) -> np.ndarray:
    """Read `frames` frames (-1: to the end) in blocks, each mixed to mono: (n,) float32.

    The mean over channels is taken per block in float64 exactly as :func:`_to_mono` does for a
    whole array, so the result equals decoding everything and then mixing, sample for sample."""
    pieces: list[np.ndarray] = []
    left = frames
    while left != 0:
        step = _BLOCK_FRAMES if left < 0 else min(_BLOCK_FRAMES, left)
        block = f.read(frames=step, dtype="float32", always_2d=True)  # (step, channels)
        if block.shape[0] == 0:
            break
        if not np.isfinite(block).all():
            raise InputError(f"cannot read audio {name}: contains NaN or infinite samples")
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float64).astype(np.float32)
        pieces.append(mono)
        left = left - block.shape[0] if left > 0 else left
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def _read_file(path: str, name: str, max_seconds: float | None,
               max_samples: int | None = None) -> tuple[np.ndarray, int]:
    """Decode (part of) a file with soundfile: ((frames,) mono float32, file rate).

    The file is probed first (frames x channels x rate from its header); only the frames the
    caller keeps are decoded (``max_seconds`` plus the resampler's margin, else all), in blocks
    mixed to mono, and a decode above ``max_samples`` (default :data:`MAX_AUDIO_SAMPLES`) is refused
    before any sample is decoded."""
    if not os.path.exists(path):
        raise InputError(f"cannot read audio {name}: file not found")
    if os.path.isdir(path):
        raise InputError(f"cannot read audio {name}: is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"cannot read audio {name}: file is empty (0 bytes)")
    limit = MAX_AUDIO_SAMPLES if max_samples is None else max_samples
    try:
        with sf.SoundFile(path) as f:  # opening reads the header only: the probe
            rate = _check_rate(f.samplerate, name)
            frames = -1  # everything (reading stops at the end of the file)
            if max_seconds is not None:
                # Bounded decode: a 3-hour file must not be read whole to keep 15 s of it.
                frames = math.ceil(max_seconds * rate) + _resample_margin(rate)
            # the header's frame count (0 where the format does not say; an estimate for some MP3s)
            declared = f.frames if frames < 0 else min(max(f.frames, 0), frames)
            _check_decode_size(name, declared, f.channels, rate, limit)
            if frames < 0 and limit is not None:  # header wrong or silent: stop just past the limit
                frames = limit // max(f.channels, 1) + 1
            data = _read_blocks(f, frames, name)
            if limit is not None and data.shape[0] * f.channels > limit:
                _check_decode_size(name, data.shape[0], f.channels, rate, limit)
    except InputError:
        raise
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, EOFError, MemoryError) as exc:
        # LibsndfileError ("Format not recognised", "Error in FLAC decoder"...) is a SoundFileError
        raise InputError(f"cannot read audio {name}: {exc}") from exc
    return data, rate


def _source_samples(source: AudioSource, name: str, target: int, max_seconds: float | None,
                    max_samples: int | None) -> tuple[object, int, bool]:
    """(samples: (N,) file mono / the given array, their rate, bare: an array without a rate)."""
    if isinstance(source, (str, os.PathLike)):
        data, rate = _read_file(os.fspath(source), name, max_seconds, max_samples)
        return data, rate, False
    if isinstance(source, tuple):
        if len(source) != 2:
            raise InputError(
                f"cannot read audio {name}: expected (array, sample_rate), got a {len(source)}-tuple"
            )
        array, rate = source
        return array, _check_rate(rate, name), False
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return source, target, True
    raise TypeError(
        "load_audio expects a path, an (array, sample_rate) tuple, or a 1-D array/tensor; "
        f"got {type(source).__name__}"
    )


# --------------------------------------------------------------------------------------------
# public API


def load_audio(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    max_samples: int | None = None,
) -> np.ndarray:
    """Decode ``source`` to a mono float32 waveform at ``sample_rate``: shape (N,).

    ``source`` may be:

    * a path: decoded with soundfile (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, AU...);
    * ``(array, rate)``: 1-D (N,) or 2-D (N, C) / (C, N) with C <= 8 channels, numpy or torch;
      integer PCM is scaled by its full scale (int16 / 32768);
    * a bare 1-D array/tensor (or 2-D with a singleton dim), taken to be mono at ``sample_rate``.

    Channels are averaged, then the clip is resampled with ``soxr`` (quality "HQ") when its rate
    differs from ``sample_rate``. With ``max_seconds`` only about that much (plus a small margin
    for the resampler's filter) is decoded, and the result is cropped to exactly
    ``round(max_seconds * sample_rate)`` samples (or fewer if the clip is shorter).

    A file is probed before it is decoded: if the part to decode holds more than ``max_samples``
    samples (frames x channels; default :data:`MAX_AUDIO_SAMPLES`) it is refused, and it is read in
    blocks mixed to mono, so a many-channel file never sits in memory whole.

    Raises:
        InputError: missing/empty/corrupt file, no samples, a sample rate that is not an integer
            in [1000, 768000] Hz, NaN or infinite samples, an array of the wrong rank, or a file
            above the decode limit (the message says how to raise it).
    """
    name = _describe(source)
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, numbers.Integral)
        or not _MIN_RATE <= int(sample_rate) <= _MAX_RATE
    ):
        raise ValueError(
            f"sample_rate must be an integer in [{_MIN_RATE}, {_MAX_RATE}], got {sample_rate!r}"
        )
    target = int(sample_rate)
    max_seconds = _check_seconds(max_seconds, "max_seconds")

    data, rate, bare = _source_samples(source, name, target, max_seconds, max_samples)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    data = _to_float(data, name)
    if data.ndim == 0:
        raise InputError(f"cannot read audio {name}: expected a 1-D or 2-D array, got a scalar")
    if data.size == 0:
        raise InputError(f"cannot read audio {name}: no samples (empty audio)")
    wave = _to_mono(data, name, bare)  # (N,) float32 at `rate`
    if max_seconds is not None:
        # also bound the work for in-memory input (files were already read partially)
        wave = wave[: math.ceil(max_seconds * rate) + _resample_margin(rate)]
    if not np.isfinite(wave).all():
        raise InputError(f"cannot read audio {name}: contains NaN or infinite samples")

    if rate != target:
        wave = soxr.resample(np.ascontiguousarray(wave), rate, target, quality="HQ")
    if max_seconds is not None:
        wave = wave[: round(max_seconds * target)]
    if wave.shape[0] == 0:
        raise InputError(f"cannot read audio {name}: too short, no samples left at {target} Hz")
    return np.ascontiguousarray(wave, dtype=np.float32)


def normalize_waveform(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Normalise a clip over ALL its samples: ``(x - mean) / sqrt(var + 1e-5)``, var biased.

    Exactly ``F.layer_norm(x, x.shape)`` in float32 (what the reference does), returned as a
    new float32 tensor of the same shape. Finite samples so large that float32 statistics overflow
    (|x| ~ 1e19 and up: the variance overflows and the reference gives NaN) are normalised in
    float64 instead, so a finite clip never comes out NaN. Non-finite samples raise ValueError.
    """
    x = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise ValueError("cannot normalise an empty waveform")
    with torch.no_grad():
        out = F.layer_norm(x, tuple(x.shape), eps=1e-5)
        if not bool(torch.isfinite(out).all()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("cannot normalise a waveform with NaN or infinite samples")
            out = F.layer_norm(x.double(), tuple(x.shape), eps=1e-5).float()  # (N,), |values| <= sqrt(N)
        return out


def prepare_waveform(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = 15.0,
    min_seconds: float | None = 1.0,
) -> torch.Tensor:
    """Reference clip preparation: (N,) mono at ``sample_rate`` -> (M,) float32 tensor.

    In the reference order: layer-norm the whole clip, THEN keep the first ``max_seconds``,
    THEN, if shorter than ``min_seconds``, tile (repeat) it to exactly
    ``round(min_seconds * sample_rate)`` samples. ``None`` disables the crop / the tiling.
    """
    max_seconds = _check_seconds(max_seconds, "max_seconds")
    min_seconds = _check_seconds(min_seconds, "min_seconds")
    if max_seconds is not None and min_seconds is not None and min_seconds > max_seconds:
        raise ValueError(f"min_seconds ({min_seconds}) > max_seconds ({max_seconds})")
    x = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
    if x.dim() != 1:
        raise ValueError(
            f"prepare_waveform expects a 1-D mono waveform, got shape {tuple(x.shape)}"
        )
    x = normalize_waveform(x)  # stats over the whole clip, before cropping (reference order)
    if max_seconds is not None:
        x = x[: round(max_seconds * sample_rate)]
    if min_seconds is not None:
        need = round(min_seconds * sample_rate)
        if x.shape[0] < need:
            reps = math.ceil(need / x.shape[0])
            x = x.repeat(reps)[:need]  # tile: [a b c] -> [a b c a b c a ...], cut to `need`
    return x.contiguous()


def feature_lengths(
    num_samples: int | torch.Tensor, feature_spec: Sequence[tuple[int, int, int]]
) -> int | torch.Tensor:
    """Number of frames the conv feature extractor makes from ``num_samples`` samples.

    For each (channels, kernel, stride) layer: ``n = 1 + (n - kernel) // stride`` (floor
    division, as the reference's ``floor((n - k) / s + 1)``), clamped at 0 (a clip shorter than
    a kernel gives no frames). Works on a Python int or elementwise on an integer tensor.
    """
    if isinstance(num_samples, torch.Tensor):
        if num_samples.is_floating_point() or num_samples.dtype == torch.bool:
            raise TypeError(f"num_samples must be an integer tensor, got {num_samples.dtype}")
        n = num_samples.to(torch.int64)
        for _, kernel, stride in feature_spec:
            n = (torch.div(n - kernel, stride, rounding_mode="floor") + 1).clamp_min(0)
        return n
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(
            f"num_samples must be an int or an integer tensor, got {type(num_samples).__name__}"
        )
    n = int(num_samples)
    for _, kernel, stride in feature_spec:
        n = max(0, 1 + (n - kernel) // stride)
    return n


def collate_waveforms(
    waves: Sequence[torch.Tensor | np.ndarray], feature_spec: Sequence[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prepared clips: ``(src_audios (B, N_max) float32, padding_mask (B, T'+1) bool)``.

    Clips are right-padded with 0 to the longest. ``T' = feature_lengths(N_max)``; the mask has
    one extra leading slot for the CLS token. For clip i, positions
    ``0 .. feature_lengths(len_i)`` (inclusive) are False (real) and the rest True (padding).
    """
    if len(waves) == 0:
        raise ValueError("collate_waveforms needs at least one waveform")
    tensors = []
    for i, w in enumerate(waves):
        t = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(
                f"waveform {i} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}"
            )
        tensors.append(t.detach().to(torch.float32))
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)  # (B,)
    n_max = int(lengths.max())
    audio = torch.zeros(len(tensors), n_max, dtype=torch.float32)  # (B, N_max)
    for i, t in enumerate(tensors):
        audio[i, : t.shape[0]] = t
    frames = feature_lengths(lengths, feature_spec)  # (B,) real frames per clip
    t_max = feature_lengths(n_max, feature_spec)  # frames of the padded batch
    positions = torch.arange(t_max + 1, dtype=torch.int64)  # (T'+1,), 0 = CLS
    mask = positions.unsqueeze(0) > frames.unsqueeze(1)  # (B, T'+1), True = padding
    return audio, mask


@dataclass(frozen=True)
class AudioTransform:
    """Callable: audio source -> prepared 1-D float32 tensor (load_audio, then prepare_waveform).

    ``decode_seconds`` (default None: decode everything, reference parity) bounds how much of a
    file is decoded; since the reference normalises over the whole clip, setting it changes
    the result for clips longer than it (the model's own transform sets it to ``max_seconds``:
    work bounded by the crop, see :func:`onepeace.modalities.audio.audio_transform`).
    ``max_samples`` overrides :data:`MAX_AUDIO_SAMPLES`, the decode limit per file.
    """

    sample_rate: int = SAMPLE_RATE
    max_seconds: float | None = 15.0
    min_seconds: float | None = 1.0
    decode_seconds: float | None = None
    max_samples: int | None = None

    def __call__(self, source: AudioSource) -> torch.Tensor:
        wave = load_audio(source, self.sample_rate, max_seconds=self.decode_seconds, max_samples=self.max_samples)
        return prepare_waveform(wave, self.sample_rate, self.max_seconds, self.min_seconds)

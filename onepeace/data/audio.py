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
clips longer than ``max_seconds``; ``AudioTransform`` only uses it when asked to
(``decode_seconds``).
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


def _read_file(path: str, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode (part of) a file with soundfile: ((frames, channels) float32, file rate)."""
    if not os.path.exists(path):
        raise InputError(f"cannot read audio {name}: file not found")
    if os.path.isdir(path):
        raise InputError(f"cannot read audio {name}: is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"cannot read audio {name}: file is empty (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            rate = _check_rate(f.samplerate, name)
            frames = -1  # everything
            if max_seconds is not None:
                # Bounded decode: a 3-hour file must not be read whole to keep 15 s of it.
                frames = math.ceil(max_seconds * rate) + _resample_margin(rate)
            data = f.read(frames=frames, dtype="float32", always_2d=True)  # (frames, channels)
    except InputError:
        raise
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, EOFError) as exc:
        # LibsndfileError ("Format not recognised", "Error in FLAC decoder"...) is a SoundFileError
        raise InputError(f"cannot read audio {name}: {exc}") from exc
    return data, rate


# --------------------------------------------------------------------------------------------
# public API


def load_audio(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
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

    Raises:
        InputError: missing/empty/corrupt file, no samples, a sample rate that is not an integer
            in [1000, 768000] Hz, NaN or infinite samples, or an array of the wrong rank.
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

    bare = False
    if isinstance(source, (str, os.PathLike)):
        data, rate = _read_file(os.fspath(source), name, max_seconds)
    elif isinstance(source, tuple):
        if len(source) != 2:
            raise InputError(
                f"cannot read audio {name}: expected (array, sample_rate), got a {len(source)}-tuple"
            )
        array, rate = source
        rate = _check_rate(rate, name)
        data = array
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        data, rate, bare = source, target, True
    else:
        raise TypeError(
            "load_audio expects a path, an (array, sample_rate) tuple, or a 1-D array/tensor; "
            f"got {type(source).__name__}"
        )

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
    new float32 tensor of the same shape.
    """
    x = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise ValueError("cannot normalise an empty waveform")
    with torch.no_grad():
        return F.layer_norm(x, tuple(x.shape), eps=1e-5)


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
    the result for clips longer than it.
    """

    sample_rate: int = SAMPLE_RATE
    max_seconds: float | None = 15.0
    min_seconds: float | None = 1.0
    decode_seconds: float | None = None

    def __call__(self, source: AudioSource) -> torch.Tensor:
        wave = load_audio(source, self.sample_rate, max_seconds=self.decode_seconds)
        return prepare_waveform(wave, self.sample_rate, self.max_seconds, self.min_seconds)

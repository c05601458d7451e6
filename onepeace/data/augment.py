"""Waveform augmentation for audio-text training: what a real microphone does to speech.

Synthetic voices are clean, level, close-talking and full-band; a laptop or phone recording is
none of these. Each transform below is a standard one (Kaldi-style speed perturbation, additive
noise at a random SNR, reverberation with a synthetic room impulse response, band-limiting as on
a phone or a laptop microphone, gain, masking of short time segments as in SpecAugment), written
with numpy and soxr only. :class:`WaveformAugment` applies each with its own probability, drawing
everything from the ``numpy.random.Generator`` it is given, so the trainer can make the draws a
function of (seed, epoch, item) and a resumed run sees exactly the same audio.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AudioAugmentConfig:
    """Probabilities and ranges of each augmentation (all applied at ``sample_rate``).

    Attributes:
        speed_p / speed_range: resample by a factor in the range (changes tempo and pitch together,
            as Kaldi's 3-way speed perturbation does, but continuously).
        pitch_p / pitch_semitones: shift the pitch only (resample, then restore the duration by
            overlap-add of 40 ms windows), up to this many semitones either way.
        reverb_p / rt60_range: convolve with a synthetic room impulse response (exponentially
            decaying noise with this RT60 in seconds) mixed with the dry signal.
        band_p: keep only a phone band (300-3400 Hz) or a laptop-microphone band (100-7000 Hz,
            with a gentle tilt), chosen at random.
        noise_p / snr_db_range: add white, pink or brown noise at an SNR (dB) in the range.
        gain_db_range: scale by a gain in dB (always; the model normalises, so this matters
            only together with noise and clipping).
        mask_p / mask_max: zero up to ``mask_max`` segments of 30-120 ms.
        pad_p / pad_seconds: add silence of a random length in the range before and, independently,
            after the speech (first of all, so noise and reverb fill it as in a recording). A
            Record button leaves more silence around a word than trimmed synthetic clips have;
            a model trained on trimmed clips only moved its embedding more for 0.4 s of silence on
            each side (cosine 0.65) than for another clip (0.83).
    """

    speed_p: float = 0.6
    speed_range: tuple[float, float] = (0.85, 1.15)
    pitch_p: float = 0.4
    pitch_semitones: float = 3.0
    reverb_p: float = 0.4
    rt60_range: tuple[float, float] = (0.15, 0.7)
    band_p: float = 0.4
    noise_p: float = 0.6
    snr_db_range: tuple[float, float] = (5.0, 30.0)
    gain_db_range: tuple[float, float] = (-12.0, 6.0)
    mask_p: float = 0.3
    mask_max: int = 2
    pad_p: float = 0.5
    pad_seconds: tuple[float, float] = (0.0, 0.6)
    sample_rate: int = 16_000

    def __post_init__(self) -> None:
        for name in ("speed_p", "pitch_p", "reverb_p", "band_p", "noise_p", "mask_p", "pad_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        for name in ("speed_range", "rt60_range", "snr_db_range", "gain_db_range", "pad_seconds"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)!r}")
        if self.speed_range[0] <= 0 or self.rt60_range[0] <= 0:
            raise ValueError("speed_range and rt60_range must be positive")
        if self.pad_seconds[0] < 0:
            raise ValueError(f"pad_seconds must be >= 0, got {self.pad_seconds!r}")


def change_speed(wave: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """Play ``factor`` times faster (shorter, higher): resample to rate/factor, read at rate."""
    import soxr

    if abs(factor - 1.0) < 1e-3:
        return wave
    return soxr.resample(wave, sample_rate, sample_rate / factor, quality="HQ").astype(np.float32)


def stretch(wave: np.ndarray, length: int, window: int) -> np.ndarray:
    """Overlap-add time stretch to ``length`` samples (pitch unchanged): Hann windows of ``window``
    samples read at a step of ``hop * N / length`` and written at ``hop``."""
    hop = window // 2
    n_out = max(1, int(np.ceil((length - window) / hop)) + 1)
    scale = (len(wave) - window) / max(1, (n_out - 1) * hop) if len(wave) > window else 0.0
    win = np.hanning(window).astype(np.float32)
    out = np.zeros(n_out * hop + window, dtype=np.float32)
    norm = np.zeros_like(out)
    padded = np.pad(wave, (0, window))
    for k in range(n_out):
        start = int(round(k * hop * scale))
        out[k * hop:k * hop + window] += padded[start:start + window] * win
        norm[k * hop:k * hop + window] += win
    return (out / np.maximum(norm, 1e-3))[:length]


def shift_pitch(wave: np.ndarray, semitones: float, sample_rate: int) -> np.ndarray:
    """Raise the pitch by ``semitones`` and keep the duration."""
    factor = 2.0 ** (semitones / 12.0)
    faster = change_speed(wave, factor, sample_rate)  # pitch x factor, duration / factor
    return stretch(faster, len(wave), window=int(0.04 * sample_rate))


def room_impulse_response(rt60: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic RIR: a direct path, then Gaussian noise decaying by 60 dB over ``rt60`` s."""
    n = max(2, int(rt60 * sample_rate))
    t = np.arange(n, dtype=np.float32) / sample_rate
    tail = rng.standard_normal(n).astype(np.float32) * np.exp(-6.9078 * t / rt60).astype(np.float32)
    tail[: int(0.002 * sample_rate)] = 0.0  # the first reflections arrive a few ms after the direct path
    rir = tail * 0.3
    rir[0] = 1.0
    return rir / np.sqrt(np.sum(rir ** 2))


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve (FFT), keep the input's length."""
    n = len(wave) + len(rir) - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(wave, size) * np.fft.rfft(rir, size), size)[: len(wave)]
    return out.astype(np.float32)


def band_limit(wave: np.ndarray, low_hz: float, high_hz: float, sample_rate: int, tilt_db: float = 0.0
               ) -> np.ndarray:
    """Keep ``low_hz``..``high_hz`` (smooth 1-octave roll-offs) and tilt the spectrum by
    ``tilt_db`` per octave above 1 kHz (a cheap microphone's colouring)."""
    spectrum = np.fft.rfft(wave)
    freqs = np.fft.rfftfreq(len(wave), 1.0 / sample_rate)
    octaves_low = np.log2(np.maximum(freqs, 1.0) / low_hz)
    octaves_high = np.log2(high_hz / np.maximum(freqs, 1.0))
    gain = np.clip(octaves_low + 1, 0, 1) * np.clip(octaves_high + 1, 0, 1)
    gain = gain * 10 ** (tilt_db * np.log2(np.maximum(freqs, 1.0) / 1000.0).clip(0) / 20)
    return np.fft.irfft(spectrum * gain, len(wave)).astype(np.float32)


def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2) noise of unit RMS."""
    white = rng.standard_normal(n)
    if colour != "white":
        spectrum = np.fft.rfft(white)
        f = np.maximum(np.arange(len(spectrum)), 1.0)
        spectrum /= np.sqrt(f) if colour == "pink" else f
        white = np.fft.irfft(spectrum, n)
    return (white / max(np.sqrt(np.mean(white ** 2)), 1e-12)).astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, colour: str, rng: np.random.Generator) -> np.ndarray:
    power = float(np.mean(wave ** 2)) or 1e-12
    noise = coloured_noise(len(wave), colour, rng)
    return wave + noise * np.float32(np.sqrt(power / 10 ** (snr_db / 10)))


def pad_silence(wave: np.ndarray, before: float, after: float, sample_rate: int) -> np.ndarray:
    """``before`` and ``after`` seconds of digital silence around ``wave``."""
    return np.concatenate([np.zeros(int(before * sample_rate), np.float32), wave,
                           np.zeros(int(after * sample_rate), np.float32)])


def mask_segments(wave: np.ndarray, count: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    out = wave.copy()
    for _ in range(count):
        width = int(rng.uniform(0.03, 0.12) * sample_rate)
        if width >= len(out):
            break
        start = int(rng.integers(0, len(out) - width))
        out[start:start + width] = 0.0
    return out


@dataclass(frozen=True)
class WaveformAugment:
    """Callable: (N,) float32 waveform, generator -> augmented (M,) float32 waveform."""

    config: AudioAugmentConfig = AudioAugmentConfig()

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c, sr = self.config, self.config.sample_rate
        x = np.asarray(wave, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"augmentation expects a non-empty 1-D waveform, got shape {x.shape}")
        if rng.random() < c.pad_p:
            x = pad_silence(x, float(rng.uniform(*c.pad_seconds)), float(rng.uniform(*c.pad_seconds)), sr)
        if rng.random() < c.speed_p:
            x = change_speed(x, float(rng.uniform(*c.speed_range)), sr)
        if rng.random() < c.pitch_p:
            x = shift_pitch(x, float(rng.uniform(-c.pitch_semitones, c.pitch_semitones)), sr)
        if rng.random() < c.reverb_p:
            x = reverberate(x, room_impulse_response(float(rng.uniform(*c.rt60_range)), sr, rng))
        if rng.random() < c.band_p:
            phone = rng.random() < 0.5
            x = band_limit(x, 300.0, 3400.0, sr) if phone else band_limit(
                x, 100.0, 7000.0, sr, tilt_db=float(rng.uniform(-3.0, 3.0)))
        if rng.random() < c.noise_p:
            colour = ("white", "pink", "brown")[int(rng.integers(0, 3))]
            x = add_noise(x, float(rng.uniform(*c.snr_db_range)), colour, rng)
        x = x * np.float32(10 ** (rng.uniform(*c.gain_db_range) / 20))
        if rng.random() < c.mask_p:
            x = mask_segments(x, int(rng.integers(1, c.mask_max + 1)), sr, rng)
        return np.clip(x, -1.0, 1.0).astype(np.float32)  # a recording clips; so do we

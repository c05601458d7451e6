"""Waveform augmentation (onepeace.data.augment) and its use in training items."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onepeace.data import augment as A

SR = 16_000


def tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / SR)[spectrum.argmax()])


def test_speed_changes_length_and_pitch_together():
    out = A.change_speed(tone(440), 1.25, SR)
    assert abs(len(out) - SR / 1.25) < 5
    assert abs(peak_hz(out) - 550) < 10


def test_pitch_shift_keeps_the_duration():
    out = A.shift_pitch(tone(440), 12.0, SR)  # one octave up
    assert len(out) == SR
    assert abs(peak_hz(out) - 880) < 15, peak_hz(out)


def test_band_limit_removes_out_of_band_energy():
    wave = tone(100) + tone(1000) + tone(7200)  # 100 Hz and 7.2 kHz: over an octave outside the band
    out = A.band_limit(wave, 300.0, 3400.0, SR)
    spectrum = np.abs(np.fft.rfft(out))
    freqs = np.fft.rfftfreq(len(out), 1 / SR)
    at = lambda f: spectrum[np.argmin(abs(freqs - f))]  # noqa: E731
    assert at(1000) > 0.9 * np.abs(np.fft.rfft(tone(1000))).max()
    assert at(100) < 0.05 * at(1000) and at(7200) < 0.05 * at(1000)


def test_noise_is_added_at_the_requested_snr():
    rng = np.random.default_rng(0)
    wave = tone(440)
    for colour in ("white", "pink", "brown"):
        noisy = A.add_noise(wave, 10.0, colour, rng)
        snr = 10 * np.log10(np.mean(wave ** 2) / np.mean((noisy - wave) ** 2))
        assert abs(snr - 10.0) < 0.1, (colour, snr)


def test_room_impulse_response_decays_by_its_rt60():
    rir = A.room_impulse_response(0.4, SR, np.random.default_rng(0))
    assert rir[0] == rir.max() and abs(np.sum(rir ** 2) - 1) < 1e-5
    early = np.sqrt(np.mean(rir[int(0.01 * SR):int(0.05 * SR)] ** 2))
    late = np.sqrt(np.mean(rir[int(0.35 * SR):int(0.39 * SR)] ** 2))
    assert 20 * np.log10(early / late) > 35  # ~60 dB per 0.4 s: about 50 dB over 0.34 s


def test_silence_is_padded_around_the_speech():
    wave = tone(300, 0.5)
    out = A.pad_silence(wave, 0.25, 0.1, SR)
    assert len(out) == int(0.85 * SR) and not out[: int(0.25 * SR)].any() and not out[-int(0.1 * SR):].any()
    assert np.array_equal(out[int(0.25 * SR):int(0.75 * SR)], wave)
    only_pad = A.WaveformAugment(A.AudioAugmentConfig(speed_p=0, pitch_p=0, reverb_p=0, band_p=0, noise_p=0,
                                                      mask_p=0, pad_p=1, pad_seconds=(0.2, 0.4), gain_db_range=(0, 0)))
    padded = only_pad(wave, np.random.default_rng(1))
    assert int(0.9 * SR) <= len(padded) <= int(1.3 * SR) and not padded[: int(0.2 * SR)].any()


def test_augment_is_a_function_of_the_generator_and_stays_bounded():
    aug = A.WaveformAugment(A.AudioAugmentConfig(speed_p=1, pitch_p=1, reverb_p=1, band_p=1, noise_p=1, mask_p=1,
                                                 pad_p=1))
    wave = tone(300)
    a = aug(wave, np.random.default_rng(5))
    b = aug(wave, np.random.default_rng(5))
    c = aug(wave, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a[:1000], c[:1000])
    assert np.isfinite(a).all() and np.abs(a).max() <= 1.0
    with pytest.raises(ValueError, match="1-D"):
        aug(np.zeros((2, 10), np.float32), np.random.default_rng(0))


def test_config_is_checked():
    with pytest.raises(ValueError, match="noise_p"):
        A.AudioAugmentConfig(noise_p=1.5)
    with pytest.raises(ValueError, match="snr_db_range"):
        A.AudioAugmentConfig(snr_db_range=(30.0, 5.0))


def test_training_items_are_augmented_per_seed_epoch_and_item(tmp_path):
    """Same (seed, epoch, index): the same audio (exact resume); another epoch: other audio; the
    masks still fit the augmented length."""
    import soundfile as sf

    from onepeace.data.datasets import ManifestDataset
    from onepeace.tokenizer import get_tokenizer

    sf.write(tmp_path / "a.wav", tone(220, 1.5), SR)
    entries = [{"audio": str(tmp_path / "a.wav"), "text": "a dog"}]
    make = lambda: ManifestDataset(entries, tokenizer=get_tokenizer(), audio_augment=A.WaveformAugment(),  # noqa: E731
                                   seed=3)
    first, again, plain = make(), make(), ManifestDataset(entries, tokenizer=get_tokenizer(), seed=3)
    x, y = first[0], again[0]
    assert torch.equal(x["audio"], y["audio"])
    assert not torch.equal(x["audio"], plain[0]["audio"]) or x["audio"].shape != plain[0]["audio"].shape
    first.set_epoch(1)
    assert not torch.equal(first[0]["audio"][:2000], x["audio"][:2000])
    assert abs(float(x["audio"].mean())) < 1e-3 and abs(float(x["audio"].std()) - 1) < 1e-2  # normalised
    assert x["audio_mask_indices"].shape[0] == x["audio_frames"] + 1


def test_train_config_round_trips_the_augmentation(tmp_path):
    from onepeace.train.config import TrainConfig

    from onepeace.train.config import STAGES

    cfg = TrainConfig(train_manifest="m.jsonl", stage=STAGES["stage2"],
                      audio_augment=A.AudioAugmentConfig(noise_p=0.25, snr_db_range=(0.0, 10.0)))
    cfg.save(tmp_path / "c.json")
    back = TrainConfig.load(tmp_path / "c.json")
    assert back.audio_augment == cfg.audio_augment and back.audio_augment.snr_db_range == (0.0, 10.0)
    assert TrainConfig.from_dict({"train_manifest": "m.jsonl"}).audio_augment is None  # off by default
    with pytest.raises(ValueError, match="unknown AudioAugmentConfig fields"):
        TrainConfig.from_dict({"train_manifest": "m.jsonl", "audio_augment": {"noise": 1}})

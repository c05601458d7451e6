"""Tests for onepeace.data.image and onepeace.data.audio (spec sections 6 and 7.2/7.3)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from onepeace.data.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioTransform,
    collate_waveforms,
    feature_lengths,
    load_audio,
    normalize_waveform,
    prepare_waveform,
)
from onepeace.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_EXTENSIONS,
    ImageTransform,
    InputError,
    image_to_tensor,
    load_image,
    preprocess_images,
)

from conftest import ASSETS, FIXTURES, require

FIXTURE = FIXTURES / "official-tiny" / "expected.pt"
TINY_SPEC = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
RELEASED_SPEC = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2



def needs_assets(test):
    """Marks tests that read the shared sample files (they fail clearly when the folder is missing)."""
    require(ASSETS)
    return test


# ============================================================================================
# image


def _hand_tensor(path: Path, size: int) -> np.ndarray:
    """The reference transform written out in numpy: (3, S, S) float32."""
    im = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


def test_constants():
    assert ".jpeg" in IMAGE_EXTENSIONS and ".flac" in AUDIO_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS | AUDIO_EXTENSIONS)
    assert SAMPLE_RATE == 16000


@needs_assets
def test_dog_matches_hand_computation():
    t = ImageTransform(size=64)(ASSETS / "dog.JPEG")
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), _hand_tensor(ASSETS / "dog.JPEG", 64), rtol=0, atol=1e-6)


@needs_assets
def test_path_and_pil_identical_and_batch():
    path = ASSETS / "elephant.JPEG"
    a = image_to_tensor(load_image(path), 48)
    b = image_to_tensor(load_image(Image.open(path)), 48)
    c = image_to_tensor(load_image(str(path)), 48)
    assert torch.equal(a, b) and torch.equal(a, c)
    batch = preprocess_images([path, Image.open(ASSETS / "pokemons.jpg")], 48)
    assert batch.shape == (2, 3, 48, 48)
    assert torch.equal(batch[0], a)
    assert preprocess_images([], 48).shape == (0, 3, 48, 48)


def test_size_and_mean_std(tmp_path):
    # A uniform mid-grey image: after normalisation each channel is (v/255 - m) / s exactly.
    img = Image.new("RGB", (40, 30), (128, 64, 255))
    t = image_to_tensor(img, 17)
    assert t.shape == (3, 17, 17)
    expected = (torch.tensor([128, 64, 255]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(t.mean(dim=(1, 2)), expected.float(), rtol=0, atol=1e-6)
    assert float(t.std(dim=(1, 2)).max()) < 1e-6  # uniform stays uniform (non-square squashed)
    # custom mean/std: identity normalisation gives the [0, 1] values
    t01 = ImageTransform(size=5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(img)
    torch.testing.assert_close(t01[:, 0, 0], torch.tensor([128, 64, 255]) / 255.0)
    with pytest.raises(ValueError):
        image_to_tensor(img, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "I;16", "I", "F", "CMYK", "1", "L", "YCbCr"])
def test_modes_give_finite_rgb_tensors(mode, tmp_path):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16))
        assert img.mode.startswith("I;16")
    elif mode == "I":
        img = Image.fromarray(rng.integers(-(10**6), 10**6, (20, 24), dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.standard_normal((20, 24)).astype(np.float32) * 1000)
    elif mode == "PA":
        img = base.convert("P").convert("PA")
    else:
        img = base.convert(mode)
    assert img.mode == mode or mode == "I;16"
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (24, 20)
    t = image_to_tensor(img, 16)
    assert t.shape == (3, 16, 16) and torch.isfinite(t).all()
    if mode in ("I;16", "I", "F"):
        # wide ranges are rescaled, not clipped: values spread over 0..255, not all 255 (or 0)
        arr = np.asarray(out)[..., 0]
        assert arr.min() < 30 and arr.max() > 225 and 60 < arr.mean() < 195


def test_i16_scaling_is_div_257(tmp_path):
    arr = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_rgba_alpha_dropped_like_reference():
    img = Image.new("RGBA", (4, 4), (10, 200, 30, 0))  # fully transparent
    assert np.asarray(load_image(img))[0, 0].tolist() == [10, 200, 30]


def test_exif_rotated_image_comes_out_upright(tmp_path):
    # Upright scene: 30 wide x 20 high, top half red, bottom half blue.
    upright = np.zeros((20, 30, 3), np.uint8)
    upright[:10] = (255, 0, 0)
    upright[10:] = (0, 0, 255)
    # A camera stores it rotated 90 deg clockwise (20 wide x 30 high) with Orientation=6
    # ("rotate 90 CW to display").
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    out = load_image(path)
    assert out.size == (30, 20)
    arr = np.asarray(out).astype(int)
    assert arr[2, 15].tolist() == [255, 0, 0] and arr[17, 15].tolist() == [0, 0, 255]


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    px = np.asarray(load_image(path))[0, 0]
    assert px[0] > 200 and px[1] < 50


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, content, reason",
    [
        ("empty", b"", "empty"),
        ("text", b"this is not an image at all\n" * 10, "not a recognised image"),
        ("truncated", None, "file is truncated"),
        ("corrupt", None, "corrupt"),
        ("bad_header", None, "not a recognised image"),
    ],
)
def test_bad_image_files(kind, content, reason, tmp_path):
    path = tmp_path / f"input_{len(kind)}.jpg"  # the reason must come from the message, not the name
    if kind == "truncated":
        content = _jpeg_bytes()[:600]
    elif kind == "corrupt":  # valid PNG header, wrecked compressed pixel data
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        data = bytearray(buf.getvalue())
        start = data.find(b"IDAT") + 20
        data[start : start + 40] = b"\xff" * 40
        content = bytes(data)
    elif kind == "bad_header":
        data = bytearray(_jpeg_bytes())
        data[2:40] = b"\x00" * 38  # wreck the JPEG header segments: not identifiable
        content = bytes(data)
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read image") as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and reason in message.split(str(path), 1)[1]
    with pytest.raises(InputError):  # also through the batch API
        preprocess_images([path], 8)


def test_missing_image(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(InputError, match="not found") as info:
        ImageTransform(8)(path)
    assert str(path) in str(info.value)
    with pytest.raises(TypeError):
        load_image(123)


def test_zero_size_pil_image():
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2x limit: Pillow error
    with pytest.raises(InputError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: Pillow only warns
    with pytest.raises(InputError, match="too large"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).size == (64, 64)


# ============================================================================================
# audio


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """(N, C) float32 sine (channel c scaled by (c+1)/C so channels differ)."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)


@needs_assets
def test_cow_flac_loads_mono_16k():
    wave = load_audio(ASSETS / "cow.flac")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == sf.info(str(ASSETS / "cow.flac")).frames == 80000
    ref, sr = sf.read(str(ASSETS / "cow.flac"), dtype="float32")
    assert sr == 16000 and np.array_equal(wave, ref)  # already 16 kHz mono: untouched


def test_stereo_44k_resampled_to_mono(tmp_path):
    data = _tone(2.0, 44100, channels=2)  # (88200, 2)
    path = tmp_path / "stereo.wav"
    sf.write(path, data, 44100, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.shape == (32000,) and wave.dtype == np.float32
    # mono = mean of channels (0.5x and 1.0x) -> amplitude 0.375; resampling keeps the tone
    assert abs(np.abs(wave[1000:-1000]).max() - 0.375) < 0.01
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 2


def test_array_sr_input_layouts():
    data = _tone(1.0, 8000, channels=2)  # (8000, 2)
    a = load_audio((data, 8000))
    b = load_audio((data.T.copy(), 8000))  # (C, N)
    c = load_audio((torch.from_numpy(data.T.copy()), 8000))
    assert a.shape == (16000,) and np.array_equal(a, b) and np.array_equal(a, c)
    pcm = (data[:, 0] * 32767).astype(np.int16)  # int16 PCM is scaled by 1/32768
    np.testing.assert_allclose(load_audio((pcm, 16000)), pcm / 32768.0, rtol=0, atol=1e-7)
    bare = torch.linspace(-1, 1, 500)
    assert np.array_equal(load_audio(bare), bare.numpy())  # bare 1-D: already at the target rate
    assert np.array_equal(load_audio(bare[None]), bare.numpy())  # (1, N) is fine too


def test_prepare_tile_and_crop():
    rng = np.random.default_rng(0)
    short = rng.standard_normal(4800).astype(np.float32)  # 0.3 s
    out = prepare_waveform(short)
    assert out.shape == (16000,)
    norm = normalize_waveform(short)
    assert torch.equal(out[:4800], norm) and torch.equal(out[4800:9600], norm)
    assert torch.equal(out[14400:], norm[:1600])
    long = rng.standard_normal(20 * 16000).astype(np.float32)  # 20 s
    out = prepare_waveform(long)
    assert out.shape == (240000,)
    # normalised over the whole 20 s BEFORE cropping (reference order)
    assert torch.equal(out, normalize_waveform(long)[:240000])
    assert AudioTransform()((long, 16000)).shape == (240000,)


def test_normalize_is_layer_norm():
    x = torch.randn(12345) * 3 + 2
    assert torch.equal(normalize_waveform(x), F.layer_norm(x, x.shape))
    y = normalize_waveform(x.numpy().astype(np.float64))
    assert y.dtype == torch.float32 and torch.allclose(y, F.layer_norm(x, x.shape))


def test_max_seconds_reads_partially(tmp_path, monkeypatch):
    data = _tone(30.0, 22050, channels=1)
    path = tmp_path / "long.flac"
    sf.write(path, data, 22050)
    read_frames = []
    original = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        read_frames.append(frames)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    part = load_audio(path, max_seconds=2.0)
    assert part.shape == (32000,)
    assert 0 < read_frames[-1] < 3 * 22050  # only ~2 s (+ margin) decoded, not 30 s
    full = load_audio(path)
    assert full.shape == (30 * 16000,)
    # the resampler margin makes the partial decode agree with the full one
    np.testing.assert_allclose(part, full[:32000], rtol=0, atol=1e-5)
    assert load_audio(path, max_seconds=100.0).shape == (30 * 16000,)  # shorter than limit


def test_bad_audio_files(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(InputError, match="not found") as info:
        load_audio(missing)
    assert str(missing) in str(info.value)
    empty = tmp_path / "blank.flac"  # name must not contain the expected reason
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty") as info:
        load_audio(empty)
    assert str(empty) in str(info.value)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + b"\x00" * 50)
    with pytest.raises(InputError, match="cannot read audio") as info:
        AudioTransform()(corrupt)
    assert str(corrupt) in str(info.value)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(InputError, match="no samples") as info:
        load_audio(zero)
    assert str(zero) in str(info.value)


@pytest.mark.parametrize(
    "source, match",
    [
        ((np.array([0.1, np.nan, 0.2], np.float32), 16000), "NaN"),
        ((np.array([0.1, np.inf], np.float32), 16000), "NaN or infinite"),
        ((np.zeros(100, np.float32), 0), "sample rate"),
        ((np.zeros(100, np.float32), -16000), "sample rate"),
        ((np.zeros(100, np.float32), 44100.5), "positive integer"),
        ((np.zeros(100, np.float32), 16), "outside the supported range"),
        ((np.zeros(100, np.float32), 10**7), "outside the supported range"),
        ((np.zeros(0, np.float32), 16000), "no samples"),
        ((np.zeros((2, 3, 100), np.float32), 16000), "3-D"),
        ((np.zeros((100, 100), np.float32), 16000), "channels"),
        (np.zeros((2, 1000), np.float32), "multi-channel"),
        (np.array(1.0, dtype=np.float32), "scalar"),
    ],
)
def test_bad_audio_arrays(source, match):
    with pytest.raises(InputError, match=match) as info:
        load_audio(source)
    assert "cannot read audio" in str(info.value) and "shape" in str(info.value)


def test_feature_lengths():
    assert feature_lengths(16000, RELEASED_SPEC) == 49  # ~50 frames per second
    assert feature_lengths(24000, TINY_SPEC) == 74
    n = torch.tensor([16000, 24000, 240000, 400, 0])
    expected = [feature_lengths(int(v), TINY_SPEC) for v in n]
    assert feature_lengths(n, TINY_SPEC).tolist() == expected
    assert expected[-1] == 0  # too short: no frames, not a negative count


def test_collate_matches_fixture_mask():
    inputs = torch.load(require(FIXTURE), weights_only=True)["inputs"]
    audios, mask = inputs["src_audios"], inputs["audio_padding_masks"]
    assert audios.shape == (2, 24000) and mask.shape == (2, 75)
    lengths = []
    for row in audios:
        nz = torch.nonzero(row).flatten()
        lengths.append(int(nz.max()) + 1)  # unpadded length = last non-zero sample + 1
    assert lengths == [16000, 24000] and int(mask[0].sum()) == 25
    clips = [audios[i, :n].clone() for i, n in enumerate(lengths)]
    batch, got = collate_waveforms(clips, TINY_SPEC)
    assert torch.equal(batch, audios.float())
    assert got.dtype == torch.bool and torch.equal(got, mask.bool())


def test_collate_pads_with_zeros():
    a, b = torch.ones(20000), torch.full((16000,), 2.0)
    batch, mask = collate_waveforms([a, b.numpy()], RELEASED_SPEC)
    assert batch.shape == (2, 20000) and batch.dtype == torch.float32
    assert (batch[1, 16000:] == 0).all() and (batch[1, :16000] == 2).all()
    t_a, t_b = feature_lengths(20000, RELEASED_SPEC), feature_lengths(16000, RELEASED_SPEC)
    assert mask.shape == (2, t_a + 1) and not mask[0].any()
    assert not mask[1, : t_b + 1].any() and mask[1, t_b + 1 :].all()
    with pytest.raises(ValueError):
        collate_waveforms([], RELEASED_SPEC)


def test_audio_transform_end_to_end(tmp_path):
    path = tmp_path / "short.ogg"
    sf.write(path, _tone(0.5, 48000, channels=2), 48000, format="OGG", subtype="VORBIS")
    out = AudioTransform()(path)
    assert out.shape == (16000,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # tiled from a 0.5 s clip that was normalised to zero mean / unit variance
    assert math.isclose(float(out[:8000].mean()), 0.0, abs_tol=1e-3)
    assert math.isclose(float(out[:8000].var(unbiased=False)), 1.0, rel_tol=1e-3)
    assert torch.equal(out[:8000], out[8000:])

"""Hostile and unlucky inputs (issue 17): the work per input is bounded, no NaN leaves the library,
and every damaged checkpoint is a clean error naming the file and the key.

Bombs are scaled down (a few MB on disk at most, limits passed small where needed); where the issue
asks for bounded memory the peak RSS is measured in a child python (VmHWM, the peak that ru_maxrss
reports, reset after the child's imports and warm-up), so no earlier history counts."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import onepeace
from conftest import ASSETS, TINY_CKPT, require
from onepeace.checkpoint import CheckpointError, released_cfg, released_state_dict, save_converted
from onepeace.cli import main as cli_main
from onepeace.data.audio import AudioTransform, InputError, load_audio, normalize_waveform
from onepeace.inference import NonFiniteError, check_finite, nonfinite_rows
from onepeace.serialization import CorruptCheckpointError, LazyTensor, _LazyStorage

ROOT = Path(__file__).resolve().parents[1]
# every child starts with this: start() forgets the peak RSS so far (the imports' transients) and returns
# the current RSS; peak() is the peak RSS since, in MB (VmHWM, what ru_maxrss reports, but resettable)
MEASURE = """
import re, sys
def _status(key): return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def start():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")
def peak(): return _status("VmHWM")
"""
EMBED_KEY = "encoder_wrapper.text_adapter.embed_tokens.weight"


def child(code: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh python with this checkout first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", MEASURE + textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)


def peak_growth_mb(out: str) -> float:
    """The child's last stdout line is `PEAK_MB <growth>` (also printed: `pytest -s` shows the numbers)."""
    print(out)
    line = [ln for ln in out.splitlines() if ln.startswith("PEAK_MB ")][-1]
    return float(line.split()[1])




def silent_flac(path: Path, rate: int, channels: int, seconds: int) -> Path:
    """A FLAC of silence: tiny on disk (a few KB), `rate * channels * seconds` samples decoded."""
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate, channels), np.int16)
        for _ in range(seconds):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(cfg, state) of the tiny fixture model in the released layout, to craft checkpoints from."""
    model = onepeace.load(require(TINY_CKPT), pack=False)
    return released_cfg(model.config), released_state_dict(model)


def save(tmp_path: Path, name: str, cfg, state) -> Path:
    path = tmp_path / name
    torch.save({"cfg": cfg, "model": state}, path)
    return path


def rewrite_pickle(src: Path, dst: Path, edit=None, deflate: bool = False, bad_crc: bool = False) -> Path:
    """Copy a torch zip checkpoint, editing its data.pkl bytes (`edit`), deflating it, or spoiling its CRC."""
    with zipfile.ZipFile(src) as z:
        members = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            pkl = name.endswith("data.pkl")
            if pkl and edit is not None:
                data = edit(data)
            z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if pkl and deflate else zipfile.ZIP_STORED)
    if bad_crc:
        raw = bytearray(dst.read_bytes())
        with zipfile.ZipFile(dst) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
        raw[info.header_offset + 30 + name_len + extra_len + 10] ^= 0xFF  # one byte of the pickle
        dst.write_bytes(bytes(raw))
    return dst


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process: it must return 2 (no exception escapes), and give its stderr."""
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


# ============================================================================ memory and time: audio
def test_audio_bomb_decodes_only_the_crop_in_bounded_memory(tmp_path):
    """A few-KB FLAC of 8-channel 96 kHz silence (60 s = 46 M samples = 184 MB as float32): the
    model's transform decodes only its 15-s crop, in blocks mixed to mono. Before: decoded whole."""
    bomb = silent_flac(tmp_path / "bomb.flac", 96000, 8, 60)
    assert bomb.stat().st_size < 100_000
    res = child("""
        import time, onepeace
        from onepeace.modalities.audio import audio_transform
        model = onepeace.load(sys.argv[2])
        transform = audio_transform(model)
        assert transform.decode_seconds == model.config.adapters["audio"].max_seconds
        transform(sys.argv[1])  # warm up on the first second's worth (allocator, soxr tables)
        base, t = start(), time.time()
        wave = transform(sys.argv[1])
        print("SHAPE", tuple(wave.shape), "TIME", time.time() - t)
        print("PEAK_MB", peak() - base)
    """, str(bomb), str(require(TINY_CKPT)))
    assert res.returncode == 0, res.stderr
    assert "SHAPE (240000,)" in res.stdout  # 15 s at 16 kHz
    assert peak_growth_mb(res.stdout) < 60, res.stdout  # whole: >= 184 MB
    assert float(res.stdout.split("TIME")[1].split()[0]) < 5


def test_embed_cli_on_an_audio_bomb_stays_small(tmp_path):
    """`onepeace embed` of the bomb costs about what a normal 5-s clip costs (before: 415 MB -> 1.31 GB)."""
    bomb = silent_flac(tmp_path / "bomb.flac", 96000, 8, 60)
    res = child("""
        from onepeace.cli import main
        assert main(["embed", "-q", "--model", sys.argv[3], sys.argv[2], "-o", sys.argv[4] + "/a.npz"]) == 0
        base = start()
        assert main(["embed", "-q", "--model", sys.argv[3], sys.argv[1], "-o", sys.argv[4] + "/b.npz"]) == 0
        print("PEAK_MB", peak() - base)
    """, str(bomb), str(require(ASSETS / "cow.flac")), str(require(TINY_CKPT)), str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert peak_growth_mb(res.stdout) < 60, res.stdout
    with np.load(tmp_path / "b.npz") as z:
        assert z["embeddings"].shape[0] == 1 and np.isfinite(z["embeddings"]).all()


def test_audio_hard_limit_is_probed_before_decoding_and_can_be_raised(tmp_path, monkeypatch):
    import onepeace.data.audio as audio

    path = silent_flac(tmp_path / "long.flac", 8000, 4, 10)  # 80,000 frames x 4 channels
    reads = []
    original = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    with pytest.raises(InputError) as info:
        load_audio(path, max_samples=100_000)  # the whole file: 320,000 samples
    message = str(info.value)
    assert str(path) in message and "320000 samples" in message and "MAX_AUDIO_SAMPLES" in message
    assert reads == []  # refused from the header, nothing decoded
    # the crop is under the limit: fine (2 s + 0.1 s margin of 4 channels)
    assert load_audio(path, max_seconds=2.0, max_samples=100_000).shape == (32000,)
    # the module limit (what the message tells the user to raise), and None disables it
    monkeypatch.setattr(audio, "MAX_AUDIO_SAMPLES", 100_000)
    with pytest.raises(InputError, match="above the limit of 100000"):
        AudioTransform(max_seconds=None)(path)
    monkeypatch.setattr(audio, "MAX_AUDIO_SAMPLES", None)
    assert AudioTransform(max_seconds=None)(path).shape == (160000,)


def test_audio_limit_from_the_environment(tmp_path):
    path = silent_flac(tmp_path / "a.flac", 8000, 2, 3)  # 48,000 samples
    code = """
        from onepeace.data.audio import MAX_AUDIO_SAMPLES, load_audio, InputError
        print("LIMIT", MAX_AUDIO_SAMPLES)
        try:
            load_audio(sys.argv[1]); print("OK")
        except InputError as e:
            print("REFUSED", e)
    """
    small = child(code, str(path), env={"ONEPEACE_MAX_AUDIO_SAMPLES": "1000"})
    assert "LIMIT 1000" in small.stdout and "REFUSED" in small.stdout and str(path) in small.stdout
    off = child(code, str(path), env={"ONEPEACE_MAX_AUDIO_SAMPLES": "none"})
    assert "LIMIT None" in off.stdout and "OK" in off.stdout


def test_blockwise_decoding_equals_decoding_whole(tmp_path, monkeypatch):
    """Reading in blocks mixed to mono gives the samples a whole read + mean gives (parity)."""
    import soxr

    import onepeace.data.audio as audio

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((44100 * 3 + 17, 3)) * 0.2).astype(np.float32)
    path = tmp_path / "three.wav"
    sf.write(path, data, 44100, subtype="FLOAT")
    monkeypatch.setattr(audio, "_BLOCK_FRAMES", 10_000)  # many blocks
    whole = sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1, dtype=np.float64).astype(np.float32)
    expected = soxr.resample(whole, 44100, 16000, quality="HQ")
    np.testing.assert_array_equal(load_audio(path), expected)


# ============================================================================ memory and time: text
def test_tokenizer_is_linear_in_one_long_word():
    """A 100,000-character word (99 s before) and a 1,000,000-character one: well under a second."""
    tok = onepeace.get_tokenizer()
    rng = random.Random(0)
    for n in (100_000, 1_000_000):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
        t = time.perf_counter()
        ids = tok.encode(word)
        assert time.perf_counter() - t < 0.5
        assert len(ids) == 71 and ids[-1] == tok.eos_id
    digits = "".join(rng.choice("0123456789") for _ in range(100_000))
    t = time.perf_counter()
    tok(["x" * 2000, digits] * 4)  # the server case: eight long one-word texts
    assert time.perf_counter() - t < 0.5


def test_tokenizer_cuts_keep_the_reference_ids_for_natural_text():
    """Words up to 256 characters are merged whole (the reference's ids); the text cut never changes ids."""
    tok = onepeace.get_tokenizer()
    texts = ["a dog on a mat", "Donaudampfschifffahrtsgesellschaftskapitän " * 3,
             "一只狗在草地上奔跑，旁边还有一只小猫" * 4, "https://example.com/" + "ab" * 120]
    for text in texts:
        full = tok.encode(text, max_length=500)
        tok.max_word_chars = 10**9  # no cut at all
        try:
            assert tok.encode(text, max_length=500) == full
        finally:
            tok.max_word_chars = 256
    long_text = "hello world " * 50
    assert tok.encode(long_text + "x" * 10**6) == tok.encode(long_text)  # past the first 70 ids: never read


# ============================================================================ memory and time: images
def _png_header_bomb(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height pixels, with one row of data (a few hundred bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))
    return path


def test_image_pixel_guard_applies_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from onepeace.data.image import load_image

    bomb = _png_header_bomb(tmp_path / "bomb.png", 1200, 1200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 1.44 M declared: between 1x and 2x the limit
    decoded = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or original(self))
    with pytest.raises(InputError, match="too large") as info:
        load_image(bomb)
    assert str(bomb) in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)
    with pytest.warns(Image.DecompressionBombWarning):
        opened = Image.open(bomb)  # lazily: nothing decoded yet
    with pytest.raises(InputError, match="1200x1200 = 1440000 pixels"):
        load_image(opened)
    assert decoded == []  # neither the path nor the opened image was decoded


# ============================================================================ memory and time: checkpoints
def test_lazy_tensor_must_fit_its_storage():
    def t(numel, shape, stride, offset=0):
        return LazyTensor(_LazyStorage("0", torch.float32, numel), offset, shape, stride, archive=None)

    assert t(12, (3, 4), (4, 1)).problem() is None
    assert t(24, (3, 4), (8, 2), offset=1).problem() is None  # a strided view inside a larger storage
    assert "needs 13 elements" in t(12, (3, 4), (4, 1), offset=1).problem()  # reaches past the end
    assert "needs 25" in t(12, (5, 5), (5, 1)).problem()
    assert "expands its storage" in t(1, (1000, 64), (0, 0)).problem()  # stride-0 expansion
    assert "invalid" in t(12, (-1, 4), (4, 1)).problem()
    assert t(0, (0, 64), (64, 1)).problem() is None


def test_stride0_checkpoint_is_refused_before_it_costs_memory(tmp_path, released):
    """A stride-0 token table of 2,000,000 x 64 over a 1-element storage (a 2 MB file; 512 MB if copied
    out). Before: the vocabulary read as 2,000,000 and loading materialised it (1.3 GB in the issue)."""
    cfg, state = released
    bomb = save(tmp_path, "stride0.pt", cfg, {**state, EMBED_KEY: torch.zeros(1).expand(2_000_000, 64)})
    assert bomb.stat().st_size < 5_000_000
    res = child("""
        import onepeace, torch
        from onepeace.checkpoint import CheckpointError
        onepeace.load(sys.argv[2])  # a normal load first: the lazy imports are not the bomb's cost
        base = start()
        try:
            onepeace.load(sys.argv[1])
        except CheckpointError as e:
            print("ERROR", e)
        print("PEAK_MB", peak() - base)
    """, str(bomb), str(require(TINY_CKPT)))
    assert res.returncode == 0, res.stderr
    assert "ERROR" in res.stdout and str(bomb) in res.stdout and EMBED_KEY in res.stdout
    assert "expands its storage" in res.stdout
    assert peak_growth_mb(res.stdout) < 40, res.stdout  # copied out: 512 MB


def test_deflated_pickle_bomb_is_refused_by_its_declared_size(tmp_path):
    """A deflated data.pkl (48 MB inflated, 50 KB more on disk) above the limit (1 MB here): refused from the
    zip directory, before inflating (the issue's 306 KB file cost 1.15 GB before it was rejected)."""
    src = require(TINY_CKPT)
    size = 48 << 20  # a 48 MB string pushed and popped at the start of the pickle

    def inflate(d: bytes) -> bytes:
        return d[:2] + b"X" + size.to_bytes(4, "little") + b"a" * size + b"0" + d[2:]

    bomb = rewrite_pickle(src, tmp_path / "deflated.pt", deflate=True, edit=inflate)
    assert bomb.stat().st_size < src.stat().st_size + 100_000
    res = child("""
        import onepeace, onepeace.serialization as s
        s.MAX_PICKLE_BYTES = 1 << 20
        base = start()
        try:
            onepeace.load(sys.argv[1])
        except ValueError as e:
            print("ERROR", type(e).__name__, e)
        print("PEAK_MB", peak() - base)
    """, str(bomb))
    assert res.returncode == 0, res.stderr
    assert "ERROR CorruptCheckpointError" in res.stdout and str(bomb) in res.stdout
    assert "MAX_PICKLE_BYTES" in res.stdout
    declared = int(res.stdout.split(" bytes uncompressed")[0].split()[-1])
    assert declared > size
    assert peak_growth_mb(res.stdout) < 16, res.stdout  # never inflated (that alone would be 48 MB)


def test_the_pickle_limit_is_the_declared_size_and_default_reads_real_files(tmp_path, monkeypatch):
    import onepeace.serialization as s

    src = require(TINY_CKPT)
    opened = []
    original = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(name) or
                        original(self, name, *a, **k))
    monkeypatch.setattr(s, "MAX_PICKLE_BYTES", 1000)
    with pytest.raises(CorruptCheckpointError, match="above the limit of 1000"):
        s.read_checkpoint(src)
    assert not any(str(getattr(n, "filename", n)).endswith("data.pkl") for n in opened)  # not inflated
    monkeypatch.setattr(s, "MAX_PICKLE_BYTES", 64 << 20)
    obj, archive = s.read_checkpoint(src)
    archive.close()
    assert EMBED_KEY in obj["model"]


# ============================================================================ numbers
def test_finite_loud_audio_gives_a_finite_embedding(tmp_path):
    """Float samples of +-1e38 are finite, but float32 statistics overflow (the issue: a NaN embedding
    counted as a success and indexed). They are normalised in float64: a clean +-1 square wave."""
    wave = np.full(32000, 1e38, np.float32)
    wave[::2] = -1e38
    path = tmp_path / "loud.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    norm = normalize_waveform(load_audio(path))
    assert torch.isfinite(norm).all() and torch.allclose(norm.abs(), torch.ones(32000), atol=1e-3)
    x = torch.randn(1000)
    assert torch.equal(normalize_waveform(x), torch.nn.functional.layer_norm(x, x.shape))  # normal clips: as before
    model = onepeace.load(require(TINY_CKPT))
    assert torch.isfinite(model.encode_audio([str(path)])).all()


def test_nonfinite_samples_are_an_input_error(tmp_path):
    wave = np.zeros(16000, np.float32)
    wave[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match="NaN or infinite") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="NaN or infinite"):
        load_audio((np.array([0.0, np.inf] * 1000, np.float32), 16000))


def test_check_finite_helper():
    ok = torch.randn(3, 4)
    assert check_finite(ok) is ok
    bad = ok.clone()
    bad[1, 2] = float("nan")
    bad[2, 0] = float("inf")
    assert nonfinite_rows(bad) == [1, 2]
    assert nonfinite_rows(bad.numpy()) == [1, 2]
    assert nonfinite_rows(np.array([[1e308 * 10, 0.0]])) == [0]  # overflowed weights
    assert nonfinite_rows(np.zeros((2, 3), np.int64)) == []
    with pytest.raises(NonFiniteError, match="b.flac, c.jpg") as info:
        check_finite(bad, ["a.flac", "b.flac", "c.jpg"])
    assert isinstance(info.value, ValueError)  # callers that catch bad input catch it
    with pytest.raises(NonFiniteError, match="query weights of item 0"):
        check_finite(np.array([np.inf]), what="query weights")


@pytest.fixture(scope="module")
def nan_audio_model(tmp_path_factory):
    """The tiny model with an audio weight of 1e38: every audio embedding overflows; images are fine."""
    model = onepeace.load(require(TINY_CKPT), pack=False)
    with torch.no_grad():
        model.adapters["audio"].cls_token.fill_(1e38)
    return save_converted(model, tmp_path_factory.mktemp("nan-model") / "model")


def test_library_never_returns_a_nan_embedding(nan_audio_model):
    model = onepeace.load(nan_audio_model)
    cow = str(require(ASSETS / "cow.flac"))
    with pytest.raises(NonFiniteError) as info:
        model.encode_audio([cow])
    assert cow in str(info.value)
    assert torch.isfinite(model.encode_image([str(require(ASSETS / "dog.JPEG"))])).all()


def test_embed_cli_reports_and_skips_a_nan_embedding_and_writes_the_rest(nan_audio_model, tmp_path, capsys):
    cow, dog, pic = (str(require(ASSETS / n)) for n in ("cow.flac", "dog.flac", "dog.JPEG"))
    out = tmp_path / "e.npz"
    rc = cli_main(["embed", "-q", "--model", str(nan_audio_model), cow, pic, dog, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err
    assert f"skipped {cow}: its embedding is not finite" in err and f"skipped {dog}" in err
    with np.load(out) as z:
        assert z["files"].tolist() == [pic] and np.isfinite(z["embeddings"]).all()
        assert sorted(z["failed_files"].tolist()) == sorted([cow, dog])


def test_a_failing_batch_loses_only_its_bad_items():
    """One bad item in a batch (here: token ids outside the tiny vocabulary) no longer fails the batch."""
    from onepeace.inference import embed_entries

    model = onepeace.load(require(TINY_CKPT))
    model.tokenizer = onepeace.get_tokenizer()
    errors = []
    assert max(model.tokenizer.encode("the of and a")) < model.config.adapters["text"].vocab_size  # 120 ids
    names, emb = embed_entries(model, "text", [("good", "the of and"), ("bad", "the elephant"), ("good2", "a")],
                               lambda n, why: errors.append((n, why)))
    assert [n for n, _ in errors] == ["bad"] and "vocabulary" in errors[0][1]
    assert names == ["good", "good2"] and emb.shape == (2, model.config.encoder.embed_dim)


# ============================================================================ loading
def test_missing_token_table_is_a_missing_key_error(tmp_path, released, capsys):
    """Before: loaded with rc 0 and a vocabulary of 0; `embed` then crashed without writing anything."""
    cfg, state = released
    path = save(tmp_path, "noemb.pt", cfg, {k: v for k, v in state.items() if k != EMBED_KEY})
    with pytest.raises(CheckpointError) as info:
        onepeace.load(path)
    assert str(path) in str(info.value) and f"missing key {EMBED_KEY}" in str(info.value)
    err = cli_error(capsys, "embed", "--model", str(path), "-t", "a dog", "-o", str(tmp_path / "x.npz"))
    assert EMBED_KEY in err and str(path) in err


@pytest.mark.parametrize("key", ["encoder_wrapper.image_adapter.embed_images.0.weight",
                                 "encoder_wrapper.image_adapter.pos_embed",
                                 "encoder_wrapper.text_adapter.embed_positions.weight",
                                 "encoder_wrapper.audio_adapter.embed_audios.0.conv_layers.0.0.weight"])
def test_every_branch_embedding_missing_is_named(tmp_path, released, key):
    cfg, state = released
    path = save(tmp_path, "missing.pt", cfg, {k: v for k, v in state.items() if k != key})
    with pytest.raises(CheckpointError) as info, pytest.warns(UserWarning) if "audio" in key else nullcontext():
        onepeace.load(path)
    assert str(path) in str(info.value) and key in str(info.value)


def _nest_in_cfg(data: bytes) -> bytes:
    """Add the item "deep": a 200,000-deep list [[[...[None]...]]] to the pickled cfg dict."""
    at = data.index(b"(", data.index(b"X\x03\x00\x00\x00cfg")) + 1  # inside the cfg dict's MARK
    depth = 200_000
    return data[:at] + b"X\x04\x00\x00\x00deep" + b"]" * depth + b"N" + b"a" * depth + data[at:]


@pytest.mark.parametrize("damage, error, match", [
    ("bad_crc", CorruptCheckpointError, "Bad CRC"),  # before: BadZipFile traceback
    ("deep_cfg", CheckpointError, "nested deeper than"),  # before: RecursionError traceback
    ("cut_pickle", CorruptCheckpointError, "cannot unpickle"),
])
def test_damaged_pickle_names_the_file(tmp_path, capsys, damage, error, match):
    edit = {"deep_cfg": _nest_in_cfg, "cut_pickle": lambda d: d[: len(d) // 2]}.get(damage)
    path = rewrite_pickle(require(TINY_CKPT), tmp_path / f"{damage}.pt", edit=edit, bad_crc=damage == "bad_crc")
    with pytest.raises(error, match=match) as info:
        onepeace.load(path)
    assert str(path) in str(info.value)
    assert str(path) in cli_error(capsys, "info", str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return save_converted(onepeace.load(require(TINY_CKPT), pack=False), tmp_path_factory.mktemp("conv") / "model")


def _copy(folder: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dst))


def test_truncated_safetensors_names_the_file(tmp_path, converted, capsys):
    folder = _copy(converted, tmp_path / "trunc")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError) as info:
        onepeace.load(folder)
    assert str(weights) in str(info.value) and "SafetensorError" in str(info.value)
    assert str(weights) in cli_error(capsys, "embed", "--model", str(folder), "-t", "x", "-o", str(tmp_path / "x.npz"))


@pytest.mark.parametrize("damage", ["truncated", "deep", "wrong"])
def test_damaged_config_json_names_the_file(tmp_path, converted, capsys, damage):
    folder = _copy(converted, tmp_path / damage)
    config = folder / "config.json"
    text = config.read_text()
    config.write_text({"truncated": text[: len(text) // 2], "deep": "[" * 200_000 + "]" * 200_000,
                       "wrong": json.dumps({"encoder": "not a dict"})}[damage])
    with pytest.raises(CheckpointError) as info:
        onepeace.load(folder)
    assert str(config) in str(info.value)
    assert str(config) in cli_error(capsys, "info", str(folder))

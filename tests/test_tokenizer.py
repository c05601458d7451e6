"""Tests of onepeace.tokenizer against the reference ids in shared/fixtures/tokenizer/cases.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onepeace.tokenizer import BPE_FILES, Tokenizer, get_tokenizer, packaged_bpe_dir, resolve_bpe_dir

from conftest import BPE_DIR, FIXTURES, require

CASES_FILE = require(FIXTURES / "tokenizer" / "cases.json")
CASES = json.loads(CASES_FILE.read_text(encoding="utf-8"))["cases"]


def needs_bpe(test):
    """Marks tests that need the released BPE files (they fail clearly when missing)."""
    return test


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    for name in BPE_FILES:
        require(BPE_DIR / name)
    return Tokenizer(BPE_DIR)


def _fake_bpe_dir(folder: Path, names=BPE_FILES) -> Path:
    """A folder with (empty) BPE files; resolve_bpe_dir only checks that they exist."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("")
    return folder


# ---------------------------------------------------------------------- reference ids


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_reference_ids(tok: Tokenizer, case: dict) -> None:
    assert tok.encode(case["text"]) == case["ids"]


def test_reference_ids_batched(tok: Tokenizer) -> None:
    texts = [c["text"] for c in CASES]
    batch = tok(texts)
    width = max(len(c["ids"]) for c in CASES)
    assert batch.shape == (len(CASES), width)
    for row, case in zip(batch.tolist(), CASES):
        n = len(case["ids"])
        assert row[:n] == case["ids"]
        assert row[n:] == [Tokenizer.pad_id] * (width - n)


@needs_bpe
def test_vocab_size_matches_released_embedding(tok: Tokenizer) -> None:
    lines = (BPE_DIR / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert tok.vocab_size == 4 + len(lines) == 50264
    assert (Tokenizer.bos_id, Tokenizer.pad_id, Tokenizer.eos_id, Tokenizer.unk_id) == (0, 1, 2, 3)


# ---------------------------------------------------------------------- batching, truncation


def test_batch_padding_and_dtype(tok: Tokenizer) -> None:
    batch = tok(["cow", "a photo of a dog"])
    assert batch.dtype == torch.int64
    assert batch.tolist() == [
        [12094, 2, 1, 1, 1, 1],
        [10, 1345, 9, 10, 2335, 2],
    ]


def test_single_string_is_batch_of_one(tok: Tokenizer) -> None:
    out = tok("dog")
    assert out.shape == (1, 2)
    assert out.tolist() == [[2335, 2]]


def test_empty_inputs(tok: Tokenizer) -> None:
    # The leading space added by the reference is itself a token ('Ġ' -> 1437).
    assert tok.encode("") == [1437, 2]
    assert tok("").tolist() == [[1437, 2]]
    assert tok([]).shape == (0, 0)


def test_truncation_at_70(tok: Tokenizer) -> None:
    ids = tok.encode("a " * 200)
    assert len(ids) == 71
    assert ids[:70] == [10] * 70 and ids[70] == Tokenizer.eos_id
    assert tok(["a " * 200, "cow"]).shape == (2, 71)


@needs_bpe
def test_truncation_override(tok: Tokenizer) -> None:
    assert tok.encode("a photo of a dog", max_length=3) == [10, 1345, 9, 2]
    assert tok.encode("a photo of a dog", max_length=0) == [2]
    assert tok(["a photo of a dog"], max_length=2).tolist() == [[10, 1345, 2]]
    short = Tokenizer(BPE_DIR, max_length=4)
    assert short.encode("a photo of a dog") == [10, 1345, 9, 10, 2]
    with pytest.raises(ValueError):
        tok.encode("x", max_length=-1)


# ---------------------------------------------------------------------- decode, word starts


def test_decode_round_trip(tok: Tokenizer) -> None:
    text = "a man riding a wave on top of a surfboard."
    assert tok.decode(tok.encode(text)) == text
    # Tensor input with padding and specials: those are dropped.
    batch = tok([text, "cow"])
    assert tok.decode(batch[1]) == "cow"
    assert tok.decode(torch.tensor([0, 2335, 3, 2, 1])) == "dog"


def test_decode_non_ascii(tok: Tokenizer) -> None:
    text = "naïve café ☕ 日本語"
    assert tok.decode(tok.encode(text)) == text


def test_word_start_mask(tok: Tokenizer) -> None:
    ids = tok(["a man riding a surfboard.", "hyphen-ated"])
    # pieces: ' a' ' man' ' riding' ' a' ' surf' 'board' '.' </s>
    #         ' hyph' 'en' '-' 'ated' </s> <pad> <pad> <pad>
    assert ids.tolist() == [
        [10, 313, 5793, 10, 11641, 4929, 4, 2],
        [15671, 2457, 12, 1070, 2, 1, 1, 1],
    ]
    mask = tok.word_start_mask(ids)
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    assert mask.tolist() == [
        [True, True, True, True, True, False, False, True],
        [True, False, False, False, True, False, False, False],
    ]


def test_word_start_mask_specials(tok: Tokenizer) -> None:
    mask = tok.word_start_mask(torch.tensor([0, 1, 2, 3]))
    assert mask.tolist() == [True, False, True, True]
    with pytest.raises(ValueError):
        tok.word_start_mask(torch.tensor([tok.vocab_size]))


# ---------------------------------------------------------------------- locating the files


def test_explicit_dir_missing_file(tmp_path: Path) -> None:
    folder = _fake_bpe_dir(tmp_path / "bpe", names=("encoder.json", "vocab.bpe"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_bpe_dir(folder)
    assert "dict.txt" in str(info.value) and str(folder) in str(info.value)
    with pytest.raises(FileNotFoundError, match="dict.txt"):
        Tokenizer(folder)


def test_env_var_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = _fake_bpe_dir(tmp_path / "env")
    monkeypatch.setenv("ONEPEACE_BPE_DIR", str(env_dir))
    assert resolve_bpe_dir() == env_dir.resolve()
    # An explicit argument wins over the environment.
    explicit = _fake_bpe_dir(tmp_path / "explicit")
    assert resolve_bpe_dir(explicit) == explicit.resolve()
    # An incomplete env dir is an error that names the file and the variable.
    (env_dir / "vocab.bpe").unlink()
    with pytest.raises(FileNotFoundError) as info:
        resolve_bpe_dir()
    assert "vocab.bpe" in str(info.value) and "ONEPEACE_BPE_DIR" in str(info.value)


def test_packaged_files_are_the_released_ones() -> None:
    """The gzip copies shipped in the package decompress to exactly the released files."""
    import gzip

    packaged = packaged_bpe_dir()
    for name in BPE_FILES:
        shipped = gzip.decompress((packaged / f"{name}.gz").read_bytes())
        assert shipped == require(BPE_DIR / name).read_bytes(), name
    assert "MIT" in (packaged / "NOTICE.md").read_text()


def test_packaged_default_needs_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """No argument and no environment variable: the packaged files, giving the released ids on
    every shared tokenizer case (the same ids as the tokenizer on ../shared/official-bpe)."""
    monkeypatch.delenv("ONEPEACE_BPE_DIR", raising=False)
    assert resolve_bpe_dir() == packaged_bpe_dir()
    packaged, shared = get_tokenizer(), Tokenizer(require(BPE_DIR))
    assert packaged.bpe_dir == packaged_bpe_dir() and packaged.vocab_size == shared.vocab_size
    assert len(CASES) > 10
    for case in CASES:
        assert packaged.encode(case["text"]) == shared.encode(case["text"]) == case["ids"], case["text"]


def test_gzip_folder_is_a_bpe_dir(tmp_path: Path) -> None:
    """A folder of .gz copies (as shipped) works as an explicit bpe_dir too; a missing one is named."""
    import gzip

    for name in BPE_FILES:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(require(BPE_DIR / name).read_bytes()))
    assert Tokenizer(tmp_path).encode("a dog") == Tokenizer(BPE_DIR).encode("a dog")
    (tmp_path / "vocab.bpe.gz").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        resolve_bpe_dir(tmp_path)


@needs_bpe
def test_get_tokenizer_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEPEACE_BPE_DIR", str(BPE_DIR))
    first = get_tokenizer()
    assert get_tokenizer(BPE_DIR) is first
    assert first.encode("dog") == [2335, 2]

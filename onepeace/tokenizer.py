"""Text tokenizer of the released ONE-PEACE model: GPT-2 byte-level BPE + a fairseq dictionary.

The reference pipeline (spec section 7.1), reproduced exactly:

1. ``' ' + text.lower()``;
2. GPT-2 pre-tokenisation regex, byte -> unicode map and BPE merges (``encoder.json`` +
   ``vocab.bpe``) give GPT-2 ids;
3. each GPT-2 id, written as a decimal string, is looked up in ``dict.txt``: dictionary index =
   4 + line number; 0 ``<s>``, 1 ``<pad>``, 2 ``</s>``, 3 ``<unk>`` (unknown symbols -> 3);
4. truncate to ``max_length`` ids and append ``</s>`` (no ``<s>``: the text adapter's CLS plays
   that role);
5. batches are right-padded with ``<pad>`` (1).

The BPE is pure Python on top of the ``regex`` package; the result of every pre-token ("word") is
cached, so captions that reuse words cost a dictionary lookup per word.

Work is linear in the input (issue 17): BPE on one word is quadratic in its length (a 100,000-letter
word took 99 s), so a word longer than ``max_word_chars`` (256) is cut into pieces of that many
characters, each merged on its own; and since every piece and every shorter word gives at least one
id, only the first ``(max_length + 1) * max_word_chars`` characters of a text can matter and the rest
is never lower-cased or scanned. Texts whose words are all at most 256 characters long (any natural
language text) give exactly the reference's ids.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import regex
import torch

__all__ = ["Tokenizer", "resolve_bpe_dir", "get_tokenizer", "packaged_bpe_dir", "BPE_FILES", "BPE_URL"]

#: The three files a BPE directory must hold.
BPE_FILES: tuple[str, ...] = ("encoder.json", "vocab.bpe", "dict.txt")
#: Where the official repository keeps them (the source of the packaged copies; ``{name}`` is one of :data:`BPE_FILES`).
BPE_URL = "https://raw.githubusercontent.com/OFA-Sys/ONE-PEACE/main/one_peace/utils/BPE/{name}"

# GPT-2's pre-tokenisation: contractions, letter runs, digit runs and other-symbol runs, each with
# at most one leading space; whitespace runs keep their last space for the following word.
_PRETOKENIZE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

# The per-word cache is cleared when it grows past this many entries, so that tokenizing an
# unbounded stream of odd strings (URLs, ids) cannot grow memory without limit.
_WORD_CACHE_LIMIT = 200_000

_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the remaining 68 (control characters, space,
    0x7F-0xA0, 0xAD) are shifted to code points 256, 257, ... in byte order, so that every BPE
    token is a visible string and a leading space shows as 'Ġ' (U+0120).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _is_gpt2_id(symbol: str) -> bool:
    """Is a dictionary symbol a GPT-2 id (a decimal string)? ASCII only: '²'.isdigit() is True."""
    return symbol.isascii() and symbol.isdigit()


def _pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """Adjacent symbol pairs of a word."""
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


class Tokenizer:
    """ONE-PEACE text tokenizer (GPT-2 byte-level BPE + the released fairseq dictionary).

    Args:
        bpe_dir: folder holding ``encoder.json``, ``vocab.bpe`` and ``dict.txt``.
        max_length: default number of text ids kept before ``</s>`` is appended (70 in the
            reference, so a sequence is at most 71 long).
        max_word_chars: longest piece of one word given to BPE at once (longer words are merged
            in pieces of this many characters; BPE is quadratic in the piece length). Raise it
            (``tok.max_word_chars = N``) to match the reference on even longer words, at that cost.

    Example:
        >>> tok = Tokenizer("/path/to/bpe")                     # doctest: +SKIP
        >>> tok(["a dog", "a cat on a mat"])                    # doctest: +SKIP
        tensor([[  10, 2335,    2,    1,    1,    1],
                [  10, 4758,   15,   10, 7821,    2]])
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, bpe_dir: str | os.PathLike, max_length: int = 70, max_word_chars: int = 256) -> None:
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        if max_word_chars < 1:
            raise ValueError(f"max_word_chars must be >= 1, got {max_word_chars}")
        self.max_word_chars = int(max_word_chars)
        self.bpe_dir = pathlib.Path(bpe_dir)
        _check_bpe_dir(self.bpe_dir)
        self.max_length = int(max_length)

        # GPT-2 token string <-> GPT-2 id.
        with _open_text(self.bpe_dir, "encoder.json") as f:
            self._encoder: dict[str, int] = json.load(f)
        self._decoder: dict[int, str] = {i: s for s, i in self._encoder.items()}

        # Merge ranks: line k (after the '#version' header) is the k-th merge to apply.
        with _open_text(self.bpe_dir, "vocab.bpe") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges) if len(m) == 2}

        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}

        # fairseq dictionary: specials first, then one symbol per line of dict.txt.
        self._symbols: list[str] = list(_SPECIALS)
        self._indices: dict[str, int] = {s: i for i, s in enumerate(_SPECIALS)}
        with _open_text(self.bpe_dir, "dict.txt") as f:
            for lineno, line in enumerate(f):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                # "symbol count" (fairseq also allows a trailing "#fairseq:overwrite" flag); the
                # symbol is everything before the last space so symbols may contain spaces.
                symbol = line.rsplit(" ", 1)[0] if " " in line else line
                if symbol.endswith(" #fairseq:overwrite"):
                    symbol = symbol.rsplit(" ", 1)[0]
                if symbol in self._indices:
                    raise ValueError(f"duplicate symbol {symbol!r} in dict.txt line {lineno + 1}")
                self._indices[symbol] = len(self._symbols)
                self._symbols.append(symbol)

        # GPT-2 id -> dictionary index, computed once so encoding is one lookup per BPE token.
        self._gpt2_to_index: dict[int, int] = {
            gid: self._indices.get(str(gid), self.unk_id) for gid in self._decoder
        }
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._word_start_table = self._build_word_start_table()

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of dictionary entries = rows of the text embedding (50264 for the release)."""
        return len(self._symbols)

    def _build_word_start_table(self) -> torch.Tensor:
        """Bool per dictionary index: does this token start a word?

        A BPE token starts a word when its string begins with 'Ġ' (an encoded leading space).
        Specials count as words of their own, except ``<pad>``, which is never a word. Symbols
        that are not GPT-2 ids (the ``madeupwordNNNN`` padding entries) also count as their own
        word, as fairseq's whole-word masking does for undecodable symbols.
        """
        table = torch.zeros(self.vocab_size, dtype=torch.bool)
        space = self._byte_encoder[ord(" ")]
        for index, symbol in enumerate(self._symbols):
            if index < len(_SPECIALS) or not _is_gpt2_id(symbol):
                table[index] = True
            else:
                token = self._decoder.get(int(symbol))
                table[index] = token is None or token.startswith(space)
        table[self.pad_id] = False
        return table

    # ------------------------------------------------------------------ BPE

    def _bpe(self, token: str) -> list[str]:
        """Apply the merges to one byte-encoded pre-token; returns its BPE pieces."""
        word = list(token)
        if len(word) < 2:
            return word
        ranks = self._ranks
        while True:
            # Merge the lowest-ranked (earliest learnt) adjacent pair, everywhere it occurs.
            best = min(_pairs(word), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                return word
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
            if len(word) == 1:
                return word

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Dictionary ids of one pre-token (cached: caption vocabularies repeat a lot)."""
        ids = self._word_cache.get(word)
        if ids is None:
            encoded = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(
                self._gpt2_to_index.get(self._encoder.get(piece, -1), self.unk_id)
                for piece in self._bpe(encoded)
            )
            if len(self._word_cache) >= _WORD_CACHE_LIMIT:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    # ------------------------------------------------------------------ public API

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Dictionary ids of ``text``: at most ``max_length`` text ids, then ``</s>`` (2).

        Args:
            text: raw text; it is lower-cased and prefixed with one space, as in the reference.
            max_length: ids kept before ``</s>``; defaults to ``self.max_length``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        limit = self.max_length if max_length is None else int(max_length)
        if limit < 0:
            raise ValueError(f"max_length must be >= 0, got {limit}")
        piece = self.max_word_chars
        # Each word, and each piece of a long word, gives >= 1 id, so the first `limit` ids come from
        # at most `limit` pieces of <= `piece` characters: the rest of a long text is never looked at.
        # (+1 piece: lower() may lengthen a few characters, e.g. 'İ' -> 'i̇'.)
        text = text[: (limit + 1) * piece]
        ids: list[int] = []
        for match in _PRETOKENIZE.finditer(" " + text.lower()):
            word = match.group()
            for start in range(0, len(word), piece):  # (one piece unless the word is long)
                ids.extend(self._encode_word(word[start:start + piece]))
                if len(ids) >= limit:  # the rest would be truncated anyway
                    break
            if len(ids) >= limit:
                break
        del ids[limit:]
        ids.append(self.eos_id)
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Tokenize one text or a batch into a right-padded int64 tensor.

        Args:
            texts: a string (gives a batch of one) or a sequence of strings.
            max_length: ids kept per text before ``</s>``; defaults to ``self.max_length``.

        Returns:
            ``(N, T)`` int64 tensor, ``T`` = longest encoded text, padded with ``pad_id`` (1).
        """
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t, max_length) for t in texts]
        width = max((len(ids) for ids in encoded), default=0)
        out = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of a 1-D id sequence, for inspection.

        Specials (``<s>``, ``<pad>``, ``</s>``, ``<unk>``) and non-GPT-2 dictionary entries are
        dropped. The single leading space that :meth:`encode` adds is stripped, so
        ``decode(encode(s)) == s`` for lower-case text that fits ``max_length``. Byte sequences cut
        in the middle of a UTF-8 character (by truncation) decode to U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode takes a 1-D sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        pieces: list[str] = []
        for index in ids:
            index = int(index)
            if index < len(_SPECIALS) or index >= len(self._symbols):
                continue
            symbol = self._symbols[index]
            token = self._decoder.get(int(symbol)) if _is_gpt2_id(symbol) else None
            if token is not None:
                pieces.append(token)
        data = bytes(self._byte_decoder[c] for c in "".join(pieces))
        text = data.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def word_start_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor of ``ids``' shape: True where a token begins a word.

        A token begins a word when its BPE string starts with 'Ġ' (a space). Special tokens
        (``<s>``, ``</s>``, ``<unk>``) are True; ``<pad>`` positions are False. Used for
        whole-word masking: a word is a True position followed by its False continuations.
        """
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self._word_start_table.to(ids.device)[ids.long()]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bpe_dir={str(self.bpe_dir)!r}, "
                f"max_length={self.max_length}, vocab_size={self.vocab_size})")


# ---------------------------------------------------------------------- locating the files


def _missing_files(folder: pathlib.Path) -> list[str]:
    """Names of :data:`BPE_FILES` that `folder` holds neither plainly nor gzip-compressed (``name.gz``)."""
    return [name for name in BPE_FILES if not ((folder / name).is_file() or (folder / f"{name}.gz").is_file())]


def _open_text(folder: pathlib.Path, name: str):
    """Open ``folder/name`` as UTF-8 text, or ``folder/name.gz`` (the packaged copies are compressed)."""
    plain = folder / name
    if plain.is_file():
        return open(plain, encoding="utf-8")
    return gzip.open(folder / f"{name}.gz", "rt", encoding="utf-8")


def _check_bpe_dir(folder: pathlib.Path, source: str = "bpe_dir") -> None:
    """Raise FileNotFoundError naming every file of :data:`BPE_FILES` missing from ``folder``."""
    missing = _missing_files(folder)
    if missing:
        raise FileNotFoundError(
            f"BPE directory {str(folder)!r} (from {source}) is missing {', '.join(missing)}; "
            f"it must contain {', '.join(BPE_FILES)} (plain or .gz)"
        )


def packaged_bpe_dir() -> pathlib.Path:
    """The released tokenizer files shipped inside the package (gzip-compressed, with their licence
    notes in ``NOTICE.md``): ``onepeace/tokenizer_files``."""
    return pathlib.Path(__file__).resolve().parent / "tokenizer_files"


def resolve_bpe_dir(bpe_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Find the folder holding ``encoder.json``, ``vocab.bpe`` and ``dict.txt`` (plain or ``.gz``).

    Order: the explicit ``bpe_dir``; else the environment variable ``ONEPEACE_BPE_DIR``; else the
    copies shipped with the package (:func:`packaged_bpe_dir`), so no setup or network is needed.

    Raises:
        FileNotFoundError: the chosen folder lacks a file (the message names it and where the
            folder came from).
    """
    if bpe_dir is not None:
        folder = pathlib.Path(bpe_dir).expanduser()
        _check_bpe_dir(folder, "bpe_dir=")
        return folder.resolve()

    env = os.environ.get("ONEPEACE_BPE_DIR")
    if env:
        folder = pathlib.Path(env).expanduser()
        _check_bpe_dir(folder, "ONEPEACE_BPE_DIR")
        return folder.resolve()

    folder = packaged_bpe_dir()
    _check_bpe_dir(folder, "the onepeace package (a broken install? reinstall onepeace, or pass bpe_dir= "
                           "or set ONEPEACE_BPE_DIR)")
    return folder


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(folder: str, max_length: int) -> Tokenizer:
    return Tokenizer(folder, max_length=max_length)


def get_tokenizer(bpe_dir: str | os.PathLike | None = None, max_length: int = 70) -> Tokenizer:
    """A shared :class:`Tokenizer` for the resolved BPE folder (see :func:`resolve_bpe_dir`).

    The folder is resolved on every call (so a changed ``ONEPEACE_BPE_DIR`` is honoured); the
    tokenizer itself is built once per (folder, max_length).
    """
    return _cached_tokenizer(str(resolve_bpe_dir(bpe_dir)), int(max_length))

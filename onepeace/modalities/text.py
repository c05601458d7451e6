"""The text modality, in one file: config, adapter, preprocessing, collate, fast embed path, released
checkpoint format, file suffixes, registration.

A text is GPT-2 BPE ids of the released dictionary, ending in </s> (the model's tokenizer):
``"a dog" -> (T,) int64``; a batch pads with id 1 to ``(B, T_max)``. The adapter
(onepeace/modeling/adapters/text.py) adds CLS, token embeddings and absolute positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from ..config import AdapterConfig
from ..data.files import TEXT_EXTENSIONS
from ..inference import collect_embeddings, length_sorted_batches, require_branch
from ..modeling.adapters.text import PAD_ID, TextAdapter
from ..registry import register_modality


@dataclass(frozen=True)
class TextAdapterConfig(AdapterConfig):
    vocab_size: int = 50264  # 0 = no token embedding (the pretraining decoder's text adapter)
    max_positions: int = 514  # rows of the absolute position table
    bucket_size: int = 256
    max_length: int = 70  # preprocessing: ids kept before </s> is appended

    kind: ClassVar[str] = "text"

    def decoder_variant(self) -> "TextAdapterConfig":
        return TextAdapterConfig(vocab_size=0, use_attn_bias=False, max_positions=self.max_positions,
                                 max_length=self.max_length)

    @classmethod
    def from_released(cls, view, args: Mapping[str, Any]) -> "TextAdapterConfig":
        """Vocabulary and positions from the embedding tables; buckets from the bias table's 2B + 2 rows."""
        common = view.common(args)  # first: its notes come before ours
        emb, table = view.shape("embed_tokens.weight"), view.shape("rel_pos_table_list.0.weight")
        bucket = (table[0] - 2) // 2 if table else args.get("bucket_size", 256)
        if emb is None and view.is_encoder:  # a missing-key error, not a vocabulary of 0 that fails at use
            view.require("embed_tokens.weight", "the text branch's token embedding table")  # (the decoder has none)
        return cls(
            **common, vocab_size=emb[0] if emb else 0,
            max_positions=view.require("embed_positions.weight", "the text position table")[0],
            bucket_size=view.pick("bucket_size", args.get("bucket_size"), bucket),
            max_length=int(view.task.get("max_src_length", 70)),
        )

    def to_released(self, task: dict[str, Any]) -> dict[str, Any]:
        task["max_src_length"] = self.max_length
        return super().to_released(task)


# ---- preprocessing ----
def text_transform(model) -> Callable[[str], torch.Tensor]:
    """str -> (T,) int64 ids ending in </s> (the tokenizer is loaded now: missing files raise here)."""
    tokenizer = model.tokenizer
    return lambda text: torch.tensor(tokenizer.encode(text), dtype=torch.long)


def pad_token_ids(ids: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
    """Id lists -> (B, T_max) int64, right-padded with the pad id 1."""
    tokens = torch.full((len(ids), max(len(t) for t in ids)), PAD_ID, dtype=torch.long)
    for row, t in enumerate(ids):
        tokens[row, :len(t)] = torch.as_tensor(t)
    return tokens


def collate_texts(model, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"text": pad_token_ids(items)}


# ---- the fast embed path: length-sorted batches under a token budget ----
@torch.inference_mode()
def embed_token_ids(model, ids: Sequence[Sequence[int]], batch_size: int = 64, max_tokens: int | None = 4096
                    ) -> torch.Tensor:
    """Token id lists (each ending in </s>) -> (N, D) embeddings in input order."""
    require_branch(model, "text")
    sort = not model.reference_mode

    def run():
        for index in length_sorted_batches([len(x) for x in ids], batch_size, max_tokens if sort else None, sort):
            tokens = pad_token_ids([ids[i] for i in index])
            yield index, model(text=tokens.to(model.device)).embeddings["text"]

    return collect_embeddings(model, len(ids), run())


def example_texts(model, n: int) -> dict[str, torch.Tensor]:
    """n random texts of different lengths (ids below the vocabulary, ending in </s> = 2), padded."""
    vocab = model.config.adapters["text"].vocab_size
    lengths = [max(2, 12 - 3 * (i % 4)) for i in range(n)]
    return collate_texts(model, [torch.cat([torch.randint(4, vocab, (k - 1,)), torch.tensor([2])]) for k in lengths])


def _embed_texts(model, items: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    return embed_token_ids(model, [t.tolist() for t in items], batch_size)


def encode_texts(model, texts: Sequence[str], batch_size: int = 64, max_tokens: int | None = 4096) -> torch.Tensor:
    """Raw strings -> (N, D) L2-normalised embeddings in input order."""
    return embed_token_ids(model, [model.tokenizer.encode(t) for t in texts], batch_size, max_tokens)


register_modality("text", TextAdapterConfig, TextAdapter, text_transform, collate_texts, _embed_texts,
                  encode=encode_texts, suffixes=TEXT_EXTENSIONS, batch_size=64, example=example_texts)

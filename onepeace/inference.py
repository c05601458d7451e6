"""Raw inputs -> embeddings: the model's own preprocessing, length-sorted batching, input order kept.

Each `encode_*` function is `prepare` (per item; raises :class:`~onepeace.data.image.InputError`
naming a bad item) followed by `embed_*` on prepared tensors, so batch jobs (the CLI) can prepare
items one by one, skip the bad ones, and embed the rest.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from .data.audio import AudioTransform, collate_waveforms
from .data.image import ImageTransform


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), so batches carry little padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _require(model, modality: str) -> None:
    if modality not in model.adapters:
        raise ValueError(f"this model has no {modality} branch (it has {list(model.modalities)})")


def _collect(model, n: int, batches: Iterator[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    out = torch.empty(n, model.config.encoder.embed_dim, dtype=torch.float32, device=model.device)
    for index, emb in batches:
        out[index] = emb.float()
    return out


# ---- text ----
def prepare_texts(model, texts: Sequence[str]) -> list[list[int]]:
    return [model.tokenizer.encode(t) for t in texts]


@torch.inference_mode()
def embed_token_ids(model, ids: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
    """Token id lists (each ending in </s>) -> (N, D) embeddings in input order."""
    _require(model, "text")

    def run():
        for index in length_sorted_batches([len(x) for x in ids], batch_size):
            longest = max(len(ids[i]) for i in index)
            tokens = torch.ones(len(index), longest, dtype=torch.long)  # pad id 1
            for row, i in enumerate(index):
                tokens[row, : len(ids[i])] = torch.as_tensor(ids[i])
            yield index, model(text=tokens.to(model.device)).embeddings["text"]

    return _collect(model, len(ids), run())


def encode_texts(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    return embed_token_ids(model, prepare_texts(model, texts), batch_size)


# ---- image ----
def image_transform(model) -> ImageTransform:
    _require(model, "image")
    cfg = model.config.adapters["image"]
    return ImageTransform(size=cfg.image_size, mean=tuple(cfg.mean), std=tuple(cfg.std))


@torch.inference_mode()
def embed_image_tensors(model, pixels: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Preprocessed (3, S, S) tensors -> (N, D) embeddings."""
    _require(model, "image")

    def run():
        for start in range(0, len(pixels), batch_size):
            index = list(range(start, min(start + batch_size, len(pixels))))
            batch = torch.stack([pixels[i] for i in index]).to(model.device)
            yield index, model(image=batch).embeddings["image"]

    return _collect(model, len(pixels), run())


def encode_images(model, sources: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    transform = image_transform(model)
    return embed_image_tensors(model, [transform(s) for s in sources], batch_size)


# ---- audio ----
def audio_transform(model) -> AudioTransform:
    _require(model, "audio")
    cfg = model.config.adapters["audio"]
    return AudioTransform(sample_rate=cfg.sample_rate, max_seconds=cfg.max_seconds, min_seconds=cfg.min_seconds)


@torch.inference_mode()
def embed_waveforms(model, waves: Sequence[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """Prepared 1-D waveforms (layer-normed, cropped/tiled) -> (N, D) embeddings."""
    _require(model, "audio")
    spec = model.config.adapters["audio"].feature_encoder_spec

    def run():
        for index in length_sorted_batches([w.shape[0] for w in waves], batch_size):
            audio, mask = collate_waveforms([waves[i] for i in index], spec)
            out = model(audio=audio.to(model.device), audio_padding_mask=mask.to(model.device))
            yield index, out.embeddings["audio"]

    return _collect(model, len(waves), run())


def encode_audios(model, sources: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
    transform = audio_transform(model)
    return embed_waveforms(model, [transform(s) for s in sources], batch_size)

"""Raw inputs -> embeddings: the model's own preprocessing, length-sorted batching, input order kept.

Each `encode_*` function is `prepare` (per item; raises :class:`~onepeace.data.image.InputError`
naming a bad item) followed by `embed_*` on prepared tensors, so batch jobs (the CLI) can prepare
items one by one, skip the bad ones, and embed the rest.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from .data.audio import AudioTransform, collate_waveforms
from .data.image import ImageTransform


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                          sort: bool = True) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), so batches carry little padding.

    A batch holds at most `batch_size` items and, when `max_tokens` is given, at most that many
    padded units (items x longest item); a single longer item still gets a batch of its own.
    sort=False keeps input order and pads to the longest (the reference mode)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batch: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if batch and (len(batch) >= batch_size or (max_tokens is not None and new_longest * (len(batch) + 1) > max_tokens)):
            yield batch
            batch, new_longest = [], lengths[i]
        batch.append(i)
        longest = new_longest
    if batch:
        yield batch


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
def embed_token_ids(model, ids: Sequence[Sequence[int]], batch_size: int = 64, max_tokens: int | None = 4096
                    ) -> torch.Tensor:
    """Token id lists (each ending in </s>) -> (N, D) embeddings in input order."""
    _require(model, "text")
    sort = not model.reference_mode

    def run():
        for index in length_sorted_batches([len(x) for x in ids], batch_size, max_tokens if sort else None, sort):
            longest = max(len(ids[i]) for i in index)
            tokens = torch.ones(len(index), longest, dtype=torch.long)  # pad id 1
            for row, i in enumerate(index):
                tokens[row, : len(ids[i])] = torch.as_tensor(ids[i])
            yield index, model(text=tokens.to(model.device)).embeddings["text"]

    return _collect(model, len(ids), run())


def encode_texts(model, texts: Sequence[str], batch_size: int = 64, max_tokens: int | None = 4096) -> torch.Tensor:
    return embed_token_ids(model, prepare_texts(model, texts), batch_size, max_tokens)


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
def embed_waveforms(model, waves: Sequence[torch.Tensor], batch_size: int = 8,
                    max_samples: int | None = 2 * 240_000) -> torch.Tensor:
    """Prepared 1-D waveforms (layer-normed, cropped/tiled) -> (N, D) embeddings.
    Batches hold at most `max_samples` padded samples (default: 30 s of audio; on a CPU a larger
    batch gains little per token, while mixed lengths waste the padding)."""
    _require(model, "audio")
    spec = model.config.adapters["audio"].feature_encoder_spec
    sort = not model.reference_mode

    def run():
        lengths = [w.shape[0] for w in waves]
        for index in length_sorted_batches(lengths, batch_size, max_samples if sort else None, sort):
            audio, mask = collate_waveforms([waves[i] for i in index], spec)
            out = model(audio=audio.to(model.device), audio_padding_mask=mask.to(model.device))
            yield index, out.embeddings["audio"]

    return _collect(model, len(waves), run())


def encode_audios(model, sources: Sequence[Any], batch_size: int = 8, long_audio: str = "crop",
                  window_seconds: float | None = None, hop_seconds: float | None = None) -> torch.Tensor:
    """long_audio="crop" (the reference): keep the first 15 s. "windows": cover the whole clip with
    windows of `window_seconds` (default the model's 15 s) every `hop_seconds` (default 2/3 of a
    window; the last window ends at the clip's end), embed each and average the embeddings (then
    re-normalise). Deterministic; clips no longer than one window give the same result as "crop"."""
    if long_audio == "crop":
        transform = audio_transform(model)
        return embed_waveforms(model, [transform(s) for s in sources], batch_size)
    if long_audio != "windows":
        raise ValueError(f"long_audio must be 'crop' or 'windows', got {long_audio!r}")
    cfg = model.config.adapters["audio"]
    window = round((window_seconds or cfg.max_seconds) * cfg.sample_rate)
    hop = round((hop_seconds or (window_seconds or cfg.max_seconds) * 2 / 3) * cfg.sample_rate)
    if hop < 1 or hop > window:
        raise ValueError(f"hop_seconds must be in (0, window_seconds], got {hop / cfg.sample_rate}")
    full = AudioTransform(sample_rate=cfg.sample_rate, max_seconds=None, min_seconds=cfg.min_seconds)
    pieces, owner = [], []
    for i, source in enumerate(sources):
        wave = full(source)  # layer-normed over the whole clip, like the reference before its crop
        for start in audio_window_starts(wave.shape[0], window, hop):
            pieces.append(wave[start:start + window])
            owner.append(i)
    emb = embed_waveforms(model, pieces, batch_size)
    out = torch.zeros(len(sources), emb.shape[1], dtype=emb.dtype, device=emb.device)
    out.index_add_(0, torch.tensor(owner, device=emb.device), emb)
    return torch.nn.functional.normalize(out, dim=-1)


def audio_window_starts(n_samples: int, window: int, hop: int) -> list[int]:
    """Start offsets of windows covering [0, n_samples): every `hop`, plus one ending at the end."""
    if n_samples <= window:
        return [0]
    starts = list(range(0, n_samples - window + 1, hop))
    if starts[-1] + window < n_samples:
        starts.append(n_samples - window)
    return starts


# ---- batch jobs: many named items of one modality, bad ones reported and skipped ----
DEFAULT_BATCH = {"image": 32, "audio": 8, "text": 64}


def embed_entries(model, modality: str, entries: Sequence[tuple[str, Any]], on_error: Callable[[str, str], None],
                  batch_size: int | None = None, on_progress: Callable[[int], None] | None = None
                  ) -> tuple[list[str], torch.Tensor]:
    """[(name, source)] of one modality (a path or PIL image / (wave, rate) / token-free text) ->
    (names embedded, (n, D) float32 CPU embeddings in that order). An item that cannot be read or
    embedded is passed to `on_error(name, why)` and skipped; `on_progress(k)` after each k items."""
    dim = model.config.encoder.embed_dim
    names: list[str] = []
    chunks: list[torch.Tensor] = [torch.zeros(0, dim)]
    progress = on_progress or (lambda k: None)
    if modality not in model.adapters:
        for name, _ in entries:
            on_error(name, f"the model has no {modality} branch")
        progress(len(entries))
        return names, chunks[0]
    try:  # the modality's registered preprocessing (text: the tokenizer, loaded now)
        prepare = modality_transform(model, modality)
        if modality == "text":
            _ = model.tokenizer
    except (FileNotFoundError, ValueError) as e:  # e.g. no tokenizer files
        for name, _ in entries:
            on_error(name, str(e))
        progress(len(entries))
        return names, chunks[0]
    batch = batch_size or DEFAULT_BATCH.get(modality, 16)
    for start in range(0, len(entries), batch):
        ok_names, prepared = [], []
        for name, source in entries[start:start + batch]:
            try:
                prepared.append(prepare(source))
                ok_names.append(name)
            except (ValueError, OSError) as e:  # InputError is a ValueError and names the input
                on_error(name, str(e))
        if prepared:
            try:
                emb = embed_prepared(model, modality, prepared, batch_size=batch)
            except ValueError as e:  # e.g. token ids outside a toy model's vocabulary
                for name in ok_names:
                    on_error(name, str(e))
            else:
                chunks.append(emb.float().cpu())
                names += ok_names
        progress(len(entries[start:start + batch]))
    return names, torch.cat(chunks)


# ---- any registered modality ----
def modality_transform(model, modality: str):
    """The registered preprocessing of `modality` for this model: raw item -> prepared tensor."""
    from .registry import get_modality

    _require(model, modality)
    spec = get_modality(model.config.adapters[modality].kind)
    if spec.transform is None:
        raise ValueError(f"modality {modality!r} registered no transform")
    return spec.transform(model)


@torch.inference_mode()
def embed_prepared(model, modality: str, items: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Prepared tensors of one modality -> (N, D) embeddings in input order (the modality's own
    embed path when it registered one, else its collate + one forward per batch)."""
    from .registry import get_modality

    _require(model, modality)
    spec = get_modality(model.config.adapters[modality].kind)
    if spec.embed is not None:
        return spec.embed(model, items, batch_size)
    if spec.collate is None:
        raise ValueError(f"modality {modality!r} registered no collate")

    def run():
        for start in range(0, len(items), batch_size):
            index = list(range(start, min(start + batch_size, len(items))))
            batch = spec.collate(model, [items[i] for i in index])
            yield index, model(**{k: v.to(model.device) for k, v in batch.items()}).embeddings[modality]

    return _collect(model, len(items), run())


def encode_items(model, modality: str, sources: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """Raw items of any registered modality (e.g. video clips) -> (N, D) L2-normalised embeddings."""
    transform = modality_transform(model, modality)
    return embed_prepared(model, modality, [transform(s) for s in sources], batch_size)

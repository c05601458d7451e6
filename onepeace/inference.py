"""Raw inputs -> embeddings: the model's own preprocessing, length-sorted batching, input order kept.

Any registered modality goes the same way: its `transform` prepares one item (raising
:class:`~onepeace.data.image.InputError` naming a bad item), its `embed` (or `collate` + one forward
per batch) embeds prepared tensors, so batch jobs (the CLI) can prepare items one by one, skip the
bad ones, and embed the rest. The modality-specific parts live in ``onepeace/modalities/{kind}.py``;
this file names no modality.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from .registry import compose_path, get_modality


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


def require_branch(model, modality: str) -> None:
    if modality not in model.adapters:
        raise ValueError(f"this model has no {modality} branch (it has {list(model.modalities)})")


# ---- no NaN leaves the library ----
class NonFiniteError(ValueError):
    """An embedding (or an input) holds NaN or infinity; the message names the items."""


NONFINITE_HINT = ("its values overflowed inside the model (e.g. samples far outside [-1, 1]), "
                  "or the model's weights are not finite")


def nonfinite_rows(values: Any) -> list[int]:
    """Indices i where values[i] holds a NaN or an infinity. `values`: a (N, ...) torch tensor or
    numpy array (an embedding batch, a query vector batch); integer arrays are always finite."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point() and not values.is_complex():
            return []
        bad = ~torch.isfinite(values.detach()).reshape(values.shape[0], -1).all(dim=1)  # (N,)
        return bad.nonzero().flatten().tolist()
    import numpy as np

    arr = np.asarray(values)
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return []
    return np.flatnonzero(~np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)).tolist()


def check_finite(values: Any, names: Sequence[str] | None = None, what: str = "embedding") -> Any:
    """Return `values` (a (N, ...) tensor or array) unchanged if every row is finite; else raise
    NonFiniteError naming the bad rows (`names[i]`, else "item i"). For the index and the server:
    call it on embeddings before storing or returning them, and on query vectors/weights."""
    bad = nonfinite_rows(values)
    if bad:
        labels = [str(names[i]) if names is not None and i < len(names) else f"item {i}" for i in bad]
        shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
        raise NonFiniteError(f"the {what} of {shown} is not finite (NaN or infinity)"
                             + (": " + NONFINITE_HINT if what == "embedding" else ""))
    return values


def _item_name(source: Any, i: int) -> str:
    import os

    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"input {i}"


def collect_embeddings(model, n: int, batches: Iterator[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """(index list, (b, D) embeddings) batches -> (n, D) float32, row i for input i."""
    out = torch.empty(n, model.config.encoder.embed_dim, dtype=torch.float32, device=model.device)
    for index, emb in batches:
        out[index] = emb.float()
    return out


# ---- batch jobs: many named items of one modality, bad ones reported and skipped ----
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
        compose = compose_path(model, modality)
        if compose is not None:  # composed from other branches (video files: frames + audio track)
            return _embed_composed(model, compose, entries, on_error, batch_size, progress)
        for name, _ in entries:
            on_error(name, f"the model has no {modality} branch")
        progress(len(entries))
        return names, chunks[0]
    try:  # the modality's registered preprocessing (e.g. the tokenizer, loaded now)
        prepare = modality_transform(model, modality)
    except (FileNotFoundError, ValueError) as e:  # e.g. no tokenizer files
        for name, _ in entries:
            on_error(name, str(e))
        progress(len(entries))
        return names, chunks[0]
    batch = batch_size or get_modality(model.config.adapters[modality].kind).batch_size
    for start in range(0, len(entries), batch):
        ok_names, prepared = [], []
        for name, source in entries[start:start + batch]:
            try:
                prepared.append(prepare(source))
                ok_names.append(name)
            except (ValueError, OSError) as e:  # InputError is a ValueError and names the input
                on_error(name, str(e))
        if prepared:
            emb, ok_names = _embed_batch(model, modality, prepared, ok_names, batch, on_error)
            chunks.append(emb)
            names += ok_names
        progress(len(entries[start:start + batch]))
    return names, torch.cat(chunks)


def _embed_batch(model, modality: str, prepared: list, names: list[str], batch: int,
                 on_error: Callable[[str, str], None]) -> tuple[torch.Tensor, list[str]]:
    """Prepared items -> ((k, D) float32 CPU embeddings, their k names). If the batch fails (e.g. token
    ids outside a toy model's vocabulary), each item is tried alone so that only the bad ones are lost;
    non-finite embeddings are reported and dropped."""
    try:
        emb = embed_prepared(model, modality, prepared, batch_size=batch)
    except (ValueError, RuntimeError) as e:
        if len(prepared) == 1:
            on_error(names[0], str(e).splitlines()[0] if str(e) else type(e).__name__)
            return torch.zeros(0, model.config.encoder.embed_dim), []
        parts = [_embed_batch(model, modality, [p], [n], 1, on_error) for p, n in zip(prepared, names)]
        return torch.cat([p[0] for p in parts]), [n for p in parts for n in p[1]]
    return _drop_nonfinite(emb.float().cpu(), names, on_error)


def _drop_nonfinite(emb: torch.Tensor, names: list[str], on_error: Callable[[str, str], None]
                    ) -> tuple[torch.Tensor, list[str]]:
    """(b, D) embeddings of `names` -> the finite rows and their names; each other one goes to on_error."""
    bad = set(nonfinite_rows(emb))
    if not bad:
        return emb, names
    for i in sorted(bad):
        on_error(names[i], f"its embedding is not finite (NaN or infinity): {NONFINITE_HINT}")
    keep = [i for i in range(len(names)) if i not in bad]
    return emb[keep], [names[i] for i in keep]


def _embed_composed(model, compose, entries: Sequence[tuple[str, Any]], on_error: Callable[[str, str], None],
                    batch_size: int | None, progress: Callable[[int], None]) -> tuple[list[str], torch.Tensor]:
    """embed_entries for a modality the model has no branch of: its `compose` path, item by item (an
    item is a whole file, e.g. a video: many frames), bad items reported and skipped."""
    names: list[str] = []
    chunks = [torch.zeros(0, model.config.encoder.embed_dim)]
    for name, source in entries:
        try:
            emb, ok = _drop_nonfinite(compose(model, [source], batch_size or 32).float().cpu(), [name], on_error)
            chunks.append(emb)
            names += ok
        except (ValueError, OSError) as e:  # InputError names the file
            on_error(name, str(e))
        progress(1)
    return names, torch.cat(chunks)


# ---- any registered modality ----
def modality_transform(model, modality: str):
    """The registered preprocessing of `modality` for this model: raw item -> prepared tensor."""
    require_branch(model, modality)
    spec = get_modality(model.config.adapters[modality].kind)
    if spec.transform is None:
        raise ValueError(f"modality {modality!r} registered no transform")
    return spec.transform(model)


@torch.inference_mode()
def embed_prepared(model, modality: str, items: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Prepared tensors of one modality -> (N, D) embeddings in input order (the modality's own
    embed path when it registered one, else its collate + one forward per batch)."""
    require_branch(model, modality)
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

    return collect_embeddings(model, len(items), run())


def encode_items(model, modality: str, sources: Sequence[Any], batch_size: int | None = None,
                 **options: Any) -> torch.Tensor:
    """Raw items of any registered modality -> (N, D) L2-normalised embeddings: the modality's own
    `encode` when it registered one (it takes `options`, e.g. audio's long_audio=), else its
    transform + embed (or collate + forward). batch_size None: the modality's default. A model
    without the branch uses the modality's registered `compose` path when it has one (video files).
    An embedding that is not finite raises NonFiniteError naming its input (no NaN leaves the library)."""
    out = _encode_items(model, modality, sources, batch_size, **options)
    return check_finite(out, [_item_name(s, i) for i, s in enumerate(sources)])


def _encode_items(model, modality: str, sources: Sequence[Any], batch_size: int | None, **options: Any
                  ) -> torch.Tensor:
    compose = compose_path(model, modality)
    if compose is not None:
        return compose(model, sources, batch_size or 32, **options)
    require_branch(model, modality)
    spec = get_modality(model.config.adapters[modality].kind)
    batch_size = batch_size or spec.batch_size
    if spec.encode is not None:
        return spec.encode(model, sources, batch_size, **options)
    if options:
        raise TypeError(f"modality {modality!r} takes no encode options, got {sorted(options)}")
    transform = modality_transform(model, modality)
    return embed_prepared(model, modality, [transform(s) for s in sources], batch_size)

"""Modalities: one record per modality, in ONE dict (:data:`MODALITIES`). A leaf module: it imports
nothing from onepeace, so anything may import it at module top.

A model config lists its modalities (``ModelConfig.adapters``, name -> adapter config); the encoder
builds one FFN expert and one final LayerNorm per listed modality, the model one projection head per
modality. The encoder, attention and layers never name a modality.

Every modality, the built-in text, image and audio included, is ONE file of the same shape in
``onepeace/modalities/`` (see onepeace/modalities/video.py and docs/adding-a-modality.md): its
adapter config (a dataclass whose ``from_released`` / ``to_released`` read and write the released
checkpoint format), its adapter (an :class:`~onepeace.modeling.adapters.Adapter` subclass), a
`transform` (raw item -> prepared tensor), a `collate` (prepared tensors -> forward keyword
arguments), optionally a faster `embed` / `encode` path and its file suffixes, and a call to
:func:`register_modality` at the bottom. ``import onepeace`` imports the bundled files; a kind not
registered yet is looked up as ``onepeace.modalities.{kind}`` (or the module a saved config records).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

# transform(model) -> (raw item -> prepared tensor), e.g. a path -> (3, S, S) pixels
TransformFactory = Callable[[Any], Callable[[Any], torch.Tensor]]
# collate(model, prepared tensors) -> keyword arguments of OnePeaceModel.forward for one batch
Collate = Callable[[Any, Sequence[torch.Tensor]], dict[str, torch.Tensor]]
# embed(model, prepared tensors, batch_size) -> (N, D): an optional faster path than collate + forward
Embed = Callable[[Any, Sequence[torch.Tensor], int], torch.Tensor]
# encode(model, raw items, batch_size, **options) -> (N, D): an optional whole raw-item path with
# options of its own (audio: long_audio="windows"); without it, transform + embed (or collate)
Encode = Callable[..., torch.Tensor]
# compose(model, raw items, batch_size, **options) -> (N, D): how a model WITHOUT this modality's branch
# embeds its items from the branches it has (video files: frame average of the image branch + the
# audio track); None: the branch is required
Compose = Callable[..., torch.Tensor]
# example(model, n) -> forward keyword arguments of n random but valid items (smoke tests, benchmarks)
Example = Callable[[Any, int], dict[str, torch.Tensor]]

BUNDLED_PACKAGE = "onepeace.modalities"


@dataclass(frozen=True)
class Modality:
    """What onepeace knows about one modality. `config_cls` is an ``AdapterConfig`` subclass (saved in
    config.json; ``config_cls.from_released`` infers it from a released checkpoint), `adapter_cls` an
    ``Adapter`` subclass (its ``RELEASED_NAMES`` are the released checkpoint's names of its parameters)."""

    kind: str
    config_cls: type
    adapter_cls: type
    transform: TransformFactory | None = None
    collate: Collate | None = None
    embed: Embed | None = None
    encode: Encode | None = None
    suffixes: frozenset[str] = frozenset()  # lower-case file suffixes that hold items of this kind
    batch_size: int = 16  # default items per batch of batch jobs (CLI embed, index build)
    example: Example | None = None
    compose: Compose | None = None  # the path for models without this branch (see Compose)


MODALITIES: dict[str, Modality] = {}  # kind -> record, in registration order


def register_modality(kind: str, config_cls: type, adapter_cls: type, transform: TransformFactory | None = None,
                      collate: Collate | None = None, embed: Embed | None = None, *, encode: Encode | None = None,
                      suffixes: Sequence[str] = (), batch_size: int = 16, example: Example | None = None,
                      compose: Compose | None = None) -> Modality:
    """Make `kind` usable in model configs (its adapter, config class, preprocessing and collate).

    Registering the same classes again (a module re-imported) is allowed; another class under a
    taken name is an error."""
    if not kind.isidentifier():
        raise ValueError(f"modality kind must be an identifier (it becomes a parameter-name part), got {kind!r}")
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, torch.nn.Module)
            and hasattr(adapter_cls, "released_name_rules")):
        raise TypeError(f"adapter_cls for {kind!r} must be an Adapter subclass, got {adapter_cls!r}")
    if not (isinstance(config_cls, type) and hasattr(config_cls, "to_dict")):
        raise TypeError(f"config_cls for {kind!r} must be an AdapterConfig subclass, got {config_cls!r}")
    bad = [s for s in suffixes if not (s.startswith(".") and s == s.lower())]
    if bad:
        raise ValueError(f"suffixes of {kind!r} must be lower case and start with '.', got {bad}")
    old = MODALITIES.get(kind)
    if old is not None and (old.adapter_cls.__qualname__, old.config_cls.__qualname__) != (
            adapter_cls.__qualname__, config_cls.__qualname__):
        raise ValueError(f"modality kind {kind!r} is already registered to {old.adapter_cls.__name__}")
    taken = {s: m.kind for m in MODALITIES.values() if m.kind != kind for s in m.suffixes}
    clash = sorted(s for s in suffixes if s in taken)
    if clash:
        raise ValueError(f"suffixes {clash} of {kind!r} already belong to {sorted({taken[s] for s in clash})}")
    config_cls.kind = kind
    MODALITIES[kind] = Modality(kind, config_cls, adapter_cls, transform, collate, embed, encode,
                                frozenset(suffixes), batch_size, example, compose)
    return MODALITIES[kind]


def get_modality(kind: str, module: str | None = None) -> Modality:
    """The record of `kind`, importing the module that registers it when needed: `module` (recorded
    in saved configs of modalities defined outside onepeace) or the bundled ``onepeace.modalities.{kind}``.
    Raises ValueError naming the known kinds."""
    if kind not in MODALITIES:
        for candidate in ([module] if module else []) + [f"{BUNDLED_PACKAGE}.{kind}"]:
            try:
                importlib.import_module(candidate)  # registers the kind (dynamic: no import-time edge)
            except ModuleNotFoundError as e:
                if e.name is None or not candidate.startswith(e.name):
                    raise  # the module exists but one of ITS imports is missing: say so
            if kind in MODALITIES:
                break
    try:
        return MODALITIES[kind]
    except KeyError:
        raise ValueError(f"unknown modality kind {kind!r}; known: {sorted(MODALITIES)} "
                         "(register it with onepeace.registry.register_modality)") from None


def list_modalities() -> list[str]:
    """Names of the registered modalities, sorted (``import onepeace`` registers the bundled ones)."""
    return sorted(MODALITIES)


def modality_for_path(path: str | os.PathLike) -> str | None:
    """The kind whose suffixes include this file's (case-insensitive), or None. A text file
    (.txt, .jsonl) gives "text": a file of texts, one per line."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    return next((m.kind for m in MODALITIES.values() if suffix and suffix in m.suffixes), None)


def file_modalities() -> tuple[str, ...]:
    """The kinds that files on disk can hold (those with suffixes), in registration order."""
    return tuple(m.kind for m in MODALITIES.values() if m.suffixes)


def compose_path(model: Any, kind: str) -> Callable | None:
    """The `compose` path `kind` registered, when `model` lacks that branch and must build the
    embedding from its other branches (video files on a model without a video branch); else None."""
    if kind in model.adapters or kind not in MODALITIES:
        return None
    return MODALITIES[kind].compose


def can_embed(model: Any, kind: str) -> bool:
    """Whether `model` embeds items of `kind`: it has that branch, or a `compose` path (see above)."""
    return kind in model.adapters or compose_path(model, kind) is not None


def embeddable_modalities(model: Any) -> tuple[str, ...]:
    """The kinds `model` can embed (its branches, then the registered kinds it can compose)."""
    return tuple(dict.fromkeys([*model.modalities, *(k for k in MODALITIES if can_embed(model, k))]))


def adapter_class(cfg: Any) -> type:
    """The adapter class of an adapter config (by its ``kind``)."""
    try:
        return get_modality(cfg.kind).adapter_cls
    except ValueError:
        raise KeyError(f"no adapter registered for modality kind {cfg.kind!r}; known: {sorted(MODALITIES)}") from None

"""Modalities: a modality is a registered adapter + config + preprocessing + collate.

A model config lists its modalities (``ModelConfig.adapters``, name -> adapter config); the encoder
builds one FFN expert and one final LayerNorm per listed modality, the model one projection head per
modality. The encoder, attention and layers never name a modality.

A new modality is ONE file that defines an :class:`~onepeace.modeling.adapters.Adapter` subclass, its
config dataclass, a `transform` (raw item -> prepared tensor) and a `collate` (prepared tensors ->
forward keyword arguments), and calls :func:`register_modality`. Files in ``onepeace/modalities/``
are found by name (``onepeace.modalities.{kind}``); others are recorded by module in saved configs.
See docs/adding-a-modality.md (the video modality, onepeace/modalities/video.py).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .config import ADAPTER_CONFIGS, AdapterConfig
from .modeling.adapters import Adapter, AudioAdapter, ImageAdapter, TextAdapter

# transform(model) -> (raw item -> prepared tensor), e.g. a path -> (3, S, S) pixels
TransformFactory = Callable[[Any], Callable[[Any], torch.Tensor]]
# collate(model, prepared tensors) -> keyword arguments of OnePeaceModel.forward for one batch
Collate = Callable[[Any, Sequence[torch.Tensor]], dict[str, torch.Tensor]]
# embed(model, prepared tensors, batch_size) -> (N, D): an optional faster path than collate + forward
Embed = Callable[[Any, Sequence[torch.Tensor], int], torch.Tensor]


@dataclass(frozen=True)
class Modality:
    kind: str
    config_cls: type[AdapterConfig]
    adapter_cls: type[Adapter]
    transform: TransformFactory | None = None
    collate: Collate | None = None
    embed: Embed | None = None


MODALITIES: dict[str, Modality] = {}
ADAPTERS: dict[str, type[Adapter]] = {}  # kind -> adapter class (a view of MODALITIES)


def register_modality(kind: str, config_cls: type[AdapterConfig], adapter_cls: type[Adapter],
                      transform: TransformFactory | None = None, collate: Collate | None = None,
                      embed: Embed | None = None) -> Modality:
    """Make `kind` usable in model configs (its adapter, config class, preprocessing and collate).

    Registering the same classes again (a module re-imported) is allowed; another class under a
    taken name is an error."""
    if not kind.isidentifier():
        raise ValueError(f"modality kind must be an identifier (it becomes a parameter-name part), got {kind!r}")
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
        raise TypeError(f"adapter_cls for {kind!r} must be an Adapter subclass, got {adapter_cls!r}")
    old = MODALITIES.get(kind)
    if old is not None and (old.adapter_cls.__qualname__, old.config_cls.__qualname__) != (
            adapter_cls.__qualname__, config_cls.__qualname__):
        raise ValueError(f"modality kind {kind!r} is already registered to {old.adapter_cls.__name__}")
    config_cls.kind = kind
    ADAPTER_CONFIGS[kind] = config_cls
    ADAPTERS[kind] = adapter_cls
    MODALITIES[kind] = Modality(kind, config_cls, adapter_cls, transform, collate, embed)
    return MODALITIES[kind]


def load_bundled_modalities() -> None:
    """Import every module of ``onepeace.modalities`` (each registers one modality)."""
    from . import modalities

    for info in pkgutil.iter_modules(modalities.__path__):
        importlib.import_module(f"{modalities.__name__}.{info.name}")


def list_modalities() -> list[str]:
    """Names of the registered modalities (the built-in three, the bundled ones, any registered)."""
    load_bundled_modalities()
    return sorted(MODALITIES)


def get_modality(kind: str) -> Modality:
    if kind not in MODALITIES:
        from .config import adapter_config_class

        adapter_config_class(kind)  # imports onepeace.modalities.{kind} if there is one; raises if unknown
    return MODALITIES[kind]


def adapter_class(cfg: AdapterConfig) -> type[Adapter]:
    try:
        return get_modality(cfg.kind).adapter_cls
    except ValueError:
        raise KeyError(f"no adapter registered for modality kind {cfg.kind!r}; known: {sorted(ADAPTERS)}") from None


# ---- the built-in modalities ----
def _text_transform(model) -> Callable[[str], torch.Tensor]:
    return lambda text: torch.tensor(model.tokenizer.encode(text), dtype=torch.long)


def _text_collate(model, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    tokens = torch.ones(len(items), max(len(t) for t in items), dtype=torch.long)  # pad id 1
    for row, ids in enumerate(items):
        tokens[row, :len(ids)] = ids
    return {"text": tokens}


def _image_transform(model):
    from .inference import image_transform

    return image_transform(model)


def _image_collate(model, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack(list(items))}


def _audio_transform(model):
    from .inference import audio_transform

    return audio_transform(model)


def _audio_collate(model, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    from .data.audio import collate_waveforms

    audio, mask = collate_waveforms(list(items), model.config.adapters["audio"].feature_encoder_spec)
    return {"audio": audio, "audio_padding_mask": mask}


def _embed_texts(model, items: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    from .inference import embed_token_ids

    return embed_token_ids(model, [t.tolist() for t in items], batch_size)


def _embed_images(model, items: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    from .inference import embed_image_tensors

    return embed_image_tensors(model, items, batch_size)


def _embed_audios(model, items: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    from .inference import embed_waveforms

    return embed_waveforms(model, items, batch_size)


register_modality("text", ADAPTER_CONFIGS["text"], TextAdapter, _text_transform, _text_collate, _embed_texts)
register_modality("image", ADAPTER_CONFIGS["image"], ImageAdapter, _image_transform, _image_collate, _embed_images)
register_modality("audio", ADAPTER_CONFIGS["audio"], AudioAdapter, _audio_transform, _audio_collate, _embed_audios)

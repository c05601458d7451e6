"""Modalities: which adapter class and config class a modality kind uses.

A new modality is one file that defines an :class:`~onepeace.modeling.adapters.Adapter` subclass and
its config dataclass, and calls :func:`register_modality`.
"""
from __future__ import annotations

from .config import ADAPTER_CONFIGS, AdapterConfig
from .modeling.adapters import Adapter, AudioAdapter, ImageAdapter, TextAdapter

ADAPTERS: dict[str, type[Adapter]] = {"text": TextAdapter, "image": ImageAdapter, "audio": AudioAdapter}


def register_modality(kind: str, config_cls: type[AdapterConfig], adapter_cls: type[Adapter]) -> None:
    if kind in ADAPTERS and ADAPTERS[kind] is not adapter_cls:
        raise ValueError(f"modality kind {kind!r} is already registered to {ADAPTERS[kind].__name__}")
    config_cls.kind = kind
    ADAPTER_CONFIGS[kind] = config_cls
    ADAPTERS[kind] = adapter_cls


def adapter_class(cfg: AdapterConfig) -> type[Adapter]:
    try:
        return ADAPTERS[cfg.kind]
    except KeyError:
        raise KeyError(f"no adapter registered for modality kind {cfg.kind!r}; known: {sorted(ADAPTERS)}") from None

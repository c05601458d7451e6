"""Named model sizes: ``get_config("one-peace-tiny")`` ... ``get_config("one-peace-4b")``.

Separate from :mod:`onepeace.config` because a size lists concrete modalities, whose config classes
live in their plugin files (``onepeace/modalities/``), which themselves import :mod:`onepeace.config`.
"""
from __future__ import annotations

from .config import RELEASED_AUDIO_FEATURE_SPEC, AdapterConfig, EncoderConfig, ModelConfig
from .modalities.audio import AudioAdapterConfig
from .modalities.image import ImageAdapterConfig
from .modalities.text import TextAdapterConfig


def _released_adapters(image_size: int = 256, audio_channels: int = 512) -> dict[str, AdapterConfig]:
    grid = image_size // 16
    spec = tuple((audio_channels, k, s) for _, k, s in RELEASED_AUDIO_FEATURE_SPEC)
    return {
        "text": TextAdapterConfig(),
        "image": ImageAdapterConfig(image_size=image_size, bucket_size=grid, rel_bucket_size=grid),
        "audio": AudioAdapterConfig(feature_encoder_spec=spec),
    }


def _small_size(name: str, dim: int, ffn_dim: int, layers: int, audio_channels: int, conv_pos_groups: int
                ) -> ModelConfig:
    """4 heads, 64-pixel images (4 x 4 patches), the released audio strides with fewer channels."""
    return ModelConfig(
        encoder=EncoderConfig(embed_dim=dim, ffn_embed_dim=ffn_dim, layers=layers, attention_heads=4),
        adapters={
            "text": TextAdapterConfig(),
            "image": ImageAdapterConfig(image_size=64, bucket_size=4, rel_bucket_size=4),
            "audio": AudioAdapterConfig(
                feature_encoder_spec=tuple((audio_channels, k, s) for _, k, s in RELEASED_AUDIO_FEATURE_SPEC),
                conv_pos_groups=conv_pos_groups,
            ),
        },
        name=name,
    )


def _named_sizes() -> dict[str, ModelConfig]:
    sizes = {
        # The released retrieval model (3.88e9 parameters).
        "one-peace-4b": ModelConfig(encoder=EncoderConfig(), adapters=_released_adapters(), name="one-peace-4b"),
        # A ViT-B-sized model for benchmarks and real training runs.
        "one-peace-base": ModelConfig(
            encoder=EncoderConfig(embed_dim=768, ffn_embed_dim=3072, layers=12, attention_heads=12),
            adapters=_released_adapters(image_size=224, audio_channels=512),
            name="one-peace-base",
        ),
        # Small enough to pretrain on 2 CPU cores in minutes.
        "one-peace-small": _small_size("one-peace-small", 192, 512, 4, audio_channels=64, conv_pos_groups=4),
        # For unit tests: the sizes of the official-tiny fixture, with the real vocabulary.
        "one-peace-tiny": _small_size("one-peace-tiny", 64, 160, 3, audio_channels=32, conv_pos_groups=16),
    }
    return sizes


NAMED_CONFIGS: dict[str, ModelConfig] = _named_sizes()


def get_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model name {name!r}; known: {sorted(NAMED_CONFIGS)}") from None


def list_models() -> list[str]:
    """Names accepted by :func:`get_config` and :func:`onepeace.create_model`."""
    return sorted(NAMED_CONFIGS)

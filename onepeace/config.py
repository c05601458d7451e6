"""Typed configuration of a ONE-PEACE model, saved as JSON.

A model is a shared Transformer encoder (:class:`EncoderConfig`) fed by one adapter per modality.
Each adapter has its own config dataclass; :data:`ADAPTER_CONFIGS` maps a modality name to it, so a
new modality adds one entry (see :mod:`onepeace.registry`). Configs are frozen: derive variants with
:func:`dataclasses.replace` or :meth:`ModelConfig.select`.

Field names follow the released configurations (``embed_dim``, ``magneto_scale_attn``, ...) so a
released ``cfg`` maps onto them one to one; :func:`onepeace.checkpoint.config_from_released` builds
them from a checkpoint and checks them against the tensor shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The released audio feature extractor: (channels, kernel, stride) per conv block; total stride 320
# samples, i.e. 50 frames per second of 16 kHz audio.
RELEASED_AUDIO_FEATURE_SPEC: tuple[tuple[int, int, int], ...] = (
    ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every adapter has (names as in the released configurations)."""

    use_attn_bias: bool = True  # relative-position attention bias tables
    bucket_size: int = 256  # text/audio: 1-D relative buckets; image: absolute position grid side
    layernorm_embedding: bool = False  # LayerNorm on [CLS, tokens] before positions are added
    add_type_embedding: bool = False  # a learned (1, 1, D) vector added to every position
    shrink_alpha: float = 1.0  # gradient shrink of the adapter output (forward is unchanged)
    dropout: float = 0.0

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, **_asdict(self)}
        if type(self).__module__ != __name__:
            # a modality defined outside this file: the JSON names the module that registers it, so
            # a saved model loads in a fresh process without the user importing that module first
            data["module"] = type(self).__module__
        return data

    def decoder_variant(self) -> "AdapterConfig":
        """The adapter of the pretraining decoder for this modality (no stem, no relative bias)."""
        raise ValueError(f"no denoising-decoder adapter is defined for modality kind {self.kind!r}")


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


@dataclass(frozen=True)
class ImageAdapterConfig(AdapterConfig):
    image_size: int = 256  # preprocessing: square input side in pixels (16 pixels per patch)
    bucket_size: int = 16  # side of the learned absolute position grid
    rel_bucket_size: int = 16  # side of the grid the 2-D relative bias table was built for
    vision_encoder_type: str = "hmlp"  # "hmlp" (released), "mlp" (one 16x16 conv), "none" (decoder)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    kind: ClassVar[str] = "image"
    patch_size: ClassVar[int] = 16

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def decoder_variant(self) -> "ImageAdapterConfig":
        return ImageAdapterConfig(vision_encoder_type="none", use_attn_bias=False, image_size=self.image_size,
                                  bucket_size=self.bucket_size, rel_bucket_size=self.rel_bucket_size)


@dataclass(frozen=True)
class AudioAdapterConfig(AdapterConfig):
    # (channels, kernel, stride) per conv block of the waveform feature extractor; () = none (decoder)
    feature_encoder_spec: tuple[tuple[int, int, int], ...] = RELEASED_AUDIO_FEATURE_SPEC
    conv_bias: bool = False
    abs_pos_type: str = "conv"  # "conv" (positions computed from the frames) or "fixed" (a table)
    conv_pos_depth: int = 5
    conv_pos_width: int = 95
    conv_pos_groups: int = 16
    conv_pos_pre_ln: bool = False
    max_positions: int = 1026  # rows of the "fixed" position table
    bucket_size: int = 512
    sample_rate: int = 16000  # preprocessing
    max_seconds: float = 15.0  # the reference keeps the first 15 s
    min_seconds: float = 1.0  # shorter clips are tiled to 1 s

    kind: ClassVar[str] = "audio"

    @property
    def conv_pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    @property
    def feature_dim(self) -> int:
        return self.feature_encoder_spec[-1][0] if self.feature_encoder_spec else 0

    def decoder_variant(self) -> "AudioAdapterConfig":
        return AudioAdapterConfig(feature_encoder_spec=(), abs_pos_type="fixed", use_attn_bias=False, bucket_size=256)


# modality kind -> its adapter config class; :func:`onepeace.registry.register_modality` adds entries
ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {
    "text": TextAdapterConfig,
    "image": ImageAdapterConfig,
    "audio": AudioAdapterConfig,
}
JOINT_HEAD_TYPES = ("vl", "al")  # task heads over one joint pass: text + image, text + audio


def adapter_config_class(kind: str, module: str | None = None) -> type[AdapterConfig]:
    """The config class of a modality kind, importing the module that registers it when needed:
    `module` (recorded in saved configs) or a bundled ``onepeace.modalities.{kind}``."""
    if kind not in ADAPTER_CONFIGS:
        import importlib

        for candidate in ([module] if module else []) + [f"onepeace.modalities.{kind}"]:
            try:
                importlib.import_module(candidate)
            except ModuleNotFoundError as e:
                if e.name is None or not candidate.startswith(e.name):
                    raise  # the module exists but one of ITS imports is missing: say so
            if kind in ADAPTER_CONFIGS:
                break
    try:
        return ADAPTER_CONFIGS[kind]
    except KeyError:
        raise ValueError(f"unknown modality kind {kind!r}; known: {sorted(ADAPTER_CONFIGS)} "
                         "(register it with onepeace.registry.register_modality)") from None


@dataclass(frozen=True)
class EncoderConfig:
    """The shared Transformer: one self-attention for all modalities, one FFN per modality."""

    embed_dim: int = 1536
    ffn_embed_dim: int = 6144
    layers: int = 40
    attention_heads: int = 24
    magneto_scale_attn: bool = True  # LayerNorm on the attention output before out_proj
    scale_attn: bool = False  # LayerNorm after out_proj
    scale_fc: bool = True  # LayerNorm over the FFN's hidden width
    scale_heads: bool = False  # a learned scalar per head
    use_layer_scale: bool = True
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0  # linearly increasing over layers (training only)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    # relative-bias tables per adapter: 1 (shared by all layers) or `layers` (one per layer)
    rel_pos_tables: int = 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    def __post_init__(self) -> None:
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by attention_heads {self.attention_heads}"
            )
        if self.rel_pos_tables not in (1, self.layers):
            raise ValueError(f"rel_pos_tables must be 1 or layers ({self.layers}), got {self.rel_pos_tables}")


@dataclass(frozen=True)
class ClassifyHeadConfig:
    head_type: str = "vl"  # which pass feeds the head: 'vl', 'al', 'text', 'image', 'audio'
    num_classes: int = 4
    attn_pooling: bool = True  # attention pooling over positions 1.. (else the CLS row)
    use_pooler: bool = True  # Linear + tanh after pooling
    head_scale_ratio: float = 2.0  # classifier hidden width = int(D * ratio)
    use_image_features: bool = False  # joint passes: pool the image rows instead of the text rows
    use_two_images: bool = False  # NLVR2: a second joint pass with a second image, pooled vectors concatenated

    def __post_init__(self) -> None:
        if self.head_type not in JOINT_HEAD_TYPES:
            try:
                adapter_config_class(self.head_type)
            except ValueError:
                raise ValueError(f"head_type must be one of {list(JOINT_HEAD_TYPES)} or a modality "
                                 f"({sorted(ADAPTER_CONFIGS)}); got {self.head_type!r}") from None

    @property
    def input_modalities(self) -> tuple[str, ...]:
        """The modalities of the pass that feeds the head (text first in joint passes)."""
        return {"vl": ("text", "image"), "al": ("text", "audio")}.get(self.head_type, (self.head_type,))

    @property
    def pooled_modality(self) -> str:
        if self.head_type == "vl":
            return "image" if self.use_image_features else "text"
        if self.head_type == "al":
            return "text"
        return self.head_type


class JsonConfig:
    """save/load for config dataclasses that define to_dict / from_dict."""

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike):
        with open(path) as f:
            return cls.from_dict(json.load(f))


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """A whole model: encoder, adapters (in canonical order: text first) and heads."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapters: dict[str, AdapterConfig] = field(default_factory=dict)
    projections: bool = True  # `{m}_proj` heads + logit_scale of the retrieval model
    logit_scale_init: float = 1 / 0.07  # the initial temperature (stored as its log)
    name: str = "custom"
    # the task head of fine-tuned checkpoints (grounding, VQA, NLVR2, audio classification)
    classify_head: ClassifyHeadConfig | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def __post_init__(self) -> None:
        order = list(self.adapters)
        if "text" in order and order[0] != "text":
            # joint sequences put text first; keep the dict in that order
            ordered = {"text": self.adapters["text"], **{k: v for k, v in self.adapters.items() if k != "text"}}
            object.__setattr__(self, "adapters", ordered)

    def select(self, modalities) -> "ModelConfig":
        """The same model restricted to some modalities (other branches are not built)."""
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in self.adapters]
        if unknown:
            raise ValueError(f"modalities {unknown} are not in this model (it has {list(self.adapters)})")
        return dataclasses.replace(self, adapters={m: c for m, c in self.adapters.items() if m in modalities})

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "encoder": _asdict(self.encoder),
            "adapters": {m: c.to_dict() for m, c in self.adapters.items()},
            "projections": self.projections,
            "logit_scale_init": self.logit_scale_init,
            "classify_head": None if self.classify_head is None else _asdict(self.classify_head),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        adapters = {}
        for name, raw in data.get("adapters", {}).items():
            raw = dict(raw)
            kind, module = raw.pop("kind", name), raw.pop("module", None)
            try:
                config_cls = adapter_config_class(kind, module)
            except ValueError as e:
                raise ValueError(f"modality {name!r}: {e}") from None
            adapters[name] = _from_dict(config_cls, raw)
        return cls(
            encoder=_from_dict(EncoderConfig, data.get("encoder", {})),
            adapters=adapters,
            projections=data.get("projections", True),
            logit_scale_init=data.get("logit_scale_init", 1 / 0.07),
            name=data.get("name", "custom"),
            classify_head=None if not data.get("classify_head") else _from_dict(ClassifyHeadConfig, data["classify_head"]),
        )



def _asdict(obj) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _from_dict(cls, raw: dict[str, Any]):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for key, value in raw.items():
        if isinstance(value, list):  # JSON arrays back to (nested) tuples
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    return cls(**kwargs)


# ---- named sizes ----
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

"""Typed configuration of a ONE-PEACE model, saved as JSON.

A model is a shared Transformer encoder (:class:`EncoderConfig`) fed by one adapter per modality.
Each adapter has its own config dataclass, a subclass of :class:`AdapterConfig` defined in its
modality's file (``onepeace/modalities/{kind}.py``) and found through :mod:`onepeace.registry`.
Configs are frozen: derive variants with :func:`dataclasses.replace` or :meth:`ModelConfig.select`.
The named sizes (``get_config("one-peace-tiny")``) are in :mod:`onepeace.sizes`.

Field names follow the released configurations (``embed_dim``, ``magneto_scale_attn``, ...) so a
released ``cfg`` maps onto them one to one; :func:`onepeace.checkpoint.config_from_released` builds
them from a checkpoint (each adapter config's ``from_released``) and checks them against the shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from .registry import BUNDLED_PACKAGE, get_modality

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
        if type(self).__module__ != f"{BUNDLED_PACKAGE}.{self.kind}":
            # a modality defined outside onepeace.modalities: the JSON names the module that registers
            # it, so a saved model loads in a fresh process without the user importing that module first
            data["module"] = type(self).__module__
        return data

    @classmethod
    def from_released(cls, view: Any, args: Mapping[str, Any]) -> "AdapterConfig":
        """This adapter's config from a released checkpoint: `view` is the adapter's tensors
        (:class:`onepeace.checkpoint.released_config.ReleasedAdapter`: shapes, presence, `pick` that
        notes disagreements), `args` the released cfg's ``{kind}_adapter`` section. The tensors win."""
        raise ValueError(f"modality kind {cls.kind!r} has no released checkpoint format")

    def to_released(self, task: dict[str, Any]) -> dict[str, Any]:
        """The released cfg's ``{kind}_adapter`` section for this config; settings the released
        layout keeps in the task cfg are written into `task`. Inverse of :meth:`from_released`."""
        return {k: v for k, v in self.to_dict().items() if k not in ("kind", "module")}

    def decoder_variant(self) -> "AdapterConfig":
        """The adapter of the pretraining decoder for this modality (no stem, no relative bias)."""
        raise ValueError(f"no denoising-decoder adapter is defined for modality kind {self.kind!r}")


JOINT_HEAD_TYPES = ("vl", "al")  # task heads over one joint pass: text + image, text + audio


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
                get_modality(self.head_type)
            except ValueError as e:
                raise ValueError(f"head_type must be one of {list(JOINT_HEAD_TYPES)} or a modality; "
                                 f"{e}") from None

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
                config_cls = get_modality(kind, module).config_cls
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


# names that moved out of this module: the named sizes to onepeace.sizes, the built-in adapter
# configs to their modality files. Resolved on first use (a static import would be a cycle: those
# modules import this one), so `from onepeace.config import get_config` keeps working.
_MOVED = {"get_config": "onepeace.sizes", "NAMED_CONFIGS": "onepeace.sizes",
          "TextAdapterConfig": f"{BUNDLED_PACKAGE}.text", "ImageAdapterConfig": f"{BUNDLED_PACKAGE}.image",
          "AudioAdapterConfig": f"{BUNDLED_PACKAGE}.audio"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

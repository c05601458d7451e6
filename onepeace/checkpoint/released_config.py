"""A released checkpoint's `cfg` + tensor shapes <-> a :class:`~onepeace.config.ModelConfig`.

The encoder and the task head are read here; each adapter's config is read by its own config class
(``config_cls.from_released(view, args)`` in ``onepeace/modalities/{kind}.py``) from a
:class:`ReleasedAdapter` view of its tensors, and written back by ``config.to_released(task)``.
Where the cfg and the tensors disagree the tensors win, and a note says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import ClassifyHeadConfig, EncoderConfig, ModelConfig
from ..registry import MODALITIES
from .key_map import ENCODER_PREFIX, CheckpointError


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    t = state.get(key)
    return None if t is None else tuple(t.shape)


@dataclass
class ReleasedAdapter:
    """One adapter's tensors in a released state dict, for its config class's ``from_released``."""

    kind: str
    state: Mapping[str, Any]
    prefix: str  # e.g. "encoder_wrapper.text_adapter."
    task: Mapping[str, Any]  # the released task cfg (preprocessing settings live there)
    embed_dim: int
    notes: list[str]  # where cfg and tensors disagree

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of the adapter's tensor `name` (relative to the adapter), None if absent."""
        return _shape(self.state, self.prefix + name)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state

    @property
    def is_encoder(self) -> bool:
        """An encoder's adapter (not the pretraining decoder's, whose adapters have no input embedding)."""
        return self.prefix.startswith(ENCODER_PREFIX)

    def require(self, name: str, why: str = "") -> tuple[int, ...]:
        """Shape of the adapter's tensor `name`; a missing one is a CheckpointError naming the key."""
        shape = self.shape(name)
        if shape is None:
            raise CheckpointError(f"missing key {self.prefix + name}" + (f" ({why})" if why else "")
                                  + "; refusing to guess it")
        return shape

    def matches(self, pattern: str) -> list[re.Match]:
        """Full matches of `pattern` against the adapter's tensor names (relative), in file order."""
        n = len(self.prefix)
        return [m for k in self.state if k.startswith(self.prefix) and (m := re.fullmatch(pattern, k[n:]))]

    def pick(self, what: str, cfg_value: Any, tensor_value: Any) -> Any:
        """The tensors' value (None: the cfg's), noting a disagreement as ``{kind}_adapter.{what}``."""
        return _pick(self.notes, f"{self.kind}_adapter.{what}", cfg_value, tensor_value)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def common(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The fields every :class:`~onepeace.config.AdapterConfig` has."""
        return dict(
            use_attn_bias=self.pick("use_attn_bias", args.get("use_attn_bias"), bool(self.rel_table_ids())),
            layernorm_embedding=self.pick("layernorm_embedding", args.get("layernorm_embedding"),
                                          self.has("layernorm_embedding.weight")),
            add_type_embedding=self.pick("add_type_embedding", args.get("add_type_embedding"),
                                         self.has("type_embedding")),
            shrink_alpha=float(args.get("shrink_alpha", 1.0)),
            dropout=float(args.get("dropout", 0.0)),
        )

    def rel_table_ids(self) -> list[int]:
        return [int(m.group(1)) for m in self.matches(r"rel_pos_table_list\.(\d+)\.weight")]


def _pick(notes: list[str], what: str, cfg_value: Any, tensor_value: Any) -> Any:
    if tensor_value is None:
        return cfg_value
    if cfg_value is not None and cfg_value != tensor_value:
        notes.append(f"cfg says {what}={cfg_value!r} but the tensors say {tensor_value!r}; using {tensor_value!r}")
    return tensor_value


def config_from_released(cfg: Mapping[str, Any] | None, state: Mapping[str, Any],
                         prefix: str = ENCODER_PREFIX, name: str = "released") -> tuple[ModelConfig, list[str]]:
    """Build a ModelConfig from a released `cfg` and the state dict's shapes (the tensors win).

    Returns (config, notes): a note for every place where the cfg and the tensors disagree.
    """
    notes: list[str] = []
    model_cfg = dict((cfg or {}).get("model") or {})
    enc_cfg = dict(model_cfg.get("encoder") or {})
    task_cfg = dict((cfg or {}).get("task") or {})
    # the registered kinds with an adapter in the file, in registration order (text first in ModelConfig)
    modalities = [m for m in MODALITIES if any(k.startswith(f"{prefix}{m}_adapter.") for k in state)]
    if not modalities:
        raise CheckpointError(f"no modality adapters ({prefix}<modality>_adapter.*) found in the checkpoint")
    encoder = _encoder_config(enc_cfg, state, prefix, modalities, notes)
    adapters = {}
    for m in modalities:
        view = ReleasedAdapter(m, state, f"{prefix}{m}_adapter.", task_cfg, encoder.embed_dim, notes)
        try:
            adapters[m] = MODALITIES[m].config_cls.from_released(view, dict(enc_cfg.get(f"{m}_adapter") or {}))
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError) as e:  # e.g. a tensor the config needs is missing
            raise CheckpointError(f"cannot read the {m} adapter's config from {view.prefix}*: {e!r}") from e
    # projection heads belong to the encoder side (the decoder of a pretraining file has none)
    projections = (prefix == ENCODER_PREFIX and "logit_scale" in state
                   and all(f"{m}_proj.weight" in state for m in modalities))
    head = None
    if prefix == ENCODER_PREFIX and (model_cfg.get("_name") == "one_peace_classify"
                                     or any(k.startswith("classify_head.") for k in state)):
        head = _classify_head_config(model_cfg, task_cfg, state, encoder.embed_dim, notes)
    config = ModelConfig(encoder=encoder, adapters=adapters, projections=projections, name=name, classify_head=head)
    return config, notes


def _encoder_config(enc_cfg: Mapping[str, Any], state: Mapping[str, Any], prefix: str, modalities: list[str],
                    notes: list[str]) -> EncoderConfig:
    """The shared encoder's sizes from the first layer's tensors; heads from the relative-bias tables."""
    fm = f"{prefix}fusion_model."

    def pick(what: str, cfg_value: Any, tensor_value: Any) -> Any:
        return _pick(notes, what, cfg_value, tensor_value)

    q = _shape(state, f"{fm}layers.0.self_attn.q_proj.weight")
    if q is None:
        raise CheckpointError(f"no encoder found: {fm}layers.0.self_attn.q_proj.weight is missing")
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(fm) + r"layers\.(\d+)\.", k))}
    D = pick("embed_dim", enc_cfg.get("embed_dim"), q[0])
    L = pick("layers", enc_cfg.get("layers"), max(layer_ids) + 1)
    for m in modalities:
        if _shape(state, f"{fm}layers.0.{m}_ffn.0.wi_0.weight") is None:
            raise CheckpointError(f"the checkpoint has a {m} adapter but no {m}_ffn experts: not supported")
    first = f"{fm}layers.0.{modalities[0]}_ffn."
    F_dim = pick("ffn_embed_dim", enc_cfg.get("ffn_embed_dim"), _shape(state, f"{first}0.wi_0.weight")[0])

    # heads: from any relative-bias table's width, else the cfg
    heads_from_tables, table_counts = None, {}
    for m in modalities:
        a = f"{prefix}{m}_adapter."
        table_counts[m] = len([k for k in state if re.fullmatch(re.escape(a) + r"rel_pos_table_list\.\d+\.weight", k)])
        if table_counts[m]:
            heads_from_tables = state[f"{a}rel_pos_table_list.0.weight"].shape[1]
    H = pick("attention_heads", enc_cfg.get("attention_heads"), heads_from_tables)
    if H is None:
        raise CheckpointError("cannot tell the number of attention heads: no cfg and no relative-bias tables")
    n_tables = max(table_counts.values())
    if n_tables not in (0, 1, L):
        raise CheckpointError(f"{n_tables} relative-bias tables per adapter: expected 1 or one per layer ({L})")

    layer0 = f"{fm}layers.0."
    return EncoderConfig(
        embed_dim=D, ffn_embed_dim=F_dim, layers=L, attention_heads=H,
        magneto_scale_attn=pick("magneto_scale_attn", enc_cfg.get("magneto_scale_attn"), f"{layer0}self_attn.ln.weight" in state),
        scale_attn=pick("scale_attn", enc_cfg.get("scale_attn"), f"{layer0}attn_ln.weight" in state),
        scale_fc=pick("scale_fc", enc_cfg.get("scale_fc"), f"{first}2.weight" in state),
        scale_heads=pick("scale_heads", enc_cfg.get("scale_heads"), f"{layer0}self_attn.c_attn" in state),
        use_layer_scale=pick("use_layer_scale", enc_cfg.get("use_layer_scale"), f"{layer0}gamma_1" in state),
        layer_scale_init_value=float(enc_cfg.get("layer_scale_init_value", 1e-6)),
        drop_path_rate=float(enc_cfg.get("drop_path_rate", 0.0)),
        dropout=float(enc_cfg.get("dropout", 0.0)),
        attention_dropout=float(enc_cfg.get("attention_dropout", 0.0)),
        activation_dropout=float(enc_cfg.get("activation_dropout", 0.0)),
        rel_pos_tables=max(n_tables, 1),
    )


def _classify_head_config(model_cfg, task_cfg, state, D, notes) -> ClassifyHeadConfig:
    def pick(what: str, cfg_value: Any, tensor_value: Any) -> Any:
        return _pick(notes, what, cfg_value, tensor_value)

    fc1, fc2 = _shape(state, "classify_head.classifier.0.weight"), _shape(state, "classify_head.classifier.3.weight")
    if fc1 is None or fc2 is None:
        raise CheckpointError("a one_peace_classify checkpoint without classify_head.classifier.{0,3}.weight: "
                              "missing classify_head keys")
    two = fc1[1] == 2 * D
    return ClassifyHeadConfig(
        head_type=str(task_cfg.get("head_type", "vl")),
        num_classes=pick("num_classes", task_cfg.get("num_classes"), fc2[0]),
        attn_pooling=pick("attn_pooling", model_cfg.get("attn_pooling"), "classify_head.attn_pooling_func.q" in state),
        use_pooler=pick("use_pooler", model_cfg.get("use_pooler"), "classify_head.pooler.1.weight" in state),
        head_scale_ratio=pick("head_scale_ratio", model_cfg.get("head_scale_ratio"), fc1[0] / D),
        use_image_features=bool(model_cfg.get("use_image_features", False)),
        use_two_images=pick("use_two_images", task_cfg.get("use_two_images"), two),
    )


def released_cfg(config: ModelConfig) -> dict[str, Any]:
    """A `cfg` dict in the released layout describing `config` (what config_from_released reads)."""
    enc = config.encoder
    encoder: dict[str, Any] = {
        "embed_dim": enc.embed_dim, "ffn_embed_dim": enc.ffn_embed_dim, "layers": enc.layers,
        "attention_heads": enc.attention_heads, "magneto_scale_attn": enc.magneto_scale_attn,
        "scale_attn": enc.scale_attn, "scale_fc": enc.scale_fc, "scale_heads": enc.scale_heads,
        "use_layer_scale": enc.use_layer_scale, "layer_scale_init_value": enc.layer_scale_init_value,
        "drop_path_rate": enc.drop_path_rate, "dropout": enc.dropout, "attention_dropout": enc.attention_dropout,
        "activation_dropout": enc.activation_dropout,
    }
    task: dict[str, Any] = {}
    for name, acfg in config.adapters.items():
        encoder[f"{name}_adapter"] = acfg.to_released(task)
    model: dict[str, Any] = {"_name": "one_peace_retrieval", "copy_rel_pos_table": enc.rel_pos_tables > 1,
                             "encoder": encoder}
    head = config.classify_head
    if head is not None:
        model.update(_name="one_peace_classify", attn_pooling=head.attn_pooling, use_pooler=head.use_pooler,
                     head_scale_ratio=head.head_scale_ratio, use_image_features=head.use_image_features)
        task.update(head_type=head.head_type, num_classes=head.num_classes, use_two_images=head.use_two_images)
    return {"model": model, "task": task}

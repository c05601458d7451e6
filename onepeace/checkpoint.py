"""Released ONE-PEACE checkpoints <-> onepeace models: config, key map, strict loading, conversion.

Key map. Our parameter names say what things are (``encoder.layers.3.ffn.image.wi_0.weight``); the
released files use the training code's (``encoder_wrapper.fusion_model.layers.3.image_ffn.0.wi_0.weight``).
:func:`released_key_map` lists, for a model, the released name of every one of its parameters: it is
derived from the model's own state dict by the explicit rules below (each adapter class declares the
rules for its own parameters). Loading is strict both ways:
- a parameter whose released name is not in the file is an error listing the names;
- a key in the file that is not a parameter is an error, except
  * recomputable buffers (:data:`RECOMPUTED_BUFFERS`: `rp_bucket`, `position_idx`, `version`),
  * pretraining-only keys (:data:`PRETRAINING_ONLY`: the denoising decoder, its embeds, mask
    tokens and mask heads) when loading an embedding model,
  * the tensors of modalities that were not requested (`modalities=`), which are never read;
  these are reported in the returned :class:`LoadReport`.
"""
from __future__ import annotations

import ast
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .config import (
    AudioAdapterConfig,
    EncoderConfig,
    ImageAdapterConfig,
    ModelConfig,
    TextAdapterConfig,
)
from .serialization import LazyTensor, Placeholder, read_checkpoint

ENCODER_PREFIX = "encoder_wrapper."
RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(rp_bucket|position_idx|version)$")
PRETRAINING_ONLY = re.compile(
    r"^(decoder_wrapper\.|decoder_\w+?_embed\.|\w+?_mask_token$|\w+?_mask_head\.)"
)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# our name -> released name, for everything outside the adapters (first match wins)
_MODEL_RULES: list[tuple[str, str | Callable]] = [
    (r"^logit_scale$", "logit_scale"),
    (r"^projections\.(\w+)\.(weight|bias)$", r"\1_proj.\2"),
    (r"^encoder\.final_norms\.(\w+)\.(weight|bias)$", r"fusion_model.\1_layer_norm.\2"),
]
_LAYER_RULES: list[tuple[str, str]] = [  # relative to encoder.layers.{i}.
    (r"^attn_norm\.(weight|bias)$", r"self_attn_layer_norm.\1"),
    (r"^attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$", r"self_attn.\1.\2"),
    (r"^attn\.inner_norm\.(weight|bias)$", r"self_attn.ln.\1"),
    (r"^attn\.head_scale$", "self_attn.c_attn"),
    (r"^attn_out_norm\.(weight|bias)$", r"attn_ln.\1"),
    (r"^layer_scale_attn$", "gamma_1"),
    (r"^layer_scale_ffn$", "gamma_2"),
    (r"^ffn_norm\.(weight|bias)$", r"final_layer_norm.\1"),
    (r"^ffn\.(\w+)\.(wi_0|wi_1)\.weight$", r"\1_ffn.0.\2.weight"),
    (r"^ffn\.(\w+)\.norm\.(weight|bias)$", r"\1_ffn.2.\2"),
    (r"^ffn\.(\w+)\.fc_out\.(weight|bias)$", r"\1_ffn.3.\2"),
]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing/unexpected keys, wrong shapes, bad file)."""


def _apply_rules(name: str, rules: Sequence[tuple[str, Any]], what: str) -> str:
    for pattern, repl in rules:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise CheckpointError(f"no released name is defined for {what} parameter {name!r}")


def released_key_map(model: torch.nn.Module, prefix: str = ENCODER_PREFIX) -> dict[str, str]:
    """{our parameter name: released key} for every parameter of an OnePeaceModel."""
    mapping: dict[str, str] = {}
    adapter_rules = {name: adapter.released_name_rules() for name, adapter in model.adapters.items()}
    for name in model.state_dict().keys():
        if name.startswith("adapters."):
            _, modality, rest = name.split(".", 2)
            rules = adapter_rules[modality] + [(r"^(.*)$", r"\1")]  # unmatched names keep their own
            released = f"{prefix}{modality}_adapter." + _apply_rules(rest, rules, modality)
        elif name.startswith("encoder.layers."):
            _, _, index, rest = name.split(".", 3)
            released = f"{prefix}fusion_model.layers.{index}." + _apply_rules(rest, _LAYER_RULES, "encoder")
        elif name.startswith("encoder."):
            released = prefix + _apply_rules(name, _MODEL_RULES, "encoder")
        elif name.startswith("classify_head."):
            from .modeling.heads import ClassifyHead

            released = "classify_head." + _apply_rules(name[len("classify_head."):], ClassifyHead.RELEASED_NAMES,
                                                       "classify head")
        else:
            released = _apply_rules(name, _MODEL_RULES, "model")
        mapping[name] = released
    return mapping


def released_key_modality(key: str, modalities: Iterable[str]) -> str | None:
    """Which modality branch a released key belongs to (None for shared parameters)."""
    for m in modalities:
        if (f"{m}_adapter." in key or f".{m}_ffn." in key or f"fusion_model.{m}_layer_norm." in key
                or key.startswith(f"{m}_proj.")):
            return m
    return None


# ---------------------------------------------------------------------------------------------
# config from a released cfg + tensor shapes
# ---------------------------------------------------------------------------------------------
def parse_feature_spec(spec: Any) -> tuple[tuple[int, int, int], ...]:
    """The released `feature_encoder_spec` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", safely."""
    if spec is None:
        return ()
    if not isinstance(spec, str):
        return tuple(tuple(int(v) for v in t) for t in spec)

    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts] if isinstance(node, ast.List) else tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element in feature_encoder_spec {spec!r}")

    return tuple(tuple(int(v) for v in t) for t in ev(ast.parse(spec, mode="eval")))


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    t = state.get(key)
    return None if t is None else tuple(t.shape)


def config_from_released(cfg: Mapping[str, Any] | None, state: Mapping[str, Any],
                         prefix: str = ENCODER_PREFIX, name: str = "released") -> tuple[ModelConfig, list[str]]:
    """Build a ModelConfig from a released `cfg` and the state dict's shapes (the tensors win).

    Returns (config, notes): a note for every place where the cfg and the tensors disagree.
    """
    notes: list[str] = []
    model_cfg = dict((cfg or {}).get("model") or {})
    enc_cfg = dict(model_cfg.get("encoder") or {})
    task_cfg = dict((cfg or {}).get("task") or {})
    fm = f"{prefix}fusion_model."

    def pick(what: str, cfg_value: Any, tensor_value: Any) -> Any:
        if tensor_value is None:
            return cfg_value
        if cfg_value is not None and cfg_value != tensor_value:
            notes.append(f"cfg says {what}={cfg_value!r} but the tensors say {tensor_value!r}; using {tensor_value!r}")
        return tensor_value

    q = _shape(state, f"{fm}layers.0.self_attn.q_proj.weight")
    if q is None:
        raise CheckpointError(f"no encoder found: {fm}layers.0.self_attn.q_proj.weight is missing")
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(fm) + r"layers\.(\d+)\.", k))}
    D = pick("embed_dim", enc_cfg.get("embed_dim"), q[0])
    L = pick("layers", enc_cfg.get("layers"), max(layer_ids) + 1)

    modalities = [m for m in ("text", "image", "audio") if any(k.startswith(f"{prefix}{m}_adapter.") for k in state)]
    if not modalities:
        raise CheckpointError("no modality adapters found in the checkpoint")
    for m in modalities:
        if _shape(state, f"{fm}layers.0.{m}_ffn.0.wi_0.weight") is None:
            raise CheckpointError(f"the checkpoint has a {m} adapter but no {m}_ffn experts: not supported")
    F_dim = pick("ffn_embed_dim", enc_cfg.get("ffn_embed_dim"), _shape(state, f"{fm}layers.0.{modalities[0]}_ffn.0.wi_0.weight")[0])

    # heads: from any relative-bias table's width, else the cfg
    heads_from_tables = None
    table_counts = {}
    for m in modalities:
        ids = [int(mm.group(1)) for k in state
               if (mm := re.match(re.escape(f"{prefix}{m}_adapter.") + r"rel_pos_table_list\.(\d+)\.weight$", k))]
        table_counts[m] = len(ids)
        if ids:
            heads_from_tables = state[f"{prefix}{m}_adapter.rel_pos_table_list.0.weight"].shape[1]
    H = pick("attention_heads", enc_cfg.get("attention_heads"), heads_from_tables)
    if H is None:
        raise CheckpointError("cannot tell the number of attention heads: no cfg and no relative-bias tables")
    n_tables = max(table_counts.values())
    if n_tables not in (0, 1, L):
        raise CheckpointError(f"{n_tables} relative-bias tables per adapter: expected 1 or one per layer ({L})")

    layer0 = f"{fm}layers.0."
    encoder = EncoderConfig(
        embed_dim=D, ffn_embed_dim=F_dim, layers=L, attention_heads=H,
        magneto_scale_attn=pick("magneto_scale_attn", enc_cfg.get("magneto_scale_attn"), f"{layer0}self_attn.ln.weight" in state),
        scale_attn=pick("scale_attn", enc_cfg.get("scale_attn"), f"{layer0}attn_ln.weight" in state),
        scale_fc=pick("scale_fc", enc_cfg.get("scale_fc"), f"{layer0}{modalities[0]}_ffn.2.weight" in state),
        scale_heads=pick("scale_heads", enc_cfg.get("scale_heads"), f"{layer0}self_attn.c_attn" in state),
        use_layer_scale=pick("use_layer_scale", enc_cfg.get("use_layer_scale"), f"{layer0}gamma_1" in state),
        layer_scale_init_value=float(enc_cfg.get("layer_scale_init_value", 1e-6)),
        drop_path_rate=float(enc_cfg.get("drop_path_rate", 0.0)),
        dropout=float(enc_cfg.get("dropout", 0.0)),
        attention_dropout=float(enc_cfg.get("attention_dropout", 0.0)),
        activation_dropout=float(enc_cfg.get("activation_dropout", 0.0)),
        rel_pos_tables=max(n_tables, 1),
    )

    adapters = {}
    for m in modalities:
        a = f"{prefix}{m}_adapter."
        acfg = dict(enc_cfg.get(f"{m}_adapter") or {})
        common = dict(
            use_attn_bias=pick(f"{m}_adapter.use_attn_bias", acfg.get("use_attn_bias"), table_counts[m] > 0),
            layernorm_embedding=pick(f"{m}_adapter.layernorm_embedding", acfg.get("layernorm_embedding"),
                                     f"{a}layernorm_embedding.weight" in state),
            add_type_embedding=pick(f"{m}_adapter.add_type_embedding", acfg.get("add_type_embedding"),
                                    f"{a}type_embedding" in state),
            shrink_alpha=float(acfg.get("shrink_alpha", 1.0)),
            dropout=float(acfg.get("dropout", 0.0)),
        )
        table = _shape(state, f"{a}rel_pos_table_list.0.weight")
        if m == "text":
            emb = _shape(state, f"{a}embed_tokens.weight")
            bucket = (table[0] - 2) // 2 if table else acfg.get("bucket_size", 256)
            adapters[m] = TextAdapterConfig(
                **common, vocab_size=emb[0] if emb else 0,
                max_positions=_shape(state, f"{a}embed_positions.weight")[0],
                bucket_size=pick("text_adapter.bucket_size", acfg.get("bucket_size"), bucket),
                max_length=int(task_cfg.get("max_src_length", 70)),
            )
        elif m == "image":
            pos = _shape(state, f"{a}pos_embed")
            bucket = round((pos[0] - 1) ** 0.5)
            rel_bucket = round(((table[0] - 3) ** 0.5 + 1) / 2) if table else acfg.get("rel_bucket_size", bucket)
            if f"{a}embed_images.0.weight" in state:
                stem = "hmlp"
            elif f"{a}embed_images.weight" in state:
                stem = "mlp"
            else:
                stem = "none"
            image_size = int(task_cfg.get("patch_image_size", bucket * 16))
            adapters[m] = ImageAdapterConfig(
                **common,
                image_size=image_size,
                bucket_size=pick("image_adapter.bucket_size", acfg.get("bucket_size"), bucket),
                rel_bucket_size=pick("image_adapter.rel_bucket_size", acfg.get("rel_bucket_size"), rel_bucket),
                vision_encoder_type=pick("image_adapter.vision_encoder_type", acfg.get("vision_encoder_type"), stem),
            )
        elif m == "audio":
            spec = list(parse_feature_spec(acfg.get("feature_encoder_spec")))
            convs = sorted(
                (int(mm.group(1)), tuple(state[k].shape)) for k in state
                if (mm := re.match(re.escape(a) + r"embed_audios\.0\.conv_layers\.(\d+)\.0\.weight$", k))
            )
            tensor_spec = []
            for i, (idx, shape) in enumerate(convs):
                stride = spec[i][2] if i < len(spec) else None
                if stride is None:
                    raise CheckpointError(f"audio conv layer {idx}: the cfg gives no stride for it")
                tensor_spec.append((shape[0], shape[2], stride))
            feature_spec = pick("audio_adapter.feature_encoder_spec", tuple(spec) or None, tuple(tensor_spec) or None) or ()
            fixed = f"{a}embed_positions.weight" in state
            pre_ln = f"{a}embed_positions.0.weight" in state
            conv_key = f"{a}embed_positions.{'1.' if pre_ln else ''}1.0.weight"
            depth = len([k for k in state if re.match(re.escape(a) + r"embed_positions\.(1\.)?\d+\.0\.weight$", k)])
            kwargs: dict[str, Any] = {}
            if not fixed and conv_key in state:
                w = state[conv_key].shape  # (D, D / groups, kernel)
                kernel = w[2]
                width = int(acfg.get("conv_pos_width", 95))
                cfg_depth = int(acfg.get("conv_pos_depth", 5))
                kwargs = dict(
                    conv_pos_depth=pick("audio_adapter.conv_pos_depth", cfg_depth, depth),
                    conv_pos_groups=pick("audio_adapter.conv_pos_groups", acfg.get("conv_pos_groups"), D // w[1]),
                )
                if max(3, width // kwargs["conv_pos_depth"]) != kernel:
                    notes.append(f"cfg conv_pos_width={width} gives a different kernel than the tensors' {kernel}; "
                                 f"using width {kernel * kwargs['conv_pos_depth']}")
                    width = kernel * kwargs["conv_pos_depth"]
                kwargs["conv_pos_width"] = width
            audio_bucket = (table[0] - 2) // 2 if table else acfg.get("bucket_size", 512)
            adapters[m] = AudioAdapterConfig(
                **common,
                feature_encoder_spec=feature_spec,
                conv_bias=pick("audio_adapter.conv_bias", acfg.get("conv_bias"),
                               f"{a}embed_audios.0.conv_layers.0.0.bias" in state),
                abs_pos_type=pick("audio_adapter.abs_pos_type", acfg.get("abs_pos_type"), "fixed" if fixed else "conv"),
                conv_pos_pre_ln=pick("audio_adapter.conv_pos_pre_ln", acfg.get("conv_pos_pre_ln"), pre_ln),
                max_positions=_shape(state, f"{a}embed_positions.weight")[0] if fixed else 1026,
                bucket_size=pick("audio_adapter.bucket_size", acfg.get("bucket_size"), audio_bucket),
                **kwargs,
            )
    # projection heads belong to the encoder side (the decoder of a pretraining file has none)
    projections = (prefix == ENCODER_PREFIX and "logit_scale" in state
                   and all(f"{m}_proj.weight" in state for m in modalities))
    head = None
    if prefix == ENCODER_PREFIX and (model_cfg.get("_name") == "one_peace_classify"
                                     or any(k.startswith("classify_head.") for k in state)):
        head = _classify_head_config(model_cfg, task_cfg, state, D, notes, pick)
    config = ModelConfig(encoder=encoder, adapters=adapters, projections=projections, name=name, classify_head=head)
    return config, notes


def _classify_head_config(model_cfg, task_cfg, state, D, notes, pick):
    from .modeling.heads import ClassifyHeadConfig

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


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What loading did besides filling the parameters."""

    path: str
    config_notes: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)  # buffers in the file we recompute
    pretraining_only: list[str] = field(default_factory=list)  # decoder etc., ignored
    skipped_modalities: dict[str, int] = field(default_factory=dict)  # modality -> tensors not read
    placeholders: list[str] = field(default_factory=list)  # classes the pickle named that were not built
    storage_dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> tensor count in the file

    def summary(self) -> str:
        parts = [f"loaded {self.path}"]
        if self.storage_dtypes:
            parts.append("storage " + ", ".join(f"{k}: {v}" for k, v in self.storage_dtypes.items()))
        if self.recomputed:
            parts.append(f"{len(self.recomputed)} recomputable buffers ignored")
        if self.pretraining_only:
            parts.append(f"{len(self.pretraining_only)} pretraining-only tensors ignored")
        for m, n in self.skipped_modalities.items():
            parts.append(f"{n} {m} tensors not loaded")
        if self.placeholders:
            parts.append("not rebuilt: " + ", ".join(sorted(set(self.placeholders))))
        return "; ".join(parts)


def load_released_checkpoint(path: str | os.PathLike, *, modalities: Sequence[str] | None = None,
                             dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu",
                             allow_unsafe: bool = False, strict: bool = True):
    """Load a released `.pt` checkpoint into an OnePeaceModel. Returns (model, report)."""
    from .modeling.model import OnePeaceModel

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    obj, archive = read_checkpoint(path, allow_unsafe=allow_unsafe)
    try:
        if not isinstance(obj, Mapping) or "model" not in obj:
            raise CheckpointError(f"{path!r} is not a ONE-PEACE checkpoint: no 'model' state dict in it")
        cfg = _plain(obj.get("cfg"))
        state: Mapping[str, Any] = obj["model"]
        config, notes = config_from_released(cfg, state, name=Path(path).stem)
        for note in notes:
            warnings.warn(f"{path}: {note}", stacklevel=2)
        report = LoadReport(path=path, config_notes=notes)
        report.placeholders = _find_placeholders(obj)
        for t in state.values():
            if hasattr(t, "dtype"):
                key = str(t.dtype).replace("torch.", "")
                report.storage_dtypes[key] = report.storage_dtypes.get(key, 0) + 1
        all_modalities = config.modalities
        if modalities is not None:
            config = config.select(modalities)
        with torch.device("meta"):
            model = OnePeaceModel(config)
        key_map = released_key_map(model)
        tensors = _take_tensors(state, key_map, all_modalities, config.modalities, report, strict, path)
        _assign(model, tensors, dtype, device, path)
    finally:
        archive.close()
    model.eval()
    model.load_report = report
    return model, report


def _plain(obj: Any) -> Any:
    """cfg objects as plain dicts (an omegaconf DictConfig in some files arrives as a placeholder)."""
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, dict) and "_content" in state:
            return _plain(state["_content"])
        return _plain(state)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _find_placeholders(obj: Any, depth: int = 0) -> list[str]:
    found: list[str] = []
    if depth > 20:
        return found
    if isinstance(obj, Placeholder):
        found.append(type(obj).qualified_name)
        found += _find_placeholders(obj.state, depth + 1)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            found += _find_placeholders(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += _find_placeholders(v, depth + 1)
    return found


def _take_tensors(state: Mapping[str, Any], key_map: dict[str, str], all_modalities: Sequence[str],
                  wanted: Sequence[str], report: LoadReport, strict: bool, path: str) -> dict[str, Any]:
    """Match file keys to parameters; raise on missing/unexpected; report what is ignored."""
    by_released = {v: k for k, v in key_map.items()}
    missing = sorted(v for v in key_map.values() if v not in state)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} parameters are missing from the checkpoint: " + ", ".join(missing[:20])
            + (" ..." if len(missing) > 20 else "") + ". Refusing to initialise them randomly."
        )
    unexpected, tensors = [], {}
    for key, value in state.items():
        if key in by_released:
            if not isinstance(value, (LazyTensor, torch.Tensor)):
                raise CheckpointError(f"{path}: {key} is not a tensor but {value!r}; refusing to load it")
            tensors[by_released[key]] = value
            continue
        modality = released_key_modality(key, all_modalities)
        if modality is not None and modality not in wanted and not RECOMPUTED_BUFFERS.search(key):
            report.skipped_modalities[modality] = report.skipped_modalities.get(modality, 0) + 1
        elif RECOMPUTED_BUFFERS.search(key):
            report.recomputed.append(key)
        elif PRETRAINING_ONLY.match(key):
            report.pretraining_only.append(key)
        else:
            unexpected.append(key)
    if unexpected and strict:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected keys in the checkpoint: " + ", ".join(sorted(unexpected)[:20])
            + (" ..." if len(unexpected) > 20 else "")
        )
    return tensors


def _assign(model: torch.nn.Module, tensors: Mapping[str, Any], dtype: torch.dtype | None,
            device: torch.device | str, path: str) -> None:
    """Read each tensor once, cast it, and put it in place of the meta parameter (no second copy)."""
    expected = model.state_dict()
    loaded = {}
    for name, meta in expected.items():
        src = tensors[name]
        if tuple(src.shape) != tuple(meta.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(src.shape)} in the file, "
                                  f"the model expects {tuple(meta.shape)}")
        target = dtype if (dtype is not None and meta.is_floating_point()) else None
        if isinstance(src, LazyTensor):
            t = src.load(dtype=target, device=device, release=True)
        else:
            t = src.to(device=device, dtype=target or src.dtype, copy=True)
        loaded[name] = t
    model.load_state_dict(loaded, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------
# our own format: config.json + model.safetensors
# ---------------------------------------------------------------------------------------------
def save_converted(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors (our parameter names, the model's dtype)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / CONFIG_FILE)
    # fused (inference) models hold parameters as views of one tensor: safetensors wants owners
    state = {k: v.detach().clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size()
             else v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "library": "onepeace"})
    os.replace(tmp, out / WEIGHTS_FILE)
    return out


def load_converted(path: str | os.PathLike, *, modalities: Sequence[str] | None = None,
                   dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"):
    """Load a folder written by :func:`save_converted`. Returns (model, report)."""
    from safetensors import safe_open

    from .modeling.model import OnePeaceModel

    folder = Path(path)
    config = ModelConfig.load(folder / CONFIG_FILE)
    all_modalities = config.modalities
    if modalities is not None:
        config = config.select(modalities)
    with torch.device("meta"):
        model = OnePeaceModel(config)
    report = LoadReport(path=str(folder))
    expected = set(model.state_dict())
    loaded = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = sorted(expected - keys)
        if missing:
            raise CheckpointError(f"{folder}: {len(missing)} parameters are missing: " + ", ".join(missing[:20]))
        unexpected = []
        for key in sorted(keys - expected):
            m = _our_key_modality(key, all_modalities)
            if m is not None and m not in config.modalities:
                report.skipped_modalities[m] = report.skipped_modalities.get(m, 0) + 1
            else:
                unexpected.append(key)
        if unexpected:
            raise CheckpointError(f"{folder}: unexpected keys: " + ", ".join(unexpected[:20]))
        meta = model.state_dict()
        for key in expected:
            t = f.get_tensor(key)
            report.storage_dtypes[str(t.dtype).replace("torch.", "")] = \
                report.storage_dtypes.get(str(t.dtype).replace("torch.", ""), 0) + 1
            if tuple(t.shape) != tuple(meta[key].shape):
                raise CheckpointError(f"{folder}: {key} has shape {tuple(t.shape)}, expected {tuple(meta[key].shape)}")
            target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            loaded[key] = t.to(device=device, dtype=target)
    model.load_state_dict(loaded, strict=True, assign=True)
    model.eval()
    model.load_report = report
    return model, report


def _our_key_modality(key: str, modalities: Iterable[str]) -> str | None:
    for m in modalities:
        if (key.startswith(f"adapters.{m}.") or f".ffn.{m}." in key or key.startswith(f"encoder.final_norms.{m}.")
                or key.startswith(f"projections.{m}.")):
            return m
    return None


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                       allow_unsafe: bool = False) -> Path:
    """Released `.pt` -> config.json + model.safetensors. dtype None keeps the file's storage dtype."""
    model, _ = load_released_checkpoint(src, dtype=dtype, allow_unsafe=allow_unsafe)
    return save_converted(model, out_dir)


__all__ = [
    "CheckpointError", "LoadReport", "config_from_released", "convert_checkpoint", "load_converted",
    "load_released_checkpoint", "released_key_map", "save_converted", "parse_feature_spec",
]


# ---------------------------------------------------------------------------------------------
# writing the released layout (for interoperability with the official code and for tests)
# ---------------------------------------------------------------------------------------------
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
        fields = {k: v for k, v in acfg.to_dict().items() if k != "kind"}
        if name == "audio":
            fields["feature_encoder_spec"] = repr([tuple(t) for t in acfg.feature_encoder_spec])
        if name == "image":
            task["patch_image_size"] = acfg.image_size
        if name == "text":
            task["max_src_length"] = acfg.max_length
        encoder[f"{name}_adapter"] = fields
    model: dict[str, Any] = {"_name": "one_peace_retrieval", "copy_rel_pos_table": enc.rel_pos_tables > 1,
                             "encoder": encoder}
    head = config.classify_head
    if head is not None:
        model.update(_name="one_peace_classify", attn_pooling=head.attn_pooling, use_pooler=head.use_pooler,
                     head_scale_ratio=head.head_scale_ratio, use_image_features=head.use_image_features)
        task.update(head_type=head.head_type, num_classes=head.num_classes, use_two_images=head.use_two_images)
    return {"model": model, "task": task}


def released_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under their released names."""
    key_map = released_key_map(model)
    return {key_map[k]: v for k, v in model.state_dict().items()}


def save_released_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write a checkpoint in the released file layout ({'cfg', 'model', ...}), atomically."""
    obj = {"args": None, "cfg": released_cfg(model.config), "model": released_state_dict(model),
           "optimizer_history": [], "last_optimizer_state": None, "extra_state": {}}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# pretraining checkpoints (encoder + denoising decoder + decoder embeds, mask tokens, mask heads)
# ---------------------------------------------------------------------------------------------
DECODER_PREFIX = "decoder_wrapper."


def pretrain_key_map(pm: torch.nn.Module) -> dict[str, str]:
    """{our name: released name} for every parameter of an OnePeacePretrainModel."""
    key_map = {f"model.{k}": v for k, v in released_key_map(pm.model).items()}
    key_map.update({f"decoder.{k}": v for k, v in released_key_map(pm.decoder, prefix=DECODER_PREFIX).items()})
    for m in pm.mask_tokens:
        key_map[f"mask_tokens.{m}"] = f"{m}_mask_token"
        for p in ("weight", "bias"):
            key_map[f"decoder_embeds.{m}.{p}"] = f"decoder_{m}_embed.{p}"
            key_map[f"mask_heads.{m}.{p}"] = f"{m}_mask_head.{p}"
    missing = set(pm.state_dict()) - set(key_map)
    if missing:
        raise CheckpointError(f"no released name for {sorted(missing)}")
    return key_map


def load_pretrain_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                             device: torch.device | str = "cpu", allow_unsafe: bool = False):
    """A released-layout pretraining checkpoint -> (OnePeacePretrainModel, LoadReport)."""
    from .modeling.pretrain import OnePeacePretrainModel, PretrainConfig

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    obj, archive = read_checkpoint(path, allow_unsafe=allow_unsafe)
    try:
        cfg = _plain(obj.get("cfg")) or {}
        state = obj["model"]
        if not any(k.startswith(DECODER_PREFIX) for k in state):
            raise CheckpointError(f"{path!r} has no denoising decoder ({DECODER_PREFIX}*): not a pretraining "
                                  "checkpoint; start from it with OnePeacePretrainModel.from_model(onepeace.load(...))")
        model_config, notes = config_from_released(cfg, state, name=Path(path).stem)
        decoder_cfg = {"model": {"encoder": (cfg.get("model") or {}).get("decoder") or {}}, "task": cfg.get("task")}
        decoder_config, dnotes = config_from_released(decoder_cfg, state, prefix=DECODER_PREFIX,
                                                      name=Path(path).stem + "-decoder")
        for note in notes + [f"decoder: {n}" for n in dnotes]:
            warnings.warn(f"{path}: {note}", stacklevel=2)
        report = LoadReport(path=path, config_notes=notes + dnotes, placeholders=_find_placeholders(obj))
        with torch.device("meta"):
            pm = OnePeacePretrainModel(PretrainConfig(model=model_config, decoder=decoder_config))
        key_map = pretrain_key_map(pm)
        tensors = _take_tensors(state, key_map, model_config.modalities, model_config.modalities, report, True, path)
        _assign(pm, tensors, dtype, device, path)
    finally:
        archive.close()
    pm.load_report = report
    return pm, report


def save_released_pretrain_checkpoint(pm: torch.nn.Module, path: str | os.PathLike,
                                      extra_cfg: Mapping[str, Any] | None = None) -> None:
    """Write an OnePeacePretrainModel in the released pretraining layout, atomically."""
    cfg = released_cfg(pm.config.model)
    cfg["model"]["_name"] = "one_peace_pretrain"
    cfg["model"]["decoder"] = released_cfg(pm.config.decoder)["model"]["encoder"]
    cfg.update(extra_cfg or {})
    key_map = pretrain_key_map(pm)
    obj = {"args": None, "cfg": cfg, "model": {key_map[k]: v for k, v in pm.state_dict().items()},
           "optimizer_history": [], "last_optimizer_state": None, "extra_state": {}}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)

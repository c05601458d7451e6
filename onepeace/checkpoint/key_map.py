"""The released checkpoints' parameter names: our name <-> released name, and which modality owns a key.

Our parameter names say what things are (``encoder.layers.3.ffn.image.wi_0.weight``); the released
files use the training code's (``encoder_wrapper.fusion_model.layers.3.image_ffn.0.wi_0.weight``).
:func:`released_key_map` lists, for a model, the released name of every one of its parameters: it is
derived from the model's own state dict by the explicit rules below; each adapter class declares the
rules for its own parameters (``Adapter.RELEASED_NAMES``), so this file names no modality.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

ENCODER_PREFIX = "encoder_wrapper."
RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(rp_bucket|position_idx|version)$")
PRETRAINING_ONLY = re.compile(
    r"^(decoder_wrapper\.|decoder_\w+?_embed\.|\w+?_mask_token$|\w+?_mask_head\.)"
)

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
    # what onepeace.load chose for this CPU (onepeace.modeling.cpu_choice.CpuChoice: packing, attention
    # kernel, threads; measured or cached, with the timings); None where nothing was chosen (GPU, pack=...)
    cpu_choice: Any = None

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
        if self.cpu_choice is not None:
            parts.append("CPU path: " + self.cpu_choice.summary())
        return "; ".join(parts)


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
            from ..modeling.heads import ClassifyHead

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




def key_modality(key: str, modalities: Iterable[str]) -> str | None:
    """Which modality branch one of OUR parameter names belongs to (None for shared parameters)."""
    for m in modalities:
        if (key.startswith(f"adapters.{m}.") or f".ffn.{m}." in key or key.startswith(f"encoder.final_norms.{m}.")
                or key.startswith(f"projections.{m}.")):
            return m
    return None


_our_key_modality = key_modality  # the name cli.py and finetune.py import

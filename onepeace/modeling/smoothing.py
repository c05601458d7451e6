"""Calibrated smoothing of each FFN's output projection before int8 (SmoothQuant: Xiao et al., 2023).

Why: the input of every FFN's ``fc_out`` (the FFN's LayerNorm over its hidden width F) has outlier
channels. Measured on a trained demo model: a channel's largest value was up to 27-73x the median
channel's, against 2-4x at the inputs of the attention projections and of wi_0 / wi_1. A token's
int8 activations share one scale (one per call before per-row scaling, one per row now: an outlier
channel sets it either way), so most of fc_out's channels got a few of the 256 levels:
fc_out's int8 relative error was 2.0-3.4% against 0.7-0.9% for every other linear layer, and int8
moved the demo's metrics more than bfloat16 does (mean |change| 0.0034 vs 0.0025 over nine models).

What: SmoothQuant moves that range from the activations into the weights, per input channel j of
fc_out: ``x'_j = x_j / s_j`` and ``W'[:, j] = W[:, j] * s_j`` with ``s_j = amax_j^a / wmax_j^(1-a)``
(a = 0.5; amax_j the channel's largest |value| on calibration inputs, wmax_j the column's largest
|weight|). The division folds into the LayerNorm in front of fc_out (its weight and bias / s), or,
in an FFN without that norm, into wi_1's rows (the GeGLU's linear branch). The float model computes
the same function (to float rounding); only the int8 products see the difference. On one demo
model, calibrated and measured on the same 40 images, 40 texts and 24 clips, the fc_out error fell
from 2.0-4.0% to 1.1-1.7%; calibrated on training items and measured on the held-out ones, the demo
metrics moved no more than in bfloat16 (mean |change| 0.0021; `benchmarks/int8_quality.py`).
With per-row activation scales (`onepeace.modeling.quantized`) calibration still raises every
modality's mean cosine to float32 (1 - cosine falls by about 40%, four demo models), but the demo
metrics already move less than in bfloat16 without it.

The ranges come from running the float model on real inputs of each modality (a Multiway FFN only
sees its own modality's tokens; an FFN without calibration inputs stays as it is). Two data-free
shortcuts did not work: the ranges predicted from the LayerNorm's weights (correlation 0.1-0.4 with
the measured ones) and synthetic inputs (shapes, tones, noise: worse than no smoothing).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the migration strength of SmoothQuant (0.5: the range split evenly between activations and weights)
ALPHA = 0.5
#: calibration items per modality (evenly spaced over what is given); the quality numbers above were
#: measured with 64 (and 64 texts, 64 images, 32 clips in the first trial); fewer was not tried
DEFAULT_PER_MODALITY = 64


def calibration_inputs(source: Mapping[str, Sequence[Any]] | Sequence[str | Path],
                       per_modality: int | None = DEFAULT_PER_MODALITY) -> dict[str, list[Any]]:
    """Calibration items by modality, from ``{"text": [...], "image": [...], ...}`` (anything the
    model's ``encode_<modality>`` takes) or from files and folders (as `onepeace embed` takes them:
    images and audio by suffix, .txt / .jsonl files give texts). Keeps at most ``per_modality``
    items per modality, evenly spaced. Raises ValueError naming a file it cannot use, or when
    nothing is left."""
    if isinstance(source, Mapping):
        items = {m: list(v) for m, v in source.items() if len(v)}
    else:
        items = _items_from_files([str(p) for p in ([source] if isinstance(source, (str, Path)) else source)])
    if not items:
        raise ValueError(f"no calibration inputs in {source!r}: give texts, images or audio of the kind the model "
                         "will embed")
    if per_modality is not None:
        items = {m: _evenly(v, per_modality) for m, v in items.items()}
    return items


def _items_from_files(paths: list[str]) -> dict[str, list[Any]]:
    from ..data.files import find_inputs, text_items

    found, problems = find_inputs(paths)
    if problems:
        raise ValueError("calibration inputs: " + "; ".join(f"{p}: {why}" for p, why in problems))
    items: dict[str, list[Any]] = {}
    for modality, path in found:
        if modality == "text":
            items.setdefault("text", []).extend(text for _, text in text_items(path))
        else:
            items.setdefault(modality, []).append(path)
    return items


def _evenly(values: list[Any], n: int) -> list[Any]:
    if len(values) <= n:
        return values
    return [values[i * len(values) // n] for i in range(n)]


def _ffns(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every GeGLU FFN expert of the shared encoder (``layers.K.ffn.<modality>``)."""
    from .layers import GeGLUFeedForward

    return {name: m for name, m in model.encoder.named_modules() if isinstance(m, GeGLUFeedForward)}


@torch.inference_mode()
def measure_ffn_input_ranges(model: nn.Module, inputs: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Run the float model on ``inputs`` and return, per FFN that saw tokens, the (F,) largest |value|
    of each channel at its fc_out's input."""
    missing = [m for m in inputs if m not in model.config.adapters]
    if missing:
        raise ValueError(f"calibration inputs for {missing}, which this model has no branch for "
                         f"(it has {sorted(model.config.adapters)})")
    ranges: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, args, _output):
            amax = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)  # (F,)
            ranges[name] = torch.maximum(ranges[name], amax) if name in ranges else amax
        return hook

    handles = [ffn.fc_out.register_forward_hook(record(name)) for name, ffn in _ffns(model).items()]
    try:
        for modality, items in inputs.items():
            getattr(model, f"encode_{modality}")(items)
    finally:
        for h in handles:
            h.remove()
    return ranges


@torch.no_grad()
def smooth_ffn_outputs(model: nn.Module, ranges: Mapping[str, torch.Tensor], alpha: float = ALPHA) -> int:
    """Fold the SmoothQuant scales of every measured FFN into its LayerNorm (or wi_1) and fc_out, in
    place (see the module docstring). The float function is unchanged. Returns how many FFNs."""
    ffns = _ffns(model)
    for name, amax in ranges.items():
        ffn = ffns[name]
        weight = ffn.fc_out.weight  # (D, F)
        # a channel that barely fired during calibration counts as 1% of the median one, so that
        # its 1/s cannot make it an outlier on an input that does reach it
        amax = amax.to(weight.device).clamp_min(1e-2 * float(amax.median()) + 1e-12)
        wmax = weight.detach().abs().amax(dim=0).float().clamp_min(1e-12)  # (F,)
        s = amax.pow(alpha) / wmax.pow(1 - alpha)
        s = s / s.log().mean().exp()  # geometric mean 1: the stored values keep their magnitude
        weight.mul_(s.to(weight.dtype)[None, :])
        if ffn.norm is not None:
            ffn.norm.weight.div_(s.to(ffn.norm.weight.dtype))
            ffn.norm.bias.div_(s.to(ffn.norm.bias.dtype))
        else:
            ffn.wi_1.weight.div_(s.to(ffn.wi_1.weight.dtype)[:, None])  # hidden = gelu(wi_0 h) * (wi_1 h) / s
    return len(ranges)


def calibrate_for_int8(model: nn.Module, source: Mapping[str, Sequence[Any]] | Sequence[str | Path],
                       per_modality: int | None = DEFAULT_PER_MODALITY, alpha: float = ALPHA) -> str:
    """Measure the FFN ranges on ``source`` (see :func:`calibration_inputs`) and smooth; returns a
    line for the load report. Call it on the float model, before `quantize_int8`."""
    from .quantized import quantization

    if quantization(model) is not None:
        raise ValueError("this model is already int8: calibrate the float model, before quantising "
                         "(onepeace convert CHECKPOINT OUT --quantize int8 --calibrate FILES)")
    inputs = calibration_inputs(source, per_modality)
    was_training = model.training
    model.eval()
    n = smooth_ffn_outputs(model, measure_ffn_input_ranges(model, inputs), alpha)
    model.train(was_training)
    counts = ", ".join(f"{len(v)} {m}" for m, v in inputs.items())
    return f"int8 calibration: {n} FFN output projections smoothed (SmoothQuant, alpha {alpha}) from {counts} inputs"

"""One ONNX graph per branch: the modality's adapter + the shared encoder (that modality's FFN experts)
+ its final LayerNorm + its projection, output the L2-normalised (B, D) embedding that
``OnePeaceModel.encode_*`` returns.

Graph inputs (dynamic axes named in brackets):
  text.onnx   tokens (batch, length) int64 ids right-padded with 1, padding_mask (batch, length) bool
  image.onnx  pixels (batch, 3, S, S) float32, normalised; S is the config's image_size (fixed: the
              position table is resized in Python at trace time, so one graph serves one side)
  audio.onnx  waveform (batch, samples) float32 (layer-normed, zero-padded), padding_mask
              (batch, frames + 1) bool over the feature frames + CLS (onepeace.data.audio.collate_waveforms)
Output: embedding (batch, D) float32.

The folder also holds config.json (the model config of the exported branches: preprocessing settings,
the tokenizer's max_length) and onnx.json (the manifest: graphs, inputs, weights precision, the
contrastive temperature, the export-time check). Exported with the TorchScript exporter
(``torch.onnx.export(dynamo=False)``): it traces the plain computation with dynamic axes in one pass.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..modeling.attention import RealRows

MANIFEST_FILE = "onnx.json"
FORMAT = "onepeace-onnx"
FORMAT_VERSION = 1
EXTRA_HINT = "install the optional extra: pip install 'onepeace[onnx]'"
# modality -> (graph input names, their dynamic axes); the output is always "embedding" (batch, D)
GRAPH_INPUTS: dict[str, tuple[tuple[str, ...], dict[str, dict[int, str]]]] = {
    "text": (("tokens", "padding_mask"), {"tokens": {0: "batch", 1: "length"}, "padding_mask": {0: "batch", 1: "length"}}),
    "image": (("pixels",), {"pixels": {0: "batch"}}),
    "audio": (("waveform", "padding_mask"), {"waveform": {0: "batch", 1: "samples"},
                                             "padding_mask": {0: "batch", 1: "frames"}}),
}
QUANTIZE = ("int8",)
# the export-time check: the ONNX Runtime graph vs the PyTorch branch on the tracing inputs
CHECK_TOLERANCE = 1e-4


def require_module(name: str):
    """Import `name` (onnx, onnxruntime, ...) or raise an ImportError naming the extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"the ONNX path needs {name.split('.')[0]}, which is not installed: {EXTRA_HINT}") from e


def graph_file(modality: str) -> str:
    return f"{modality}.onnx"


def is_onnx_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by :func:`export_onnx` (it holds the manifest)."""
    return (Path(path) / MANIFEST_FILE).is_file()


class BranchGraph(nn.Module):
    """One branch of `model` as a function of plain tensors (what the exporter traces):
    (inputs of GRAPH_INPUTS[modality]) -> (B, D) L2-normalised embedding.

    The same steps as ``OnePeaceModel.forward`` for one modality without the control flow that
    depends on the data (`padding_mask.any()`): a branch with a padding mask input (text, audio) always
    runs the padded path, padded rows zero and -inf keys, projections/norms/FFNs on the real rows only
    (`RealRows`: NonZero + Gather/Scatter in the graph), as PyTorch does for a padded batch, which is
    exact (a batch without padding gives the same numbers). Image batches have no padding."""

    def __init__(self, model, modality: str, fixed_masks: list[torch.Tensor] | None = None):
        super().__init__()
        self.model, self.modality = model, modality
        # image: the (1, H, S, S) bias masks, constants of the graph (the side is fixed; the bias
        # index of a grid is computed in Python from the sequence length, which tracing cannot follow)
        self.fixed_masks = fixed_masks

    def forward(self, value: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        model, name = self.model, self.modality
        if name == "audio":
            out = model.embed_inputs(name, value, padding_mask)  # mask (B, T' + 1), CLS included
        else:
            out = model.embed_inputs(name, value)
        if name == "text":  # the given mask (B, T) for the tokens, CLS never padding
            out.padding_mask = torch.cat([torch.zeros_like(padding_mask[:, :1]), padding_mask], dim=1)
        x = out.tokens  # (B, S, D)
        pad = out.padding_mask if padding_mask is not None else None
        if pad is not None:
            x = x * (1 - pad.unsqueeze(-1).to(x.dtype))  # padded rows enter as zero vectors
        if self.fixed_masks is not None:
            masks = self.fixed_masks
        else:
            masks = model.attention_masks([(name, out)], pad, x.dtype)  # bias (+ -inf padded keys)
        layout = [(name, x.shape[1])]
        if pad is None or masks is None:  # (no bias tables: no mask at all, as OnePeaceModel.encode)
            hidden = model.encoder(x, masks, layout)  # (B, S, D) after the final LayerNorm
        else:  # projections, norms and FFNs on the N real rows only (a mixed batch costs its tokens)
            rows = RealRows(pad)
            hidden = rows.scatter(model.encoder(rows.gather(x), masks, layout, rows=rows))
        return model.project(name, hidden[:, 0])


def _example_inputs(model, modality: str) -> tuple[torch.Tensor, ...]:
    """Two items of different lengths (so the padding path is traced), as graph inputs."""
    from ..modeling.adapters.text import PAD_ID
    from ..registry import get_modality

    batch = get_modality(model.config.adapters[modality].kind).example(model, 2)
    if modality == "text":
        return batch["text"], batch["text"].eq(PAD_ID)
    if modality == "audio":
        return batch["audio"], batch["audio_padding_mask"]
    return (batch["image"],)


def export_modalities(model, modalities: Sequence[str] | None) -> list[str]:
    """The branches to export: the given ones (each must be a branch of the model with a graph
    recipe), else every branch of the model that has one."""
    if modalities is None:
        names = [m for m in model.modalities if m in GRAPH_INPUTS]
        if not names:
            raise ValueError(f"this model has no branch ONNX export supports ({sorted(GRAPH_INPUTS)}); "
                             f"it has {list(model.modalities)}")
        return names
    for m in modalities:
        if m not in GRAPH_INPUTS:
            raise ValueError(f"ONNX export supports the branches {sorted(GRAPH_INPUTS)}, not {m!r}")
        if m not in model.modalities:
            raise ValueError(f"this model has no {m} branch (it has {list(model.modalities)})")
    return list(dict.fromkeys(modalities))


def export_onnx(model, out_dir: str | os.PathLike, modalities: Sequence[str] | None = None,
                quantize: str | None = None, opset: int = 17) -> Path:
    """Write one ONNX graph per branch of `model` (a OnePeaceModel, float32) into `out_dir`, with
    config.json and the manifest; ``onepeace.load(out_dir)`` runs them with onnxruntime.

    modalities: the branches to export (default: every text / image / audio branch).
    quantize: "int8" quantises the graphs' matrix products with ONNX Runtime's own dynamic int8
        (`onnxruntime.quantization.quantize_dynamic`, int8 weights, activations quantised per call);
        the folder then holds only the int8 graphs. None keeps float32.
    The model is exported from its dense weights (a packed model is unpacked for the export and packed
    again after). Each graph is checked against the PyTorch branch on the tracing inputs; the error is
    recorded in the manifest ("check") and a float32 graph off by more than 1e-4 is an error."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} or None, got {quantize!r}")
    if model.dtype != torch.float32:
        raise ValueError(f"export a float32 model (this one is {model.dtype}); ONNX Runtime's int8 is quantize='int8'")
    require_module("onnx")
    ort = require_module("onnxruntime")
    names = export_modalities(model, modalities)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_packed, was_reference, was_training = model.is_packed, model.reference_mode, model.training
    model.to_dense().eval()
    model.reference_mode = False
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "opset": opset, "torch": torch.__version__,
                "onnxruntime": ort.__version__, "weights": quantize or "float32", "graphs": {}, "check": {},
                "temperature": float(model.temperature.detach()) if model.logit_scale is not None else None}
    try:
        for name in names:
            manifest["graphs"][name], manifest["check"][name] = _export_branch(model, name, out, opset, quantize)
    finally:
        model.reference_mode = was_reference
        if was_packed:
            model.to_packed()
        elif was_training:
            model.train()
    model.config.select(names).save(out / "config.json")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _export_branch(model, name: str, out: Path, opset: int, quantize: str | None) -> tuple[dict, float]:
    """Trace, write and check one graph -> (its manifest entry, max |onnx - torch| on the examples)."""
    import warnings

    inputs, axes = GRAPH_INPUTS[name]
    example = _example_inputs(model, name)
    path = out / graph_file(name)
    fixed = None
    if name == "image":
        with torch.no_grad():
            fixed = model.attention_masks([(name, model.embed_inputs(name, example[0]))], None, torch.float32)
    graph = BranchGraph(model, name, fixed)
    # grad mode on: the model's inference-only in-place/real-row paths are chosen by `not
    # torch.is_grad_enabled()`; the traced graph must be the plain computation (weights get no grad:
    # nothing is backpropagated)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the Python-side input checks (kept as checks)
        torch.onnx.export(graph, example, str(path), input_names=list(inputs), output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    with torch.no_grad():
        expected = graph(*example).numpy()
    if quantize == "int8":
        _quantize_int8(path)
    got = _run_graph(path, inputs, example)
    err = float(abs(got - expected).max())
    if quantize is None and not err <= CHECK_TOLERANCE:
        raise RuntimeError(f"the exported {name} graph differs from the PyTorch branch by {err:.2e} "
                           f"(> {CHECK_TOLERANCE}) on the tracing inputs: {path}")
    return {"file": path.name, "inputs": list(inputs), "output": "embedding"}, err


def _quantize_int8(path: Path) -> None:
    """ONNX Runtime's dynamic int8 in place: MatMul/Gemm weights int8 per channel (activations
    quantised at run time)."""
    import logging

    quantization = require_module("onnxruntime.quantization")
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its "consider pre-processing" note
    tmp = path.with_suffix(".int8.tmp")
    quantization.quantize_dynamic(str(path), str(tmp), weight_type=quantization.QuantType.QInt8,
                                  per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    os.replace(tmp, path)


def _run_graph(path: Path, inputs: Sequence[str], values: Sequence[torch.Tensor]):
    """One ONNX Runtime run of the graph at `path` -> its (B, D) output (numpy)."""
    ort = require_module("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in zip(inputs, values)})[0]

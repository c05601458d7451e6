"""onepeace: ONE-PEACE (one representation for image, audio and text) without fairseq.

>>> import onepeace
>>> model = onepeace.load("checkpoint.pt")            # a released .pt or a converted folder
>>> model.encode_text(["a dog"]).shape                 # (N, D), L2-normalised
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from . import modalities as _bundled  # noqa: F401  (registers the bundled modalities: text, image, audio, video)
from .config import ModelConfig
from .modeling.model import ModelOutput, OnePeaceModel
from .registry import list_modalities
from .sizes import get_config, list_models

__version__ = "0.1.0"


def create_model(name_or_config: str | ModelConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, modalities: Sequence[str] | None = None) -> OnePeaceModel:
    """A randomly initialised model of a named size (``device="meta"`` builds it without memory)."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if modalities is not None:
        config = config.select(modalities)
    with torch.device(device):
        model = OnePeaceModel(config)
    return model.to(dtype=dtype)


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32,
         modalities: Sequence[str] | None = None, allow_unsafe_pickle: bool = False, fuse: bool | None = None,
         compile: bool = False, pack: bool | None = None, quantize: str | None = None,
         calibration: Any = None) -> OnePeaceModel:
    """Load a released ONE-PEACE `.pt` checkpoint, a folder written by `onepeace convert`, a folder written by
    `onepeace export --format onnx` (an `onepeace.onnx.OnnxModel`: the same encode_* API on ONNX Runtime), or a released
    checkpoint by name (see :func:`list_pretrained`: "one-peace" is the 4B model), fetched into
    ``${ONEPEACE_CACHE:-~/.cache/onepeace}`` and converted once on first use.

    dtype: compute dtype (float32, float16, bfloat16; None keeps the stored dtype).
    modalities: load only these branches, e.g. ("text", "image"); other tensors are never read.
    allow_unsafe_pickle: unpickle with torch's full unpickler (runs code from the file: trusted files only).
    fuse: fuse the q/k/v and GeGLU input projections for inference (same numbers, fewer matmuls).
        None (default) fuses on GPUs only: on CPUs we measured the fused GeGLU ~20% slower
        (benchmarks/throughput.py), the CPU GEMM gaining nothing from the wider matrix.
    compile: torch.compile the shared encoder (slow first call, faster after; needs a compiler).
    pack: swap the encoder's linear layers for inference-only oneDNN-packed ones (`OnePeaceModel.to_packed`:
        same numbers, no extra memory, ~2.5x faster short queries) where this CPU can pack the dtype
        (`onepeace.modeling.packed.cpu_can_pack`: float32; bfloat16 with avx512bw/vl/dq or avx_ne_convert;
        elsewhere the weights stay plain). None (default), on CPU without `fuse` / `compile`: what a short
        probe measured faster on this CPU for this model's shapes -- packing (or plain weights, or packed
        with a dense copy for large batches), the attention kernel and the thread count
        (`onepeace.modeling.cpu_choice`: cached in ${ONEPEACE_CACHE:-~/.cache/onepeace}/cpu-choice.json,
        ONEPEACE_CPU_PROBE=0 skips it: packed), reported in ``model.load_report.cpu_choice``.
        A packed model refuses training and gradients: ``model.to_dense()`` (or pack=False) for those.
    quantize: "int8" quantises the encoder's linear layers (int8 weights per output channel, activations
        quantised per call with one scale per token: `onepeace.modeling.quantized`): CPU and
        float32 only, inference only, not with pack=True, fuse or compile. A folder written by
        ``onepeace convert --quantize int8`` loads as int8 without it (its config.json says so).
    calibration: with quantize="int8", real inputs like those you will embed ({"text": [...], "image": [...]}
        or files / folders): each FFN's output projection is smoothed for int8 first (SmoothQuant:
        `onepeace.modeling.smoothing`). Holds the float model once: for the 4B model, calibrate in
        ``onepeace convert --quantize int8 --calibrate FILES`` and load the int8 folder.
    The returned model is in eval mode; `model.load_report` says what was ignored or recomputed.
    """
    from .checkpoint import CONFIG_FILE, load_converted, load_released_checkpoint

    if isinstance(path, str) and not Path(path).exists():
        from .hub import PRETRAINED, resolve

        if path in PRETRAINED:  # a released checkpoint by name: downloaded, checked, converted once
            path = resolve(path)
    path = Path(path)
    from .onnx.export import is_onnx_folder

    if is_onnx_folder(path):  # `onepeace export --format onnx`: the graphs behind the same encode_* API
        if quantize is not None:
            raise ValueError(f"{path} is an ONNX export: quantize with `onepeace export --quantize int8` instead")
        return _load_onnx(path, device, dtype, modalities, fuse, compile, pack)
    if quantize is not None:
        _check_quantize_args(quantize, device, dtype, pack, fuse, compile)
    elif calibration is not None:
        raise ValueError("calibration= calibrates int8 quantisation: pass quantize='int8' with it")
    if path.is_dir():
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path} is a folder without {CONFIG_FILE}: not a converted onepeace model")
        model, _ = load_converted(path, modalities=modalities, dtype=dtype, device=device)
    else:
        model, _ = load_released_checkpoint(path, modalities=modalities, dtype=None if quantize else dtype,
                                            device=device, allow_unsafe=allow_unsafe_pickle)
    if quantize is not None or _int8(model):
        return _quantized(model, quantize, device, dtype, pack, fuse, compile, calibration)
    fused = bool(fuse or (fuse is None and torch.device(device).type == "cuda"))
    if pack and (compile or fuse):
        raise ValueError(f"pack=True and {'compile' if compile else 'fuse'}=True do not mix: packed weights cannot "
                         "be fused or traced by torch.compile (it packs its own); pass one of them")
    if fused:
        model.fuse_for_inference()
    if pack is None and not fused and not compile and torch.device(device).type == "cpu":
        from .modeling.cpu_choice import choose_for  # packing, attention kernel, threads: measured once, cached

        model.load_report.cpu_choice = choose_for(model)
    elif pack or (pack is None and not fused and not compile):
        model.to_packed()  # keeps plain weights where this CPU cannot pack the dtype (and on GPUs)
    if compile:
        model.compile_encoder()
    return model


def _load_onnx(path: Path, device, dtype, modalities, fuse, compile, pack):
    """An exported ONNX folder -> onepeace.onnx.OnnxModel (CPU, float32 inputs; PyTorch-only options refused)."""
    from .onnx.runtime import load_onnx

    if torch.device(device).type != "cpu" or dtype not in (torch.float32, None) or fuse or compile or pack:
        raise ValueError(f"{path} is an ONNX export (run by onnxruntime on CPU, weights as exported): "
                         "device, dtype, fuse, compile and pack do not apply; load it with the defaults")
    return load_onnx(path, modalities=modalities)


def _check_quantize_args(quantize, device, dtype, pack, fuse, compile) -> None:
    """Clear errors for what int8 cannot do (GPU, another dtype, oneDNN packing, fusing, compiling)."""
    from .modeling.quantized import check_quantize

    check_quantize(quantize, device=device, dtype=dtype)
    for name, value in (("pack", pack), ("fuse", fuse), ("compile", compile)):
        if value:
            raise ValueError(f"quantize={quantize!r} and {name}=True do not mix: the int8 layers use their own "
                             f"(fbgemm) packed weights; drop {name}=")


def _int8(model: OnePeaceModel) -> bool:
    from .modeling.quantized import quantization

    return quantization(model) is not None


def _quantized(model: OnePeaceModel, quantize, device, dtype, pack, fuse, compile, calibration=None) -> OnePeaceModel:
    """A loaded model made (or, from an int8 folder, already) int8, calibrated first if asked; the rest
    cast to float32."""
    from .modeling.quantized import quantize_int8

    _check_quantize_args(quantize or "int8", device, dtype, pack, fuse, compile)
    if calibration is not None:
        from .modeling.smoothing import calibrate_for_int8

        model.load_report.config_notes.append(calibrate_for_int8(model, calibration))  # refuses an int8 folder
    if not _int8(model):
        n = quantize_int8(model)  # layer by layer: each float weight released as it is replaced
        model.load_report.config_notes.append(f"quantize=int8: {n} encoder linear layers int8")
    return model.to(torch.float32)


def list_pretrained():
    """Every released checkpoint: name, task, modalities, size where published, URL (:mod:`onepeace.hub`)."""
    from .hub import list_pretrained as _list

    return _list()


def get_tokenizer(bpe_dir: str | os.PathLike | None = None, max_length: int = 70):
    """The released GPT-2 BPE + dictionary tokenizer (see :mod:`onepeace.tokenizer`)."""
    from .tokenizer import get_tokenizer as _get

    return _get(bpe_dir, max_length=max_length)


__all__ = ["ModelConfig", "ModelOutput", "OnePeaceModel", "create_model", "get_config", "get_tokenizer",
           "list_modalities", "list_models", "list_pretrained", "load"]

"""Our own format: a folder of config.json + model.safetensors (our parameter names, any dtype)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..config import ModelConfig
from .key_map import CheckpointError, LoadReport, key_modality
from .released import load_released_checkpoint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_converted(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors (our parameter names, the model's dtype)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..modeling.quantized import quantization

    quantize = quantization(model)
    _save_config(model, out / CONFIG_FILE, quantize)
    # fused (inference) models hold parameters as views of one tensor: safetensors wants owners
    state = {k: v.detach().clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size()
             else v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    if quantize:
        _write_plain(state, tmp)  # the 4B int8 model: no second in-memory copy of its ~4 GB
    else:
        save_file(state, str(tmp), metadata={"format": "pt", "library": "onepeace"})
    os.replace(tmp, out / WEIGHTS_FILE)
    return out


def load_converted(path: str | os.PathLike, *, modalities: Sequence[str] | None = None,
                   dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"):
    """Load a folder written by :func:`save_converted`. Returns (model, report). A damaged or
    truncated config.json or model.safetensors is a CheckpointError naming the file."""
    from ..modeling.model import OnePeaceModel

    folder = Path(path)
    config = _read_config(folder / CONFIG_FILE)
    all_modalities = config.modalities
    if modalities is not None:
        config = config.select(modalities)
    quantize = _read_quantize(folder / CONFIG_FILE)
    with torch.device("meta"):
        model = OnePeaceModel(config)
    report = LoadReport(path=str(folder))
    if quantize:  # the encoder's linears as int8 placeholders: the state dict has the folder's int8 keys
        from ..modeling.quantized import check_quantize, prepare_int8

        check_quantize(quantize, device=device, dtype=dtype)
        dtype = torch.float32  # around the int8 products (the folder may hold bfloat16 norms etc.)
        report.config_notes.append(f"quantize={quantize}: {prepare_int8(model)} encoder linear layers int8")
    try:
        loaded = _read_weights(folder, model, config, all_modalities, report, dtype, device)
    except CheckpointError:
        raise
    except (_safetensor_error(), OSError, RuntimeError, ValueError) as e:  # e.g. a truncated file
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: cannot read it: {type(e).__name__}: {e}") from e
    result = model.load_state_dict(loaded, strict=not quantize, assign=True)
    if quantize and (result.unexpected_keys or set(result.missing_keys) - _int8_keys(model)):
        raise CheckpointError(f"{folder}: not loaded: {result.missing_keys[:20]} {result.unexpected_keys[:20]}")
    model.eval()
    model.load_report = report
    return model, report


def _safetensor_error() -> type:
    """safetensors' own error (a truncated or damaged file; it derives from Exception only)."""
    from safetensors import SafetensorError

    return SafetensorError


def _read_config(path: Path) -> ModelConfig:
    """config.json -> ModelConfig; a missing, truncated or wrong file is an error naming it."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a converted onepeace model folder")
    try:
        return ModelConfig.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON (truncated or damaged?): {e}") from e
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a onepeace model config: {type(e).__name__}: {e}") from e


def _read_weights(folder: Path, model, config, all_modalities, report: LoadReport, dtype, device) -> dict:
    """model.safetensors -> {name: tensor} for the model's parameters (strict both ways)."""
    from safetensors import safe_open

    expected = set(model.state_dict())
    loaded = {}
    int8 = _int8_keys(model)
    # int8 folders: read with plain file reads, not a memory map (whose touched pages would count in
    # the resident memory beside the copies), each int8 layer packed as soon as it is read
    opener = _PlainSafetensors if int8 else safe_open
    with opener(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = sorted(expected - keys)
        if missing:
            raise CheckpointError(f"{folder}: {len(missing)} parameters are missing: " + ", ".join(missing[:20]))
        unexpected = []
        for key in sorted(keys - expected):
            m = key_modality(key, all_modalities)
            if m is not None and m not in config.modalities:
                report.skipped_modalities[m] = report.skipped_modalities.get(m, 0) + 1
            else:
                unexpected.append(key)
        if unexpected:
            raise CheckpointError(f"{folder}: unexpected keys: " + ", ".join(unexpected[:20]))
        meta = model.state_dict()
        if int8:
            _load_int8_layers(f, model, report)
        for key in expected - int8:
            t = f.get_tensor(key)
            _count_storage(report, t)
            if tuple(t.shape) != tuple(meta[key].shape):
                raise CheckpointError(f"{folder}: {key} has shape {tuple(t.shape)}, expected {tuple(meta[key].shape)}")
            target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            loaded[key] = t.to(device=device, dtype=target)
    return loaded


def _count_storage(report: LoadReport, t: torch.Tensor) -> None:
    """One more tensor of t's dtype in the file (``report.storage_dtypes``)."""
    name = str(t.dtype).replace("torch.", "")
    report.storage_dtypes[name] = report.storage_dtypes.get(name, 0) + 1


def _save_config(model: torch.nn.Module, path: Path, quantize: str | None) -> None:
    """config.json: the model's config, plus "quantize": "int8" for an int8-quantised model."""
    data = model.config.to_dict()
    if quantize:
        data["quantize"] = quantize
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_quantize(path: Path) -> str | None:
    """config.json's "quantize" (None for a float folder); an unknown value is a CheckpointError."""
    from ..modeling.quantized import QUANTIZE_CHOICES

    quantize = json.loads(path.read_text()).get("quantize")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise CheckpointError(f"{path}: quantize={quantize!r} is not one of {QUANTIZE_CHOICES}")
    return quantize


def _int8_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's int8 layers (weight, weight_scale, bias)."""
    from ..modeling.quantized import int8_layers

    return {f"{name}.{k}" for name, layer in int8_layers(model).items()
            for k in ("weight", "weight_scale") + (("bias",) if layer.bias is not None else ())}


def _load_int8_layers(f: "_PlainSafetensors", model: torch.nn.Module, report: LoadReport) -> None:
    """Read and pack each int8 layer in turn. The int8 weights are read into ONE reused buffer per
    shape (fbgemm's packing copies them): a fresh tensor per layer, freed after packing, fragmented the
    heap so that the 4B load peaked at 1.28x its weights (a (6144, 1536) layer cost 2.06x its bytes)."""
    from ..modeling.quantized import int8_layers, release_freed_memory

    buffers: dict[tuple[int, int], torch.Tensor] = {}
    for name, layer in int8_layers(model).items():
        shape = (layer.out_features, layer.in_features)
        out = buffers.setdefault(shape, torch.empty(shape, dtype=torch.int8))
        q, scale = f.get_tensor(f"{name}.weight", out=out), f.get_tensor(f"{name}.weight_scale")
        bias = f.get_tensor(f"{name}.bias") if layer.bias is not None else None
        layer.load_int8(q, scale, bias)
        release_freed_memory()  # the temporary fbgemm packed from (see release_freed_memory)
        for t in (q, scale) + (() if bias is None else (bias,)):
            _count_storage(report, t)


#: safetensors dtype names -> torch dtypes (the ones a converted folder can hold)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}


def _write_plain(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file tensor by tensor (safetensors' save_file first serialises every
    tensor to bytes in memory: a second copy of the model, which the 4B int8 conversion cannot afford)."""
    names = {dtype: name for name, dtype in _ST_DTYPES.items()}
    header: dict = {"__metadata__": {"format": "pt", "library": "onepeace"}}
    offset = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in state.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


class _PlainSafetensors:
    """A safetensors file read tensor by tensor with plain reads (``safe_open``'s API: keys,
    get_tensor), so that the file's pages never count in this process's resident memory."""

    def __init__(self, path: str, framework: str = "pt", device: str = "cpu"):
        import struct

        self._file = open(path, "rb")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > 100_000_000:
            raise ValueError(f"header of {n} bytes: not a safetensors file")
        self._header = {k: v for k, v in json.loads(self._file.read(n)).items() if k != "__metadata__"}
        self._base = 8 + n

    def __enter__(self) -> "_PlainSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self._header)

    def get_tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`, read into `out` where given (its dtype and shape must match)."""
        entry = self._header[key]
        start, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]]) if out is None else out
        if t.dtype != _ST_DTYPES[entry["dtype"]] or list(t.shape) != entry["shape"]:
            raise ValueError(f"{key}: {entry['dtype']} {entry['shape']} in the file, expected {t.dtype} {list(t.shape)}")
        if t.numel() * t.element_size() != end - start:
            raise ValueError(f"{key}: {end - start} bytes for shape {entry['shape']} {entry['dtype']}")
        if t.numel():
            self._file.seek(self._base + start)
            if self._file.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise ValueError(f"{key}: the file ends inside this tensor (truncated?)")
        return t


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                       allow_unsafe: bool = False) -> Path:
    """Released `.pt` -> config.json + model.safetensors. dtype None keeps the file's storage dtype."""
    model, _ = load_released_checkpoint(src, dtype=dtype, allow_unsafe=allow_unsafe)
    return save_converted(model, out_dir)

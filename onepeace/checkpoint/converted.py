"""Our own format: a folder of config.json + model.safetensors (our parameter names, any dtype)."""
from __future__ import annotations

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
    """Load a folder written by :func:`save_converted`. Returns (model, report). A damaged or
    truncated config.json or model.safetensors is a CheckpointError naming the file."""
    from ..modeling.model import OnePeaceModel

    folder = Path(path)
    config = _read_config(folder / CONFIG_FILE)
    all_modalities = config.modalities
    if modalities is not None:
        config = config.select(modalities)
    with torch.device("meta"):
        model = OnePeaceModel(config)
    report = LoadReport(path=str(folder))
    try:
        loaded = _read_weights(folder, model, config, all_modalities, report, dtype, device)
    except CheckpointError:
        raise
    except (_safetensor_error(), OSError, RuntimeError, ValueError) as e:  # e.g. a truncated file
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: cannot read it: {type(e).__name__}: {e}") from e
    model.load_state_dict(loaded, strict=True, assign=True)
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
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
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
        for key in expected:
            t = f.get_tensor(key)
            report.storage_dtypes[str(t.dtype).replace("torch.", "")] = \
                report.storage_dtypes.get(str(t.dtype).replace("torch.", ""), 0) + 1
            if tuple(t.shape) != tuple(meta[key].shape):
                raise CheckpointError(f"{folder}: {key} has shape {tuple(t.shape)}, expected {tuple(meta[key].shape)}")
            target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            loaded[key] = t.to(device=device, dtype=target)
    return loaded


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                       allow_unsafe: bool = False) -> Path:
    """Released `.pt` -> config.json + model.safetensors. dtype None keeps the file's storage dtype."""
    model, _ = load_released_checkpoint(src, dtype=dtype, allow_unsafe=allow_unsafe)
    return save_converted(model, out_dir)

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
    """Load a folder written by :func:`save_converted`. Returns (model, report)."""
    from safetensors import safe_open

    from ..modeling.model import OnePeaceModel

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
    model.load_state_dict(loaded, strict=True, assign=True)
    model.eval()
    model.load_report = report
    return model, report


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                       allow_unsafe: bool = False) -> Path:
    """Released `.pt` -> config.json + model.safetensors. dtype None keeps the file's storage dtype."""
    model, _ = load_released_checkpoint(src, dtype=dtype, allow_unsafe=allow_unsafe)
    return save_converted(model, out_dir)

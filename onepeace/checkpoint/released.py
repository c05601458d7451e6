"""Released `.pt` checkpoints: strict loading into an OnePeaceModel, and writing the released layout.

Loading is strict both ways:
- a parameter whose released name is not in the file is an error listing the names;
- a key in the file that is not a parameter is an error, except
  * recomputable buffers (:data:`RECOMPUTED_BUFFERS`: `rp_bucket`, `position_idx`, `version`),
  * pretraining-only keys (:data:`PRETRAINING_ONLY`: the denoising decoder, its embeds, mask
    tokens and mask heads) when loading an embedding model,
  * the tensors of modalities that were not requested (`modalities=`), which are never read;
  these are reported in the returned :class:`LoadReport`.
The config comes from the file's `cfg` and shapes (:mod:`.released_config`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..serialization import LazyTensor, Placeholder, read_checkpoint
from .key_map import (
    PRETRAINING_ONLY,
    RECOMPUTED_BUFFERS,
    CheckpointError,
    LoadReport,
    released_key_map,
    released_key_modality,
)
from .released_config import config_from_released, released_cfg


def load_released_checkpoint(path: str | os.PathLike, *, modalities: Sequence[str] | None = None,
                             dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu",
                             allow_unsafe: bool = False, strict: bool = True):
    """Load a released `.pt` checkpoint into an OnePeaceModel. Returns (model, report)."""
    from ..modeling.model import OnePeaceModel

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    obj, archive = read_checkpoint(path, allow_unsafe=allow_unsafe)
    try:
        if not isinstance(obj, Mapping) or "model" not in obj:
            raise CheckpointError(f"{path!r} is not a ONE-PEACE checkpoint: no 'model' state dict in it")
        cfg = plain_cfg(obj.get("cfg"), path)
        state: Mapping[str, Any] = obj["model"]
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise CheckpointError(f"{path!r}: its 'model' is not a state dict of named tensors")
        config, notes = read_config(cfg, state, path, name=Path(path).stem)
        for note in notes:
            warnings.warn(f"{path}: {note}", stacklevel=2)
        report = LoadReport(path=path, config_notes=notes)
        report.placeholders = find_placeholders(obj)
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
        tensors = take_tensors(state, key_map, all_modalities, config.modalities, report, strict, path)
        assign_tensors(model, tensors, dtype, device, path)
    finally:
        archive.close()
    model.eval()
    model.load_report = report
    return model, report


#: How deep a checkpoint's `cfg` may nest (the released ones: 5 levels); deeper is damaged or crafted.
MAX_CFG_DEPTH = 64


def plain_cfg(obj: Any, path: str = "checkpoint", depth: int = 0) -> Any:
    """cfg objects as plain dicts (an omegaconf DictConfig in some files arrives as a placeholder).
    Raises CheckpointError naming `path` for a cfg nested deeper than MAX_CFG_DEPTH levels."""
    if depth > MAX_CFG_DEPTH:
        raise CheckpointError(f"{path}: its cfg is nested deeper than {MAX_CFG_DEPTH} levels; "
                              "the file is damaged or crafted")
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, dict) and "_content" in state:
            return plain_cfg(state["_content"], path, depth + 1)
        return plain_cfg(state, path, depth + 1)
    if isinstance(obj, Mapping):
        return {k: plain_cfg(v, path, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_cfg(v, path, depth + 1) for v in obj]
    return obj


def read_config(cfg: Any, state: Mapping[str, Any], path: str, **options: Any):
    """config_from_released, with every failure a CheckpointError naming the file."""
    try:
        return config_from_released(cfg, state, **options)
    except CheckpointError as e:
        if path in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # a cfg of the wrong types
        raise CheckpointError(f"{path}: cannot build the model's config from its cfg and tensor shapes: "
                              f"{type(e).__name__}: {e}") from e


def find_placeholders(obj: Any, depth: int = 0) -> list[str]:
    found: list[str] = []
    if depth > 20:
        return found
    if isinstance(obj, Placeholder):
        found.append(type(obj).qualified_name)
        found += find_placeholders(obj.state, depth + 1)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            found += find_placeholders(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += find_placeholders(v, depth + 1)
    return found


def take_tensors(state: Mapping[str, Any], key_map: dict[str, str], all_modalities: Sequence[str],
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
            problem = value.problem() if isinstance(value, LazyTensor) else None
            if problem is not None:  # checked before anything is read (a stride-0 bomb costs its full size)
                raise CheckpointError(f"{path}: {key}: {problem}; refusing to load it")
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


def assign_tensors(model: torch.nn.Module, tensors: Mapping[str, Any], dtype: torch.dtype | None,
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



# ---- writing the released layout (for interoperability with the official code and for tests) ----
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



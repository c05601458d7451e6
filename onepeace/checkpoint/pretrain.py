"""Pretraining checkpoints in the released layout: encoder + denoising decoder + decoder embeds,
mask tokens and mask heads (an OnePeacePretrainModel)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..serialization import read_checkpoint
from .key_map import CheckpointError, LoadReport, released_key_map
from .released import assign_tensors, find_placeholders, plain_cfg, read_config, take_tensors
from .released_config import released_cfg

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
    from ..modeling.pretrain import OnePeacePretrainModel, PretrainConfig

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    obj, archive = read_checkpoint(path, allow_unsafe=allow_unsafe)
    try:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
            raise CheckpointError(f"{path!r} is not a ONE-PEACE checkpoint: no 'model' state dict in it")
        cfg = plain_cfg(obj.get("cfg"), path) or {}
        state = obj["model"]
        if not any(k.startswith(DECODER_PREFIX) for k in state):
            raise CheckpointError(f"{path!r} has no denoising decoder ({DECODER_PREFIX}*): not a pretraining "
                                  "checkpoint; start from it with OnePeacePretrainModel.from_model(onepeace.load(...))")
        model_config, notes = read_config(cfg, state, path, name=Path(path).stem)
        decoder_cfg = {"model": {"encoder": (cfg.get("model") or {}).get("decoder") or {}}, "task": cfg.get("task")}
        decoder_config, dnotes = read_config(decoder_cfg, state, path, prefix=DECODER_PREFIX,
                                             name=Path(path).stem + "-decoder")
        for note in notes + [f"decoder: {n}" for n in dnotes]:
            warnings.warn(f"{path}: {note}", stacklevel=2)
        report = LoadReport(path=path, config_notes=notes + dnotes, placeholders=find_placeholders(obj))
        with torch.device("meta"):
            pm = OnePeacePretrainModel(PretrainConfig(model=model_config, decoder=decoder_config))
        key_map = pretrain_key_map(pm)
        tensors = take_tensors(state, key_map, model_config.modalities, model_config.modalities, report, True, path)
        assign_tensors(pm, tensors, dtype, device, path)
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

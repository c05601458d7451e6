"""Checkpoints, by concern:

- :mod:`.key_map`: our parameter names <-> the released names; which modality owns a key.
- :mod:`.released_config`: a released `cfg` + shapes <-> ModelConfig (each adapter config reads its own).
- :mod:`.released`: released `.pt` files: strict loading, writing the released layout.
- :mod:`.converted`: our folders (config.json + model.safetensors) and `.pt` -> folder conversion.
- :mod:`.pretrain`: pretraining checkpoints (encoder + denoising decoder) in the released layout.
"""
from __future__ import annotations

from .converted import CONFIG_FILE, WEIGHTS_FILE, convert_checkpoint, load_converted, save_converted
from .key_map import (
    ENCODER_PREFIX,
    PRETRAINING_ONLY,
    RECOMPUTED_BUFFERS,
    CheckpointError,
    LoadReport,
    _our_key_modality,
    key_modality,
    released_key_map,
    released_key_modality,
)
from .pretrain import (
    DECODER_PREFIX,
    load_pretrain_checkpoint,
    pretrain_key_map,
    save_released_pretrain_checkpoint,
)
from .released import load_released_checkpoint, released_state_dict, save_released_checkpoint
from .released_config import ReleasedAdapter, config_from_released, released_cfg

__all__ = [
    "CONFIG_FILE", "CheckpointError", "DECODER_PREFIX", "ENCODER_PREFIX", "LoadReport", "PRETRAINING_ONLY",
    "RECOMPUTED_BUFFERS", "ReleasedAdapter", "WEIGHTS_FILE", "_our_key_modality", "config_from_released",
    "convert_checkpoint", "key_modality", "load_converted", "load_pretrain_checkpoint", "load_released_checkpoint",
    "pretrain_key_map", "released_cfg", "released_key_map", "released_key_modality", "released_state_dict",
    "save_converted", "save_released_checkpoint", "save_released_pretrain_checkpoint",
]

"""Typed training configuration (JSON). A stage is configuration, not code: which task's objective,
which parameters are frozen, whether the temperature is re-initialised."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import JsonConfig
from ..data.augment import AudioAugmentConfig
from ..data.masking import MaskingConfig
from .objectives import LossConfig


@dataclass(frozen=True)
class StageConfig:
    name: str = "stage1"
    task: str = "vl"  # "vl" image-text (ITC + DCL) or "al" audio-text (ATC + DCL)
    # fnmatch patterns over the pretraining model's parameter names; `trainable` overrides `frozen`
    frozen: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()
    reset_logit_scale: bool = False  # re-initialise the temperature at the start of the stage
    logit_scale_init: float = 1 / 0.07


STAGES: dict[str, StageConfig] = {
    # stage 1, vision-language: everything trains
    "stage1": StageConfig(name="stage1", task="vl"),
    # stage 2, audio-language: the encoder is frozen except its audio adapter, audio FFN experts and
    # audio final LayerNorm; text_proj is frozen; audio_proj, the temperature (re-initialised) and the
    # whole decoder side train.
    "stage2": StageConfig(
        name="stage2", task="al",
        frozen=("model.adapters.*", "model.encoder.*", "model.projections.text.*"),
        trainable=("model.adapters.audio.*", "model.encoder.layers.*.ffn.audio.*", "model.encoder.final_norms.audio.*"),
        reset_logit_scale=True,
    ),
}


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    train_manifest: str
    output_dir: str = "runs/train"
    # the model: a named size (random init), or init_from a released .pt (pretraining or retrieval),
    # a converted folder, or a training checkpoint of ours (.pt written by the trainer)
    model: str = "one-peace-small"
    init_from: str | None = None
    decoder_embed_dim: int | None = None  # new decoders: default half the encoder width
    decoder_layers: int = 2
    decoder_heads: int | None = None
    stage: StageConfig = field(default_factory=lambda: STAGES["stage1"])
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # waveform augmentation of audio-text items (None: none, the reference); see data.augment
    audio_augment: AudioAugmentConfig | None = None
    batch_size: int = 32  # global, per optimizer step (split over ranks and accumulation steps)
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    grad_clip: float = 3.0
    drop_path_rate: float | None = None  # overrides the model's (linearly increasing over layers)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    grad_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 fully_shard per encoder layer instead of DDP
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 3
    eval_manifest: str | None = None
    eval_every: int = 0  # steps between zero-shot evaluations (0 = never)
    bpe_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.stage.task not in ("vl", "al"):
            raise ValueError(f"stage.task must be 'vl' or 'al', got {self.stage.task!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        data = dict(data)
        stage = data.get("stage", "stage1")
        if isinstance(stage, str):
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGES)} (or give a StageConfig dict)")
            data["stage"] = STAGES[stage]
        else:
            data["stage"] = _build(StageConfig, stage)
        if "masking" in data:
            data["masking"] = _build(MaskingConfig, data["masking"])
        if "loss" in data:
            data["loss"] = _build(LossConfig, data["loss"])
        if data.get("audio_augment") is not None:
            data["audio_augment"] = _build(AudioAugmentConfig, data["audio_augment"])
        return _build(cls, data)



def _build(cls, raw: Mapping[str, Any]):
    if dataclasses.is_dataclass(raw):
        return raw
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

"""PretrainTask: the pretraining model together with its stage objective, as ONE module.

DDP and FSDP hook a module's forward, so the module they wrap must compute the losses itself; the
model (onepeace.modeling.pretrain.OnePeacePretrainModel: encoder, denoising decoder, mask heads)
only knows how to encode and decode. This keeps the dependency one way: train -> modeling.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..modeling.pretrain import OnePeacePretrainModel
from .objectives import TASK_LOSSES, LossConfig


class PretrainTask(nn.Module):
    """`task` ('vl' or 'al') objective over `model`; forward(batch) -> {term: loss, 'loss': total}.

    Holds no parameters of its own: its state dict is the model's under the prefix 'model.'."""

    def __init__(self, model: OnePeacePretrainModel, task: str = "vl", loss_config: LossConfig = LossConfig()):
        super().__init__()
        if task not in TASK_LOSSES:
            raise ValueError(f"unknown pretraining task {task!r}; known: {sorted(TASK_LOSSES)}")
        self.model = model
        self.task = task
        self.loss_config = loss_config

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return TASK_LOSSES[self.task](self.model, batch, self.loss_config)

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one before the rest: every encoder and decoder layer."""
        return [*self.model.model.encoder.layers, *self.model.decoder.encoder.layers]

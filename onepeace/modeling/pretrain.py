"""The pretraining model: the ONE-PEACE encoder plus the small denoising decoder of the
intra-modal denoising contrast (spec 10.2), with decoder embeds, mask tokens and mask heads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..config import JsonConfig, ModelConfig
from .adapters import AdapterOutput
from .model import OnePeaceModel


@dataclass(frozen=True)
class PretrainConfig(JsonConfig):
    """The encoder-side model (with projections) and the decoder (no projections, no relative bias)."""

    model: ModelConfig
    decoder: ModelConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "decoder": self.decoder.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PretrainConfig":
        return cls(model=ModelConfig.from_dict(data["model"]), decoder=ModelConfig.from_dict(data["decoder"]))



def default_decoder_config(model: ModelConfig, embed_dim: int | None = None, layers: int = 2,
                           heads: int | None = None, ffn_embed_dim: int | None = None) -> ModelConfig:
    """The reference decoder shape for a model: same modalities, no stems, no relative bias,
    'fixed' audio positions, no LayerScale. Released: D=768, F=2048, L=2, H=12."""
    D = embed_dim or max(32, model.encoder.embed_dim // 2)
    # each modality's config knows its decoder variant (a modality without one raises, naming itself)
    adapters = {name: cfg.decoder_variant() for name, cfg in model.adapters.items()}
    encoder = dataclasses.replace(
        model.encoder, embed_dim=D, layers=layers, attention_heads=heads or max(1, D // 64) if D >= 64 else 4,
        ffn_embed_dim=ffn_embed_dim or D * 8 // 3 // 8 * 8, use_layer_scale=False, rel_pos_tables=1,
        drop_path_rate=0.0)
    return ModelConfig(encoder=encoder, adapters=adapters, projections=False, name=f"{model.name}-decoder")


class OnePeacePretrainModel(nn.Module):
    """Encoder + denoising decoder; `encode` and `decode` are the passes the stage objectives
    (onepeace.train.objectives, run by onepeace.train.task.PretrainTask) are built from."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.config = config
        self.model = OnePeaceModel(config.model)
        self.decoder = OnePeaceModel(config.decoder)
        D, Dd = config.model.encoder.embed_dim, config.decoder.encoder.embed_dim
        modalities = list(config.model.adapters)
        self.decoder_embeds = nn.ModuleDict({m: nn.Linear(D, Dd) for m in modalities})
        self.mask_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, Dd)) for m in modalities})
        self.mask_heads = nn.ModuleDict({m: nn.Linear(Dd, D) for m in modalities})

    @classmethod
    def from_model(cls, model: OnePeaceModel, decoder_config) -> "OnePeacePretrainModel":
        """Start pretraining from an embedding model (e.g. a released retrieval checkpoint): its
        weights are kept; the decoder, decoder embeds, mask tokens and mask heads are NEW (randomly
        initialised), since such a file has none. decoder_config: a ModelConfig or a function of the
        model's config returning one."""
        if callable(decoder_config):
            decoder_config = decoder_config(model.config)
        pm = cls(PretrainConfig(model=model.config, decoder=decoder_config))
        pm.model.load_state_dict(model.state_dict(), strict=True)
        return pm

    def forward(self, *args, **kwargs):
        raise TypeError("OnePeacePretrainModel has no objective of its own: wrap it in "
                        "onepeace.train.task.PretrainTask(model, task, loss_config) and call that")

    def encode(self, inputs: Mapping[str, torch.Tensor], padding_masks: Mapping[str, torch.Tensor | None] | None = None,
               preserve_ids: Mapping[str, torch.Tensor] | None = None,
               adapter_kwargs: Mapping[str, Mapping[str, Any]] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, AdapterOutput]]:
        """ONE encoder pass over the given modalities (text first), optionally keeping only the units
        `preserve_ids[m]` (B, K). `adapter_kwargs[m]` go to that adapter (e.g. precomputed audio
        `frames`). Returns ({m: final hidden (B, S_m or K, D)}, {m: adapter output})."""
        padding_masks = padding_masks or {}
        preserve_ids = preserve_ids or {}
        adapter_kwargs = adapter_kwargs or {}
        order = [m for m in self.model.modalities if m in inputs]
        outs = {}
        for m in order:
            kwargs = dict(adapter_kwargs.get(m, {}))
            if preserve_ids.get(m) is not None:
                kwargs["preserve_ids"] = preserve_ids[m]
            outs[m] = self.model.embed_inputs(m, inputs[m], padding_masks.get(m), **kwargs)
        hidden = self.model.encode([(m, outs[m]) for m in order])
        return hidden, outs

    def decode(self, kept: Mapping[str, torch.Tensor], preserve_ids: Mapping[str, torch.Tensor],
               full_padding: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Student features (B, L_m, D) for every position of each modality's full-length sequence.

        kept[m]: encoder states (B, K, D) of the kept units; preserve_ids[m]: (B, K) their original
        positions (-1 = padding slot); full_padding[m]: (B, L_m) the full-length item's own padding.
        """
        segments = []
        for m in [m for m in self.model.modalities if m in kept]:
            h = self.decoder_embeds[m](kept[m])  # (B, K, Dd)
            B, L = full_padding[m].shape
            full = self.mask_tokens[m].to(h.dtype).expand(B, L, -1).clone()  # (B, L, Dd)
            valid = preserve_ids[m].ge(0)
            rows = torch.arange(B, device=h.device).unsqueeze(1).expand_as(valid)
            full[rows[valid], preserve_ids[m][valid]] = h[valid]
            x = self.decoder.adapters[m].add_positions(full)
            segments.append((m, AdapterOutput(x, full_padding[m])))
        hidden = self.decoder.encode(segments)
        return {m: self.mask_heads[m](hidden[m]) for m, _ in segments}

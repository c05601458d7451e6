"""The two stage objectives of ONE-PEACE pretraining (spec 10), on one batch.

vision-language (stage 1): ITC + 0.5 DCL(text) + 1.0 DCL(image) + 0.5 DCL(vl text) + 0.5 DCL(vl image)
  teachers: the unmasked text-only pass (DCL text), image-only pass (DCL image), joint vl pass (vl terms);
  the unmasked single-modality passes also give the ITC embeddings (with gradient).
audio-language (stage 2): ATC + 1.0 DCL(audio) + 0.5 DCL(al text) + 0.5 DCL(al audio)
  the joint text+audio pass is the teacher for all three DCL terms; ATC's text side has no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from ..losses.contrastive import contrastive_loss
from ..losses.denoising import denoising_contrast_loss
from ..modeling.pretrain import OnePeacePretrainModel

VL_WEIGHTS = {"itc_loss": 1.0, "dcl_text_loss": 0.5, "dcl_image_loss": 1.0, "dcl_vl_text_loss": 0.5,
              "dcl_vl_image_loss": 0.5}
AL_WEIGHTS = {"atc_loss": 1.0, "dcl_audio_loss": 1.0, "dcl_al_text_loss": 0.5, "dcl_al_audio_loss": 0.5}


@dataclass(frozen=True)
class LossConfig:
    weights: Mapping[str, float] = field(default_factory=dict)  # empty = the reference weights of the task
    contrast_gather: str = "with_grad"  # or "reference" (other side gathered without gradient)
    dcl_scale: float = 2.5
    label_smoothing: float = 0.1  # DCL only; the aligning contrast has none
    dcl_global_candidates: bool = True  # contrast against the units of ALL ranks (same as one process)
    # our option: items of a batch with the SAME caption count as positives of each other (soft
    # targets) instead of the reference's one-hot targets; helps when captions repeat (templates)
    same_caption_positives: bool = False


def _text_padding(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(tokens[:, :1], dtype=torch.bool), tokens.eq(1)], dim=1)


def _caption_ids(tokens: torch.Tensor, cfg: LossConfig) -> torch.Tensor | None:
    """(B,) int64 ids equal iff the token rows are equal (a polynomial hash of the ids)."""
    if not cfg.same_caption_positives:
        return None
    weights = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=torch.int64)
    powers = torch.pow(torch.tensor(1_000_003, device=tokens.device), weights) % (2 ** 61 - 1)
    return ((tokens.masked_fill(tokens.eq(1), 0) * powers) % (2 ** 61 - 1)).sum(dim=1)


def _skip_dcl(weights: Mapping[str, float], default: Mapping[str, float]) -> bool:
    """True when every denoising term has weight 0 (the aligning-contrast-only ablation): its
    passes are then not computed at all."""
    w = weights or default
    return all(w.get(k, 0.0) == 0.0 for k in default if k.startswith("dcl_"))


def _aligning_loss(pm: OnePeacePretrainModel, tokens: torch.Tensor, text_hidden: torch.Tensor,
                   other_hidden: torch.Tensor, other: str, cfg: LossConfig) -> torch.Tensor:
    """ITC / ATC between the text CLS embeddings and the other modality's."""
    return contrastive_loss(_embed(pm, text_hidden, "text"), _embed(pm, other_hidden, other), pm.model.logit_scale,
                            gather=cfg.contrast_gather, group_ids=_caption_ids(tokens, cfg))


def _embed(pm: OnePeacePretrainModel, hidden: torch.Tensor, modality: str) -> torch.Tensor:
    return F.normalize(pm.model.projections[modality](hidden[:, 0]), dim=-1)


def _dcl(student, teacher, mask, padding, cfg: LossConfig) -> torch.Tensor:
    return denoising_contrast_loss(student, teacher, mask, padding, scale=cfg.dcl_scale,
                                   label_smoothing=cfg.label_smoothing, global_candidates=cfg.dcl_global_candidates)


def vision_language_losses(pm: OnePeacePretrainModel, batch: Mapping[str, torch.Tensor],
                           cfg: LossConfig = LossConfig()) -> dict[str, torch.Tensor]:
    tokens, images = batch["src_tokens"], batch["src_images"]
    text_pad = _text_padding(tokens)
    image_pad = torch.zeros(images.shape[0], 1 + pm.model.adapters["image"].num_patches(images.shape[-1]),
                            dtype=torch.bool, device=images.device)
    # unmasked passes: ITC (with gradient) and the teachers (used detached)
    text_full, _ = pm.encode({"text": tokens})
    image_full, _ = pm.encode({"image": images})
    losses = {"itc_loss": _aligning_loss(pm, tokens, text_full["text"], image_full["image"], "image", cfg)}
    if _skip_dcl(cfg.weights, VL_WEIGHTS):
        return _total(losses, cfg.weights)
    with torch.no_grad():
        vl_full, _ = pm.encode({"text": tokens, "image": images})
    # masked (student) passes -> decoder
    pid = {"text": batch["text_preserve_ids"], "image": batch["image_preserve_ids"],
           "vl_text": batch["vl_text_preserve_ids"], "vl_image": batch["vl_image_preserve_ids"]}
    s_text, _ = pm.encode({"text": tokens}, preserve_ids={"text": pid["text"]})
    s_image, _ = pm.encode({"image": images}, preserve_ids={"image": pid["image"]})
    s_vl, _ = pm.encode({"text": tokens, "image": images},
                        preserve_ids={"text": pid["vl_text"], "image": pid["vl_image"]})
    d_text = pm.decode(s_text, {"text": pid["text"]}, {"text": text_pad})["text"]
    d_image = pm.decode(s_image, {"image": pid["image"]}, {"image": image_pad})["image"]
    d_vl = pm.decode(s_vl, {"text": pid["vl_text"], "image": pid["vl_image"]}, {"text": text_pad, "image": image_pad})
    losses["dcl_text_loss"] = _dcl(d_text, text_full["text"], batch["text_mask_indices"], text_pad, cfg)
    losses["dcl_image_loss"] = _dcl(d_image, image_full["image"], batch["image_mask_indices"], image_pad, cfg)
    losses["dcl_vl_text_loss"] = _dcl(d_vl["text"], vl_full["text"], batch["vl_text_mask_indices"], text_pad, cfg)
    losses["dcl_vl_image_loss"] = _dcl(d_vl["image"], vl_full["image"], batch["vl_image_mask_indices"], image_pad, cfg)
    return _total(losses, cfg.weights or VL_WEIGHTS)


def audio_language_losses(pm: OnePeacePretrainModel, batch: Mapping[str, torch.Tensor],
                          cfg: LossConfig = LossConfig()) -> dict[str, torch.Tensor]:
    tokens, audio, audio_pad = batch["src_tokens"], batch["src_audios"], batch["audio_padding_masks"]
    text_pad = _text_padding(tokens)
    # the waveform feature extractor is the costliest part of an audio pass: run it once and share
    # its frames between the passes (identical numbers; the no-grad teacher takes them detached)
    frames = pm.model.adapters["audio"].extract_features(audio.to(pm.model.dtype))
    shared = {"audio": {"frames": frames}}
    detached = {"audio": {"frames": frames.detach()}}
    with torch.no_grad():
        text_full, _ = pm.encode({"text": tokens})
    audio_full, _ = pm.encode({"audio": audio}, {"audio": audio_pad}, adapter_kwargs=shared)
    losses = {"atc_loss": _aligning_loss(pm, tokens, text_full["text"], audio_full["audio"], "audio", cfg)}
    if _skip_dcl(cfg.weights, AL_WEIGHTS):
        return _total(losses, cfg.weights)
    with torch.no_grad():
        al_full, _ = pm.encode({"text": tokens, "audio": audio}, {"audio": audio_pad}, adapter_kwargs=detached)
    pid = {"audio": batch["audio_preserve_ids"], "al_text": batch["al_text_preserve_ids"],
           "al_audio": batch["al_audio_preserve_ids"]}
    s_audio, _ = pm.encode({"audio": audio}, {"audio": audio_pad}, preserve_ids={"audio": pid["audio"]},
                           adapter_kwargs=shared)
    s_al, _ = pm.encode({"text": tokens, "audio": audio}, {"audio": audio_pad},
                        preserve_ids={"text": pid["al_text"], "audio": pid["al_audio"]}, adapter_kwargs=shared)
    d_audio = pm.decode(s_audio, {"audio": pid["audio"]}, {"audio": audio_pad})["audio"]
    d_al = pm.decode(s_al, {"text": pid["al_text"], "audio": pid["al_audio"]}, {"text": text_pad, "audio": audio_pad})
    losses["dcl_audio_loss"] = _dcl(d_audio, al_full["audio"], batch["audio_mask_indices"], audio_pad, cfg)
    losses["dcl_al_text_loss"] = _dcl(d_al["text"], al_full["text"], batch["al_text_mask_indices"], text_pad, cfg)
    losses["dcl_al_audio_loss"] = _dcl(d_al["audio"], al_full["audio"], batch["al_audio_mask_indices"], audio_pad, cfg)
    return _total(losses, cfg.weights or AL_WEIGHTS)


def _total(losses: dict[str, torch.Tensor], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    unknown = {k for k, w in weights.items() if k not in losses and w != 0}
    if unknown:
        raise ValueError(f"loss weights for unknown terms {sorted(unknown)}; terms: {sorted(losses)}")
    losses["loss"] = sum(weights.get(k, 0.0) * v for k, v in losses.items())
    if not torch.is_tensor(losses["loss"]):
        raise ValueError(f"every loss weight is zero: {dict(weights)}")
    return losses


TASK_LOSSES = {"vl": vision_language_losses, "al": audio_language_losses}

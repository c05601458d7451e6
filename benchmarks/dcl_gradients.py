"""How the denoising contrast competes with the aligning contrast in stage 1, measured on gradients.

For a stage-1 (image-text) model and a few training batches, each loss term's weighted gradient on
the parameters the zero-shot embedding uses (encoder, adapters, projections): its norm, and its
cosine with the aligning contrast's (ITC) gradient. A denoising gradient much larger than ITC's and
near-orthogonal (or opposed) to it spends the update budget elsewhere than on the alignment.

    python benchmarks/dcl_gradients.py MANIFEST CHECKPOINT [CHECKPOINT ...] [--batches 3]

CHECKPOINT: a model folder or a training checkpoint (e.g. runs/demo-ablation/seed0/dcl/stage1/checkpoints/...).
"""
from __future__ import annotations

import argparse
import json

import torch


def term_gradients(trainer, batch, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """One flat weighted gradient per loss term, over the embedding path's parameters."""
    from onepeace.train.objectives import vision_language_losses

    params = [p for n, p in trainer.pm.named_parameters() if p.requires_grad and not n.startswith("decoder")]
    grads: dict[str, torch.Tensor] = {}
    for term, weight in weights.items():
        if weight == 0:
            continue
        trainer.pm.zero_grad(set_to_none=True)
        losses = vision_language_losses(trainer.pm, batch, trainer.cfg.loss)
        (weight * losses[term]).backward()
        grads[term] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    return grads


def main() -> None:
    from onepeace.train.config import STAGES, TrainConfig
    from onepeace.train.loop import Trainer
    from onepeace.train.objectives import LossConfig, VL_WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    for ckpt in args.checkpoints:
        cfg = TrainConfig(train_manifest=args.manifest, output_dir="/tmp/onepeace-dcl-gradients", init_from=ckpt,
                          stage=STAGES["stage1"], loss=LossConfig(weights=dict(VL_WEIGHTS), same_caption_positives=True),
                          batch_size=args.batch_size, steps=1, num_workers=0, progress=False, decoder_embed_dim=96)
        trainer = Trainer(cfg)
        trainer.pm.train()
        loader, _ = trainer._loader(0, 0)
        rows: dict[str, list[tuple[float, float]]] = {}
        for _, batch in zip(range(args.batches), loader):
            grads = term_gradients(trainer, batch, VL_WEIGHTS)
            itc = grads["itc_loss"]
            total = sum(grads.values())
            grads["total"] = total
            for term, g in grads.items():
                cos = float(torch.nn.functional.cosine_similarity(g, itc, dim=0))
                rows.setdefault(term, []).append((float(g.norm()), cos))
        mean = {t: (sum(r[0] for r in v) / len(v), sum(r[1] for r in v) / len(v)) for t, v in rows.items()}
        # with global-norm clipping at `clip` the step along ITC's gradient is scaled by clip / |total|
        # (when |total| > clip): the denoising terms' share of the norm is taken from the alignment
        clip = trainer.cfg.grad_clip
        total_norm, total_cos = mean["total"]
        itc_step = min(1.0, clip / total_norm) * total_norm * total_cos  # the clipped step projected on ITC's
        itc_alone = min(clip, mean["itc_loss"][0])
        print(json.dumps({"checkpoint": ckpt, "grad_clip": clip, "terms": {
            t: {"grad_norm": n, "cos_with_itc": c} for t, (n, c) in mean.items()},
            "itc_step_along_itc": itc_step, "itc_step_if_alone": itc_alone}))


if __name__ == "__main__":
    main()

"""The pretraining loop: one process or many (torchrun + DDP, or FSDP2), exact resume.

Data order is a function of (seed, epoch, step) only and every item's masks of (seed, epoch, index),
so a run resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen,
whatever the number of DataLoader workers.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..modeling.pretrain import OnePeacePretrainModel, PretrainConfig, default_decoder_config
from .config import TrainConfig
from .distributed import DistributedContext, setup_distributed
from .optim import apply_freezing, build_optimizer, cosine_schedule
from .task import PretrainTask

log = logging.getLogger("onepeace.train")
CHECKPOINT_FORMAT = "onepeace-train-v1"


# ------------------------------------------------------------------------------------------ model
def build_pretrain_model(cfg: TrainConfig) -> OnePeacePretrainModel:
    """A named size (random init) or `init_from` a released/pretraining/converted/training checkpoint."""
    import onepeace
    from ..checkpoint import CheckpointError, load_pretrain_checkpoint

    def new_decoder(model_config):
        return default_decoder_config(model_config, embed_dim=cfg.decoder_embed_dim, layers=cfg.decoder_layers,
                                      heads=cfg.decoder_heads)

    src = cfg.init_from
    if src is None:
        model_config = onepeace.get_config(cfg.model)
        return OnePeacePretrainModel(PretrainConfig(model_config, new_decoder(model_config)))
    if os.path.isdir(src):
        return OnePeacePretrainModel.from_model(onepeace.load(src), new_decoder)
    if is_training_checkpoint(src):
        state = torch.load(src, map_location="cpu", weights_only=True)
        pm = OnePeacePretrainModel(PretrainConfig.from_dict(json.loads(state["pretrain_config"])))
        pm.load_state_dict(state["model"], strict=True)
        return pm
    try:
        pm, _ = load_pretrain_checkpoint(src)
        return pm
    except CheckpointError as e:
        if "no denoising decoder" not in str(e):
            raise
        return OnePeacePretrainModel.from_model(onepeace.load(src), new_decoder)


def is_training_checkpoint(path: str) -> bool:
    try:
        import zipfile

        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist()) and _peek_format(path)
    except (OSError, zipfile.BadZipFile):
        return False


def _peek_format(path: str) -> bool:
    try:
        obj = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception:  # a released file (its pickle names foreign classes) is not ours
        return False
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Linearly increasing drop-path over the encoder layers of `model` (an OnePeaceModel)."""
    layers = model.encoder.layers
    for i, layer in enumerate(layers):
        layer.drop_path.p = rate * i / max(1, len(layers) - 1)


# ------------------------------------------------------------------------------------------ data
class SkipBadItems(torch.utils.data.Dataset):
    """A bad item (logged by the dataset) is replaced by the next good one, so batches keep their size
    (every rank must contribute the same number of rows to the contrastive gather)."""

    def __init__(self, dataset, max_tries: int = 50):
        self.dataset = dataset
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int):
        for k in range(self.max_tries):
            item = self.dataset[(index + k) % len(self.dataset)]
            if item is not None:
                return item
        raise RuntimeError(f"{self.max_tries} consecutive bad items from index {index}: is the manifest readable?")


class StepBatchSampler(torch.utils.data.Sampler):
    """Per-rank micro-batches of one epoch, starting at a given optimizer step.

    Epoch e is a permutation drawn from (seed, e); optimizer step s takes the global batch
    perm[s*G:(s+1)*G]; rank r takes its contiguous share and splits it into `accum` micro-batches.
    """

    def __init__(self, n_items: int, global_batch: int, rank: int, world: int, accum: int, seed: int,
                 epoch: int, start_step: int = 0):
        if global_batch % (world * accum):
            raise ValueError(f"batch_size {global_batch} must be divisible by processes x grad_accum = {world * accum}")
        self.n, self.G, self.rank, self.world, self.accum = n_items, global_batch, rank, world, accum
        self.seed, self.epoch, self.start_step = seed, epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.G

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.G // self.world
        micro = per_rank // self.accum
        for step in range(self.start_step, self.steps_per_epoch):
            batch = perm[step * self.G:(step + 1) * self.G]
            mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            for k in range(self.accum):
                yield mine[k * micro:(k + 1) * micro]


def build_dataset(cfg: TrainConfig, pm: OnePeacePretrainModel, manifest: str, masking=True):
    from ..data.datasets import ManifestDataset
    from ..tokenizer import get_tokenizer

    mc = pm.config.model
    kwargs: dict[str, Any] = {}
    if "image" in mc.adapters:
        from ..data.image import ImageTransform

        ic = mc.adapters["image"]
        kwargs["image_transform"] = ImageTransform(size=ic.image_size, mean=tuple(ic.mean), std=tuple(ic.std))
    if "audio" in mc.adapters:
        from ..data.audio import AudioTransform

        ac = mc.adapters["audio"]
        kwargs["audio_transform"] = AudioTransform(sample_rate=ac.sample_rate, max_seconds=ac.max_seconds,
                                                   min_seconds=ac.min_seconds)
        kwargs["audio_feature_spec"] = ac.feature_encoder_spec
        if cfg.audio_augment is not None:
            import dataclasses

            from ..data.augment import WaveformAugment

            kwargs["audio_augment"] = WaveformAugment(dataclasses.replace(cfg.audio_augment, sample_rate=ac.sample_rate))
    max_length = mc.adapters["text"].max_length if "text" in mc.adapters else 70
    return ManifestDataset(manifest, tokenizer=get_tokenizer(cfg.bpe_dir, max_length=max_length),
                           masking=cfg.masking if masking else None, seed=cfg.seed, max_text_length=max_length,
                           patch_size=16, **kwargs)


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistributedContext | None = None):
        self.cfg = cfg
        self.ctx = ctx or setup_distributed()
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if self.ctx.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "train_config.json")
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        pm = build_pretrain_model(cfg)
        stage = cfg.stage
        if stage.reset_logit_scale:
            with torch.no_grad():
                pm.model.logit_scale.fill_(math.log(stage.logit_scale_init))
        if cfg.drop_path_rate is not None:
            set_drop_path(pm.model, cfg.drop_path_rate)
        self.trainable = apply_freezing(pm, stage.frozen, stage.trainable)
        pm.model.encoder.gradient_checkpointing = cfg.grad_checkpointing
        pm.decoder.encoder.gradient_checkpointing = cfg.grad_checkpointing
        pm.to(self.ctx.device)
        self.pm = pm
        # what DDP / FSDP wrap: the model and the stage objective (their hooks run on its forward)
        self.task = PretrainTask(pm, stage.task, cfg.loss)
        self.module = self.ctx.wrap(self.task, fsdp=cfg.fsdp)
        self.optimizer = build_optimizer(pm if not cfg.fsdp else self.module, cfg.lr, cfg.weight_decay,
                                         cfg.betas, cfg.adam_eps)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr)
        self.dataset = SkipBadItems(build_dataset(cfg, pm, cfg.train_manifest))
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.resumed_from: str | None = None
        latest = self.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)

    # ---------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> str | None:
        paths = sorted(glob.glob(str(self.ckpt_dir / "step_*.pt")))
        return paths[-1] if paths else None

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self.ctx.full_state_dict(self.module, self.pm)

    def save_checkpoint(self) -> str | None:
        rng = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        all_rng = self.ctx.gather_objects(rng)  # every rank's RNG: drop-path draws differ per rank
        model_state = self._model_state()
        optim_state = self.ctx.full_optimizer_state(self.module, self.optimizer)
        if not self.ctx.is_main:
            self.ctx.barrier()
            return None
        state = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "world_size": self.ctx.world, "pretrain_config": json.dumps(self.pm.config.to_dict()),
            "train_config": json.dumps(self.cfg.to_dict()), "model": model_state, "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(), "rng": all_rng,
        }
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint behind
        for old in sorted(glob.glob(str(self.ckpt_dir / "step_*.pt")))[: -self.cfg.keep_last]:
            os.remove(old)
        self.ctx.barrier()
        return str(path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a onepeace training checkpoint")
        self.ctx.load_full_state_dict(self.module, self.pm, state["model"])
        self.ctx.load_full_optimizer_state(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        rngs = state["rng"]
        if len(rngs) == self.ctx.world:
            rng = rngs[self.ctx.rank]
            torch.set_rng_state(rng["torch"])
            _set_numpy_state(rng["numpy"])
            _set_python_state(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            log.warning("checkpoint was written by %d processes, resuming with %d: RNG streams differ",
                        len(rngs), self.ctx.world)
        self.resumed_from = path
        if self.ctx.is_main:
            log.info("resumed from %s (step %d)", path, self.step)

    # ---------------------------------------------------------------- training
    def _loader(self, epoch: int, start_step: int):
        self.dataset.set_epoch(epoch)
        sampler = StepBatchSampler(len(self.dataset), self.cfg.batch_size, self.ctx.rank, self.ctx.world,
                                   self.cfg.grad_accum, self.cfg.seed, epoch, start_step)
        if sampler.steps_per_epoch == 0:
            raise ValueError(f"the manifest has {len(self.dataset)} items, fewer than one batch of {self.cfg.batch_size}")
        # the loader's own generator: creating an iterator must not draw from the global RNG, whose
        # state (drop-path draws) is part of the checkpoint
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.dataset.dataset.collate,
                                             num_workers=self.cfg.num_workers,
                                             generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        return loader, sampler.steps_per_epoch

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for k, batch in enumerate(micro_batches):
            batch = {key: v.to(self.ctx.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            sync = k == len(micro_batches) - 1
            with self.ctx.no_sync(self.module, enabled=not sync), self._autocast():
                losses = self.module(batch)
                (losses["loss"] / len(micro_batches)).backward()
            for name, v in losses.items():
                totals[name] = totals.get(name, 0.0) + float(v.detach()) / len(micro_batches)
        self.ctx.sync_ignored_grads()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = lr
        return {k: self.ctx.mean(v) for k, v in totals.items()}

    def fit(self, stop_at: int | None = None, on_step=None) -> dict[str, float]:
        """Train to cfg.steps (or stop after step `stop_at`, as a preemption would).

        ``on_step(step, metrics)`` is called after every optimizer step (e.g. to print an ETA).
        """
        from tqdm import tqdm

        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.stage.name}", unit="step",
                   disable=not (cfg.progress and self.ctx.is_main))
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            loader, steps_per_epoch = self._loader(self.epoch, self.step_in_epoch)
            it = iter(loader)
            while self.step_in_epoch < steps_per_epoch and self.step < cfg.steps:
                t0 = time.perf_counter()
                micro = [next(it) for _ in range(cfg.grad_accum)]
                last = self.train_step(micro)
                self.step += 1
                self.step_in_epoch += 1
                dt = time.perf_counter() - t0
                last.update(step=self.step, epoch=self.epoch,
                            temperature=float(self.pm.model.temperature.detach()), samples_per_s=cfg.batch_size / dt)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                if on_step is not None:
                    on_step(self.step, last)
                if self.ctx.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                if cfg.eval_every and cfg.eval_manifest and self.step % cfg.eval_every == 0:
                    self.evaluate(metrics_path)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or self.step == stop_at:
                    self.save_checkpoint()
                if stop_at is not None and self.step >= stop_at:
                    bar.close()
                    return last
            if self.step_in_epoch >= steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
        bar.close()
        return last

    def evaluate(self, metrics_path: Path) -> dict[str, float]:
        """Zero-shot evaluation hook (rank 0 computes, everyone waits)."""
        result: dict[str, float] = {}
        if self.ctx.is_main:
            from ..eval.zero_shot import evaluate_manifest

            self.pm.model.eval()
            result = evaluate_manifest(self.pm.model, self.cfg.eval_manifest, bpe_dir=self.cfg.bpe_dir)
            result["step"] = self.step
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"eval": result}) + "\n")
        self.ctx.barrier()
        return result


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(s) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _python_state():
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _set_python_state(s) -> None:
    random.setstate((s["version"], tuple(s["internal"]), s["gauss"]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="onepeace train", description="Pretrain ONE-PEACE (one stage).")
    parser.add_argument("config", help="training config JSON (see onepeace.train.config.TrainConfig)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. steps=100 output_dir=runs/x (values parsed as JSON)")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        raw = json.load(f)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            raw[key] = json.loads(value)
        except json.JSONDecodeError:
            raw[key] = value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = TrainConfig.from_dict(raw)
    trainer = Trainer(cfg)
    last = trainer.fit()
    if trainer.ctx.is_main:
        print(json.dumps({k: v for k, v in last.items()}, default=float))
    trainer.ctx.shutdown()
    return 0

"""`onepeace demo`: pretrain a small ONE-PEACE on offline data and show what it learned.

Stage 1 aligns images with text, stage 2 aligns audio with text (the shared encoder frozen, as in
the paper). Audio is never paired with an image, so audio -> image retrieval measures the
*emergent* alignment through the shared space. `ablation=True` also trains the aligning contrast
alone (no denoising contrast) on the same steps and data, once; the seeded comparison of the two
arms is :mod:`onepeace.demo.ablation` (`onepeace demo --seeds 0,1,2`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EncoderConfig, ModelConfig
from ..modalities.audio import AudioAdapterConfig
from ..modalities.image import ImageAdapterConfig
from ..modalities.text import TextAdapterConfig


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the default demo and of `--quick` (CI)."""

    embed_dim: int = 192
    ffn_embed_dim: int = 512
    layers: int = 4
    heads: int = 4
    audio_channels: int = 32
    image_size: int = 64
    decoder_embed_dim: int = 96
    stage1_steps: int = 300
    stage2_steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    num_workers: int = 1
    ablation: bool = False  # also train the contrast-only arm once (`onepeace demo --ablation`)
    # stage 2: speed/pitch, reverb, band-limit, noise, gain, masking. Off by default: with 150 steps it
    # cost held-out-voice accuracy (0.18 +- 0.03 over 3 seeds, against 0.64 in one run without it)
    # and bought no held-out-engine accuracy we could show (0.13 +- 0.02, chance 0.05)
    audio_augment: bool = False
    dcl_weight_scale: float = 1.0  # the denoising terms' weights x this (1.0: the paper's)
    stage2_lr: float | None = None  # stage 2's peak learning rate (None: lr)
    stage2_warmup_steps: int | None = None  # stage 2's warm-up (None: warmup_steps)
    # stage 1's image masks, both the image-only and the joint view (None: the paper's 0.75 / 0.6875).
    # A 64-px image has 16 patches, and the paper's ratios leave 4 (5) of them to denoise from. Stage 1
    # alone, seeds 0/1/2 (2026-12-01): image zero-shot 0.811 / 0.799 / 0.805 with 0.5, against
    # 0.786 / 0.752 / 0.749 with the paper's ratios and 0.829 / 0.820 / 0.784 without the denoising contrast
    image_mask_ratio: float | None = 0.5

    @classmethod
    def quick(cls) -> "DemoSettings":
        # stage 2: 300 steps. With 40 its audio was at chance; with 300 on the spoken words of every
        # training voice it reached 0.53 top-1 on held-out voices and 0.30 on the held-out engine
        return cls(embed_dim=64, ffn_embed_dim=128, layers=2, heads=4, audio_channels=32, image_size=32,
                   decoder_embed_dim=32, stage1_steps=60, stage2_steps=300, batch_size=40, lr=2e-3, warmup_steps=5,
                   stage2_warmup_steps=20, num_workers=0)


def demo_model_config(s: DemoSettings) -> ModelConfig:
    grid = s.image_size // 16
    # a cheaper front end than the released one (which runs 4 conv layers at >= 1/40 of the sample rate
    # and makes 50 frames/s): a 20-sample stride-10 first layer and 25 frames/s. On 2 CPU cores the
    # waveform front end and the frame count dominate an audio training step.
    c = s.audio_channels
    spec = ((c, 20, 10), (c, 4, 4)) + ((c, 2, 2),) * 4
    return ModelConfig(
        encoder=EncoderConfig(embed_dim=s.embed_dim, ffn_embed_dim=s.ffn_embed_dim, layers=s.layers,
                              attention_heads=s.heads, drop_path_rate=0.0,
                              # LayerScale initialised at 1e-6 (the released 4B setting) starts training
                              # from scratch on a saddle where every CLS output is the same: the
                              # contrastive gradient is then ~0. A small model needs no LayerScale.
                              use_layer_scale=False),
        adapters={
            "text": TextAdapterConfig(max_length=32),
            "image": ImageAdapterConfig(image_size=s.image_size, bucket_size=grid, rel_bucket_size=grid),
            "audio": AudioAdapterConfig(feature_encoder_spec=spec, conv_pos_groups=4, max_seconds=6.0),
        },
        name="one-peace-demo",
    )


#: Wall minutes of the default demo from a fresh clone (data included), measured on a 2-core AMD EPYC
#: (2026-12-01): idle 10.7 (the half-masked stage 1), and shared with 3 other jobs 34.6 (load 6-10, the
#: threads following the load; the paper's masks, whose stage-1 step is 4% cheaper); the quick run with
#: the load at 9. What `onepeace demo` tells a user before it starts (README "The demo").
MEASURED_MINUTES = {"2 threads": 11.0, "1 thread": 35.0, "quick": 7.0}


def expected_minutes(quick: bool = False, ablation: bool = False) -> str:
    """One line for the user: how long the run takes here and on a slower machine."""
    if quick:
        return (f"[onepeace demo] the quick run takes up to {MEASURED_MINUTES['quick']:.0f} minutes on 2 CPU cores "
                "(measured with other jobs on them).")
    arms = 2 if ablation else 1
    fast, slow = MEASURED_MINUTES["2 threads"] * arms, MEASURED_MINUTES["1 thread"] * arms
    return (f"[onepeace demo] expect about {fast:.0f} minutes on 2 free CPU cores (data included) and up to "
            f"{slow:.0f} on 2 cores shared with 3 other jobs (measured at load 6-10; the compute threads follow "
            "the load); an ETA follows the first training steps. `onepeace demo --quick` is a short version.")


def demo_loss_weights(task: str, dcl: bool, settings: DemoSettings) -> dict[str, float]:
    """The paper's loss weights of the stage's task; the denoising terms scaled by
    ``settings.dcl_weight_scale`` (0 for the contrast-only arm)."""
    from ..train.objectives import AL_WEIGHTS, VL_WEIGHTS

    base = VL_WEIGHTS if task == "vl" else AL_WEIGHTS
    scale = settings.dcl_weight_scale if dcl else 0.0
    return {k: (v * scale if k.startswith("dcl_") else v) for k, v in base.items()}


def _train_stage(out: Path, manifest: Path, settings: DemoSettings, model_dir: Path | None, init_from: str | None,
                 stage: str, dcl: bool, bpe_dir: str | None, seed: int, on_step=None) -> Path:
    from ..checkpoint import save_converted
    from ..data.augment import AudioAugmentConfig
    from ..data.masking import MaskingConfig
    from ..train.config import STAGES, TrainConfig
    from ..train.loop import Trainer
    from ..train.objectives import LossConfig

    task = STAGES[stage].task
    masking = MaskingConfig() if settings.image_mask_ratio is None else MaskingConfig(
        image_mask_ratio=settings.image_mask_ratio, vl_image_mask_ratio=settings.image_mask_ratio)
    steps = settings.stage1_steps if stage == "stage1" else settings.stage2_steps
    cfg = TrainConfig(
        train_manifest=str(manifest), output_dir=str(out), model="one-peace-tiny", init_from=init_from,
        decoder_embed_dim=settings.decoder_embed_dim, stage=STAGES[stage],
        loss=LossConfig(weights=demo_loss_weights(task, dcl, settings), same_caption_positives=True),
        audio_augment=AudioAugmentConfig() if settings.audio_augment and task == "al" else None, masking=masking,
        batch_size=settings.batch_size, steps=steps,
        warmup_steps=settings.stage2_warmup_steps if stage == "stage2" and settings.stage2_warmup_steps is not None
        else settings.warmup_steps,
        lr=settings.stage2_lr if stage == "stage2" and settings.stage2_lr is not None else settings.lr,
        weight_decay=0.05, save_every=steps, keep_last=1, log_every=5, num_workers=settings.num_workers,
        seed=seed, bpe_dir=bpe_dir,
    )
    if init_from is None:  # the demo size is not a named one: start from a converted random model
        import onepeace

        torch.manual_seed(seed)
        model = onepeace.create_model(demo_model_config(settings))
        save_converted(model, out / "init")
        cfg = dataclasses.replace(cfg, init_from=str(out / "init"))
    trainer = Trainer(cfg)
    trainer.fit(on_step=on_step)
    if model_dir is not None:
        save_converted(trainer.pm.model, model_dir)
    ckpt = trainer.latest_checkpoint()
    assert ckpt is not None
    return Path(ckpt)


def train_arm(prefix: Path, data: Path, settings: DemoSettings, dcl: bool, bpe_dir: str, seed: int,
              eta: "Eta | None" = None, threads: "LoadFollowingThreads | None" = None) -> Path:
    """Both stages (image-text, then audio-text) into ``prefix``; returns the model folder.
    ``threads`` (if given) sets the compute threads from the machine's load as the steps go."""
    model_dir = prefix / "model"

    def hooks(stage: str):
        calls = [h for h in (eta.hook(stage) if eta else None, threads) if h is not None]

        def on_step(step: int, metrics: dict) -> None:
            for call in calls:
                call(step, metrics)
        return on_step if calls else None

    s1 = _train_stage(prefix / "stage1", data / "train_vl.jsonl", settings, None, None, "stage1", dcl, bpe_dir, seed,
                      on_step=hooks("stage1"))
    _train_stage(prefix / "stage2", data / "train_al.jsonl", settings, model_dir, str(s1), "stage2", dcl, bpe_dir,
                 seed, on_step=hooks("stage2"))
    return model_dir


def compute_threads(threads: int | None) -> "LoadFollowingThreads | None":
    """``threads`` fixes the compute threads; None follows the machine's load (`onepeace.train.threads`)
    unless OMP_NUM_THREADS says how many (then that stays)."""
    from ..train.threads import LoadFollowingThreads

    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    follow = LoadFollowingThreads()
    follow.update()
    return follow


def evaluate_arm(model, data: Path, concepts: dict, keep_embeddings: bool = False) -> tuple[dict, dict]:
    """(the flat summary, eval's full result on held-out images + held-out voices' spoken captions);
    the summary adds the audio numbers of the held-out engine's captions and of the spoken words
    (held-out voices and engine)."""
    from ..eval.zero_shot import evaluate

    result = evaluate(model, [data / "test_vl.jsonl", data / "test_al.jsonl"], concepts=concepts,
                      keep_embeddings=keep_embeddings, progress=keep_embeddings)
    summary = _summarise(result)
    for split, suffix in (("test_al_engine", "heldout_engine"), ("test_al_words", "word_heldout_voices"),
                          ("test_al_engine_words", "word_heldout_engine")):
        if not (data / f"{split}.jsonl").exists():  # a data folder built before that split existed
            continue
        other = evaluate(model, [data / "test_vl.jsonl", data / f"{split}.jsonl"], concepts=concepts)
        summary[f"audio_zero_shot_top1_{suffix}"] = other["zero_shot"].get("audio", float("nan"))
        summary[f"audio_to_image_r1_{suffix}"] = other["retrieval"].get("audio->image", {}).get("r1", float("nan"))
    return summary, result


def _summarise(result: dict[str, Any]) -> dict[str, float]:
    zs, rt = result["zero_shot"], result["retrieval"]
    return {
        "image_zero_shot_top1": zs.get("image", float("nan")),
        "audio_zero_shot_top1_heldout_voices": zs.get("audio", float("nan")),
        "audio_to_image_r1": rt.get("audio->image", {}).get("r1", float("nan")),
        "image_to_audio_r1": rt.get("image->audio", {}).get("r1", float("nan")),
        "image_to_text_r1": rt.get("image->text", {}).get("r1", float("nan")),
        "text_to_image_r1": rt.get("text->image", {}).get("r1", float("nan")),
        "audio_to_text_r1": rt.get("audio->text", {}).get("r1", float("nan")),
        "text_to_audio_r1": rt.get("text->audio", {}).get("r1", float("nan")),
        "audio_to_image_map": rt.get("audio->image", {}).get("map", float("nan")),
    }


class Eta:
    """Prints the expected time left for the whole run after the first steps of each stage.

    Stage 2's step cost is predicted from stage 1's with ``stage2_cost`` (a stage-2 step over a
    stage-1 step, measured on the machines we run) until stage 2's own steps are timed.
    """

    def __init__(self, settings: DemoSettings, arms: int, after: int = 10, stage2_cost: float = 2.2,
                 evaluation_s: float = 40.0):
        self.settings, self.arms, self.after = settings, arms, after
        self.stage2_cost, self.evaluation_s = stage2_cost, evaluation_s
        self.per_step: dict[str, float] = {}
        self.arm = 0
        self._t0: dict[str, float] = {}

    def hook(self, stage: str):
        def on_step(step: int, _metrics: dict) -> None:
            if step == 1:
                self._t0[stage] = time.perf_counter()  # step 1 includes start-up: time from its end
            elif step == 1 + self.after and stage not in self.per_step:
                self.per_step[stage] = (time.perf_counter() - self._t0[stage]) / self.after
                self.report(stage)
            if stage == "stage2" and step == self.settings.stage2_steps:
                self.arm += 1
        return on_step

    def seconds_left(self, stage: str, step: int) -> float:
        s = self.settings
        s1 = self.per_step.get("stage1", 1.0)
        s2 = self.per_step.get("stage2", s1 * self.stage2_cost)
        this_arm = (s.stage1_steps - step) * s1 + s.stage2_steps * s2 if stage == "stage1" \
            else (s.stage2_steps - step) * s2
        later_arms = self.arms - self.arm - 1
        return this_arm + later_arms * (s.stage1_steps * s1 + s.stage2_steps * s2) + self.evaluation_s * (later_arms + 1)

    def report(self, stage: str) -> None:
        left = self.seconds_left(stage, 1 + self.after)
        finish = time.strftime("%H:%M", time.localtime(time.time() + left))
        print(f"\n[onepeace demo] {stage}: {self.per_step[stage]:.2f} s/step; about {left / 60:.0f} min left "
              f"(done around {finish})", flush=True)


def public_api_zero_shot(model, manifest: Path, concepts: dict) -> float:
    """Image zero-shot top-1 on the held-out images through the public API (``model.zero_shot`` with
    the concepts' caption ensembles) - the report shows it beside eval's number, which it must equal."""
    from ..data.datasets import read_manifest

    entries = read_manifest(manifest)
    labels = list(concepts["concepts"])
    probs, _ = model.zero_shot([e["image"] for e in entries], labels, templates=concepts["templates"], modality="image")
    truth = torch.tensor([labels.index(str(e["label"])) for e in entries])
    return (probs.argmax(dim=1) == truth).float().mean().item()


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, seed: int = 0, ablation: bool | None = None,
             bpe_dir: str | None = None, data_root: str | Path | None = None,
             settings: DemoSettings | None = None, threads: int | None = None) -> dict[str, Any]:
    """Build/cache the data, train both stages (and, with ``ablation``, the contrast-only arm), evaluate,
    write the report. The data split is fixed (seed 0); ``seed`` seeds the training. ``threads``: the
    compute threads (None: follow the machine's load, see `compute_threads`)."""
    import onepeace

    from .data import build_demo_data
    from .report import write_report

    started = time.time()
    bpe_dir, settings, out = _prepare(out_dir, quick, ablation, bpe_dir, settings)
    t = time.time()
    data = Path(build_demo_data(data_root, quick=quick, seed=0))
    timings = {"data_s": time.time() - t}
    concepts = json.loads((data / "concepts.json").read_text())

    eta = Eta(settings, arms=2 if settings.ablation else 1)
    follow = compute_threads(threads)
    t = time.time()
    train_arm(out, data, settings, dcl=True, bpe_dir=bpe_dir, seed=seed, eta=eta, threads=follow)
    timings["train_s"] = time.time() - t
    if follow is not None:
        follow.update()
    t = time.time()
    model = onepeace.load(out / "model")
    model.tokenizer = onepeace.get_tokenizer(bpe_dir)
    metrics, result = evaluate_arm(model, data, concepts, keep_embeddings=True)
    timings["eval_s"] = time.time() - t
    metrics["image_zero_shot_top1_public_api"] = public_api_zero_shot(model, data / "test_vl.jsonl", concepts)
    ablation_result = None
    if settings.ablation:
        t = time.time()
        ablated = onepeace.load(train_arm(out / "ablation", data, settings, False, bpe_dir, seed, eta, follow))
        ablated.tokenizer = model.tokenizer
        metrics["ablation_no_dcl"], ablation_result = evaluate_arm(ablated, data, concepts)
        timings["ablation_s"] = time.time() - t
        metrics["ablation_no_dcl"]["minutes"] = timings["ablation_s"] / 60
    metrics.update(minutes=(time.time() - started) / 60, timings_s=timings, settings=dataclasses.asdict(settings),
                   quick=quick, seed=seed, retrieval=result["retrieval"], counts=result["counts"],
                   threads=torch.get_num_threads(),
                   thread_changes=[list(c) for c in follow.changes] if follow is not None else [])
    write_report(out, metrics, result, ablation_result, concepts, data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _prepare(out_dir, quick: bool, ablation: bool | None, bpe_dir: str | None, settings: DemoSettings | None
             ) -> tuple[str, DemoSettings, Path]:
    """Check the requirements, resolve the tokenizer and settings, clear the old outputs."""
    from ..tokenizer import resolve_bpe_dir
    from .data import check_requirements

    problems = check_requirements()
    if problems:
        raise RuntimeError("the demo needs:\n  " + "\n  ".join(problems))
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    if ablation is not None:
        settings = dataclasses.replace(settings, ablation=ablation)
    out = Path(out_dir)
    if out.exists():
        for sub in ("stage1", "stage2", "ablation", "model", "figures"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return str(resolve_bpe_dir(bpe_dir)), settings, out

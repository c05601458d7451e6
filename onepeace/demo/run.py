"""`onepeace demo`: pretrain a small ONE-PEACE on offline data and show what it learned.

Stage 1 aligns images with text, stage 2 aligns audio with text (the shared encoder frozen, as in
the paper). Audio is never paired with an image, so audio -> image retrieval measures the
*emergent* alignment through the shared space. An ablation with the aligning contrast only (no
denoising contrast) runs on the same steps and data.
"""
from __future__ import annotations

import dataclasses
import json
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
    ablation: bool = True

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(embed_dim=64, ffn_embed_dim=128, layers=2, heads=4, audio_channels=32, image_size=32,
                   decoder_embed_dim=32, stage1_steps=60, stage2_steps=40, batch_size=40, lr=2e-3, warmup_steps=5,
                   num_workers=0)


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


def _train_stage(name: str, out: Path, manifest: Path, settings: DemoSettings, model_dir: Path | None,
                 init_from: str | None, steps: int, stage: str, dcl: bool, bpe_dir: str | None, seed: int) -> Path:
    from ..checkpoint import save_converted
    from ..train.config import STAGES, TrainConfig
    from ..train.loop import Trainer
    from ..train.objectives import AL_WEIGHTS, VL_WEIGHTS, LossConfig

    task = STAGES[stage].task
    base = VL_WEIGHTS if task == "vl" else AL_WEIGHTS
    weights = dict(base) if dcl else {k: (v if not k.startswith("dcl_") else 0.0) for k, v in base.items()}
    cfg = TrainConfig(
        train_manifest=str(manifest), output_dir=str(out), model="one-peace-tiny", init_from=init_from,
        decoder_embed_dim=settings.decoder_embed_dim, stage=STAGES[stage],
        loss=LossConfig(weights=weights, same_caption_positives=True),
        batch_size=settings.batch_size, steps=steps, lr=settings.lr, warmup_steps=settings.warmup_steps,
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
    trainer.fit()
    if model_dir is not None:
        save_converted(trainer.pm.model, model_dir)
    ckpt = trainer.latest_checkpoint()
    assert ckpt is not None
    return Path(ckpt)


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
             settings: DemoSettings | None = None) -> dict[str, Any]:
    """Build/cache the data, train both stages (and the ablation), evaluate, write the report."""
    import onepeace

    from ..eval.zero_shot import evaluate
    from ..tokenizer import resolve_bpe_dir
    from .data import build_demo_data, check_requirements
    from .report import write_report

    started = time.time()
    problems = check_requirements()
    if problems:
        raise RuntimeError("the demo needs:\n  " + "\n  ".join(problems))
    bpe_dir = str(resolve_bpe_dir(bpe_dir))
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    if ablation is not None:
        settings = dataclasses.replace(settings, ablation=ablation)
    out = Path(out_dir)
    if out.exists():
        for sub in ("stage1", "stage2", "ablation", "model", "figures"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    t = time.time()
    data = Path(build_demo_data(data_root, quick=quick, seed=seed))
    timings = {"data_s": time.time() - t}
    concepts = json.loads((data / "concepts.json").read_text())
    tests = [data / "test_vl.jsonl", data / "test_al.jsonl"]

    def train_both(prefix: Path, dcl: bool, model_dir: Path | None) -> None:
        s1 = _train_stage("stage1", prefix / "stage1", data / "train_vl.jsonl", settings, None, None,
                          settings.stage1_steps, "stage1", dcl, bpe_dir, seed)
        _train_stage("stage2", prefix / "stage2", data / "train_al.jsonl", settings, model_dir, str(s1),
                     settings.stage2_steps, "stage2", dcl, bpe_dir, seed)

    t = time.time()
    train_both(out, dcl=True, model_dir=out / "model")
    timings["train_s"] = time.time() - t
    t = time.time()
    model = onepeace.load(out / "model")
    model.tokenizer = onepeace.get_tokenizer(bpe_dir)
    result = evaluate(model, tests, concepts=concepts, keep_embeddings=True, progress=True)
    timings["eval_s"] = time.time() - t
    metrics: dict[str, Any] = _summarise(result)
    metrics["image_zero_shot_top1_public_api"] = public_api_zero_shot(model, data / "test_vl.jsonl", concepts)
    ablation_result = None
    if settings.ablation:
        t = time.time()
        train_both(out / "ablation", dcl=False, model_dir=out / "ablation" / "model")
        ablated = onepeace.load(out / "ablation" / "model")
        ablated.tokenizer = model.tokenizer
        ablation_result = evaluate(ablated, tests, concepts=concepts)
        metrics["ablation_no_dcl"] = _summarise(ablation_result)
        timings["ablation_s"] = time.time() - t
    metrics["minutes"] = (time.time() - started) / 60
    if "ablation_no_dcl" in metrics:
        metrics["ablation_no_dcl"]["minutes"] = timings["ablation_s"] / 60
    metrics["timings_s"] = timings
    metrics["settings"] = dataclasses.asdict(settings)
    metrics["quick"] = quick
    metrics["retrieval"] = result["retrieval"]
    metrics["counts"] = result["counts"]
    write_report(out, metrics, result, ablation_result, concepts, data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

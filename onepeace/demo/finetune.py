"""`onepeace demo-finetune`: fine-tuned vs zero-shot vs linear-probe accuracy on the demo data.

Image classification of the 20 demo concepts, trained on the training split, measured on the
held-out test split (distinct images). Every mode starts from the same trained demo model:

* zero-shot: the model as it is, against the prompt ensembles of the concepts' caption templates;
* linear probe: a linear layer on the frozen model's image embeddings;
* classify: the reference's classify head (attention pooling over the image tokens, pooler, MLP)
  fine-tuned with the whole model, layer-wise learning-rate decay; the same with the CLS row;
* retrieval: contrastive image-text fine-tuning of the whole model, then zero-shot again.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FinetuneDemoSettings:
    classify_steps: int = 300
    retrieval_steps: int = 100
    batch_size: int = 64
    lr: float = 3e-4
    layer_decay: float = 0.75
    probe_steps: int = 300
    seed: int = 0

    @classmethod
    def quick(cls) -> "FinetuneDemoSettings":
        return cls(classify_steps=4, retrieval_steps=4, batch_size=16, probe_steps=20)


def run_finetune_demo(model_dir: str | Path, out_dir: str | Path = "runs/demo-finetune",
                      data_root: str | Path | None = None, quick: bool = False,
                      settings: FinetuneDemoSettings | None = None, bpe_dir: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    from ..finetune import FinetuneConfig, finetune
    from .data import demo_output_and_data

    started = time.time()
    settings = settings or (FinetuneDemoSettings.quick() if quick else FinetuneDemoSettings())
    out, data = demo_output_and_data(out_dir, data_root, quick)
    base = FinetuneConfig(model=str(model_dir), train_manifest=str(data / "train_vl.jsonl"),
                          test_manifest=str(data / "test_vl.jsonl"), concepts=str(data / "concepts.json"),
                          modality="image", batch_size=settings.batch_size, lr=settings.lr,
                          layer_decay=settings.layer_decay, probe_steps=settings.probe_steps, seed=settings.seed,
                          bpe_dir=bpe_dir, progress=progress, warmup_steps=max(1, settings.classify_steps // 10))
    runs = {
        "linear-probe": dataclasses.replace(base, mode="linear-probe", output_dir=str(out / "linear-probe")),
        "classify": dataclasses.replace(base, mode="classify", steps=settings.classify_steps,
                                        output_dir=str(out / "classify")),
        "classify-cls": dataclasses.replace(base, mode="classify", pooling="cls", steps=settings.classify_steps,
                                            output_dir=str(out / "classify-cls")),
        "retrieval": dataclasses.replace(base, mode="retrieval", steps=settings.retrieval_steps,
                                         output_dir=str(out / "retrieval")),
    }
    results: dict[str, Any] = {}
    for name, cfg in runs.items():
        results[name] = {k: v for k, v in finetune(cfg).items() if k != "losses"}
    zero_shot = results["linear-probe"]["zero_shot_accuracy_before"]
    table = [("zero-shot (prompt ensembles, no training)", zero_shot, 0.0),
             ("linear probe (frozen model, linear layer on embeddings)", results["linear-probe"]["accuracy"],
              results["linear-probe"]["minutes"]),
             (f"fine-tuned classify head (attention pooling + MLP, LLRD {settings.layer_decay}, "
              f"{settings.classify_steps} steps)", results["classify"]["accuracy"], results["classify"]["minutes"]),
             (f"fine-tuned classify head (CLS + MLP, LLRD {settings.layer_decay}, {settings.classify_steps} steps)",
              results["classify-cls"]["accuracy"], results["classify-cls"]["minutes"]),
             (f"contrastive retrieval fine-tuning, then zero-shot ({settings.retrieval_steps} steps)",
              results["retrieval"]["accuracy"], results["retrieval"]["minutes"])]
    metrics = {"table": table, "runs": results, "settings": dataclasses.asdict(settings),
               "test_items": results["classify"]["test_items"], "minutes": (time.time() - started) / 60}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = ["# Fine-tuning on the demo data", "",
             f"Image classification, 20 concepts, {metrics['test_items']} held-out test images "
             f"(chance 0.05). Model: {model_dir}.", "", "| method | test accuracy | minutes |", "|---|---:|---:|"]
    lines += [f"| {name} | {acc:.3f} | {minutes:.1f} |" for name, acc, minutes in table]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return metrics

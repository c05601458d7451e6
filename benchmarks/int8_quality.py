"""int8 (and bfloat16, as a yardstick) vs float32 on the demo's held-out data: embedding cosines and
every demo metric, over one or more trained models.

    python benchmarks/int8_quality.py runs/demo/model ~/.cache/onepeace/demo-data/full
    python benchmarks/int8_quality.py runs/demo-ablation/seed*/*/model ~/.cache/onepeace/demo-data/full --json q.json

MODEL...: trained demo models (the folders `onepeace demo` writes: runs/demo/model, or every
runs/demo-ablation/seedS/ARM/model of `onepeace demo --seeds`); DATA (last): the demo's data folder
(`onepeace.demo.data.build_demo_data`). Each model is loaded as `onepeace.load` gives it (float32),
with ``quantize="int8"``, in int8 calibrated on 64 texts, 64 images and 64 clips of the demo's
*training* manifests (``calibration=``: `onepeace.modeling.smoothing`), and in bfloat16 (``dtype=torch.bfloat16``; left out where this CPU cannot
run it); and the int8 model once more with one activation scale per call (``int8-per-call``: fbgemm's
own, what torch's ``quantize_dynamic`` gives) instead of one per row. Printed per model:
- per modality (held-out images, held-out audio of both the held-out voices and the held-out
  engine, the caption templates): mean and minimum cosine between each item's int8 and float32
  embedding (target: mean >= 0.99);
- every demo metric (zero-shot top-1, R@1 of every modality pair, on held-out voices and engine) in
  float32, int8 and bfloat16, and the differences (target: every |difference| <= 0.01).
Then, over all models: how many metric differences fall outside 0.01, their mean and mean absolute
value, for int8 and for bfloat16. Why the yardstick: R@1 over 180 text queries moves in steps of
1/180 = 0.0056, so 0.01 is two queries whose top item changes; any rounding of the embeddings
(bfloat16 keeps 8 bits of mantissa) changes a few near-ties, and the count says whether int8 does
more of that than the half precision everybody accepts.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import onepeace
from onepeace.demo.run import evaluate_arm
from onepeace.eval.zero_shot import evaluate
from onepeace.modeling.quantized import Int8Linear

COSINE_TARGET, METRIC_TARGET = 0.99, 0.01
# the metrics are float32 fractions (2 of 200 clips: 0.0100000054): compare at float32 resolution
FLOAT32_SLACK = 1e-6


def training_calibration(data: Path) -> dict[str, list[str]]:
    """Calibration inputs from the demo's *training* manifests (none of them is evaluated): texts and
    images of train_vl, clips of train_al; `calibration_inputs` keeps 64 per modality, evenly spaced."""
    vl = [json.loads(line) for line in (data / "train_vl.jsonl").read_text().splitlines() if line.strip()]
    al = [json.loads(line) for line in (data / "train_al.jsonl").read_text().splitlines() if line.strip()]
    return {"text": [r["text"] for r in vl], "image": [str(data / r["image"]) for r in vl],
            "audio": [str(data / r["audio"]) for r in al][::2]}


def load_variants(model_dir: str, data: Path, bpe_dir: str | None) -> dict[str, onepeace.OnePeaceModel]:
    """float32, int8, int8 calibrated on training inputs, and (where this CPU runs it) bfloat16."""
    tokenizer = onepeace.get_tokenizer(bpe_dir)
    models = {"float32": onepeace.load(model_dir), "int8": onepeace.load(model_dir, quantize="int8"),
              "int8-cal": onepeace.load(model_dir, quantize="int8", calibration=training_calibration(data))}
    try:
        models["bfloat16"] = onepeace.load(model_dir, dtype=torch.bfloat16)
        models["bfloat16"].encode_text(["a dog"])  # a CPU without bf16 kernels fails here, not mid-table
    except RuntimeError as exc:
        models.pop("bfloat16", None)
        print(f"bfloat16 left out on this CPU: {exc}")
    for model in models.values():
        model.tokenizer = tokenizer
    return models


def embeddings(model, data: Path, concepts: dict) -> dict[str, torch.Tensor]:
    """modality -> (N, D) embeddings of every held-out item (both audio test sets) and caption template."""
    manifests = [data / name for name in ("test_vl.jsonl", "test_al.jsonl", "test_al_engine.jsonl")]
    result = evaluate(model, manifests, concepts=concepts, keep_embeddings=True)
    return {kind: s.embeddings for kind, s in result["sets"].items()}


def cosine_table(fp32: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for kind in fp32:
        cos = torch.nn.functional.cosine_similarity(fp32[kind].float(), other[kind].float(), dim=-1)
        out[kind] = {"n": len(cos), "mean": cos.mean().item(), "min": cos.min().item()}
    return out


def outside(diff: float) -> bool:
    return abs(diff) > METRIC_TARGET + FLOAT32_SLACK


def one_model(model_dir: str, data: Path, concepts: dict, bpe_dir: str | None) -> dict:
    """Cosines against float32 and every metric, per variant, for one model (and prints them)."""
    models = load_variants(model_dir, data, bpe_dir)
    emb, metrics, seconds = {}, {}, {}
    for name, model in [*models.items(), ("int8-per-call", models["int8"])]:
        Int8Linear.row_scaling = name != "int8-per-call"  # the same int8 model with one scale per call
        t = time.perf_counter()
        emb[name] = embeddings(model, data, concepts)
        metrics[name], _ = evaluate_arm(model, data, concepts)
        seconds[name] = time.perf_counter() - t
    Int8Linear.row_scaling = True
    models["int8-per-call"] = models["int8"]
    cos = {name: cosine_table(emb["float32"], emb[name]) for name in models if name != "float32"}
    print(f"\nmodel {model_dir}; eval time " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    print(f"{'modality':<10} {'items':>6} " + " ".join(f"{'mean cos ' + n:>15} {'min':>8}" for n in cos)
          + f"  (target: mean >= {COSINE_TARGET})")
    for kind in cos["int8"]:
        print(f"{kind:<10} {cos['int8'][kind]['n']:>6} "
              + " ".join(f"{c[kind]['mean']:>15.5f} {c[kind]['min']:>8.5f}" for c in cos.values())
              + "  " + " ".join(f"{n} {'ok' if cos[n][kind]['mean'] >= COSINE_TARGET else 'MISSED'}"
                               for n in ("int8", "int8-cal")))
    others = [n for n in models if n != "float32"]
    print(f"{'metric':<42} {'float32':>8} " + " ".join(f"{n:>8} {'diff':>7}" for n in others)
          + f"  (target: |diff| <= {METRIC_TARGET})")
    for key, a in metrics["float32"].items():
        cells = " ".join(f"{metrics[n][key]:>8.4f} {metrics[n][key] - a:>+7.4f}" for n in others)
        flag = " ".join(f"{n} {'MISSED' if outside(metrics[n][key] - a) else 'ok'}" for n in ("int8", "int8-cal"))
        print(f"{key:<42} {a:>8.4f} {cells}  {flag}")
    return {"model": model_dir, "cosine": cos, "metrics": metrics, "seconds": seconds}


def across_models(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per variant, over every model and metric: differences outside the band, mean, mean |diff|."""
    summary = {}
    for name in ("int8", "int8-cal", "int8-per-call", "bfloat16"):
        diffs = [r["metrics"][name][k] - a for r in results if name in r["metrics"]
                 for k, a in r["metrics"]["float32"].items() if not math.isnan(r["metrics"][name][k] - a)]
        if diffs:
            summary[name] = {"metrics": len(diffs), "outside": sum(map(outside, diffs)),
                             "mean": sum(diffs) / len(diffs), "mean_abs": sum(map(abs, diffs)) / len(diffs),
                             "worst": max(diffs, key=abs)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="trained demo model folders (runs/demo/model)")
    parser.add_argument("data", type=Path, help="demo data folder (~/.cache/onepeace/demo-data/full)")
    parser.add_argument("--bpe-dir", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    concepts = json.loads((args.data / "concepts.json").read_text())
    print(f"data {args.data}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = [one_model(m, args.data, concepts, args.bpe_dir) for m in args.models]
    summary = across_models(results)
    print(f"\nover {len(results)} model(s): metric differences against float32")
    print(f"{'variant':<10} {'metrics':>8} {'outside 0.01':>13} {'mean diff':>10} {'mean |diff|':>12} {'worst':>8}")
    for name, s in summary.items():
        print(f"{name:<10} {s['metrics']:>8} {s['outside']:>13} {s['mean']:>+10.4f} {s['mean_abs']:>12.4f} "
              f"{s['worst']:>+8.4f}")
    for name in ("int8", "int8-cal"):
        cos_ok = all(c["mean"] >= COSINE_TARGET for r in results for c in r["cosine"][name].values())
        print(f"{name}: mean cosine >= {COSINE_TARGET} on every modality: {'yes' if cos_ok else 'NO'}; every metric "
              f"within {METRIC_TARGET}: {'yes' if summary[name]['outside'] == 0 else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"models": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()

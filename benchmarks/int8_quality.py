"""int8 vs float32 on the demo's held-out data: embedding cosines and every demo metric.

    python benchmarks/int8_quality.py runs/demo/model ~/.cache/onepeace/demo-data/full
    python benchmarks/int8_quality.py MODEL DATA --json out.json

MODEL: a trained demo model (the folder `onepeace demo` writes: runs/demo/model); DATA: the demo's
data folder (`onepeace.demo.data.build_demo_data`: test_vl.jsonl, test_al.jsonl, test_al_engine.jsonl,
concepts.json). The same model is loaded twice, as `onepeace.load` gives it (float32, packed on CPU)
and with ``quantize="int8"``. Printed:
- per modality (held-out images, held-out audio of both the held-out voices and the held-out
  engine, the caption templates): mean and minimum cosine between each item's int8 and float32
  embedding (targets: mean >= 0.99);
- every demo metric (zero-shot top-1, R@1 of every modality pair, on held-out voices and engine) in
  both, and their difference (target: every |difference| <= 0.01).
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

COSINE_TARGET, METRIC_TARGET = 0.99, 0.01
# the metrics are float32 fractions (2 of 200 clips: 0.0100000054): compare at float32 resolution
FLOAT32_SLACK = 1e-6


def load_both(model_dir: str, bpe_dir: str | None) -> dict[str, onepeace.OnePeaceModel]:
    tokenizer = onepeace.get_tokenizer(bpe_dir)
    models = {"float32": onepeace.load(model_dir), "int8": onepeace.load(model_dir, quantize="int8")}
    for model in models.values():
        model.tokenizer = tokenizer
    return models


def embeddings(model, data: Path, concepts: dict) -> dict[str, torch.Tensor]:
    """modality -> (N, D) embeddings of every held-out item (both audio test sets) and caption template."""
    manifests = [data / name for name in ("test_vl.jsonl", "test_al.jsonl", "test_al_engine.jsonl")]
    result = evaluate(model, manifests, concepts=concepts, keep_embeddings=True)
    return {kind: s.embeddings for kind, s in result["sets"].items()}


def cosine_table(fp32: dict[str, torch.Tensor], int8: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for kind in fp32:
        cos = torch.nn.functional.cosine_similarity(fp32[kind].float(), int8[kind].float(), dim=-1)
        out[kind] = {"n": len(cos), "mean": cos.mean().item(), "min": cos.min().item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained demo model folder (runs/demo/model)")
    parser.add_argument("data", type=Path, help="demo data folder (~/.cache/onepeace/demo-data/full)")
    parser.add_argument("--bpe-dir", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    concepts = json.loads((args.data / "concepts.json").read_text())
    models = load_both(args.model, args.bpe_dir)
    emb, metrics, seconds = {}, {}, {}
    for name, model in models.items():
        t = time.perf_counter()
        emb[name] = embeddings(model, args.data, concepts)
        metrics[name], _ = evaluate_arm(model, args.data, concepts)
        seconds[name] = time.perf_counter() - t
    cos = cosine_table(emb["float32"], emb["int8"])
    print(f"model {args.model}; data {args.data}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"eval time float32 {seconds['float32']:.1f} s, int8 {seconds['int8']:.1f} s")
    print(f"{'modality':<10} {'items':>6} {'mean cos':>9} {'min cos':>9}  (target: mean >= {COSINE_TARGET})")
    for kind, c in cos.items():
        print(f"{kind:<10} {c['n']:>6} {c['mean']:>9.5f} {c['min']:>9.5f}  {'ok' if c['mean'] >= COSINE_TARGET else 'MISSED'}")
    print(f"\n{'metric':<40} {'float32':>8} {'int8':>8} {'diff':>8}  (target: |diff| <= {METRIC_TARGET})")
    worst = 0.0
    for key, a in metrics["float32"].items():
        b = metrics["int8"][key]
        d = b - a
        if not math.isnan(d):
            worst = max(worst, abs(d))
        print(f"{key:<40} {a:>8.4f} {b:>8.4f} {d:>+8.4f}  {'ok' if abs(d) <= METRIC_TARGET + FLOAT32_SLACK else 'MISSED'}")
    ok = all(c["mean"] >= COSINE_TARGET for c in cos.values()) and worst <= METRIC_TARGET + FLOAT32_SLACK
    print(f"\nworst metric difference {worst:.4f}; all targets {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"cosine": cos, "metrics": metrics, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()

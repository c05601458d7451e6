"""ONNX Runtime vs the packed PyTorch path, one model, one run: the same seeded base-size weights
exported (onepeace.onnx.export_onnx: float32 graphs, and ONNX Runtime's dynamic int8) and run on
the issue's cases, modes interleaved run by run (a shared machine's load hits every mode alike),
with the parity of each mode against the packed PyTorch embeddings on the same inputs.

    python benchmarks/onnx_speed.py                          # base size, 2 CPU threads (the machine's)
    python benchmarks/onnx_speed.py --threads 1 --clock process --runs 5
    python benchmarks/throughput.py --onnx                   # the same modes beside packed / dense / reference

Memory: one PyTorch model (exported dense, then packed) + the ONNX Runtime sessions.
Rows in benchmarks/throughput.py's format; the speed-up column is against the packed PyTorch path.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import throughput  # benchmarks/ is on sys.path when this file runs
from onepeace.onnx import export_onnx, load_onnx

CASES = ("text batch 1 (12)", "text 32 mixed 5-70", "image 8 x 256 px", "audio 4 x 15 s")


def embeddings(result) -> torch.Tensor:
    """A case function's result -> (N, D): text/audio paths return it, an image call a ModelOutput."""
    return result if isinstance(result, torch.Tensor) else next(iter(result.embeddings.values()))


def measure(modes: dict, name: str, runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """({mode: median seconds}, {mode: max |emb - packed emb|}) for one case, modes interleaved."""
    fns = {mode: cases[name][1] for mode, cases in modes.items()}
    with torch.inference_mode():
        first = {mode: embeddings(fn()).float() for mode, fn in fns.items()}  # warm-up, and the parity
        times: dict[str, list[float]] = {mode: [] for mode in fns}
        for _ in range(runs):
            for mode, fn in fns.items():
                t = throughput.CLOCK()
                fn()
                times[mode].append(throughput.CLOCK() - t)
    errors = {mode: (emb - first["packed"]).abs().max().item() for mode, emb in first.items()}
    return {mode: statistics.median(t) for mode, t in times.items()}, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["base", "4b-layer"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated case names (default: {CASES})")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = parser.parse_args()
    if args.clock == "process":
        throughput.CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)  # and so ONNX Runtime's intra-op threads (OnnxModel's default)
    peak = throughput.matmul_peak(args.runs)
    model = throughput.build(args.size)
    with tempfile.TemporaryDirectory(prefix="onepeace-onnx-speed-") as tmp:
        start = time.perf_counter()
        fp32 = load_onnx(export_onnx(model, f"{tmp}/fp32"))
        int8 = load_onnx(export_onnx(model, f"{tmp}/int8", quantize="int8"))
        print(f"exported fp32 + int8 in {time.perf_counter() - start:.0f} s; max |onnx - torch| at export: "
              f"fp32 {fp32.manifest['check']}, int8 {int8.manifest['check']}", file=sys.stderr)
        modes = {"packed": model.to_packed(), "onnx": fp32, "onnx-int8": int8}
        mode_cases = {}
        for mode, m in modes.items():  # the same inputs in every mode (cases() draws images from torch's RNG)
            torch.manual_seed(0)
            mode_cases[mode] = throughput.cases(m, np.random.default_rng(0))
        print_header(args, peak, model.is_packed)
        for name in args.cases.split(","):
            times, errors = measure(mode_cases, name, args.runs)
            n, _, lengths = mode_cases["packed"][name]
            print_rows(name, n, throughput.encoder_flops(model.config.encoder, lengths), times, errors, peak)
            fp32.release()  # one branch's sessions at a time: the base graphs hold ~1.6 GB (+ ORT's prepacking)
            int8.release()
    print(f"matmul peak after the cases: {throughput.matmul_peak(args.runs):.0f} GFLOP/s")


def print_header(args, peak: float, packed: bool) -> None:
    cfg = throughput.get_config("one-peace-base").encoder if args.size == "base" else None
    print(f"size {args.size}{f': D={cfg.embed_dim} F={cfg.ffn_embed_dim} L={cfg.layers}' if cfg else ''}; "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"{torch.get_num_threads()} CPU threads; float32 matmul peak {peak:.0f} GFLOP/s; packed mode: "
          f"{'oneDNN-packed weights' if packed else 'plain weights'}; medians of {args.runs} interleaved runs, "
          f"{args.clock} clock; speed-up vs packed; max err = max |emb - packed emb|")
    header = f"{'case':<22} {'mode':<9} {'latency':>10} {'items/s':>9} {'GFLOP/s':>8} {'% peak':>7} {'speed-up':>9} {'max err':>9}"
    print(header)
    print("-" * len(header), flush=True)


def print_rows(name: str, n: int, flops: float, times: dict, errors: dict, peak: float) -> None:
    """One case's rows, printed as soon as it is measured."""
    for mode, t in times.items():
        gflops = flops / t / 1e9
        ratio = f"{times['packed'] / t:>8.2f}x" if mode != "packed" else ""
        print(f"{name:<22} {mode:<9} {t * 1000:>8.1f}ms {n / t:>9.2f} {gflops:>8.1f} {100 * gflops / peak:>6.1f}% "
              f"{ratio:>9} {errors[mode]:>9.1e}", flush=True)


if __name__ == "__main__":
    main()

"""Embedding throughput: onepeace's fast path vs its `reference` mode (the plain implementation: plain
weights, eager attention with a float32 softmax, the (B, H, S, S) mask rebuilt in every layer, unfused
projections, batches padded to the longest item), with achieved GFLOP/s of the encoder's matrix
products and their fraction of a matmul peak measured in the same run, at the same dtype (float32 by
default) on the same device. On CPU, one run times the 'default' mode (what onepeace.load picks for
this CPU: `onepeace.modeling.cpu_choice`, printed with the CPU's key and the probe's timings) beside
the 'packed' and 'dense' weights.

    python benchmarks/throughput.py                      # base size (D=768, L=12, H=12, F=3072)
    python benchmarks/throughput.py --size 4b-layer      # the 4B layer shape (D=1536, F=6144, H=24), 2 layers
    python benchmarks/throughput.py --runs 5 --only text
    python benchmarks/throughput.py --quantize int8      # adds an int8 row per case (CPU, float32)
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --size 4b-layer   # on a GPU

Random weights (speed does not depend on them); medians of --runs runs after one warm-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np
import torch

import onepeace
from onepeace.config import EncoderConfig
from onepeace.sizes import get_config
from onepeace.modalities.audio import embed_waveforms
from onepeace.modalities.text import embed_token_ids


CLOCK = time.perf_counter  # --clock process: CPU seconds of this process (see main)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(runs: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """matmul peak in GFLOP/s at `dtype` on `device`: the best of several square and encoder-like
    shapes, each the median of its runs (a single shape under-reads the peak on a noisy shared
    machine); on CPU with both of torch's GEMMs: MKL (torch.mm) and oneDNN with a packed weight
    (what onepeace runs)."""
    from onepeace.modeling.packed import linear, pack_weight, packable

    best = 0.0
    shapes = ((2048, 2048, 2048), (2048, 768, 3072), (4096, 1536, 1536))
    if device == "cuda":
        shapes += ((8192, 8192, 8192), (16384, 1536, 6144))
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        products = [lambda: torch.mm(a, b)]
        if packable(b):
            packed = pack_weight(b.t().contiguous())
            products.append(lambda: linear(a, packed))
        for product in products:
            product()
            sync(device)
            times = []
            for _ in range(max(5, runs)):
                t = CLOCK()
                product()
                sync(device)
                times.append(CLOCK() - t)
            best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
    return best


def encoder_flops(cfg: EncoderConfig, lengths: list[int]) -> float:
    """FLOPs of the encoder's matrix products for sequences of these (real, unpadded) lengths:
    q/k/v/out projections 4 D^2, GeGLU 3 D F per token, attention scores and values 2 S D per token."""
    D, F, L = cfg.embed_dim, cfg.ffn_embed_dim, cfg.layers
    return float(sum(2 * L * S * (4 * D * D + 3 * D * F + 2 * S * D) for S in lengths))


def build(size: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> onepeace.OnePeaceModel:
    if size == "base":
        config = get_config("one-peace-base")
        config = dataclasses.replace(config, adapters={**config.adapters, "image": dataclasses.replace(
            config.adapters["image"], image_size=256, bucket_size=16, rel_bucket_size=16)})
    elif size == "4b-layer":
        config = get_config("one-peace-4b")
        config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, layers=2))
    else:
        raise SystemExit(f"unknown size {size}")
    torch.manual_seed(0)
    model = onepeace.create_model(config, device=device, dtype=dtype).eval()
    return model


def timed(fn, runs: int, device: str = "cpu") -> float:
    with torch.inference_mode():
        fn()  # warm-up
        sync(device)
        times = []
        for _ in range(runs):
            t = CLOCK()
            fn()
            sync(device)
            times.append(CLOCK() - t)
    return statistics.median(times)


def cases(model, rng):
    """name -> (items, function, real sequence lengths for the FLOP count)."""
    spec = model.config.adapters["audio"].feature_encoder_spec
    vocab = model.config.adapters["text"].vocab_size

    def ids(n):
        return [list(rng.integers(4, vocab, size=n - 1)) + [2] for _ in range(1)][0]

    text_fixed = [ids(40) for _ in range(32)]
    text_mixed = [ids(int(n)) for n in rng.integers(5, 71, size=32)]
    text_one = [ids(12)]
    image8 = torch.randn(8, 3, 256, 256, device=model.device, dtype=model.dtype)
    image1 = torch.randn(1, 3, 256, 256, device=model.device, dtype=model.dtype)

    def clips(seconds):
        return [torch.as_tensor(rng.standard_normal(int(16000 * s)).astype(np.float32)) for s in seconds]

    audio5 = clips([5] * 4)
    audio15 = clips([15] * 4)
    audio_mixed = clips(rng.uniform(1, 15, size=8))

    def frames(w):
        from onepeace.data.audio import feature_lengths
        return feature_lengths(w.shape[0], spec) + 1

    def image_fn(x):
        return lambda: model(image=x)

    def text_fn(batch):
        return lambda: embed_token_ids(model, batch, batch_size=64)

    def audio_fn(waves):
        return lambda: embed_waveforms(model, waves, batch_size=8)

    return {
        "text 32 x 40 tokens": (32, text_fn(text_fixed), [41] * 32),
        "text 32 mixed 5-70": (32, text_fn(text_mixed), [len(x) + 1 for x in text_mixed]),
        "text batch 1 (12)": (1, text_fn(text_one), [13]),
        "image 8 x 256 px": (8, image_fn(image8), [257] * 8),
        "image batch 1": (1, image_fn(image1), [257]),
        "audio 4 x 5 s": (4, audio_fn(audio5), [frames(w) for w in audio5]),
        "audio 4 x 15 s": (4, audio_fn(audio15), [frames(w) for w in audio15]),
        "audio 8 mixed 1-15 s": (8, audio_fn(audio_mixed), [frames(w) for w in audio_mixed]),
    }


def build_modes(args, dtype: torch.dtype) -> dict[str, onepeace.OnePeaceModel]:
    """mode -> model, the same seeded weights in each. CPU: 'default' (what onepeace.load returns: the
    path `onepeace.modeling.cpu_choice` measured faster on this CPU, kept on the model as `cpu_choice`),
    'packed' (`to_packed`, where this CPU can pack the dtype) and 'dense' (`to_dense`, plain nn.Linear),
    so one run shows all three; GPU or --fuse: 'fused'. Always 'reference' (the plain implementation)."""
    from onepeace.modeling.cpu_choice import choose_for

    modes = {}
    if args.fuse or args.device == "cuda":
        modes["fused"] = build(args.size, args.device, dtype).fuse_for_inference()  # what load does on GPUs
    else:
        modes["default"] = build(args.size, args.device, dtype)  # what load does on CPU (probe or cache)
        modes["default"].cpu_choice = choose_for(modes["default"], fixed_threads=bool(args.threads))
        if not args.no_pack:
            modes["packed"] = build(args.size, args.device, dtype).to_packed()  # what load does on CPU
        modes["dense"] = build(args.size, args.device, dtype)
    if args.quantize == "int8":  # onepeace.load(..., quantize="int8"): int8 encoder linears (fbgemm)
        from onepeace.modeling.quantized import check_quantize, quantize_int8

        check_quantize("int8", device=args.device, dtype=dtype)  # CPU, float32
        modes["int8"] = build(args.size, args.device, dtype)
        quantize_int8(modes["int8"])
    modes["reference"] = build(args.size, args.device, dtype)
    modes["reference"].reference_mode = True
    return modes


def print_table(args, rows, modes, peaks: tuple[float, float]) -> None:
    """rows: (case, items, flops, {mode: seconds}); the speed-up is against the reference."""
    cfg = next(iter(modes.values())).config.encoder
    where = (torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads")
    packed = modes.get("packed")
    if packed is None:
        packing = "no packed mode"
    else:
        packing = "packed mode: " + ("oneDNN-packed weights" if packed.is_packed else
                                     f"plain weights (this CPU cannot pack {args.dtype})")
    choice = getattr(modes.get("default"), "cpu_choice", None)
    if choice is not None:
        print(f"CPU: {choice.key}")
        print(f"default mode (onepeace.load on this CPU): {choice.summary()}")
    peak = max(peaks)
    print(f"size {args.size}: D={cfg.embed_dim} F={cfg.ffn_embed_dim} L={cfg.layers} H={cfg.attention_heads}; "
          f"torch {torch.__version__}, {where}; {args.dtype} matmul peak {peak:.0f} GFLOP/s "
          f"(measured before / after the cases: {peaks[0]:.0f} / {peaks[1]:.0f}); "
          f"{packing}; "
          f"medians of {args.runs} runs, {args.clock} clock")
    header = (f"{'case':<22} {'mode':<9} {'latency':>10} {'items/s':>9} {'GFLOP/s':>8} {'% peak':>7} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    for name, n, flops, times in rows:
        for mode, t in times.items():
            gflops = flops / t / 1e9
            ratio = f"{times['reference'] / t:>8.2f}x" if mode != "reference" else ""
            print(f"{name:<22} {mode:<9} {t * 1000:>8.1f}ms {n / t:>9.2f} {gflops:>8.1f} {100 * gflops / peak:>6.1f}% {ratio:>9}")


def onnx_modes(args, dtype: torch.dtype, dense: onepeace.OnePeaceModel | None = None) -> dict:
    """--onnx: 'onnx' and 'onnx-int8', the same seeded weights exported (onepeace.onnx.export_onnx) and
    run by ONNX Runtime (float32 graphs; ONNX Runtime's dynamic int8)."""
    import tempfile

    from onepeace.onnx import export_onnx, load_onnx

    if args.device != "cpu" or dtype != torch.float32:
        raise SystemExit("--onnx runs on CPU in float32 (ONNX Runtime's own int8 is the onnx-int8 mode)")
    model, modes = dense if dense is not None else build(args.size), {}  # the dense mode's model: no extra copy
    for mode, quantize in (("onnx", None), ("onnx-int8", "int8")):
        out = export_onnx(model, tempfile.mkdtemp(prefix=f"onepeace-{mode}-"), quantize=quantize)
        modes[mode] = load_onnx(out)
        print(f"{mode}: {out}, max |onnx - torch| at export: {modes[mode].manifest['check']}", file=sys.stderr)
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["base", "4b-layer"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=None,
                        help="run only cases whose name contains this (comma-separated: any of these)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of every mode and of the peak (on a GPU: bfloat16)")
    parser.add_argument("--fuse", action="store_true", help="fused q/k/v and GeGLU projections (GPU default)")
    parser.add_argument("--no-pack", action="store_true", help="on CPU, measure the dense mode only (no packed row)")
    parser.add_argument("--onnx", action="store_true", help="add ONNX Runtime modes: onnx (float32) and onnx-int8")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="add an 'int8' mode (the encoder's linears int8, CPU float32 only) beside the others")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: time by this process's CPU seconds, which other jobs on a shared machine "
                             "do not inflate; use with --threads 1, where CPU seconds = single-core latency")
    args = parser.parse_args()
    if args.clock == "process":
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(args.runs, args.device, dtype)
    modes = build_modes(args, dtype)
    if args.onnx:
        modes.update(onnx_modes(args, dtype, modes.get("dense")))
    mode_cases = {mode: cases(model, np.random.default_rng(0)) for mode, model in modes.items()}
    rows = []
    for name, (n, _, lengths) in next(iter(mode_cases.values())).items():
        if args.only and not any(part.strip() in name for part in args.only.split(",")):
            continue
        print(f"  measuring {name} ...", file=sys.stderr, flush=True)
        times = {mode: timed(mode_cases[mode][name][1], args.runs, args.device) for mode in modes}
        rows.append((name, n, encoder_flops(modes["reference"].config.encoder, lengths), times))
    # the peak again after the cases: on a shared machine one reading can be low, which would
    # inflate every "% peak" (the table uses the higher of the two)
    print_table(args, rows, modes, (peak, matmul_peak(args.runs, args.device, dtype)))


if __name__ == "__main__":
    main()

"""The GPU numbers of issue 16 in one short run (< 8 minutes on an H200), each part under a time limit:

1. `benchmarks/throughput.py --device cuda --dtype bfloat16 --size 4b-layer` (fused vs reference, with
   the card's bf16 matmul peak measured in the same run);
2. the full 4B model: a synthetic checkpoint with the released layout (`benchmarks/load_4b.py`; a
   converted folder of random weights where the released key list is not at hand) loaded on the GPU
   in bfloat16 -- load time, GPU memory after the load and at the peak of the image pass -- and the
   image pass (batch --image-batch at 256 px): latency, encoder GFLOP/s and % of the bf16 matmul peak
   measured in the same process (goal >= 50%);
3. a stage-1 training step (image-text: contrastive + denoising objectives, the project's Trainer) at
   the 4B layer shape (2 layers of D=1536, F=6144, H=24), bf16 autocast: samples/s, peak GPU memory.

    python benchmarks/gpu_check.py                        # everything, 450 s in all
    python benchmarks/gpu_check.py --time-limit 300 --skip-train
    python benchmarks/gpu_check.py --smoke                # the same code on CPU with the tiny model (no GPU)

On the project's GPU machine (no network; its image lacks soundfile, soxr, cffi, pycparser, which
`import onepeace` needs): carry their cp312 wheels and the shared BPE / key files in ignored folders,
install the wheels to a side folder first (see NOTES / the device README), e.g.

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        build/gpu-wheels/*.whl && export PYTHONPATH=/tmp/site || exit; python3 benchmarks/gpu_check.py \
        --time-limit 420 --bpe-dir build/gpu-assets/official-bpe --keys build/gpu-assets/one-peace-4b-retrieval-keys.tsv

Every part runs in its own process (a crash or an out-of-memory in one leaves the others' numbers) and
prints one RESULT line; the summary table is printed at the end, with what did not finish.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KEYS_TSV = REPO.parent / "shared" / "spec" / "one-peace-4b-retrieval-keys.tsv"

# part 2, in its own process: argv = checkpoint, model name, device, dtype, image batch, runs
IMAGE_PASS = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[7])
import onepeace
from throughput import encoder_flops, matmul_peak, sync
path, device, dtype, batch, runs = sys.argv[1], sys.argv[3], getattr(torch, sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
cuda = device == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats()
sync(device)
t = time.perf_counter()
model = onepeace.load(path, device=device, dtype=dtype, modalities=("image",))
sync(device)
out = {"load_s": time.perf_counter() - t, "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9}
if cuda:
    out["gpu_mem_after_load_gb"] = torch.cuda.memory_allocated() / 1e9
size = model.config.adapters["image"].image_size
images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
times = []
with torch.inference_mode():
    model(image=images)  # warm-up (kernel selection, allocator)
    sync(device)
    for _ in range(runs):
        t = time.perf_counter()
        model(image=images)
        sync(device)
        times.append(time.perf_counter() - t)
with torch.inference_mode():
    tokens = model.embed_inputs("image", images[:1]).tokens.shape[1]  # patches + CLS (257 at 256 px)
flops = encoder_flops(model.config.encoder, [tokens] * batch)
latency = statistics.median(times)
out.update(image_batch=batch, image_px=size, image_pass_s=latency, images_per_s=batch / latency,
           encoder_gflops=flops / latency / 1e9)
if cuda:
    out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["gpu"] = torch.cuda.get_device_name()
del images
out["matmul_peak_gflops"] = matmul_peak(max(3, runs), device, dtype)
out["pct_of_peak"] = 100 * out["encoder_gflops"] / out["matmul_peak_gflops"]
print("RESULT", json.dumps(out), flush=True)
"""

# part 3, in its own process: argv = TrainConfig JSON path, model name to register (2 layers of 4B) or ""
TRAIN_STEP = r"""
import dataclasses, json, statistics, sys
import torch
import onepeace.sizes as sizes
from onepeace.train.config import TrainConfig
from onepeace.train.loop import Trainer
cfg_path, name, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3])
if name:  # the 4B layer shape: the released 4B config with 2 encoder layers
    big = sizes.get_config("one-peace-4b")
    sizes.NAMED_CONFIGS[name] = dataclasses.replace(big, encoder=dataclasses.replace(big.encoder, layers=2))
cfg = TrainConfig.from_dict(json.load(open(cfg_path)))
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
trainer = Trainer(cfg)
trainer.fit()
rows = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][warmup:]
out = {"samples_per_s": statistics.median(rates), "steps_timed": len(rates), "batch_size": cfg.batch_size,
       "precision": cfg.precision, "device": str(trainer.ctx.device),
       "parameters_m": sum(p.numel() for p in trainer.pm.parameters()) / 1e6}
if torch.cuda.is_available():
    out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
print("RESULT", json.dumps(out), flush=True)
"""


class Budget:
    """The run's time limit, shared by the parts: each gets what is left (at most its own cap)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        return max(0.0, min(cap, self.deadline - time.monotonic()))


def run_part(name: str, cmd: list[str], timeout: float, results: dict, env: dict | None = None) -> None:
    """Run one part in its own process, echo its output, keep its RESULT (or why there is none)."""
    if timeout < 10:
        results[name] = {"error": "skipped: no time left"}
        return
    shown = " ".join(c if len(c) < 100 else "<script>" for c in cmd)
    print(f"\n=== {name} (limit {timeout:.0f} s): {shown}", flush=True)
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-4000:])
        results[name] = {"error": f"timed out after {timeout:.0f} s"}
        return
    print(proc.stdout[-6000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or (not lines and name != "throughput"):
        print(proc.stderr[-3000:])
        results[name] = {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ['?']}"}
        return
    results[name] = json.loads(lines[-1][7:]) if lines else {"ok": True}
    results[name]["wall_s"] = round(time.monotonic() - t, 1)


def checkpoint_4b(args, workdir: Path) -> Path:
    """The synthetic 4B checkpoint: the released layout where the key list is here (load_4b.py, cached
    at --path), else a converted folder of random bfloat16 weights (the tiny model with --smoke)."""
    if args.smoke:
        import onepeace
        from onepeace.checkpoint import save_converted

        return save_converted(onepeace.create_model("one-peace-tiny"), workdir / "tiny")
    sys.path.insert(0, str(HERE))
    from load_4b import DEFAULT_PATH, write_checkpoint

    if DEFAULT_PATH.exists():
        return DEFAULT_PATH
    if args.keys.exists():
        print(f"writing the synthetic 4B checkpoint (released layout) to {DEFAULT_PATH} ...", flush=True)
        write_checkpoint(DEFAULT_PATH, args.keys)
        return DEFAULT_PATH
    import torch

    import onepeace
    from onepeace.checkpoint import save_converted

    print(f"{args.keys} not here: writing a converted 4B folder of random bfloat16 weights instead", flush=True)
    torch.manual_seed(0)
    return save_converted(onepeace.create_model("one-peace-4b", dtype=torch.bfloat16), workdir / "4b")


def make_vl_data(root: Path, n: int, image_size: int) -> None:
    """n coloured squares with captions (vl.jsonl): stage 1's image-text data, images only (no audio
    files: the GPU image has no soundfile to write them)."""
    import numpy as np
    from PIL import Image

    colors = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    rng = np.random.default_rng(0)
    with open(root / "vl.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(np.full((image_size, image_size, 3), rng.integers(0, 255, 3), np.uint8)).save(root / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "text": f"a {colors[i % 8]} square number {i}"}) + "\n")


def train_config(args, workdir: Path, model: str) -> Path:
    import onepeace

    data = workdir / "data"
    data.mkdir(exist_ok=True)
    size = onepeace.get_config("one-peace-tiny" if args.smoke else "one-peace-4b").adapters["image"].image_size
    make_vl_data(data, max(32, args.train_batch * 2), size)
    cfg = {"train_manifest": str(data / "vl.jsonl"), "output_dir": str(workdir / "train"), "model": model,
           "batch_size": args.train_batch, "steps": args.train_steps, "warmup_steps": 1, "save_every": 10 ** 9,
           "log_every": 1, "stage": "stage1", "bpe_dir": args.bpe_dir, "progress": False,
           "precision": "fp32" if args.smoke else "bf16"}
    path = workdir / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def print_summary(results: dict) -> None:
    print("\n=== summary")
    img, train = results.get("4B image pass", {}), results.get("stage-1 train step", {})
    if "error" not in img:
        print(f"4B load: {img['load_s']:.1f} s, weights {img['weights_gb']:.2f} GB, GPU memory after load "
              f"{img.get('gpu_mem_after_load_gb', float('nan')):.2f} GB, peak in the image pass "
              f"{img.get('gpu_mem_peak_gb', float('nan')):.2f} GB")
        print(f"4B image pass, batch {img['image_batch']} x {img['image_px']} px: {1000 * img['image_pass_s']:.1f} ms, "
              f"{img['images_per_s']:.1f} images/s, {img['encoder_gflops']:.0f} GFLOP/s = {img['pct_of_peak']:.1f}% of "
              f"the measured matmul peak ({img['matmul_peak_gflops']:.0f} GFLOP/s; goal >= 50%)")
    if "error" not in train:
        print(f"stage-1 train step (4B layer shape, {train['precision']}, batch {train['batch_size']}): "
              f"{train['samples_per_s']:.1f} samples/s (median of {train['steps_timed']} steps), "
              f"peak GPU memory {train.get('gpu_mem_peak_gb', float('nan')):.2f} GB")
    for name, r in results.items():
        if "error" in r:
            print(f"NOT DONE: {name}: {r['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=450, help="seconds for everything (default 450)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=8, help="optimizer steps; the first 3 are not timed")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-4b", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--keys", type=Path, default=KEYS_TSV,
                        help="the released 4B key list (shared/spec/one-peace-4b-retrieval-keys.tsv)")
    parser.add_argument("--bpe-dir", default=os.environ.get("ONEPEACE_BPE_DIR", str(REPO.parent / "shared" / "official-bpe")))
    parser.add_argument("--smoke", action="store_true", help="no GPU: the same code on CPU, tiny sizes, float32")
    args = parser.parse_args()
    import torch

    try:
        import onepeace  # noqa: F401
    except ImportError as e:  # e.g. a GPU image without soundfile / soxr (onepeace's audio I/O)
        raise SystemExit(f"cannot import onepeace here: {e}; carry the missing package's wheel (pip install "
                         "--no-deps WHEEL) and run again") from e
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --smoke to check the script on CPU")
    device, dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    budget, results = Budget(args.time_limit), {}
    print(f"torch {torch.__version__}; {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke)'}; "
          f"limit {args.time_limit:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.skip_throughput:
            cmd = [sys.executable, str(HERE / "throughput.py"), "--device", device, "--dtype", dtype,
                   "--runs", str(args.runs)] + (["--only", "text batch 1", "--runs", "1"] if args.smoke
                                                else ["--size", "4b-layer"])
            run_part("throughput", cmd, budget.left(200), results)
        if not args.skip_4b:
            try:
                path = checkpoint_4b(args, workdir)
            except Exception as e:  # noqa: BLE001 - report it, still run the other parts
                results["4B image pass"] = {"error": f"writing the synthetic checkpoint: {type(e).__name__}: {e}"}
            else:
                cmd = [sys.executable, "-c", IMAGE_PASS, str(path), "", device, dtype,
                       str(2 if args.smoke else args.image_batch), str(args.runs), str(HERE)]
                run_part("4B image pass", cmd, budget.left(240), results)
        if not args.skip_train:
            name = "" if args.smoke else "one-peace-4b-layer"
            cfg = train_config(args, workdir, "one-peace-tiny" if args.smoke else name)
            run_part("stage-1 train step", [sys.executable, "-c", TRAIN_STEP, str(cfg), name, "3"],
                     budget.left(180), results)
    print_summary(results)


if __name__ == "__main__":
    main()

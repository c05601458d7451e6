"""Training throughput: samples/s and peak resident memory of pretraining steps, 1 and N processes.

    python benchmarks/train_step.py                 # one-peace-tiny, stage 1 (image-text), 1 and 2 processes
    python benchmarks/train_step.py --model one-peace-small --batch-size 16 --steps 8 --task al

Synthetic data (coloured squares / tones with captions) is written to a temporary folder. Each
configuration runs `--steps` optimizer steps; the first `--warmup` are excluded from the timing.
Numbers come from the trainer's own JSONL log (samples/s per step, median) and ru_maxrss.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
HERE = Path(__file__).resolve().parent


def make_data(root: Path, n: int, image_size: int) -> None:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    with open(root / "vl.jsonl", "w") as f, open(root / "al.jsonl", "w") as g:
        for i in range(n):
            arr = np.zeros((image_size, image_size, 3), np.uint8)
            arr[...] = rng.integers(0, 255, 3)
            Image.fromarray(arr).save(root / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "text": f"a {COLORS[i % 8]} square number {i}"}) + "\n")
            t = np.arange(int(16000 * rng.uniform(1, 3))) / 16000
            sf.write(root / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * (i % 8)) * t)).astype(np.float32), 16000)
            g.write(json.dumps({"audio": f"tone{i}.wav", "text": f"a {COLORS[i % 8]} tone"}) + "\n")


RUNNER = r"""
import json, resource, sys
from onepeace.train.config import TrainConfig
from onepeace.train.loop import Trainer
trainer = Trainer(TrainConfig.from_dict(json.load(open(sys.argv[1]))))
trainer.fit()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
peaks = trainer.ctx.gather_objects(peak)
if trainer.ctx.is_main:
    print("PEAK_MIB", json.dumps(peaks))
trainer.ctx.shutdown()
"""


def run(cfg: dict, warmup: int, procs: int, workdir: Path) -> dict:
    cfg_path = workdir / f"cfg_{procs}.json"
    cfg_path.write_text(json.dumps(cfg))
    script = workdir / "runner.py"
    script.write_text(RUNNER)
    cmd = [sys.executable, str(script), str(cfg_path)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29555",
               str(script), str(cfg_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    peaks = json.loads([line for line in out.stdout.splitlines() if line.startswith("PEAK_MIB")][0].split(" ", 1)[1])
    rows = [r for r in map(json.loads, open(Path(cfg["output_dir"]) / "metrics.jsonl")) if "samples_per_s" in r]
    timed = [r["samples_per_s"] for r in rows[warmup:]]
    return {"samples_per_s": statistics.median(timed), "peak_rss_mib_per_process": max(peaks), "processes": procs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="one-peace-tiny")
    parser.add_argument("--task", choices=["vl", "al"], default="vl")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--bpe-dir", default=os.environ.get("ONEPEACE_BPE_DIR", str(HERE.parent.parent / "shared" / "official-bpe")))
    args = parser.parse_args()
    import onepeace

    image_size = onepeace.get_config(args.model).adapters["image"].image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, max(64, args.batch_size * 4), image_size)
        print(f"model {args.model}, task {args.task}, global batch {args.batch_size}, {args.steps} steps "
              f"({args.warmup} warm-up), cpu threads {os.cpu_count()}")
        print(f"{'processes':>9} {'samples/s':>10} {'peak RSS / process (MiB)':>25}")
        for procs in [int(p) for p in args.processes.split(",")]:
            cfg = {"train_manifest": str(root / ("vl.jsonl" if args.task == "vl" else "al.jsonl")),
                   "output_dir": str(root / f"run{procs}"), "model": args.model, "batch_size": args.batch_size,
                   "steps": args.steps, "warmup_steps": 1, "save_every": 10 ** 9, "log_every": 1,
                   "stage": "stage1" if args.task == "vl" else "stage2", "bpe_dir": args.bpe_dir, "progress": False}
            result = run(cfg, args.warmup, procs, root)
            print(f"{procs:>9} {result['samples_per_s']:>10.1f} {result['peak_rss_mib_per_process']:>25.0f}")


if __name__ == "__main__":
    main()

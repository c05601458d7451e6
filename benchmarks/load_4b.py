"""Loading the released 4B model: time, peak resident memory, first embeddings.

    python benchmarks/load_4b.py                       # bfloat16 and float32
    python benchmarks/load_4b.py --dtypes bfloat16 --skip-audio
    python benchmarks/load_4b.py --dtypes int8          # the int8 folder (`onepeace convert --quantize int8`)

The first run writes a synthetic checkpoint with the exact released 4B layout (every key and shape of
`one-peace-4b-retrieval-keys.tsv`, random bfloat16 weights, the released file format: a torch.save'd
dict with cfg, model, extra_state; ~7.8 GB) to --path, once. Each dtype is then measured in a fresh
process: load time, peak RSS (ru_maxrss) against the weight bytes at that dtype, and the latency of
the first embedding of an image (256 px), a text and a 15-s audio clip.

"int8": the checkpoint is converted once (`onepeace convert --quantize int8`, in its own process) to a
folder beside it, and the measured process loads that folder (int8 encoder linears packed for fbgemm
as they are read, float32 elsewhere); its weight bytes are the int8 weights + scales + float32 rest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_PATH = Path(os.environ.get("ONEPEACE_CACHE", Path.home() / ".cache" / "onepeace")) / "bench" / "one-peace-4b-synthetic.pt"


def write_checkpoint(path: Path, keys_tsv: Path) -> None:
    """Every key of the released file with its shape; weights are copies of one random bf16 block
    (fast to make; values like a trained model's, no NaNs); buffers are the real recomputed ones."""
    from onepeace.checkpoint import released_cfg
    from onepeace.sizes import get_config
    from onepeace.modeling.relative_position import bucket_index_1d, bucket_index_2d

    block = (torch.randn(1 << 22) * 0.02).to(torch.bfloat16)
    state = {}
    for row in keys_tsv.read_text().splitlines()[1:]:
        key, shape, kind = row.split("\t")
        dims = tuple(int(d) for d in shape.split("x")) if shape else ()
        if key.endswith("rp_bucket"):
            state[key] = bucket_index_1d(256 if "text" in key else 512) if dims[0] == 1024 else bucket_index_2d(16)
        elif key.endswith("position_idx"):
            state[key] = torch.arange(dims[0])
        elif key.endswith("version"):
            state[key] = torch.tensor([3.0])
        else:
            n = 1
            for d in dims:
                n *= d
            reps = -(-n // block.numel())
            state[key] = block.repeat(reps)[:n].reshape(dims).clone()
    cfg = released_cfg(get_config("one-peace-4b"))
    obj = {"args": None, "cfg": cfg, "model": state, "optimizer_history": [], "last_optimizer_state": None,
           "extra_state": {"train_iterator": {"epoch": 1}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


MEASURE = r"""
import json, resource, sys, time
import numpy as np, torch
import onepeace
path, dtype_name, skip_audio = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
dtype = torch.float32 if dtype_name == "int8" else getattr(torch, dtype_name)
t = time.perf_counter()
model = onepeace.load(path, dtype=dtype)
load_s = time.perf_counter() - t
rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if dtype_name == "int8":
    from onepeace.modeling.quantized import quantization, weight_bytes
    assert quantization(model) == "int8", "the int8 folder did not load as int8"
    weight_bytes = weight_bytes(model)
else:
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
out = {"dtype": dtype_name, "load_s": load_s, "peak_rss_load_gb": rss_after_load / 1e9,
       "weight_gb": weight_bytes / 1e9, "rss_ratio": rss_after_load / weight_bytes}
with torch.inference_mode():
    t = time.perf_counter(); model(image=torch.randn(1, 3, 256, 256)); out["first_image_s"] = time.perf_counter() - t
    t = time.perf_counter(); model(text=torch.tensor([[10, 2335, 2]])); out["first_text_s"] = time.perf_counter() - t
    if not skip_audio:
        from onepeace.data.audio import collate_waveforms, prepare_waveform
        wave = prepare_waveform(np.random.default_rng(0).standard_normal(16000 * 15).astype(np.float32))
        audio, mask = collate_waveforms([wave], model.config.adapters["audio"].feature_encoder_spec)
        t = time.perf_counter(); model(audio=audio, audio_padding_mask=mask); out["first_audio_15s_s"] = time.perf_counter() - t
out["peak_rss_total_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print("RESULT", json.dumps(out))
"""


def int8_folder(path: Path) -> Path:
    """The int8 conversion of the synthetic checkpoint (made once, in its own process; its peak RSS printed)."""
    out = path.with_name(path.stem + "-int8")
    if not (out / "model.safetensors").exists():
        t = time.time()
        print(f"converting to int8 (once): {out} ...", flush=True)
        code = ("import resource, sys; from onepeace.cli import main; rc = main(sys.argv[1:]); "
                "print(f'convert peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB'); "
                "sys.exit(rc)")
        subprocess.run([sys.executable, "-c", code, "convert", str(path), str(out), "--quantize", "int8"], check=True)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"  {size / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--keys", type=Path, default=HERE.parent.parent / "shared" / "spec" / "one-peace-4b-retrieval-keys.tsv")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--skip-audio", action="store_true")
    args = parser.parse_args()
    if not args.path.exists():
        t = time.time()
        print(f"writing the synthetic 4B checkpoint to {args.path} (once) ...", flush=True)
        write_checkpoint(args.path, args.keys)
        print(f"  {args.path.stat().st_size / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
    print(f"checkpoint {args.path} ({args.path.stat().st_size / 1e9:.2f} GB, bfloat16 storage); "
          f"{os.cpu_count()} CPU threads")
    print(f"{'dtype':<9} {'load':>7} {'weights':>8} {'peak RSS':>9} {'RSS/weights':>11} {'1st image':>10} "
          f"{'1st text':>9} {'1st 15-s audio':>15}")
    for dtype in args.dtypes.split(","):
        path = int8_folder(args.path) if dtype == "int8" else args.path
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), dtype, "1" if args.skip_audio else "0"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{dtype}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][0][7:])
        audio = f"{r['first_audio_15s_s']:>14.1f}s" if "first_audio_15s_s" in r else f"{'-':>15}"
        print(f"{dtype:<9} {r['load_s']:>6.1f}s {r['weight_gb']:>6.2f}GB {r['peak_rss_load_gb']:>7.2f}GB "
              f"{r['rss_ratio']:>10.2f}x {r['first_image_s']:>9.1f}s {r['first_text_s']:>8.2f}s {audio}")
        print(f"          (peak RSS over the whole run incl. the embeddings: {r['peak_rss_total_gb']:.2f} GB)")


if __name__ == "__main__":
    main()

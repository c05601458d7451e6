"""The demos: `onepeace demo` (pretrain a small model on offline data), `demo-finetune`, `demo-video`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import Flags


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("demo", parents=[flags.bpe],
                       help="pretrain a small model on offline data, evaluate, write runs/demo/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny version in about two minutes (CI)")
    p.add_argument("--ablation", action="store_true",
                   help="also train the contrast-only arm (no denoising contrast) once, with the same seed")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="the seeded ablation instead: both arms for each training seed (e.g. 0,1,2), mean and "
                        "spread per arm in OUT/ablation.md (default OUT: runs/demo-ablation)")
    p.add_argument("--seed", type=int, default=0, help="the training seed (the data split is fixed)")
    p.add_argument("--augment", action="store_true",
                   help="augment the audio in stage 2 (speed/pitch, reverb, band-limit, noise, gain, masking)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: follow the machine's load, fewer when other jobs hold the "
                        "cores; OMP_NUM_THREADS, if set, is kept)")
    p.set_defaults(func=cmd_demo)
    for name, func, what in (
            ("demo-finetune", cmd_demo_finetune, "zero-shot vs linear probe vs fine-tuned accuracy on the demo data"),
            ("demo-video", cmd_demo_video, "add a video modality to the demo model, train it against text, evaluate")):
        p = sub.add_parser(name, parents=[flags.bpe], help=what)
        p.add_argument("--model", "-m", default="runs/demo/model", help="the trained demo model (onepeace demo)")
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (CI)")
        p.set_defaults(func=func)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.run import expected_minutes, run_demo

    if args.seeds is not None:
        return _seeded_ablation(args)
    print(expected_minutes(args.quick, args.ablation), flush=True)
    try:
        metrics = run_demo(args.out, quick=args.quick, seed=args.seed, ablation=args.ablation, bpe_dir=args.bpe_dir,
                           settings=_settings(args), threads=args.threads)
    except RuntimeError as e:
        print(f"onepeace demo: {e}", file=sys.stderr)
        return 2
    keys = ["image_zero_shot_top1", "audio_zero_shot_top1_heldout_voices", "audio_zero_shot_top1_heldout_engine",
            "audio_zero_shot_top1_word_heldout_voices", "audio_zero_shot_top1_word_heldout_engine",
            "audio_to_image_r1", "image_to_text_r1", "audio_to_text_r1"]
    abl = metrics.get("ablation_no_dcl", {})
    print(f"{'metric':<45} {'ITC+DCL':>8} {'no DCL':>8}")
    for k in keys:
        print(f"{k:<45} {metrics.get(k, float('nan')):>8.3f} {abl.get(k, float('nan')):>8.3f}")
    print(f"{'minutes':<45} {metrics['minutes']:>8.1f}")
    print(f"report: {Path(args.out) / 'report.md'}; model: {Path(args.out) / 'model'}")
    return 0


def _settings(args: argparse.Namespace):
    import dataclasses

    from ..demo.run import DemoSettings

    base = DemoSettings.quick() if args.quick else DemoSettings()
    return dataclasses.replace(base, audio_augment=args.augment)


def _seeded_ablation(args: argparse.Namespace) -> int:
    from ..demo.ablation import ARMS, METRICS, run_ablation

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"onepeace demo: --seeds takes comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    if not seeds:
        print("onepeace demo: --seeds needs at least one seed", file=sys.stderr)
        return 2
    out = args.out if args.out != "runs/demo" else "runs/demo-ablation"
    try:
        result = run_ablation(out, seeds=seeds, quick=args.quick, bpe_dir=args.bpe_dir, settings=_settings(args),
                              threads=args.threads)
    except RuntimeError as e:
        print(f"onepeace demo: {e}", file=sys.stderr)
        return 2
    print(f"{'metric':<52} {ARMS['dcl']:>24} {ARMS['no_dcl']:>24}  verdict")
    for key, label in METRICS.items():
        row = result["metrics"].get(key)
        if row:
            cells = [f"{row[a]['mean']:.3f} +- {row[a]['sd']:.3f}" for a in ARMS]
            print(f"{label:<52} {cells[0]:>24} {cells[1]:>24}  {row['comparison']['verdict']}")
    print(f"{result['minutes']:.1f} minutes; report: {Path(out) / 'ablation.md'}")
    return 0


def cmd_demo_finetune(args: argparse.Namespace) -> int:
    from ..demo.finetune import run_finetune_demo

    metrics = run_finetune_demo(args.model, args.out, quick=args.quick, bpe_dir=args.bpe_dir)
    print(f"{'method':<100} {'accuracy':>8} {'min':>5}")
    for name, acc, minutes in metrics["table"]:
        print(f"{name:<100} {acc:>8.3f} {minutes:>5.1f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo_video(args: argparse.Namespace) -> int:
    from ..demo.video import run_video_demo

    m = run_video_demo(args.model, args.out, quick=args.quick, bpe_dir=args.bpe_dir)
    print(f"pre-existing parameters bit-identical after video training: {m['pre_existing_parameters_identical']}")
    print(f"{'metric':<28} {'before':>7} {'trained':>7}")
    for key in ("video_zero_shot_top1", "video_to_audio_r1", "audio_to_video_r1", "video_to_image_r1",
                "image_to_video_r1", "video_to_audio_map", "video_to_image_map", "video_to_text_r1"):
        print(f"{key:<28} {m['before_training'][key]:>7.3f} {m['trained'][key]:>7.3f}")
    print(f"report: {Path(args.out) / 'report.md'} ({m['minutes']:.1f} min)")
    return 0

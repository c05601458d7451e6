"""`onepeace train` (pretrain one stage) and `onepeace finetune` (classify head, linear probe, retrieval)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Flags, parse_set


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("train", help="pretrain one stage (one process; use torchrun -m onepeace.train for many)")
    p.add_argument("config", help="training config JSON (onepeace.train.config.TrainConfig)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", parents=[flags.bpe],
                       help="fine-tune: classify head, linear probe or contrastive retrieval (LLRD)")
    p.add_argument("config", nargs="?", default=None, help="FinetuneConfig JSON (flags and --set override it)")
    p.add_argument("--model", "-m", default=None, help="converted folder or released .pt")
    p.add_argument("--train", default=None, help="training manifest (JSONL with label)")
    p.add_argument("--test", default=None, help="held-out manifest: accuracy after (and zero-shot before)")
    p.add_argument("--mode", choices=("classify", "linear-probe", "retrieval"), default=None)
    p.add_argument("--modality", default=None, help="the branch to fine-tune (default image)")
    p.add_argument("--concepts", default=None, help="concepts.json: class order and caption templates")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", "-o", default=None, help="output folder (default runs/finetune)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other FinetuneConfig fields, e.g. layer_decay=0.65 pooling=cls (values parsed as JSON)")
    p.set_defaults(func=cmd_finetune)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.loop import main as train_main

    return train_main([args.config, "--set", *args.set] if args.set else [args.config])


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..finetune import FinetuneConfig, finetune

    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    flags = {"model": args.model, "train_manifest": args.train, "test_manifest": args.test, "mode": args.mode,
             "modality": args.modality, "output_dir": args.out, "concepts": args.concepts, "steps": args.steps,
             "bpe_dir": args.bpe_dir}
    raw.update({k: v for k, v in flags.items() if v is not None})
    raw.update(parse_set(args.set))
    missing = [k for k in ("model", "train_manifest") if k not in raw]
    if missing:
        raise ValueError(f"give {missing} (flags --model/--train, or a config file)")
    metrics = finetune(FinetuneConfig.from_dict(raw))
    print(f"mode {metrics['mode']} on {metrics['modality']}: {metrics['train_items']} training items, "
          f"{metrics['classes']} classes, loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f}")
    if "zero_shot_accuracy_before" in metrics:
        print(f"zero-shot accuracy before: {metrics['zero_shot_accuracy_before']:.3f}")
    if "accuracy" in metrics:
        print(f"test accuracy after ({metrics['test_items']} items): {metrics['accuracy']:.3f}")
    print(f"wrote {raw.get('output_dir', 'runs/finetune')} ({metrics['minutes']:.1f} min)")
    return 0

"""`onepeace eval`: zero-shot classification and retrieval on manifests."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Flags, load_model


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("eval", parents=[flags.model, flags.bpe, flags.quiet],
                       help="zero-shot classification and retrieval on manifests")
    p.add_argument("manifests", nargs="+", help="JSONL manifests with a media file, text and label")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--concepts", default=None, help="concepts.json with caption templates per class (prompt ensembles)")
    p.add_argument("--out", "-o", default=None, help="write all numbers as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.zero_shot import evaluate, load_concepts

    model = load_model(args)
    result = evaluate(model, args.manifests, concepts=load_concepts(args.concepts), progress=not args.quiet)
    for kind, top1 in result["zero_shot"].items():
        print(f"zero-shot {kind:<6} top-1 {top1:.3f}  ({result['counts'][kind]} items, {len(result['classes'])} classes)")
    print(f"{'query -> key':<16} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mAP':>6}")
    for pair, v in result["retrieval"].items():
        print(f"{pair:<16} " + " ".join(f"{v.get(k, float('nan')):>6.3f}" for k in ("r1", "r5", "r10", "map")))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0

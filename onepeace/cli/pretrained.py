"""`onepeace pretrained` (the released checkpoints) and `onepeace download NAME` (fetch, check, convert)."""
from __future__ import annotations

import argparse
import json

from .common import Flags


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("pretrained", help="list the released checkpoints (name, task, modalities, URL)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrained)

    p = sub.add_parser("download", parents=[flags.quiet],
                       help="fetch a released checkpoint into ${ONEPEACE_CACHE:-~/.cache/onepeace} (resumable, "
                            "sha256-checked) and convert it once to safetensors")
    p.add_argument("name", help="a name from `onepeace pretrained`, e.g. one-peace")
    p.add_argument("--no-convert", action="store_true", help="keep the released .pt only")
    p.set_defaults(func=cmd_download)


def cmd_pretrained(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..hub import cache_dir, list_pretrained

    rows = list_pretrained()
    if args.json:
        print(json.dumps([asdict(c) for c in rows], indent=2))
        return 0
    print(f"{'name':<22} {'modalities':<18} {'loads':<6} task")
    for c in rows:
        print(f"{c.name:<22} {','.join(c.modalities):<18} {'yes' if c.loadable else 'no':<6} {c.task}")
    print(f"\ncache: {cache_dir()} (set ONEPEACE_CACHE to move it); `onepeace download NAME` or onepeace.load(NAME)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..hub import download, resolve

    path = download(args.name, progress=not args.quiet) if args.no_convert \
        else resolve(args.name, progress=not args.quiet)
    print(path)
    return 0

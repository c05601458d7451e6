"""The `onepeace` command line. Each module holds one group of commands: its flags (a `register`
function) beside its handlers; flags several commands take are declared once in `common`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import demo, embed, evaluate, export, heads, models, pretrained, search, serve, train, zero_shot
from .common import shared_flags

# in the order `onepeace --help` lists them
COMMAND_GROUPS = (embed, search, zero_shot, serve, models, export, pretrained, train, heads, demo, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onepeace", description="ONE-PEACE embeddings without fairseq.")
    sub = parser.add_subparsers(dest="command", required=True)
    flags = shared_flags()
    for group in COMMAND_GROUPS:
        group.register(sub, flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..checkpoint import CheckpointError
    from ..hub import DownloadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DownloadError, FileNotFoundError, KeyError, ValueError, ImportError) as e:
        print(f"onepeace {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

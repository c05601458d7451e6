"""`onepeace index` (a folder -> a searchable index) and `onepeace search` (composed queries)."""
from __future__ import annotations

import argparse
import json

from .common import Flags, load_model


def register(sub, flags: Flags) -> None:
    _register_index(sub, flags)
    _register_search(sub, flags)


def _register_index(sub, flags: Flags) -> None:
    p = sub.add_parser("index", parents=[flags.model, flags.bpe, flags.quiet],
                       help="embed every file of a known modality under a folder into a searchable index")
    p.add_argument("folder", help="folder to index recursively (media files, .txt/.jsonl lines as texts)")
    p.add_argument("--model", "-m", required=True, help="released .pt checkpoint or converted folder")
    p.add_argument("--out", "-o", required=True, help="index folder (created; rerun to resume or update)")
    p.add_argument("--chunk-files", type=int, default=256, help="files per committed shard (default 256)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--ivf-threshold", type=int, default=50_000,
                   help="per modality: above this many vectors use an IVF index instead of exact search")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default nlist/8, >= 8)")
    p.add_argument("--rank", type=int, default=None, help="this process's share (default: torchrun's RANK, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of shares (default: WORLD_SIZE, else 1)")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="when another run holds --out: wait at most this long (0: fail at once; default: wait)")
    p.set_defaults(func=cmd_index)


class _QueryPartAction(argparse.Action):
    """--MODALITY VALUE: appends (modality, value) to args.parts, keeping the command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        parts = list(getattr(namespace, "parts", None) or [])
        parts.append((self.const, values))
        setattr(namespace, "parts", parts)


def _register_search(sub, flags: Flags) -> None:
    from ..registry import list_modalities

    p = sub.add_parser("search", parents=[flags.model, flags.bpe],
                       help="search an index with queries of any modality (weighted, composed)")
    p.add_argument("index")
    p.set_defaults(parts=[])
    short = set()
    for m in list_modalities():  # one repeatable flag per registered modality: --text, --image, ...
        names = [f"--{m}"] + ([f"-{m[0]}"] if m[0] not in short and m[0] not in "kwmoq" else [])
        short.add(m[0])
        p.add_argument(*names, dest=f"query_{m}", action=_QueryPartAction, const=m, metavar=m.upper(),
                       help=f"one {m} query part: a file, or the text for text (repeatable)")
    p.add_argument("--weights", "-w", nargs="+", default=None,
                   help="one number per query part (in command-line order) or modality=number")
    p.add_argument("--modality", default=None, help="only results of this modality")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="JSON output instead of a table")
    p.add_argument("--model", "-m", default=None, help="default: the model the index was built with")
    p.set_defaults(func=cmd_search)


def cmd_index(args: argparse.Namespace) -> int:
    from ..index import IndexConfig, build_index

    config = IndexConfig(chunk_files=args.chunk_files, batch_size=args.batch_size, ivf_threshold=args.ivf_threshold,
                         nlist=args.nlist, nprobe=args.nprobe)
    model = load_model(args)
    report = build_index(args.folder, args.out, model, args.model, config, rank=args.rank, world_size=args.world_size,
                         progress=not args.quiet, lock_timeout=args.lock_timeout)
    print(f"{args.out}: {report.summary()}")
    for path, why in report.failed:
        print(f"  failed {path}: {why}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..index import QueryPart, SearchIndex, embed_query, format_table, parse_weights

    if not args.parts:
        raise ValueError("give at least one query part (--text, --image, --audio, ...)")
    weights = parse_weights(args.weights, args.parts)
    parts = [QueryPart(m, v, w, name=f"--{m} {v!r}") for (m, v), w in zip(args.parts, weights)]
    index = SearchIndex(args.index)
    args.model = index.query_model_path(args.model)
    model = load_model(args)
    hits = index.search(embed_query(model, parts), k=args.k, modality=args.modality)
    if args.json:
        print(json.dumps({"query": [{"modality": p.modality, "value": str(p.value), "weight": p.weight} for p in parts],
                          "modality": args.modality, "results": hits}, indent=2))
    else:
        print(format_table(hits, index.info.get("root")))
    return 0

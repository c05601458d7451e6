"""`onepeace serve`: the HTTP JSON API and search page over an index."""
from __future__ import annotations

import argparse

from .common import Flags


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("serve", parents=[flags.device, flags.bpe],
                       help="HTTP JSON API + web page to search an index (default: the demo model and data)")
    p.add_argument("index", nargs="?", default=None,
                   help="index folder (default: index the demo data with runs/demo/model on first use)")
    p.add_argument("--model", "-m", default=None, help="default: the index's model (runs/demo/model for the demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest accepted upload (default 10 MB)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for the model (default 1: lowest latency for small models on shared CPUs; "
                        "0 = torch's default)")
    p.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
                         torch_threads=args.torch_threads, log_requests=args.log_requests)
    return serve(args.index, model_path=args.model, config=config, device=args.device, bpe_dir=args.bpe_dir)

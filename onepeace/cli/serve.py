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
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header is NAME (repeatable; default: localhost, "
                        "127.0.0.1, ::1 and the --host address; '*' = any, only behind a proxy that checks it)")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest accepted upload (default 10 MB)")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="seconds a connection may wait without a complete request head before it is closed (default 5)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds for a request body to arrive (else 408) and for the model's answer (else 503) (default 60)")
    p.add_argument("--max-model-requests", type=int, default=64,
                   help="search/embed/zero-shot requests in progress at once; beyond: 503 + Retry-After (default 64)")
    p.add_argument("--max-uploads", type=int, default=2,
                   help="requests with a body over 1 MiB read at once; beyond: 503 + Retry-After (default 2)")
    p.add_argument("--max-batch", type=int, default=32, help="concurrent queries embedded in one model call (default 32)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for the model (default 1: lowest latency for small models on shared CPUs; "
                        "0 = torch's default)")
    p.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, serve

    for name in ("idle_timeout", "request_timeout", "max_model_requests", "max_uploads", "max_batch", "max_upload_mb"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    config = ServeConfig(host=args.host, port=args.port, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
                         torch_threads=args.torch_threads, log_requests=args.log_requests,
                         allow_hosts=tuple(args.allow_host), idle_timeout=args.idle_timeout,
                         request_timeout=args.request_timeout, max_model_requests=args.max_model_requests,
                         max_uploads=args.max_uploads, max_batch=args.max_batch)
    return serve(args.index, model_path=args.model, config=config, device=args.device, bpe_dir=args.bpe_dir)

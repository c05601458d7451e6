"""Loopback load test of `onepeace serve`: requests/s and p50/p99 latency of /api/search for several
numbers of concurrent clients, each a closed loop over text queries (and optionally an audio upload).

    python benchmarks/serve_load.py INDEX                       # starts a server on a free port itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000  # an already running `onepeace serve`
    python benchmarks/serve_load.py INDEX --clients 1 4 16 --seconds 10 --audio ../shared/assets/cow.flac

Every query embeds its text (or audio) with the model (one at a time, under the server's model
lock) and searches the FAISS index; nothing is cached. Errors must be 0.
"""
from __future__ import annotations

import argparse
import base64
import sys
import threading

TEXTS = ["a silhouette of a cow", "the number seven", "a picture of a bird", "an elephant", "the digit zero",
         "a drawing of a horse", "a giraffe", "the number three"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", nargs="?", help="index folder to serve (in this process)")
    ap.add_argument("--url", help="an already running server instead")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--modality", default="image", help="target modality of the queries ('' for all)")
    ap.add_argument("--torch-threads", type=int, default=1, help="as `onepeace serve --torch-threads` (in-process server)")
    ap.add_argument("--audio", default=None, help="also send this audio file as an upload in every 4th query")
    args = ap.parse_args()
    if not args.index and not args.url:
        ap.error("give an INDEX or --url")

    from onepeace.serve.loadtest import LoadResult, run_load

    server = None
    url = args.url
    if url is None:
        import torch

        import onepeace
        from onepeace.index import SearchIndex
        from onepeace.serve import ServeConfig, make_server

        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        index = SearchIndex(args.index)
        server = make_server(index, onepeace.load(index.info["model"]), ServeConfig(port=0))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = "http://%s:%d" % server.server_address[:2]
    bodies = [{"text": t, "modality": args.modality or None, "k": 10} for t in TEXTS]
    if args.audio:
        data = base64.b64encode(open(args.audio, "rb").read()).decode()
        audio = {"parts": [{"modality": "audio", "data": data, "filename": args.audio}], "modality": args.modality or None}
        bodies = [b for t in bodies[::3] for b in (t, audio)] + bodies
    run_load(url, bodies[:2], clients=1, seconds=1.0)  # warm-up (tokenizer, first allocations)
    print(f"server {url}; {len(bodies)} distinct queries; {args.seconds:.0f} s per row")
    print(LoadResult.HEADER)
    failed = False
    for n in args.clients:
        result = run_load(url, bodies, clients=n, seconds=args.seconds)
        print(result.line(), flush=True)
        if result.errors:
            print(f"  first error: {result.first_error}", file=sys.stderr)
            failed = True
    if server is not None:
        server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

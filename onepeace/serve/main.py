"""`onepeace serve` put together: the service, the ASGI app and uvicorn (see onepeace.serve.server)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..index.search import SearchIndex
from .server import DEMO_MODEL, LOCAL_HOSTS, SearchService, ServeConfig, demo_index


def make_server(index: SearchIndex, model, config: ServeConfig = ServeConfig()):
    """A ready (bound, not yet serving) server: ``serve_forever()`` (blocks), ``shutdown()`` (from
    another thread), ``server_close()``; ``server_address`` is (host, port), port 0 picks a free one."""
    from .runner import Server, require_asgi

    require_asgi()
    from .app import build_app

    service = SearchService(index, model, config)
    server = Server(build_app(service), config, on_close=service.worker.close)
    server.service = service  # for tests and benchmarks: the model worker's counters, the index
    return server


def serve(index_path: str | os.PathLike | None = None, model_path: str | os.PathLike | None = None,
          config: ServeConfig = ServeConfig(), device: str = "cpu", bpe_dir: str | None = None) -> int:
    """Serve until interrupted (Ctrl-C). No index: the demo (see :func:`demo_index`)."""
    import onepeace

    from .runner import require_asgi

    require_asgi()  # before the model loads
    if index_path is None:
        index_path = demo_index(Path(model_path) if model_path else DEMO_MODEL)
    index = SearchIndex(index_path)
    model = onepeace.load(index.query_model_path(model_path), device=device)
    if bpe_dir:
        model.tokenizer = onepeace.get_tokenizer(bpe_dir)
    if config.torch_threads > 0:
        import torch

        torch.set_num_threads(config.torch_threads)
    server = make_server(index, model, config)
    host, port = server.server_address[:2]
    stats = index.stats()
    print(f"serving {index_path} ({', '.join(f'{n} {m}' for m, n in stats['searchable'].items())}) "
          f"on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    if host in ("0.0.0.0", "::") and "*" not in config.allow_hosts:
        print(f"listening on all addresses, but only Host names {', '.join((*LOCAL_HOSTS, *config.allow_hosts))} "
              "are served: add this machine's name with --allow-host NAME", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        index.close()
    return 0

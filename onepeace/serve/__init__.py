"""`onepeace serve`: HTTP JSON API + web page over an index (see :mod:`onepeace.serve.server`)."""
from .main import make_server, serve
from .server import SearchService, ServeConfig, demo_index

__all__ = ["SearchService", "ServeConfig", "demo_index", "make_server", "serve"]

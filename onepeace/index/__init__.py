"""Index a folder of images, audio and texts (SQLite metadata + FAISS) and search it with composed
queries. Needs the `serve` extra (faiss-cpu); see :mod:`onepeace.index.build`."""
from .build import IndexConfig, IndexReport, build_index
from .search import QueryPart, SearchIndex, embed_query, format_table, parse_weights
from .store import IndexStore, model_id

__all__ = ["IndexConfig", "IndexReport", "IndexStore", "QueryPart", "SearchIndex", "build_index", "embed_query",
           "format_table", "model_id", "parse_weights"]

"""The API of `onepeace serve` as an OpenAPI 3.1 document (GET /openapi.json), with the configured
limits in the schemas. tests/test_hostile_server.py checks that it lists exactly the app's routes."""
from __future__ import annotations

from typing import Any

ERROR = {"description": "refused: the message names the bad input",
         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
BUSY = {"description": "busy (model work or large uploads at their cap, or no answer within the request "
                       "timeout): retry after the Retry-After header's seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _post(summary: str, request: str, response: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "requestBody": {"required": True, **_json(request)},
        "responses": {"200": {"description": "OK", **_json(response)},
                      **{code: ERROR for code in ("400", "408", "411", "413", "415", "422")}, "503": BUSY}}}


def _get(summary: str, content: dict[str, Any], params: list | None = None) -> dict[str, Any]:
    op = {"summary": summary, "responses": {"200": {"description": "OK", "content": content}, "404": ERROR}}
    return {"get": {**op, "parameters": params} if params else op}


def _schemas(config) -> dict[str, Any]:
    number = {"type": "number", "minimum": -config.max_weight, "maximum": config.max_weight, "default": 1}
    part = {"type": "object", "description": "a text ({modality, text}) or an uploaded file ({modality, data, filename})",
            "properties": {"modality": {"type": "string"}, "weight": number,
                           "text": {"type": "string", "maxLength": config.max_text_chars},
                           "data": {"type": "string", "contentEncoding": "base64",
                                    "description": f"the file, at most {config.max_upload_bytes} bytes"},
                           "filename": {"type": "string"}}}
    parts = {"type": "array", "items": {"$ref": "#/components/schemas/Part"}, "minItems": 1, "maxItems": config.max_parts}
    hit = {"type": "object", "properties": {
        "rank": {"type": "integer"}, "score": {"type": "number"}, "id": {"type": "integer"},
        "modality": {"type": "string"}, "name": {"type": "string"}, "display_name": {"type": "string"},
        "path": {"type": "string"}, "text": {"type": ["string", "null"]},
        "file_url": {"type": "string"}, "thumb_url": {"type": "string"}}}
    vector = {"type": "array", "items": {"type": "number"}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Part": part,
        "SearchRequest": {"type": "object", "properties": {
            "parts": parts, "text": {"type": "string", "description": "short for one text part"},
            "modality": {"type": ["string", "null"], "description": "target modality (null: all)"},
            "k": {"type": "integer", "minimum": 1, "maximum": config.max_k, "default": 10}}},
        "SearchResponse": {"type": "object", "properties": {
            "results": {"type": "array", "items": hit}, "took_ms": {"type": "number"}}},
        "EmbedRequest": {"type": "object", "required": ["parts"], "properties": {"parts": parts}},
        "EmbedResponse": {"type": "object", "properties": {
            "dim": {"type": "integer"}, "composed": vector, "embeddings": {"type": "array", "items": vector}}},
        "ZeroShotRequest": {"type": "object", "required": ["labels", "parts"], "properties": {
            "labels": {"oneOf": [{"type": "array", "items": {"type": "string"}, "maxItems": config.max_labels},
                                 {"type": "string", "description": "comma-separated"}]},
            "parts": {**parts, "maxItems": 1, "description": "one part; an upload may leave out modality"},
            "k": {"type": "integer", "minimum": 1}}},
        "ZeroShotResponse": {"type": "object", "properties": {
            "modality": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
            "took_ms": {"type": "number"}, "results": {"type": "array", "items": {"type": "object", "properties": {
                "label": {"type": "string"}, "prob": {"type": "number"}}}}}},
    }


def document(config) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes in onepeace.serve.app (limits from `config`)."""
    item_id = [{"name": "item_id", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1}}]
    obj = {"type": "object"}
    paths = {
        "/": _get("the search page", {"text/html": {}}),
        "/index.html": _get("the search page", {"text/html": {}}),
        "/api/health": _get("liveness and item count", {"application/json": {"schema": obj}}),
        "/api/stats": _get("index statistics", {"application/json": {"schema": obj}}),
        "/openapi.json": _get("this document", {"application/json": {"schema": obj}}),
        "/api/search": _post("search the index with a composed query", "SearchRequest", "SearchResponse"),
        "/api/embed": _post("embed query parts", "EmbedRequest", "EmbedResponse"),
        "/api/zero-shot": _post("rank labels for one input", "ZeroShotRequest", "ZeroShotResponse"),
        "/api/item/{item_id}/file": _get("an indexed whole file", {"*/*": {}}, item_id),
        "/api/item/{item_id}/thumb": _get("a PNG thumbnail of an indexed image", {"image/png": {}}, item_id),
    }
    return {"openapi": "3.1.0",
            "info": {"title": "onepeace serve", "version": "1",
                     "description": "Search an index built by `onepeace index`. Every error is JSON {\"error\": ...}. "
                                    "POST bodies must be application/json; a Host outside the allow-list gets 400."},
            "paths": paths, "components": {"schemas": _schemas(config)}}

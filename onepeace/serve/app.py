"""The ASGI app of `onepeace serve` (Starlette): routes over a :class:`SearchService`, and the
guards every request passes before any work is done.

    Host allow-list   HostGuard: a Host header not in the list gets 400 (a page on another site that
                      points its own DNS name at 127.0.0.1 cannot read the API: DNS rebinding)
    JSON only         POST bodies must be Content-Type: application/json (else 415), have a
                      Content-Length (411) no larger than ServeConfig.max_body_bytes (413), arrive
                      within request_timeout (408), and parse as one JSON object (400; too deep or
                      too-long numbers are 400 too, NaN/Infinity literals are refused)
    model work cap    Gate: at most max_model_requests search/embed/zero-shot requests in progress
                      and max_uploads large bodies; beyond: 503 with Retry-After
    errors            every refusal and every exception is a JSON {"error": ...} (4xx/5xx); a bug's
                      traceback goes to the server log only; a client that hangs up is not an error
"""
from __future__ import annotations

import json
import logging
import traceback
from contextlib import contextmanager
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .openapi import document
from .server import LOCAL_HOSTS, PAGE, RequestError, SearchService, parse_item_id

log = logging.getLogger("onepeace.serve")
POST_ROUTES = {"/api/search": "search", "/api/embed": "embed", "/api/zero-shot": "zero_shot"}
# on answers to a body that will not be read (no length, or over the limit): close the connection.
# Other early answers (415, 503) keep it: uvicorn discards the rest of a body it was not asked for
CLOSE = {"Connection": "close"}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def host_name(header: str) -> str:
    """'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1' (the name a Host header asks for)."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") <= 1 else header


def allowed_hosts(config) -> frozenset[str] | None:
    """The Host names served (None: any, from --allow-host '*'): the loopback names, the bound
    address unless it is a wildcard, and the configured extra names."""
    extra = {host_name(h) if h != "*" else "*" for h in config.allow_hosts}
    if "*" in extra:
        return None
    bound = {host_name(config.host)} - {"0.0.0.0", "::", ""}
    return frozenset(LOCAL_HOSTS) | bound | extra


class HostGuard:
    """ASGI middleware: refuse a Host outside the allow-list; add X-Content-Type-Options to answers."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        name = host_name(host)
        if self.allowed is not None and name not in self.allowed and not name.endswith(".localhost"):
            msg = (f"Host {host[:100]!r} is not served (allowed: {', '.join(sorted(self.allowed))}); "
                   "start the server with --allow-host NAME to serve it under another name")
            return await error(400, msg, CLOSE)(scope, receive, send)

        async def send_nosniff(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_nosniff)


class Gate:
    """Admission of model requests (event-loop thread only): counts in progress, refuses beyond."""

    def __init__(self, service: SearchService):
        self.service, self.config = service, service.config
        self.model_requests = 0
        self.uploads = 0

    @contextmanager
    def admit(self, heavy: bool):
        busy = None
        if self.model_requests >= self.config.max_model_requests:
            busy = f"{self.model_requests} model requests in progress (at most {self.config.max_model_requests})"
        elif heavy and self.uploads >= self.config.max_uploads:
            busy = f"{self.uploads} large uploads in progress (at most {self.config.max_uploads})"
        if busy:
            # no Connection: close: uvicorn discards the unread body (nothing is kept), and the client,
            # still sending, reads this answer instead of a connection reset
            raise RequestError(503, f"the server is busy: {busy}; retry later",
                               {"Retry-After": str(self.service.retry_after())})
        self.model_requests += 1
        self.uploads += heavy
        try:
            yield
        finally:
            self.model_requests -= 1
            self.uploads -= heavy


class ClientGone(Exception):
    """The client hung up: nothing to answer, nothing to log."""


def guarded(fn: Callable) -> Callable:
    """An endpoint whose RequestError is its JSON answer and whose bug is a JSON 500 (logged)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except RequestError as e:
            return error(e.status, str(e), e.headers)
        except (ClientGone, ClientDisconnect):
            return Response(status_code=400)  # never sent: uvicorn drops writes to a closed connection
        except RecursionError:  # only a deeply nested request gets here
            return error(400, "the request is nested too deeply")
        except Exception as e:
            log.error("internal error in %s %s:\n%s", request.method, request.url.path, traceback.format_exc())
            return error(500, f"internal error ({type(e).__name__}); the server log has the details")

    endpoint.__name__ = getattr(fn, "__name__", "endpoint")
    return endpoint


async def read_body(request: Request, limit: int, timeout: float) -> bytearray:
    """The body of a JSON POST, after the header checks (411, 413, 415) and within `timeout` s (408)."""
    import anyio

    length = request.headers.get("content-length", "")
    if not (length.isascii() and length.isdigit()):
        raise RequestError(411, "a Content-Length header is required", CLOSE)
    if int(length) > limit:
        raise RequestError(413, f"request body of {int(length)} bytes is too large (limit {limit})", CLOSE)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {ctype[:60] or 'none'!r}")
    buf = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                buf += chunk
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s", CLOSE) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return buf


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes | bytearray) -> dict[str, Any]:
    """One JSON object, or a 400 naming what is wrong (also for nesting deeper than Python's recursion
    limit and for integers over Python's 4300-digit limit: both would be 500s otherwise)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "the request body is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digit limit, NaN / Infinity
        raise RequestError(400, f"the request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def build_app(service: SearchService) -> HostGuard:
    """The routes of the module docstring of onepeace.serve.server, behind the guards above."""
    config, gate, page = service.config, Gate(service), PAGE.read_bytes()

    def model_route(method: Callable[[dict[str, Any]], dict[str, Any]]):
        async def run(request: Request) -> Response:
            length = request.headers.get("content-length", "")
            heavy = length.isascii() and length.isdigit() and int(length) > config.large_body_bytes
            with gate.admit(heavy):
                raw = await read_body(request, config.max_body_bytes, config.request_timeout)
                body = await run_in_threadpool(parse_json, raw) if heavy else parse_json(raw)
                del raw
                return JSONResponse(await run_in_threadpool(method, body))
        return guarded(run)

    async def thumb(request: Request) -> Response:
        png = await run_in_threadpool(service.thumbnail, parse_item_id(request.path_params["item_id"]))
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def file(request: Request) -> Response:
        path = await run_in_threadpool(service.item_file, parse_item_id(request.path_params["item_id"]))
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    async def json_of(fn) -> Response:
        return JSONResponse(await run_in_threadpool(fn))

    routes = [
        Route("/", guarded(lambda r: _page(page)), methods=["GET"]),
        Route("/index.html", guarded(lambda r: _page(page)), methods=["GET"]),
        Route("/api/health", guarded(lambda r: json_of(service.health)), methods=["GET"]),
        Route("/api/stats", guarded(lambda r: json_of(service.index.stats)), methods=["GET"]),
        Route("/openapi.json", guarded(lambda r: _openapi(config)), methods=["GET"]),
        *[Route(path, model_route(getattr(service, name)), methods=["POST"]) for path, name in POST_ROUTES.items()],
        Route("/api/item/{item_id}/file", guarded(file), methods=["GET"]),
        Route("/api/item/{item_id}/thumb", guarded(thumb), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _last_resort})
    return HostGuard(app, allowed_hosts(config))


async def _page(page: bytes) -> Response:
    return HTMLResponse(page)


async def _openapi(config) -> Response:
    return JSONResponse(document(config))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """The router's 404 / 405 as JSON."""
    path = request.url.path[:200]
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return error(405, f"no {request.method} endpoint {path} (it takes {allow})", {"Allow": allow})
    return error(exc.status_code, f"no such resource {path}" if exc.status_code == 404 else str(exc.detail))


async def _last_resort(request: Request, exc: Exception) -> Response:
    """An exception outside the endpoints (Starlette logs it too): still a JSON 500 without a traceback."""
    return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

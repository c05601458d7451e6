"""The HTTP layer of `onepeace serve`: uvicorn (h11) on a socket bound up front, plus the one timer
uvicorn lacks.

uvicorn closes a keep-alive connection `timeout_keep_alive` seconds after its last answer, but a
connection that never sends a request (or sends its head a byte at a time) is never timed out.
`TimedH11Protocol` gives every connection `idle_timeout` seconds - from its opening or from its last
answer - to deliver a complete request head; otherwise it is closed. The request body has its own
deadline in the app (408). Malformed HTTP gets uvicorn's 400, as JSON like every other error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from typing import Any, Callable

ASGI_EXTRA = "serve"
BACKLOG = 2048


def require_asgi() -> None:
    """ImportError naming the extra when Starlette or uvicorn is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"`onepeace serve` needs Starlette and uvicorn ({e}): "
                          f"pip install 'onepeace[{ASGI_EXTRA}]'") from None


def _protocol_class(idle_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request head (see the module docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(idle_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # idle, or a head still incomplete: nothing to answer

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._arm()  # before super(): it may start a pipelined request, which disarms
            super().on_response_complete()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived
                self._disarm()

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: JSON like every other error
            body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return TimedH11Protocol


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), IPv6 for an IPv6 address. It listens
    from now on, so clients that connect before the loop starts wait in the backlog, not refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP, and
    # with Nagle on, a keep-alive answer's body waits ~40 ms for the client's delayed ACK of its head
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)
    return sock


class Server:
    """uvicorn serving `app` on a socket bound now, with the interface of socketserver's servers:
    serve_forever() blocks (in any thread), shutdown() stops it from another thread and waits,
    server_close() releases the socket; server_address is the bound (host, port)."""

    def __init__(self, app: Any, config, on_close: Callable[[], None] | None = None):
        import uvicorn

        self.app = app
        self.socket = bind(config.host, config.port)
        self.server_address = self.socket.getsockname()[:2]
        self._on_close = on_close
        self._done = threading.Event()
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # no banner; warnings stay
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            app, http=_protocol_class(config.idle_timeout), lifespan="off", log_config=None,
            access_log=config.log_requests, server_header=False, date_header=True,
            timeout_keep_alive=max(1, int(config.idle_timeout)), backlog=BACKLOG, timeout_graceful_shutdown=5))
        if config.log_requests:
            _log_to_stderr("uvicorn.access")
        _log_to_stderr("uvicorn.error")

    def serve_forever(self) -> None:
        self._done.clear()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._done.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        if self._on_close is not None:
            self._on_close()


def _log_to_stderr(name: str) -> None:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False

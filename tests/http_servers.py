"""Real HTTP servers for middleware tests: uvicorn for ASGI apps, threaded wsgiref for WSGI.

Each starts in a thread on a free 127.0.0.1 port and is stopped, and waited for,
when its ``with`` block ends.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

STOP_WITHIN = 10.0  # seconds a server may take to start or stop before the test fails


@contextmanager
def running_uvicorn(app: Any, *, lifespan: str = "off") -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn; yield its base URL.

    ``lifespan="on"`` runs the app's startup and shutdown (an app that opens
    clients of its own closes them there, on its own event loop).
    """
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, a response whose head and body
    # are written apart waits ~40 ms on the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan, ws="none"
    )
    ready = threading.Event()

    class Server(uvicorn.Server):  # type: ignore[misc,name-defined]
        async def startup(self, sockets: Any = None) -> None:
            try:
                await super().startup(sockets)
            finally:
                ready.set()  # started, or failed to: either way, stop waiting

    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not ready.wait(STOP_WITHIN) or not server.started:
            pytest.fail("uvicorn did not start within 10 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_WITHIN)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop within 10 s"


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    # Request threads are joined when the server closes: no handler outlives its test.
    daemon_threads = False
    block_on_close = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log on stderr


@contextmanager
def running_wsgi(app: Any) -> Iterator[str]:
    """Serve the WSGI ``app`` with a threaded wsgiref server; yield its base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(STOP_WITHIN)
        assert not thread.is_alive(), "the WSGI server did not stop within 10 s"

"""DeadlineMiddleware, AdminApp and the httpx transports' lazy set-up, in their corners.

A handler that swallows its cancellation, background work after an answer, spans on
WSGI threads that serve many requests, a breaker asked for before the first request,
a forked child's connections, switch names with slashes: each under real servers
(uvicorn; wsgiref), with the fake clock where time matters.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest

import reskit.asgi
import reskit.httpx
import reskit.wsgi
from http_servers import STOP_WITHIN, running_uvicorn, running_wsgi
from reskit import Policy, Retry
from reskit.testing import FakeClock

WAIT = 10.0  # seconds an expected event may take before the test fails
HEADER = "X-Request-Timeout-Ms"


# -- ASGI: a deadline that fired must read as one ------------------------------------------


class Handler:
    """A Starlette app whose handlers report to the test thread."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.done = threading.Event()
        self.ended: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.release: asyncio.Event | None = None

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def swallow(request: Request) -> JSONResponse:
            # A handler that catches the cancellation (to clean up, or by accident with a
            # broad except) and answers anyway, after its caller's budget ran out.
            self.entered.set()
            try:
                await asyncio.wait_for(asyncio.Event().wait(), WAIT)
            except asyncio.CancelledError:
                self.ended.append("cancelled")
            return JSONResponse({"late": True})

        async def later() -> None:
            self.loop = asyncio.get_running_loop()
            self.release = asyncio.Event()
            self.entered.set()
            try:
                await asyncio.wait_for(self.release.wait(), WAIT)
                self.ended.append("finished")
            except asyncio.CancelledError:
                self.ended.append("cancelled")
                raise
            finally:
                self.done.set()

        async def background(request: Request) -> JSONResponse:
            # Starlette runs a background task after the response has ended.
            return JSONResponse({"queued": True}, background=BackgroundTask(later))

        return Starlette(routes=[Route("/swallow", swallow), Route("/background", background)])


def test_asgi_a_handler_that_swallows_the_cancellation_still_answers_504(
    clock: FakeClock,
) -> None:
    handler = Handler()
    app = reskit.asgi.DeadlineMiddleware(handler.app())
    with running_uvicorn(app) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        result: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: result.append(client.get("/swallow", headers={HEADER: "300"}))
        )
        caller.start()
        assert handler.entered.wait(WAIT)
        clock.advance(0.4)  # past the budget: the middleware cancels the handler
        caller.join(WAIT)
    assert handler.ended == ["cancelled"]
    # The budget ran out before the response started: the caller is told so, as the
    # middleware's contract says, not handed a 200 made after it gave up.
    assert result[0].status_code == 504


def test_asgi_span_says_exceeded_when_the_handler_swallowed_the_cancellation(
    clock: FakeClock, spans: Any
) -> None:
    handler = Handler()
    app = reskit.asgi.DeadlineMiddleware(handler.app())
    with running_uvicorn(app) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        caller = threading.Thread(target=lambda: client.get("/swallow", headers={HEADER: "300"}))
        caller.start()
        assert handler.entered.wait(WAIT)
        clock.advance(0.4)
        caller.join(WAIT)
    assert handler.ended == ["cancelled"]
    (server,) = [span for span in spans.spans() if span.kind.name == "SERVER"]
    # The middleware's own timer fired and cancelled the handler: the budget ran out.
    assert server.attributes["reskit.deadline.exceeded"] is True


def test_asgi_background_work_after_a_complete_response_is_not_cancelled(
    clock: FakeClock, spans: Any
) -> None:
    handler = Handler()
    app = reskit.asgi.DeadlineMiddleware(handler.app())
    with running_uvicorn(app) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        response = client.get("/background", headers={HEADER: "300"})
        assert response.status_code == 200  # answered well inside its budget
        assert handler.entered.wait(WAIT)
        clock.advance(0.4)  # the caller's budget runs out after it has its answer
        assert handler.loop is not None
        assert handler.release is not None
        handler.loop.call_soon_threadsafe(handler.release.set)
        assert handler.done.wait(WAIT)
    # The response had ended: the budget was met, and the task Starlette runs after
    # it (an email, a cache fill) is the application's, not the caller's, to stop.
    assert handler.ended == ["finished"]
    (server,) = [span for span in spans.spans() if span.kind.name == "SERVER"]
    assert server.attributes["reskit.deadline.exceeded"] is False


# -- WSGI: the server span must end in the context it began in -----------------------------


def wsgi_hello(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def running_single_threaded_wsgi(app: Any) -> Iterator[str]:
    """wsgiref's plain server: every request on the one serving thread (as a thread pool
    server such as waitress or gunicorn's gthread worker reuses its threads)."""
    server = make_server("127.0.0.1", 0, app, server_class=WSGIServer, handler_class=_QuietHandler)
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


def test_wsgi_deadline_span_ends_in_the_context_it_began_in(
    clock: FakeClock, spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = reskit.wsgi.DeadlineMiddleware(wsgi_hello, default=5.0)
    with caplog.at_level(logging.ERROR), running_wsgi(app) as url:
        assert httpx.get(url + "/one", timeout=WAIT).status_code == 200
    # ServerSpan.begin attaches the span in the server thread's context; the span is
    # ended (and detached) inside the request's copy of it, which OpenTelemetry refuses.
    failures = [r for r in caplog.records if "Failed to detach context" in r.getMessage()]
    assert failures == []


def test_wsgi_deadline_span_does_not_leak_into_the_next_request_on_the_thread(
    clock: FakeClock, spans: Any
) -> None:
    app = reskit.wsgi.DeadlineMiddleware(wsgi_hello, default=5.0)
    with running_single_threaded_wsgi(app) as url:
        for path in ("/one", "/two", "/three"):
            assert httpx.get(url + path, timeout=WAIT).status_code == 200
    server = [span for span in spans.spans() if span.kind.name == "SERVER"]
    # The first request's span stays current on the server thread: the next requests
    # find it, take it for an outer middleware's span, and get no span of their own.
    assert sorted(span.attributes["url.path"] for span in server) == ["/one", "/three", "/two"]


# -- the transports' lazy set-up --------------------------------------------------------


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_asking_for_a_breaker_before_the_first_request_does_not_pick_the_library(
    kind: str,
) -> None:
    from reskit import CircuitBreaker

    policy = Policy("up", retry=Retry(attempts=2), breaker=CircuitBreaker(fail_max=5))
    with running_uvicorn(ok_app) as url:
        authority = url.removeprefix("http://")
        if kind == "sync":
            transport = reskit.httpx.Transport(policy)
            # An application inspects (or forces open) a host's breaker at start-up...
            assert transport.breaker(authority) is not None
            # ...and then sends through an ordinary httpx client, as the docs show.
            with httpx.Client(transport=transport) as client:
                assert client.get(url).status_code == 200
        else:
            transport_a = reskit.httpx.AsyncTransport(policy)
            assert transport_a.breaker(authority) is not None

            async def send() -> int:
                async with httpx.AsyncClient(transport=transport_a) as client:
                    return (await client.get(url)).status_code

            assert asyncio.run(send()) == 200


def test_deadline_reserve_does_not_refuse_requests_that_have_no_deadline() -> None:
    # An attempt timeout and a reserve for the budget sent on, but no deadline at all.
    transport = reskit.httpx.Transport(Policy("up", timeout=0.2), deadline_reserve=0.5)
    with running_uvicorn(ok_app) as url, httpx.Client(transport=transport) as client:
        # The docs: the header carries "the remaining deadline ... when there is one";
        # there is none, so nothing is short of time and the request must go out.
        assert client.get(url).status_code == 200


def test_a_forked_child_does_not_share_the_parents_connections() -> None:
    import os

    async def port_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(scope["client"][1]).encode()})

    # The transport makes its own inner transport (a connection pool) on first use.
    transport = reskit.httpx.Transport(Policy("up"))
    with running_uvicorn(port_app) as url, httpx.Client(transport=transport) as client:
        parent = client.get(url).text  # leaves a keep-alive connection in the pool
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child reports through the pipe)
            try:
                answer = client.get(url).text
            except BaseException as exc:
                answer = repr(exc)
            os.write(write, answer.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child = os.read(read, 1000).decode()
        os.close(read)
    # The transport renews its locks and hedging threads in a child (_after_fork) but
    # keeps the parent's pool: the child writes on the parent's socket.
    assert child != parent, "the child sent its request on the parent's connection"


# -- the admin endpoint ------------------------------------------------------------------

ONCALL = "oncall-token-0123456789abcdef"
PREFIX = "/_reskit"


def admin_asgi() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    return Starlette(routes=[Mount(PREFIX, app=reskit.asgi.AdminApp(tokens={ONCALL: "alice"}))])


def admin_wsgi() -> Any:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    def home(environ: Any, start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b""]

    return DispatcherMiddleware(home, {PREFIX: reskit.wsgi.AdminApp(tokens={ONCALL: "alice"})})


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_admin_kills_the_switch_it_was_named_not_a_neighbour(kind: str) -> None:
    # A switch named after the route it guards, as kill switches often are.
    name = "/api/orders"
    reskit.revive(name, reason="exists", actor="setup")
    running = running_uvicorn(admin_asgi()) if kind == "asgi" else running_wsgi(admin_wsgi())
    with running as url, httpx.Client(base_url=url + PREFIX, timeout=WAIT) as client:
        # The docs: a name with a "/" travels percent-encoded.
        response = client.post(
            "/switches/%2Fapi%2Forders/kill",
            json={"reason": "INC-7"},
            headers={"Authorization": f"Bearer {ONCALL}"},
        )
    assert response.status_code == 200
    # The empty segment the leading "/" makes is dropped by the router: "api/orders",
    # another switch, is killed and audited, and the one the operator named stays on.
    assert response.json()["audit"]["target"] == f"switch:{name}"
    assert reskit.is_killed(name)


def test_a_duck_typed_inner_transport_leaves_the_library_to_the_first_request() -> None:
    class Logged:
        """A wrapper around a real transport that subclasses no library's base class."""

        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()
            self.seen: list[str] = []

        def handle_request(self, request: Any) -> Any:
            self.seen.append(str(request.url))
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    logged = Logged()
    transport = reskit.httpx.Transport(Policy("up"), transport=logged)
    with running_uvicorn(ok_app) as url, httpx.Client(transport=transport) as client:
        # The inner transport says nothing about its library, and the client is httpx's.
        assert client.get(url).status_code == 200
    assert logged.seen == [url]  # as plain httpx sends it: no path added

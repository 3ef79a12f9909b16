"""Edge middleware in corners: spans, 500s, mounted apps, non-ASCII prefixes, sampling.

Each test runs a real server (uvicorn or a threaded WSGI server) and a real
httpx client, and pins one documented promise of ``CorrelationIdMiddleware``
and ``ShedMiddleware``: a WSGI request's server span ends cleanly, every 500
carries the correlation ID, a mounted app is shed on the path it routes, a
non-ASCII prefix matches on WSGI, a request the sampler dropped gets no
server span, and a path is always under one policy. The correlation header's
reading corners (repeats, generators, strict mode) run the ASGI middleware in
process instead, where every header byte is the test's to choose.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import reskit
import reskit.asgi
import reskit.wsgi
from http_servers import running_uvicorn, running_wsgi
from reskit import Policy

WAIT = 10.0  # seconds a request may take before the test fails


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _ok_wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


async def _ok_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# -- WSGI: the server span is ended in the context it was started in ----------------------------


def test_wsgi_server_span_ends_without_a_detach_error(spans: Any) -> None:
    # _InContext.close() ends the span outside the request's context, so
    # OpenTelemetry's detach of the token attached inside it fails and logs an
    # error with a traceback for every request a tracer records.
    otel = logging.getLogger("opentelemetry.context")
    records = _Records()
    otel.addHandler(records)
    try:
        app = reskit.wsgi.CorrelationIdMiddleware(_ok_wsgi)
        with running_wsgi(app) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
            response = client.get("/x", headers={"X-Request-ID": "detach-1"})
    finally:
        otel.removeHandler(records)
    assert response.status_code == 200
    [server] = [span for span in spans.spans() if span.kind.name == "SERVER"]
    assert server.attributes["reskit.correlation_id"] == "detach-1"
    assert [record.getMessage() for record in records.records] == []


# -- WSGI: a 500 carries the ID when the response iterable fails ------------------------------


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _generator_app(environ: Any, start_response: Any) -> Iterator[bytes]:
    # A WSGI app written as a generator: nothing runs until the server iterates it.
    _fail("boom")
    yield b"never"


def _flask_stream_app() -> Any:
    import flask

    app = flask.Flask("review")

    @app.get("/x")
    def failing_stream() -> Any:
        def chunks() -> Iterator[bytes]:
            _fail("the first chunk failed")
            yield b"never"

        return flask.Response(chunks())

    return app.wsgi_app


@pytest.mark.parametrize("which", ["generator app", "flask stream"])
def test_wsgi_500_from_a_failing_response_iterable_carries_the_id(which: str) -> None:
    # Nothing was sent yet, so the server answers 500 through its own
    # start_response, past the middleware: the docs promise the ID on 500s too.
    app = _generator_app if which == "generator app" else _flask_stream_app()
    wrapped = reskit.wsgi.CorrelationIdMiddleware(app)
    with running_wsgi(wrapped) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        response = client.get("/x", headers={"X-Request-ID": "crash-7"})
    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "crash-7"


# -- ASGI: shedding matches the path the app routes, as on WSGI ---------------------------------


def test_asgi_shed_matches_the_path_a_mounted_app_routes() -> None:
    # Under a mount (or uvicorn --root-path) scope["path"] includes root_path;
    # Starlette routes on the path without it, and the WSGI twin matches
    # PATH_INFO (without SCRIPT_NAME). The ASGI middleware matches the full
    # path, so a killed feature keeps being served.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    ran: list[str] = []

    async def plain(request: Request) -> PlainTextResponse:
        ran.append(request.url.path)
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/api/plain", plain)])
    policy = Policy("mounted-api", kill_switch=True)
    outer = Starlette(
        routes=[Mount("/v1", app=reskit.asgi.ShedMiddleware(inner, {"/api": policy}))]
    )
    reskit.kill("mounted-api", reason="incident", actor="oncall")
    with running_uvicorn(outer) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        response = client.get("/v1/api/plain")
    assert response.status_code == 503
    assert ran == []


def test_wsgi_shed_matches_the_path_a_mounted_app_routes() -> None:
    # The WSGI twin, for comparison: this one holds.
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    ran: list[str] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        ran.append(environ["PATH_INFO"])
        return _ok_wsgi(environ, start_response)

    policy = Policy("mounted-api", kill_switch=True)
    mounted = DispatcherMiddleware(
        _ok_wsgi, {"/v1": reskit.wsgi.ShedMiddleware(app, {"/api": policy})}
    )
    reskit.kill("mounted-api", reason="incident", actor="oncall")
    with running_wsgi(mounted) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        response = client.get("/v1/api/plain")
    assert response.status_code == 503
    assert ran == []


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_prefix_with_non_ascii_characters_is_matched(kind: str) -> None:
    # PATH_INFO is a "WSGI string" (the UTF-8 bytes read as latin-1), so a
    # prefix such as "/café" is compared with "/cafÃ©" and never matches on
    # WSGI; the ASGI twin, whose path is decoded text, matches it.
    policy = Policy("cafe", kill_switch=True)
    app: Any
    if kind == "asgi":
        app = reskit.asgi.ShedMiddleware(_ok_asgi, {"/café": policy})
        running = running_uvicorn
    else:
        app = reskit.wsgi.ShedMiddleware(_ok_wsgi, {"/café": policy})
        running = running_wsgi
    reskit.kill("cafe", reason="incident", actor="oncall")
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        response = client.get("/café/menu")
    assert response.status_code == 503


# -- a request the sampler dropped gets no server span ----------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_sampled_out_request_gets_no_server_span_from_shedding(kind: str) -> None:
    # CorrelationIdMiddleware starts the request's server span and the sampler
    # drops it (a non-recording span). ShedMiddleware then finds an outer span
    # that does not record, starts a second root SERVER span in a new trace (a
    # fresh sampling decision), and that one is recorded: a span for a request
    # the sampler dropped, without the correlation ID, in a trace nothing else
    # of the request is in.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Alternating(RandomIdGenerator):
        """Trace IDs that TraceIdRatioBased(0.5) drops and keeps in turn."""

        def __init__(self) -> None:
            self.made = 0

        def generate_trace_id(self) -> int:
            self.made += 1
            low = (1 << 63) + 5 if self.made % 2 else 5  # its low 64 bits decide
            return (1 << 100) | low

    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=Alternating()
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    routes = {"/x": Policy("sampled", shed_at=1)}
    if kind == "asgi":
        app: Any = reskit.asgi.CorrelationIdMiddleware(reskit.asgi.ShedMiddleware(_ok_asgi, routes))
        running = running_uvicorn
    else:
        app = reskit.wsgi.CorrelationIdMiddleware(reskit.wsgi.ShedMiddleware(_ok_wsgi, routes))
        running = running_wsgi
    with (
        reskit.configure_telemetry(tracer_provider=provider),
        running(app) as url,
        httpx.Client(base_url=url, timeout=WAIT) as client,
    ):
        response = client.get("/x", headers={"X-Request-ID": "dropped-1"})
    provider.shutdown()
    assert response.status_code == 200
    assert [span.name for span in exporter.get_finished_spans()] == []


# -- one path, one policy ------------------------------------------------------------------------


def test_a_path_is_under_one_policy_when_prefixes_differ_by_a_slash() -> None:
    # "/api" and "/api/" name the same prefix; Routes keeps both, so "/api"
    # (an exact hit) gets the last one and "/api/orders" the first.
    killed = Policy("killed-api", kill_switch=True)
    other = Policy("other-api", shed_at=5)
    try:
        app = reskit.asgi.ShedMiddleware(_ok_asgi, {"/api": killed, "/api/": other})
    except ValueError:
        return  # refusing the ambiguous table is a fix too
    reskit.kill("killed-api", reason="incident", actor="oncall")
    with running_uvicorn(app) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        statuses = {client.get(path).status_code for path in ("/api", "/api/orders")}
    assert len(statuses) == 1


async def test_a_request_cancelled_while_queued_for_a_slot_ends_its_span(spans: Any) -> None:
    # An outer deadline (or a server shutting down) cancels a request that waits in the
    # bulkhead's queue: it holds no slot, leaves the queue, and its server span still ends.
    import asyncio

    started = asyncio.Event()
    bulkhead = reskit.Bulkhead(1, max_waiting=2)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.Event().wait()  # holds its slot until cancelled

    shed = reskit.asgi.ShedMiddleware(app, routes={"/": Policy("queued", bulkhead=bulkhead)})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    def request() -> dict[str, Any]:
        return {"type": "http", "method": "GET", "path": "/x", "headers": [], "scheme": "http"}

    holder = asyncio.create_task(shed(request(), receive, send))
    await started.wait()
    queued = asyncio.create_task(shed(request(), receive, send))
    while bulkhead.waiting == 0:
        await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    ended = spans.spans()
    assert len(ended) == 1
    assert ended[0].status.description == "CancelledError"
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert bulkhead.in_flight == 0
    assert len(spans.spans()) == 2


# The correlation ID each request to _own_header_app saw.
seen: list[str | None] = []


async def _asgi_exchange(
    app: Any, headers: Any
) -> tuple[int, list[tuple[bytes, bytes]], str | None]:
    """Status and response headers of one in-process request, and the ID the app saw."""
    messages: list[dict[str, Any]] = []
    seen.clear()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    await app(scope, receive, send)
    start = messages[0]
    return start["status"], list(start["headers"]), seen[-1] if seen else None


async def _own_header_app(scope: Any, receive: Any, send: Any) -> None:
    seen.append(reskit.correlation_id())
    # Any iterable of pairs is ASGI's header list: a generator is read once.
    own = [(b"content-type", b"text/plain"), (b"X-Request-ID", b"app-made"), (b"x-a", b"1")]
    await send({"type": "http.response.start", "status": 200, "headers": iter(own)})
    await send({"type": "http.response.body", "body": b"ok"})


def _ids(answer: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [value for key, value in answer if key.lower() == b"x-request-id"]


async def test_correlation_header_corners() -> None:
    """Read in one pass (in process, every corner): one valid ID is echoed as sent; two or
    three, or an invalid one, are replaced; the app's own header is replaced in place."""
    app = reskit.asgi.CorrelationIdMiddleware(_own_header_app)
    name = b"x-request-id"

    status, answer, cid = await _asgi_exchange(app, iter([(b"X-Request-ID", b"order-7.a_b")]))
    assert status == 200
    assert answer == [(b"content-type", b"text/plain"), (b"x-a", b"1"), (name, b"order-7.a_b")]
    assert cid == "order-7.a_b"

    for repeats in (2, 3):
        _, answer, cid = await _asgi_exchange(app, [(name, b"same")] * repeats)
        (echoed,) = _ids(answer)
        assert echoed not in (b"same", b"app-made")
        assert cid == echoed.decode("ascii")
        assert reskit.valid_correlation_id(cid)

    for bad in (b"", b"a b", b"abc\n", b"\xc3\xa9t\xc3\xa9", b"x" * 129, b"<b>"):
        _, answer, cid = await _asgi_exchange(app, [(name, bad)])
        (echoed,) = _ids(answer)
        assert echoed != bad, bad
        assert cid == echoed.decode("ascii")
        assert reskit.valid_correlation_id(cid)


async def test_correlation_strict_and_traceparent_corners() -> None:
    strict = reskit.asgi.CorrelationIdMiddleware(_own_header_app, reject_invalid=True)
    for headers in ([(b"x-request-id", b"a b")], iter([(b"x-request-id", b"a b")])):
        status, answer, cid = await _asgi_exchange(strict, headers)
        assert status == 400
        assert cid is None  # the app did not run
        (echoed,) = _ids(answer)
        assert reskit.valid_correlation_id(echoed.decode("ascii"))
    status, _, cid = await _asgi_exchange(strict, [(b"x-request-id", b"ok-1")])
    assert (status, cid) == (200, "ok-1")

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = (b"traceparent", f"00-{trace}-00f067aa0ba902b7-01".encode("ascii"))
    derived = reskit.asgi.CorrelationIdMiddleware(_own_header_app, from_traceparent=True)
    for headers in ([parent], [parent, (b"x-request-id", b"a b")]):
        _, answer, cid = await _asgi_exchange(derived, iter(headers))
        assert cid == trace
        assert _ids(answer) == [trace.encode("ascii")]
    _, _, cid = await _asgi_exchange(derived, [parent, (b"x-request-id", b"mine")])
    assert cid == "mine"

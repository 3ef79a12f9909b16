"""Correlation IDs and load shedding at the edge, under real servers.

Every behaviour runs twice: on a Starlette app under uvicorn (ASGI) and on a
Flask app under a threaded WSGI server, each behind reskit's
``CorrelationIdMiddleware`` and ``ShedMiddleware``, through a real httpx
client. Handlers that must be caught mid-flight block on events the test sets;
nothing waits for time.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import reskit
import reskit.asgi
import reskit.wsgi
from http_servers import running_uvicorn, running_wsgi
from reskit import Bulkhead, Policy

WAIT = 10.0  # seconds an expected event may take before the test fails
KINDS = ["asgi", "wsgi"]


@dataclass
class Backend:
    """What both apps serve, what they saw, and the events tests steer them with."""

    seen: dict[str, list[str | None]] = field(default_factory=dict)
    ran: dict[str, int] = field(default_factory=dict)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    proceed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    noted: dict[str, threading.Event] = field(default_factory=dict)

    def note(self, what: str, value: str | None = None) -> None:
        with self.lock:
            self.seen.setdefault(what, []).append(value)
            self.ran[what] = self.ran.get(what, 0) + 1
            self.noted.setdefault(what, threading.Event()).set()

    def wait_for(self, what: str) -> list[str | None]:
        """What was noted as ``what``, once something was."""
        with self.lock:
            event = self.noted.setdefault(what, threading.Event())
        assert event.wait(WAIT), f"nothing was noted as {what!r}"
        return self.seen[what]

    def hold(self) -> None:
        """Signal that a handler arrived; wait until the test lets it go on."""
        self.entered.release()
        assert self.proceed.wait(WAIT), "the test never released the handler"

    def arrivals(self, count: int) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=WAIT), "a handler never arrived"


def seen_in_request() -> dict[str, str | None]:
    """The correlation ID as the handler, a thread it starts and structlog see it."""
    import structlog

    return {
        "cid": reskit.correlation_id(),
        "thread": in_thread(),
        "structlog": structlog.contextvars.get_contextvars().get("correlation_id"),
    }


def in_thread() -> str | None:
    """The correlation ID as a thread started with the request's context sees it."""
    box: list[str | None] = []
    context = contextvars.copy_context()
    worker = threading.Thread(target=lambda: box.append(context.run(reskit.correlation_id)))
    worker.start()
    worker.join(WAIT)
    return box[0]


def starlette_app(backend: Backend) -> Any:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(seen_in_request())

    async def handled(request: Request) -> JSONResponse:
        raise ValueError("handled")

    async def on_value_error(request: Request, exc: Exception) -> JSONResponse:
        backend.note("handler", reskit.correlation_id())
        return JSONResponse({"cid": reskit.correlation_id()}, status_code=500)

    async def crash(request: Request) -> JSONResponse:
        raise RuntimeError("crash")

    async def background(request: Request) -> PlainTextResponse:
        def later() -> None:
            backend.note("background", reskit.correlation_id())

        return PlainTextResponse("ok", background=BackgroundTask(later))

    def slow(request: Request) -> PlainTextResponse:  # sync: Starlette runs it in a thread
        backend.note(request.url.path)
        backend.hold()
        return PlainTextResponse("done")

    async def plain(request: Request) -> PlainTextResponse:
        backend.note(request.url.path)
        return PlainTextResponse("ok")

    def stream(request: Request) -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            yield b"first;"
            backend.hold()
            yield b"second"

        return StreamingResponse(chunks())

    routes = [
        Route("/api/echo", echo),
        Route("/api/handled", handled),
        Route("/api/crash", crash),
        Route("/api/background", background),
        Route("/api/slow", slow),
        Route("/api/stream", stream),
    ]
    routes += [Route(path, plain) for path in PLAIN]
    return Starlette(routes=routes, exception_handlers={ValueError: on_value_error})


def flask_app(backend: Backend) -> Any:
    import flask

    app = flask.Flask("edge")

    @app.get("/api/echo")
    def echo() -> Any:
        return seen_in_request()

    @app.get("/api/handled")
    def handled() -> Any:
        raise ValueError("handled")

    @app.errorhandler(ValueError)
    def on_value_error(exc: Exception) -> Any:
        backend.note("handler", reskit.correlation_id())
        return {"cid": reskit.correlation_id()}, 500

    @app.get("/api/crash")
    def crash() -> Any:
        raise RuntimeError("crash")

    @app.get("/api/background")
    def background() -> Any:
        response = flask.make_response("ok")
        # Flask's nearest thing to a background task: work after the response is sent.
        response.call_on_close(lambda: backend.note("background", reskit.correlation_id()))
        return response

    @app.get("/api/slow")
    def slow() -> Any:
        backend.note(flask.request.path)
        backend.hold()
        return "done"

    @app.get("/api/stream")
    def stream() -> Any:
        def chunks() -> Iterator[bytes]:
            yield b"first;"
            backend.hold()
            yield b"second"

        return flask.Response(chunks())

    def plain() -> Any:
        backend.note(flask.request.path)
        return "ok"

    for path in PLAIN:
        app.add_url_rule(path, path, plain)
    app.config["PROPAGATE_EXCEPTIONS"] = True  # as in production: the crash reaches the server
    return app.wsgi_app


PLAIN = ["/api/plain", "/low/a", "/mid/a", "/critical/a", "/free", "/apiary"]


@dataclass
class Served:
    url: str
    backend: Backend
    kind: str
    running: Any
    stopped: bool = False

    def client(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=WAIT, **options)

    def stop(self) -> None:
        """Stop the server, waiting for every request it began to end (spans included)."""
        if not self.stopped:
            self.stopped = True
            self.running.__exit__(None, None, None)


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Start an app of a kind behind the middleware; stop it when the test ends."""
    stack: list[Served] = []

    def start(
        kind: str,
        *,
        routes: dict[str, Policy] | None = None,
        tenant: Callable[[Any], str | None] | None = None,
        correlation: dict[str, Any] | None = None,
        outermost: Callable[[Any], Any] | None = None,
    ) -> Served:
        backend = Backend()
        module = reskit.asgi if kind == "asgi" else reskit.wsgi
        app = starlette_app(backend) if kind == "asgi" else flask_app(backend)
        if routes is not None:
            app = module.ShedMiddleware(app, routes=routes, tenant=tenant)
        app = module.CorrelationIdMiddleware(app, **(correlation or {}))
        if outermost is not None:
            app = outermost(app)
        running = running_uvicorn(app) if kind == "asgi" else running_wsgi(app)
        served = Served(running.__enter__(), backend, kind, running)
        stack.append(served)
        return served

    yield start
    for served in reversed(stack):
        served.stop()


# -- correlation IDs -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_id_is_adopted_bound_and_echoed(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind)
    with served.client() as client:
        response = client.get("/api/echo", headers={"X-Request-ID": "order-42.a_b"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "order-42.a_b"
    assert response.json() == {
        "cid": "order-42.a_b",
        "thread": "order-42.a_b",
        "structlog": "order-42.a_b",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_request_without_an_id_gets_a_new_one(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind)
    with served.client() as client:
        first = client.get("/api/echo")
        second = client.get("/api/echo")
    for response in (first, second):
        cid = response.headers["x-request-id"]
        assert reskit.valid_correlation_id(cid)
        assert len(cid) == 32
        assert response.json()["cid"] == cid
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


HOSTILE = {
    "markup": b"<script>alert(1)</script>",
    "too long": b"a" * 10_240,
    "non-ascii": "caf\u00e9".encode("latin-1"),
    "utf-8": "\u65e5\u672c".encode(),
    "spaces": b"a b",
    "semicolon": b"id;drop",
    "129 characters": b"x" * 129,
}


def raw_request(url: str, path: str, headers: list[bytes]) -> bytes:
    """Send one HTTP/1.1 request with headers as given (no client sanitizes them)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as sock:
        lines = [f"GET {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close", *headers]
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_ids_are_replaced_never_echoed_or_logged(
    serve: Callable[..., Served], kind: str, logs: list[dict[str, Any]]
) -> None:
    served = serve(kind)
    records: list[logging.LogRecord] = []
    capture = _Capture(records)
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        for name, value in HOSTILE.items():
            answer = raw_request(served.url, "/api/echo", [b"X-Request-ID: " + value])
            assert value not in answer, name
            head = answer.split(b"\r\n\r\n", 1)[0]
            assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), name
            echoed = [
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"x-request-id:")
            ]
            assert len(echoed) == 1, name
            assert reskit.valid_correlation_id(echoed[0].decode()), name
        # CR, LF and NUL inside a value never reach the app: the server refuses the
        # request or the header, and nothing raw comes back.
        for value in (b"a\rb", b"a\x00b", b"ab\r\nSet-Cookie: evil=1"):
            answer = raw_request(served.url, "/api/echo", [b"X-Request-ID: " + value])
            assert b"evil=1" not in answer
            assert value not in answer
    finally:
        root.removeHandler(capture)
    logged = " ".join(str(record.__dict__) for record in records) + str(logs)
    for value in HOSTILE.values():
        assert value.decode("latin-1") not in logged


class _Capture(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("kind", KINDS)
def test_a_repeated_header_is_not_trusted(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind)
    answer = raw_request(served.url, "/api/echo", [b"X-Request-ID: one", b"X-Request-ID: two"])
    assert b"one" not in answer.split(b"\r\n\r\n", 1)[0]
    assert b'"cid":"one"' not in answer
    assert b'"cid": "one"' not in answer


@pytest.mark.parametrize("kind", KINDS)
def test_strict_mode_answers_400_to_an_invalid_id(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind, correlation={"reject_invalid": True})
    with served.client() as client:
        bad = client.get("/api/echo", headers={"X-Request-ID": "<b>"})
        missing = client.get("/api/echo")
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["type"].endswith("middleware.md#correlation-id-invalid")
    assert reskit.valid_correlation_id(bad.headers["x-request-id"])
    assert "<b>" not in bad.text
    assert missing.status_code == 200  # no header is not an invalid one


@pytest.mark.parametrize("kind", KINDS)
def test_the_id_can_come_from_traceparent(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind, correlation={"from_traceparent": True})
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with served.client() as client:
        derived = client.get(
            "/api/echo", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
        )
        own = client.get(
            "/api/echo",
            headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "X-Request-ID": "mine"},
        )
        invalid = client.get(
            "/api/echo", headers={"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"}
        )
    assert derived.headers["x-request-id"] == trace == derived.json()["cid"]
    assert own.headers["x-request-id"] == "mine"
    assert invalid.headers["x-request-id"] != "0" * 32


@pytest.mark.parametrize("kind", KINDS)
def test_a_configured_header_is_read_and_echoed(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind, correlation={"header": "X-Correlation-ID"})
    with served.client() as client:
        response = client.get(
            "/api/echo", headers={"X-Correlation-ID": "abc", "X-Request-ID": "no"}
        )
    assert response.headers["x-correlation-id"] == "abc" == response.json()["cid"]
    assert "x-request-id" not in response.headers


@pytest.mark.parametrize("kind", KINDS)
def test_the_id_reaches_exception_handlers_background_tasks_and_500s(
    serve: Callable[..., Served], kind: str
) -> None:
    served = serve(kind)
    with served.client() as client:
        handled = client.get("/api/handled", headers={"X-Request-ID": "handled-1"})
        background = client.get("/api/background", headers={"X-Request-ID": "bg-1"})
    # A server drops the connection of a request whose app raised (uvicorn does even
    # after a complete 500 from Starlette's error middleware): a connection of its own.
    with served.client() as client:
        crashed = client.get("/api/crash", headers={"X-Request-ID": "crash-1"})
    assert handled.status_code == 500
    assert handled.headers["x-request-id"] == "handled-1" == handled.json()["cid"]
    assert served.backend.seen["handler"] == ["handled-1"]
    assert crashed.status_code == 500
    assert crashed.headers["x-request-id"] == "crash-1"
    assert background.headers["x-request-id"] == "bg-1"
    # Background work runs after the response went out: wait for it to report.
    assert served.backend.wait_for("background") == ["bg-1"]


def test_no_id_carries_over_between_10000_keep_alive_requests(serve: Callable[..., Served]) -> None:
    served = serve("asgi")
    clients, each = 50, 200

    def run(number: int) -> list[tuple[str | None, str, str]]:
        seen = []
        with served.client() as client:  # one keep-alive connection per client
            for i in range(each):
                sent = f"c{number}-{i}" if i % 2 == 0 else None
                headers = {"X-Request-ID": sent} if sent is not None else {}
                response = client.get("/api/echo", headers=headers)
                assert response.status_code == 200
                seen.append((sent, response.headers["x-request-id"], response.json()["cid"]))
        return seen

    with ThreadPoolExecutor(clients) as pool:
        results = [row for rows in pool.map(run, range(clients)) for row in rows]
    assert len(results) == clients * each
    for sent, echoed, bound in results:
        assert echoed == bound
        if sent is not None:
            assert echoed == sent
    generated = [echoed for sent, echoed, _ in results if sent is None]
    assert len(set(generated)) == len(generated) == clients * each // 2
    assert not set(generated) & {sent for sent, _, _ in results}


def test_wsgi_requests_never_see_each_others_ids(serve: Callable[..., Served]) -> None:
    # wsgiref answers HTTP/1.0 (a connection per request) but reuses nothing else:
    # threads come and go, and each request runs in a context of its own.
    served = serve("wsgi")

    def run(number: int) -> list[tuple[str | None, str, str]]:
        seen = []
        with served.client() as client:
            for i in range(40):
                sent = f"w{number}-{i}" if i % 2 == 0 else None
                response = client.get("/api/echo", headers={"X-Request-ID": sent} if sent else {})
                seen.append((sent, response.headers["x-request-id"], response.json()["cid"]))
        return seen

    with ThreadPoolExecutor(20) as pool:
        results = [row for rows in pool.map(run, range(20)) for row in rows]
    assert all(echoed == bound for _, echoed, bound in results)
    assert all(echoed == sent for sent, echoed, _ in results if sent is not None)
    generated = [echoed for sent, echoed, _ in results if sent is None]
    assert len(set(generated)) == len(generated) == 400


def test_the_logging_filter_puts_the_id_on_uvicorns_access_log(
    serve: Callable[..., Served],
) -> None:
    served = serve("asgi")
    records: list[logging.LogRecord] = []
    capture = _Capture(records)
    capture.addFilter(reskit.CorrelationIdFilter())
    access = logging.getLogger("uvicorn.access")
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(capture)
    try:
        with served.client() as client:
            client.get("/api/echo", headers={"X-Request-ID": "logged-1"})
    finally:
        access.removeHandler(capture)
        access.setLevel(level)
    assert [record.correlation_id for record in records] == ["logged-1"]  # type: ignore[attr-defined]


def test_the_logging_filter_marks_records_outside_a_request() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "message", None, None)
    assert reskit.CorrelationIdFilter().filter(record) is True
    assert record.correlation_id == "-"  # type: ignore[attr-defined]
    with reskit.bind_correlation_id("bound"):
        reskit.CorrelationIdFilter(default="none").filter(record)
    assert record.correlation_id == "bound"  # type: ignore[attr-defined]


# -- spans -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_one_server_span_per_request_with_the_id(
    serve: Callable[..., Served], kind: str, spans: Any
) -> None:
    served = serve(kind)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with served.client() as client:
        client.get(
            "/api/echo",
            headers={"X-Request-ID": "span-1", "traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
        )
        client.get("/api/crash", headers={"X-Request-ID": "span-2"})
    served.stop()  # a WSGI server ends a request's span when it closes the response
    # By ID: a WSGI server may close the first response after the second request.
    server = {
        span.attributes["reskit.correlation_id"]: span
        for span in spans.spans()
        if span.kind.name == "SERVER"
    }
    assert sorted(server) == ["span-1", "span-2"]
    ok, crashed = server["span-1"], server["span-2"]
    assert f"{ok.context.trace_id:032x}" == trace  # continues the caller's trace
    assert ok.attributes["http.response.status_code"] == 200
    assert crashed.attributes["http.response.status_code"] == 500
    assert crashed.status.status_code.name == "ERROR"


@pytest.mark.parametrize("kind", KINDS)
def test_with_the_otel_instrumentation_its_span_gets_the_attributes(
    serve: Callable[..., Served], kind: str, spans: Any
) -> None:
    if kind == "asgi":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    else:
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
    served = serve(
        kind,
        routes={"/low": Policy("low", shed_at=1)},
        outermost=lambda app: OpenTelemetryMiddleware(app, tracer_provider=spans.tracer_provider),
    )
    reskit.set_brownout_level(1, reason="test", actor="test")
    with served.client() as client:
        client.get("/api/echo", headers={"X-Request-ID": "inst-1"})
        client.get("/low/a", headers={"X-Request-ID": "inst-2"})
    served.stop()
    server = [span for span in spans.spans() if span.kind.name == "SERVER"]
    assert len(server) == 2  # the instrumentation's, never a second one of reskit's
    scopes = {span.instrumentation_scope.name for span in server}
    assert scopes == {f"opentelemetry.instrumentation.{kind}"}
    assert [span.attributes["reskit.correlation_id"] for span in server] == ["inst-1", "inst-2"]
    assert server[1].attributes["reskit.rejected_by"] == "brownout"
    assert server[1].attributes["http.response.status_code"] == 503


# -- shedding --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_bulkhead_admits_exactly_its_slots(serve: Callable[..., Served], kind: str) -> None:
    served = serve(kind, routes={"/api": Policy("api", bulkhead=Bulkhead(5))})
    backend = served.backend
    with served.client(limits=httpx.Limits(max_connections=40)) as client:
        with ThreadPoolExecutor(5) as holders:
            held = [holders.submit(client.get, "/api/slow") for _ in range(5)]
            backend.arrivals(5)
            with ThreadPoolExecutor(20) as pool:
                refused = list(pool.map(lambda _: client.get("/api/slow"), range(20)))
            free = client.get("/free")
            backend.proceed.set()
            admitted = [future.result() for future in held]
        after = client.get("/api/slow")
    assert [r.status_code for r in admitted] == [200] * 5
    assert [r.status_code for r in refused] == [503] * 20
    assert backend.ran["/api/slow"] == 6  # five held, one after: no refused request ran
    assert free.status_code == 200
    assert after.status_code == 200
    problem = refused[0].json()
    assert refused[0].headers["content-type"] == "application/problem+json"
    assert int(refused[0].headers["retry-after"]) >= 1
    assert problem["guard"] == "bulkhead"
    assert problem["policy"] == "api"
    assert problem["status"] == 503
    assert reskit.valid_correlation_id(refused[0].headers["x-request-id"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_route_answers_503_without_running_and_revives(
    serve: Callable[..., Served], kind: str
) -> None:
    served = serve(kind, routes={"/api": Policy("api", kill_switch=True)})
    with served.client() as client:
        assert client.get("/api/plain").status_code == 200
        reskit.kill("api", reason="incident 12", actor="oncall")
        killed = client.get("/api/plain")
        other = client.get("/free")
        reskit.revive("api", reason="fixed", actor="oncall")
        revived = client.get("/api/plain")
    assert killed.status_code == 503
    assert killed.json()["guard"] == "kill_switch"
    assert killed.headers["retry-after"] == "1"
    assert other.status_code == 200
    assert revived.status_code == 200
    assert served.backend.ran["/api/plain"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_brownout_sheds_low_priority_routes_first(serve: Callable[..., Served], kind: str) -> None:
    served = serve(
        kind,
        routes={
            "/low": Policy("low", shed_at=1),
            "/mid": Policy("mid", shed_at=2),
            "/critical": Policy("critical", bulkhead=Bulkhead(100)),
        },
    )

    def statuses() -> list[int]:
        with served.client() as client:
            return [client.get(path).status_code for path in ("/low/a", "/mid/a", "/critical/a")]

    assert statuses() == [200, 200, 200]
    reskit.set_brownout_level(1, reason="overload", actor="oncall")
    assert statuses() == [503, 200, 200]
    reskit.set_brownout_level(2, reason="overload", actor="oncall")
    assert statuses() == [503, 503, 200]
    reskit.set_brownout_level(0, reason="calm", actor="oncall")
    assert statuses() == [200, 200, 200]
    assert served.backend.ran == {"/low/a": 2, "/mid/a": 3, "/critical/a": 4}


@pytest.mark.parametrize("kind", KINDS)
def test_a_tenant_over_its_quota_gets_429_while_another_is_served(
    serve: Callable[..., Served], kind: str
) -> None:
    def tenant(request: Any) -> str | None:
        if kind == "asgi":
            values = [v for k, v in request["headers"] if k == b"x-tenant"]
            return values[0].decode() if values else None
        value: str | None = request.get("HTTP_X_TENANT")
        return value

    served = serve(kind, routes={"/api": Policy("api", bulkhead=Bulkhead(2))}, tenant=tenant)
    backend = served.backend
    alice = {"X-Tenant": "alice"}
    with served.client() as client, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(client.get, "/api/slow", headers=alice) for _ in range(2)]
        backend.arrivals(2)
        over = client.get("/api/plain", headers=alice)
        bob = client.get("/api/plain", headers={"X-Tenant": "bob"})
        backend.proceed.set()
        assert [future.result().status_code for future in held] == [200, 200]
        again = client.get("/api/plain", headers=alice)
    assert over.status_code == 429
    assert over.json()["guard"] == "bulkhead"
    assert over.json()["type"].endswith("middleware.md#quota")
    assert int(over.headers["retry-after"]) >= 1
    assert bob.status_code == 200
    assert again.status_code == 200


@pytest.mark.parametrize("kind", KINDS)
def test_a_tenant_has_its_own_brownout_level(serve: Callable[..., Served], kind: str) -> None:
    def tenant(request: Any) -> str | None:
        path = request["path"] if kind == "asgi" else request["PATH_INFO"]
        return "free-tier" if path.endswith("/a") else None

    served = serve(kind, routes={"/low": Policy("low", shed_at=1)}, tenant=tenant)
    reskit.set_brownout_level(1, tenant="free-tier", reason="overload", actor="oncall")
    with served.client() as client:
        assert client.get("/low/a").status_code == 503


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_responses_are_not_buffered_and_hold_their_slot(
    serve: Callable[..., Served], kind: str
) -> None:
    served = serve(kind, routes={"/api": Policy("api", bulkhead=Bulkhead(1))})
    backend = served.backend
    with served.client() as client, client.stream("GET", "/api/stream") as streaming:
        chunks = streaming.iter_raw()
        # The first chunk arrives while the handler still holds: nothing buffered it.
        assert next(chunks).startswith(b"first;")
        backend.arrivals(1)
        with served.client() as other:
            assert other.get("/api/plain").status_code == 503  # the stream holds the slot
        backend.proceed.set()
        assert b"".join(chunks).endswith(b"second")
    with served.client() as client:
        assert client.get("/api/plain").status_code == 200


@pytest.mark.parametrize("kind", KINDS)
def test_routes_match_on_segment_boundaries_longest_first(
    serve: Callable[..., Served], kind: str
) -> None:
    served = serve(
        kind,
        routes={
            "/api": Policy("api", kill_switch="api-switch"),
            "/api/plain": Policy("plain", shed_at=5),
        },
    )
    reskit.kill("api-switch", reason="test", actor="test")
    with served.client() as client:
        assert client.get("/api/plain").status_code == 200  # the longer prefix's policy
        assert client.get("/api/echo").status_code == 503
        assert client.get("/apiary").status_code == 200  # not under /api


@pytest.mark.parametrize("kind", KINDS)
def test_a_rejection_is_recorded_on_the_server_span(
    serve: Callable[..., Served], kind: str, spans: Any
) -> None:
    served = serve(kind, routes={"/low": Policy("low", shed_at=1)})
    reskit.set_brownout_level(1, reason="test", actor="test")
    with served.client() as client:
        client.get("/low/a", headers={"X-Request-ID": "shed-1"})
    served.stop()
    (span,) = [span for span in spans.spans() if span.kind.name == "SERVER"]
    assert span.attributes["reskit.correlation_id"] == "shed-1"
    assert span.attributes["reskit.outcome"] == "rejected"
    assert span.attributes["reskit.rejected_by"] == "brownout"
    assert span.attributes["reskit.policy"] == "low"
    assert span.attributes["http.response.status_code"] == 503


async def test_asgi_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    policy = Policy("api", kill_switch=True)
    reskit.kill("api", reason="test", actor="test")
    wrapped = reskit.asgi.CorrelationIdMiddleware(reskit.asgi.ShedMiddleware(app, {"/": policy}))
    for kind in ("lifespan", "websocket"):
        await wrapped({"type": kind, "path": "/"}, None, None)
    assert seen == ["lifespan", "websocket"]


@pytest.mark.parametrize("module", [reskit.asgi, reskit.wsgi])
def test_bad_configuration_is_refused_at_construction(module: Any) -> None:
    def app(*args: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="non-empty mapping"):
        module.ShedMiddleware(app, {})
    with pytest.raises(ValueError, match="must start with '/'"):
        module.ShedMiddleware(app, {"api": Policy("api", shed_at=1)})
    with pytest.raises(TypeError, match=r"must be a reskit\.Policy"):
        module.ShedMiddleware(app, {"/api": Bulkhead(1)})
    with pytest.raises(ValueError, match="nothing to apply to a request"):
        module.ShedMiddleware(app, {"/api": Policy("api", timeout=1.0)})
    with pytest.raises(ValueError, match="retry_after= must be whole seconds"):
        module.ShedMiddleware(app, {"/api": Policy("api", shed_at=1)}, retry_after=0)
    with pytest.raises(TypeError, match="tenant= must be a function"):
        module.ShedMiddleware(app, {"/api": Policy("api", shed_at=1)}, tenant="x")
    with pytest.raises(ValueError, match="must be an HTTP header name"):
        module.CorrelationIdMiddleware(app, header="X Request")
    with pytest.raises(TypeError, match="reject_invalid= must be True or False"):
        module.CorrelationIdMiddleware(app, reject_invalid="yes")


# -- the bulkhead's quota ----------------------------------------------------------------------


def test_bulkhead_full_names_the_partition_over_its_own_quota() -> None:
    bulkhead = Bulkhead(2, max_partitions=2)
    permits = [bulkhead.admit("p", "alice"), bulkhead.admit("p", "alice")]
    with pytest.raises(reskit.BulkheadFull) as over:
        bulkhead.admit("p", "alice")
    assert over.value.partition == "alice"
    bulkhead.admit("p", "bob")
    with pytest.raises(reskit.BulkheadFull) as refused:
        bulkhead.admit("p", "carol")  # max_partitions: the service is full, not carol
    assert refused.value.partition is None
    for permit in permits:
        bulkhead.record(permit, None, 0.0)


def test_bulkhead_full_under_the_shared_adaptive_cap_names_no_partition() -> None:
    limit = reskit.AIMDLimit(initial=1, min_limit=1, max_limit=10)
    bulkhead = Bulkhead(5, limit=limit)
    permit = bulkhead.admit("p", "alice")
    with pytest.raises(reskit.BulkheadFull) as refused:
        bulkhead.admit("p", "bob")  # bob has free slots; the shared cap is what is full
    assert refused.value.partition is None
    bulkhead.record(permit, None, 0.0)


def test_bulkhead_full_keeps_its_partition_through_pickling() -> None:
    import pickle

    error = reskit.BulkheadFull("full", policy="p", retry_after=2.0, partition="alice")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.partition, copy.policy, copy.retry_after, str(copy)) == ("alice", "p", 2.0, "full")


@pytest.mark.parametrize("middleware", ["correlation", "shed", "deadline"])
def test_a_wsgi_app_served_through_asgiref_behind_the_middleware(
    middleware: str, spans: Any
) -> None:
    """asgiref's WsgiToAsgi hands the ``send`` it gets to AsyncToSync, which warns about
    (and, under this suite's warnings-as-errors, refuses) a callable not marked async:
    each middleware's own sender must be a coroutine function. (With a tracer set, the
    shed middleware starts the span and watches the response for its status.)"""
    asgiref_wsgi = pytest.importorskip("asgiref.wsgi")

    def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]

    inner = asgiref_wsgi.WsgiToAsgi(hello)
    app = {
        "correlation": lambda: reskit.asgi.CorrelationIdMiddleware(inner),
        "shed": lambda: reskit.asgi.ShedMiddleware(
            inner, routes={"/": Policy("wsgi-behind", bulkhead=Bulkhead(4))}
        ),
        "deadline": lambda: reskit.asgi.DeadlineMiddleware(inner, default=5.0),
    }[middleware]()
    with running_uvicorn(app) as url, httpx.Client(base_url=url) as client:
        response = client.get("/hello")
    assert (response.status_code, response.text) == (200, "hello")

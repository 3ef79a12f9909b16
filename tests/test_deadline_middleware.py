"""DeadlineMiddleware under real servers: the caller's budget becomes the request's deadline.

The ASGI twin runs a Starlette app under uvicorn, the WSGI twin a Flask app
under a threaded WSGI server. Time is reskit's fake clock: a budget runs out
when the test advances the clock, never by waiting. One test reads headers
in process: the ASGI reader's corners, which a server would tidy first.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import reskit
import reskit.asgi
import reskit.wsgi
from http_servers import running_uvicorn, running_wsgi
from reskit import Policy, Retry
from reskit.testing import FakeClock

WAIT = 10.0  # seconds an expected event may take before the test fails
KINDS = ["asgi", "wsgi"]
HEADER = "X-Request-Timeout-Ms"


@dataclass
class Record:
    """What the handlers saw and how they ended."""

    budgets: list[float | None] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    ended: list[str] = field(default_factory=list)
    attempts: int = 0
    stop: Callable[[], None] = lambda: None


def starlette_app(record: Record) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def budget(request: Request) -> JSONResponse:
        record.budgets.append(reskit.remaining_deadline())
        return JSONResponse({"left": reskit.remaining_deadline()})

    async def hang(request: Request) -> JSONResponse:
        record.entered.set()
        try:
            await asyncio.wait_for(asyncio.Event().wait(), WAIT)
        except asyncio.CancelledError:
            record.ended.append("cancelled")
            raise
        record.ended.append("finished")
        return JSONResponse({})

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> Any:
            yield b"first;"
            record.entered.set()
            try:
                await asyncio.wait_for(asyncio.Event().wait(), WAIT)
            except asyncio.CancelledError:
                record.ended.append("cancelled")
                raise
            yield b"never"

        return StreamingResponse(chunks())

    async def retried(request: Request) -> JSONResponse:
        async def failing() -> None:
            record.attempts += 1
            raise ConnectionError("down")

        policy = Policy("upstream", retry=Retry(attempts=20, on=ConnectionError, wait=0.3))
        try:
            await policy.acall(failing)
        except ConnectionError:
            pass
        return JSONResponse({"attempts": record.attempts})

    return Starlette(
        routes=[
            Route("/budget", budget),
            Route("/hang", hang),
            Route("/stream", stream),
            Route("/retried", retried),
        ]
    )


def flask_app(record: Record) -> Any:
    import flask

    app = flask.Flask("deadline")

    @app.get("/budget")
    def budget() -> Any:
        record.budgets.append(reskit.remaining_deadline())
        return {"left": reskit.remaining_deadline()}

    @app.get("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[bytes]:
            yield f"{round(reskit.remaining_deadline() or -1, 6)};".encode()
            yield f"{round(reskit.remaining_deadline() or -1, 6)}".encode()

        return flask.Response(chunks())

    @app.get("/retried")
    def retried() -> Any:
        def failing() -> None:
            record.attempts += 1
            raise ConnectionError("down")

        policy = Policy("upstream", retry=Retry(attempts=20, on=ConnectionError, wait=0.3))
        try:
            policy.call(failing)
        except ConnectionError:
            pass
        return {"attempts": record.attempts}

    return app.wsgi_app


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[httpx.Client, Record]]]:
    stack: list[Callable[[], None]] = []

    def start(kind: str, **options: Any) -> tuple[httpx.Client, Record]:
        record = Record()
        if kind == "asgi":
            app = reskit.asgi.DeadlineMiddleware(starlette_app(record), **options)
            running = running_uvicorn(app)
        else:
            app = reskit.wsgi.DeadlineMiddleware(flask_app(record), **options)
            running = running_wsgi(app)
        url = running.__enter__()
        stopped: list[bool] = []

        def stop() -> None:
            """Stop the server, waiting for every request it began (spans included)."""
            if not stopped:
                stopped.append(True)
                running.__exit__(None, None, None)

        record.stop = stop
        stack.append(stop)
        client = httpx.Client(base_url=url, timeout=WAIT)
        stack.append(client.close)
        return client, record

    yield start
    for stop in reversed(stack):
        stop()


@pytest.mark.parametrize("kind", KINDS)
def test_the_budget_becomes_the_requests_deadline(
    serve: Callable[..., Any], kind: str, clock: FakeClock
) -> None:
    client, _ = serve(kind)
    assert client.get("/budget", headers={HEADER: "250"}).json() == {"left": 0.25}
    assert client.get("/budget").json() == {"left": None}  # no header, no default


@pytest.mark.parametrize("kind", KINDS)
def test_maximum_caps_and_default_fills_in(
    serve: Callable[..., Any], kind: str, clock: FakeClock
) -> None:
    client, _ = serve(kind, default=2.0, maximum=5.0)
    assert client.get("/budget", headers={HEADER: "60000"}).json() == {"left": 5.0}
    assert client.get("/budget", headers={HEADER: "1500"}).json() == {"left": 1.5}
    assert client.get("/budget").json() == {"left": 2.0}


# Fullwidth digits are digits to str.isdigit, and not to the header's grammar.
HOSTILE = ["-5", "abc", "1.5", "1e3", "9" * 20, "", "0x10", "\uff11\uff12\uff13", "+100"]


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_values_are_ignored(serve: Callable[..., Any], kind: str, clock: FakeClock) -> None:
    client, _ = serve(kind, default=3.0, maximum=10.0)
    for value in HOSTILE:
        response = client.get("/budget", headers={HEADER: value.encode("utf-8")})
        assert response.json() == {"left": 3.0}, value
    repeated = client.get("/budget", headers=[(HEADER, "100"), (HEADER, "200")])
    assert repeated.json() == {"left": 3.0}
    if kind == "asgi":
        # Latin-1 bytes that str.strip() takes for whitespace are not HTTP's whitespace.
        # (The WSGI server's own header parser strips them before the middleware looks.)
        for raw in (b"\xa0100", b"100\x85", b"\x1c100"):
            assert client.get("/budget", headers={HEADER: raw}).json() == {"left": 3.0}, raw


@pytest.mark.parametrize("kind", KINDS)
def test_a_spent_budget_is_answered_504_without_running(
    serve: Callable[..., Any], kind: str, clock: FakeClock
) -> None:
    client, record = serve(kind)
    response = client.get("/budget", headers={HEADER: "0"})
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("deadlines.md#deadline-exceeded")
    assert record.budgets == []


def test_asgi_cancels_the_handler_and_answers_504(
    serve: Callable[..., Any], clock: FakeClock
) -> None:
    client, record = serve("asgi")
    with httpx.Client(base_url=str(client.base_url), timeout=WAIT) as other:
        result: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: result.append(other.get("/hang", headers={HEADER: "300"}))
        )
        caller.start()
        assert record.entered.wait(WAIT)
        clock.advance(0.299)
        assert not result  # not yet: the budget is not spent
        clock.advance(0.1)  # past it, by at most one grain of the timer wheel
        caller.join(WAIT)
    assert result[0].status_code == 504
    assert record.ended == ["cancelled"]


def test_asgi_cuts_a_response_that_is_already_streaming(
    serve: Callable[..., Any], clock: FakeClock
) -> None:
    client, record = serve("asgi")
    with client.stream("GET", "/stream", headers={HEADER: "200"}) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        assert next(chunks) == b"first;"
        assert record.entered.wait(WAIT)
        clock.advance(0.3)
        with pytest.raises(httpx.RemoteProtocolError):
            b"".join(chunks)
    assert record.ended == ["cancelled"]


def test_wsgi_streaming_runs_under_the_deadline(
    serve: Callable[..., Any], clock: FakeClock
) -> None:
    client, _ = serve("wsgi")
    assert client.get("/stream", headers={HEADER: "400"}).text == "0.4;0.4"


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stop_when_the_budget_cannot_cover_another_attempt(
    serve: Callable[..., Any], kind: str, clock: FakeClock
) -> None:
    client, record = serve(kind)
    assert record.attempts == 0
    # Attempts at 0, 0.3, 0.6 and 0.9 s; the next would start after the 1 s budget.
    assert client.get("/retried", headers={HEADER: "1000"}).json() == {"attempts": 4}


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_span_records_the_budget(
    serve: Callable[..., Any], kind: str, clock: FakeClock, spans: Any
) -> None:
    client, record = serve(kind, maximum=2.0)
    client.get("/budget", headers={HEADER: "60000"})
    client.get("/budget", headers={HEADER: "0"})
    record.stop()  # a WSGI span ends when the server closes the response
    server = [span for span in spans.spans() if span.kind.name == "SERVER"]
    capped, spent = sorted(server, key=lambda span: span.start_time)
    assert capped.attributes["reskit.deadline.received_ms"] == 60000
    assert capped.attributes["reskit.deadline.budget_ms"] == 2000
    assert capped.attributes["reskit.deadline.exceeded"] is False
    assert spent.attributes["reskit.deadline.exceeded"] is True
    assert spent.attributes["http.response.status_code"] == 504


@pytest.mark.parametrize("module", [reskit.asgi, reskit.wsgi])
def test_bad_configuration_is_refused(module: Any) -> None:
    def app(*args: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="is over maximum"):
        module.DeadlineMiddleware(app, default=5, maximum=1)
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        module.DeadlineMiddleware(app, default=-1)
    with pytest.raises(ValueError, match="must be an HTTP header name"):
        module.DeadlineMiddleware(app, header="bad header")


async def test_asgi_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await reskit.asgi.DeadlineMiddleware(app, default=1.0)({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


def test_the_asgi_header_reading_corners(clock: FakeClock) -> None:
    """The one-pass ASGI reader agrees with the header's rule in every corner (in process)."""
    from reskit import _clock
    from reskit._context import _deadline
    from reskit._edge import DeadlineSettings

    settings = DeadlineSettings("test", HEADER, 3.0, 10.0)
    now = _clock.now()
    name = HEADER.lower().encode("latin-1")

    def read(*values: bytes, key: bytes = name) -> tuple[float, float, float | None] | None:
        return settings.deadline_in([(b"host", b"x"), *((key, value) for value in values)])

    assert read(b"250") == (now + 0.25, now, 0.25)
    assert read(b"250", key=HEADER.encode("latin-1")) == (now + 0.25, now, 0.25)
    assert read(b" 250\t") == (now + 0.25, now, 0.25)  # HTTP's whitespace around it
    assert read(b"60000") == (now + 10.0, now, 60.0)  # capped, and what was asked kept
    assert read(b"10000") == (now + 10.0, now, 10.0)  # the maximum itself
    assert read(b"0") == (now, now, 0.0)  # spent on arrival: the middleware answers 504
    assert read() == (now + 3.0, now, None)  # the default
    for values in ((b"100", b"200"), (b"100", b"100", b"100"), (b"",), (b"1" * 11,), (b"-1",)):
        assert read(*values) == (now + 3.0, now, None), values
    token = _deadline.set(now + 0.1)  # an earlier deadline already in force wins
    try:
        assert read(b"250") == (now + 0.1, now, 0.25)
    finally:
        _deadline.reset(token)
    assert DeadlineSettings("test", HEADER, None, None).deadline_in([(name, b"x")]) is None

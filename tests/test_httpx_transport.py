"""The httpx transports against a real upstream on loopback, for httpx and httpx2, sync and async.

The upstream is a raw ASGI app served by uvicorn: each path answers from a
script the test writes (status, headers, body, a gate to wait on), records what
it received and notices a client that hung up. A ``Driver`` sends requests
through a reskit transport in the sync or the async flavour of either library;
the async one runs its loop in a thread of its own, so the test thread stays
free to open gates and move the fake clock.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

import reskit
import reskit.httpx as rhttpx
from http_servers import running_uvicorn
from reskit.testing import FakeClock, SpanCapture


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    gate: threading.Event | None = None  # answer only once the test sets it
    broken: bool = False  # promise a longer body, send a part, then fail


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    raw: list[tuple[str, str]] = field(default_factory=list)  # every field, in order


class Upstream:
    def __init__(self) -> None:
        self.script: dict[str, list[Answer]] = defaultdict(list)
        self.default: dict[str, Answer] = {}
        self.seen: list[Seen] = []
        self.hung_up = threading.Event()
        self.arrived = threading.Event()
        self.gates: list[threading.Event] = []
        self._lock = threading.Lock()

    def answer(self, path: str, *answers: Answer) -> None:
        self.script[path].extend(answers)
        self.gates.extend(a.gate for a in answers if a.gate is not None)

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if path is None or s.path == path)

    def release(self) -> None:
        for gate in self.gates:
            gate.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = dict(raw)
        while True:  # the body, so a disconnect can be heard afterwards
            message = await receive()
            if not message.get("more_body"):
                break
        path = scope["path"]
        with self._lock:
            self.seen.append(Seen(scope["method"], path, headers, raw))
            script = self.script.get(path)
            answer = script.pop(0) if script else self.default.get(path, Answer())
        self.arrived.set()
        if answer.gate is not None:
            gate = asyncio.ensure_future(asyncio.to_thread(answer.gate.wait, 30))
            hangup = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({gate, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if hangup in done:
                self.hung_up.set()
                return
            hangup.cancel()
        length = len(answer.body) * (2 if answer.broken else 1)
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [
                    (b"content-length", str(length).encode()),
                    *((k.encode(), v.encode()) for k, v in answer.headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.body, "more_body": answer.broken})
        if answer.broken:
            raise RuntimeError("the upstream fails half-way through the body")


@contextmanager
def upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with running_uvicorn(app) as url:
        try:
            yield app, url
        finally:
            app.release()  # before the server stops: it waits for its handlers


class Driver:
    """Requests through a reskit transport: ``mode`` "sync" or "async", ``lib`` httpx or httpx2."""

    def __init__(self, lib: str, mode: str, base_url: str = "", **options: Any) -> None:
        self.lib = importlib.import_module(lib)
        self.mode = mode
        policy = options.pop("policy", None)
        self._loop: asyncio.AbstractEventLoop | None = None
        if mode == "sync":
            self.transport: Any = rhttpx.Transport(policy, self.lib.HTTPTransport(), **options)
            self.client: Any = self.lib.Client(transport=self.transport, base_url=base_url)
        else:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
            self.transport = rhttpx.AsyncTransport(policy, self.lib.AsyncHTTPTransport(), **options)
            self.client = self.lib.AsyncClient(transport=self.transport, base_url=base_url)

    def start(self, method: str, url: str, **kwargs: Any) -> Future[Any]:
        """Send in the background; the future holds the response (its body read)."""
        if self._loop is not None:
            return asyncio.run_coroutine_threadsafe(
                self._arequest(method, url, **kwargs), self._loop
            )
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(self.client.request(method, url, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return future

    async def _arequest(self, method: str, url: str, **kwargs: Any) -> Any:
        return await self.client.request(method, url, **kwargs)

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if self._loop is not None:
            return self.start(method, url, **kwargs).result(30)
        return self.client.request(method, url, **kwargs)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a coroutine function in async mode) where requests are made."""
        if self._loop is not None:
            return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(30)
        return fn()

    def connections(self) -> list[Any]:
        """The inner transport's connection pool (httpcore's ``connections``)."""
        return list(self.transport.inner._pool.connections)

    def close(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
        else:
            self.client.close()


# -- fixtures -------------------------------------------------------------------------------

LIBS = ("httpx", "httpx2")
MODES = ("sync", "async")


@pytest.fixture(params=LIBS)
def lib(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def up() -> Iterator[tuple[Upstream, str]]:
    with upstream() as served:
        yield served


@pytest.fixture
def drivers(lib: str, mode: str) -> Iterator[Callable[..., Driver]]:
    """Make Drivers for this test's library and mode; closed afterwards."""
    made: list[Driver] = []

    def make(base_url: str = "", **options: Any) -> Driver:
        driver = Driver(lib, mode, base_url, **options)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


def retrying(attempts: int = 3, **kwargs: Any) -> reskit.Policy:
    options: dict[str, Any] = {"wait": 0, "on": OSError, **kwargs.pop("retry", {})}
    return reskit.Policy("upstream", retry=reskit.Retry(attempts, **options), **kwargs)


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(rhttpx.DEFAULT_RETRY_STATUSES))
def test_retryable_statuses_are_retried(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], status: int
) -> None:
    app, url = up
    app.answer("/r", Answer(status), Answer(status), Answer(200, body=b"third"))
    client = drivers(url, policy=retrying(3))
    response = client.request("GET", "/r")
    assert (response.status_code, response.content) == (200, b"third")
    assert app.count("/r") == 3


@pytest.mark.parametrize("status", [400, 404, 409, 501])
def test_other_statuses_are_answers(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], status: int
) -> None:
    app, url = up
    app.answer("/r", Answer(status))
    response = drivers(url, policy=retrying(3)).request("GET", "/r")
    assert response.status_code == status
    assert app.count("/r") == 1


def test_the_last_response_is_returned_after_the_last_retry(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    app.answer("/r", Answer(503, body=b"one"), Answer(502, body=b"two"), Answer(504, body=b"3"))
    client = drivers(url, policy=retrying(3))
    response = client.request("GET", "/r")
    assert (response.status_code, response.content) == (504, b"3")
    assert app.count("/r") == 3


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_idempotent_methods_are_retried(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], method: str
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(200))
    assert drivers(url, policy=retrying(3)).request(method, "/r").status_code == 200
    assert app.count("/r") == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_unsafe_methods_without_a_key_are_never_retried(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], method: str
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(200))
    response = drivers(url, policy=retrying(3)).request(method, "/r", content=b"{}")
    assert response.status_code == 503
    assert app.count("/r") == 1


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_unsafe_methods_with_a_key_are_retried_with_the_same_key(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], method: str
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(500), Answer(201))
    client = drivers(url, policy=retrying(3))
    response = client.request(method, "/r", content=b"{}", headers={"Idempotency-Key": "k-1"})
    assert response.status_code == 201
    assert [s.headers["idempotency-key"] for s in app.seen] == ["k-1"] * 3


def test_the_transport_can_make_the_key(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(201))
    client = drivers(url, policy=retrying(3), idempotency_key=True)
    assert client.request("POST", "/r", content=b"{}").status_code == 201
    keys = [s.headers["idempotency-key"] for s in app.seen]
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert keys[0].startswith('"')  # an RFC 8941 string
    assert keys[0].endswith('"')
    assert len(keys[0]) == 34


def test_a_body_that_cannot_be_replayed_is_not_retried(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], mode: str
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(201))
    client = drivers(url, policy=retrying(3))
    if mode == "sync":
        body: Any = iter([b"{", b"}"])
    else:

        async def chunks() -> Any:
            yield b"{"
            yield b"}"

        body = chunks()
    response = client.request("PUT", "/r", content=body)
    assert response.status_code == 503
    assert app.count("/r") == 1


def test_transport_errors_are_retried(drivers: Callable[..., Driver]) -> None:
    retried: list[reskit.RetryDetails] = []
    policy = retrying(3, retry={"on_retry": retried.append})
    client = drivers("http://127.0.0.1:9", policy=policy)  # discard: nothing listens
    with pytest.raises(client.lib.ConnectError):
        client.request("GET", "/")
    assert [d.attempt for d in retried] == [1, 2]


def test_a_response_whose_body_began_streaming_is_never_retried(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    app.answer("/r", Answer(200, body=b"half", broken=True), Answer(200))
    client = drivers(url, policy=retrying(3))
    with pytest.raises(client.lib.TransportError):
        client.request("GET", "/r")
    assert app.count("/r") == 1


# -- Retry-After and the deadline ----------------------------------------------------------


def test_retry_after_seconds_on_the_fake_clock(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    app, url = up
    app.answer("/r", Answer(429, {"Retry-After": "3"}), Answer(200))
    client = drivers(url, policy=retrying(3, deadline=10.0))
    assert client.request("GET", "/r").status_code == 200
    assert clock.sleeps == [3.0]


def test_retry_after_http_date_on_the_fake_clock(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    app, url = up
    when = datetime.fromtimestamp(clock.wall() + 7, UTC)
    app.answer("/r", Answer(503, {"Retry-After": email.utils.format_datetime(when, True)}))
    client = drivers(url, policy=retrying(3, deadline=10.0))
    assert client.request("GET", "/r").status_code == 200
    assert clock.sleeps == [7.0]


def test_a_retry_after_beyond_the_deadline_returns_the_answer_now(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    app, url = up
    app.answer("/r", Answer(503, {"Retry-After": "60"}), Answer(200))
    response = drivers(url, policy=retrying(3, deadline=5.0)).request("GET", "/r")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "60"
    assert clock.sleeps == []
    assert app.count("/r") == 1


def test_without_a_deadline_wait_max_bounds_retry_after(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    app, url = up
    app.answer("/r", Answer(503, {"Retry-After": "60"}), Answer(200))
    policy = retrying(3, retry={"wait_max": 5.0})
    assert drivers(url, policy=policy).request("GET", "/r").status_code == 503
    assert clock.sleeps == []


def test_the_deadline_cuts_a_slow_upstream_short(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], mode: str
) -> None:
    app, url = up
    app.answer("/r", Answer(200, gate=threading.Event()))
    client = drivers(url, policy=retrying(3, deadline=0.3))
    with pytest.raises(reskit.TimeoutExceeded) as caught:
        client.request("GET", "/r")
    assert caught.value.kind == "deadline"
    if mode == "sync":
        # httpx's own timeout cut the attempt (async cancels it): chained as the cause.
        assert type(caught.value.__cause__).__name__ == "ReadTimeout"
    assert app.count("/r") == 1
    assert 0 < int(app.seen[0].headers["x-request-timeout-ms"]) <= 300


def test_no_attempt_starts_that_the_budget_cannot_cover(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock, mode: str
) -> None:
    app, url = up
    client = drivers(url, policy=retrying(3))
    outer = reskit.Policy("caller", deadline=1.0)
    if mode == "sync":

        def spent() -> Any:
            clock.advance(0.9995)
            return client.client.get("/r")

        with pytest.raises(reskit.TimeoutExceeded):
            outer.call(spent)
    else:

        async def aspent() -> Any:
            clock.advance(0.9995)
            return await client.client.get("/r")

        with pytest.raises(reskit.TimeoutExceeded):
            client.run(lambda: outer.acall(aspent))
    assert app.count("/r") == 0


# -- propagation and spans --------------------------------------------------------------------


def test_propagation_headers_on_every_attempt(
    up: tuple[Upstream, str],
    drivers: Callable[..., Driver],
    clock: FakeClock,
    spans: SpanCapture,
    mode: str,
) -> None:
    app, url = up
    app.answer("/r", Answer(503, {"Retry-After": "2"}), Answer(200))
    client = drivers(url, policy=retrying(3, deadline=5.0))

    with reskit.bind_correlation_id("req-42"):
        if mode == "sync":
            assert client.request("GET", "/r").status_code == 200
        else:

            async def get() -> Any:
                return await client.client.get("/r")

            assert client.run(get).status_code == 200
    first, second = app.seen
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == "req-42"
    assert first.headers["x-request-timeout-ms"] == "5000"
    assert second.headers["x-request-timeout-ms"] == "3000"  # 2 s went on Retry-After

    finished = spans.spans()
    policy_span = next(s for s in finished if s.name == "reskit upstream")
    attempts = [s for s in finished if s.name == "GET"]
    assert [a.attributes.get("http.request.resend_count") for a in attempts] == [None, 1]
    assert [a.attributes["http.response.status_code"] for a in attempts] == [503, 200]
    for seen, span in zip(app.seen, attempts, strict=True):
        assert span.parent is not None
        assert span.parent.span_id == policy_span.context.span_id
        assert span.kind.name == "CLIENT"
        _version, trace_id, span_id, _flags = seen.headers["traceparent"].split("-")
        assert int(trace_id, 16) == policy_span.context.trace_id
        assert int(span_id, 16) == span.context.span_id


def test_the_deadline_header_can_be_renamed_reserved_or_left_out(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    app, url = up
    policy = reskit.Policy("upstream", deadline=2.0)
    drivers(url, policy=policy, deadline_reserve=0.25).request("GET", "/r")
    drivers(url, policy=policy, deadline_header="X-Envoy-Upstream-Rq-Timeout-Ms").request(
        "GET", "/r"
    )
    drivers(url, policy=policy, deadline_header=None).request("GET", "/r")
    reserved, renamed, left_out = app.seen
    assert reserved.headers["x-request-timeout-ms"] == "1750"  # 2 s less the reserve
    assert renamed.headers["x-envoy-upstream-rq-timeout-ms"] == "2000"
    assert "x-request-timeout-ms" not in renamed.headers
    assert "x-request-timeout-ms" not in left_out.headers


def test_a_tighter_budget_set_on_the_request_is_kept(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    app, url = up
    client = drivers(url, policy=reskit.Policy("upstream", deadline=2.0))
    client.request("GET", "/r", headers={"X-Request-Timeout-Ms": "150"})
    client.request("GET", "/r", headers={"X-Request-Timeout-Ms": "9000"})
    tight, loose = app.seen
    assert tight.headers["x-request-timeout-ms"] == "150"
    assert loose.headers["x-request-timeout-ms"] == "2000"  # never more than what is left


@pytest.mark.parametrize("entries", ["httpx's list", "public methods"])
def test_propagation_is_the_same_through_either_way_of_writing_headers(
    up: tuple[Upstream, str],
    drivers: Callable[..., Driver],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    entries: str,
) -> None:
    """The transport writes into httpx's own list of header entries where it is laid
    out as in httpx 0.28 and httpx2; elsewhere the public methods give the same request."""
    import reskit._http_client

    laid_out = reskit._http_client._entries_laid_out
    monkeypatch.setattr(
        reskit._http_client,
        "_entries_laid_out",
        laid_out if entries == "httpx's list" else (lambda lib: False),
    )
    app, url = up
    client = drivers(url, policy=reskit.Policy("upstream", deadline=2.0))
    client.request("GET", "/r", headers={"x-request-timeout-ms": "150", "X-Request-ID": "mine"})
    client.request(
        "GET", "/r", headers=[("X-Request-Timeout-Ms", "90"), ("X-REQUEST-TIMEOUT-MS", "80")]
    )
    # Digits, but not ASCII ones (Arabic-Indic, as UTF-8 bytes: httpx refuses such text).
    client.request("GET", "/r", headers={"X-Request-Timeout-Ms": "١٢".encode()})
    client.request("GET", "/r")
    budgets = [[v for k, v in seen.raw if k == "x-request-timeout-ms"] for seen in app.seen]
    # Kept when tighter; sent twice or not in ASCII digits: replaced, once; absent: added.
    assert budgets == [["150"], ["2000"], ["2000"], ["2000"]]
    ids = [[v for k, v in seen.raw if k == "x-request-id"] for seen in app.seen]
    assert ids[0] == ["mine"]
    generated = [cid for (cid,) in ids[1:]]
    assert all(reskit.valid_correlation_id(cid) for cid in generated)
    assert len(set(generated)) == 3


def test_a_reserve_the_budget_cannot_cover_starts_no_attempt(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    client = drivers(url, policy=reskit.Policy("upstream", deadline=0.2), deadline_reserve=0.5)
    with pytest.raises(reskit.TimeoutExceeded, match="leaves no time"):
        client.request("GET", "/r")
    assert app.count("/r") == 0


def test_bad_deadline_options_are_refused() -> None:
    with pytest.raises(ValueError, match="must be an HTTP header name"):
        rhttpx.Transport(reskit.Policy("p"), deadline_header="bad header")
    with pytest.raises(ValueError, match="deadline_reserve"):
        rhttpx.Transport(reskit.Policy("p"), deadline_reserve=-1)


def test_a_correlation_id_is_made_once_per_request_when_none_is_bound(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(200))
    drivers(url, policy=retrying(3)).request("GET", "/r")
    ids = {s.headers["x-request-id"] for s in app.seen}
    assert len(ids) == 1
    assert reskit.valid_correlation_id(ids.pop())


# -- breakers, failover, hedging ----------------------------------------------------------------


def test_a_breaker_per_host(drivers: Callable[..., Driver]) -> None:
    with upstream() as (down, down_url), upstream() as (_fine, fine_url):
        down.default["/r"] = Answer(503)
        policy = reskit.Policy("upstream", breaker=reskit.CircuitBreaker(fail_max=2))
        client = drivers(policy=policy)
        assert [client.request("GET", down_url + "/r").status_code for _ in range(2)] == [503] * 2
        with pytest.raises(reskit.CircuitOpen):
            client.request("GET", down_url + "/r")
        assert down.count() == 2
        assert client.request("GET", fine_url + "/r").status_code == 200
        breakers = client.transport.breakers
        assert len(breakers) == 2
        assert breakers[down_url.removeprefix("http://")].state == reskit.BreakerState.OPEN
        assert breakers[fine_url.removeprefix("http://")].state == reskit.BreakerState.CLOSED


def test_failover_ejects_a_failing_endpoint_and_takes_it_back(
    drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    with upstream() as (primary, primary_url), upstream() as (secondary, secondary_url):
        primary.default["/v1/r"] = Answer(503)
        failover = rhttpx.Failover(
            endpoints=[primary_url + "/v1", secondary_url + "/v1"],
            consecutive_failures=2,
            ejection_time=10.0,
        )
        client = drivers(primary_url, policy=retrying(2), failover=failover)
        for _ in range(2):  # primary fails, the retry fails over to the secondary
            assert client.request("GET", "/v1/r").status_code == 200
        assert (primary.count(), secondary.count()) == (2, 2)
        for _ in range(3):  # ejected: straight to the secondary
            assert client.request("GET", "/v1/r").status_code == 200
        assert (primary.count(), secondary.count()) == (2, 5)
        assert secondary.seen[0].headers["host"] == secondary_url.removeprefix("http://")

        primary.default["/v1/r"] = Answer(200, body=b"primary")
        clock.advance(10.0)
        assert client.request("GET", "/v1/r").content == b"primary"
        assert (primary.count(), secondary.count()) == (3, 5)


def test_failover_never_ejects_more_than_its_share(
    drivers: Callable[..., Driver], clock: FakeClock
) -> None:
    with upstream() as (a, a_url), upstream() as (b, b_url):
        a.default["/r"] = b.default["/r"] = Answer(503)
        failover = rhttpx.Failover(endpoints=[a_url, b_url], consecutive_failures=1)
        client = drivers(a_url, policy=retrying(2), failover=failover)
        for _ in range(4):
            assert client.request("GET", "/r").status_code == 503
        # a is ejected after its first failure; b, the last one left, never is.
        assert (a.count(), b.count()) == (1, 7)


def test_hedging_answers_from_the_hedge_and_cancels_the_loser(
    up: tuple[Upstream, str], drivers: Callable[..., Driver], mode: str
) -> None:
    app, url = up
    app.answer("/r", Answer(200, body=b"slow", gate=threading.Event()), Answer(200, body=b"fast"))
    hedging = rhttpx.Hedging(delay=0.0, budget=reskit.RetryBudget(1.0))
    client = drivers(url, policy=retrying(1), hedging=hedging)
    response = client.request("GET", "/r")
    assert response.content == b"fast"
    assert app.count("/r") == 2
    if mode == "async":
        # The losing task was cancelled: its connection closed, the upstream saw it hang up.
        assert app.hung_up.wait(10)
    else:
        # A sync send cannot be interrupted: its answer is closed as soon as it arrives.
        app.release()
        client.transport._pool.shutdown(wait=True)
    connections = client.connections()
    assert len(connections) == 1
    assert all(c.is_idle() for c in connections)


def test_hedging_keeps_to_its_budget(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    hedging = rhttpx.Hedging(delay=0.0, budget=reskit.RetryBudget(0.1, min_per_second=0))
    client = drivers(url, policy=retrying(1), hedging=hedging)
    for _ in range(50):
        assert client.request("GET", "/r").status_code == 200
    # Every request wanted a hedge at once; the budget paid for 10% of 50.
    assert hedging.budget is not None
    assert hedging.budget.retries == 5
    assert 50 <= app.count("/r") <= 55


def test_a_failed_answer_hedges_at_once(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    app.answer("/r", Answer(503), Answer(200, body=b"hedge"))
    hedging = rhttpx.Hedging(delay=60.0, budget=reskit.RetryBudget(1.0))
    response = drivers(url, policy=retrying(1), hedging=hedging).request("GET", "/r")
    assert response.content == b"hedge"
    assert app.count("/r") == 2


# -- connections ------------------------------------------------------------------------------


def test_no_connection_leaks_after_1000_retried_requests(
    up: tuple[Upstream, str], drivers: Callable[..., Driver]
) -> None:
    app, url = up
    for _ in range(1000):
        app.answer("/r", Answer(503, body=b"x" * 100), Answer(200))
    client = drivers(url, policy=retrying(2))
    for _ in range(1000):
        assert client.request("GET", "/r").status_code == 200
    assert app.count("/r") == 2000
    connections = client.connections()
    assert len(connections) == 1
    assert all(c.is_idle() for c in connections)


# -- the library and the standard policy -------------------------------------------------


def test_the_library_follows_the_inner_transport() -> None:
    import httpx
    import httpx2

    assert rhttpx.Transport(transport=httpx.HTTPTransport()).library is httpx
    assert rhttpx.Transport(transport=httpx2.HTTPTransport()).library is httpx2
    assert rhttpx.AsyncTransport(transport=httpx.AsyncHTTPTransport()).library is httpx
    assert rhttpx.Transport(library="httpx").library is httpx
    with pytest.raises(ValueError, match="httpx"):
        rhttpx.Transport(library="requests")


@pytest.mark.parametrize("name", LIBS)
async def test_without_an_inner_transport_the_clients_library_decides(
    name: str, up: tuple[Upstream, str]
) -> None:
    _, url = up
    lib = importlib.import_module(name)
    sync = rhttpx.Transport(reskit.Policy("lib"))
    assert sync.library is None  # nothing sent yet: the first request decides
    with lib.Client(transport=sync, base_url=url) as client:
        assert client.get("/").status_code == 200
    assert sync.library is lib
    asynchronous = rhttpx.AsyncTransport(reskit.Policy("lib"))
    async with lib.AsyncClient(transport=asynchronous, base_url=url) as client:
        assert (await client.get("/")).status_code == 200
    assert asynchronous.library is lib


def test_a_request_of_the_other_library_gets_a_clear_error() -> None:
    import httpx
    import httpx2

    transport = rhttpx.Transport(transport=httpx2.MockTransport(lambda r: httpx2.Response(200)))
    with (
        httpx.Client(transport=transport) as client,
        pytest.raises(TypeError, match="library='httpx'"),
    ):
        client.get("https://upstream.test/")


def test_the_standard_policy_has_the_standard_numbers() -> None:
    policy = rhttpx.standard("inventory")
    assert (policy.name, policy.deadline, policy.timeout) == ("inventory", 30.0, 10.0)
    assert policy.retry is not None
    assert (policy.retry.attempts, policy.retry.wait_initial) == (4, 2.0)
    assert policy.breaker is not None
    breaker = policy.breaker
    assert (breaker._failure_rate, breaker._window_seconds, breaker._minimum_calls) == (
        0.1,
        30,
        100,
    )
    assert breaker._reset_timeout == 5.0
    assert policy.bulkhead is not None
    assert policy.bulkhead.max_concurrent == 1000


def test_a_tenacity_retry_strategy_is_refused() -> None:
    import tenacity

    policy = reskit.Policy("x", retry=reskit.Retry(retry=tenacity.retry_if_exception_type(OSError)))
    with pytest.raises(TypeError, match="on="):
        rhttpx.Transport(policy)


def test_the_header_layout_probe_accepts_httpx_and_refuses_other_layouts() -> None:
    import types

    import httpx
    import httpx2

    from reskit._http_client import _entries_laid_out

    class Headers(dict[str, str]):  # a library keeping its entries some other way
        pass

    class Listed(httpx.Headers):  # the same list, but entries that are not reused as given
        def __setitem__(self, key: str, value: str) -> None:
            super().__setitem__(key, value.upper())

    assert _entries_laid_out(httpx)
    assert _entries_laid_out(httpx2)
    assert not _entries_laid_out(types.SimpleNamespace(Headers=Headers))
    assert not _entries_laid_out(types.SimpleNamespace(Headers=Listed))
    assert not _entries_laid_out(types.SimpleNamespace())  # no Headers at all


def test_a_hosts_breaker_carries_every_setting_of_the_policys() -> None:
    """The per-host breakers are clones: every argument of CircuitBreaker() is carried
    over (a new one would be caught here), with only the name and the state new."""
    import inspect

    from reskit._http_client import clone_breaker

    class Listener:
        def state_change(self, breaker: Any, old: Any, new: Any) -> None:
            pass

    listener = Listener()
    template = reskit.CircuitBreaker(
        7,
        12.0,
        exclude=[KeyError],
        success_threshold=2,
        listeners=[listener],
        name="api",
        failure_rate=0.3,
        window=40,
        window_seconds=20,
        minimum_calls=9,
        slow_call_duration=1.5,
        slow_call_rate=0.6,
        half_open_max_calls=3,
        max_half_open_wait=4.0,
        on_result=lambda result: result is None,
        shared=True,
    )
    clone = clone_breaker(template, "api example.com:443")
    public = {"exclude": "excluded_exceptions"}
    for parameter in inspect.signature(reskit.CircuitBreaker).parameters:
        if parameter == "name":
            continue
        attribute = public.get(parameter, parameter)
        assert getattr(clone, attribute) == getattr(template, attribute), parameter
    assert clone.name == "api example.com:443"
    assert clone.listeners == (listener,)
    assert clone is not template

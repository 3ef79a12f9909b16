"""The outbound HTTP decisions, free of I/O: what each attempt sends and what it means.

:mod:`reskit.httpx` wraps an httpx (or httpx2) transport. Everything it decides
lives here, written once: which methods may be retried, what an answer means
(a retryable status, a transport error, a success), the headers that travel on
every attempt (correlation ID, W3C trace context, remaining deadline,
``Idempotency-Key``), which endpoint an attempt goes to, a breaker per host,
outlier ejection, and the hedging flow.

An attempt of one request is three steps around the driver's send:
:meth:`Exchange.begin` prepares the try, :meth:`Exchange.answered` or
:meth:`Exchange.failed` records how it went. A hedged attempt, several tries at
once, is a *flow*, a generator that yields commands and is sent their results,
as httpx's ``auth_flow`` is: ``(SEND, request)`` answers with a response,
``(CLOSE, response)`` drains and closes one, ``(START, request)`` starts a
concurrent send and answers a handle, ``(WAIT, handles, timeout)`` answers
``(handle, response, exc)`` for the first to finish or ``None`` when the timeout
passed first, and ``(CANCEL, handle)`` abandons one. The sync driver runs the
commands on threads, the async driver on tasks; neither makes a decision. The
retries around attempts are the engine's: a :class:`~reskit.Policy` with a
:class:`~reskit.Retry` whose ``on_result`` judges the response.
"""

from __future__ import annotations

import email.utils
import logging
import math
import sys
import threading
import uuid
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeAlias

from . import _clock, _fork, _telemetry
from ._breaker import BreakerState, CircuitBreaker
from ._context import _correlation_id, new_correlation_id, remaining_deadline
from ._errors import TimeoutExceeded
from ._idempotency_http import HEADER as IDEMPOTENCY_HEADER
from ._retry import RetryBudget

__all__ = [
    "CLOSE",
    "DEFAULT_RETRY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "KEYED_METHODS",
    "SEND",
    "Core",
    "Exchange",
    "Failover",
    "Hedging",
    "HostBreakers",
    "parse_retry_after",
]

#: Responses that are retryable failures: timeouts, throttling, and the server's
#: transient errors (Polly's and gRPC's list).
DEFAULT_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Methods retried as they are: idempotent by RFC 9110 (TRACE has no use here).
DEFAULT_RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Methods retried only with an ``Idempotency-Key`` (the same key on every attempt).
KEYED_METHODS = frozenset({"POST", "PATCH"})
#: Headers sent on every attempt.
CORRELATION_HEADER = "X-Request-ID"
DEADLINE_HEADER = "X-Request-Timeout-Ms"
#: Bytes of an abandoned error response read so its connection can be reused;
#: a longer body is cut by closing the connection instead.
DRAIN_LIMIT = 64 * 1024
#: Latencies kept for the hedging delay's quantile.
LATENCY_WINDOW = 256

SEND, CLOSE, START, WAIT, CANCEL = range(5)
Command: TypeAlias = tuple[Any, ...]
Flow: TypeAlias = Generator[Command, Any, Any]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait, or ``None``.

    RFC 9110 allows delay-seconds or an HTTP-date; a date in the past means
    zero. A malformed value is ignored.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - _clock.wall())


def _seconds(value: float | timedelta, what: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be seconds (a number) or a timedelta, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite seconds >= 0, got {value!r}")
    return float(value)


def _as_float(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hedging:
    """Send a second copy of a slow idempotent request; the first good answer wins.

    When no answer came within ``delay`` (fixed seconds), or within the
    observed ``quantile`` of recent latencies when ``delay`` is ``None``, the
    transport sends a hedge (to the next endpoint when failing over); a failed
    answer starts the next hedge at once. The first acceptable answer is
    returned; the others are cancelled and their connections released. At most
    ``max_hedges`` hedges per attempt, and only while ``budget`` (a
    :class:`~reskit.RetryBudget`: a share of recent requests) can pay for them,
    so hedging cannot double the load during an outage. Only requests the
    transport may retry are hedged.

    Args:
        delay: seconds (or a ``timedelta``) before a hedge; ``None`` uses the
            ``quantile`` of the latencies observed (``initial_delay`` until
            ``min_samples`` were seen).
        quantile: the latency quantile used when ``delay`` is ``None`` (0.9).
        initial_delay: the delay before enough latencies were observed (1 s).
        min_samples: latencies needed before the quantile is used (20).
        max_hedges: hedges per attempt, ``>= 1`` (default 1).
        budget: the hedges' budget; default ``RetryBudget(0.1, min_per_second=1)``
            (10% of requests, plus one a second).

    .. versionadded:: 0.1.0
    """

    delay: float | timedelta | None = None
    quantile: float = 0.9
    initial_delay: float | timedelta = 1.0
    min_samples: int = 20
    max_hedges: int = 1
    budget: RetryBudget | None = None

    def __post_init__(self) -> None:
        if self.delay is not None:
            object.__setattr__(self, "delay", _seconds(self.delay, "Hedging delay"))
        object.__setattr__(
            self, "initial_delay", _seconds(self.initial_delay, "Hedging initial_delay")
        )
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"Hedging quantile must be between 0 and 1, got {self.quantile!r}")
        if isinstance(self.max_hedges, bool) or not isinstance(self.max_hedges, int):
            raise TypeError(f"Hedging max_hedges must be an int, got {self.max_hedges!r}")
        if self.max_hedges < 1:
            raise ValueError(f"Hedging max_hedges must be >= 1, got {self.max_hedges}")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"Hedging min_samples must be an int >= 1, got {self.min_samples!r}")
        if self.budget is None:
            object.__setattr__(self, "budget", RetryBudget(0.1, min_per_second=1.0))
        elif not isinstance(self.budget, RetryBudget):
            raise TypeError(f"Hedging budget must be a reskit.RetryBudget, got {self.budget!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover:
    """Base URLs serving the same API, in order of preference, with outlier ejection.

    A request addressed under one of ``endpoints`` goes to the first healthy
    one; each retry (and each hedge) goes to the next. An endpoint that fails
    ``consecutive_failures`` times in a row (a 5xx answer or a transport
    error) is *ejected* for ``ejection_time`` seconds, longer each time it is
    ejected again (``ejection_time * n``, at most ``max_ejection_time``), then
    comes back by itself. At most ``max_ejected`` of the endpoints are ejected
    at once (never all of them), as in Envoy's outlier detection. An endpoint
    whose circuit breaker is open is skipped too.

    Args:
        endpoints: two or more base URLs (``"https://eu.api.example"``,
            ``"https://us.api.example/v2"``).
        consecutive_failures: failures in a row that eject an endpoint (5).
        ejection_time: seconds (or a ``timedelta``) of the first ejection (30).
        max_ejection_time: the longest ejection (300).
        max_ejected: the largest share of endpoints ejected at once (0.5).

    .. versionadded:: 0.1.0
    """

    endpoints: Sequence[str]
    consecutive_failures: int = 5
    ejection_time: float | timedelta = 30.0
    max_ejection_time: float | timedelta = 300.0
    max_ejected: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str) or len(self.endpoints) < 1:
            raise TypeError("Failover endpoints must be a list of base URLs")
        object.__setattr__(self, "endpoints", tuple(str(e).rstrip("/") for e in self.endpoints))
        object.__setattr__(
            self, "ejection_time", _seconds(self.ejection_time, "Failover ejection_time")
        )
        object.__setattr__(
            self,
            "max_ejection_time",
            _seconds(self.max_ejection_time, "Failover max_ejection_time"),
        )
        if not isinstance(self.consecutive_failures, int) or self.consecutive_failures < 1:
            raise ValueError(
                "Failover consecutive_failures must be an int >= 1, got "
                f"{self.consecutive_failures!r}"
            )
        if not 0.0 <= self.max_ejected < 1.0:
            raise ValueError(
                f"Failover max_ejected must be in [0, 1) (never all), got {self.max_ejected!r}"
            )


class _StatusFailure(Exception):
    """What a breaker records for a retryable response (an HTTP 503 is a failure)."""


class _Endpoint:
    """One base URL: where requests are sent, its health and its breaker."""

    __slots__ = (
        "authority",
        "base",
        "breaker",
        "ejected_until",
        "failures",
        "host",
        "path",
        "port",
        "scheme",
        "times_ejected",
    )

    def __init__(self, base: Any, breaker: CircuitBreaker | None) -> None:
        self.base = base  # an httpx URL
        self.scheme = base.scheme
        self.host = base.host
        self.port = base.port
        self.path = base.raw_path.decode("ascii").split("?")[0].rstrip("/")
        self.authority = _authority(base)
        self.breaker = breaker
        self.failures = 0
        self.ejected_until = 0.0
        self.times_ejected = 0

    def available(self, now: float) -> bool:
        if self.ejected_until > now:
            return False
        breaker = self.breaker
        return breaker is None or breaker.state is not BreakerState.OPEN


def _authority(url: Any) -> str:
    port = url.port
    return f"{url.host}:{port}" if port is not None else str(url.host)


class _Latencies:
    """Recent successful latencies and their quantile, recomputed now and then."""

    __slots__ = ("_count", "_lock", "_quantile", "_ring", "_value")

    def __init__(self, quantile: float) -> None:
        self._ring: list[float] = []
        self._count = 0
        self._quantile = quantile
        self._value: float | None = None
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            ring = self._ring
            if len(ring) < LATENCY_WINDOW:
                ring.append(seconds)
            else:
                ring[self._count % LATENCY_WINDOW] = seconds
            self._count += 1
            # Sorting 256 floats costs microseconds: every 16th latency is often enough.
            if self._count % 16 == 0 or self._value is None:
                ordered = sorted(ring)
                self._value = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]

    def quantile(self, min_samples: int) -> float | None:
        return self._value if self._count >= min_samples else None


class Try:
    """One request sent to one endpoint: what the flow needs to judge its answer."""

    __slots__ = ("endpoint", "permit", "request", "resend", "span", "started")

    def __init__(self, request: Any, endpoint: _Endpoint | None, permit: Any, resend: int) -> None:
        self.request = request
        self.endpoint = endpoint
        self.permit = permit
        self.resend = resend
        self.span: Any = None
        self.started = _clock.now()


class HostBreakers:
    """A transport's breakers: one per host (authority), made from the policy's on first use.

    With ``per_host=False`` every host shares the policy's own breaker; without
    one in the policy there is none. A transport holds this from its
    construction, so breakers asked for before its first request are the ones
    its requests use.
    """

    __slots__ = ("__weakref__", "_by_host", "_lock", "name", "per_host", "template")

    def __init__(self, template: CircuitBreaker | None, per_host: bool, name: str) -> None:
        self.template = template
        self.per_host = per_host
        self.name = name
        self._by_host: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def get(self, authority: str) -> CircuitBreaker | None:
        """The breaker of ``authority`` (``"host:port"``)."""
        template = self.template
        if template is None or not self.per_host:
            return template
        breaker = self._by_host.get(authority)
        if breaker is None:
            with self._lock:
                breaker = self._by_host.get(authority)
                if breaker is None:
                    breaker = self._by_host[authority] = clone_breaker(
                        template, f"{self.name} {authority}"
                    )
        return breaker

    def made(self) -> dict[str, CircuitBreaker]:
        """The per-host breakers made so far, by authority."""
        with self._lock:
            return dict(self._by_host)


class Core:
    """A transport's shared state and decisions; the drivers hold one each."""

    def __init__(
        self,
        lib: Any,
        *,
        name: str,
        attempt_timeout: float | None,
        hosts: HostBreakers,
        retry_statuses: Collection[int],
        retry_methods: Collection[str],
        idempotency_key: bool | Callable[[Any], str],
        failover: Failover | None,
        hedging: Hedging | None,
        retryable_errors: tuple[type[BaseException], ...],
        deadline_header: str | None = DEADLINE_HEADER,
        deadline_reserve: float = 0.0,
    ) -> None:
        self.lib = lib
        self.deadline_header = deadline_header
        self.deadline_raw = None if deadline_header is None else deadline_header.encode()
        self.deadline_key = None if deadline_header is None else deadline_header.lower().encode()
        self.raw_headers = _entries_laid_out(lib)
        self.deadline_reserve = deadline_reserve
        self.name = name
        self.attempt_timeout = attempt_timeout
        self.hosts = hosts
        self.statuses = frozenset(retry_statuses)
        self.methods = frozenset(m.upper() for m in retry_methods)
        self.idempotency_key = idempotency_key
        self.failover = failover
        self.hedging = hedging
        self.retryable_errors = retryable_errors
        self._lock = threading.Lock()
        self.endpoints: tuple[_Endpoint, ...] = ()
        if failover is not None:
            self.endpoints = tuple(
                _Endpoint(e, hosts.get(_authority(e)))
                for e in (lib.URL(url) for url in failover.endpoints)
            )
        self.latencies = _Latencies(hedging.quantile if hedging is not None else 0.9)
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self.latencies._lock = threading.Lock()

    # -- the request ---------------------------------------------------------------
    def exchange(self, request: Any) -> Exchange:
        method = request.method
        keyed = False
        if method in KEYED_METHODS:
            if IDEMPOTENCY_HEADER not in request.headers and self.idempotency_key:
                make = self.idempotency_key
                key = make(request) if callable(make) else uuid.uuid4().hex
                # An RFC 8941 string, as the Idempotency-Key draft writes it.
                request.headers[IDEMPOTENCY_HEADER] = f'"{key}"'
            keyed = IDEMPOTENCY_HEADER in request.headers
        retryable = (method in self.methods or keyed) and _replayable(request, self.lib)
        return Exchange(self, request, retryable)

    def pick(self, request: Any, resend: int) -> _Endpoint | None:
        """The endpoint for the try numbered ``resend`` (0 first), or None: as addressed."""
        endpoints = self.endpoints
        if not endpoints or _endpoint_of(endpoints, request.url) is None:
            return None
        now = _clock.now()
        healthy = [e for e in endpoints if e.available(now)]
        if not healthy:
            healthy = list(endpoints)
        return healthy[resend % len(healthy)]

    def begin(self, ex: Exchange, endpoint: _Endpoint | None, copy: bool) -> Try:
        """Prepare a try: its request, headers, timeout, breaker permit and span."""
        request = ex.request
        if endpoint is not None:
            current = _endpoint_of(self.endpoints, request.url)
            if current is not endpoint or copy:
                request = _moved(self.lib, request, current, endpoint)
        elif copy:
            request = _moved(self.lib, request, None, None)
        headers = request.headers
        # The deadline: never promise the upstream more than what is left.
        left = remaining_deadline()
        limit = self.attempt_timeout
        reserve = 0.0
        if left is not None and (limit is None or left < limit):
            # The upstream is told less than this caller waits (the reserve), so its
            # answer, even a 504, arrives while someone still reads it.
            limit = left
            reserve = self.deadline_reserve
        if limit is not None:
            # Whole milliseconds, never rounded up; the epsilon keeps 0.29 s from
            # reading as 289.99999 ms and losing a millisecond at every hop.
            ms = math.floor((limit - reserve) * 1000.0 + 1e-6)
            if ms < 1:
                raise TimeoutExceeded(
                    f"policy {self.name!r}: the deadline leaves no time for an HTTP attempt",
                    policy=self.name,
                    timeout=limit,
                    kind="deadline",
                )
            capped = _capped(request.extensions.get("timeout"), limit)
            if capped is not None:
                request.extensions = {**request.extensions, "timeout": capped}
            self._propagate(headers, ms, ex)
        else:
            self._propagate(headers, None, ex)
        endpoint_for_breaker = endpoint
        if endpoint_for_breaker is not None:
            breaker = endpoint_for_breaker.breaker
        else:
            hosts = self.hosts
            breaker = hosts.get(_authority(request.url)) if hosts.template else None
        permit = breaker.admit(self.name) if breaker is not None else None
        t = Try(request, endpoint, (breaker, permit) if breaker is not None else None, ex.resend)
        ex.resend += 1
        # Only an application that imported OpenTelemetry propagates trace context.
        if _otel is not None or "opentelemetry.trace" in sys.modules:
            _trace_try(t)
        return t

    def _propagate(self, headers: Any, ms: int | None, ex: Exchange) -> None:
        """Put the remaining budget (``ms``, if any) and the correlation ID on a try.

        A budget the caller set on the request is kept when it is tighter; a
        correlation ID already there is kept.
        """
        name = self.deadline_header if ms is not None else None
        if not self.raw_headers:
            if name is not None and not _tighter(headers.get(name), ms):
                headers[name] = str(ms)
            if CORRELATION_HEADER not in headers:
                headers[CORRELATION_HEADER] = ex.correlation_id()
            return
        # httpx's Headers methods each scan every entry and re-encode the name: the four
        # calls this took were a fifth of the transport's cost. One scan of the entries does.
        entries: list[tuple[bytes, bytes, bytes]] = headers._list
        key = self.deadline_key if name is not None else None
        given: bytes | None = None
        seen = 0
        correlated = False
        for _, lower, value in entries:
            if lower == key:
                given = value
                seen += 1
            elif lower == b"x-request-id":
                correlated = True
        if name is not None and ms is not None and not (seen == 1 and _tighter(given, ms)):
            if seen:
                headers[name] = str(ms)  # replaces the one there (or several)
            else:
                assert key is not None
                assert self.deadline_raw is not None
                entries.append((self.deadline_raw, key, b"%d" % ms))
        if not correlated:
            entries.append((b"X-Request-ID", b"x-request-id", ex.correlation_id().encode()))

    def finish(self, t: Try, response: Any) -> bool:
        """Judge a try's response; return whether it is a retryable failure."""
        duration = _clock.now() - t.started
        status = response.status_code
        failed = status in self.statuses
        if t.permit is not None:
            breaker, permit = t.permit
            breaker.record(permit, _StatusFailure(status) if failed else None, duration, response)
        if t.endpoint is not None:
            self._health(t.endpoint, status >= 500)
        if not failed and self.hedging is not None:
            self.latencies.add(duration)
        if t.span is not None:
            _end_span(t.span, status, None)
        return failed

    def finish_error(self, t: Try, exc: BaseException) -> BaseException:
        """Record a try that raised; return what to raise (a deadline cut becomes one)."""
        duration = _clock.now() - t.started
        if t.permit is not None:
            breaker, permit = t.permit
            breaker.record(permit, exc, duration)
        counts = isinstance(exc, Exception)
        if t.endpoint is not None and counts:
            self._health(t.endpoint, isinstance(exc, self.retryable_errors))
        if t.span is not None:
            _end_span(t.span, None, exc)
        if isinstance(exc, self.lib.TimeoutException):
            left = remaining_deadline()
            if left is not None and left <= 0.001:
                return TimeoutExceeded(
                    f"policy {self.name!r}: the deadline ran out during an HTTP attempt",
                    policy=self.name,
                    kind="deadline",
                )
        return exc

    def abandon(self, t: Try) -> None:
        """A try cancelled before it answered (a hedge that lost): neither outcome."""
        if t.permit is not None:
            breaker, permit = t.permit
            breaker.record(permit, _Abandoned(), _clock.now() - t.started)
        if t.span is not None:
            _end_span(t.span, None, None, cancelled=True)

    def _health(self, endpoint: _Endpoint, failed: bool) -> None:
        if not failed:
            if endpoint.failures:
                endpoint.failures = 0
            return
        failover = self.failover
        assert failover is not None
        with self._lock:
            endpoint.failures += 1
            now = _clock.now()
            if endpoint.failures < failover.consecutive_failures or endpoint.ejected_until > now:
                return
            ejected = sum(1 for e in self.endpoints if e.ejected_until > now)
            if ejected + 1 > failover.max_ejected * len(self.endpoints):
                return
            endpoint.times_ejected += 1
            endpoint.failures = 0
            seconds = min(
                _as_float(failover.ejection_time) * endpoint.times_ejected,
                _as_float(failover.max_ejection_time),
            )
            endpoint.ejected_until = now + seconds
        _telemetry.emit(
            logging.WARNING,
            "reskit.http.endpoint_ejected",
            policy=self.name,
            endpoint=str(endpoint.base),
            seconds=seconds,
        )

    # -- hedging -------------------------------------------------------------------
    def hedge_delay(self) -> float:
        hedging = self.hedging
        assert hedging is not None
        if hedging.delay is not None:
            return _as_float(hedging.delay)
        observed = self.latencies.quantile(hedging.min_samples)
        return _as_float(hedging.initial_delay) if observed is None else observed


class _Abandoned(BaseException):
    """Recorded for a try nobody waits for any more: neither success nor failure."""


class Exchange:
    """One request through the transport: per-call state, never shared."""

    __slots__ = ("_cid", "core", "hedged", "previous", "request", "resend", "retryable")

    def __init__(self, core: Core, request: Any, retryable: bool) -> None:
        self.core = core
        self.request = request
        self.retryable = retryable
        self.hedged = retryable and core.hedging is not None
        self.resend = 0
        #: The retryable response of the last attempt: closed before the next one,
        #: or returned when it was the last.
        self.previous: Any = None
        self._cid: str | None = None
        if self.hedged:
            budget = core.hedging.budget  # type: ignore[union-attr]
            budget._deposit()  # type: ignore[union-attr]

    def correlation_id(self) -> str:
        cid = self._cid
        if cid is None:
            cid = _correlation_id.get()
            if cid is None:
                # One ID for every attempt of the request, so the upstream's logs join.
                cid = new_correlation_id()
            self._cid = cid
        return cid

    # An attempt is three steps around the driver's own send: begin, then answered or
    # failed. The drivers (sync and async) run them directly, with no flow to drive on
    # every request; hedging, which sends several tries at once, is a flow (hedge()).
    def begin(self) -> Try:
        """Prepare the try of this attempt: its request, headers, timeout and permit."""
        core = self.core
        if core.endpoints:
            return core.begin(self, core.pick(self.request, self.resend), False)
        return core.begin(self, None, False)

    def answered(self, t: Try, response: Any) -> Any:
        """Record the try's response and return it; a retryable one is kept to close."""
        if self.core.finish(t, response) and self.retryable:
            self.previous = response
        return response

    def failed(self, t: Try, exc: BaseException) -> NoReturn:
        """Record a try that raised ``exc``; raise it, or what it became (chained to it)."""
        error = self.core.finish_error(t, exc)
        if error is exc:
            raise exc
        raise error from exc

    def hedge(self) -> Flow:
        """One attempt as hedged tries, as a flow of commands for the driver to execute."""
        core = self.core
        hedging = core.hedging
        assert hedging is not None
        assert hedging.budget is not None
        running: dict[Any, Try] = {}
        hedges = hedging.max_hedges
        delay = core.hedge_delay()
        failure: Any = None  # the last failed answer: a response or an exception
        try:
            t = core.begin(self, core.pick(self.request, self.resend), True)
            running[(yield (START, t.request))] = t
            while True:
                done = yield (WAIT, tuple(running), delay if hedges > 0 else None)
                if done is None:
                    # No answer within the delay: hedge, if the budget can pay for it.
                    if hedges > 0 and hedging.budget._withdraw():
                        hedges -= 1
                        t = core.begin(self, core.pick(self.request, self.resend), True)
                        running[(yield (START, t.request))] = t
                    else:
                        hedges = 0
                    continue
                handle, response, exc = done
                t = running.pop(handle)
                if exc is not None:
                    answer: Any = core.finish_error(t, exc)
                    if not isinstance(answer, Exception):
                        raise answer from (None if answer is exc else exc)
                elif core.finish(t, response):
                    answer = response
                else:
                    for other, lost in list(running.items()):
                        del running[other]
                        core.abandon(lost)
                        yield (CANCEL, other)
                    return response
                if failure is not None and not isinstance(failure, BaseException):
                    yield (CLOSE, failure)
                failure = answer
                # A failed answer hedges at once (Polly's rule), within the budget.
                if hedges > 0 and hedging.budget._withdraw():
                    hedges -= 1
                    t = core.begin(self, core.pick(self.request, self.resend), True)
                    running[(yield (START, t.request))] = t
                if not running:
                    if isinstance(failure, BaseException):
                        raise failure
                    self.previous = failure
                    return failure
        finally:
            for t in running.values():
                core.abandon(t)


_PHASES = ("connect", "read", "write", "pool")


def _capped(timeouts: Mapping[str, Any] | None, limit: float) -> dict[str, Any] | None:
    """httpx's per-phase ``timeouts`` with none longer than ``limit`` (unset is longer).

    ``None`` when every phase already is: the request keeps its own, as it does
    with httpx's default 5 s against the standard 10 s attempt, and nothing is
    copied on that request's path.
    """
    if timeouts is None:
        return dict.fromkeys(_PHASES, limit)
    capped = None
    for phase in _PHASES:
        given = timeouts.get(phase)
        if given is None or given > limit:
            if capped is None:
                capped = {p: timeouts.get(p) for p in _PHASES}
            capped[phase] = limit
    return capped


def _tighter(given: str | bytes | None, ms: int | None) -> bool:
    """Whether a budget header the caller set (whole milliseconds) is below ``ms``."""
    # bytes.isdigit() is ASCII only; str.isdigit() needs isascii() to refuse other digits.
    return (
        given is not None
        and ms is not None
        and given.isdigit()
        and given.isascii()
        and int(given) < ms
    )


def _entries_laid_out(lib: Any) -> bool:
    """Whether ``lib.Headers`` keeps its entries as httpx 0.28 and httpx2 2.x do.

    That is a list ``_list`` of ``(name, lower-case name, value)`` bytes, which
    the transport appends to directly on every try. A library that lays them
    out otherwise gets the public methods instead (slower, the same result).
    """
    try:
        probe = lib.Headers({"X-A": "b"})
        probe["X-C"] = "d"
        entries: Any = getattr(probe, "_list", None)
        if type(entries) is not list or entries != [(b"X-A", b"x-a", b"b"), (b"X-C", b"x-c", b"d")]:
            return False
        entries.append((b"X-E", b"x-e", b"f"))
        return bool(probe.get("x-e") == "f" and probe.raw[-1] == (b"X-E", b"f"))
    except Exception:
        return False


def _replayable(request: Any, lib: Any) -> bool:
    """Whether the request's body can be sent again (bytes, not a one-shot stream)."""
    return isinstance(request.stream, lib.ByteStream) or hasattr(request, "_content")


def _endpoint_of(endpoints: Sequence[_Endpoint], url: Any) -> _Endpoint | None:
    path = url.raw_path.decode("ascii")
    for e in endpoints:
        if (
            url.host == e.host
            and url.port == e.port
            and url.scheme == e.scheme
            and (not e.path or path == e.path or path.startswith((e.path + "/", e.path + "?")))
        ):
            return e
    return None


def _moved(lib: Any, request: Any, current: _Endpoint | None, target: _Endpoint | None) -> Any:
    """A copy of ``request`` for another try, sent to ``target`` instead of ``current``."""
    url = request.url
    if target is not None and target is not current:
        path = url.raw_path.decode("ascii")
        if current is not None and current.path:
            path = path[len(current.path) :]
        url = target.base.copy_with(raw_path=(target.path + path).encode("ascii"))
    # A request built with a stream gets no Host header of its own: set the target's.
    headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
    headers.insert(0, (b"Host", url.netloc))
    return lib.Request(
        request.method,
        url,
        headers=headers,
        stream=request.stream,
        extensions=dict(request.extensions),
    )


def clone_breaker(template: CircuitBreaker, name: str) -> CircuitBreaker:
    """A new breaker with ``template``'s settings (and listeners), fresh state.

    Read through the breaker's public settings; a test checks that every
    argument of ``CircuitBreaker()`` is carried over.
    """
    t = template
    return CircuitBreaker(
        fail_max=t.fail_max,
        reset_timeout=t.reset_timeout,
        exclude=t.excluded_exceptions,
        success_threshold=t.success_threshold,
        listeners=t.listeners,
        name=name,
        failure_rate=t.failure_rate,
        window=t.window,
        window_seconds=t.window_seconds,
        minimum_calls=t.minimum_calls,
        slow_call_duration=t.slow_call_duration,
        slow_call_rate=t.slow_call_rate,
        half_open_max_calls=t.half_open_max_calls,
        max_half_open_wait=t.max_half_open_wait,
        on_result=t.on_result,
        shared=t.shared,
    )


# -- telemetry: a client span per try, trace context on every try ----------------------


class _Otel:
    """The OpenTelemetry API functions a try uses, imported once the application has."""

    def __init__(self) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.inject = propagate.inject
        self.in_context = trace.set_span_in_context
        self.CLIENT = SpanKind.CLIENT
        self.Status = Status
        self.ERROR = StatusCode.ERROR


_otel: _Otel | None = None


def _api() -> _Otel | None:
    global _otel
    if _otel is None:
        # Only an application that imported OpenTelemetry propagates trace context.
        if "opentelemetry.trace" not in sys.modules:
            return None
        _otel = _Otel()
    return _otel


def _trace_try(t: Try) -> None:
    api = _api()
    if api is None:
        return
    request = t.request
    try:
        sink = _telemetry.sink()
        tracer = sink.tracer if sink is not None else None
        context = None
        if tracer is not None:
            url = request.url
            attributes: dict[str, Any] = {
                "http.request.method": request.method,
                "url.full": str(url.copy_with(username=None, password=None)),
                "server.address": url.host,
            }
            if url.port is not None:
                attributes["server.port"] = url.port
            if t.resend:
                attributes["http.request.resend_count"] = t.resend
            t.span = tracer.start_span(request.method, kind=api.CLIENT, attributes=attributes)
            context = api.in_context(t.span)
        carrier: dict[str, str] = {}
        api.inject(carrier, context=context)
        if carrier:
            request.headers.update(carrier)
    except Exception as exc:
        _telemetry.report("the OpenTelemetry trace context of an HTTP attempt", exc)


def _end_span(
    span: Any, status: int | None, exc: BaseException | None, cancelled: bool = False
) -> None:
    api = _otel
    try:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400 and api is not None:
                span.set_attribute("error.type", str(status))
                span.set_status(api.Status(api.ERROR))
        elif exc is not None and api is not None:
            span.set_attribute("error.type", type(exc).__qualname__)
            if isinstance(exc, Exception):
                span.record_exception(exc)
            span.set_status(api.Status(api.ERROR))
        elif cancelled:
            span.set_attribute("error.type", "cancelled")
        span.end()
    except Exception as failed:
        _telemetry.report("the span of an HTTP attempt", failed)

"""What the ASGI and WSGI edge middleware share: every decision, no I/O.

``CorrelationIdMiddleware`` and ``ShedMiddleware`` exist twice, in
:mod:`reskit.asgi` and :mod:`reskit.wsgi`; which correlation ID a request gets,
which policy guards a path, how a rejection is answered and what the server
span records are decided here, once, so the two cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _clock, _telemetry
from ._config import seconds
from ._context import CORRELATION_ID_PATTERN, _deadline, new_correlation_id
from ._errors import BulkheadFull, Rejected
from ._http import Problem

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from ._policy import Policy

__all__ = [
    "DEFAULT_HEADER",
    "CorrelationSettings",
    "Routes",
    "ServerSpan",
    "check_tenant",
    "rejection",
]

#: The header a correlation ID is read from and echoed on, unless configured.
DEFAULT_HEADER = "X-Request-ID"
#: Seconds a client is asked to wait when a rejection does not know better.
DEFAULT_RETRY_AFTER = 1

# An HTTP field name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# version "00" - trace-id - parent-id - flags (W3C Trace Context, level 1).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE = "0" * 32


# CORRELATION_ID_PATTERN for a header's bytes (its classes are ASCII: the same test).
_ID_BYTES = re.compile(
    CORRELATION_ID_PATTERN.pattern.encode("ascii"), CORRELATION_ID_PATTERN.flags & ~re.UNICODE
)


def trace_id_of(values: Sequence[str]) -> str | None:
    """The trace ID of a single valid W3C ``traceparent`` value, else ``None``."""
    if len(values) != 1:
        return None
    match = _TRACEPARENT.fullmatch(values[0].strip())
    if match is None or values[0].startswith("ff") or match.group(1) == _NO_TRACE:
        return None
    return match.group(1)


def header_name(where: str, value: object) -> str:
    """``value`` if it is an HTTP field name (RFC 9110 token); else a ``ValueError``."""
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise ValueError(
            f"{where} must be an HTTP header name such as 'X-Request-ID', got {value!r}"
        )
    return value


class CorrelationSettings:
    """How a correlation ID is taken from a request: header, fallback, strictness."""

    __slots__ = ("header", "key", "reject_invalid", "use_traceparent", "wsgi_key")

    def __init__(self, where: str, header: str, from_traceparent: bool, reject_invalid: bool):
        header_name(f"{where} header=", header)
        for value, name in (
            (from_traceparent, "from_traceparent"),
            (reject_invalid, "reject_invalid"),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{where} {name}= must be True or False, got {value!r}")
        self.header = header
        self.key = header.lower().encode("latin-1")
        self.wsgi_key = "HTTP_" + header.upper().replace("-", "_")
        self.use_traceparent = from_traceparent
        self.reject_invalid = reject_invalid

    def choose(self, values: Sequence[str] | Sequence[bytes], traceparents: Sequence[str]) -> str:
        """The request's correlation ID; raises :class:`Problem` for a bad one when strict.

        A value is adopted only when the header came once and matches
        ``[A-Za-z0-9._-]{1,128}``; repeated headers are never merged (a WSGI
        server folds them with a comma, which the pattern refuses). ``values``
        are text (WSGI) or the header's bytes as ASGI gives them (no copy is
        decoded for the usual request, whose one value is valid).
        """
        if len(values) == 1:
            # Known strings: the pattern alone decides (as valid_correlation_id does).
            value = values[0]
            if isinstance(value, bytes):
                if _ID_BYTES.fullmatch(value) is not None:
                    return value.decode("ascii")
            elif CORRELATION_ID_PATTERN.fullmatch(value) is not None:
                return value
        if self.use_traceparent:
            trace_id = trace_id_of(traceparents)
            if trace_id is not None:
                return trace_id
        if values and self.reject_invalid:
            raise Problem(
                400,
                "correlation-id-invalid",
                "Invalid correlation ID",
                f"The {self.header} header must be sent once, as 1 to 128 characters of "
                "A-Z, a-z, 0-9, '.', '_' or '-'; send a valid one or none.",
                page="middleware.md",
            )
        return new_correlation_id()


# -- shedding ----------------------------------------------------------------------------


class Routes:
    """Path prefixes and the policies that guard them; the longest prefix wins."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, where: str, routes: Mapping[str, Policy], *, wsgi: bool = False) -> None:
        from ._order import outer_gates
        from ._policy import Policy

        if not isinstance(routes, Mapping) or not routes:
            raise TypeError(
                f"{where} routes= must be a non-empty mapping of path prefixes to policies, "
                f"such as {{'/api': Policy('api', bulkhead=Bulkhead(50))}}; got {routes!r}"
            )
        keywords = [row.keyword for row in outer_gates()]
        checked: list[tuple[str, Policy]] = []
        given: dict[str, str] = {}
        for prefix, policy in routes.items():
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                raise ValueError(f"{where} route prefixes must start with '/', got {prefix!r}")
            if not isinstance(policy, Policy):
                raise TypeError(
                    f"{where} routes[{prefix!r}] must be a reskit.Policy, got {policy!r}"
                )
            if all(getattr(policy, str(keyword)) is None for keyword in keywords):
                raise ValueError(
                    f"{where} routes[{prefix!r}]: {policy!r} has nothing to apply to a "
                    f"request; give it one of {', '.join(f'{k}=' for k in keywords)} "
                    "(timeouts, retries and fallbacks apply to calls, not to requests)"
                )
            normal = prefix.rstrip("/") or "/"
            twin = given.get(normal)
            if twin is not None:
                raise ValueError(
                    f"{where} route prefixes {twin!r} and {prefix!r} are the same path; a path "
                    "is under one policy, so give it once"
                )
            given[normal] = prefix
            checked.append((normal, policy))
        if wsgi:
            # PATH_INFO is the URL's bytes read as latin-1 (PEP 3333): match in that form.
            checked = [(prefix.encode("utf-8").decode("latin-1"), p) for prefix, p in checked]
        # Longest first, so "/api/admin" is found before "/api".
        checked.sort(key=lambda item: len(item[0]), reverse=True)
        self.prefixes = tuple(checked)
        self.exact = dict(checked)

    def match(self, path: str) -> Policy | None:
        """The policy of the longest prefix that ``path`` is under, on segment boundaries."""
        policy = self.exact.get(path)
        if policy is not None:
            return policy
        for prefix, policy in self.prefixes:
            if prefix == "/" or (path.startswith(prefix) and path[len(prefix)] == "/"):
                return policy
        return None


def check_retry_after(where: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= 86_400:
        raise ValueError(
            f"{where} retry_after= must be whole seconds from 1 to 86400 (Retry-After has "
            f"no fractions), got {value!r}"
        )
    return value


def check_tenant(value: object) -> str | None:
    """What a ``tenant=`` function returned, refused unless a string or ``None``."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"ShedMiddleware tenant= must return a str or None, got {type(value).__name__}")


_TITLES = {
    "kill_switch": "Feature switched off",
    "brownout": "Shed under brownout",
    "bulkhead": "Service at capacity",
}


def rejection(exc: Rejected, retry_after: int) -> Problem:
    """The 503 (or, for a tenant over its own quota, 429) that answers a rejection."""
    guard = exc.rejected_by or "rejected"
    if exc.retry_after is not None and exc.retry_after > 0:
        # Whole seconds, at least one: Retry-After has no fractions, and zero invites a spin.
        retry_after = max(1, math.ceil(min(exc.retry_after, 86_400.0)))
    if isinstance(exc, BulkheadFull) and exc.partition is not None:
        return Problem(
            429,
            "quota",
            "Too many concurrent requests",
            "This client has as many requests in progress as its share allows; retry "
            "after the time in Retry-After.",
            page="middleware.md",
            retry_after=retry_after,
            guard=guard,
            policy=exc.policy,
        )
    return Problem(
        503,
        guard.replace("_", "-"),
        _TITLES.get(guard, "Request rejected"),
        "The server refused this request to protect itself; retry after the time in Retry-After.",
        page="middleware.md",
        retry_after=retry_after,
        guard=guard,
        policy=exc.policy,
    )


# -- deadlines ---------------------------------------------------------------------------

#: The header a caller's remaining budget arrives in, in whole milliseconds.
DEADLINE_HEADER = "X-Request-Timeout-Ms"


class DeadlineSettings:
    """How a request's budget is read: header, cap and default."""

    __slots__ = ("default", "header", "key", "maximum", "wsgi_key")

    def __init__(
        self,
        where: str,
        header: str,
        default: float | timedelta | None,
        maximum: float | timedelta | None,
    ) -> None:
        header_name(f"{where} header=", header)
        self.header = header
        self.key = header.lower().encode("latin-1")
        self.wsgi_key = "HTTP_" + header.upper().replace("-", "_")
        self.default = seconds(default, f"{where} default=", waited=True)
        self.maximum = seconds(maximum, f"{where} maximum=", waited=True)
        if self.default is not None and self.maximum is not None and self.default > self.maximum:
            raise ValueError(
                f"{where} default= ({self.default}s) is over maximum= ({self.maximum}s): a "
                "request without a budget would get more time than one that asked; lower "
                "default= or raise maximum="
            )

    def deadline(self, values: list[str]) -> tuple[float, float, float | None] | None:
        """``(deadline, now, received)`` for the header's ``values``, or ``None`` for none.

        The header counts only when sent once as whole milliseconds; anything
        else (negative, a fraction, text, twenty digits, a repeated header) is
        ignored as if absent. ``maximum`` caps what was received; without a
        usable header the request gets ``default``. ``received`` is what the
        caller asked for (``None`` when it asked nothing usable).
        """
        if len(values) != 1:
            return self._from_now(self.default, None)
        return self._from_now(*self._grant(values[0].strip(" \t")))  # HTTP's whitespace

    def deadline_in(
        self, pairs: Iterable[tuple[bytes, bytes]]
    ) -> tuple[float, float, float | None] | None:
        """:meth:`deadline`, read straight from ASGI header pairs in one pass."""
        key = self.key
        size = len(key)
        found = None
        for name, value in pairs:
            # As in header_values: the length first, then the name in any case.
            if len(name) == size and (name == key or name.lower() == key):
                if found is not None:
                    found = b""  # sent twice: ignored, as "" (no number) is
                    break
                found = value
        if found is None:
            return self._from_now(self.default, None)
        # A clean value (the usual one) has no whitespace to strip: no copy is made.
        return self._from_now(*self._grant(found if found.isdigit() else found.strip(b" \t")))

    def _grant(self, text: str | bytes) -> tuple[float | None, float | None]:
        """``(budget, received)`` for the header's one value, stripped (text or bytes)."""
        # Whole milliseconds: ASCII digits only (str.isdigit also takes other scripts'),
        # at most ten of them (115 days); a longer run of digits is hostile.
        if not (text.isdigit() and text.isascii() and len(text) <= 10):
            return self.default, None
        received = int(text) / 1000.0
        if self.maximum is not None and received > self.maximum:
            return self.maximum, received
        return received, received

    @staticmethod
    def _from_now(
        budget: float | None, received: float | None
    ) -> tuple[float, float, float | None] | None:
        """``budget`` seconds from now as ``(deadline, now, received)``; ``None`` without one.

        It never reaches past a deadline already in force (a test, an outer app).
        """
        if budget is None:
            return None
        now = _clock.now()
        when = now + budget
        outer = _deadline.get()
        if outer is not None and outer < when:
            when = outer
        return when, now, received

    @staticmethod
    def attributes(now: float, when: float, received: float | None) -> dict[str, Any]:
        """The server span's record of the budget: what was received, what was given."""
        attributes: dict[str, Any] = {"reskit.deadline.budget_ms": round((when - now) * 1000)}
        if received is not None:
            attributes["reskit.deadline.received_ms"] = round(received * 1000)
        return attributes


def deadline_spent(header: str) -> Problem:
    return Problem(
        504,
        "deadline-exceeded",
        "Deadline exceeded",
        f"The request's time budget ({header}) ran out before the server could answer; "
        "the caller has given up, so the work was not done (or was stopped).",
        page="deadlines.md",
    )


# -- the server span ---------------------------------------------------------------------


class _Otel:
    """The OpenTelemetry API functions a server span needs, imported on first use."""

    def __init__(self) -> None:
        from opentelemetry import context, propagate
        from opentelemetry.trace import (
            INVALID_SPAN,
            SpanKind,
            Status,
            StatusCode,
            get_current_span,
            set_span_in_context,
        )

        self.attach = context.attach
        self.detach = context.detach
        self.extract = propagate.extract
        self.current = get_current_span
        self.INVALID = INVALID_SPAN
        self.in_context = set_span_in_context
        self.SERVER = SpanKind.SERVER
        self.Status = Status
        self.ERROR = StatusCode.ERROR


_api: _Otel | None = None
# ServerSpan.begin's "source not given: look it up".
_LOOK = object()
# The server span reskit started for the request in progress, so the middleware
# inside the one that started it adds to it without asking OpenTelemetry.
_request_span: ContextVar[ServerSpan | None] = ContextVar("reskit_server_span", default=None)


def span_source() -> ServerSpan | Tracer | None:
    """What a request's span would record on: ``None`` when nothing records.

    The server span of an outer reskit middleware, else the tracer in force.
    Asked before gathering what :meth:`ServerSpan.begin` needs (which a
    service without tracing would gather on every request for nothing), and
    handed on to it, which spares it the same two lookups.
    """
    outer = _request_span.get()
    return outer if outer is not None else _telemetry.tracer()


class ServerSpan:
    """The request's server span: the OTel ASGI/WSGI instrumentation's if it made one.

    When the OpenTelemetry instrumentation is installed its server span is
    current and gets reskit's attributes; otherwise the outermost reskit
    middleware starts one, with the caller's ``traceparent`` as its parent, and
    the middleware inside it add to that one. Never two spans for one request.
    Nothing here raises: telemetry cannot change a response.
    """

    __slots__ = ("own", "span", "token")

    def __init__(self, span: Any, own: bool = False, token: Any = None) -> None:
        self.span = span
        self.own = own
        self.token = token

    @classmethod
    def begin(
        cls,
        method: str,
        path: str,
        scheme: str,
        headers: Callable[[], Mapping[str, str]] | None,
        attributes: dict[str, Any] | None = None,
        source: object = _LOOK,
    ) -> ServerSpan | None:
        """The span to record this request on, or ``None`` when nothing records.

        ``headers`` gives the request's headers for the propagator, or is
        ``None`` when the request carries no ``traceparent``. ``source`` is
        what :func:`span_source` returned, when the caller has asked it.
        """
        if source is _LOOK:
            source = span_source()
        if source is None:
            return None
        if type(source) is ServerSpan:
            return source.inner(attributes)
        tracer: Any = source
        global _api
        try:
            api = _api if _api is not None else _Otel()
            _api = api
            current = api.current()
            parent = None  # the current context: an active trace goes on
            if current is api.INVALID:
                # No span at all (the usual case without the instrumentation).
                if headers is not None:
                    parent = api.extract(headers())
            elif current.get_span_context().is_valid:
                if not current.is_recording():
                    return None  # the instrumentation's span, sampled out: so is the request
                if getattr(current, "kind", None) is api.SERVER:
                    if attributes:
                        current.set_attributes(attributes)
                    return cls(current)
            elif headers is not None:
                parent = api.extract(headers())
            base = {"http.request.method": method, "url.path": path, "url.scheme": scheme}
            if attributes:
                base.update(attributes)
            span = tracer.start_span(method, context=parent, kind=api.SERVER, attributes=base)
            started = cls(span, True, api.attach(api.in_context(span, parent)))
            _request_span.set(started)
            return started
        except Exception as exc:
            _telemetry.report("the OpenTelemetry tracer (starting a server span)", exc)
            return None

    def inner(self, attributes: Mapping[str, Any] | None = None) -> ServerSpan:
        """This span as a middleware inside the one that started it has it: added to, not ended.

        Recorded or sampled out alike: the request has its span, and a second
        one would start a trace of its own.
        """
        if attributes:
            self.set(attributes)
        return ServerSpan(self.span)

    def set(self, attributes: Mapping[str, Any]) -> None:
        if self.span.is_recording():
            _telemetry.guard(
                "the OpenTelemetry span (setting attributes)", self.span.set_attributes, attributes
            )

    def end(self, status: int | None, exc: BaseException | None) -> None:
        """Record how the request ended; end the span if this middleware started it."""
        if not self.own:
            return  # an outer middleware's span, or the instrumentation's: it ends it
        api = _api
        assert api is not None
        span = self.span
        try:
            try:
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                if exc is not None:
                    span.record_exception(exc)
                    span.set_status(api.Status(api.ERROR, type(exc).__qualname__))
                elif status is not None and status >= 500:
                    span.set_status(api.Status(api.ERROR))
                span.end()
            finally:
                _request_span.set(None)
                api.detach(self.token)
        except Exception as failed:
            _telemetry.report("the OpenTelemetry tracer (ending a server span)", failed)


def rejected_attributes(exc: Rejected, status: int) -> dict[str, Any]:
    return {
        "reskit.outcome": "rejected",
        "reskit.rejected_by": exc.rejected_by or "rejected",
        "reskit.policy": exc.policy or "",
        "http.response.status_code": status,
    }


def route_path(path: str, root_path: str) -> str:
    """The path below ``root_path``, on a segment boundary, as Starlette routes it."""
    if not root_path or not path.startswith(root_path):
        return path
    if len(path) == len(root_path):
        return ""
    return path[len(root_path) :] if path[len(root_path)] == "/" else path


def header_values(pairs: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """The values of header ``name`` (lower case) among ASGI header pairs.

    ASGI servers send names in lower case, but the spec's "should" is not
    trusted. The length is compared first: it rules out almost every other
    header without making a lower-cased copy of its name, on every request.
    """
    size = len(name)
    return [
        value.decode("latin-1")
        for key, value in pairs
        if len(key) == size and (key == name or key.lower() == name)
    ]

"""What one protected call reports: its span, its metrics and its retry events.

An :class:`Observation` exists only when something records (an OpenTelemetry
SDK or meter is configured); otherwise the drivers pass ``None`` and skip all of
this. The drivers in ``_compose.py`` call it at fixed points: once when the
call starts, per attempt, per retry, on a fallback and when the call ends.

No method here raises: a span processor, exporter or meter that fails is
reported through :func:`reskit._telemetry.report` and the call goes on as if
nothing recorded it. What the observation set in the caller's context (the
span, a generated correlation ID) is always restored.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from . import _telemetry
from ._context import _correlation_id, new_correlation_id
from ._errors import Rejected, TimeoutExceeded

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["Observation", "log_retry"]

_report = _telemetry.report


class Observed(Protocol):
    """What an observation needs to know about the compiled policy it reports on."""

    name: str
    span_name: str
    breaker: CircuitBreaker | None

    def metric_attributes(self, outcome: str) -> dict[str, str]: ...


class _Api:
    """The few OpenTelemetry API functions an observation uses, imported on first use."""

    def __init__(self) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        self.attach = context.attach
        self.detach = context.detach
        self.in_context = set_span_in_context
        self.Status = Status
        self.ERROR = StatusCode.ERROR


_api: _Api | None = None


def _otel() -> _Api:
    global _api
    if _api is None:
        _api = _Api()
    return _api


def outcome_of(exc: BaseException | None) -> tuple[str, str | None]:
    """``reskit.outcome`` and ``reskit.rejected_by`` for a call that ended with ``exc``.

    A dependency's failure (``failure``, ``timeout``) is kept apart from a local
    protection (``rejected``, with the gate that refused), so a dashboard never
    mixes shedding with a slow dependency.
    """
    if exc is None:
        return "success", None
    if isinstance(exc, Rejected):
        return "rejected", exc.rejected_by
    if isinstance(exc, TimeoutExceeded):
        return "timeout", None
    if isinstance(exc, Exception):
        return "failure", None
    return "cancelled", None


class Observation:
    """The span and metrics of one call; only built when something records.

    For a function call (``activate=True``) the span and a generated
    correlation ID are made current for the whole call, so nested policies,
    child spans, the sync timeout's worker and log events all see them. A
    generator cannot keep anything current across its yields (the consumer's
    context would inherit it), so its driver activates them per step with
    :meth:`enter` and :meth:`leave`.
    """

    __slots__ = (
        "attempts",
        "breaker_state",
        "cid",
        "cid_token",
        "context_token",
        "observed",
        "outcome",
        "rejected_by",
        "result_failed",
        "sink",
        "span",
        "started",
    )

    def __init__(self, sink: _telemetry.Sink, observed: Observed, activate: bool = True) -> None:
        self.sink = sink
        self.observed = observed
        self.attempts = 0
        self.outcome = "success"
        self.rejected_by: str | None = None
        self.result_failed = False
        self.started = perf_counter()
        self.span: Any = None
        self.cid_token: Any = None
        self.context_token: Any = None
        self.cid: str | None = None
        self.breaker_state: str | None = None
        tracer = sink.tracer
        if tracer is None:
            return
        cid = _correlation_id.get()
        if cid is None:
            cid = new_correlation_id()
            self.cid = cid
            if activate:
                self.cid_token = _correlation_id.set(cid)
        try:
            api = _otel()
            # Everything a first-try success needs goes in at the start: each later
            # set_attributes takes the SDK span's lock and copies, about 2 µs.
            attributes: dict[str, Any] = {
                "reskit.policy": observed.name,
                "reskit.correlation_id": cid,
                "reskit.outcome": "success",
                "reskit.attempts": 1,
            }
            breaker = observed.breaker
            if breaker is not None:
                self.breaker_state = attributes["reskit.breaker.state"] = breaker.state.value
            self.span = span = tracer.start_span(observed.span_name, attributes=attributes)
            if activate:
                self.context_token = api.attach(api.in_context(span))
        except Exception as exc:
            _report("the OpenTelemetry tracer (starting a span)", exc)

    def enter(self) -> tuple[Any, Any]:
        """Make the span and a generated correlation ID current for one step."""
        span_token = cid_token = None
        if self.cid is not None:
            cid_token = _correlation_id.set(self.cid)
        if self.span is not None:
            try:
                api = _otel()
                span_token = api.attach(api.in_context(self.span))
            except Exception as exc:
                _report("the OpenTelemetry context", exc)
        return span_token, cid_token

    def leave(self, tokens: tuple[Any, Any]) -> None:
        span_token, cid_token = tokens
        try:
            if span_token is not None:
                _otel().detach(span_token)
        except Exception as exc:
            _report("the OpenTelemetry context", exc)
        finally:
            if cid_token is not None:
                _correlation_id.reset(cid_token)

    def retry(self, attempt: int, delay: float, exc: BaseException | None, result: Any) -> None:
        span = self.span
        if span is None:
            return
        try:
            attributes: dict[str, Any] = {"reskit.attempt": attempt, "reskit.delay": delay}
            if exc is not None:
                attributes["exception.type"] = type(exc).__qualname__
                attributes["exception.message"] = _telemetry.safe_str(exc)
            else:
                attributes["reskit.retry.result"] = _describe(result)
            span.add_event("reskit.retry", attributes)
        except Exception as failed:
            _report("the OpenTelemetry span (a retry event)", failed)

    def fell_back(self, exc: BaseException) -> None:
        self.outcome = "fallback"
        self.rejected_by = exc.rejected_by if isinstance(exc, Rejected) else None
        if self.span is not None:
            try:
                self.span.record_exception(exc)
            except Exception as failed:
                _report("the OpenTelemetry span (recording an exception)", failed)

    def finish(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.outcome, self.rejected_by = outcome_of(exc)
        elif self.result_failed and self.outcome == "success":
            self.outcome = "failure"
        try:
            if self.span is not None:
                self._end_span(exc)
        finally:
            # The caller's context is restored whatever the exporter did.
            try:
                if self.context_token is not None:
                    _otel().detach(self.context_token)
            except Exception as failed:
                _report("the OpenTelemetry context", failed)
            finally:
                if self.cid_token is not None:
                    _correlation_id.reset(self.cid_token)
        self._count()

    def _end_span(self, exc: BaseException | None) -> None:
        span = self.span
        try:
            breaker = self.observed.breaker
            state = breaker.state.value if breaker is not None else None
            if self.outcome != "success" or self.attempts != 1 or state != self.breaker_state:
                changed: dict[str, Any] = {
                    "reskit.outcome": self.outcome,
                    "reskit.attempts": self.attempts,
                }
                if self.rejected_by is not None:
                    changed["reskit.rejected_by"] = self.rejected_by
                if state is not None:
                    changed["reskit.breaker.state"] = state
                span.set_attributes(changed)
        except Exception as failed:
            _report("the OpenTelemetry span (setting attributes)", failed)
        if exc is not None:
            try:
                span.record_exception(exc)  # the SDK calls str(exc), which may raise
            except Exception as failed:
                _report("the OpenTelemetry span (recording an exception)", failed)
        try:
            if exc is not None and self.outcome != "cancelled":
                api = _otel()
                span.set_status(api.Status(api.ERROR, type(exc).__qualname__))
            elif exc is None and self.outcome == "failure":
                api = _otel()
                span.set_status(api.Status(api.ERROR, "the result still failed on_result"))
        except Exception as failed:
            _report("the OpenTelemetry span (setting its status)", failed)
        try:
            span.end()
        except Exception as failed:
            _report("the OpenTelemetry span processor (ending a span)", failed)

    def _count(self) -> None:
        sink = self.sink
        if sink.calls is None or sink.duration is None:
            return
        try:
            attrs = self.observed.metric_attributes(self.outcome)
            sink.calls.add(1, attrs)
            sink.duration.record(perf_counter() - self.started, attrs)
        except Exception as failed:
            _report("the OpenTelemetry meter", failed)


def _describe(result: Any) -> str:
    text = _telemetry.safe_repr(result)
    return text if len(text) <= 200 else text[:197] + "..."


def log_retry(
    name: str, attempt: int, delay: float, exc: BaseException | None, result: Any
) -> None:
    """Log the ``reskit.retry.scheduled`` event (never raises)."""
    outcome = (
        {"error": _telemetry.safe_repr(exc)} if exc is not None else {"result": _describe(result)}
    )
    _telemetry.emit(
        logging.WARNING,
        "reskit.retry.scheduled",
        policy=name,
        attempt=attempt,
        delay=round(delay, 6),
        **outcome,
        correlation_id=_correlation_id.get(),
    )

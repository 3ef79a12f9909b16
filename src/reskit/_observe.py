"""What one protected call reports: its span, its metrics and its retry events.

An :class:`Observation` exists only when something records (an OpenTelemetry
SDK or meter is configured); otherwise the drivers pass ``None`` and skip all of
this. The drivers in ``_compose.py`` call it at fixed points: once when the
call starts, per attempt, per retry, on a fallback and when the call ends.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as _otel_context
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace import set_span_in_context as _set_span_in_context

from . import _telemetry
from ._context import _correlation_id, new_correlation_id
from ._errors import ReskitError

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["Observation", "log_retry"]


class Observed(Protocol):
    """What an observation needs to know about the compiled policy it reports on."""

    name: str
    span_name: str
    breaker: CircuitBreaker | None

    def metric_attributes(self, outcome: str) -> dict[str, str]: ...


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
        if tracer is not None:
            cid = _correlation_id.get()
            if cid is None:
                cid = new_correlation_id()
                self.cid = cid
                if activate:
                    self.cid_token = _correlation_id.set(cid)
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
                self.context_token = _otel_context.attach(_set_span_in_context(span))

    def enter(self) -> tuple[Any, Any]:
        """Make the span and a generated correlation ID current for one step."""
        span_token = cid_token = None
        if self.span is not None:
            span_token = _otel_context.attach(_set_span_in_context(self.span))
        if self.cid is not None:
            cid_token = _correlation_id.set(self.cid)
        return span_token, cid_token

    def leave(self, tokens: tuple[Any, Any]) -> None:
        span_token, cid_token = tokens
        if cid_token is not None:
            _correlation_id.reset(cid_token)
        if span_token is not None:
            _otel_context.detach(span_token)

    def retry(self, attempt: int, delay: float, exc: BaseException | None, result: Any) -> None:
        span = self.span
        if span is not None:
            attributes: dict[str, Any] = {"reskit.attempt": attempt, "reskit.delay": delay}
            if exc is not None:
                attributes["exception.type"] = type(exc).__qualname__
                attributes["exception.message"] = str(exc)
            else:
                attributes["reskit.retry.result"] = _describe(result)
            span.add_event("reskit.retry", attributes)

    def fell_back(self, exc: BaseException) -> None:
        self.outcome = "fallback"
        self.rejected_by = getattr(exc, "rejected_by", None)
        if self.span is not None:
            self.span.record_exception(exc)

    def finish(self, exc: BaseException | None) -> None:
        span = self.span
        if exc is not None:
            if isinstance(exc, ReskitError) and exc.rejected_by is not None:
                self.outcome = "rejected"
                self.rejected_by = exc.rejected_by
            elif isinstance(exc, Exception):
                self.outcome = "failure"
            else:
                self.outcome = "cancelled"
        elif self.result_failed and self.outcome == "success":
            self.outcome = "failure"
        if span is not None:
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
            if exc is not None:
                span.record_exception(exc)
                if self.outcome != "cancelled":
                    span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            elif self.outcome == "failure":
                span.set_status(Status(StatusCode.ERROR, "the result still failed on_result"))
            if self.context_token is not None:
                _otel_context.detach(self.context_token)
            span.end()
        if self.cid_token is not None:
            _correlation_id.reset(self.cid_token)
        sink = self.sink
        if sink.calls is not None and sink.duration is not None:
            attrs = self.observed.metric_attributes(self.outcome)
            sink.calls.add(1, attrs)
            sink.duration.record(perf_counter() - self.started, attrs)


def _describe(result: Any) -> str:
    text = repr(result)
    return text if len(text) <= 200 else text[:197] + "..."


def log_retry(
    name: str, attempt: int, delay: float, exc: BaseException | None, result: Any
) -> None:
    """Log the ``reskit.retry.scheduled`` event."""
    outcome = {"error": repr(exc)} if exc is not None else {"result": _describe(result)}
    _telemetry.log.warning(
        "reskit.retry.scheduled",
        policy=name,
        attempt=attempt,
        delay=round(delay, 6),
        **outcome,
        correlation_id=_correlation_id.get(),
    )

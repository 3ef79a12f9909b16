"""OpenTelemetry, logging and structlog plumbing: cheap when nothing records, never in the way.

Three rules, from the project's principles:

- **Nothing records unless the application asked.** reskit depends on
  ``opentelemetry-api`` but never imports it on its own: an application that
  configured a tracer or meter provider has imported it, so the hot path
  reads the API's global provider slots through :data:`watch` (a few attribute
  reads; the watch adopts the API modules once they are in ``sys.modules``) and,
  when nothing is set, skips spans and metrics entirely. A provider configured
  later is noticed by the next call. Log events go to the
  stdlib logger ``reskit`` (which has a ``NullHandler``, so it is silent until
  the application configures logging), or through structlog when the
  application configured structlog.
- **Telemetry never changes a call's outcome.** Every call into OpenTelemetry,
  logging, structlog, listeners and hooks goes through :func:`guard` (or an
  equivalent ``try``), and a failure is reported through :func:`report`: once
  per kind of failure a minute, on the stdlib logger, never raised.
- **State first, telemetry after.** Callers change reskit's own state (probe
  slots, permits, context tokens) before, or in ``finally`` blocks around, the
  telemetry calls that describe it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, Meter, MeterProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "LiveGauge",
    "SpanCapture",
    "Sink",
    "configure_telemetry",
    "current_span",
    "emit",
    "guard",
    "report",
    "sink",
]

_INSTRUMENTATION = "reskit"
_modules = sys.modules
_TRACE = "opentelemetry.trace"
_METRICS = "opentelemetry.metrics._internal"

#: The stdlib logger of every reskit event and of reskit's own failure reports.
logger = logging.getLogger(_INSTRUMENTATION)
# The library convention: silent unless the application configures logging (and
# without it, logging's "last resort" handler would print warnings to stderr).
logger.addHandler(logging.NullHandler())

# -- reporting failures of telemetry ----------------------------------------------------

#: Seconds between two reports of the same kind of failure.
REPORT_INTERVAL = 60.0
_reported: dict[str, float] = {}
_reporting = threading.local()


def report(what: str, exc: BaseException) -> None:
    """Report that ``what`` raised ``exc``, once a minute per ``what``; never raises.

    Real time, not reskit's clock: a fake clock in a test must not change how
    often a broken exporter is reported.
    """
    if getattr(_reporting, "active", False):
        return  # the report itself failed (the log handler is what is broken)
    now = time.monotonic()
    last = _reported.get(what)
    if last is not None and now - last < REPORT_INTERVAL:
        return
    _reported[what] = now
    _reporting.active = True
    try:
        logger.error(
            "reskit: %s raised %s; the protected call went on without it "
            "(reported at most once a minute)",
            what,
            _safe_repr(exc),
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    except Exception:  # the last resort: nothing is left to report to
        pass
    finally:
        _reporting.active = False


def guard(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; if it raises an ``Exception``, report it and return ``None``."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        report(what, exc)
        return None


def _safe_repr(value: object) -> str:
    """``repr(value)``, or a stand-in when its ``__repr__`` raises."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object (its __repr__ raised)>"


def safe_str(value: object) -> str:
    """``str(value)``, or a stand-in when its ``__str__`` raises."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__qualname__} object (its __str__ raised)>"


safe_repr = _safe_repr

# -- log events ---------------------------------------------------------------------------

_LEVEL_METHODS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}


def emit(level: int, event: str, /, **fields: Any) -> None:
    """Emit a log event: through structlog if the application configured it, else stdlib.

    The stdlib record's message is ``event key=value ...``, and every field is
    also an attribute of the record (``%(correlation_id)s`` works in a format).
    Never raises: a failing sink (a closed stdout pipe, a full disk) is reported
    with :func:`report`.
    """
    try:
        structlog = _modules.get("structlog")
        if structlog is not None and structlog.is_configured():
            getattr(structlog.get_logger(_INSTRUMENTATION), _LEVEL_METHODS[level])(event, **fields)
        elif logger.isEnabledFor(level):
            text = " ".join(f"{key}={value!r}" for key, value in fields.items())
            logger.log(level, "%s %s", event, text, extra={"event": event, **fields})
    except Exception as exc:
        report(f"the log sink (event {event})", exc)


# -- what records calls --------------------------------------------------------------------


class Sink:
    """What records a call: a tracer, the call instruments, or both."""

    __slots__ = ("calls", "duration", "meter", "tracer")

    def __init__(self, tracer: Tracer | None, meter: Meter | None) -> None:
        self.tracer = tracer
        self.meter = meter
        self.calls: Counter | None = None
        self.duration: Histogram | None = None
        if meter is not None:
            self.calls = meter.create_counter(
                "reskit.calls", unit="{call}", description="Protected calls, by policy and outcome"
            )
            self.duration = meter.create_histogram(
                "reskit.call.duration",
                unit="s",
                description="Duration of protected calls, including retries and waits",
            )


_tp_override: TracerProvider | None = None
_mp_override: MeterProvider | None = None
_seen_tp: object = None
_seen_mp: object = None
_sink: Sink | None = None


class _Unset:
    """Stands in for an OpenTelemetry API module nobody has imported yet."""

    __slots__ = ()
    _TRACER_PROVIDER = None
    _METER_PROVIDER = None


class _Fixed:
    """Stands in for an API module while configure_telemetry() overrides its provider."""

    __slots__ = ("_METER_PROVIDER", "_TRACER_PROVIDER")

    def __init__(self, provider: object) -> None:
        self._TRACER_PROVIDER = self._METER_PROVIDER = provider


class _Watch:
    """Where every call reads the tracer and meter providers in force.

    A driver's "does anything record?" test reads ``watch.trace._TRACER_PROVIDER``
    and ``watch.metrics._METER_PROVIDER``: the API modules themselves once
    adopted, a :class:`_Fixed` while :func:`configure_telemetry` overrides one.
    Finding the modules in ``sys.modules`` and reading them with ``getattr``
    defaults on every call cost more than the circuit breaker the test guards.

    Until a module is adopted (``*_resolved`` is false) the drivers also look
    for it in ``sys.modules``; once it is there they call :func:`sink`, which
    adopts it, but only once its slot exists: another thread may be half-way
    through importing it. ``settled`` (both resolved: OpenTelemetry in use) and
    ``blank`` (neither: OpenTelemetry not imported) are the two common cases,
    each tested with the fewest reads. An adopted module stays adopted: a harness
    that purges OpenTelemetry from ``sys.modules`` and imports it again gets a
    module whose providers reskit does not read (nothing else removes modules).
    """

    __slots__ = (
        "_lock",
        "blank",
        "metrics",
        "metrics_module",
        "metrics_resolved",
        "settled",
        "trace",
        "trace_module",
        "trace_resolved",
    )

    def __init__(self) -> None:
        # Refreshes take turns: two that overlap could otherwise store a stale
        # source under fresh flags, and "settled" is never looked at again.
        self._lock = threading.Lock()
        self.trace_module: Any = None
        self.metrics_module: Any = None
        self.trace: Any = _UNSET
        self.metrics: Any = _UNSET
        self.trace_resolved = self.metrics_resolved = self.settled = False
        self.blank = True

    def adopt(self) -> None:
        """Adopt the API modules that are now in ``sys.modules`` with their slots."""
        with self._lock:
            adopted = False
            if self.trace_module is None:
                module = _modules.get(_TRACE)
                if module is not None and hasattr(module, "_TRACER_PROVIDER"):
                    self.trace_module = module
                    adopted = True
            if self.metrics_module is None:
                module = _modules.get(_METRICS)
                if module is not None and hasattr(module, "_METER_PROVIDER"):
                    self.metrics_module = module
                    adopted = True
            if adopted:
                self._refresh_locked()

    def refresh(self) -> None:
        """Point the drivers at the overrides in force, else the adopted modules."""
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        tp, mp = _tp_override, _mp_override
        # Sources first, flags last: a call racing with this sees the new
        # source, or an unresolved flag that sends it the long way round.
        self.trace = (
            _Fixed(tp)
            if tp is not None
            else self.trace_module
            if self.trace_module is not None
            else _UNSET
        )
        self.metrics = (
            _Fixed(mp)
            if mp is not None
            else self.metrics_module
            if self.metrics_module is not None
            else _UNSET
        )
        self.trace_resolved = tp is not None or self.trace_module is not None
        self.metrics_resolved = mp is not None or self.metrics_module is not None
        self.settled = self.trace_resolved and self.metrics_resolved
        self.blank = not (self.trace_resolved or self.metrics_resolved)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()


_UNSET = _Unset()
watch = _Watch()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=watch._after_fork)


def _global_providers() -> tuple[object, object]:
    """The API's global providers, without importing the API when nobody has."""
    w = watch
    # Only a module someone imported can be adopted: look before taking adopt's lock.
    if (w.trace_module is None and _TRACE in _modules) or (
        w.metrics_module is None and _METRICS in _modules
    ):
        w.adopt()
    trace = w.trace_module or _UNSET
    metrics = w.metrics_module or _UNSET
    return trace._TRACER_PROVIDER, metrics._METER_PROVIDER


def quiet() -> bool:
    """Whether nothing records now (the drivers inline this test)."""
    if _tp_override is not None or _mp_override is not None:
        return False
    tp, mp = _global_providers()
    return tp is None and mp is None


def sink() -> Sink | None:
    """Return what records calls now, or ``None`` when nothing does."""
    w = watch
    if w.blank and _TRACE not in _modules and _METRICS not in _modules:
        # Nobody imported the API (the drivers' inline test): nothing records. Asked on
        # every admission, where the call to _global_providers() is a part of the cost.
        tp = mp = None
    else:
        tp, mp = _global_providers()
    tp = _tp_override or tp
    mp = _mp_override or mp
    if tp is _seen_tp and mp is _seen_mp:
        return _sink
    return _refresh(tp, mp)


def _refresh(tp: Any, mp: Any) -> Sink | None:
    global _seen_tp, _seen_mp, _sink
    tracer: Tracer | None = None
    meter: Meter | None = None
    new: Sink | None = None
    try:
        # Each API is imported only with a provider of its own: one that has a
        # provider was imported by whoever made it; the other stays unloaded.
        if tp is not None:
            from opentelemetry.trace import NoOpTracerProvider

            if not isinstance(tp, NoOpTracerProvider):
                tracer = tp.get_tracer(_INSTRUMENTATION, _version())
        if mp is not None:
            from opentelemetry.metrics import NoOpMeterProvider

            if not isinstance(mp, NoOpMeterProvider):
                meter = mp.get_meter(_INSTRUMENTATION, _version())
        new = Sink(tracer, meter) if tracer is not None or meter is not None else None
    except Exception as exc:  # a provider that cannot hand out a tracer or meter
        report("the OpenTelemetry provider", exc)
        new = None
    _sink, _seen_tp, _seen_mp = new, tp, mp
    if meter is not None:
        LiveGauge.ensure_all()
    return new


def tracer() -> Tracer | None:
    """The tracer in force, or ``None``; a few attribute reads when there is none."""
    w = watch
    if w.trace_resolved:
        if w.trace._TRACER_PROVIDER is None:
            return None
    elif _TRACE not in _modules:
        return None
    found = sink()
    return None if found is None else found.tracer


def current_span() -> Span | None:
    """The current span if it records, else ``None`` (never imports the API)."""
    trace = _modules.get(_TRACE)
    if trace is None or not hasattr(trace, "get_current_span"):
        return None
    try:
        span = trace.get_current_span()
        return span if span.is_recording() else None
    except Exception as exc:
        report("the OpenTelemetry context", exc)
        return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reskit")
    except PackageNotFoundError:  # running from a source tree
        return "0"


class _RestoreTelemetry:
    __slots__ = ("_previous",)

    def __init__(self, previous: tuple[TracerProvider | None, MeterProvider | None]) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _tp_override, _mp_override
        _tp_override, _mp_override = self._previous
        watch.refresh()


def configure_telemetry(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> _RestoreTelemetry:
    """Send reskit's spans and metrics to these providers instead of the globals.

    By default reskit uses OpenTelemetry's global providers (set with
    ``opentelemetry.trace.set_tracer_provider``), so most services never call
    this. Passing ``None`` for both returns to the globals. The return value is
    a context manager that restores the previous providers.

    .. versionadded:: 0.1.0
    """
    global _tp_override, _mp_override
    previous = (_tp_override, _mp_override)
    _tp_override, _mp_override = tracer_provider, meter_provider
    watch.refresh()
    return _RestoreTelemetry(previous)


# -- gauges over live objects -----------------------------------------------------------------


class LiveGauge:
    """An observable gauge reporting one value per live object (breakers, bulkheads).

    Objects are held weakly. The gauge is created on the global meter (the
    API's proxy forwards it to a provider configured later) and on every
    provider given to :func:`configure_telemetry`, the first time :meth:`ensure`
    runs while that provider is in force, and only once the application has
    imported OpenTelemetry's metrics API.
    """

    _all: ClassVar[weakref.WeakSet[LiveGauge]] = weakref.WeakSet()

    def __init__(
        self,
        name: str,
        *,
        unit: str,
        description: str,
        observe: Callable[[Any], tuple[float, dict[str, Any]] | None],
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self._observe = observe
        # A WeakSet cannot be iterated while another thread adds to it.
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._on_global = False
        self._providers: weakref.WeakSet[Any] = weakref.WeakSet()
        LiveGauge._all.add(self)
        from . import _fork

        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    @classmethod
    def ensure_all(cls) -> None:
        for gauge in list(cls._all):
            gauge.ensure()

    def track(self, obj: object) -> None:
        """Report ``obj`` from now on, for as long as it lives."""
        with self._lock:
            self._live.add(obj)
        self.ensure()

    def ensure(self) -> None:
        """Make sure the gauge exists on the meters now in force (cheap when it does)."""
        override = _mp_override
        if self._on_global and (override is None or override in self._providers):
            return
        if override is None and _METRICS not in _modules:
            return  # nobody imported the metrics API: nothing can collect a gauge yet
        try:
            from opentelemetry import metrics as otel_metrics

            with self._lock:
                if not self._on_global:
                    self._register(otel_metrics.get_meter(_INSTRUMENTATION))
                    self._on_global = True
                if override is not None and override not in self._providers:
                    self._register(override.get_meter(_INSTRUMENTATION))
                    self._providers.add(override)
        except Exception as exc:
            report(f"the OpenTelemetry meter (gauge {self.name})", exc)

    def _register(self, meter: Meter) -> None:
        meter.create_observable_gauge(
            self.name, callbacks=[self._callback], unit=self.unit, description=self.description
        )

    def _callback(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        with self._lock:
            live = list(self._live)
        points = []
        for obj in live:
            try:
                point = self._observe(obj)
            except Exception as exc:
                report(f"the {self.name} gauge", exc)
                continue
            if point is not None:
                points.append(Observation(*point))
        return points


# -- testing --------------------------------------------------------------------------------------


class SpanCapture:
    """Capture reskit's spans and metrics in memory, for tests.

    Needs the OpenTelemetry SDK (``pip install "reskit[otel]"``). Used as a
    context manager it routes reskit's telemetry to an in-memory span exporter
    and metric reader, and restores the previous providers on exit::

        with SpanCapture() as capture:
            policy.call(fn)
        [span] = capture.spans()
        assert span.attributes["reskit.outcome"] == "success"

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        try:
            from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                'SpanCapture needs the OpenTelemetry SDK: pip install "reskit[otel]"'
            ) from exc
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = SdkTracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.metric_reader = InMemoryMetricReader()
        self.meter_provider = SdkMeterProvider(metric_readers=[self.metric_reader])
        self._restore: _RestoreTelemetry | None = None

    def spans(self) -> list[Any]:
        """The finished spans, oldest first (``ReadableSpan`` objects)."""
        return list(self.exporter.get_finished_spans())

    def clear(self) -> None:
        """Forget the spans captured so far."""
        self.exporter.clear()

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Collected metric points by instrument name: ``[(attributes, value), ...]``.

        Counters give their sum, histograms their count, gauges their value.
        """
        data = self.metric_reader.get_metrics_data()
        out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        if data is None:
            return out
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    points = out.setdefault(metric.name, [])
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = getattr(point, "count", None)
                        points.append((dict(point.attributes or {}), value))
        return out

    def __enter__(self) -> SpanCapture:
        self._restore = configure_telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._restore is not None:
            self._restore.__exit__(None, None, None)
            self._restore = None
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@contextmanager
def capture_spans() -> Iterator[SpanCapture]:
    """Shorthand for ``with SpanCapture() as capture``.

    .. versionadded:: 0.1.0
    """
    with SpanCapture() as capture:
        yield capture


# Honour OTEL_PYTHON_TRACER_PROVIDER / OTEL_PYTHON_METER_PROVIDER: the API loads
# them only inside its getters, which the hot path never calls. Only then is the
# API imported here.
if os.environ.get("OTEL_PYTHON_TRACER_PROVIDER") or os.environ.get("OTEL_PYTHON_METER_PROVIDER"):
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace

    _otel_trace.get_tracer_provider()
    _otel_metrics.get_meter_provider()

"""OpenTelemetry and structlog plumbing, cheap when nothing records.

reskit depends on ``opentelemetry-api`` only. With no SDK configured the API's
proxy tracer still costs microseconds a span, so every protected call first
asks :func:`sink` whether anything records; when nothing does, it gets ``None``
and skips spans and metrics entirely. The check reads the API's global provider
slots directly (two attribute loads) instead of calling
``get_tracer_provider()``, which costs about 0.9 µs because it consults
``os.environ`` on every call. When a provider is configured later, the next
call notices and starts recording: nothing has to be re-decorated.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import metrics as _otel_metrics
from opentelemetry import trace as _otel_trace
from opentelemetry.metrics import _internal as _otel_metrics_internal
from opentelemetry.trace import NoOpTracerProvider, Tracer

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, Meter, MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["LiveGauge", "SpanCapture", "Sink", "configure_telemetry", "log", "sink"]

_INSTRUMENTATION = "reskit"

#: structlog logger for reskit's events (``reskit.retry.scheduled``, ...).
log = structlog.get_logger(_INSTRUMENTATION)
_stdlib_log = logging.getLogger(_INSTRUMENTATION)


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


def sink() -> Sink | None:
    """Return what records calls now, or ``None`` when nothing does."""
    tp = _tp_override or _otel_trace._TRACER_PROVIDER
    mp = _mp_override or _otel_metrics_internal._METER_PROVIDER
    if tp is _seen_tp and mp is _seen_mp:
        return _sink
    return _refresh(tp, mp)


def _refresh(tp: object, mp: object) -> Sink | None:
    global _seen_tp, _seen_mp, _sink
    tracer: Tracer | None = None
    if tp is not None and not isinstance(tp, NoOpTracerProvider):
        tracer = tp.get_tracer(_INSTRUMENTATION, _version())  # type: ignore[attr-defined]
    meter: Meter | None = None
    if mp is not None and not isinstance(mp, _otel_metrics.NoOpMeterProvider):
        meter = mp.get_meter(_INSTRUMENTATION, _version())  # type: ignore[attr-defined]
    _sink = Sink(tracer, meter) if tracer is not None or meter is not None else None
    _seen_tp, _seen_mp = tp, mp
    return _sink


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
    return _RestoreTelemetry(previous)


class LiveGauge:
    """An observable gauge reporting one value per live object (breakers, bulkheads).

    Objects are held weakly. The gauge is created once on the global meter (the
    API's proxy forwards it to a provider configured later) and once on every
    provider given to :func:`configure_telemetry`, the first time
    :meth:`ensure` runs while that provider is in force.
    """

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
        with self._lock:
            if not self._on_global:
                self._register(_otel_metrics.get_meter(_INSTRUMENTATION))
                self._on_global = True
            if override is not None and override not in self._providers:
                self._register(override.get_meter(_INSTRUMENTATION))
                self._providers.add(override)

    def _register(self, meter: Meter) -> None:
        meter.create_observable_gauge(
            self.name, callbacks=[self._callback], unit=self.unit, description=self.description
        )

    def _callback(self, options: Any) -> Iterable[Any]:
        with self._lock:
            live = list(self._live)
        points = []
        for obj in live:
            point = self._observe(obj)
            if point is not None:
                points.append(_otel_metrics.Observation(*point))
        return points


def failsafe(what: str, fn: Any, *args: Any) -> None:
    """Run a telemetry or listener hook; record and swallow what it raises."""
    try:
        fn(*args)
    except Exception:
        _stdlib_log.exception("reskit: %s raised; ignored", what)


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


# Honour OTEL_PYTHON_TRACER_PROVIDER / OTEL_PYTHON_METER_PROVIDER: the API only
# loads them inside these getters, which the hot path deliberately never calls.
_otel_trace.get_tracer_provider()
_otel_metrics.get_meter_provider()

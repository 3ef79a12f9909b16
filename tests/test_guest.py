"""A library is a guest in someone's process.

Its telemetry never changes a call's outcome; it prints nothing unless the
application configured logging; it survives ``os.fork()``; it never allocates
more than its use, nor accepts a wait the platform cannot make.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import reskit
from reskit import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpen,
    Policy,
    Retry,
    TimeoutExceeded,
    _clock,
    _telemetry,
)
from reskit.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent


# -- faults to inject ------------------------------------------------------------------


class BrokenPipeLogger:
    """A structlog logger writing to a closed pipe."""

    def __init__(self) -> None:
        self.attempts = 0

    def msg(self, *args: Any, **kwargs: Any) -> None:
        self.attempts += 1
        raise BrokenPipeError(32, "Broken pipe")

    info = warning = error = debug = msg


@contextmanager
def logging_to(sink: BrokenPipeLogger) -> Iterator[BrokenPipeLogger]:
    """structlog configured (as an application would) to write to ``sink``."""
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    try:
        yield sink
    finally:
        structlog.reset_defaults()


@pytest.fixture
def broken_log_sink() -> Iterator[BrokenPipeLogger]:
    with logging_to(BrokenPipeLogger()) as sink:
        yield sink


class RaisingProcessor(SpanProcessor):
    def __init__(self, on: str) -> None:
        self.on = on

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.on == "start":
            raise RuntimeError("span processor bug in on_start")

    def on_end(self, span: Any) -> None:
        if self.on == "end":
            raise RuntimeError("span processor bug in on_end")


class FailingExporter(SpanExporter):
    def __init__(self, block: bool = False) -> None:
        self.block = block

    def export(self, spans: Any) -> SpanExportResult:
        if self.block:
            _clock.sleep(0.005)  # a slow collector: time on the fault tests' fake clock
            return SpanExportResult.SUCCESS
        raise OSError("collector unreachable")

    def shutdown(self) -> None:
        pass


def tracing_with(processor: SpanProcessor) -> Any:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return reskit.configure_telemetry(tracer_provider=provider)


class RaisingInstrument:
    def add(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("meter bug")

    record = add


class RaisingMeter:
    def create_counter(self, *args: Any, **kwargs: Any) -> RaisingInstrument:
        return RaisingInstrument()

    create_histogram = create_counter

    def create_observable_gauge(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("meter bug")


class RaisingMeterProvider:
    def get_meter(self, *args: Any, **kwargs: Any) -> RaisingMeter:
        return RaisingMeter()


class RaisingListener:
    def state_change(self, *args: Any) -> None:
        raise RuntimeError("listener bug")

    failure = success = before_call = state_change


FAULTS = ["log sink", "span on_start", "span on_end", "exporter", "slow exporter", "meter"]


@pytest.fixture(params=FAULTS)
def fault(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[str]:
    name = request.param
    if name == "log sink":
        with logging_to(BrokenPipeLogger()):
            yield name
        return
    if name == "meter":
        with reskit.configure_telemetry(meter_provider=RaisingMeterProvider()):  # type: ignore[arg-type]
            yield name
        return
    processor: SpanProcessor
    if name == "span on_start":
        processor = RaisingProcessor("start")
    elif name == "span on_end":
        processor = RaisingProcessor("end")
    else:
        processor = SimpleSpanProcessor(FailingExporter(block=name == "slow exporter"))
    with tracing_with(processor):
        yield name


def assert_context_clean() -> None:
    from opentelemetry import trace

    assert reskit.correlation_id() is None
    assert reskit.remaining_deadline() is None
    assert not trace.get_current_span().get_span_context().is_valid


# -- the call's outcome is the same with any fault ------------------------------------------


def test_a_breaker_opens_half_opens_and_closes_through_any_fault(
    fault: str, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10, listeners=[RaisingListener()])
    policy = Policy("faulty", breaker=breaker)

    def down() -> None:
        raise ConnectionError("down")

    # The failure that opens the breaker reaches the caller unchanged.
    with pytest.raises(ConnectionError, match="down"):
        policy.call(down)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        policy.call(lambda: "rejected")
    clock.advance(10)
    # Half-open: the probe is admitted, succeeds, and closes the breaker.
    assert policy.call(lambda: "probe") == "probe"
    assert breaker.state == "closed"
    assert not breaker._probes
    assert_context_clean()


def test_a_probe_slot_is_never_lost_to_a_failing_sink(
    broken_log_sink: Any, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10)
    policy = Policy("probe", breaker=breaker)
    breaker.open()
    clock.advance(10)
    # The half_opened event is logged (and fails) after the probe slot was taken.
    with pytest.raises(ConnectionError):
        policy.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    clock.advance(10)
    assert policy.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"
    assert broken_log_sink.attempts >= 3


def scripted(*answers: Any) -> Callable[[], Any]:
    """A function raising or returning ``answers`` in turn, one per call."""
    queue = list(answers)

    def flaky() -> Any:
        answer = queue.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return flaky


def test_retries_go_on_through_any_fault(fault: str, clock: FakeClock) -> None:
    flaky = scripted(ConnectionError(), ConnectionError(), "ok")

    policy = Policy("faulty", retry=Retry(3, on=ConnectionError, wait=0.1))
    assert policy.call(flaky) == "ok"
    assert policy.statistics.attempts == 3
    assert_context_clean()


async def test_async_calls_are_untouched_by_any_fault(fault: str, clock: FakeClock) -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionError
        return "ok"

    policy = Policy("faulty", timeout=1.0, retry=Retry(3, on=ConnectionError, wait=0))
    assert await policy.acall(flaky) == "ok"
    assert len(calls) == 2
    assert_context_clean()


def test_rejections_and_fallbacks_are_untouched_by_any_fault(fault: str) -> None:
    bulkhead = Bulkhead(1)
    held = bulkhead.admit("other")
    try:
        with pytest.raises(reskit.BulkheadFull):
            Policy("faulty", bulkhead=bulkhead).call(lambda: "never")
        fell_back = Policy("faulty", bulkhead=bulkhead, fallback=lambda exc: "fallback")
        assert fell_back.call(lambda: "never") == "fallback"
    finally:
        bulkhead.record(held, None, 0.0)
    assert bulkhead.in_flight == 0
    assert_context_clean()


def test_generators_are_untouched_by_any_fault(fault: str, clock: FakeClock) -> None:
    @Policy("faulty", deadline=5.0, retry=Retry(2, on=ConnectionError, wait=0))
    def stream() -> Iterator[int]:
        yield 1
        yield 2

    assert list(stream()) == [1, 2]
    assert_context_clean()


def test_a_span_processor_failing_in_on_end_does_not_hide_a_result() -> None:
    charged: list[str] = []

    def charge() -> str:
        charged.append("card")
        return "receipt"

    with tracing_with(RaisingProcessor("end")):
        assert Policy("payments").call(charge) == "receipt"
    assert charged == ["card"]


def test_a_span_processor_failing_in_on_start_leaves_no_correlation_id() -> None:
    with tracing_with(RaisingProcessor("start")):
        Policy("payments").call(lambda: 1)
    assert reskit.correlation_id() is None


def test_a_failure_is_reported_once_through_stdlib_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="reskit"), tracing_with(RaisingProcessor("end")):
        for _ in range(20):
            Policy("payments").call(lambda: 1)
    reports = [r for r in caplog.records if "span processor" in r.getMessage()]
    assert len(reports) == 1
    assert "went on without it" in reports[0].getMessage()


def test_a_listener_failing_everywhere_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker(fail_max=2, listeners=[RaisingListener()])
    policy = Policy("listened", breaker=breaker)
    with caplog.at_level(logging.ERROR, logger="reskit"):
        assert policy.call(lambda: 1) == 1
        for _ in range(2):
            with pytest.raises(KeyError):
                policy.call(lambda: {}["missing"])
    assert breaker.state == "open"
    assert "listener" in caplog.text


# -- exceptions that cannot be printed --------------------------------------------------------


class Unprintable(Exception):
    def __repr__(self) -> str:
        raise AttributeError("no repr")

    def __str__(self) -> str:
        raise AttributeError("no str")


@pytest.mark.parametrize("traced", [False, True])
def test_an_exception_that_cannot_be_printed_is_still_retried_and_recorded(
    traced: bool, clock: FakeClock
) -> None:
    calls: list[int] = []

    def fails() -> None:
        calls.append(1)
        raise Unprintable

    policy = Policy("unprintable", retry=Retry(3, on=Unprintable, wait=0))
    if traced:
        exporter = InMemorySpanExporter()
        with tracing_with(SimpleSpanProcessor(exporter)), pytest.raises(Unprintable):
            policy.call(fails)
        [span] = exporter.get_finished_spans()
        assert span.attributes is not None
        assert span.attributes["reskit.attempts"] == 3
        assert span.status.status_code.name == "ERROR"  # even though str(exc) raised
    else:
        with pytest.raises(Unprintable):
            policy.call(fails)
    assert len(calls) == 3


# -- silent unless configured ------------------------------------------------------------------

SILENT_PROGRAM = textwrap.dedent(
    """
    import asyncio
    import reskit

    breaker = reskit.CircuitBreaker(fail_max=2, reset_timeout=0.01)
    policy = reskit.Policy(
        "noisy", breaker=breaker, retry=reskit.Retry(3, on=ConnectionError, wait=0)
    )

    def down():
        raise ConnectionError("down")

    for _ in range(3):
        try:
            policy.call(down)
        except (ConnectionError, reskit.CircuitOpen):
            pass
    assert breaker.state == "open"
    {extra}
    print("only the program's output")
    """
)


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "import opentelemetry.trace  # the API present, no SDK configured",
        "import structlog  # imported, not configured",
    ],
)
def test_a_program_that_configured_nothing_hears_nothing_from_reskit(extra: str) -> None:
    program = SILENT_PROGRAM.replace("{extra}", extra)
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "only the program's output\n"
    assert result.stderr == ""


def test_events_reach_stdlib_logging_with_a_correlation_id(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    flaky = scripted(ConnectionError(), ConnectionError(), "ok")

    breaker = CircuitBreaker(fail_max=2)
    policy = Policy("logged", retry=Retry(3, on=ConnectionError, wait=0), breaker=breaker)
    # The second failure opens the breaker; the third attempt meets CircuitOpen.
    with caplog.at_level(logging.INFO, logger="reskit"), pytest.raises(CircuitOpen):
        policy.call(flaky)
    events = [
        (record.event, record.correlation_id)  # type: ignore[attr-defined]
        for record in caplog.records
        if hasattr(record, "event")
    ]
    assert [event for event, _ in events] == [
        "reskit.retry.scheduled",
        "reskit.breaker.opened",
        "reskit.retry.scheduled",
    ]
    # One ID for the call, made for its first event, on every event of the call.
    ids = {cid for _, cid in events}
    assert len(ids) == 1
    assert reskit.valid_correlation_id(ids.pop())
    assert reskit.correlation_id() is None
    assert "reskit.retry.scheduled policy='logged' attempt=2" in caplog.text


def test_events_carry_the_bound_correlation_id(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(fail_max=1)

    def down() -> None:
        raise ConnectionError

    with (
        caplog.at_level(logging.INFO, logger="reskit"),
        reskit.bind_correlation_id("req-7"),
        pytest.raises(ConnectionError),
    ):
        Policy("bound", breaker=breaker).call(down)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "reskit.breaker.opened"]
    assert record.correlation_id == "req-7"  # type: ignore[attr-defined]


# -- fork -------------------------------------------------------------------------------------

FORK_PROGRAM = textwrap.dedent(
    """
    import os, sys, threading, traceback
    import reskit
    from reskit import Bulkhead, CircuitBreaker, Policy

    timed = Policy("timed", timeout=5.0)
    assert timed.call(lambda: 1) == 1  # the parent has a worker thread now

    breaker = CircuitBreaker(fail_max=5)
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock():
        # Another thread holds them at the moment of the fork.
        with breaker._lock, reskit._telemetry.watch._lock:
            holding.set()
            release.wait()

    threading.Thread(target=hold_the_lock, daemon=True).start()
    holding.wait()
    bulkhead = Bulkhead(1)
    taken = bulkhead.admit("a thread of the parent")
    adaptive = Bulkhead(4, limit=reskit.AIMDLimit(initial=2))
    held_across = adaptive.admit("the forking thread, in a call")
    read, write = os.pipe()

    pid = os.fork()
    if pid == 0:
        try:
            assert timed.call(lambda: 2) == 2  # no spurious timeout: workers renewed
            assert Policy("b", breaker=breaker).call(lambda: 3) == 3  # no deadlock
            reskit.configure_telemetry()  # nor here: the telemetry watch's lock
            with Policy("bh", bulkhead=bulkhead).admit():
                pass  # the parent's slot is not the child's
            # A slot the forking thread held is given back to nothing, without error.
            bulkhead.record(taken, None, 0.0)
            adaptive.record(held_across, None, 0.0)
            assert (bulkhead.in_flight, adaptive.in_flight) == (0, 0)
            jitter = reskit.Retry(on=KeyError).backoff(10)
            os.write(write, f"{reskit.new_correlation_id()} {jitter!r}".encode())
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    release.set()
    os.close(write)
    child_id, child_jitter = os.read(read, 128).decode().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    assert child_id != reskit.new_correlation_id(), "the child repeats IDs"
    parent_jitter = reskit.Retry(on=KeyError).backoff(10)
    assert child_jitter != repr(parent_jitter), "workers would back off in step"
    print("ok")
    """
)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_has_working_timeouts_breakers_bulkheads_and_its_own_ids() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Policy("p", timeout=1e10),
        lambda: Policy("p", deadline=1e300),
        lambda: Bulkhead(1, max_waiting=1, wait_timeout=1e12),
        lambda: Retry(on=KeyError, wait=1e11),
        lambda: Retry(on=KeyError, wait_max=1e11),
    ],
)
def test_a_wait_longer_than_the_platform_supports_is_refused(build: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="TIMEOUT_MAX"):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: CircuitBreaker(failure_rate=0.5, window_seconds=10**9),
        lambda: reskit.RetryBudget(window=10**9),
        lambda: reskit.AdaptiveThrottle(window=10**9),
    ],
)
def test_a_window_of_more_than_a_day_is_refused(build: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="at most 86400 seconds"):
        build()


def test_large_sizes_allocate_only_what_is_used() -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        bulkhead = Bulkhead(10**9, max_partitions=10**6, key=lambda tenant: tenant)
        breaker = CircuitBreaker(failure_rate=0.5, window=10**9, minimum_calls=10)
        policy = Policy("big", bulkhead=bulkhead, breaker=breaker)
        for tenant in ("a", "b", "c"):
            assert policy.call(lambda tenant: tenant, tenant) == tenant
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20  # megabytes, not gigabytes
    assert bulkhead.in_flight == 0


def test_a_wait_strategy_asking_for_forever_ends_the_retries(clock: FakeClock) -> None:
    calls: list[int] = []

    def fails() -> None:
        calls.append(1)
        raise KeyError

    forever = Retry(3, on=KeyError, wait=lambda state: float("inf"))
    with pytest.raises(KeyError) as raised:
        Policy("p", retry=forever).call(fails)
    assert calls == [1]
    assert "longer than the platform can wait" in raised.value.__notes__[-1]


def test_a_failing_call_with_a_timeout_leaves_no_reference_cycle() -> None:
    policy = Policy("cycles", timeout=5.0)

    def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        policy.call(boom)  # warm up: the worker thread exists
    gc.collect()
    gc.disable()
    try:
        for _ in range(10):
            with pytest.raises(ValueError):
                policy.call(boom)
        assert gc.collect() == 0
    finally:
        gc.enable()


class _NotifyingLock(threading.Condition):
    """A lock whose every release wakes the threads waiting on it as a condition."""

    def __exit__(self, *exc_info: object) -> None:
        self.notify_all()
        super().__exit__(*exc_info)


def test_abandoned_attempts_still_running_are_counted(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reskit import _timeout

    pool = _timeout._WorkerPool()
    pool._lock = lock = _NotifyingLock()  # type: ignore[assignment]
    monkeypatch.setattr(_timeout, "_POOL", pool)
    release = threading.Event()

    def hung() -> None:
        clock.advance(2.0)
        release.wait(10)

    with pytest.raises(TimeoutExceeded):
        Policy("hung", timeout=1.0).call(hung)
    assert pool.abandoned == 1
    release.set()
    with lock:  # the worker finishes in its own thread, and says so under the lock
        assert lock.wait_for(lambda: pool.abandoned == 0, timeout=10)


# -- outcomes and limits of timeouts -----------------------------------------------------------


def test_timeout_exceeded_names_the_limit_that_fired(clock: FakeClock) -> None:
    def slow() -> None:
        clock.advance(10.0)

    with pytest.raises(TimeoutExceeded) as own:
        Policy("own", deadline=2.0, retry=Retry(3, on=KeyError)).call(
            lambda: (clock.advance(3.0), Policy("inner").call(lambda: 1))
        )
    assert (own.value.kind, own.value.policy) == ("deadline", "inner")
    assert own.value.timeout is None  # inherited from "own": not the inner policy's limit

    inner = Policy("inner", deadline=30.0)
    with pytest.raises(TimeoutExceeded) as inherited:
        Policy("outer", deadline=2.0).call(lambda: (clock.advance(3.0), inner.call(lambda: 1)))
    assert (inherited.value.policy, inherited.value.timeout) == ("inner", None)

    with pytest.raises(TimeoutExceeded) as attempt:
        Policy("attempt", timeout=1.0).call(slow)
    assert (attempt.value.kind, attempt.value.timeout) == ("attempt", 1.0)


async def test_an_async_deadline_names_its_own_limit(clock: FakeClock) -> None:
    import asyncio

    async def slow() -> None:
        clock.advance(10.0)
        await asyncio.sleep(0)

    with pytest.raises(TimeoutExceeded) as own:
        await Policy("own", deadline=2.0).acall(slow)
    assert (own.value.kind, own.value.timeout) == ("deadline", 2.0)


# -- found in review ---------------------------------------------------------------------------


@pytest.fixture
def unwatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The telemetry watch as in a process that has not imported OpenTelemetry yet."""
    watch = _telemetry.watch
    for slot in type(watch).__slots__:
        monkeypatch.setattr(watch, slot, getattr(watch, slot))
    type(watch).__init__(watch)


@pytest.mark.usefixtures("unwatched")
def test_calls_work_while_another_thread_is_importing_opentelemetry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    # Half-imported: in sys.modules, its global provider slots not defined yet.
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", types.ModuleType("opentelemetry.trace"))
    monkeypatch.setitem(
        sys.modules,
        "opentelemetry.metrics._internal",
        types.ModuleType("opentelemetry.metrics._internal"),
    )

    @Policy("early")
    def plain() -> int:
        return 1

    @Policy("early")
    def stream() -> Iterator[int]:
        yield 2

    assert plain() == 1
    assert list(stream()) == [2]
    assert _telemetry.quiet()
    # Nothing adopted a module without its slot: once the import finishes
    # (the slot appears), the next call that looks adopts it.
    watch = _telemetry.watch
    assert (watch.trace_module, watch.metrics_module) == (None, None)
    sys.modules["opentelemetry.trace"]._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    assert plain() == 1
    assert watch.trace_module is sys.modules["opentelemetry.trace"]
    assert watch.metrics_module is None
    assert not watch.settled
    assert _telemetry.quiet()


def _paused_in_refresh(target: Callable[[], object]) -> tuple[threading.Thread, threading.Event]:
    """Run ``target`` in a thread that stops inside ``_Watch._refresh_locked``.

    Returns the thread, already stopped there, and the event that lets it go on.
    """
    import inspect

    lines, first = inspect.getsourcelines(_telemetry._Watch._refresh_locked)
    # Stop once the sources are decided and before they are stored.
    stop_at = first + next(i for i, line in enumerate(lines) if "self.trace = (" in line)
    paused, go = threading.Event(), threading.Event()

    def local(frame: Any, event: str, arg: object) -> Any:
        if event == "line" and frame.f_lineno == stop_at and not paused.is_set():
            paused.set()
            go.wait(10)
        return local

    def tracer(frame: Any, event: str, arg: object) -> Any:
        return local if frame.f_code is _telemetry._Watch._refresh_locked.__code__ else None

    def run() -> None:
        sys.settrace(tracer)
        try:
            target()
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=run)
    thread.start()
    assert paused.wait(10)
    return thread, go


class _ContentionSpy:
    """A lock that records, and signals, a thread finding it taken."""

    def __init__(self, signal: threading.Event) -> None:
        self._lock = threading.Lock()
        self._signal = signal
        self.contended = False

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.contended = True
            self._signal.set()
            self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


@pytest.mark.usefixtures("unwatched")
@pytest.mark.parametrize("racer", ["configure_telemetry", "adopting the metrics API"])
def test_refreshes_of_the_watch_take_turns(monkeypatch: pytest.MonkeyPatch, racer: str) -> None:
    # Found in review: a refresh that stored its sources after an overlapping
    # one left the watch "settled" on a stale source, so spans or metrics were
    # lost for the rest of the process.
    watch = _telemetry.watch
    progress = threading.Event()
    lock = _ContentionSpy(progress)
    monkeypatch.setattr(watch, "_lock", lock)
    metrics_api = sys.modules["opentelemetry.metrics._internal"]
    provider = TracerProvider()
    if racer == "configure_telemetry":
        first, go = _paused_in_refresh(watch.adopt)

        def second() -> None:
            reskit.configure_telemetry(tracer_provider=provider)
            done.set()
            progress.set()
    else:
        # The first call sees only the trace API; the second, the metrics API too.
        monkeypatch.delitem(sys.modules, "opentelemetry.metrics._internal")
        first, go = _paused_in_refresh(watch.adopt)
        monkeypatch.setitem(sys.modules, "opentelemetry.metrics._internal", metrics_api)

        def second() -> None:
            watch.adopt()
            done.set()
            progress.set()

    done = threading.Event()
    racing = threading.Thread(target=second)
    racing.start()
    # The second refresh waits for the first: it finds the lock taken (or,
    # without one, finishes while the first is stopped).
    assert progress.wait(10)
    assert lock.contended
    assert not done.is_set()
    go.set()
    first.join(10)
    racing.join(10)
    try:
        assert watch.settled
        if racer == "configure_telemetry":
            assert watch.trace._TRACER_PROVIDER is provider
        else:
            assert watch.metrics is metrics_api
    finally:
        reskit.configure_telemetry()


def test_a_tracer_provider_alone_does_not_load_the_metrics_api() -> None:
    code = textwrap.dedent(
        """
        import sys
        from opentelemetry import trace
        from reskit import Policy

        class Provider(trace.TracerProvider):
            def get_tracer(self, *args, **kwargs):
                return trace.NoOpTracer()

        trace.set_tracer_provider(Provider())

        @Policy("traced")
        def work():
            return 1

        assert work() == 1
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry.metrics")))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("[]\n", "")


def test_opentelemetry_imported_and_configured_after_the_first_calls_is_picked_up() -> None:
    # The order of a service that imports reskit before its telemetry setup:
    # calls before the API exists, with only the trace API, then with providers.
    code = textwrap.dedent(
        """
        import sys
        from reskit import Policy, _telemetry

        @Policy("early")
        def work():
            return 1

        assert work() == 1 and "opentelemetry.trace" not in sys.modules
        assert _telemetry.watch.blank

        import opentelemetry.trace
        assert "opentelemetry.metrics._internal" not in sys.modules
        assert work() == 1 and _telemetry.quiet()

        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        assert work() == 1 and _telemetry.quiet()
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        assert work() == 1
        assert _telemetry.watch.settled
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        assert work() == 1
        calls = [
            point.value
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "reskit.calls"
            for point in metric.data.data_points
        ]
        print(len(exporter.get_finished_spans()), calls)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("2 [1]\n", "")


def test_bind_correlation_id_works_while_structlog_is_being_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    # Half-imported: the package and its submodule in sys.modules, nothing in them yet.
    monkeypatch.setitem(sys.modules, "structlog", types.ModuleType("structlog"))
    monkeypatch.setitem(
        sys.modules, "structlog.contextvars", types.ModuleType("structlog.contextvars")
    )
    with reskit.bind_correlation_id("req-1"):
        assert reskit.correlation_id() == "req-1"
    assert reskit.correlation_id() is None


def test_a_failing_hook_and_a_failing_log_filter_do_not_change_the_call(clock: FakeClock) -> None:
    class Raising(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise OSError("log shipper down")

    def hook(details: reskit.RetryDetails) -> None:
        raise RuntimeError("hook bug")

    flaky = scripted(ConnectionError(), "ok")

    logger = logging.getLogger("reskit")
    broken = Raising()
    logger.addFilter(broken)
    try:
        retry = Retry(2, on=ConnectionError, wait=0, on_retry=hook)
        assert Policy("hooked", retry=retry).call(flaky) == "ok"
    finally:
        logger.removeFilter(broken)


def test_all_events_of_a_retried_call_share_one_id_when_a_transition_comes_first(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1.0)
    flaky = scripted(ConnectionError(), "ok")

    # The first failure opens the breaker (its first event); the retry waits for the
    # breaker to half-open, within the deadline, and the probe closes it.
    policy = Policy(
        "first", deadline=10.0, retry=Retry(3, on=ConnectionError, wait=0), breaker=breaker
    )
    with caplog.at_level(logging.INFO, logger="reskit"):
        assert policy.call(flaky) == "ok"
    events = [
        (record.event, record.correlation_id)  # type: ignore[attr-defined]
        for record in caplog.records
        if hasattr(record, "event")
    ]
    assert [event for event, _ in events] == [
        "reskit.breaker.opened",
        "reskit.retry.scheduled",  # after the failure
        "reskit.retry.scheduled",  # after CircuitOpen: waiting for the breaker
        "reskit.breaker.half_opened",
        "reskit.breaker.closed",
    ]
    assert len({cid for _, cid in events}) == 1


def test_gauges_appear_for_code_that_only_admits() -> None:
    from reskit.testing import SpanCapture

    policy = Policy("edge", bulkhead=Bulkhead(2, name="edge-slots"))
    with SpanCapture() as capture:  # configured after the bulkhead was built
        with policy.admit():
            pass
        gauges = capture.metrics()
    assert "reskit.bulkhead.occupancy" in gauges

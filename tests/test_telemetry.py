"""The telemetry contract: spans, span events, metrics and structlog events.

Spans are read from the OpenTelemetry SDK's in-memory exporter (the ``spans``
fixture routes reskit's telemetry there with ``configure_telemetry``); the
global OTel providers are never set in this process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode

import reskit
from reskit import _telemetry
from reskit.testing import FakeClock, SpanCapture

HEX32 = re.compile(r"[0-9a-f]{32}")


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def events(span: Any, name: str) -> list[Any]:
    return [event for event in span.events if event.name == name]


def child_span(capture: SpanCapture) -> None:
    tracer = capture.tracer_provider.get_tracer("tests")
    with tracer.start_as_current_span("child"):
        pass


# -- one span per call -----------------------------------------------------------------


def test_sync_call_emits_one_internal_span_named_after_the_policy(spans: SpanCapture) -> None:
    policy = reskit.Policy("payments")

    @policy
    def charge(amount: int) -> int:
        return amount * 2

    assert [charge(1), charge(2), charge(3)] == [2, 4, 6]

    finished = spans.spans()
    assert len(finished) == 3
    for span in finished:
        assert span.name == "reskit payments"
        assert span.kind is SpanKind.INTERNAL
        assert span.attributes["reskit.policy"] == "payments"
        assert span.attributes["reskit.outcome"] == "success"
        assert span.attributes["reskit.attempts"] == 1
        assert "reskit.rejected_by" not in span.attributes
        assert span.status.status_code is StatusCode.UNSET
        assert events(span, "exception") == []
    # Three calls, three traces: no span is the parent of another.
    assert len({span.context.trace_id for span in finished}) == 3


async def test_async_call_emits_one_internal_span_named_after_the_policy(
    spans: SpanCapture,
) -> None:
    policy = reskit.Policy("payments")

    @policy
    async def charge(amount: int) -> int:
        await asyncio.sleep(0)
        return amount * 2

    assert await charge(21) == 42
    span = only(spans.spans())
    assert span.name == "reskit payments"
    assert span.kind is SpanKind.INTERNAL
    assert span.attributes["reskit.policy"] == "payments"
    assert span.attributes["reskit.outcome"] == "success"
    assert span.attributes["reskit.attempts"] == 1


def test_policy_call_and_acall_emit_spans_too(spans: SpanCapture) -> None:
    policy = reskit.Policy("direct")

    async def async_double(x: int) -> int:
        return x * 2

    assert policy.call(lambda x: x + 1, 1) == 2
    assert asyncio.run(policy.acall(async_double, 2)) == 4
    assert [span.name for span in spans.spans()] == ["reskit direct", "reskit direct"]


# -- outcomes ----------------------------------------------------------------------------


def test_failure_records_the_exception_and_sets_error_status(spans: SpanCapture) -> None:
    @reskit.Policy("failing")
    def boom() -> None:
        raise ValueError("boom 42")

    with pytest.raises(ValueError, match="boom 42"):
        boom()

    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "failure"
    assert span.attributes["reskit.attempts"] == 1
    assert "reskit.rejected_by" not in span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError"
    exception = only(events(span, "exception"))
    assert exception.attributes["exception.type"] == "ValueError"
    assert exception.attributes["exception.message"] == "boom 42"


async def test_async_failure_records_the_exception_and_sets_error_status(
    spans: SpanCapture,
) -> None:
    @reskit.Policy("failing")
    async def boom() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        await boom()

    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "failure"
    assert span.status.status_code is StatusCode.ERROR
    assert only(events(span, "exception")).attributes["exception.type"] == "KeyError"


async def test_async_attempt_timeout_is_a_timeout_not_a_rejection(
    spans: SpanCapture, clock: FakeClock
) -> None:
    @reskit.Policy("slow", timeout=1.0)
    async def slow() -> str:
        clock.advance(2.0)
        await asyncio.sleep(0)
        return "late"

    with pytest.raises(reskit.TimeoutExceeded):
        await slow()

    span = only(spans.spans())
    # A slow dependency, not a local protection: dashboards keep the two apart.
    assert span.attributes["reskit.outcome"] == "timeout"
    assert "reskit.rejected_by" not in span.attributes
    assert span.attributes["reskit.attempts"] == 1
    assert span.status.status_code is StatusCode.ERROR
    assert only(events(span, "exception")).attributes["exception.type"] == (
        "reskit._errors.TimeoutExceeded"
    )


def test_sync_attempt_timeout_is_a_timeout_not_a_rejection(
    spans: SpanCapture, clock: FakeClock
) -> None:
    release = threading.Event()

    @reskit.Policy("slow", timeout=1.0)
    def hung() -> str:
        clock.advance(2.0)  # the attempt has now taken longer than its timeout
        release.wait(10)  # ... and is still running
        return "late"

    try:
        with pytest.raises(reskit.TimeoutExceeded):
            hung()
    finally:
        release.set()

    span = only(spans.spans())
    # A slow dependency, not a local protection: dashboards keep the two apart.
    assert span.attributes["reskit.outcome"] == "timeout"
    assert "reskit.rejected_by" not in span.attributes
    assert span.attributes["reskit.attempts"] == 1
    assert span.status.status_code is StatusCode.ERROR


def test_abandoned_sync_attempt_is_recorded_on_the_span(
    spans: SpanCapture, clock: FakeClock
) -> None:
    # DESIGN "Timeouts": "the abandoned attempt is recorded on the span".
    release = threading.Event()

    @reskit.Policy("slow", timeout=1.0)
    def hung() -> None:
        clock.advance(2.0)
        release.wait(10)

    try:
        with pytest.raises(reskit.TimeoutExceeded):
            hung()
    finally:
        release.set()

    span = only(spans.spans())
    abandoned = only(events(span, "reskit.timeout.abandoned"))
    assert abandoned.attributes["reskit.policy"] == "slow"
    assert abandoned.attributes["reskit.thread"].startswith("reskit-timeout-")


async def test_asyncio_cancellation_is_recorded_as_cancelled_not_failure(
    spans: SpanCapture,
) -> None:
    started = asyncio.Event()

    @reskit.Policy("cancellable")
    async def wait_forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(wait_forever())
    await asyncio.wait_for(started.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)

    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "cancelled"
    assert "reskit.rejected_by" not in span.attributes
    assert span.status.status_code is not StatusCode.ERROR
    assert spans.metrics()["reskit.calls"] == [
        ({"reskit.policy": "cancellable", "reskit.outcome": "cancelled"}, 1)
    ]


def test_fallback_outcome(spans: SpanCapture) -> None:
    @reskit.Policy("with-fallback", fallback=lambda exc: "spare")
    def broken() -> str:
        raise ConnectionError("down")

    assert broken() == "spare"
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "fallback"
    assert span.status.status_code is not StatusCode.ERROR
    assert only(events(span, "exception")).attributes["exception.type"] == "ConnectionError"


# -- retries -------------------------------------------------------------------------------


def test_retries_are_span_events_with_attempt_delay_and_exception(
    spans: SpanCapture, clock: FakeClock
) -> None:
    calls = 0

    @reskit.Policy("flaky", retry=reskit.Retry(attempts=3, on=ConnectionError, wait=0.5))
    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(f"refused {calls}")
        return "ok"

    assert flaky() == "ok"
    assert calls == 3
    assert clock.sleeps == [0.5, 0.5]

    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "success"
    assert span.attributes["reskit.attempts"] == 3
    # reskit.attempt is the number of the attempt about to start (docs/retries.md).
    retries = events(span, "reskit.retry")
    assert [dict(event.attributes) for event in retries] == [
        {
            "reskit.attempt": 2,
            "reskit.delay": 0.5,
            "exception.type": "ConnectionError",
            "exception.message": "refused 1",
        },
        {
            "reskit.attempt": 3,
            "reskit.delay": 0.5,
            "exception.type": "ConnectionError",
            "exception.message": "refused 2",
        },
    ]
    assert events(span, "exception") == []
    assert span.status.status_code is StatusCode.UNSET


async def test_async_retries_exhausted_give_failure_with_all_attempts(
    spans: SpanCapture, clock: FakeClock
) -> None:
    calls = 0

    @reskit.Policy("flaky", retry=reskit.Retry(attempts=4, on=ConnectionError, wait=0.25))
    async def always_down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"refused {calls}")

    with pytest.raises(ConnectionError, match="refused 4"):
        await always_down()

    assert calls == 4
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "failure"
    assert span.attributes["reskit.attempts"] == 4
    assert [event.attributes["reskit.attempt"] for event in events(span, "reskit.retry")] == [
        2,
        3,
        4,
    ]
    assert [event.attributes["reskit.delay"] for event in events(span, "reskit.retry")] == [
        0.25
    ] * 3
    exception = only(events(span, "exception"))
    assert exception.attributes["exception.message"] == "refused 4"
    assert span.status.status_code is StatusCode.ERROR


# -- correlation ID ------------------------------------------------------------------------


def test_span_carries_the_bound_correlation_id(spans: SpanCapture) -> None:
    seen: list[str | None] = []

    @reskit.Policy("cid")
    def work() -> None:
        seen.append(reskit.correlation_id())

    with reskit.bind_correlation_id("abc"):
        work()
        work()

    assert seen == ["abc", "abc"]
    assert [span.attributes["reskit.correlation_id"] for span in spans.spans()] == ["abc", "abc"]


async def test_async_span_carries_the_bound_correlation_id(spans: SpanCapture) -> None:
    @reskit.Policy("cid")
    async def work() -> str | None:
        await asyncio.sleep(0)
        return reskit.correlation_id()

    with reskit.bind_correlation_id("req-7"):
        assert await work() == "req-7"
    assert only(spans.spans()).attributes["reskit.correlation_id"] == "req-7"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unbound_call_gets_a_generated_correlation_id_visible_inside(
    spans: SpanCapture, kind: str
) -> None:
    policy = reskit.Policy("cid")

    def sync_work() -> str | None:
        return reskit.correlation_id()

    async def async_work() -> str | None:
        await asyncio.sleep(0)
        return reskit.correlation_id()

    def run() -> str | None:
        if kind == "sync":
            return policy(sync_work)()
        return asyncio.run(policy(async_work)())

    assert reskit.correlation_id() is None
    first = run()
    second = run()
    assert reskit.correlation_id() is None  # the generated ID does not outlive the call

    assert first is not None
    assert second is not None
    assert HEX32.fullmatch(first)
    assert HEX32.fullmatch(second)
    assert first != second
    assert [span.attributes["reskit.correlation_id"] for span in spans.spans()] == [
        first,
        second,
    ]


def test_nested_policies_share_the_generated_correlation_id(spans: SpanCapture) -> None:
    @reskit.Policy("inner")
    def inner() -> str | None:
        return reskit.correlation_id()

    @reskit.Policy("outer")
    def outer() -> tuple[str | None, str | None]:
        return reskit.correlation_id(), inner()

    seen_outer, seen_inner = outer()
    assert seen_outer is not None
    assert seen_outer == seen_inner
    inner_span, outer_span = spans.spans()
    assert inner_span.name == "reskit inner"
    assert outer_span.name == "reskit outer"
    assert inner_span.attributes["reskit.correlation_id"] == seen_outer
    assert outer_span.attributes["reskit.correlation_id"] == seen_outer


# -- the span is current inside the protected function -------------------------------------


def test_span_is_current_inside_a_sync_function(spans: SpanCapture) -> None:
    @reskit.Policy("parent")
    def work() -> None:
        child_span(spans)

    work()
    child, parent = spans.spans()
    assert child.name == "child"
    assert parent.name == "reskit parent"
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id


async def test_span_is_current_inside_an_async_function(spans: SpanCapture) -> None:
    @reskit.Policy("parent")
    async def work() -> None:
        await asyncio.sleep(0)
        child_span(spans)

    await work()
    child, parent = spans.spans()
    assert parent.name == "reskit parent"
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id


def test_span_is_current_inside_a_sync_timeout_worker_thread(spans: SpanCapture) -> None:
    threads: list[str] = []

    @reskit.Policy("parent", timeout=30.0)
    def work() -> None:
        threads.append(threading.current_thread().name)
        child_span(spans)

    work()
    assert threads[0] != threading.current_thread().name  # it really ran in a worker
    child, parent = spans.spans()
    assert parent.name == "reskit parent"
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id


def test_nested_policy_spans_are_parent_and_child(spans: SpanCapture) -> None:
    @reskit.Policy("inner")
    def inner() -> None:
        pass

    @reskit.Policy("outer")
    def outer() -> None:
        inner()

    outer()
    inner_span, outer_span = spans.spans()
    assert inner_span.parent is not None
    assert inner_span.parent.span_id == outer_span.context.span_id


def test_reskit_span_is_a_child_of_the_callers_span(spans: SpanCapture) -> None:
    @reskit.Policy("child-of-caller")
    def work() -> None:
        pass

    tracer = spans.tracer_provider.get_tracer("tests")
    with tracer.start_as_current_span("request"):
        work()
    reskit_span, request = spans.spans()
    assert reskit_span.name == "reskit child-of-caller"
    assert reskit_span.parent is not None
    assert reskit_span.parent.span_id == request.context.span_id


def test_callers_context_is_restored_after_every_kind_of_call(
    spans: SpanCapture, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    @reskit.Policy("restore")
    def work(fail: bool) -> None:
        if fail:
            raise ValueError("boom")

    @reskit.Policy("restore-timeout", timeout=1.0)
    def hung() -> None:
        clock.advance(2.0)
        release.wait(10)

    tracer = spans.tracer_provider.get_tracer("tests")
    with caplog.at_level(logging.ERROR), tracer.start_as_current_span("request") as request:
        work(False)
        assert trace.get_current_span() is request
        with pytest.raises(ValueError, match="boom"):
            work(True)
        assert trace.get_current_span() is request
        try:
            with pytest.raises(reskit.TimeoutExceeded):
                hung()
        finally:
            release.set()
        assert trace.get_current_span() is request
        assert reskit.correlation_id() is None
    assert not trace.get_current_span().is_recording()
    assert "Failed to detach context" not in caplog.text
    assert len(spans.spans()) == 4


async def test_callers_context_is_restored_after_an_async_cancellation(
    spans: SpanCapture,
) -> None:
    started = asyncio.Event()

    @reskit.Policy("restore")
    async def wait_forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async def caller() -> tuple[bool, str | None]:
        with pytest.raises(asyncio.CancelledError):
            await wait_forever()
        return trace.get_current_span().is_recording(), reskit.correlation_id()

    task = asyncio.create_task(caller())
    await asyncio.wait_for(started.wait(), timeout=10)
    task.cancel()
    assert await asyncio.wait_for(task, timeout=10) == (False, None)


# -- metrics ---------------------------------------------------------------------------------


async def test_calls_counter_and_duration_histogram_by_policy_and_outcome(
    spans: SpanCapture, clock: FakeClock
) -> None:
    metered = reskit.Policy("metered", timeout=1.0)

    @metered
    async def ok() -> int:
        return 1

    @metered
    async def bad() -> None:
        raise ValueError("bad")

    @metered
    async def slow() -> None:
        clock.advance(5.0)
        await asyncio.sleep(0)

    @reskit.Policy("other", fallback=lambda exc: 0)
    async def other() -> int:
        raise ValueError("bad")

    assert await ok() == 1
    assert await ok() == 1
    assert await ok() == 1
    with pytest.raises(ValueError, match="bad"):
        await bad()
    with pytest.raises(reskit.TimeoutExceeded):
        await slow()
    assert await other() == 0

    def by_outcome(name: str) -> dict[tuple[str, str], Any]:
        points = spans.metrics()[name]
        out = {(attrs["reskit.policy"], attrs["reskit.outcome"]): value for attrs, value in points}
        assert len(out) == len(points)
        for attrs, _ in points:
            assert set(attrs) == {"reskit.policy", "reskit.outcome"}
        return out

    expected = {
        ("metered", "success"): 3,
        ("metered", "failure"): 1,
        ("metered", "timeout"): 1,
        ("other", "fallback"): 1,
    }
    assert by_outcome("reskit.calls") == expected
    # Histogram points report their count: one duration recorded per call.
    assert by_outcome("reskit.call.duration") == expected


# -- nothing configured ----------------------------------------------------------------------


def test_with_nothing_configured_sink_is_none_and_calls_work() -> None:
    # This process never sets the global OTel providers, so returning to the
    # globals means returning to the API's proxies: nothing records.
    with reskit.configure_telemetry():
        assert _telemetry.sink() is None

        @reskit.Policy("quiet", retry=reskit.Retry(attempts=2, on=KeyError, wait=0))
        def work(x: int) -> int:
            return x + 1

        assert work(1) == 2


def test_no_op_providers_record_nothing() -> None:
    with reskit.configure_telemetry(tracer_provider=NoOpTracerProvider()):
        assert _telemetry.sink() is None


def test_telemetry_configured_later_is_used_without_redecorating() -> None:
    with reskit.configure_telemetry():

        @reskit.Policy("late")
        def work() -> int:
            return 7

        assert work() == 7
        assert _telemetry.sink() is None
        with SpanCapture() as capture:
            assert _telemetry.sink() is not None
            assert work() == 7
            assert [span.name for span in capture.spans()] == ["reskit late"]
        assert _telemetry.sink() is None
        assert work() == 7
        assert len(capture.spans()) == 1


def test_global_provider_set_after_decoration_is_picked_up() -> None:
    # Setting the global provider is irreversible, so it happens in a child process.
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        import reskit
        from reskit import _telemetry

        @reskit.Policy("late")
        def work():
            return 1

        work()
        before = _telemetry.sink() is None
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        work()
        spans = exporter.get_finished_spans()
        print(before, len(spans), spans[0].name if spans else "-")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True 1 reskit late"


# -- structlog ---------------------------------------------------------------------------------


def test_retry_log_event_carries_the_bound_correlation_id(
    logs: list[dict[str, Any]], clock: FakeClock
) -> None:
    calls = 0

    @reskit.Policy("logged", retry=reskit.Retry(attempts=3, on=ConnectionError, wait=0.5))
    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("refused")
        return "ok"

    with reskit.bind_correlation_id("abc"):
        assert flaky() == "ok"

    scheduled = [entry for entry in logs if entry["event"] == "reskit.retry.scheduled"]
    assert len(scheduled) == 2
    # "attempt" is the number of the attempt about to start (docs/retries.md).
    for attempt, entry in enumerate(scheduled, start=2):
        assert entry["policy"] == "logged"
        assert entry["attempt"] == attempt
        assert entry["delay"] == 0.5
        assert entry["correlation_id"] == "abc"
        assert entry["log_level"] == "warning"
        assert "ConnectionError" in entry["error"]


def test_retry_log_event_carries_the_generated_correlation_id_of_the_span(
    logs: list[dict[str, Any]], spans: SpanCapture, clock: FakeClock
) -> None:
    calls = 0

    @reskit.Policy("logged", retry=reskit.Retry(attempts=2, on=ConnectionError, wait=0))
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("refused")
        return "ok"

    assert asyncio.run(flaky()) == "ok"
    entry = only([entry for entry in logs if entry["event"] == "reskit.retry.scheduled"])
    span = only(spans.spans())
    assert entry["correlation_id"] == span.attributes["reskit.correlation_id"]
    assert HEX32.fullmatch(entry["correlation_id"])


# -- generators ------------------------------------------------------------------------------


async def test_async_generator_abandoned_early_ends_its_span_cleanly(
    spans: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    closed: list[bool] = []

    @reskit.Policy("stream")
    async def numbers() -> Any:
        try:
            for i in range(10):
                yield i
        finally:
            closed.append(True)

    try:
        with caplog.at_level(logging.ERROR):
            async for n in numbers():
                if n == 1:
                    break
            # Nothing references the generator now: asyncio's finalizer hook
            # schedules its aclose() in a new task.
            gc.collect()
            for _ in range(200):
                if closed and spans.spans():
                    break
                await asyncio.sleep(0)
            for _ in range(5):
                await asyncio.sleep(0)
            gc.collect()  # report "Task exception was never retrieved", if any
    finally:
        loop.set_exception_handler(None)

    assert closed == [True]
    span = only(spans.spans())
    assert span.end_time is not None
    assert span.attributes["reskit.outcome"] == "cancelled"
    assert "Failed to detach context" not in caplog.text
    assert loop_errors == []


async def test_async_generator_closed_early_ends_its_span_cleanly(
    spans: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[bool] = []

    @reskit.Policy("stream")
    async def numbers() -> Any:
        try:
            for i in range(10):
                yield i
        finally:
            closed.append(True)

    with caplog.at_level(logging.DEBUG):
        stream = numbers()
        async for n in stream:
            if n == 1:
                break
        assert spans.spans() == []  # the span stays open while the stream is
        await stream.aclose()

    assert closed == [True]
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "cancelled"
    assert span.status.status_code is not StatusCode.ERROR
    assert "Failed to detach context" not in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []

"""Protected sync and async generators: one call spanning the whole iteration."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import aclosing
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import reskit
from reskit._bulkhead import Bulkhead  # not exported from reskit yet
from reskit.testing import FakeClock, SpanCapture


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def retrying(attempts: int = 3, wait: float = 0.5, **kwargs: Any) -> reskit.Policy:
    return reskit.Policy(
        "stream", retry=reskit.Retry(attempts=attempts, on=ConnectionError, wait=wait), **kwargs
    )


def drain(stream: Iterator[Any], into: list[Any]) -> list[Any]:
    for item in stream:
        into.append(item)
    return into


async def collect(stream: AsyncIterator[Any], into: list[Any]) -> list[Any]:
    async for item in stream:
        into.append(item)
    return into


# -- kind and metadata ------------------------------------------------------------------


def sync_source(n: int, *, step: int = 1) -> Generator[int, None, str]:
    """Count up to n."""
    yield from range(0, n, step)
    return "counted"


async def async_source(n: int, *, step: int = 1) -> AsyncIterator[int]:
    """Count up to n, asynchronously."""
    for i in range(0, n, step):
        yield i


DECORATORS: list[Any] = [
    pytest.param(lambda: reskit.Policy("gens"), id="Policy"),
    pytest.param(lambda: reskit.retry(attempts=2, on=ConnectionError), id="retry"),
    pytest.param(lambda: reskit.fallback(lambda exc: []), id="fallback"),
]


@pytest.mark.parametrize("make", DECORATORS)
@pytest.mark.parametrize("source", [sync_source, async_source], ids=["sync", "async"])
def test_generators_keep_their_metadata(make: Callable[[], Any], source: Any) -> None:
    decorated = make()(source)
    assert decorated.__name__ == source.__name__
    assert decorated.__qualname__ == source.__qualname__
    assert decorated.__doc__ == source.__doc__
    assert decorated.__module__ == source.__module__
    assert decorated.__wrapped__ is source
    assert inspect.signature(decorated) == inspect.signature(source)
    assert not inspect.iscoroutinefunction(decorated)


@pytest.mark.parametrize("make", DECORATORS)
def test_calling_a_decorated_generator_returns_a_generator(make: Callable[[], Any]) -> None:
    policy = make()
    sync_stream = policy(sync_source)(3)
    async_stream = policy(async_source)(3)
    try:
        assert inspect.isgenerator(sync_stream)
        assert inspect.isasyncgen(async_stream)
        assert list(sync_stream) == [0, 1, 2]
        assert asyncio.run(collect(async_stream, [])) == [0, 1, 2]
    finally:
        sync_stream.close()
        asyncio.run(async_stream.aclose())


@pytest.mark.parametrize("make", DECORATORS)
def test_decorated_sync_generator_is_a_generator_function(make: Callable[[], Any]) -> None:
    assert inspect.isgeneratorfunction(make()(sync_source))


@pytest.mark.parametrize("make", DECORATORS)
def test_decorated_async_generator_is_an_async_generator_function(
    make: Callable[[], Any],
) -> None:
    assert inspect.isasyncgenfunction(make()(async_source))


# -- retry only before the first item --------------------------------------------------------


def test_sync_failure_before_the_first_item_is_retried(clock: FakeClock) -> None:
    calls = 0

    @retrying(attempts=3)
    def numbers() -> Iterator[int]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(f"refused {calls}")
        yield from (1, 2, 3)

    assert list(numbers()) == [1, 2, 3]
    assert calls == 3
    assert clock.sleeps == [0.5, 0.5]


def test_sync_failure_before_the_first_item_gives_up_after_the_last_attempt(
    clock: FakeClock,
) -> None:
    calls = 0

    @retrying(attempts=3)
    def numbers() -> Iterator[int]:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"refused {calls}")
        yield 1

    with pytest.raises(ConnectionError, match="refused 3") as info:
        list(numbers())
    assert calls == 3
    assert any("3 attempt(s)" in note for note in info.value.__notes__)


def test_sync_failure_after_the_first_item_is_not_retried(clock: FakeClock) -> None:
    calls = 0
    received: list[int] = []

    @retrying(attempts=5)
    def numbers() -> Iterator[int]:
        nonlocal calls
        calls += 1
        yield 1
        raise ConnectionError("mid-stream")

    with pytest.raises(ConnectionError, match="mid-stream"):
        drain(numbers(), received)
    assert received == [1]
    assert calls == 1
    assert clock.sleeps == []


async def test_async_failure_before_the_first_item_is_retried(clock: FakeClock) -> None:
    calls = 0

    @retrying(attempts=4)
    async def numbers() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls < 4:
            raise ConnectionError(f"refused {calls}")
        for i in (1, 2, 3):
            yield i

    assert await asyncio.wait_for(collect(numbers(), []), timeout=10) == [1, 2, 3]
    assert calls == 4
    assert clock.sleeps == [0.5, 0.5, 0.5]


async def test_async_failure_after_the_first_item_is_not_retried(clock: FakeClock) -> None:
    calls = 0
    received: list[int] = []

    @retrying(attempts=5)
    async def numbers() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        yield 1
        await asyncio.sleep(0)
        raise ConnectionError("mid-stream")

    with pytest.raises(ConnectionError, match="mid-stream"):
        await asyncio.wait_for(collect(numbers(), received), timeout=10)
    assert received == [1]
    assert calls == 1
    assert clock.sleeps == []


def test_exceptions_not_in_on_are_not_retried(clock: FakeClock) -> None:
    calls = 0

    @retrying(attempts=5)
    def numbers() -> Iterator[int]:
        nonlocal calls
        calls += 1
        raise KeyError("no")
        yield 1

    with pytest.raises(KeyError):
        next(numbers())
    assert calls == 1


# -- send, throw, close, return ----------------------------------------------------------------


def make_echo(closed: list[str]) -> Callable[[], Generator[str, Any, None]]:
    @reskit.Policy("echo")
    def echo() -> Generator[str, Any, None]:
        try:
            value = yield "ready"
            while True:
                try:
                    value = yield f"got {value}"
                except ValueError as exc:
                    value = yield f"caught {exc}"
        finally:
            closed.append("finally")

    return echo


def test_send_and_throw_are_forwarded_to_a_sync_generator() -> None:
    closed: list[str] = []
    stream = make_echo(closed)()
    assert next(stream) == "ready"
    assert stream.send(1) == "got 1"
    assert stream.send("two") == "got two"
    assert stream.throw(ValueError("oops")) == "caught oops"
    assert stream.send(3) == "got 3"
    assert closed == []
    stream.close()
    assert closed == ["finally"]


def test_an_unhandled_thrown_exception_propagates_out_of_a_sync_generator() -> None:
    closed: list[str] = []
    stream = make_echo(closed)()
    next(stream)
    error = KeyError("unhandled")
    with pytest.raises(KeyError) as info:
        stream.throw(error)
    assert info.value is error
    assert closed == ["finally"]
    with pytest.raises(StopIteration):
        next(stream)


def test_close_runs_the_sync_generators_finally_and_releases_the_bulkhead() -> None:
    bulkhead = Bulkhead(1)
    closed: list[str] = []

    @reskit.Policy("closing", bulkhead=bulkhead)
    def numbers() -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            closed.append("finally")

    stream = numbers()
    assert next(stream) == 0
    assert bulkhead.in_flight == 1
    with pytest.raises(reskit.BulkheadFull):
        next(numbers())
    stream.close()
    assert closed == ["finally"]
    assert bulkhead.in_flight == 0
    assert list(numbers()) == list(range(10))  # the slot is free again
    assert bulkhead.in_flight == 0


def test_the_return_value_of_a_sync_generator_is_preserved() -> None:
    decorated = reskit.Policy("ret")(sync_source)

    def consumer() -> Generator[int, None, str]:
        result = yield from decorated(3)
        return f"consumer saw {result}"

    stream = consumer()
    assert [next(stream), next(stream), next(stream)] == [0, 1, 2]
    with pytest.raises(StopIteration) as stop:
        next(stream)
    assert stop.value.value == "consumer saw counted"


def test_the_return_value_of_an_empty_sync_generator_is_preserved(clock: FakeClock) -> None:
    calls = 0

    @retrying(attempts=2)
    def empty() -> Generator[int, None, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first")
        return "nothing"
        yield 1

    stream = empty()
    with pytest.raises(StopIteration) as stop:
        next(stream)
    assert stop.value.value == "nothing"
    assert calls == 2


async def test_asend_athrow_and_aclose_are_forwarded_to_an_async_generator() -> None:
    closed: list[str] = []

    @reskit.Policy("aecho")
    async def echo() -> AsyncIterator[str]:
        try:
            value = yield "ready"
            while True:
                try:
                    value = yield f"got {value}"
                except ValueError as exc:
                    value = yield f"caught {exc}"
        finally:
            closed.append("finally")

    stream = echo()
    assert await stream.asend(None) == "ready"
    assert await stream.asend(1) == "got 1"
    assert await stream.athrow(ValueError("oops")) == "caught oops"
    assert await stream.asend(2) == "got 2"
    assert closed == []
    await stream.aclose()
    assert closed == ["finally"]


# -- timeout ----------------------------------------------------------------------------------


def test_timeout_on_a_sync_generator_is_rejected_at_decoration() -> None:
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="sync generator"):
        reskit.Policy("gen", timeout=1.0)(numbers)
    with pytest.raises(TypeError, match="sync generator"):
        reskit.timeout(1.0)(numbers)
    # deadline= is the supported way to bound a sync generator.
    assert list(reskit.Policy("gen", deadline=1.0)(numbers)()) == [1]


async def test_async_generator_step_longer_than_the_timeout_raises(clock: FakeClock) -> None:
    received: list[int] = []
    closed: list[str] = []

    @reskit.Policy("ticks", timeout=1.0)
    async def ticks() -> AsyncIterator[int]:
        try:
            yield 1
            clock.advance(2.0)  # this step "takes" two seconds
            await asyncio.sleep(0)
            yield 2
        finally:
            closed.append("finally")

    with pytest.raises(reskit.TimeoutExceeded) as info:
        await asyncio.wait_for(collect(ticks(), received), timeout=10)
    assert received == [1]
    assert info.value.policy == "ticks"
    assert info.value.kind == "attempt"
    assert closed == ["finally"]
    # Our cancellation was consumed: the test's own task is not left cancelling.
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_async_generator_first_step_timeout_is_retried(clock: FakeClock) -> None:
    calls = 0

    @reskit.Policy("ticks", timeout=1.0, retry=reskit.Retry(attempts=2, on=TimeoutError, wait=0.0))
    async def ticks() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            clock.advance(2.0)
            await asyncio.sleep(0)
        yield calls

    assert await asyncio.wait_for(collect(ticks(), []), timeout=10) == [2]
    assert calls == 2


async def test_async_generator_timeout_is_per_step_not_per_iteration(clock: FakeClock) -> None:
    @reskit.Policy("ticks", timeout=1.0)
    async def ticks() -> AsyncIterator[int]:
        for i in range(5):
            clock.advance(0.6)  # each step is within the timeout; all five are not
            await asyncio.sleep(0)
            yield i

    assert await asyncio.wait_for(collect(ticks(), []), timeout=10) == [0, 1, 2, 3, 4]


async def test_async_generator_deadline_covers_the_whole_iteration(clock: FakeClock) -> None:
    received: list[int] = []

    @reskit.Policy("ticks", deadline=2.0)
    async def ticks() -> AsyncIterator[int]:
        for i in range(5):
            clock.advance(0.6)
            await asyncio.sleep(0)
            yield i

    with pytest.raises(reskit.TimeoutExceeded) as info:
        await asyncio.wait_for(collect(ticks(), received), timeout=10)
    assert received == [0, 1, 2]
    assert info.value.kind == "deadline"


# -- closing early ------------------------------------------------------------------------


async def test_closing_an_async_generator_early_runs_finally_and_releases_everything() -> None:
    bulkhead = Bulkhead(1)
    closed: list[str] = []

    @reskit.Policy("closing", bulkhead=bulkhead)
    async def numbers() -> AsyncIterator[int]:
        try:
            for i in range(10):
                await asyncio.sleep(0)
                yield i
        finally:
            closed.append("finally")

    async with aclosing(numbers()) as stream:
        async for item in stream:
            if item == 2:
                break
        assert bulkhead.in_flight == 1
        assert closed == []
    assert closed == ["finally"]
    assert bulkhead.in_flight == 0
    assert await collect(numbers(), []) == list(range(10))
    assert bulkhead.in_flight == 0


async def test_an_abandoned_async_generator_is_finalized_by_the_loop() -> None:
    bulkhead = Bulkhead(1)
    closed: list[str] = []

    @reskit.Policy("abandoned", bulkhead=bulkhead)
    async def numbers() -> AsyncIterator[int]:
        try:
            for i in range(10):
                yield i
        finally:
            closed.append("finally")

    async for item in numbers():
        if item == 1:
            break
    gc.collect()
    for _ in range(200):
        if closed:
            break
        await asyncio.sleep(0)
    assert closed == ["finally"]
    assert bulkhead.in_flight == 0


# -- fallback -------------------------------------------------------------------------------


def test_sync_fallback_replaces_a_generator_that_failed_before_its_first_item() -> None:
    received: list[Exception] = []

    def spare(exc: Exception) -> list[str]:
        received.append(exc)
        return ["spare-1", "spare-2"]

    @reskit.Policy("fb", fallback=spare)
    def numbers() -> Iterator[str]:
        raise ConnectionError("down")
        yield "never"

    assert list(numbers()) == ["spare-1", "spare-2"]
    assert [type(exc) for exc in received] == [ConnectionError]


def test_sync_fallback_does_not_apply_after_the_first_item() -> None:
    received: list[Exception] = []
    items: list[str] = []

    @reskit.Policy("fb", fallback=lambda exc: received.append(exc) or ["spare"])
    def numbers() -> Iterator[str]:
        yield "real"
        raise ConnectionError("mid-stream")

    with pytest.raises(ConnectionError, match="mid-stream"):
        drain(numbers(), items)
    assert items == ["real"]
    assert received == []


def test_sync_fallback_applies_after_retries_before_the_first_item(clock: FakeClock) -> None:
    calls = 0
    notes: list[list[str]] = []

    def spare(exc: Exception) -> list[str]:
        notes.append(list(exc.__notes__))
        return ["spare"]

    @retrying(attempts=3, fallback=spare)
    def numbers() -> Iterator[str]:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")
        yield "never"

    assert list(numbers()) == ["spare"]
    assert calls == 3
    assert len(notes) == 1
    assert any("3 attempt(s)" in note for note in notes[0])


async def replacement_list(exc: Exception) -> list[str]:
    return ["from-coroutine"]


async def replacement_agen(exc: Exception) -> AsyncIterator[str]:
    yield "from-async-generator"


@pytest.mark.parametrize(
    ("fallback", "expected"),
    [
        (lambda exc: ["from-list"], ["from-list"]),
        (replacement_list, ["from-coroutine"]),
        (replacement_agen, ["from-async-generator"]),
    ],
    ids=["iterable", "coroutine", "async-iterable"],
)
async def test_async_fallback_replaces_a_generator_that_failed_before_its_first_item(
    fallback: Callable[[Exception], Any], expected: list[str]
) -> None:
    @reskit.Policy("fb", fallback=fallback)
    async def numbers() -> AsyncIterator[str]:
        await asyncio.sleep(0)
        raise ConnectionError("down")
        yield "never"

    assert await asyncio.wait_for(collect(numbers(), []), timeout=10) == expected


async def test_async_fallback_does_not_apply_after_the_first_item() -> None:
    received: list[Exception] = []
    items: list[str] = []

    @reskit.Policy("fb", fallback=lambda exc: received.append(exc) or ["spare"])
    async def numbers() -> AsyncIterator[str]:
        yield "real"
        raise ConnectionError("mid-stream")

    with pytest.raises(ConnectionError, match="mid-stream"):
        await collect(numbers(), items)
    assert items == ["real"]
    assert received == []


# -- spans ---------------------------------------------------------------------------------


def test_one_span_covers_a_whole_sync_iteration(spans: SpanCapture) -> None:
    tracer = spans.tracer_provider.get_tracer("tests")

    @reskit.Policy("stream")
    def numbers() -> Iterator[int]:
        for i in range(3):
            with tracer.start_as_current_span(f"step-{i}"):
                pass
            yield i

    stream = numbers()
    assert next(stream) == 0
    assert next(stream) == 1
    # The caller's current span between items is not reskit's.
    assert not trace.get_current_span().is_recording()
    assert [span.name for span in spans.spans()] == ["step-0", "step-1"]
    assert list(stream) == [2]

    *steps, span = spans.spans()
    assert span.name == "reskit stream"
    assert span.attributes["reskit.outcome"] == "success"
    assert span.attributes["reskit.attempts"] == 1
    assert [step.name for step in steps] == ["step-0", "step-1", "step-2"]
    for step in steps:
        assert step.parent is not None
        assert step.parent.span_id == span.context.span_id
        assert span.start_time <= step.start_time <= step.end_time <= span.end_time


async def test_one_span_covers_a_whole_async_iteration(spans: SpanCapture) -> None:
    tracer = spans.tracer_provider.get_tracer("tests")

    @reskit.Policy("astream")
    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            await asyncio.sleep(0)
            with tracer.start_as_current_span(f"step-{i}"):
                pass
            yield i

    items: list[int] = []
    async for item in numbers():
        items.append(item)
        if item < 2:
            assert len([s for s in spans.spans() if s.name == "reskit astream"]) == 0
            assert not trace.get_current_span().is_recording()
    assert items == [0, 1, 2]

    *steps, span = spans.spans()
    assert span.name == "reskit astream"
    assert span.attributes["reskit.outcome"] == "success"
    assert span.attributes["reskit.attempts"] == 1
    for step in steps:
        assert step.parent is not None
        assert step.parent.span_id == span.context.span_id


def test_generator_span_records_retries_before_the_first_item(
    spans: SpanCapture, clock: FakeClock
) -> None:
    calls = 0

    @retrying(attempts=3)
    def numbers() -> Iterator[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("refused")
        yield 1

    assert list(numbers()) == [1]
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "success"
    assert span.attributes["reskit.attempts"] == 2
    retry = only([event for event in span.events if event.name == "reskit.retry"])
    assert retry.attributes["reskit.attempt"] == 2
    assert retry.attributes["reskit.delay"] == 0.5


def test_generator_failing_mid_stream_has_one_failure_span(spans: SpanCapture) -> None:
    @reskit.Policy("stream")
    def numbers() -> Iterator[int]:
        yield 1
        raise ValueError("mid-stream")

    with pytest.raises(ValueError, match="mid-stream"):
        list(numbers())
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "failure"
    assert span.status.status_code is StatusCode.ERROR
    assert (
        only([e for e in span.events if e.name == "exception"]).attributes["exception.message"]
        == "mid-stream"
    )


async def test_async_generator_timeout_span_is_a_timeout(
    spans: SpanCapture, clock: FakeClock
) -> None:
    @reskit.Policy("ticks", timeout=1.0)
    async def ticks() -> AsyncIterator[int]:
        yield 1
        clock.advance(2.0)
        await asyncio.sleep(0)
        yield 2

    with pytest.raises(reskit.TimeoutExceeded):
        await asyncio.wait_for(collect(ticks(), []), timeout=10)
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "timeout"
    assert "reskit.rejected_by" not in span.attributes


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_generator_fallback_span_outcome(spans: SpanCapture, kind: str) -> None:
    policy = reskit.Policy("fb", fallback=lambda exc: ["spare"])

    def sync_numbers() -> Iterator[str]:
        raise ConnectionError("down")
        yield "never"

    async def async_numbers() -> AsyncIterator[str]:
        raise ConnectionError("down")
        yield "never"

    if kind == "sync":
        assert list(policy(sync_numbers)()) == ["spare"]
    else:
        assert asyncio.run(collect(policy(async_numbers)(), [])) == ["spare"]
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "fallback"
    assert span.status.status_code is not StatusCode.ERROR


def test_generator_closed_early_ends_its_span(spans: SpanCapture) -> None:
    decorated = reskit.Policy("stream")(sync_source)
    stream = decorated(10)
    assert next(stream) == 0
    assert spans.spans() == []
    stream.close()
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "cancelled"


# -- correlation ID ------------------------------------------------------------------------


def test_generator_steps_see_the_bound_correlation_id(spans: SpanCapture) -> None:
    @reskit.Policy("stream")
    def ids() -> Iterator[str | None]:
        yield reskit.correlation_id()
        yield reskit.correlation_id()

    with reskit.bind_correlation_id("bound-1"):
        assert list(ids()) == ["bound-1", "bound-1"]
    assert only(spans.spans()).attributes["reskit.correlation_id"] == "bound-1"


def test_generator_steps_see_the_generated_correlation_id_of_the_span(
    spans: SpanCapture,
) -> None:
    @reskit.Policy("stream")
    def ids() -> Iterator[str | None]:
        yield reskit.correlation_id()
        yield reskit.correlation_id()

    first, second = list(ids())
    assert first is not None
    assert first == second
    assert only(spans.spans()).attributes["reskit.correlation_id"] == first
    assert reskit.correlation_id() is None


def test_sync_generator_does_not_leak_its_generated_id_into_the_caller(
    spans: SpanCapture,
) -> None:
    stream = reskit.Policy("stream")(sync_source)(3)
    try:
        assert next(stream) == 0
        assert reskit.correlation_id() is None
    finally:
        stream.close()


async def test_async_generator_does_not_leak_its_generated_id_into_the_caller(
    spans: SpanCapture,
) -> None:
    stream = reskit.Policy("stream")(async_source)(3)
    try:
        assert await stream.__anext__() == 0
        assert reskit.correlation_id() is None
    finally:
        await stream.aclose()


def test_sync_generator_can_be_closed_from_another_context(spans: SpanCapture) -> None:
    import contextvars

    stream = reskit.Policy("stream")(sync_source)(3)
    contextvars.copy_context().run(functools.partial(next, stream))
    stream.close()  # e.g. a server closing a streamed response body elsewhere
    assert only(spans.spans()).attributes["reskit.outcome"] == "cancelled"


# -- regressions ------------------------------------------------------------------


def test_sync_fallback_items_are_read_without_our_context_set() -> None:
    import contextvars

    policy = reskit.Policy("g", deadline=5.0, fallback=lambda exc: iter([1, 2]))

    @policy
    def failing() -> Iterator[int]:
        raise ConnectionError("boom")
        yield 0

    stream = failing()
    assert next(stream) == 1
    assert reskit.remaining_deadline() is None  # nothing of ours between items
    # Finishing in another context must not trip over a token from this one.
    assert contextvars.copy_context().run(list, stream) == [2]
    assert reskit.remaining_deadline() is None


async def test_async_generator_step_after_the_deadline_is_cut_off(clock: FakeClock) -> None:
    @reskit.Policy("s", deadline=1.0)
    async def hangs_after_one() -> AsyncIterator[int]:
        yield 1
        await asyncio.Event().wait()
        yield 2

    stream = hangs_after_one()
    assert await stream.__anext__() == 1
    clock.advance(2.0)  # the deadline passed between two steps
    with pytest.raises(reskit.TimeoutExceeded) as info:
        await asyncio.wait_for(stream.__anext__(), 5.0)
    assert info.value.kind == "deadline"


def test_generator_stop_strategies_time_from_the_start_of_the_call(clock: FakeClock) -> None:
    import tenacity

    attempts = 0

    @reskit.Policy(
        "stop",
        retry=reskit.Retry(attempts=5, on=ValueError, wait=0, stop=tenacity.stop_after_delay(3)),
    )
    def slow_failure() -> Iterator[int]:
        nonlocal attempts
        attempts += 1
        clock.advance(5)
        raise ValueError("slow")
        yield 0

    with pytest.raises(ValueError, match="slow"):
        list(slow_failure())
    assert attempts == 1


async def test_timer_already_due_when_armed_still_fires(clock: FakeClock) -> None:
    from reskit._timeout import Expiry, wheel_for

    task = asyncio.current_task()
    assert task is not None
    expiry = Expiry(task)
    bucket = wheel_for(task.get_loop()).arm(expiry, clock.now() - 1.0, 0.001)

    async def two_loop_turns() -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        await two_loop_turns()
    assert expiry.fired
    assert task.uncancel() == 0
    bucket.discard(expiry)

"""Fallback: what a protected call returns instead of raising."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import reskit
from reskit.testing import FakeClock, SpanCapture


class Recorder:
    """A fallback that remembers what it was called with."""

    def __init__(self, value: Any = "fallback") -> None:
        self.value = value
        self.received: list[BaseException] = []

    def __call__(self, exc: Exception) -> Any:
        self.received.append(exc)
        return self.value


class AsyncRecorder(Recorder):
    async def __call__(self, exc: Exception) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        self.received.append(exc)
        return self.value


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


# -- what the fallback receives ----------------------------------------------------------


def test_fallback_receives_the_final_exception_after_retries(clock: FakeClock) -> None:
    raised: list[Exception] = []
    fallback = Recorder()

    @reskit.Policy(
        "fb",
        retry=reskit.Retry(attempts=3, on=ConnectionError, wait=0.5),
        fallback=fallback,
    )
    def flaky() -> str:
        exc = ConnectionError(f"refused {len(raised) + 1}")
        raised.append(exc)
        raise exc

    assert flaky() == "fallback"
    assert len(raised) == 3
    received = only(fallback.received)
    assert received is raised[-1]
    assert received.__notes__ == ["reskit: policy 'fb' gave up after 3 attempt(s)"]
    assert clock.sleeps == [0.5, 0.5]


async def test_async_fallback_receives_the_final_exception_after_retries(
    clock: FakeClock,
) -> None:
    raised: list[Exception] = []
    fallback = Recorder()

    @reskit.Policy(
        "afb",
        retry=reskit.Retry(attempts=4, on=ConnectionError, wait=0.0),
        fallback=fallback,
    )
    async def flaky() -> str:
        await asyncio.sleep(0)
        exc = ConnectionError(f"refused {len(raised) + 1}")
        raised.append(exc)
        raise exc

    assert await flaky() == "fallback"
    assert len(raised) == 4
    received = only(fallback.received)
    assert received is raised[-1]
    assert any("4 attempt(s)" in note for note in received.__notes__)


def test_fallback_receives_a_non_retryable_exception_at_once(clock: FakeClock) -> None:
    calls = 0
    fallback = Recorder()

    @reskit.Policy(
        "fb", retry=reskit.Retry(attempts=3, on=ConnectionError, wait=0.5), fallback=fallback
    )
    def broken() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not retryable")

    assert broken() == "fallback"
    assert calls == 1
    assert type(only(fallback.received)) is KeyError
    assert clock.sleeps == []


async def test_fallback_receives_timeout_exceeded_from_an_async_timeout(
    clock: FakeClock,
) -> None:
    fallback = Recorder()

    @reskit.Policy("slow", timeout=1.0, fallback=fallback)
    async def slow() -> str:
        clock.advance(2.0)
        await asyncio.sleep(0)
        return "late"

    assert await slow() == "fallback"
    received = only(fallback.received)
    assert isinstance(received, reskit.TimeoutExceeded)
    assert isinstance(received, reskit.ReskitError)
    assert isinstance(received, TimeoutError)
    assert received.policy == "slow"
    assert received.kind == "attempt"
    assert received.timeout == 1.0
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_fallback_receives_timeout_exceeded_from_an_async_deadline(
    clock: FakeClock,
) -> None:
    fallback = Recorder()

    @reskit.Policy("slow", deadline=1.0, fallback=fallback)
    async def slow() -> str:
        clock.advance(2.0)
        await asyncio.sleep(0)
        return "late"

    assert await slow() == "fallback"
    received = only(fallback.received)
    assert isinstance(received, reskit.TimeoutExceeded)
    assert received.kind == "deadline"


def test_fallback_receives_timeout_exceeded_from_a_sync_timeout(clock: FakeClock) -> None:
    fallback = Recorder()
    release = threading.Event()

    @reskit.Policy("slow", timeout=1.0, fallback=fallback)
    def hung() -> str:
        clock.advance(2.0)
        release.wait(10)
        return "late"

    try:
        assert hung() == "fallback"
    finally:
        release.set()
    received = only(fallback.received)
    assert isinstance(received, reskit.TimeoutExceeded)
    assert received.policy == "slow"
    assert received.kind == "attempt"


def test_sync_attempt_that_took_longer_than_its_timeout_falls_back(clock: FakeClock) -> None:
    fallback = Recorder()

    @reskit.Policy("slow", timeout=1.0, fallback=fallback)
    def slow() -> str:
        clock.advance(5.0)  # this attempt "took" five seconds (FakeClock docstring)
        return "late"

    results = [slow() for _ in range(20)]
    assert results == ["fallback"] * 20
    assert all(isinstance(exc, reskit.TimeoutExceeded) for exc in fallback.received)


# -- on= -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "on",
    [
        KeyError,
        (KeyError, IndexError),
        LookupError,
        lambda exc: isinstance(exc, KeyError),
    ],
    ids=["type", "tuple", "base-class", "predicate"],
)
def test_on_selects_which_exceptions_fall_back(on: Any) -> None:
    fallback = Recorder()

    @reskit.fallback(fallback, on=on)
    def fail(exc: Exception) -> None:
        raise exc

    assert fail(KeyError("k")) == "fallback"
    assert type(only(fallback.received)) is KeyError

    other = ValueError("not selected")
    with pytest.raises(ValueError) as info:
        fail(other)
    assert info.value is other
    assert len(fallback.received) == 1


def test_fallback_object_on_policy() -> None:
    fallback = Recorder()
    policy = reskit.Policy("fb", fallback=reskit.Fallback(fallback, on=ConnectionError))

    @policy
    def fail(exc: Exception) -> None:
        raise exc

    assert fail(ConnectionResetError()) == "fallback"
    with pytest.raises(PermissionError):
        fail(PermissionError())
    assert len(fallback.received) == 1


def test_successful_call_never_calls_the_fallback() -> None:
    fallback = Recorder()

    @reskit.fallback(fallback)
    def ok() -> str:
        return "real"

    assert ok() == "real"
    assert fallback.received == []


def test_fallback_that_raises_propagates_its_own_exception() -> None:
    def bad_fallback(exc: Exception) -> None:
        raise RuntimeError("fallback broke")

    @reskit.fallback(bad_fallback)
    def fail() -> None:
        raise ValueError("original")

    with pytest.raises(RuntimeError, match="fallback broke") as info:
        fail()
    assert isinstance(info.value.__context__, ValueError)


def test_fallback_must_be_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        reskit.Fallback("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        reskit.fallback(None)  # type: ignore[arg-type]


def test_fallback_rejects_a_bad_on() -> None:
    with pytest.raises(TypeError):
        reskit.Fallback(lambda exc: None, on=(KeyError, "not a type"))  # type: ignore[arg-type]


# -- async ---------------------------------------------------------------------------------


async def test_async_fallback_is_awaited_for_async_functions() -> None:
    fallback = AsyncRecorder({"cached": True})

    @reskit.fallback(fallback)
    async def fetch() -> dict[str, bool]:
        raise ConnectionError("down")

    assert await fetch() == {"cached": True}
    assert type(only(fallback.received)) is ConnectionError


async def test_sync_fallback_works_for_async_functions() -> None:
    fallback = Recorder(["sync"])

    @reskit.fallback(fallback)
    async def fetch() -> list[str]:
        await asyncio.sleep(0)
        raise ConnectionError("down")

    assert await fetch() == ["sync"]
    assert len(fallback.received) == 1


async def test_async_fallback_through_acall() -> None:
    policy = reskit.Policy("acall", fallback=AsyncRecorder(7))

    async def fetch() -> int:
        raise ConnectionError("down")

    assert await policy.acall(fetch) == 7


# -- never fall back on cancellation and interrupts --------------------------------------------


async def test_cancellation_never_falls_back() -> None:
    fallback = Recorder()
    started = asyncio.Event()

    @reskit.fallback(fallback, on=BaseException)
    async def wait_forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(wait_forever())
    await asyncio.wait_for(started.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
    assert task.cancelled()
    assert fallback.received == []


async def test_cancellation_raised_inside_never_falls_back() -> None:
    fallback = AsyncRecorder()

    @reskit.fallback(fallback, on=BaseException)
    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await cancelled()
    assert fallback.received == []


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_interrupts_never_fall_back(exc_type: type[BaseException]) -> None:
    fallback = Recorder()

    @reskit.fallback(fallback, on=BaseException)
    def interrupted() -> None:
        raise exc_type

    with pytest.raises(exc_type):
        interrupted()
    assert fallback.received == []


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_interrupts_never_fall_back_in_async_functions(
    exc_type: type[BaseException],
) -> None:
    fallback = Recorder()

    @reskit.fallback(fallback, on=BaseException)
    async def interrupted() -> None:
        raise exc_type

    with pytest.raises(exc_type):
        await interrupted()
    assert fallback.received == []


# -- telemetry -----------------------------------------------------------------------------


def test_span_outcome_is_fallback(spans: SpanCapture, clock: FakeClock) -> None:
    @reskit.Policy(
        "fb",
        retry=reskit.Retry(attempts=2, on=ConnectionError, wait=0.0),
        fallback=lambda exc: "spare",
    )
    def broken() -> str:
        raise ConnectionError("down")

    assert broken() == "spare"
    span = only(spans.spans())
    assert span.name == "reskit fb"
    assert span.attributes["reskit.outcome"] == "fallback"
    assert span.attributes["reskit.attempts"] == 2
    assert "reskit.rejected_by" not in span.attributes
    assert span.status.status_code is not StatusCode.ERROR
    exception = only([event for event in span.events if event.name == "exception"])
    assert exception.attributes["exception.type"] == "ConnectionError"
    assert spans.metrics()["reskit.calls"] == [
        ({"reskit.policy": "fb", "reskit.outcome": "fallback"}, 1)
    ]


async def test_span_of_a_timeout_fallback_names_no_rejection(
    spans: SpanCapture, clock: FakeClock
) -> None:
    @reskit.Policy("slow", timeout=1.0, fallback=AsyncRecorder("spare"))
    async def slow() -> str:
        clock.advance(2.0)
        await asyncio.sleep(0)
        return "late"

    assert await slow() == "spare"
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "fallback"
    # A timeout is the dependency being slow, not a protection refusing the call.
    assert "reskit.rejected_by" not in span.attributes


def test_span_of_a_failing_fallback_is_a_failure(spans: SpanCapture) -> None:
    def bad_fallback(exc: Exception) -> None:
        raise RuntimeError("fallback broke")

    @reskit.Policy("fb", fallback=bad_fallback)
    def fail() -> None:
        raise ValueError("original")

    with pytest.raises(RuntimeError):
        fail()
    span = only(spans.spans())
    assert span.attributes["reskit.outcome"] == "failure"
    assert span.status.status_code is StatusCode.ERROR

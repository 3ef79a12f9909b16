"""The parity matrix: every layer of the canonical order, in each of the four kinds of call.

One composition drives functions, coroutines, sync generators and async
generators (``_compose.py``), so each layer must behave the same in all four:
the same rejection type, the same argument to the fallback, the same number of
attempts, the same span attributes and the same ``remaining_deadline()``. Every
test here is parametrized over the kinds; a layer that forgets a kind fails one.

A protected unit returns (or, for a stream, yields once) what its ``body``
returns; :func:`outcome` normalises both to a list, so a function's ``"x"`` and
a generator's single item ``"x"`` compare alike.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

import reskit
from reskit import (
    AdaptiveThrottle,
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpen,
    Policy,
    Retry,
    RetryBudget,
    RetryBudgetExhausted,
    Throttled,
    TimeoutExceeded,
)
from reskit.testing import FakeClock, SpanCapture

KINDS = ("function", "coroutine", "generator", "async generator")
STREAMS = ("generator", "async generator")


def make(kind: str, body: Callable[[], Any]) -> Callable[..., Any]:
    """A function of ``kind`` whose call (or single step) runs ``body`` once."""
    if kind == "function":

        def function() -> Any:
            return body()

        return function
    if kind == "coroutine":

        async def coroutine() -> Any:
            value = body()
            # An await after the body, where a timeout's cancellation lands.
            await asyncio.sleep(0)
            return value

        return coroutine
    if kind == "generator":

        def generator() -> Any:
            yield body()

        return generator

    async def async_generator() -> Any:
        value = body()
        await asyncio.sleep(0)
        yield value

    return async_generator


async def outcome(kind: str, protected: Callable[..., Any]) -> list[Any]:
    """Call or iterate ``protected``; what it returned, or the items it yielded."""
    if kind == "function":
        return [protected()]
    if kind == "coroutine":
        return [await protected()]
    if kind == "generator":
        return list(protected())
    return [item async for item in protected()]


def fallback_for(kind: str, seen: list[BaseException]) -> Callable[[Exception], Any]:
    """A fallback that records its argument and answers ``fallback``."""

    def fallback(exc: Exception) -> Any:
        seen.append(exc)
        return ["fallback"] if kind in STREAMS else "fallback"

    return fallback


class Attempts:
    """A body that fails ``failures`` times with ``error`` and then returns ``"ok"``."""

    def __init__(self, failures: int = 0, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"attempt {self.calls}")
        return "ok"


class Rejecting(random.Random):
    """A random source that makes a throttle reject whenever it may, once armed."""

    armed = False

    def random(self) -> float:
        return 0.0 if self.armed else 1.0


def throttle_that_rejects() -> AdaptiveThrottle:
    source = Rejecting()
    throttle = AdaptiveThrottle(random=source)
    # Requests the backend did not accept: from now on the throttle may reject.
    for _ in range(3):
        throttle.record(throttle.admit("warm-up"), ConnectionError(), 0.0)
    source.armed = True
    return throttle


pytestmark = pytest.mark.parametrize("kind", KINDS)


# -- a plain call ---------------------------------------------------------------------


async def test_a_successful_call_returns_its_result_and_counts_one_attempt(kind: str) -> None:
    policy = Policy("parity", retry=Retry(3, on=ConnectionError, wait=0))
    body = Attempts()
    assert await outcome(kind, policy(make(kind, body))) == ["ok"]
    stats = policy.statistics
    assert (stats.calls, stats.attempts, stats.retries, body.calls) == (1, 1, 0, 1)


# -- fallback ---------------------------------------------------------------------------


async def test_fallback_receives_the_final_exception(kind: str, clock: FakeClock) -> None:
    seen: list[BaseException] = []
    policy = Policy(
        "parity",
        retry=Retry(2, on=ConnectionError, wait=0),
        fallback=fallback_for(kind, seen),
    )
    body = Attempts(failures=5)
    assert await outcome(kind, policy(make(kind, body))) == ["fallback"]
    [exc] = seen
    assert isinstance(exc, ConnectionError)
    assert str(exc) == "attempt 2"
    assert body.calls == 2
    assert policy.statistics.fallbacks == 1


async def test_fallback_on_filter_lets_other_errors_through(kind: str) -> None:
    seen: list[BaseException] = []
    policy = Policy("parity", fallback=reskit.Fallback(fallback_for(kind, seen), on=KeyError))
    with pytest.raises(ConnectionError):
        await outcome(kind, policy(make(kind, Attempts(failures=1))))
    assert seen == []


# -- bulkhead ----------------------------------------------------------------------------


async def test_a_full_bulkhead_rejects_with_bulkhead_full(kind: str) -> None:
    bulkhead = Bulkhead(1)
    policy = Policy("parity", bulkhead=bulkhead)
    held = bulkhead.admit("someone else")
    try:
        with pytest.raises(BulkheadFull):
            await outcome(kind, policy(make(kind, Attempts())))
    finally:
        bulkhead.record(held, None, 0.0)
    assert policy.statistics.rejections == {"bulkhead": 1}
    assert await outcome(kind, policy(make(kind, Attempts()))) == ["ok"]
    assert bulkhead.in_flight == 0


async def test_fallback_sees_bulkhead_full(kind: str) -> None:
    seen: list[BaseException] = []
    bulkhead = Bulkhead(1)
    policy = Policy("parity", bulkhead=bulkhead, fallback=fallback_for(kind, seen))
    held = bulkhead.admit("someone else")
    try:
        assert await outcome(kind, policy(make(kind, Attempts()))) == ["fallback"]
    finally:
        bulkhead.record(held, None, 0.0)
    assert [type(exc) for exc in seen] == [BulkheadFull]


# -- deadline ----------------------------------------------------------------------------


async def test_remaining_deadline_inside_the_call_is_the_deadline(
    kind: str, clock: FakeClock
) -> None:
    policy = Policy("parity", deadline=3.0)
    assert await outcome(kind, policy(make(kind, reskit.remaining_deadline))) == [3.0]
    assert reskit.remaining_deadline() is None


async def test_a_retry_is_not_scheduled_past_the_deadline(kind: str, clock: FakeClock) -> None:
    def slow_failure() -> str:
        clock.advance(2.0)
        raise ConnectionError("slow")

    policy = Policy("parity", deadline=3.0, retry=Retry(5, on=ConnectionError, wait=1.5))
    with pytest.raises(ConnectionError) as raised:
        await outcome(kind, policy(make(kind, slow_failure)))
    assert "the deadline leaves no time" in raised.value.__notes__[-1]
    assert policy.statistics.attempts == 1


async def test_an_inherited_deadline_already_spent_starts_no_attempt(
    kind: str, clock: FakeClock
) -> None:
    body = Attempts()
    inner = Policy("inner", retry=Retry(3, on=ConnectionError, wait=0))(make(kind, body))
    outer = Policy("outer", deadline=1.0)

    def late_sync() -> list[Any]:
        clock.advance(2.0)  # the outer deadline passes before the inner call starts
        return list(inner()) if kind == "generator" else [inner()]

    async def late_async() -> list[Any]:
        clock.advance(2.0)
        return await outcome(kind, inner)

    async def late() -> list[Any]:
        if kind in ("function", "generator"):
            return outer.call(late_sync)
        return await outer.acall(late_async)

    with pytest.raises(TimeoutExceeded) as raised:
        await late()
    assert raised.value.kind == "deadline"
    assert body.calls == 0


# -- retry --------------------------------------------------------------------------------


async def test_retry_counts_attempts_and_returns_the_result(kind: str, clock: FakeClock) -> None:
    policy = Policy("parity", retry=Retry(3, on=ConnectionError, wait=0.5))
    body = Attempts(failures=2)
    assert await outcome(kind, policy(make(kind, body))) == ["ok"]
    assert body.calls == 3
    assert clock.sleeps == [0.5, 0.5]
    stats = policy.statistics
    assert (stats.attempts, stats.retries, stats.failures) == (3, 2, 0)


async def test_exhausted_retries_reraise_the_last_exception_with_a_note(
    kind: str, clock: FakeClock
) -> None:
    policy = Policy("parity", retry=Retry(3, on=ConnectionError, wait=0))
    with pytest.raises(ConnectionError, match="attempt 3") as raised:
        await outcome(kind, policy(make(kind, Attempts(failures=9))))
    assert raised.value.__notes__ == ["reskit: policy 'parity' gave up after 3 attempt(s)"]
    assert policy.statistics.failures == 1


async def test_errors_not_in_on_are_not_retried(kind: str, clock: FakeClock) -> None:
    policy = Policy("parity", retry=Retry(3, on=ConnectionError, wait=0))
    body = Attempts(failures=1, error=KeyError)
    with pytest.raises(KeyError):
        await outcome(kind, policy(make(kind, body)))
    assert body.calls == 1


async def test_an_empty_budget_raises_retry_budget_exhausted_to_the_fallback(
    kind: str, clock: FakeClock
) -> None:
    seen: list[BaseException] = []
    budget = RetryBudget(0.0, min_per_second=0.0)
    policy = Policy(
        "parity",
        retry=Retry(3, on=ConnectionError, wait=0, budget=budget),
        fallback=fallback_for(kind, seen),
    )
    assert await outcome(kind, policy(make(kind, Attempts(failures=1)))) == ["fallback"]
    [exc] = seen
    assert isinstance(exc, RetryBudgetExhausted)
    assert isinstance(exc.__cause__, ConnectionError)


async def test_on_retry_hook_sees_each_retry(kind: str, clock: FakeClock) -> None:
    seen: list[reskit.RetryDetails] = []
    policy = Policy("parity", retry=Retry(3, on=ConnectionError, wait=0.25, on_retry=seen.append))
    await outcome(kind, policy(make(kind, Attempts(failures=2))))
    assert [(d.policy, d.attempt, d.wait, d.waited_so_far) for d in seen] == [
        ("parity", 1, 0.25, 0.0),
        ("parity", 2, 0.25, 0.25),
    ]
    assert all(isinstance(d.exception, ConnectionError) for d in seen)


# -- circuit breaker -----------------------------------------------------------------------


async def test_an_open_breaker_rejects_with_circuit_open(kind: str, clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    policy = Policy("parity", breaker=breaker)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await outcome(kind, policy(make(kind, Attempts(failures=1))))
    assert breaker.state == "open"
    body = Attempts()
    with pytest.raises(CircuitOpen) as raised:
        await outcome(kind, policy(make(kind, body)))
    assert raised.value.retry_after == pytest.approx(30.0)
    assert body.calls == 0
    assert policy.statistics.rejections == {"breaker": 1}
    clock.advance(30.0)
    assert await outcome(kind, policy(make(kind, body))) == ["ok"]
    assert breaker.state == "closed"


async def test_a_rejection_costs_no_breaker_sample(kind: str) -> None:
    breaker = CircuitBreaker(fail_max=1)
    bulkhead = Bulkhead(1)
    policy = Policy("parity", bulkhead=bulkhead, breaker=breaker)
    held = bulkhead.admit("someone else")
    try:
        with pytest.raises(BulkheadFull):
            await outcome(kind, policy(make(kind, Attempts())))
    finally:
        bulkhead.record(held, None, 0.0)
    assert breaker.state == "closed"
    assert breaker.fail_counter == 0


# -- throttle ---------------------------------------------------------------------------------


async def test_a_throttle_rejects_with_throttled_and_the_fallback_sees_it(kind: str) -> None:
    seen: list[BaseException] = []
    body = Attempts()
    policy = Policy("parity", throttle=throttle_that_rejects(), fallback=fallback_for(kind, seen))
    assert await outcome(kind, policy(make(kind, body))) == ["fallback"]
    assert [type(exc) for exc in seen] == [Throttled]
    assert body.calls == 0
    assert policy.statistics.rejections == {"throttle": 1}


# -- attempt timeout ---------------------------------------------------------------------------


async def test_an_attempt_longer_than_its_timeout_raises_timeout_exceeded(
    kind: str, clock: FakeClock
) -> None:
    def slow() -> str:
        clock.advance(5.0)
        return "late"

    policy = Policy("parity", timeout=2.0)
    if kind == "generator":
        with pytest.raises(TypeError, match="cannot be enforced on a sync generator"):
            policy(make(kind, slow))
        return
    with pytest.raises(TimeoutExceeded) as raised:
        await outcome(kind, policy(make(kind, slow)))
    assert (raised.value.kind, raised.value.timeout) == ("attempt", 2.0)


async def test_remaining_deadline_inside_an_attempt_is_its_timeout(
    kind: str, clock: FakeClock
) -> None:
    policy = Policy("parity", timeout=2.0, deadline=5.0)
    if kind == "generator":
        # A sync generator's steps run in the caller's thread: only the deadline bounds them.
        policy = policy.replace(timeout=None, deadline=2.0)
    assert await outcome(kind, policy(make(kind, reskit.remaining_deadline))) == [2.0]


# -- telemetry ----------------------------------------------------------------------------------


async def test_span_attributes_of_a_retried_success(kind: str, clock: FakeClock) -> None:
    policy = Policy("parity", retry=Retry(3, on=ConnectionError, wait=0))
    with SpanCapture() as capture:
        await outcome(kind, policy(make(kind, Attempts(failures=1))))
    [span] = capture.spans()
    assert span.name == "reskit parity"
    assert span.attributes["reskit.outcome"] == "success"
    assert span.attributes["reskit.attempts"] == 2
    assert [event.name for event in span.events] == ["reskit.retry"]


async def test_span_attributes_of_a_rejection_and_a_fallback(kind: str) -> None:
    bulkhead = Bulkhead(1)
    seen: list[BaseException] = []
    rejected = Policy("rejected", bulkhead=bulkhead)
    fell_back = Policy("fell-back", bulkhead=bulkhead, fallback=fallback_for(kind, seen))
    held = bulkhead.admit("someone else")
    try:
        with SpanCapture() as capture:
            with pytest.raises(BulkheadFull):
                await outcome(kind, rejected(make(kind, Attempts())))
            await outcome(kind, fell_back(make(kind, Attempts())))
    finally:
        bulkhead.record(held, None, 0.0)
    spans = {span.name: span.attributes for span in capture.spans()}
    assert spans["reskit rejected"]["reskit.outcome"] == "rejected"
    assert spans["reskit rejected"]["reskit.rejected_by"] == "bulkhead"
    assert spans["reskit fell-back"]["reskit.outcome"] == "fallback"
    assert spans["reskit fell-back"]["reskit.rejected_by"] == "bulkhead"

"""The bulkhead and the adaptive throttle driven by the Policy engine."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Generator
from typing import Any

import pytest

import reskit
from reskit import AdaptiveThrottle, AIMDLimit, Bulkhead, BulkheadFull, CircuitBreaker, Throttled
from reskit.testing import FakeClock, SpanCapture

WAIT = 10.0


class Held:
    """Runs ``policy.call(hold)`` in a thread and keeps it in flight until released."""

    def __init__(self, policy: reskit.Policy, *args: Any) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.outcome: list[Any] = []

        def hold(*_: Any) -> str:
            self.entered.set()
            assert self.release.wait(WAIT)
            return "held"

        def run() -> None:
            try:
                self.outcome.append(policy.call(hold, *args))
            except BaseException as exc:
                self.outcome.append(exc)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.entered.wait(WAIT)

    def finish(self) -> Any:
        self.release.set()
        self.thread.join(WAIT)
        return self.outcome[0]


# -- bulkhead ---------------------------------------------------------------------------


def test_full_bulkhead_rejects_without_retry_or_breaker_sample(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30.0)
    bulkhead = Bulkhead(1)
    policy = reskit.Policy(
        "payments",
        retry=reskit.Retry(attempts=5, on=Exception, wait=0.1),
        breaker=breaker,
        bulkhead=bulkhead,
    )
    held = Held(policy)
    calls = []
    with pytest.raises(BulkheadFull) as info:
        policy.call(lambda: calls.append(1))
    assert calls == []
    assert info.value.policy == "payments"
    assert clock.sleeps == []  # no retry backoff either
    assert breaker.state == "closed"
    assert (breaker.fail_counter, breaker.success_counter) == (0, 0)
    assert held.finish() == "held"
    assert bulkhead.in_flight == 0
    assert policy.call(lambda: "free again") == "free again"


def test_an_outer_retry_does_not_retry_an_inner_bulkhead_rejection(clock: FakeClock) -> None:
    inner = reskit.Policy("inner", bulkhead=Bulkhead(1))
    outer = reskit.Policy("outer", retry=reskit.Retry(attempts=5, on=Exception, wait=0.1))
    held = Held(inner)
    attempts = []

    def through_inner() -> Any:
        attempts.append(1)
        return inner.call(lambda: "ran")

    with pytest.raises(BulkheadFull):
        outer.call(through_inner)
    assert attempts == [1]
    held.finish()


async def test_async_rejection_and_release(clock: FakeClock) -> None:
    bulkhead = Bulkhead(2)
    policy = reskit.Policy("p", bulkhead=bulkhead)
    gate = asyncio.Event()

    async def hold() -> str:
        await asyncio.wait_for(gate.wait(), WAIT)
        return "done"

    holders = [asyncio.create_task(policy.acall(hold)) for _ in range(2)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert bulkhead.in_flight == 2
    with pytest.raises(BulkheadFull):
        await policy.acall(hold)
    gate.set()
    assert await asyncio.gather(*holders) == ["done", "done"]
    assert bulkhead.in_flight == 0


def test_permit_is_released_when_the_call_raises() -> None:
    bulkhead = Bulkhead(1)
    policy = reskit.Policy("p", bulkhead=bulkhead)

    def boom() -> None:
        raise ValueError("boom")

    for _ in range(3):
        with pytest.raises(ValueError, match="boom"):
            policy.call(boom)
        assert bulkhead.in_flight == 0


async def test_permit_is_released_when_the_async_call_raises_or_is_cancelled() -> None:
    bulkhead = Bulkhead(1)
    policy = reskit.Policy("p", bulkhead=bulkhead)

    async def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await policy.acall(boom)
    assert bulkhead.in_flight == 0

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(policy.acall(forever))
    await asyncio.wait_for(started.wait(), WAIT)
    assert bulkhead.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bulkhead.in_flight == 0

    async def ok() -> str:
        return "ok"

    assert await policy.acall(ok) == "ok"


async def test_cancelled_while_waiting_through_the_policy_leaks_nothing(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=5.0)
    policy = reskit.Policy("p", bulkhead=bulkhead)
    gate = asyncio.Event()
    ran = []

    async def hold() -> None:
        await asyncio.wait_for(gate.wait(), WAIT)

    async def record() -> None:
        ran.append(1)

    holder = asyncio.create_task(policy.acall(hold))
    waiter = asyncio.create_task(policy.acall(record))
    for _ in range(5):
        await asyncio.sleep(0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    gate.set()
    await holder
    assert ran == []
    assert bulkhead.in_flight == 0


async def test_waiting_caller_times_out_through_the_policy(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=0.5)
    policy = reskit.Policy("p", bulkhead=bulkhead)
    gate = asyncio.Event()

    async def hold() -> None:
        await asyncio.wait_for(gate.wait(), WAIT)

    async def never_runs() -> None:
        raise AssertionError("must not run")

    holder = asyncio.create_task(policy.acall(hold))
    waiter = asyncio.create_task(policy.acall(never_runs))
    for _ in range(5):
        await asyncio.sleep(0)
    clock.advance(0.5)
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises(BulkheadFull, match=r"waited 0\.5s"):
        await waiter
    gate.set()
    await holder
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


def test_an_outer_deadline_bounds_the_bulkhead_wait(clock: FakeClock) -> None:
    inner = reskit.Policy("inner", bulkhead=Bulkhead(1, max_waiting=1, wait_timeout=30.0))
    outer = reskit.Policy("outer", deadline=2.0)
    held = Held(inner)
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            outer.call(lambda: inner.call(lambda: "ran"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    clock.wait_for_waiting(1)
    assert inner.bulkhead is not None
    assert inner.bulkhead.waiting == 1
    clock.advance(2.0)
    thread.join(WAIT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], BulkheadFull)
    assert "waited 2s" in str(outcome[0])
    held.finish()


def test_partitions_through_the_policy() -> None:
    bulkhead = Bulkhead(1, key=lambda tenant, *_, **__: tenant, max_partitions=2)
    policy = reskit.Policy("p", bulkhead=bulkhead)
    held_a = Held(policy, "a")
    with pytest.raises(BulkheadFull):
        policy.call(lambda tenant: tenant, "a")
    assert policy.call(lambda tenant: tenant, "b") == "b"
    held_b = Held(policy, "b")
    with pytest.raises(BulkheadFull, match="max_partitions=2"):
        policy.call(lambda tenant: tenant, "c")
    assert bulkhead.partitions == 2
    held_a.finish()
    held_b.finish()
    assert (bulkhead.partitions, bulkhead.in_flight) == (0, 0)
    assert policy.call(lambda tenant: tenant, "c") == "c"


def test_a_generator_holds_its_slot_until_it_is_closed() -> None:
    bulkhead = Bulkhead(1)
    policy = reskit.Policy("p", bulkhead=bulkhead)

    @policy
    def numbers() -> Generator[int, None, None]:
        yield from range(3)

    stream = numbers()
    assert next(stream) == 0
    assert bulkhead.in_flight == 1
    with pytest.raises(BulkheadFull):
        list(numbers())
    stream.close()
    assert bulkhead.in_flight == 0
    assert list(numbers()) == [0, 1, 2]
    assert bulkhead.in_flight == 0


def test_the_adaptive_limit_learns_from_policy_outcomes() -> None:
    bulkhead = Bulkhead(10, limit=AIMDLimit(initial=4, min_limit=1, max_limit=10))
    policy = reskit.Policy("p", bulkhead=bulkhead)

    def timeout() -> None:
        raise TimeoutError("backend too slow")

    def app_error() -> None:
        raise KeyError("missing")

    with pytest.raises(TimeoutError):
        policy.call(timeout)
    assert bulkhead.limit == 3  # a drop: int(4 * 0.9)
    with pytest.raises(KeyError):
        policy.call(app_error)
    assert bulkhead.limit == 3  # says nothing about capacity
    policy.call(lambda: None)  # a success while 1 * 2 < 3 in flight: app-limited
    assert bulkhead.limit == 3


# -- throttle --------------------------------------------------------------------------


class Scripted(random.Random):
    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self.draws = draws

    def random(self) -> float:
        return self.draws.pop(0) if self.draws else 1.0 - 1e-12


def test_throttle_rejects_locally_and_is_not_retried(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(random=Scripted([]))
    breaker = CircuitBreaker(fail_max=100, reset_timeout=30.0)
    policy = reskit.Policy(
        "search",
        throttle=throttle,
        breaker=breaker,
        retry=reskit.Retry(attempts=3, on=ConnectionError, wait=0.1),
    )
    calls = []

    def backend() -> None:
        calls.append(1)
        raise ConnectionError("503")

    with pytest.raises(ConnectionError):
        policy.call(backend)
    # Each of the three attempts was counted; none was accepted.
    assert len(calls) == 3
    assert (throttle.requests, throttle.accepts) == (3, 0)
    assert throttle.rejection_probability == pytest.approx(3 / 4)
    failures = breaker.fail_counter

    assert isinstance(throttle._random, Scripted)
    throttle._random.draws.append(0.0)  # the next draw rejects
    with pytest.raises(Throttled) as info:
        policy.call(backend)
    assert info.value.policy == "search"
    assert len(calls) == 3  # the backend never saw it, and no retry followed
    assert throttle.requests == 4
    assert breaker.fail_counter == failures  # a local rejection is no backend failure


async def test_throttle_records_async_outcomes(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(random=Scripted([]))
    policy = reskit.Policy("p", throttle=throttle)

    async def ok() -> str:
        return "ok"

    async def fails() -> None:
        raise ConnectionError("refused")

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    assert await policy.acall(ok) == "ok"
    with pytest.raises(ConnectionError):
        await policy.acall(fails)
    task = asyncio.create_task(policy.acall(forever))
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled attempt is not counted either way.
    assert (throttle.requests, throttle.accepts) == (2, 1)


# -- telemetry --------------------------------------------------------------------------


def test_a_rejection_is_recorded_on_the_span(spans: SpanCapture) -> None:
    policy = reskit.Policy("inventory", bulkhead=Bulkhead(1))
    held = Held(policy)
    with pytest.raises(BulkheadFull):
        policy.call(lambda: "never")
    held.finish()
    rejected = [s for s in spans.spans() if s.attributes["reskit.outcome"] == "rejected"]
    assert len(rejected) == 1
    assert rejected[0].name == "reskit inventory"
    assert rejected[0].attributes["reskit.rejected_by"] == "bulkhead"


def test_occupancy_gauge_reaches_a_configured_meter_provider(spans: SpanCapture) -> None:
    bulkhead = Bulkhead(3)
    policy = reskit.Policy("gauge-policy", bulkhead=bulkhead)
    holders = [Held(policy) for _ in range(2)]
    points = [
        value
        for attributes, value in spans.metrics()["reskit.bulkhead.occupancy"]
        if attributes == {"reskit.bulkhead.name": "gauge-policy"}
    ]
    assert points == [2]
    for held in holders:
        held.finish()

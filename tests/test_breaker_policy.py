"""The circuit breaker inside a Policy: sync, async, generators, retries, telemetry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import pytest

import reskit
from reskit._breaker import BreakerState, CircuitBreaker
from reskit._errors import CircuitOpen
from reskit.testing import FakeClock, SpanCapture

BARRIER_TIMEOUT = 30.0


async def until_started(task: asyncio.Task[Any], started: asyncio.Event) -> None:
    """Wait until ``task`` sets ``started``; fail at once if it ends first."""
    waiter = asyncio.ensure_future(started.wait())
    done, _ = await asyncio.wait(
        {task, waiter}, timeout=BARRIER_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if waiter not in done:
        waiter.cancel()
    assert task not in done, f"the task ended before it started: {task!r}"
    assert waiter in done


class Down(ConnectionError):
    pass


class Calls:
    """A stand-in dependency that counts how often it really ran."""

    def __init__(self) -> None:
        self.count = 0

    def fail(self) -> None:
        self.count += 1
        raise Down("dependency down")

    def ok(self) -> str:
        self.count += 1
        return "ok"

    async def afail(self) -> None:
        self.count += 1
        await asyncio.sleep(0)
        raise Down("dependency down")

    async def aok(self) -> str:
        self.count += 1
        await asyncio.sleep(0)
        return "ok"


async def drain(stream: AsyncIterator[int], into: list[int]) -> None:
    async for item in stream:
        into.append(item)


def failures(policy: reskit.Policy, fn: Any, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Down):
            policy.call(fn)


# -- sync and async calls ------------------------------------------------------------------


def test_policy_call_failures_open_the_breaker(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30)
    policy = reskit.Policy("inventory", breaker=breaker)
    dep = Calls()
    failures(policy, dep.fail, 3)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        policy.call(dep.ok)
    assert dep.count == 3  # the rejected call never reached the dependency
    assert info.value.policy == "inventory"
    assert info.value.retry_after == pytest.approx(30.0)


def test_policy_call_half_open_probe_closes_it(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5)
    policy = reskit.Policy("inventory", breaker=breaker)
    dep = Calls()
    failures(policy, dep.fail, 1)
    clock.advance(4.999)
    with pytest.raises(CircuitOpen):
        policy.call(dep.ok)
    clock.advance(0.001)
    assert policy.call(dep.ok) == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert dep.count == 2


async def test_policy_acall_counts_async_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=5)
    policy = reskit.Policy("async-dep", breaker=breaker)
    dep = Calls()
    for _ in range(2):
        with pytest.raises(Down):
            await policy.acall(dep.afail)
    with pytest.raises(CircuitOpen):
        await policy.acall(dep.aok)
    assert dep.count == 2
    clock.advance(5)
    assert await policy.acall(dep.aok) == "ok"
    assert breaker.state is BreakerState.CLOSED


def test_decorated_sync_function(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, exclude=[KeyError])
    policy = reskit.Policy("decorated", breaker=breaker)

    @policy
    def lookup(key: str) -> str:
        if key == "missing":
            raise KeyError(key)
        if key == "down":
            raise Down(key)
        return key.upper()

    assert lookup("a") == "A"
    for _ in range(5):
        with pytest.raises(KeyError):
            lookup("missing")  # a business error: excluded, the breaker stays closed
    assert breaker.state is BreakerState.CLOSED
    for _ in range(2):
        with pytest.raises(Down):
            lookup("down")
    with pytest.raises(CircuitOpen):
        lookup("a")


async def test_decorated_async_function(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2)
    policy = reskit.Policy("decorated-async", breaker=breaker)
    ran = 0

    @policy
    async def fetch(fail: bool) -> str:
        nonlocal ran
        ran += 1
        await asyncio.sleep(0)
        if fail:
            raise Down("down")
        return "fetched"

    assert await fetch(False) == "fetched"
    for _ in range(2):
        with pytest.raises(Down):
            await fetch(True)
    with pytest.raises(CircuitOpen):
        await fetch(False)
    assert ran == 3


def test_single_strategy_decorator(clock: FakeClock) -> None:
    policy = reskit.circuit_breaker(fail_max=1, reset_timeout=10, name="single")
    assert isinstance(policy.breaker, CircuitBreaker)
    dep = Calls()
    failures(policy, dep.fail, 1)
    with pytest.raises(CircuitOpen):
        policy.call(dep.ok)
    assert policy.breaker.state is BreakerState.OPEN


# -- generators --------------------------------------------------------------------------------


def test_failures_inside_sync_generators_are_counted(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=10)
    policy = reskit.Policy("stream", breaker=breaker)

    @policy
    def rows(fail_after: int | None) -> Iterator[int]:
        for i in range(3):
            if fail_after is not None and i == fail_after:
                raise Down("connection lost mid-stream")
            yield i

    assert list(rows(None)) == [0, 1, 2]
    for _ in range(2):
        got: list[int] = []
        with pytest.raises(Down):
            got.extend(rows(1))
        assert got == [0]
    assert breaker.state is BreakerState.OPEN
    assert breaker.fail_counter == 2
    with pytest.raises(CircuitOpen):
        next(rows(None))


async def test_failures_inside_async_generators_are_counted(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=10)
    policy = reskit.Policy("astream", breaker=breaker)

    @policy
    async def rows(fail_after: int | None) -> AsyncIterator[int]:
        for i in range(3):
            if fail_after is not None and i == fail_after:
                raise Down("connection lost mid-stream")
            await asyncio.sleep(0)
            yield i

    assert [i async for i in rows(None)] == [0, 1, 2]
    for _ in range(2):
        got: list[int] = []
        with pytest.raises(Down):
            await drain(rows(2), got)
        assert got == [0, 1]
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await rows(None).__anext__()


def test_a_generator_is_one_sample_for_its_whole_iteration(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, half_open_max_calls=1)
    policy = reskit.Policy("stream", breaker=breaker)

    @policy
    def rows() -> Iterator[int]:
        yield from range(3)

    breaker.open()
    clock.advance(5)
    stream = rows()
    assert next(stream) == 0
    # The stream holds the only probe slot until it finishes.
    with pytest.raises(CircuitOpen) as info:
        policy.call(lambda: None)
    assert info.value.retry_after == 0.0
    assert list(stream) == [1, 2]
    assert breaker.state is BreakerState.CLOSED


def test_closing_a_generator_early_is_not_a_failure(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5)
    policy = reskit.Policy("stream", breaker=breaker)

    @policy
    def rows() -> Generator[int, None, None]:
        yield from range(10)

    breaker.open()
    clock.advance(5)
    stream = rows()
    assert next(stream) == 0
    stream.close()  # GeneratorExit inside the generator
    assert breaker.state is not BreakerState.OPEN
    assert breaker.fail_counter == 0
    assert policy.call(lambda: "next") == "next"  # the probe slot was given back
    assert breaker.state is BreakerState.CLOSED


# -- cancellation and interrupts ------------------------------------------------------------------


async def test_a_cancelled_probe_through_acall_frees_its_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5)
    policy = reskit.Policy("probe", breaker=breaker)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    async def ok() -> str:
        return "ok"

    breaker.open()
    clock.advance(5)
    task = asyncio.create_task(policy.acall(hang))
    await until_started(task, started)
    with pytest.raises(CircuitOpen):
        await policy.acall(ok)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.fail_counter == 0
    assert await policy.acall(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError]
)
def test_interrupts_pass_through_a_policy_uncounted(
    clock: FakeClock, exc_type: type[BaseException]
) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=5)
    policy = reskit.Policy("interrupted", breaker=breaker)

    def interrupted() -> None:
        raise exc_type

    for _ in range(3):
        with pytest.raises(exc_type):
            policy.call(interrupted)
    # Two Ctrl-C's open a pybreaker with fail_max=2; here they count for nothing.
    assert breaker.state is BreakerState.CLOSED
    assert breaker.fail_counter == 0

    breaker.open()
    clock.advance(5)
    with pytest.raises(exc_type):
        policy.call(interrupted)
    assert breaker.state is BreakerState.HALF_OPEN
    assert policy.call(lambda: "probe") == "probe"
    assert breaker.state is BreakerState.CLOSED


async def test_1000_tasks_at_a_half_open_breaker_run_exactly_max_probes(
    clock: FakeClock,
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, half_open_max_calls=3)
    policy = reskit.Policy("herd", breaker=breaker)
    release = asyncio.Event()
    ran = 0

    async def probe() -> str:
        nonlocal ran
        ran += 1
        await release.wait()
        return "ok"

    breaker.open()
    clock.advance(5)
    tasks = [asyncio.create_task(policy.acall(probe)) for _ in range(1000)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert ran == 3
    assert results.count("ok") == 3
    rejections = [r for r in results if isinstance(r, CircuitOpen)]
    assert len(rejections) == 997
    assert {r.retry_after for r in rejections} == {0.0}
    assert breaker.state is BreakerState.CLOSED


# -- retries --------------------------------------------------------------------------------------


def test_an_open_breaker_ends_the_retry_loop(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    policy = reskit.Policy(
        "retried", breaker=breaker, retry=reskit.Retry(attempts=10, on=ConnectionError, wait=0.5)
    )
    dep = Calls()
    with pytest.raises(CircuitOpen) as info:
        policy.call(dep.fail)
    assert dep.count == 2
    assert clock.sleeps == [0.5, 0.5]  # two waits; none for the open breaker
    assert info.value.retry_after == pytest.approx(29.5)


def test_a_retry_waits_for_half_open_when_the_deadline_covers_it(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=1)
    policy = reskit.Policy(
        "patient",
        deadline=5,
        breaker=breaker,
        retry=reskit.Retry(attempts=5, on=ConnectionError, wait=0.25),
    )
    attempts = 0

    def recovers_on_third() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise Down("down")
        return "recovered"

    assert policy.call(recovers_on_third) == "recovered"
    assert attempts == 3
    assert clock.sleeps[:2] == [0.25, 0.25]
    assert clock.sleeps[2] == pytest.approx(0.75)  # what was left of reset_timeout
    assert breaker.state is BreakerState.CLOSED


def test_a_retry_gives_up_when_the_deadline_cannot_cover_retry_after(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60)
    policy = reskit.Policy(
        "hurried",
        deadline=5,
        breaker=breaker,
        retry=reskit.Retry(attempts=5, on=ConnectionError, wait=0.25),
    )
    dep = Calls()
    with pytest.raises(CircuitOpen):
        policy.call(dep.fail)
    assert dep.count == 1
    assert clock.sleeps == [0.25]


def test_each_attempt_is_one_breaker_sample(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=10)
    policy = reskit.Policy(
        "sampled", breaker=breaker, retry=reskit.Retry(attempts=3, on=ConnectionError, wait=0)
    )
    dep = Calls()
    with pytest.raises(Down):
        policy.call(dep.fail)
    assert dep.count == 3
    assert breaker.fail_counter == 3


# -- concurrency through a policy ----------------------------------------------------------------


def test_50_concurrent_calls_through_a_policy_do_not_serialise(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=5)
    policy = reskit.Policy("parallel", breaker=breaker)
    in_flight = threading.Barrier(50)
    results: list[Any] = []

    def slow_call() -> str:
        # Returns only once all 50 calls are inside the protected function at
        # the same time; a lock held across the call would make this time out.
        in_flight.wait(BARRIER_TIMEOUT)
        return "done"

    def worker() -> None:
        try:
            results.append(policy.call(slow_call))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BARRIER_TIMEOUT * 2)
    assert results == ["done"] * 50
    assert breaker.state is BreakerState.CLOSED


# -- telemetry -----------------------------------------------------------------------------


def test_the_transition_is_an_event_on_the_policy_span(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, name="orders-db")
    policy = reskit.Policy("orders", breaker=breaker)
    dep = Calls()
    with SpanCapture() as capture:
        failures(policy, dep.fail, 1)
        with pytest.raises(CircuitOpen):
            policy.call(dep.ok)
    failed, rejected = capture.spans()
    changes = [e for e in failed.events if e.name == "reskit.breaker.state_change"]
    assert [dict(e.attributes) for e in changes] == [
        {
            "reskit.breaker.name": "orders-db",
            "reskit.breaker.from": "closed",
            "reskit.breaker.to": "open",
            "reskit.breaker.reason": "fail_max",
        }
    ]
    assert rejected.attributes["reskit.outcome"] == "rejected"
    assert rejected.attributes["reskit.rejected_by"] == "breaker"
    assert not [e for e in rejected.events if e.name == "reskit.breaker.state_change"]


def test_slow_calls_through_a_policy_follow_the_fake_clock(clock: FakeClock) -> None:
    breaker = CircuitBreaker(slow_call_duration=2.0, window=2, minimum_calls=2)
    policy = reskit.Policy("slow", breaker=breaker)

    def slow() -> str:
        clock.advance(3.0)  # this attempt "took" three seconds
        return "late"

    policy.call(slow)
    policy.call(slow)
    assert breaker.state is BreakerState.OPEN

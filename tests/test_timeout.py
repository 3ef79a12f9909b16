"""Per-attempt timeouts and whole-call deadlines, sync and async, on a fake clock."""

from __future__ import annotations

import asyncio
import threading

import pytest

import reskit
from reskit import Policy, Retry, TimeoutExceeded
from reskit._timeout import grain_for
from reskit.testing import FakeClock


def current_task() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task


# -- async timeouts ---------------------------------------------------------------


async def test_async_attempt_times_out(clock: FakeClock) -> None:
    async def slow() -> str:
        clock.advance(1.5)
        await asyncio.sleep(0)
        return "late"

    with pytest.raises(TimeoutExceeded) as info:
        await Policy("t", timeout=1.0).acall(slow)
    assert info.value.kind == "attempt"
    assert info.value.policy == "t"
    assert info.value.timeout == 1.0
    assert isinstance(info.value, TimeoutError)
    assert current_task().cancelling() == 0


async def test_async_timeout_never_fires_early(clock: FakeClock) -> None:
    async def almost() -> str:
        clock.advance(0.999)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return "ok"

    assert await Policy("t", timeout=1.0).acall(almost) == "ok"


@pytest.mark.parametrize("timeout", [0.01, 0.5, 1.0, 7.3, 120.0])
async def test_async_timeout_fires_within_one_grain(clock: FakeClock, timeout: float) -> None:
    grain = grain_for(timeout)
    assert grain <= max(timeout / 32, 2.0**-10)
    late = timeout + grain

    async def slow() -> str:
        clock.advance(late)
        await asyncio.sleep(0)
        return "late"

    with pytest.raises(TimeoutExceeded):
        await Policy("t", timeout=timeout).acall(slow)


async def test_result_ready_as_timeout_fires_is_kept(clock: FakeClock) -> None:
    """The bucket fires while the coroutine runs its last step: the result wins."""

    async def on_the_dot() -> str:
        clock.advance(1.0)  # fires our expiry synchronously: cancel requested
        return "ok"

    assert await Policy("t", timeout=1.0).acall(on_the_dot) == "ok"
    # Our pending cancellation was absorbed, not left to hit the next await.
    await asyncio.sleep(0)
    assert current_task().cancelling() == 0


@pytest.mark.parametrize("shape", ["one policy", "nested policies"])
async def test_result_ready_as_two_limits_fire_together_is_kept(
    clock: FakeClock, shape: str
) -> None:
    """An attempt timeout capped at the deadline: both fire on the same instant."""

    async def on_the_dot() -> str:
        clock.advance(1.0)
        return "ok"

    if shape == "one policy":
        result = await Policy("t", timeout=1.0, deadline=1.0).acall(on_the_dot)
    else:
        inner = Policy("inner", timeout=1.0)
        result = await Policy("outer", deadline=1.0).acall(inner.acall, on_the_dot)
    assert result == "ok"
    await asyncio.sleep(0)
    assert current_task().cancelling() == 0


async def test_external_cancel_on_the_dot_of_two_limits_is_not_absorbed(
    clock: FakeClock,
) -> None:
    async def finishing() -> str:
        clock.advance(1.0)
        current_task().cancel()
        return "ok"

    with pytest.raises(asyncio.CancelledError):
        await Policy("t", timeout=1.0, deadline=1.0).acall(finishing)
    current_task().uncancel()
    assert current_task().cancelling() == 0


async def test_a_new_fake_clock_never_reuses_an_old_clocks_timer_bucket() -> None:
    """Buckets live on one clock: a bucket armed under a FakeClock that was
    uninstalled before it fired must not swallow the next clock's timeouts."""

    async def fast() -> str:
        return "fast"

    with FakeClock():
        assert await Policy("t", timeout=5.0).acall(fast) == "fast"

    with FakeClock() as clock:  # the same start time: the same bucket keys

        async def slow() -> str:
            clock.advance(10.0)
            await asyncio.sleep(0)
            return "late"

        with pytest.raises(TimeoutExceeded):
            await Policy("t", timeout=5.0).acall(slow)


async def test_external_cancel_is_never_swallowed_even_when_timeout_fires(
    clock: FakeClock,
) -> None:
    async def both() -> str:
        clock.advance(2.0)  # our timeout fires
        current_task().cancel()  # and somebody cancels us too
        await asyncio.sleep(0)
        return "late"

    with pytest.raises(asyncio.CancelledError):
        await Policy("t", timeout=1.0).acall(both)
    assert current_task().uncancel() == 0


async def test_external_cancel_on_the_dot_is_not_absorbed(clock: FakeClock) -> None:
    async def finishing() -> str:
        clock.advance(1.0)
        current_task().cancel()
        return "ok"

    with pytest.raises(asyncio.CancelledError):
        await Policy("t", timeout=1.0).acall(finishing)
    current_task().uncancel()


async def test_cancellation_from_outside_propagates_and_is_not_retried() -> None:
    calls = 0
    started = asyncio.Event()

    async def hang() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()

    policy = Policy("c", timeout=30.0, retry=Retry(attempts=5, on=lambda exc: True, wait=0))
    task = asyncio.create_task(policy.acall(hang))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


async def test_nested_inner_timeout_is_caught_by_inner_only(clock: FakeClock) -> None:
    inner = Policy("inner", timeout=1.0)
    outer = Policy("outer", timeout=5.0)

    async def slow() -> None:
        clock.advance(2.0)
        await asyncio.sleep(0)

    async def nested() -> str:
        with pytest.raises(TimeoutExceeded) as info:
            await inner.acall(slow)
        assert info.value.policy == "inner"
        await asyncio.sleep(0)  # a leaked cancellation would land here
        return "outer survived"

    assert await outer.acall(nested) == "outer survived"
    assert current_task().cancelling() == 0


async def test_nested_outer_timeout_passes_through_inner(clock: FakeClock) -> None:
    inner = Policy("inner", timeout=10.0)
    outer = Policy("outer", timeout=1.0)

    async def slow() -> None:
        clock.advance(2.0)
        await asyncio.sleep(0)

    async def nested() -> None:
        await inner.acall(slow)

    with pytest.raises(TimeoutExceeded) as info:
        await outer.acall(nested)
    assert info.value.policy == "outer"
    assert current_task().cancelling() == 0


async def test_nested_timeouts_firing_together_are_reported_once_by_the_outer(
    clock: FakeClock,
) -> None:
    inner = Policy("inner", timeout=1.0)
    outer = Policy("outer", timeout=1.0)

    async def slow() -> None:
        clock.advance(3.0)
        await asyncio.sleep(0)

    async def nested() -> None:
        await inner.acall(slow)

    with pytest.raises(TimeoutExceeded) as info:
        await outer.acall(nested)
    assert info.value.policy == "outer"
    assert current_task().cancelling() == 0


async def test_attempt_timeouts_are_retried(clock: FakeClock) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            clock.advance(2.0)
            await asyncio.sleep(0)
        return "ok"

    policy = Policy("r", timeout=1.0, retry=Retry(attempts=3, on=TimeoutError, wait=0.1))
    assert await policy.acall(flaky) == "ok"
    assert calls == 3


async def test_async_deadline_spans_attempts_and_is_never_retried(clock: FakeClock) -> None:
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        clock.advance(0.9)
        await asyncio.sleep(0)
        raise ConnectionError("down")

    policy = Policy("d", timeout=1.0, deadline=2.0, retry=Retry(attempts=10, on=Exception, wait=0))
    with pytest.raises((TimeoutExceeded, ConnectionError)) as info:
        await policy.acall(slow)
    # Attempts at t=0.0 and 0.9 fail; the third starts at 1.8 and is cut at 2.0.
    assert calls == 3
    assert isinstance(info.value, TimeoutExceeded)
    assert info.value.kind == "deadline"


async def test_inner_timeout_shrinks_to_outer_deadline(clock: FakeClock) -> None:
    seen: list[float | None] = []

    async def work() -> None:
        seen.append(reskit.remaining_deadline())
        clock.advance(3.0)
        await asyncio.sleep(0)

    inner = Policy("inner", timeout=10.0)

    async def outer_body() -> None:
        await inner.acall(work)

    with pytest.raises(TimeoutExceeded) as info:
        await Policy("outer", deadline=2.0).acall(outer_body)
    assert info.value.kind == "deadline"
    assert seen == [2.0]


async def test_expired_outer_deadline_rejects_before_running(clock: FakeClock) -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1

    async def outer_body() -> None:
        clock.advance(5.0)
        await Policy("inner").acall(fn)

    with pytest.raises(TimeoutExceeded):
        await Policy("outer", deadline=1.0).acall(outer_body)
    assert calls == 0


async def test_many_tasks_time_out_independently(clock: FakeClock) -> None:
    policy = Policy("many", timeout=1.0)
    release = asyncio.Event()

    async def fast(i: int) -> int:
        return i

    async def slow(i: int) -> int:
        await release.wait()
        return i

    fast_results = await asyncio.gather(*(policy.acall(fast, i) for i in range(250)))
    tasks = [asyncio.create_task(policy.acall(slow, i)) for i in range(250)]
    await asyncio.sleep(0)
    clock.advance(1.1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert fast_results == list(range(250))
    assert sum(isinstance(r, TimeoutExceeded) for r in results) == 250


# -- sync timeouts ----------------------------------------------------------------


def test_sync_timeout_returns_on_time_and_the_thread_runs_on(clock: FakeClock) -> None:
    gate = threading.Event()
    finished = threading.Event()

    def slow() -> str:
        clock.advance(2.0)
        gate.wait(10)
        finished.set()
        return "late"

    with pytest.raises(TimeoutExceeded) as info:
        Policy("s", timeout=1.0).call(slow)
    assert info.value.kind == "attempt"
    assert not finished.is_set()  # the caller did not wait for the attempt
    gate.set()
    assert finished.wait(10)  # the abandoned attempt ran on


def test_sync_timeout_result_within_time(clock: FakeClock) -> None:
    def quick() -> str:
        clock.advance(0.999)
        return "ok"

    assert Policy("s", timeout=1.0).call(quick) == "ok"


def test_sync_timeout_reraises_the_attempts_exception() -> None:
    def broken() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        Policy("s", timeout=5.0).call(broken)


def test_sync_timeout_worker_sees_context(clock: FakeClock) -> None:
    seen: dict[str, object] = {}

    def work() -> None:
        seen["cid"] = reskit.correlation_id()
        seen["left"] = reskit.remaining_deadline()
        seen["thread"] = threading.current_thread().name

    with reskit.bind_correlation_id("req-42"):
        Policy("s", timeout=1.5, deadline=4.0).call(work)
    assert seen["cid"] == "req-42"
    assert seen["left"] == 1.5
    assert str(seen["thread"]).startswith("reskit-timeout-")


def test_sync_timeouts_retry_per_attempt(clock: FakeClock) -> None:
    calls = 0
    gate = threading.Event()

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            clock.advance(2.0)
            gate.wait(10)
        return "ok"

    policy = Policy("s", timeout=1.0, retry=Retry(attempts=2, on=TimeoutError, wait=0))
    try:
        assert policy.call(flaky) == "ok"
    finally:
        gate.set()
    assert calls == 2


def test_hung_attempts_do_not_starve_later_calls(clock: FakeClock) -> None:
    gate = threading.Event()

    def hang() -> None:
        clock.advance(1.0)
        gate.wait(10)

    policy = Policy("s", timeout=0.5)
    try:
        for _ in range(20):
            with pytest.raises(TimeoutExceeded):
                policy.call(hang)
        assert policy.call(lambda: "still served") == "still served"
    finally:
        gate.set()


def test_sync_deadline_is_cooperative(clock: FakeClock) -> None:
    calls = 0

    def failing() -> None:
        nonlocal calls
        calls += 1
        clock.advance(0.7)
        raise ConnectionError("down")

    policy = Policy("d", deadline=2.0, retry=Retry(attempts=10, on=ConnectionError, wait=0.2))
    with pytest.raises(ConnectionError) as info:
        policy.call(failing)
    # t=0 fail (0.7), wait .2, t=.9 fail (1.6), a wait of .2 would end at 1.8 < 2: third
    # attempt at 1.8 fails at 2.5; no time is left for another.
    assert calls == 3
    assert any("deadline" in note for note in info.value.__notes__)


def test_sync_deadline_already_spent_rejects_nested_call(clock: FakeClock) -> None:
    def body() -> None:
        clock.advance(3.0)
        Policy("inner").call(lambda: None)

    with pytest.raises(TimeoutExceeded) as info:
        Policy("outer", deadline=1.0).call(body)
    assert info.value.kind == "deadline"


def test_remaining_deadline_nests_to_the_tighter(clock: FakeClock) -> None:
    seen: list[float | None] = []

    def innermost() -> None:
        seen.append(reskit.remaining_deadline())
        clock.advance(0.5)
        seen.append(reskit.remaining_deadline())

    def middle() -> None:
        seen.append(reskit.remaining_deadline())
        Policy("inner", deadline=10.0).call(innermost)
        seen.append(reskit.remaining_deadline())

    assert reskit.remaining_deadline() is None
    Policy("outer", deadline=3.0).call(middle)
    assert seen == [3.0, 3.0, 2.5, 2.5]
    assert reskit.remaining_deadline() is None


def test_remaining_deadline_never_negative(clock: FakeClock) -> None:
    def over() -> float | None:
        clock.advance(10)
        return reskit.remaining_deadline()

    assert Policy("o", deadline=1.0).call(over) == 0.0


# -- construction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": -1}, "timeout must be > 0"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"deadline": -0.5}, "deadline must be > 0"),
        ({"timeout": float("nan")}, "finite"),
        ({"timeout": float("inf")}, "finite"),
        ({"timeout": "1"}, "number of seconds or a timedelta"),
        ({"timeout": 5.0, "deadline": 2.0}, "shorter than its attempt timeout"),
    ],
)
def test_invalid_timeouts_raise_at_construction(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Policy("bad", **kwargs)  # type: ignore[arg-type]


def test_timedelta_accepted() -> None:
    from datetime import timedelta

    policy = Policy("td", timeout=timedelta(milliseconds=1500), deadline=timedelta(seconds=3))
    assert policy.timeout == 1.5
    assert policy.deadline == 3.0


def test_sync_generator_rejects_timeout() -> None:
    def numbers():  # type: ignore[no-untyped-def]
        yield 1

    with pytest.raises(TypeError, match="sync generator"):
        Policy("g", timeout=1.0)(numbers)

"""Retries: decisions, jitter, tenacity vocabulary, budgets, what is never retried."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

import reskit
from reskit import (
    BulkheadFull,
    CircuitOpen,
    KillSwitchOff,
    Policy,
    Retry,
    RetryBudget,
    RetryBudgetExhausted,
    Shed,
    TimeoutExceeded,
)
from reskit.testing import FakeClock, set_testing


def failing(times: int, exc: Callable[[], BaseException] = lambda: ValueError("boom")) -> Any:
    """A function failing ``times`` times, then returning its call count."""
    calls = 0

    def fn() -> int:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise exc()
        return calls

    fn.calls = lambda: calls  # type: ignore[attr-defined]
    return fn


def test_retries_until_success(clock: FakeClock) -> None:
    fn = failing(2)
    assert Policy("r", retry=Retry(attempts=3, on=ValueError)).call(fn) == 3
    assert len(clock.sleeps) == 2


def test_last_exception_reraised_with_note(clock: FakeClock) -> None:
    fn = failing(10)
    with pytest.raises(ValueError, match="boom") as info:
        Policy("r", retry=Retry(attempts=3, on=ValueError)).call(fn)
    assert fn.calls() == 3
    assert info.value.__notes__ == ["reskit: policy 'r' gave up after 3 attempt(s)"]


def test_exception_not_matching_on_is_not_retried(clock: FakeClock) -> None:
    fn = failing(1, lambda: KeyError("k"))
    with pytest.raises(KeyError):
        Policy("r", retry=Retry(attempts=3, on=ValueError)).call(fn)
    assert fn.calls() == 1
    assert clock.sleeps == []


def test_on_accepts_tuple_and_predicate(clock: FakeClock) -> None:
    assert Policy("r", retry=Retry(on=(KeyError, ValueError))).call(failing(2)) == 3
    only_transient = Retry(on=lambda exc: "transient" in str(exc))
    assert Policy("r", retry=only_transient).call(failing(1, lambda: OSError("transient"))) == 2
    with pytest.raises(OSError, match="fatal"):
        Policy("r", retry=only_transient).call(failing(1, lambda: OSError("fatal")))


@pytest.mark.parametrize(
    "exc",
    [KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit],
)
def test_base_exceptions_pass_through_untouched(clock: FakeClock, exc: type) -> None:
    fn = failing(5, exc)
    # Even a predicate that says "retry everything" cannot retry these.
    with pytest.raises(exc) as info:
        Policy("r", retry=Retry(attempts=5, on=lambda e: True)).call(fn)
    assert fn.calls() == 1
    assert not getattr(info.value, "__notes__", None)


@pytest.mark.parametrize(
    "rejection",
    [
        BulkheadFull("full", policy="x", retry_after=0.1),
        KillSwitchOff("off", policy="x"),
        Shed("shed", policy="x"),
        CircuitOpen("open", policy="x", retry_after=1.0),  # no deadline: never retried
    ],
)
def test_our_rejections_are_never_retried(clock: FakeClock, rejection: Exception) -> None:
    fn = failing(5, lambda: rejection)
    with pytest.raises(type(rejection)):
        Policy("r", retry=Retry(attempts=5, on=Exception)).call(fn)
    assert fn.calls() == 1


def test_open_breaker_retried_when_deadline_covers_retry_after(clock: FakeClock) -> None:
    fn = failing(1, lambda: CircuitOpen("open", policy="x", retry_after=2.0))
    policy = Policy("r", deadline=5.0, retry=Retry(attempts=3, on=Exception))
    assert policy.call(fn) == 2
    assert clock.sleeps[0] >= 2.0


def test_open_breaker_not_retried_past_deadline(clock: FakeClock) -> None:
    fn = failing(1, lambda: CircuitOpen("open", policy="x", retry_after=9.0))
    policy = Policy("r", deadline=5.0, retry=Retry(attempts=3, on=Exception))
    with pytest.raises(CircuitOpen):
        policy.call(fn)
    assert fn.calls() == 1


def test_deadline_timeout_never_retried(clock: FakeClock) -> None:
    fn = failing(3, lambda: TimeoutExceeded("d", kind="deadline"))
    with pytest.raises(TimeoutExceeded):
        Policy("r", retry=Retry(attempts=5, on=TimeoutError)).call(fn)
    assert fn.calls() == 1


class Throttled(Exception):
    def __init__(self, retry_after: object) -> None:
        super().__init__("429")
        self.retry_after = retry_after


def test_retry_after_is_honoured_within_the_deadline(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(3.0))
    policy = Policy("r", deadline=10.0, retry=Retry(attempts=2, on=Throttled, wait_max=0.5))
    assert policy.call(fn) == 2
    assert clock.sleeps == [3.0]


def test_retry_after_is_honoured_up_to_wait_max_without_deadline(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(3.0))
    policy = Policy("r", retry=Retry(attempts=2, on=Throttled, wait_max=4.0))
    assert policy.call(fn) == 2
    assert clock.sleeps == [3.0]


def test_huge_retry_after_without_deadline_gives_up(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(86_400.0))
    with pytest.raises(Throttled) as info:
        Policy("r", retry=Retry(attempts=2, on=Throttled)).call(fn)
    assert fn.calls() == 1
    assert clock.sleeps == []
    assert "exceeds wait_max" in info.value.__notes__[0]


def test_retry_after_beyond_deadline_gives_up(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(30.0))
    policy = Policy("r", deadline=10.0, retry=Retry(attempts=2, on=Throttled))
    with pytest.raises(Throttled) as info:
        policy.call(fn)
    assert fn.calls() == 1
    assert clock.sleeps == []
    assert "deadline" in info.value.__notes__[0]


@pytest.mark.parametrize("bogus", [float("nan"), -1.0, float("inf"), "soon", True])
def test_hostile_retry_after_is_ignored(clock: FakeClock, bogus: object) -> None:
    fn = failing(1, lambda: Throttled(bogus))
    policy = Policy("r", retry=Retry(attempts=2, on=Throttled, wait_max=0.5))
    assert policy.call(fn) == 2
    assert 0 <= clock.sleeps[0] <= 0.5


def test_injected_random_makes_delays_exact(clock: FakeClock) -> None:
    fn = failing(3)
    Policy("r", retry=Retry(attempts=4, on=ValueError, random=random.Random(7))).call(fn)
    expected = random.Random(7)
    assert clock.sleeps == [
        expected.uniform(0, 0.1),
        expected.uniform(0, 0.2),
        expected.uniform(0, 0.4),
    ]


@pytest.mark.parametrize("attempt", [1, 20])
def test_jitter_is_spread_and_capped(attempt: int) -> None:
    retry = Retry(on=Exception, random=random.Random(attempt))
    cap = min(5.0, 0.1 * 2 ** (attempt - 1))
    samples = [retry.backoff(attempt) for _ in range(2000)]
    assert all(0 <= s <= cap for s in samples)
    # Full jitter: uniform over [0, cap]: mean near cap/2, both ends reached.
    assert statistics.fmean(samples) == pytest.approx(cap / 2, rel=0.1)
    assert min(samples) < 0.05 * cap
    assert max(samples) > 0.95 * cap
    assert len(set(samples)) > 1900


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=10**9),
    initial=st.floats(min_value=0, max_value=100, allow_nan=False),
    extra=st.floats(min_value=0, max_value=1000, allow_nan=False),
    seed=st.integers(),
)
def test_backoff_never_exceeds_cap(attempt: int, initial: float, extra: float, seed: int) -> None:
    retry = Retry(
        on=Exception, wait_initial=initial, wait_max=initial + extra, random=random.Random(seed)
    )
    delay = retry.backoff(attempt)
    assert 0 <= delay <= initial + extra


def test_fixed_wait(clock: FakeClock) -> None:
    Policy("r", retry=Retry(attempts=3, on=ValueError, wait=0.25)).call(failing(2))
    assert clock.sleeps == [0.25, 0.25]


def test_tenacity_strategies(clock: FakeClock) -> None:
    fn = failing(10)
    retry = Retry(
        attempts=100,
        wait=tenacity.wait_fixed(0.5),
        retry=tenacity.retry_if_exception_type(ValueError),
        stop=tenacity.stop_after_delay(1.2),
    )
    with pytest.raises(ValueError) as info:
        Policy("t", retry=retry).call(fn)
    # Failures at t=0, 0.5, 1.0 carry on; the one at 1.5 is past 1.2 and stops.
    assert fn.calls() == 4
    assert clock.sleeps == [0.5, 0.5, 0.5]
    assert "stop strategy" in info.value.__notes__[0]


def test_tenacity_wait_random_exponential(clock: FakeClock) -> None:
    retry = Retry(
        attempts=5, on=ValueError, wait=tenacity.wait_random_exponential(multiplier=1, max=3)
    )
    Policy("t", retry=retry).call(failing(4))
    assert len(clock.sleeps) == 4
    assert all(0 <= s <= 3 for s in clock.sleeps)


def test_tenacity_retry_predicate_false_stops(clock: FakeClock) -> None:
    fn = failing(3, lambda: KeyError("x"))
    retry = Retry(attempts=5, retry=tenacity.retry_if_exception_type(ValueError))
    with pytest.raises(KeyError):
        Policy("t", retry=retry).call(fn)
    assert fn.calls() == 1


def test_testing_mode_makes_one_attempt(clock: FakeClock) -> None:
    fn = failing(5)
    with set_testing(True), pytest.raises(ValueError):
        Policy("r", retry=Retry(attempts=5, on=ValueError, wait=3)).call(fn)
    assert fn.calls() == 1
    assert clock.sleeps == []


def test_testing_mode_attempts_and_cap(clock: FakeClock) -> None:
    fn = failing(5)
    with set_testing(True, attempts=3), pytest.raises(ValueError):
        Policy("r", retry=Retry(attempts=10, on=ValueError, wait=3)).call(fn)
    assert fn.calls() == 3
    assert clock.sleeps == []
    capped = failing(5)
    with set_testing(True, attempts=4, cap=True), pytest.raises(ValueError):
        Policy("r", retry=Retry(attempts=2, on=ValueError)).call(capped)
    assert capped.calls() == 2


def test_set_testing_restores() -> None:
    from reskit._config import CONFIG

    with set_testing(True, attempts=2):
        assert CONFIG.testing
        assert CONFIG.testing_attempts == 2
    assert not CONFIG.testing
    assert CONFIG.testing_attempts == 1


async def test_async_retries(clock: FakeClock) -> None:
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("reset")
        return calls

    assert await Policy("a", retry=Retry(on=ConnectionError)).acall(flaky) == 3
    assert len(clock.sleeps) == 2


async def test_cancelled_during_backoff_makes_no_further_attempt(clock: FakeClock) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # delivered at the backoff sleep's yield
        raise ConnectionError("reset")

    with pytest.raises(asyncio.CancelledError):
        await Policy("a", retry=Retry(attempts=5, on=ConnectionError)).acall(flaky)
    assert calls == 1


def test_keyboard_interrupt_during_backoff_sleep(clock: FakeClock) -> None:
    class InterruptingClock(FakeClock):
        def sleep(self, seconds: float) -> None:
            raise KeyboardInterrupt

    fn = failing(5)
    with InterruptingClock(), pytest.raises(KeyboardInterrupt):
        Policy("r", retry=Retry(attempts=5, on=ValueError)).call(fn)
    assert fn.calls() == 1


# -- budget -------------------------------------------------------------------------


def model_budget(calls: int, per_call: int, ratio: float, floor: float) -> tuple[int, int]:
    """(retries allowed, calls refused a retry) when every call fails, computed independently."""
    retries = refused = 0
    for made in range(1, calls + 1):
        for _ in range(per_call):
            if retries + 1 > floor + ratio * made:
                refused += 1
                break
            retries += 1
    return retries, refused


def test_budget_keeps_retries_to_a_fraction_of_calls(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10)
    policy = Policy("b", retry=Retry(attempts=3, on=ValueError, wait=0, budget=budget))
    attempts = 0
    exhausted = 0
    causes: list[BaseException | None] = []

    def down() -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("down")

    for _ in range(100):
        try:
            policy.call(down)
        except RetryBudgetExhausted as exc:
            causes.append(exc.__cause__)
            exhausted += 1
        except ValueError:
            pass
    retries = attempts - 100
    assert (retries, exhausted) == model_budget(100, 2, 0.2, 0.0)
    assert retries == budget.retries == 20
    assert budget.calls == 100
    assert exhausted == 100  # every call wanted a second retry; none could be paid
    assert all(isinstance(cause, ValueError) for cause in causes)


def test_budget_floor_and_window(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=3, window=10)
    assert all(budget._withdraw() for _ in range(30))
    assert not budget._withdraw()
    clock.advance(5)
    assert not budget._withdraw()
    clock.advance(5.5)  # the first second's retries left the window
    assert budget._withdraw()


def test_budget_shared_across_threads_is_exact() -> None:
    import threading

    budget = RetryBudget(ratio=0.5, min_per_second=0, window=60)
    barrier = threading.Barrier(50)
    granted = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(10)
        for _ in range(20):
            budget._deposit()
        mine = sum(budget._withdraw() for _ in range(20))
        with lock:
            granted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(granted) == budget.retries
    assert budget.calls == 1000
    assert sum(granted) <= 500


# -- construction -------------------------------------------------------------------


def test_a_retry_without_a_condition_is_refused_where_it_protects_a_function() -> None:
    # Constructible (reskit.httpx's transports supply the condition), but a policy
    # applied to a function with it raises at once, saying what to add.
    retry = Retry(attempts=3)
    policy = Policy("p", retry=retry)
    with pytest.raises(TypeError, match="Retry needs on="):
        policy(lambda: None)
    with pytest.raises(TypeError, match="Retry needs on="):
        reskit.retry(attempts=3)(lambda: None)

    async def coroutine() -> None:
        pass

    with pytest.raises(TypeError, match="Retry needs on="):
        policy(coroutine)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attempts": 0, "on": Exception}, ValueError, "attempts must be >= 1"),
        ({"attempts": -3, "on": Exception}, ValueError, "attempts must be >= 1"),
        ({"attempts": 2.5, "on": Exception}, TypeError, "attempts must be an int"),
        ({"on": "ValueError"}, TypeError, "on= must be an exception type"),
        ({"on": ()}, TypeError, "non-empty tuple"),
        ({"on": Exception, "wait_initial": 2, "wait_max": 1}, ValueError, "wait_max"),
        ({"on": Exception, "wait": -1}, ValueError, "wait must be >= 0"),
        ({"on": Exception, "stop": 3}, TypeError, "tenacity stop strategy"),
        (
            {"on": Exception, "retry": tenacity.retry_if_exception_type(ValueError)},
            TypeError,
            "not both",
        ),
        ({"on": Exception, "budget": 0.2}, TypeError, "RetryBudget"),
    ],
)
def test_invalid_retry_raises_at_construction(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Retry(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, "ratio must be between 0 and 1"),
        ({"min_per_second": -1}, "min_per_second must be >= 0"),
        ({"window": 0.5}, "at least 1 second"),
    ],
)
def test_invalid_budget(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(**kwargs)

"""Retries at their edges: every threshold at the value where the decision flips.

The retry budget's window slides on the fake clock one second at a time; the
``Retry`` tests build the values reskit's own messages recommend
(``attempts=1``), waits that end exactly at the deadline, ``Retry-After``
equal to the wait, to ``wait_max`` and to zero, and check what tenacity
strategies are handed (``idle_for``, ``upcoming_sleep``, the outcome).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import tenacity

from reskit import CircuitOpen, Policy, Retry, RetryBudget, RetryBudgetExhausted
from reskit.testing import FakeClock, set_testing

MAX_WAIT = threading.TIMEOUT_MAX


class Throttled(Exception):
    def __init__(self, retry_after: object) -> None:
        super().__init__("429")
        self.retry_after = retry_after


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


def down() -> None:
    raise ValueError("down")


# -- the retry budget ---------------------------------------------------------------------


def spend(policy: Policy) -> str:
    """One call that fails twice; what the budget let it do."""
    try:
        policy.call(down)
    except RetryBudgetExhausted:
        return "refused"
    except ValueError:
        return "retried"
    raise AssertionError("down() never returns")


def budget_policy(budget: RetryBudget) -> Policy:
    return Policy("budget", retry=Retry(attempts=2, on=ValueError, wait=0, budget=budget))


def test_the_budget_floor_slides_one_second_at_a_time(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1, window=3)
    policy = budget_policy(budget)
    # Three retries a window; all spent in the first second.
    assert [spend(policy) for _ in range(4)] == ["retried"] * 3 + ["refused"]
    assert budget.retries == 3
    for _ in range(2):
        clock.advance(1.0)  # the first second is still in the window
        assert spend(policy) == "refused"
        assert budget.retries == 3
    clock.advance(1.0)  # three seconds on: the first second left, exactly now
    assert budget.retries == 0
    assert spend(policy) == "retried"
    assert budget.retries == 1


def test_the_budget_window_forgets_each_second_separately(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1, window=3)
    policy = budget_policy(budget)
    assert spend(policy) == "retried"  # second 0
    clock.advance(1.0)
    assert [spend(policy), spend(policy)] == ["retried", "retried"]  # second 1
    clock.advance(1.0)
    assert spend(policy) == "refused"  # second 2: 3 of 3 spent
    clock.advance(1.0)  # second 0 left: one retry is free again
    assert [spend(policy), spend(policy)] == ["retried", "refused"]
    assert budget.retries == 3
    clock.advance(1.0)  # second 1 left: two more
    assert budget.retries == 1
    assert [spend(policy), spend(policy), spend(policy)] == ["retried", "retried", "refused"]


def test_the_budget_counts_calls_per_second_and_forgets_them(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=2)
    ok = Policy("calls", retry=Retry(attempts=2, on=ValueError, wait=0, budget=budget))
    for _ in range(4):
        ok.call(lambda: None)
    assert budget.calls == 4
    clock.advance(1.0)
    ok.call(lambda: None)
    assert budget.calls == 5
    clock.advance(1.0)  # the four calls of the first second left together
    assert budget.calls == 1
    clock.advance(1.0)
    assert budget.calls == 0
    # Two calls pay for one retry (ratio 0.5): each failing call deposits first.
    policy = budget_policy(budget)
    assert [spend(policy), spend(policy)] == ["refused", "retried"]
    assert (budget.calls, budget.retries) == (2, 1)
    clock.advance(2.0)
    assert (budget.calls, budget.retries) == (0, 0)


def test_retries_spent_in_one_second_leave_the_window_together(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=2, window=2)
    policy = budget_policy(budget)
    assert [spend(policy) for _ in range(5)] == ["retried"] * 4 + ["refused"]
    clock.advance(2.0)
    assert budget.retries == 0
    assert [spend(policy) for _ in range(5)] == ["retried"] * 4 + ["refused"]


def test_a_long_quiet_spell_empties_the_budget_window(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=3)
    ok = Policy("calls", retry=Retry(attempts=2, on=ValueError, budget=budget))
    for _ in range(3):
        ok.call(lambda: None)
        clock.advance(1.0)
    assert budget.calls == 2
    clock.advance(100.0)
    assert (budget.calls, budget.retries) == (0, 0)


def test_the_budget_pays_exactly_up_to_its_allowance(clock: FakeClock) -> None:
    # 2 retries a window plus 0.5 a call; a call deposits before it asks for its retry.
    # The fifth asks for 5 of 4.5 (refused), the sixth for 5 of 5 (paid).
    budget = RetryBudget(ratio=0.5, min_per_second=1, window=2)
    policy = budget_policy(budget)
    assert [spend(policy) for _ in range(6)] == ["retried"] * 4 + ["refused", "retried"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ratio": True}, ValueError, "ratio must be between 0 and 1"),
        ({"ratio": "0.5"}, ValueError, "ratio must be between 0 and 1"),
        ({"ratio": -0.1}, ValueError, "ratio must be between 0 and 1"),
        ({"min_per_second": True}, ValueError, "min_per_second must be >= 0"),
        ({"min_per_second": "3"}, ValueError, "min_per_second must be >= 0"),
        ({"window": 0.999}, ValueError, "window must be at least 1 second"),
        ({"window": "10"}, TypeError, "^RetryBudget window must be"),
        ({"window": 10**9}, ValueError, "^RetryBudget window must be at most"),
    ],
)
def test_budget_arguments_out_of_range(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RetryBudget(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"ratio": 0}, {"ratio": 1}, {"min_per_second": 0}, {"window": 1}]
)
def test_budget_arguments_at_their_limits_are_accepted(kwargs: dict[str, Any]) -> None:
    budget = RetryBudget(**kwargs)
    assert getattr(budget, next(iter(kwargs))) == next(iter(kwargs.values()))


def test_budget_window_accepts_a_timedelta(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1, window=timedelta(seconds=2))
    assert budget.window == 2.0
    policy = budget_policy(budget)
    assert [spend(policy) for _ in range(3)] == ["retried", "retried", "refused"]


def test_budget_exhausted_names_the_policy_and_chains_the_failure(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0)
    with pytest.raises(RetryBudgetExhausted) as info:
        budget_policy(budget).call(down)
    assert info.value.policy == "budget"
    assert isinstance(info.value.__cause__, ValueError)


def test_budget_exhausted_on_a_result_has_no_cause(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0)
    policy = Policy("budget", retry=Retry(attempts=2, on_result=lambda r: r is None, budget=budget))
    with pytest.raises(RetryBudgetExhausted) as info:
        policy.call(lambda: None)
    assert info.value.__cause__ is None
    assert info.value.policy == "budget"


# -- attempts -----------------------------------------------------------------------------


def test_attempts_one_makes_exactly_one_attempt(clock: FakeClock) -> None:
    fn = failing(5)
    with pytest.raises(ValueError, match="boom") as info:
        Policy("one", retry=Retry(attempts=1, on=ValueError)).call(fn)
    assert fn.calls() == 1
    assert clock.sleeps == []
    assert info.value.__notes__ == ["reskit: policy 'one' gave up after 1 attempt(s)"]


def test_the_default_is_three_attempts(clock: FakeClock) -> None:
    fn = failing(5)
    retry = Retry(on=ValueError, wait=0)
    assert retry.attempts == 3
    with pytest.raises(ValueError, match="boom"):
        Policy("three", retry=retry).call(fn)
    assert fn.calls() == 3


def test_a_stop_strategy_alone_lifts_the_default_attempt_count(clock: FakeClock) -> None:
    fn = failing(5)
    retry = Retry(on=ValueError, wait=0, stop=tenacity.stop_after_attempt(10))
    assert retry.attempts is None
    assert Policy("stop", retry=retry).call(fn) == 6


def test_stop_after_attempt_decides_alone(clock: FakeClock) -> None:
    fn = failing(10)
    with pytest.raises(ValueError, match="boom"):
        Policy(
            "stop", retry=Retry(on=ValueError, wait=0, stop=tenacity.stop_after_attempt(5))
        ).call(fn)
    assert fn.calls() == 5


@pytest.mark.parametrize(
    ("attempts", "message"),
    [(0, "attempts must be >= 1"), (True, "attempts must be an int")],
)
def test_attempts_out_of_range(attempts: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Retry(attempts=attempts, on=ValueError)  # type: ignore[arg-type]


# -- waits, deadlines, retry_after ---------------------------------------------------------


def test_a_wait_ending_exactly_at_the_deadline_is_not_taken(clock: FakeClock) -> None:
    fn = failing(5)
    policy = Policy("edge", deadline=2.0, retry=Retry(attempts=5, on=ValueError, wait=1.0))
    with pytest.raises(ValueError, match="boom") as info:
        policy.call(fn)
    assert fn.calls() == 2
    assert clock.sleeps == [1.0]
    assert "deadline leaves no time" in info.value.__notes__[0]


def test_a_wait_ending_just_before_the_deadline_is_taken(clock: FakeClock) -> None:
    fn = failing(1)
    policy = Policy("edge", deadline=2.0, retry=Retry(attempts=5, on=ValueError, wait=1.999))
    assert policy.call(fn) == 2
    assert clock.sleeps == [1.999]


def test_retry_after_equal_to_wait_max_is_honoured(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(5.0))
    assert Policy("r", retry=Retry(attempts=2, on=Throttled, wait_max=5.0)).call(fn) == 2
    assert clock.sleeps == [5.0]


def test_retry_after_equal_to_a_long_fixed_wait_is_not_capped(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(10.0))
    assert Policy("r", retry=Retry(attempts=2, on=Throttled, wait=10.0)).call(fn) == 2
    assert clock.sleeps == [10.0]


def test_retry_after_zero_keeps_the_wait(clock: FakeClock) -> None:
    fn = failing(1, lambda: Throttled(0))
    assert Policy("r", retry=Retry(attempts=2, on=Throttled, wait=0.25)).call(fn) == 2
    assert clock.sleeps == [0.25]


@pytest.mark.parametrize(
    ("retry_after", "slept"), [(0.5, 0.5), (timedelta(seconds=2), 2.0), (3, 3.0)]
)
def test_retry_after_longer_than_the_wait_wins(
    clock: FakeClock, retry_after: object, slept: float
) -> None:
    fn = failing(1, lambda: Throttled(retry_after))
    assert Policy("r", retry=Retry(attempts=2, on=Throttled, wait=0)).call(fn) == 2
    assert clock.sleeps == [slept]


def test_an_open_breaker_is_waited_for_exactly(clock: FakeClock) -> None:
    fn = failing(1, lambda: CircuitOpen("open", policy="x", retry_after=2.0))
    policy = Policy("r", deadline=5.0, retry=Retry(attempts=3, on=Exception, wait=0))
    assert policy.call(fn) == 2
    assert clock.sleeps == [2.0]


def test_a_wait_of_the_longest_platform_wait_is_taken(clock: FakeClock) -> None:
    fn = failing(1)
    assert (
        Policy("r", retry=Retry(attempts=2, on=ValueError, wait=lambda s: MAX_WAIT)).call(fn) == 2
    )
    assert clock.sleeps == [MAX_WAIT]


def test_a_wait_longer_than_the_platform_allows_gives_up(clock: FakeClock) -> None:
    fn = failing(1)
    retry = Retry(attempts=2, on=ValueError, wait=lambda s: MAX_WAIT * 2)
    with pytest.raises(ValueError, match="boom") as info:
        Policy("r", retry=retry).call(fn)
    assert clock.sleeps == []
    assert "longer than the platform can wait" in info.value.__notes__[0]


def test_a_negative_wait_from_a_strategy_waits_nothing(clock: FakeClock) -> None:
    fn = failing(1)
    assert Policy("r", retry=Retry(attempts=2, on=ValueError, wait=lambda s: -1.0)).call(fn) == 2
    assert clock.sleeps == []


def test_waits_of_the_default_backoff_are_capped_by_wait_max(clock: FakeClock) -> None:
    retry = Retry(attempts=6, on=ValueError, wait_initial=1, wait_max=3, random=random.Random(3))
    Policy("r", retry=retry).call(failing(5))
    expected = random.Random(3)
    assert clock.sleeps == [expected.uniform(0, cap) for cap in (1, 2, 3, 3, 3)]


# -- what tenacity strategies and hooks are handed ----------------------------------------


def test_tenacity_strategies_see_idle_for_and_the_previous_wait(clock: FakeClock) -> None:
    seen: list[tuple[int, float, float, bool]] = []

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        seen.append(
            (state.attempt_number, state.idle_for, state.upcoming_sleep, state.outcome.failed)
        )
        return float(state.attempt_number)

    retry = Retry(attempts=4, on=ValueError, wait=wait, stop=tenacity.stop_never)
    Policy("r", retry=retry).call(failing(3))
    assert seen == [(1, 0.0, 0.0, True), (2, 1.0, 1.0, True), (3, 3.0, 2.0, True)]
    assert clock.sleeps == [1.0, 2.0, 3.0]


def test_tenacity_strategies_see_the_exception_and_the_time_since_start(
    clock: FakeClock,
) -> None:
    seen: list[Any] = []

    def stop(state: tenacity.RetryCallState) -> bool:
        assert state.outcome is not None
        seen.append((type(state.outcome.exception()).__name__, state.seconds_since_start))
        return False

    policy = Policy("r", retry=Retry(attempts=3, on=ValueError, wait=0.5, stop=stop))
    clock.advance(7.0)
    assert policy.call(failing(2)) == 3
    assert seen == [("ValueError", 0.0), ("ValueError", 0.5)]


def test_a_result_reaches_tenacity_as_a_result(clock: FakeClock) -> None:
    seen: list[tuple[Any, bool, int]] = []
    results = iter([None, None, "done"])

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        seen.append((state.outcome.result(), state.outcome.failed, state.attempt_number))
        return 0.0

    retry = Retry(attempts=5, retry=tenacity.retry_if_result(lambda r: r is None), wait=wait)
    assert Policy("r", retry=retry).call(lambda: next(results)) == "done"
    assert seen == [(None, False, 1), (None, False, 2)]


def test_a_result_reaches_on_result_and_the_wait_strategy(clock: FakeClock) -> None:
    waits: list[Any] = []
    results = iter([1, 2, 3])

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        waits.append(state.outcome.result())
        return 0.0

    retry = Retry(attempts=5, on_result=lambda r: r < 3, wait=wait)
    assert Policy("r", retry=retry).call(lambda: next(results)) == 3
    assert waits == [1, 2]


def test_stop_before_delay_sees_the_upcoming_wait(clock: FakeClock) -> None:
    fn = failing(5)
    retry = Retry(on=ValueError, wait=2.0, stop=tenacity.stop_before_delay(5))
    with pytest.raises(ValueError, match="boom") as info:
        Policy("r", retry=retry).call(fn)
    # 0 -> 2 -> 4: a third wait would end at 6, past 5.
    assert clock.sleeps == [2.0, 2.0]
    assert "(stop strategy)" in info.value.__notes__[0]


@pytest.mark.parametrize("given", ["stop", "retry", "wait"])
def test_a_tenacity_strategy_measures_time_from_the_call(clock: FakeClock, given: str) -> None:
    since: list[float | None] = []

    def record(state: tenacity.RetryCallState) -> Any:
        since.append(state.seconds_since_start)
        return {"stop": False, "retry": True, "wait": 0.0}[given]

    kwargs: dict[str, Any] = {"attempts": 2, "wait": 0, given: record}
    if given != "retry":
        kwargs["on"] = ValueError
    clock.advance(50.0)
    Policy("r", retry=Retry(**kwargs)).call(failing(1))
    assert since[0] == 0.0


def test_on_retry_details(clock: FakeClock) -> None:
    details: list[Any] = []
    results = iter([ValueError("a"), None, "ok"])

    def fn() -> Any:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return value

    retry = Retry(
        attempts=4,
        on=ValueError,
        on_result=lambda r: r is None,
        wait=lambda s: float(s.attempt_number),
        on_retry=details.append,
    )
    assert Policy("hooked", retry=retry).call(fn) == "ok"
    first, second = details
    assert (first.policy, first.attempt, first.wait, first.waited_so_far) == ("hooked", 1, 1.0, 0.0)
    assert isinstance(first.exception, ValueError)
    assert first.result is None
    assert (second.policy, second.attempt, second.wait, second.waited_so_far) == (
        "hooked",
        2,
        2.0,
        1.0,
    )
    assert second.exception is None


def test_a_failing_on_retry_hook_is_reported_and_ignored(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(details: Any) -> None:
        raise RuntimeError("hook broke")

    with caplog.at_level(logging.ERROR, logger="reskit"):
        retry = Retry(attempts=2, on=ValueError, wait=0, on_retry=hook)
        assert Policy("hooked", retry=retry).call(failing(1)) == 2
    assert "the on_retry hook of policy 'hooked'" in caplog.text
    assert "hook broke" in caplog.text


# -- testing mode -------------------------------------------------------------------------


def test_testing_mode_without_cap_makes_its_own_attempt_count(clock: FakeClock) -> None:
    fn = failing(10)
    with set_testing(True, attempts=4), pytest.raises(ValueError, match="boom"):
        Policy("t", retry=Retry(attempts=2, on=ValueError)).call(fn)
    assert fn.calls() == 4


def test_testing_mode_with_cap_and_an_unlimited_retry(clock: FakeClock) -> None:
    fn = failing(10)
    retry = Retry(on=ValueError, stop=tenacity.stop_after_attempt(50))
    with set_testing(True, attempts=3, cap=True), pytest.raises(ValueError, match="boom"):
        Policy("t", retry=retry).call(fn)
    assert fn.calls() == 3
    assert clock.sleeps == []


# -- async strategies and the flows --------------------------------------------------------


async def test_async_predicates_decide(clock: FakeClock) -> None:
    async def transient(exc: Exception) -> bool:
        return "transient" in str(exc)

    async def call(fn: Any) -> Any:
        return await fn()

    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("transient")
        if attempts == 2:
            raise OSError("fatal")
        return attempts

    policy = Policy("a", retry=Retry(attempts=5, on=transient, wait=0))
    with pytest.raises(OSError, match="fatal"):
        await policy.acall(flaky)
    assert attempts == 2


async def test_async_on_result_and_hook_see_real_values(clock: FakeClock) -> None:
    seen: list[Any] = []

    async def more(result: int) -> bool:
        return result < 3

    async def hook(details: Any) -> None:
        seen.append((details.attempt, details.result))

    results = iter([1, 2, 3])

    async def fn() -> int:
        return next(results)

    policy = Policy("a", retry=Retry(attempts=5, on_result=more, wait=0, on_retry=hook))
    assert await policy.acall(fn) == 3
    assert seen == [(1, 1), (2, 2)]


async def test_an_async_hook_that_raises_is_reported_and_the_retry_goes_on(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def hook(details: Any) -> None:
        raise RuntimeError("async hook broke")

    attempts = 0

    async def fn() -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ValueError("boom")
        return attempts

    with caplog.at_level(logging.ERROR, logger="reskit"):
        policy = Policy("a", retry=Retry(attempts=5, on=ValueError, wait=0, on_retry=hook))
        assert await policy.acall(fn) == 3
    assert "async hook broke" in caplog.text


def test_a_sync_call_refuses_a_strategy_that_returns_an_awaitable(clock: FakeClock) -> None:
    async def answer() -> bool:
        return True

    made: list[Any] = []

    def predicate(exc: Exception) -> Any:
        made.append(answer())
        return made[-1]

    with pytest.raises(TypeError, match="returned an awaitable"):
        Policy("s", retry=Retry(attempts=2, on=predicate)).call(failing(1))
    assert made[0].cr_frame is None  # closed, so never "never awaited"


@pytest.mark.parametrize(
    "part",
    ["on", "on_result", "on_retry", "wait", "stop", "retry"],
)
def test_a_sync_function_refuses_async_strategies(clock: FakeClock, part: str) -> None:
    async def strategy(value: Any) -> Any:
        return False

    kwargs: dict[str, Any] = {part: strategy}
    if part not in ("on", "on_result", "retry"):
        kwargs["on"] = ValueError
    retry = Retry(**kwargs)
    with pytest.raises(TypeError, match="async strategies or hooks"):
        Policy("s", retry=retry).call(lambda: 1)


def test_sync_strategies_and_exception_types_are_not_async(clock: FakeClock) -> None:
    retry = Retry(
        on=(ValueError, KeyError),
        on_result=lambda r: False,
        wait=tenacity.wait_fixed(0),
        stop=tenacity.stop_after_attempt(3),
        on_retry=lambda d: None,
    )
    assert Policy("s", retry=retry).call(failing(2)) == 3


def test_a_sync_combination_with_an_async_part_is_refused() -> None:
    async def sometimes(state: Any) -> bool:
        return True

    combined = tenacity.retry_any(tenacity.retry_if_exception_type(ValueError), sometimes)
    with pytest.raises(TypeError, match="retry_any combines an async retry strategy"):
        Retry(retry=combined)
    with pytest.raises(TypeError, match="retry_all combines an async retry strategy"):
        Retry(retry=tenacity.retry_all(sometimes))


async def test_an_async_combination_built_with_or_is_accepted(clock: FakeClock) -> None:
    async def on_none(result: Any) -> bool:
        return result is None

    combined = tenacity.retry_if_exception_type(ValueError) | tenacity.asyncio.retry_if_result(
        on_none
    )
    results = iter([ValueError("x"), None, 7])

    async def fn() -> Any:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return value

    assert await Policy("a", retry=Retry(attempts=5, retry=combined, wait=0)).acall(fn) == 7


def test_retry_if_result_retries_successes(clock: FakeClock) -> None:
    results = iter([None, None, 3])
    retry = Retry(attempts=5, retry=tenacity.retry_if_result(lambda r: r is None), wait=0)
    assert Policy("r", retry=retry).call(lambda: next(results)) == 3


def test_a_combination_with_retry_if_result_retries_successes(clock: FakeClock) -> None:
    results = iter([None, 3])
    combined = tenacity.retry_if_exception_type(ValueError) | tenacity.retry_if_result(
        lambda r: r is None
    )
    assert (
        Policy("r", retry=Retry(attempts=5, retry=combined, wait=0)).call(lambda: next(results))
        == 3
    )


def test_exception_only_tenacity_strategies_return_a_success_at_once(clock: FakeClock) -> None:
    asked: list[Any] = []

    def retry_on(state: tenacity.RetryCallState) -> bool:
        asked.append(state)
        return False

    for strategy in (
        tenacity.retry_if_exception_type(ValueError),
        tenacity.retry_if_exception(lambda e: True)
        | tenacity.retry_if_exception_cause_type(KeyError),
    ):
        assert Policy("r", retry=Retry(retry=strategy)).call(lambda: 5) == 5
    assert Policy("r", retry=Retry(retry=retry_on)).call(lambda: 5) == 5
    assert len(asked) == 1  # a plain callable may look at results; tenacity's own cannot


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"on": ValueError, "on_result": 3}, TypeError, "on_result= must be a predicate"),
        ({"on": ValueError, "on_retry": 3}, TypeError, "on_retry= must be callable"),
        ({"on": ValueError, "random": 3}, TypeError, "random= must be a random.Random"),
        ({"on": ValueError, "wait": int}, TypeError, "wait= must be seconds"),
        ({"on": ValueError, "wait": "1"}, TypeError, "wait= must be seconds"),
        ({"on": ValueError, "stop": int}, TypeError, "Retry stop= must be a tenacity stop"),
        ({"retry": 3}, TypeError, "Retry retry= must be a tenacity retry strategy"),
        ({"retry": 3}, TypeError, r"\(e\.g\. tenacity\.retry_if_exception_type\(OSError\)\), got"),
        (
            {"on": ValueError, "stop": 3},
            TypeError,
            r"\(e\.g\. tenacity\.stop_after_delay\(10\)\), got",
        ),
        ({"on": (ValueError, 3)}, TypeError, "non-empty tuple"),
        ({"on": (3, ValueError)}, TypeError, "non-empty tuple"),
        ({"on": ValueError, "wait_initial": -1}, ValueError, "^Retry wait_initial must"),
        ({"on": ValueError, "wait_max": -1}, ValueError, "^Retry wait_max must"),
        ({"on": ValueError, "wait": -1}, ValueError, "^Retry wait must"),
        ({"on": ValueError, "wait_initial": MAX_WAIT * 2}, ValueError, "^Retry wait_initial "),
        ({"on": ValueError, "wait_max": MAX_WAIT * 2}, ValueError, "^Retry wait_max "),
        ({"on": ValueError, "wait": MAX_WAIT * 2}, ValueError, "^Retry wait "),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Retry(**kwargs)


def test_settings_are_kept_as_given() -> None:
    budget = RetryBudget()
    rng = random.Random(1)

    def hook(details: Any) -> None:
        pass

    def on_result(result: Any) -> bool:
        return False

    stop = tenacity.stop_after_delay(9)
    retry = Retry(
        4,
        ValueError,
        on_result=on_result,
        wait=2,
        wait_initial=0.5,
        wait_max=7,
        stop=stop,
        budget=budget,
        on_retry=hook,
        random=rng,
    )
    assert (retry.attempts, retry.on, retry.on_result, retry.wait) == (4, ValueError, on_result, 2)
    assert (retry.wait_initial, retry.wait_max, retry.stop, retry.retry) == (0.5, 7, stop, None)
    assert (retry.budget, retry.on_retry, retry.random) == (budget, hook, rng)
    strategy = tenacity.retry_if_exception_type(KeyError)
    assert Retry(retry=strategy).retry is strategy


def test_replace_keeps_every_setting_and_a_default_attempt_count() -> None:
    rng = random.Random(1)
    retry = Retry(attempts=5, on=ValueError, wait=1, random=rng, wait_max=9)
    changed = retry.replace(wait=2)
    assert (changed.attempts, changed.on, changed.wait, changed.random, changed.wait_max) == (
        5,
        ValueError,
        2,
        rng,
        9,
    )
    assert retry.wait == 1
    defaulted = Retry(on=ValueError).replace(stop=tenacity.stop_after_attempt(9))
    assert defaulted.attempts is None


def test_replace_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError) as info:
        Retry(on=ValueError).replace(tries=3, delay=1)
    message = str(info.value)
    assert "unknown field(s) delay, tries;" in message
    assert "the fields are attempts, on, on_result, wait, wait_initial, wait_max" in message


def test_repr_shows_what_was_given() -> None:
    assert repr(Retry(on=ValueError)) == "Retry(attempts=3, on=<class 'ValueError'>)"
    stop = tenacity.stop_after_attempt(2)
    strategy = tenacity.retry_if_exception_type(KeyError)

    def on_result(r: Any) -> bool:
        return False

    assert repr(Retry(retry=strategy, stop=stop, wait=1)) == (
        f"Retry(attempts=None, retry={strategy!r}, stop={stop!r}, wait=1)"
    )
    assert repr(Retry(4, on_result=on_result)) == f"Retry(attempts=4, on_result={on_result!r})"


def test_sync_only_filters_refuse_async_predicates() -> None:
    from reskit import Fallback

    async def predicate(exc: Exception) -> bool:
        return True

    with pytest.raises(TypeError, match="it is asked where nothing can be awaited"):
        Fallback(lambda exc: None, on=predicate)
    assert Fallback(lambda exc: None, on=(ValueError,)) is not None
    assert Fallback(lambda exc: None, on=lambda exc: True) is not None


def test_tenacity_strategies_see_the_call_and_the_attempt(clock: FakeClock) -> None:
    seen: list[Any] = []

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        seen.append((state.fn, state.args, state.kwargs, state.outcome.attempt_number))
        return 0.0

    calls = 0

    def fn(a: int, *, b: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ValueError("boom")
        return a + b

    assert Policy("r", retry=Retry(attempts=3, on=ValueError, wait=wait)).call(fn, 1, b=2) == 3
    assert seen == [(fn, (1,), {"b": 2}, 1), (fn, (1,), {"b": 2}, 2)]


def test_a_stop_strategy_sees_the_result_on_result_retries(clock: FakeClock) -> None:
    seen: list[Any] = []
    results = iter([1, 2, 3])

    def stop(state: tenacity.RetryCallState) -> bool:
        assert state.outcome is not None
        seen.append((state.outcome.result(), state.outcome.failed))
        return False

    retry = Retry(attempts=5, on_result=lambda r: r < 3, wait=0, stop=stop)
    assert Policy("r", retry=retry).call(lambda: next(results)) == 3
    assert seen == [(1, False), (2, False)]


def test_a_wait_strategy_sees_the_previous_wait_without_a_stop_strategy(
    clock: FakeClock,
) -> None:
    previous: list[float] = []

    def decorrelated(state: tenacity.RetryCallState) -> float:
        previous.append(state.upcoming_sleep)
        return state.upcoming_sleep * 2 + 1.0

    Policy("r", retry=Retry(attempts=4, on=ValueError, wait=decorrelated)).call(failing(3))
    assert previous == [0.0, 1.0, 3.0]
    assert clock.sleeps == [1.0, 3.0, 7.0]

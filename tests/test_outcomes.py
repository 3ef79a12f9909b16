"""Outcomes, not only exceptions: retrying and breaking on results; hooks; statistics.

The differential tests against tenacity (``test_tenacity_differential.py``)
check each tenacity strategy; here: reskit's own ``on_result``, the breaker's,
how a result-based failure is reported, the ``on_retry`` hook, testing mode's
attempt count and the per-policy statistics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import structlog
import tenacity
import tenacity.asyncio

import reskit
from reskit import CircuitBreaker, Policy, Retry, RetryDetails
from reskit.testing import FakeClock, SpanCapture, set_testing


class Counter:
    """Returns 1, 2, 3, ... on successive calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.calls


# -- Retry(on_result=...) ---------------------------------------------------------------


def test_on_result_retries_while_the_predicate_holds(clock: FakeClock) -> None:
    counter = Counter()
    policy = Policy("r", retry=Retry(5, on_result=lambda n: n < 3, wait=0.5))
    assert policy.call(counter) == 3
    assert counter.calls == 3
    assert clock.sleeps == [0.5, 0.5]


def test_on_result_returns_the_last_result_after_the_last_attempt(clock: FakeClock) -> None:
    counter = Counter()
    policy = Policy("r", retry=Retry(3, on_result=lambda n: True, wait=0))
    assert policy.call(counter) == 3
    stats = policy.statistics
    assert (stats.calls, stats.attempts, stats.retries, stats.failures) == (1, 3, 2, 1)


def test_on_result_alone_does_not_retry_exceptions(clock: FakeClock) -> None:
    calls = []

    def boom() -> None:
        calls.append(1)
        raise ConnectionError

    with pytest.raises(ConnectionError):
        Policy("r", retry=Retry(3, on_result=lambda r: True)).call(boom)
    assert calls == [1]


def test_on_and_on_result_together(clock: FakeClock) -> None:
    answers: list[Any] = [ConnectionError(), "busy", "done"]

    def fn() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    policy = Policy("r", retry=Retry(5, on=ConnectionError, on_result=lambda r: r == "busy"))
    assert policy.call(fn) == "done"
    assert policy.statistics.retries == 2


async def test_async_on_result_predicate_is_awaited(clock: FakeClock) -> None:
    async def busy(result: int) -> bool:
        await asyncio.sleep(0)
        return result < 2

    counter = Counter()

    async def fn() -> int:
        return counter()

    assert await Policy("r", retry=Retry(5, on_result=busy, wait=0)).acall(fn) == 2


async def test_tenacity_asyncio_result_strategy_is_awaited(clock: FakeClock) -> None:
    async def busy(result: int) -> bool:
        return result < 3

    counter = Counter()

    async def fn() -> int:
        return counter()

    strategy = tenacity.asyncio.retry_if_result(busy)
    assert await Policy("r", retry=Retry(retry=strategy, wait=0)).acall(fn) == 3


def test_a_result_failure_is_reported_like_an_exception(
    clock: FakeClock, spans: SpanCapture
) -> None:
    with structlog.testing.capture_logs() as logs:
        Policy("r", retry=Retry(2, on_result=lambda r: True, wait=0)).call(lambda: "bad")
    [span] = spans.spans()
    assert span.attributes["reskit.outcome"] == "failure"
    assert span.attributes["reskit.attempts"] == 2
    assert span.status.status_code.name == "ERROR"
    [event] = span.events
    assert event.name == "reskit.retry"
    assert event.attributes["reskit.retry.result"] == "'bad'"
    assert [(log["event"], log.get("result")) for log in logs] == [
        ("reskit.retry.scheduled", "'bad'")
    ]
    points = spans.metrics()["reskit.calls"]
    assert points == [({"reskit.policy": "r", "reskit.outcome": "failure"}, 1)]


def test_a_result_the_retry_accepts_is_a_success(clock: FakeClock, spans: SpanCapture) -> None:
    Policy("r", retry=Retry(2, on_result=lambda r: r is None, wait=0)).call(lambda: "fine")
    [span] = spans.spans()
    assert span.attributes["reskit.outcome"] == "success"


# -- CircuitBreaker(on_result=...) ---------------------------------------------------------


def test_breaker_counts_results_it_judges_failures() -> None:
    breaker = CircuitBreaker(fail_max=2, on_result=lambda status: status >= 500)
    policy = Policy("b", breaker=breaker)
    assert policy.call(lambda: 200) == 200
    assert policy.call(lambda: 503) == 503
    assert breaker.fail_counter == 1
    assert policy.call(lambda: 503) == 503
    assert breaker.state == "open"
    with pytest.raises(reskit.CircuitOpen):
        policy.call(lambda: 200)


def test_breaker_on_result_failure_reaches_listeners_with_no_exception() -> None:
    failures: list[Any] = []

    class Listener:
        def failure(self, cb: Any, exc: Any) -> None:
            failures.append(exc)

    breaker = CircuitBreaker(listeners=[Listener()], on_result=lambda r: r == "bad")
    Policy("b", breaker=breaker).call(lambda: "bad")
    assert failures == [None]


def test_breaker_on_result_that_raises_counts_as_neither(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(result: Any) -> bool:
        raise RuntimeError("predicate bug")

    breaker = CircuitBreaker(fail_max=1, on_result=broken)
    with caplog.at_level(logging.ERROR, logger="reskit"):
        assert Policy("b", breaker=breaker).call(lambda: 1) == 1
    assert breaker.state == "closed"
    assert breaker.fail_counter == 0
    assert "on_result predicate" in caplog.text


def test_breaker_on_result_must_be_a_plain_function() -> None:
    async def judge(result: Any) -> bool:
        return False

    with pytest.raises(TypeError, match="plain function"):
        CircuitBreaker(on_result=judge)
    with pytest.raises(TypeError, match="predicate"):
        CircuitBreaker(on_result=42)  # type: ignore[arg-type]


def test_retry_and_breaker_judge_results_independently(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=10, on_result=lambda r: r == "bad")
    answers = ["bad", "bad", "good"]
    policy = Policy("rb", retry=Retry(3, on_result=lambda r: r == "bad", wait=0), breaker=breaker)
    assert policy.call(lambda: answers.pop(0)) == "good"
    # Each attempt was sampled: two failures, then a success that reset the count.
    assert breaker.fail_counter == 0


# -- stop= governs attempts ----------------------------------------------------------------


def always_fails(calls: list[int]) -> Any:
    def fn() -> None:
        calls.append(1)
        raise ConnectionError

    return fn


@pytest.mark.parametrize(
    ("attempts", "stop", "made"),
    [
        (None, None, 3),
        (None, tenacity.stop_after_attempt(5), 5),
        (2, tenacity.stop_after_attempt(5), 2),
        (6, tenacity.stop_after_attempt(4), 4),
        (1, None, 1),
    ],
)
def test_stop_governs_the_attempt_count_unless_attempts_is_given(
    clock: FakeClock, attempts: int | None, stop: Any, made: int
) -> None:
    calls: list[int] = []
    retry = Retry(attempts, on=ConnectionError, stop=stop, wait=0)
    with pytest.raises(ConnectionError):
        Policy("s", retry=retry).call(always_fails(calls))
    assert len(calls) == made


def test_retry_attempts_reports_the_effective_limit() -> None:
    assert Retry(on=ValueError).attempts == 3
    assert Retry(on=ValueError, stop=tenacity.stop_after_delay(5)).attempts is None
    assert Retry(4, on=ValueError, stop=tenacity.stop_after_delay(5)).attempts == 4
    # A default count stays a default when replace() adds a stop.
    assert Retry(on=ValueError).replace(stop=tenacity.stop_after_attempt(7)).attempts is None


def test_stop_before_delay_sees_the_upcoming_sleep(clock: FakeClock) -> None:
    calls: list[int] = []
    retry = Retry(on=ConnectionError, wait=2.0, stop=tenacity.stop_before_delay(5))
    with pytest.raises(ConnectionError):
        Policy("s", retry=retry).call(always_fails(calls))
    # Attempts at 0, 2, 4: a third wait would end at 6 >= 5, so it stops after three.
    assert len(calls) == 3
    assert clock.sleeps == [2.0, 2.0]


def test_try_again_is_always_retried(clock: FakeClock) -> None:
    answers: list[Any] = [tenacity.TryAgain(), "done"]

    def fn() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert Policy("t", retry=Retry(3, on=KeyError, wait=0)).call(fn) == "done"


# -- testing mode makes exactly the configured attempts --------------------------------------


class RetryAfter(Exception):
    retry_after = 60.0  # more than wait_max, with no deadline to bound it


@pytest.mark.parametrize(
    ("retry", "deadline"),
    [
        (Retry(5, on=ConnectionError), None),
        (Retry(5, on=RetryAfter), None),
        (Retry(5, on=RetryAfter), 30.0),
        (Retry(on=ConnectionError, stop=tenacity.stop_after_attempt(2)), None),
        (Retry(on=ConnectionError, stop=tenacity.stop_after_delay(0)), None),
    ],
)
def test_testing_mode_makes_exactly_the_configured_attempts(
    retry: Retry, deadline: float | None
) -> None:
    calls: list[int] = []
    error = RetryAfter if retry.on is RetryAfter else ConnectionError

    def fn() -> None:
        calls.append(1)
        raise error

    with set_testing(True, attempts=3), pytest.raises(error):
        Policy("t", retry=retry, deadline=deadline).call(fn)
    assert len(calls) == 3


# -- the on_retry hook -------------------------------------------------------------------------


def test_on_retry_receives_details_of_a_result_retry(clock: FakeClock) -> None:
    seen: list[RetryDetails] = []
    counter = Counter()
    retry = Retry(3, on_result=lambda n: n < 2, wait=0.1, on_retry=seen.append)
    Policy("hook", retry=retry).call(counter)
    assert seen == [RetryDetails("hook", 1, 0.1, 0.0, None, 1)]


def test_a_failing_on_retry_hook_is_logged_and_the_retry_goes_on(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(details: RetryDetails) -> None:
        raise RuntimeError("hook bug")

    counter = Counter()
    retry = Retry(3, on_result=lambda n: n < 3, wait=0, on_retry=broken)
    with caplog.at_level(logging.ERROR, logger="reskit"):
        assert Policy("hook", retry=retry).call(counter) == 3
    assert "on_retry hook of policy 'hook' raised" in caplog.text


async def test_an_async_on_retry_hook_is_awaited(clock: FakeClock) -> None:
    seen: list[int] = []

    async def hook(details: RetryDetails) -> None:
        await asyncio.sleep(0)
        seen.append(details.attempt)

    async def fn() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await Policy("hook", retry=Retry(3, on=ConnectionError, on_retry=hook)).acall(fn)
    assert seen == [1, 2]


# -- statistics ------------------------------------------------------------------------------


def test_statistics_count_calls_attempts_retries_rejections_and_fallbacks(
    clock: FakeClock,
) -> None:
    bulkhead = reskit.Bulkhead(1)
    policy = Policy(
        "stats",
        retry=Retry(2, on=ConnectionError, wait=0),
        bulkhead=bulkhead,
        fallback=reskit.Fallback(lambda exc: "fallback", on=reskit.BulkheadFull),
    )
    answers: list[Any] = [ConnectionError(), "ok", ConnectionError(), ConnectionError()]

    def fn() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert policy.call(fn) == "ok"
    with pytest.raises(ConnectionError):
        policy.call(fn)
    held = bulkhead.admit("other")
    assert policy.call(fn) == "fallback"
    bulkhead.record(held, None, 0.0)
    stats = policy.statistics
    assert stats == reskit.PolicyStatistics(
        calls=3,
        attempts=4,
        retries=2,
        failures=1,
        fallbacks=1,
        rejections={"bulkhead": 1},
    )
    assert stats.rejected == 1
    policy.reset_statistics()
    assert policy.statistics == reskit.PolicyStatistics()


def test_statistics_of_one_policy_shared_by_many_threads_are_exact() -> None:
    policy = Policy("shared", retry=Retry(2, on=ConnectionError, wait=0))
    barrier = threading.Barrier(50)

    def worker(i: int) -> None:
        failed = [False]

        def fn() -> int:
            if i % 2 and not failed[0]:
                failed[0] = True
                raise ConnectionError
            return i

        barrier.wait()
        for _ in range(200):
            failed[0] = False
            policy.call(fn)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = policy.statistics
    assert stats.calls == 50 * 200
    assert stats.retries == 25 * 200
    assert stats.attempts == 50 * 200 + 25 * 200
    assert stats.failures == 0


# -- async predicates and hooks ------------------------------------------------------------------


async def test_an_async_on_predicate_is_awaited(clock: FakeClock) -> None:
    async def transient(exc: Exception) -> bool:
        return isinstance(exc, ConnectionError)

    calls: list[type[Exception]] = []

    async def fn(error: type[Exception]) -> None:
        calls.append(error)
        raise error

    policy = Policy("p", retry=Retry(3, on=transient, wait=0))
    with pytest.raises(ValueError):
        await policy.acall(fn, ValueError)
    with pytest.raises(ConnectionError):
        await policy.acall(fn, ConnectionError)
    assert calls == [ValueError] + [ConnectionError] * 3


def test_an_async_on_predicate_is_refused_on_a_sync_function() -> None:
    async def transient(exc: Exception) -> bool:
        return True

    with pytest.raises(TypeError, match="async strategies"):
        Policy("p", retry=Retry(on=transient))(lambda: 1)


def test_predicates_asked_where_nothing_can_be_awaited_must_be_plain() -> None:
    async def predicate(exc: BaseException) -> bool:
        return True

    with pytest.raises(TypeError, match="plain function"):
        reskit.Fallback(lambda exc: None, on=predicate)
    with pytest.raises(TypeError, match="plain functions"):
        CircuitBreaker(exclude=[predicate])


async def test_a_hook_that_returns_an_awaitable_is_awaited_in_async_code(
    clock: FakeClock,
) -> None:
    notified: list[int] = []

    async def notify(details: RetryDetails) -> None:
        notified.append(details.attempt)

    answers: list[Any] = [ConnectionError(), "ok"]

    async def fn() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    hook = lambda details: notify(details)  # noqa: E731 - a sync callable returning a coroutine
    policy = Policy("p", retry=Retry(3, on=ConnectionError, wait=0, on_retry=hook))
    assert await policy.acall(fn) == "ok"
    assert notified == [1]

"""Unit tests for the circuit breaker, driven through the Policy engine's seam.

Every test drives time with the fake clock (the ``clock`` fixture): nothing
here sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from datetime import timedelta
from typing import Any

import pybreaker
import pytest
import structlog

from reskit._breaker import BreakerState, CircuitBreaker, _rejection
from reskit._errors import BulkheadFull, CircuitOpen, Rejected
from reskit.testing import FakeClock, SpanCapture


def succeed(breaker: CircuitBreaker, duration: float = 0.0) -> None:
    permit = breaker.admit("test")
    breaker.record(permit, None, duration)


def fail(breaker: CircuitBreaker, exc: BaseException | None = None, duration: float = 0.0) -> None:
    permit = breaker.admit("test")
    breaker.record(permit, exc if exc is not None else RuntimeError("boom"), duration)


def rejection(breaker: CircuitBreaker, policy: str = "test") -> CircuitOpen:
    with pytest.raises(CircuitOpen) as info:
        breaker.admit(policy)
    return info.value


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.fail_max):
        fail(breaker)
    assert breaker.state is BreakerState.OPEN


class Recorder(pybreaker.CircuitBreakerListener):
    """A real pybreaker listener that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.events.append(("before_call", func, args, kwargs))

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.events.append(("state_change", old_state.name, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.events.append(("failure", type(exc).__name__))

    def success(self, cb: Any) -> None:
        self.events.append(("success",))

    def changes(self) -> list[tuple[str, str]]:
        return [(e[1], e[2]) for e in self.events if e[0] == "state_change"]


# -- consecutive mode ------------------------------------------------------------------


def test_a_new_breaker_is_closed_with_zero_counters() -> None:
    breaker = CircuitBreaker()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.state == "closed"
    assert breaker.current_state == "closed"
    assert (breaker.fail_counter, breaker.success_counter) == (0, 0)
    assert (breaker.fail_max, breaker.reset_timeout, breaker.success_threshold) == (5, 60.0, 1)
    assert breaker.half_open_max_calls == 1
    assert breaker.failure_rate is None
    assert breaker.name is None
    assert breaker.listeners == ()
    assert breaker.excluded_exceptions == ()


def test_fail_max_consecutive_failures_open_it(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3, reset_timeout=10)
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.fail_counter == 2
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.fail_counter == 3


def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3)
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    assert breaker.fail_counter == 0
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_open_rejects_with_policy_name_and_time_left(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, name="payments")
    fail(breaker)
    clock.advance(12.5)
    err = rejection(breaker, policy="charge")
    assert isinstance(err, Rejected)
    assert err.policy == "charge"
    assert err.retry_after == pytest.approx(17.5)
    assert "payments" in str(err)
    assert "open" in str(err)


def test_still_open_1ms_before_reset_timeout_half_open_1ms_after(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5)
    fail(breaker)
    clock.advance(5 - 0.001)
    assert breaker.state is BreakerState.OPEN
    err = rejection(breaker)
    assert err.retry_after == pytest.approx(0.001)
    clock.advance(0.002)
    assert breaker.state is BreakerState.HALF_OPEN


def test_admit_after_reset_timeout_is_a_probe_even_without_reading_state(
    clock: FakeClock,
) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, listeners=[recorder])
    fail(breaker)
    clock.advance(5.001)
    probe = breaker.admit("test")
    assert recorder.changes() == [("closed", "open"), ("open", "half-open")]
    # The single probe slot is taken: the next caller is turned away at once.
    err = rejection(breaker)
    assert err.retry_after == 0.0
    assert "half-open" in str(err)
    breaker.record(probe, None, 0.0)
    assert breaker.state is BreakerState.CLOSED


def test_reading_state_turns_it_half_open_once(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, listeners=[recorder])
    fail(breaker)
    clock.advance(6)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.current_state == "half-open"
    assert recorder.changes() == [("closed", "open"), ("open", "half-open")]


def test_a_failed_probe_reopens_for_a_full_reset_timeout(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=10)
    trip(breaker)
    clock.advance(10)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.fail_counter == 3  # pybreaker keeps counting while not closed
    assert rejection(breaker).retry_after == pytest.approx(10.0)
    clock.advance(9.999)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN


def test_success_threshold_successes_close_it(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=3)
    trip(breaker)
    clock.advance(1)
    succeed(breaker)
    succeed(breaker)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.success_counter == 2
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert (breaker.fail_counter, breaker.success_counter) == (0, 0)


def test_one_failed_probe_reopens_even_after_some_successes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=3)
    trip(breaker)
    clock.advance(1)
    succeed(breaker)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.success_counter == 0


def test_half_open_admits_at_most_half_open_max_calls_probes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, half_open_max_calls=3)
    trip(breaker)
    clock.advance(1)
    probes = [breaker.admit("test") for _ in range(3)]
    assert rejection(breaker).retry_after == 0.0
    breaker.record(probes[0], None, 0.0)  # closes (success_threshold=1)
    assert breaker.state is BreakerState.CLOSED
    # The other two probes belong to the finished half-open phase: ignored.
    breaker.record(probes[1], RuntimeError("late"), 0.0)
    breaker.record(probes[2], RuntimeError("late"), 0.0)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.fail_counter == 0


def test_a_finished_probe_frees_its_slot_for_the_next(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=2)
    trip(breaker)
    clock.advance(1)
    first = breaker.admit("test")
    rejection(breaker)
    breaker.record(first, None, 0.0)
    second = breaker.admit("test")
    breaker.record(second, None, 0.0)
    assert breaker.state is BreakerState.CLOSED


def test_huge_reset_timeout_does_not_overflow(clock: FakeClock) -> None:
    for timeout in (1e300, timedelta.max, 10.0**308):
        breaker = CircuitBreaker(fail_max=1, reset_timeout=timeout)
        fail(breaker)
        clock.advance(1e9)
        assert breaker.state is BreakerState.OPEN
        err = rejection(breaker)
        assert err.retry_after is not None
        assert err.retry_after > 1e9


def test_reset_timeout_accepts_a_timedelta(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=timedelta(minutes=2))
    assert breaker.reset_timeout == 120.0
    fail(breaker)
    clock.advance(119.999)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN


# -- what counts --------------------------------------------------------------------


class BusinessError(Exception):
    pass


class NotFound(BusinessError):
    pass


def test_excluded_exception_types_count_as_success(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, exclude=[BusinessError])
    fail(breaker)
    fail(breaker, NotFound())  # a subclass is excluded too
    assert breaker.fail_counter == 0
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_excluded_predicates_count_as_success(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=2, exclude=[lambda exc: isinstance(exc, ValueError) and "404" in str(exc)]
    )
    fail(breaker, ValueError("404 not found"))
    fail(breaker, ValueError("404 not found"))
    assert breaker.state is BreakerState.CLOSED
    assert breaker.fail_counter == 0
    fail(breaker, ValueError("500"))
    fail(breaker, ValueError("500"))
    assert breaker.state is BreakerState.OPEN


def test_an_excluded_exception_is_a_successful_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, exclude=[KeyError])
    trip(breaker)
    clock.advance(1)
    fail(breaker, KeyError("x"))
    assert breaker.state is BreakerState.CLOSED


def test_a_raising_exclude_predicate_counts_a_failure_and_is_logged(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(exc: BaseException) -> bool:
        raise LookupError("predicate bug")

    breaker = CircuitBreaker(fail_max=1, exclude=[broken], name="flaky")
    with caplog.at_level(logging.ERROR, logger="reskit"):
        fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert "exclude predicate" in caplog.text
    assert "predicate bug" in caplog.text


NEITHER = [
    asyncio.CancelledError(),
    KeyboardInterrupt(),
    SystemExit(1),
    GeneratorExit(),
    CircuitOpen("inner breaker", policy="inner"),
    BulkheadFull("full"),
]


@pytest.mark.parametrize("exc", NEITHER, ids=lambda e: type(e).__name__)
def test_cancellation_exits_and_rejections_are_neither_success_nor_failure(
    clock: FakeClock, exc: BaseException
) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(fail_max=2, listeners=[recorder])
    fail(breaker)
    for _ in range(5):
        fail(breaker, exc)
    # Not a failure (it would have opened) and not a success (it would have reset).
    assert breaker.state is BreakerState.CLOSED
    assert breaker.fail_counter == 1
    assert [e[0] for e in recorder.events if e[0] != "before_call"] == ["failure"]


@pytest.mark.parametrize("exc", NEITHER, ids=lambda e: type(e).__name__)
def test_a_probe_ending_in_neither_frees_its_slot_and_decides_nothing(
    clock: FakeClock, exc: BaseException
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    trip(breaker)
    clock.advance(1)
    probe = breaker.admit("test")
    rejection(breaker)
    breaker.record(probe, exc, 0.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.success_counter == 0
    succeed(breaker)  # the slot is free again
    assert breaker.state is BreakerState.CLOSED


# -- state generations ----------------------------------------------------------------


def test_a_call_admitted_while_closed_cannot_close_an_open_breaker(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10)
    slow = breaker.admit("test")
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    breaker.record(slow, None, 30.0)
    assert breaker.state is BreakerState.OPEN
    clock.advance(10)
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_call_admitted_while_closed_cannot_reopen_a_half_open_breaker(
    clock: FakeClock,
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10)
    old = breaker.admit("test")
    fail(breaker)
    clock.advance(10)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(old, RuntimeError("late failure"), 10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.fail_counter == 1


def test_a_call_from_a_previous_closed_phase_is_not_counted(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=1)
    old = breaker.admit("test")
    breaker.open()
    breaker.close()
    fail(breaker)
    breaker.record(old, RuntimeError("from before"), 0.0)
    assert breaker.fail_counter == 1
    assert breaker.state is BreakerState.CLOSED


def test_a_probe_from_an_older_half_open_phase_cannot_close(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    trip(breaker)
    clock.advance(1)
    old_probe = breaker.admit("test")
    breaker.open()
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN
    new_probe = breaker.admit("test")  # the new phase has its own slot
    breaker.record(old_probe, None, 0.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(new_probe, None, 0.0)
    assert breaker.state is BreakerState.CLOSED


def test_recording_a_probe_twice_counts_once(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=2)
    trip(breaker)
    clock.advance(1)
    probe = breaker.admit("test")
    breaker.record(probe, None, 0.0)
    breaker.record(probe, None, 0.0)
    assert breaker.success_counter == 1
    assert breaker.state is BreakerState.HALF_OPEN


def test_max_half_open_wait_frees_the_slot_of_a_hung_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, max_half_open_wait=30)
    trip(breaker)
    clock.advance(1)
    hung = breaker.admit("test")
    clock.advance(29.999)
    assert rejection(breaker).retry_after == 0.0
    clock.advance(0.001)
    probe = breaker.admit("test")
    # The hung probe's late result was written off: it decides nothing.
    breaker.record(hung, RuntimeError("finally failed"), 31.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(probe, None, 0.0)
    assert breaker.state is BreakerState.CLOSED


def test_without_max_half_open_wait_a_hung_probe_keeps_its_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    trip(breaker)
    clock.advance(1)
    breaker.admit("test")
    clock.advance(10**6)
    assert rejection(breaker).retry_after == 0.0


# -- rate mode --------------------------------------------------------------------------


def test_rate_mode_waits_for_minimum_calls(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=10, minimum_calls=4)
    for _ in range(3):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_rate_mode_ignores_fail_max(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, failure_rate=1.0, window=5, minimum_calls=5)
    for _ in range(4):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.fail_counter == 4


def test_rate_mode_opens_at_exactly_the_rate(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.3, window=10, minimum_calls=10)
    for _ in range(7):
        succeed(breaker)
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)  # 3 of 10 = 0.3
    assert breaker.state is BreakerState.OPEN


def test_rate_mode_below_the_rate_stays_closed(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=10, minimum_calls=10)
    for _ in range(100):
        succeed(breaker)
        succeed(breaker)
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_count_window_judges_only_the_last_window_calls(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.75, window=4, minimum_calls=4)
    for _ in range(4):
        succeed(breaker)
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED  # [S, S, F, F]: 0.5
    fail(breaker)  # [S, F, F, F]: 0.75, though only 3 of all 7 calls failed
    assert breaker.state is BreakerState.OPEN


def test_count_window_forgets_old_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=4, minimum_calls=4)
    fail(breaker)
    for _ in range(3):
        succeed(breaker)
    fail(breaker)  # [S, S, S, F]: 0.25
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)  # [S, S, F, F]: 0.5
    assert breaker.state is BreakerState.OPEN


def test_excluded_exceptions_are_successes_in_rate_mode(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=4, minimum_calls=4, exclude=[KeyError])
    fail(breaker)
    for _ in range(3):
        fail(breaker, KeyError("k"))
    assert breaker.state is BreakerState.CLOSED


def test_time_window_counts_the_last_window_seconds(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=10, minimum_calls=4)
    for _ in range(3):
        fail(breaker)
    clock.advance(9.0)
    fail(breaker)  # four failures within the same ten seconds
    assert breaker.state is BreakerState.OPEN


def test_time_window_drops_buckets_that_age_out(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=10, minimum_calls=4)
    for _ in range(3):
        fail(breaker)
    clock.advance(10.0)
    fail(breaker)  # the first three fell out of the window
    assert breaker.state is BreakerState.CLOSED
    for _ in range(2):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_time_window_survives_a_long_quiet_spell(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=3, minimum_calls=2)
    fail(breaker)
    clock.advance(10**9)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_time_window_mixed_successes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=5, minimum_calls=4)
    for second in range(20):
        succeed(breaker)
        if second % 2:
            fail(breaker)
        else:
            succeed(breaker)
        clock.advance(1.0)
    # 1 failure in 4 calls per two seconds: 25 %
    assert breaker.state is BreakerState.CLOSED


def test_the_window_restarts_after_the_breaker_closes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=10, minimum_calls=4, reset_timeout=1)
    for _ in range(4):
        fail(breaker)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1)
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    for _ in range(3):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED  # three calls < minimum_calls


# -- slow calls -------------------------------------------------------------------------


def test_slow_calls_open_the_breaker(clock: FakeClock) -> None:
    breaker = CircuitBreaker(slow_call_duration=2.0, slow_call_rate=0.5, window=4, minimum_calls=4)
    succeed(breaker, 0.1)
    succeed(breaker, 1.999)
    succeed(breaker, 2.0)  # at the threshold counts as slow
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker, 9.0)
    assert breaker.state is BreakerState.OPEN


def test_slow_failures_count_as_slow_too(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=100, slow_call_duration=1.0, slow_call_rate=1.0, window=3, minimum_calls=3
    )
    fail(breaker, duration=5.0)
    fail(breaker, duration=5.0)
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker, 1.0)
    assert breaker.state is BreakerState.OPEN


def test_slow_detection_keeps_fail_max_in_consecutive_mode(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, slow_call_duration=1.0, window=10, minimum_calls=10)
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_a_slow_successful_probe_reopens(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=1, reset_timeout=1, slow_call_duration=2.0, window=2, minimum_calls=2
    )
    trip(breaker)
    clock.advance(1)
    succeed(breaker, 3.0)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1)
    succeed(breaker, 0.5)
    assert breaker.state is BreakerState.CLOSED


def test_duration_is_ignored_without_slow_call_duration(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    for _ in range(20):
        succeed(breaker, 10**6)
    assert breaker.state is BreakerState.CLOSED


# -- manual control -------------------------------------------------------------------


def test_open_rejects_until_reset_timeout(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=3)
    breaker.open()
    assert breaker.state is BreakerState.OPEN
    assert rejection(breaker).retry_after == pytest.approx(3.0)
    clock.advance(3)
    assert breaker.state is BreakerState.HALF_OPEN


def test_open_again_restarts_the_timer(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=3)
    breaker.open()
    clock.advance(2)
    breaker.open()
    clock.advance(2)
    assert breaker.state is BreakerState.OPEN


def test_close_clears_the_counters(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3)
    fail(breaker)
    fail(breaker)
    breaker.close()
    assert breaker.fail_counter == 0
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_half_open_makes_the_next_call_a_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=5)
    breaker.half_open()
    assert breaker.state is BreakerState.HALF_OPEN
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_force_open_stays_open_until_reset(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=1, name="db")
    breaker.force_open()
    clock.advance(10**6)
    assert breaker.state is BreakerState.FORCED_OPEN
    err = rejection(breaker)
    assert err.retry_after is None
    assert "forced open" in str(err)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker)


def test_disable_admits_everything_and_records_nothing(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(fail_max=1, listeners=[recorder])
    breaker.disable()
    for _ in range(10):
        fail(breaker)
    succeed(breaker)
    assert breaker.state is BreakerState.DISABLED
    assert breaker.fail_counter == 0
    assert recorder.changes() == [("closed", "disabled")]
    assert [e for e in recorder.events if e[0] in ("failure", "success")] == []
    breaker.reset()
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_a_call_admitted_while_disabled_is_not_counted_after_reset(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1)
    breaker.disable()
    permit = breaker.admit("test")
    breaker.reset()
    breaker.record(permit, RuntimeError("x"), 0.0)
    assert breaker.state is BreakerState.CLOSED


def test_reset_clears_everything(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=3)
    trip(breaker)
    clock.advance(1)
    succeed(breaker)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert (breaker.fail_counter, breaker.success_counter) == (0, 0)


def test_manual_changes_announce_only_real_transitions(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(listeners=[recorder])
    breaker.close()
    breaker.open()
    breaker.open()
    breaker.force_open()
    breaker.reset()
    assert recorder.changes() == [
        ("closed", "open"),
        ("open", "forced-open"),
        ("forced-open", "closed"),
    ]


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fail_max": 0}, ValueError, "fail_max must be >= 1, got 0"),
        ({"fail_max": 2.5}, TypeError, "fail_max must be an int, got 2.5"),
        ({"fail_max": True}, TypeError, "fail_max must be an int, got True"),
        ({"reset_timeout": 0}, ValueError, "reset_timeout must be > 0 seconds"),
        ({"reset_timeout": -1}, ValueError, "reset_timeout must be > 0 seconds"),
        ({"reset_timeout": float("inf")}, ValueError, "reset_timeout must be a finite"),
        ({"reset_timeout": None}, TypeError, "reset_timeout must be a number of seconds"),
        ({"reset_timeout": "60"}, TypeError, "reset_timeout must be a number of seconds"),
        ({"success_threshold": 0}, ValueError, "success_threshold must be >= 1, got 0"),
        ({"half_open_max_calls": 0}, ValueError, "half_open_max_calls must be >= 1, got 0"),
        ({"failure_rate": 0}, ValueError, "failure_rate must be > 0 and <= 1"),
        ({"failure_rate": 50}, ValueError, "failure_rate must be > 0 and <= 1"),
        ({"failure_rate": float("nan")}, ValueError, "failure_rate must be > 0 and <= 1"),
        ({"failure_rate": "0.5"}, TypeError, "failure_rate must be a number between 0 and 1"),
        ({"slow_call_rate": 1.5}, ValueError, "slow_call_rate must be > 0 and <= 1"),
        ({"slow_call_duration": 0}, ValueError, "slow_call_duration must be > 0 seconds"),
        ({"window": 0}, ValueError, "window must be >= 1, got 0"),
        ({"minimum_calls": 0}, ValueError, "minimum_calls must be >= 1, got 0"),
        (
            {"failure_rate": 0.5, "window": 5},
            ValueError,
            "minimum_calls (10) must be <= window (5)",
        ),
        (
            {"failure_rate": 0.5, "window_seconds": 2.5},
            ValueError,
            "window_seconds must be a whole number of seconds >= 1",
        ),
        (
            {"failure_rate": 0.5, "window_seconds": 0.5},
            ValueError,
            "window_seconds must be a whole number of seconds >= 1",
        ),
        ({"max_half_open_wait": -1}, ValueError, "max_half_open_wait must be > 0 seconds"),
        ({"exclude": ["ValueError"]}, TypeError, "exclude items must be exception classes"),
        ({"exclude": [int]}, TypeError, "exclude items must be exception classes"),
        ({"listeners": [object()]}, TypeError, "listener needs at least one of the methods"),
        ({"name": 3}, TypeError, "name must be a str or None, got 3"),
    ],
)
def test_invalid_arguments_say_what_to_change(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        CircuitBreaker(**kwargs)
    assert message in str(info.value)


def test_minimum_calls_above_window_is_fine_outside_rate_mode() -> None:
    CircuitBreaker(window=5)
    CircuitBreaker(failure_rate=0.5, window_seconds=5, minimum_calls=100)


# -- pybreaker compatibility --------------------------------------------------------------


def test_from_pybreaker_copies_the_configuration(clock: FakeClock) -> None:
    def is_404(exc: BaseException) -> bool:
        return "404" in str(exc)

    listener = Recorder()
    exclude: list[Any] = [KeyError, is_404]
    old = pybreaker.CircuitBreaker(
        fail_max=2,
        reset_timeout=7,
        success_threshold=2,
        exclude=exclude,
        listeners=[listener],
        name="legacy",
    )
    breaker = CircuitBreaker.from_pybreaker(old)
    assert (breaker.fail_max, breaker.reset_timeout, breaker.success_threshold) == (2, 7.0, 2)
    assert breaker.excluded_exceptions == (KeyError, is_404)
    assert breaker.listeners == (listener,)
    assert breaker.name == "legacy"
    fail(breaker, KeyError("k"))
    fail(breaker, ValueError("404"))
    assert breaker.fail_counter == 0
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert ("state_change", "closed", "open") in listener.events


def test_from_pybreaker_takes_overrides() -> None:
    breaker = CircuitBreaker.from_pybreaker(
        pybreaker.CircuitBreaker(fail_max=9), half_open_max_calls=3, name="renamed"
    )
    assert (breaker.fail_max, breaker.half_open_max_calls, breaker.name) == (9, 3, "renamed")


def test_from_pybreaker_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match=r"needs a pybreaker\.CircuitBreaker"):
        CircuitBreaker.from_pybreaker(object())


def test_pybreaker_listener_sees_pybreaker_state_names_and_order(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(fail_max=2, reset_timeout=1, listeners=[recorder])
    fail(breaker)
    fail(breaker)
    clock.advance(1)
    succeed(breaker)
    assert [e for e in recorder.events if e[0] != "before_call"] == [
        ("failure", "RuntimeError"),
        ("failure", "RuntimeError"),
        ("state_change", "closed", "open"),
        ("state_change", "open", "half-open"),
        ("state_change", "half-open", "closed"),
        ("success",),
    ]


def test_before_call_gets_the_function_and_arguments_when_given(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(listeners=[recorder])

    def target(x: int, *, y: int) -> int:
        return x + y

    permit = breaker.admit("test", None, target, (1,), {"y": 2})
    breaker.record(permit, None, 0.0)
    breaker.record(breaker.admit("test"), None, 0.0)
    assert recorder.events == [
        ("before_call", target, (1,), {"y": 2}),
        ("success",),
        ("before_call", None, (), {}),
        ("success",),
    ]


def test_before_call_is_not_called_for_rejected_calls(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(listeners=[recorder])
    breaker.open()
    rejection(breaker)
    breaker.force_open()
    rejection(breaker)
    assert [e[0] for e in recorder.events] == ["state_change", "state_change"]


def test_duck_typed_listeners_need_only_the_methods_they_use(clock: FakeClock) -> None:
    seen: list[str] = []

    class OnlyStateChanges:
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            seen.append(f"{old.name}->{new.name}:{new.state.value}")

    breaker = CircuitBreaker(fail_max=1, listeners=[OnlyStateChanges()])
    fail(breaker)
    assert seen == ["closed->open:open"]


def test_add_and_remove_listener(clock: FakeClock) -> None:
    recorder = Recorder()
    breaker = CircuitBreaker(fail_max=1)
    breaker.add_listener(recorder)
    assert breaker.listeners == (recorder,)
    fail(breaker)
    breaker.remove_listener(recorder)
    assert breaker.listeners == ()
    breaker.reset()
    assert recorder.changes() == [("closed", "open")]
    with pytest.raises(ValueError, match="is not a listener"):
        breaker.remove_listener(recorder)
    with pytest.raises(TypeError, match="needs at least one of the methods"):
        breaker.add_listener(42)


def test_a_raising_listener_is_logged_and_never_reaches_the_caller(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(pybreaker.CircuitBreakerListener):
        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("before_call bug")

        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            raise RuntimeError("state_change bug")

        def failure(self, cb: Any, exc: BaseException) -> None:
            raise RuntimeError("failure bug")

        def success(self, cb: Any) -> None:
            raise RuntimeError("success bug")

    after = Recorder()
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, listeners=[Broken(), after])
    with caplog.at_level(logging.ERROR, logger="reskit"):
        succeed(breaker)
        fail(breaker)
        clock.advance(1)
        succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    for bug in ("before_call bug", "state_change bug", "failure bug", "success bug"):
        assert bug in caplog.text
    # The listener after the broken one still heard everything.
    assert after.changes() == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_current_state_uses_pybreaker_spelling(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    fail(breaker)
    assert breaker.current_state == pybreaker.STATE_OPEN
    clock.advance(1)
    assert breaker.current_state == pybreaker.STATE_HALF_OPEN
    succeed(breaker)
    assert breaker.current_state == pybreaker.STATE_CLOSED


# -- names, errors, telemetry ---------------------------------------------------------------


def test_breaker_state_members_are_strings() -> None:
    assert [s.value for s in BreakerState] == [
        "closed",
        "open",
        "half_open",
        "forced_open",
        "disabled",
    ]
    assert isinstance(BreakerState.HALF_OPEN, str)
    assert f"{BreakerState.HALF_OPEN}" == "half_open"
    assert BreakerState("open") is BreakerState.OPEN


def test_an_unnamed_breaker_adopts_the_first_policy_name(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1)
    assert breaker.name is None
    assert "breaker-" in repr(breaker)
    breaker._adopt_name("payments")
    breaker._adopt_name("other")
    assert breaker.name == "payments"
    fail(breaker)
    assert "'payments'" in str(rejection(breaker))
    named = CircuitBreaker(name="mine")
    named._adopt_name("other")
    assert named.name == "mine"


def test_repr_shows_name_state_and_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, name="db")
    fail(breaker)
    assert repr(breaker) == "<CircuitBreaker 'db' state=closed fail_counter=1>"


@pytest.mark.parametrize("retry_after", [1.5, 0.0, None])
def test_the_fast_rejection_equals_a_constructed_circuit_open(retry_after: float | None) -> None:
    fast = _rejection("circuit breaker 'x' is open", "p", retry_after)
    slow = CircuitOpen("circuit breaker 'x' is open", policy="p", retry_after=retry_after)
    assert type(fast) is type(slow)
    assert fast.args == slow.args
    assert str(fast) == str(slow)
    assert vars(fast) == vars(slow)
    copy = pickle.loads(pickle.dumps(fast))
    assert (copy.args, copy.policy, copy.retry_after) == (slow.args, "p", retry_after)


def test_transitions_are_logged_with_structlog(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, name="inventory")
    with structlog.testing.capture_logs() as logs:
        fail(breaker)
        clock.advance(1)
        succeed(breaker)
        breaker.force_open()
        breaker.disable()
    assert [(e["event"], e["from_state"], e["to_state"], e["reason"]) for e in logs] == [
        ("reskit.breaker.opened", "closed", "open", "fail_max"),
        ("reskit.breaker.half_opened", "open", "half_open", "reset_timeout"),
        ("reskit.breaker.closed", "half_open", "closed", "probes_succeeded"),
        ("reskit.breaker.opened", "closed", "forced_open", "manual"),
        ("reskit.breaker.disabled", "forced_open", "disabled", "manual"),
    ]
    assert {e["breaker"] for e in logs} == {"inventory"}


def test_nothing_is_logged_without_a_transition(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3)
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            succeed(breaker)
            fail(breaker)
    assert logs == []


def test_transitions_are_span_events_on_the_current_span(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, name="search")
    with SpanCapture() as capture:
        tracer = capture.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("caller"):
            succeed(breaker)
            fail(breaker)
    [span] = capture.spans()
    [event] = span.events
    assert event.name == "reskit.breaker.state_change"
    assert dict(event.attributes) == {
        "reskit.breaker.name": "search",
        "reskit.breaker.from": "closed",
        "reskit.breaker.to": "open",
        "reskit.breaker.reason": "fail_max",
    }


def test_state_gauge_reports_every_live_breaker(clock: FakeClock) -> None:
    with SpanCapture() as capture:
        closed = CircuitBreaker(name="gauge-closed")
        opened = CircuitBreaker(name="gauge-open", reset_timeout=5)
        half = CircuitBreaker(name="gauge-half", reset_timeout=5)
        forced = CircuitBreaker(name="gauge-forced")
        opened.open()
        half.open()
        forced.force_open()
        clock.advance(5)
        opened.open()
        points = capture.metrics()["reskit.breaker.state"]
    values = {attrs["reskit.breaker.name"]: value for attrs, value in points}
    assert values["gauge-closed"] == 0
    assert values["gauge-half"] == 1
    assert values["gauge-open"] == 2
    assert values["gauge-forced"] == 2
    # Reading the gauge does not move the breaker.
    assert half._phase.state is BreakerState.OPEN
    del closed


def test_breakers_are_not_kept_alive_by_the_gauge() -> None:
    import gc
    import weakref

    breaker = CircuitBreaker(name="short-lived")
    ref = weakref.ref(breaker)
    del breaker
    gc.collect()
    assert ref() is None


def test_time_comes_from_reskit_clock_never_the_time_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden() -> float:
        raise AssertionError("the breaker read the time module directly")

    monkeypatch.setattr(time, "monotonic", forbidden)
    monkeypatch.setattr(time, "time", forbidden)
    monkeypatch.setattr(time, "perf_counter", forbidden)
    # A fake clock far below the real monotonic time: a real read would show.
    with FakeClock(start=5.0) as clock, structlog.testing.capture_logs():
        breaker = CircuitBreaker(fail_max=1, reset_timeout=2, max_half_open_wait=1)
        fail(breaker)
        assert rejection(breaker).retry_after == 2.0
        clock.advance(2)
        assert breaker.state is BreakerState.HALF_OPEN
        succeed(breaker)
        assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("30", TypeError),  # not a number
        (-5, ValueError),  # negative
        (0, ValueError),  # zero
        (float("inf"), ValueError),  # not finite
        (86_401, ValueError),  # over a day of one-second buckets
    ],
)
def test_a_bad_window_seconds_is_named_in_the_error(value: object, error: type) -> None:
    # The message names the argument to change, whichever check refuses it.
    with pytest.raises(error, match=r"^window_seconds must "):
        CircuitBreaker(failure_rate=0.5, window_seconds=value)  # type: ignore[arg-type]

"""Differential tests: tenacity's strategies give the same retries in reskit as in tenacity.

Method. Every case is a scripted function (what each attempt does: raise a fresh exception,
return a value, first take some fake time, set an event; the last step repeats) and a
tenacity ``retry=``/``stop=``/``wait=`` triple. The case runs twice, each run on its own
:class:`~reskit.testing.FakeClock` started at the same time and with ``random`` seeded the
same (``wait_random`` and friends draw from the global ``random`` module):

- through ``tenacity.Retrying`` / ``tenacity.AsyncRetrying`` (``reraise=True``), whose
  ``time.monotonic`` is patched to read the fake clock and whose ``sleep=`` records the wait
  and advances the fake clock;
- through ``Policy(retry=Retry(retry=..., stop=..., wait=...))``, ``call`` or ``acall``.

Both runs must agree on the number of attempts, the sleeps, and the outcome: the value
returned, or the exception raised by the same attempt, re-raised as that very object.
Zero-second sleeps are left out of the comparison: reskit's sync driver skips
``sleep(0)``, tenacity still calls its sleep with zero; neither waits.

Documented differences are cases marked ``xfail(strict=True)``: they assert equality and
must fail.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import tenacity
import tenacity.asyncio as tasyncio

from reskit import BulkheadFull, Policy, Retry, TimeoutExceeded
from reskit.testing import FakeClock

START = 1_000.0
SEED = 20_240_611
MAX_CALLS = 50


class RunawayScript(BaseException):
    """A case retried far more than it was written for (a broken case, not a finding)."""


# -- scripts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One attempt: take ``took`` fake seconds, set ``sets``, then raise or return."""

    raises: type[BaseException] | None = None
    message: str = "boom"
    cause: type[BaseException] | None = None
    returns: object = None
    took: float = 0.0
    sets: threading.Event | None = None


def fail(
    raises: type[BaseException] = ValueError,
    message: str = "boom",
    *,
    cause: type[BaseException] | None = None,
    took: float = 0.0,
    sets: threading.Event | None = None,
) -> Step:
    return Step(raises=raises, message=message, cause=cause, took=took, sets=sets)


def ok(value: object = "ok", *, took: float = 0.0) -> Step:
    return Step(returns=value, took=took)


class Script:
    """The function under test: plays the steps, one per call, on ``clock``."""

    def __init__(self, steps: tuple[Step, ...], clock: FakeClock) -> None:
        self.steps = steps
        self.clock = clock
        self.calls = 0
        self.raised: dict[int, BaseException] = {}  # attempt number -> what it raised
        for step in steps:
            if step.sets is not None:
                step.sets.clear()

    def call(self) -> object:
        self.calls += 1
        if self.calls > MAX_CALLS:
            raise RunawayScript(f"{self.calls} attempts")
        step = self.steps[min(self.calls, len(self.steps)) - 1]
        self.clock.advance(step.took)
        if step.sets is not None:
            step.sets.set()
        if step.raises is None:
            return step.returns
        exc = step.raises(step.message)
        if step.cause is not None:
            exc.__cause__ = step.cause("the cause")
        self.raised[self.calls] = exc
        raise exc

    async def acall(self) -> object:
        await asyncio.sleep(0)
        return self.call()

    def outcome_of(self, exc: BaseException) -> tuple[object, ...]:
        for attempt, raised in self.raised.items():
            if exc is raised:
                return ("raised by attempt", attempt, type(exc).__name__)
        if not isinstance(exc, Exception):
            raise exc  # a real interrupt, not one of ours
        return ("raised elsewhere", type(exc).__name__, str(exc))


@dataclass(frozen=True)
class Run:
    attempts: int
    sleeps: list[float]
    outcome: tuple[object, ...]


@dataclass(frozen=True)
class Case:
    steps: tuple[Step, ...]
    retry: Any
    stop: Any
    wait: Any


def case(
    id: str,
    *steps: Step,
    retry: Any = None,
    stop: Any = None,
    wait: Any = None,
    xfail: str | None = None,
) -> Any:
    """A pytest param. By default: ``retry_if_exception_type()`` (any ``Exception``, as in
    tenacity), ``stop_after_attempt(4)`` and ``wait_none()``; no steps means always failing."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    built = Case(
        steps=steps or (fail(),),
        retry=retry if retry is not None else tenacity.retry_if_exception_type(),
        stop=stop if stop is not None else tenacity.stop_after_attempt(4),
        wait=wait if wait is not None else tenacity.wait_none(),
    )
    return pytest.param(built, id=id, marks=marks)


def _slept(sleeps: list[float]) -> list[float]:
    return [float(s) for s in sleeps if s]


# -- the two sides ---------------------------------------------------------------------------


def _tenacity_clock(clock: FakeClock) -> pytest.MonkeyPatch:
    patch = pytest.MonkeyPatch()
    patch.setattr(tenacity, "time", SimpleNamespace(monotonic=clock.now))
    return patch


def run_tenacity(c: Case) -> Run:
    clock = FakeClock(START)  # not installed: only tenacity reads it
    script = Script(c.steps, clock)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    patch = _tenacity_clock(clock)
    try:
        retrying = tenacity.Retrying(
            retry=c.retry, stop=c.stop, wait=c.wait, sleep=sleep, reraise=True
        )
        random.seed(SEED)
        try:
            outcome: tuple[object, ...] = ("returned", retrying(script.call))
        except BaseException as exc:
            outcome = script.outcome_of(exc)
    finally:
        patch.undo()
    return Run(script.calls, _slept(sleeps), outcome)


async def arun_tenacity(c: Case) -> Run:
    clock = FakeClock(START)
    script = Script(c.steps, clock)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    patch = _tenacity_clock(clock)
    try:
        retrying = tasyncio.AsyncRetrying(
            retry=c.retry, stop=c.stop, wait=c.wait, sleep=sleep, reraise=True
        )
        random.seed(SEED)
        try:
            outcome: tuple[object, ...] = ("returned", await retrying(script.acall))
        except BaseException as exc:
            outcome = script.outcome_of(exc)
    finally:
        patch.undo()
    return Run(script.calls, _slept(sleeps), outcome)


def _policy(c: Case) -> Policy:
    return Policy("diff", retry=Retry(retry=c.retry, stop=c.stop, wait=c.wait))


def run_reskit(c: Case) -> Run:
    with FakeClock(START) as clock:
        script = Script(c.steps, clock)
        policy = _policy(c)
        random.seed(SEED)
        try:
            outcome: tuple[object, ...] = ("returned", policy.call(script.call))
        except BaseException as exc:
            outcome = script.outcome_of(exc)
    return Run(script.calls, _slept(clock.sleeps), outcome)


async def arun_reskit(c: Case) -> Run:
    with FakeClock(START) as clock:
        script = Script(c.steps, clock)
        policy = _policy(c)
        random.seed(SEED)
        try:
            outcome: tuple[object, ...] = ("returned", await policy.acall(script.acall))
        except BaseException as exc:
            outcome = script.outcome_of(exc)
    return Run(script.calls, _slept(clock.sleeps), outcome)


# -- predicates -----------------------------------------------------------------------------


def is_none(result: object) -> bool:
    return result is None


def is_ok(result: object) -> bool:
    return result == "ok"


def transient(exc: BaseException) -> bool:
    return "transient" in str(exc)


def broken_predicate(exc: BaseException) -> bool:
    raise RuntimeError("the predicate failed")


async def abroken_predicate(exc: BaseException) -> bool:
    await asyncio.sleep(0)
    raise RuntimeError("the predicate failed")


def wait_from_message(exc: BaseException) -> float:
    return float(str(exc))


def retry_first_two(state: tenacity.RetryCallState) -> bool:
    """A plain callable retry strategy: the attempt number it sees must match tenacity's."""
    return state.attempt_number < 3


def wait_from_state(state: tenacity.RetryCallState) -> float:
    """A plain callable wait reading the attempt number, the idle time and the elapsed time."""
    assert state.seconds_since_start is not None
    return 0.1 * state.attempt_number + state.idle_for / 2 + state.seconds_since_start / 4


def stop_after_three_seconds_idle(state: tenacity.RetryCallState) -> bool:
    """A plain callable stop: stops once the waits would reach 3 s."""
    return state.idle_for + state.upcoming_sleep >= 3


def wait_twice_the_last(state: tenacity.RetryCallState) -> float:
    """A plain callable wait doubling the previous wait, read from ``upcoming_sleep``.

    In tenacity ``upcoming_sleep`` still holds the last wait when the next one is computed.
    """
    return max(0.1, 2 * state.upcoming_sleep)


async def ais_none(result: object) -> bool:
    await asyncio.sleep(0)
    return result is None


async def atransient(exc: BaseException) -> bool:
    await asyncio.sleep(0)
    return "transient" in str(exc)


async def aretry_first_two(state: tenacity.RetryCallState) -> bool:
    await asyncio.sleep(0)
    return state.attempt_number < 3


async def await_half_attempt(state: tenacity.RetryCallState) -> float:
    await asyncio.sleep(0)
    return 0.5 * state.attempt_number


async def astop_after_three(state: tenacity.RetryCallState) -> bool:
    await asyncio.sleep(0)
    return state.attempt_number >= 3


class RateLimited(Exception):
    """An exception carrying ``retry_after`` (seconds), as an HTTP 429 would."""

    retry_after = 2.0


class DeadlineExceeded(TimeoutExceeded):
    def __init__(self, message: str) -> None:
        super().__init__(message, kind="deadline")


# -- the cases ------------------------------------------------------------------------------

EVENT = threading.Event()
RESULT_STOPS = (
    "reskit returns the last result when retries on a result run out; tenacity raises RetryError"
)
RETRY_AFTER = "reskit waits at least an exception's retry_after; tenacity ignores it"
NEVER_RETRIED = "reskit never retries its own rejections nor a deadline TimeoutExceeded"
BASE_EXCEPTIONS = (
    "reskit never retries a BaseException that is not an Exception, whatever the strategy says"
)
E = fail()  # ValueError("boom")
T = tenacity

WAITS = [
    case("wait_none"),
    case("wait_fixed", wait=T.wait_fixed(0.5)),
    case("wait_fixed-timedelta", wait=T.wait_fixed(timedelta(milliseconds=250))),
    case("wait_random", wait=T.wait_random(0.1, 0.9)),
    case("wait_random-default", wait=T.wait_random()),
    case("wait_incrementing", wait=T.wait_incrementing(start=0.5, increment=0.25, max=1.0)),
    case("wait_exponential", wait=T.wait_exponential(multiplier=0.5)),
    case("wait_exponential-max-min", wait=T.wait_exponential(multiplier=0.5, min=0.75, max=2)),
    case("wait_exponential-base3", wait=T.wait_exponential(multiplier=0.1, exp_base=3)),
    case("wait_random_exponential", wait=T.wait_random_exponential(multiplier=0.5, max=3)),
    case("wait_full_jitter", wait=T.wait_full_jitter(multiplier=1, max=2)),
    case("wait_exponential_jitter", wait=T.wait_exponential_jitter(multiplier=0.5, max=3)),
    case(
        "wait_exponential_jitter-min",
        wait=T.wait_exponential_jitter(multiplier=0.1, jitter=0.2, min=0.3),
    ),
    case("wait_chain", wait=T.wait_chain(T.wait_fixed(1), T.wait_fixed(2), T.wait_fixed(3))),
    case("wait_combine", wait=T.wait_combine(T.wait_fixed(1), T.wait_random(0, 1))),
    case("wait-plus", wait=T.wait_fixed(0.5) + T.wait_exponential(multiplier=0.25)),
    case("wait-sum", wait=sum([T.wait_fixed(0.1), T.wait_random(0, 0.5), T.wait_fixed(0.2)])),
    case(
        "wait_exception",
        fail(message="0.25"),
        fail(message="1.5"),
        fail(message="0"),
        fail(message="2"),
        wait=T.wait_exception(wait_from_message),
    ),
    case("wait-callable-state", fail(took=0.3), wait=wait_from_state),
    # tenacity still holds the previous wait in upcoming_sleep when it computes the next one;
    # reskit resets upcoming_sleep to 0.0 before every decision, so this case fails today.
    case(
        "wait-callable-reads-previous-upcoming_sleep",
        wait=wait_twice_the_last,
        stop=T.stop_after_attempt(5),
    ),
    case(
        "wait-strategy-error-propagates",
        ok(None),
        retry=T.retry_if_result(is_none),
        wait=T.wait_exception(wait_from_message),
    ),
    case(
        "wait-retry_after",
        fail(RateLimited),
        wait=T.wait_fixed(0.5),
        xfail=RETRY_AFTER,
    ),
    case(
        "wait_exponential-on-results",
        ok(None),
        ok(None),
        ok(None),
        ok("done"),
        retry=T.retry_if_result(is_none),
        wait=T.wait_exponential(multiplier=0.5),
    ),
]

STOPS = [
    case("stop_after_attempt-0", stop=T.stop_after_attempt(0)),
    case("stop_after_attempt-1", stop=T.stop_after_attempt(1)),
    case("stop_after_attempt-3", stop=T.stop_after_attempt(3), wait=T.wait_fixed(1)),
    case(
        "stop_after_attempt-success",
        E,
        E,
        ok(),
        stop=T.stop_after_attempt(3),
        wait=T.wait_fixed(1),
    ),
    case(
        "stop_after_delay",
        fail(took=0.3),
        stop=T.stop_after_delay(2),
        wait=T.wait_fixed(0.5),
    ),
    case("stop_after_delay-exact", fail(took=0.5), stop=T.stop_after_delay(1)),
    case(
        "stop_after_delay-timedelta",
        fail(took=0.25),
        stop=T.stop_after_delay(timedelta(seconds=3)),
        wait=T.wait_exponential(multiplier=0.25),
    ),
    case(
        "stop_after_delay-slow-first-attempt",
        fail(took=5),
        E,
        stop=T.stop_after_delay(2),
    ),
    case(
        "stop_before_delay",
        fail(took=0.3),
        stop=T.stop_before_delay(2),
        wait=T.wait_fixed(0.5),
    ),
    case(
        "stop_before_delay-random",
        fail(took=0.1),
        stop=T.stop_before_delay(5),
        wait=T.wait_random_exponential(multiplier=0.5, max=4),
    ),
    case(
        "stop_never-eventually-succeeds",
        E,
        E,
        E,
        E,
        E,
        E,
        ok(),
        stop=T.stop_never,
        wait=T.wait_fixed(1),
    ),
    case(
        "stop_never-until-not-retried",
        E,
        E,
        fail(KeyError),
        retry=T.retry_if_exception_type(ValueError),
        stop=T.stop_never,
        wait=T.wait_incrementing(),
    ),
    case(
        "stop_when_event_set",
        E,
        E,
        fail(sets=EVENT),
        E,
        stop=T.stop_when_event_set(EVENT),
        wait=T.wait_fixed(0.5),
    ),
    case(
        "stop-or",
        fail(took=0.5),
        stop=T.stop_after_attempt(10) | T.stop_after_delay(1.5),
        wait=T.wait_fixed(0.25),
    ),
    case(
        "stop_any",
        fail(took=0.5),
        stop=T.stop_any(T.stop_after_attempt(3), T.stop_after_delay(10)),
    ),
    case(
        "stop-and",
        fail(took=1),
        stop=T.stop_after_attempt(2) & T.stop_after_delay(3),
    ),
    case(
        "stop_all",
        fail(took=0.1),
        stop=T.stop_all(T.stop_after_attempt(2), T.stop_before_delay(3)),
        wait=T.wait_fixed(1),
    ),
    case(
        "stop-callable",
        stop=stop_after_three_seconds_idle,
        wait=T.wait_fixed(0.75),
    ),
]

RETRIES = [
    case(
        "retry_if_exception_type",
        E,
        fail(KeyError),
        retry=T.retry_if_exception_type(ValueError),
    ),
    case(
        "retry_if_exception_type-tuple",
        E,
        fail(KeyError),
        fail(OSError),
        retry=T.retry_if_exception_type((ValueError, KeyError)),
    ),
    case(
        "retry_if_exception_type-success",
        E,
        ok(),
        retry=T.retry_if_exception_type(ValueError),
    ),
    case(
        "retry_if_not_exception_type",
        E,
        E,
        fail(KeyError),
        retry=T.retry_if_not_exception_type(KeyError),
    ),
    case(
        "retry_unless_exception_type",
        ok(),
        E,
        ok(),
        fail(KeyError),
        retry=T.retry_unless_exception_type(KeyError),
        stop=T.stop_after_attempt(6),
    ),
    case(
        "retry_unless_exception_type-runs-out",
        ok(),
        retry=T.retry_unless_exception_type(KeyError),
        xfail=RESULT_STOPS,
    ),
    case(
        "retry_if_exception",
        fail(OSError, "transient"),
        fail(OSError, "transient"),
        fail(OSError, "fatal"),
        retry=T.retry_if_exception(transient),
    ),
    case(
        "retry_if_exception_cause_type",
        fail(cause=OSError),
        fail(cause=OSError),
        fail(cause=KeyError),
        retry=T.retry_if_exception_cause_type(OSError),
    ),
    case(
        "retry_if_exception_message-message",
        E,
        fail(message="other"),
        retry=T.retry_if_exception_message(message="boom"),
    ),
    case(
        "retry_if_exception_message-match",
        fail(message="transient: 1"),
        fail(message="transient: 2"),
        fail(message="not transient"),
        retry=T.retry_if_exception_message(match=r"transient"),
    ),
    case(
        "retry_if_exception_message-pattern",
        fail(message="Transient"),
        fail(message="fatal"),
        retry=T.retry_if_exception_message(match=re.compile("transient", re.IGNORECASE)),
    ),
    case(
        "retry_if_not_exception_message",
        E,
        ok(),
        fail(message="fatal"),
        retry=T.retry_if_not_exception_message(message="fatal"),
    ),
    case(
        "retry_if_not_exception_message-runs-out",
        E,
        ok(),
        retry=T.retry_if_not_exception_message(match="fatal"),
        xfail=RESULT_STOPS,
    ),
    case(
        "retry_if_result",
        ok(None),
        ok(None),
        ok(),
        retry=T.retry_if_result(is_none),
        wait=T.wait_fixed(1),
    ),
    case(
        "retry_if_result-exception-not-retried",
        ok(None),
        E,
        retry=T.retry_if_result(is_none),
    ),
    case(
        "retry_if_result-runs-out",
        ok(None),
        retry=T.retry_if_result(is_none),
        xfail=RESULT_STOPS,
    ),
    case(
        "retry_if_not_result",
        ok(1),
        ok(2),
        ok(),
        retry=T.retry_if_not_result(is_ok),
    ),
    case(
        "retry_if_not_result-runs-out",
        ok(1),
        retry=T.retry_if_not_result(is_ok),
        stop=T.stop_after_delay(2),
        wait=T.wait_fixed(0.5),
        xfail=RESULT_STOPS,
    ),
    case(
        "retry_always",
        ok(),
        E,
        fail(KeyError),
        retry=T.retry_always,
        stop=T.stop_after_attempt(3),
    ),
    case("retry_always-runs-out", ok(), retry=T.retry_always, xfail=RESULT_STOPS),
    case("retry_never", retry=T.retry_never),
    case("retry_never-success", ok(), retry=T.retry_never),
    case(
        "retry-or",
        E,
        ok(None),
        fail(OSError),
        ok(None),
        ok(),
        retry=T.retry_if_exception_type((ValueError, OSError)) | T.retry_if_result(is_none),
        stop=T.stop_after_attempt(6),
        wait=T.wait_exponential(multiplier=0.1),
    ),
    case(
        "retry_any",
        fail(message="transient"),
        ok(None),
        fail(KeyError),
        retry=T.retry_any(T.retry_if_exception(transient), T.retry_if_result(is_none)),
    ),
    case(
        "retry-and",
        fail(OSError, "transient"),
        fail(OSError, "transient"),
        fail(ValueError, "transient"),
        retry=T.retry_if_exception_type(OSError) & T.retry_if_exception_message(match="tran"),
    ),
    case(
        "retry_all",
        ok(None),
        ok(None),
        ok(),
        retry=T.retry_all(T.retry_if_result(is_none), T.retry_if_not_result(is_ok)),
    ),
    case("retry-callable", retry=retry_first_two, stop=T.stop_never),
    case("retry-predicate-error-propagates", retry=T.retry_if_exception(broken_predicate)),
    case(
        "retry-callable-or",
        ok(None),
        ok(None),
        E,
        retry=T.retry_if_result(is_none) | retry_first_two,
        stop=T.stop_after_attempt(10),
    ),
    case(
        "TryAgain-with-retry_never",
        fail(T.TryAgain),
        fail(T.TryAgain),
        ok(),
        retry=T.retry_never,
        wait=T.wait_fixed(0.5),
    ),
    case(
        "TryAgain-not-matching-retry",
        fail(T.TryAgain),
        fail(KeyError),
        retry=T.retry_if_exception_type(KeyError) & T.retry_if_exception_message("nope"),
    ),
    case(
        "TryAgain-runs-out",
        fail(T.TryAgain),
        retry=T.retry_if_result(is_none),
        stop=T.stop_after_attempt(3),
    ),
    case(
        "TryAgain-then-result",
        fail(T.TryAgain),
        ok(None),
        ok(),
        retry=T.retry_if_result(is_none),
    ),
    case("TimeoutExceeded-attempt", fail(TimeoutExceeded), ok()),
    case("TimeoutExceeded-deadline", fail(DeadlineExceeded), ok(), xfail=NEVER_RETRIED),
    case("Rejected", fail(BulkheadFull), ok(), xfail=NEVER_RETRIED),
    case(
        "BaseException-not-retried-by-default",
        fail(KeyboardInterrupt),
        retry=T.retry_if_exception_type(),
    ),
    case(
        "KeyboardInterrupt-retried-by-tenacity",
        fail(KeyboardInterrupt),
        retry=T.retry_if_exception_type(BaseException),
        stop=T.stop_after_attempt(3),
        xfail=BASE_EXCEPTIONS,
    ),
    case(
        "CancelledError-retried-by-tenacity",
        fail(asyncio.CancelledError),
        ok(),
        retry=T.retry_if_exception_type(BaseException),
        xfail=BASE_EXCEPTIONS,
    ),
]

CASES = WAITS + STOPS + RETRIES

# tenacity.asyncio strategies, async predicates and async wait/stop callables: async only.
ASYNC_ONLY = [
    case(
        "asyncio.retry_if_result",
        ok(None),
        ok(None),
        ok(),
        retry=tasyncio.retry_if_result(ais_none),
        wait=T.wait_fixed(0.5),
    ),
    case(
        "asyncio.retry_if_result-exception",
        ok(None),
        E,
        retry=tasyncio.retry_if_result(ais_none),
    ),
    case(
        "asyncio.retry_if_result-runs-out",
        ok(None),
        retry=tasyncio.retry_if_result(ais_none),
        xfail=RESULT_STOPS,
    ),
    case(
        "asyncio.retry_if_exception",
        fail(message="transient"),
        fail(message="transient"),
        fail(message="fatal"),
        retry=tasyncio.retry_if_exception(atransient),
        wait=T.wait_random(0, 2),
    ),
    case(
        "asyncio.retry_if_exception-success",
        fail(message="transient"),
        ok(),
        retry=tasyncio.retry_if_exception(atransient),
    ),
    case(
        "asyncio-or-sync",
        fail(message="transient"),
        ok(None),
        fail(message="fatal"),
        retry=tasyncio.retry_if_exception(atransient) | T.retry_if_result(is_none),
    ),
    case(
        "sync-or-asyncio",
        ok(None),
        fail(KeyError),
        ok(),
        retry=T.retry_if_exception_type(KeyError) | tasyncio.retry_if_result(ais_none),
        stop=T.stop_after_delay(10),
        wait=T.wait_exponential(multiplier=1),
    ),
    case(
        "sync-and-asyncio",
        fail(OSError, "transient"),
        fail(ValueError, "transient"),
        retry=T.retry_if_exception_type(OSError) & tasyncio.retry_if_exception(atransient),
    ),
    case(
        "asyncio.retry_any",
        ok(None),
        fail(message="transient"),
        ok(1),
        retry=tasyncio.retry_any(
            tasyncio.retry_if_result(ais_none), tasyncio.retry_if_exception(atransient)
        ),
    ),
    case(
        "asyncio.retry_all",
        fail(message="transient"),
        fail(KeyError, "transient"),
        retry=tasyncio.retry_all(
            T.retry_if_exception_type(ValueError), tasyncio.retry_if_exception(atransient)
        ),
    ),
    case("async-retry-callable", retry=aretry_first_two, stop=T.stop_never),
    case(
        "asyncio-predicate-error-propagates",
        retry=tasyncio.retry_if_exception(abroken_predicate),
    ),
    case("async-wait-callable", wait=await_half_attempt),
    case("async-stop-callable", stop=astop_after_three, wait=T.wait_fixed(1)),
    case(
        "async-all-three",
        ok(None),
        retry=tasyncio.retry_if_result(ais_none) | tasyncio.retry_if_exception(atransient),
        stop=astop_after_three,
        wait=await_half_attempt,
        xfail=RESULT_STOPS,
    ),
]


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES)
def test_sync_same_as_tenacity(c: Case) -> None:
    assert run_reskit(c) == run_tenacity(c)


@pytest.mark.parametrize("c", CASES + ASYNC_ONLY)
async def test_async_same_as_tenacity(c: Case) -> None:
    assert await arun_reskit(c) == await arun_tenacity(c)


def _xfailing(reason: str, params: list[Any]) -> list[Any]:
    """The cases of ``params`` marked xfail for ``reason``, without the mark."""
    return [
        pytest.param(p.values[0], id=p.id)
        for p in params
        if any(mark.kwargs.get("reason") == reason for mark in p.marks)
    ]


@pytest.mark.parametrize("c", _xfailing(RESULT_STOPS, CASES + ASYNC_ONLY))
async def test_result_stops_differ_only_in_outcome(c: Case) -> None:
    """The strict xfails above fail for the documented reason, and only for it."""
    reskit_run, tenacity_run = await arun_reskit(c), await arun_tenacity(c)
    assert reskit_run.attempts == tenacity_run.attempts
    assert reskit_run.sleeps == tenacity_run.sleeps
    assert reskit_run.outcome[0] == "returned"
    assert tenacity_run.outcome[:2] == ("raised elsewhere", "RetryError")


def test_cases_are_not_trivial() -> None:
    """Guard against a helper bug making both sides agree on nothing happening."""
    run = run_tenacity(
        Case((fail(took=0.3),), T.retry_always, T.stop_after_delay(2), T.wait_fixed(0.5))
    )
    assert run == Run(4, [0.5, 0.5, 0.5], ("raised by attempt", 4, "ValueError"))


def test_reused_policy_starts_each_call_afresh() -> None:
    """A second call through the same policy / Retrying has its own start time and attempts."""
    c = Case((fail(took=0.5),), T.retry_always, T.stop_after_delay(1.5), T.wait_fixed(0.25))
    runs: dict[str, list[int]] = {}
    with FakeClock(START) as clock:
        policy = _policy(c)
        retrying = T.Retrying(
            retry=c.retry, stop=c.stop, wait=c.wait, sleep=clock.sleep, reraise=True
        )
        patch = _tenacity_clock(clock)
        try:
            for name, run in (("reskit", policy.call), ("tenacity", retrying)):
                attempts: list[int] = []
                for _ in range(2):
                    clock.advance(10)  # time between the calls must not count
                    script = Script(c.steps, clock)
                    with pytest.raises(ValueError):
                        run(script.call)
                    attempts.append(script.calls)
                runs[name] = attempts
        finally:
            patch.undo()
    assert runs["reskit"] == runs["tenacity"] == [3, 3]


@pytest.mark.parametrize(
    "strategy",
    [
        tasyncio.retry_if_result(ais_none),
        T.retry_if_exception_type() | tasyncio.retry_if_exception(atransient),
    ],
    ids=["asyncio.retry_if_result", "sync-or-asyncio"],
)
def test_async_strategy_on_sync_function_is_refused(strategy: Any) -> None:
    policy = Policy("diff", retry=Retry(retry=strategy, stop=T.stop_after_attempt(3)))
    script = Script((ok(),), FakeClock(START))
    with pytest.raises(TypeError, match="async"):
        policy(script.call)
    with pytest.raises(TypeError, match="async"):
        policy.call(script.call)
    assert script.calls == 0

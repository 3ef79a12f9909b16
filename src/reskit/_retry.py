"""Retries: configuration, the retry budget, and the per-call decision.

The decision (:meth:`RetryCall.next_delay`) is plain code: it never sleeps. The
sync and async drivers in ``_policy.py`` ask it how long to wait and do the
waiting themselves, so the rules are written once.
"""

from __future__ import annotations

import math
import random as _random_module
import threading
from collections.abc import Callable
from datetime import timedelta

import tenacity
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from . import _clock
from ._config import CONFIG, seconds
from ._errors import CircuitOpen, Rejected, RetryBudgetExhausted, TimeoutExceeded

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_WAIT_INITIAL",
    "DEFAULT_WAIT_MAX",
    "Retry",
    "RetryBudget",
    "RetryCall",
]

DEFAULT_ATTEMPTS = 3
DEFAULT_WAIT_INITIAL = 0.1
DEFAULT_WAIT_MAX = 5.0
DEFAULT_BUDGET_RATIO = 0.2
DEFAULT_BUDGET_MIN_PER_SECOND = 3.0
DEFAULT_BUDGET_WINDOW = 10.0

# 2.0 ** 1024 overflows a float; any exponent past 64 is capped anyway.
_MAX_EXPONENT = 64

ExceptionFilter = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]
)


class RetryBudget:
    """A token bucket that keeps retries to a fraction of recent calls.

    Each call deposits ``ratio`` of a token, each retry withdraws one; on top of
    that ``min_per_second`` retries a second are always allowed, so a service
    with little traffic can still retry. Counts cover the last ``window``
    seconds (in one-second buckets), as in Finagle's and Envoy's retry budgets:
    when a dependency fails completely, retries stay near ``ratio`` of calls
    instead of multiplying the load by the attempt count.

    A budget is meant to be shared: pass the same object to every policy that
    calls the same dependency.

    Args:
        ratio: retries allowed per call, ``0 <= ratio <= 1`` (default 0.2).
        min_per_second: retries a second always allowed (default 3).
        window: seconds of history counted (default 10).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_buckets",
        "_calls",
        "_lock",
        "_retries",
        "_second",
        "_total_calls",
        "_total_retries",
        "min_per_second",
        "ratio",
        "window",
    )

    def __init__(
        self,
        ratio: float = DEFAULT_BUDGET_RATIO,
        *,
        min_per_second: float = DEFAULT_BUDGET_MIN_PER_SECOND,
        window: float | timedelta = DEFAULT_BUDGET_WINDOW,
    ) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise ValueError(f"RetryBudget ratio must be between 0 and 1, got {ratio!r}")
        if (
            isinstance(min_per_second, bool)
            or not isinstance(min_per_second, int | float)
            or not min_per_second >= 0
        ):
            raise ValueError(
                f"RetryBudget min_per_second must be >= 0 retries a second, got {min_per_second!r}"
            )
        window_s = seconds(window, "RetryBudget window")
        assert window_s is not None
        if window_s < 1:
            raise ValueError(f"RetryBudget window must be at least 1 second, got {window_s!r}")
        self.ratio = float(ratio)
        self.min_per_second = float(min_per_second)
        self.window = window_s
        self._buckets = math.ceil(window_s)
        self._calls = [0] * self._buckets
        self._retries = [0] * self._buckets
        self._total_calls = 0
        self._total_retries = 0
        self._second: int | None = None
        self._lock = threading.Lock()

    def _rotate(self) -> int:
        """Clear buckets that fell out of the window; return the current index."""
        second = math.floor(_clock.now())
        last = self._second
        n = self._buckets
        if last is None or second - last >= n:
            for i in range(n):
                self._calls[i] = self._retries[i] = 0
            self._total_calls = self._total_retries = 0
        elif second > last:
            for s in range(last + 1, second + 1):
                i = s % n
                self._total_calls -= self._calls[i]
                self._total_retries -= self._retries[i]
                self._calls[i] = self._retries[i] = 0
        if last is None or second > last:
            self._second = second
        return (self._second if self._second is not None else second) % n

    def _deposit(self) -> None:
        with self._lock:
            i = self._rotate()
            self._calls[i] += 1
            self._total_calls += 1

    def _withdraw(self) -> bool:
        with self._lock:
            i = self._rotate()
            allowed = self.min_per_second * self.window + self.ratio * self._total_calls
            if self._total_retries + 1 > allowed:
                return False
            self._retries[i] += 1
            self._total_retries += 1
            return True

    @property
    def calls(self) -> int:
        """Calls counted in the current window."""
        with self._lock:
            self._rotate()
            return self._total_calls

    @property
    def retries(self) -> int:
        """Retries spent in the current window."""
        with self._lock:
            self._rotate()
            return self._total_retries

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )


def _as_predicate(on: ExceptionFilter) -> Callable[[Exception], bool]:
    if isinstance(on, type) and issubclass(on, BaseException):
        return lambda exc: isinstance(exc, on)
    if isinstance(on, tuple):
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TypeError(
                f"Retry on= must be an exception type, a non-empty tuple of them, or a "
                f"predicate taking the exception; got {on!r}"
            )
        return lambda exc: isinstance(exc, on)
    if callable(on):
        return on  # type: ignore[return-value]
    raise TypeError(
        f"Retry on= must be an exception type, a tuple of them, or a predicate taking the "
        f"exception; got {on!r}"
    )


class Retry:
    """How a policy retries a failed attempt.

    Args:
        attempts: total attempts, the first one included (``>= 1``; default 3).
        on: what to retry: an exception type, a tuple of them, or a predicate
            ``(exc) -> bool``. Required unless ``retry=`` is given, because
            retrying every exception is rarely right.
        wait: the wait before each retry: seconds (fixed), a ``timedelta``, or a
            tenacity wait strategy such as ``tenacity.wait_random_exponential(...)``.
            Default: full-jitter exponential backoff, a uniform draw from
            ``[0, min(wait_max, wait_initial * 2 ** (attempt - 1))]``.
        wait_initial: the base of the default backoff (default 0.1 s).
        wait_max: the cap of the default backoff (default 5 s).
        stop: an extra tenacity stop strategy (``tenacity.stop_after_delay(10)``);
            the retry stops when it or ``attempts`` says so.
        retry: a tenacity retry strategy (``tenacity.retry_if_exception_type(...)``)
            used instead of ``on``.
        budget: a shared :class:`RetryBudget`; a retry the budget cannot pay for
            raises :class:`RetryBudgetExhausted` chained to the failure.
        random: the random source for jitter (inject a seeded ``random.Random``
            to make delays exact in tests).

    Some things are never retried, whatever ``on`` says: ``BaseException``\\ s
    that are not ``Exception``\\ s (cancellation, ``KeyboardInterrupt``,
    ``SystemExit``, ``GeneratorExit``), reskit's own rejections (a
    :class:`CircuitOpen` only when the remaining deadline covers its
    ``retry_after``), and a :class:`TimeoutExceeded` for the whole deadline.
    An exception with a ``retry_after`` attribute (seconds, as an HTTP 429 or
    503 carries) waits at least that long, if the deadline allows; with no
    deadline, a ``retry_after`` longer than ``wait_max`` ends the retries.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_predicate",
        "_random",
        "_tenacity_retry",
        "_tenacity_stop",
        "_tenacity_wait",
        "_wait_fixed",
        "attempts",
        "budget",
        "on",
        "retry",
        "stop",
        "wait",
        "wait_initial",
        "wait_max",
    )

    def __init__(
        self,
        attempts: int = DEFAULT_ATTEMPTS,
        on: ExceptionFilter | None = None,
        *,
        wait: float | timedelta | wait_base | None = None,
        wait_initial: float | timedelta = DEFAULT_WAIT_INITIAL,
        wait_max: float | timedelta = DEFAULT_WAIT_MAX,
        stop: stop_base | None = None,
        retry: retry_base | None = None,
        budget: RetryBudget | None = None,
        random: _random_module.Random | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise TypeError(f"Retry attempts must be an int, got {attempts!r}")
        if attempts < 1:
            raise ValueError(
                f"Retry attempts must be >= 1 (the first call counts), got {attempts}; "
                "use attempts=1 for no retries"
            )
        if on is None and retry is None:
            raise TypeError(
                "Retry needs on= (what to retry, e.g. on=(ConnectionError, TimeoutError)) "
                "or a tenacity retry= strategy"
            )
        if on is not None and retry is not None:
            raise TypeError("pass either on= or a tenacity retry= strategy to Retry, not both")
        if stop is not None and not isinstance(stop, stop_base):
            raise TypeError(f"Retry stop= must be a tenacity stop strategy, got {stop!r}")
        if retry is not None and not isinstance(retry, retry_base):
            raise TypeError(f"Retry retry= must be a tenacity retry strategy, got {retry!r}")
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"Retry budget= must be a reskit.RetryBudget, got {budget!r}")
        self.attempts = attempts
        self.on = on
        self.retry = retry
        self.stop = stop
        self.budget = budget
        self.wait = wait
        initial = seconds(wait_initial, "Retry wait_initial", allow_zero=True)
        cap = seconds(wait_max, "Retry wait_max", allow_zero=True)
        assert initial is not None
        assert cap is not None
        if cap < initial:
            raise ValueError(
                f"Retry wait_max ({cap}) must be >= wait_initial ({initial}); raise wait_max"
            )
        self.wait_initial = initial
        self.wait_max = cap
        self._tenacity_wait: wait_base | None = None
        self._wait_fixed: float | None = None
        if isinstance(wait, wait_base):
            self._tenacity_wait = wait
        elif wait is not None:
            self._wait_fixed = seconds(wait, "Retry wait", allow_zero=True)
        self._predicate = _as_predicate(on) if on is not None else None
        self._tenacity_retry = retry
        self._tenacity_stop = stop
        self._random = random if random is not None else _random_module.Random()

    def backoff(self, attempt: int) -> float:
        """The default full-jitter wait after failed attempt number ``attempt``."""
        ceiling = self.wait_initial * 2.0 ** min(attempt - 1, _MAX_EXPONENT)
        return self._random.uniform(0.0, min(self.wait_max, ceiling))

    def __repr__(self) -> str:
        return f"Retry(attempts={self.attempts}, on={self.on!r})"


# tenacity's strategies expect a RetryCallState bound to a Retrying object; one
# inert instance serves every call (strategies only read from it).
_TENACITY_RETRYING = tenacity.Retrying()


class RetryCall:
    """Per-call retry state; created on the first failure, never shared."""

    __slots__ = ("_slept", "_state", "attempt", "policy", "retry", "started")

    def __init__(self, retry: Retry, policy: str, started: float) -> None:
        self.retry = retry
        self.policy = policy
        self.started = started
        self.attempt = 1
        self._slept = 0.0
        self._state: tenacity.RetryCallState | None = None

    def _tenacity_state(self, exc: Exception, now: float) -> tenacity.RetryCallState:
        state = self._state
        if state is None:
            state = self._state = tenacity.RetryCallState(_TENACITY_RETRYING, None, (), {})
            state.start_time = self.started
        state.attempt_number = self.attempt
        state.outcome = tenacity.Future.construct(self.attempt, exc, True)
        state.outcome_timestamp = now
        state.idle_for = self._slept
        return state

    def next_delay(self, exc: Exception, deadline: float | None) -> float | None:
        """Decide what follows the failure ``exc`` of the current attempt.

        Returns the seconds to wait before the next attempt, or ``None`` when
        the caller must re-raise ``exc`` (a note saying why is added when
        retries ran out). Raises :class:`RetryBudgetExhausted` when a retry was
        due but the budget could not pay for it.
        """
        retry = self.retry
        now = _clock.now()
        retry_after: float | None = None
        if isinstance(exc, Rejected):
            # Our own rejections are final, except an open breaker that will
            # half-open before the deadline: waiting for it is the retry.
            if not isinstance(exc, CircuitOpen) or deadline is None or exc.retry_after is None:
                return None
            retry_after = exc.retry_after
        elif isinstance(exc, TimeoutExceeded) and exc.kind == "deadline":
            return None
        else:
            if retry._predicate is not None:
                if not retry._predicate(exc):
                    return None
            elif retry._tenacity_retry is not None and not retry._tenacity_retry(
                self._tenacity_state(exc, now)
            ):
                return None
            retry_after = _retry_after_of(exc)

        attempts = retry.attempts
        if CONFIG.testing:
            attempts = (
                min(attempts, CONFIG.testing_attempts)
                if CONFIG.testing_cap
                else CONFIG.testing_attempts
            )
        if self.attempt >= attempts:
            exc.add_note(f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s)")
            return None
        state = None
        if retry._tenacity_stop is not None:
            state = self._tenacity_state(exc, now)
            if retry._tenacity_stop(state):
                exc.add_note(
                    f"reskit: policy {self.policy!r} stopped after {self.attempt} attempt(s) "
                    "(stop strategy)"
                )
                return None

        if retry._tenacity_wait is not None:
            delay = float(retry._tenacity_wait(state or self._tenacity_state(exc, now)))
        elif retry._wait_fixed is not None:
            delay = retry._wait_fixed
        else:
            delay = retry.backoff(self.attempt)
        if retry_after is not None and retry_after > delay:
            if deadline is None and retry_after > retry.wait_max:
                # Without a deadline nothing else bounds the wait: a hostile or
                # careless "Retry-After: 86400" must not park the caller.
                exc.add_note(
                    f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s): "
                    f"retry_after {retry_after:.3f}s exceeds wait_max {retry.wait_max}s and "
                    "no deadline bounds the wait"
                )
                return None
            delay = retry_after
        if CONFIG.testing:
            delay = 0.0

        if deadline is not None and now + delay >= deadline:
            exc.add_note(
                f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s): "
                f"the deadline leaves no time for a retry in {delay:.3f}s"
            )
            return None
        budget = retry.budget
        if budget is not None and not budget._withdraw():
            raise RetryBudgetExhausted(
                f"policy {self.policy!r}: retry budget exhausted after {self.attempt} attempt(s)",
                policy=self.policy,
            ) from exc
        self.attempt += 1
        self._slept += delay
        return delay


def _retry_after_of(exc: Exception) -> float | None:
    """A trustworthy ``retry_after`` (finite, non-negative seconds) or None."""
    value = getattr(exc, "retry_after", None)
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        return None
    return value

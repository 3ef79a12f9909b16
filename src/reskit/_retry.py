"""Retries: configuration, the retry budget, and the per-call decision.

The decision (:meth:`RetryCall.decide`) is written once, as a *flow*: a
generator that returns the seconds to wait (or ``None`` to stop) and yields only
when a strategy it asked (a ``tenacity.asyncio`` predicate, an async
``on_retry`` hook) returned an awaitable. The sync drivers run a flow with
:func:`run_flow`, the async ones with :func:`arun_flow`; neither sleeps, and
nothing in the decision is written twice (httpx's ``auth_flow`` does the same
for authentication).
"""

from __future__ import annotations

import inspect
import math
import random as _random_module
import threading
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

import tenacity
from tenacity import TryAgain
from tenacity._utils import is_coroutine_callable
from tenacity.asyncio import retry as _async_retry
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from . import _clock, _fork, _telemetry
from ._config import CONFIG, JITTER, MAX_WAIT, Frozen, seconds, setting, window_seconds
from ._errors import CircuitOpen, Rejected, RetryBudgetExhausted, TimeoutExceeded

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_WAIT_INITIAL",
    "DEFAULT_WAIT_MAX",
    "Flow",
    "Retry",
    "RetryBudget",
    "RetryCall",
    "RetryDetails",
    "arun_flow",
    "run_flow",
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

T = TypeVar("T")
#: A decision that may need to await: yields awaitables, is sent their results.
Flow: TypeAlias = Generator[Awaitable[Any], Any, T]


def run_flow(flow: Flow[T]) -> T:
    """Run a flow in a sync call; an awaitable there is a strategy of the wrong kind."""
    try:
        awaitable = flow.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    flow.close()
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    raise TypeError(
        f"a retry strategy or hook returned an awaitable ({awaitable!r}) in a sync call; "
        "async strategies (tenacity.asyncio, async def predicates and hooks) need an async "
        "function"
    )


async def arun_flow(flow: Flow[T]) -> T:
    """Run a flow in an async call, awaiting what it yields."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            awaitable = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as stop:
            result: T = stop.value
            return result
        try:
            value = await awaitable
            error = None  # pragma: no mutate (no flow awaits again after a thrown error)
        except BaseException as exc:  # handed to the flow, which decides whether to raise
            value, error = None, exc


def _ask(strategy: Callable[[Any], Any], argument: Any) -> Flow[Any]:
    """Call a strategy; await its answer through the flow if it is awaitable."""
    answer = strategy(argument)
    if inspect.isawaitable(answer):
        answer = yield answer
    return answer


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
        "__weakref__",
        "_buckets",
        "_calls",
        "_lock",
        "_min_per_second",
        "_ratio",
        "_retries",
        "_second",
        "_total_calls",
        "_total_retries",
        "_window",
    )

    _instead = "Build a new RetryBudget(...) and give it to Retry(budget=...)."

    ratio = setting("_ratio", "Retries allowed per call (0 to 1).")
    min_per_second = setting("_min_per_second", "Retries a second always allowed.")
    window = setting("_window", "Seconds of history counted.")

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
        window_seconds(window_s, "RetryBudget window")
        self._ratio = float(ratio)
        self._min_per_second = float(min_per_second)
        self._window = window_s
        self._buckets = math.ceil(window_s)
        # pragma: no mutate start (the first _rotate() clears them: _second is None)
        self._calls = [0] * self._buckets
        self._retries = [0] * self._buckets
        self._total_calls = 0
        self._total_retries = 0
        # pragma: no mutate end
        self._second: int | None = None
        self._lock = threading.Lock()
        _fork.track(self)

    def _after_fork(self) -> None:
        # pragma: no mutate start (runs only in a forked child, where mutmut cannot link it to
        # a test; tests/test_mutation_fork.py checks it)
        self._lock = threading.Lock()
        # pragma: no mutate end

    def _rotate(self) -> int:
        """Clear buckets that fell out of the window; return the current index."""
        second = math.floor(_clock.now())
        last = self._second
        n = self._buckets
        if last is None or second - last >= n:  # pragma: no mutate (> n: the loop clears all n)
            for i in range(n):
                self._calls[i] = self._retries[i] = 0
            self._total_calls = self._total_retries = 0
        elif second > last:  # pragma: no mutate (>=: the loop is then empty)
            for s in range(last + 1, second + 1):
                i = s % n
                self._total_calls -= self._calls[i]
                self._total_retries -= self._retries[i]
                self._calls[i] = self._retries[i] = 0
        if last is None or second > last:  # pragma: no mutate (>= stores the same second)
            self._second = second
        # The clock is monotonic, so here _second == second.
        return (self._second if self._second is not None else second) % n  # pragma: no mutate

    def _deposit(self) -> None:
        with self._lock:
            i = self._rotate()
            self._calls[i] += 1
            self._total_calls += 1

    def _withdraw(self) -> bool:
        with self._lock:
            i = self._rotate()
            allowed = self._min_per_second * self._window + self._ratio * self._total_calls
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
            f"RetryBudget(ratio={self._ratio}, min_per_second={self._min_per_second}, "
            f"window={self._window})"
        )


def _sync_predicate(on: ExceptionFilter, what: str) -> Callable[[Exception], bool]:
    """Like :func:`_as_predicate`, for filters asked where nothing can be awaited."""
    if not isinstance(on, type | tuple) and is_coroutine_callable(on):
        raise TypeError(
            f"{what} must be an exception type, a tuple of them, or a plain function: "
            f"it is asked where nothing can be awaited, so an async def predicate ({on!r}) "
            "would count as true for every exception"
        )
    return _as_predicate(on)


class _Matches:
    """``isinstance(exc, types)`` as a predicate (a class, so a Retry can be pickled)."""

    __slots__ = ("types",)

    def __init__(self, types: type[BaseException] | tuple[type[BaseException], ...]) -> None:
        self.types = types

    def __call__(self, exc: BaseException) -> bool:
        return isinstance(exc, self.types)


def _as_predicate(on: ExceptionFilter) -> Callable[[Exception], bool]:
    if isinstance(on, type) and issubclass(on, BaseException):
        return _Matches(on)
    if isinstance(on, tuple):
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TypeError(
                f"Retry on= must be an exception type, a non-empty tuple of them, or a "
                f"predicate taking the exception; got {on!r}"
            )
        return _Matches(on)
    if callable(on):
        return on  # type: ignore[return-value]
    raise TypeError(
        f"Retry on= must be an exception type, a tuple of them, or a predicate taking the "
        f"exception; got {on!r}"
    )


# tenacity's retry strategies that return False for a successful attempt, whatever
# it returned: with only these, a success never needs a retry decision.
_EXCEPTION_ONLY_CALLS = frozenset(
    {
        tenacity.retry_if_exception.__call__,
        tenacity.retry_if_exception_cause_type.__call__,
        type(tenacity.retry_never).__call__,
        _async_retry.retry_if_exception.__call__,
    }
)
_COMBINATIONS = (
    tenacity.retry_any,
    tenacity.retry_all,
    _async_retry.retry_any,
    _async_retry.retry_all,
)


def _may_retry_a_success(strategy: Any) -> bool:
    """Whether a tenacity retry strategy can ask to retry an attempt that returned."""
    # pragma: no mutate start (a wrong "yes" only costs asking about a success, which an
    # exception-only strategy answers with "no" anyway)
    if isinstance(strategy, _COMBINATIONS):
        return any(_may_retry_a_success(child) for child in strategy.retries)
    return type(strategy).__call__ not in _EXCEPTION_ONLY_CALLS
    # pragma: no mutate end


def _async_parts(strategy: Any) -> bool:
    """Whether a strategy (or a part of a tenacity combination) is a coroutine function."""
    if is_coroutine_callable(strategy):
        return True
    if isinstance(strategy, tenacity.retry_any | tenacity.retry_all) and any(
        _async_parts(child) for child in strategy.retries
    ):
        # tenacity's own sync combinations would treat the coroutine as "true".
        raise TypeError(
            f"{type(strategy).__name__} combines an async retry strategy with sync ones; "
            "combine them with | or & (tenacity then builds tenacity.asyncio's combination)"
        )
    return False


def _callable_strategy(value: Any, base: type, what: str, example: str) -> Any:
    if value is None or isinstance(value, base):
        return value
    if isinstance(value, type) or not callable(value):
        raise TypeError(
            f"Retry {what}= must be a tenacity {what} strategy ({example}), got {value!r}"
        )
    return value


class Retry(Frozen):
    """How a policy retries a failed attempt.

    Args:
        attempts: total attempts, the first one included (``>= 1``). Default: 3,
            or unlimited when a tenacity ``stop=`` is given (then ``stop``
            alone decides, as in tenacity; pass both and either one stops).
        on: what to retry: an exception type, a tuple of them, or a predicate
            ``(exc) -> bool``.
        on_result: a predicate ``(result) -> bool``: retry while it is true.
            After the last attempt the last result is returned (not raised), and
            the call is reported as a failure. Async functions may pass an
            ``async def`` predicate.
        wait: the wait before each retry: seconds (fixed), a ``timedelta``, or a
            tenacity wait strategy such as ``tenacity.wait_random_exponential(...)``.
            Default: full-jitter exponential backoff, a uniform draw from
            ``[0, min(wait_max, wait_initial * 2 ** (attempt - 1))]``.
        wait_initial: the base of the default backoff (default 0.1 s).
        wait_max: the cap of the default backoff, and the longest ``retry_after``
            honoured when no deadline bounds the wait (default 5 s).
        stop: a tenacity stop strategy (``tenacity.stop_after_delay(10)``,
            ``stop_before_delay``, combinations with ``|`` and ``&``).
        retry: a tenacity retry strategy (``tenacity.retry_if_exception_type(...)``,
            ``retry_if_result``, ``tenacity.asyncio`` strategies with async
            predicates, combinations with ``|`` and ``&``) used instead of ``on``
            and ``on_result``. It is asked after every attempt, successful ones
            included, exactly as tenacity asks it.
        budget: a shared :class:`RetryBudget`; a retry the budget cannot pay for
            raises :class:`RetryBudgetExhausted` chained to the failure.
        on_retry: a hook called with a :class:`RetryDetails` before each wait
            (tenacity's ``before_sleep``). What it raises is logged and ignored.
        random: the random source for the default jitter (inject a seeded
            ``random.Random`` to make delays exact in tests).

    At least one of ``on``, ``on_result`` and ``retry`` is required to protect
    a function (a policy with a ``Retry`` without one raises :class:`TypeError`
    when it is applied), because retrying everything is rarely right. Only
    :mod:`reskit.httpx`'s transports take one without: they supply the HTTP
    failures to retry themselves. Some things are never retried, whatever
    they say: ``BaseException``\\ s that are not ``Exception``\\ s
    (cancellation, ``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``),
    reskit's own rejections (a :class:`CircuitOpen` only when the remaining
    deadline covers its ``retry_after``), and a :class:`TimeoutExceeded` for
    the whole deadline. tenacity's ``TryAgain`` raised by the function is always
    retried. An exception with a ``retry_after`` attribute (seconds, as an HTTP
    429 or 503 carries) waits at least that long, if the deadline allows; with
    no deadline, a ``retry_after`` longer than ``wait_max`` ends the retries.

    A ``Retry`` is frozen; :meth:`replace` returns a changed copy.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_attempts_given",
        "_inspects_results",
        "_is_async",
        "_predicate",
        "_random",
        "_tenacity_retry",
        "_tenacity_stop",
        "_tenacity_wait",
        "_timed",
        "_wait_fixed",
        "attempts",
        "budget",
        "on",
        "on_result",
        "on_retry",
        "random",
        "retry",
        "stop",
        "wait",
        "wait_initial",
        "wait_max",
    )

    _instead = "Use retry.replace({name}=...) and policy.replace(retry=...) for a changed copy."

    attempts: int | None
    on: ExceptionFilter | None
    on_result: Callable[[Any], Any] | None
    wait: float | timedelta | wait_base | Callable[[Any], float] | None
    wait_initial: float
    wait_max: float
    stop: stop_base | Callable[[Any], Any] | None
    retry: retry_base | Callable[[Any], Any] | None
    budget: RetryBudget | None
    on_retry: Callable[[RetryDetails], Any] | None
    random: _random_module.Random | None
    _attempts_given: int | None
    _predicate: Callable[[Exception], bool] | None
    _random: _random_module.Random
    _tenacity_retry: Any
    _tenacity_stop: Any
    _tenacity_wait: Any
    _wait_fixed: float | None
    _inspects_results: bool
    _is_async: bool
    _timed: bool

    def __init__(
        self,
        attempts: int | None = None,
        on: ExceptionFilter | None = None,
        *,
        on_result: Callable[[Any], bool] | None = None,
        wait: float | timedelta | wait_base | Callable[[Any], float] | None = None,
        wait_initial: float | timedelta = DEFAULT_WAIT_INITIAL,
        wait_max: float | timedelta = DEFAULT_WAIT_MAX,
        stop: stop_base | Callable[[Any], bool] | None = None,
        retry: retry_base | Callable[[Any], bool] | None = None,
        budget: RetryBudget | None = None,
        on_retry: Callable[[RetryDetails], Any] | None = None,
        random: _random_module.Random | None = None,
    ) -> None:
        if attempts is not None:
            if isinstance(attempts, bool) or not isinstance(attempts, int):
                raise TypeError(f"Retry attempts must be an int, got {attempts!r}")
            if attempts < 1:
                raise ValueError(
                    f"Retry attempts must be >= 1 (the first call counts), got {attempts}; "
                    "use attempts=1 for no retries"
                )
        if retry is not None and (on is not None or on_result is not None):
            raise TypeError(
                "pass either on=/on_result= or a tenacity retry= strategy to Retry, not both; "
                "tenacity combines conditions with | (e.g. retry_if_exception_type(...) | "
                "retry_if_result(...))"
            )
        stop = _callable_strategy(stop, stop_base, "stop", "e.g. tenacity.stop_after_delay(10)")
        retry = _callable_strategy(
            retry, retry_base, "retry", "e.g. tenacity.retry_if_exception_type(OSError)"
        )
        if on_result is not None and not callable(on_result):
            raise TypeError(
                f"Retry on_result= must be a predicate on the result, got {on_result!r}"
            )
        if on_retry is not None and not callable(on_retry):
            raise TypeError(
                f"Retry on_retry= must be callable with a RetryDetails, got {on_retry!r}"
            )
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"Retry budget= must be a reskit.RetryBudget, got {budget!r}")
        if random is not None and not isinstance(random, _random_module.Random):
            raise TypeError(f"Retry random= must be a random.Random, got {random!r}")
        initial = seconds(wait_initial, "Retry wait_initial", allow_zero=True, waited=True)
        cap = seconds(wait_max, "Retry wait_max", allow_zero=True, waited=True)
        assert initial is not None
        assert cap is not None
        if cap < initial:
            raise ValueError(
                f"Retry wait_max ({cap}) must be >= wait_initial ({initial}); raise wait_max"
            )
        tenacity_wait: Any = None
        wait_fixed: float | None = None
        if isinstance(wait, wait_base):
            tenacity_wait = wait
        elif wait is None:
            pass
        elif isinstance(wait, timedelta | int | float):
            wait_fixed = seconds(wait, "Retry wait", allow_zero=True, waited=True)
        elif callable(wait) and not isinstance(wait, type):
            tenacity_wait = wait
        else:
            raise TypeError(
                "Retry wait= must be seconds, a timedelta or a tenacity wait strategy, "
                f"got {wait!r}"
            )
        # pragma: no mutate start (None and exception types are never async, so the filter
        # is an optimisation)
        is_async = any(
            _async_parts(part)
            for part in (on, on_result, tenacity_wait, stop, retry, on_retry)
            if part is not None and not isinstance(part, type | tuple)
        )
        # pragma: no mutate end

        limit = attempts if attempts is not None or stop is not None else DEFAULT_ATTEMPTS
        init = object.__setattr__
        init(self, "attempts", limit)
        init(self, "_attempts_given", attempts)
        init(self, "on", on)
        init(self, "on_result", on_result)
        init(self, "wait", wait)
        init(self, "wait_initial", initial)
        init(self, "wait_max", cap)
        init(self, "stop", stop)
        init(self, "retry", retry)
        init(self, "budget", budget)
        init(self, "on_retry", on_retry)
        init(self, "random", random)
        init(self, "_predicate", _as_predicate(on) if on is not None else None)
        init(self, "_tenacity_retry", retry)
        init(self, "_tenacity_stop", stop)
        init(self, "_tenacity_wait", tenacity_wait)
        init(self, "_wait_fixed", wait_fixed)
        # pragma: no mutate start (see _may_retry_a_success: a wrong "yes" is safe)
        init(
            self,
            "_inspects_results",
            on_result is not None or (retry is not None and _may_retry_a_success(retry)),
        )
        # pragma: no mutate end
        init(self, "_is_async", is_async)
        # tenacity's strategies may read the time since the call began: only then
        # is the start worth a clock read on the success path.
        init(self, "_timed", retry is not None or stop is not None or tenacity_wait is not None)
        init(self, "_random", random if random is not None else JITTER)

    def backoff(self, attempt: int) -> float:
        """The default full-jitter wait after failed attempt number ``attempt``.

        .. versionadded:: 0.1.0
        """
        ceiling = self.wait_initial * 2.0 ** min(attempt - 1, _MAX_EXPONENT)
        return self._random.uniform(0.0, min(self.wait_max, ceiling))

    def replace(self, **changes: Any) -> Retry:
        """Return a copy with ``changes`` applied (the arguments of :class:`Retry`).

        .. versionadded:: 0.1.0
        """
        fields = {name: getattr(self, name) for name in _RETRY_FIELDS}
        # A default attempt count must stay a default: with a new stop= it gives way.
        fields["attempts"] = self._attempts_given
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(
                f"Retry.replace() got unknown field(s) {', '.join(sorted(unknown))}; "
                f"the fields are {', '.join(_RETRY_FIELDS)}"
            )
        fields.update(changes)
        return Retry(**fields)

    def __repr__(self) -> str:
        parts = [f"attempts={self.attempts}"]
        for name in ("on", "on_result", "retry", "stop", "wait"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        return f"Retry({', '.join(parts)})"


_RETRY_FIELDS = (
    "attempts",
    "on",
    "on_result",
    "wait",
    "wait_initial",
    "wait_max",
    "stop",
    "retry",
    "budget",
    "on_retry",
    "random",
)


@dataclass(frozen=True, slots=True)
class RetryDetails:
    """What an ``on_retry`` hook receives before each wait.

    Attributes:
        policy: the policy's name.
        attempt: the number of the attempt that just failed (1 for the first).
        wait: the seconds reskit is about to wait before the next attempt.
        waited_so_far: the seconds already waited between earlier attempts.
        exception: what the attempt raised, or ``None`` when its result asked
            for the retry (``on_result``, tenacity's ``retry_if_result``).
        result: what the attempt returned, when ``exception`` is ``None``.

    .. versionadded:: 0.1.0
    """

    policy: str
    attempt: int
    wait: float
    waited_so_far: float
    exception: BaseException | None
    result: Any = None


# tenacity's strategies expect a RetryCallState bound to a Retrying object; one
# inert instance serves every call (strategies only read from it).
_TENACITY_RETRYING = tenacity.Retrying()


class RetryCall:
    """Per-call retry state; created on the first decision, never shared.

    ``asked`` becomes true when the retry condition held for the last outcome,
    so a result returned after the last attempt can be reported as a failure.
    """

    __slots__ = (
        "_call",
        "_state",
        "asked",
        "attempt",
        "cid_token",
        "policy",
        "retry",
        "slept",
        "started",
    )

    def __init__(
        self,
        retry: Retry,
        policy: str,
        started: float,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.retry = retry
        self.policy = policy
        self.started = started
        # pragma: no mutate start (the engine always passes a dict)
        self._call = (fn, args, kwargs if kwargs is not None else {})
        # pragma: no mutate end
        self.attempt = 1
        self.slept = 0.0
        self.asked = False  # pragma: no mutate (decide() sets it before anyone reads it)
        # A correlation ID the engine made for this call's events, reset when it ends.
        self.cid_token: Any = None
        self._state: tenacity.RetryCallState | None = None

    def _tenacity_state(
        self, exc: BaseException | None, result: Any, now: float
    ) -> tenacity.RetryCallState:
        state = self._state
        if state is None:
            # pragma: no mutate start (no tenacity strategy reads retry_object)
            state = self._state = tenacity.RetryCallState(_TENACITY_RETRYING, *self._call)
            # pragma: no mutate end
            state.start_time = self.started
        state.attempt_number = self.attempt
        if exc is not None:
            state.outcome = tenacity.Future.construct(self.attempt, exc, True)
        else:
            # pragma: no mutate start (None is as false as False for has_exception)
            state.outcome = tenacity.Future.construct(self.attempt, result, False)
            # pragma: no mutate end
        state.outcome_timestamp = now
        state.idle_for = self.slept
        # upcoming_sleep keeps the previous wait until the next one is computed, as in
        # tenacity (a "decorrelated jitter" wait reads it).
        return state

    def decide(
        self, exc: BaseException | None, result: Any, deadline: float | None
    ) -> Flow[float | None]:
        """Decide what follows the outcome of the current attempt.

        The outcome is ``exc`` (an ``Exception`` the attempt raised) or, when
        ``exc`` is ``None``, the ``result`` it returned. Returns (as a flow) the
        seconds to wait before the next attempt, or ``None`` when the outcome
        stands: the caller re-raises ``exc`` (a note says why when retries ran
        out) or returns ``result``. Raises :class:`RetryBudgetExhausted` when a
        retry was due but the budget could not pay for it.
        """
        retry = self.retry
        now = _clock.now()
        retry_after: float | None = None
        self.asked = False  # pragma: no mutate (None reads as false too)
        testing = CONFIG.testing
        state: tenacity.RetryCallState | None = None
        if exc is not None:
            if isinstance(exc, Rejected):
                # Our own rejections are final, except an open breaker that will
                # half-open before the deadline: waiting for it is the retry.
                if not isinstance(exc, CircuitOpen) or deadline is None or exc.retry_after is None:
                    return None
                # pragma: no mutate start (None: _retry_after_of reads the same attribute)
                retry_after = exc.retry_after
                # pragma: no mutate end
            elif isinstance(exc, TimeoutExceeded) and exc.kind == "deadline":
                return None
            elif isinstance(exc, TryAgain):
                pass  # tenacity's explicit retry, whatever the condition says
            elif retry._predicate is not None:
                if not (yield from _ask(retry._predicate, exc)):
                    return None
            elif retry._tenacity_retry is not None:
                state = self._tenacity_state(exc, None, now)
                if not (yield from _ask(retry._tenacity_retry, state)):
                    return None
            else:
                return None  # only on_result was given: exceptions stand
            if retry_after is None:
                retry_after = _retry_after_of(exc)
        elif retry.on_result is not None:
            if not (yield from _ask(retry.on_result, result)):
                return None
        elif retry._tenacity_retry is not None:
            state = self._tenacity_state(None, result, now)
            if not (yield from _ask(retry._tenacity_retry, state)):
                return None
        else:
            return None
        self.asked = True

        limit = retry.attempts
        if testing:
            cap = CONFIG.testing_attempts
            limit = min(limit, cap) if CONFIG.testing_cap and limit is not None else cap
        if limit is not None and self.attempt >= limit:
            _note(exc, f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s)")
            return None

        if retry._tenacity_wait is not None:
            if state is None:
                state = self._tenacity_state(exc, result, now)
            delay = float((yield from _ask(retry._tenacity_wait, state)))
        elif retry._wait_fixed is not None:
            delay = retry._wait_fixed
        else:
            delay = retry.backoff(self.attempt)
        if not 0.0 <= delay <= MAX_WAIT:  # NaN fails too
            if delay < 0.0:  # pragma: no mutate (<= 0.0 or < 1.0: delay is < 0, > MAX or NaN)
                delay = 0.0
            else:
                _note(
                    exc,
                    f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s): "
                    f"the wait strategy asked for {delay!r}s, longer than the platform can wait",
                )
                return None
        if state is not None:
            # As in tenacity, with or without a stop strategy: the next wait may read it.
            state.upcoming_sleep = delay
        if retry._tenacity_stop is not None and not testing:
            if state is None:
                state = self._tenacity_state(exc, result, now)
            # tenacity computes the wait first, so stop_before_delay can see it.
            state.upcoming_sleep = delay
            if (yield from _ask(retry._tenacity_stop, state)):
                _note(
                    exc,
                    f"reskit: policy {self.policy!r} stopped after {self.attempt} attempt(s) "
                    "(stop strategy)",
                )
                return None
        if retry_after is not None and retry_after > delay:
            if deadline is None and retry_after > retry.wait_max and not testing:
                # Without a deadline nothing else bounds the wait: a hostile or
                # careless "Retry-After: 86400" must not park the caller.
                _note(
                    exc,
                    f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s): "
                    f"retry_after {retry_after:.3f}s exceeds wait_max {retry.wait_max}s and "
                    "no deadline bounds the wait",
                )
                return None
            delay = retry_after
        if testing:
            delay = 0.0
        if deadline is not None and now + delay >= deadline:
            _note(
                exc,
                f"reskit: policy {self.policy!r} gave up after {self.attempt} attempt(s): "
                f"the deadline leaves no time for a retry in {delay:.3f}s",
            )
            return None
        budget = retry.budget
        if budget is not None and not budget._withdraw():
            error = RetryBudgetExhausted(
                f"policy {self.policy!r}: retry budget exhausted after {self.attempt} attempt(s)",
                policy=self.policy,
            )
            if exc is not None:
                raise error from exc
            raise error
        hook = retry.on_retry
        if hook is not None:
            details = RetryDetails(self.policy, self.attempt, delay, self.slept, exc, result)
            try:
                yield from _ask(hook, details)
            except Exception as failed:
                _telemetry.report(f"the on_retry hook of policy {self.policy!r}", failed)
        self.attempt += 1
        self.slept += delay
        return delay


def _note(exc: BaseException | None, note: str) -> None:
    if exc is not None:
        exc.add_note(note)


def _retry_after_of(exc: BaseException) -> float | None:
    """A trustworthy ``retry_after`` (finite, non-negative seconds) or None."""
    value = getattr(exc, "retry_after", None)
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:  # pragma: no mutate (<= 0: 0 lengthens no wait)
        return None
    return value


def require_condition(retry: Retry) -> None:
    """Refuse a ``Retry`` that names nothing to retry, where a function is protected."""
    if retry._predicate is None and retry.retry is None and retry.on_result is None:
        raise TypeError(
            "Retry needs on= (what to retry, e.g. on=(ConnectionError, TimeoutError)), "
            "on_result= (a predicate on the result), or a tenacity retry= strategy; only "
            "reskit.httpx's transports take a Retry without one"
        )

"""The circuit breaker: closed, open, half-open, decided without I/O.

A breaker is a gate (``_gate.py``): the Policy engine drives it through two
calls per attempt::

    permit = breaker.admit(policy_name)      # may raise CircuitOpen
    try:
        ...the attempt...
    finally:
        breaker.record(permit, exc, duration, result)

Both are plain decisions over a few counters: no waiting, no I/O, and the lock
is held only while counters and the state move. It is never held across the
protected call (pybreaker holds its lock across the call, which serialises every
thread) and never while listeners, logs or spans run: transitions are decided
under the lock and announced after it is released, so two threads that cross a
threshold together produce exactly one transition.

Each state change starts a new *phase*. A permit remembers its phase, so a call
that started in an older phase (a slow call admitted while closed that finishes
after the breaker opened) cannot move the state.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Final

from tenacity._utils import is_coroutine_callable

from . import _clock, _fork, _telemetry
from ._config import seconds, setting
from ._config import window_seconds as check_window
from ._context import _correlation_id, new_correlation_id
from ._errors import CircuitOpen, Rejected

__all__ = ["BreakerState", "CircuitBreaker"]

DEFAULT_FAIL_MAX: Final = 5
DEFAULT_RESET_TIMEOUT: Final = 60.0
DEFAULT_WINDOW: Final = 100
DEFAULT_MINIMUM_CALLS: Final = 10

#: What ``exclude=`` accepts: exception classes, or predicates taking the exception.
ExcludeItem = type[BaseException] | Callable[[BaseException], bool]


class BreakerState(enum.StrEnum):
    """The state of a :class:`CircuitBreaker`.

    ``CLOSED`` admits every call and counts failures; ``OPEN`` rejects calls
    with :class:`~reskit.CircuitOpen` until ``reset_timeout`` has passed;
    ``HALF_OPEN`` admits a few probe calls to decide whether to close again.
    ``FORCED_OPEN`` (from :meth:`CircuitBreaker.force_open`) rejects every call
    until a manual change; ``DISABLED`` (from :meth:`CircuitBreaker.disable`)
    admits every call and records nothing.

    The members are strings (a :class:`enum.StrEnum`), so
    ``breaker.state == "open"`` and ``f"{breaker.state}"`` work.

    .. versionadded:: 0.1.0
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
_FORCED_OPEN: Final = BreakerState.FORCED_OPEN
_DISABLED: Final = BreakerState.DISABLED

# The reskit.breaker.state gauge: 0 closed, 1 half-open, 2 open. A forced-open
# breaker rejects like an open one and a disabled one admits like a closed one,
# so dashboards and alerts keyed on the three documented values stay right.
_GAUGE_VALUE: Final = {_CLOSED: 0, _HALF_OPEN: 1, _OPEN: 2, _FORCED_OPEN: 2, _DISABLED: 0}

_LOG_EVENT: Final = {
    _CLOSED: "reskit.breaker.closed",
    _OPEN: "reskit.breaker.opened",
    _HALF_OPEN: "reskit.breaker.half_opened",
    _FORCED_OPEN: "reskit.breaker.opened",
    _DISABLED: "reskit.breaker.disabled",
}


class _ListenerState:
    """Stands in for pybreaker's state objects in ``state_change`` callbacks.

    pybreaker listeners read ``state.name`` and compare it with
    ``pybreaker.STATE_OPEN`` and friends, so ``name`` uses pybreaker's spelling
    (``"half-open"``); ``state`` is the :class:`BreakerState`.
    """

    __slots__ = ("name", "state")

    def __init__(self, name: str, state: BreakerState) -> None:
        # pragma: no mutate start (runs at import, before mutmut switches a mutant on)
        self.name = name
        self.state = state
        # pragma: no mutate end

    def __repr__(self) -> str:
        return f"<breaker state {self.name}>"


_LISTENER_STATE: Final = {
    _CLOSED: _ListenerState("closed", _CLOSED),
    _OPEN: _ListenerState("open", _OPEN),
    _HALF_OPEN: _ListenerState("half-open", _HALF_OPEN),
    _FORCED_OPEN: _ListenerState("forced-open", _FORCED_OPEN),
    _DISABLED: _ListenerState("disabled", _DISABLED),
}


class _Phase:
    """One stretch of time in one state; a new object on every state change.

    A closed-state permit *is* the phase object, so admitting a call in the
    closed state allocates nothing, and "did the state change since this call
    was admitted?" is one identity check.
    """

    __slots__ = ("closed", "open", "state")

    def __init__(self, state: BreakerState) -> None:
        self.state = state
        self.closed = state is _CLOSED
        self.open = state is _OPEN

    def __repr__(self) -> str:
        return f"<breaker phase {self.state.value} at {id(self):#x}>"


class _Probe:
    """A half-open permit: one probe slot, taken until it is recorded or expires."""

    __slots__ = ("lease", "phase", "started")

    def __init__(self, phase: _Phase, started: float, lease: object = None) -> None:
        self.phase = phase
        self.started = started
        # A shared breaker's fleet-wide probe lease (see reskit.stores.redis).
        self.lease = lease


_Permit = _Phase | _Probe

_SUCCESS: Final = 0
_FAILURE: Final = 1
_NEITHER: Final = 2

# Outcome flags stored in a window: bit 0 a failure, bit 1 a slow call.
_F_FAILURE: Final = 1
_F_SLOW: Final = 2


class _CountWindow:
    """The outcomes of the last ``size`` calls, with running totals.

    The ring fills as calls come (memory follows use, not ``window``), then
    wraps: the oldest outcome is overwritten.
    """

    __slots__ = ("_pos", "_ring", "_size", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._ring = bytearray()
        self._size = size
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, flags: int, now: float) -> None:
        ring = self._ring
        if self.calls < self._size:
            ring.append(flags)
            self.calls += 1
        else:
            pos = self._pos
            old = ring[pos]
            self.failures -= old & _F_FAILURE
            self.slow -= old >> 1
            ring[pos] = flags
            self._pos = pos + 1 if pos + 1 < self._size else 0
        self.failures += flags & _F_FAILURE
        self.slow += flags >> 1


class _TimeWindow:
    """Call counts over the last ``size`` seconds, in one-second buckets."""

    __slots__ = ("_calls", "_failures", "_second", "_slow", "calls", "failures", "slow")

    def __init__(self, size: int, now: float) -> None:
        self._calls = [0] * size
        self._failures = [0] * size
        self._slow = [0] * size
        self._second = math.floor(now)
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def roll(self, now: float) -> None:
        """Forget the buckets that fell out of the window by ``now``."""
        second = math.floor(now)
        last = self._second
        if second <= last:  # pragma: no mutate (<: for the same second the loop is empty)
            return
        size = len(self._calls)
        # A long quiet spell clears at most every bucket once, however long it was. (Clearing
        # more seconds than size would clear some buckets twice, subtracting nothing.)
        for sec in range(max(last + 1, second - size + 1), second + 1):  # pragma: no mutate
            i = sec % size
            self.calls -= self._calls[i]
            self.failures -= self._failures[i]
            self.slow -= self._slow[i]
            self._calls[i] = self._failures[i] = self._slow[i] = 0
        self._second = second

    def add(self, flags: int, now: float) -> None:
        self.roll(now)
        i = self._second % len(self._calls)
        failure = flags & _F_FAILURE
        slow = flags >> 1
        self._calls[i] += 1
        self._failures[i] += failure
        self._slow[i] += slow
        self.calls += 1
        self.failures += failure
        self.slow += slow


_Window = _CountWindow | _TimeWindow
# (old state, new state, reason), decided under the lock, announced after it.
_Transition = tuple[BreakerState, BreakerState, str]

_NO_ARGS: Final[tuple[Any, ...]] = ()
_unnamed = itertools.count(1)


def _rejection(message: str, policy: str | None, retry_after: float | None) -> CircuitOpen:
    """Build the same :class:`CircuitOpen` as its constructor, at half the cost.

    Rejecting is the whole job of an open breaker, and the Python-level
    ``ReskitError.__init__`` chain costs about as much as the rest of the
    rejection put together. ``BaseException.__new__`` sets ``args`` exactly as
    ``__init__`` would; a test keeps the attributes in step with the constructor.
    """
    exc = _new_exception(CircuitOpen, message)
    exc.policy = policy
    exc.retry_after = retry_after
    return exc


_new_exception = CircuitOpen.__new__


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def _fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number between 0 and 1, got {value!r}")
    # Written so that NaN fails the check too.
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"{what} must be > 0 and <= 1 (a fraction of calls, e.g. 0.5 for 50%), got {value!r}"
        )
    return float(value)


def _duration(value: float | timedelta, what: str) -> float:
    if value is None:
        raise TypeError(f"{what} must be a number of seconds or a timedelta, got None")
    converted = seconds(value, what)
    assert converted is not None
    return converted


class CircuitBreaker:
    """Stop calling a dependency that keeps failing, and probe it again later.

    A breaker starts **closed** and counts the outcomes of the calls it
    admits. When they look bad it **opens**: every call is rejected at once
    with :class:`~reskit.CircuitOpen` (whose ``retry_after`` says how long is
    left) instead of waiting on a dependency that is down. After
    ``reset_timeout`` it turns **half-open** and admits up to
    ``half_open_max_calls`` probe calls at a time: ``success_threshold``
    successful probes close it, one failed probe opens it again.

    What "looks bad" means depends on the mode:

    - **consecutive** (the default, pybreaker's rule): ``fail_max`` failures in
      a row open the breaker; any success resets the count.
    - **rate**, when ``failure_rate`` is given: the breaker opens when at least
      that fraction of the calls in the window failed, once the window holds
      ``minimum_calls`` calls. The window is the last ``window`` calls, or the
      last ``window_seconds`` seconds when that is given. ``fail_max`` is not
      used in rate mode.
    - **slow calls**, in either mode, when ``slow_call_duration`` is given: the
      breaker also opens when at least ``slow_call_rate`` of the calls in the
      window took ``slow_call_duration`` seconds or more (successful or not),
      and a slow probe counts as a failed probe.

    A call counts as a **success** when it returns (unless ``on_result`` says
    the result is a failure) or raises an exception matched by ``exclude``
    (pybreaker's rule: excluded exceptions are business errors, not a sign the
    dependency is down). Any other ``Exception`` is a **failure**.
    ``BaseException``\\ s that are not ``Exception``\\ s
    (``asyncio.CancelledError``, ``KeyboardInterrupt``, ``SystemExit``,
    ``GeneratorExit``) and reskit's own rejections count as **neither**: they
    only give back a half-open probe slot.

    Pass the breaker to a policy: ``Policy("payments", breaker=CircuitBreaker())``.
    One breaker can be shared by several policies that call the same
    dependency.

    Args:
        fail_max: consecutive failures that open the breaker (``>= 1``; default
            5). Consecutive mode only.
        reset_timeout: seconds (or a ``timedelta``) the breaker stays open before
            it turns half-open (default 60).
        exclude: exception classes, or predicates ``(exc) -> bool``, whose
            exceptions count as successes.
        success_threshold: successful probes needed to close a half-open breaker
            (default 1).
        listeners: objects with any of the methods ``state_change(cb, old, new)``,
            ``failure(cb, exc)``, ``success(cb)`` and
            ``before_call(cb, func, *args, **kwargs)``; ``pybreaker``'s
            ``CircuitBreakerListener`` subclasses work unchanged.
        name: names the breaker in errors, logs, span events and the
            ``reskit.breaker.state`` gauge. An unnamed breaker takes the name of
            the first policy it is given to (or ``breaker-N``).
        failure_rate: turns on rate mode: the fraction of failed calls,
            ``0 < failure_rate <= 1``, that opens the breaker.
        window: calls in the count window (default 100).
        window_seconds: use a time window of this many whole seconds instead of
            the count window.
        minimum_calls: calls the window must hold before a rate is judged
            (default 10; at most ``window`` for a count window).
        slow_call_duration: seconds (or a ``timedelta``) from which a call is
            slow; turns on slow-call detection.
        slow_call_rate: the fraction of slow calls, ``0 < slow_call_rate <= 1``,
            that opens the breaker (default 1.0: every call in the window).
        half_open_max_calls: probes admitted at the same time while half-open
            (default 1); the other calls are rejected with ``retry_after=0.0``.
        max_half_open_wait: seconds (or a ``timedelta``) after which a probe that
            has not finished stops holding its slot, so a hung probe cannot keep
            the breaker half-open forever. Its late result is then ignored.
            Default: probes hold their slot until they finish.
        on_result: a predicate ``(result) -> bool``; a call that returns a
            result for which it is true counts as a failure (an HTTP 503
            response, say). Listeners' ``failure(cb, exc)`` then get
            ``exc=None``. Not for generators, whose result is a stream.
        shared: share the breaker's state with every process configured with
            the same Redis store (:func:`reskit.configure`), by ``name`` (which
            is then required). The fleet opens together, probes together (at
            most ``half_open_max_calls`` probes fleet-wide) and closes together;
            the hot path still reads only local state. See ``docs/fleet.md``
            for how far ``fail_max`` can overshoot. On the memory store, or
            while Redis is down, the breaker works on its own.

    The settings are fixed at construction (assigning one raises
    :class:`~reskit.FrozenConfigError`); the state changes through the methods
    below. A breaker is a gate: :meth:`admit` and :meth:`record` are what a
    policy calls around each attempt.

    Raises:
        TypeError, ValueError: for an argument out of range, with a message
            saying what to change.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_before_call",
        "_exclude",
        "_exclude_predicates",
        "_exclude_types",
        "_fail_counter",
        "_fail_max",
        "_failure_rate",
        "_fleet",
        "_forced_message",
        "_full_message",
        "_half_open_at",
        "_half_open_max_calls",
        "_label",
        "_listeners",
        "_lock",
        "_max_half_open_wait",
        "_minimum_calls",
        "_name",
        "_on_failure",
        "_on_result",
        "_on_state_change",
        "_on_success",
        "_open_message",
        "_operator",
        "_phase",
        "_probes",
        "_quiet",
        "_reset_timeout",
        "_shared",
        "_slow_call_duration",
        "_slow_call_rate",
        "_success_counter",
        "_success_threshold",
        "_window",
        "_window_seconds",
        "_window_size",
    )

    def __init__(
        self,
        fail_max: int = DEFAULT_FAIL_MAX,
        reset_timeout: float | timedelta = DEFAULT_RESET_TIMEOUT,
        *,
        exclude: Iterable[ExcludeItem] = (),
        success_threshold: int = 1,
        listeners: Iterable[object] = (),
        name: str | None = None,
        failure_rate: float | None = None,
        window: int = DEFAULT_WINDOW,
        window_seconds: float | timedelta | None = None,
        minimum_calls: int = DEFAULT_MINIMUM_CALLS,
        slow_call_duration: float | timedelta | None = None,
        slow_call_rate: float = 1.0,
        half_open_max_calls: int = 1,
        max_half_open_wait: float | timedelta | None = None,
        on_result: Callable[[Any], bool] | None = None,
        shared: bool = False,
    ) -> None:
        if not isinstance(shared, bool):
            raise TypeError(f"shared must be True or False, got {shared!r}")
        if shared and name is None:
            raise ValueError(
                "CircuitBreaker(shared=True) needs name=: the fleet shares a breaker's "
                "state by its name"
            )
        self._shared = shared
        #: The link to the fleet's state (a Redis store), once the breaker is in use.
        self._fleet: Any = None
        if on_result is not None:
            if not callable(on_result):
                raise TypeError(
                    f"on_result must be a predicate on the call's result, got {on_result!r}"
                )
            if is_coroutine_callable(on_result):
                raise TypeError(
                    "on_result must be a plain function: the breaker judges results while "
                    "recording, where nothing can be awaited"
                )
        self._on_result = on_result
        self._fail_max = _count(fail_max, "fail_max")
        self._reset_timeout = _duration(reset_timeout, "reset_timeout")
        self._success_threshold = _count(success_threshold, "success_threshold")
        self._half_open_max_calls = _count(half_open_max_calls, "half_open_max_calls")
        self._failure_rate = (
            None if failure_rate is None else _fraction(failure_rate, "failure_rate")
        )
        self._slow_call_rate = _fraction(slow_call_rate, "slow_call_rate")
        self._slow_call_duration = (
            None
            if slow_call_duration is None
            else _duration(slow_call_duration, "slow_call_duration")
        )
        self._max_half_open_wait = (
            None
            if max_half_open_wait is None
            else _duration(max_half_open_wait, "max_half_open_wait")
        )
        self._window_size = _count(window, "window")
        self._minimum_calls = _count(minimum_calls, "minimum_calls")
        self._window_seconds: int | None = None
        if window_seconds is not None:
            span = _duration(window_seconds, "window_seconds")
            check_window(span, "window_seconds")
            if span < 1.0 or not span.is_integer():
                raise ValueError(
                    "window_seconds must be a whole number of seconds >= 1 (the window "
                    f"keeps one-second buckets), got {span!r}"
                )
            self._window_seconds = int(span)
        elif self._minimum_calls > self._window_size and self._uses_window():
            raise ValueError(
                f"minimum_calls ({self._minimum_calls}) must be <= window "
                f"({self._window_size}): a count window never holds more than window calls; "
                "lower minimum_calls or raise window"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")

        exclude = tuple(exclude)
        types: list[type[BaseException]] = []
        predicates: list[Callable[[BaseException], bool]] = []
        for item in exclude:
            if isinstance(item, type) and issubclass(item, BaseException):
                types.append(item)
            elif callable(item) and not isinstance(item, type):
                if is_coroutine_callable(item):
                    raise TypeError(
                        "exclude predicates must be plain functions: the breaker asks them "
                        f"while recording, where nothing can be awaited; got {item!r}"
                    )
                predicates.append(item)
            else:
                raise TypeError(
                    "exclude items must be exception classes or predicates taking the "
                    f"exception and returning a bool, got {item!r}"
                )
        self._exclude: tuple[ExcludeItem, ...] = exclude
        self._exclude_types = tuple(types)
        self._exclude_predicates = tuple(predicates)

        self._name = name
        self._label = name if name is not None else f"breaker-{next(_unnamed)}"
        self._set_messages()

        self._lock = threading.Lock()
        self._phase = _Phase(_CLOSED)
        # When an open breaker turns half-open; kept as one sum for the rejection path.
        # Read only while open, and _move() sets it on the way there.
        self._half_open_at = 0.0  # pragma: no mutate (never read before _move() sets it)
        self._fail_counter = 0
        self._success_counter = 0
        # Live half-open probes, oldest first, so expiry only looks at the front.
        self._probes: dict[_Probe, float] = {}
        self._window: _Window | None = self._new_window(_clock.now())

        listeners = tuple(listeners)
        for listener in listeners:
            _check_listener(listener)
        self._set_listeners(listeners)

        #: The state an operator forced through the store (reskit.force_breaker), if any.
        self._operator: str | None = None

        _GAUGE.track(self)
        _fork.track(self)

    def _after_fork(self) -> None:
        # In a forked child: the lock may have been held by a thread that is gone,
        # and so may every half-open probe slot. A probe of the forking thread
        # itself is then simply not recorded.
        # pragma: no mutate start (runs only in a forked child, where mutmut cannot link it to
        # a test; tests/test_mutation_fork.py checks it)
        self._lock = threading.Lock()
        self._probes.clear()
        # pragma: no mutate end

    # -- configuration ------------------------------------------------------
    def _uses_window(self) -> bool:
        return self._failure_rate is not None or self._slow_call_duration is not None

    def _new_window(self, now: float) -> _Window | None:
        if not self._uses_window():
            return None
        if self._window_seconds is not None:
            return _TimeWindow(self._window_seconds, now)
        return _CountWindow(self._window_size)

    def _set_messages(self) -> None:
        # Built once: a rejection must cost no more than creating the exception.
        self._open_message = f"circuit breaker {self._label!r} is open"
        self._forced_message = f"circuit breaker {self._label!r} was forced open; reset() closes it"
        self._full_message = (
            f"circuit breaker {self._label!r} is half-open and its "
            f"{self._half_open_max_calls} probe slot(s) are taken"
        )

    def _set_listeners(self, listeners: tuple[object, ...]) -> None:
        self._listeners = listeners
        self._on_state_change = _hooks(listeners, "state_change")
        self._on_failure = _hooks(listeners, "failure")
        self._on_success = _hooks(listeners, "success")
        self._before_call = _hooks(listeners, "before_call")
        # record()'s fast path may skip a success only when nothing has to see it.
        self._quiet = not self._uses_window() and not self._on_success and self._on_result is None

    def _adopt_name(self, name: str) -> None:
        """Take ``name`` (a policy's) when the breaker was created without one."""
        if self._name is None:
            self._name = self._label = name
            self._set_messages()

    _instead = (
        "Build a new CircuitBreaker(...) (it starts closed) and use policy.replace(breaker=...)."
    )

    name = setting(
        "_name",
        "The name given at construction (or adopted from a policy), or ``None``.",
    )
    fail_max = setting(
        "_fail_max", "Consecutive failures that open the breaker (consecutive mode)."
    )
    reset_timeout = setting(
        "_reset_timeout", "Seconds the breaker stays open before it turns half-open."
    )
    success_threshold = setting(
        "_success_threshold", "Successful probes needed to close a half-open breaker."
    )
    half_open_max_calls = setting(
        "_half_open_max_calls", "Probes admitted at the same time while half-open."
    )
    failure_rate = setting(
        "_failure_rate", "The failure fraction that opens the breaker in rate mode, or ``None``."
    )
    window = setting("_window_size", "Calls in the count window (rate and slow-call modes).")
    window_seconds = setting(
        "_window_seconds", "Seconds in the time window, or ``None`` for a count window."
    )
    minimum_calls = setting("_minimum_calls", "Calls the window holds before a rate is judged.")
    slow_call_duration = setting(
        "_slow_call_duration", "Seconds from which a call is slow, or ``None``."
    )
    slow_call_rate = setting(
        "_slow_call_rate", "The fraction of slow calls that opens the breaker."
    )
    max_half_open_wait = setting(
        "_max_half_open_wait", "Seconds after which a probe stops holding its slot, or ``None``."
    )
    on_result = setting(
        "_on_result", "The predicate that counts a result as a failure, or ``None``."
    )
    shared = setting("_shared", "Whether the state is shared by the fleet through the store.")
    excluded_exceptions = setting(
        "_exclude",
        "What ``exclude=`` was given: classes and predicates counted as success "
        "(named like pybreaker's property).",
    )

    @property
    def timed(self) -> bool:
        """Whether the breaker needs attempt durations (slow-call detection is on).

        Part of the gate protocol.

        .. versionadded:: 0.1.0
        """
        return self._slow_call_duration is not None

    #: Admission never waits (gate protocol).
    waits = False
    #: What :meth:`admit` raises (gate protocol).
    rejection = CircuitOpen

    @property
    def listeners(self) -> tuple[object, ...]:
        """The registered listeners, in the order they are called.

        .. versionadded:: 0.1.0
        """
        return self._listeners

    def add_listener(self, listener: object) -> None:
        """Register ``listener`` (see ``listeners=`` in :class:`CircuitBreaker`).

        .. versionadded:: 0.1.0
        """
        _check_listener(listener)
        with self._lock:
            self._set_listeners((*self._listeners, listener))

    def remove_listener(self, listener: object) -> None:
        """Unregister ``listener``; raises :class:`ValueError` if it is not registered.

        .. versionadded:: 0.1.0
        """
        with self._lock:
            listeners = list(self._listeners)
            try:
                listeners.remove(listener)
            except ValueError:
                raise ValueError(
                    f"{listener!r} is not a listener of circuit breaker {self._label!r}"
                ) from None
            self._set_listeners(tuple(listeners))

    @classmethod
    def from_pybreaker(cls, cb: Any, **overrides: Any) -> CircuitBreaker:
        """Build a breaker with the configuration of a ``pybreaker.CircuitBreaker``.

        Copies ``fail_max``, ``reset_timeout``, the excluded exceptions,
        ``success_threshold``, the listeners and the name. The state and the
        counters are not copied: the new breaker starts closed. Keyword
        arguments override or add settings, e.g.
        ``CircuitBreaker.from_pybreaker(cb, half_open_max_calls=3)``.

        Args:
            cb: a ``pybreaker.CircuitBreaker``.
            overrides: any keyword argument of :class:`CircuitBreaker`.

        .. versionadded:: 0.1.0
        """
        try:
            settings: dict[str, Any] = {
                "fail_max": cb.fail_max,
                "reset_timeout": cb.reset_timeout,
                "exclude": tuple(cb.excluded_exceptions),
                # pybreaker added success_threshold in 1.3; older ones close on one success.
                "success_threshold": getattr(cb, "success_threshold", 1),
                "listeners": tuple(cb.listeners),
                "name": cb.name,
            }
        except AttributeError as exc:
            raise TypeError(
                f"from_pybreaker() needs a pybreaker.CircuitBreaker, got {cb!r}"
            ) from exc
        settings.update(overrides)
        return cls(**settings)

    # -- state ----------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The current :class:`BreakerState`.

        Like pybreaker, reading it moves an open breaker whose ``reset_timeout``
        has passed to half-open (and announces the transition).

        .. versionadded:: 0.1.0
        """
        phase = self._phase
        if phase.state is _OPEN:
            now = _clock.now()
            if now >= self._half_open_at:
                transition = None
                with self._lock:
                    if self._phase is phase:
                        transition = self._move(_HALF_OPEN, now, "reset_timeout")
                if transition is not None:
                    self._announce(transition)
        return self._phase.state

    @property
    def current_state(self) -> str:
        """The state as pybreaker spells it: ``"closed"``, ``"open"``, ``"half-open"``.

        For code migrating from pybreaker, which compares with
        ``pybreaker.STATE_HALF_OPEN`` (``"half-open"``); :attr:`state` gives the
        :class:`BreakerState`. Forced-open and disabled breakers report
        ``"forced-open"`` and ``"disabled"``.

        .. versionadded:: 0.1.0
        """
        return _LISTENER_STATE[self.state].name

    @property
    def fail_counter(self) -> int:
        """Failures in a row, as pybreaker counts them.

        A success resets it; closing the breaker resets it; it keeps counting
        while the breaker is open and half-open.

        .. versionadded:: 0.1.0
        """
        return self._fail_counter

    @property
    def success_counter(self) -> int:
        """Successful probes since the breaker last turned half-open.

        .. versionadded:: 0.1.0
        """
        return self._success_counter

    def _peek(self) -> BreakerState:
        """The state as :attr:`state` would report it, without moving it."""
        phase = self._phase
        if phase.state is _OPEN and _clock.now() >= self._half_open_at:
            return _HALF_OPEN
        return phase.state

    # -- manual control -----------------------------------------------------
    def open(self) -> None:
        """Open the breaker now; it turns half-open after ``reset_timeout``.

        .. versionadded:: 0.1.0
        """
        self._manual(_OPEN)

    def close(self) -> None:
        """Close the breaker now and clear its counters.

        .. versionadded:: 0.1.0
        """
        self._manual(_CLOSED)

    def half_open(self) -> None:
        """Turn the breaker half-open now, so the next calls are probes.

        .. versionadded:: 0.1.0
        """
        self._manual(_HALF_OPEN)

    def force_open(self) -> None:
        """Open the breaker until a manual change (usually :meth:`reset`).

        Unlike :meth:`open`, it never turns half-open by itself. Rejections
        carry ``retry_after=None``, so a retry never waits for it.

        .. versionadded:: 0.1.0
        """
        self._manual(_FORCED_OPEN)

    def disable(self) -> None:
        """Admit every call and record nothing, until a manual change.

        No counter moves and no listener is called for the calls admitted
        while disabled. :meth:`reset` turns the breaker back on, closed.

        .. versionadded:: 0.1.0
        """
        self._manual(_DISABLED)

    def reset(self) -> None:
        """Return to closed with every counter and the window cleared.

        The way out of :meth:`force_open` and :meth:`disable`; the same as
        :meth:`close`, named for that purpose.

        .. versionadded:: 0.1.0
        """
        self._manual(_CLOSED)

    def _operate(self, mode: str | None) -> None:
        """Follow an operator's state from the store: forced open, forced closed, or none."""
        # pragma: no mutate start (the store sends "forced_open", "forced_closed" or None: a
        # mode with no expected state is None, and re-forcing a forced state changes nothing)
        expected = {"forced_open": _FORCED_OPEN, "forced_closed": _DISABLED}.get(mode or "")
        if mode == self._operator and (expected is None or self._phase.state is expected):
            return  # already so (a local reset() in between is undone below)
        # pragma: no mutate end
        previous, self._operator = self._operator, mode
        if mode == "forced_open":
            self.force_open()
        elif mode == "forced_closed":
            self.disable()
        elif previous is not None:
            self.reset()
            if self._fleet is not None:
                # Released by an operator: the fleet starts closed again too.
                self._fleet.report("reset")

    def _follow(self, state: BreakerState, remaining: float, failures: int) -> None:
        """Take the fleet's state (a shared breaker): ``remaining`` seconds of open left."""
        now = _clock.now()
        transition = None
        with self._lock:
            current = self._phase.state
            if current is _FORCED_OPEN or current is _DISABLED:
                return  # an operator's state wins over the fleet's
            if state is _OPEN and current is _HALF_OPEN and remaining <= 0:
                pass  # already probing locally; the fleet lease decides who probes
            elif state is not current:
                transition = self._move(state, now, "fleet")
            if state is _OPEN:
                self._half_open_at = now + max(remaining, 0.0)
            if state is _CLOSED:
                self._fail_counter = failures
        if transition is not None:
            self._announce(transition)

    def _count_fleet_failures(self, failures: int) -> None:
        """Take the fleet's failure count, while closed (a shared breaker)."""
        with self._lock:
            if self._phase.state is _CLOSED:
                self._fail_counter = failures

    def _manual(self, state: BreakerState) -> None:
        now = _clock.now()
        with self._lock:
            transition = self._move(state, now, "manual")
        if transition is not None:
            self._announce(transition)

    # -- the gate protocol (what a policy calls around each attempt) --------------
    def admit(
        self,
        policy_name: str | None,
        key: str | None = None,
        func: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = _NO_ARGS,
        kwargs: Mapping[str, Any] | None = None,
    ) -> _Permit:
        """Admit one attempt or raise :class:`CircuitOpen`; return its permit.

        Every permit must be handed back to :meth:`record` exactly once. ``key``
        is ignored; ``func``, ``args`` and ``kwargs`` are only passed on to
        listeners' ``before_call``.

        .. versionadded:: 0.1.0
        """
        phase = self._phase
        if phase.closed:
            # The closed fast path: one attribute read under the GIL, no lock. A
            # phase that changes right after this read makes the permit stale, and
            # a stale permit cannot move the state: losing one sample is harmless.
            if not self._before_call:
                return phase
        elif phase.open:
            wait = self._half_open_at - _clock.now()
            if wait > 0.0:  # pragma: no mutate (past a later cut-off, _admit_slow rejects alike)
                # A fresh exception each time: re-raising a shared one would grow
                # its traceback on every rejection. Built in a helper so that no
                # local of this frame holds it: exception -> traceback -> this
                # frame -> exception would be a cycle only the GC can free.
                raise _rejection(self._open_message, policy_name, wait)
        return self._admit_slow(phase, policy_name, func, args, kwargs)

    def _admit_slow(
        self,
        phase: _Phase,
        policy_name: str | None,
        func: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
    ) -> _Permit:
        state = phase.state
        if state is _OPEN:
            # admit() found the reset timeout over: decide under the lock below.
            now = _clock.now()
        elif state is _FORCED_OPEN:
            raise _rejection(self._forced_message, policy_name, None)
        elif state is not _HALF_OPEN:
            if phase.closed:
                self._call_before(func, args, kwargs)
            return phase
        else:
            now = _clock.now()

        transition: _Transition | None = None
        permit: _Permit | None = None
        retry_after: float | None = 0.0
        message = self._full_message
        with self._lock:
            phase = self._phase
            state = phase.state
            if state is _OPEN:
                wait = self._half_open_at - now
                if wait > 0.0:
                    retry_after = wait
                    message = self._open_message
                else:
                    transition = self._move(_HALF_OPEN, now, "reset_timeout")
                    phase = self._phase
                    state = _HALF_OPEN
            if state is _HALF_OPEN:
                probes = self._probes
                limit = self._max_half_open_wait
                if limit is not None:
                    while probes:
                        oldest = next(iter(probes))
                        if now - oldest.started < limit:
                            break
                        del probes[oldest]
                if len(probes) < self._half_open_max_calls:
                    fleet = self._fleet
                    lease = None if fleet is None else fleet.take_lease()
                    if fleet is None or lease is not None:
                        permit = _Probe(phase, now, lease)
                        probes[permit] = now
            elif state is _FORCED_OPEN:
                retry_after = None
                message = self._forced_message
            elif state is not _OPEN:
                # Closed or disabled since the unlocked read: admit in this phase.
                permit = phase
        if transition is not None:
            self._announce(transition)
        if permit is None:
            raise _rejection(message, policy_name, retry_after)
        # An "or" would only loop over no hooks at all: the pragma marks that equivalent mutant.
        if self._before_call and (isinstance(permit, _Probe) or permit.closed):  # pragma: no mutate
            self._call_before(func, args, kwargs)
        return permit

    def record(
        self, permit: _Permit, exc: BaseException | None, duration: float, result: Any = None
    ) -> None:
        """Record the outcome of the attempt admitted with ``permit``.

        ``exc`` is ``None`` when the attempt returned ``result``, else what it
        raised; ``duration`` is how long it took, in seconds.

        .. versionadded:: 0.1.0
        """
        # The common case, a success in the closed state of a consecutive-mode
        # breaker with no failures to reset and no listener to tell, takes no lock.
        if exc is None and permit is self._phase and self._quiet and not self._fail_counter:
            return
        self._record_slow(permit, exc, duration, result)

    def _record_slow(
        self, permit: _Permit, exc: BaseException | None, duration: float, result: Any
    ) -> None:
        if type(permit) is _Phase and permit.state is _DISABLED:
            return
        # Classify before taking the lock: exclude and on_result predicates are user code.
        if exc is None:
            outcome = _SUCCESS if self._on_result is None else self._judge(result)
        elif isinstance(exc, Exception) and not isinstance(exc, Rejected):
            outcome = _SUCCESS if self._excluded(exc) else _FAILURE
        else:
            outcome = _NEITHER
        slow_limit = self._slow_call_duration
        slow = slow_limit is not None and duration >= slow_limit
        now = _clock.now()

        transition: _Transition | None = None
        # What the fleet must hear (a shared breaker): "failed", "succeeded" or "opened".
        report: str | None = None
        with self._lock:
            phase = self._phase
            if type(permit) is _Probe:
                live = self._probes.pop(permit, None) is not None and permit.phase is phase
                if live and outcome != _NEITHER:
                    if outcome == _FAILURE:
                        self._fail_counter += 1
                        transition = self._move(_OPEN, now, "probe_failed")
                    else:
                        self._fail_counter = 0
                        if slow:
                            transition = self._move(_OPEN, now, "probe_slow")
                        else:
                            self._success_counter += 1
                            if self._success_counter >= self._success_threshold:
                                transition = self._move(_CLOSED, now, "probes_succeeded")
            elif permit is phase and phase.closed and outcome != _NEITHER:
                reason = None
                if outcome == _FAILURE:
                    self._fail_counter += 1
                    report = "failed"
                    if self._failure_rate is None and self._fail_counter >= self._fail_max:
                        reason = "fail_max"
                else:
                    if self._fail_counter:
                        report = "succeeded"
                    self._fail_counter = 0
                window = self._window
                if window is not None:
                    window.add((outcome == _FAILURE) | (slow << 1), now)
                    calls = window.calls
                    if calls >= self._minimum_calls:
                        rate = self._failure_rate
                        if rate is not None and window.failures / calls >= rate:
                            reason = "failure_rate"
                        elif slow_limit is not None and window.slow / calls >= self._slow_call_rate:
                            reason = "slow_call_rate"
                if reason is not None:
                    transition = self._move(_OPEN, now, reason)
                    report = "opened"

        fleet = self._fleet
        if fleet is not None:
            # Queued for the store's thread: the caller never waits on the network.
            if type(permit) is _Probe:
                if permit.lease is not None:
                    fleet.probe_done(permit.lease, outcome, slow)
            elif report is not None:
                fleet.report(report)

        # pybreaker's order: failure listeners, then the transition, then success listeners.
        if outcome == _FAILURE:
            for hook in self._on_failure:
                _telemetry.guard("a circuit breaker listener's failure()", hook, self, exc)
        if transition is not None:
            self._announce(transition)
        if outcome == _SUCCESS:
            for hook in self._on_success:
                _telemetry.guard("a circuit breaker listener's success()", hook, self)

    def _judge(self, result: Any) -> int:
        assert self._on_result is not None
        try:
            return _FAILURE if self._on_result(result) else _SUCCESS
        except Exception as exc:
            _telemetry.report(
                f"the on_result predicate of circuit breaker {self._label!r} (the call counts "
                "as neither success nor failure)",
                exc,
            )
            return _NEITHER

    def _excluded(self, exc: BaseException) -> bool:
        if isinstance(exc, self._exclude_types):
            return True
        for predicate in self._exclude_predicates:
            try:
                if predicate(exc):
                    return True
            except Exception as exc:
                _telemetry.report(
                    f"exclude predicate {predicate!r} of circuit breaker {self._label!r} "
                    "(counting the call as a failure)",
                    exc,
                )
        return False

    # -- transitions -------------------------------------------------------------
    def _move(self, state: BreakerState, now: float, reason: str) -> _Transition | None:
        """Enter ``state`` in a new phase; call with the lock held.

        Returns the transition to announce once the lock is released, or
        ``None`` when the state stays the same (a manual restart of it).
        """
        old = self._phase.state
        if state is _OPEN or state is _FORCED_OPEN:
            # A float sum cannot overflow (timedelta arithmetic can, with a huge
            # reset_timeout); at worst it is inf, which compares correctly.
            self._half_open_at = now + self._reset_timeout
            self._success_counter = 0
        elif state is _HALF_OPEN:
            self._success_counter = 0
        elif state is _CLOSED:
            self._fail_counter = 0
            self._success_counter = 0
        self._probes.clear()
        self._window = self._new_window(now)
        # Published last: the lock-free readers of _phase then see _half_open_at set.
        self._phase = _Phase(state)
        return (old, state, reason) if old is not state else None

    def _announce(self, transition: _Transition) -> None:
        """Tell listeners, the current span and the log about a transition.

        Called after the state changed, outside the lock; nothing here can raise
        (each listener, the span and the log sink are isolated).
        """
        old, new, reason = transition
        if self._on_state_change:
            old_arg = _LISTENER_STATE[old]
            new_arg = _LISTENER_STATE[new]
            for hook in self._on_state_change:
                _telemetry.guard(
                    "a circuit breaker listener's state_change()", hook, self, old_arg, new_arg
                )
        span = _telemetry.current_span()
        if span is not None:
            _telemetry.guard(
                "the OpenTelemetry span (a breaker event)",
                span.add_event,
                "reskit.breaker.state_change",
                {
                    "reskit.breaker.name": self._label,
                    "reskit.breaker.from": old.value,
                    "reskit.breaker.to": new.value,
                    "reskit.breaker.reason": reason,
                },
            )
        _telemetry.emit(
            logging.INFO,
            _LOG_EVENT[new],
            breaker=self._label,
            from_state=old.value,
            to_state=new.value,
            reason=reason,
            # A transition is not one call's event, but the call that caused it
            # may have an ID: its own, or one made for this event.
            correlation_id=_correlation_id.get() or new_correlation_id(),
        )
        _GAUGE.ensure()

    def _call_before(
        self,
        func: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
    ) -> None:
        for hook in self._before_call:
            _telemetry.guard(
                "a circuit breaker listener's before_call()",
                hook,
                self,
                func,
                *args,
                **(kwargs or {}),
            )

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self._label!r} state={self._peek().value} "
            f"fail_counter={self._fail_counter}>"
        )


_LISTENER_METHODS: Final = ("state_change", "failure", "success", "before_call")


def _check_listener(listener: object) -> None:
    if not any(callable(getattr(listener, m, None)) for m in _LISTENER_METHODS):
        raise TypeError(
            "a circuit breaker listener needs at least one of the methods "
            f"{', '.join(_LISTENER_METHODS)} (a pybreaker.CircuitBreakerListener works), "
            f"got {listener!r}"
        )


def _hooks(listeners: tuple[object, ...], method: str) -> tuple[Callable[..., Any], ...]:
    hooks: list[Callable[..., Any]] = []
    for listener in listeners:
        hook = getattr(listener, method, None)
        if callable(hook):
            hooks.append(hook)
    return tuple(hooks)


# -- the reskit.breaker.state gauge ---------------------------------------------
_GAUGE = _telemetry.LiveGauge(
    "reskit.breaker.state",
    unit="1",
    description="Circuit breaker state: 0 closed, 1 half-open, 2 open",
    observe=lambda breaker: (
        _GAUGE_VALUE[breaker._peek()],
        {"reskit.breaker.name": breaker._label},
    ),
)

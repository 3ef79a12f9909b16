"""Policy: bundle strategies and run them in one canonical order.

A :class:`Policy` is frozen configuration. When it decorates a function (or
``call``/``acall`` first runs one) it is compiled, per kind of call, into a
driver generated from the order table (``_order.py``, ``_compose.py``); the
strategies make every decision and the drivers only wait.

Nothing per call is stored on the policy: attempt counters, retry state and
timers live in the driver's local variables, so one policy can be shared by any
number of threads and tasks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from . import _clock, _fork, _telemetry
from ._compose import Kind, compile_driver, kind_of
from ._config import Frozen, seconds
from ._fallback import Fallback
from ._order import ORDER, Role, Row, outer_gates
from ._retry import Retry
from ._stats import Counters, PolicyStatistics

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker
    from ._bulkhead import Bulkhead
    from ._switches import KillSwitch
    from ._throttle import AdaptiveThrottle

__all__ = ["Admission", "Policy"]

P = ParamSpec("P")
R = TypeVar("R")

# The strategies come from the order table; ``name`` is the policy's own.
_STRATEGIES: tuple[tuple[str, Row], ...] = tuple(
    (row.keyword, row) for row in ORDER if row.keyword is not None
)
_FIELDS: tuple[str, ...] = ("name", *(keyword for keyword, _ in _STRATEGIES))


class Runner:
    """A policy compiled under one name: its drivers, made on first use per kind."""

    __slots__ = (
        "__weakref__",
        "_drivers",
        "_lock",
        "_metric_attributes",
        "breaker",
        "counters",
        "name",
        "policy",
        "span_name",
    )

    def __init__(self, policy: Policy, name: str) -> None:
        self.policy = policy
        self.name = name
        self.span_name = f"reskit {name}"
        self.breaker = policy.breaker
        self.counters = policy._counters
        self._metric_attributes: dict[str, dict[str, str]] = {}
        self._drivers: dict[Kind, dict[str, Any]] = {}
        self._lock = threading.Lock()
        _fork.track(self)
        # Unnamed strategies take the name of the first policy that compiles them,
        # so their log events and gauges say whose they are.
        if policy.breaker is not None:
            policy.breaker._adopt_name(name)
        if policy.bulkhead is not None and policy.bulkhead._name is None:
            policy.bulkhead._name = name
        if policy.breaker is not None and policy.breaker.name is not None:
            # So an operator's forced state (reskit.force_breaker) reaches it.
            from ._switches import control

            control().adopt_breaker(policy.breaker)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def driver(self, kind: Kind) -> dict[str, Any]:
        drivers = self._drivers.get(kind)
        if drivers is None:
            with self._lock:
                drivers = self._drivers.get(kind)
                if drivers is None:
                    drivers = self._drivers[kind] = compile_driver(self, self.policy, kind)
        return drivers

    def metric_attributes(self, outcome: str) -> dict[str, str]:
        attrs = self._metric_attributes.get(outcome)
        if attrs is None:
            attrs = self._metric_attributes[outcome] = {
                "reskit.policy": self.name,
                "reskit.outcome": outcome,
            }
        return attrs


class Policy(Frozen):
    """A bundle of resilience strategies, applied in one canonical order.

    Use it as a decorator on ``def``, ``async def`` and (async) generator
    functions, or call through it with :meth:`call` / :meth:`acall`::

        payments = reskit.Policy(
            "payments",
            timeout=2.0,
            deadline=5.0,
            retry=reskit.Retry(attempts=3, on=(ConnectionError, TimeoutError)),
            fallback=lambda exc: {"status": "queued"},
        )

        @payments
        def charge(order_id: str) -> dict: ...

    The strategies run outermost first: fallback → kill switch → brownout shed →
    bulkhead → deadline → retry (+ budget) → circuit breaker → throttle →
    attempt timeout → the call. So a rejected call costs no retry and no
    breaker sample, and each attempt is sampled by the breaker. Every layer
    behaves the same for functions, coroutines and both kinds of generators (a
    generator is one call spanning its whole iteration, retried only before its
    first item).

    A policy is frozen: assigning an attribute raises
    :class:`~reskit.FrozenConfigError`; :meth:`replace` returns a changed copy.

    Args:
        name: names the span (``reskit <name>``), the metrics and log events.
            Single-strategy decorators leave it ``None`` and use the decorated
            function's qualified name.
        timeout: seconds (or a ``timedelta``) each attempt may take. Async
            attempts are cancelled; sync attempts run in a worker thread and
            the caller stops waiting (the thread runs on; see the docs).
        deadline: seconds the whole call may take, across attempts and waits.
            It propagates: nested policies and :func:`reskit.remaining_deadline`
            see what is left.
        retry: a :class:`Retry`.
        breaker: a :class:`CircuitBreaker`.
        bulkhead: a :class:`Bulkhead`.
        throttle: an :class:`AdaptiveThrottle` (client-side adaptive throttling).
        kill_switch: a :class:`KillSwitch`, a switch name, or ``True`` for the
            policy's name. While the switch is killed (:func:`reskit.kill`)
            calls are rejected with :class:`~reskit.KillSwitchOff`.
        shed_at: shed the call (:class:`~reskit.Shed`) while the brownout level
            (:func:`reskit.set_brownout_level`) is at least this, 1 to 100.
        fallback: ``fn(exc)`` returning a value instead of raising, or a
            :class:`Fallback`.

    Invalid combinations raise at construction with a message saying what to
    change (for example a ``deadline`` shorter than the ``timeout``).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_counters",
        "_outer",
        "_runner",
        "_runners",
        "_runners_lock",
        *_FIELDS,
    )

    _instead = "Use policy.replace({name}=...), which returns a new policy."

    name: str | None
    timeout: float | None
    deadline: float | None
    retry: Retry | None
    breaker: CircuitBreaker | None
    bulkhead: Bulkhead | None
    throttle: AdaptiveThrottle | None
    kill_switch: KillSwitch | None
    shed_at: int | None
    fallback: Fallback | None
    _counters: Counters
    _outer: OuterGates | None
    _runner: Runner | None
    _runners: dict[str, Runner]
    _runners_lock: threading.Lock

    def __init__(
        self,
        name: str | None = None,
        *,
        timeout: float | timedelta | None = None,
        deadline: float | timedelta | None = None,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        bulkhead: Bulkhead | None = None,
        throttle: AdaptiveThrottle | None = None,
        kill_switch: KillSwitch | str | bool | None = None,
        shed_at: int | None = None,
        fallback: Callable[[Exception], Any] | Fallback | None = None,
    ) -> None:
        # The strategy keywords by name: the order table says which there are.
        given = {field: value for field, value in locals().items() if field in _FIELDS}
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"Policy name must be a non-empty string, got {name!r}")
        given["kill_switch"] = _switch_for(name, kill_switch)
        init = object.__setattr__
        init(self, "name", name)
        for keyword, row in _STRATEGIES:
            init(self, keyword, _checked(keyword, row.role, row.accepts, given[keyword]))
        if self.timeout is not None and self.deadline is not None and self.deadline < self.timeout:
            raise ValueError(
                f"Policy deadline ({self.deadline}s) is shorter than its attempt timeout "
                f"({self.timeout}s): the timeout could never fire; lower timeout= or raise "
                "deadline="
            )
        init(self, "_counters", Counters())
        init(self, "_runners", {})
        init(self, "_runners_lock", threading.Lock())
        # The gates admit() applies, found on first use (as a compiled call finds its own).
        init(self, "_outer", None)
        _fork.track(self)
        init(self, "_runner", Runner(self, name) if name is not None else None)

    def _after_fork(self) -> None:
        object.__setattr__(self, "_runners_lock", threading.Lock())

    def __copy__(self) -> Policy:
        # Immutable, like a tuple: a copy is the policy itself (replace() makes a new one).
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Policy:
        return self

    # -- compiling ------------------------------------------------------------
    def _runner_for(self, fn: Callable[..., Any]) -> Runner:
        runner = self._runner
        if runner is not None:
            return runner
        key = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        runner = self._runners.get(key)
        if runner is None:
            with self._runners_lock:
                runner = self._runners.get(key)
                if runner is None:
                    runner = self._runners[key] = Runner(self, key)
        return runner

    # -- protecting calls -------------------------------------------------------
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate ``fn``, keeping its kind (sync, async, generator) and signature.

        The decorated function of a generator function is a generator function
        (an async one for an async generator), so frameworks see its kind.
        """
        kind = kind_of(fn)
        wrapper = self._runner_for(fn).driver(kind)["make"](fn)
        return functools.wraps(fn)(wrapper)

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the policy.

        For a generator function this returns the protected generator (iterate
        it: ``for item in policy.call(gen_fn)``), as decorating it would. A
        coroutine function raises :class:`TypeError`: use :meth:`acall`.

        .. versionadded:: 0.1.0
        """
        kind = kind_of(fn)
        runner = self._runner_for(fn)
        if kind is Kind.FUNCTION:
            result: R = runner.driver(kind)["run"](fn, args, kwargs)
            return result
        if kind is Kind.COROUTINE:
            raise TypeError(
                f"{_describe(fn)} is a coroutine function: protect it with "
                "`await policy.acall(fn, ...)` (policy.call would return an unprotected "
                "coroutine)"
            )
        stream: R = runner.driver(kind)["make"](fn)(*args, **kwargs)
        return stream

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` through the policy; ``fn`` is a coroutine function.

        A plain function raises :class:`TypeError` (use :meth:`call`), and so
        does an async generator function (iterate ``policy.call(fn, ...)``).

        .. versionadded:: 0.1.0
        """
        kind = kind_of(fn)
        if kind is not Kind.COROUTINE:
            if kind is Kind.ASYNC_GENERATOR:
                raise TypeError(
                    f"{_describe(fn)} is an async generator function: iterate "
                    "`policy.call(fn, ...)` with `async for` instead of awaiting policy.acall"
                )
            raise TypeError(
                f"{_describe(fn)} is not a coroutine function: protect it with "
                "policy.call(fn, ...); policy.acall needs an `async def` function (pass the "
                "function itself, not a lambda around it)"
            )
        result: R = await self._runner_for(fn).driver(kind)["run"](fn, args, kwargs)
        return result

    def admit(self, key: str | None = None) -> Admission:
        """Apply the policy's outer gates to a block of code, without a function.

        ``with policy.admit():`` (or ``async with``) runs the gates that come
        before the deadline in the canonical order (the kill switch and the
        brownout shed when configured, and the bulkhead, partitioned by
        ``key``): it raises their usual rejection errors on entry, always gives
        the permits back on exit (error and cancellation included) and reports
        how the block ended, and how long it took, to the bulkhead's adaptive
        limit. Timeouts, retries and the fallback do not apply: there is no
        function to time, repeat or replace. ``ShedMiddleware`` admits requests by
        the same rules.

        .. versionadded:: 0.1.0
        """
        if key is not None and not isinstance(key, str):
            raise TypeError(f"admit() key must be a str or None, got {type(key).__name__}")
        return Admission(self, key)

    # -- configuration ----------------------------------------------------------
    def replace(self, **changes: Any) -> Policy:
        """Return a new policy with ``changes`` applied; this one is left as it is.

        Strategy objects that are not replaced (a breaker, a bulkhead) are
        shared with the new policy, state included; pass new ones to start
        afresh. Statistics start at zero.

        .. versionadded:: 0.1.0
        """
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(
                f"Policy.replace() got unknown field(s) {', '.join(sorted(unknown))}; "
                f"the fields are {', '.join(_FIELDS)}"
            )
        fields = {name: getattr(self, name) for name in _FIELDS}
        fields.update(changes)
        name = fields.pop("name")
        return Policy(name, **fields)

    @property
    def statistics(self) -> PolicyStatistics:
        """What this policy has done so far: calls, attempts, retries, rejections by gate.

        A snapshot; see :class:`~reskit.PolicyStatistics`.

        .. versionadded:: 0.1.0
        """
        return self._counters.snapshot()

    def reset_statistics(self) -> None:
        """Set :attr:`statistics` back to zero.

        .. versionadded:: 0.1.0
        """
        self._counters.reset()

    def __repr__(self) -> str:
        """The configured strategies, in the canonical order."""
        parts = [repr(self.name)] if self.name is not None else []
        for keyword, _ in _STRATEGIES:
            value = getattr(self, keyword)
            if value is not None:
                parts.append(f"{keyword}={value!r}")
        return f"Policy({', '.join(parts)})"


def _switch_for(name: str | None, value: object) -> KillSwitch | None:
    """The kill switch ``kill_switch=`` names: ``True`` for the policy's own name."""
    if value is None or value is False:
        return None
    from ._switches import KillSwitch

    if value is True:
        if name is None:
            raise TypeError(
                "Policy(kill_switch=True) names the switch after the policy, which has no "
                "name; give the policy a name or pass kill_switch='switch-name'"
            )
        return KillSwitch(name)
    if isinstance(value, str):
        return KillSwitch(value)
    if not isinstance(value, KillSwitch):
        raise TypeError(
            f"Policy kill_switch= must be a reskit.KillSwitch, a switch name or True, got {value!r}"
        )
    return value


def _checked(keyword: str, role: Role, accepts: type | None, value: Any) -> Any:
    """Validate and convert the value given for a strategy keyword."""
    if value is None:
        return None
    if keyword == "shed_at":
        from ._switches import check_shed_at

        return check_shed_at(value)
    if role is Role.DEADLINE or role is Role.TIMEOUT:
        return seconds(value, f"Policy {keyword}", waited=True)
    if role is Role.FALLBACK and not isinstance(value, Fallback):
        return Fallback(value)
    if accepts is not None and not isinstance(value, accepts):
        raise TypeError(f"Policy {keyword}= must be a reskit.{accepts.__name__}, got {value!r}")
    return value


def _describe(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str) and not name.startswith("<"):
        return f"{name}()"
    return f"{type(fn).__qualname__} object (its __call__)"


class OuterGates:
    """A policy's outer gates (kill switch, brownout shed, bulkhead), as admissions pass them.

    Found once per policy (:meth:`of`) and shared by every admission.
    Middleware admits through these methods directly, without an
    :class:`Admission` object per request; ``policy.admit()`` wraps the same
    methods, so the rules below are written once.

    A pass returns the permits of the gates that keep one (the bulkhead), as a
    list of ``(gate, permit)``, or a :class:`Queued` place when a gate must
    wait; :meth:`leave` gives the permits back.
    """

    __slots__ = ("counters", "gates", "name")

    def __init__(self, policy: Policy) -> None:
        self.name = policy.name if policy.name is not None else "admission"
        self.counters = policy._counters
        gates = []
        for row in outer_gates():
            assert row.keyword is not None
            value = getattr(policy, row.keyword)
            if value is not None:
                gate = row.gate(value) if row.gate is not None else value
                # The gate protocol's flag gates (kill switch, brownout) keep no
                # permit: their flag is read inline and admit asked only while it
                # is up, as the compiled drivers do.
                flag = None if getattr(gate, "records", True) else gate.flag
                gates.append((gate, flag, bool(gate.waits)))
        #: (gate, its flag or None, whether it may queue), in the canonical order.
        self.gates: tuple[tuple[Any, Any, bool], ...] = tuple(gates)

    @staticmethod
    def of(policy: Policy) -> OuterGates:
        """The outer gates of ``policy``, found on first use and kept on it."""
        gates = policy._outer
        if gates is None:
            gates = OuterGates(policy)
            object.__setattr__(policy, "_outer", gates)
        return gates

    def enter(self, key: str | None, *, block: bool = False) -> list[Any] | Queued:
        """Pass the gates: the permits, or a :class:`Queued` place when one must wait.

        Raises the refusing gate's rejection, after giving back what the gates
        before it granted. After a :class:`Queued`, finish with
        :meth:`enter_queued`; after permits, end with :meth:`leave`. With
        ``block`` (a ``with`` block) a gate that must queue blocks this thread
        in its ``admit`` instead, and the permits always come back.
        """
        # Notices telemetry configured since the last look, so the gates' gauges
        # appear for code that only admits (as a decorated call would).
        _telemetry.sink()
        self.counters.calls += 1
        return self._pass(key, 0, [], block)

    async def enter_queued(self, key: str | None, place: Queued) -> list[Any]:
        """Wait at the gate :meth:`enter` stopped at, then pass the rest (which may queue too)."""
        while True:
            gate = self.gates[place.at][0]
            permits = place.permits
            try:
                permits.append((gate, await gate.admit_async(self.name, key)))
            except BaseException as exc:
                self._refused(permits, exc)
                raise
            found = self._pass(key, place.at + 1, permits, False)
            if not isinstance(found, Queued):
                return found
            place = found

    def _pass(
        self, key: str | None, at: int, permits: list[Any], block: bool
    ) -> list[Any] | Queued:
        name = self.name
        gates = self.gates
        try:
            for row in gates[at:] if at else gates:
                gate, flag, waits = row
                if flag is not None:
                    if flag.up:
                        gate.admit(name, key)
                elif waits and not block:
                    permit = gate.try_admit(name, key)
                    if permit is None:
                        # The row's place is found only here: counting rows would cost
                        # every free pass. (Rows, not gates: one gate may sit in two.)
                        stop = next(i for i in range(at, len(gates)) if gates[i] is row)
                        return Queued(stop, permits)
                    permits.append((gate, permit))
                else:
                    permits.append((gate, gate.admit(name, key)))
        except BaseException as exc:
            self._refused(permits, exc)
            raise
        self.counters.attempts += 1
        return permits

    def _refused(self, permits: list[Any], exc: BaseException) -> None:
        # Counted first: a gate whose record raises below cannot hide the refusal.
        self.counters.ended(exc)
        _give_back(permits, exc, 0.0)

    def leave(self, permits: list[Any], started: float, exc: BaseException | None) -> None:
        """Give the permits back; ``exc`` is how the block ended, ``started`` when it began."""
        if exc is not None:
            self.counters.ended(exc)
        if len(permits) == 1:  # the usual case (one bulkhead), without the loop below
            gate, permit = permits[0]
            gate.record(permit, exc, _clock.now() - started)
        elif permits:
            _give_back(permits, exc, _clock.now() - started)


def _give_back(permits: list[Any], exc: BaseException | None, duration: float) -> None:
    """Record every permit, innermost first, even if a gate's record raises.

    A faulty custom gate or adaptive limit must not strand the permits further
    out; the first such error is raised once all are back.
    """
    error: BaseException | None = None
    for gate, permit in reversed(permits):
        try:
            gate.record(permit, exc, duration)
        except BaseException as failed:
            if error is None:
                error = failed
    if error is not None:
        raise error


class Queued:
    """Where a pass of :class:`OuterGates` stopped: the gate that must queue, the permits so far."""

    __slots__ = ("at", "permits")

    def __init__(self, at: int, permits: list[Any]) -> None:
        self.at = at
        self.permits = permits


# An admission's states: not entered yet, holding its permits, done (released or refused).
_FRESH, _HELD, _DONE = 0, 1, 2


class Admission:
    """The outer gates of a policy applied to a ``with`` or ``async with`` block.

    Made by :meth:`Policy.admit`; one object per block, used once.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_gates", "_key", "_permits", "_started", "_state")

    def __init__(self, policy: Policy, key: str | None) -> None:
        self._gates = OuterGates.of(policy)
        self._key = key
        self._state = _FRESH
        self._permits: list[Any] = []
        self._started = 0.0

    def _begin(self) -> None:
        if self._state != _FRESH:
            raise RuntimeError("a policy admission is used once; call policy.admit() again")
        # Refused until entered: a refusal leaves nothing to give back.
        self._state = _DONE

    def _held(self, permits: list[Any]) -> None:
        self._permits = permits
        self._started = _clock.now()
        self._state = _HELD

    def __enter__(self) -> Admission:
        self._begin()
        permits = self._gates.enter(self._key, block=True)
        assert not isinstance(permits, Queued)  # a blocking pass always ends with its permits
        self._held(permits)
        return self

    async def __aenter__(self) -> Admission:
        self._begin()
        gates = self._gates
        permits = gates.enter(self._key)
        if isinstance(permits, Queued):
            permits = await gates.enter_queued(self._key, permits)
        self._held(permits)
        return self

    def _release(self, exc: BaseException | None) -> None:
        if self._state != _HELD:
            return  # never admitted, or released already: nothing to give back twice
        self._state = _DONE
        self._gates.leave(self._permits, self._started, exc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release(exc)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release(exc)

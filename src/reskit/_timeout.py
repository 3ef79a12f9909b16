"""Enforcing timeouts: a coarse timer wheel for asyncio, worker threads for sync code.

Async
    ``asyncio.timeout`` schedules a ``TimerHandle`` per call (about 25x a bare
    await here) and reschedules it on every exit. reskit instead files each
    expiry into a bucket keyed by its deadline rounded *up* to a grain of about
    1/64 of the timeout (a power of two between 1 ms and 62.5 ms), and keeps
    one loop timer per bucket. Entering is a set insertion; leaving a removal.
    A timeout therefore fires at most one grain late, never early. When a
    bucket fires, every task still in it is cancelled with ``Task.cancel`` and
    the CancelledError is turned into :class:`TimeoutExceeded` only if this
    expiry caused it (``Task.uncancel`` bookkeeping, as ``asyncio.timeout``
    does), so an outer cancellation or an outer timeout is never swallowed.

Sync
    A thread cannot be interrupted, so ``timeout=`` runs each attempt in a
    worker thread and stops *waiting* for it on time. The abandoned attempt runs
    on to completion in its thread; its result is discarded. Workers are pooled
    and reused, and a new one is started whenever none is idle, so hung
    attempts can never starve later calls. The ``reskit.timeout.abandoned``
    gauge counts the abandoned attempts still running. The pool is reset in a
    child process after ``os.fork()``: the child has none of its threads.

Nothing here imports asyncio: async drivers hand in their task, and only
:func:`settle` (which runs in an event loop) needs the module.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _clock, _telemetry
from ._context import _deadline

if TYPE_CHECKING:
    import asyncio

__all__ = ["Expiry", "grain_for", "run_in_worker", "wheel_for"]

_MIN_GRAIN = 2.0**-10  # ~1 ms
_MAX_GRAIN = 2.0**-4  # 62.5 ms


def grain_for(timeout: float) -> float:
    """The bucket width for a timeout: a power of two near ``timeout / 64``."""
    if timeout >= _MAX_GRAIN * 64.0:
        return _MAX_GRAIN  # the common case (seconds), without the arithmetic below
    if not timeout > _MIN_GRAIN * 64.0:
        return _MIN_GRAIN  # 62.5 ms or less (also zero, negative, and NaN)
    # frexp gives x = m * 2**e with 0.5 <= m < 1, so 2**(e-1) is the power of two at
    # or below x: floor(log2(x)) without the two float functions, on every call's path.
    grain = math.ldexp(0.5, math.frexp(timeout / 64.0)[1])
    if grain < _MIN_GRAIN:
        return _MIN_GRAIN
    return grain if grain < _MAX_GRAIN else _MAX_GRAIN


class Expiry:
    """One armed timeout of one task; ``fired`` once its bucket went off."""

    __slots__ = ("cancelling", "fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        # Cancellations already requested when we armed: any beyond ours
        # belong to someone else and must propagate.
        self.cancelling = task.cancelling()
        self.fired = False


class Wheel:
    """The expiry buckets of one event loop, on one clock."""

    __slots__ = ("__weakref__", "buckets", "clock", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: _clock.ClockBackend) -> None:
        self.loop = loop
        # The clock whose timers fire the buckets: a bucket armed under one clock
        # (a test's FakeClock) would never fire under the next one.
        self.clock = clock
        self.buckets: dict[float, set[Expiry]] = {}

    def arm(self, expiry: Expiry, when: float, grain: float) -> set[Expiry]:
        key = math.ceil(when / grain) * grain
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = {expiry}
            _clock.call_at(self.loop, key, self._fire, key)
        else:
            bucket.add(expiry)
        return bucket

    def _fire(self, key: float) -> None:
        bucket = self.buckets.pop(key, None)
        if not bucket:
            return
        for expiry in bucket:
            expiry.fired = True
            task = expiry.task
            _unresolved[task] = _unresolved.get(task, 0) + 1
            task.cancel()


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wheel] = weakref.WeakKeyDictionary()
_wheels_lock = threading.Lock()
# The wheel used last, as one object: two globals written separately could be
# read half-updated by a thread running another event loop.
_last_wheel: Wheel | None = None
# Expiries that fired and whose layer has not yet dealt with the cancellation,
# per task. When two of reskit's limits fire together (an attempt timeout capped
# at the deadline), the inner layer must tell the outer layer's pending request
# from a cancellation of the task by someone else.
_unresolved: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


def wheel_for(loop: asyncio.AbstractEventLoop) -> Wheel:
    """The wheel of ``loop`` on the current clock (cached for the loop used last)."""
    global _last_wheel
    last = _last_wheel
    clock = _clock._current  # the attribute current() returns, without the call
    if last is not None and last.loop is loop and last.clock is clock:
        return last
    with _wheels_lock:
        wheel = _wheels.get(loop)
        if wheel is None or wheel.clock is not clock:
            wheel = _wheels[loop] = Wheel(loop, clock)
    _last_wheel = wheel
    return wheel


def _resolve(expiry: Expiry) -> int:
    """Mark a fired expiry dealt with; return how many others of its task still are not."""
    task = expiry.task
    left = _unresolved.get(task, 1) - 1
    if left > 0:
        _unresolved[task] = left
    else:
        _unresolved.pop(task, None)
    return left


async def settle(expiry: Expiry) -> None:
    """Consume our own cancellation after the guarded code ended some other way.

    The bucket fired but the coroutine returned (or raised something else)
    before the CancelledError was delivered: the request is still pending on
    the task and would hit its next ``await`` (``uncancel`` alone does not clear
    it before Python 3.13). One yield delivers it here, where we absorb it, so
    the result is kept and no stray cancellation escapes. A cancellation from
    elsewhere that arrived meanwhile is re-raised; one from an enclosing layer
    of reskit's that fired at the same moment is left to that layer, which
    settles it the same way, so a ready result survives both.
    """
    asyncio = sys.modules["asyncio"]  # imported by whoever runs the event loop
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        others = _resolve(expiry)
        if expiry.task.uncancel() > expiry.cancelling + others:
            raise
    else:
        # The cancellation was delivered and swallowed inside the guarded code.
        _resolve(expiry)
        expiry.task.uncancel()


def expired(expiry: Expiry) -> bool:
    """After a CancelledError: was it ours alone (turn it into a timeout)?"""
    if not expiry.fired:
        return False
    _resolve(expiry)
    return expiry.task.uncancel() <= expiry.cancelling


# -- sync ----------------------------------------------------------------------


class _Job:
    __slots__ = (
        "abandoned",
        "args",
        "context",
        "done",
        "ended",
        "error",
        "finished_at",
        "fn",
        "kwargs",
        "result",
        "thread",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: contextvars.Context,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = context
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self.thread = ""
        # Both set under the pool's lock: the caller gave up on it, the worker finished it.
        self.abandoned = False
        self.ended = False

    def run(self) -> None:
        self.thread = threading.current_thread().name
        try:
            self.result = self.context.run(self.fn, *self.args, **self.kwargs)
        except BaseException as exc:  # handed to the waiting caller, re-raised there
            self.error = exc
        self.finished_at = _clock.now()
        self.done.set()


class _Worker:
    __slots__ = ("jobs", "thread")

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.thread: threading.Thread | None = None


class _WorkerPool:
    """Threads for sync attempts with a timeout; one spawned whenever none is idle."""

    IDLE_SECONDS = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[_Worker, threading.Condition]] = []
        self._names = itertools.count(1)
        #: Abandoned attempts still running (the reskit.timeout.abandoned gauge).
        self.abandoned = 0

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._idle:
                worker, cond = self._idle.pop()
                with cond:
                    worker.jobs.append(job)
                    cond.notify()
                return
        worker = _Worker()
        cond = threading.Condition()
        worker.jobs.append(job)
        thread = threading.Thread(
            target=self._work,
            args=(worker, cond),
            name=f"reskit-timeout-{next(self._names)}",
            daemon=True,  # an abandoned attempt must not keep the process alive
        )
        worker.thread = thread
        thread.start()

    def abandon(self, job: _Job) -> None:
        with self._lock:
            if not job.ended:
                job.abandoned = True
                self.abandoned += 1

    def _work(self, worker: _Worker, cond: threading.Condition) -> None:
        while True:
            with cond:
                job = worker.jobs.pop() if worker.jobs else None
            if job is None:
                with self._lock:
                    self._idle.append((worker, cond))
                with cond:
                    # Wait in real time: idling is not part of any timed behaviour.
                    cond.wait_for(lambda: bool(worker.jobs), timeout=self.IDLE_SECONDS)
                    if worker.jobs:
                        continue
                with self._lock:
                    try:
                        self._idle.remove((worker, cond))
                    except ValueError:
                        continue  # a job was handed to us as we timed out
                return
            job.run()
            with self._lock:
                job.ended = True
                if job.abandoned:
                    self.abandoned -= 1
            del job


_POOL = _WorkerPool()


def _reset_after_fork() -> None:
    # The child has only the thread that forked: none of the pool's workers, and
    # locks that another thread may have held at the fork. Start afresh.
    global _POOL, _last_wheel, _wheels_lock
    _POOL = _WorkerPool()
    _wheels_lock = threading.Lock()
    _wheels.clear()
    _unresolved.clear()
    _last_wheel = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def run_in_worker(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attempt_deadline: float,
    policy: str,
    timed_out: Callable[[str, float | None], BaseException],
    kind: str,
    limit: float | None,
) -> Any:
    """Run ``fn`` in a worker thread and wait for it until ``attempt_deadline``.

    The worker sees a copy of the caller's context (correlation ID, span,
    deadline) with the deadline tightened to ``attempt_deadline``. On time out,
    raises ``timed_out(kind, limit)``.
    """
    context = contextvars.copy_context()
    context.run(_deadline.set, attempt_deadline)
    job = _Job(fn, args, kwargs, context)
    _POOL.submit(job)
    # Done counts only if it finished by the deadline on reskit's clock: under a
    # FakeClock a worker can "take" longer than its timeout and still set done
    # before the caller looks; in real time this only settles a photo finish.
    _clock.wait_until(job.done, attempt_deadline)
    if job.done.is_set() and job.finished_at <= attempt_deadline:
        error = job.error
        if error is not None:
            # The job holds the error, and the error's traceback holds the job's
            # run() frame, which holds the job: break that cycle before raising.
            job.error = None
            try:
                raise error
            finally:
                del error, job
        return job.result
    _POOL.abandon(job)
    abandoned(job, policy)
    raise timed_out(kind, limit)


def abandoned(job: _Job, policy: str) -> None:
    span = _telemetry.current_span()
    if span is not None:
        _telemetry.guard(
            "the OpenTelemetry span (a timeout event)",
            span.add_event,
            "reskit.timeout.abandoned",
            {"reskit.policy": policy, "reskit.thread": job.thread},
        )


class _Abandoned:
    """The one object the abandoned-attempts gauge observes: the current pool."""

    __slots__ = ("__weakref__",)


_ABANDONED = _Abandoned()
_GAUGE = _telemetry.LiveGauge(
    "reskit.timeout.abandoned",
    unit="{attempt}",
    description=(
        "Sync attempts abandoned by a timeout whose worker thread still runs; rising "
        "without bound means a dependency hangs and threads pile up"
    ),
    observe=lambda _: (_POOL.abandoned, {}),
)
_GAUGE.track(_ABANDONED)

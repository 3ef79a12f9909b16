"""The bulkhead: a concurrency cap with a bounded FIFO waiting queue.

A bulkhead keeps one slow dependency from taking every thread, task or
connection a service has. At most ``max_concurrent`` calls run at once; up to
``max_waiting`` more wait in FIFO order for at most ``wait_timeout`` (and never
past the caller's remaining deadline); everyone else is rejected at once with
:class:`~reskit.BulkheadFull`, which a policy never retries.

A bulkhead is a gate (``_gate.py``) that may wait: :meth:`Bulkhead.admit`
blocks a thread in the queue, :meth:`Bulkhead.admit_async` awaits there, and
:meth:`Bulkhead.try_admit` takes a free slot without waiting. One set of
decisions serves them all: :meth:`Bulkhead._try_acquire` admits, queues or
rejects under a :class:`threading.Lock` held for well under a microsecond, and
only the waiting differs (a :class:`threading.Event` for threads, a future for
tasks). The lock is never held across the protected call
or a wait. A freed slot is handed directly to the oldest admissible waiter, so
a woken waiter never has to race for its slot.

Free slots are tokens in a list. ``list.pop()`` and ``list.append()`` are
atomic (under the GIL, and with per-object locking in free-threaded builds), so
the common case (no partition key, no adaptive limit, a slot free) takes and
returns a slot without the lock: on a VM where an uncontended lock costs
~200 ns that is most of the cost of the bulkhead. Tokens are made on demand: a
partition starts with a count of slots never handed out and an empty list, so
memory follows the concurrency a bulkhead sees, not its ``max_concurrent``; the
first calls take the lock to make their tokens, and from then on they
circulate. Everything that needs more
than one step (queueing, hand-over, partitions, adaptive limits) takes the
lock. A lock-free release publishes its token and then looks for waiters, and a
caller that queues looks for tokens after publishing itself, so whichever comes
second sees the other: a slot is never left free while someone waits.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _clock, _fork, _telemetry
from ._adaptive import AdaptiveLimit
from ._config import seconds, setting
from ._context import remaining_deadline
from ._errors import BulkheadFull, Rejected

if TYPE_CHECKING:
    import asyncio

__all__ = ["DEFAULT_MAX_PARTITIONS", "Bulkhead"]

#: How many keyed partitions may be alive at once unless ``max_partitions`` says otherwise.
DEFAULT_MAX_PARTITIONS = 1024

# Weight of the newest call in the mean duration behind ``retry_after``.
_DURATION_SMOOTHING = 0.2
# The global cap of a bulkhead without an adaptive limit: it never binds.
_UNBOUNDED = 1 << 62
# Outcomes an adaptive limit reads as overload.
_DROPS = (TimeoutError, Rejected)
# Idle partition objects kept for reuse.
_SPARE_PARTITIONS = 16


class _Partition:
    """The slots and queue of one key (or of the whole bulkhead); also the permit."""

    __slots__ = ("free", "key", "stale", "unissued", "waiters")

    def __init__(self, key: str | None, size: int) -> None:
        self.key = key
        # Set in a forked child on the partitions it inherited and replaced: a slot
        # taken from one before the fork is then given back to nothing.
        self.stale = False  # pragma: no mutate (None would read as false too)
        # One token per free slot that has been handed out before (see the module
        # docstring for why a list), and the slots never handed out yet. Always:
        # len(free) + unissued + slots in use == max_concurrent.
        self.free: list[None] = []
        self.unissued = size
        self.waiters: deque[_Waiter] = deque()

    def available(self) -> int:
        return len(self.free) + self.unissued


def _over_quota(part: _Partition) -> str | None:
    """The key of a keyed partition whose own slots are all in use, else ``None``.

    A keyed partition with a free slot was refused by the bulkhead's shared
    (adaptive) cap: the service is full, not that key's share of it.
    """
    return part.key if part.key is not None and not part.available() else None


def _take_slot_locked(part: _Partition) -> bool:
    """Take a free slot, with the lock held: a token, or a slot never handed out."""
    try:
        part.free.pop()  # lock-free takers may be emptying the list meanwhile
    except IndexError:
        if not part.unissued:
            return False
        part.unissued -= 1
    return True


class _Waiter:
    __slots__ = ("budget", "deadline", "granted", "partition", "seq", "settled")

    def __init__(self, partition: _Partition, seq: int, budget: float | None) -> None:
        self.partition = partition
        self.seq = seq
        # Relative seconds for the sync wait, absolute clock time for the async timer.
        self.budget = budget
        self.deadline = None if budget is None else _clock.now() + budget
        # Set under the bulkhead's lock when a slot is handed over; the event or
        # future only wakes the waiter, this flag is the truth.
        self.granted = False  # pragma: no mutate (None would read as false too)
        # Set once the waiter has left for good (with its slot, without one, or
        # by passing the slot on), so a second exit path cannot undo it twice.
        self.settled = False  # pragma: no mutate (None would read as false too)

    def wake(self, bulkhead: Bulkhead) -> None:
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("event",)

    def __init__(self, partition: _Partition, seq: int, budget: float | None) -> None:
        super().__init__(partition, seq, budget)
        self.event = threading.Event()

    def wake(self, bulkhead: Bulkhead) -> None:
        self.event.set()


class _TaskWaiter(_Waiter):
    __slots__ = ("future", "loop", "thread")

    def __init__(self, partition: _Partition, seq: int, budget: float | None) -> None:
        super().__init__(partition, seq, budget)
        from asyncio import get_running_loop  # only a queued async caller gets here

        self.loop = get_running_loop()
        self.future: asyncio.Future[None] = self.loop.create_future()
        self.thread = threading.get_ident()

    def wake(self, bulkhead: Bulkhead) -> None:
        if self.loop.is_closed():
            # The waiter's loop is gone, so it will never run to take the slot
            # handed to it: pass the slot on instead of leaking it.
            bulkhead._abandon(self)
            return
        if threading.get_ident() == self.thread:
            _resolve(self.future)
            return
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # closed between the check and the call
            bulkhead._abandon(self)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Bulkhead:
    """Cap how many calls run at once, with a bounded FIFO waiting queue.

    Use it through a policy (``reskit.Policy("db", bulkhead=Bulkhead(10))``);
    the policy holds a slot around the whole protected call, outside its
    retries, and releases it however the call ends (return, exception,
    cancellation). A call that cannot get a slot raises
    :class:`~reskit.BulkheadFull`, which is never retried and costs no circuit
    breaker sample.

    Args:
        max_concurrent: the most calls allowed to run at once (per partition
            when ``key`` is given).
        max_waiting: how many callers may wait for a slot (per partition);
            the default 0 rejects as soon as every slot is taken.
        wait_timeout: how long a caller waits for a slot (seconds or a
            timedelta) before :class:`~reskit.BulkheadFull`; ``None`` waits as
            long as the caller's deadline allows. A wait never outlasts
            :func:`reskit.remaining_deadline`.
        key: a function called with the protected call's arguments that
            returns a partition key (a tenant, a feature) or ``None``. Each key
            gets its own ``max_concurrent`` slots and ``max_waiting`` queue, so
            one tenant cannot starve the others. Calls whose key is ``None``
            share one default partition.
        max_partitions: the most keyed partitions alive at once. A partition
            lives while it has calls in flight or waiting and is dropped when
            it has neither; while ``max_partitions`` are alive a call with a new
            key is rejected, so hostile or unbounded keys cannot grow memory.
            The default partition does not count.
        limit: an adaptive limit (:class:`~reskit.AIMDLimit`,
            :class:`~reskit.GradientLimit`) that learns how many calls the
            backend sustains. It caps the calls in flight across the whole
            bulkhead; ``max_concurrent`` remains the hard ceiling per
            partition. One limit object per bulkhead.
        name: the name reported on the ``reskit.bulkhead.occupancy`` gauge;
            by default the name of the first policy that uses the bulkhead.

    The settings are fixed at construction (assigning one raises
    :class:`~reskit.FrozenConfigError`).

    ``BulkheadFull.retry_after`` estimates when a slot will be free for a new
    caller: the mean duration of recent calls that ended while their partition
    was full (exponentially weighted), times the callers queued ahead plus one,
    divided by the limit. Until such a call has ended it is ``wait_timeout``
    (or ``None``).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_adaptive",
        "_default",
        "_global_cap",
        "_in_flight",
        "_key",
        "_lock",
        "_lock_free",
        "_max_concurrent",
        "_max_partitions",
        "_max_waiting",
        "_mean_duration",
        "_name",
        "_partitions",
        "_queued",
        "_seq",
        "_spare",
        "_wait_timeout",
        "_waiting",
    )

    _instead = "Build a new Bulkhead(...) and use policy.replace(bulkhead=...)."

    max_concurrent = setting("_max_concurrent", "The most calls allowed to run at once.")
    max_waiting = setting("_max_waiting", "How many callers may wait for a slot.")
    wait_timeout = setting("_wait_timeout", "Seconds a caller waits for a slot, or ``None``.")
    key = setting("_key", "The partition key function, or ``None``.")
    max_partitions = setting("_max_partitions", "The most keyed partitions alive at once.")
    name = setting(
        "_name", "The name on the occupancy gauge (by default, the first policy's name)."
    )
    #: Durations feed ``retry_after`` and adaptive limits (gate protocol).
    timed = True
    #: Admission may wait in the queue (gate protocol).
    waits = True
    #: What :meth:`admit` raises (gate protocol).
    rejection = BulkheadFull

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_waiting: int = 0,
        wait_timeout: float | timedelta | None = None,
        key: Callable[..., str | None] | None = None,
        max_partitions: int = DEFAULT_MAX_PARTITIONS,
        limit: AdaptiveLimit | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise TypeError(
                f"max_concurrent must be an int, got {max_concurrent!r}; "
                "pass the most calls allowed to run at once, e.g. Bulkhead(10)"
            )
        if max_concurrent < 1:
            raise ValueError(
                f"max_concurrent must be at least 1, got {max_concurrent}; "
                "pass the most calls allowed to run at once, e.g. Bulkhead(10)"
            )
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(
                f"max_waiting must be an int >= 0, got {max_waiting!r}; "
                "it is how many callers may queue for a slot (0 rejects at once)"
            )
        timeout = seconds(wait_timeout, "wait_timeout", waited=True)
        if timeout is not None and max_waiting == 0:
            raise ValueError(
                f"wait_timeout={timeout!r} has no effect with max_waiting=0 (nobody waits); "
                "set max_waiting to how many callers may queue, or drop wait_timeout"
            )
        if key is not None and not callable(key):
            raise TypeError(
                f"key must be a function of the call's arguments returning a str or None, "
                f"got {key!r}"
            )
        if (
            isinstance(max_partitions, bool)
            or not isinstance(max_partitions, int)
            or max_partitions < 1
        ):
            raise ValueError(
                f"max_partitions must be an int >= 1, got {max_partitions!r}; it bounds how "
                f"many keys may hold slots at once (default {DEFAULT_MAX_PARTITIONS})"
            )
        if limit is not None:
            if not isinstance(limit, AdaptiveLimit):
                raise TypeError(
                    f"limit must be an adaptive limit such as reskit.AIMDLimit() or "
                    f"reskit.GradientLimit(), got {limit!r}; for a fixed cap use max_concurrent"
                )
            limit._bind()
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")

        self._max_concurrent = max_concurrent
        self._max_waiting = max_waiting
        self._wait_timeout = timeout
        self._key = key
        self._max_partitions = max_partitions
        self._name = name
        self._adaptive = limit
        self._global_cap = limit.current if limit is not None else _UNBOUNDED
        # The default partition takes and returns slots without the lock unless
        # an adaptive limit needs a bulkhead-wide count kept in step.
        self._lock_free = limit is None
        self._lock = threading.Lock()
        self._default = _Partition(None, max_concurrent)
        self._partitions: dict[str, _Partition] = {}
        self._spare: list[_Partition] = []
        # Partitions with a non-empty queue, for handing slots across partitions
        # when an adaptive limit caps the whole bulkhead.
        self._queued: dict[_Partition, None] = {}
        # Calls in flight across the bulkhead; only kept with an adaptive limit.
        self._in_flight = 0
        self._waiting = 0
        self._seq = 0  # pragma: no mutate (only the order of seqs matters)
        self._mean_duration = -1.0  # pragma: no mutate (any negative means "no estimate yet")
        _GAUGE.track(self)
        _fork.track(self)

    def _after_fork(self) -> None:
        # In a forked child only the forking thread exists: the slots other threads
        # held would never come back and their waiters never wake. Start empty; the
        # old partitions are marked stale, so a slot the forking thread itself held
        # (a call or an admission in progress at the fork) is recorded as nothing.
        # pragma: no mutate start (runs only in a forked child, where mutmut cannot link it to
        # a test; tests/test_mutation_fork.py checks it)
        self._default.stale = True
        for part in self._partitions.values():
            part.stale = True
        self._lock = threading.Lock()
        self._default = _Partition(None, self._max_concurrent)
        self._partitions = {}
        self._spare = []
        self._queued = {}
        self._in_flight = 0
        self._waiting = 0
        if self._adaptive is not None:
            self._global_cap = self._adaptive.current
        # pragma: no mutate end

    # -- introspection -------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """How many calls hold a slot now, across all partitions.

        .. versionadded:: 0.1.0
        """
        if self._adaptive is not None:
            return self._in_flight
        cap = self._max_concurrent
        with self._lock:
            busy = cap - self._default.available()
            for part in self._partitions.values():
                busy += cap - part.available()
        return busy

    @property
    def waiting(self) -> int:
        """How many callers are queued for a slot now, across all partitions.

        .. versionadded:: 0.1.0
        """
        return self._waiting

    @property
    def partitions(self) -> int:
        """How many keyed partitions are alive now (at most ``max_partitions``).

        .. versionadded:: 0.1.0
        """
        return len(self._partitions)

    @property
    def limit(self) -> int:
        """The most calls one partition may run right now.

        ``max_concurrent``, or less while an adaptive limit holds it lower.

        .. versionadded:: 0.1.0
        """
        cap = self._global_cap
        return cap if cap < self._max_concurrent else self._max_concurrent

    @property
    def adaptive_limit(self) -> AdaptiveLimit | None:
        """The adaptive limit given as ``limit=``, or ``None``.

        .. versionadded:: 0.1.0
        """
        return self._adaptive

    def __repr__(self) -> str:
        name = f"{self._name!r}, " if self._name is not None else ""
        return (
            f"Bulkhead({name}max_concurrent={self._max_concurrent}, limit={self.limit}, "
            f"in_flight={self.in_flight}, waiting={self._waiting}, "
            f"partitions={len(self._partitions)})"
        )

    # -- the gate protocol (what a policy calls around each call) -------------
    def _partition(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """Return the partition key of a call (only called when ``key`` is set)."""
        assert self._key is not None
        value = self._key(*args, **kwargs)
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"the bulkhead's key function must return a str or None, got "
                f"{type(value).__name__}; convert the key with str()"
            )
        return value

    def try_admit(
        self,
        policy_name: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> _Partition | None:
        """Take a free slot at once, or return ``None``.

        The default partition of a bulkhead without an adaptive limit takes
        it without the lock; an adaptive limit, or a ``key`` whose partition
        exists, takes the lock. ``None`` means "call :meth:`admit` or
        :meth:`admit_async`", which queue, reject or admit (and run the key
        function, and make a new key's partition). Never raises, never waits.

        .. versionadded:: 0.1.0
        """
        if key is None:
            if fn is not None and self._key is not None:
                return None  # the key function decides the partition: admit_async runs it
            if self._lock_free:
                return self._take(None)
        # An async caller queues in a coroutine: one taking a free slot need not.
        with self._lock:
            part = self._default if key is None else self._partitions.get(key)
            if part is not None and self._grant_now_locked(part):
                if self._name is None:
                    self._name = policy_name  # as admit() would: the gauge's name
                return part
        return None

    def _take(self, key: str | None) -> _Partition | None:
        if key is None and self._lock_free:
            part = self._default
            # Behind a queue, a newcomer must queue too.
            if not part.waiters:
                try:
                    part.free.pop()
                except IndexError:
                    return None
                return part
        return None

    def _key_of(
        self,
        key: str | None,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
    ) -> str | None:
        if key is None and fn is not None and self._key is not None:
            return self._partition(args, kwargs or {})
        return key

    def admit(
        self,
        policy_name: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> _Partition:
        """Take a slot for a call, blocking this thread in the queue if allowed.

        The partition is ``key`` when given, else what the ``key`` function
        returns for ``args`` and ``kwargs``. Raises :class:`~reskit.BulkheadFull`.
        Every permit must be handed back to :meth:`record` exactly once.

        .. versionadded:: 0.1.0
        """
        if self._name is None:
            self._name = policy_name
        key = self._key_of(key, fn, args, kwargs)
        permit = self._take(key)  # pragma: no mutate (a fast path: _try_acquire takes it too)
        if permit is not None:
            return permit
        # pragma: no mutate start (only the truth of "asynchronous" is read: None is False)
        got = self._try_acquire(policy_name, key, False)
        # pragma: no mutate end
        if isinstance(got, _Partition):
            return got
        assert isinstance(got, _ThreadWaiter)
        try:
            if got.deadline is None:
                _clock.wait(got.event, None)
            else:
                # Against the absolute deadline, so time that passed before the
                # wait began (or a spurious wake-up) is not waited for twice.
                while not got.event.is_set():
                    remaining = got.deadline - _clock.now()
                    if remaining <= 0.0:
                        break
                    _clock.wait(got.event, remaining)
        except BaseException:
            self._abandon(got)
            raise
        return self._finish_wait(got, policy_name)

    async def admit_async(
        self,
        policy_name: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> _Partition:
        """Like :meth:`admit`, awaiting (not blocking) while queued.

        .. versionadded:: 0.1.0
        """
        if self._name is None:
            self._name = policy_name
        key = self._key_of(key, fn, args, kwargs)
        permit = self._take(key)  # pragma: no mutate (a fast path: _try_acquire takes it too)
        if permit is not None:
            return permit
        got = self._try_acquire(policy_name, key, True)
        if isinstance(got, _Partition):
            return got
        assert isinstance(got, _TaskWaiter)
        timer = None
        if got.deadline is not None:
            timer = _clock.call_at(got.loop, got.deadline, _resolve, got.future)
        try:
            await got.future
        except BaseException:
            # Cancelled while queued, or after a slot was handed over but before
            # this task ran again: either way nothing may stay behind.
            self._abandon(got)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return self._finish_wait(got, policy_name)

    def record(
        self, permit: _Partition, exc: BaseException | None, duration: float, result: Any = None
    ) -> None:
        """Give back the slot of ``permit`` and feed the adaptive limit.

        ``exc`` is what the call raised (``None`` if it returned) and
        ``duration`` how long it held the slot, in seconds.

        .. versionadded:: 0.1.0
        """
        if permit.stale:
            return
        if not permit.free and not permit.unissued:
            # ``retry_after`` is only ever asked for while slots are short, so
            # only calls ending in a full partition feed its estimate: the
            # common, uncongested release skips the arithmetic. Unlocked, two
            # releases racing can lose one sample of an estimate.
            mean = self._mean_duration
            self._mean_duration = (
                duration if mean < 0.0 else mean + (duration - mean) * _DURATION_SMOOTHING
            )
        woken: list[_Waiter] | None
        if self._lock_free and permit is self._default:
            returned = False  # pragma: no mutate (None would read as false too)
            if not permit.waiters:
                permit.free.append(None)
                # A caller may have queued after our check: look again now that
                # the token is published (it looks for tokens after queueing).
                if not permit.waiters:
                    return
                returned = True
            with self._lock:
                if not returned:
                    permit.free.append(None)
                woken = self._grant_locked(permit)
            for waiter in woken:
                waiter.wake(self)
            return

        adaptive = self._adaptive
        error: Exception | None = None
        with self._lock:
            permit.free.append(None)
            if adaptive is not None:
                in_flight = self._in_flight
                self._in_flight = in_flight - 1
                # Any failure other than a timeout or a rejection says nothing
                # reliable about capacity (a fast error would even look like
                # spare capacity), and a cancellation says nothing at all.
                if exc is None or isinstance(exc, _DROPS):
                    try:
                        self._global_cap = adaptive.on_sample(duration, in_flight, exc is not None)
                    except Exception as failed:
                        # A faulty custom limit must not strand the queue: finish
                        # the hand-over first, raise afterwards.
                        error = failed
            if self._waiting:
                woken = self._grant_locked(permit)
            else:
                woken = None  # pragma: no mutate (any false value: nobody to wake)
                if permit is not self._default:  # the default partition is never dropped
                    self._reclaim_locked(permit)
        if woken:
            for waiter in woken:
                waiter.wake(self)
        if error is not None:
            raise error

    # -- decisions (shared by the sync and async paths) ----------------------
    def _grant_now_locked(self, part: _Partition) -> bool:
        """Take a slot of ``part`` for a newcomer, with the lock held, if one is free to take."""
        # Slots are handed straight to waiters, so a partition with a free slot
        # has no admissible waiter; ``not part.waiters`` guards it.
        if not part.waiters and self._in_flight < self._global_cap and _take_slot_locked(part):
            if self._adaptive is not None:
                self._in_flight += 1
            return True
        return False

    def _try_acquire(
        self, policy_name: str | None, key: str | None, asynchronous: bool
    ) -> _Partition | _Waiter:
        woken: list[_Waiter] | None = None  # pragma: no mutate (any false value)
        waiter: _Waiter | None = None
        with self._lock:
            part = self._default if key is None else self._partitions.get(key)
            if part is None:
                assert key is not None
                if len(self._partitions) < self._max_partitions:
                    part = self._new_partition_locked(key)
            quota: str | None = None
            if part is None:
                reason = (
                    f"{len(self._partitions)} partitions are in use "
                    f"(max_partitions={self._max_partitions}), so a new key is refused"
                )
                retry_after = self._retry_after_locked(0)
            else:
                if self._grant_now_locked(part):
                    return part
                quota = _over_quota(part)
                reason, retry_after, waiter = self._enqueue_locked(part, asynchronous)
                # pragma: no mutate start (an "or" would only add a hand-over that finds no
                # free slot, and the hand-over itself is there for a race no test can time)
                if waiter is not None and self._lock_free and part is self._default:
                    # A lock-free release may have published a token after our
                    # take failed and before we queued.
                    woken = self._grant_locked(part)
                # pragma: no mutate end
        if woken:
            for other in woken:
                other.wake(self)
        # Queueing and rejection are where a newly configured meter provider gets
        # the gauge (as the breaker does on its transitions); admissions skip it.
        _GAUGE.ensure()
        if waiter is not None:
            return waiter
        raise BulkheadFull(
            f"bulkhead full: {reason}",
            policy=policy_name,
            retry_after=retry_after,
            partition=quota,
        )

    def _enqueue_locked(
        self, part: _Partition, asynchronous: bool
    ) -> tuple[str, float | None, _Waiter | None]:
        if len(part.waiters) >= self._max_waiting:
            busy = self._max_concurrent - part.available()
            reason = f"{busy} in flight (limit {self.limit}) and " + (
                "no waiting allowed (max_waiting=0)"
                if self._max_waiting == 0
                else f"the waiting queue is full (max_waiting={self._max_waiting})"
            )
            retry_after = self._retry_after_locked(len(part.waiters))
            self._reclaim_locked(part)
            return reason, retry_after, None
        budget = self._wait_timeout
        left = remaining_deadline()
        # The pragma marks "left <= budget": when they are equal either is the budget.
        if left is not None and (budget is None or left < budget):  # pragma: no mutate
            budget = left
        if budget is not None and budget <= 0.0:
            retry_after = self._retry_after_locked(len(part.waiters))
            self._reclaim_locked(part)
            return "no time left before the deadline to wait for a slot", retry_after, None
        self._seq += 1  # pragma: no mutate (+= 2 keeps the order, which is all seq is for)
        waiter: _Waiter
        if asynchronous:
            waiter = _TaskWaiter(part, self._seq, budget)
        else:
            waiter = _ThreadWaiter(part, self._seq, budget)
        if not part.waiters:
            self._queued[part] = None  # pragma: no mutate (an ordered set: the value is unused)
        part.waiters.append(waiter)
        self._waiting += 1
        return "", None, waiter  # pragma: no mutate (a caller that queues reads no reason)

    def _finish_wait(self, waiter: _Waiter, policy_name: str | None) -> _Partition:
        part = waiter.partition
        with self._lock:
            if waiter.granted:
                waiter.settled = True  # pragma: no mutate (nothing ends this waiter again)
                return part
            quota = _over_quota(part)
            self._remove_locked(waiter)
            retry_after = self._retry_after_locked(len(part.waiters))
        # Only a waiter with a budget gets here without a slot: no budget, no time-out.
        waited = "" if waiter.budget is None else f" {waiter.budget:.3g}s"  # pragma: no mutate
        raise BulkheadFull(
            f"bulkhead full: waited{waited} for a slot and none freed up",
            policy=policy_name,
            retry_after=retry_after,
            partition=quota,
        )

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo a wait that ended abnormally: leave the queue or hand the slot on."""
        with self._lock:
            if waiter.settled:
                # E.g. a coroutine closed on a dead loop after its slot was passed on.
                return
            if not waiter.granted:
                self._remove_locked(waiter)
                return
            # The slot arrived but its taker is gone; pass it on unsampled.
            waiter.settled = True
            part = waiter.partition
            part.free.append(None)
            if self._adaptive is not None:
                self._in_flight -= 1
            woken = self._grant_locked(part)
        for other in woken:
            other.wake(self)

    def _remove_locked(self, waiter: _Waiter) -> None:
        waiter.settled = True  # pragma: no mutate (out of the queue, nothing ends it again)
        part = waiter.partition
        part.waiters.remove(waiter)
        self._waiting -= 1
        if not part.waiters:
            del self._queued[part]
        self._reclaim_locked(part)

    def _reclaim_locked(self, part: _Partition) -> None:
        if (
            part is not self._default
            and not part.waiters
            and part.available() == self._max_concurrent
        ):
            self._drop_locked(part)

    def _new_partition_locked(self, key: str) -> _Partition:
        if self._spare:
            part = self._spare.pop()
            part.key = key
        else:
            part = _Partition(key, self._max_concurrent)
        self._partitions[key] = part
        return part

    def _drop_locked(self, part: _Partition) -> None:
        # ``part.key`` is a str for every partition but the default one.
        del self._partitions[part.key]  # type: ignore[arg-type]
        # Per-request keys (a tenant per call) would otherwise build and free a
        # partition on every call; a few spares make that churn allocation-free.
        # pragma: no mutate start (how many spares are kept, and their key, is memory only)
        if len(self._spare) < _SPARE_PARTITIONS:
            part.key = None
            self._spare.append(part)
        # pragma: no mutate end

    def _grant_locked(self, part: _Partition) -> list[_Waiter]:
        woken: list[_Waiter] = []
        if self._adaptive is None:
            # Without a bulkhead-wide cap only the releasing partition gained room.
            waiters = part.waiters
            while waiters and _take_slot_locked(part):
                woken.append(self._hand_over_locked(waiters.popleft()))
        else:
            # The bulkhead-wide cap may have been what held queues back in any
            # partition: admit the oldest waiter whose own partition has room.
            while self._queued and self._in_flight < self._global_cap:
                best: _Partition | None = None
                for queued in self._queued:
                    # pragma: no mutate start (<= picks the same: no two waiters share a seq)
                    if queued.available() and (
                        best is None or queued.waiters[0].seq < best.waiters[0].seq
                    ):
                        best = queued
                    # pragma: no mutate end
                if best is None:
                    break
                _take_slot_locked(best)
                self._in_flight += 1
                woken.append(self._hand_over_locked(best.waiters.popleft()))
        self._reclaim_locked(part)
        return woken

    def _hand_over_locked(self, waiter: _Waiter) -> _Waiter:
        part = waiter.partition
        waiter.granted = True
        self._waiting -= 1
        if not part.waiters:
            del self._queued[part]
        return waiter

    def _retry_after_locked(self, queued_ahead: int) -> float | None:
        mean = self._mean_duration
        if mean < 0.0:
            return self._wait_timeout
        # The queue ahead drains at about ``limit`` calls per mean call duration.
        return mean * (queued_ahead + 1) / self.limit


# -- the occupancy gauge -------------------------------------------------------
_GAUGE = _telemetry.LiveGauge(
    "reskit.bulkhead.occupancy",
    unit="{call}",
    description="Calls holding a bulkhead slot, per bulkhead",
    observe=lambda bulkhead: (
        None
        if bulkhead._name is None
        else (bulkhead.in_flight, {"reskit.bulkhead.name": bulkhead._name})
    ),
)

"""The bulkhead on its own: admission, waiting, partitions, telemetry.

Calls are held in flight with events and barriers, never with sleeps, and every
wait has a timeout so a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any, SupportsIndex

import pytest

from reskit import AIMDLimit, Bulkhead, BulkheadFull, Rejected, TimeoutExceeded, _context
from reskit._bulkhead import _GAUGE
from reskit.testing import FakeClock

WAIT = 10.0  # seconds a test waits for another thread before failing


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Let other threads run until one of them reaches a state (the bulkhead has no
    event to wait on); ``timeout`` real seconds is only a guard against a hang."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        os.sched_yield()  # hand the core to the threads being waited for; no sleep
        time.sleep(0)  # a GIL release, not a wait


async def settle(rounds: int = 5) -> None:
    """Let every ready task on the loop run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Peak:
    """Counts calls inside the protected section; remembers the most at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def enter(self) -> None:
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)

    def exit(self) -> None:
        with self.lock:
            self.current -= 1


# -- exact counts under concurrency ---------------------------------------------


def test_200_threads_exactly_max_concurrent_admitted() -> None:
    bulkhead = Bulkhead(10)
    start = threading.Barrier(200)
    hold = threading.Event()
    peak = Peak()
    lock = threading.Lock()
    outcomes = {"admitted": 0, "rejected": 0}

    def worker() -> None:
        start.wait(WAIT)
        try:
            permit = bulkhead.admit("p", None)
        except BulkheadFull:
            with lock:
                outcomes["rejected"] += 1
            return
        with lock:
            outcomes["admitted"] += 1
        peak.enter()
        try:
            assert hold.wait(WAIT)
        finally:
            peak.exit()
            bulkhead.record(permit, None, 0.0)

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for thread in threads:
        thread.start()
    wait_until(lambda: outcomes["admitted"] + outcomes["rejected"] == 200)
    assert outcomes == {"admitted": 10, "rejected": 190}
    assert bulkhead.in_flight == 10
    hold.set()
    for thread in threads:
        thread.join(WAIT)
    assert peak.peak == 10
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


async def test_500_tasks_exactly_max_concurrent_admitted() -> None:
    bulkhead = Bulkhead(10)
    hold = asyncio.Event()
    peak = Peak()

    async def call() -> str:
        try:
            permit = await bulkhead.admit_async("p", None)
        except BulkheadFull:
            return "rejected"
        peak.enter()
        try:
            await asyncio.wait_for(hold.wait(), WAIT)
        finally:
            peak.exit()
            bulkhead.record(permit, None, 0.0)
        return "admitted"

    tasks = [asyncio.create_task(call()) for _ in range(500)]
    await settle()
    assert bulkhead.in_flight == 10
    hold.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert results.count("admitted") == 10
    assert results.count("rejected") == 490
    assert peak.peak == 10
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


def test_threads_with_a_queue_all_run_and_never_exceed_the_limit() -> None:
    bulkhead = Bulkhead(5, max_waiting=100)
    peak = Peak()
    tokens = threading.Semaphore(0)  # each token lets one holder finish
    ran: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            permit = bulkhead.admit("p", None)
            peak.enter()
            try:
                ran.append(i)
                assert tokens.acquire(timeout=WAIT)
            finally:
                peak.exit()
                bulkhead.record(permit, None, 0.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    wait_until(lambda: bulkhead.in_flight == 5 and bulkhead.waiting == 95)
    for _ in range(100):
        tokens.release()
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    assert sorted(ran) == list(range(100))
    assert peak.peak == 5
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


async def test_tasks_with_a_queue_all_run_and_never_exceed_the_limit() -> None:
    bulkhead = Bulkhead(7, max_waiting=500)
    peak = Peak()

    async def call() -> None:
        permit = await bulkhead.admit_async("p", None)
        peak.enter()
        try:
            await asyncio.sleep(0)  # yield so that others pile up behind us
        finally:
            peak.exit()
            bulkhead.record(permit, None, 0.0)

    await asyncio.wait_for(asyncio.gather(*(call() for _ in range(500))), WAIT)
    assert peak.peak == 7
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


def test_stress_threads_and_tasks_share_one_bulkhead() -> None:
    # Forcing a thread switch every microsecond interleaves the lock-free fast
    # path with queueing and hand-over as much as CPython allows: a lost wake-up
    # shows as a worker that never finishes, a double grant as a peak above 3.
    bulkhead = Bulkhead(3, max_waiting=1_000)
    peak = Peak()
    rounds = 1_000
    errors: list[BaseException] = []
    start = threading.Barrier(9)

    def thread_worker() -> None:
        try:
            start.wait(WAIT)
            for _ in range(rounds):
                permit = bulkhead.admit("p", None)
                peak.enter()
                peak.exit()
                bulkhead.record(permit, None, 0.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async def task_worker() -> None:
        for _ in range(rounds):
            permit = await bulkhead.admit_async("p", None)
            peak.enter()
            await asyncio.sleep(0)
            peak.exit()
            bulkhead.record(permit, None, 0.0)

    def loop_worker() -> None:
        async def main() -> None:
            await asyncio.gather(*(task_worker() for _ in range(8)))

        try:
            start.wait(WAIT)
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=thread_worker) for _ in range(8)]
        threads.append(threading.Thread(target=loop_worker))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(previous)
    assert not any(thread.is_alive() for thread in threads), "a waiter was never woken"
    assert errors == []
    assert peak.peak <= 3
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)
    assert bulkhead._default.available() == 3


class HookedTokens(list[None]):
    """The default partition's free-slot list, with a hook to stage a race.

    ``on_append`` runs once just before the next token is published;
    ``on_empty_locked`` runs once just after a take found no token while the
    bulkhead's lock is held. Each stands for another thread acting at exactly
    that moment.
    """

    def __init__(self, bulkhead: Bulkhead, items: list[None]) -> None:
        super().__init__(items)
        self.bulkhead = bulkhead
        self.on_append: Callable[[], None] | None = None
        self.on_empty_locked: Callable[[], None] | None = None

    def append(self, item: None) -> None:
        hook, self.on_append = self.on_append, None
        if hook is not None:
            hook()
        super().append(item)

    def pop(self, index: SupportsIndex = -1) -> None:
        try:
            return super().pop(index)
        except IndexError:
            if self.bulkhead._lock.locked():
                hook, self.on_empty_locked = self.on_empty_locked, None
                if hook is not None:
                    hook()
            raise


def test_race_caller_queues_between_the_release_check_and_the_publish() -> None:
    bulkhead = Bulkhead(1, max_waiting=1)
    tokens = bulkhead._default.free = HookedTokens(bulkhead, bulkhead._default.free)
    holder = bulkhead.admit("p", None)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(bulkhead.admit("p", None)))

    def caller_queues() -> None:  # after the releaser saw no waiters
        thread.start()
        wait_until(lambda: bulkhead.waiting == 1)

    tokens.on_append = caller_queues
    bulkhead.record(holder, None, 0.0)
    thread.join(WAIT)
    assert len(got) == 1, "the queued caller missed the slot released under it"
    assert (bulkhead.waiting, len(tokens)) == (0, 0)
    bulkhead.record(got[0], None, 0.0)


async def test_race_slot_freed_between_the_failed_take_and_queueing() -> None:
    bulkhead = Bulkhead(1, max_waiting=1)
    tokens = bulkhead._default.free = HookedTokens(bulkhead, bulkhead._default.free)
    holder = await bulkhead.admit_async("p", None)
    # While the newcomer holds the lock having found no token, the holder
    # releases without the lock: nobody is queued yet, so it just publishes.
    tokens.on_empty_locked = lambda: bulkhead.record(holder, None, 0.0)
    permit = await asyncio.wait_for(bulkhead.admit_async("p", None), WAIT)
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(permit, None, 0.0)
    assert len(tokens) == 1


# -- FIFO ---------------------------------------------------------------------


def test_threads_are_admitted_in_arrival_order() -> None:
    bulkhead = Bulkhead(1, max_waiting=20)
    holder = bulkhead.admit("p", None)
    order: list[int] = []

    def worker(i: int) -> None:
        permit = bulkhead.admit("p", None)
        order.append(i)
        bulkhead.record(permit, None, 0.0)

    threads = []
    for i in range(20):
        thread = threading.Thread(target=worker, args=(i,))
        thread.start()
        threads.append(thread)
        wait_until(lambda n=i + 1: bulkhead.waiting == n)  # type: ignore[misc]
    bulkhead.record(holder, None, 0.0)
    for thread in threads:
        thread.join(WAIT)
    assert order == list(range(20))


async def test_tasks_are_admitted_in_arrival_order() -> None:
    bulkhead = Bulkhead(2, max_waiting=50)
    holders = [await bulkhead.admit_async("p", None) for _ in range(2)]
    order: list[int] = []

    async def call(i: int) -> None:
        permit = await bulkhead.admit_async("p", None)
        order.append(i)
        await asyncio.sleep(0)
        bulkhead.record(permit, None, 0.0)

    tasks = []
    for i in range(50):
        tasks.append(asyncio.create_task(call(i)))
        await settle(1)
    assert bulkhead.waiting == 50
    for permit in holders:
        bulkhead.record(permit, None, 0.0)
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert order == list(range(50))


async def test_a_newcomer_never_overtakes_the_queue() -> None:
    bulkhead = Bulkhead(1, max_waiting=1)
    holder = await bulkhead.admit_async("p", None)
    queued = asyncio.create_task(bulkhead.admit_async("p", None))
    await settle()
    bulkhead.record(holder, None, 0.0)
    # The slot now belongs to the queued task even though it has not run yet,
    # so a thread arriving now has to queue behind it.
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(bulkhead.admit("p", None)))
    thread.start()
    await asyncio.to_thread(wait_until, lambda: bulkhead.waiting == 1)
    assert got == []
    bulkhead.record(await queued, None, 0.0)
    await asyncio.to_thread(thread.join, WAIT)
    assert len(got) == 1
    bulkhead.record(got[0], None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


# -- cancellation ---------------------------------------------------------------


async def test_cancelled_waiter_leaves_no_queue_entry_and_no_permit() -> None:
    bulkhead = Bulkhead(1, max_waiting=5)
    holder = await bulkhead.admit_async("p", None)
    waiter = asyncio.create_task(bulkhead.admit_async("p", None))
    await settle()
    assert bulkhead.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(holder, None, 0.0)
    assert bulkhead.in_flight == 0
    # The bulkhead is whole again: the full capacity is there.
    permit = await asyncio.wait_for(bulkhead.admit_async("p", None), WAIT)
    assert bulkhead.in_flight == 1
    bulkhead.record(permit, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


async def test_waiter_cancelled_after_the_slot_was_handed_to_it_passes_it_on() -> None:
    bulkhead = Bulkhead(1, max_waiting=5)
    holder = await bulkhead.admit_async("p", None)
    first = asyncio.create_task(bulkhead.admit_async("p", None))
    await settle()
    second = asyncio.create_task(bulkhead.admit_async("p", None))
    await settle()
    assert bulkhead.waiting == 2
    bulkhead.record(holder, None, 0.0)  # hands the slot to ``first``...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    permit = await asyncio.wait_for(second, WAIT)
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(permit, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


async def test_cancelling_many_waiters_leaves_the_bulkhead_whole() -> None:
    bulkhead = Bulkhead(3, max_waiting=100)
    holders = [await bulkhead.admit_async("p", None) for _ in range(3)]
    waiters = [asyncio.create_task(bulkhead.admit_async("p", None)) for _ in range(100)]
    await settle()
    assert bulkhead.waiting == 100
    for permit in holders:
        bulkhead.record(permit, None, 0.0)
    for task in waiters:  # the first three were granted, cancel them all anyway
        task.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)
    permits = [await bulkhead.admit_async("p", None) for _ in range(3)]
    for permit in permits:
        bulkhead.record(permit, None, 0.0)


# -- wait timeouts and deadlines ------------------------------------------------------


async def test_async_waiter_times_out_on_the_fake_clock(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=0.5)
    holder = await bulkhead.admit_async("p", None)
    waiter = asyncio.create_task(bulkhead.admit_async("orders", None))
    await settle()
    clock.advance(0.499)
    await settle()
    assert not waiter.done()
    clock.advance(0.002)
    await settle()
    assert waiter.done()
    with pytest.raises(BulkheadFull) as info:
        waiter.result()
    assert info.value.policy == "orders"
    assert info.value.retry_after == 0.5  # no call finished yet: the wait timeout
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(holder, None, 0.0)
    assert bulkhead.in_flight == 0


def test_thread_waiter_times_out_on_the_fake_clock(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=timedelta(seconds=2))
    holder = bulkhead.admit("p", None)
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            bulkhead.admit("p", None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    clock.wait_for_waiting(1)
    clock.advance(1.9)
    assert thread.is_alive()
    clock.advance(0.2)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], BulkheadFull)
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(holder, None, 0.0)


async def test_wait_never_outlasts_the_remaining_deadline(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=10.0)
    holder = await bulkhead.admit_async("p", None)

    async def with_deadline() -> Any:
        _context._deadline.set(clock.now() + 0.25)
        return await bulkhead.admit_async("p", None)

    waiter = asyncio.create_task(with_deadline())
    await settle()
    clock.advance(0.26)
    await settle()
    with pytest.raises(BulkheadFull, match=r"waited 0\.25s"):
        waiter.result()
    bulkhead.record(holder, None, 0.0)


async def test_no_wait_at_all_when_the_deadline_has_passed(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=5, wait_timeout=10.0)
    holder = await bulkhead.admit_async("p", None)
    token = _context._deadline.set(clock.now() - 1.0)
    try:
        with pytest.raises(BulkheadFull, match="no time left"):
            await bulkhead.admit_async("p", None)
        with pytest.raises(BulkheadFull, match="no time left"):
            bulkhead.admit("p", None)
    finally:
        _context._deadline.reset(token)
    assert bulkhead.waiting == 0
    bulkhead.record(holder, None, 0.0)
    # A free slot is still taken even with no time left: the call decides.
    token = _context._deadline.set(clock.now() - 1.0)
    try:
        bulkhead.record(bulkhead.admit("p", None), None, 0.0)
    finally:
        _context._deadline.reset(token)


def test_thread_interrupted_while_waiting_leaves_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reskit import _clock

    bulkhead = Bulkhead(1, max_waiting=1)
    holder = bulkhead.admit("p", None)

    def interrupted(event: threading.Event, timeout: float | None) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(_clock, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bulkhead.admit("p", None)
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(holder, None, 0.0)
    assert bulkhead.in_flight == 0


# -- handing over between threads and loops --------------------------------------------


async def test_a_thread_release_wakes_an_async_waiter() -> None:
    bulkhead = Bulkhead(1, max_waiting=1)
    holder = await asyncio.to_thread(bulkhead.admit, "p", None)
    waiter = asyncio.create_task(bulkhead.admit_async("p", None))
    await settle()
    assert bulkhead.waiting == 1
    await asyncio.to_thread(bulkhead.record, holder, None, 0.0)
    permit = await asyncio.wait_for(waiter, WAIT)
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(permit, None, 0.0)


def test_slot_handed_to_a_waiter_on_a_closed_loop_is_passed_on() -> None:
    bulkhead = Bulkhead(1, max_waiting=2)
    holder = bulkhead.admit("p", None)
    loop = asyncio.new_event_loop()
    orphan = loop.create_task(bulkhead.admit_async("p", None))
    loop.run_until_complete(asyncio.sleep(0))
    assert bulkhead.waiting == 1
    loop.close()  # the task never runs again
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(bulkhead.admit("p", None)))
    thread.start()
    wait_until(lambda: bulkhead.waiting == 2)
    bulkhead.record(holder, None, 0.0)
    thread.join(WAIT)
    assert len(outcome) == 1
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    bulkhead.record(outcome[0], None, 0.0)
    assert bulkhead.in_flight == 0
    del orphan


# -- retry_after -------------------------------------------------------------------


async def test_retry_after_estimates_from_recent_call_durations(clock: FakeClock) -> None:
    bulkhead = Bulkhead(2, max_waiting=2, wait_timeout=1.0)
    permits = [await bulkhead.admit_async("p", None) for _ in range(2)]
    bulkhead.record(permits.pop(), None, 4.0)  # the first sample is the mean: 4.0
    permits.append(await bulkhead.admit_async("p", None))
    bulkhead.record(permits.pop(), None, 2.0)  # 4.0 + (2.0 - 4.0) * 0.2 = 3.6
    permits.append(await bulkhead.admit_async("p", None))
    waiters = [asyncio.create_task(bulkhead.admit_async("p", None)) for _ in range(2)]
    await settle()
    with pytest.raises(BulkheadFull) as info:
        await bulkhead.admit_async("p", None)
    # Queue full: two callers ahead of a newcomer, so three mean durations
    # before its turn, shared by two slots.
    assert info.value.retry_after == pytest.approx(3.6 * 3 / 2)
    clock.advance(1.0)
    await settle()
    for task in waiters:
        with pytest.raises(BulkheadFull) as info:
            task.result()
    # A timed-out waiter leaves an empty queue behind: one mean over two slots.
    assert info.value.retry_after == pytest.approx(3.6 / 2)
    for permit in permits:
        bulkhead.record(permit, None, 0.0)


def test_retry_after_without_history_or_timeout_is_unknown() -> None:
    bulkhead = Bulkhead(1)
    permit = bulkhead.admit("p", None)
    with pytest.raises(BulkheadFull) as info:
        bulkhead.admit("p", None)
    assert info.value.retry_after is None
    assert isinstance(info.value, Rejected)
    assert info.value.rejected_by == "bulkhead"
    bulkhead.record(permit, None, 1.0)
    permit = bulkhead.admit("p", None)
    with pytest.raises(BulkheadFull) as info:
        bulkhead.admit("p", None)
    assert info.value.retry_after == 1.0
    bulkhead.record(permit, None, 1.0)


# -- partitions --------------------------------------------------------------------


def tenant_key(tenant: str | None, *args: Any, **kwargs: Any) -> str | None:
    return tenant


def test_partition_key_is_computed_from_the_call_arguments() -> None:
    bulkhead = Bulkhead(1, key=lambda order, *, tenant: f"t:{tenant}")
    assert bulkhead._partition(("o1",), {"tenant": "acme"}) == "t:acme"


def test_partition_key_must_be_a_string() -> None:
    bulkhead = Bulkhead(1, key=lambda n: n)
    with pytest.raises(TypeError, match="must return a str or None, got int"):
        bulkhead._partition((3,), {})


def test_partitions_are_isolated() -> None:
    bulkhead = Bulkhead(2, key=tenant_key)
    noisy = [bulkhead.admit("p", "noisy") for _ in range(2)]
    with pytest.raises(BulkheadFull):
        bulkhead.admit("p", "noisy")
    quiet = [bulkhead.admit("p", "quiet") for _ in range(2)]
    unkeyed = [bulkhead.admit("p", None) for _ in range(2)]
    assert bulkhead.in_flight == 6
    assert bulkhead.partitions == 2  # the shared default partition is not counted
    for permit in noisy + quiet + unkeyed:
        bulkhead.record(permit, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.partitions) == (0, 0)


async def test_partition_queues_are_separate_and_fifo() -> None:
    bulkhead = Bulkhead(1, max_waiting=1, key=tenant_key)
    a = await bulkhead.admit_async("p", "a")
    b = await bulkhead.admit_async("p", "b")
    a_waiter = asyncio.create_task(bulkhead.admit_async("p", "a"))
    b_waiter = asyncio.create_task(bulkhead.admit_async("p", "b"))
    await settle()
    assert bulkhead.waiting == 2
    with pytest.raises(BulkheadFull, match="queue is full"):
        await bulkhead.admit_async("p", "a")
    bulkhead.record(b, None, 0.0)  # frees b's slot only
    b2 = await asyncio.wait_for(b_waiter, WAIT)
    assert not a_waiter.done()
    bulkhead.record(a, None, 0.0)
    a2 = await asyncio.wait_for(a_waiter, WAIT)
    for permit in (a2, b2):
        bulkhead.record(permit, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (0, 0, 0)


def test_hostile_keys_cannot_grow_memory() -> None:
    bulkhead = Bulkhead(2, key=tenant_key, max_partitions=100)
    held = []
    rejected = 0
    messages = set()
    for i in range(10_000):
        try:
            held.append(bulkhead.admit("p", f"tenant-{i}"))
        except BulkheadFull as exc:
            messages.add(str(exc))
            rejected += 1
        assert bulkhead.partitions <= 100
    # One message for all of them: hostile input is never echoed back.
    assert messages == {
        "bulkhead full: 100 partitions are in use (max_partitions=100), so a new key is refused"
    }
    assert (len(held), rejected) == (100, 9_900)
    assert len(bulkhead._partitions) == 100
    # A known key still gets its partition's free slot while new keys are refused.
    held.append(bulkhead.admit("p", "tenant-0"))
    with pytest.raises(BulkheadFull, match=r"2 in flight \(limit 2\) and no waiting allowed"):
        bulkhead.admit("p", "tenant-0")
    for permit in held:
        bulkhead.record(permit, None, 0.0)
    assert (bulkhead.partitions, bulkhead.in_flight) == (0, 0)
    assert bulkhead.admit("p", "newcomer") is not None


def test_short_lived_partitions_are_reclaimed_with_flat_memory() -> None:
    bulkhead = Bulkhead(1, key=tenant_key, max_partitions=10)

    def churn(start: int) -> None:
        for i in range(start, start + 10_000):
            bulkhead.record(bulkhead.admit("p", f"{i:0>64}"), None, 0.001)

    churn(0)  # warm up caches and the spare partitions
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(10_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert bulkhead.partitions == 0
    assert grown < 20_000, grown


def test_rejection_of_a_new_key_leaves_no_empty_partition_behind() -> None:
    # An adaptive limit caps the whole bulkhead, so a brand-new key can be
    # refused for lack of a bulkhead-wide slot.
    bulkhead = Bulkhead(5, key=tenant_key, limit=AIMDLimit(initial=1, max_limit=5))
    held = bulkhead.admit("p", "a")
    with pytest.raises(BulkheadFull):
        bulkhead.admit("p", "b")
    assert bulkhead.partitions == 1
    bulkhead.record(held, None, 0.0)
    assert bulkhead.partitions == 0


async def test_adaptive_cap_spans_partitions_and_hands_slots_over_in_arrival_order() -> None:
    limit = AIMDLimit(initial=2, min_limit=1, max_limit=2)
    bulkhead = Bulkhead(5, key=tenant_key, max_waiting=5, limit=limit)
    a = await bulkhead.admit_async("p", "a")
    b = await bulkhead.admit_async("p", "b")
    waiters = [asyncio.create_task(bulkhead.admit_async("p", key)) for key in ("c", "a", "d", None)]
    for _ in waiters:
        await settle(1)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (2, 4, 4)
    order = []
    pending = [a, b]
    for _ in range(4):
        bulkhead.record(pending.pop(0), ValueError(), 0.0)  # not sampled
        done, _ = await asyncio.wait(
            [t for t in waiters if not t.done()], timeout=WAIT, return_when=asyncio.FIRST_COMPLETED
        )
        (task,) = done
        order.append(waiters.index(task))
        pending.append(task.result())
        assert bulkhead.in_flight == 2
    assert order == [0, 1, 2, 3]
    for permit in pending:
        bulkhead.record(permit, ValueError(), 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (0, 0, 0)


async def test_with_an_adaptive_cap_a_full_partition_still_waits_its_turn() -> None:
    # Room under the bulkhead-wide cap does not help a waiter whose own
    # partition is at max_concurrent.
    bulkhead = Bulkhead(1, key=tenant_key, max_waiting=1, limit=AIMDLimit(initial=5, max_limit=5))
    a = await bulkhead.admit_async("p", "a")
    a_waiter = asyncio.create_task(bulkhead.admit_async("p", "a"))
    await settle()
    bulkhead.record(await bulkhead.admit_async("p", "b"), None, 0.0)
    await settle()
    assert not a_waiter.done()
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (1, 1, 1)
    bulkhead.record(a, None, 0.0)
    bulkhead.record(await asyncio.wait_for(a_waiter, WAIT), None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (0, 0, 0)


# -- introspection, validation and telemetry --------------------------------------------


def test_introspection_and_repr() -> None:
    bulkhead = Bulkhead(3, max_waiting=2, wait_timeout=0.5, name="db")
    permit = bulkhead.admit("p", None)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (1, 0, 0)
    assert bulkhead.limit == 3
    assert bulkhead.adaptive_limit is None
    assert bulkhead.wait_timeout == 0.5
    assert repr(bulkhead) == (
        "Bulkhead('db', max_concurrent=3, limit=3, in_flight=1, waiting=0, partitions=0)"
    )
    bulkhead.record(permit, None, 0.0)


def test_an_unnamed_bulkhead_takes_the_first_policy_name() -> None:
    bulkhead = Bulkhead(1)
    bulkhead.record(bulkhead.admit("payments", None), None, 0.0)
    bulkhead.record(bulkhead.admit("other", None), None, 0.0)
    assert bulkhead.name == "payments"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_concurrent": 0}, ValueError, "max_concurrent must be at least 1, got 0"),
        ({"max_concurrent": 2.5}, TypeError, "max_concurrent must be an int"),
        ({"max_concurrent": True}, TypeError, "max_concurrent must be an int"),
        ({"max_concurrent": 1, "max_waiting": -1}, ValueError, "max_waiting must be an int >= 0"),
        (
            {"max_concurrent": 1, "wait_timeout": 1.0},
            ValueError,
            "wait_timeout=1.0 has no effect with max_waiting=0",
        ),
        (
            {"max_concurrent": 1, "max_waiting": 1, "wait_timeout": -1},
            ValueError,
            "wait_timeout must be > 0 seconds",
        ),
        (
            {"max_concurrent": 1, "max_waiting": 1, "wait_timeout": "1s"},
            TypeError,
            "wait_timeout must be a number of seconds or a timedelta",
        ),
        ({"max_concurrent": 1, "key": "tenant"}, TypeError, "key must be a function"),
        (
            {"max_concurrent": 1, "max_partitions": 0},
            ValueError,
            "max_partitions must be an int >= 1",
        ),
        ({"max_concurrent": 1, "limit": 10}, TypeError, "for a fixed cap use max_concurrent"),
        ({"max_concurrent": 1, "name": 3}, TypeError, "name must be a str or None"),
    ],
)
def test_construction_validation(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Bulkhead(**kwargs)


def test_an_adaptive_limit_belongs_to_one_bulkhead() -> None:
    limit = AIMDLimit()
    Bulkhead(10, limit=limit)
    with pytest.raises(ValueError, match="create one AIMDLimit per Bulkhead"):
        Bulkhead(10, limit=limit)


def test_occupancy_gauge_reports_live_named_bulkheads() -> None:
    bulkhead = Bulkhead(4, name="gauge-test")
    Bulkhead(4)  # unnamed and unused: nothing to report under
    permits = [bulkhead.admit("p", None) for _ in range(3)]

    def reported() -> dict[str, int | float]:
        return {
            str(o.attributes["reskit.bulkhead.name"]): o.value
            for o in _GAUGE._callback(None)
            if o.attributes and str(o.attributes["reskit.bulkhead.name"]).startswith("gauge-")
        }

    assert reported() == {"gauge-test": 3}
    for permit in permits:
        bulkhead.record(permit, None, 0.0)
    assert reported() == {"gauge-test": 0}
    del bulkhead, permits
    gc.collect()
    assert reported() == {}


def test_release_samples_the_adaptive_limit_only_for_meaningful_outcomes() -> None:
    limit = AIMDLimit(initial=10, min_limit=1, max_limit=20)
    bulkhead = Bulkhead(20, limit=limit)

    def finish(exc: BaseException | None) -> None:
        permits = [bulkhead.admit("p", None) for _ in range(min(10, bulkhead.limit))]
        bulkhead.record(permits.pop(), exc, 0.01)
        for permit in permits:
            bulkhead.record(permit, ValueError(), 0.01)

    finish(None)  # a busy success grows the limit by one
    assert bulkhead.limit == 11
    finish(ValueError("app error"))  # says nothing about capacity
    finish(asyncio.CancelledError())
    assert bulkhead.limit == 11
    finish(TimeoutExceeded("slow"))  # a drop: 11 * 0.9 -> 9
    assert bulkhead.limit == 9
    finish(BulkheadFull("downstream full"))  # rejections downstream are drops too
    assert bulkhead.limit == 8


def test_a_faulty_custom_limit_does_not_strand_the_queue() -> None:
    class Broken(AIMDLimit):
        def _update(self, duration: float, in_flight: int, dropped: bool) -> float:
            raise ZeroDivisionError("bug in a custom limit")

    bulkhead = Bulkhead(1, max_waiting=1, limit=Broken(initial=1))
    holder = bulkhead.admit("p", None)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(bulkhead.admit("p", None)))
    thread.start()
    wait_until(lambda: bulkhead.waiting == 1)
    with pytest.raises(ZeroDivisionError):
        bulkhead.record(holder, None, 0.0)
    thread.join(WAIT)
    assert len(got) == 1
    assert bulkhead.in_flight == 1

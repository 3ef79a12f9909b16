"""The bulkhead at its edges: each limit at the value where admission flips."""

from __future__ import annotations

from typing import Any

import pytest

from reskit import AIMDLimit, Bulkhead, BulkheadFull
from reskit.testing import FakeClock


def test_exactly_max_concurrent_calls_are_admitted(clock: FakeClock) -> None:
    bulkhead = Bulkhead(3)
    permits = [bulkhead.admit("p") for _ in range(3)]
    assert bulkhead.in_flight == 3
    with pytest.raises(BulkheadFull) as info:
        bulkhead.admit("p")
    assert info.value.policy == "p"
    bulkhead.record(permits[0], None, 0.0)
    assert bulkhead.in_flight == 2
    bulkhead.record(bulkhead.admit("p"), None, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_concurrent": 0}, ValueError, "max_concurrent must be at least 1"),
        ({"max_concurrent": True}, TypeError, "max_concurrent must be an int"),
        ({"max_concurrent": 1, "max_waiting": -1}, ValueError, "max_waiting must be an int >= 0"),
        ({"max_concurrent": 1, "max_waiting": True}, ValueError, "max_waiting must be an int"),
        ({"max_concurrent": 1, "wait_timeout": 1}, ValueError, "no effect with max_waiting=0"),
        ({"max_concurrent": 1, "key": 3}, TypeError, "key must be a function"),
        ({"max_concurrent": 1, "max_partitions": 0}, ValueError, "max_partitions must be"),
        ({"max_concurrent": 1, "max_partitions": True}, ValueError, "max_partitions must be"),
        ({"max_concurrent": 1, "limit": 3}, TypeError, "limit must be an adaptive limit"),
        ({"max_concurrent": 1, "name": 3}, TypeError, "name must be a str or None"),
    ],
)
def test_arguments_out_of_range(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Bulkhead(**kwargs)


def rejected(bulkhead: Bulkhead, key: str | None = None) -> BulkheadFull:
    with pytest.raises(BulkheadFull) as info:
        bulkhead.admit("p", key)
    return info.value


def test_retry_after_follows_calls_that_ended_in_a_full_partition(clock: FakeClock) -> None:
    bulkhead = Bulkhead(2)
    first = bulkhead.admit("p")
    # A release from a partition with room left says nothing about congestion.
    bulkhead.record(first, None, 9.0)
    a, b = bulkhead.admit("p"), bulkhead.admit("p")
    assert rejected(bulkhead).retry_after is None  # no congested call has ended yet
    bulkhead.record(a, None, 1.0)
    c = bulkhead.admit("p")
    assert rejected(bulkhead).retry_after == 0.5  # 1.0 * (0 + 1) / 2
    bulkhead.record(b, None, 2.0)  # mean 1.0 + (2.0 - 1.0) * 0.2
    bulkhead.admit("p")
    assert rejected(bulkhead).retry_after == pytest.approx(0.6)
    del c


def test_retry_after_is_the_wait_timeout_before_any_estimate(clock: FakeClock) -> None:
    import threading

    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=0.5)
    bulkhead.admit("p")
    errors: list[BulkheadFull] = []

    def wait() -> None:
        try:
            bulkhead.admit("p")
        except BulkheadFull as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    clock.wait_for_waiting(1)
    assert bulkhead.waiting == 1
    clock.advance(0.5)
    waiter.join(10)
    (info,) = errors
    assert info.retry_after == 0.5
    assert "waited 0.5s for a slot and none freed up" in str(info)
    assert bulkhead.waiting == 0


async def test_retry_after_counts_the_callers_queued_ahead(clock: FakeClock) -> None:
    import asyncio

    bulkhead = Bulkhead(2, max_waiting=2)
    a = await bulkhead.admit_async("p")
    b = await bulkhead.admit_async("p")
    bulkhead.record(a, None, 3.0)  # the partition was full: the mean is 3.0
    await bulkhead.admit_async("p")
    queued = [asyncio.ensure_future(bulkhead.admit_async("p")) for _ in range(2)]
    await asyncio.sleep(0)
    assert bulkhead.waiting == 2
    with pytest.raises(BulkheadFull) as info:
        await bulkhead.admit_async("p")
    assert info.value.retry_after == 3.0 * (2 + 1) / 2
    assert "the waiting queue is full (max_waiting=2)" in str(info.value)
    bulkhead.record(b, None, 0.0)
    granted = await queued[0]
    assert bulkhead.waiting == 1
    queued[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued[1]
    assert bulkhead.waiting == 0
    bulkhead.record(granted, None, 0.0)


def test_retry_after_of_zero_length_congested_calls_is_zero(clock: FakeClock) -> None:
    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=7.0)
    bulkhead.record(bulkhead.admit("p"), None, 0.0)  # ended in a full partition, in 0 s
    held = bulkhead.admit("p")
    assert rejected_async_free(bulkhead) == 0.0
    bulkhead.record(held, None, 1.0)  # the mean moves from 0.0 by a fifth of the way
    bulkhead.admit("p")
    assert rejected_async_free(bulkhead) == pytest.approx(0.2 * 2)  # one queued ahead


def rejected_async_free(bulkhead: Bulkhead) -> float | None:
    """The retry_after of a rejection with the queue full (one waiter queued by a task)."""
    import asyncio

    async def go() -> float | None:
        waiter = asyncio.ensure_future(bulkhead.admit_async("p"))
        await asyncio.sleep(0)
        try:
            with pytest.raises(BulkheadFull) as info:
                await bulkhead.admit_async("p")
        finally:
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        return info.value.retry_after

    return asyncio.run(go())


def test_repr_with_and_without_a_name() -> None:
    assert repr(Bulkhead(2)) == (
        "Bulkhead(max_concurrent=2, limit=2, in_flight=0, waiting=0, partitions=0)"
    )
    assert repr(Bulkhead(2, name="db")).startswith("Bulkhead('db', max_concurrent=2, ")


def test_try_admit_takes_a_free_default_slot_at_once() -> None:
    bulkhead = Bulkhead(1)

    def fn() -> None:
        pass

    assert bulkhead.try_admit("p", None, fn, (), {}) is None  # never handed out: admit() does
    bulkhead.record(bulkhead.admit("p"), None, 0.0)
    permit = bulkhead.try_admit("p", None, fn, (), {})
    assert permit is not None
    assert bulkhead.try_admit("p") is None  # full: admit() decides
    bulkhead.record(permit, None, 0.0)
    assert bulkhead.try_admit("p") is not None


def test_try_admit_leaves_keyed_admissions_to_admit() -> None:
    bulkhead = Bulkhead(1, key=lambda tenant: tenant)

    def fn(tenant: str) -> None:
        pass

    bulkhead.record(bulkhead.admit("p"), None, 0.0)  # the default partition has a free slot
    # The key function has to run: admit() or admit_async() does that.
    assert bulkhead.try_admit("p", None, fn, ("acme",), {}) is None
    assert bulkhead.try_admit("p", "acme") is None  # a keyed partition takes the lock
    assert bulkhead.in_flight == 0
    # Without a call there is no key to compute: the default partition serves it.
    permit = bulkhead.try_admit("p")
    assert permit is not None
    assert bulkhead.in_flight == 1
    bulkhead.record(permit, None, 0.0)


async def test_admit_async_names_the_bulkhead_and_runs_the_key_function() -> None:
    seen: list[Any] = []

    def key(order: str, *, tenant: str) -> str:
        seen.append((order, tenant))
        return tenant

    bulkhead = Bulkhead(1, key=key)

    def fn(order: str, *, tenant: str) -> None:
        pass

    permit = await bulkhead.admit_async("orders", None, fn, ("o1",), {"tenant": "acme"})
    assert bulkhead.name == "orders"
    assert seen == [("o1", "acme")]
    assert bulkhead.partitions == 1
    other = await bulkhead.admit_async("orders", None, fn, ("o2",), {"tenant": "umbrella"})
    with pytest.raises(BulkheadFull) as info:
        await bulkhead.admit_async("billing", None, fn, ("o3",), {"tenant": "acme"})
    assert info.value.policy == "billing"
    assert info.value.partition == "acme"
    assert bulkhead.name == "orders"
    bulkhead.record(permit, None, 0.0)
    bulkhead.record(other, None, 0.0)
    assert bulkhead.partitions == 0


def test_a_keyed_wait_that_times_out_names_its_partition(clock: FakeClock) -> None:
    import threading

    bulkhead = Bulkhead(1, key=lambda tenant: tenant, max_waiting=1, wait_timeout=2.0)
    held = bulkhead.admit("p", "acme")
    errors: list[BulkheadFull] = []

    def wait() -> None:
        try:
            bulkhead.admit("p", "acme")
        except BulkheadFull as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    clock.wait_for_waiting(1)
    clock.advance(2.0)
    waiter.join(10)
    (error,) = errors
    assert error.partition == "acme"
    assert error.policy == "p"
    bulkhead.record(held, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (0, 0, 0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_slot_handed_to_a_task_on_a_closed_loop_is_passed_on(adaptive: bool) -> None:
    import asyncio

    from reskit import AIMDLimit

    limit = AIMDLimit(initial=1, max_limit=1) if adaptive else None
    bulkhead = Bulkhead(1, max_waiting=2, limit=limit)
    held = bulkhead.admit("p")
    loop = asyncio.new_event_loop()

    async def wait() -> None:
        await bulkhead.admit_async("p")

    tasks = [loop.create_task(wait()) for _ in range(2)]
    loop.run_until_complete(asyncio.sleep(0))
    assert bulkhead.waiting == 2
    loop.close()  # the tasks will never run again
    # The slot goes to the first dead task, which passes it to the second, which passes it on.
    bulkhead.record(held, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)
    for task in tasks:
        task.get_coro().close()  # closed at last: nothing is given back twice
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)
    permit = bulkhead.admit("p")
    assert bulkhead.in_flight == 1
    assert bulkhead.try_admit("p") is None  # one slot, not two
    bulkhead.record(permit, None, 0.0)


async def test_a_slot_released_on_the_loop_thread_wakes_the_waiter_at_once() -> None:
    import asyncio

    bulkhead = Bulkhead(1, max_waiting=1)
    held = await bulkhead.admit_async("p")
    waiter = asyncio.ensure_future(bulkhead.admit_async("p"))
    await asyncio.sleep(0)
    bulkhead.record(held, None, 0.0)
    await asyncio.sleep(0)  # one turn of the loop: the waiter's future was already resolved
    assert waiter.done()
    bulkhead.record(await waiter, None, 0.0)


def test_under_an_adaptive_cap_the_oldest_waiter_of_any_partition_goes_first(
    clock: FakeClock,
) -> None:
    import threading

    from reskit import AIMDLimit

    bulkhead = Bulkhead(
        2,
        key=lambda tenant: tenant,
        max_waiting=1,
        wait_timeout=100.0,
        limit=AIMDLimit(initial=1, max_limit=1),
    )
    held = bulkhead.admit("p", "a")
    order: list[str] = []
    permits: dict[str, Any] = {}

    def wait(tenant: str) -> None:
        permits[tenant] = bulkhead.admit("p", tenant)
        order.append(tenant)

    threads = []
    for count, tenant in enumerate(["c", "b"], start=1):  # c queues first, then b
        thread = threading.Thread(target=wait, args=(tenant,))
        thread.start()
        threads.append(thread)
        clock.wait_for_waiting(count)
    assert bulkhead.waiting == 2
    bulkhead.record(held, None, 0.0)
    threads[0].join(10)
    assert order == ["c"]
    bulkhead.record(permits["c"], None, 0.0)
    threads[1].join(10)
    assert order == ["c", "b"]
    bulkhead.record(permits["b"], None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (0, 0, 0)


def test_a_slot_for_a_task_whose_loop_closes_while_being_woken_is_passed_on() -> None:
    import asyncio
    import threading

    class ClosingLoop(asyncio.SelectorEventLoop):
        """Closes between the bulkhead's "is it closed?" and its call: the race it handles."""

        def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("Event loop is closed")

    bulkhead = Bulkhead(1, max_waiting=1)
    held = bulkhead.admit("p")
    loop = ClosingLoop()

    async def wait() -> None:
        await bulkhead.admit_async("p")

    task = loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0))
    assert bulkhead.waiting == 1
    errors: list[BaseException] = []

    def release() -> None:  # from another thread, so the loop must be called
        try:
            bulkhead.record(held, None, 0.0)
        except BaseException as exc:
            errors.append(exc)

    releaser = threading.Thread(target=release)
    releaser.start()
    releaser.join(10)
    assert errors == []
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)
    task.get_coro().close()
    loop.close()
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


def test_a_rejection_says_how_many_calls_are_in_flight(clock: FakeClock) -> None:
    bulkhead = Bulkhead(3)
    permits = [bulkhead.admit("p") for _ in range(3)]
    assert str(rejected(bulkhead)) == (
        "bulkhead full: 3 in flight (limit 3) and no waiting allowed (max_waiting=0)"
    )
    for permit in permits:
        bulkhead.record(permit, None, 0.0)


async def settled() -> None:
    import asyncio

    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_caller_deadline_bounds_a_wait_without_wait_timeout(clock: FakeClock) -> None:
    import asyncio

    from reskit import Policy

    bulkhead = Bulkhead(1, max_waiting=1)
    holder = await bulkhead.admit_async("p")
    inner = Policy("inner", bulkhead=bulkhead)
    outer = Policy("outer", deadline=5.0)

    async def work() -> str:
        return "done"

    async def call() -> str:
        return await inner.acall(work)

    task = asyncio.ensure_future(outer.acall(call))
    await settled()
    assert bulkhead.waiting == 1  # queued, with the deadline's 5 s as its budget
    bulkhead.record(holder, None, 0.0)
    assert await task == "done"


async def test_wait_timeout_bounds_a_wait_shorter_than_the_deadline(clock: FakeClock) -> None:
    import asyncio

    from reskit import Policy

    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=2.0)
    holder = await bulkhead.admit_async("p")
    inner = Policy("inner", bulkhead=bulkhead)
    outer = Policy("outer", deadline=5.0)

    async def work() -> str:
        return "done"

    async def call() -> str:
        return await inner.acall(work)

    task = asyncio.ensure_future(outer.acall(call))
    await settled()
    clock.advance(2.0)
    await settled()
    assert task.done()
    with pytest.raises(BulkheadFull, match=r"waited 2s for a slot"):
        task.result()
    bulkhead.record(holder, None, 0.0)


async def test_no_time_left_before_the_deadline_rejects_with_an_estimate(
    clock: FakeClock,
) -> None:
    from reskit import Policy

    bulkhead = Bulkhead(1, max_waiting=1, wait_timeout=9.0)
    bulkhead.record(await bulkhead.admit_async("p"), None, 4.0)  # congested: mean 4 s
    holder = await bulkhead.admit_async("p")
    inner = Policy("inner", bulkhead=bulkhead)
    outer = Policy("outer", deadline=1.0)

    async def work() -> str:
        return "done"

    async def late() -> str:
        clock.advance(1.0)  # the deadline is spent before the bulkhead is reached
        return await inner.acall(work)

    with pytest.raises(BulkheadFull) as info:
        await outer.acall(late)
    assert str(info.value) == "bulkhead full: no time left before the deadline to wait for a slot"
    assert info.value.retry_after == 4.0
    bulkhead.record(holder, None, 0.0)


def test_a_refusal_names_the_partition_only_when_that_key_used_its_share(
    clock: FakeClock,
) -> None:
    from reskit import AIMDLimit

    bulkhead = Bulkhead(2, key=lambda t: t, limit=AIMDLimit(initial=2, max_limit=2))
    a = bulkhead.admit("p", "a")
    b = bulkhead.admit("p", "b")
    # "a" has a free slot of its own: the bulkhead-wide limit refused it.
    assert rejected(bulkhead, "a").partition is None
    bulkhead.record(b, None, 0.0)
    a2 = bulkhead.admit("p", "a")
    # Now "a" holds both of its slots: its own share is used up.
    assert rejected(bulkhead, "a").partition == "a"
    bulkhead.record(a, None, 0.0)
    bulkhead.record(a2, None, 0.0)


def test_a_new_key_beyond_max_partitions_is_refused_with_an_estimate(clock: FakeClock) -> None:
    bulkhead = Bulkhead(2, key=lambda t: t, max_partitions=1)
    held = bulkhead.admit("p", "a")
    assert rejected(bulkhead, "b").retry_after is None  # no estimate yet
    first = bulkhead.admit("p", "a")
    bulkhead.record(first, None, 3.0)  # "a" was full: the mean is 3 s
    info = rejected(bulkhead, "b")
    assert info.partition is None
    assert info.retry_after == 3.0 / 2
    assert "partitions are in use (max_partitions=1), so a new key is refused" in str(info)
    bulkhead.record(held, None, 0.0)


def test_a_wait_timeout_longer_than_the_platform_can_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="TIMEOUT_MAX"):
        Bulkhead(1, max_waiting=1, wait_timeout=1e12)


def test_a_rejection_by_the_adaptive_limit_counts_the_calls_in_flight(clock: FakeClock) -> None:
    from reskit import AIMDLimit

    bulkhead = Bulkhead(3, limit=AIMDLimit(initial=2, max_limit=3))
    permits = [bulkhead.admit("p") for _ in range(2)]
    assert str(rejected(bulkhead)) == (
        "bulkhead full: 2 in flight (limit 2) and no waiting allowed (max_waiting=0)"
    )
    for permit in permits:
        bulkhead.record(permit, None, 0.0)


def test_a_release_landing_while_a_caller_queues_passes_a_dead_tasks_slot_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race the lock-free release leaves: its slot arrives after a caller's take failed.

    The holder's release saw no waiter and published its slot without the lock; by
    then a caller had failed to take one and was queueing. The caller hands the slot
    to the oldest waiter, a task whose loop has closed, which must pass it on (here,
    to the caller itself) instead of keeping it forever.
    """
    import asyncio

    bulkhead = Bulkhead(1, max_waiting=2)
    held = bulkhead.admit("p")
    loop = asyncio.new_event_loop()

    async def wait() -> None:
        await bulkhead.admit_async("p")

    task = loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0))
    assert bulkhead.waiting == 1
    loop.close()  # the queued task will never run again

    enqueue = Bulkhead._enqueue_locked

    def released_meanwhile(self: Bulkhead, part: Any, asynchronous: bool) -> Any:
        assert part is held
        part.free.append(None)  # what the holder's lock-free release does, unlocked
        return enqueue(self, part, asynchronous)

    monkeypatch.setattr(Bulkhead, "_enqueue_locked", released_meanwhile)
    permit = bulkhead.admit("p")  # gets the slot the dead task passed on, without waiting
    monkeypatch.undo()
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 0)
    assert bulkhead.try_admit("p") is None  # one slot, not two
    bulkhead.record(permit, None, 0.0)
    task.get_coro().close()  # nothing is given back twice
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_key_function_sees_the_calls_keyword_arguments(asynchronous: bool) -> None:
    """A tenant passed by keyword picks the partition, through a policy, sync and async."""
    import asyncio

    from reskit import Policy

    bulkhead = Bulkhead(1, key=lambda order, *, tenant: tenant, max_waiting=0)
    policy = Policy("orders", bulkhead=bulkhead)
    seen: list[Any] = []

    if asynchronous:

        @policy
        async def place(order: str, *, tenant: str) -> Any:
            seen.append(bulkhead.partitions)
            return await asyncio.sleep(0)

        asyncio.run(place("o1", tenant="acme"))
    else:

        @policy
        def place(order: str, *, tenant: str) -> Any:
            seen.append(bulkhead.partitions)
            # acme's one slot is taken; another tenant still gets in.
            with pytest.raises(BulkheadFull):
                bulkhead.admit("p", "acme")
            other = bulkhead.admit("p", "globex")
            bulkhead.record(other, None, 0.0)
            return None

        place("o1", tenant="acme")
    assert seen == [1]  # one partition: acme's, not the shared default
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


async def test_a_cancelled_waiter_leaves_no_empty_queue_for_the_adaptive_cap() -> None:
    """Under an adaptive cap the grant looks through every queued partition: a partition
    whose last waiter left (while it still holds a slot, so it stays) must not be listed,
    or the next release finds nobody in it."""
    import asyncio

    from reskit import AIMDLimit

    bulkhead = Bulkhead(2, key=lambda t: t, max_waiting=1, limit=AIMDLimit(initial=2, max_limit=2))
    held_a = await bulkhead.admit_async("p", "a")
    held_b = await bulkhead.admit_async("p", "b")  # the cap of 2 is reached
    waiter = asyncio.ensure_future(bulkhead.admit_async("p", "b"))
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.waiting == 0
    # Another tenant queues; the release must find it, not b's emptied queue.
    later = asyncio.ensure_future(bulkhead.admit_async("p", "c"))
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    bulkhead.record(held_a, None, 0.0)
    permit = await later
    assert (bulkhead.in_flight, bulkhead.waiting) == (2, 0)
    for held in (permit, held_b):
        bulkhead.record(held, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions) == (0, 0, 0)


def test_try_admit_with_an_adaptive_limit_takes_a_free_slot_under_the_lock() -> None:
    bulkhead = Bulkhead(4, limit=AIMDLimit(initial=2, max_limit=4))
    # Unlike the lock-free path, slots never handed out are handed out here.
    first = bulkhead.try_admit("p")
    assert bulkhead.name == "p"  # named, as admit() names it: the occupancy gauge needs it
    second = bulkhead.try_admit("p")
    assert first is not None
    assert second is not None
    assert bulkhead.in_flight == 2
    assert bulkhead.try_admit("p") is None  # the adaptive limit (2), not the 4 slots
    assert bulkhead.in_flight == 2
    bulkhead.record(first, None, 0.0)
    bulkhead.record(second, None, 0.0)
    assert bulkhead.in_flight == 0


def test_try_admit_takes_a_slot_of_an_existing_keyed_partition() -> None:
    bulkhead = Bulkhead(2, key=lambda tenant: tenant)
    held = bulkhead.admit("p", "acme")  # makes the partition
    other = bulkhead.try_admit("p", "acme")
    assert other is held  # the partition is the permit
    assert bulkhead.try_admit("p", "acme") is None  # its two slots are in use
    assert bulkhead.try_admit("p", "globex") is None  # no partition yet: admit() makes it
    bulkhead.record(held, None, 0.0)
    bulkhead.record(other, None, 0.0)
    assert bulkhead.in_flight == 0

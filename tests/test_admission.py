"""``policy.admit()``: the outer gates around a block of code, without a function."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from reskit import AIMDLimit, Bulkhead, BulkheadFull, CircuitBreaker, Policy, Retry
from reskit.testing import FakeClock


def test_admit_holds_a_bulkhead_slot_for_the_block() -> None:
    bulkhead = Bulkhead(2)
    policy = Policy("edge", bulkhead=bulkhead)
    with policy.admit() as admission:
        assert bulkhead.in_flight == 1
        assert admission is not None
    assert bulkhead.in_flight == 0
    assert policy.statistics.calls == 1


def test_admit_raises_the_usual_rejection() -> None:
    bulkhead = Bulkhead(1)
    policy = Policy("edge", bulkhead=bulkhead)
    with policy.admit(), pytest.raises(BulkheadFull), policy.admit():
        pytest.fail("a full bulkhead admitted a second block")
    assert bulkhead.in_flight == 0
    assert policy.statistics.rejections == {"bulkhead": 1}


def test_admit_releases_when_the_block_raises() -> None:
    bulkhead = Bulkhead(1)
    policy = Policy("edge", bulkhead=bulkhead)
    with pytest.raises(KeyError), policy.admit():
        raise KeyError("body")
    assert bulkhead.in_flight == 0
    assert policy.statistics.failures == 1


async def test_async_admit_releases_when_the_block_is_cancelled() -> None:
    bulkhead = Bulkhead(1)
    policy = Policy("edge", bulkhead=bulkhead)
    entered = asyncio.Event()

    async def block() -> None:
        async with policy.admit():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(block())
    await entered.wait()
    assert bulkhead.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bulkhead.in_flight == 0
    assert policy.statistics.failures == 0  # a cancellation is not a failure


async def test_async_admit_cancelled_while_queued_leaves_nothing_behind(
    clock: FakeClock,
) -> None:
    bulkhead = Bulkhead(1, max_waiting=5)
    policy = Policy("edge", bulkhead=bulkhead)
    held = bulkhead.admit("other")

    async def queued() -> None:
        async with policy.admit():
            pass

    task = asyncio.create_task(queued())
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (bulkhead.waiting, bulkhead.in_flight) == (0, 1)
    bulkhead.record(held, None, 0.0)
    assert bulkhead.in_flight == 0


def test_admit_partitions_by_key() -> None:
    bulkhead = Bulkhead(1, max_partitions=8)
    policy = Policy("edge", bulkhead=bulkhead)
    with policy.admit(key="tenant-a"), policy.admit(key="tenant-b"):
        assert bulkhead.partitions == 2
        with pytest.raises(BulkheadFull), policy.admit(key="tenant-a"):
            pass
    assert bulkhead.partitions == 0


def test_admit_key_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="str or None"):
        Policy("edge").admit(key=42)  # type: ignore[arg-type]


def test_a_second_exit_gives_nothing_back_twice() -> None:
    bulkhead = Bulkhead(1)
    policy = Policy("p", bulkhead=bulkhead)
    admission = policy.admit()
    with admission:
        assert bulkhead.in_flight == 1
    admission.__exit__(ValueError, ValueError("late"), None)  # a wrapper exiting again
    assert bulkhead.in_flight == 0
    assert bulkhead.try_admit("p") is not None  # one slot, not two
    assert bulkhead.try_admit("p") is None
    assert policy.statistics.failures == 0  # the late exit counted nothing


def test_an_admission_is_used_once() -> None:
    admission = Policy("edge", bulkhead=Bulkhead(1)).admit()
    with admission:
        pass
    with pytest.raises(RuntimeError, match="used once"), admission:
        pass


def test_admit_applies_only_the_outer_gates() -> None:
    breaker = CircuitBreaker(fail_max=1)
    breaker.open()
    policy = Policy("edge", breaker=breaker, retry=Retry(3, on=KeyError), timeout=1.0)
    # The breaker guards attempts of a call; a block has none.
    with policy.admit():
        pass


def test_admit_reports_the_blocks_outcome_and_duration_to_the_adaptive_limit(
    clock: FakeClock,
) -> None:
    limit = AIMDLimit(initial=10, timeout=1.0)
    bulkhead = Bulkhead(100, limit=limit)
    policy = Policy("edge", bulkhead=bulkhead)
    with policy.admit():
        clock.advance(5.0)  # slower than the limit's timeout: a drop
    assert bulkhead.limit == 9
    with pytest.raises(TimeoutError), policy.admit():
        raise TimeoutError
    assert bulkhead.limit == 8


def test_exact_counts_with_many_threads() -> None:
    bulkhead = Bulkhead(5)
    policy = Policy("edge", bulkhead=bulkhead)
    start = threading.Barrier(40)
    inside = threading.Semaphore(0)
    release = threading.Event()
    outcomes: list[str] = []
    recorded = threading.Condition()

    def worker() -> None:
        start.wait()
        try:
            with policy.admit():
                inside.release()
                release.wait(10)
                result = "admitted"
        except BulkheadFull:
            result = "rejected"
        with recorded:
            outcomes.append(result)
            recorded.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(40)]
    for thread in threads:
        thread.start()
    for _ in range(5):
        assert inside.acquire(timeout=10)
    # Every thread either holds a slot or was rejected before we let them go.
    with recorded:
        assert recorded.wait_for(lambda: len(outcomes) == 35, timeout=10)
    release.set()
    for thread in threads:
        thread.join()
    assert outcomes.count("admitted") == 5
    assert outcomes.count("rejected") == 35
    assert bulkhead.in_flight == 0
    assert policy.statistics.rejections == {"bulkhead": 35}


async def test_exact_counts_with_many_tasks_and_a_queue() -> None:
    bulkhead = Bulkhead(3, max_waiting=7)
    policy = Policy("edge", bulkhead=bulkhead)
    release = asyncio.Event()
    admitted: list[int] = []

    async def worker(i: int) -> str:
        try:
            async with policy.admit():
                admitted.append(i)
                await release.wait()
                return "admitted"
        except BulkheadFull:
            return "rejected"

    tasks = [asyncio.create_task(worker(i)) for i in range(100)]
    await asyncio.sleep(0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (3, 7)
    release.set()
    results: list[Any] = await asyncio.gather(*tasks)
    assert results.count("admitted") == 10
    assert results.count("rejected") == 90
    # The queue is FIFO: the first three ran, then the seven that waited, in order.
    assert admitted == list(range(10))
    assert bulkhead.in_flight == 0


async def test_async_admission_with_an_adaptive_limit_and_a_queue_exact_counts() -> None:
    # An adaptive bulkhead takes a free slot without a coroutine (under its lock); the
    # admission queues only when the limit is reached, and counts every outcome.
    bulkhead = Bulkhead(10, max_waiting=5, limit=AIMDLimit(initial=3, max_limit=10))
    policy = Policy("edge", kill_switch=True, shed_at=2, bulkhead=bulkhead)
    release = asyncio.Event()

    async def worker() -> str:
        try:
            async with policy.admit():
                await release.wait()
                return "admitted"
        except BulkheadFull:
            return "rejected"

    tasks = [asyncio.create_task(worker()) for _ in range(100)]
    await asyncio.sleep(0)
    assert (bulkhead.in_flight, bulkhead.waiting) == (3, 5)
    release.set()
    results: list[Any] = await asyncio.gather(*tasks)
    assert results.count("admitted") == 8
    assert results.count("rejected") == 92
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)
    stats = policy.statistics
    assert (stats.calls, stats.attempts) == (100, 8)
    assert stats.rejections == {"bulkhead": 92}


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_the_flag_gates_of_an_admission_reject_before_the_bulkhead(
    asynchronous: bool,
) -> None:
    import reskit

    bulkhead = Bulkhead(2, limit=AIMDLimit(initial=2))
    policy = Policy("flagged", kill_switch=True, shed_at=1, bulkhead=bulkhead)

    async def enter() -> None:
        if asynchronous:
            async with policy.admit():
                assert bulkhead.in_flight == 1
        else:
            with policy.admit():
                assert bulkhead.in_flight == 1

    await enter()  # switch alive, no brownout: admitted
    reskit.kill("flagged", reason="test", actor="test")
    try:
        with pytest.raises(reskit.KillSwitchOff):
            await enter()
    finally:
        reskit.revive("flagged", reason="test", actor="test")
    reskit.set_brownout_level(1, reason="test", actor="test")
    try:
        with pytest.raises(reskit.Shed):
            await enter()
    finally:
        reskit.set_brownout_level(0, reason="test", actor="test")
    await enter()
    assert bulkhead.in_flight == 0  # a refused entry never held a slot
    assert policy.statistics.rejections == {"kill_switch": 1, "brownout": 1}


class _Recorded:
    """A gate that keeps a permit (as a new row of the canonical order could), in a log."""

    records = True

    def __init__(self, name: str, log: list[tuple[Any, ...]], *, waits: bool = False) -> None:
        self.name = name
        self.log = log
        self.waits = waits
        self.refuse: BaseException | None = None
        self.busy = False  # try_admit finds no free permit: the caller must queue

    def admit(self, policy: str | None, key: str | None = None) -> str:
        if self.refuse is not None:
            raise self.refuse
        return f"{self.name}-permit"

    def try_admit(self, policy: str | None, key: str | None = None) -> str | None:
        return None if self.busy else self.admit(policy, key)

    async def admit_async(self, policy: str | None, key: str | None = None) -> str:
        await asyncio.sleep(0)
        self.log.append(("queued", self.name))
        return self.admit(policy, key)

    def record(self, permit: Any, exc: BaseException | None, duration: float) -> None:
        self.log.append(("record", self.name, permit, type(exc).__name__, duration))


def _outer(*gates: Any) -> Any:
    from reskit._policy import OuterGates
    from reskit._stats import Counters

    outer = OuterGates.__new__(OuterGates)
    outer.name = "custom"
    outer.counters = Counters()
    outer.gates = tuple((gate, None, gate.waits) for gate in gates)
    return outer


async def test_outer_gates_of_any_shape_queue_resume_and_give_back_innermost_first() -> None:
    # The canonical order has one gate that keeps a permit (the bulkhead); a row added to
    # it (docs/architecture.md) may add more. A pass queues at the gate that must wait,
    # goes on from there, and gives every permit back innermost first.
    from reskit._policy import Queued

    log: list[tuple[Any, ...]] = []
    first, waiting, last = _Recorded("a", log), _Recorded("b", log, waits=True), _Recorded("c", log)
    outer = _outer(first, waiting, last)
    waiting.busy = True
    place = outer.enter(None)
    assert isinstance(place, Queued)
    assert (place.at, place.permits) == (1, [(first, "a-permit")])
    permits = await outer.enter_queued(None, place)
    assert permits == [(first, "a-permit"), (waiting, "b-permit"), (last, "c-permit")]
    outer.leave(permits, 0.0, None)
    assert [entry[:3] for entry in log] == [
        ("queued", "b"),
        ("record", "c", "c-permit"),
        ("record", "b", "b-permit"),
        ("record", "a", "a-permit"),
    ]
    assert (outer.counters.calls, outer.counters.attempts) == (1, 1)


def test_a_refusal_gives_back_what_the_gates_before_it_granted() -> None:
    log: list[tuple[Any, ...]] = []
    first, second, third = _Recorded("a", log), _Recorded("b", log), _Recorded("c", log)
    third.refuse = BulkheadFull("full", policy="custom")
    outer = _outer(first, second, third)
    with pytest.raises(BulkheadFull):
        outer.enter(None)
    assert log == [
        ("record", "b", "b-permit", "BulkheadFull", 0.0),
        ("record", "a", "a-permit", "BulkheadFull", 0.0),
    ]
    assert outer.counters.attempts == 0


def test_every_permit_is_given_back_when_a_record_raises_and_the_first_error_wins() -> None:
    log: list[tuple[Any, ...]] = []

    class Faulty(_Recorded):
        def record(self, permit: Any, exc: BaseException | None, duration: float) -> None:
            super().record(permit, exc, duration)
            raise RuntimeError(f"{self.name} failed")

    first, second, third = Faulty("a", log), _Recorded("b", log), Faulty("c", log)
    outer = _outer(first, second, third)
    permits = outer.enter(None, block=True)
    with pytest.raises(RuntimeError, match="c failed"):
        outer.leave(permits, 0.0, None)
    assert [entry[1] for entry in log] == ["c", "b", "a"]


async def test_a_gate_in_two_rows_queues_at_the_row_that_must_wait() -> None:
    # One gate object may sit in two rows (brownout_gate hands out one shared gate per
    # threshold): the pass resumes at the row that queued, never at the gate's first row.
    log: list[tuple[Any, ...]] = []
    shared, middle = _Recorded("w", log, waits=True), _Recorded("m", log)
    outer = _outer(shared, middle, shared)
    outcomes = iter(["w-first", None])  # free at the first row, busy at the third

    def try_admit(policy: str | None, key: str | None = None) -> str | None:
        return next(outcomes)

    shared.try_admit = try_admit  # type: ignore[method-assign]
    place = outer.enter(None)
    assert place.at == 2
    permits = await outer.enter_queued(None, place)
    assert [permit for _, permit in permits] == ["w-first", "m-permit", "w-permit"]
    outer.leave(permits, 0.0, None)
    assert [entry[2] for entry in log if entry[0] == "record"] == [
        "w-permit",
        "m-permit",
        "w-first",
    ]


def test_a_refusal_gives_every_permit_back_and_is_counted_when_a_record_raises() -> None:
    log: list[tuple[Any, ...]] = []

    class Faulty(_Recorded):
        def record(self, permit: Any, exc: BaseException | None, duration: float) -> None:
            super().record(permit, exc, duration)
            raise RuntimeError("record failed")

    first, second, third = _Recorded("a", log), Faulty("b", log), _Recorded("c", log)
    third.refuse = BulkheadFull("full", policy="custom")
    outer = _outer(first, second, third)
    with pytest.raises(RuntimeError, match="record failed") as raised:
        outer.enter(None)
    assert isinstance(raised.value.__context__, BulkheadFull)
    assert [entry[1] for entry in log] == ["b", "a"]  # the outer permit was not stranded
    assert outer.counters.snapshot().rejections == {"bulkhead": 1}

"""A Hypothesis state machine: the bulkhead against a plain model of it.

Async acquirers run as tasks on a private event loop that the machine steps by
hand, time is a FakeClock, and every rule (acquire, release, time passing,
cancellation, cancellation right after a hand-over) is checked against a model
that is nothing but counters and FIFO lists.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from reskit import Bulkhead, BulkheadFull
from reskit._bulkhead import _ThreadWaiter
from reskit.testing import FakeClock

KEYS = st.sampled_from([None, "a", "b", "c"])


@dataclass
class Waiter:
    task: asyncio.Task[Any]
    key: str | None
    deadline: float | None


@dataclass
class Holder:
    key: str | None
    permit: Any


@dataclass
class Model:
    in_flight: dict[str | None, int] = field(default_factory=dict)
    queues: dict[str | None, list[Waiter]] = field(default_factory=dict)

    def busy(self, key: str | None) -> int:
        return self.in_flight.get(key, 0)

    def queue(self, key: str | None) -> list[Waiter]:
        return self.queues.setdefault(key, [])

    def alive(self) -> set[str]:
        return {
            key
            for key in set(self.in_flight) | set(self.queues)
            if key is not None and (self.in_flight.get(key, 0) or self.queues.get(key))
        }


async def _settle() -> None:
    for _ in range(6):
        await asyncio.sleep(0)


class BulkheadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.clock.install()
        self.loop = asyncio.new_event_loop()
        self.model = Model()
        self.holders: list[Holder] = []
        self.bulkhead: Bulkhead

    def teardown(self) -> None:
        try:
            for queue in self.model.queues.values():
                for waiter in queue:
                    waiter.task.cancel()
            self.settle()
        finally:
            # A sync caller that a broken bulkhead queued by mistake would wait
            # forever: wake it so that it gives up and its thread ends.
            if hasattr(self, "bulkhead"):
                parts = [self.bulkhead._default, *self.bulkhead._partitions.values()]
                for part in parts:
                    for stuck in list(part.waiters):
                        if isinstance(stuck, _ThreadWaiter):
                            stuck.event.set()
            self.loop.close()
            self.clock.uninstall()

    def settle(self) -> None:
        self.loop.run_until_complete(_settle())

    @initialize(
        max_concurrent=st.integers(1, 2),
        max_waiting=st.integers(0, 3),
        wait_timeout=st.sampled_from([None, 1.0, 2.5]),
        max_partitions=st.integers(1, 3),
    )
    def build(
        self, max_concurrent: int, max_waiting: int, wait_timeout: float | None, max_partitions: int
    ) -> None:
        if max_waiting == 0:
            wait_timeout = None
        self.bulkhead = Bulkhead(
            max_concurrent,
            max_waiting=max_waiting,
            wait_timeout=wait_timeout,
            key=lambda key: key,
            max_partitions=max_partitions,
        )

    # -- what the model expects of a new caller ---------------------------------------
    def expect(self, key: str | None) -> str:
        b, m = self.bulkhead, self.model
        if key is not None and key not in m.alive() and len(m.alive()) >= b.max_partitions:
            return "rejected"
        if m.busy(key) < b.max_concurrent and not m.queue(key):
            return "admitted"
        if len(m.queue(key)) < b.max_waiting:
            return "queued"
        return "rejected"

    def admit(self, key: str | None, permit: Any) -> None:
        self.model.in_flight[key] = self.model.busy(key) + 1
        self.holders.append(Holder(key, permit))

    # -- rules ------------------------------------------------------------------------
    @rule(key=KEYS)
    def acquire_async(self, key: str | None) -> None:
        expected = self.expect(key)
        task = self.loop.create_task(self.bulkhead.admit_async("p", key))
        self.settle()
        if expected == "admitted":
            assert task.done()
            assert task.exception() is None
            self.admit(key, task.result())
        elif expected == "queued":
            assert not task.done()
            timeout = self.bulkhead.wait_timeout
            deadline = None if timeout is None else self.clock.now() + timeout
            self.model.queue(key).append(Waiter(task, key, deadline))
        else:
            assert task.done()
            assert isinstance(task.exception(), BulkheadFull)

    @rule(key=KEYS)
    def acquire_sync(self, key: str | None) -> None:
        expected = self.expect(key)
        assume(expected != "queued")  # a queued sync caller would block the machine
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(self.bulkhead.admit("p", key))
            except BulkheadFull as exc:
                outcome.append(exc)

        # In a thread so that a bulkhead that wrongly queues the caller fails the
        # test instead of hanging it: a queued caller waits on the fake clock, which
        # this machine does not move, so the join gives up.
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(5.0)
        assert outcome, f"expected {expected}, but the caller was queued"
        if expected == "rejected":
            assert isinstance(outcome[0], BulkheadFull)
        else:
            assert not isinstance(outcome[0], BulkheadFull)
            self.admit(key, outcome[0])

    def _release(self, index: int) -> str | None:
        holder = self.holders.pop(index % len(self.holders))
        self.model.in_flight[holder.key] -= 1
        self.bulkhead.record(holder.permit, None, 0.01)
        return holder.key

    def _hand_over(self, key: str | None) -> None:
        """The model's FIFO hand-over of one freed slot in ``key``'s partition."""
        queue = self.model.queue(key)
        if queue:
            waiter = queue.pop(0)
            assert waiter.task.done()
            assert waiter.task.exception() is None
            self.admit(key, waiter.task.result())

    @precondition(lambda self: self.holders)
    @rule(index=st.integers(0, 50))
    def release(self, index: int) -> None:
        key = self._release(index)
        self.settle()
        self._hand_over(key)

    @precondition(lambda self: any(self.model.queues.values()))
    @rule(index=st.integers(0, 50))
    def cancel_waiter(self, index: int) -> None:
        waiters = [w for queue in self.model.queues.values() for w in queue]
        waiter = waiters[index % len(waiters)]
        waiter.task.cancel()
        self.settle()
        assert waiter.task.cancelled()
        self.model.queue(waiter.key).remove(waiter)

    @precondition(lambda self: any(self.model.queue(h.key) for h in self.holders))
    @rule(index=st.integers(0, 50))
    def release_then_cancel_the_next_in_line(self, index: int) -> None:
        candidates = [i for i, h in enumerate(self.holders) if self.model.queue(h.key)]
        key = self._release(candidates[index % len(candidates)])
        first = self.model.queue(key).pop(0)
        first.task.cancel()  # cancelled after the slot was handed over, before it ran
        self.settle()
        assert first.task.cancelled()
        self._hand_over(key)  # the slot went on to the next waiter, if any

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()
        now = self.clock.now()
        for queue in self.model.queues.values():
            for waiter in list(queue):
                if waiter.deadline is not None and waiter.deadline <= now:
                    assert waiter.task.done()
                    assert isinstance(waiter.task.exception(), BulkheadFull)
                    queue.remove(waiter)
                else:
                    assert not waiter.task.done()

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def counts_match_the_model(self) -> None:
        if not hasattr(self, "bulkhead"):
            return
        b, m = self.bulkhead, self.model
        assert b.in_flight == sum(m.in_flight.values()) == len(self.holders)
        assert b.waiting == sum(len(q) for q in m.queues.values())
        assert b.partitions == len(m.alive()) <= b.max_partitions
        for key, busy in m.in_flight.items():
            assert busy <= b.max_concurrent
            part = b._default if key is None else b._partitions.get(key)
            if busy or m.queue(key):
                assert part is not None
                assert b.max_concurrent - part.available() == busy
                assert len(part.waiters) == len(m.queue(key))


BulkheadMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestBulkheadMachine = BulkheadMachine.TestCase

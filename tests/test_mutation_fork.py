"""What a forked child inherits: working strategies, without the parent's calls.

Each test forks this very process (not a fresh interpreter, unlike
``test_guest.py``), so the child runs the code under test as loaded here, and
reports back through a pipe.
"""

from __future__ import annotations

import asyncio
import os
import threading
import traceback
import warnings
from collections.abc import Callable

import pytest

from reskit import (
    AdaptiveThrottle,
    AIMDLimit,
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpen,
    Policy,
    Retry,
    RetryBudget,
)
from reskit.testing import FakeClock

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def in_child(check: Callable[[], str]) -> str:
    """Run ``check`` in a forked child; return what it returned (or its traceback)."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Forking a process with threads is what this tests.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            answer = check()
        except BaseException:
            answer, code = traceback.format_exc(), 1
        os.write(write, answer.encode())
        os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    answer = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def test_a_bulkhead_starts_empty_in_the_child(clock: FakeClock) -> None:
    bulkhead = Bulkhead(2, key=lambda tenant: tenant)
    mine = bulkhead.admit("p", "a")  # held by the forking thread across the fork
    alone = bulkhead.admit("p", "b")  # the only call of its partition
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        permit = bulkhead.admit("p", "a")
        started.set()
        release.wait(10)
        bulkhead.record(permit, None, 0.0)

    holder = threading.Thread(target=hold)
    holder.start()
    started.wait(10)
    assert (bulkhead.in_flight, bulkhead.partitions) == (3, 2)

    def check() -> str:
        seen = [(bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions)]
        bulkhead.record(mine, None, 0.0)  # a slot of the parent's: given back to nothing
        seen.append((bulkhead.in_flight, bulkhead.waiting, bulkhead.partitions))
        permits = [bulkhead.admit("c", "a") for _ in range(2)]
        try:
            bulkhead.admit("c", "a")
        except BulkheadFull:
            seen.append("full")
        seen.append((bulkhead.in_flight, bulkhead.partitions))
        for permit in permits:
            bulkhead.record(permit, None, 0.0)
        default = [bulkhead.admit("c") for _ in range(2)]
        seen.append((bulkhead.in_flight, bulkhead.partitions))
        for permit in default:
            bulkhead.record(permit, None, 0.0)
        seen.append((bulkhead.in_flight, bulkhead.partitions))
        # The child's own partition "b" is not the parent's, whose call ends here too.
        own = bulkhead.admit("c", "b")
        bulkhead.record(alone, None, 0.0)
        seen.append((bulkhead.in_flight, bulkhead.partitions))
        bulkhead.record(own, None, 0.0)
        seen.append((bulkhead.in_flight, bulkhead.partitions))
        return repr(seen)

    expected = [(0, 0, 0), (0, 0, 0), "full", (2, 1), (2, 0), (0, 0), (1, 1), (0, 0)]
    try:
        assert in_child(check) == repr(expected)
    finally:
        release.set()
        holder.join(10)
    bulkhead.record(mine, None, 0.0)
    bulkhead.record(alone, None, 0.0)
    assert (bulkhead.in_flight, bulkhead.partitions) == (0, 0)


def test_an_adaptive_bulkhead_starts_empty_in_the_child(clock: FakeClock) -> None:
    bulkhead = Bulkhead(10, max_waiting=1, limit=AIMDLimit(initial=2, max_limit=2))
    mine = bulkhead.admit("p")

    def check() -> str:
        seen: list[object] = [(bulkhead.in_flight, bulkhead.limit)]
        bulkhead.record(mine, None, 0.0)

        async def queue() -> None:
            permits = [await bulkhead.admit_async("c") for _ in range(2)]
            waiter = asyncio.ensure_future(bulkhead.admit_async("c"))
            await asyncio.sleep(0)
            seen.append((bulkhead.in_flight, bulkhead.waiting))
            bulkhead.record(permits.pop(), None, 0.0)
            permits.append(await waiter)
            seen.append((bulkhead.in_flight, bulkhead.waiting))
            for permit in permits:
                bulkhead.record(permit, None, 0.0)

        asyncio.run(queue())
        seen.append(bulkhead.in_flight)
        return repr(seen)

    assert in_child(check) == repr([(0, 2), (2, 1), (2, 0), 0])
    bulkhead.record(mine, None, 0.0)


def test_a_breaker_frees_the_parents_probe_slots_in_the_child(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    breaker.record(breaker.admit("p"), RuntimeError("down"), 0.0)
    clock.advance(1)
    probe = breaker.admit("p")  # the only probe slot, held across the fork

    def check() -> str:
        breaker.record(breaker.admit("c"), None, 0.0)
        return str(breaker.state)

    assert in_child(check) == "closed"
    with pytest.raises(CircuitOpen) as info:  # in the parent the slot is still taken
        breaker.admit("p")
    assert info.value.retry_after == 0.0
    breaker.record(probe, None, 0.0)
    assert breaker.state == "closed"


def test_a_retry_budget_and_a_throttle_work_in_the_child(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1, window=2)
    throttle = AdaptiveThrottle()
    policy = Policy("fork", retry=Retry(attempts=2, on=ValueError, wait=0, budget=budget))
    calls = 0

    def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ValueError("once")
        return calls

    def check() -> str:
        throttle.record(throttle.admit("c"), None, 0.0)
        return repr((policy.call(flaky), budget.retries, throttle.requests, throttle.accepts))

    assert in_child(check) == repr((2, 1, 1, 1))

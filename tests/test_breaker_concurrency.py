"""The breaker under threads: exact counts, one transition, no lock across calls.

Threads are released together with a ``threading.Barrier`` (always with a
timeout, so a broken breaker fails the test instead of hanging it), and the
interpreter's switch interval is shortened so that threads interleave between
bytecodes as often as possible.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from reskit import _breaker
from reskit._breaker import BreakerState, CircuitBreaker
from reskit._errors import CircuitOpen
from reskit.testing import FakeClock

BARRIER_TIMEOUT = 30.0


@pytest.fixture
def wide_race_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a thread switch likely inside the breaker's critical sections.

    The breaker builds a new phase object while it moves to a new state, and a
    probe object while it admits a probe; both happen between reading the state
    and publishing the decision. Building them here yields the GIL first, so
    without the breaker's lock another thread would decide on the same stale
    state (and, say, admit one probe too many or announce a transition twice).
    """

    class SlowPhase(_breaker._Phase):
        __slots__ = ()

        def __init__(self, state: BreakerState) -> None:
            time.sleep(0)  # a GIL release, not a wait
            super().__init__(state)

    class SlowProbe(_breaker._Probe):
        __slots__ = ()

        def __init__(self, phase: _breaker._Phase, started: float, lease: object = None) -> None:
            time.sleep(0)
            super().__init__(phase, started, lease)

    monkeypatch.setattr(_breaker, "_Phase", SlowPhase)
    monkeypatch.setattr(_breaker, "_Probe", SlowProbe)


async def until_started(task: asyncio.Task[Any], started: asyncio.Event) -> None:
    """Wait until ``task`` sets ``started``; fail at once if it ends first."""
    waiter = asyncio.ensure_future(started.wait())
    done, _ = await asyncio.wait(
        {task, waiter}, timeout=BARRIER_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if waiter not in done:
        waiter.cancel()
    assert task not in done, f"the task ended before it started: {task!r}"
    assert waiter in done


class Counting:
    """A listener whose counts are exact under threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.changes: list[tuple[str, str]] = []
        self.failures = 0
        self.successes = 0

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        with self._lock:
            self.changes.append((old.name, new.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1

    def success(self, cb: Any) -> None:
        with self._lock:
            self.successes += 1


def run_together(count: int, work: Callable[[threading.Barrier], None]) -> None:
    """Run ``work`` in ``count`` threads that start it at the same moment."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            work(barrier)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target) for _ in range(count)]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BARRIER_TIMEOUT * 2)
    finally:
        sys.setswitchinterval(previous)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def opened(breaker: CircuitBreaker) -> None:
    breaker.open()
    assert breaker.state is BreakerState.OPEN


# -- half-open under a thundering herd ----------------------------------------------------


@pytest.mark.parametrize("half_open_max_calls", [1, 7])
@pytest.mark.usefixtures("wide_race_windows")
def test_1000_threads_at_a_half_open_breaker_admit_exactly_max_calls(
    clock: FakeClock, half_open_max_calls: int
) -> None:
    listener = Counting()
    breaker = CircuitBreaker(
        reset_timeout=10, half_open_max_calls=half_open_max_calls, listeners=[listener]
    )
    opened(breaker)
    clock.advance(10)  # due to turn half-open; nobody has looked yet
    permits: list[Any] = []
    rejected: list[float | None] = []

    def arrive(barrier: threading.Barrier) -> None:
        barrier.wait(BARRIER_TIMEOUT)
        try:
            permits.append(breaker.admit("herd"))
        except CircuitOpen as exc:
            rejected.append(exc.retry_after)

    run_together(1000, arrive)
    assert len(permits) == half_open_max_calls
    assert len(rejected) == 1000 - half_open_max_calls
    assert set(rejected) == {0.0}
    assert listener.changes == [("closed", "open"), ("open", "half-open")]

    for permit in permits:
        breaker.record(permit, None, 0.0)
    assert breaker.state is BreakerState.CLOSED
    assert listener.changes[2:] == [("half-open", "closed")]


@pytest.mark.usefixtures("wide_race_windows")
def test_many_threads_reading_state_turn_it_half_open_once(clock: FakeClock) -> None:
    listener = Counting()
    breaker = CircuitBreaker(reset_timeout=1, listeners=[listener])
    opened(breaker)
    clock.advance(1)
    seen: list[BreakerState] = []

    def look(barrier: threading.Barrier) -> None:
        barrier.wait(BARRIER_TIMEOUT)
        seen.append(breaker.state)

    run_together(200, look)
    assert set(seen) == {BreakerState.HALF_OPEN}
    assert listener.changes == [("closed", "open"), ("open", "half-open")]


# -- crossing a threshold together --------------------------------------------------------


@pytest.mark.parametrize("threads", [2, 16, 64])
@pytest.mark.usefixtures("wide_race_windows")
def test_threads_failing_together_open_it_exactly_once(clock: FakeClock, threads: int) -> None:
    for _ in range(20):
        listener = Counting()
        breaker = CircuitBreaker(fail_max=1, listeners=[listener])

        def fail_together(barrier: threading.Barrier, breaker: CircuitBreaker = breaker) -> None:
            permit = breaker.admit("race")
            barrier.wait(BARRIER_TIMEOUT)
            breaker.record(permit, RuntimeError("down"), 0.0)

        with structlog.testing.capture_logs() as logs:
            run_together(threads, fail_together)
        assert listener.changes == [("closed", "open")]
        assert [e["event"] for e in logs] == ["reskit.breaker.opened"]
        # Every failure is reported to listeners, but only the first one counted:
        # the rest were admitted in the closed phase that it ended.
        assert listener.failures == threads
        assert breaker.fail_counter == 1


@pytest.mark.parametrize("threads", [2, 32])
@pytest.mark.usefixtures("wide_race_windows")
def test_threads_reaching_fail_max_together_count_every_failure(
    clock: FakeClock, threads: int
) -> None:
    for _ in range(20):
        listener = Counting()
        breaker = CircuitBreaker(fail_max=threads, listeners=[listener])

        def fail_together(barrier: threading.Barrier, breaker: CircuitBreaker = breaker) -> None:
            permit = breaker.admit("race")
            barrier.wait(BARRIER_TIMEOUT)
            breaker.record(permit, RuntimeError("down"), 0.0)

        run_together(threads, fail_together)
        assert listener.changes == [("closed", "open")]
        assert breaker.fail_counter == threads


@pytest.mark.usefixtures("wide_race_windows")
def test_rate_mode_opens_exactly_once_under_concurrent_failures(clock: FakeClock) -> None:
    for _ in range(20):
        listener = Counting()
        breaker = CircuitBreaker(
            failure_rate=0.5, window=100, minimum_calls=10, listeners=[listener]
        )

        def fail_twice(barrier: threading.Barrier, breaker: CircuitBreaker = breaker) -> None:
            barrier.wait(BARRIER_TIMEOUT)
            for _ in range(2):
                try:
                    permit = breaker.admit("race")
                except CircuitOpen:
                    continue
                breaker.record(permit, RuntimeError("down"), 0.0)

        run_together(32, fail_twice)
        assert listener.changes == [("closed", "open")]


@pytest.mark.usefixtures("wide_race_windows")
def test_probes_failing_together_reopen_it_exactly_once(clock: FakeClock) -> None:
    listener = Counting()
    breaker = CircuitBreaker(reset_timeout=1, half_open_max_calls=50, listeners=[listener])
    opened(breaker)
    clock.advance(1)
    probes = [breaker.admit("probe") for _ in range(50)]
    it = iter(probes)
    lock = threading.Lock()

    def fail_probe(barrier: threading.Barrier) -> None:
        with lock:
            probe = next(it)
        barrier.wait(BARRIER_TIMEOUT)
        breaker.record(probe, RuntimeError("still down"), 0.0)

    run_together(50, fail_probe)
    assert listener.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open")]
    assert breaker.fail_counter == 1


# -- exact counters -------------------------------------------------------------------------


def test_fail_counter_is_exact_after_a_stress(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=10**9)

    def hammer(barrier: threading.Barrier) -> None:
        barrier.wait(BARRIER_TIMEOUT)
        for _ in range(2000):
            permit = breaker.admit("stress")
            breaker.record(permit, RuntimeError("down"), 0.0)

    run_together(16, hammer)
    assert breaker.fail_counter == 16 * 2000


def test_window_and_listener_counts_are_exact_after_a_stress(clock: FakeClock) -> None:
    listener = Counting()
    calls = 16 * 1000
    breaker = CircuitBreaker(
        failure_rate=1.0,
        window=calls,
        minimum_calls=calls,
        slow_call_duration=1.0,
        listeners=[listener],
    )

    def hammer(barrier: threading.Barrier) -> None:
        barrier.wait(BARRIER_TIMEOUT)
        for i in range(1000):
            permit = breaker.admit("stress")
            breaker.record(permit, RuntimeError("down") if i % 4 == 0 else None, float(i % 2))

    run_together(16, hammer)
    window = breaker._window
    assert window is not None
    assert (window.calls, window.failures, window.slow) == (calls, calls // 4, calls // 2)
    assert (listener.failures, listener.successes) == (calls // 4, calls - calls // 4)
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.usefixtures("wide_race_windows")
def test_probe_counts_are_exact_after_a_stress(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=1, half_open_max_calls=16, success_threshold=10**9)
    opened(breaker)
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN

    def probe(barrier: threading.Barrier) -> None:
        barrier.wait(BARRIER_TIMEOUT)
        for _ in range(1000):
            permit = breaker.admit("stress")  # never rejected: one slot per thread
            breaker.record(permit, None, 0.0)

    run_together(16, probe)
    assert breaker.success_counter == 16 * 1000
    assert breaker._probes == {}


# -- no lock across the call ------------------------------------------------------------------


def test_50_concurrent_calls_through_a_closed_breaker_run_at_once(clock: FakeClock) -> None:
    # Each "call" waits for all 50 to be in flight: if admitting one held a lock
    # until it was recorded, the barrier could never trip and would time out.
    listener = Counting()
    breaker = CircuitBreaker(listeners=[listener])
    in_flight = threading.Barrier(50)

    def call(start: threading.Barrier) -> None:
        start.wait(BARRIER_TIMEOUT)
        permit = breaker.admit("parallel")
        in_flight.wait(BARRIER_TIMEOUT)
        breaker.record(permit, None, 0.2)

    run_together(50, call)
    assert listener.successes == 50


def test_50_concurrent_probes_run_at_once(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=1, half_open_max_calls=50, success_threshold=50)
    opened(breaker)
    clock.advance(1)
    in_flight = threading.Barrier(50)

    def call(start: threading.Barrier) -> None:
        start.wait(BARRIER_TIMEOUT)
        permit = breaker.admit("parallel")
        in_flight.wait(BARRIER_TIMEOUT)
        breaker.record(permit, None, 0.2)

    run_together(50, call)
    assert breaker.state is BreakerState.CLOSED


def test_listeners_run_outside_the_lock(clock: FakeClock) -> None:
    # A listener that uses the breaker from another thread would deadlock if it
    # were called with the breaker's lock held.
    breaker = CircuitBreaker(fail_max=1)
    seen: list[BreakerState] = []

    class UsesTheBreaker:
        def state_change(self, cb: CircuitBreaker, old: Any, new: Any) -> None:
            def reset_from_another_thread() -> None:
                cb.reset()
                seen.append(cb.state)

            worker = threading.Thread(target=reset_from_another_thread)
            worker.start()
            worker.join(BARRIER_TIMEOUT)
            assert not worker.is_alive()

    breaker.add_listener(UsesTheBreaker())
    breaker.record(breaker.admit("x"), RuntimeError("down"), 0.0)
    assert seen[0] is BreakerState.CLOSED


# -- interrupted probes -------------------------------------------------------------------------


async def test_a_cancelled_probe_frees_its_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=1)
    opened(breaker)
    clock.advance(1)
    started = asyncio.Event()

    async def probe() -> None:
        permit = breaker.admit("probe")
        exc: BaseException | None = None
        try:
            started.set()
            await asyncio.Event().wait()
        except BaseException as e:
            exc = e
            raise
        finally:
            breaker.record(permit, exc, 0.0)

    task = asyncio.create_task(probe())
    await until_started(task, started)
    with pytest.raises(CircuitOpen):
        breaker.admit("other")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(breaker.admit("next"), None, 0.0)
    assert breaker.state is BreakerState.CLOSED


def test_a_probe_interrupted_by_keyboard_interrupt_frees_its_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=1)
    opened(breaker)
    clock.advance(1)
    caught: list[BaseException] = []

    def probe(barrier: threading.Barrier) -> None:
        permit = breaker.admit("probe")
        exc: BaseException | None = None
        try:
            raise KeyboardInterrupt
        except BaseException as e:
            exc = e
            caught.append(e)
        finally:
            breaker.record(permit, exc, 0.0)

    run_together(1, probe)
    assert isinstance(caught[0], KeyboardInterrupt)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.fail_counter == 0
    breaker.record(breaker.admit("next"), None, 0.0)
    assert breaker.state is BreakerState.CLOSED


# -- rejections are cheap ------------------------------------------------------------------------


def reject(breaker: CircuitBreaker, times: int) -> CircuitOpen:
    last: CircuitOpen | None = None
    for _ in range(times):
        try:
            breaker.admit("flood")
        except CircuitOpen as exc:
            last = exc
    assert last is not None
    return last


def test_100k_rejections_keep_memory_flat(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=10**9)
    opened(breaker)
    first = reject(breaker, 1000)
    gc.collect()
    # With the cyclic GC off, only reference counting frees the rejections: a
    # rejection caught in a reference cycle (or a shared, growing traceback)
    # would pile up here.
    gc.disable()
    tracemalloc.start()
    try:
        reject(breaker, 1000)
        before, _ = tracemalloc.get_traced_memory()
        last = reject(breaker, 100_000)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert after - before < 8 * 1024, after - before
    assert peak - before < 32 * 1024, peak - before
    assert last is not first
    assert len(traceback.extract_tb(last.__traceback__)) == len(
        traceback.extract_tb(first.__traceback__)
    )


def test_rejections_are_fresh_exceptions(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=100)
    opened(breaker)
    seen = set()
    for step in itertools.count():
        if step == 5:
            break
        clock.advance(1)
        exc = reject(breaker, 1)
        assert exc.retry_after == pytest.approx(100 - step - 1)
        assert exc.__traceback__ is not None
        assert exc.__cause__ is None
        assert exc.__context__ is None
        seen.add(id(exc))
        assert len(traceback.extract_tb(exc.__traceback__)) <= 2
    assert len(seen) == 5


def test_rejections_do_not_lock(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=100)
    opened(breaker)
    with breaker._lock:  # held elsewhere: an open breaker still answers at once
        for _ in range(3):
            with pytest.raises(CircuitOpen):
                breaker.admit("x")
        permit_free = CircuitBreaker()
        permit_free.record(permit_free.admit("x"), None, 0.0)


def test_closed_successes_do_not_lock(clock: FakeClock) -> None:
    breaker = CircuitBreaker()
    with breaker._lock:
        for _ in range(3):
            breaker.record(breaker.admit("x"), None, 0.0)


def test_fake_clock_is_shared_by_threads() -> None:
    with FakeClock() as clock:
        breaker = CircuitBreaker(reset_timeout=5)
        opened(breaker)
        clock.advance(5)
        states: list[BreakerState] = []
        worker = threading.Thread(target=lambda: states.append(breaker.state))
        worker.start()
        worker.join(BARRIER_TIMEOUT)
        assert states == [BreakerState.HALF_OPEN]

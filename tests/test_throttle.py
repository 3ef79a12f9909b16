"""Client-side adaptive throttling (Google SRE book), on the fake clock."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import pytest

from reskit import AdaptiveThrottle, Rejected, Throttled, TimeoutExceeded
from reskit.testing import FakeClock


class Scripted(random.Random):
    """A random source that returns the pushed draws in order, then ``default``.

    The default 1 - 1e-12 admits every call whose rejection probability is
    below it, so tests can build up exact counts before they script a draw.
    """

    def __init__(self, draws: Iterable[float] = (), default: float = 1.0 - 1e-12) -> None:
        super().__init__(0)
        self._draws = list(draws)
        self._default = default
        self.used = 0

    def push(self, *draws: float) -> None:
        self._draws.extend(draws)

    def random(self) -> float:
        self.used += 1
        return self._draws.pop(0) if self._draws else self._default


def feed(throttle: AdaptiveThrottle, accepted: int, failed: int) -> None:
    """Record ``accepted`` accepted and ``failed`` failed attempts, never throttled."""
    for outcome in [None] * accepted + [ConnectionError("refused")] * failed:
        throttle.record(throttle.admit("p"), outcome, 0.01)


def formula(requests: int, accepts: int, k: float = 2.0) -> float:
    return max(0.0, (requests - k * accepts) / (requests + 1))


def test_no_rejection_and_no_draw_while_the_backend_keeps_up(clock: FakeClock) -> None:
    source = Scripted()
    throttle = AdaptiveThrottle(random=source)
    feed(throttle, accepted=50, failed=50)  # 100 - 2 * 50 = 0: probability 0
    assert throttle.rejection_probability == 0.0
    assert source.used == 0


def test_exact_probability_with_an_injected_random_source(clock: FakeClock) -> None:
    source = Scripted()
    throttle = AdaptiveThrottle(k=2.0, random=source)
    feed(throttle, accepted=6, failed=14)
    assert (throttle.requests, throttle.accepts) == (20, 6)
    p = formula(20, 6)
    assert throttle.rejection_probability == pytest.approx(8 / 21)

    source.push(p - 1e-9)  # just below p: rejected
    with pytest.raises(Throttled) as info:
        throttle.admit("orders")
    assert info.value.policy == "orders"
    assert info.value.rejected_by == "throttle"
    assert isinstance(info.value, Rejected)
    # The local rejection still counts as a request (and not as an accept).
    assert (throttle.requests, throttle.accepts) == (21, 6)
    p = formula(21, 6)
    assert throttle.rejection_probability == pytest.approx(9 / 22)

    source.push(p)  # exactly p: admitted (a draw in [p, 1) admits)
    throttle.record(throttle.admit("orders"), None, 0.01)
    assert (throttle.requests, throttle.accepts) == (22, 7)
    assert throttle.rejection_probability == pytest.approx(8 / 23)


@pytest.mark.parametrize("k", [1.0, 1.5, 3.0])
def test_k_scales_the_accepts(clock: FakeClock, k: float) -> None:
    throttle = AdaptiveThrottle(k=k, random=Scripted())
    feed(throttle, accepted=10, failed=40)
    assert throttle.rejection_probability == pytest.approx(formula(50, 10, k))


def test_when_the_backend_rejects_everything_local_rejections_follow_the_formula(
    clock: FakeClock,
) -> None:
    throttle = AdaptiveThrottle(window=60, random=random.Random(1234))
    expected = 0.0
    rejected = 0
    for _ in range(5_000):
        expected += throttle.rejection_probability
        try:
            permit = throttle.admit("p")
        except Throttled:
            rejected += 1
        else:
            throttle.record(permit, ConnectionError("503"), 0.01)
    # requests / (requests + 1): almost everything is rejected locally...
    assert throttle.rejection_probability == pytest.approx(5_000 / 5_001)
    # ...and the realised rejections match the sum of the probabilities.
    assert abs(rejected - expected) < 4 * expected**0.5
    assert rejected > 4_950


def test_against_a_capacity_limited_backend_the_client_sends_about_k_times_capacity(
    clock: FakeClock,
) -> None:
    # 100 attempts per second against a backend that accepts 10 per second.
    throttle = AdaptiveThrottle(k=2.0, window=10, random=random.Random(42))
    sent_per_second = []
    for _ in range(60):
        capacity, sent = 10, 0
        for _ in range(100):
            try:
                permit = throttle.admit("p")
            except Throttled:
                continue
            sent += 1
            if capacity:
                capacity -= 1
                throttle.record(permit, None, 0.01)
            else:
                throttle.record(permit, ConnectionError("overloaded"), 0.01)
        sent_per_second.append(sent)
        clock.advance(1.0)
    steady = sent_per_second[20:]
    mean = sum(steady) / len(steady)
    # p = (requests - 2 * accepts) / (requests + 1) ~= (100 - 20) / 101 per second.
    assert 17 <= mean <= 23, sent_per_second


def test_recovers_when_accepts_return_and_the_window_slides(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(window=30, random=Scripted())
    feed(throttle, accepted=0, failed=200)
    assert throttle.rejection_probability == pytest.approx(200 / 201)
    # The backend is healthy again; what gets through is accepted.
    history = []
    for _ in range(31):
        clock.advance(1.0)
        for _ in range(20):
            try:
                permit = throttle.admit("p")
            except Throttled:
                continue
            throttle.record(permit, None, 0.01)
        history.append(throttle.rejection_probability)
    assert history[0] == pytest.approx(formula(220, 20))  # old failures still dominate
    assert history[-1] == 0.0  # they left the window
    assert history == sorted(history, reverse=True)


def test_window_slides_exactly_by_whole_seconds(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(window=timedelta(seconds=10), random=Scripted())
    feed(throttle, accepted=0, failed=3)  # at t = 1000.0
    clock.advance(9.999)  # t = 1009.999: still in the window
    assert throttle.requests == 3
    clock.advance(0.001)  # t = 1010.0: the bucket of second 1000 has left
    assert throttle.requests == 0
    assert throttle.rejection_probability == 0.0


def test_an_accept_for_a_request_that_left_the_window_is_not_counted(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(window=5)
    permit = throttle.admit("p")
    clock.advance(6.0)  # a slow call: its request has expired meanwhile
    throttle.record(permit, None, 6.0)
    assert (throttle.requests, throttle.accepts) == (0, 0)


def test_which_exceptions_count_as_backend_rejections(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(on=(ConnectionError, TimeoutError), random=Scripted())
    for exc in (ConnectionError(), TimeoutExceeded("slow"), KeyError("not found"), None):
        throttle.record(throttle.admit("p"), exc, 0.01)
    # KeyError: the backend answered (say a 404), so it counts as accepted.
    assert (throttle.requests, throttle.accepts) == (4, 2)


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit()])
def test_cancellation_and_interrupts_are_not_counted(clock: FakeClock, exc: BaseException) -> None:
    throttle = AdaptiveThrottle(random=Scripted())
    feed(throttle, accepted=1, failed=1)
    throttle.record(throttle.admit("p"), exc, 0.01)
    assert (throttle.requests, throttle.accepts) == (2, 1)


def test_min_requests_holds_off_throttling(clock: FakeClock) -> None:
    source = Scripted([0.0])
    throttle = AdaptiveThrottle(min_requests=10, random=source)
    feed(throttle, accepted=0, failed=9)
    assert throttle.rejection_probability == 0.0
    throttle.record(throttle.admit("p"), ConnectionError(), 0.01)  # the 10th, admitted
    assert source.used == 0
    assert throttle.rejection_probability == pytest.approx(10 / 11)
    with pytest.raises(Throttled):
        throttle.admit("p")


def test_counts_are_exact_under_threads(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(random=random.Random(3))
    start = threading.Barrier(8)
    lock = threading.Lock()
    rejected = [0]

    def worker(i: int) -> None:
        start.wait(10)
        for n in range(500):
            try:
                permit = throttle.admit("p")
            except Throttled:
                with lock:
                    rejected[0] += 1
                continue
            throttle.record(permit, None if (n + i) % 3 == 0 else ConnectionError(), 0.0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert throttle.requests == 8 * 500
    assert throttle.accepts <= 8 * 500 - rejected[0]
    assert rejected[0] > 0


def test_repr(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(name="search", random=Scripted())
    feed(throttle, accepted=1, failed=3)
    assert repr(throttle) == (
        "AdaptiveThrottle('search', k=2.0, window=120.0, requests=4, accepts=1, "
        "rejection_probability=0.400)"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k": 0.5}, ValueError, "k must be a finite number >= 1.0"),
        ({"k": float("inf")}, ValueError, "k must be a finite number >= 1.0"),
        ({"window": 0.5}, ValueError, "window must be at least 1 second"),
        ({"window": -3}, ValueError, "window must be > 0 seconds"),
        ({"on": ValueError()}, TypeError, "on must be an Exception subclass"),
        ({"on": (KeyboardInterrupt,)}, TypeError, "on must be an Exception subclass"),
        ({"on": ()}, TypeError, "on must be an Exception subclass"),
        ({"min_requests": -1}, ValueError, "min_requests must be an int >= 0"),
        ({"name": 1}, TypeError, "name must be a str or None"),
        ({"random": 4}, TypeError, "random must be a random.Random instance"),
    ],
)
def test_validation(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        AdaptiveThrottle(**kwargs)

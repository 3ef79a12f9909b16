"""Adaptive concurrency limits: AIMD and gradient, alone and inside a bulkhead."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from reskit import AdaptiveLimit, AIMDLimit, Bulkhead, GradientLimit, TimeoutExceeded, _clock
from reskit.testing import FakeClock

# -- AIMD -----------------------------------------------------------------------------


def test_aimd_grows_by_one_only_while_busy() -> None:
    limit = AIMDLimit(initial=10, max_limit=100)
    assert limit.on_sample(0.01, 5, False) == 11  # 5 * 2 >= 10: busy enough
    assert limit.on_sample(0.01, 5, False) == 11  # 5 * 2 < 11: app-limited, hold
    assert limit.on_sample(0.01, 6, False) == 12
    assert limit.current == 12


def test_aimd_backs_off_on_drops_and_slow_calls() -> None:
    limit = AIMDLimit(initial=100, backoff_ratio=0.5, timeout=timedelta(seconds=1))
    assert limit.on_sample(0.01, 1, True) == 50
    assert limit.on_sample(1.0, 1, False) == 50  # at the timeout: fine
    assert limit.on_sample(1.001, 1, False) == 25  # above it: a drop
    # Even where the ratio is worth less than one slot, a drop costs one.
    small = AIMDLimit(initial=5, min_limit=1, backoff_ratio=0.9)
    assert [small.on_sample(0.0, 0, True) for _ in range(6)] == [4, 3, 2, 1, 1, 1]


def test_aimd_stays_within_its_bounds() -> None:
    limit = AIMDLimit(initial=3, min_limit=2, max_limit=4)
    assert [limit.on_sample(0.0, 100, False) for _ in range(3)] == [4, 4, 4]
    assert [limit.on_sample(0.0, 100, True) for _ in range(3)] == [3, 2, 2]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"initial": 0}, ValueError, "initial must be at least 1"),
        ({"min_limit": 5, "max_limit": 4}, ValueError, "lower min_limit or raise max_limit"),
        ({"initial": 300}, ValueError, r"initial \(300\) must lie between"),
        ({"max_limit": 2.5}, TypeError, "max_limit must be an int"),
        ({"backoff_ratio": 1.0}, ValueError, "backoff_ratio must be between 0.0 and 1.0"),
        ({"backoff_ratio": float("nan")}, ValueError, "backoff_ratio must be between"),
        ({"backoff_ratio": "0.5"}, TypeError, "backoff_ratio must be a number"),
        ({"timeout": 0}, ValueError, "timeout must be > 0 seconds"),
    ],
)
def test_aimd_validation(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        AIMDLimit(**kwargs)


# -- gradient ---------------------------------------------------------------------------


def test_gradient_holds_while_latency_is_steady() -> None:
    limit = GradientLimit(initial=50, max_limit=50)
    for _ in range(100):
        assert limit.on_sample(0.1, 50, False) == 50
    assert limit.long_rtt == pytest.approx(0.1)


def test_gradient_ignores_an_idle_system() -> None:
    limit = GradientLimit(initial=40, max_limit=100)
    for _ in range(20):
        limit.on_sample(0.1, 40, False)
    before = limit.current
    for _ in range(20):
        assert limit.on_sample(5.0, 3, False) == before  # slow, but barely used


def test_gradient_step_follows_the_formula() -> None:
    limit = GradientLimit(initial=100, max_limit=200, smoothing=0.5, queue_size=4)
    limit.on_sample(0.1, 100, False)  # long RTT 0.1; gradient 1.5 -> clamped to 1
    assert limit._estimate == pytest.approx(100 * 0.5 + (100 * 1.0 + 4) * 0.5)  # 102
    # Second sample 0.3 s: long RTT becomes the mean 0.2; gradient 1.5 * 0.2 / 0.3 = 1.0.
    limit.on_sample(0.3, 100, False)
    assert limit._estimate == pytest.approx(102 * 0.5 + (102 * 1.0 + 4) * 0.5)  # 104
    # Third 0.9 s: long RTT (0.1 + 0.3 + 0.9) / 3; gradient 1.5 * long / 0.9.
    long = (0.1 + 0.3 + 0.9) / 3
    gradient = 1.5 * long / 0.9
    limit.on_sample(0.9, 100, False)
    assert limit._estimate == pytest.approx(104 * 0.5 + (104 * gradient + 4) * 0.5)
    # A drop is the steepest gradient, with no headroom added.
    before = limit._estimate
    limit.on_sample(0.001, 100, True)
    assert limit._estimate == pytest.approx(before * 0.5 + before * 0.5 * 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smoothing": 0.0}, "smoothing must be between"),
        ({"rtt_tolerance": 0.9}, "rtt_tolerance must be a finite number >= 1.0"),
        ({"long_window": 0}, "long_window must be at least 1"),
        ({"queue_size": -1}, "queue_size must be an int >= 0"),
    ],
)
def test_gradient_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientLimit(**kwargs)


# -- under a simulated latency rise, through the bulkhead, on the fake clock -------------------


def drive(
    bulkhead: Bulkhead, clock: FakeClock, latency: float, rounds: int, *, dropped: bool = False
) -> list[int]:
    """Run ``rounds`` rounds of calls that fill the bulkhead, each taking ``latency``.

    Each round admits as many calls as the current limit allows; they "take"
    ``latency`` seconds of fake time and are released with that duration, as
    the policy would. Returns the limit after each round.
    """
    history = []
    for _ in range(rounds):
        permits = []
        started = _clock.now()
        for _ in range(bulkhead.limit):
            permits.append(bulkhead.admit("p", None))
        clock.advance(latency)
        for permit in permits:
            exc = TimeoutExceeded("slow") if dropped else None
            bulkhead.record(permit, exc, _clock.now() - started)
        history.append(bulkhead.limit)
    return history


@pytest.mark.parametrize(
    "make_limit",
    [
        lambda: AIMDLimit(initial=50, min_limit=5, max_limit=100, timeout=0.5),
        lambda: GradientLimit(initial=50, min_limit=5, max_limit=100),
    ],
    ids=["aimd", "gradient"],
)
def test_limit_falls_when_latency_rises_and_recovers(clock: FakeClock, make_limit: Any) -> None:
    limit: AdaptiveLimit = make_limit()
    bulkhead = Bulkhead(1000, limit=limit)
    healthy = drive(bulkhead, clock, 0.1, 60)
    assert healthy[-1] == 100  # busy and fast: grows to the ceiling
    overloaded = drive(bulkhead, clock, 2.0, 5)
    assert min(overloaded) <= 20  # latency rose twenty-fold: the limit fell hard
    recovered = drive(bulkhead, clock, 0.1, 150)
    assert recovered[-1] == 100
    assert recovered.index(100) > 3  # growing back takes a while
    for value in healthy + overloaded + recovered:
        assert 5 <= value <= 100
    assert bulkhead.in_flight == 0


def test_drops_drive_the_limit_to_its_floor_and_no_lower(clock: FakeClock) -> None:
    bulkhead = Bulkhead(50, limit=GradientLimit(initial=40, min_limit=3, max_limit=50))
    history = drive(bulkhead, clock, 0.1, 40, dropped=True)
    assert history[-1] == 3
    assert min(history) == 3
    assert history == sorted(history, reverse=True)


def test_max_concurrent_stays_the_hard_ceiling() -> None:
    bulkhead = Bulkhead(8, limit=AIMDLimit(initial=5, max_limit=100))
    for _ in range(50):
        permits = [bulkhead.admit("p", None) for _ in range(bulkhead.limit)]
        for permit in permits:
            bulkhead.record(permit, None, 0.01)
    assert bulkhead.adaptive_limit is not None
    assert bulkhead.adaptive_limit.current > 8
    assert bulkhead.limit == 8


def test_base_class_needs_an_update_rule() -> None:
    limit = AdaptiveLimit(initial=1, min_limit=1, max_limit=2)
    with pytest.raises(NotImplementedError):
        limit.on_sample(0.1, 1, False)
    assert repr(limit) == "AdaptiveLimit(current=1, min_limit=1, max_limit=2)"

"""The adaptive limits against a reference model of their documented rules.

Random sample sequences (durations on both sides of every threshold, busy and
idle bulkheads, drops) go through :class:`AIMDLimit` and :class:`GradientLimit`
and through a plain transcription of the rules in their docstrings; the limit
and the long-term RTT must agree after every sample. The tests below the models
pin each validation limit and default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from reskit import AdaptiveLimit, AIMDLimit, Bulkhead, GradientLimit

samples = st.lists(
    st.tuples(
        st.sampled_from([0.0, 1e-9, 0.05, 0.1, 0.2, 0.3, 1.0, 3.0, 5.0, 5.001]),
        st.integers(0, 60),
        st.booleans(),
    ),
    max_size=60,
)


def clamp(value: float, low: int, high: int) -> float:
    return float(low) if value < low else float(high) if value > high else value


@dataclass
class Gradient:
    estimate: float
    low: int
    high: int
    smoothing: float
    tolerance: float
    long_window: int
    queue_size: int
    samples: int = 0
    long: float = 0.0

    def sample(self, duration: float, in_flight: int, dropped: bool) -> None:
        short = max(duration, 1e-9)
        self.samples += 1
        # A plain average over the first ten samples (or the whole window if shorter).
        if self.samples <= min(10, self.long_window):
            self.long += (short - self.long) / self.samples
        else:
            self.long += (short - self.long) * (2.0 / (self.long_window + 1))
        long = self.long
        if long / short > 2.0:
            self.long = long * 0.95
        estimate = self.estimate
        if not dropped and in_flight < estimate / 2:
            return
        if dropped:
            target = estimate * 0.5
        else:
            gradient = max(0.5, min(1.0, self.tolerance * long / short))
            target = estimate * gradient + self.queue_size
        new = estimate * (1.0 - self.smoothing) + target * self.smoothing
        self.estimate = clamp(new, self.low, self.high)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    samples=samples,
    initial=st.integers(1, 60),
    low=st.integers(1, 10),
    high=st.integers(60, 100),
    smoothing=st.sampled_from([0.2, 0.5, 0.9]),
    tolerance=st.sampled_from([1.0, 1.5]),
    long_window=st.sampled_from([1, 3, 10, 11, 20, 600]),
    queue_size=st.sampled_from([0, 4]),
)
def test_gradient_limit_follows_the_model(
    samples: list[tuple[float, int, bool]],
    initial: int,
    low: int,
    high: int,
    smoothing: float,
    tolerance: float,
    long_window: int,
    queue_size: int,
) -> None:
    initial = max(initial, low)
    limit = GradientLimit(
        initial=initial,
        min_limit=low,
        max_limit=high,
        smoothing=smoothing,
        rtt_tolerance=tolerance,
        long_window=long_window,
        queue_size=queue_size,
    )
    model = Gradient(float(initial), low, high, smoothing, tolerance, long_window, queue_size)
    for duration, in_flight, dropped in samples:
        model.sample(duration, in_flight, dropped)
        assert limit.on_sample(duration, in_flight, dropped) == int(model.estimate)
        assert limit.current == int(model.estimate)
        assert limit.long_rtt == pytest.approx(model.long, rel=1e-12, abs=0.0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    samples=samples,
    initial=st.integers(1, 60),
    low=st.integers(1, 10),
    high=st.integers(60, 100),
    ratio=st.sampled_from([0.5, 0.9]),
)
def test_aimd_limit_follows_the_model(
    samples: list[tuple[float, int, bool]], initial: int, low: int, high: int, ratio: float
) -> None:
    initial = max(initial, low)
    limit = AIMDLimit(initial=initial, min_limit=low, max_limit=high, backoff_ratio=ratio)
    current = initial
    for duration, in_flight, dropped in samples:
        if dropped or duration > 5.0:
            current = int(current * ratio)
        elif in_flight * 2 >= current:
            current += 1
        current = min(max(current, low), high)
        assert limit.on_sample(duration, in_flight, dropped) == current
        assert limit.current == current


def test_a_long_rtt_at_exactly_twice_the_latest_is_kept() -> None:
    limit = GradientLimit(initial=10)
    limit.on_sample(3.0, 10, False)
    limit.on_sample(1.0, 10, False)  # the average is 2.0: exactly twice, not more
    assert limit.long_rtt == 2.0
    limit.on_sample(0.5, 10, False)  # (3 + 1 + 0.5) / 3 = 1.5 is three times 0.5
    assert limit.long_rtt == pytest.approx(1.5 * 0.95)


def test_a_zero_duration_reads_as_no_queueing() -> None:
    limit = GradientLimit(initial=10, smoothing=0.5, queue_size=4)
    assert limit.on_sample(0.0, 10, False) == 12  # gradient 1: 10 * 0.5 + 14 * 0.5
    assert limit.long_rtt == 1e-9


def test_in_flight_at_exactly_half_the_limit_counts_as_busy() -> None:
    limit = GradientLimit(initial=20, smoothing=0.5, queue_size=4)
    assert limit.on_sample(0.1, 9, False) == 20  # idle: held
    assert limit.on_sample(0.1, 10, False) == 22  # half: 20 * 0.5 + 24 * 0.5


def test_each_bulkhead_needs_its_own_limit() -> None:
    limit = AIMDLimit()
    Bulkhead(10, limit=limit)
    with pytest.raises(ValueError, match="this AIMDLimit already belongs to another Bulkhead"):
        Bulkhead(10, limit=limit)
    gradient = GradientLimit()
    Bulkhead(10, limit=gradient)
    with pytest.raises(ValueError, match="create one GradientLimit per Bulkhead"):
        Bulkhead(10, limit=gradient)


def test_defaults() -> None:
    aimd = AIMDLimit()
    assert (aimd.current, aimd.min_limit, aimd.max_limit) == (20, 1, 200)
    assert (aimd.backoff_ratio, aimd.timeout) == (0.9, 5.0)
    gradient = GradientLimit()
    assert (gradient.current, gradient.min_limit, gradient.max_limit) == (20, 1, 200)
    assert (gradient.smoothing, gradient.rtt_tolerance) == (0.2, 1.5)
    assert (gradient.long_window, gradient.queue_size, gradient.long_rtt) == (600, 4, 0.0)


def test_a_single_limit_value_is_accepted() -> None:
    limit = AIMDLimit(initial=5, min_limit=5, max_limit=5)
    assert limit.on_sample(0.1, 5, False) == 5
    assert limit.on_sample(0.1, 5, True) == 5


HINT = "pass a whole number of concurrent calls"


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: AIMDLimit(min_limit=0), ValueError, f"min_limit must be at least 1.*; {HINT}"),
        (lambda: AIMDLimit(max_limit=0), ValueError, f"max_limit must be at least 1.*; {HINT}"),
        (lambda: AIMDLimit(initial=0), ValueError, f"initial must be at least 1.*; {HINT}"),
        (lambda: AIMDLimit(initial=1.5), TypeError, f"initial must be an int.*; {HINT}"),
        (lambda: AIMDLimit(min_limit=3, max_limit=2, initial=2), ValueError, "is above max_limit"),
        (lambda: AIMDLimit(initial=300), ValueError, "must lie between min_limit"),
        (lambda: AIMDLimit(backoff_ratio=1.0), ValueError, "; 0.9 backs off by 10% on each drop$"),
        (lambda: AIMDLimit(backoff_ratio=True), TypeError, "backoff_ratio must be a number"),
        (lambda: AIMDLimit(timeout="1"), TypeError, "timeout"),
        (lambda: GradientLimit(smoothing=1.0), ValueError, "; 0.2 is a steady default$"),
        (lambda: GradientLimit(smoothing=1.5), ValueError, "smoothing must be between"),
        (lambda: GradientLimit(rtt_tolerance=True), ValueError, "rtt_tolerance must be a finite"),
        (lambda: GradientLimit(rtt_tolerance="2"), ValueError, "rtt_tolerance must be a finite"),
        (lambda: GradientLimit(rtt_tolerance=math.inf), ValueError, "50% slower than usual"),
        (
            lambda: GradientLimit(long_window=0),
            ValueError,
            "long_window must be at least 1.*; pass how many samples the long-term RTT",
        ),
        (lambda: GradientLimit(queue_size=True), ValueError, "queue_size must be an int >= 0"),
        (lambda: GradientLimit(queue_size="4"), ValueError, "queue_size must be an int >= 0"),
        (lambda: GradientLimit(queue_size=-1), ValueError, "headroom added to each estimate"),
    ],
)
def test_arguments_out_of_range(build: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: GradientLimit(rtt_tolerance=1.0),
        lambda: GradientLimit(rtt_tolerance=1),
        lambda: GradientLimit(queue_size=0),
        lambda: GradientLimit(long_window=1),
        lambda: AIMDLimit(timeout=timedelta(seconds=2)),
    ],
)
def test_arguments_at_their_limits_are_accepted(build: Any) -> None:
    assert isinstance(build(), AdaptiveLimit)


def test_the_long_rtt_is_a_plain_mean_of_the_first_ten_samples_then_an_ewma() -> None:
    limit = GradientLimit(initial=10, long_window=20)
    durations = [0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.2, 0.9, 0.5]
    for duration in durations[:10]:
        limit.on_sample(duration, 0, False)
    assert limit.long_rtt == pytest.approx(sum(durations[:10]) / 10)
    expected = limit.long_rtt
    for duration in durations[10:]:
        limit.on_sample(duration, 0, False)
        expected += (duration - expected) * 2.0 / 21
    assert limit.long_rtt == pytest.approx(expected)

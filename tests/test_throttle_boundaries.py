"""The adaptive throttle at its edges: validation limits, the window's end, late outcomes."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import pytest

from reskit import AdaptiveThrottle, Throttled
from reskit.testing import FakeClock


class Admitting(random.Random):
    """Draws that admit every call whose rejection probability is below one."""

    def random(self) -> float:
        return 1.0 - 1e-12


def test_defaults() -> None:
    throttle = AdaptiveThrottle()
    assert (throttle.k, throttle.window, throttle.min_requests, throttle.name) == (
        2.0,
        120.0,
        0,
        None,
    )
    assert throttle.on == (Exception,)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k": True}, ValueError, "k must be a finite number >= 1.0"),
        ({"k": "2"}, ValueError, "k must be a finite number >= 1.0"),
        ({"k": 0.999}, ValueError, "k must be a finite number >= 1.0"),
        ({"k": float("inf")}, ValueError, "k must be a finite number >= 1.0"),
        ({"window": 0.999}, ValueError, "window must be at least 1 second"),
        ({"window": 10**9}, ValueError, "^window must be at most"),
        ({"window": "10"}, TypeError, "window"),
        ({"min_requests": True}, ValueError, "min_requests must be an int >= 0"),
        ({"min_requests": "3"}, ValueError, "min_requests must be an int >= 0"),
        ({"min_requests": -1}, ValueError, "min_requests must be an int >= 0"),
        ({"on": ()}, TypeError, "on must be an Exception subclass"),
        ({"on": (ValueError, 3)}, TypeError, "on must be an Exception subclass"),
        ({"on": KeyboardInterrupt}, TypeError, "on must be an Exception subclass"),
        ({"name": 3}, TypeError, "name must be a str or None"),
        ({"random": 3}, TypeError, "random must be a random.Random"),
    ],
)
def test_arguments_out_of_range(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        AdaptiveThrottle(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 1}, {"k": 1.0}, {"window": 1}, {"window": timedelta(seconds=1)}, {"min_requests": 0}],
)
def test_arguments_at_their_limits_are_accepted(kwargs: dict[str, Any]) -> None:
    throttle = AdaptiveThrottle(**kwargs)
    name, value = next(iter(kwargs.items()))
    expected = value.total_seconds() if isinstance(value, timedelta) else value
    assert getattr(throttle, name) == expected


def test_the_default_random_source_decides_when_nothing_is_injected(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle()
    outcomes = set()
    for _ in range(200):
        try:
            throttle.record(throttle.admit("p"), ConnectionError("refused"), 0.0)
            outcomes.add("admitted")
        except Throttled:
            outcomes.add("throttled")
    assert "throttled" in outcomes


@pytest.mark.parametrize("exit", [asyncio.CancelledError(), KeyboardInterrupt()])
def test_a_cancelled_attempt_is_taken_back(clock: FakeClock, exit: BaseException) -> None:
    throttle = AdaptiveThrottle(random=Admitting())
    permits = [throttle.admit("p") for _ in range(3)]
    assert throttle.requests == 3
    throttle.record(permits[0], exit, 0.0)
    assert (throttle.requests, throttle.accepts) == (2, 0)
    throttle.record(permits[1], None, 0.0)
    assert (throttle.requests, throttle.accepts) == (2, 1)


def test_a_cancelled_attempt_whose_second_left_the_window_changes_nothing(
    clock: FakeClock,
) -> None:
    throttle = AdaptiveThrottle(window=2, random=Admitting())
    late = throttle.admit("p")
    clock.advance(2.0)
    fresh = throttle.admit("p")
    assert throttle.requests == 1
    throttle.record(late, asyncio.CancelledError(), 0.0)
    assert throttle.requests == 1
    throttle.record(fresh, None, 0.0)
    assert (throttle.requests, throttle.accepts) == (1, 1)


def test_an_accept_whose_second_left_the_window_is_not_counted(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(window=2)
    late = throttle.admit("p")
    clock.advance(1.0)
    assert throttle.requests == 1  # one second later it is still in the window
    clock.advance(1.0)
    assert throttle.requests == 0
    throttle.record(late, None, 0.0)
    assert (throttle.requests, throttle.accepts) == (0, 0)
    assert throttle.rejection_probability == 0.0


def test_exceptions_outside_on_count_as_accepted(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(on=ConnectionError)
    throttle.record(throttle.admit("p"), KeyError("business"), 0.0)
    throttle.record(throttle.admit("p"), ConnectionError("refused"), 0.0)
    assert (throttle.requests, throttle.accepts) == (2, 1)


def test_min_requests_holds_back_exactly_until_reached(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(min_requests=3, random=random.Random(0))
    for _ in range(2):
        throttle.record(throttle.admit("p"), ConnectionError("refused"), 0.0)
    assert throttle.rejection_probability == 0.0
    throttle.record(throttle.admit("p"), ConnectionError("refused"), 0.0)
    assert throttle.rejection_probability == pytest.approx(3 / 4)


def test_repr_with_and_without_a_name(clock: FakeClock) -> None:
    assert repr(AdaptiveThrottle()) == (
        "AdaptiveThrottle(k=2.0, window=120.0, requests=0, accepts=0, rejection_probability=0.000)"
    )
    assert repr(AdaptiveThrottle(name="api")).startswith("AdaptiveThrottle('api', k=2.0, ")


def test_a_cancelled_attempt_leaves_the_window_with_its_second(clock: FakeClock) -> None:
    throttle = AdaptiveThrottle(window=2, random=Admitting())
    permits = [throttle.admit("p") for _ in range(3)]
    throttle.record(permits[0], asyncio.CancelledError(), 0.0)
    assert throttle.requests == 2
    clock.advance(2.0)
    assert (throttle.requests, throttle.accepts) == (0, 0)

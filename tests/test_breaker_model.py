"""The breaker's rate and slow-call modes against a reference model.

``WindowMachine`` drives a breaker in rate mode, slow-call mode or both, over a
count window or a time window, through random calls (finished at once or held
across other steps), fake-clock moves and manual operations. After every step
it compares the state, the counters and every announced transition, with its
reason, with a plain model that keeps the whole history of outcomes and filters
it the way the documentation says: the last ``window`` calls, or the calls of
the last ``window_seconds`` whole seconds, since the last state change.

The boundary tests below it pin each threshold at the exact value where the
decision flips (``>=`` against ``>``), the things a random walk reaches rarely.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
import structlog
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from reskit._breaker import BreakerState, CircuitBreaker
from reskit._errors import CircuitOpen
from reskit.testing import FakeClock

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
FORCED_OPEN = BreakerState.FORCED_OPEN
DISABLED = BreakerState.DISABLED

SLOW = 1.0  # slow_call_duration in every machine


class Excluded(Exception):
    pass


OUTCOMES: dict[str, BaseException | None] = {
    "success": None,
    "failure": RuntimeError("down"),
    "excluded": Excluded("business error"),
    "cancelled": asyncio.CancelledError(),
}
KIND = {"success": "ok", "excluded": "ok", "failure": "bad", "cancelled": "neither"}


@dataclass
class Permit:
    generation: int
    probe: int | None = None
    disabled: bool = False


@dataclass
class Model:
    """What the documentation promises, with the history kept in full."""

    fail_max: int
    reset_timeout: float
    success_threshold: int
    half_open_max_calls: int
    failure_rate: float | None
    slow: bool
    slow_call_rate: float
    window: int
    window_seconds: int | None
    minimum_calls: int
    state: BreakerState = CLOSED
    fail_counter: int = 0
    success_counter: int = 0
    half_open_at: float = 0.0
    generation: int = 0
    probes: set[int] = field(default_factory=set)
    next_probe: int = 0
    # (time, failed, slow) of every call counted since the last state change.
    history: list[tuple[float, bool, bool]] = field(default_factory=list)
    transitions: list[tuple[str, str, str]] = field(default_factory=list)

    def move(self, state: BreakerState, now: float, reason: str) -> None:
        if state is not self.state:
            self.transitions.append((self.state.value, state.value, reason))
        self.generation += 1
        self.probes = set()
        self.history = []
        if state in (OPEN, FORCED_OPEN):
            self.half_open_at = now + self.reset_timeout
            self.success_counter = 0
        elif state is HALF_OPEN:
            self.success_counter = 0
        elif state is CLOSED:
            self.fail_counter = 0
            self.success_counter = 0
        self.state = state

    def observe(self, now: float) -> BreakerState:
        if self.state is OPEN and now >= self.half_open_at:
            self.move(HALF_OPEN, now, "reset_timeout")
        return self.state

    def admit(self, now: float) -> Permit | float | None:
        state = self.observe(now)
        if state is FORCED_OPEN:
            return None
        if state is OPEN:
            return self.half_open_at - now
        if state is HALF_OPEN:
            if len(self.probes) >= self.half_open_max_calls:
                return 0.0
            self.next_probe += 1
            self.probes.add(self.next_probe)
            return Permit(self.generation, self.next_probe)
        return Permit(self.generation, disabled=state is DISABLED)

    def counted(self, now: float) -> list[tuple[float, bool, bool]]:
        if self.window_seconds is None:
            return self.history[-self.window :]
        oldest = math.floor(now) - self.window_seconds + 1
        return [entry for entry in self.history if math.floor(entry[0]) >= oldest]

    def record(self, permit: Permit, outcome: str, duration: float, now: float) -> None:
        if permit.disabled:
            return
        kind = KIND[outcome]
        slow = self.slow and duration >= SLOW
        if permit.probe is not None:
            live = permit.probe in self.probes
            self.probes.discard(permit.probe)
            if not live or permit.generation != self.generation or kind == "neither":
                return
            if kind == "bad":
                self.fail_counter += 1
                self.move(OPEN, now, "probe_failed")
                return
            self.fail_counter = 0
            if slow:
                self.move(OPEN, now, "probe_slow")
                return
            self.success_counter += 1
            if self.success_counter >= self.success_threshold:
                self.move(CLOSED, now, "probes_succeeded")
            return
        if permit.generation != self.generation or self.state is not CLOSED or kind == "neither":
            return
        reason = None
        if kind == "bad":
            self.fail_counter += 1
            if self.failure_rate is None and self.fail_counter >= self.fail_max:
                reason = "fail_max"
        else:
            self.fail_counter = 0
        self.history.append((now, kind == "bad", slow))
        window = self.counted(now)
        calls = len(window)
        if calls >= self.minimum_calls:
            failures = sum(1 for _, failed, _ in window if failed)
            slow_calls = sum(1 for _, _, was_slow in window if was_slow)
            if self.failure_rate is not None and failures / calls >= self.failure_rate:
                reason = "failure_rate"
            elif self.slow and slow_calls / calls >= self.slow_call_rate:
                reason = "slow_call_rate"
        if reason is not None:
            self.move(OPEN, now, reason)


class WindowMachine(RuleBasedStateMachine):
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(start=1000.0)
        self.clock.install()
        self.capture = structlog.testing.capture_logs()
        self.logs = self.capture.__enter__()

    def teardown(self) -> None:
        self.capture.__exit__(None, None, None)
        self.clock.uninstall()

    @initialize(
        mode=st.sampled_from(["rate", "slow", "both", "consecutive+slow"]),
        failure_rate=st.sampled_from([0.25, 0.5, 2 / 3, 1.0]),
        slow_call_rate=st.sampled_from([0.5, 2 / 3, 1.0]),
        window=st.integers(1, 5),
        window_seconds=st.sampled_from([None, None, 1, 2, 3]),
        minimum_calls=st.integers(1, 4),
        fail_max=st.integers(1, 3),
        reset_timeout=st.sampled_from([0.5, 2.0, 30.0]),
        success_threshold=st.integers(1, 3),
        half_open_max_calls=st.integers(1, 2),
    )
    def build(
        self,
        mode: str,
        failure_rate: float,
        slow_call_rate: float,
        window: int,
        window_seconds: int | None,
        minimum_calls: int,
        fail_max: int,
        reset_timeout: float,
        success_threshold: int,
        half_open_max_calls: int,
    ) -> None:
        rate = failure_rate if mode in ("rate", "both") else None
        slow = mode != "rate"
        if window_seconds is None:
            minimum_calls = min(minimum_calls, window)
        self.breaker = CircuitBreaker(
            fail_max,
            reset_timeout,
            exclude=[Excluded],
            name="model",
            failure_rate=rate,
            window=window,
            window_seconds=window_seconds,
            minimum_calls=minimum_calls,
            slow_call_duration=SLOW if slow else None,
            slow_call_rate=slow_call_rate,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
        )
        self.model = Model(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            failure_rate=rate,
            slow=slow,
            slow_call_rate=slow_call_rate,
            window=window,
            window_seconds=window_seconds,
            minimum_calls=minimum_calls,
        )

    def _admit(self) -> tuple[Any, Permit] | None:
        expected = self.model.admit(self.clock.now())
        if isinstance(expected, Permit):
            return self.breaker.admit("machine"), expected
        with pytest.raises(CircuitOpen) as info:
            self.breaker.admit("machine")
        assert info.value.retry_after == expected
        return None

    def _record(self, pair: tuple[Any, Permit], outcome: str, duration: float) -> None:
        permit, expected = pair
        self.model.record(expected, outcome, duration, self.clock.now())
        self.breaker.record(permit, OUTCOMES[outcome], duration)

    @rule(outcome=st.sampled_from(sorted(OUTCOMES)), duration=st.sampled_from([0.0, 0.999, SLOW]))
    def call(self, outcome: str, duration: float) -> None:
        pair = self._admit()
        if pair is not None:
            self._record(pair, outcome, duration)

    @rule(
        outcome=st.sampled_from(["success", "failure"]),
        duration=st.sampled_from([0.0, SLOW]),
        times=st.integers(2, 4),
    )
    def calls(self, outcome: str, duration: float, times: int) -> None:
        for _ in range(times):
            self.call(outcome, duration)

    @rule(target=held)
    def start_call(self) -> tuple[Any, Permit] | None:
        return self._admit()

    @rule(
        pair=consumes(held),
        outcome=st.sampled_from(sorted(OUTCOMES)),
        duration=st.sampled_from([0.0, SLOW]),
    )
    def finish_call(self, pair: tuple[Any, Permit] | None, outcome: str, duration: float) -> None:
        if pair is not None:
            self._record(pair, outcome, duration)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.5, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: hasattr(self, "model") and self.model.state is OPEN)
    @rule()
    def wait_for_half_open(self) -> None:
        self.clock.advance(max(self.model.half_open_at - self.clock.now(), 0.0))

    @rule(op=st.sampled_from(["open", "close", "half_open", "force_open", "disable", "reset"]))
    def manual(self, op: str) -> None:
        target = {
            "open": OPEN,
            "close": CLOSED,
            "half_open": HALF_OPEN,
            "force_open": FORCED_OPEN,
            "disable": DISABLED,
            "reset": CLOSED,
        }[op]
        self.model.move(target, self.clock.now(), "manual")
        getattr(self.breaker, op)()

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "breaker"):
            return
        assert self.breaker.state is self.model.observe(self.clock.now())
        assert self.breaker.fail_counter == self.model.fail_counter
        assert self.breaker.success_counter == self.model.success_counter
        announced = [(e["from_state"], e["to_state"], e["reason"]) for e in self.logs]
        assert announced == self.model.transitions


WindowMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=50, deadline=None, derandomize=True
)
test_window_machine = WindowMachine.TestCase


# -- boundaries ---------------------------------------------------------------------------


def outcome(breaker: CircuitBreaker, failed: bool = False, duration: float = 0.0) -> None:
    permit = breaker.admit("test")
    breaker.record(permit, RuntimeError("down") if failed else None, duration)


def reasons(logs: list[Any]) -> list[str]:
    return [event["reason"] for event in logs]


@pytest.mark.parametrize(("failures", "opens"), [(1, False), (2, True)])
def test_failure_rate_opens_at_exactly_the_rate(
    clock: FakeClock, logs: list[Any], failures: int, opens: bool
) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=4, minimum_calls=4)
    for i in range(4):
        outcome(breaker, failed=i < failures)
    assert (breaker.state is OPEN) is opens
    assert reasons(logs) == (["failure_rate"] if opens else [])


@pytest.mark.parametrize(("slow_calls", "opens"), [(1, False), (2, True)])
def test_slow_call_rate_opens_at_exactly_the_rate(
    clock: FakeClock, logs: list[Any], slow_calls: int, opens: bool
) -> None:
    breaker = CircuitBreaker(slow_call_duration=2.0, slow_call_rate=0.5, window=4, minimum_calls=4)
    for i in range(4):
        outcome(breaker, duration=2.0 if i < slow_calls else 1.999)
    assert (breaker.state is OPEN) is opens
    assert reasons(logs) == (["slow_call_rate"] if opens else [])


def test_a_rate_is_judged_from_exactly_minimum_calls(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=1.0, window=5, minimum_calls=3)
    outcome(breaker, failed=True)
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED
    outcome(breaker, failed=True)
    assert breaker.state is OPEN


def test_a_call_exactly_slow_call_duration_long_is_slow(clock: FakeClock) -> None:
    breaker = CircuitBreaker(slow_call_duration=0.5, minimum_calls=1, window=1)
    outcome(breaker, duration=0.4999)
    assert breaker.state is CLOSED
    outcome(breaker, duration=0.5)
    assert breaker.state is OPEN


def test_a_failed_slow_call_in_consecutive_mode_opens_for_the_slow_rate(
    clock: FakeClock, logs: list[Any]
) -> None:
    breaker = CircuitBreaker(fail_max=1, slow_call_duration=1.0, window=1, minimum_calls=1)
    outcome(breaker, failed=True, duration=1.0)
    assert reasons(logs) == ["slow_call_rate"]
    breaker.reset()
    outcome(breaker, failed=True)
    assert reasons(logs) == ["slow_call_rate", "manual", "fail_max"]


def test_rate_mode_ignores_fail_max(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, failure_rate=1.0, window=10, minimum_calls=2)
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED
    assert breaker.fail_counter == 1


@pytest.mark.parametrize("window_seconds", [None, 3])
def test_a_rate_breaker_trips_again_after_each_cycle_and_after_reset(
    clock: FakeClock, logs: list[Any], window_seconds: int | None
) -> None:
    breaker = CircuitBreaker(
        failure_rate=0.5,
        window=4,
        window_seconds=window_seconds,
        minimum_calls=2,
        reset_timeout=10,
        success_threshold=2,
    )
    for _ in range(3):
        # Each cycle starts with an empty window: one failure is below minimum_calls.
        outcome(breaker, failed=True)
        assert breaker.state is CLOSED
        outcome(breaker)
        assert breaker.state is OPEN
        clock.advance(10)
        outcome(breaker)
        assert breaker.state is HALF_OPEN
        outcome(breaker)
        assert breaker.state is CLOSED
    breaker.reset()
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED  # below minimum_calls in a fresh window
    outcome(breaker, failed=True)
    assert breaker.state is OPEN
    assert reasons(logs) == [
        *["failure_rate", "reset_timeout", "probes_succeeded"] * 3,
        "failure_rate",
    ]


def test_the_window_restarts_on_every_state_change(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=4, minimum_calls=4)
    for _ in range(3):
        outcome(breaker, failed=True)
    breaker.open()
    breaker.close()
    # Three failures before the change are forgotten: three successes and one
    # failure are a 25% rate.
    for _ in range(3):
        outcome(breaker)
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED


def test_a_count_window_forgets_the_oldest_outcomes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        failure_rate=0.5, slow_call_duration=1.0, slow_call_rate=0.5, window=3, minimum_calls=3
    )
    outcome(breaker, failed=True, duration=1.0)  # failed and slow: both leave together
    outcome(breaker)
    outcome(breaker)
    outcome(breaker)
    outcome(breaker, duration=1.0)
    assert breaker.state is CLOSED  # one slow call in the last three
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED  # one failure and one slow call in the last three
    outcome(breaker, duration=1.0)
    assert breaker.state is OPEN  # two slow calls of three


def test_a_time_window_forgets_every_outcome_of_a_second_that_left(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        failure_rate=0.5,
        slow_call_duration=1.0,
        slow_call_rate=0.5,
        window_seconds=2,
        minimum_calls=3,
    )
    for _ in range(3):
        outcome(breaker)
    outcome(breaker, failed=True, duration=1.0)
    outcome(breaker, failed=True, duration=1.0)
    assert breaker.state is CLOSED  # 2 of 5 failed, 2 of 5 slow, all in one second
    clock.advance(2.0)
    outcome(breaker)
    outcome(breaker)
    outcome(breaker, failed=True, duration=1.0)
    assert breaker.state is CLOSED  # 1 of 3: the two earlier failures left together
    outcome(breaker, failed=True)
    assert breaker.state is OPEN  # 2 of 4: the five earlier calls left together


def test_a_time_window_forgets_a_second_that_left_it(clock: FakeClock, logs: list[Any]) -> None:
    breaker = CircuitBreaker(
        slow_call_duration=1.0, slow_call_rate=1.0, window_seconds=2, minimum_calls=2
    )
    outcome(breaker, duration=1.0)
    clock.advance(1.0)
    outcome(breaker)
    clock.advance(1.0)
    # The first slow call left the window; this one and the success are counted.
    outcome(breaker, duration=1.0)
    assert breaker.state is CLOSED
    outcome(breaker, duration=1.0)
    assert breaker.state is CLOSED  # two slow calls and a success
    clock.advance(1.0)
    outcome(breaker, duration=1.0)
    assert breaker.state is OPEN  # the success left: three slow calls of three
    assert reasons(logs) == ["slow_call_rate"]


def test_a_time_window_clears_a_reused_bucket_after_a_quiet_spell(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=3, minimum_calls=3)
    outcome(breaker, failed=True)
    clock.advance(1.0)
    outcome(breaker)
    clock.advance(1.0)
    outcome(breaker)
    assert breaker.state is CLOSED
    # A quiet spell longer than the window: every bucket is cleared once.
    clock.advance(10.0)
    outcome(breaker)
    outcome(breaker)
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED
    outcome(breaker, failed=True)
    assert breaker.state is OPEN  # 2 of 4, with nothing left from before the spell
    breaker.reset()
    outcome(breaker, failed=True)
    clock.advance(3.0)  # exactly one window later that second is gone
    outcome(breaker)
    outcome(breaker)
    outcome(breaker, failed=True)
    assert breaker.state is CLOSED
    outcome(breaker, failed=True)
    assert breaker.state is OPEN


def test_a_time_window_breaker_goes_through_half_open_back_to_closed(
    clock: FakeClock, logs: list[Any]
) -> None:
    breaker = CircuitBreaker(
        failure_rate=0.5,
        slow_call_duration=2.0,
        window_seconds=5,
        minimum_calls=2,
        reset_timeout=3,
        success_threshold=2,
    )
    outcome(breaker)
    outcome(breaker, failed=True)
    assert breaker.state is OPEN
    clock.advance(3)
    outcome(breaker)
    outcome(breaker)
    assert breaker.state is CLOSED
    outcome(breaker, duration=2.0)
    outcome(breaker, duration=2.0)
    assert breaker.state is OPEN
    clock.advance(3)
    outcome(breaker, duration=2.0)
    assert breaker.state is OPEN
    assert reasons(logs) == [
        "failure_rate",
        "reset_timeout",
        "probes_succeeded",
        "slow_call_rate",
        "reset_timeout",
        "probe_slow",
    ]


def test_a_failed_probe_opens_with_its_reason_even_when_slow(
    clock: FakeClock, logs: list[Any]
) -> None:
    breaker = CircuitBreaker(fail_max=1, slow_call_duration=1.0, reset_timeout=1)
    outcome(breaker, failed=True)
    clock.advance(1)
    outcome(breaker, failed=True, duration=5.0)
    assert reasons(logs) == ["fail_max", "reset_timeout", "probe_failed"]
    assert breaker.fail_counter == 2


def test_success_threshold_closes_at_exactly_the_threshold(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=3)
    outcome(breaker, failed=True)
    clock.advance(1)
    outcome(breaker)
    outcome(breaker)
    assert breaker.state is HALF_OPEN
    assert breaker.success_counter == 2
    outcome(breaker)
    assert breaker.state is CLOSED
    assert breaker.success_counter == 0


def test_from_pybreaker_closes_on_one_probe_without_success_threshold(clock: FakeClock) -> None:
    class OldPybreaker:
        fail_max = 1
        reset_timeout = 1
        excluded_exceptions = ()
        listeners = ()
        name = "old"

    breaker = CircuitBreaker.from_pybreaker(OldPybreaker())
    assert breaker.success_threshold == 1
    outcome(breaker, failed=True)
    clock.advance(1)
    outcome(breaker)
    assert breaker.state is CLOSED


# -- changes made by another thread between admit()'s look and its lock ----------------------


class RacingClock(FakeClock):
    """A fake clock that runs ``race`` (once) when reskit next reads the time.

    It stands for another thread that changes the breaker between the moment a
    caller read the state and the moment it took the lock.
    """

    race: Any = None
    skip = 0

    def now(self) -> float:
        if self.race is not None:
            if self.skip:
                self.skip -= 1
            else:
                race, self.race = self.race, None
                race()
        return super().now()


@pytest.fixture
def racing() -> Any:
    with RacingClock() as clock:
        yield clock


def half_opened(breaker: CircuitBreaker, clock: FakeClock) -> None:
    outcome(breaker, failed=True)
    clock.advance(breaker.reset_timeout)
    assert breaker.state is HALF_OPEN


@pytest.mark.parametrize("reset_timeout", [0.5, 30.0])
def test_a_breaker_reopened_meanwhile_rejects_the_would_be_probe(
    racing: RacingClock, reset_timeout: float
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=reset_timeout, name="raced")
    half_opened(breaker, racing)
    racing.race = breaker.open
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("p")
    assert info.value.retry_after == reset_timeout
    assert str(info.value) == "circuit breaker 'raced' is open"
    assert breaker.state is OPEN


def test_an_open_breaker_reopened_meanwhile_stays_open(racing: RacingClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.5, name="raced")
    outcome(breaker, failed=True)
    racing.advance(0.5)  # due to half-open, but nobody read the state yet
    racing.race, racing.skip = breaker.open, 1  # after admit()'s own look at the time
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("p")
    assert info.value.retry_after == 0.5


def test_a_breaker_forced_open_meanwhile_rejects_for_good(racing: RacingClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, name="raced")
    half_opened(breaker, racing)
    racing.race = breaker.force_open
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("p")
    assert info.value.retry_after is None
    assert "was forced open" in str(info.value)


def test_a_breaker_closed_meanwhile_admits_a_plain_call(racing: RacingClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1)
    half_opened(breaker, racing)
    racing.race = breaker.close
    permit = breaker.admit("p")
    breaker.record(permit, RuntimeError("down"), 0.0)
    assert breaker.state is OPEN  # counted as a closed-state failure: fail_max 1
    assert breaker.success_counter == 0


def test_listeners_get_the_states_as_objects_with_pybreaker_names(clock: FakeClock) -> None:
    seen: list[Any] = []

    class Listener:
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            seen.append((cb, old.name, old.state, new.name, new.state))

        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            seen.append((cb, func, args, kwargs))

    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, listeners=[Listener()])

    def target() -> None:
        pass

    permit = breaker.admit("p", None, target, (1,), {"k": 2})
    breaker.record(permit, RuntimeError("down"), 0.0)
    clock.advance(1)
    breaker.record(breaker.admit("p", None, target, (), {"k": 3}), None, 0.0)
    assert seen == [
        (breaker, target, (1,), {"k": 2}),
        (breaker, "closed", CLOSED, "open", OPEN),
        (breaker, "open", OPEN, "half-open", HALF_OPEN),
        (breaker, target, (), {"k": 3}),
        (breaker, "half-open", HALF_OPEN, "closed", CLOSED),
    ]


# -- an operator's forced state, and the fleet's state (a shared breaker) ---------------------

WHO = {"reason": "test", "actor": "tester"}


def test_an_operator_state_applied_again_undoes_a_local_reset(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    import uuid

    import reskit

    name = f"operated-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker(name=name)
    reskit.Policy("p", breaker=breaker)
    try:
        reskit.force_breaker(name, "closed", **WHO)
        assert breaker.state is DISABLED
        breaker.reset()  # a local change the operator did not make
        assert breaker.state is CLOSED
        reskit.force_breaker(name, "closed", **WHO)
        assert breaker.state is DISABLED
        reskit.force_breaker(name, "open", **WHO)
        breaker.reset()
        reskit.force_breaker(name, "open", **WHO)
        assert breaker.state is FORCED_OPEN
    finally:
        with caplog.at_level("ERROR", logger="reskit"):
            reskit.release_breaker(name, **WHO)
    assert breaker.state is CLOSED
    assert caplog.records == []  # releasing a breaker without a fleet reports nothing


# The store of a shared breaker tells it the fleet's state: (state, seconds of open left,
# the fleet's failure count). These tests play the store's part.


def test_the_fleet_opens_a_breaker_for_the_time_it_has_left(
    clock: FakeClock, logs: list[Any]
) -> None:
    breaker = CircuitBreaker(reset_timeout=60, name="fleet")
    breaker._follow(OPEN, 5.0, 7)
    assert breaker.state is OPEN
    assert breaker.fail_counter == 0  # the fleet's count is taken only while closed
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("p")
    assert info.value.retry_after == 5.0
    assert [(e["from_state"], e["to_state"], e["reason"]) for e in logs] == [
        ("closed", "open", "fleet")
    ]
    breaker._follow(OPEN, 0.5, 7)  # still open: only the time left changes
    assert rejection_after(breaker) == 0.5
    breaker._follow(OPEN, -3.0, 7)  # overdue: half-open now
    assert breaker.state is HALF_OPEN
    assert len(logs) == 2


def rejection_after(breaker: CircuitBreaker) -> float | None:
    with pytest.raises(CircuitOpen) as info:
        breaker.admit("p")
    return info.value.retry_after


def test_the_fleet_closes_a_breaker_and_sets_its_failure_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3, reset_timeout=60)
    breaker._follow(CLOSED, 0.0, 2)  # no transition, only the count
    assert (breaker.state, breaker.fail_counter) == (CLOSED, 2)
    outcome(breaker, failed=True)
    assert breaker.state is OPEN  # 2 from the fleet + 1 here
    breaker._follow(CLOSED, 0.0, 1)
    assert (breaker.state, breaker.fail_counter) == (CLOSED, 1)
    breaker._count_fleet_failures(2)
    assert breaker.fail_counter == 2
    breaker.open()
    breaker._count_fleet_failures(0)  # only while closed
    assert breaker.fail_counter == 2


def test_a_breaker_probing_here_is_not_reopened_by_an_overdue_fleet(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, success_threshold=2)
    half_opened(breaker, clock)
    probe = breaker.admit("p")
    breaker._follow(OPEN, 0.0, 1)
    assert breaker.state is HALF_OPEN
    breaker.record(probe, None, 0.0)  # still a probe of this half-open spell
    assert breaker.success_counter == 1
    breaker._follow(OPEN, -1.0, 1)
    assert breaker.state is HALF_OPEN
    breaker._follow(OPEN, 0.5, 1)  # the fleet reopened it: time left counts
    assert rejection_after(breaker) == 0.5


def test_a_closed_breaker_follows_an_overdue_open_fleet(clock: FakeClock) -> None:
    breaker = CircuitBreaker(reset_timeout=60)
    breaker._follow(OPEN, 0.0, 0)
    assert breaker.state is HALF_OPEN  # opened with nothing left: a probe may go


@pytest.mark.parametrize("operator", ["force_open", "disable"])
def test_an_operators_state_wins_over_the_fleet(clock: FakeClock, operator: str) -> None:
    breaker = CircuitBreaker()
    getattr(breaker, operator)()
    before = breaker.state
    for state in (OPEN, CLOSED, HALF_OPEN):
        breaker._follow(state, 5.0, 3)
        assert breaker.state is before
    assert breaker.fail_counter == 0


class FakeFleet:
    """Plays the store's link of a shared breaker: probe leases and reports."""

    def __init__(self, leases: list[str | None]) -> None:
        self.leases = leases
        self.calls: list[tuple[Any, ...]] = []

    def take_lease(self) -> str | None:
        return self.leases.pop(0)

    def report(self, kind: str) -> None:
        self.calls.append(("report", kind))

    def probe_done(self, lease: object, outcome: int, slow: bool) -> None:
        self.calls.append(("probe_done", lease, outcome, slow))


def test_a_shared_breaker_reports_to_the_fleet_and_probes_with_its_leases(
    clock: FakeClock,
) -> None:
    import uuid

    import reskit

    name = f"shared-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker(fail_max=2, reset_timeout=1, slow_call_duration=5.0, name=name)
    reskit.Policy("p", breaker=breaker)
    fleet = FakeFleet([None, "lease-1", "lease-2"])
    breaker._fleet = fleet  # what the Redis store links in
    outcome(breaker)  # a success with nothing to reset: nothing to say
    outcome(breaker, failed=True)
    outcome(breaker)
    outcome(breaker, failed=True)
    outcome(breaker, failed=True)
    assert fleet.calls == [
        ("report", "failed"),
        ("report", "succeeded"),
        ("report", "failed"),
        ("report", "opened"),
    ]
    fleet.calls.clear()
    clock.advance(1)
    with pytest.raises(CircuitOpen) as info:  # no lease from the fleet: no probe here
        breaker.admit("p")
    assert info.value.retry_after == 0.0
    outcome(breaker, duration=5.0)  # a probe with lease-1, slow: reopens
    assert breaker.state is OPEN
    clock.advance(1)
    outcome(breaker, failed=True)  # lease-2
    assert fleet.calls == [("probe_done", "lease-1", 0, True), ("probe_done", "lease-2", 1, False)]
    fleet.calls.clear()
    reskit.force_breaker(name, "open", **WHO)
    reskit.release_breaker(name, **WHO)
    assert fleet.calls == [("report", "reset")]


def test_a_closed_state_permit_shows_its_phase(clock: FakeClock) -> None:
    breaker = CircuitBreaker()
    permit = breaker.admit("p")
    assert repr(permit) == f"<breaker phase closed at {id(permit):#x}>"
    breaker.record(permit, None, 0.0)


def test_failure_and_success_listeners_get_the_breaker_and_are_isolated(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []

    class Listener:
        def failure(self, cb: Any, exc: BaseException | None) -> None:
            seen.append(("failure", cb, exc))
            raise RuntimeError("listener broke")

        def success(self, cb: Any) -> None:
            seen.append(("success", cb))
            raise RuntimeError("listener broke")

    breaker = CircuitBreaker(fail_max=3, listeners=[Listener()])
    error = RuntimeError("down")
    with caplog.at_level("ERROR", logger="reskit"):
        breaker.record(breaker.admit("p"), error, 0.0)
        breaker.record(breaker.admit("p"), None, 0.0)
    assert seen == [("failure", breaker, error), ("success", breaker)]
    assert "reskit: a circuit breaker listener's failure() raised" in caplog.text
    assert "reskit: a circuit breaker listener's success() raised" in caplog.text


def test_a_transition_is_logged_with_the_callers_correlation_id_or_a_new_one(
    clock: FakeClock, logs: list[Any]
) -> None:
    import re

    import reskit

    breaker = CircuitBreaker(fail_max=1)
    with reskit.bind_correlation_id("order-42"):
        outcome(breaker, failed=True)
    breaker.reset()
    assert logs[0]["correlation_id"] == "order-42"
    made = logs[1]["correlation_id"]
    assert re.fullmatch("[0-9a-f]{32}", made)

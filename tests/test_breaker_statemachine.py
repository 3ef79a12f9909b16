"""Property tests: the breaker against a small model, and against pybreaker.

``BreakerMachine`` runs random sequences of calls (held open or finished at
once), clock moves and manual operations, and checks the breaker against a
plain model of the rules after every step. ``test_consecutive_mode_matches_pybreaker``
replays random call sequences through a real ``pybreaker.CircuitBreaker`` and
through ours, with both reading the same fake time, and requires the same
decisions, counters and listener events.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import hypothesis.strategies as st
import pybreaker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from reskit._breaker import BreakerState, CircuitBreaker, _Phase
from reskit._errors import CircuitOpen
from reskit.testing import FakeClock

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
FORCED_OPEN = BreakerState.FORCED_OPEN
DISABLED = BreakerState.DISABLED


class Excluded(Exception):
    pass


OUTCOMES: dict[str, BaseException | None] = {
    "success": None,
    "failure": RuntimeError("down"),
    "excluded": Excluded("business error"),
    "cancelled": asyncio.CancelledError(),
    "interrupt": KeyboardInterrupt(),
}


@dataclass
class ModelPermit:
    generation: int
    probe: int | None  # the probe's number while half-open, else None
    disabled: bool = False


@dataclass
class Model:
    """The breaker's rules, written as plainly as possible."""

    fail_max: int
    reset_timeout: float
    success_threshold: int
    half_open_max_calls: int
    max_half_open_wait: float | None
    state: BreakerState = CLOSED
    fail_counter: int = 0
    success_counter: int = 0
    half_open_at: float = 0.0
    generation: int = 0
    probes: dict[int, float] = field(default_factory=dict)  # probe number -> start
    next_probe: int = 0

    def move(self, state: BreakerState, now: float) -> None:
        self.generation += 1
        self.probes = {}
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
            self.move(HALF_OPEN, now)
        return self.state

    def admit(self, now: float) -> ModelPermit | float | None:
        """A permit, or the rejection's retry_after (a float, or None if forced open)."""
        state = self.observe(now)
        if state is FORCED_OPEN:
            return None
        if state is OPEN:
            return self.half_open_at - now
        if state is HALF_OPEN:
            if self.max_half_open_wait is not None:
                self.probes = {
                    n: t for n, t in self.probes.items() if now - t < self.max_half_open_wait
                }
            if len(self.probes) >= self.half_open_max_calls:
                return 0.0
            self.next_probe += 1
            self.probes[self.next_probe] = now
            return ModelPermit(self.generation, self.next_probe)
        return ModelPermit(self.generation, None, disabled=state is DISABLED)

    def record(self, permit: ModelPermit, outcome: str, now: float) -> None:
        if permit.disabled:
            return
        kind = {"success": "ok", "excluded": "ok", "failure": "bad"}.get(outcome, "neither")
        if permit.probe is not None:
            live = self.probes.pop(permit.probe, None) is not None
            if not live or permit.generation != self.generation or kind == "neither":
                return
            if kind == "bad":
                self.fail_counter += 1
                self.move(OPEN, now)
            else:
                self.fail_counter = 0
                self.success_counter += 1
                if self.success_counter >= self.success_threshold:
                    self.move(CLOSED, now)
            return
        if permit.generation != self.generation or self.state is not CLOSED or kind == "neither":
            return
        if kind == "bad":
            self.fail_counter += 1
            if self.fail_counter >= self.fail_max:
                self.move(OPEN, now)
        else:
            self.fail_counter = 0


class BreakerMachine(RuleBasedStateMachine):
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.clock.install()
        self.transitions: list[tuple[str, str]] = []

    def teardown(self) -> None:
        self.clock.uninstall()

    @initialize(
        fail_max=st.integers(1, 4),
        reset_timeout=st.sampled_from([0.5, 1.0, 2.5, 60.0]),
        success_threshold=st.integers(1, 3),
        half_open_max_calls=st.integers(1, 3),
        max_half_open_wait=st.sampled_from([None, 1.0, 5.0]),
    )
    def build(
        self,
        fail_max: int,
        reset_timeout: float,
        success_threshold: int,
        half_open_max_calls: int,
        max_half_open_wait: float | None,
    ) -> None:
        machine = self

        class Listener:
            def state_change(self, cb: Any, old: Any, new: Any) -> None:
                machine.transitions.append((old.state.value, new.state.value))

        self.breaker = CircuitBreaker(
            fail_max,
            reset_timeout,
            exclude=[Excluded],
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            max_half_open_wait=max_half_open_wait,
            listeners=[Listener()],
        )
        self.model = Model(
            fail_max, reset_timeout, success_threshold, half_open_max_calls, max_half_open_wait
        )
        self.expected_transitions: list[tuple[str, str]] = []

    # Every model move that changes the state is a transition the breaker must announce.
    def _track(self) -> tuple[BreakerState, int]:
        return self.model.state, self.model.generation

    def _expect(self, before: tuple[BreakerState, int]) -> None:
        # A single step can cross two states (open -> half-open -> open) only via
        # admit + record; steps below call _expect around each model call.
        if self.model.state is not before[0]:
            self.expected_transitions.append((before[0].value, self.model.state.value))

    def _admit(self) -> tuple[Any, ModelPermit] | None:
        now = self.clock.now()
        before = self._track()
        expected = self.model.admit(now)
        self._expect(before)
        if isinstance(expected, ModelPermit):
            permit = self.breaker.admit("machine")
            return permit, expected
        with pytest.raises(CircuitOpen) as info:
            self.breaker.admit("machine")
        assert info.value.retry_after == expected
        assert info.value.policy == "machine"
        return None

    def _record(self, pair: tuple[Any, ModelPermit], outcome: str, duration: float) -> None:
        permit, model_permit = pair
        before = self._track()
        self.model.record(model_permit, outcome, self.clock.now())
        self._expect(before)
        self.breaker.record(permit, OUTCOMES[outcome], duration)

    @rule(outcome=st.sampled_from(sorted(OUTCOMES)), duration=st.sampled_from([0.0, 1e6]))
    def call(self, outcome: str, duration: float) -> None:
        pair = self._admit()
        if pair is not None:
            self._record(pair, outcome, duration)

    @rule(target=held)
    def start_call(self) -> tuple[Any, ModelPermit] | None:
        return self._admit()

    @rule(pair=consumes(held), outcome=st.sampled_from(sorted(OUTCOMES)))
    def finish_call(self, pair: tuple[Any, ModelPermit] | None, outcome: str) -> None:
        if pair is not None:
            self._record(pair, outcome, 0.0)

    @rule(seconds=st.sampled_from([0.001, 0.25, 0.5, 1.0, 2.5, 5.0, 60.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.model.state is OPEN)
    @rule(offset=st.sampled_from([-0.001, 0.0, 0.001]))
    def advance_to_the_reset_boundary(self, offset: float) -> None:
        target = self.model.half_open_at + offset
        now = self.clock.now()
        if target > now:
            self.clock.advance(target - now)

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
        before = self._track()
        self.model.move(target, self.clock.now())
        self._expect(before)
        getattr(self.breaker, op)()

    @invariant()
    def same_state_and_counters(self) -> None:
        if not hasattr(self, "breaker"):
            return
        before = self._track()
        expected = self.model.observe(self.clock.now())
        self._expect(before)
        assert self.breaker.state is expected
        assert self.breaker.fail_counter == self.model.fail_counter
        assert self.breaker.success_counter == self.model.success_counter
        assert self.transitions == self.expected_transitions


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_breaker_machine = BreakerMachine.TestCase


# -- pybreaker as an oracle ----------------------------------------------------------------

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


class Events(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.log.append(("before_call",))

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.log.append(("state_change", old_state.name, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.log.append(("failure", type(exc).__name__))

    def success(self, cb: Any) -> None:
        self.log.append(("success",))


# Steps are quarter seconds so that both float seconds (ours) and pybreaker's
# microsecond datetimes represent every instant exactly, boundaries included.
op_strategy = st.one_of(
    st.sampled_from(["success", "failure", "excluded"]),
    st.integers(1, 40).map(lambda quarters: quarters * 0.25),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fail_max=st.integers(1, 5),
    reset_quarters=st.integers(1, 40),
    success_threshold=st.integers(1, 3),
    ops=st.lists(op_strategy, max_size=80),
)
def test_consecutive_mode_matches_pybreaker(
    fail_max: int, reset_quarters: int, success_threshold: int, ops: list[str | float]
) -> None:
    reset_timeout = reset_quarters * 0.25
    with FakeClock(start=0.0) as clock:

        class FakeDatetime(datetime):
            """pybreaker reads ``datetime.now(UTC)``; give it our fake time."""

            @classmethod
            def now(cls, tz: Any = None) -> FakeDatetime:
                moment = EPOCH + timedelta(seconds=clock.now())
                return cls.fromtimestamp(moment.timestamp(), tz)

        theirs_events, ours_events = Events(), Events()
        theirs = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            exclude=[Excluded],
            listeners=[theirs_events],
        )
        ours = CircuitBreaker.from_pybreaker(theirs, listeners=[ours_events])

        def run_theirs(outcome: str) -> str:
            def target() -> None:
                exc = OUTCOMES[outcome]
                if exc is not None:
                    raise exc

            try:
                theirs.call(target)
            except pybreaker.CircuitBreakerError as exc:
                # pybreaker raises this both for a rejection and for the failure
                # that trips it; only the former skipped the call.
                return "rejected" if "still open" in str(exc) else "called"
            except Exception:
                return "called"
            return "called"

        def run_ours(outcome: str) -> str:
            try:
                permit = ours.admit("oracle")
            except CircuitOpen:
                return "rejected"
            ours.record(permit, OUTCOMES[outcome], 0.0)
            return "called"

        with mock.patch.object(pybreaker, "datetime", FakeDatetime):
            for step, op in enumerate(ops):
                if isinstance(op, float):
                    clock.advance(op)
                    continue
                assert run_ours(op) == run_theirs(op), (step, op)
                # pybreaker's current_state is the stored state: it turns
                # half-open only when a call arrives, so compare with ours
                # stored state (reading ours.state would move it early).
                stored = ours._phase
                assert isinstance(stored, _Phase)
                assert {"half_open": "half-open"}.get(
                    stored.state.value, stored.state.value
                ) == theirs.current_state, (step, op)
                assert ours.fail_counter == theirs.fail_counter, (step, op)
                assert ours.success_counter == theirs.success_counter, (step, op)
                assert ours_events.log == theirs_events.log, (step, op)

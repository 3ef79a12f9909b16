"""Kill switches, brownout levels and operator breaker states, on the memory store.

Every test starts on a fresh MemoryStore (conftest's autouse fixture). The
process-wide control view remembers every switch declared by any test (code
declares switches once, at import, and a new store must learn them), so each
test names its switches uniquely with the ``name`` fixture.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest

import reskit
from reskit import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    KillSwitch,
    KillSwitchOff,
    Policy,
    Shed,
)
from reskit._compose import Kind, source_for
from reskit._order import ORDER
from reskit._store import MAX_VALUE_BYTES, Snapshot, configure, current_store, parse_record
from reskit._switches import brownout_gate
from reskit.stores import MemoryStore
from reskit.testing import FakeClock, SpanCapture

WHO = {"reason": "incident 42", "actor": "alice"}
DAY = 86400.0

_ids = itertools.count()


@pytest.fixture
def name() -> str:
    """A switch name no other test uses."""
    return f"sw{next(_ids)}-{uuid.uuid4().hex[:8]}"


def other_name() -> str:
    return f"sw{next(_ids)}-{uuid.uuid4().hex[:8]}"


def ok() -> str:
    return "ran"


def audit_actions() -> list[tuple[str, str, str]]:
    return [(e.action, e.target, e.actor) for e in current_store().audit()]


# -- what kill_switch= accepts -------------------------------------------------------------


def test_kill_switch_given_as_a_name(name: str) -> None:
    policy = Policy("p", kill_switch=name)
    assert isinstance(policy.kill_switch, KillSwitch)
    assert policy.kill_switch.name == name
    assert policy.call(ok) == "ran"
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)


def test_kill_switch_true_is_named_after_the_policy(name: str) -> None:
    policy = Policy(name, kill_switch=True)
    assert policy.kill_switch is not None
    assert policy.kill_switch.name == name
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff) as info:
        policy.call(ok)
    assert info.value.policy == name


def test_kill_switch_object_is_used_as_given(name: str) -> None:
    switch = KillSwitch(name, owner="team-a")
    policy = Policy("p", kill_switch=switch)
    assert policy.kill_switch is switch
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)


@pytest.mark.parametrize("value", [False, None])
def test_kill_switch_false_or_none_means_no_switch(name: str, value: Any) -> None:
    policy = Policy(name, kill_switch=value)
    assert policy.kill_switch is None
    reskit.kill(name, **WHO)  # a switch named like the policy does not touch it
    assert policy.call(ok) == "ran"


def test_replace_keeps_or_changes_the_switch(name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=4)
    same = policy.replace(timeout=1.0)
    assert same.kill_switch is policy.kill_switch
    assert same.shed_at == 4
    assert policy.replace(kill_switch=False).kill_switch is None
    other = other_name()
    moved = policy.replace(kill_switch=other)
    reskit.kill(name, **WHO)
    assert moved.call(ok) == "ran"
    with pytest.raises(KillSwitchOff):
        same.call(ok)
    assert f"kill_switch=KillSwitch({name!r}, fail_mode='open')" in repr(policy)
    assert "shed_at=4" in repr(policy)


def test_policies_naming_the_same_switch_share_it(name: str) -> None:
    first = Policy("first", kill_switch=name)
    second = Policy("second", kill_switch=KillSwitch(name))
    unrelated = Policy("third", kill_switch=other_name())
    reskit.kill(name, **WHO)
    for policy in (first, second):
        with pytest.raises(KillSwitchOff):
            policy.call(ok)
    assert unrelated.call(ok) == "ran"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"kill_switch": 3}, TypeError, "KillSwitch, a switch name or True"),
        ({"kill_switch": ["x"]}, TypeError, "KillSwitch, a switch name or True"),
        ({"kill_switch": ""}, ValueError, "1 to 256 characters"),
        ({"kill_switch": "x" * 257}, ValueError, "1 to 256 characters"),
        ({"shed_at": 0}, TypeError, "from 1 to 100"),
        ({"shed_at": 101}, TypeError, "from 1 to 100"),
        ({"shed_at": 2.0}, TypeError, "whole number"),
        ({"shed_at": True}, TypeError, "whole number"),
        ({"shed_at": "2"}, TypeError, "whole number"),
    ],
)
def test_invalid_policy_switch_settings(kwargs: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        Policy("p", **kwargs)


def test_kill_switch_true_needs_a_policy_name() -> None:
    with pytest.raises(TypeError, match="give the policy a name or pass kill_switch="):
        Policy(kill_switch=True)


def test_order_table_puts_switch_and_shed_right_inside_the_fallback() -> None:
    keywords = [row.keyword for row in ORDER]
    assert keywords[:4] == ["fallback", "kill_switch", "shed_at", "bulkhead"]


def test_the_engine_inlines_flag_gates(name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=3)
    for kind in Kind:
        source = source_for(policy, kind)
        assert "if f0.up:" in source
        assert "if f1.up:" in source
        # Flag gates keep no permit: nothing to record.
        assert "g0_record" not in source
        assert "g1_record" not in source


def test_the_flag_is_up_exactly_while_killed(name: str) -> None:
    switch = KillSwitch(name)
    assert switch.flag.up is False
    reskit.kill(name, **WHO)
    assert switch.flag.up is True
    assert switch.killed is True
    reskit.revive(name, **WHO)
    assert switch.flag.up is False
    assert switch.killed is False


# -- kill and revive -----------------------------------------------------------------------


def test_kill_rejects_without_running_and_revive_restores(name: str) -> None:
    ran = []

    def fn(x: int) -> int:
        ran.append(x)
        return x * 2

    policy = Policy("payments", kill_switch=name)
    assert policy.call(fn, 1) == 2
    reskit.kill(name, reason="card processor down", actor="bob")
    assert reskit.is_killed(name) is True
    with pytest.raises(KillSwitchOff) as info:
        policy.call(fn, 2)
    assert ran == [1]
    exc = info.value
    assert exc.policy == "payments"
    assert str(exc) == f"kill switch {name!r} is off (card processor down, by bob)"
    assert exc.retry_after is None  # no ttl: nobody knows when
    assert exc.rejected_by == "kill_switch"
    reskit.revive(name, reason="processor back", actor="bob")
    assert reskit.is_killed(name) is False
    assert policy.call(fn, 3) == 6
    assert ran == [1, 3]


def test_killing_again_records_the_new_reason(name: str) -> None:
    policy = Policy("p", kill_switch=name)
    reskit.kill(name, reason="first", actor="a")
    reskit.kill(name, reason="second", actor="b")
    with pytest.raises(KillSwitchOff, match=r"\(second, by b\)"):
        policy.call(ok)
    assert [e.action for e in current_store().audit()] == ["kill", "kill"]


def test_killed_switch_rejects_before_retry_and_is_never_retried(name: str) -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        raise ConnectionError

    policy = Policy(
        "p", kill_switch=name, retry=reskit.Retry(attempts=5, on=ConnectionError, wait=0)
    )
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(fn)
    assert calls == []
    assert policy.statistics.attempts == 0
    assert policy.statistics.retries == 0


def test_kill_switch_wins_over_brownout(name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=1)
    reskit.set_brownout_level(5, **WHO)
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)
    reskit.revive(name, **WHO)
    with pytest.raises(Shed):
        policy.call(ok)


def test_fallback_answers_a_killed_call_and_sees_the_error(name: str) -> None:
    seen: list[BaseException] = []

    def fb(exc: Exception) -> str:
        seen.append(exc)
        return "fallback"

    policy = Policy("p", kill_switch=name, fallback=fb)
    assert policy.call(ok) == "ran"
    assert seen == []
    reskit.kill(name, reason="r1", actor="a1")
    assert policy.call(ok) == "fallback"
    assert len(seen) == 1
    assert isinstance(seen[0], KillSwitchOff)
    assert "(r1, by a1)" in str(seen[0])
    stats = policy.statistics
    assert stats.fallbacks == 1
    assert dict(stats.rejections) == {"kill_switch": 1}


def test_fallback_answers_a_shed_call_and_sees_the_error() -> None:
    seen: list[BaseException] = []
    policy = Policy("p", shed_at=2, fallback=lambda exc: seen.append(exc) or "degraded")
    reskit.set_brownout_level(2, **WHO)
    assert policy.call(ok) == "degraded"
    assert len(seen) == 1
    assert isinstance(seen[0], Shed)
    assert "shed_at=2" in str(seen[0])


# -- every kind of call ----------------------------------------------------------------------


async def test_coroutines_through_acall_and_decorated(name: str) -> None:
    ran = []

    async def work(x: int) -> int:
        ran.append(x)
        await asyncio.sleep(0)
        return x

    policy = Policy("p", kill_switch=name)
    decorated = policy(work)
    assert await policy.acall(work, 1) == 1
    assert await decorated(2) == 2
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        await policy.acall(work, 3)
    with pytest.raises(KillSwitchOff):
        await decorated(4)
    assert ran == [1, 2]
    reskit.revive(name, **WHO)
    assert await decorated(5) == 5
    assert ran == [1, 2, 5]


async def test_async_fallback_answers_a_killed_coroutine(name: str) -> None:
    async def fb(exc: Exception) -> str:
        return f"fb:{type(exc).__name__}"

    @Policy("p", kill_switch=name, fallback=fb)
    async def work() -> str:
        return "ran"

    reskit.kill(name, **WHO)
    assert await work() == "fb:KillSwitchOff"


def test_generator_is_rejected_before_its_first_item(name: str) -> None:
    started = []

    def numbers() -> Iterator[int]:
        started.append(True)
        yield 1
        yield 2

    policy = Policy("p", kill_switch=name)
    decorated = policy(numbers)
    reskit.kill(name, **WHO)
    stream = policy.call(numbers)
    with pytest.raises(KillSwitchOff):
        next(stream)
    with pytest.raises(KillSwitchOff):
        list(decorated())
    assert started == []
    reskit.revive(name, **WHO)
    assert list(decorated()) == [1, 2]
    assert started == [True]


def test_a_stream_admitted_before_the_kill_runs_to_its_end(name: str) -> None:
    @Policy("p", kill_switch=name)
    def numbers() -> Iterator[int]:
        yield 1
        yield 2
        yield 3

    stream = numbers()
    assert next(stream) == 1
    reskit.kill(name, **WHO)
    assert list(stream) == [2, 3]


def test_fallback_replaces_a_killed_generator(name: str) -> None:
    @Policy("p", kill_switch=name, fallback=lambda exc: ["fb", type(exc).__name__])
    def numbers() -> Iterator[str]:
        yield "real"

    reskit.kill(name, **WHO)
    assert list(numbers()) == ["fb", "KillSwitchOff"]


async def test_async_generator_is_rejected_before_its_first_item(name: str) -> None:
    started = []

    async def numbers() -> AsyncIterator[int]:
        started.append(True)
        yield 1
        yield 2

    policy = Policy("p", kill_switch=name)
    decorated = policy(numbers)
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        await decorated().__anext__()
    with pytest.raises(KillSwitchOff):
        async for _ in policy.call(numbers):
            pass
    assert started == []
    reskit.revive(name, **WHO)
    assert [item async for item in decorated()] == [1, 2]
    assert started == [True]


async def test_async_generator_shed_by_brownout() -> None:
    @Policy("p", shed_at=4)
    async def numbers() -> AsyncIterator[int]:
        yield 1

    reskit.set_brownout_level(4, **WHO)
    with pytest.raises(Shed):
        async for _ in numbers():
            pass
    reskit.set_brownout_level(3, **WHO)
    assert [item async for item in numbers()] == [1]


def test_admit_raises_on_entry_while_killed(name: str) -> None:
    policy = Policy("p", kill_switch=name)
    entered = []
    with policy.admit():
        entered.append(1)
    reskit.kill(name, reason="r", actor="a")
    with pytest.raises(KillSwitchOff, match=r"\(r, by a\)"), policy.admit():
        entered.append(2)
    assert entered == [1]
    stats = policy.statistics
    assert stats.calls == 2
    assert dict(stats.rejections) == {"kill_switch": 1}
    reskit.revive(name, **WHO)
    with policy.admit():
        entered.append(3)
    assert entered == [1, 3]


async def test_async_admit_raises_on_entry(name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=2)
    entered = []
    async with policy.admit():
        entered.append(1)
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        async with policy.admit():
            entered.append(2)
    reskit.revive(name, **WHO)
    reskit.set_brownout_level(2, **WHO)
    with pytest.raises(Shed):
        async with policy.admit():
            entered.append(3)
    assert entered == [1]


def test_admit_key_is_the_tenant_for_the_brownout() -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(3, tenant="acme", **WHO)
    with pytest.raises(Shed), policy.admit("acme"):
        pass
    with policy.admit("other"):
        pass
    # The key wins over the tenant bound to the context.
    with reskit.bind_tenant("acme"), policy.admit("other"):
        pass
    with reskit.bind_tenant("other"), pytest.raises(Shed), policy.admit("acme"):
        pass
    # With no key, the bound tenant applies.
    with reskit.bind_tenant("acme"), pytest.raises(Shed), policy.admit():
        pass


def test_kill_switch_decorator_stacks_with_others(name: str) -> None:
    calls = []

    @reskit.fallback(lambda exc: f"fb:{type(exc).__name__}")
    @reskit.kill_switch(name)
    @reskit.retry(attempts=3, on=ConnectionError, wait=0)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionError
        return "ok"

    assert flaky() == "ok"
    assert calls == [1, 1]
    reskit.kill(name, **WHO)
    assert flaky() == "fb:KillSwitchOff"
    assert calls == [1, 1]
    reskit.revive(name, **WHO)
    calls.clear()
    assert flaky() == "ok"


def test_kill_switch_decorator_names_policy_after_the_function(name: str) -> None:
    @reskit.kill_switch(name, owner="team-x", description="turns it off")
    def charge() -> str:
        return "charged"

    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff) as info:
        charge()
    assert info.value.policy is not None
    assert info.value.policy.endswith("charge")
    [info_row] = [s for s in reskit.switches() if s.name == name]
    assert (info_row.owner, info_row.description) == ("team-x", "turns it off")


# -- ttl -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [60, 60.0, timedelta(minutes=1)])
def test_ttl_revives_by_itself(clock: FakeClock, name: str, ttl: Any) -> None:
    policy = Policy("p", kill_switch=name)
    entry = reskit.kill(name, ttl=ttl, **WHO)
    assert entry.after["until"] == clock.wall() + 60
    clock.advance(59.999)
    with pytest.raises(KillSwitchOff) as info:
        policy.call(ok)
    assert info.value.retry_after == pytest.approx(0.001, abs=1e-5)
    assert reskit.is_killed(name) is True
    clock.advance(0.002)
    assert policy.call(ok) == "ran"
    assert reskit.is_killed(name) is False
    assert policy.call(ok) == "ran"
    revives = [e for e in current_store().audit() if e.action == "revive"]
    assert len(revives) == 1
    [revive] = revives
    assert revive.actor == "reskit"
    assert revive.target == f"switch:{name}"
    assert revive.before["killed"] is True
    assert revive.after["killed"] is False
    assert revive.after["last_killed"] == entry.after["last_killed"]
    assert current_store().verify_audit().ok


def test_ttl_revive_noticed_by_is_killed_is_audited_once(clock: FakeClock, name: str) -> None:
    reskit.kill(name, ttl=5, **WHO)
    clock.advance(5)
    assert reskit.is_killed(name) is False
    assert reskit.is_killed(name) is False
    [_] = [s for s in reskit.switches() if s.name == name]
    assert [a for a, _, _ in audit_actions()] == ["kill", "revive"]


class RacingStore(MemoryStore):
    """Holds every ttl revive at the door until ``parties`` callers are all there.

    So every caller has read the killed record before any of them writes: the
    race the store's compare-and-set must settle.
    """

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.door = threading.Barrier(parties)
        self.attempts = 0

    def change(self, key: str, after: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "revive" and kwargs.get("actor") == "reskit":
            self.attempts += 1
            self.door.wait(timeout=30)  # a deadlock guard only: all parties arrive at once
        return super().change(key, after, **kwargs)


def test_the_store_writes_one_ttl_revive_when_many_callers_race(
    clock: FakeClock, name: str
) -> None:
    """Many writers (as many processes would be) revive the same expired kill at once."""
    threads_n = 32
    store = configure(RacingStore(threads_n))
    assert isinstance(store, RacingStore)
    reskit.kill(name, ttl=10, **WHO)
    clock.advance(10.5)
    record = store.snapshot().switch(name)
    assert record is not None
    start = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            store.revive_expired(name, record)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.attempts == threads_n  # every caller tried to revive it...
    entries = store.audit()
    # ...and exactly one revive was written.
    assert [(e.action, e.actor) for e in entries] == [("kill", "alice"), ("revive", "reskit")]
    assert store.verify_audit().ok
    assert reskit.is_killed(name) is False


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def change(self, key: str, after: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "revive" and kwargs.get("actor") == "reskit":
            self.attempts += 1
        return super().change(key, after, **kwargs)


def test_a_process_asks_its_store_once_when_many_threads_notice_an_expired_kill(
    clock: FakeClock, name: str
) -> None:
    threads_n = 32
    store = configure(CountingStore())
    assert isinstance(store, CountingStore)
    policy = Policy("p", kill_switch=name)
    reskit.kill(name, ttl=10, **WHO)
    clock.advance(10.5)
    start = threading.Barrier(threads_n)
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        start.wait()
        try:
            # Half notice it by calling, half by asking.
            result = policy.call(ok) if i % 2 else str(reskit.is_killed(name))
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == ["False"] * (threads_n // 2) + ["ran"] * (threads_n // 2)
    assert store.attempts == 1
    entries = store.audit()
    assert [(e.action, e.actor) for e in entries] == [("kill", "alice"), ("revive", "reskit")]
    assert store.verify_audit().ok


class DoorStore(MemoryStore):
    """Stops the ttl revive at the door until the test lets it in."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.go = threading.Event()

    def change(self, key: str, after: Any, **kwargs: Any) -> Any:
        if kwargs.get("actor") == "reskit":
            self.arrived.set()
            self.go.wait(timeout=30)  # a deadlock guard only: the test sets it
        return super().change(key, after, **kwargs)


def test_a_ttl_revive_racing_a_new_kill_leaves_the_new_kill(clock: FakeClock, name: str) -> None:
    store = configure(DoorStore())
    assert isinstance(store, DoorStore)
    policy = Policy("p", kill_switch=name)
    reskit.kill(name, ttl=5, reason="first", actor="a")
    clock.advance(6)
    outcome: list[object] = []
    noticer = threading.Thread(target=lambda: outcome.append(policy.call(ok)))
    noticer.start()
    assert store.arrived.wait(30)  # it saw the expired kill and is about to revive it
    reskit.kill(name, reason="second", actor="b")  # an operator kills it again meanwhile
    store.go.set()
    noticer.join()
    assert outcome == ["ran"]  # the call that noticed the expiry was admitted
    assert [(e.action, e.reason) for e in store.audit()] == [("kill", "first"), ("kill", "second")]
    assert reskit.is_killed(name) is True
    with pytest.raises(KillSwitchOff, match=r"\(second, by b\)"):
        policy.call(ok)


@pytest.mark.parametrize("ttl", [0, -1, 0.0, timedelta(0), timedelta(seconds=-3)])
def test_ttl_must_be_positive(name: str, ttl: Any) -> None:
    with pytest.raises(ValueError, match="positive"):
        reskit.kill(name, ttl=ttl, **WHO)
    assert current_store().audit() == []


@pytest.mark.parametrize("ttl", ["10", True, [1]])
def test_ttl_must_be_a_duration(name: str, ttl: Any) -> None:
    with pytest.raises(TypeError, match="number of seconds or a timedelta"):
        reskit.kill(name, ttl=ttl, **WHO)
    assert current_store().audit() == []


@pytest.mark.parametrize("ttl", [float("nan"), float("inf")])
def test_ttl_must_be_finite(name: str, ttl: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        reskit.kill(name, ttl=ttl, **WHO)


# -- brownout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "shed"), [(0, False), (1, False), (2, True), (3, True)])
def test_shed_at_two(level: int, shed: bool) -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(level, **WHO)
    assert reskit.brownout_level() == level
    if shed:
        with pytest.raises(Shed) as info:
            policy.call(ok)
        assert info.value.policy == "p"
        assert info.value.rejected_by == "brownout"
    else:
        assert policy.call(ok) == "ran"


def test_brownout_flag_follows_the_highest_level_anywhere() -> None:
    flag = brownout_gate(7).flag
    assert flag.up is False
    reskit.set_brownout_level(6, **WHO)
    assert flag.up is False
    reskit.set_brownout_level(7, tenant="t1", **WHO)
    assert flag.up is True
    reskit.set_brownout_level(None, tenant="t1", **WHO)
    assert flag.up is False


def test_tenant_override_higher_than_global() -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(1, **WHO)
    reskit.set_brownout_level(3, tenant="acme", **WHO)
    assert reskit.brownout_level("acme") == 3
    assert reskit.brownout_level("other") == 1
    assert reskit.brownout_level() == 1
    assert policy.call(ok) == "ran"
    with reskit.bind_tenant("acme") as bound:
        assert bound == "acme"
        assert reskit.current_tenant() == "acme"
        with pytest.raises(Shed):
            policy.call(ok)
    assert reskit.current_tenant() is None
    with reskit.bind_tenant("other"):
        assert policy.call(ok) == "ran"


def test_tenant_override_lower_than_global() -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(5, **WHO)
    reskit.set_brownout_level(0, tenant="vip", **WHO)
    with pytest.raises(Shed):
        policy.call(ok)
    with reskit.bind_tenant("vip"):
        assert policy.call(ok) == "ran"
    with reskit.bind_tenant("other"), pytest.raises(Shed):
        policy.call(ok)


def test_none_removes_a_tenant_override() -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(0, **WHO)
    reskit.set_brownout_level(4, tenant="acme", **WHO)
    with reskit.bind_tenant("acme"), pytest.raises(Shed):
        policy.call(ok)
    entry = reskit.set_brownout_level(None, tenant="acme", **WHO)
    assert entry.after is None
    assert entry.before is not None
    assert entry.before["level"] == 4
    assert reskit.brownout_level("acme") == 0
    with reskit.bind_tenant("acme"):
        assert policy.call(ok) == "ran"
    # And the tenant follows the global level again.
    reskit.set_brownout_level(2, **WHO)
    with reskit.bind_tenant("acme"), pytest.raises(Shed):
        policy.call(ok)


async def test_tenant_binding_is_per_task() -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(2, tenant="acme", **WHO)

    async def work() -> str:
        return "ran"

    async def as_tenant(tenant: str) -> str:
        with reskit.bind_tenant(tenant):
            await asyncio.sleep(0)
            try:
                return await policy.acall(work)
            except Shed:
                return "shed"

    assert await asyncio.gather(as_tenant("acme"), as_tenant("b"), as_tenant("acme")) == [
        "shed",
        "ran",
        "shed",
    ]


def test_binding_no_tenant_inside_a_tenant_uses_the_global_level() -> None:
    policy = Policy("p", shed_at=2)
    reskit.set_brownout_level(2, tenant="acme", **WHO)
    with reskit.bind_tenant("acme"):
        with reskit.bind_tenant(None):
            assert reskit.current_tenant() is None
            assert policy.call(ok) == "ran"
        assert reskit.current_tenant() == "acme"
        with pytest.raises(Shed):
            policy.call(ok)


@pytest.mark.parametrize("level", [-1, 101, 2.0, True, "3", None])
def test_invalid_brownout_level(level: Any) -> None:
    with pytest.raises(ValueError, match=r"whole number from 0 to 100|pass tenant="):
        reskit.set_brownout_level(level, **WHO)
    assert current_store().audit() == []


@pytest.mark.parametrize("tenant", ["", "t" * 257, 5])
def test_invalid_tenant(tenant: Any) -> None:
    with pytest.raises(ValueError, match="tenant must be a string of 1 to 256 characters"):
        reskit.set_brownout_level(1, tenant=tenant, **WHO)
    with (
        pytest.raises(ValueError, match="tenant must be a string of 1 to 256 characters"),
        reskit.bind_tenant(tenant),
    ):
        pass
    assert current_store().audit() == []


def test_odd_tenant_and_switch_names_are_plain_text() -> None:
    odd = "a:b*{c}\nd"
    reskit.set_brownout_level(9, tenant=odd, **WHO)
    assert reskit.brownout_level(odd) == 9
    assert reskit.brownout_level("a") == 0
    policy = Policy("p", kill_switch=odd)
    reskit.kill(odd, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "message"),
    [
        ({"reason": "", "actor": "a"}, "reason= must be a non-empty string"),
        ({"reason": "   ", "actor": "a"}, "reason= must be a non-empty string"),
        ({"reason": None, "actor": "a"}, "reason= must be a non-empty string"),
        ({"reason": 3, "actor": "a"}, "reason= must be a non-empty string"),
        ({"reason": "x" * 4097, "actor": "a"}, "reason= is 4097 bytes in UTF-8; the most is 4096"),
        ({"reason": "é" * 2049, "actor": "a"}, "reason= is 4098 bytes in UTF-8; the most is 4096"),
        ({"reason": "r", "actor": ""}, "actor= must be a non-empty string"),
        ({"reason": "r", "actor": "\t\n"}, "actor= must be a non-empty string"),
        ({"reason": "r", "actor": None}, "actor= must be a non-empty string"),
        ({"reason": "r", "actor": "y" * 4097}, "actor= is 4097 bytes in UTF-8; the most is 4096"),
    ],
)
def test_reason_and_actor_are_required_text(name: str, who: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reskit.kill(name, **who)
    with pytest.raises(ValueError, match=message):
        reskit.revive(name, **who)
    with pytest.raises(ValueError, match=message):
        reskit.set_brownout_level(1, **who)
    with pytest.raises(ValueError, match=message):
        reskit.force_breaker(name, "open", **who)
    with pytest.raises(ValueError, match=message):
        reskit.release_breaker(name, **who)
    assert current_store().audit() == []
    assert current_store().snapshot().records == {}


def test_reason_and_actor_at_the_limit_are_accepted(name: str) -> None:
    entry = reskit.kill(name, reason="r" * 4096, actor="a" * 4096)
    assert len(entry.reason) == 4096


@pytest.mark.parametrize("bad", ["", "n" * 257, None, 7])
def test_invalid_switch_and_breaker_names(bad: Any) -> None:
    for call in (
        lambda: reskit.kill(bad, **WHO),
        lambda: reskit.revive(bad, **WHO),
        lambda: KillSwitch(bad),
    ):
        with pytest.raises(ValueError, match="kill switch name must be a string of 1 to 256"):
            call()
    for call in (
        lambda: reskit.force_breaker(bad, "open", **WHO),
        lambda: reskit.release_breaker(bad, **WHO),
    ):
        with pytest.raises(ValueError, match="breaker name must be a string of 1 to 256"):
            call()
    assert current_store().audit() == []


def test_name_of_256_characters_is_accepted() -> None:
    long = "k" * 256
    policy = Policy("p", kill_switch=long)
    reskit.kill(long, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"owner": 3}, TypeError, "owner= must be a string"),
        ({"description": b"x"}, TypeError, "description= must be a string"),
        ({"fail_mode": "maybe"}, ValueError, "fail_mode= must be 'open'"),
        ({"fail_mode": "OPEN"}, ValueError, "fail_mode= must be 'open'"),
    ],
)
def test_invalid_kill_switch_settings(
    name: str, kwargs: dict[str, Any], error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        KillSwitch(name, **kwargs)


def test_force_breaker_state_must_be_open_or_closed(name: str) -> None:
    with pytest.raises(ValueError, match="state= must be 'open' or 'closed', got 'half'"):
        reskit.force_breaker(name, "half", **WHO)
    assert current_store().audit() == []


def test_level_none_needs_a_tenant() -> None:
    with pytest.raises(ValueError, match="pass tenant="):
        reskit.set_brownout_level(None, **WHO)


@pytest.mark.parametrize("stale", [0, -5, "90d"])
def test_invalid_stale(stale: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="switches\\(\\) stale must be"):
        reskit.switches(stale=stale)


# -- declarations --------------------------------------------------------------------------


def test_declaring_twice_with_different_settings_is_refused(name: str) -> None:
    KillSwitch(name, owner="team-a", fail_mode="closed")
    with pytest.raises(ValueError, match="declared twice with different settings") as info:
        KillSwitch(name, owner="team-b", fail_mode="closed")
    assert "pass the KillSwitch object (or its name)" in str(info.value)
    with pytest.raises(ValueError, match="declared twice"):
        KillSwitch(name, owner="team-a", fail_mode="open")
    with pytest.raises(ValueError, match="declared twice"):
        KillSwitch(name, owner="team-a", description="now with words", fail_mode="closed")
    described = other_name()
    KillSwitch(described, description="stops charging")
    with pytest.raises(ValueError, match="declared twice"):
        KillSwitch(described, description="stops shipping")


def test_declaring_twice_alike_and_by_name_is_fine(name: str) -> None:
    first = KillSwitch(name, owner="team-a")
    second = KillSwitch(name, owner="team-a")
    assert first == second
    assert hash(first) == hash(second)
    bare = Policy("p", kill_switch=name)  # the bare name adopts the declaration
    assert bare.kill_switch is not None
    assert bare.kill_switch.flag is first.flag
    [info] = [s for s in reskit.switches() if s.name == name]
    assert info.owner == "team-a"


def test_bare_name_first_then_declaration_is_fine(name: str) -> None:
    bare = KillSwitch(name)
    declared = KillSwitch(name, fail_mode="closed", owner="o")
    assert bare.flag is declared.flag
    [info] = [s for s in reskit.switches() if s.name == name]
    assert (info.owner, info.fail_mode) == ("o", "closed")


def test_bare_switch_reports_the_declaration_it_adopts(name: str) -> None:
    KillSwitch(name, owner="team-a", fail_mode="closed")
    bare = KillSwitch(name)
    assert bare.fail_mode == "closed"
    assert "fail_mode='closed'" in repr(Policy("p", kill_switch=bare))


# -- fail mode while the store's state is unknown ----------------------------------------------


class UnknownStore(MemoryStore):
    """A store that has not reached its backend yet."""

    def __init__(self) -> None:
        super().__init__()
        self.known = False

    def learn(self) -> None:
        self.known = True
        self._publish(self.snapshot())


@pytest.mark.parametrize("declare_first", [True, False])
def test_fail_closed_rejects_until_the_state_is_known(name: str, declare_first: bool) -> None:
    open_name = other_name()
    if declare_first:
        closed = Policy("closed", kill_switch=KillSwitch(name, fail_mode="closed"))
        opened = Policy("open", kill_switch=KillSwitch(open_name, fail_mode="open"))
    store = configure(UnknownStore())
    if not declare_first:
        closed = Policy("closed", kill_switch=KillSwitch(name, fail_mode="closed"))
        opened = Policy("open", kill_switch=KillSwitch(open_name, fail_mode="open"))
    assert isinstance(store, UnknownStore)
    with pytest.raises(KillSwitchOff, match="fails closed and its state is unknown") as info:
        closed.call(ok)
    assert info.value.policy == "closed"
    assert reskit.is_killed(name) is True
    assert opened.call(ok) == "ran"
    assert reskit.is_killed(open_name) is False
    store.learn()
    assert closed.call(ok) == "ran"
    assert reskit.is_killed(name) is False
    assert dict(closed.statistics.rejections) == {"kill_switch": 1}


def test_fail_closed_switch_killed_in_unknown_store_says_why(name: str) -> None:
    policy = Policy("p", kill_switch=KillSwitch(name, fail_mode="closed"))
    store = configure(UnknownStore())
    assert isinstance(store, UnknownStore)
    store.learn()
    reskit.kill(name, reason="known kill", actor="a")
    with pytest.raises(KillSwitchOff, match="known kill"):
        policy.call(ok)


# -- the registry ------------------------------------------------------------------------------


def test_switches_lists_declared_and_flipped(clock: FakeClock, name: str) -> None:
    flipped = other_name()
    declared_at = clock.wall()
    KillSwitch(name, owner="team-a", description="stops charging", fail_mode="closed")
    clock.advance(30)
    killed_at = clock.wall()
    reskit.kill(flipped, reason="why", actor="bob", ttl=600)
    clock.advance(10)
    infos = {s.name: s for s in reskit.switches() if s.name in {name, flipped}}
    assert set(infos) == {name, flipped}
    d = infos[name]
    assert d.as_dict() == {
        "name": name,
        "killed": False,
        "owner": "team-a",
        "description": "stops charging",
        "fail_mode": "closed",
        "reason": None,
        "actor": None,
        "last_flipped": None,
        "last_exercised": None,
        "until": None,
        "last_declared": declared_at,
    }
    f = infos[flipped]
    assert f.as_dict() == {
        "name": flipped,
        "killed": True,
        "owner": None,
        "description": None,
        "fail_mode": "open",
        "reason": "why",
        "actor": "bob",
        "last_flipped": killed_at,
        "last_exercised": killed_at,
        "until": killed_at + 600,
        "last_declared": None,
    }
    clock.advance(5)
    revived_at = clock.wall()
    reskit.revive(flipped, reason="fixed", actor="carol")
    [f] = [s for s in reskit.switches() if s.name == flipped]
    assert (f.killed, f.reason, f.actor) == (False, "fixed", "carol")
    assert f.last_flipped == revived_at
    assert f.last_exercised == killed_at
    assert f.until is None


def test_switches_are_sorted_by_name() -> None:
    names = [f"zz-sorted-{uuid.uuid4().hex[:6]}-{c}" for c in "cab"]
    for n in names:
        reskit.kill(n, **WHO)
    listed = [s.name for s in reskit.switches() if s.name in names]
    assert listed == sorted(names)


@pytest.mark.parametrize("stale", [90 * DAY, timedelta(days=90)])
def test_stale_switches_are_those_not_killed_within(
    clock: FakeClock, name: str, stale: Any
) -> None:
    never, long_ago, recent, revived_recently = (other_name() for _ in range(4))
    KillSwitch(never, owner="o")
    reskit.kill(long_ago, **WHO)
    reskit.revive(long_ago, **WHO)
    clock.advance(91 * DAY)
    reskit.kill(revived_recently, **WHO)
    clock.advance(DAY)
    reskit.revive(revived_recently, **WHO)  # revived, but exercised a day ago
    reskit.kill(recent, **WHO)
    mine = {never, long_ago, recent, revived_recently}
    listed = {s.name for s in reskit.switches(stale=stale) if s.name in mine}
    assert listed == {never, long_ago}
    assert {s.name for s in reskit.switches() if s.name in mine} == mine


def test_stale_boundary(clock: FakeClock, name: str) -> None:
    reskit.kill(name, **WHO)
    clock.advance(90 * DAY - 1)
    assert name not in {s.name for s in reskit.switches(stale=90 * DAY)}
    clock.advance(1)
    assert name in {s.name for s in reskit.switches(stale=90 * DAY)}


def test_switches_notices_an_expired_ttl(clock: FakeClock, name: str) -> None:
    reskit.kill(name, ttl=1, **WHO)
    clock.advance(2)
    [info] = [s for s in reskit.switches() if s.name == name]
    assert info.killed is False
    assert info.until is None
    assert [a for a, _, _ in audit_actions()] == ["kill", "revive"]


# -- statistics and spans ----------------------------------------------------------------------


def test_statistics_count_rejections_by_gate(name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=3)
    assert policy.call(ok) == "ran"
    reskit.kill(name, **WHO)
    for _ in range(3):
        with pytest.raises(KillSwitchOff):
            policy.call(ok)
    reskit.revive(name, **WHO)
    reskit.set_brownout_level(3, **WHO)
    for _ in range(2):
        with pytest.raises(Shed):
            policy.call(ok)
    stats = policy.statistics
    assert stats.calls == 6
    assert stats.attempts == 1
    assert stats.failures == 0
    assert stats.fallbacks == 0
    assert dict(stats.rejections) == {"kill_switch": 3, "brownout": 2}
    assert stats.rejected == 5
    policy.reset_statistics()
    assert dict(policy.statistics.rejections) == {}


async def test_statistics_for_async_and_streams(name: str) -> None:
    policy = Policy("p", kill_switch=name)

    async def coro() -> None:
        return None

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> AsyncIterator[int]:
        yield 1

    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        await policy.acall(coro)
    with pytest.raises(KillSwitchOff):
        list(policy.call(gen))
    with pytest.raises(KillSwitchOff):
        async for _ in policy.call(agen):
            pass
    # Each function compiles under its own name (an unnamed policy would split
    # them); a named policy counts them together.
    stats = policy.statistics
    assert stats.calls == 3
    assert dict(stats.rejections) == {"kill_switch": 3}


def test_span_of_a_killed_call(spans: SpanCapture, name: str) -> None:
    policy = Policy("p", kill_switch=name)
    reskit.kill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)
    [span] = spans.spans()
    assert span.name == "reskit p"
    assert span.attributes["reskit.outcome"] == "rejected"
    assert span.attributes["reskit.rejected_by"] == "kill_switch"


def test_span_of_a_shed_call(spans: SpanCapture) -> None:
    policy = Policy("p", shed_at=1)
    reskit.set_brownout_level(1, **WHO)
    with pytest.raises(Shed):
        policy.call(ok)
    [span] = spans.spans()
    assert span.attributes["reskit.outcome"] == "rejected"
    assert span.attributes["reskit.rejected_by"] == "brownout"


def test_span_of_a_killed_call_answered_by_the_fallback(spans: SpanCapture, name: str) -> None:
    policy = Policy("p", kill_switch=name, fallback=lambda exc: "fb")
    reskit.kill(name, **WHO)
    assert policy.call(ok) == "fb"
    [span] = spans.spans()
    assert span.attributes["reskit.outcome"] == "fallback"
    assert span.attributes["reskit.rejected_by"] == "kill_switch"


def test_span_of_a_passing_call_through_a_switch(spans: SpanCapture, name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=5)
    assert policy.call(ok) == "ran"
    [span] = spans.spans()
    assert span.attributes["reskit.outcome"] == "success"
    assert "reskit.rejected_by" not in span.attributes


# -- operator breaker states -------------------------------------------------------------------


def test_force_and_release_reach_a_named_breaker(name: str) -> None:
    breaker = CircuitBreaker(name=name, fail_max=2)
    policy = Policy("p", breaker=breaker)

    def boom() -> None:
        raise ConnectionError

    assert policy.call(ok) == "ran"
    entry = reskit.force_breaker(name, "open", **WHO)
    assert entry.action == "breaker.force_open"
    assert breaker.state is BreakerState.FORCED_OPEN
    with pytest.raises(CircuitOpen):
        policy.call(ok)

    reskit.force_breaker(name, "closed", **WHO)
    assert breaker.state is BreakerState.DISABLED
    for _ in range(5):
        with pytest.raises(ConnectionError):
            policy.call(boom)
    assert breaker.state is BreakerState.DISABLED
    assert breaker.fail_counter == 0

    reskit.release_breaker(name, **WHO)
    assert breaker.state is BreakerState.CLOSED
    for _ in range(2):
        with pytest.raises(ConnectionError):
            policy.call(boom)
    assert breaker.state is BreakerState.OPEN  # its own state machine again


def test_a_breaker_built_after_the_force_follows_it_when_compiled(name: str) -> None:
    reskit.force_breaker(name, "open", **WHO)
    breaker = CircuitBreaker(name=name)
    assert breaker.state is BreakerState.CLOSED  # no policy has adopted it yet
    policy = Policy("p", breaker=breaker)
    assert breaker.state is BreakerState.FORCED_OPEN
    with pytest.raises(CircuitOpen):
        policy.call(ok)
    reskit.release_breaker(name, **WHO)
    assert breaker.state is BreakerState.CLOSED
    assert policy.call(ok) == "ran"


def test_an_unnamed_breaker_takes_the_policy_name_and_follows_it(name: str) -> None:
    reskit.force_breaker(name, "closed", **WHO)
    breaker = CircuitBreaker()
    Policy(name, breaker=breaker)
    assert breaker.name == name
    assert breaker.state is BreakerState.DISABLED


def test_unnamed_policy_breaker_follows_once_its_function_is_decorated() -> None:
    breaker = CircuitBreaker()
    policy = Policy(breaker=breaker)

    def some_dependency() -> str:
        return "ok"

    decorated = policy(some_dependency)
    assert breaker.name is not None
    reskit.force_breaker(breaker.name, "open", **WHO)
    with pytest.raises(CircuitOpen):
        decorated()


def test_forcing_again_reasserts_after_a_local_reset(name: str) -> None:
    breaker = CircuitBreaker(name=name)
    Policy("p", breaker=breaker)
    reskit.force_breaker(name, "open", reason="first", actor="a")
    breaker.reset()  # local code turns it back on
    assert breaker.state is BreakerState.CLOSED
    reskit.force_breaker(name, "open", reason="again", actor="b")
    assert current_store().snapshot().breaker(name)["mode"] == "forced_open"
    assert breaker.state is BreakerState.FORCED_OPEN


def test_force_reaches_every_breaker_of_that_name(name: str) -> None:
    breakers = [CircuitBreaker(name=name) for _ in range(3)]
    for i, breaker in enumerate(breakers):
        Policy(f"p{i}", breaker=breaker)
    other = CircuitBreaker(name=other_name())
    Policy("q", breaker=other)
    reskit.force_breaker(name, "open", **WHO)
    assert [b.state for b in breakers] == [BreakerState.FORCED_OPEN] * 3
    assert other.state is BreakerState.CLOSED


def test_no_operator_state_leaves_a_breakers_own_state_alone(name: str) -> None:
    # Opened before any policy adopted it: adopting it applies the store's view, which
    # has no operator state for it, and that must not close it.
    breaker = CircuitBreaker(name=name)
    breaker.open()
    Policy("p", breaker=breaker)
    assert breaker.state is BreakerState.OPEN
    configure(MemoryStore())  # a new store, with no operator state either
    assert breaker.state is BreakerState.OPEN


def test_a_new_store_releases_forced_breakers(name: str) -> None:
    breaker = CircuitBreaker(name=name)
    Policy("p", breaker=breaker)
    reskit.force_breaker(name, "open", **WHO)
    assert breaker.state is BreakerState.FORCED_OPEN
    configure(MemoryStore())
    assert breaker.state is BreakerState.CLOSED


# -- concurrency -------------------------------------------------------------------------------


@pytest.fixture
def eager_switching() -> Iterator[None]:
    """Threads switch every microsecond, so races happen in every run, not once in a while."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_calls_racing_kills_and_revives_are_counted_exactly(
    name: str, eager_switching: None
) -> None:
    callers, calls_each, flips = 50, 200, 100
    policy = Policy("p", kill_switch=name)
    barrier = threading.Barrier(callers + 1)
    lock = threading.Lock()
    tally = {"ran": 0, "rejected": 0}
    unexpected: list[BaseException] = []

    def caller() -> None:
        ran = rejected = 0
        barrier.wait()
        for _ in range(calls_each):
            try:
                policy.call(ok)
            except KillSwitchOff:
                rejected += 1
            except BaseException as exc:
                with lock:
                    unexpected.append(exc)
            else:
                ran += 1
        with lock:
            tally["ran"] += ran
            tally["rejected"] += rejected

    def flipper() -> None:
        barrier.wait()
        for i in range(flips):
            reskit.kill(name, reason=f"flip {i}", actor="chaos")
            reskit.revive(name, reason=f"flop {i}", actor="chaos")

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    threads.append(threading.Thread(target=flipper))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = callers * calls_each
    assert unexpected == []
    assert tally["ran"] + tally["rejected"] == total
    stats = policy.statistics
    assert stats.calls == total
    assert stats.attempts == tally["ran"]
    assert dict(stats.rejections) == (
        {"kill_switch": tally["rejected"]} if tally["rejected"] else {}
    )
    assert len(current_store().audit()) == 2 * flips
    assert current_store().verify_audit().ok
    # Whatever the interleaving, the switch ends revived and calls pass.
    assert reskit.is_killed(name) is False
    assert policy.call(ok) == "ran"


def test_a_late_notification_does_not_resurrect_an_old_state(name: str) -> None:
    store = MemoryStore()
    paused = threading.Event()
    release = threading.Event()

    def slow_listener(snapshot: Snapshot) -> None:
        # Listeners run in registration order: this one runs before the control's.
        record = snapshot.switch(name)
        if record is not None and record["killed"] and not paused.is_set():
            paused.set()
            release.wait()

    store.listen(slow_listener)
    configure(store)
    policy = Policy("p", kill_switch=name)

    killer = threading.Thread(target=reskit.kill, args=(name,), kwargs=WHO)
    killer.start()
    assert paused.wait(10)  # the kill is in the store; its notification is under way
    reskit.revive(name, **WHO)  # a later change, notified at once
    release.set()
    killer.join()

    assert reskit.is_killed(name) is False  # the store's view
    assert policy.call(ok) == "ran"  # the policy's view must agree


# -- records read back from a store ------------------------------------------------------------

SWITCH_RECORD = {
    "killed": True,
    "reason": "r",
    "actor": "a",
    "at": 1.0,
    "until": None,
    "last_killed": 1.0,
}


def test_parse_record_accepts_the_three_kinds_and_drops_extra_fields() -> None:
    raw = json.dumps({**SWITCH_RECORD, "extra": "ignored"})
    assert parse_record("s:pay", raw) == SWITCH_RECORD
    assert parse_record("s:pay", raw.encode()) == SWITCH_RECORD
    level = {"level": 7, "reason": "r", "actor": "a", "at": 2}
    assert parse_record("l:", json.dumps(level)) == level
    assert parse_record("l:acme", json.dumps(level)) == level
    forced = {"mode": "forced_open", "reason": "r", "actor": "a", "at": 3.5}
    assert parse_record("b:db", json.dumps(forced)) == forced


@pytest.mark.parametrize(
    ("key", "raw", "words"),
    [
        ("s:x", pickle.dumps(SWITCH_RECORD), None),
        ("s:x", "[1]", "not a JSON object"),
        ("s:x", "{", None),
        ("s:x", json.dumps({**SWITCH_RECORD, "killed": "yes"}), "killed must be"),
        ("s:x", json.dumps({**SWITCH_RECORD, "killed": 1}), "killed must be"),
        ("s:x", json.dumps({**SWITCH_RECORD, "until": "soon"}), "until and last_killed"),
        ("s:x", json.dumps({**SWITCH_RECORD, "until": -1}), "until and last_killed"),
        ("s:x", json.dumps({**SWITCH_RECORD, "last_killed": True}), "until and last_killed"),
        ("s:x", json.dumps({**SWITCH_RECORD, "at": None}), "reason and actor"),
        ("s:x", json.dumps({**SWITCH_RECORD, "reason": 5}), "reason and actor"),
        ("s:x", json.dumps({**SWITCH_RECORD, "actor": "a" * 4097}), "reason and actor"),
        ("l:", json.dumps({"level": 101, "reason": "r", "actor": "a", "at": 1}), "level must"),
        ("l:", json.dumps({"level": 2.0, "reason": "r", "actor": "a", "at": 1}), "level must"),
        ("l:t", json.dumps({"level": True, "reason": "r", "actor": "a", "at": 1}), "level must"),
        ("b:db", json.dumps({"mode": "open", "reason": "r", "actor": "a", "at": 1}), "mode must"),
        ("x:what", json.dumps(SWITCH_RECORD), "unknown kind"),
        ("s:x", json.dumps({**SWITCH_RECORD, "pad": "x" * MAX_VALUE_BYTES}), "byte limit"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 20 else None,
)
def test_parse_record_refuses_anything_else(key: str, raw: str | bytes, words: str | None) -> None:
    with pytest.raises(ValueError, match=words):
        parse_record(key, raw)


def test_parse_record_refuses_oversized_values_unread() -> None:
    with pytest.raises(ValueError, match="byte limit"):
        parse_record("s:x", "[" * (MAX_VALUE_BYTES + 1))


def test_snapshot_reads_records_by_kind() -> None:
    records = {
        "s:pay": SWITCH_RECORD,
        "l:": {"level": 1},
        "l:acme": {"level": 4},
        "b:db": {"mode": "forced_open"},
    }
    snapshot = Snapshot(3, records)
    assert snapshot.switch("pay") is records["s:pay"]
    assert snapshot.switch("db") is None
    assert snapshot.level() == {"level": 1}
    assert snapshot.level("acme") == {"level": 4}
    assert snapshot.level("nobody") is None
    assert snapshot.breaker("db") == {"mode": "forced_open"}
    assert snapshot.breaker("pay") is None
    assert dict(snapshot.items("l:")) == {"": {"level": 1}, "acme": {"level": 4}}
    assert Snapshot() == Snapshot(0, {})


def test_the_memory_store_versions_every_change(name: str) -> None:
    store = current_store()
    seen: list[int] = []
    store.listen(lambda snapshot: seen.append(snapshot.version))
    v0 = store.snapshot().version
    reskit.kill(name, **WHO)
    reskit.set_brownout_level(2, **WHO)
    reskit.revive(name, **WHO)
    assert store.snapshot().version == v0 + 3
    assert seen == [v0 + 1, v0 + 2, v0 + 3]
    assert store.known is True
    assert store.stale is False
    assert store.staleness() == 0.0


def test_configure_picks_the_memory_store_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(configure("memory"), MemoryStore)
    monkeypatch.setenv("RESKIT_STORE", "memory")
    assert isinstance(configure(), MemoryStore)
    with pytest.raises(ValueError, match="use 'memory' or a redis://"):
        configure("mongodb://x")
    with pytest.raises(TypeError, match="store must be 'memory'"):
        configure("")


def test_a_new_store_starts_with_nothing_killed(name: str) -> None:
    policy = Policy("p", kill_switch=name, shed_at=1)
    reskit.kill(name, **WHO)
    reskit.set_brownout_level(9, **WHO)
    configure(MemoryStore())
    assert policy.call(ok) == "ran"
    assert reskit.brownout_level() == 0


# -- what creates a store ----------------------------------------------------------------------


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RESKIT_STORE"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_and_plain_policies_create_no_store() -> None:
    out = _run(
        """
        import reskit
        import reskit._store as store
        assert store._current is None, "import"
        p = reskit.Policy(
            "p", retry=reskit.Retry(attempts=2, on=OSError), timeout=5.0,
            bulkhead=reskit.Bulkhead(4), fallback=lambda exc: None,
        )
        assert store._current is None, "building"
        assert p.call(lambda: 1) == 1
        @reskit.retry(attempts=2, on=OSError)
        def f():
            return 2
        assert f() == 2
        assert store._current is None, "calling"
        import reskit._switches as sw
        assert sw._control is None, "control"
        print("none")
        """
    )
    assert out == "none"


def test_a_policy_with_a_switch_creates_the_memory_store() -> None:
    out = _run(
        """
        import reskit
        import reskit._store as store
        reskit.Policy("p", kill_switch="x")
        print(type(store._current).__name__)
        """
    )
    assert out == "MemoryStore"


def test_a_policy_with_shed_at_creates_the_store_when_first_called() -> None:
    out = _run(
        """
        import reskit
        import reskit._store as store
        p = reskit.Policy("p", shed_at=3)
        print(type(store._current).__name__)
        p.call(lambda: 1)
        print(type(store._current).__name__)
        """
    )
    assert out.split() == ["NoneType", "MemoryStore"]


async def test_the_async_changes_on_the_memory_store(name: str) -> None:
    policy = Policy("async-memory", kill_switch=name, shed_at=2)
    await reskit.akill(name, **WHO)
    with pytest.raises(KillSwitchOff):
        policy.call(ok)
    await reskit.arevive(name, **WHO)
    await reskit.aset_brownout_level(2, **WHO)
    with pytest.raises(Shed):
        policy.call(ok)
    await reskit.aset_brownout_level(0, **WHO)
    assert policy.call(ok) == "ran"
    await reskit.aforce_breaker("b", "open", **WHO)
    await reskit.arelease_breaker("b", **WHO)
    actions = [entry.action for entry in current_store().audit()]
    assert actions == [
        "kill",
        "revive",
        "brownout",
        "brownout",
        "breaker.force_open",
        "breaker.release",
    ]

"""The Redis store against real redis-server processes the tests start, kill and pause.

Each test gets its own server on a free port. Waits are for events (a store
listener firing), never for time to pass; the few waits on Redis itself are
bounded and say so.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import reskit
from redis_servers import RedisServer, free_port, require_redis, running_cluster
from reskit import KillSwitch, Policy, StoreUnavailable
from reskit._store import Snapshot, Store
from reskit.stores.redis import RedisStore

pytestmark = pytest.mark.redis

WAIT = 10.0  # seconds an expected event may take before the test fails


def wait_for(store: Store, predicate: Callable[[Store], bool], what: str) -> None:
    """Block until ``predicate(store)`` holds, woken by the store's own notifications."""
    changed = threading.Event()

    def listener(_: Snapshot) -> None:
        changed.set()

    store.listen(listener)
    try:
        while not predicate(store):
            if not changed.wait(WAIT):
                raise AssertionError(f"timed out waiting for {what}")
            changed.clear()
    finally:
        store.unlisten(listener)


def killed_in(store: Store, name: str) -> bool:
    record = store.snapshot().switch(name)
    return record is not None and record["killed"]


def synced(store: RedisStore) -> RedisStore:
    assert store.wait_synced(WAIT), "the store never read its first snapshot"
    return store


# -- propagation and the hot path ---------------------------------------------------------


def test_a_kill_reaches_another_process_view_and_its_policies(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    here = synced(stores(server.url))
    there = synced(stores(server.url))
    reskit.configure(here)
    policy = Policy("payments", kill_switch=True)
    assert policy.call(lambda: "ok") == "ok"

    reskit.configure(there)
    reskit.kill("payments", reason="incident 42", actor="alice")
    reskit.configure(here)
    wait_for(here, lambda s: killed_in(s, "payments"), "the kill to arrive")
    with pytest.raises(reskit.KillSwitchOff, match="incident 42"):
        policy.call(lambda: "ok")
    assert reskit.is_killed("payments")

    reskit.configure(there)
    reskit.revive("payments", reason="fixed", actor="alice")
    reskit.configure(here)
    wait_for(here, lambda s: not killed_in(s, "payments"), "the revive to arrive")
    assert policy.call(lambda: "ok") == "ok"


def test_the_hot_path_sends_no_command_to_redis(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    # No periodic resync during the test: every command would be the hot path's.
    store = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(store)
    reskit.set_brownout_level(1, reason="warm up", actor="test")
    wait_for(store, lambda s: s.snapshot().level() is not None, "the level")
    policy = Policy("hot", kill_switch=True, shed_at=3)
    protected = policy(lambda: 1)
    protected()
    assert store.flush(WAIT)  # the switch's declaration, written in the background
    admin: Any = server.client()
    before = admin.info("commandstats")
    for _ in range(10_000):
        protected()
    after = admin.info("commandstats")
    admin.close()
    changed = {
        name: (before.get(name, {}).get("calls", 0), stats["calls"])
        for name, stats in after.items()
        if before.get(name, {}).get("calls") != stats["calls"]
    }
    # Only the INFO command the test itself sent moved.
    assert set(changed) <= {"cmdstat_info"}, changed


# -- fail static: Redis killed, restarted empty, flushed, paused ---------------------------


def run_calls_until(stop: threading.Event, policy: Policy, errors: list[BaseException]) -> int:
    calls = 0
    while not stop.is_set():
        try:
            policy.call(lambda: None)
        except BaseException as exc:
            errors.append(exc)
        calls += 1
    return calls


def test_redis_killed_and_restarted_empty_loses_nothing_acknowledged(
    server: RedisServer, stores: Callable[..., RedisStore], logs: list[dict[str, Any]]
) -> None:
    store = synced(stores(server.url, resync_interval="0.1", timeout="0.2"))
    reskit.configure(store)
    reskit.kill("search", reason="r1", actor="a")
    reskit.set_brownout_level(2, reason="r2", actor="a")
    reskit.kill("other", reason="r3", actor="a")
    acknowledged = [entry.hash for entry in store.audit()]
    assert len(acknowledged) == 3

    policy = Policy("checkout", kill_switch=KillSwitch("checkout", fail_mode="open"))
    stop = threading.Event()
    errors: list[BaseException] = []
    caller = threading.Thread(target=run_calls_until, args=(stop, policy, errors))
    caller.start()
    try:
        server.kill()
        wait_for(store, lambda s: s.stale, "the store to notice Redis is gone")
        assert reskit.is_killed("search")  # the last known value
        assert reskit.brownout_level() == 2
        with pytest.raises(StoreUnavailable):
            reskit.kill("third", reason="r", actor="a")
        server.start()  # empty: no persistence
        wait_for(store, lambda s: not s.stale, "the store to recover")
        wait_for(store, lambda s: s.snapshot().version > 3, "the restore")
    finally:
        stop.set()
        caller.join()
    assert errors == []  # a fail-open switch never raised into its callers
    assert reskit.is_killed("search")
    assert reskit.is_killed("other")
    assert reskit.brownout_level() == 2
    entries = store.audit()
    assert [entry.hash for entry in entries[:3]] == acknowledged
    assert entries[3].action == "store.restore"
    assert store.verify_audit().ok
    events = [log["event"] for log in logs]
    assert events.count("reskit.store.unreachable") == 1
    assert events.count("reskit.store.restored") == 1
    # Converged: a fresh process view reads the restored state.
    fresh = synced(stores(server.url))
    assert killed_in(fresh, "search")
    assert fresh.snapshot().level() is not None


def test_flushed_keys_are_written_back_with_the_audit_log(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url, resync_interval="0.05"))
    reskit.configure(store)
    Policy("declared", kill_switch=KillSwitch("a", owner="team-a"))
    reskit.kill("a", reason="r", actor="x")
    reskit.revive("a", reason="r", actor="x")
    reskit.kill("b", reason="r", actor="x", ttl=3600)
    admin: Any = server.client()
    admin.flushall()
    wait_for(store, lambda s: s.snapshot().version == 4, "the restore after FLUSHALL")
    entries = store.audit()
    assert [e.action for e in entries] == ["kill", "revive", "kill", "store.restore"]
    assert store.verify_audit().ok
    assert admin.hget("reskit:{reskit}:control", "s:b") is not None
    admin.close()
    # The registry of declared switches is written again once the store notices.
    wait_for(store, lambda s: not s.stale, "the store in sync")
    assert store.flush(WAIT)
    assert store.declarations()["a"].owner == "team-a"


def test_a_paused_redis_never_blocks_or_breaks_callers(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url, resync_interval="0.05", timeout="0.2"))
    reskit.configure(store)
    reskit.kill("paused", reason="r", actor="a")
    policy = Policy("during-pause", kill_switch=True)
    server.pause()
    try:
        wait_for(store, lambda s: s.stale, "staleness while Redis is stopped")
        assert store.staleness() > 0
        assert reskit.is_killed("paused")
        assert policy.call(lambda: "served") == "served"
        with pytest.raises(StoreUnavailable, match="nothing was changed"):
            reskit.revive("paused", reason="r", actor="a")
    finally:
        server.resume()
    wait_for(store, lambda s: not s.stale, "recovery after SIGCONT")
    assert store.staleness() == 0.0
    reskit.revive("paused", reason="r", actor="a")
    assert not reskit.is_killed("paused")


def test_redis_down_at_start_raises_nothing_and_fail_modes_apply(
    stores: Callable[..., RedisStore], tmp_path: Path
) -> None:
    port = free_port()
    store = stores(f"redis://127.0.0.1:{port}/0", resync_interval="0.05", timeout="0.2")
    reskit.configure(store)  # no server: nothing raised
    closed = Policy("closed-switch", kill_switch=KillSwitch("c", fail_mode="closed"))
    opened = Policy("open-switch", kill_switch=KillSwitch("o", fail_mode="open"))
    wait_for(store, lambda s: s.stale, "the first failed connection")
    with pytest.raises(reskit.KillSwitchOff, match="unknown"):
        closed.call(lambda: None)
    assert opened.call(lambda: "ok") == "ok"
    late = RedisServer(require_redis(), port).start()
    try:
        wait_for(store, lambda s: s.known and not s.stale, "the late server")
        assert closed.call(lambda: "ok") == "ok"
    finally:
        late.stop()


def test_a_ttl_revive_happens_once_in_the_store_and_is_audited(
    server: RedisServer, stores: Callable[..., RedisStore], clock: Any
) -> None:
    first = synced(stores(server.url, resync_interval="0.05"))
    second = synced(stores(server.url, resync_interval="0.05"))
    reskit.configure(first)
    reskit.kill("brief", reason="drill", actor="sre", ttl=60)
    wait_for(second, lambda s: killed_in(s, "brief"), "the kill")
    clock.advance(61)
    wait_for(first, lambda s: not killed_in(s, "brief"), "the automatic revive")
    wait_for(second, lambda s: not killed_in(s, "brief"), "the revive elsewhere")
    revives = [e for e in first.audit() if e.action == "revive"]
    assert len(revives) == 1
    assert revives[0].actor == "reskit"
    assert "ttl" in revives[0].reason


# -- after fork ------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_sees_later_flips(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url))
    reskit.configure(store)
    policy = Policy("forked", kill_switch=True)
    assert policy.call(lambda: 1) == 1
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: subscribe, tell the parent, wait for the kill
        code = 1
        try:
            seen = threading.Event()
            store.listen(lambda s: seen.set() if killed_in(store, "forked") else None)
            assert store.wait_synced(WAIT)
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            if killed_in(store, "forked") or seen.wait(WAIT):
                try:
                    policy.call(lambda: 1)
                except reskit.KillSwitchOff:
                    code = 0
        finally:
            os._exit(code)
    os.read(ready_r, 1)
    reskit.kill("forked", reason="after fork", actor="parent")
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- hostile contents and names --------------------------------------------------------------


class Exploit:
    """Unpickling this would create a file: the store must never unpickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_planted_values_are_reported_and_ignored(
    server: RedisServer,
    stores: Callable[..., RedisStore],
    tmp_path: Path,
    logs: list[dict[str, Any]],
) -> None:
    store = synced(stores(server.url, resync_interval="0.05"))
    reskit.configure(store)
    reskit.kill("good", reason="r", actor="a")
    marker = tmp_path / "pwned"
    admin: Any = server.client()
    control = "reskit:{reskit}:control"
    admin.hset(control, "s:good", pickle.dumps(Exploit(str(marker))))  # over a good record
    admin.hset(control, "s:malformed", b"{not json")
    admin.hset(control, "s:huge", b'{"killed": true, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}')
    admin.hset(control, "l:", json.dumps({"level": "high", "reason": "r", "actor": "a", "at": 1}))
    admin.hset(control, "b:x", json.dumps([1, 2, 3]))
    admin.incr("reskit:{reskit}:version")
    admin.publish("reskit:{reskit}:changes", b"x")
    reskit.set_brownout_level(1, reason="after the plants", actor="a", tenant="t")
    wait_for(store, lambda s: s.snapshot().level("t") is not None, "the next good change")
    assert not marker.exists()
    snapshot = store.snapshot()
    assert killed_in(store, "good")  # the last good record stays (fail static)
    assert snapshot.switch("malformed") is None
    assert snapshot.switch("huge") is None
    assert snapshot.level() is None
    assert snapshot.breaker("x") is None
    assert reskit.brownout_level() == 0
    reported = [log for log in logs if log["event"] == "reskit.store.invalid_record"]
    assert len(reported) == 5
    admin.close()


@pytest.mark.parametrize(
    "name", ["a*b", "a:b", "{tag}", "line\nbreak", "x" * 256, "*", "reskit:{reskit}:control"]
)
def test_hostile_names_stay_out_of_keys(
    server: RedisServer, stores: Callable[..., RedisStore], name: str
) -> None:
    store = synced(stores(server.url))
    reskit.configure(store)
    policy = Policy("hostile", kill_switch=KillSwitch(name))
    reskit.kill(name, reason="r", actor="a")
    with pytest.raises(reskit.KillSwitchOff):
        policy.call(lambda: None)
    reskit.set_brownout_level(3, reason="r", actor="a", tenant=name)
    assert reskit.brownout_level(name) == 3
    admin: Any = server.client()
    keys = {key.decode() for key in admin.keys("*")}
    admin.close()
    assert keys <= {
        "reskit:{reskit}:control",
        "reskit:{reskit}:version",
        "reskit:{reskit}:audit",
        "reskit:{reskit}:audit:head",
        "reskit:{reskit}:switches",
    }
    with pytest.raises(ValueError, match="1 to 256"):
        reskit.kill("x" * 257, reason="r", actor="a")


# -- the audit log in Redis ---------------------------------------------------------------


def tamper_edit(admin: Any, key: str, at: int) -> None:
    entry = json.loads(admin.lindex(key, at))
    entry["reason"] = "nothing to see here"
    admin.lset(key, at, json.dumps(entry))


def tamper_delete(admin: Any, key: str, at: int) -> None:
    admin.lset(key, at, b"__deleted__")
    admin.lrem(key, 1, b"__deleted__")


def tamper_swap(admin: Any, key: str, at: int) -> None:
    first, second = admin.lindex(key, at), admin.lindex(key, at + 1)
    admin.lset(key, at, second)
    admin.lset(key, at + 1, first)


@pytest.mark.parametrize(
    ("tamper", "at", "expected"),
    [
        (tamper_edit, 0, 0),
        (tamper_edit, 3, 3),
        (tamper_edit, 5, 5),
        (tamper_delete, 0, 0),
        (tamper_delete, 2, 2),
        (tamper_swap, 1, 1),
        (lambda admin, key, at: admin.rpop(key, 2), None, 4),
        (lambda admin, key, at: admin.lpop(key), None, 0),
    ],
)
def test_tampering_with_the_stored_log_is_found_at_that_entry(
    server: RedisServer,
    stores: Callable[..., RedisStore],
    tamper: Callable[[Any, str, int | None], None],
    at: int | None,
    expected: int,
) -> None:
    store = synced(stores(server.url))
    reskit.configure(store)
    for level in range(6):
        reskit.set_brownout_level(level, reason=f"step {level}", actor="ops")
    assert store.verify_audit().ok
    admin: Any = server.client()
    tamper(admin, "reskit:{reskit}:audit", at)
    admin.close()
    result = store.verify_audit()
    assert not result.ok
    assert result.position == expected, result


def test_concurrent_changes_from_many_writers_form_one_chain(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    writers = [synced(stores(server.url)) for _ in range(8)]
    barrier = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def write(store: RedisStore, n: int) -> None:
        barrier.wait()
        try:
            for i in range(10):
                store.change(
                    f"l:tenant-{n}",
                    {"level": i, "reason": "race", "actor": f"w{n}", "at": 1.0},
                    actor=f"w{n}",
                    action="brownout",
                    target=f"brownout:tenant-{n}",
                    reason="race",
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    result = writers[0].verify_audit()
    assert result.ok
    assert result.checked == 80
    assert [e.seq for e in writers[0].audit()] == list(range(80))


# -- Redis Cluster ---------------------------------------------------------------------------


def test_everything_works_on_a_real_three_node_cluster(stores: Callable[..., RedisStore]) -> None:
    with running_cluster(3) as nodes:
        url = nodes[0].url.rsplit("/", 1)[0]
        here = synced(stores(url, cluster="true", resync_interval="0.05"))
        there = synced(stores(url, cluster="true", resync_interval="0.05"))
        reskit.configure(here)
        policy = Policy("clustered", kill_switch=True, shed_at=2)
        reskit.kill("clustered", reason="r", actor="a", ttl=3600)
        reskit.set_brownout_level(2, reason="r", actor="a", tenant="t{1}")
        reskit.force_breaker("db", "open", reason="r", actor="a")
        wait_for(there, lambda s: s.snapshot().breaker("db") is not None, "the cluster flips")
        with pytest.raises(reskit.KillSwitchOff):
            policy.call(lambda: None)
        reskit.revive("clustered", reason="r", actor="a")
        reskit.release_breaker("db", reason="r", actor="a")
        assert here.verify_audit().ok
        assert here.verify_audit().checked == 5
        assert here.flush(WAIT)
        assert set(here.declarations()) == {"clustered"}
        # Shared breaker steps (one Lua script, keys in one slot) on the cluster.
        breaker = reskit.CircuitBreaker(2, 30, name="cluster-db", shared=True)
        guarded = Policy("cluster-db", breaker=breaker)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                guarded.call(_fail)
        assert breaker.state is reskit.BreakerState.OPEN
        assert here.flush(WAIT)
        states = {b["name"]: b for b in here.shared_breakers()}
        assert states["cluster-db"]["state"] == "open"
        assert states["cluster-db"]["opens"] == 1
        # A flushed cluster is restored by the store that notices.
        for node in nodes:
            node_client: Any = node.client()
            node_client.flushall()
            node_client.close()
        wait_for(there, lambda s: s.snapshot().version >= 6, "the restore on the cluster")
        assert there.verify_audit().ok


def _fail() -> None:
    raise ConnectionError("down")


# -- the command line against Redis ----------------------------------------------------------


def test_the_cli_flips_lists_and_verifies_on_redis(
    server: RedisServer, stores: Callable[..., RedisStore], capsys: pytest.CaptureFixture[str]
) -> None:
    from reskit.cli import main

    watcher = synced(stores(server.url))
    assert (
        main(["kill", "search", "--reason", "INC-7", "--actor", "ops", "--store", server.url]) == 0
    )
    wait_for(watcher, lambda s: killed_in(s, "search"), "the CLI's kill")
    assert main(["brownout", "2", "--reason", "peak", "--actor", "ops", "--store", server.url]) == 0
    # A shared breaker of this process, opened by failures, shows with the fleet's state.
    reskit.configure(watcher)
    breaker = reskit.CircuitBreaker(1, 60, name="ledger-db", shared=True)
    with pytest.raises(ConnectionError):
        Policy("ledger", breaker=breaker).call(_fail)
    assert watcher.flush(WAIT)
    capsys.readouterr()
    assert main(["breakers", "--json", "--store", server.url]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {
            "name": "ledger-db",
            "state": "open",
            "reason": None,
            "actor": None,
            "at": None,
            "shared": {"state": "open", "failures": 0, "opens": 1},
        }
    ]
    assert main(["audit", "verify", "--store", server.url]) == 0
    assert "2 entries" in capsys.readouterr().out
    admin: Any = server.client()
    admin.lset("reskit:{reskit}:audit", 0, b'{"edited": true}')
    admin.close()
    assert main(["audit", "verify", "--store", server.url]) == 1


def test_a_shared_breaker_recovers_when_redis_loses_its_state(
    server: RedisServer, stores: Callable[..., RedisStore], clock: Any
) -> None:
    # No periodic resync: the breaker learns of the loss from its own next step.
    store = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(store)
    breaker = reskit.CircuitBreaker(1, 30, name="lost-db", shared=True)
    policy = Policy("lost", breaker=breaker)
    with pytest.raises(ConnectionError):
        policy.call(_fail)
    assert store.flush(WAIT)
    assert {b["name"]: b["state"] for b in store.shared_breakers()} == {"lost-db": "open"}
    admin: Any = server.client()
    admin.flushall()
    admin.close()
    clock.advance(31)
    if breaker.state is reskit.BreakerState.CLOSED:
        # The echo of its own "opened" news was read after the flush (the subscriber
        # thread reads it when it gets to it, later on a busy machine): that read already
        # found the fleet's breaker gone and followed it.
        assert policy.call(lambda: "probe") == "probe"
    else:
        # Half-open here; the fleet's breaker is gone (closed, generation 0): the first
        # call asks for a probe lease and learns that, and the breaker follows the fleet.
        with pytest.raises(reskit.CircuitOpen):
            policy.call(lambda: "probe")
    assert store.flush(WAIT)
    assert breaker.state is reskit.BreakerState.CLOSED
    assert policy.call(lambda: "ok") == "ok"
    store.refresh()  # a resync notices the registry is gone and queues writing it again
    assert store.flush(WAIT)
    assert {b["name"] for b in store.shared_breakers()} == {"lost-db"}


# -- what a review found -------------------------------------------------------------------


def test_a_fresh_writer_on_an_emptied_redis_does_not_erase_the_fleet(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    fleet = synced(stores(server.url, resync_interval="3600"))  # notices only when told
    reskit.configure(fleet)
    reskit.kill("payments", reason="incident 1", actor="alice")
    reskit.set_brownout_level(40, reason="incident 1", actor="alice")
    held = [entry.hash for entry in fleet.audit()]
    server.restart()  # empty
    newcomer = synced(stores(server.url))  # a CLI run right after the restart
    reskit.configure(newcomer)
    reskit.set_brownout_level(10, reason="incident 2", actor="bob", tenant="t")
    fleet.refresh()  # the fleet's next resync
    wait_for(
        newcomer,
        lambda s: s.snapshot().switch("payments") is not None and s.snapshot().level() is not None,
        "the fleet's records written back",
    )
    assert killed_in(newcomer, "payments")
    assert reskit.brownout_level() == 40 and reskit.brownout_level("t") == 10  # noqa: PT018
    entries = newcomer.audit()
    assert entries[0].reason == "incident 2"  # the new chain stays as it began
    lost = [e for e in entries if e.action == "store.restore" and e.target == "audit"]
    assert len(lost) == 1
    assert [entry["hash"] for entry in lost[0].after["lost_entries"]] == held
    assert newcomer.verify_audit().ok


def test_deeply_nested_json_is_one_more_bad_value(
    server: RedisServer, stores: Callable[..., RedisStore], logs: list[dict[str, Any]]
) -> None:
    store = synced(stores(server.url, resync_interval="0.05"))
    reskit.configure(store)
    admin: Any = server.client()
    nested = b"[" * 30_000 + b"]" * 30_000  # under the size limit, over the parser's depth
    admin.hset("reskit:{reskit}:control", "s:deep", nested)
    admin.hset("reskit:{reskit}:switches", "deep", nested)
    admin.close()
    reskit.kill("after", reason="r", actor="a")  # the store keeps working
    assert killed_in(store, "after")
    assert store.snapshot().switch("deep") is None
    assert "deep" not in store.declarations()
    assert any(log["event"] == "reskit.store.invalid_record" for log in logs)


def test_a_key_of_the_wrong_type_is_reported_not_taken_for_an_outage(
    server: RedisServer, stores: Callable[..., RedisStore], logs: list[dict[str, Any]]
) -> None:
    store = synced(stores(server.url, resync_interval="0.05"))
    other = synced(stores(server.url, resync_interval="0.05"))
    reskit.configure(store)
    admin: Any = server.client()
    admin.delete("reskit:{reskit}:audit")
    admin.set("reskit:{reskit}:audit", "not a list")
    admin.close()
    store.refresh()
    assert not store.stale
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        reskit.kill("x", reason="r", actor="a")  # nowhere to audit it: refused
    events = [log["event"] for log in logs]
    assert "reskit.store.unreachable" not in events
    assert events.count("reskit.store.invalid_key") == 1
    assert not other.stale


def test_a_shared_breaker_that_opened_here_is_not_closed_by_older_replies(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url))
    reskit.configure(store)
    transitions: list[tuple[str, str]] = []

    class Listener:
        def state_change(self, cb: object, old: Any, new: Any) -> None:
            transitions.append((old.name, new.name))

    breaker = reskit.CircuitBreaker(5, 30, name="flappy", shared=True, listeners=[Listener()])
    policy = Policy("flappy", breaker=breaker)
    assert store.flush(WAIT)
    hold = threading.Event()
    store._job(lambda: hold.wait(WAIT))  # the writer is busy: reports queue up
    reached = 0

    def fail() -> None:
        nonlocal reached
        reached += 1
        raise ConnectionError

    for _ in range(5):
        with pytest.raises(ConnectionError):
            policy.call(fail)
    assert breaker.state is reskit.BreakerState.OPEN
    hold.set()
    assert store.flush(WAIT)  # every queued report answered
    for _ in range(20):
        with pytest.raises(reskit.CircuitOpen):
            policy.call(fail)
    assert reached == 5
    assert transitions == [("closed", "open")]
    assert {b["name"]: b["opens"] for b in store.shared_breakers()} == {"flappy": 1}


def test_an_expired_kill_is_revived_once_however_often_it_is_checked(
    server: RedisServer, stores: Callable[..., RedisStore], clock: Any
) -> None:
    store = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(store)
    reskit.kill("brief", reason="r", actor="a", ttl=10)
    policy = Policy("brief", kill_switch=True)
    asked: list[str] = []
    queue = store.revive_soon

    def counting(name: str, record: Any) -> None:
        asked.append(name)
        queue(name, record)

    store.revive_soon = counting  # type: ignore[method-assign]
    clock.advance(11)
    server.pause()
    try:
        for _ in range(10_000):
            assert not reskit.is_killed("brief")
            policy.call(lambda: None)
    finally:
        server.resume()
    assert asked == ["brief"]  # one revive asked of the store, not 10,000
    assert store.flush(WAIT)
    assert [e.action for e in store.audit()] == ["kill", "revive"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_sends_none_of_the_parent_queue_and_a_closed_store_stays_closed(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url))
    closed = synced(stores(server.url))
    closed.close()
    admin: Any = server.client()
    hold = threading.Event()
    store._job(lambda: hold.wait(WAIT))
    store._job(lambda: store._client.incr("sent-by-the-writer"))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours = not store._jobs and store._writer.is_alive()
            theirs = not closed._thread.is_alive() and not closed._writer.is_alive()
            code = 0 if ours and theirs and store.flush(WAIT) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    hold.set()
    assert store.flush(WAIT)
    assert os.waitstatus_to_exitcode(status) == 0
    assert admin.get("sent-by-the-writer") == b"1"
    admin.close()


def test_breaker_news_on_the_channel_does_not_delay_the_version_check(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url, resync_interval="0.2"))
    admin: Any = server.client()
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():  # a busy fleet of shared breakers, as busy as it gets
            admin.publish("reskit:{reskit}:changes", b"bsomething")

    talker = threading.Thread(target=chatter)
    talker.start()
    try:
        # A change whose publish was lost: only the version check can catch it.
        record = {"killed": True, "reason": "r", "actor": "a", "at": 1.0, "until": None}
        admin.hset("reskit:{reskit}:control", "s:quiet", json.dumps(record | {"last_killed": 1.0}))
        admin.incr("reskit:{reskit}:version")
        wait_for(store, lambda s: killed_in(s, "quiet"), "the version check")
    finally:
        stop.set()
        talker.join()
        admin.close()


def test_revive_keeps_last_killed_of_the_record_it_replaces(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(store)
    admin: Any = server.client()
    # A kill this process has not heard of yet (its publish never reached it).
    record = {"killed": True, "reason": "r", "actor": "a", "at": 5.0, "until": None}
    admin.hset("reskit:{reskit}:control", "s:drill", json.dumps(record | {"last_killed": 5.0}))
    admin.close()
    assert store.snapshot().switch("drill") is None
    entry = reskit.revive("drill", reason="drill over", actor="b")
    assert entry.before is not None and entry.after["last_killed"] == 5.0  # noqa: PT018


def test_long_reasons_are_limited_in_bytes_and_travel_whole(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    here = synced(stores(server.url))
    there = synced(stores(server.url))
    reskit.configure(here)
    reason = "\U0001f525" * 1024  # 4096 bytes in UTF-8: the most a reason may be
    reskit.kill("long", reason=reason, actor="\u00e9" * 2048)
    wait_for(there, lambda s: killed_in(s, "long"), "the kill with a long reason")
    record = there.snapshot().switch("long")
    assert record is not None and record["reason"] == reason  # noqa: PT018
    with pytest.raises(ValueError, match="4100 bytes"):
        reskit.kill("long", reason=reason + "abcd", actor="a")


# -- async code ------------------------------------------------------------------------------


async def test_async_changes_await_redis_and_never_block_the_event_loop(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    import asyncio

    store = synced(stores(server.url, timeout="0.3"))
    reskit.configure(store)
    entry = await reskit.akill("async", reason="r", actor="a", ttl=60)
    assert entry.action == "kill" and reskit.is_killed("async")  # noqa: PT018
    await reskit.aset_brownout_level(4, reason="r", actor="a", tenant="t")
    await reskit.aforce_breaker("db", "open", reason="r", actor="a")
    await reskit.arelease_breaker("db", reason="r", actor="a")
    await reskit.arevive("async", reason="r", actor="a")
    assert not reskit.is_killed("async")
    assert reskit.brownout_level("t") == 4
    assert [e.action for e in store.audit()] == [
        "kill",
        "brownout",
        "breaker.force_open",
        "breaker.release",
        "revive",
    ]
    # While Redis does not answer, the loop goes on with its other tasks.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    server.pause()
    task = asyncio.create_task(ticker())
    try:
        with pytest.raises(StoreUnavailable, match="cannot be reached"):
            await reskit.akill("async", reason="r", actor="a")
    finally:
        task.cancel()
        server.resume()
    assert ticks > 100  # a blocking call would have let it tick not at all


def test_a_shared_breaker_works_on_its_own_while_redis_is_down(
    stores: Callable[..., RedisStore], clock: Any
) -> None:
    store = stores(f"redis://127.0.0.1:{free_port()}/0", resync_interval="0.05", timeout="0.2")
    reskit.configure(store)  # nothing listens there: no exception, here or below
    breaker = reskit.CircuitBreaker(2, 10, name="alone", shared=True)
    policy = Policy("alone", breaker=breaker)
    wait_for(store, lambda s: s.stale, "the failed connection")
    for _ in range(2):
        with pytest.raises(ConnectionError):
            policy.call(_fail)
    assert breaker.state is reskit.BreakerState.OPEN
    with pytest.raises(reskit.CircuitOpen):
        policy.call(lambda: "ok")
    clock.advance(11)
    # Half-open: with the fleet out of reach, the probe needs no lease.
    assert policy.call(lambda: "ok") == "ok"
    assert breaker.state is reskit.BreakerState.CLOSED


# -- a second review ------------------------------------------------------------------------


@pytest.fixture
def small_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the audit log of 5 entries, read 2 at a time."""
    import reskit.stores.redis as redis_store

    monkeypatch.setattr(redis_store, "MIRROR_LIMIT", 5)
    monkeypatch.setattr(redis_store, "MIRROR_CHUNK", 2)


@pytest.mark.usefixtures("small_mirror")
def test_a_log_longer_than_the_copy_never_looks_like_a_new_chain(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(store)
    for level in range(12):
        reskit.set_brownout_level(level, reason=f"step {level}", actor="ops")
    for _ in range(3):
        store.refresh()
    assert len(store._mirror) == 5 and store._mirror_start == 7  # noqa: PT018
    assert [e.action for e in store.audit()] == ["brownout"] * 12
    assert store.verify_audit().ok


@pytest.mark.usefixtures("small_mirror")
def test_a_redis_emptied_under_a_long_log_gets_the_newest_entries_as_evidence(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(store)
    reskit.kill("kept", reason="r", actor="a")
    for level in range(8):
        reskit.set_brownout_level(level, reason=f"step {level}", actor="ops")
    held = [json.loads(line)["hash"] for line in store._mirror]
    server.restart()
    store.refresh()
    assert killed_in(store, "kept") and reskit.brownout_level() == 7  # noqa: PT018
    entries = store.audit()
    evidence = [e for e in entries if e.target == "audit"]
    assert [entry["hash"] for e in evidence for entry in e.after["lost_entries"]] == held
    assert store.verify_audit().ok  # a new chain, intact, with the old one inside it


def test_each_lost_chain_is_appended_once_however_many_processes_merge(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    fleet = [synced(stores(server.url, resync_interval="3600")) for _ in range(3)]
    reskit.configure(fleet[0])
    reskit.kill("a", reason="r", actor="x")
    reskit.kill("b", reason="r", actor="x")
    for store in fleet:
        store.refresh()
    server.restart()
    newcomer = synced(stores(server.url))
    reskit.configure(newcomer)
    reskit.set_brownout_level(1, reason="first after the loss", actor="y")
    for store in fleet:  # one after the other: the lock alone would not stop this
        store.refresh()
        store.refresh()
    evidence = [e for e in newcomer.audit() if e.target == "audit"]
    assert len(evidence) == 1
    assert len(evidence[0].after["lost_entries"]) == 2
    assert killed_in(newcomer, "a") and killed_in(newcomer, "b")  # noqa: PT018
    assert newcomer.verify_audit().ok


def test_a_merge_cut_short_keeps_what_it_had_not_written_and_finishes_later(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    fleet = synced(stores(server.url, resync_interval="3600"))
    reskit.configure(fleet)
    for name in ("a", "b", "c", "d"):
        reskit.kill(name, reason="incident 1", actor="alice")
    server.restart()
    newcomer = synced(stores(server.url))
    reskit.configure(newcomer)
    reskit.set_brownout_level(10, reason="incident 2", actor="bob", tenant="t")
    original = fleet.change
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # Redis goes away after the first write-back
            raise StoreUnavailable("simulated: Redis stopped answering")
        return original(*args, **kwargs)

    fleet.change = flaky  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable, match="simulated"):
        fleet.refresh()
    fleet.change = original  # type: ignore[method-assign]
    fleet.refresh()
    for name in ("a", "b", "c", "d"):
        assert killed_in(newcomer, name), name
    evidence = [e for e in newcomer.audit() if e.target == "audit"]
    assert sum(len(e.after["lost_entries"]) for e in evidence) == 4
    assert newcomer.verify_audit().ok


def test_verify_never_sees_a_change_half_made(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = synced(stores(server.url))
    writer = synced(stores(server.url))
    stop = threading.Event()

    def write() -> None:
        level = 0
        while not stop.is_set():
            level = (level + 1) % 100
            writer.change(
                "l:",
                {"level": level, "reason": "r", "actor": "w", "at": 1.0},
                actor="w",
                action="brownout",
                target="brownout",
                reason="r",
            )

    thread = threading.Thread(target=write)
    thread.start()
    try:
        results = [store.verify_audit() for _ in range(200)]
    finally:
        stop.set()
        thread.join()
    assert [r for r in results if not r.ok] == []


def test_a_change_whose_answer_never_came_says_it_may_have_been_made(
    server: RedisServer, stores: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    store = synced(stores(server.url))
    reskit.configure(store)
    original = RedisStore._step

    def lost_answer(self: RedisStore, step: str, argument: Any) -> Any:
        reply = original(self, step, argument)
        if step == "write":
            raise redis.TimeoutError("Timeout reading from socket")
        return reply

    monkeypatch.setattr(RedisStore, "_step", lost_answer)
    with pytest.raises(StoreUnavailable, match="may or may not have been made"):
        reskit.kill("maybe", reason="r", actor="a")
    monkeypatch.setattr(RedisStore, "_step", original)
    store.refresh()
    assert killed_in(store, "maybe")  # it was made


def test_the_openfeature_provider_waits_for_the_fleet_and_reads_its_switches(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    from openfeature import api
    from openfeature.flag_evaluation import Reason

    from reskit.openfeature import Provider

    elsewhere = synced(stores(server.url))
    reskit.configure(elsewhere)
    reskit.kill("exports", reason="INC-9", actor="ops")
    here = stores(server.url)  # not read yet: the provider waits for it
    reskit.configure(here)
    try:
        api.set_provider_and_wait(Provider())
        details = api.get_client().get_boolean_details("exports", True)
        assert (details.value, details.reason) == (False, Reason.DISABLED)
        # A store never reached: undeclared switches answer by their fail mode, STALE.
        nowhere = stores(f"redis://127.0.0.1:{free_port()}/0", timeout="0.2")
        reskit.configure(nowhere)
        api.set_provider_and_wait(Provider(ready_timeout=0.1))
        details = api.get_client().get_boolean_details("exports", False)
        assert (details.value, details.reason) == (True, Reason.STALE)
    finally:
        api.shutdown()


def test_a_misspelt_url_option_is_refused_at_configure() -> None:
    with pytest.raises(ValueError, match=r"namespce.*reskit's own are namespace"):
        reskit.configure("redis://127.0.0.1:1/0?namespce=checkout")


def test_a_cluster_that_is_down_at_start_raises_nothing(stores: Callable[..., RedisStore]) -> None:
    store = stores(f"redis://127.0.0.1:{free_port()}", cluster="true", timeout="0.2")
    reskit.configure(store)  # the cluster client is made on first use, off this thread
    policy = Policy("cluster-down", kill_switch=True)
    wait_for(store, lambda s: s.stale, "the cluster out of reach")
    assert policy.call(lambda: "ok") == "ok"
    with pytest.raises(StoreUnavailable):
        reskit.kill("cluster-down", reason="r", actor="a")


def test_forget_removes_a_switch_from_the_fleet(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    here = synced(stores(server.url))
    there = synced(stores(server.url))
    reskit.configure(here)
    reskit.KillSwitch("retired", owner="team-x")
    reskit.kill("retired", reason="r", actor="a")
    wait_for(there, lambda s: killed_in(s, "retired"), "the kill")
    assert here.flush(WAIT)
    assert "retired" in there.declarations()
    reskit.forget_switch("retired", reason="code removed in v2", actor="a")
    wait_for(there, lambda s: s.snapshot().switch("retired") is None, "the forget")
    assert "retired" not in there.declarations()
    assert [e.action for e in there.audit()] == ["kill", "switch.forget"]

"""Idempotency keys on the Redis store, against real redis-server processes.

Each test gets its own server. Waits are for events: Redis lists the test
blocks on (BLPOP), conditions, barriers; leases run on the fake clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import reskit
from redis_servers import RedisServer
from reskit import IdempotencyConflict, IdempotencyMismatch, IdempotentFailure, StoreUnavailable
from reskit._idempotency import idempotent
from reskit.stores.redis import RedisIdempotencyStore, RedisStore
from reskit.testing import FakeClock
from test_idempotency import FP, aexercise_protocol, exercise_fencing, exercise_protocol

pytestmark = pytest.mark.redis

WAIT = 10.0  # real seconds an expected event may take before the test fails


@pytest.fixture
def admin(server: RedisServer) -> Iterator[Any]:
    client: Any = server.client()
    yield client
    client.close()


@pytest.fixture
def idem(server: RedisServer, stores: Callable[..., RedisStore]) -> RedisIdempotencyStore:
    return stores(server.url).idempotency()


# -- the protocol ------------------------------------------------------------------------------


def test_protocol(idem: RedisIdempotencyStore, clock: FakeClock) -> None:
    exercise_protocol(idem, clock, "order:1")


def test_fencing(idem: RedisIdempotencyStore, clock: FakeClock) -> None:
    exercise_fencing(idem, clock, "order:1")


async def test_async_protocol(idem: RedisIdempotencyStore, clock: FakeClock) -> None:
    await aexercise_protocol(idem, clock, "order:1")


def test_a_store_shares_its_records_with_another_process_view(
    server: RedisServer, stores: Callable[..., RedisStore], clock: FakeClock
) -> None:
    here = stores(server.url).idempotency()
    there = stores(server.url).idempotency()
    elsewhere = stores(server.url, namespace="other").idempotency()
    a = here.claim("k", FP, lease=5, ttl=100)
    assert there.claim("k", FP, lease=5, ttl=100).status == "conflict"
    assert elsewhere.claim("k", FP, lease=5, ttl=100).status == "claimed"  # another fleet
    assert here.complete("k", a.token, b'"done"', ttl=100)
    replay = there.claim("k", FP, lease=5, ttl=100)
    assert (replay.status, replay.value, replay.token) == ("replay", b'"done"', a.token)


def test_keys_are_hashed_and_hash_tagged(
    idem: RedisIdempotencyStore, admin: Any, clock: FakeClock
) -> None:
    secret = "customer-4242:card-charge"
    claim = idem.claim(secret, FP, lease=5, ttl=100)
    assert idem.complete(secret, claim.token, b'"ok"', ttl=100)
    keys: list[bytes] = admin.keys("*")
    assert keys
    for text in (b"4242", b"customer", b"card"):
        assert not any(text in key for key in keys), keys
    digest = hashlib.sha256(secret.encode()).hexdigest()[:40]
    ours = [key for key in keys if digest.encode() in key]
    assert len(ours) == 1
    assert re.fullmatch(rb"reskit:\{reskit/i/[0-9a-f]{40}\}", ours[0]), ours[0]
    # The hash tag is the whole name: a record is one key, in one slot of its own.
    assert admin.type(ours[0]) == b"hash"
    assert admin.hget(ours[0], "value") == b'"ok"'
    assert admin.hget(ours[0], "fp") == FP.encode()


def test_records_carry_their_ttl(idem: RedisIdempotencyStore, admin: Any, clock: FakeClock) -> None:
    claim = idem.claim("k", FP, lease=5, ttl=100)
    key = idem._key("k")
    assert 0 < admin.pttl(key) <= 100_000
    assert idem.complete("k", claim.token, b"1", ttl=500)  # the result's own ttl
    assert 100_000 < admin.pttl(key) <= 500_000
    # A claim in flight is kept at least for its lease, whatever the ttl: a call
    # running past ttl must still hold its key.
    claim = idem.claim("short", FP, lease=5, ttl=0.0001)
    assert 4_000 < admin.pttl(idem._key("short")) <= 5_000
    # Its result gets the ttl it asked for (never no expiry: PEXPIRE 1 at least).
    assert idem.complete("short", claim.token, b"1", ttl=0.0001)
    assert admin.pttl(idem._key("short")) in (1, 0, -2)


def test_the_decorator_ttl_reaches_redis(
    server: RedisServer, stores: Callable[..., RedisStore], admin: Any
) -> None:
    store = stores(server.url)
    reskit.configure(store)

    @idempotent(key=lambda: "k", ttl=timedelta(hours=1))
    def fn() -> int:
        return 1

    assert fn() == 1
    assert 3_500_000 < admin.pttl(store.idempotency()._key("k")) <= 3_600_000


# -- the decorator on Redis ------------------------------------------------------------------


def test_decorator_runs_once_and_replays(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    reskit.configure(stores(server.url))
    calls: list[str] = []

    @idempotent(key=lambda order_id, **_: f"charge:{order_id}", store_failures=(ValueError,))
    def charge(order_id: str, amount: int) -> dict[str, Any]:
        calls.append(order_id)
        if order_id == "flaky" and calls.count("flaky") == 1:
            raise ConnectionError("down")
        if order_id == "declined":
            raise ValueError("card declined")
        return {"order": order_id, "amount": amount, "items": (1, 2)}

    assert charge("o1", 5) == {"order": "o1", "amount": 5, "items": (1, 2)}
    assert charge(amount=5, order_id="o1") == {"order": "o1", "amount": 5, "items": [1, 2]}
    with pytest.raises(IdempotencyMismatch):
        charge("o1", 6)
    with pytest.raises(ConnectionError):
        charge("flaky", 1)
    assert charge("flaky", 1)["order"] == "flaky"  # released: the retry ran
    with pytest.raises(ValueError, match="card declined"):
        charge("declined", 1)
    with pytest.raises(IdempotentFailure, match="card declined") as info:
        charge("declined", 1)
    assert info.value.type_name == "ValueError"
    assert calls == ["o1", "flaky", "flaky", "declined"]


async def test_async_decorator_runs_once_and_replays(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    reskit.configure(stores(server.url))
    calls: list[str] = []

    @idempotent(key=lambda order_id: order_id)
    async def charge(order_id: str) -> str:
        calls.append(order_id)
        if calls.count(order_id) == 1 and order_id == "flaky":
            raise ConnectionError("down")
        return order_id.upper()

    assert await charge("o1") == "O1"
    assert await charge("o1") == "O1"
    with pytest.raises(ConnectionError):
        await charge("flaky")
    assert await charge("flaky") == "FLAKY"
    assert await charge("flaky") == "FLAKY"
    assert calls == ["o1", "flaky", "flaky"]


class NoRenewals(RedisIdempotencyStore):
    """The holder's renewals never land (it is paused, or partitioned from Redis)."""

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        return True


def test_a_call_whose_lease_was_taken_over_does_not_overwrite(
    server: RedisServer,
    stores: Callable[..., RedisStore],
    clock: FakeClock,
    logs: list[dict[str, Any]],
) -> None:
    store = NoRenewals(stores(server.url))
    calls: list[str] = []

    @idempotent(key=lambda: "k", store=store, lease=30)
    def fn() -> str:
        calls.append("run")
        if len(calls) == 1:
            clock.advance(31)  # this call outlives its lease; a repeat takes over
            assert fn() == "B"
            return "A"
        return "B"

    assert fn() == "A"
    assert fn() == "B"
    assert calls == ["run", "run"]
    lost = [e for e in logs if e["event"] == "reskit.idempotency.lost_claim"]
    assert [e["key"] for e in lost] == ["k"]


def test_a_hundred_threads_run_it_once(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    reskit.configure(stores(server.url))
    release = threading.Event()
    refused = threading.Condition()
    calls: list[str] = []
    outcomes: list[object] = []

    @idempotent(key=lambda: "k")
    def charge() -> str:
        calls.append("run")
        assert release.wait(WAIT)
        return "charged"

    barrier = threading.Barrier(100)

    def caller() -> None:
        barrier.wait(WAIT)
        try:
            outcome: object = charge()
        except IdempotencyConflict as exc:
            outcome = exc
        with refused:
            outcomes.append(outcome)
            refused.notify_all()

    threads = [threading.Thread(target=caller) for _ in range(100)]
    for thread in threads:
        thread.start()
    with refused:
        assert refused.wait_for(lambda: len(outcomes) == 99, WAIT)
    assert calls == ["run"]
    release.set()
    for thread in threads:
        thread.join(WAIT)
    assert sum(isinstance(o, IdempotencyConflict) for o in outcomes) == 99
    assert [o for o in outcomes if not isinstance(o, IdempotencyConflict)] == ["charged"]
    assert charge() == "charged"
    assert calls == ["run"]


async def test_a_hundred_tasks_run_it_once(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    reskit.configure(stores(server.url))
    release = asyncio.Event()
    all_refused = asyncio.Event()
    calls: list[str] = []
    refusals: list[IdempotencyConflict] = []

    @idempotent(key=lambda: "k")
    async def charge() -> str:
        calls.append("run")
        await release.wait()
        return "charged"

    async def caller() -> object:
        try:
            return await charge()
        except IdempotencyConflict as exc:
            refusals.append(exc)
            if len(refusals) == 99:
                all_refused.set()
            return exc

    tasks = [asyncio.create_task(caller()) for _ in range(100)]
    await asyncio.wait_for(all_refused.wait(), WAIT)
    assert calls == ["run"]
    release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert [o for o in outcomes if not isinstance(o, IdempotencyConflict)] == ["charged"]
    assert await charge() == "charged"
    assert calls == ["run"]


# -- several processes -------------------------------------------------------------------------

# One process: configures reskit on the test's Redis, calls charge("o1") once and
# says what happened. The call counts itself with INCR, then blocks until the
# test pushes "go", so every other process arrives while it still runs.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    import redis
    import reskit
    from reskit._idempotency import IdempotencyStore

    url, mode = sys.argv[1], sys.argv[2]
    store = reskit.configure(url)
    r = redis.Redis.from_url(url)

    class Reporting(IdempotencyStore):
        # Tells the test which processes saw the call running (wait=True hides it).
        def __init__(self, inner):
            self.inner = inner

        def claim(self, key, fingerprint, *, lease, ttl):
            claim = self.inner.claim(key, fingerprint, lease=lease, ttl=ttl)
            if claim.status == "conflict":
                r.rpush("test:conflicted", os.getpid())
            return claim

        def renew(self, key, token, *, lease):
            return self.inner.renew(key, token, lease=lease)

        def complete(self, key, token, value, *, ttl):
            return self.inner.complete(key, token, value, ttl=ttl)

        def release(self, key, token):
            self.inner.release(key, token)

        def peek(self, key):
            return self.inner.peek(key)

    @reskit.idempotent(
        key=lambda order_id: "order:" + order_id,
        wait=mode == "wait",
        store=Reporting(store.idempotency()) if mode == "wait" else None,
    )
    def charge(order_id):
        r.incr("test:executions")
        if r.blpop("test:go", timeout=60) is None:
            raise SystemExit("the test never said go")
        return {"charged": order_id, "by": os.getpid()}

    try:
        result = charge("o1")
        outcome = "ran" if result["by"] == os.getpid() else "replayed"
    except reskit.IdempotencyConflict:
        result, outcome = None, "conflict"
    r.rpush("test:outcomes", outcome)
    print(json.dumps({"outcome": outcome, "result": result}), flush=True)
    """
)


def spawn(url: str, mode: str, count: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def finish(processes: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        reports.append(json.loads(out))
    return reports


@pytest.mark.parametrize("mode", ["conflict", "wait"])
def test_several_processes_run_it_exactly_once(server: RedisServer, admin: Any, mode: str) -> None:
    processes = spawn(server.url, mode, 5)
    try:
        if mode == "conflict":
            # The four that lost the race are told so at once, while the fifth runs.
            for _ in range(4):
                popped = admin.blpop("test:outcomes", timeout=WAIT * 3)
                assert popped is not None, "a process never answered"
                assert popped[1] == b"conflict"
        else:
            # The four others wait; each saw the call running at least once.
            seen: set[bytes] = set()
            while len(seen) < 4:
                popped = admin.blpop("test:conflicted", timeout=WAIT * 3)
                assert popped is not None, "a process never saw the call running"
                seen.add(popped[1])
        assert admin.get("test:executions") == b"1"
        admin.rpush("test:go", "1")
        reports = finish(processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    outcomes = sorted(report["outcome"] for report in reports)
    ran = [report["result"] for report in reports if report["outcome"] == "ran"]
    assert len(ran) == 1
    if mode == "conflict":
        assert outcomes == ["conflict"] * 4 + ["ran"]
    else:
        assert outcomes == ["ran"] + ["replayed"] * 4
        assert all(report["result"] == ran[0] for report in reports)
    assert admin.get("test:executions") == b"1"

    # Later processes all replay the one result, without running.
    admin.delete("test:outcomes")
    reports = finish(spawn(server.url, "conflict", 5))
    assert [report["outcome"] for report in reports] == ["replayed"] * 5
    assert all(report["result"] == ran[0] for report in reports)
    assert admin.get("test:executions") == b"1"


# -- bad records, Redis down -----------------------------------------------------------------


class _Plant:
    """Unpickling this creates a file: proof that something unpickled a stored value."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _planted(
    server: RedisServer, stores: Callable[..., RedisStore], admin: Any, value: bytes
) -> tuple[Callable[[], int], Callable[[], Any]]:
    """A sync and an async function whose records (keys "k" and "ak") now hold ``value``."""
    store = stores(server.url)
    reskit.configure(store)

    @idempotent(key=lambda: "k")
    def fn() -> int:
        return 1

    @idempotent(key=lambda: "ak")
    async def afn() -> int:
        return 1

    assert fn() == 1
    assert asyncio.run(afn()) == 1
    for key in ("k", "ak"):
        assert admin.hset(store.idempotency()._key(key), "value", value) == 0  # replaced
    return fn, afn


def test_a_planted_pickle_is_never_unpickled(
    server: RedisServer, stores: Callable[..., RedisStore], admin: Any, tmp_path: Path
) -> None:
    # The payload works: unpickled, it creates its file.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Plant(proof))).close()
    assert proof.exists()

    target = tmp_path / "unpickled"
    fn, afn = _planted(server, stores, admin, pickle.dumps(_Plant(target)))
    with pytest.raises(ValueError):
        fn()
    with pytest.raises(ValueError):
        asyncio.run(afn())
    assert not target.exists()


@pytest.mark.parametrize(
    "planted",
    [b"not json", b'{"reskit.result": 1', b"\xff\xfe", b"", b"[" * 100_000 + b"]" * 100_000],
)
def test_a_planted_value_that_is_not_json_is_a_value_error(
    server: RedisServer, stores: Callable[..., RedisStore], admin: Any, planted: bytes
) -> None:
    fn, afn = _planted(server, stores, admin, planted)
    with pytest.raises(ValueError):
        fn()
    with pytest.raises(ValueError):
        asyncio.run(afn())


@pytest.mark.parametrize("planted", ["pickle", "text"])
def test_a_planted_value_that_is_not_json_is_named_in_the_error(
    server: RedisServer,
    stores: Callable[..., RedisStore],
    admin: Any,
    tmp_path: Path,
    planted: str,
) -> None:
    value = pickle.dumps(_Plant(tmp_path / "x")) if planted == "pickle" else b"not json"
    fn, _ = _planted(server, stores, admin, value)
    with pytest.raises(ValueError, match="idempotency key 'k'"):
        fn()


def test_a_planted_record_reskit_did_not_write_is_refused(
    server: RedisServer, stores: Callable[..., RedisStore], admin: Any
) -> None:
    planted = json.dumps({"__class__": "os.system", "args": ["true"]}).encode()
    fn, _ = _planted(server, stores, admin, planted)
    with pytest.raises(ValueError, match="'k' is not a result reskit stored"):
        fn()


@pytest.mark.parametrize("kind", ["string", "list", "set"])
def test_a_record_of_the_wrong_redis_type_is_store_unavailable(
    server: RedisServer, stores: Callable[..., RedisStore], admin: Any, kind: str
) -> None:
    store = stores(server.url)
    reskit.configure(store)
    key = store.idempotency()._key("k")
    {"string": admin.set, "list": admin.rpush, "set": admin.sadd}[kind](key, "planted")
    calls: list[int] = []

    @idempotent(key=lambda: "k")
    def fn() -> int:
        calls.append(1)
        return 1

    @idempotent(key=lambda: "k")
    async def afn() -> int:
        calls.append(1)
        return 1

    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        fn()
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        asyncio.run(afn())
    with pytest.raises(StoreUnavailable):
        store.idempotency().peek("k")
    assert calls == []


def test_redis_down_is_store_unavailable(
    server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(server.url)
    reskit.configure(store)
    calls: list[int] = []

    @idempotent(key=lambda: "k")
    def fn() -> int:
        calls.append(1)
        return 1

    @idempotent(key=lambda: "k")
    async def afn() -> int:
        calls.append(1)
        return 1

    assert fn() == 1
    server.kill()
    with pytest.raises(StoreUnavailable, match="cannot be used"):
        fn()
    with pytest.raises(StoreUnavailable, match="cannot be used"):
        asyncio.run(afn())
    with pytest.raises(StoreUnavailable):
        store.idempotency().peek("k")
    assert calls == [1]  # failing closed: nothing ran without its claim
    assert os.environ.get("RESKIT_STORE") is None

"""Idempotency keys: the decorator, and the protocol on the memory store.

Waits are for events, barriers and conditions, never for time to pass: leases
and expiry run on the fake clock (``clock``), and where the real clock is used
(the wait loop of ``wait=True``) the test waits for what the callers did.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

import reskit
from reskit import IdempotencyConflict, IdempotencyMismatch, IdempotentFailure, StoreUnavailable
from reskit._idempotency import (
    MAX_KEY_LENGTH,
    Claim,
    IdempotencyStore,
    JSONCodec,
    MemoryIdempotencyStore,
    _Keeper,
    fingerprint,
    idempotent,
)
from reskit.stores import MemoryStore
from reskit.testing import FakeClock

WAIT = 10.0  # real seconds an expected event may take before the test fails
FP = "f" * 64  # a fingerprint, for the store API


def _who() -> object:
    """The asyncio task running this, else the thread."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return threading.get_ident()


class WatchedStore(MemoryIdempotencyStore):
    """A memory store that records what it answered, so a test can wait for it."""

    def __init__(self, max_entries: int = 100_000) -> None:
        super().__init__(max_entries)
        self.cond = threading.Condition()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.conflicted: set[object] = set()
        self.renewals: list[bool] = []
        self.on_claim: Callable[[], None] | None = None

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        claim = super().claim(key, fingerprint, lease=lease, ttl=ttl)
        with self.cond:
            self.statuses[claim.status] += 1
            if claim.status == "conflict":
                self.conflicted.add(_who())
            self.cond.notify_all()
        if self.on_claim is not None:
            self.on_claim()
        return claim

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        kept = super().renew(key, token, lease=lease)
        with self.cond:
            self.renewals.append(kept)
            self.cond.notify_all()
        return kept

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, WAIT):
                raise AssertionError(f"timed out waiting for {what}")


def current_idempotency() -> IdempotencyStore:
    from reskit._store import current_store

    return current_store().idempotency()


# -- the protocol, shared with the Redis tests ----------------------------------------------


def exercise_protocol(store: IdempotencyStore, clock: FakeClock, key: str) -> None:
    """claim / conflict / mismatch / complete / replay / renew / release, through the sync API."""
    first = store.claim(key, FP, lease=10, ttl=100)
    assert first.status == "claimed"
    assert first.token > 0
    assert store.peek(key) == Claim("conflict", lease_until=pytest.approx(clock.wall() + 10))

    busy = store.claim(key, FP, lease=10, ttl=100)
    assert busy.status == "conflict"
    assert busy.lease_until == pytest.approx(clock.wall() + 10)
    assert store.claim(key, "0" * 64, lease=10, ttl=100).status == "mismatch"

    # Renewal keeps the claim past its first lease.
    clock.advance(8)
    assert store.renew(key, first.token, lease=10) is True
    clock.advance(8)  # 16 s after the claim: only the renewal holds it
    assert store.claim(key, FP, lease=10, ttl=100).status == "conflict"

    assert store.complete(key, first.token, b'{"ok":1}', ttl=100) is True
    replay = store.claim(key, FP, lease=10, ttl=100)
    assert replay.status == "replay"
    assert replay.value == b'{"ok":1}'
    peeked = store.peek(key)
    assert peeked is not None
    assert (peeked.status, peeked.value) == ("replay", b'{"ok":1}')
    assert store.claim(key, "0" * 64, lease=10, ttl=100).status == "mismatch"

    # A finished record is not renewed, completed again or released.
    assert store.renew(key, first.token, lease=10) is False
    assert store.complete(key, first.token, b'"again"', ttl=100) is False
    store.release(key, first.token)
    assert store.claim(key, FP, lease=10, ttl=100).value == b'{"ok":1}'

    # Release gives a running claim back: the next claim runs it again.
    other = key + ":released"
    held = store.claim(other, FP, lease=10, ttl=100)
    store.release(other, held.token)
    assert store.peek(other) is None
    again = store.claim(other, FP, lease=10, ttl=100)
    assert again.status == "claimed"
    assert again.token != held.token


def exercise_fencing(store: IdempotencyStore, clock: FakeClock, key: str) -> None:
    """A holder whose lease was taken over can neither write, renew nor release."""
    a = store.claim(key, FP, lease=5, ttl=100)
    assert a.status == "claimed"
    clock.advance(4.9)
    assert store.claim(key, FP, lease=5, ttl=100).status == "conflict"
    clock.advance(0.2)  # past A's lease: A is paused, crashed or partitioned
    b = store.claim(key, FP, lease=5, ttl=100)
    assert b.status == "claimed"
    assert b.token != a.token

    assert store.renew(key, a.token, lease=5) is False
    store.release(key, a.token)  # stale: does nothing
    assert store.claim(key, FP, lease=5, ttl=100).status == "conflict"  # B still holds it

    assert store.complete(key, b.token, b'"B"', ttl=100) is True
    assert store.complete(key, a.token, b'"A"', ttl=100) is False
    replay = store.claim(key, FP, lease=5, ttl=100)
    assert replay.status == "replay"
    assert replay.value == b'"B"'
    store.release(key, a.token)
    store.release(key, b.token)
    assert store.claim(key, FP, lease=5, ttl=100).value == b'"B"'

    # A stale token that completes before the new holder does is fenced too.
    key2 = key + ":2"
    a = store.claim(key2, FP, lease=5, ttl=100)
    clock.advance(6)
    b = store.claim(key2, FP, lease=5, ttl=100)
    assert store.complete(key2, a.token, b'"A"', ttl=100) is False
    assert store.claim(key2, FP, lease=5, ttl=100).status == "conflict"
    assert store.complete(key2, b.token, b'"B"', ttl=100) is True
    assert store.claim(key2, FP, lease=5, ttl=100).value == b'"B"'


async def aexercise_protocol(store: IdempotencyStore, clock: FakeClock, key: str) -> None:
    """The same through the async methods."""
    first = await store.aclaim(key, FP, lease=10, ttl=100)
    assert first.status == "claimed"
    assert (await store.apeek(key)) == Claim(
        "conflict", lease_until=pytest.approx(clock.wall() + 10)
    )
    assert (await store.aclaim(key, FP, lease=10, ttl=100)).status == "conflict"
    assert (await store.aclaim(key, "0" * 64, lease=10, ttl=100)).status == "mismatch"
    clock.advance(8)
    assert await store.arenew(key, first.token, lease=10) is True
    clock.advance(8)
    assert (await store.aclaim(key, FP, lease=10, ttl=100)).status == "conflict"
    assert await store.acomplete(key, first.token, b"[1]", ttl=100) is True
    assert await store.acomplete(key, first.token, b"[2]", ttl=100) is False
    replay = await store.aclaim(key, FP, lease=10, ttl=100)
    assert (replay.status, replay.value) == ("replay", b"[1]")
    assert await store.arenew(key, first.token, lease=10) is False

    other = key + ":released"
    held = await store.aclaim(other, FP, lease=10, ttl=100)
    await store.arelease(other, held.token + 1)  # not its token: nothing happens
    assert (await store.aclaim(other, FP, lease=10, ttl=100)).status == "conflict"
    await store.arelease(other, held.token)
    assert (await store.apeek(other)) is None
    assert (await store.aclaim(other, FP, lease=10, ttl=100)).status == "claimed"

    # Fencing, async.
    fenced = key + ":fenced"
    a = await store.aclaim(fenced, FP, lease=5, ttl=100)
    clock.advance(6)
    b = await store.aclaim(fenced, FP, lease=5, ttl=100)
    assert b.status == "claimed"
    assert await store.arenew(fenced, a.token, lease=5) is False
    await store.arelease(fenced, a.token)
    assert await store.acomplete(fenced, b.token, b'"B"', ttl=100) is True
    assert await store.acomplete(fenced, a.token, b'"A"', ttl=100) is False
    assert (await store.aclaim(fenced, FP, lease=5, ttl=100)).value == b'"B"'


# -- the memory store -----------------------------------------------------------------------


def test_memory_store_protocol(clock: FakeClock) -> None:
    exercise_protocol(MemoryIdempotencyStore(), clock, "order:1")


def test_memory_store_fencing(clock: FakeClock) -> None:
    exercise_fencing(MemoryIdempotencyStore(), clock, "order:1")


async def test_memory_store_async_protocol(clock: FakeClock) -> None:
    await aexercise_protocol(MemoryIdempotencyStore(), clock, "order:1")


def test_memory_store_records_expire_after_ttl(clock: FakeClock) -> None:
    store = MemoryIdempotencyStore()
    claim = store.claim("k", FP, lease=5, ttl=100)
    assert store.complete("k", claim.token, b"1", ttl=50)  # the result's ttl counts from now
    clock.advance(49.9)
    assert store.claim("k", FP, lease=5, ttl=100).status == "replay"
    clock.advance(0.2)
    assert store.peek("k") is None
    assert store.claim("k", FP, lease=5, ttl=100).status == "claimed"


def test_memory_store_refuses_a_bad_size() -> None:
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_entries must be a whole number >= 1"):
            MemoryIdempotencyStore(bad)  # type: ignore[arg-type]


def test_memory_store_stays_bounded_over_a_million_keys(clock: FakeClock) -> None:
    store = MemoryIdempotencyStore(max_entries=10_000)
    most = heap_most = 0
    for i in range(1_000_000):
        key = f"k{i}"
        claim = store.claim(key, FP, lease=0.1, ttl=0.5)
        if i % 3 == 0:
            store.complete(key, claim.token, b"1", ttl=0.5)
        elif i % 3 == 1:
            store.release(key, claim.token)
        # else: claimed and abandoned, never read again
        if i % 100 == 99:
            clock.advance(0.01)  # 100 keys per 10 ms: 5,000 alive in any 0.5 s
        most = max(most, len(store))
        heap_most = max(heap_most, len(store._expiry))
    assert most <= 10_000
    assert heap_most <= 3 * 10_000
    # None of those keys was read again, yet they were all reclaimed.
    clock.advance(1)
    assert store.claim("last", FP, lease=1, ttl=1).status == "claimed"
    assert len(store) == 1
    assert len(store._expiry) <= 64 + 3


def test_memory_store_reclaims_expired_keys_nobody_reads(clock: FakeClock) -> None:
    store = MemoryIdempotencyStore(max_entries=3)
    for key in ("a", "b", "c"):
        store.claim(key, FP, lease=1, ttl=10)
    clock.advance(10)
    for key in ("d", "e", "f"):
        assert store.claim(key, FP, lease=1, ttl=10).status == "claimed"
    assert sorted(store._entries) == ["d", "e", "f"]


def test_memory_store_fails_closed_when_full_of_live_keys(clock: FakeClock) -> None:
    store = MemoryIdempotencyStore(max_entries=5)
    tokens = {key: store.claim(key, FP, lease=100, ttl=60).token for key in "abcde"}
    store.complete("a", tokens["a"], b'"A"', ttl=60)
    with pytest.raises(StoreUnavailable, match=r"full \(5 live keys\).*max_entries"):
        store.claim("f", FP, lease=100, ttl=60)
    assert len(store) == 5
    # No live key was evicted: each still answers as before.
    assert store.claim("a", FP, lease=100, ttl=60).value == b'"A"'
    for key in "bcde":
        assert store.claim(key, FP, lease=100, ttl=60).status == "conflict"
    # An existing key is still served when full; a new one after expiry is accepted.
    # The result "a" expires after its ttl; the claims still in flight are kept for
    # their lease (a call running past ttl still holds its key).
    clock.advance(60)
    assert store.claim("f", FP, lease=100, ttl=60).status == "claimed"
    assert len(store) == 5
    clock.advance(40)
    assert store.claim("g", FP, lease=100, ttl=60).status == "claimed"
    assert len(store) == 2  # b-e reclaimed unread; f and g live


# -- the decorator: basics ---------------------------------------------------------------------


def test_first_call_runs_and_repeats_replay() -> None:
    calls: list[tuple[str, int]] = []

    @idempotent(key=lambda order_id, **_: f"charge:{order_id}")
    def charge(order_id: str, amount: int, currency: str = "EUR") -> dict[str, Any]:
        calls.append((order_id, amount))
        return {"order": order_id, "amount": amount, "currency": currency}

    assert charge("o1", 5) == {"order": "o1", "amount": 5, "currency": "EUR"}
    assert charge("o1", 5) == {"order": "o1", "amount": 5, "currency": "EUR"}
    # By name or by position, defaults spelled out or not: the same call.
    assert charge(order_id="o1", amount=5) == {"order": "o1", "amount": 5, "currency": "EUR"}
    assert charge("o1", amount=5, currency="EUR")["amount"] == 5
    assert calls == [("o1", 5)]

    with pytest.raises(IdempotencyMismatch, match="'charge:o1' was used before with different"):
        charge("o1", 6)
    with pytest.raises(IdempotencyMismatch):
        charge("o1", 5, "USD")
    assert charge("o2", 6)["amount"] == 6
    assert calls == [("o1", 5), ("o2", 6)]
    assert charge.__name__ == "charge"


async def test_async_first_call_runs_and_repeats_replay() -> None:
    calls: list[tuple[str, int]] = []

    @idempotent(key=lambda order_id, **_: f"charge:{order_id}")
    async def charge(order_id: str, amount: int, currency: str = "EUR") -> dict[str, Any]:
        calls.append((order_id, amount))
        await asyncio.sleep(0)
        return {"order": order_id, "amount": amount}

    assert await charge("o1", 5) == {"order": "o1", "amount": 5}
    assert await charge(amount=5, order_id="o1") == {"order": "o1", "amount": 5}
    assert await charge("o1", 5, currency="EUR") == {"order": "o1", "amount": 5}
    assert calls == [("o1", 5)]
    with pytest.raises(IdempotencyMismatch):
        await charge("o1", 7)
    assert calls == [("o1", 5)]


def test_the_store_argument_picks_where_records_live() -> None:
    own = MemoryIdempotencyStore()
    a_store = MemoryStore()
    calls: list[str] = []

    @idempotent(key=lambda: "k", store=own)
    def one() -> str:
        calls.append("one")
        return "one"

    @idempotent(key=lambda: "k", store=a_store)
    def two() -> str:
        calls.append("two")
        return "two"

    @idempotent(key=lambda: "k")
    def three() -> str:
        calls.append("three")
        return "three"

    assert (one(), one(), two(), two(), three(), three()) == (
        "one",
        "one",
        "two",
        "two",
        "three",
        "three",
    )
    assert calls == ["one", "two", "three"]
    assert own.peek("k") is not None
    assert a_store.idempotency().peek("k") is not None
    assert current_idempotency().peek("k") is not None
    # The configured store is read at call time: a new one has no record.
    reskit.configure(MemoryStore())
    assert three() == "three"
    assert calls == ["one", "two", "three", "three"]


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_failure_releases_the_claim_so_a_retry_runs(is_async: bool) -> None:
    calls: list[int] = []

    def body() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("gateway down")
        return "charged"

    if is_async:

        @idempotent(key=lambda: "k")
        async def acharge() -> str:
            return body()

        with pytest.raises(ConnectionError, match="gateway down"):
            await acharge()
        assert current_idempotency().peek("k") is None
        assert await acharge() == "charged"
        assert await acharge() == "charged"
    else:

        @idempotent(key=lambda: "k")
        def charge() -> str:
            return body()

        with pytest.raises(ConnectionError, match="gateway down"):
            charge()
        assert current_idempotency().peek("k") is None
        assert charge() == "charged"
        assert charge() == "charged"
    assert len(calls) == 2


async def test_a_cancelled_async_call_gives_its_claim_back() -> None:
    started = asyncio.Event()
    calls: list[int] = []

    @idempotent(key=lambda: "k")
    async def slow() -> str:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            await asyncio.Event().wait()  # until cancelled
        return "done"

    task = asyncio.create_task(slow())
    await started.wait()
    with pytest.raises(IdempotencyConflict):
        await slow()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await slow() == "done"
    assert len(calls) == 2


@pytest.mark.parametrize("is_async", [False, True])
async def test_stored_failures_replay_as_idempotent_failure(is_async: bool) -> None:
    calls: list[int] = []

    def body(card: str) -> str:
        calls.append(1)
        if card == "bad":
            raise ValueError("card declined")
        if card == "flaky":
            raise KeyError("not stored")
        return "ok"

    if is_async:

        @idempotent(key=lambda card: card, store_failures=(ValueError,))
        async def afn(card: str) -> str:
            return body(card)

        async def fn(card: str) -> str:
            return await afn(card)
    else:

        @idempotent(key=lambda card: card, store_failures=(ValueError,))
        def sfn(card: str) -> str:
            return body(card)

        async def fn(card: str) -> str:
            return sfn(card)

    with pytest.raises(ValueError, match="card declined"):  # the first call: its own exception
        await fn("bad")
    for _ in range(2):
        with pytest.raises(IdempotentFailure, match="'bad' failed: card declined") as info:
            await fn("bad")
        assert info.value.type_name == "ValueError"
        assert isinstance(info.value, reskit.ReskitError)
    assert len(calls) == 1

    # An exception not listed is not stored: a retry runs again.
    with pytest.raises(KeyError):
        await fn("flaky")
    with pytest.raises(KeyError):
        await fn("flaky")
    assert len(calls) == 3


def test_results_go_through_json() -> None:
    @idempotent(key=lambda: "k")
    def pair() -> Any:
        return (1, "two", {"three": [3.0, None, True]})

    assert pair() == (1, "two", {"three": [3.0, None, True]})  # the first call: as returned
    assert pair() == [1, "two", {"three": [3.0, None, True]}]  # a repeat: as JSON gave it back
    record = current_idempotency().peek("k")
    assert record is not None
    assert record.value == b'{"reskit.result":[1,"two",{"three":[3.0,null,true]}]}'


def test_a_custom_codec_round_trips_other_types() -> None:
    def default(value: object) -> object:
        if isinstance(value, Decimal):
            return {"__decimal__": str(value)}
        raise TypeError(f"no JSON for {type(value).__name__}")

    def hook(obj: dict[str, Any]) -> Any:
        return Decimal(obj["__decimal__"]) if set(obj) == {"__decimal__"} else obj

    codec = JSONCodec(default=default, object_hook=hook)
    calls: list[int] = []

    @idempotent(key=lambda: "k", codec=codec)
    def total() -> dict[str, Decimal]:
        calls.append(1)
        return {"total": Decimal("10.05")}

    assert total() == {"total": Decimal("10.05")}
    replayed = total()
    assert replayed == {"total": Decimal("10.05")}
    assert isinstance(replayed["total"], Decimal)
    assert calls == [1]
    assert codec.decode(codec.encode([Decimal("1.5")])) == [Decimal("1.5")]


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_result_json_cannot_take_raises_type_error_and_gives_the_claim_back(
    is_async: bool, clock: FakeClock
) -> None:
    calls: list[int] = []

    if is_async:

        @idempotent(key=lambda: "k", lease=5)
        async def afn() -> object:
            calls.append(1)
            return object()

        async def make() -> object:
            return await afn()
    else:

        @idempotent(key=lambda: "k", lease=5)
        def sfn() -> object:
            calls.append(1)
            return object()

        async def make() -> object:
            return sfn()

    with pytest.raises(TypeError, match="not JSON serializable"):
        await make()
    assert calls == [1]
    # Nothing to store: the claim is given back at once (not left to look "still
    # running" until its lease runs out), so a repeat runs it again.
    assert current_idempotency().peek("k") is None
    with pytest.raises(TypeError, match="not JSON serializable"):
        await make()
    assert calls == [1, 1]


def test_generators_are_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="cannot protect a generator"):

        @idempotent(key=lambda: "k")
        def gen() -> Any:
            yield 1

    with pytest.raises(TypeError, match="cannot protect a generator"):

        @idempotent(key=lambda: "k")
        async def agen() -> Any:
            yield 1


@pytest.mark.parametrize(
    ("made", "error"),
    [
        ("", ValueError),
        ("x" * (MAX_KEY_LENGTH + 1), ValueError),
        (42, ValueError),
        (None, ValueError),
        (b"bytes", ValueError),
    ],
)
def test_a_bad_key_is_refused_before_running(made: object, error: type[Exception]) -> None:
    calls: list[int] = []

    @idempotent(key=lambda: made)  # type: ignore[arg-type,return-value]
    def fn() -> int:
        calls.append(1)
        return 1

    with pytest.raises(error, match=r"idempotency key must be a string of 1 to 255 characters"):
        fn()
    assert calls == []


def test_the_longest_key_is_accepted() -> None:
    @idempotent(key=lambda: "x" * MAX_KEY_LENGTH)
    def fn() -> int:
        return 1

    assert fn() == fn() == 1


@pytest.mark.parametrize("what", ["ttl", "lease"])
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "must be > 0 seconds"),
        (-1, ValueError, "must be > 0 seconds"),
        (float("nan"), ValueError, "must be a finite number"),
        (float("inf"), ValueError, "must be a finite number"),
        ("30", TypeError, "must be a number of seconds or a timedelta"),
        (True, TypeError, "must be a number of seconds or a timedelta"),
        (timedelta(0), ValueError, "must be > 0 seconds"),
    ],
)
def test_bad_durations_are_refused(
    what: str, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=rf"idempotent\(\) {what} {message}"):
        idempotent(key=lambda: "k", **{what: value})  # type: ignore[arg-type]


def test_timedelta_durations_are_accepted() -> None:
    @idempotent(key=lambda: "k", ttl=timedelta(hours=1), lease=timedelta(seconds=5))
    def fn() -> int:
        return 1

    assert fn() == 1


@pytest.mark.parametrize(
    "bad",
    [[ValueError], ValueError, (ValueError, "KeyError"), (int,), (ValueError(),), {ValueError}],
)
def test_store_failures_must_be_a_tuple_of_exception_classes(bad: object) -> None:
    with pytest.raises(TypeError, match="store_failures= must be a tuple of exception classes"):
        idempotent(key=lambda: "k", store_failures=bad)  # type: ignore[arg-type]


def test_key_must_be_callable() -> None:
    with pytest.raises(TypeError, match="key= must be a function of the call's arguments"):
        idempotent(key="order:1")  # type: ignore[arg-type]


def test_arguments_that_are_not_json_need_a_fingerprint() -> None:
    calls: list[object] = []

    @idempotent(key=lambda client, order_id: order_id)
    def charge(client: object, order_id: str) -> str:
        calls.append(client)
        return order_id

    with pytest.raises(TypeError, match=r"type object: pass fingerprint=lambda \*args"):
        charge(object(), "o1")
    assert calls == []
    assert current_idempotency().peek("o1") is None  # refused before claiming

    @idempotent(
        key=lambda client, order_id: order_id,
        fingerprint=lambda client, order_id: order_id,
    )
    def charge2(client: object, order_id: str) -> str:
        calls.append(client)
        return order_id

    assert charge2(object(), "o2") == "o2"
    assert charge2(object(), "o2") == "o2"  # another client object: the same call
    assert len(calls) == 1


@dataclasses.dataclass
class Order:
    order_id: str
    amount: int


@dataclasses.dataclass
class Refund:
    order_id: str
    amount: int


def test_dataclass_and_bytes_arguments_are_fingerprinted() -> None:
    calls: list[object] = []

    @idempotent(key=lambda order, **_: order.order_id)
    def charge(order: Order | Refund, memo: bytes = b"") -> int:
        calls.append(order)
        return order.amount

    assert charge(Order("o1", 5), b"\x00\xff") == 5
    assert charge(Order("o1", 5), bytearray(b"\x00\xff")) == 5
    assert charge(order=Order("o1", 5), memo=b"\x00\xff") == 5
    assert len(calls) == 1
    with pytest.raises(IdempotencyMismatch):
        charge(Order("o1", 6), b"\x00\xff")
    with pytest.raises(IdempotencyMismatch):
        charge(Order("o1", 5), b"\x00\xfe")
    with pytest.raises(IdempotencyMismatch):
        charge(Refund("o1", 5), b"\x00\xff")  # another type, the same fields
    assert len(calls) == 1


def test_set_arguments_of_strings_and_numbers_are_fingerprinted() -> None:
    calls: list[object] = []

    @idempotent(key=lambda order_id, **_: order_id)
    def tag(order_id: str, tags: frozenset[str]) -> int:
        calls.append(tags)
        return len(tags)

    assert tag("o1", frozenset({"a", "b"})) == 2
    assert tag("o1", frozenset({"b", "a"})) == 2
    with pytest.raises(IdempotencyMismatch):
        tag("o1", frozenset({"a"}))
    assert len(calls) == 1
    assert fingerprint({1, 2}) == fingerprint({2, 1})
    assert fingerprint({b"x", b"y"}) == fingerprint(frozenset({b"y", b"x"}))


def test_fingerprint_is_canonical() -> None:
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint(b"ab") == fingerprint(bytearray(b"ab"))
    assert fingerprint(b"ab") != fingerprint("ab")
    assert fingerprint(Order("o", 1)) != fingerprint(Refund("o", 1))
    assert fingerprint(Order("o", 1)) != fingerprint({"order_id": "o", "amount": 1})
    assert len(fingerprint("x")) == 64


def test_a_conflict_says_when_to_retry(clock: FakeClock) -> None:
    seen: list[IdempotencyConflict] = []

    @idempotent(key=lambda: "k", lease=30)
    def reentrant() -> str:
        clock.advance(10)
        try:
            reentrant()
        except IdempotencyConflict as exc:
            seen.append(exc)
        return "outer"

    assert reentrant() == "outer"
    assert len(seen) == 1
    assert seen[0].retry_after == pytest.approx(20)
    assert "'k' is still running" in str(seen[0])


# -- exactly once under concurrency ------------------------------------------------------------


def test_a_hundred_threads_run_it_once_the_others_conflict() -> None:
    store = WatchedStore()
    release = threading.Event()
    calls: list[str] = []

    @idempotent(key=lambda order_id: f"order:{order_id}", store=store)
    def charge(order_id: str) -> dict[str, str]:
        calls.append(order_id)
        assert release.wait(WAIT)
        return {"charged": order_id}

    barrier = threading.Barrier(100)
    outcomes: list[object] = []

    def caller() -> None:
        barrier.wait(WAIT)
        try:
            outcomes.append(charge("o1"))
        except IdempotencyConflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(100)]
    for thread in threads:
        thread.start()
    store.wait_for(lambda: store.statuses["conflict"] == 99, "99 conflicts")
    assert calls == ["o1"]  # still running while the others arrived
    release.set()
    for thread in threads:
        thread.join(WAIT)
    assert calls == ["o1"]
    assert sum(isinstance(o, IdempotencyConflict) for o in outcomes) == 99
    assert [o for o in outcomes if not isinstance(o, IdempotencyConflict)] == [{"charged": "o1"}]
    assert store.statuses == {"claimed": 1, "conflict": 99}
    assert charge("o1") == {"charged": "o1"}
    assert calls == ["o1"]


def test_a_hundred_threads_that_wait_all_get_the_one_result() -> None:
    # The real clock: the waiters sleep for real between claims (10 ms, doubling
    # to 500 ms); the test waits for all of them to have seen the call running.
    store = WatchedStore()
    release = threading.Event()
    calls: list[str] = []

    @idempotent(key=lambda order_id: f"order:{order_id}", store=store, wait=True)
    def charge(order_id: str) -> dict[str, str]:
        calls.append(order_id)
        assert release.wait(WAIT)
        return {"charged": order_id}

    barrier = threading.Barrier(100)
    outcomes: list[object] = []

    def caller() -> None:
        barrier.wait(WAIT)
        try:
            outcomes.append(charge("o1"))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(100)]
    for thread in threads:
        thread.start()
    store.wait_for(lambda: len(store.conflicted) == 99, "99 callers to see it running")
    assert calls == ["o1"]
    release.set()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert calls == ["o1"]
    assert outcomes == [{"charged": "o1"}] * 100
    assert store.statuses["claimed"] == 1
    assert store.statuses["replay"] == 99


async def test_a_hundred_tasks_run_it_once_the_others_conflict() -> None:
    store = WatchedStore()
    release = asyncio.Event()
    calls: list[str] = []

    @idempotent(key=lambda order_id: f"order:{order_id}", store=store)
    async def charge(order_id: str) -> dict[str, str]:
        calls.append(order_id)
        await release.wait()
        return {"charged": order_id}

    async def caller() -> object:
        try:
            return await charge("o1")
        except IdempotencyConflict as exc:
            return exc

    tasks = [asyncio.create_task(caller()) for _ in range(100)]
    all_refused = asyncio.Event()
    store.on_claim = lambda: all_refused.set() if store.statuses["conflict"] == 99 else None
    await asyncio.wait_for(all_refused.wait(), WAIT)
    assert calls == ["o1"]
    release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert calls == ["o1"]
    assert sum(isinstance(o, IdempotencyConflict) for o in outcomes) == 99
    assert [o for o in outcomes if not isinstance(o, IdempotencyConflict)] == [{"charged": "o1"}]
    assert await charge("o1") == {"charged": "o1"}
    assert calls == ["o1"]


async def test_a_hundred_tasks_that_wait_all_get_the_one_result() -> None:
    store = WatchedStore()
    release = asyncio.Event()
    calls: list[str] = []

    @idempotent(key=lambda order_id: f"order:{order_id}", store=store, wait=True)
    async def charge(order_id: str) -> dict[str, str]:
        calls.append(order_id)
        await release.wait()
        return {"charged": order_id}

    all_waiting = asyncio.Event()
    store.on_claim = lambda: all_waiting.set() if len(store.conflicted) == 99 else None
    tasks = [asyncio.create_task(charge("o1")) for _ in range(100)]
    await asyncio.wait_for(all_waiting.wait(), WAIT)
    assert calls == ["o1"]
    release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert outcomes == [{"charged": "o1"}] * 100
    assert calls == ["o1"]
    assert store.statuses["claimed"] == 1
    assert store.statuses["replay"] == 99


# -- leases: taken over, renewed -----------------------------------------------------------


class NoRenewals(MemoryIdempotencyStore):
    """The holder's renewals never land (it is paused, or partitioned from the store)."""

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        return True


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_call_whose_lease_was_taken_over_does_not_overwrite(
    is_async: bool, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    store = NoRenewals()
    calls: list[str] = []

    def body() -> str:
        calls.append("run")
        if len(calls) == 1:
            clock.advance(31)  # this call outlives its lease...
            return "A"
        return "B"  # ...and a repeat takes the key over, runs, and stores this

    if is_async:

        @idempotent(key=lambda: "k", store=store, lease=30)
        async def afn() -> str:
            if len(calls) == 0:
                result = body()
                assert await afn() == "B"  # the takeover, while A still runs
                return result
            return body()

        first = await afn()
        repeat = await afn()
    else:

        @idempotent(key=lambda: "k", store=store, lease=30)
        def fn() -> str:
            if len(calls) == 0:
                result = body()
                assert fn() == "B"
                return result
            return body()

        first = fn()
        repeat = fn()

    assert first == "A"  # the late caller gets what its own call returned
    assert repeat == "B"  # but the newer result stands
    assert calls == ["run", "run"]
    lost = [e for e in logs if e["event"] == "reskit.idempotency.lost_claim"]
    assert len(lost) == 1
    assert lost[0]["key"] == "k"
    assert lost[0]["log_level"] == "warning"


def test_a_long_call_keeps_its_claim(clock: FakeClock) -> None:
    store = WatchedStore()
    started = threading.Event()
    finish = threading.Event()

    @idempotent(key=lambda: "long", store=store, lease=3.0)
    def long_call() -> str:
        started.set()
        assert finish.wait(WAIT)
        return "done"

    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(long_call()))
    worker.start()
    assert started.wait(WAIT)
    print_ = store._entries["long"].fingerprint
    for step in range(1, 31):  # 15 s of fake time, five leases, in half-second steps
        clock.advance(0.5)
        if step % 2 == 0:  # the keeper renews every lease/3 = 1 s
            store.wait_for(lambda n=step // 2: len(store.renewals) >= n, f"renewal {step // 2}")
        assert store.claim("long", print_, lease=3.0, ttl=60).status == "conflict", step
    assert store.renewals == [True] * 15
    finish.set()
    worker.join(WAIT)
    assert results == ["done"]
    assert store.claim("long", print_, lease=3.0, ttl=60).status == "replay"


class _HookedWake(threading.Event):
    """The keeper's wake-up event: a hook on ``clear``, and what the keeper did next."""

    def __init__(self, keeper: _Keeper) -> None:
        super().__init__()
        self.keeper = keeper
        self.on_clear: Callable[[], None] | None = None
        self.fired = False
        self.idle_with_claims: list[bool] = []
        self.settled = threading.Event()  # the keeper waits again, after the hook fired

    def clear(self) -> None:
        hook, self.on_clear = self.on_clear, None
        if hook is not None:
            hook()
            self.fired = True
        super().clear()

    def is_set(self) -> bool:  # polled by FakeClock.wait_until: waiting for a due renewal
        if self.fired:
            self.settled.set()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:  # the keeper's idle wait
        if self.fired:
            self.idle_with_claims.append(bool(self.keeper._claims))
            self.settled.set()
        return super().wait(timeout)


def test_a_claim_registered_while_the_keeper_goes_idle_is_not_missed(clock: FakeClock) -> None:
    store = WatchedStore()
    keeper = _Keeper()
    wake = _HookedWake(keeper)
    keeper._wake = wake
    first = keeper.hold(store, "a", 1, 3.0)
    clock.wait_for_waiting(1)  # the keeper waits for the first claim's renewal
    keeper.drop(first)
    # A call registers at the worst moment: after the keeper saw no claims,
    # before it clears its wake-up event.
    wake.on_clear = lambda: keeper.hold(store, "b", 2, 3.0) and None
    try:
        wake.set()
        assert wake.settled.wait(WAIT)
        assert wake.idle_with_claims == [], "the keeper went idle with a claim to renew"
        clock.advance(1.0)  # a third of the new claim's lease
        store.wait_for(lambda: len(store.renewals) == 1, "the new claim's renewal")
    finally:
        with keeper._lock:
            keeper._claims.clear()  # this keeper's thread goes (and stays) idle
        wake.set()


# -- misc -------------------------------------------------------------------------------------


def test_a_replayed_record_reskit_did_not_write_is_refused() -> None:
    @idempotent(key=lambda: "k")
    def fn() -> int:
        return 1

    assert fn() == 1
    store = current_idempotency()
    assert isinstance(store, MemoryIdempotencyStore)
    store._entries["k"].value = b'{"something":"else"}'
    with pytest.raises(ValueError, match="'k' is not a result reskit stored"):
        fn()


# -- found in review -------------------------------------------------------------------------


def test_a_call_running_past_its_ttl_still_holds_its_key(clock: FakeClock) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    @idempotent(key=lambda order, **_: f"slow:{order}", ttl=1, lease=10)
    def slow(order: str) -> str:
        runs.append(order)
        started.set()
        release.wait(30)  # a deadlock guard only: the test sets it
        return "done"

    first = threading.Thread(target=slow, args=("o",))
    first.start()
    assert started.wait(30)
    clock.advance(2)  # past the ttl, within the lease
    with pytest.raises(IdempotencyConflict):
        slow("o")
    release.set()
    first.join()
    assert runs == ["o"]
    assert slow("o") == "done"  # now the result, kept for its ttl


@pytest.mark.parametrize(
    "planted",
    [b'{"reskit.failure": {}}', b'{"reskit.failure": "boom"}', b'{"reskit.failure": {"type": 1}}'],
)
def test_a_planted_failure_record_is_a_clear_error(planted: bytes) -> None:
    store = MemoryIdempotencyStore()

    @idempotent(
        key=lambda order, **_: f"charge:{order}", store=store, fingerprint=lambda order: order
    )
    def charge(order: str) -> str:
        raise AssertionError("a stored record must never run the call again")

    claim = store.claim("charge:x", fingerprint(charge.__qualname__, "x"), lease=5, ttl=60)
    store.complete("charge:x", claim.token, planted, ttl=60)
    with pytest.raises(ValueError, match=r"not one reskit wrote"):
        charge("x")


async def test_a_claim_that_lands_after_its_caller_was_cancelled_is_given_back() -> None:
    landed = threading.Event()

    class SlowStore(MemoryIdempotencyStore):
        async def aclaim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Any:
            claim = await asyncio.to_thread(self.claim, key, fingerprint, lease=lease, ttl=ttl)
            await asyncio.sleep(0)  # the caller is cancelled while this is in flight
            landed.set()
            return claim

    store = SlowStore()
    runs = 0

    @idempotent(key=lambda order, **_: f"c:{order}", store=store)
    async def charge(order: str) -> str:
        nonlocal runs
        runs += 1
        return "ok"

    task = asyncio.create_task(charge("o"))
    await asyncio.sleep(0)  # started: its claim is on the way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while not landed.is_set() or len(store) or asyncio.all_tasks() - {asyncio.current_task()}:
        await asyncio.sleep(0)  # let the claim land and its give-back run
    assert await charge("o") == "ok"  # not a conflict: the stray claim was given back
    assert runs == 1

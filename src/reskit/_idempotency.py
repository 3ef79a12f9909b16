"""Idempotency keys: run a call once per key, replay its result to every repeat.

The protocol, for the decorator and the HTTP middleware alike, is three steps on
an :class:`IdempotencyStore`:

``claim(key, fingerprint, lease, ttl)``
    one atomic step that answers with a :class:`Claim`: ``claimed`` (run it; here
    is your fencing ``token``), ``replay`` (it ran: here is what it stored),
    ``conflict`` (another caller is running it now) or ``mismatch`` (the key was
    used with different arguments).
``complete(key, token, value, ttl)``
    stores the result, only if ``token`` still holds the claim: a holder whose
    lease ran out (paused, partitioned) and was taken over cannot overwrite the
    newer result. ``renew`` extends a lease while a long call runs; ``release``
    gives the claim up (a failed call, so a retry can run it again).

Values are bytes the caller encoded (JSON through a :class:`JSONCodec` for the
decorator); a store never unpickles anything. Times are reskit's wall clock, so
a fake clock drives leases and expiry in tests.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import heapq
import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Generator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from . import _clock, _fork, _telemetry
from ._errors import IdempotencyConflict, IdempotencyMismatch, IdempotentFailure, ReskitError

if TYPE_CHECKING:
    from ._store import Store

__all__ = [
    "Claim",
    "IdempotencyStore",
    "JSONCodec",
    "MemoryIdempotencyStore",
    "fingerprint",
    "idempotent",
]

P = ParamSpec("P")
R = TypeVar("R")

#: The longest idempotency key the decorator and the middleware accept.
MAX_KEY_LENGTH = 255


# -- the claim and the stores ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`IdempotencyStore.claim` answered.

    ``status`` is ``"claimed"`` (run the call; ``token`` fences its writes),
    ``"replay"`` (``value`` is what the first call stored), ``"conflict"``
    (another holder's lease runs until ``lease_until``) or ``"mismatch"`` (the
    key was first used with another fingerprint).

    .. versionadded:: 0.1.0
    """

    status: Literal["claimed", "replay", "conflict", "mismatch"]
    token: int = 0
    value: bytes | None = None
    lease_until: float | None = None


class IdempotencyStore:
    """Where idempotency records live; see the module docstring for the protocol.

    The async methods call the sync ones by default, which is right for a store
    that never waits (memory); a store with network I/O overrides them.

    .. versionadded:: 0.1.0
    """

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        raise NotImplementedError

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        """Extend the lease of ``token``'s claim; ``False`` if it lost the claim."""
        raise NotImplementedError

    def complete(self, key: str, token: int, value: bytes, *, ttl: float) -> bool:
        """Store ``value`` for ``key`` if ``token`` still holds the claim."""
        raise NotImplementedError

    def release(self, key: str, token: int) -> None:
        """Give up ``token``'s claim (the call failed): a retry may run it again."""
        raise NotImplementedError

    def peek(self, key: str) -> Claim | None:
        """The record as it is, without claiming: ``replay``, ``conflict`` or ``None``."""
        raise NotImplementedError

    async def aclaim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        return self.claim(key, fingerprint, lease=lease, ttl=ttl)

    async def arenew(self, key: str, token: int, *, lease: float) -> bool:
        return self.renew(key, token, lease=lease)

    async def acomplete(self, key: str, token: int, value: bytes, *, ttl: float) -> bool:
        return self.complete(key, token, value, ttl=ttl)

    async def arelease(self, key: str, token: int) -> None:
        self.release(key, token)

    async def apeek(self, key: str) -> Claim | None:
        return self.peek(key)


@dataclasses.dataclass(slots=True)
class _Entry:
    fingerprint: str
    token: int
    done: bool
    value: bytes | None
    lease_until: float
    expires: float


class MemoryIdempotencyStore(IdempotencyStore):
    """Idempotency records in this process's memory.

    Bounded: at most ``max_entries`` records. Expired records are reclaimed as
    new ones arrive, whether or not anyone read them; when every record is
    still live the store **fails closed**: a new claim raises
    :class:`~reskit.StoreUnavailable` rather than evict a live key (evicting
    one would let its repeat run a second time).

    .. versionadded:: 0.1.0
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError(f"max_entries must be a whole number >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # (expires, key): the earliest expiry first, so reclaiming looks at the front only.
        self._expiry: list[tuple[float, str]] = []
        self._tokens = 0
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _reclaim(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                del self._entries[key]
        # Stale heap items (an entry re-dated since) are dropped as they surface;
        # rebuild when they outnumber the entries, so the heap stays bounded too.
        if len(heap) > 2 * len(self._entries) + 64:
            self._expiry = [(e.expires, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiry)

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            return None
        return entry

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        from ._store import StoreUnavailable

        now = _clock.wall()
        with self._lock:
            self._reclaim(now)
            entry = self._live(key, now)
            if entry is None:
                if len(self._entries) >= self.max_entries:
                    raise StoreUnavailable(
                        f"the idempotency store is full ({self.max_entries} live keys); "
                        "refusing a new key rather than forgetting a live one (raise "
                        "max_entries, shorten ttl, or use the Redis store)"
                    )
                self._tokens += 1
                # Kept at least as long as its lease: a call running past ttl still
                # holds its key (else a repeat would find it gone and run again).
                entry = _Entry(
                    fingerprint, self._tokens, False, None, now + lease, now + max(ttl, lease)
                )
                self._entries[key] = entry
                heapq.heappush(self._expiry, (entry.expires, key))
                return Claim("claimed", entry.token)
            if entry.fingerprint != fingerprint:
                return Claim("mismatch")
            if entry.done:
                return Claim("replay", entry.token, entry.value)
            if entry.lease_until > now:
                return Claim("conflict", lease_until=entry.lease_until)
            # The holder's lease ran out (it crashed, or hangs): take the claim over.
            self._tokens += 1
            entry.token = self._tokens
            entry.lease_until = now + lease
            self._outlive_lease(key, entry)
            return Claim("claimed", entry.token)

    def _outlive_lease(self, key: str, entry: _Entry) -> None:
        if entry.expires < entry.lease_until:
            entry.expires = entry.lease_until
            heapq.heappush(self._expiry, (entry.expires, key))

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        now = _clock.wall()
        with self._lock:
            entry = self._live(key, now)
            if entry is None or entry.done or entry.token != token:
                return False
            entry.lease_until = now + lease
            self._outlive_lease(key, entry)
            return True

    def complete(self, key: str, token: int, value: bytes, *, ttl: float) -> bool:
        now = _clock.wall()
        with self._lock:
            entry = self._live(key, now)
            if entry is None or entry.done or entry.token != token:
                return False
            entry.done = True
            entry.value = value
            entry.expires = now + ttl
            heapq.heappush(self._expiry, (entry.expires, key))
            return True

    def release(self, key: str, token: int) -> None:
        now = _clock.wall()
        with self._lock:
            entry = self._live(key, now)
            if entry is not None and not entry.done and entry.token == token:
                del self._entries[key]

    def peek(self, key: str) -> Claim | None:
        now = _clock.wall()
        with self._lock:
            entry = self._live(key, now)
            if entry is None:
                return None
            if entry.done:
                return Claim("replay", entry.token, entry.value)
            if entry.lease_until > now:
                return Claim("conflict", lease_until=entry.lease_until)
            return None


def store_for(store: Store | IdempotencyStore | None) -> IdempotencyStore:
    """The idempotency store to use: given, or the configured store's."""
    if isinstance(store, IdempotencyStore):
        return store
    if store is None:
        from ._store import current_store

        store = current_store()
    return store.idempotency()


# -- values ------------------------------------------------------------------------------------


class JSONCodec:
    """Results to bytes and back, as JSON; the default codec of :func:`idempotent`.

    JSON keeps a stored result readable by any process and any language, and
    makes replaying a planted value harmless: it can only ever be data. Give
    ``default`` to encode other types (it is passed to :func:`json.dumps`) and
    ``object_hook`` to decode them (passed to :func:`json.loads`).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        default: Callable[[Any], Any] | None = None,
        object_hook: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.default = default
        self.object_hook = object_hook

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, default=self.default, separators=(",", ":")).encode()

    def decode(self, data: bytes) -> Any:
        from ._audit import loads

        if self.object_hook is None:
            return loads(data)
        try:
            return json.loads(data, object_hook=self.object_hook)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _plain(value: Any) -> Any:
    """Arguments as JSON data, for the fingerprint."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__qualname__, **dataclasses.asdict(value)}
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return {"__model__": type(value).__qualname__, **dump(mode="json")}
    if isinstance(value, set | frozenset):
        # Ordered by each item's canonical JSON, so equal sets give equal fingerprints.
        items = [json.loads(json.dumps(item, default=_plain, sort_keys=True)) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": base64.b64encode(bytes(value)).decode()}
    raise TypeError(
        f"cannot fingerprint an argument of type {type(value).__qualname__}: pass "
        "fingerprint=lambda *args, **kwargs: ... to idempotent() to say what identifies the call"
    )


def fingerprint(*parts: Any) -> str:
    """A SHA-256 over ``parts`` as canonical JSON: what tells a repeat from a misuse.

    .. versionadded:: 0.1.0
    """
    text = json.dumps(parts, default=_plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the decorator -------------------------------------------------------------------------------


def _seconds(value: float | timedelta, what: str) -> float:
    from ._config import seconds

    result = seconds(value, what, waited=False)
    assert result is not None
    return result


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ValueError(
            f"an idempotency key must be a string of 1 to {MAX_KEY_LENGTH} characters, got "
            f"{key!r:.80}"
        )
    return key


def idempotent(
    key: Callable[..., str],
    *,
    ttl: float | timedelta = 86_400,
    store: Store | IdempotencyStore | None = None,
    wait: bool = False,
    lease: float | timedelta = 30.0,
    codec: JSONCodec | None = None,
    store_failures: tuple[type[BaseException], ...] = (),
    fingerprint: Callable[..., Any] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated function once per idempotency key; repeats get the stored result.

    ::

        @reskit.idempotent(key=lambda order_id, **_: f"charge:{order_id}")
        def charge(order_id: str, amount: int) -> dict: ...

    The first call with a key claims it, runs the function and stores the
    result (for ``ttl`` seconds, default a day). A repeat returns the stored
    result without running. The same key with different arguments raises
    :class:`~reskit.IdempotencyMismatch`. A repeat while the first call still
    runs raises :class:`~reskit.IdempotencyConflict`, or, with ``wait=True``,
    waits for it and returns its result.

    A call that raises gives its claim back, so a retry runs the function
    again; exceptions matching ``store_failures`` are stored instead, and a
    repeat raises :class:`~reskit.IdempotentFailure`.

    Args:
        key: computes the key from the call's arguments, given by parameter
            name (``lambda order_id, **_: ...``); 1 to 255 characters.
        ttl: seconds (or a ``timedelta``) a result is kept.
        store: a reskit store (its idempotency records are used), an
            :class:`IdempotencyStore`, or ``None`` for the configured store
            (:func:`reskit.configure`): memory, or Redis for a fleet.
        wait: wait for a call in flight instead of raising ``IdempotencyConflict``.
        lease: seconds a claim holds without renewal; renewed every third of it
            while the call runs, so only a crashed or frozen holder loses it.
        codec: how results become bytes; :class:`JSONCodec` by default. Never pickle.
        store_failures: exception classes whose failures are stored as results.
        fingerprint: computes what identifies the call from its arguments, by
            name (default: the function's name and all its arguments, which
            must then be JSON data, dataclasses or pydantic models).

    Works on ``def`` and ``async def`` functions. Stack it outermost, above a
    :class:`~reskit.Policy`, so retries inside run under one claim.

    .. versionadded:: 0.1.0
    """
    if not callable(key):
        raise TypeError(
            f"idempotent() key= must be a function of the call's arguments, got {key!r}"
        )
    ttl_s = _seconds(ttl, "idempotent() ttl")
    lease_s = _seconds(lease, "idempotent() lease")
    if not isinstance(store_failures, tuple) or not all(
        isinstance(c, type) and issubclass(c, BaseException) for c in store_failures
    ):
        raise TypeError("idempotent() store_failures= must be a tuple of exception classes")
    the_codec = codec if codec is not None else JSONCodec()

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                "idempotent() cannot protect a generator: a stream has no one result to "
                "store and replay"
            )
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        call = _Call(name, key, fingerprint, ttl_s, lease_s, wait, the_codec, store_failures, store)
        call.signature = inspect.signature(fn)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await call.arun(fn, args, kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            result: R = call.run(fn, args, kwargs)
            return result

        return wrapper

    return decorate


class _Call:
    """One decorated function's settings, and the claim-run-complete flow."""

    def __init__(
        self,
        name: str,
        key: Callable[..., str],
        fingerprint_fn: Callable[..., Any] | None,
        ttl: float,
        lease: float,
        wait: bool,
        codec: JSONCodec,
        store_failures: tuple[type[BaseException], ...],
        store: Store | IdempotencyStore | None,
    ) -> None:
        self.name = name
        self.key = key
        self.fingerprint_fn = fingerprint_fn
        self.ttl = ttl
        self.lease = lease
        self.wait = wait
        self.codec = codec
        self.store_failures = store_failures
        self.store = store
        self.signature: inspect.Signature | None = None

    def prepare(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, str]:
        # By parameter name, defaults applied: charge("a", 5) and charge(order="a",
        # amount=5) are the same call, with the same key and fingerprint.
        assert self.signature is not None
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        key = _check_key(self.key(**arguments))
        if self.fingerprint_fn is not None:
            identity = self.fingerprint_fn(**arguments)
        else:
            identity = arguments
        return key, fingerprint(self.name, identity)

    def answer(self, claim: Claim, key: str) -> Any:
        """The result a replayed claim carries (or the stored failure, raised)."""
        assert claim.value is not None
        try:
            stored = self.codec.decode(claim.value)
        except ValueError as exc:
            raise ValueError(
                f"the stored result of idempotency key {key!r} cannot be read ({exc}); it "
                "was not written by reskit's codec"
            ) from None
        if isinstance(stored, dict) and set(stored) == {"reskit.failure"}:
            failure = stored["reskit.failure"]
            if not (
                isinstance(failure, dict)
                and isinstance(failure.get("message"), str)
                and isinstance(failure.get("type"), str)
            ):
                raise ValueError(
                    f"the stored failure of idempotency key {key!r} is not one reskit wrote"
                )
            raise IdempotentFailure(
                f"the first call with idempotency key {key!r} failed: {failure['message']}",
                type_name=failure["type"],
            )
        if isinstance(stored, dict) and set(stored) == {"reskit.result"}:
            return stored["reskit.result"]
        raise ValueError(f"the record of idempotency key {key!r} is not a result reskit stored")

    def encode_result(self, result: Any) -> bytes:
        return self.codec.encode({"reskit.result": result})

    def encode_failure(self, exc: BaseException) -> bytes:
        failure = {"type": type(exc).__qualname__, "message": _telemetry.safe_str(exc)}
        return self.codec.encode({"reskit.failure": failure})

    def refused(self, claim: Claim, key: str) -> ReskitError:
        if claim.status == "mismatch":
            return IdempotencyMismatch(
                f"idempotency key {key!r} was used before with different arguments; use a new "
                "key for a different request"
            )
        return IdempotencyConflict(
            f"a call with idempotency key {key!r} is still running; try again later (or "
            "pass wait=True to wait for its result)",
            retry_after=None
            if claim.lease_until is None
            else max(claim.lease_until - _clock.wall(), 0.0),
        )

    # -- the flow, and its two drivers --------------------------------------------------------
    def _flow(
        self, store: IdempotencyStore, key: str, print_: str
    ) -> Generator[tuple[str, Any], Any, Any]:
        """Claim, run, settle: the decisions, free of I/O; it yields the steps it needs.

        Steps: ``("claim", None)`` answers a :class:`Claim`; ``("sleep", s)``;
        ``("call", None)`` answers ``(result, None)`` or ``(None, exception)``;
        ``("complete", value)`` answers whether the claim still held;
        ``("release", None)``. :meth:`run` drives it for ``def`` functions and
        :meth:`arun` for ``async def`` ones, as httpx drives one auth flow from
        both its clients, so no decision is written twice.
        """
        claim = yield ("claim", None)
        delay = 0.01
        while claim.status == "conflict" and self.wait and not _out_of_time(delay):
            yield ("sleep", delay)
            delay = min(delay * 2, 0.5)
            claim = yield ("claim", None)
        if claim.status == "replay":
            return self.answer(claim, key)
        if claim.status != "claimed":
            raise self.refused(claim, key)
        token = claim.token
        held = _keeper.hold(store, key, token, self.lease)
        try:
            result, exc = yield ("call", None)
        finally:
            _keeper.drop(held)
        if exc is not None:
            if isinstance(exc, self.store_failures):
                yield ("complete", (token, self.encode_failure(exc)))
            else:
                yield ("release", token)
            raise exc
        try:
            value = self.encode_result(result)
        except BaseException:
            yield ("release", token)  # nothing to store: a retry may run it
            raise
        if not (yield ("complete", (token, value))):
            _lost_claim(key)
        return result

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        key, print_ = self.prepare(args, kwargs)
        store = store_for(self.store)
        flow = self._flow(store, key, print_)
        reply: Any = None
        while True:
            try:
                step, argument = flow.send(reply)
            except StopIteration as done:
                return done.value
            reply = None
            if step == "claim":
                reply = store.claim(key, print_, lease=self.lease, ttl=self.ttl)
            elif step == "sleep":
                _clock.sleep(argument)
            elif step == "call":
                try:
                    reply = (fn(*args, **kwargs), None)
                except BaseException as exc:
                    reply = (None, exc)
            elif step == "complete":
                reply = store.complete(key, *argument, ttl=self.ttl)
            else:
                _guarded_release(store, key, argument)

    async def arun(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        import asyncio  # an async caller has it loaded already

        key, print_ = self.prepare(args, kwargs)
        store = store_for(self.store)
        flow = self._flow(store, key, print_)
        reply: Any = None
        while True:
            try:
                step, argument = flow.send(reply)
            except StopIteration as done:
                return done.value
            reply = None
            if step == "claim":
                reply = await aclaim_shielded(store, key, print_, lease=self.lease, ttl=self.ttl)
            elif step == "sleep":
                await _clock.asleep(argument)
            elif step == "call":
                try:
                    reply = (await fn(*args, **kwargs), None)
                except BaseException as exc:
                    reply = (None, exc)
            elif step == "complete":
                reply = await store.acomplete(key, *argument, ttl=self.ttl)
            else:
                # Shielded: a cancelled call must still give its claim back.
                await asyncio.shield(_aguarded_release(store, key, argument))


_releasing: set[Any] = set()


async def aclaim_shielded(
    store: IdempotencyStore, key: str, fingerprint: str, *, lease: float, ttl: float
) -> Claim:
    """``store.aclaim``, safe to cancel: a claim that lands after its caller was
    cancelled (a worker thread, a network round trip) is given back, not left
    to block its key for a lease."""
    import asyncio

    task = asyncio.ensure_future(store.aclaim(key, fingerprint, lease=lease, ttl=ttl))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def give_back(done: asyncio.Future[Claim]) -> None:
            if not done.cancelled() and done.exception() is None:
                claim = done.result()
                if claim.status == "claimed":
                    release = asyncio.ensure_future(_aguarded_release(store, key, claim.token))
                    _releasing.add(release)  # kept until done: a task nobody holds may vanish
                    release.add_done_callback(_releasing.discard)

        task.add_done_callback(give_back)
        raise


def _out_of_time(delay: float) -> bool:
    """Whether waiting ``delay`` more would pass the caller's deadline (if it has one)."""
    from ._context import remaining_deadline

    left = remaining_deadline()
    return left is not None and left <= delay


def _lost_claim(key: str) -> None:
    _telemetry.emit(
        30,
        "reskit.idempotency.lost_claim",
        key=key,
        detail=(
            "the call outlived its lease and another holder took the key over; this "
            "result was not stored (the newer one stands)"
        ),
    )


def _guarded_release(store: IdempotencyStore, key: str, token: int) -> None:
    # The call's own exception is what the caller must see, not the store's.
    _telemetry.guard("releasing an idempotency claim", store.release, key, token)


async def _aguarded_release(store: IdempotencyStore, key: str, token: int) -> None:
    try:
        await store.arelease(key, token)
    except Exception as exc:
        _telemetry.report("releasing an idempotency claim", exc)


class _Keeper:
    """Renews the leases of calls still running, from one thread for the whole process.

    A call registers its claim when it starts and withdraws it when it ends; the
    thread wakes only when a lease is a third through, so a call shorter than
    that costs a dict insert and a delete. Renewals use the sync store methods,
    off any event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[int, tuple[IdempotencyStore, str, int, float, float]] = {}
        self._ids = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # When the thread will look next: a call due later needs no wake-up,
        # so the common case (every lease alike) sets no event.
        self._next_due = float("inf")
        _fork.track(self)

    def _after_fork(self) -> None:
        # The parent's calls are not running here, nor is its thread.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._claims.clear()
        self._thread = None
        self._next_due = float("inf")

    def hold(self, store: IdempotencyStore, key: str, token: int, lease: float) -> int:
        due = _clock.now() + lease / 3
        with self._lock:
            self._ids += 1
            handle = self._ids
            self._claims[handle] = (store, key, token, lease, due)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="reskit-idempotency-leases", daemon=True
                )
                self._thread.start()
            wake = due < self._next_due
            if wake:
                self._next_due = due
        if wake:
            self._wake.set()
        return handle

    def drop(self, handle: int) -> None:
        with self._lock:
            self._claims.pop(handle, None)

    def _run(self) -> None:
        while True:
            # Cleared before the claims are read: a call registered after this
            # sets it again, so its wake-up is never lost.
            self._wake.clear()
            with self._lock:
                dues = [claim[4] for claim in self._claims.values()]
                self._next_due = min(dues) if dues else float("inf")
            if dues:
                _clock.wait_until(self._wake, min(dues))
            else:
                self._wake.wait(60.0)  # idle: nothing to renew until a call registers
            now = _clock.now()
            with self._lock:
                due = [(h, c) for h, c in self._claims.items() if c[4] <= now]
                for handle, (store, key, token, lease, _) in due:
                    self._claims[handle] = (store, key, token, lease, now + lease / 3)
            for handle, (store, key, token, lease, _) in due:
                try:
                    kept = store.renew(key, token, lease=lease)
                except Exception as exc:
                    _telemetry.report("renewing an idempotency lease", exc)
                    continue
                if not kept:
                    self.drop(handle)  # taken over: nothing left to renew


_keeper = _Keeper()

"""The Redis store: kill switches, brownout levels and the audit log shared by a fleet.

``reskit.configure(store="redis://host:6379/0")`` (or ``RESKIT_STORE``) makes
every process configured alike share one control state. How it stays fast and
correct:

- **The hot path never talks to Redis.** Each process keeps the last snapshot in
  memory; policies read flags computed from it.
- **Changes arrive by pub/sub, and by version.** A change is one Lua script that
  writes the record, bumps a version counter, appends the audit entry and
  publishes the new version. Pub/sub delivers at most once, so a background
  thread also compares versions every ``resync_interval`` seconds and reads the
  whole snapshot after every (re)subscription: a process that starts, reconnects
  or was forked catches up on what it missed.
- **Fail static.** While Redis is unreachable (down, paused, partitioned) every
  read keeps the last known value, :meth:`RedisStore.staleness` and the
  ``reskit.store.staleness`` gauge rise, one warning is logged, and changes
  raise :class:`~reskit.StoreUnavailable`. When Redis comes back the thread
  resubscribes and resyncs. If it comes back *empty* (restarted without
  persistence, flushed), the first process to notice writes back the state and
  the audit log it holds, plus an entry saying it did.
- **Safe across fork.** The child of ``os.fork()`` gets a fresh connection and
  its own subscriber thread, which resyncs at once.
- **Cluster-safe keys.** Every key of the control state and the audit log shares
  the hash tag ``{<namespace>}``, and a shared breaker's two keys share a tag of
  their own (``{<namespace>/b/<hash of its name>}``), so each Lua script and
  pipeline touches one slot; names chosen by users are never part of a key as
  they are (they are hash fields, or hashed), and values are JSON, never pickle.

redis-py is the client (``pip install "reskit[redis]"``): the sync client on the
background thread and in the admin functions. Add ``?cluster=true`` to the URL
for Redis Cluster, ``?namespace=NAME`` to keep fleets apart on one server.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import redis
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('The Redis store needs redis-py: pip install "reskit[redis]"') from exc

from reskit import _clock, _telemetry
from reskit._audit import (
    GENESIS,
    MAX_ENTRY_BYTES,
    AuditEntry,
    AuditHead,
    Verification,
    verify,
)
from reskit._breaker import BreakerState
from reskit._idempotency import Claim, IdempotencyStore
from reskit._store import (
    MAX_VALUE_BYTES,
    SWITCH,
    After,
    Declaration,
    Snapshot,
    Store,
    StoreUnavailable,
    parse_record,
    resolve,
)

if TYPE_CHECKING:
    from reskit._breaker import CircuitBreaker

__all__ = ["RedisStore"]

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: Audit entries a process keeps to restore a Redis that came back empty (the
#: newest ones; about 10 MB at most, and read in pieces of MIRROR_CHUNK).
MIRROR_LIMIT = 10_000
MIRROR_CHUNK = 1_000

# Read the audit log and its head in one step, so a change landing between two
# reads cannot make an intact log look cut short.
_READ_AUDIT = """
return {redis.call('LRANGE', KEYS[1], 0, -1), redis.call('GET', KEYS[2]) or false}
"""

_ERRORS = (redis.RedisError, OSError)
# Redis is out of reach (down, paused, partitioned): fail static and say so once.
# Other Redis errors (a key of the wrong type, planted) are bad data, not an outage.
_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)

# Set the record (none for an entry of its own), bump the version, append the
# audit entry, move the head and publish: all or nothing. The head is compared
# first (concurrent appends form one chain: the loser rereads and tries again),
# then the record itself, so a ttl revive cannot undo a kill made meanwhile.
_CHANGE = """
local head = redis.call('GET', KEYS[4]) or ''
if head ~= ARGV[3] then return {0, head} end
if ARGV[1] ~= '' then
  local current = redis.call('HGET', KEYS[1], ARGV[1])
  if current then current = '1' .. current else current = '0' end
  if current ~= ARGV[7] then return {2, current} end
  if ARGV[2] == '' then
    redis.call('HDEL', KEYS[1], ARGV[1])
  else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  end
end
local version = redis.call('INCR', KEYS[2])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5])
redis.call('PUBLISH', ARGV[6], version)
return {1, version}
"""

# Write back a state into a Redis that lost it, unless another process did
# first (or anything was written since: then that is the state).
_RESTORE = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then
  return 0
end
local fields = tonumber(ARGV[3])
local i = 4
for _ = 1, fields do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('RPUSH', KEYS[3], ARGV[i])
  i = i + 1
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2])
return 1
"""


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL for redis-py, and reskit's own query options taken out of it."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("namespace", "cluster", "resync_interval", "timeout"):
            ours[key] = value
        else:
            theirs.append((key, value))
    query = urlencode(theirs)
    if parts.scheme == "unix":
        # urlunsplit drops the "//" of a URL with no host, which redis-py needs.
        return f"unix://{parts.netloc}{parts.path}" + (f"?{query}" if query else ""), ours
    return urlunsplit(parts._replace(query=query)), ours


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class RedisStore(Store):
    """Switches, levels, operator breaker states and the audit log in Redis.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://`` for TLS or
            ``unix:///path``; reskit's own options go in the query:
            ``namespace`` (default ``reskit``), ``cluster=true`` for Redis
            Cluster, ``resync_interval`` (seconds between version checks,
            default 1) and ``timeout`` (seconds a Redis command may take,
            default 1).
        client: a ready redis-py client to use instead of one made from ``url``
            (the store then does not close it).

    Creating a store does no I/O on the caller's thread: a background thread
    connects, subscribes and reads the snapshot. Until it first succeeds the
    state is *unknown* (switches declared ``fail_mode="closed"`` reject).

    .. versionadded:: 0.1.0
    """

    def __init__(self, url: str, *, client: Any = None) -> None:
        super().__init__()
        redis_url, options = _split_url(url)
        self.url = _redacted(url)
        namespace = options.get("namespace", "reskit")
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'; "
                f"got {namespace!r}"
            )
        self.namespace = namespace
        self.cluster = options.get("cluster", "").lower() in ("1", "true", "yes")
        self.resync_interval = _positive(options.get("resync_interval", "1"), "resync_interval")
        self.timeout = _positive(options.get("timeout", "1"), "timeout")
        self._redis_url = redis_url
        if client is None and not self.cluster:
            _check_options(redis_url)
        self._own_client = client is None
        self._given_client = client
        prefix = f"reskit:{{{namespace}}}"
        self._keys = {
            "control": f"{prefix}:control",
            "version": f"{prefix}:version",
            "audit": f"{prefix}:audit",
            "head": f"{prefix}:audit:head",
            "switches": f"{prefix}:switches",
            "breakers": f"{prefix}:breakers",
        }
        self.channel = f"{prefix}:changes"
        self.known = False
        # The newest audit entries (a copy for restoring an emptied Redis): the
        # log's entries from index _mirror_start on, of the chain whose first
        # entry's hash is _genesis.
        self._mirror: list[str] = []
        self._mirror_start = 0
        self._genesis: str | None = None
        self._restoring = False
        self._pending: dict[str, Mapping[str, Any]] | None = None  # a merge's write-backs
        self._bad: set[tuple[str, object]] = set()
        self._jobs: collections.deque[Callable[[], object]] = collections.deque()
        self._links: dict[str, BreakerLink] = {}
        self._declared: dict[str, Declaration] = {}
        self._closed = False
        self._idempotency: RedisIdempotencyStore | None = None
        self._setup()
        self._start()
        _STALENESS.track(self)

    def _setup(self) -> None:
        """Per-process parts: the client, the locks, the subscriber thread."""
        self._sync_lock = threading.RLock()
        self._stopping = threading.Event()
        self._stale = False
        self._last_ok = time.monotonic()
        self._pubsub: Any = None
        self._redis: Any = self._given_client
        self._connect_lock = threading.Lock()
        if self._redis is None and not self.cluster:
            self._redis = self._connect()  # a plain client connects only when used
        self._synced = threading.Event()
        self._job_ready = threading.Condition()
        for link in self._links.values():
            link._after_fork()
        # Two threads: one listens (it blocks reading pub/sub), one writes (what
        # callers queued: declarations, ttl revivals, shared breakers' steps).
        self._thread = threading.Thread(
            target=self._run, name=f"reskit-store-{self.namespace}", daemon=True
        )
        self._writer = threading.Thread(
            target=self._write, name=f"reskit-store-writer-{self.namespace}", daemon=True
        )

    def _start(self) -> None:
        self._thread.start()
        self._writer.start()

    @property
    def _client(self) -> Any:
        """The redis-py client; a Redis Cluster client is made on first use.

        Making one reads the cluster's slot map, which is I/O: not for
        configure() to do, and not something a cluster that is down at start-up
        may turn into an exception there.
        """
        client = self._redis
        if client is None:
            with self._connect_lock:
                client = self._redis
                if client is None:
                    try:
                        client = self._redis = self._connect()
                    except RedisClusterException as exc:
                        raise redis.ConnectionError(str(exc)) from exc
        return client

    def _script(self, source: str) -> Any:
        """A Lua script bound to the client (redis-py runs it by SHA, loading it if need be)."""
        return self._client.register_script(source)

    @property
    def _change_script(self) -> Any:
        return self._script(_CHANGE)

    @property
    def _restore_script(self) -> Any:
        return self._script(_RESTORE)

    @property
    def _breaker_script(self) -> Any:
        return self._script(_BREAKER)

    @property
    def _read_audit_script(self) -> Any:
        return self._script(_READ_AUDIT)

    def _connect(self) -> Any:
        options = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "decode_responses": False,
        }
        if self.cluster:
            return RedisCluster.from_url(self._redis_url, **options)
        return redis.Redis.from_url(self._redis_url, health_check_interval=10, **options)

    def _after_fork(self) -> None:
        # The parent's threads do not exist here, its sockets are the parent's,
        # and its queued jobs are the parent's to send: a fresh client, an empty
        # queue, and (in _restart_after_fork) fresh threads, which resync first.
        super()._after_fork()
        self._pubsub = None
        self._jobs.clear()
        if not self._closed:
            self._setup()

    def _restart_after_fork(self) -> None:
        if not self._closed:
            self._start()

    # -- reading ------------------------------------------------------------------------
    @property
    def stale(self) -> bool:
        return self._stale

    def staleness(self) -> float:
        return time.monotonic() - self._last_ok if self._stale else 0.0

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the first snapshot was read (or ``timeout`` seconds); for scripts."""
        return self._synced.wait(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until what was queued so far (breaker reports, declarations) was sent.

        Returns ``False`` if that took longer than ``timeout`` seconds. For
        tests and short scripts; applications never need to wait for it.
        """
        done = threading.Event()
        self._job(done.set)
        return done.wait(timeout)

    def refresh(self) -> None:
        """Read the snapshot now, on this thread; raises StoreUnavailable if Redis is down."""
        try:
            self._sync(force=True)
        except _ERRORS as exc:
            raise StoreUnavailable(f"cannot read the reskit store at {self.url}: {exc}") from exc

    # -- the subscriber thread -----------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        last_check = 0.0
        while not self._stopping.is_set():
            try:
                if self._pubsub is None:
                    pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                    self._pubsub = pubsub
                    # Subscribed first, read second: nothing published in between is lost.
                    self._sync(force=True)
                    # A Redis that lost its data lost the registries too: write ours again.
                    self._job(self._register)
                    last_check = time.monotonic()
                    self._fresh()
                    backoff = 0.05
                message = self._pubsub.get_message(timeout=min(self.resync_interval, 0.25))
                now = time.monotonic()
                data = None if message is None else message.get("data")
                changed = message is not None
                if isinstance(data, bytes) and data.startswith(b"b"):
                    changed = False  # a shared breaker's news, not the control state's
                    link = self._links.get(data[1:].decode(errors="replace"))
                    if link is not None:
                        self._job(link.read)
                due = now - last_check >= self.resync_interval
                if changed or due:
                    self._sync()
                    self._expire_due()
                    if due:
                        for link in list(self._links.values()):
                            self._job(link.read)
                        last_check = now
                    self._fresh()
            except _DOWN as exc:
                self._unreachable(exc)
                self._drop_pubsub()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.resync_interval)
            except redis.RedisError as exc:
                # Redis answered, with an error about its data: report it, stay in sync.
                self._invalid("the store's keys", exc)
                self._stopping.wait(self.resync_interval)
            except StoreUnavailable as exc:
                # A write the sync made (a restore, a merge, a ttl revival) failed;
                # the next resync tries again.
                if isinstance(exc.__cause__, _DOWN):
                    self._unreachable(exc)
                    self._drop_pubsub()
                else:
                    self._invalid("a key the store writes", exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.resync_interval)
            except Exception as exc:  # a bug must not kill the thread silently
                _telemetry.report("the reskit Redis store's subscriber thread", exc)
                self._drop_pubsub()
                self._stopping.wait(self.resync_interval)

    def _job(self, job: Callable[[], object]) -> None:
        self._jobs.append(job)
        self._kick()

    def _kick(self) -> None:
        with self._job_ready:
            self._job_ready.notify()

    def _write(self) -> None:
        tick = min(self.resync_interval, 0.05)
        while not self._stopping.is_set():
            with self._job_ready:
                if not self._jobs:
                    self._job_ready.wait(tick)
            while self._jobs:
                job = self._jobs.popleft()
                try:
                    job()
                except _DOWN as exc:
                    # Dropped, not retried: reports and declarations are refreshed
                    # by later traffic, and ttl revivals by the next resync.
                    self._unreachable(exc)
                except redis.RedisError as exc:
                    self._invalid("a key the store writes", exc)
                except StoreUnavailable as exc:
                    if isinstance(exc.__cause__, _DOWN):
                        self._unreachable(exc)
                    else:
                        self._invalid("a key the store writes", exc)
                except Exception as exc:
                    _telemetry.report("a reskit Redis store job", exc)
            for link in list(self._links.values()):
                try:
                    link.tick()
                except _DOWN as exc:
                    self._unreachable(exc)
                except redis.RedisError as exc:
                    self._invalid("a shared breaker's keys", exc)

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def _fresh(self) -> None:
        self._last_ok = time.monotonic()
        if self._stale:
            self._stale = False
            _telemetry.emit(logging.WARNING, "reskit.store.recovered", store=self.url)
            self._notify()

    def _unreachable(self, exc: BaseException) -> None:
        if not self._stale:
            self._stale = True
            _telemetry.emit(
                logging.WARNING,
                "reskit.store.unreachable",
                store=self.url,
                error=_telemetry.safe_repr(exc),
                detail="serving the last known switches and levels until it is back",
            )
            self._notify()

    def _invalid(self, what: str, exc: BaseException) -> None:
        """Bad data in Redis (a key of the wrong type): one warning per kind of error."""
        mark = (what, str(exc)[:200])
        if mark not in self._bad:
            self._bad.add(mark)
            _telemetry.emit(
                logging.WARNING,
                "reskit.store.invalid_key",
                store=self.url,
                what=what,
                error=_telemetry.safe_repr(exc)[:300],
                detail="ignored: reskit's keys hold reskit's types and JSON only",
            )

    # -- syncing --------------------------------------------------------------------------
    def _sync(self, force: bool = False) -> None:
        keys = self._keys
        with self._sync_lock:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(keys["version"])
            pipe.get(keys["head"])
            pipe.llen(keys["audit"])
            pipe.exists(keys["switches"], keys["breakers"])
            pipe.lindex(keys["audit"], 0)
            results = pipe.execute(raise_on_error=False)
            down = [r for r in results if isinstance(r, _DOWN)]
            if down:
                raise down[0]
            raw_version = self._answer(results[0], "the version", None)
            raw_head = self._answer(results[1], "the audit head", None)
            length = self._answer(results[2], "the audit log", len(self._mirror))
            registries = self._answer(results[3], "the registries", 2)
            first = self._answer(results[4], "the audit log", None)
            if registries < bool(self._declared) + bool(self._links):
                self._job(self._register)  # a registry was lost (flushed, evicted)
            local = self._snapshot
            if raw_version is None and raw_head is None:
                if (local.version > 0 or self._mirror) and not self._restoring:
                    self._restore(local)
                    return
                version = 0
            else:
                version = _int(raw_version)
            if not self._restoring and self._new_chain(first):
                self._merge(local)
                return
            self._update_mirror(length, first)
            if force or version != local.version or not self.known:
                try:
                    records = self._client.hgetall(keys["control"])
                except _DOWN:
                    raise
                except redis.RedisError as exc:
                    self._invalid("the control state", exc)
                    records = {}
                snapshot = Snapshot(version, self._checked(records, local))
                self.known = True
                self._synced.set()
                self._publish(snapshot)

    def _answer(self, result: Any, what: str, default: Any) -> Any:
        if isinstance(result, redis.RedisError):
            self._invalid(what, result)
            return default
        return result

    def _new_chain(self, first: bytes | None) -> bool:
        """Whether Redis holds an audit log that is not ours: it lost its data and
        another process (a fresh one, a CLI) wrote first, starting a new chain.

        A new chain starts with an intact genesis entry other than the one we
        hold. An edited or removed first entry is tampering instead, which
        ``verify`` reports; that is left alone.
        """
        if first is None or not self._mirror or self._genesis is None:
            return False
        try:
            theirs = AuditEntry.from_json(first)
        except ValueError:
            return False
        return (
            theirs.hash != self._genesis
            and theirs.seq == 0
            and theirs.prev == GENESIS
            and theirs.is_intact()
        )

    def _checked(self, raw: Mapping[bytes, bytes], local: Snapshot) -> dict[str, Mapping[str, Any]]:
        records: dict[str, Mapping[str, Any]] = {}
        for raw_key, value in raw.items():
            try:
                key = raw_key.decode()
                records[key] = parse_record(key, value)
            except ValueError as exc:
                # Reported once per bad value; the last good record for the field stays.
                mark = (repr(raw_key)[:300], hash(value))
                if mark not in self._bad:
                    self._bad.add(mark)
                    _telemetry.emit(
                        logging.WARNING,
                        "reskit.store.invalid_record",
                        store=self.url,
                        field=repr(raw_key)[:300],
                        error=str(exc)[:300],
                        detail="ignored: records must be reskit's JSON",
                    )
                key_text = raw_key.decode(errors="replace")
                if key_text in local.records:
                    records[key_text] = local.records[key_text]
        return records

    def _update_mirror(self, length: int, first: bytes | None = None) -> None:
        if self._genesis is None and first is not None:
            try:
                self._genesis = AuditEntry.from_json(first).hash
            except ValueError:
                pass  # an unreadable first entry: verify() reports it
        mirror = self._mirror
        end = self._mirror_start + len(mirror)
        if length <= end:
            return  # nothing new (a shorter log was tampered with: verify() says so)
        start = max(end, length - MIRROR_LIMIT)
        if start > end:  # more is new than we keep: start the copy afresh
            mirror.clear()
            self._mirror_start = start
        for chunk in range(start, length, MIRROR_CHUNK):
            last = min(chunk + MIRROR_CHUNK, length) - 1
            mirror.extend(
                _line(line) for line in self._client.lrange(self._keys["audit"], chunk, last)
            )
        if len(mirror) > MIRROR_LIMIT:
            dropped = len(mirror) - MIRROR_LIMIT
            del mirror[:dropped]
            self._mirror_start += dropped

    def _forget_chain(self) -> None:
        """Follow the chain Redis holds from now on (after a restore or a merge)."""
        self._mirror = []
        self._mirror_start = 0
        self._genesis = None

    def _merge(self, local: Snapshot) -> None:
        """Redis lost its data and someone wrote first: add back what it lacks, audited.

        Records Redis does not have are written back as this process last knew
        them; records it has are newer and stay. The lost audit entries cannot
        rejoin the chain (a new one began), so they are appended as evidence,
        inside ``store.restore`` entries of the new chain. Each part is appended
        once, whichever processes merge and however often: a set in Redis
        remembers the parts of each lost chain already appended. If Redis goes
        away midway, this process keeps its copy and tries again later.
        """
        lock = f"reskit:{{{self.namespace}}}:restoring"
        if not self._client.set(lock, os.getpid(), nx=True, px=10_000):
            return  # another process is merging; look again at the next resync
        self._restoring = True
        # What to write back is fixed at the first attempt: the snapshot moves
        # while merging (each write-back is read back), and a merge cut short
        # must not lose what it had not written yet.
        if self._pending is None:
            self._pending = dict(local.records)
        try:
            lost = list(self._mirror)
            who = f"process {os.getpid()}"
            remote = self._client.hgetall(self._keys["control"])
            for key, record in self._pending.items():
                if key.encode() in remote:
                    continue
                self.change(
                    key,
                    record,
                    actor="reskit",
                    action="store.restore",
                    target=key,
                    reason=f"the store lost this record; {who} wrote back its last known value",
                    expect=lambda current: current is None,
                )
            try:
                chain = AuditEntry.from_json(lost[-1]).hash if lost else None
            except ValueError:
                chain = None
            parts = _batches(lost)
            merged = f"reskit:{{{self.namespace}}}:merged"
            for number, batch in enumerate(parts, 1):
                mark = f"{chain}:{self._mirror_start}:{number}"
                if chain is not None and self._client.sismember(merged, mark):
                    continue
                self.change(
                    "",
                    {
                        "lost_entries": batch,
                        "lost_chain": {"genesis": self._genesis, "head": chain},
                        "part": number,
                        "parts": len(parts),
                    },
                    actor="reskit",
                    action="store.restore",
                    target="audit",
                    reason=(
                        f"the store lost its audit log; {who} appends {len(batch)} entries "
                        f"of the lost chain it held (part {number} of {len(parts)})"
                    ),
                )
                if chain is not None:
                    self._client.sadd(merged, mark)
            _telemetry.emit(
                logging.WARNING,
                "reskit.store.restored",
                store=self.url,
                version=local.version,
                audit_entries=len(lost),
                detail="merged into what another process wrote to the emptied store",
            )
            self._forget_chain()
            self._pending = None
        finally:
            self._restoring = False
            try:
                self._client.delete(lock)
            except _ERRORS:
                pass  # it expires by itself

    def _restore(self, local: Snapshot) -> None:
        """Redis came back empty: write back what this process knows, audited.

        With the whole audit log in hand the chain is written back as it was,
        plus an entry saying so; with only its newest entries (a log longer
        than MIRROR_LIMIT), they go back as evidence in a new chain (_merge).
        """
        if self._mirror_start > 0:
            self._merge(local)
            return
        mirror = list(self._mirror)
        head = AuditHead()
        if mirror:
            try:
                last = AuditEntry.from_json(mirror[-1])
                head = AuditHead(last.seq, last.hash)
            except ValueError:
                mirror = []
        entry = AuditEntry.make(
            seq=head.seq + 1,
            time=_clock.wall(),
            actor="reskit",
            action="store.restore",
            target="store",
            reason=(
                f"the store was empty; process {os.getpid()} wrote back version "
                f"{local.version} and {len(mirror)} audit entries it held"
            ),
            before=None,
            after={"version": local.version + 1},
            prev=head.hash,
        )
        mirror.append(entry.to_json())
        fields: list[str] = []
        for key, record in local.records.items():
            fields += [key, _json(record)]
        keys = self._keys
        version = local.version + 1
        args = [version, AuditHead(entry.seq, entry.hash).to_json(), len(fields) // 2]
        restored = self._restore_script(
            keys=[keys["control"], keys["version"], keys["audit"], keys["head"]],
            args=[*args, *fields, *mirror],
        )
        # The registries went with the rest: each process writes its own again.
        self._job(self._register)
        if restored:
            self._client.publish(self.channel, version)
            self._mirror = mirror
            self._mirror_start = 0
            _telemetry.emit(
                logging.WARNING,
                "reskit.store.restored",
                store=self.url,
                version=version,
                audit_entries=len(mirror),
            )
            self._publish(Snapshot(version, dict(local.records)))
        else:
            # Another process restored first (or wrote): read what is there now.
            self._forget_chain()
            self._snapshot = Snapshot(0, dict(local.records))
            self._sync_unlocked()

    def _sync_unlocked(self) -> None:
        keys = self._keys
        raw_version = self._client.get(keys["version"])
        self._update_mirror(self._client.llen(keys["audit"]), self._client.lindex(keys["audit"], 0))
        records = self._client.hgetall(keys["control"])
        self.known = True
        self._synced.set()
        self._publish(Snapshot(_int(raw_version), self._checked(records, self._snapshot)))

    def _expire_due(self) -> None:
        now = _clock.wall()
        for name, record in list(self._snapshot.items(SWITCH)):
            until = record["until"]
            if record["killed"] and until is not None and until <= now:
                self.revive_expired(name, record)

    # -- writing --------------------------------------------------------------------------
    def change(
        self,
        key: str,
        after: After,
        *,
        actor: str,
        action: str,
        target: str,
        reason: str,
        expect: Callable[[Mapping[str, Any] | None], bool] | None = None,
    ) -> AuditEntry | None:
        flow = self._change_flow(key, after, actor, action, target, reason, expect)
        reply: Any = None
        step = ""
        try:
            while True:
                step, argument = flow.send(reply)
                reply = self._step(step, argument)
        except StopIteration as done:
            result: AuditEntry | None = done.value
            return result
        except _ERRORS as exc:
            raise self._unavailable(exc, sent=step == "write") from exc

    async def achange(
        self,
        key: str,
        after: After,
        *,
        actor: str,
        action: str,
        target: str,
        reason: str,
        expect: Callable[[Mapping[str, Any] | None], bool] | None = None,
    ) -> AuditEntry | None:
        """:meth:`change` for async code: its Redis round trips are awaited (redis.asyncio)."""
        import asyncio

        from redis import asyncio as aioredis

        if self._given_client is not None:
            # A sync client was given to use: its round trips go to a worker thread.
            return await asyncio.to_thread(
                self.change,
                key,
                after,
                actor=actor,
                action=action,
                target=target,
                reason=reason,
                expect=expect,
            )
        options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
        }
        # A client of its own, closed after: an async client belongs to one event
        # loop, and a change is rare enough that a connection per change is cheap.
        if self.cluster:
            client: Any = aioredis.RedisCluster.from_url(self._redis_url, **options)
        else:
            client = aioredis.Redis.from_url(self._redis_url, **options)
        script = client.register_script(_CHANGE)
        flow = self._change_flow(key, after, actor, action, target, reason, expect)
        reply: Any = None
        step = ""
        try:
            while True:
                step, argument = flow.send(reply)
                if step == "read":
                    pipe = client.pipeline(transaction=False)
                    for command, *args in self._reads(argument):
                        getattr(pipe, command)(*args)
                    reply = await pipe.execute()
                elif step == "write":
                    reply = await script(keys=self._write_keys(), args=argument)
                else:
                    # Rare (restore, read-back): the sync client, off the event loop.
                    reply = await asyncio.to_thread(self._step, step, argument)
        except StopIteration as done:
            result: AuditEntry | None = done.value
            return result
        except _ERRORS as exc:
            raise self._unavailable(exc, sent=step == "write") from exc
        finally:
            await client.aclose()

    def _unavailable(self, exc: BaseException, *, sent: bool = False) -> StoreUnavailable:
        if sent:
            # The script was on its way: Redis may have run it before it stopped
            # answering. Saying "nothing was changed" could be false.
            return StoreUnavailable(
                f"the reskit store at {self.url} stopped answering after the change was sent "
                f"({exc}); it may or may not have been made: check `reskit audit tail`"
            )
        if isinstance(exc, _DOWN):
            return StoreUnavailable(
                f"the reskit store at {self.url} cannot be reached ({exc}); nothing was changed"
            )
        return StoreUnavailable(
            f"the reskit store at {self.url} refused the change ({exc}); nothing was changed"
        )

    def _reads(self, key: str) -> list[tuple[Any, ...]]:
        keys = self._keys
        return [
            ("get", keys["version"]),
            ("get", keys["head"]),
            ("hget", keys["control"], key or "\x00"),  # "": an entry of its own
            ("lindex", keys["audit"], -1),
        ]

    def _write_keys(self) -> list[str]:
        keys = self._keys
        return [keys["control"], keys["version"], keys["audit"], keys["head"]]

    def _step(self, step: str, argument: Any) -> Any:
        """Run one step of a change's flow with the sync client."""
        if step == "read":
            pipe = self._client.pipeline(transaction=False)
            for command, *args in self._reads(argument):
                getattr(pipe, command)(*args)
            return pipe.execute()
        if step == "write":
            return self._change_script(keys=self._write_keys(), args=argument)
        if step == "restore":
            with self._sync_lock:
                self._restore(self._snapshot)
            return None
        # "read back": the caller sees its own change without waiting for pub/sub;
        # the change is made even if this read fails.
        try:
            self._sync()
        except _ERRORS:
            pass
        return None

    def _change_flow(
        self,
        key: str,
        after: After,
        actor: str,
        action: str,
        target: str,
        reason: str,
        expect: Callable[[Mapping[str, Any] | None], bool] | None,
    ) -> Generator[tuple[str, Any], Any, AuditEntry | None]:
        """The decisions of a change, free of I/O: it yields the Redis steps it needs.

        Driven by :meth:`change` with the sync client and by :meth:`achange`
        with redis.asyncio, as httpx drives one auth flow from both kinds of
        client; so the compare-and-set loop is written once.
        """
        for _ in range(50):
            raw_version, raw_head, raw_current, raw_last = yield ("read", key)
            if (
                raw_version is None
                and raw_head is None
                and (self._snapshot.version or self._mirror)
                and not self._restoring
            ):
                # Redis lost everything: put back what this process knows first.
                yield ("restore", None)
                continue
            head = self._head_from(raw_head, raw_last)
            before: dict[str, Any] | None = None
            if raw_current is not None:
                try:
                    before = parse_record(key, raw_current)
                except ValueError:
                    before = None  # an invalid record is replaced, and the audit says so
            if expect is not None and not expect(before):
                return None
            record = resolve(after, before)
            value = "" if record is None else _json(record)
            entry = AuditEntry.make(
                seq=head.seq + 1,
                time=_clock.wall(),
                actor=actor,
                action=action,
                target=target,
                reason=reason,
                before=before,
                after=None if record is None else dict(record),
                prev=head.hash,
            )
            current = b"0" if raw_current is None else b"1" + raw_current
            status, _ = yield (
                "write",
                [
                    key,
                    value,
                    raw_head or b"",
                    entry.to_json(),
                    AuditHead(entry.seq, entry.hash).to_json(),
                    self.channel,
                    current,
                ],
            )
            if status == 1:
                yield ("read back", None)
                return entry
        raise StoreUnavailable(
            f"the reskit store at {self.url} is too busy: 50 attempts to append to the audit "
            "log lost to concurrent changes"
        )

    def _head_from(self, raw_head: bytes | None, raw_last: bytes | None) -> AuditHead:
        if raw_head is not None:
            try:
                return AuditHead.from_json(raw_head)
            except ValueError:
                pass
        if raw_last is not None:
            # The head is missing or unreadable: chain on the last entry, so
            # `reskit audit verify` still finds where the log was tampered with.
            try:
                last = AuditEntry.from_json(raw_last)
                return AuditHead(last.seq, last.hash)
            except ValueError:
                pass
        return AuditHead()

    def revive_soon(self, name: str, record: Mapping[str, Any]) -> None:
        """:meth:`revive_expired` on the writer thread (for callers that must not wait)."""
        self._job(lambda: self.revive_expired(name, record))

    # -- shared breakers ------------------------------------------------------------------
    def share_breaker(self, breaker: CircuitBreaker) -> BreakerLink:
        """Tie ``breaker`` (``shared=True``) to the fleet's state of the same name."""
        link = BreakerLink(self, breaker)
        existing = self._links.get(link.key)
        if existing is not None and existing._breaker() is breaker:
            return existing
        self._links[link.key] = link
        registry = self._keys["breakers"]
        self._job(lambda: self._client.hset(registry, link.name, link.key))
        # A process that starts adopts the fleet's state; it never resets it.
        self._job(link.read)
        return link

    def shared_breakers(self) -> list[dict[str, Any]]:
        """Every shared breaker the fleet registered, with its state (read now)."""
        try:
            registry = self._client.hgetall(self._keys["breakers"])
            found = []
            for raw_name, raw_key in sorted(registry.items()):
                name = raw_name.decode(errors="replace")
                key = raw_key.decode(errors="replace")
                if not key.startswith(f"reskit:{{{self.namespace}/b/") or len(key) > 200:
                    continue  # not a key reskit wrote: never read an arbitrary key
                found.append(_fleet_state(name, self._client.hgetall(key)))
            return found
        except _ERRORS as exc:
            raise StoreUnavailable(f"cannot read the shared breakers at {self.url}: {exc}") from exc

    # -- the audit log --------------------------------------------------------------------
    def _read(self, what: str, read: Callable[[], Any]) -> Any:
        """An operator's read: Redis errors become one StoreUnavailable naming ``what``."""
        try:
            return read()
        except _ERRORS as exc:
            raise StoreUnavailable(f"cannot read {what} at {self.url}: {exc}") from exc

    def audit_lines(self) -> list[str]:
        lines = self._read("the audit log", lambda: self._client.lrange(self._keys["audit"], 0, -1))
        # As stored, oversized ones included: verify() names them for what they are.
        return [line.decode(errors="replace") for line in lines]

    def verify_audit(self) -> Verification:
        """Check the chain of the entries and the head, read in one atomic step."""
        keys = self._keys
        lines, raw_head = self._read(
            "the audit log",
            lambda: self._read_audit_script(keys=[keys["audit"], keys["head"]]),
        )
        head = None
        if raw_head:
            try:
                head = AuditHead.from_json(raw_head)
            except ValueError:
                head = None
        return verify([line.decode(errors="replace") for line in lines], head)

    def audit_head(self) -> AuditHead | None:
        raw = self._read("the audit log", lambda: self._client.get(self._keys["head"]))
        if raw is None:
            return None
        try:
            return AuditHead.from_json(raw)
        except ValueError:
            return None

    # -- declarations ---------------------------------------------------------------------
    def declare(self, declaration: Declaration) -> None:
        self._declared[declaration.name] = declaration

        def write() -> None:
            self._client.hset(self._keys["switches"], declaration.name, declaration.to_json())

        self._job(write)

    def _register(self) -> None:
        """Write this process's switch declarations and shared breakers (after a reconnect)."""
        declared = {name: d.to_json() for name, d in list(self._declared.items())}
        if declared:
            self._client.hset(self._keys["switches"], mapping=declared)
        links = {link.name: link.key for link in list(self._links.values())}
        if links:
            self._client.hset(self._keys["breakers"], mapping=links)

    def declarations(self) -> dict[str, Declaration]:
        raw = self._read(
            "the switch registry", lambda: self._client.hgetall(self._keys["switches"])
        )
        found = {}
        for raw_name, value in raw.items():
            try:
                name = raw_name.decode()
                found[name] = Declaration.from_json(name, value)
            except ValueError:
                continue
        return found

    def idempotency(self) -> RedisIdempotencyStore:
        store = self._idempotency
        if store is None:
            store = self._idempotency = RedisIdempotencyStore(self)
        return store

    def forget_declaration(self, name: str) -> None:
        self._declared.pop(name, None)
        self._read("the switch registry", lambda: self._client.hdel(self._keys["switches"], name))

    def close(self) -> None:
        self._closed = True
        self._stopping.set()
        self._kick()
        self._thread.join(timeout=2 * self.timeout + 1)
        self._writer.join(timeout=2 * self.timeout + 1)
        self._drop_pubsub()
        if self._own_client and self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return (
            f"<RedisStore {self.url} namespace={self.namespace!r} version={self._snapshot.version}>"
        )


def _check_options(url: str) -> None:
    """Refuse a URL option redis-py would choke on only when it first connects."""
    client = redis.Redis.from_url(url)  # no I/O: the pool connects when used
    try:
        client.connection_pool.make_connection()
    except TypeError as exc:
        raise ValueError(
            f"the store URL has an option redis-py does not take ({exc}); reskit's own are "
            "namespace, cluster, resync_interval and timeout"
        ) from None
    finally:
        client.close()


def _batches(lines: list[str], limit: int = 40_000) -> list[list[Any]]:
    """Audit entries (JSON text) in groups that fit one audit entry's size limit."""
    batches: list[list[Any]] = []
    batch: list[Any] = []
    size = 0
    for line in lines:
        cost = len(line.encode()) + 2
        if batch and size + cost > limit:
            batches.append(batch)
            batch, size = [], 0
        try:
            batch.append(json.loads(line))
        except ValueError:
            batch.append(line)
        size += cost
    if batch:
        batches.append(batch)
    return batches


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ValueError(f"{what} must be a number of seconds above 0 (at most 3600), got {text!r}")
    return value


def _int(raw: bytes | None) -> int:
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        return -1  # never equal to a real version: forces a full read


def _json(record: Mapping[str, Any]) -> str:
    # UTF-8, not \u escapes: a 4096-character reason stays within the size limit.
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _line(raw: bytes) -> str:
    """An audit entry for the mirror: an oversized one is kept as a short stand-in."""
    if len(raw) > MAX_ENTRY_BYTES or len(raw) > MAX_VALUE_BYTES:
        return '{"oversized": true}'
    return raw.decode(errors="replace")


_STALENESS = _telemetry.LiveGauge(
    "reskit.store.staleness",
    unit="s",
    description="Seconds since the reskit store was last in sync (0 while it is)",
    observe=lambda store: (store.staleness(), {"reskit.store": store.url}),
)


# -- shared circuit breakers -------------------------------------------------------------

# One script for every step of a shared breaker, so each is atomic and the
# state machine lives in one place. Times are the caller's wall clock in ms
# (reskit's clock, so a fake clock drives a fleet in tests): the hosts' clocks
# must agree to well within reset_timeout, as NTP keeps them.
_BREAKER = """
local now = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures', 'opened_at', 'successes',
  'opens')
local state = h[1] or 'closed'
local gen = tonumber(h[2] or '0')
local failures = tonumber(h[3] or '0')
local opened_at = tonumber(h[4] or '0')
local successes = tonumber(h[5] or '0')
local opens = tonumber(h[6] or '0')
local reset_ms = tonumber(ARGV[1])
local op = ARGV[4]
local function open()
  state = 'open'; gen = gen + 1; failures = 0; successes = 0; opened_at = now
  opens = opens + 1
  redis.call('DEL', KEYS[2])
end
local function reply(changed, extra)
  if op ~= 'read' then
    redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'failures', failures,
      'opened_at', opened_at, 'successes', successes, 'opens', opens, 'name', ARGV[3])
  end
  if changed then redis.call('PUBLISH', ARGV[2], 'b' .. KEYS[1]) end
  local r = {state, gen, failures, opened_at, now, opens}
  for _, v in ipairs(extra or {}) do table.insert(r, v) end
  return r
end
if op == 'failed' then
  if state ~= 'closed' or gen ~= tonumber(ARGV[7]) then return reply(false) end
  failures = failures + 1
  if tonumber(ARGV[6]) > 0 and failures >= tonumber(ARGV[6]) then
    open()
    return reply(true)
  end
  return reply(false)
elseif op == 'succeeded' then
  if state == 'closed' then failures = 0 end
  return reply(false)
elseif op == 'opened' then
  if state ~= 'closed' or gen ~= tonumber(ARGV[6]) then return reply(false) end
  open()
  return reply(true)
elseif op == 'lease' then
  local changed = false
  if state == 'open' and now >= opened_at + reset_ms then
    state = 'half_open'; gen = gen + 1; successes = 0; changed = true
  end
  local granted = {}
  if state == 'half_open' then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    local n = redis.call('ZCARD', KEYS[2])
    while n < tonumber(ARGV[6]) and #granted < tonumber(ARGV[8]) do
      local id = ARGV[9] .. ':' .. redis.call('HINCRBY', KEYS[1], 'lease_seq', 1)
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), id)
      table.insert(granted, id)
      n = n + 1
    end
  end
  return reply(changed, granted)
elseif op == 'probe' then
  local held = redis.call('ZREM', KEYS[2], ARGV[6])
  if held == 0 or state ~= 'half_open' then return reply(false) end
  if ARGV[7] == 'failed' then
    open()
    return reply(true)
  end
  if ARGV[7] == 'ok' then
    successes = successes + 1
    if successes >= tonumber(ARGV[8]) then
      state = 'closed'; gen = gen + 1; failures = 0; successes = 0
      redis.call('DEL', KEYS[2])
      return reply(true)
    end
  end
  return reply(false)
elseif op == 'reset' then
  state = 'closed'; gen = gen + 1; failures = 0; successes = 0
  redis.call('DEL', KEYS[2])
  return reply(true)
end
return reply(false)
"""

#: A probe lease that needs no fleet: the store is out of reach, so the breaker
#: probes on its own (fail static) until it is back.
LOCAL_LEASE = "local"

_STATES = {b"closed": BreakerState.CLOSED, b"open": BreakerState.OPEN}
_STATES[b"half_open"] = BreakerState.HALF_OPEN


class BreakerLink:
    """One shared breaker's tie to the fleet's state in Redis.

    The breaker calls :meth:`take_lease`, :meth:`report` and :meth:`probe_done`
    from its slow paths; they only read and append to local queues. The
    store's writer thread runs the Lua steps and makes the breaker follow the
    fleet's state (:meth:`CircuitBreaker._follow`).
    """

    def __init__(self, store: RedisStore, breaker: CircuitBreaker) -> None:
        name = breaker.name
        assert name is not None
        self.store = store
        self.name = name
        # Users' names never go into a key as they are: hashed, inside the tag.
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        tag = f"{store.namespace}/b/{digest}"
        self.key = f"reskit:{{{tag}}}:state"
        self.probes = f"reskit:{{{tag}}}:probes"
        self._breaker = weakref.ref(breaker)
        self.gen = -1
        self._leases: collections.deque[str] = collections.deque()
        self._wanted = False
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    def _after_fork(self) -> None:
        self._leases.clear()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    # -- called by the breaker (no I/O) ----------------------------------------------------
    def take_lease(self) -> str | None:
        if self.store.stale or self.gen < 0:
            return LOCAL_LEASE
        try:
            return self._leases.popleft()
        except IndexError:
            self._wanted = True
            self.store._job(self.tick)
            return None

    def report(self, kind: str) -> None:
        breaker = self._breaker()
        if breaker is None:
            return
        # The generation this outcome belongs to, taken now: by the time the
        # writer sends it the fleet may have moved on, and then it must not count.
        # (Before the link first heard from the fleet, the generation it hears then.)
        known = self.gen

        def gen() -> int:
            return known if known >= 0 else self.gen

        if kind == "failed":
            fail_max = breaker.fail_max if breaker.failure_rate is None else 0
            self.store._job(lambda: self._step("failed", fail_max, gen()))
        elif kind == "opened":
            self.store._job(lambda: self._step("opened", gen()))
        else:
            self.store._job(lambda: self._step(kind))

    def probe_done(self, lease: object, outcome: int, slow: bool) -> None:
        if lease is LOCAL_LEASE or not isinstance(lease, str):
            return
        result = "neither" if outcome == 2 else "failed" if outcome == 1 or slow else "ok"
        breaker = self._breaker()
        threshold = 1 if breaker is None else breaker.success_threshold
        self.store._job(lambda: self._step("probe", lease, result, threshold))

    # -- on the store's threads -----------------------------------------------------------
    def _step(self, op: str, *args: object) -> list[Any]:
        breaker = self._breaker()
        reset_ms = 60_000 if breaker is None else int(breaker.reset_timeout * 1000)
        now = int(_clock.wall() * 1000)
        reply: list[Any] = self.store._breaker_script(
            keys=[self.key, self.probes],
            args=[reset_ms, self.store.channel, self.name, op, now, *args],
        )
        self._apply(reply, reset_ms)
        return reply

    def read(self) -> None:
        self._step("read")

    def _apply(self, reply: list[Any], reset_ms: int) -> None:
        state = _STATES.get(reply[0], BreakerState.CLOSED)
        gen, failures, opened_at, now = (int(value) for value in reply[1:5])
        # Replies arrive in order (one writer thread makes every step), so the
        # newest always wins, even a generation lower than before: a Redis that
        # lost its data starts the fleet's breaker afresh, and so do we.
        moved = gen != self.gen
        if moved or state is not BreakerState.HALF_OPEN:
            self._leases.clear()
        self.gen = gen
        self._leases.extend(lease.decode() for lease in reply[6:])
        breaker = self._breaker()
        if breaker is None:
            return
        if moved:
            # The fleet changed state: follow it.
            breaker._follow(state, (opened_at + reset_ms - now) / 1000.0, failures)
        elif state is BreakerState.CLOSED:
            # Same generation: only the count moved. A breaker that opened here
            # meanwhile stays open (its "opened" report is on its way), rather
            # than let an older reply close it and admit calls.
            breaker._count_fleet_failures(failures)

    def tick(self) -> None:
        """Ask the fleet for probe leases when the breaker wants to probe and has none."""
        breaker = self._breaker()
        if breaker is None or not self._wanted or self._leases:
            return
        self._wanted = False
        if breaker._peek() is not BreakerState.HALF_OPEN:
            return
        want = breaker.half_open_max_calls - len(breaker._probes)
        if want > 0:
            ttl = breaker.max_half_open_wait or breaker.reset_timeout
            self._step("lease", breaker.half_open_max_calls, int(ttl * 1000), want, self.owner)


def _fleet_state(name: str, raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    def number(field: bytes) -> int:
        try:
            return int(raw.get(field, b"0"))
        except ValueError:
            return 0

    state = raw.get(b"state", b"closed").decode(errors="replace")
    return {
        "name": name,
        "state": state if state in ("closed", "open", "half_open") else "unknown",
        "failures": number(b"failures"),
        "opens": number(b"opens"),
        "generation": number(b"gen"),
    }


# -- idempotency records ---------------------------------------------------------------------

# A record is one hash: fp (the fingerprint), done ("0" or "1"), token (the holder's
# fencing token), lease_until (ms, the caller's wall clock), value (when done).
_IDEM_CLAIM = """
local r = redis.call('HMGET', KEYS[1], 'fp', 'done', 'token', 'lease_until', 'value')
local now = tonumber(ARGV[2])
if not r[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'done', '0', 'token', ARGV[5],
    'lease_until', now + tonumber(ARGV[3]))
  -- Kept at least as long as its lease: a call running past ttl still holds its key.
  redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), tonumber(ARGV[3])))
  return {'claimed', ARGV[5]}
end
if r[1] ~= ARGV[1] then return {'mismatch'} end
if r[2] == '1' then return {'replay', r[3] or '0', r[5] or ''} end
if (tonumber(r[4]) or 0) > now then return {'conflict', r[4]} end
redis.call('HSET', KEYS[1], 'token', ARGV[5], 'lease_until', now + tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {'claimed', ARGV[5]}
"""

_IDEM_COMPLETE = """
local r = redis.call('HMGET', KEYS[1], 'token', 'done')
if r[1] ~= ARGV[1] or r[2] ~= '0' then return 0 end
redis.call('HSET', KEYS[1], 'done', '1', 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

_IDEM_RENEW = """
local r = redis.call('HMGET', KEYS[1], 'token', 'done')
if r[1] ~= ARGV[1] or r[2] ~= '0' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

_IDEM_RELEASE = """
local r = redis.call('HMGET', KEYS[1], 'token', 'done')
if r[1] == ARGV[1] and r[2] == '0' then redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdempotencyStore(IdempotencyStore):
    """Idempotency records in Redis, shared by every process on the same store.

    Each operation is one Lua script on one key, so each is atomic and one
    round trip: a claim (with its lease and fencing token), a completion
    (fenced: a holder that lost its lease cannot write), a renewal, a release.
    A replay comes back with the claim. Keys are the SHA-256 of the
    idempotency key, each in a hash slot of its own (Redis Cluster), and
    values are the bytes the caller encoded (JSON), never unpickled.

    The async methods run the sync client on a worker thread: never on the
    event loop, and with no client tied to one loop to leak when it closes.

    .. versionadded:: 0.1.0
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def _key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return f"reskit:{{{self._store.namespace}/i/{digest}}}"

    def _run(self, source: str, key: str, *args: Any) -> Any:
        try:
            return self._store._script(source)(keys=[self._key(key)], args=list(args))
        except _ERRORS as exc:
            raise StoreUnavailable(
                f"the idempotency store at {self._store.url} cannot be used ({exc})"
            ) from exc

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        token = secrets.randbits(62) + 1
        now = int(_clock.wall() * 1000)
        reply = self._run(
            _IDEM_CLAIM, key, fingerprint, now, int(lease * 1000), max(int(ttl * 1000), 1), token
        )
        status = reply[0].decode()
        if status == "claimed":
            return Claim("claimed", token)
        if status == "replay":
            return Claim("replay", _int(reply[1]), bytes(reply[2]))
        if status == "conflict":
            return Claim("conflict", lease_until=_int(reply[1]) / 1000.0)
        return Claim("mismatch")

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        now = int(_clock.wall() * 1000)
        return bool(self._run(_IDEM_RENEW, key, token, now, int(lease * 1000)))

    def complete(self, key: str, token: int, value: bytes, *, ttl: float) -> bool:
        return bool(self._run(_IDEM_COMPLETE, key, token, value, max(int(ttl * 1000), 1)))

    def release(self, key: str, token: int) -> None:
        self._run(_IDEM_RELEASE, key, token)

    def peek(self, key: str) -> Claim | None:
        try:
            raw = self._store._client.hmget(self._key(key), "done", "value", "lease_until")
        except _ERRORS as exc:
            raise StoreUnavailable(f"the idempotency store cannot be read ({exc})") from exc
        done, value, lease_until = raw
        if done == b"1":
            return Claim("replay", value=bytes(value or b""))
        if done == b"0" and _int(lease_until) / 1000.0 > _clock.wall():
            return Claim("conflict", lease_until=_int(lease_until) / 1000.0)
        return None

    async def aclaim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        import asyncio

        return await asyncio.to_thread(self.claim, key, fingerprint, lease=lease, ttl=ttl)

    async def arenew(self, key: str, token: int, *, lease: float) -> bool:
        import asyncio

        return await asyncio.to_thread(self.renew, key, token, lease=lease)

    async def acomplete(self, key: str, token: int, value: bytes, *, ttl: float) -> bool:
        import asyncio

        return await asyncio.to_thread(self.complete, key, token, value, ttl=ttl)

    async def arelease(self, key: str, token: int) -> None:
        import asyncio

        await asyncio.to_thread(self.release, key, token)

    async def apeek(self, key: str) -> Claim | None:
        import asyncio

        return await asyncio.to_thread(self.peek, key)

"""The store: where kill switches, brownout levels and operator states live.

reskit keeps the *control state* (switches, levels, breakers forced by an
operator) as a versioned set of records, one JSON object per field:

``s:<name>``
    a kill switch: ``{"killed", "reason", "actor", "at", "until", "last_killed"}``
``l:`` and ``l:<tenant>``
    the global brownout level and a tenant's: ``{"level", "reason", "actor", "at"}``
``b:<name>``
    a breaker forced by an operator: ``{"mode", "reason", "actor", "at"}``, where
    ``mode`` is ``"forced_open"`` or ``"forced_closed"``

Every change goes through :meth:`Store.change`, which writes the record, bumps
the version and appends the audit entry as one atomic step, so an acknowledged
flip is always audited. Each process keeps the last snapshot it saw in memory:
that is all the hot path reads. A store tells its listeners when the snapshot
changes; the memory store at once, the Redis store when pub/sub (or its
periodic version check) says so.

Records read back from a store are checked field by field (:func:`parse_record`):
anything else (a pickle, malformed JSON, a wrong type, a huge value) is reported
and left out, never trusted.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _fork, _telemetry
from ._audit import AuditEntry, AuditHead, Verification, loads
from ._errors import ReskitError

if TYPE_CHECKING:
    from ._idempotency import IdempotencyStore

__all__ = [
    "MAX_VALUE_BYTES",
    "Declaration",
    "Snapshot",
    "Store",
    "StoreUnavailable",
    "configure",
    "current_store",
    "parse_record",
]

#: The largest record a store accepts back; a planted 10 MB value is refused unread.
MAX_VALUE_BYTES = 64 * 1024

SWITCH = "s:"
LEVEL = "l:"
BREAKER = "b:"

FAIL_MODES = ("open", "closed")
BREAKER_MODES = ("forced_open", "forced_closed")


class StoreUnavailable(ReskitError):
    """The store could not be reached to make a change; nothing was changed.

    Reads never raise it: they use the last known state (fail static). Only a
    change (a kill, a revive, a new brownout level, an operator breaker state)
    needs the store, because an unrecorded change must not look acknowledged.

    .. versionadded:: 0.1.0
    """


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The control state at one version: checked records by field name.

    .. versionadded:: 0.1.0
    """

    version: int = 0
    records: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def switch(self, name: str) -> Mapping[str, Any] | None:
        return self.records.get(SWITCH + name)

    def level(self, tenant: str | None = None) -> Mapping[str, Any] | None:
        return self.records.get(LEVEL + (tenant or ""))

    def breaker(self, name: str) -> Mapping[str, Any] | None:
        return self.records.get(BREAKER + name)

    def items(self, prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for key, record in self.records.items():
            if key.startswith(prefix):
                yield key[len(prefix) :], record


@dataclass(frozen=True, slots=True)
class Declaration:
    """A kill switch as its code declares it: who owns it, what it turns off.

    ``last_seen`` is when a process last declared it (seconds since the epoch).

    .. versionadded:: 0.1.0
    """

    name: str
    owner: str | None = None
    description: str | None = None
    fail_mode: str = "open"
    last_seen: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "description": self.description,
                "fail_mode": self.fail_mode,
                "last_seen": self.last_seen,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, name: str, text: str | bytes) -> Declaration:
        if len(text) > MAX_VALUE_BYTES:
            raise ValueError(f"a declaration of {len(text)} bytes is over the limit")
        data = loads(text)
        if not isinstance(data, dict):
            raise ValueError("a declaration must be a JSON object")
        owner, description = data.get("owner"), data.get("description")
        fail_mode, last_seen = data.get("fail_mode", "open"), data.get("last_seen", 0.0)
        if not (owner is None or isinstance(owner, str)) or not (
            description is None or isinstance(description, str)
        ):
            raise ValueError("a declaration's owner and description must be strings")
        if fail_mode not in FAIL_MODES:
            raise ValueError("a declaration's fail_mode must be 'open' or 'closed'")
        if not _is_time(last_seen):
            raise ValueError("a declaration's last_seen must be a time")
        return cls(name, owner, description, fail_mode, float(last_seen))


def _is_time(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _optional_time(value: object) -> bool:
    return value is None or _is_time(value)


def _text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 4096


def parse_record(key: str, raw: str | bytes) -> dict[str, Any]:
    """Check one stored record; return it, or raise ``ValueError`` saying what is wrong.

    Only JSON objects of the expected shape pass. ``raw`` is never unpickled or
    evaluated: bytes that are not UTF-8 JSON (a pickle) fail like any bad text.
    """
    if len(raw) > MAX_VALUE_BYTES:
        raise ValueError(f"{len(raw)} bytes is over the {MAX_VALUE_BYTES}-byte limit")
    data = loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    common: tuple[str, ...] = ("reason", "actor", "at")
    if not (_text(data.get("reason")) and _text(data.get("actor")) and _is_time(data.get("at"))):
        raise ValueError("reason and actor must be strings and at a time")
    if key.startswith(SWITCH):
        if not isinstance(data.get("killed"), bool):
            raise ValueError("killed must be true or false")
        if not (_optional_time(data.get("until")) and _optional_time(data.get("last_killed"))):
            raise ValueError("until and last_killed must be times or null")
        keys: tuple[str, ...] = (*common, "killed", "until", "last_killed")
    elif key.startswith(LEVEL):
        level = data.get("level")
        if type(level) is not int or not 0 <= level <= 100:
            raise ValueError("level must be a whole number from 0 to 100")
        keys = (*common, "level")
    elif key.startswith(BREAKER):
        if data.get("mode") not in BREAKER_MODES:
            raise ValueError("mode must be 'forced_open' or 'forced_closed'")
        keys = (*common, "mode")
    else:
        raise ValueError("unknown kind of record")
    return {name: data.get(name) for name in keys}


def check_name(name: object, what: str) -> str:
    """A switch, tenant or breaker name: any text of 1 to 256 characters.

    Names reach Redis only as hash fields or hashed into keys, so ``*``, ``:``,
    braces and newlines are harmless there; the limit keeps records small.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= 256:
        raise ValueError(f"a {what} must be a string of 1 to 256 characters, got {name!r}")
    return name


Listener = Callable[["Snapshot"], None]
Record = Mapping[str, Any]
#: A record to write: the record itself, ``None`` to delete, or a function of the current one.
After = Record | None | Callable[[Record | None], Record | None]


def resolve(after: After, before: Record | None) -> Record | None:
    """The record ``after`` stands for, given the current record ``before``."""
    return after(before) if callable(after) else after


class Store:
    """Where the control state and the audit log live; the base of every store.

    Subclasses implement :meth:`change`, :meth:`audit_lines`, :meth:`audit_head`,
    :meth:`declare` and :meth:`declarations`, and call :meth:`_publish` with
    every newer snapshot they learn of. Reads of the snapshot are local and
    never block.

    .. versionadded:: 0.1.0
    """

    #: The store's address, as :func:`reskit.configure` was given it.
    url: str = ""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._listeners: list[Listener] = []
        self._listen_lock = threading.Lock()
        #: Whether a snapshot was ever read from the backend (else fail modes apply).
        self.known = True
        _fork.track(self)

    def _after_fork(self) -> None:
        self._listen_lock = threading.Lock()

    # -- reading (local, never blocks) ---------------------------------------------
    def snapshot(self) -> Snapshot:
        """The last control state this process knows."""
        return self._snapshot

    def staleness(self) -> float:
        """Seconds since the backend was last known to be in sync; ``0.0`` when it is."""
        return 0.0

    @property
    def stale(self) -> bool:
        """Whether the backend is out of reach (the snapshot may be old)."""
        return False

    # -- listening ------------------------------------------------------------------------
    def listen(self, listener: Listener) -> None:
        """Call ``listener(snapshot)`` with every newer snapshot (and staleness change)."""
        with self._listen_lock:
            self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        with self._listen_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._notify()

    def _notify(self) -> None:
        with self._listen_lock:
            listeners = list(self._listeners)
        snapshot = self._snapshot
        for listener in listeners:
            _telemetry.guard("a reskit store listener", listener, snapshot)

    # -- writing ------------------------------------------------------------------------
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
        """Set record ``key`` to ``after`` (``None`` deletes it) and audit it, atomically.

        ``after`` may be a function of the record as it is at that moment
        (``None`` if there is none), for a change that keeps part of it.
        ``expect``, when given, is asked about the record as it is now; if it
        answers false nothing is written and ``None`` is returned (a ttl revive
        that another process already did). Raises :class:`StoreUnavailable`
        when the backend cannot be reached.
        """
        raise NotImplementedError

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
        """:meth:`change` for async code; a store with network I/O awaits it.

        The base calls :meth:`change`, right for a store that never waits (memory).
        """
        return self.change(
            key, after, actor=actor, action=action, target=target, reason=reason, expect=expect
        )

    def revive_expired(self, name: str, record: Mapping[str, Any]) -> None:
        """Revive switch ``name``, whose kill ``record`` ran out of ttl; audited, once.

        Only if the switch still holds that same kill: of the processes that
        notice together, one revives it, and a kill made meanwhile stays.
        """
        from . import _clock

        after = {**record, "killed": False, "until": None, "actor": "reskit", "at": _clock.wall()}
        after["reason"] = "ttl expired"
        self.change(
            SWITCH + name,
            after,
            actor="reskit",
            action="revive",
            target=f"switch:{name}",
            reason="the kill's ttl expired",
            expect=lambda current: current == record,
        )

    def audit_lines(self) -> list[str]:
        """Every audit entry as stored (JSON text), oldest first."""
        raise NotImplementedError

    def audit_head(self) -> AuditHead | None:
        """The head the store keeps apart from the entries, or ``None`` if it is missing."""
        raise NotImplementedError

    def audit(self, last: int | None = None) -> list[AuditEntry]:
        """The audit entries (the ``last`` ones only, if given), oldest first.

        Entries that cannot be read are left out; :meth:`verify_audit` names them.
        """
        lines = self.audit_lines()
        if last is not None:
            lines = lines[-last:] if last > 0 else []
        entries = []
        for line in lines:
            try:
                entries.append(AuditEntry.from_json(line))
            except ValueError:
                continue
        return entries

    def verify_audit(self) -> Verification:
        """Check the audit log's chain; see :func:`reskit._audit.verify`."""
        from ._audit import verify

        return verify(self.audit_lines(), self.audit_head())

    def declare(self, declaration: Declaration) -> None:
        """Record that code in this process declares a switch (best effort, never raises)."""
        raise NotImplementedError

    def declarations(self) -> dict[str, Declaration]:
        """Every declared switch the store knows of, by name."""
        raise NotImplementedError

    def forget_declaration(self, name: str) -> None:
        """Drop ``name`` from the registry of declared switches (a process that still
        declares it adds it again when it next starts or reconnects)."""
        raise NotImplementedError

    def idempotency(self) -> IdempotencyStore:
        """This store's idempotency records (what :func:`reskit.idempotent` uses)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop background work and release connections."""


# -- the store in use ------------------------------------------------------------------

_lock = threading.Lock()
_current: Store | None = None
_owned = False  # whether reskit opened _current (and so closes it when replaced)
_on_change: list[Callable[[Store | None, Store], None]] = []


def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)


def open_store(store: str | Store) -> Store:
    """A store for ``"memory"``, a ``redis://`` / ``rediss://`` / ``unix://`` URL, or as given."""
    if isinstance(store, Store):
        return store
    if not isinstance(store, str) or not store:
        raise TypeError(f"store must be 'memory', a redis:// URL or a Store, got {store!r}")
    if store == "memory" or store.startswith("memory://"):
        from .stores.memory import MemoryStore

        return MemoryStore()
    if store.startswith(("redis://", "rediss://", "unix://")):
        from .stores.redis import RedisStore

        return RedisStore(store)
    raise ValueError(
        f"unknown store {store!r}: use 'memory' or a redis://host:6379/0 URL (rediss:// for "
        "TLS, unix:///path/to/socket for a socket); in code, a Store object works too"
    )


def configure(store: str | Store | None = None) -> Store:
    """Choose where kill switches, brownout levels and the audit log live.

    ``"memory"`` (the default) keeps them in this process. A Redis URL
    (``redis://host:6379/0``, ``rediss://`` for TLS, ``unix:///path``) shares
    them with every process configured with the same URL; add
    ``?namespace=NAME`` to keep several fleets apart on one Redis. With no
    ``store``, the ``RESKIT_STORE`` environment variable is read, else
    ``"memory"``. A :class:`Store` object may be given too. Returns the store
    now in use. The store before is closed if reskit opened it from a name or
    URL; a store object you passed in is yours to close.

    Nothing is read or written on Redis before this returns: a Redis that is
    down at start-up costs one warning, not an exception.

    .. versionadded:: 0.1.0
    """
    global _current
    global _owned
    if store is None:
        store = os.environ.get("RESKIT_STORE") or "memory"
    new = open_store(store)
    with _lock:
        old, _current = _current, new
        owned, _owned = _owned, not isinstance(store, Store)
    if old is not None and old is not new and owned:
        _telemetry.guard("closing the previous reskit store", old.close)
    for hook in list(_on_change):
        hook(old, new)
    return new


def current_store() -> Store:
    """The store in use; the first call configures one from ``RESKIT_STORE`` (or memory).

    .. versionadded:: 0.1.0
    """
    store = _current
    if store is None:
        with _lock:
            store = _current
        if store is None:
            return configure()
    return store


def on_change(hook: Callable[[Store | None, Store], None]) -> None:
    """Call ``hook(old, new)`` whenever :func:`configure` switches stores."""
    _on_change.append(hook)

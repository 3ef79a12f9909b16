"""Kill switches and brownout levels: flags the hot path reads, a store behind them.

A policy's kill switch and brownout shed are gates (``_gate.py``) that keep no
per-call state. Each owns a :class:`Flag` whose ``up`` attribute is true
whenever the gate might reject; the engine reads it inline and calls the gate
only then. So a call through a policy whose switch is on and whose level is
below ``shed_at`` pays two attribute reads, whatever store is configured.

The flags are recomputed from the store's snapshot (``_store.py``) each time it
changes, under one lock, by :class:`_Control`. The decisions behind a raised
flag (is the kill's ``ttl`` over? is this tenant's level below the global
one?) are made in the gate's ``admit``, off the fast path.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _clock, _fork, _telemetry
from ._errors import KillSwitchOff, Shed

if TYPE_CHECKING:
    from ._audit import AuditEntry
    from ._breaker import CircuitBreaker
    from ._policy import Policy
    from ._store import Snapshot, Store

__all__ = [
    "Flag",
    "KillSwitch",
    "SwitchInfo",
    "aforce_breaker",
    "aforget_switch",
    "akill",
    "arelease_breaker",
    "arevive",
    "aset_brownout_level",
    "bind_tenant",
    "brownout_gate",
    "brownout_level",
    "current_tenant",
    "force_breaker",
    "forget_switch",
    "is_killed",
    "kill",
    "kill_switch",
    "release_breaker",
    "revive",
    "set_brownout_level",
    "switches",
]

#: The tenant of the current call, for per-tenant brownout levels (and quotas).
_tenant: ContextVar[str | None] = ContextVar("reskit_tenant", default=None)

MAX_LEVEL = 100


class Flag:
    """One boolean the hot path reads: ``up`` is true while a gate might reject."""

    __slots__ = ("up",)

    def __init__(self) -> None:
        self.up = False

    def __repr__(self) -> str:
        return f"<Flag up={self.up}>"


# -- the process's view of the control state ------------------------------------------


def _killed(record: Mapping[str, Any] | None, now: float) -> bool:
    if record is None or not record["killed"]:
        return False
    until = record["until"]
    return until is None or now < until


class _Control:
    """Recomputes every flag from the store's snapshot; one per process."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.store: Store | None = None
        self.snapshot: Snapshot | None = None
        self._switch_flags: dict[str, Flag] = {}
        self._fail_modes: dict[str, str] = {}
        self._declared: dict[str, KillSwitch] = {}
        self._shed_flags: dict[int, Flag] = {}
        self._levels: dict[str, int] = {}
        self._global_level = 0
        self._max_level = 0
        self._breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        # Kills whose ttl ran out and whose revival was asked of the store: by
        # name, the kill's time. Each is asked for once, however often checked.
        self._expiring: dict[str, float] = {}
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()

    # -- binding to the store ---------------------------------------------------------
    def bind(self, store: Store) -> None:
        with self._lock:
            old, self.store = self.store, store
            if old is not None:
                old.unlisten(self.apply)
            declared = list(self._declared.values())
        store.listen(self.apply)
        for switch in declared:
            self._declare_in(store, switch)
        for breaker in list(self._breakers):
            if breaker.shared:
                self._link(breaker, store)
        self.apply(store.snapshot())

    def current(self) -> Store:
        store = self.store
        if store is None:
            from ._store import current_store

            store = current_store()
            if self.store is not store:
                self.bind(store)
        return store

    # -- recomputing ------------------------------------------------------------------
    def apply(self, snapshot: Snapshot) -> None:
        """Recompute every flag (and operator breaker state) from the store's snapshot.

        ``snapshot`` is what a notification carried; the store's latest is used
        instead, read under the lock, so a notification that arrives late (after
        a newer one) cannot bring an older state back.
        """
        from ._store import LEVEL

        now = _clock.wall()
        with self._lock:
            store = self.store
            if store is not None:
                snapshot = store.snapshot()
            known = store is None or store.known
            self.snapshot = snapshot
            for name, flag in self._switch_flags.items():
                flag.up = _killed(snapshot.switch(name), now) or (
                    not known and self._fail_modes.get(name) == "closed"
                )
            levels = {tenant: record["level"] for tenant, record in snapshot.items(LEVEL)}
            self._global_level = levels.pop("", 0)
            self._levels = levels
            self._max_level = max((self._global_level, *levels.values()))
            for threshold, flag in self._shed_flags.items():
                flag.up = self._max_level >= threshold
            breakers = list(self._breakers)
        for breaker in breakers:
            self._apply_breaker(breaker, snapshot)

    def _snapshot(self) -> Snapshot:
        self.current()
        snapshot = self.snapshot
        assert snapshot is not None
        return snapshot

    # -- switches ---------------------------------------------------------------------
    def switch_flag(self, switch: KillSwitch) -> Flag:
        name = switch.name
        with self._lock:
            flag = self._switch_flags.get(name)
            if flag is None:
                flag = self._switch_flags[name] = Flag()
            known = self._declared.get(name)
            if switch.declared:
                if known is not None and known.declared and not known.same_declaration(switch):
                    raise ValueError(
                        f"kill switch {name!r} is declared twice with different settings "
                        f"({known.describe()} and {switch.describe()}); declare it once and "
                        "pass the KillSwitch object (or its name) to every policy"
                    )
                self._declared[name] = switch
                self._fail_modes[name] = switch.fail_mode
            elif known is None:
                self._declared[name] = switch
                self._fail_modes.setdefault(name, switch.fail_mode)
        store = self.current()
        self._declare_in(store, self._declared[name])
        self.apply(store.snapshot())
        return flag

    def _declare_in(self, store: Store, switch: KillSwitch) -> None:
        from ._store import Declaration

        _telemetry.guard(
            "declaring a kill switch in the store",
            store.declare,
            Declaration(
                switch.name, switch.owner, switch.description, switch.fail_mode, _clock.wall()
            ),
        )

    def check_switch(self, switch: KillSwitch, policy: str | None) -> None:
        """The decision behind a raised switch flag: raise, or find it is over."""
        store = self.current()
        snapshot = self._snapshot()
        record = snapshot.switch(switch.name)
        now = _clock.wall()
        if record is not None and record["killed"]:
            until = record["until"]
            if until is None or now < until:
                raise _off(switch.name, record, policy, None if until is None else until - now)
            self.expire(switch.name, record)
            return
        if not store.known and self._fail_modes.get(switch.name) == "closed":
            raise KillSwitchOff(
                f"kill switch {switch.name!r} fails closed and its state is unknown "
                "(the store has not been reached yet)",
                policy=policy,
            )
        self.apply(snapshot)  # the flag was stale (a store that became known)

    def expire(self, name: str, record: Mapping[str, Any]) -> None:
        """Revive ``name`` because its ttl is over: locally now, in the store (audited)."""
        store = self.current()
        with self._lock:
            if self._expiring.get(name) == record["at"]:
                return  # asked for already; the flag dropped then
            self._expiring[name] = record["at"]
        # A store that must not make the caller wait (Redis) does it on its own thread.
        revive = getattr(store, "revive_soon", store.revive_expired)
        try:
            revive(name, record)
        except Exception as exc:  # the store is down: the local flag still drops
            _telemetry.report(f"reviving kill switch {name!r} after its ttl", exc)
        self.apply(store.snapshot())

    # -- brownout ---------------------------------------------------------------------
    def shed_flag(self, threshold: int) -> Flag:
        with self._lock:
            flag = self._shed_flags.get(threshold)
            if flag is None:
                flag = self._shed_flags[threshold] = Flag()
        self.apply(self._snapshot())
        return flag

    def level_for(self, tenant: str | None) -> int:
        if tenant is not None:
            level = self._levels.get(tenant)
            if level is not None:
                return level
        return self._global_level

    # -- breakers an operator forced ----------------------------------------------------
    def adopt_breaker(self, breaker: CircuitBreaker) -> None:
        with self._lock:
            self._breakers.add(breaker)
        store = self.current()
        if breaker.shared:
            self._link(breaker, store)
        self._apply_breaker(breaker, self._snapshot())

    def _link(self, breaker: CircuitBreaker, store: Store) -> None:
        """Tie a shared breaker to the store's fleet state (none on the memory store)."""
        share = getattr(store, "share_breaker", None)
        link = None if share is None else share(breaker)
        if breaker._fleet is not link:
            breaker._fleet = link

    def _apply_breaker(self, breaker: CircuitBreaker, snapshot: Snapshot) -> None:
        name = breaker.name
        if name is None:
            return
        record = snapshot.breaker(name)
        mode = None if record is None else record["mode"]
        _telemetry.guard("applying an operator breaker state", breaker._operate, mode)


_control: _Control | None = None
_control_lock = threading.Lock()


def control() -> _Control:
    """The process's control view, bound to the current store on first use."""
    ctl = _control
    if ctl is None:
        ctl = _make_control()
    return ctl


def _make_control() -> _Control:
    global _control
    with _control_lock:
        if _control is None:
            from . import _store

            ctl = _Control()
            if _rebind not in _store._on_change:
                _store.on_change(_rebind)
            _control = ctl
    assert _control is not None
    return _control


def _rebind(old: Store | None, new: Store) -> None:
    ctl = _control
    if ctl is not None:
        ctl.bind(new)


def forget() -> None:
    """Drop the process's switch registry and flags (for test isolation).

    Policies compiled before keep flags that no longer follow the store: build
    new ones afterwards.
    """
    global _control
    with _control_lock:
        old, _control = _control, None
        _shedders.clear()
    if old is not None and old.store is not None:
        old.store.unlisten(old.apply)


def _renew_lock() -> None:
    global _control_lock
    _control_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)


def _off(
    name: str, record: Mapping[str, Any], policy: str | None, retry_after: float | None
) -> KillSwitchOff:
    reason = record["reason"]
    return KillSwitchOff(
        f"kill switch {name!r} is off ({reason}, by {record['actor']})",
        policy=policy,
        retry_after=retry_after,
    )


# -- the gates ------------------------------------------------------------------------


class KillSwitch:
    """A named switch that turns a policy's calls off, in every process sharing a store.

    While the switch is killed (:func:`reskit.kill`) the policy rejects its calls
    with :class:`~reskit.KillSwitchOff` (or answers with its fallback) without
    running them. ``Policy(kill_switch="payments")`` makes one with the
    defaults; make it yourself to declare who owns it and how it fails::

        payments_switch = reskit.KillSwitch(
            "payments",
            owner="team-payments",
            description="turns off card charging; orders queue instead",
            fail_mode="open",
        )
        payments = reskit.Policy("payments", kill_switch=payments_switch)

    Args:
        name: the switch's name (1 to 256 characters); policies that give the
            same name share the switch.
        owner: who to ask before flipping it.
        description: what turning it off does.
        fail_mode: what the switch does while its state is *unknown*, that is
            when the store has never been reached since the process started:
            ``"open"`` (the default) lets calls through, ``"closed"`` rejects
            them. A store that goes away later keeps its last known state
            (fail static), whatever the mode.

    Declared switches are listed by ``reskit switches`` and
    :func:`reskit.switches`, with when each was last flipped and last
    exercised (killed).

    .. versionadded:: 0.1.0
    """

    timed = False
    waits = False
    #: Keeps no per-call state: the engine never calls :meth:`record` and calls
    #: :meth:`admit` only while :attr:`flag` is up.
    records = False
    rejection = KillSwitchOff

    __slots__ = ("_description", "_fail_mode", "_owner", "declared", "flag", "name")

    def __init__(
        self,
        name: str,
        *,
        owner: str | None = None,
        description: str | None = None,
        fail_mode: str | None = None,
    ) -> None:
        from ._store import FAIL_MODES, check_name

        self.name = check_name(name, "kill switch name")
        for value, what in ((owner, "owner"), (description, "description")):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"KillSwitch {what}= must be a string, got {value!r}")
        if fail_mode is not None and fail_mode not in FAIL_MODES:
            raise ValueError(
                f"KillSwitch fail_mode= must be 'open' (calls pass while the state is "
                f"unknown) or 'closed' (calls are rejected), got {fail_mode!r}"
            )
        self._owner = owner
        self._description = description
        self._fail_mode = fail_mode or "open"
        #: Whether anything beyond the name was given (else it adopts a declaration).
        self.declared = owner is not None or description is not None or fail_mode is not None
        self.flag = control().switch_flag(self)

    def _declaration(self) -> KillSwitch:
        """The switch whose settings apply: this one, or the one that declared the name."""
        if self.declared:
            return self
        declared = control()._declared.get(self.name)
        return declared if declared is not None and declared.declared else self

    @property
    def owner(self) -> str | None:
        """Who to ask before flipping it (from the declaration, for a bare name)."""
        return self._declaration()._owner

    @property
    def description(self) -> str | None:
        """What turning it off does."""
        return self._declaration()._description

    @property
    def fail_mode(self) -> str:
        """``"open"`` or ``"closed"``: what the switch does while its state is unknown."""
        return self._declaration()._fail_mode

    def same_declaration(self, other: KillSwitch) -> bool:
        return (self.owner, self.description, self.fail_mode) == (
            other.owner,
            other.description,
            other.fail_mode,
        )

    def describe(self) -> str:
        return (
            f"owner={self.owner!r}, description={self.description!r}, fail_mode={self.fail_mode!r}"
        )

    def admit(
        self,
        policy: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise :class:`~reskit.KillSwitchOff` while the switch is killed."""
        if self.flag.up:
            control().check_switch(self, policy)

    def record(
        self, permit: Any, exc: BaseException | None, duration: float, result: Any = None
    ) -> None:
        """Nothing to record: a switch keeps no per-call state."""

    @property
    def killed(self) -> bool:
        """Whether the switch is killed now (see :func:`reskit.is_killed`)."""
        return is_killed(self.name)

    def __repr__(self) -> str:
        return f"KillSwitch({self.name!r}, fail_mode={self.fail_mode!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KillSwitch):
            return NotImplemented
        return self.name == other.name and self.same_declaration(other)

    def __hash__(self) -> int:
        return hash(self.name)


class _Shedder:
    """The brownout gate of ``Policy(shed_at=N)``: one per threshold, shared."""

    timed = False
    waits = False
    records = False
    rejection = Shed

    __slots__ = ("flag", "message", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.message = f"shed: the brownout level reached this policy's shed_at={threshold}"
        self.flag = control().shed_flag(threshold)

    def admit(
        self,
        policy: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if self.flag.up:
            tenant = key if key is not None else _tenant.get()
            if control().level_for(tenant) >= self.threshold:
                raise Shed(self.message, policy=policy)

    def record(
        self, permit: Any, exc: BaseException | None, duration: float, result: Any = None
    ) -> None:
        pass

    def __repr__(self) -> str:
        return f"<brownout shed_at={self.threshold}>"


_shedders: dict[int, _Shedder] = {}


def brownout_gate(threshold: int) -> _Shedder:
    """The shared gate for ``shed_at=threshold``."""
    gate = _shedders.get(threshold)
    if gate is None:
        gate = _shedders.setdefault(threshold, _Shedder(threshold))
    return gate


def check_shed_at(value: object) -> int:
    if type(value) is not int or not 1 <= value <= MAX_LEVEL:
        raise TypeError(
            f"Policy shed_at= must be a whole number from 1 to {MAX_LEVEL} (the brownout "
            f"level from which the call is shed), got {value!r}"
        )
    return value


# -- the public functions -------------------------------------------------------------


def _who(reason: object, actor: object) -> tuple[str, str]:
    for value, what in ((reason, "reason"), (actor, "actor")):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{what}= must be a non-empty string: the audit log records who changed what "
                f"and why; got {value!r}"
            )
        # Bytes, not characters: what a store keeps per record is bounded in bytes.
        if len(value.encode()) > 4096:
            raise ValueError(
                f"{what}= is {len(value.encode())} bytes in UTF-8; the most is 4096, so "
                "shorten it (link to a ticket for the long story)"
            )
    return reason, actor  # type: ignore[return-value]


def _ttl(ttl: float | timedelta | None) -> float | None:
    if ttl is None:
        return None
    from ._config import seconds

    value = seconds(ttl, "kill() ttl", waited=False)
    if value is None or value <= 0:
        raise ValueError(f"kill() ttl= must be a positive duration, got {ttl!r}")
    return value


@dataclass(frozen=True, slots=True)
class _Change:
    """A change an operator asked for, checked and ready for the store.

    The public functions build one and hand it to :func:`_make` (sync) or
    :func:`_amake` (async), so checking, auditing and reporting are written once.
    """

    key: str
    after: Any  # a record, None, or a function of the current record (see _store.After)
    actor: str
    action: str
    target: str
    reason: str
    event: str | None = None  # the log event telling of it
    fields: Mapping[str, Any] | None = None

    def arguments(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
        }

    def done(self, entry: AuditEntry | None) -> AuditEntry:
        assert entry is not None  # only a change with expect= may come back empty
        if self.event is not None:
            _telemetry.emit(
                30 if self.action != "revive" else 20,
                self.event,
                actor=self.actor,
                reason=self.reason,
                **(self.fields or {}),
            )
        return entry


def _make(change: _Change) -> AuditEntry:
    store = control().current()
    entry = change.done(store.change(change.key, change.after, **change.arguments()))
    if change.action == "switch.forget":
        store.forget_declaration(change.key[len("s:") :])
    return entry


async def _amake(change: _Change) -> AuditEntry:
    store = control().current()
    entry = change.done(await store.achange(change.key, change.after, **change.arguments()))
    if change.action == "switch.forget":
        import asyncio

        await asyncio.to_thread(store.forget_declaration, change.key[len("s:") :])
    return entry


def _kill(name: str, reason: str, actor: str, ttl: float | timedelta | None) -> _Change:
    from ._store import SWITCH, check_name

    check_name(name, "kill switch name")
    reason, actor = _who(reason, actor)
    seconds = _ttl(ttl)
    now = _clock.wall()
    after = {
        "killed": True,
        "reason": reason,
        "actor": actor,
        "at": now,
        "until": None if seconds is None else now + seconds,
        "last_killed": now,
    }
    return _Change(
        SWITCH + name,
        after,
        actor,
        "kill",
        f"switch:{name}",
        reason,
        "reskit.switch.killed",
        {"switch": name, "ttl": seconds},
    )


def kill(name: str, *, reason: str, actor: str, ttl: float | timedelta | None = None) -> AuditEntry:
    """Kill switch ``name``: every policy using it rejects its calls, in every process.

    ``reason`` and ``actor`` go into the audit log. With ``ttl`` (seconds or a
    ``timedelta``) the switch revives by itself when it runs out, and that
    revival is audited too. Killing a killed switch again records the new
    reason and ttl. Returns the audit entry.

    Raises :class:`~reskit.StoreUnavailable` when the store cannot take the
    change (then nothing changed anywhere). In async code use :func:`akill`,
    which does not block the event loop.

    .. versionadded:: 0.1.0
    """
    return _make(_kill(name, reason, actor, ttl))


async def akill(
    name: str, *, reason: str, actor: str, ttl: float | timedelta | None = None
) -> AuditEntry:
    """:func:`kill` for async code: the store's I/O is awaited (redis.asyncio).

    .. versionadded:: 0.1.0
    """
    return await _amake(_kill(name, reason, actor, ttl))


def _revive(name: str, reason: str, actor: str) -> _Change:
    from ._store import SWITCH, check_name

    check_name(name, "kill switch name")
    reason, actor = _who(reason, actor)
    now = _clock.wall()

    def revived(before: Mapping[str, Any] | None) -> dict[str, Any]:
        # Decided against the record being replaced, as the store holds it, not
        # against this process's possibly older view of it.
        return {
            "killed": False,
            "reason": reason,
            "actor": actor,
            "at": now,
            "until": None,
            "last_killed": None if before is None else before.get("last_killed"),
        }

    return _Change(
        SWITCH + name,
        revived,
        actor,
        "revive",
        f"switch:{name}",
        reason,
        "reskit.switch.revived",
        {"switch": name},
    )


def revive(name: str, *, reason: str, actor: str) -> AuditEntry:
    """Turn switch ``name`` back on everywhere. Returns the audit entry.

    .. versionadded:: 0.1.0
    """
    return _make(_revive(name, reason, actor))


async def arevive(name: str, *, reason: str, actor: str) -> AuditEntry:
    """:func:`revive` for async code: the store's I/O is awaited.

    .. versionadded:: 0.1.0
    """
    return await _amake(_revive(name, reason, actor))


def _forget(name: str, reason: str, actor: str) -> _Change:
    from ._store import SWITCH, check_name

    check_name(name, "kill switch name")
    reason, actor = _who(reason, actor)
    return _Change(SWITCH + name, None, actor, "switch.forget", f"switch:{name}", reason)


def forget_switch(name: str, *, reason: str, actor: str) -> AuditEntry:
    """Remove switch ``name`` from the store: its state and its registry entry; audited.

    For a switch whose code is gone (``reskit switches --stale`` lists the
    candidates) or a name killed by mistake. A killed switch is revived by it.
    A process whose code still declares the switch registers it again when it
    next starts or reconnects.

    .. versionadded:: 0.1.0
    """
    return _make(_forget(name, reason, actor))


async def aforget_switch(name: str, *, reason: str, actor: str) -> AuditEntry:
    """:func:`forget_switch` for async code.

    .. versionadded:: 0.1.0
    """
    return await _amake(_forget(name, reason, actor))


def is_killed(name: str) -> bool:
    """Whether switch ``name`` is killed now, as this process last heard.

    A kill whose ttl ran out counts as revived. A switch declared with
    ``fail_mode="closed"`` counts as killed while its state is unknown.

    .. versionadded:: 0.1.0
    """
    ctl = control()
    store = ctl.current()
    record = store.snapshot().switch(name)
    if record is not None:
        if _killed(record, _clock.wall()):
            return True
        if record["killed"]:
            ctl.expire(name, record)
        return False
    return not store.known and ctl._fail_modes.get(name) == "closed"


def _brownout(level: int | None, reason: str, actor: str, tenant: str | None) -> _Change:
    from ._store import LEVEL, check_name

    reason, actor = _who(reason, actor)
    if tenant is not None:
        check_name(tenant, "tenant")
    if level is None and tenant is None:
        raise ValueError("level=None removes a tenant's override; pass tenant= (or a level)")
    if level is not None and (type(level) is not int or not 0 <= level <= MAX_LEVEL):
        raise ValueError(f"a brownout level is a whole number from 0 to {MAX_LEVEL}, got {level!r}")
    after = (
        None
        if level is None
        else {"level": level, "reason": reason, "actor": actor, "at": _clock.wall()}
    )
    return _Change(
        LEVEL + (tenant or ""),
        after,
        actor,
        "brownout",
        "brownout" if tenant is None else f"brownout:{tenant}",
        reason,
        "reskit.brownout.changed",
        {"level": level, "tenant": tenant},
    )


def set_brownout_level(
    level: int | None, *, reason: str, actor: str, tenant: str | None = None
) -> AuditEntry:
    """Set the brownout level, for everyone or for one ``tenant``.

    Policies with ``shed_at=N`` shed their calls while the level is at least
    ``N`` (0 sheds nothing; the most is 100). A tenant's level overrides the
    global one for that tenant, lower or higher; ``level=None`` with a
    ``tenant`` removes the override. Returns the audit entry.

    .. versionadded:: 0.1.0
    """
    return _make(_brownout(level, reason, actor, tenant))


async def aset_brownout_level(
    level: int | None, *, reason: str, actor: str, tenant: str | None = None
) -> AuditEntry:
    """:func:`set_brownout_level` for async code: the store's I/O is awaited.

    .. versionadded:: 0.1.0
    """
    return await _amake(_brownout(level, reason, actor, tenant))


def brownout_level(tenant: str | None = None) -> int:
    """The brownout level in force: ``tenant``'s own if it has one, else the global one.

    .. versionadded:: 0.1.0
    """
    ctl = control()
    ctl.current()
    return ctl.level_for(tenant)


@contextmanager
def bind_tenant(tenant: str | None) -> Iterator[str | None]:
    """Run a block as ``tenant``: its brownout level applies to the calls inside.

    Middleware binds it per request; ``Policy.admit(key)`` uses ``key`` instead.

    .. versionadded:: 0.1.0
    """
    if tenant is not None:
        from ._store import check_name

        check_name(tenant, "tenant")
    token = _tenant.set(tenant)
    try:
        yield tenant
    finally:
        _tenant.reset(token)


def current_tenant() -> str | None:
    """The tenant bound with :func:`bind_tenant`, or ``None``.

    .. versionadded:: 0.1.0
    """
    return _tenant.get()


def _force(name: str, state: str | None, reason: str, actor: str) -> _Change:
    from ._store import BREAKER, check_name

    check_name(name, "breaker name")
    reason, actor = _who(reason, actor)
    if state is None:
        return _Change(BREAKER + name, None, actor, "breaker.release", f"breaker:{name}", reason)
    modes = {"open": "forced_open", "closed": "forced_closed"}
    if state not in modes:
        raise ValueError(f"force_breaker() state= must be 'open' or 'closed', got {state!r}")
    after = {"mode": modes[state], "reason": reason, "actor": actor, "at": _clock.wall()}
    return _Change(
        BREAKER + name, after, actor, f"breaker.force_{state}", f"breaker:{name}", reason
    )


def force_breaker(name: str, state: str, *, reason: str, actor: str) -> AuditEntry:
    """Force every breaker named ``name`` open or closed, in every process; audited.

    ``state="open"`` rejects every call until :func:`release_breaker`;
    ``state="closed"`` disables the breaker (calls pass, nothing is counted).

    .. versionadded:: 0.1.0
    """
    return _make(_force(name, state, reason, actor))


async def aforce_breaker(name: str, state: str, *, reason: str, actor: str) -> AuditEntry:
    """:func:`force_breaker` for async code: the store's I/O is awaited.

    .. versionadded:: 0.1.0
    """
    return await _amake(_force(name, state, reason, actor))


def release_breaker(name: str, *, reason: str, actor: str) -> AuditEntry:
    """Give breakers named ``name`` back to their own state machine (closed, counters reset).

    .. versionadded:: 0.1.0
    """
    return _make(_force(name, None, reason, actor))


async def arelease_breaker(name: str, *, reason: str, actor: str) -> AuditEntry:
    """:func:`release_breaker` for async code: the store's I/O is awaited.

    .. versionadded:: 0.1.0
    """
    return await _amake(_force(name, None, reason, actor))


@dataclass(frozen=True, slots=True)
class SwitchInfo:
    """A kill switch as the registry knows it (:func:`reskit.switches`).

    Times are seconds since the epoch, ``None`` when it never happened.
    ``last_exercised`` is the last time the switch was killed: a switch nobody
    has pulled in months may not do what its description says.

    .. versionadded:: 0.1.0
    """

    name: str
    killed: bool
    owner: str | None
    description: str | None
    fail_mode: str
    reason: str | None
    actor: str | None
    last_flipped: float | None
    last_exercised: float | None
    until: float | None
    last_declared: float | None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (JSON-ready: ``reskit switches --json`` prints these)."""
        return {name: getattr(self, name) for name in self.__slots__}


def switches(*, stale: float | timedelta | None = None) -> list[SwitchInfo]:
    """Every known switch: declared by code, or flipped, in any process sharing the store.

    With ``stale`` (seconds or a ``timedelta``), only those not exercised
    (killed) within that long, the ones never killed included.

    .. versionadded:: 0.1.0
    """
    from ._store import SWITCH

    ctl = control()
    store = ctl.current()
    snapshot = store.snapshot()
    declarations = store.declarations()
    now = _clock.wall()
    names = sorted({*declarations, *(name for name, _ in snapshot.items(SWITCH))})
    limit = None
    if stale is not None:
        from ._config import seconds

        limit = seconds(stale, "switches() stale", waited=False)
    infos = []
    for name in names:
        record = snapshot.switch(name)
        declaration = declarations.get(name)
        killed = _killed(record, now)
        if record is not None and record["killed"] and not killed:
            ctl.expire(name, record)
        last_exercised = None if record is None else record["last_killed"]
        if limit is not None and last_exercised is not None and now - last_exercised < limit:
            continue
        infos.append(
            SwitchInfo(
                name=name,
                killed=killed,
                owner=None if declaration is None else declaration.owner,
                description=None if declaration is None else declaration.description,
                fail_mode="open" if declaration is None else declaration.fail_mode,
                reason=None if record is None else record["reason"],
                actor=None if record is None else record["actor"],
                last_flipped=None if record is None else record["at"],
                last_exercised=last_exercised,
                until=record["until"] if killed and record is not None else None,
                last_declared=None if declaration is None else declaration.last_seen,
            )
        )
    return infos


def kill_switch(
    name: str,
    *,
    owner: str | None = None,
    description: str | None = None,
    fail_mode: str | None = None,
) -> Policy:
    """A one-strategy policy with a :class:`KillSwitch`; stacks with the other decorators.

    .. versionadded:: 0.1.0
    """
    from ._policy import Policy

    return Policy(
        kill_switch=KillSwitch(name, owner=owner, description=description, fail_mode=fail_mode)
    )

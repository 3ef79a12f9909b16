"""An OpenFeature provider over reskit's kill switches and brownout levels.

Code that already asks OpenFeature for its flags can read reskit's switches the
same way, and an OpenFeature-aware dashboard or hook (OpenTelemetry's, for
one) sees them like any other flag::

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from reskit.openfeature import Provider

    api.set_provider(Provider())
    client = api.get_client()
    if client.get_boolean_value("payments", False):
        ...
    acme = EvaluationContext(attributes={"tenant": "acme"})
    level = client.get_integer_value("brownout", 0, acme)

The flags:

``<prefix><switch name>`` (boolean)
    ``True`` while the switch is *on*, that is not killed: read it as
    "payments enabled", the way feature flags are read everywhere else. A kill
    switch is known once code in this process declared it (a
    :class:`~reskit.KillSwitch` or ``Policy(kill_switch=...)``) or someone
    flipped it in the store; any other name is ``FLAG_NOT_FOUND`` and the
    caller gets its default. ``prefix`` is empty unless you give one.
``brownout`` (integer, the key is configurable)
    The brownout level, 0 to 100. The evaluation context's ``tenant``
    attribute, else its targeting key, picks the tenant whose own level
    applies; without one, or for a tenant with no level of its own, it is the
    global level.

Values are read from the process's local snapshot of the store and never wait
for it. The evaluation reason says how far to trust them: ``STALE`` while the
store is out of reach (the value is the last one known), else ``DISABLED`` for
a killed switch, else ``CACHED``. Asking for another type than the flag's is
``TYPE_MISMATCH``.

Events: ``PROVIDER_CONFIGURATION_CHANGED`` whenever a switch or level changes
in the store (``flags_changed`` names the flags), ``PROVIDER_STALE`` when the
store goes out of reach and ``PROVIDER_READY`` when it is back. The provider
follows :func:`reskit.configure` to whichever store is in use.

Needs the OpenFeature SDK: ``pip install "reskit[openfeature]"``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.event import ProviderEventDetails
    from openfeature.exception import (
        FlagNotFoundError,
        InvalidContextError,
        TypeMismatchError,
    )
    from openfeature.flag_evaluation import FlagResolutionDetails, Reason
    from openfeature.provider import AbstractProvider, Metadata
except ImportError as exc:
    raise ImportError(
        'reskit.openfeature needs the OpenFeature SDK: pip install "reskit[openfeature]"'
    ) from exc

from . import _fork, _store, _telemetry
from ._store import LEVEL, SWITCH, Snapshot, Store, current_store
from ._switches import brownout_level, control, is_killed

if TYPE_CHECKING:
    from openfeature.flag_evaluation import FlagMetadata, FlagValueType

__all__ = ["DEFAULT_BROWNOUT_KEY", "Provider"]

#: The integer flag that carries the brownout level.
DEFAULT_BROWNOUT_KEY = "brownout"

#: The evaluation context attribute that names the tenant (before the targeting key).
TENANT_ATTRIBUTE = "tenant"

_NAME = "reskit"


class Provider(AbstractProvider):
    """An OpenFeature provider that serves reskit's kill switches and brownout levels.

    Register it with ``openfeature.api.set_provider(Provider())``. Boolean
    flags are kill switches, ``True`` while the switch is on (not killed); the
    integer flag ``brownout_key`` is the brownout level of the context's
    tenant. See :mod:`reskit.openfeature` for the reasons and events.

    Args:
        prefix: put in front of every switch name to make its flag key
            (``prefix="reskit."`` serves switch ``payments`` as
            ``reskit.payments``); a key without it is not a switch.
        brownout_key: the key of the integer flag with the brownout level.
        ready_timeout: seconds :meth:`initialize` waits for a shared store
            (Redis) to be read for the first time (default 2). After that it
            returns anyway; evaluations then say ``STALE`` until the store is
            reached, and ``PROVIDER_READY`` follows.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        prefix: str = "",
        brownout_key: str = DEFAULT_BROWNOUT_KEY,
        ready_timeout: float = 2.0,
    ) -> None:
        super().__init__()
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, int | float):
            raise TypeError(f"Provider ready_timeout= must be seconds, got {ready_timeout!r}")
        if not 0 <= ready_timeout <= 60:
            raise ValueError(
                f"Provider ready_timeout= must be 0 to 60 seconds, got {ready_timeout!r}"
            )
        self.ready_timeout = float(ready_timeout)
        if not isinstance(prefix, str):
            raise TypeError(f"Provider prefix= must be a string, got {prefix!r}")
        if not isinstance(brownout_key, str) or not brownout_key:
            raise TypeError(
                f"Provider brownout_key= must be a non-empty string, got {brownout_key!r}"
            )
        self.prefix = prefix
        self.brownout_key = brownout_key
        # What the last event told the SDK about: events are the differences from it.
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._seen = Snapshot()
        self._stale = False
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Provider(prefix={self.prefix!r}, brownout_key={self.brownout_key!r})"

    # -- lifecycle --------------------------------------------------------------------
    def get_metadata(self) -> Metadata:
        """The provider's name for OpenFeature: ``"reskit"``."""
        return Metadata(name=_NAME)

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Start listening to the store in use (and to any store configured later).

        A shared store that has not been read yet is waited for, up to
        ``ready_timeout`` seconds, so the first evaluations see the fleet's
        switches. A store out of reach does not hold the application back
        longer: evaluations then say ``STALE`` until it is reached.
        """
        store = current_store()
        wait_synced = getattr(store, "wait_synced", None)
        if wait_synced is not None and not store.known:
            wait_synced(self.ready_timeout)
        _follow_configure(self)
        self._resync(announce=False)

    def shutdown(self) -> None:
        """Stop listening; evaluations still answer from the store in use."""
        _active.discard(self)
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.unlisten(self._on_store)

    # -- following the store ------------------------------------------------------------
    def _resync(self, *, announce: bool = True) -> None:
        """Listen to the store in use and tell the SDK what changed since the last event."""
        with self._lock:
            # current_store(), not the store a configure hook was handed: whichever
            # of two racing calls takes the lock last still binds the newest store.
            store = current_store()
            old = self._store
            if store is not old:
                if old is not None:
                    old.unlisten(self._on_store)
                self._store = store
                store.listen(self._on_store)
            self._compare(store, announce=announce)

    def _on_store(self, snapshot: Snapshot) -> None:
        with self._lock:
            store = self._store
            if store is not None:  # else a late call from a store already left
                self._compare(store)

    def _compare(self, store: Store, *, announce: bool = True) -> None:
        # Called under the lock, and the events are emitted under it too: two
        # notifications racing on different threads must not reach the SDK in
        # the wrong order (a READY overtaken by the STALE before it).
        snapshot = store.snapshot()
        stale = _is_stale(store)
        changed = self._changed_flags(self._seen, snapshot)
        went_stale, recovered = stale and not self._stale, self._stale and not stale
        self._seen, self._stale = snapshot, stale
        if not announce:
            return
        if changed:
            self.emit_provider_configuration_changed(
                ProviderEventDetails(
                    flags_changed=changed,
                    message="reskit kill switches or brownout levels changed",
                    metadata={"version": snapshot.version},
                )
            )
        if went_stale:
            self.emit_provider_stale(
                ProviderEventDetails(
                    message="the reskit store is out of reach; flags keep their last known values",
                    metadata={"staleness": store.staleness()},
                )
            )
        elif recovered:
            self.emit_provider_ready(
                ProviderEventDetails(message="the reskit store is in reach again")
            )

    def _changed_flags(self, before: Snapshot, after: Snapshot) -> list[str]:
        if before is after:
            return []
        changed = set()
        for key in {*before.records, *after.records}:
            if before.records.get(key) == after.records.get(key):
                continue
            if key.startswith(SWITCH):
                changed.add(self.prefix + key[len(SWITCH) :])
            elif key.startswith(LEVEL):
                changed.add(self.brownout_key)
        return sorted(changed)

    # -- evaluating ---------------------------------------------------------------------
    def _switch_name(self, flag_key: str, snapshot: Snapshot) -> str | None:
        """The switch a flag key names, if that switch is known.

        While the store was never read, any key with the prefix may be a switch
        the store knows: it is answered by its fail mode, as ``STALE``, rather
        than as not found.
        """
        if not flag_key.startswith(self.prefix) or flag_key == self.brownout_key:
            return None
        name = flag_key[len(self.prefix) :]
        if not name:
            return None
        if snapshot.switch(name) is not None or name in control()._declared:
            return name
        if not current_store().known:
            return name
        return None

    def _mismatch_or_missing(self, flag_key: str, wanted: str, snapshot: Snapshot) -> Exception:
        if flag_key == self.brownout_key:
            return TypeMismatchError(f"flag {flag_key!r} is an integer, not {wanted}")
        if self._switch_name(flag_key, snapshot) is not None:
            return TypeMismatchError(f"flag {flag_key!r} is a boolean, not {wanted}")
        return FlagNotFoundError(
            f"no reskit flag {flag_key!r}: no kill switch of that name was declared in this "
            f"process or flipped in the store, and the brownout level is {self.brownout_key!r}"
        )

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        """Whether the kill switch the key names is on (not killed)."""
        store = current_store()
        snapshot = store.snapshot()
        name = self._switch_name(flag_key, snapshot)
        if name is None:
            raise self._mismatch_or_missing(flag_key, "a boolean", snapshot)
        # is_killed, not the record alone: a kill whose ttl ran out is over, and a
        # fail_mode="closed" switch is killed while the store was never reached.
        killed = is_killed(name)
        stale = _is_stale(store)
        metadata: dict[str, bool | int | float | str] = {"killed": killed}
        record = snapshot.switch(name)
        if record is not None:
            metadata.update(
                change_reason=record["reason"], changed_by=record["actor"], changed_at=record["at"]
            )
            if killed and record["until"] is not None:
                metadata["until"] = record["until"]
        if stale:
            metadata["staleness"] = store.staleness()
        return FlagResolutionDetails(
            value=not killed,
            variant="killed" if killed else "on",
            reason=Reason.STALE if stale else Reason.DISABLED if killed else Reason.CACHED,
            flag_metadata=metadata,
        )

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        """The brownout level in force for the context's tenant."""
        store = current_store()
        snapshot = store.snapshot()
        if flag_key != self.brownout_key:
            raise self._mismatch_or_missing(flag_key, "an integer", snapshot)
        tenant = _tenant(evaluation_context)
        own = tenant is not None and snapshot.level(tenant) is not None
        stale = _is_stale(store)
        metadata: FlagMetadata = {"tenant": tenant} if tenant is not None else {}
        if stale:
            metadata = {**metadata, "staleness": store.staleness()}
        return FlagResolutionDetails(
            value=brownout_level(tenant),
            variant="tenant" if own else "global",
            reason=Reason.STALE if stale else Reason.CACHED,
            flag_metadata=metadata,
        )

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        """reskit has no string flags: a type mismatch or an unknown flag."""
        raise self._mismatch_or_missing(flag_key, "a string", current_store().snapshot())

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        """reskit has no float flags (the brownout level is an integer)."""
        raise self._mismatch_or_missing(flag_key, "a float", current_store().snapshot())

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        """reskit has no object flags: a type mismatch or an unknown flag."""
        raise self._mismatch_or_missing(flag_key, "an object", current_store().snapshot())


def _is_stale(store: Store) -> bool:
    # A store never reached answers from fail modes, not from the backend: no
    # more authoritative than a last-known value.
    return store.stale or not store.known


def _tenant(context: EvaluationContext | None) -> str | None:
    if context is None:
        return None
    tenant: Any = context.attributes.get(TENANT_ATTRIBUTE)
    if tenant is None:
        tenant = context.targeting_key
    if tenant is None or (isinstance(tenant, str) and tenant):
        return tenant
    raise InvalidContextError(
        f"the {TENANT_ATTRIBUTE!r} attribute (or the targeting key) names the tenant for the "
        f"brownout level and must be a non-empty string, got {tenant!r}"
    )


# -- following reskit.configure() ----------------------------------------------------------

# Weakly held, and one hook for them all: reskit keeps configure hooks forever,
# so a hook per provider would keep every provider ever made alive.
_active: weakref.WeakSet[Provider] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hooked = False


def _renew_lock() -> None:
    global _hook_lock
    _hook_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)


def _follow_configure(provider: Provider) -> None:
    global _hooked
    with _hook_lock:
        if not _hooked:
            _store.on_change(_on_configure)
            _hooked = True
    _active.add(provider)


def _on_configure(old: Store | None, new: Store) -> None:
    for provider in list(_active):
        _telemetry.guard("an OpenFeature provider following reskit.configure()", provider._resync)

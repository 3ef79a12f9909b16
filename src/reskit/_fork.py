"""Fork safety: what reskit keeps per process is renewed in a child after ``os.fork()``.

A forked child has one thread, the one that called ``fork()``, and a copy of
everything else: locks another thread held at that moment stay held forever,
half-open probes and bulkhead slots held by the other threads are never given
back, and a queue of waiting threads waits for threads that do not exist.
gunicorn ``--preload``, Celery's prefork pool and ``multiprocessing`` with the
fork start method all do this. So every object that keeps such state registers
here, and in the child its ``_after_fork()`` renews it (a fresh lock, empty
queues, the slots of other threads returned), as ``logging`` does for its
handlers' locks. Owners that run threads also implement
``_restart_after_fork()``, called once every owner's ``_after_fork()`` has run,
so no new thread meets a lock that is still the parent's copy.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["track"]


class Renewable(Protocol):
    def _after_fork(self) -> None: ...


# Weakly held: renewing a breaker nobody uses any more is not worth keeping it alive.
_owners: weakref.WeakSet[Renewable] = weakref.WeakSet()


def track(owner: Renewable) -> None:
    """Call ``owner._after_fork()`` in every child process forked from now on."""
    _owners.add(owner)


def _renew() -> None:
    from ._telemetry import guard

    owners = list(_owners)
    for owner in owners:
        guard("renewing state after os.fork()", owner._after_fork)
    # Then, with every lock renewed, what starts threads (a store's subscriber):
    # a thread started earlier could take a lock that is still the parent's copy.
    for owner in owners:
        restart = getattr(owner, "_restart_after_fork", None)
        if restart is not None:
            guard("restarting background work after os.fork()", restart)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew)

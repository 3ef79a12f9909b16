"""Stores for kill switches, brownout levels, operator breaker states and the audit log.

:class:`MemoryStore` (the default) keeps them in this process;
:class:`reskit.stores.redis.RedisStore` shares them with a fleet (``pip install
"reskit[redis]"``). Choose one with :func:`reskit.configure`. Each also keeps
the records of :func:`reskit.idempotent` (``store.idempotency()``).
"""

from __future__ import annotations

from reskit._idempotency import Claim, IdempotencyStore, MemoryIdempotencyStore
from reskit._store import Declaration, Snapshot, Store, StoreUnavailable

from .memory import MemoryStore

__all__ = [
    "Claim",
    "Declaration",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "MemoryStore",
    "Snapshot",
    "Store",
    "StoreUnavailable",
]

"""The memory store: the control state and audit log of one process, nothing to run."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from reskit import _clock
from reskit._audit import AuditEntry, AuditHead
from reskit._store import After, Declaration, Snapshot, Store, resolve

if TYPE_CHECKING:
    from reskit._idempotency import IdempotencyStore

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Switches, levels and the audit log in this process's memory (the default).

    Changes reach the process's policies at once; nothing is shared with other
    processes, and nothing outlives the process.

    .. versionadded:: 0.1.0
    """

    url = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._head = AuditHead()
        self._declarations: dict[str, Declaration] = {}
        self._idempotency: Any = None

    def _after_fork(self) -> None:
        super()._after_fork()
        self._lock = threading.Lock()

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
        with self._lock:
            snapshot = self._snapshot
            before = snapshot.records.get(key)
            if expect is not None and not expect(before):
                return None
            after = resolve(after, before)
            entry = AuditEntry.make(
                seq=self._head.seq + 1,
                time=_clock.wall(),
                actor=actor,
                action=action,
                target=target,
                reason=reason,
                before=dict(before) if before is not None else None,
                after=dict(after) if after is not None else None,
                prev=self._head.hash,
            )
            records = dict(snapshot.records)
            if after is None:
                records.pop(key, None)
            else:
                records[key] = dict(after)
            self._lines.append(entry.to_json())
            self._head = self._head.after(entry)
            self._snapshot = Snapshot(snapshot.version + 1, records)
        self._notify()
        return entry

    def audit_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def audit_head(self) -> AuditHead | None:
        return self._head

    def declare(self, declaration: Declaration) -> None:
        with self._lock:
            self._declarations[declaration.name] = declaration

    def declarations(self) -> dict[str, Declaration]:
        with self._lock:
            return dict(self._declarations)

    def idempotency(self) -> IdempotencyStore:
        # Made on first use: a process without idempotency keys never loads the module.
        from reskit._idempotency import MemoryIdempotencyStore

        store: IdempotencyStore | None = self._idempotency
        if store is None:
            with self._lock:
                store = self._idempotency
                if store is None:
                    store = self._idempotency = MemoryIdempotencyStore()
        return store

    def forget_declaration(self, name: str) -> None:
        with self._lock:
            self._declarations.pop(name, None)

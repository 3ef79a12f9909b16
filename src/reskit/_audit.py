"""The audit log: every flip, in one hash chain nobody can quietly edit.

Each entry holds the SHA-256 of the entry before it, and its own hash covers
every field including that link, so editing an entry changes its hash, removing
or reordering entries breaks a link, and cutting entries off the end shows
against the *head* (the sequence number and hash of the last entry, which the
store keeps apart from the entries). :func:`verify` names the first entry that
fails and why.

Entries are JSON, written in one canonical form (sorted keys, no spaces), so a
hash computed in one process is the hash every other process computes. Stores
append with compare-and-set on the head: two writers racing for the same
position cannot both win, so concurrent appends form one chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditHead",
    "Verification",
    "canonical",
    "entries_from_json_lines",
    "loads",
    "verify",
]

#: The ``prev`` of the first entry: there is nothing before it.
GENESIS = "0" * 64

#: The largest entry a store accepts back (a planted 10 MB value is refused).
MAX_ENTRY_BYTES = 64 * 1024


def loads(text: str | bytes) -> Any:
    """``json.loads`` for text from a store: anything it cannot take is a ``ValueError``.

    Deeply nested JSON (``[[[[...]]]]``) makes the parser recurse past Python's
    limit; planted in a store, it must be one more bad value, not a crash.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def canonical(value: Any) -> str:
    """``value`` as the one JSON text every process hashes alike."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change, as the audit log records it.

    ``before`` and ``after`` are the target's state around the change (JSON
    values: ``None`` where there was none); ``time`` is seconds since the
    epoch; ``prev`` is the hash of the entry before (``GENESIS`` for the first)
    and ``hash`` this entry's own.

    .. versionadded:: 0.1.0
    """

    seq: int
    time: float
    actor: str
    action: str
    target: str
    reason: str
    before: Any
    after: Any
    prev: str
    hash: str

    @classmethod
    def make(
        cls,
        *,
        seq: int,
        time: float,
        actor: str,
        action: str,
        target: str,
        reason: str,
        before: Any,
        after: Any,
        prev: str,
    ) -> AuditEntry:
        """A new entry at ``seq`` after the entry whose hash is ``prev``, its hash computed."""
        body = {
            "seq": seq,
            "time": time,
            "actor": actor,
            "action": action,
            "target": target,
            "reason": reason,
            "before": before,
            "after": after,
            "prev": prev,
        }
        return cls(hash=_digest(body), **body)

    def body(self) -> dict[str, Any]:
        """Every field but ``hash``: what the hash covers."""
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
            "prev": self.prev,
        }

    def to_json(self) -> str:
        """The entry as one line of canonical JSON."""
        return canonical({**self.body(), "hash": self.hash})

    @classmethod
    def from_json(cls, text: str | bytes) -> AuditEntry:
        """Parse one stored entry; ``ValueError`` says what is wrong with it."""
        size = len(text.encode() if isinstance(text, str) else text)
        if size > MAX_ENTRY_BYTES:
            raise ValueError(f"an audit entry of {size} bytes is over the limit")
        data = loads(text)
        if not isinstance(data, dict):
            raise ValueError("an audit entry must be a JSON object")
        try:
            entry = cls(
                seq=data["seq"],
                time=data["time"],
                actor=data["actor"],
                action=data["action"],
                target=data["target"],
                reason=data["reason"],
                before=data["before"],
                after=data["after"],
                prev=data["prev"],
                hash=data["hash"],
            )
        except KeyError as exc:
            raise ValueError(f"an audit entry lacks the field {exc.args[0]!r}") from None
        if set(data) != _FIELDS:
            raise ValueError(f"an audit entry has unknown fields: {sorted(set(data) - _FIELDS)}")
        for name in ("actor", "action", "target", "reason", "prev", "hash"):
            if not isinstance(getattr(entry, name), str):
                raise ValueError(f"the audit entry's {name} is not a string")
        if (
            type(entry.seq) is not int
            or not isinstance(entry.time, int | float)
            or isinstance(entry.time, bool)
        ):
            raise ValueError("the audit entry's seq or time is not a number")
        return entry

    def is_intact(self) -> bool:
        """Whether the stored hash is the hash of the entry's fields."""
        return _digest(self.body()) == self.hash


_FIELDS = frozenset(
    ("seq", "time", "actor", "action", "target", "reason", "before", "after", "prev", "hash")
)


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where the chain ends: the last entry's sequence number and hash.

    ``seq`` is ``-1`` and ``hash`` is :data:`GENESIS` for an empty log.
    """

    seq: int = -1
    hash: str = GENESIS

    def to_json(self) -> str:
        return canonical({"seq": self.seq, "hash": self.hash})

    @classmethod
    def from_json(cls, text: str | bytes | None) -> AuditHead:
        if text is None:
            return cls()
        data = loads(text)
        if (
            not isinstance(data, dict)
            or type(data.get("seq")) is not int
            or not isinstance(data.get("hash"), str)
        ):
            raise ValueError("the audit head must be {'seq': int, 'hash': str}")
        return cls(data["seq"], data["hash"])

    def after(self, entry: AuditEntry) -> AuditHead:
        return AuditHead(entry.seq, entry.hash)


@dataclass(frozen=True, slots=True)
class Verification:
    """What :func:`verify` found: ``ok``, or the first bad entry and why.

    ``position`` is the index in the log of the first entry that fails (for a
    log cut short, the index where the missing entries begin); ``checked`` is
    how many entries were read.

    .. versionadded:: 0.1.0
    """

    ok: bool
    checked: int
    position: int | None = None
    problem: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit log intact: {self.checked} entries, one unbroken chain"
        return f"audit log broken at entry {self.position}: {self.problem}"


def verify(lines: Iterable[str | bytes | AuditEntry], head: AuditHead | None) -> Verification:
    """Check the chain of stored entries against ``head``.

    Names the first entry that was edited (its hash does not match its
    fields), removed or reordered (its sequence number or link to the previous
    entry is wrong), or unreadable; and a log that was cut short (fewer entries
    than the head says, or a head that is not the last entry). ``head`` is
    ``None`` when the store lost it: then truncation of the tail cannot be told.
    """
    prev = GENESIS
    count = 0
    for item in lines:
        position = count
        count += 1
        try:
            entry = item if isinstance(item, AuditEntry) else AuditEntry.from_json(item)
        except ValueError as exc:
            return Verification(False, count, position, f"unreadable ({exc})")
        if entry.seq != position:
            return Verification(
                False,
                count,
                position,
                f"sequence number {entry.seq} where {position} belongs (an entry before it "
                "was removed, or the entries were reordered)",
            )
        if entry.prev != prev:
            return Verification(
                False,
                count,
                position,
                "its link to the previous entry does not match (an entry before it was "
                "removed or edited, or the entries were reordered)",
            )
        if not entry.is_intact():
            return Verification(False, count, position, "its contents were edited after writing")
        prev = entry.hash
    if head is not None:
        if head.seq + 1 > count:
            return Verification(
                False,
                count,
                count,
                f"the log ends after {count} entries but its head records {head.seq + 1} "
                "(entries were cut off the end)",
            )
        if head.seq + 1 < count or head.hash != prev:
            return Verification(
                False,
                count,
                head.seq + 1 if head.seq + 1 < count else max(count - 1, 0),
                "the log does not end where its head says (entries were appended or edited "
                "outside reskit)",
            )
    return Verification(True, count)


def entries_from_json_lines(lines: Iterable[str]) -> Iterator[AuditEntry]:
    """Parse an export written by ``reskit audit tail --json`` (one entry per line)."""
    for line in lines:
        line = line.strip()
        if line:
            yield AuditEntry.from_json(line)

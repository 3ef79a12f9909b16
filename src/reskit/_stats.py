"""Per-policy statistics: how many calls, attempts, retries, rejections, fallbacks.

The drivers count with plain ``+=`` on slotted objects, inline: a call and an
attempt cost one increment each, and a rejection one dictionary lookup and an
increment (a lock or a function call would cost more than an open breaker's
whole rejection). Under the GIL an increment with no call in between is never
interrupted, so the counts are exact there; a free-threaded build can lose
increments under contention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._errors import Rejected

__all__ = ["Counters", "PolicyStatistics"]


@dataclass(frozen=True, slots=True)
class PolicyStatistics:
    """A snapshot of what a policy has done since it was built (or last reset).

    Attributes:
        calls: calls started (a stream counts once; an admission counts once).
        attempts: attempts started, retries included.
        retries: retries scheduled (a stream restarted before its first item
            counts too).
        failures: calls that ended in an exception that is not a rejection
            (timeouts included), or in a result ``on_result`` still rejected after
            the last attempt; whether or not a fallback then answered.
        fallbacks: calls the fallback answered.
        rejections: calls refused by a protection, by the gate that refused
            them (``"breaker"``, ``"bulkhead"``, ``"throttle"``, ``"budget"``...),
            whether or not a fallback then answered.

    Read it with ``policy.statistics``; reset it with
    :meth:`reskit.Policy.reset_statistics`.

    .. versionadded:: 0.1.0
    """

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    fallbacks: int = 0
    rejections: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def rejected(self) -> int:
        """Calls rejected by any gate."""
        return sum(self.rejections.values())


class Tally:
    """One counter (a slot, so the drivers can ``+=`` it inline)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Tallies(dict[str | None, Tally]):
    """Rejections by gate label; a label's tally is made on its first rejection."""

    __slots__ = ()

    def __missing__(self, label: str | None) -> Tally:
        # setdefault is one atomic operation: two threads making the same label's
        # tally both get the one that was stored first.
        return self.setdefault(label, Tally())


class Counters:
    """The live counters behind :class:`PolicyStatistics`; one per policy."""

    __slots__ = ("attempts", "calls", "failures", "fallbacks", "rejected", "retries")

    def __init__(self) -> None:
        self.calls = 0
        self.attempts = 0
        self.retries = 0
        self.failures = 0
        self.fallbacks = 0
        self.rejected = Tallies()

    def ended(self, exc: BaseException) -> None:
        """A call ended by raising ``exc`` (cancellations are not counted)."""
        if isinstance(exc, Rejected):
            self.rejected[exc.rejected_by].n += 1
        elif isinstance(exc, Exception):
            self.failures += 1

    def fell_back(self, exc: BaseException) -> None:
        """The fallback answered a call that ended with ``exc``."""
        self.ended(exc)
        self.fallbacks += 1

    def snapshot(self) -> PolicyStatistics:
        rejections = {
            label or "unknown": tally.n for label, tally in list(self.rejected.items()) if tally.n
        }
        return PolicyStatistics(
            calls=self.calls,
            attempts=self.attempts,
            retries=self.retries,
            failures=self.failures,
            fallbacks=self.fallbacks,
            rejections=MappingProxyType(rejections),
        )

    def reset(self) -> None:
        self.calls = self.attempts = self.retries = self.failures = self.fallbacks = 0
        for tally in list(self.rejected.values()):
            tally.n = 0

"""The canonical order: which layer wraps which, outermost first, in one table.

Every protected call, whatever its kind (function, coroutine, generator, async
generator), is composed from this table by ``_compose.py``; nothing else in
reskit knows the order. A row names the :class:`~reskit.Policy` keyword that
configures its layer and the *role* that says how the engine composes it:

``fallback``
    catches what the layers inside raise and answers with the fallback.
``gate``
    admits (or rejects) before the layers inside run and records how they ended
    (the protocol in ``_gate.py``). Gates above ``deadline`` are asked once per
    call; gates below ``retry`` once per attempt. :meth:`reskit.Policy.admit`
    applies the gates above ``deadline`` without a call.
``deadline``
    bounds everything inside in time and propagates the bound.
``retry``
    runs the layers inside again while the retry decides so.
``attempt``
    marks where one attempt begins (no keyword: it is always there).
``timeout``
    bounds one attempt in time; it makes the call itself.

A row also names the type its keyword accepts, so :class:`~reskit.Policy`
validates, stores, copies (``replace``) and shows (``repr``) every strategy from
this table. Adding a strategy is a module that implements its role's protocol,
a row here and a keyword in ``Policy.__init__``'s signature; the drivers do not
change. ``docs/architecture.md`` walks through an example.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._breaker import CircuitBreaker
from ._bulkhead import Bulkhead
from ._fallback import Fallback
from ._retry import Retry
from ._switches import KillSwitch, brownout_gate
from ._throttle import AdaptiveThrottle

__all__ = ["ORDER", "Role", "Row", "outer_gates"]


class Role(enum.Enum):
    """How the engine composes a row (see the module docstring)."""

    FALLBACK = "fallback"
    GATE = "gate"
    DEADLINE = "deadline"
    RETRY = "retry"
    ATTEMPT = "attempt"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Row:
    """One layer of the canonical order.

    ``keyword`` is the :class:`~reskit.Policy` keyword (and attribute) that
    configures the layer; ``None`` for the attempt marker. ``accepts`` is the
    type the keyword takes (durations and fallbacks are converted by role).
    ``gate`` turns the keyword's value into the gate, for a keyword whose value
    is not a gate itself (``shed_at=2`` is a number).
    """

    keyword: str | None
    role: Role
    accepts: type | None = None
    gate: Callable[[Any], Any] | None = None


#: Outermost first.
ORDER: tuple[Row, ...] = (
    Row("fallback", Role.FALLBACK, Fallback),
    Row("kill_switch", Role.GATE, KillSwitch),
    Row("shed_at", Role.GATE, int, brownout_gate),
    Row("bulkhead", Role.GATE, Bulkhead),
    Row("deadline", Role.DEADLINE),
    Row("retry", Role.RETRY, Retry),
    Row(None, Role.ATTEMPT),
    Row("breaker", Role.GATE, CircuitBreaker),
    Row("throttle", Role.GATE, AdaptiveThrottle),
    Row("timeout", Role.TIMEOUT),
)


def outer_gates() -> tuple[Row, ...]:
    """The gate rows asked once per call: those above the deadline."""
    rows: list[Row] = []
    for row in ORDER:
        if row.role is Role.DEADLINE:
            break
        if row.role is Role.GATE:
            rows.append(row)
    return tuple(rows)

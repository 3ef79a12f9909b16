"""The gate protocol: the seam every admitting strategy plugs into.

A *gate* decides whether a call (or one attempt of it) may run. The engine asks
it twice::

    permit = gate.admit(policy, key, fn, args, kwargs)   # or raise a Rejected error
    try:
        ...the call or the attempt...
    finally:
        gate.record(permit, exc, duration, result)        # exactly once per permit

``admit`` and ``record`` are decisions over a gate's own counters: no I/O, no
sleeping, and any lock held only while those counters move (never across the
protected call). The circuit breaker, the bulkhead and the adaptive throttle are
gates; so will be the kill switch and the brownout shed. Where a gate sits
decides when it is asked: gates above the deadline in the order table
(``_order.py``) admit once per call, gates below the retry once per attempt.

The outcome reaches ``record`` as three values rather than one object, so that a
success allocates nothing:

- ``exc``: ``None`` for a call that returned, else what it raised. Cancellation
  and the other ``BaseException``\\ s that are not ``Exception``\\ s arrive here
  too and must count as neither success nor failure.
- ``duration``: seconds the call took, on reskit's clock; ``0.0`` unless the gate
  is :attr:`Gate.timed`.
- ``result``: what the call returned (``None`` for streams), for gates that judge
  results (``CircuitBreaker(on_result=...)``).

A gate that keeps no per-call state and nearly always admits (the kill switch,
the brownout shed) sets ``records = False`` and has a ``flag`` object whose
attribute ``up`` is true whenever ``admit`` might reject: the engine then reads
the flag inline, calls ``admit`` only while it is up, and never calls
``record``. Its ``admit`` returns nothing.

A gate that may have to *wait* for a permit (the bulkhead's queue) sets
:attr:`WaitingGate.waits` and adds :meth:`~WaitingGate.try_admit` and
:meth:`~WaitingGate.admit_async`: async drivers take a free permit without
creating a coroutine and await only when they must queue. ``admit`` itself may
then block the calling thread; the decisions behind both are shared, only the
waiting differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._errors import Rejected

__all__ = ["Gate", "WaitingGate"]


@runtime_checkable
class Gate(Protocol):
    """A strategy that admits or rejects calls before they run (see the module docstring)."""

    #: Whether :meth:`record` wants real durations (else the engine passes ``0.0``
    #: and saves two clock reads per call). Read once, when a policy is compiled.
    timed: bool
    #: Whether admitting may wait for a permit (see :class:`WaitingGate`).
    waits: bool
    #: The :class:`~reskit.Rejected` subclass :meth:`admit` raises. The drivers
    #: count rejections with one ``except`` clause per class, which is cheaper
    #: than looking at the exception.
    rejection: type[Rejected]

    def admit(
        self,
        policy: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """Return a permit for one call, or raise a :class:`~reskit.Rejected` error.

        ``policy`` names the policy in the error; ``key`` is a partition key
        given to :meth:`reskit.Policy.admit`; ``fn``, ``args`` and ``kwargs``
        are the protected call (``None`` and empty for an admission without a
        call).
        """
        ...

    def record(
        self, permit: Any, exc: BaseException | None, duration: float, result: Any = None
    ) -> None:
        """Record how the call admitted with ``permit`` ended; exactly once per permit."""
        ...


@runtime_checkable
class WaitingGate(Gate, Protocol):
    """A gate whose admission may wait in a queue (``waits`` is true)."""

    def try_admit(
        self,
        policy: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any | None:
        """Return a permit if one is free at once, else ``None``; never waits or raises."""
        ...

    async def admit_async(
        self,
        policy: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """Like :meth:`Gate.admit`, awaiting (not blocking) while queued."""
        ...

"""The one place reskit reads time, sleeps and schedules timers.

Every time-dependent decision goes through the module-level functions below so
that :class:`reskit.testing.FakeClock` can replace them all at once. Hot code
calls ``_clock.now()`` through the module (not a bound alias) for that reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "TimerHandle",
    "asleep",
    "call_at",
    "install",
    "now",
    "sleep",
    "wait",
    "wait_until",
    "wall",
]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class ClockBackend(Protocol):
    """What a clock must provide; the real one and the fake one both do."""

    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    async def asleep(self, seconds: float) -> None: ...
    def wait(self, event: threading.Event, timeout: float | None) -> bool: ...
    def wait_until(self, event: threading.Event, deadline: float) -> bool: ...
    def call_at(
        self, loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., Any], *args: Any
    ) -> TimerHandle: ...


class _RealClock:
    """Monotonic time, real sleeps, the event loop's own timers."""

    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)
    sleep = staticmethod(time.sleep)

    async def asleep(self, seconds: float) -> None:
        # Imported here: only code running an event loop sleeps this way, and it has
        # asyncio imported already (``import reskit`` does not import it).
        from asyncio import sleep

        await sleep(seconds)

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    def wait_until(self, event: threading.Event, deadline: float) -> bool:
        left = deadline - time.monotonic()
        return event.wait(left if left > 0 else 0)

    def call_at(
        self, loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., Any], *args: Any
    ) -> TimerHandle:
        # loop.time() and time.monotonic() share one base on the stdlib loop and uvloop.
        return loop.call_at(when, callback, *args)


REAL_CLOCK: ClockBackend = _RealClock()

now: Callable[[], float] = time.monotonic
# Seconds since the epoch: for what other processes must read (a kill switch's
# ttl, an audit entry's time). Decisions inside one process use now().
wall: Callable[[], float] = time.time
sleep: Callable[[float], None] = time.sleep
asleep: Callable[[float], Any] = REAL_CLOCK.asleep
wait: Callable[[threading.Event, float | None], bool] = REAL_CLOCK.wait
wait_until: Callable[[threading.Event, float], bool] = REAL_CLOCK.wait_until
call_at: Callable[..., TimerHandle] = REAL_CLOCK.call_at
_current: ClockBackend = REAL_CLOCK


def install(clock: ClockBackend) -> ClockBackend:
    """Route every reskit time read, sleep and timer through ``clock``.

    Returns the clock that was installed before, so callers can restore it.
    """
    global now, wall, sleep, asleep, wait, wait_until, call_at, _current
    previous = _current
    _current = clock
    now = clock.now
    wall = getattr(clock, "wall", time.time)
    sleep = clock.sleep
    asleep = clock.asleep
    wait = clock.wait
    wait_until = clock.wait_until
    call_at = clock.call_at
    return previous


def current() -> ClockBackend:
    return _current

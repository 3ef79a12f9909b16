"""Helpers for testing code that uses reskit.

- :class:`FakeClock` replaces every time read, sleep and timer reskit makes, so
  tests of timeouts, backoff and breakers run instantly and deterministically.
- :func:`set_testing` turns retries off (or caps them) and skips backoff sleeps,
  like ``stamina.set_testing``.
- :class:`SpanCapture` records the spans reskit emits, through the OpenTelemetry
  SDK's in-memory exporter (needs ``pip install "reskit[otel]"``).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _clock
from ._config import set_testing
from ._telemetry import SpanCapture

if TYPE_CHECKING:
    from typing import Self

__all__ = ["FakeClock", "SpanCapture", "set_testing"]


class _FakeTimer:
    __slots__ = ("args", "callback", "cancelled", "loop", "when")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        when: float,
        callback: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self.loop = loop
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A manual monotonic clock for reskit.

    Install it with ``with FakeClock() as clock:`` (or :meth:`install`). While it
    is installed:

    - reskit reads :meth:`now` instead of :func:`time.monotonic`;
    - backoff sleeps and :meth:`sleep` advance the clock instantly and are
      recorded in :attr:`sleeps`;
    - async timeouts fire when the clock is advanced past them: timers due are
      run at once when :meth:`advance` is called on the event loop's thread, and
      handed to the loop otherwise;
    - a sync ``timeout=`` caller waiting for its worker thread wakes as soon as
      another thread advances the clock past the timeout.

    Simulate a slow dependency by advancing the clock inside it::

        def slow():
            clock.advance(5)      # this attempt "took" five seconds
            return "late"

    .. versionadded:: 0.1.0
    """

    def __init__(self, start: float = 1_000.0, *, epoch: float = 1_790_000_000.0) -> None:
        self._now = float(start)
        self._start = self._now
        self._epoch = float(epoch)
        self._cond = threading.Condition()
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()
        self._previous: _clock.ClockBackend | None = None
        self._waiting = 0
        #: Every sleep reskit (or the test) asked for, in order, in seconds.
        self.sleeps: list[float] = []

    # -- ClockBackend -----------------------------------------------------
    def now(self) -> float:
        """The current fake monotonic time, in seconds."""
        return self._now

    def wall(self) -> float:
        """The fake wall-clock time, seconds since the epoch; it moves with :meth:`now`.

        reskit reads it for what other processes see (a kill switch's ``ttl``,
        an audit entry's time); ``epoch`` sets where it starts.
        """
        return self._epoch + (self._now - self._start)

    def sleep(self, seconds: float) -> None:
        """Record ``seconds`` in :attr:`sleeps` and advance the clock by it."""
        self.sleeps.append(seconds)
        self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        """Like :meth:`sleep`, then yield to the event loop once."""
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Wait for ``event`` until the *fake* clock passes ``timeout``."""
        if timeout is None:
            return event.wait()
        return self.wait_until(event, self._now + timeout)

    def wait_until(self, event: threading.Event, deadline: float) -> bool:
        """Wait for ``event`` until the *fake* clock reaches ``deadline``."""
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            try:
                while not event.is_set():
                    if self._now >= deadline:
                        return event.is_set()
                    # Short real waits so an event set without touching the clock
                    # is noticed too; time itself only moves when advanced.
                    self._cond.wait(0.001)
                return True
            finally:
                self._waiting -= 1

    @property
    def waiting(self) -> int:
        """How many threads are blocked in a wait on this clock right now."""
        return self._waiting

    def wait_for_waiting(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block, in real time, until ``count`` threads wait on this clock.

        A test that starts a thread which will wait on the fake clock (a sync
        timeout, a bulkhead queue) calls this before advancing the clock, so the
        thread's deadline is fixed before time moves. Raises ``TimeoutError``
        after ``timeout`` real seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting >= count, timeout):
                raise TimeoutError(
                    f"{self._waiting} thread(s) waiting on the fake clock, expected {count}"
                )

    def call_at(
        self, loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., Any], *args: Any
    ) -> _FakeTimer | asyncio.Handle:
        if when <= self._now:
            # Already due: like loop.call_at, run it soon, never inside this call.
            return loop.call_soon_threadsafe(callback, *args)
        timer = _FakeTimer(loop, when, callback, args)
        with self._cond:
            heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    # -- control ----------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` and fire the timers now due."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go backwards; pass seconds >= 0")
        with self._cond:
            self._now += seconds
            self._cond.notify_all()
        self._run_due()

    def _run_due(self) -> None:
        due: list[_FakeTimer] = []
        with self._cond:
            while self._timers and self._timers[0][0] <= self._now:
                due.append(heapq.heappop(self._timers)[2])
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for timer in due:
            if timer.cancelled:
                continue
            if timer.loop is running:
                timer.callback(*timer.args)
            elif not timer.loop.is_closed():
                timer.loop.call_soon_threadsafe(timer.callback, *timer.args)

    def install(self) -> None:
        """Route reskit's clock through this one until :meth:`uninstall`."""
        self._previous = _clock.install(self)

    def uninstall(self) -> None:
        """Restore the clock that was installed before :meth:`install`."""
        if self._previous is not None:
            _clock.install(self._previous)
            self._previous = None

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


@contextmanager
def fake_clock(start: float = 1_000.0) -> Iterator[FakeClock]:
    """Install a :class:`FakeClock` for the duration of a ``with`` block.

    .. versionadded:: 0.1.0
    """
    with FakeClock(start) as clock:
        yield clock

"""Client-side adaptive throttling (Google SRE book, "Handling Overload").

When a backend rejects most of what it is sent, every rejected request still
costs it something: a connection, a parse, a log line. Adaptive throttling lets
the client reject locally, before sending, with a probability that rises as the
backend's acceptance rate falls::

    p(reject) = max(0, (requests - k * accepts) / (requests + 1))

``requests`` counts every attempt the application made (including the ones
rejected locally) and ``accepts`` the ones the backend accepted, over a sliding
window of per-second buckets. With ``k = 2`` the client sends up to about twice
what the backend accepts, so recovery is noticed quickly while the wasted load
stays bounded.
"""

from __future__ import annotations

import math
import random as _random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from . import _clock, _fork
from ._config import JITTER, seconds, setting, window_seconds
from ._errors import Throttled

__all__ = ["DEFAULT_THROTTLE_K", "DEFAULT_THROTTLE_WINDOW", "AdaptiveThrottle"]

#: Default multiplier of accepts: send up to about twice what the backend accepts.
DEFAULT_THROTTLE_K = 2.0
#: Default sliding window, in seconds (the SRE book suggests two minutes).
DEFAULT_THROTTLE_WINDOW = 120.0


class _Bucket:
    """One second of history; also the permit, so an accept lands beside its request."""

    __slots__ = ("accepts", "live", "requests", "second")

    def __init__(self, second: int) -> None:
        self.second = second
        self.requests = 0
        self.accepts = 0
        self.live = True


class AdaptiveThrottle:
    """Reject calls locally while the backend is rejecting most of them.

    Sits beside the circuit breaker in a :class:`reskit.Policy` and sees every
    attempt. Each attempt is admitted with probability ``1 - p`` where
    ``p = max(0, (requests - k * accepts) / (requests + 1))`` over the last
    ``window`` seconds; a local rejection raises :class:`reskit.Throttled` and
    still counts as a request, so the rejection rate keeps tracking the
    backend's. Unlike a breaker there is no open state: some traffic always
    gets through, and the probability falls as soon as accepts return and old
    failures leave the window.

    Args:
        k: how many times the accepted volume the client may send
            (default 2.0, must be at least 1). Lower throttles harder.
        window: seconds of history (float or timedelta, default 120, at least
            1); counted in one-second buckets, so it is effectively rounded up
            to whole seconds.
        on: the exception type(s) that mean the backend rejected or failed the
            request (default any :class:`Exception`). Other exceptions count as
            accepted: the backend answered. ``CancelledError``,
            ``KeyboardInterrupt`` and other non-``Exception`` exits are not
            counted at all.
        min_requests: never reject while fewer requests than this are in the
            window (default 0), so a quiet client is not throttled on a
            handful of failures.
        name: a name for repr and telemetry.
        random: the random source (a :class:`random.Random`); inject a seeded
            or scripted one to make tests exact.

    The settings are fixed at construction (assigning one raises
    :class:`~reskit.FrozenConfigError`). A throttle is a gate: :meth:`admit`
    and :meth:`record` are what a policy calls around each attempt.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_accepts",
        "_buckets",
        "_k",
        "_lock",
        "_min_requests",
        "_name",
        "_on",
        "_random",
        "_requests",
        "_window",
        "_window_seconds",
    )

    _instead = "Build a new AdaptiveThrottle(...) and use policy.replace(throttle=...)."

    k = setting("_k", "How many times the accepted volume the client may send.")
    window = setting("_window", "Seconds of history.")
    on = setting("_on", "The exception types that mean the backend rejected a request.")
    min_requests = setting("_min_requests", "Requests the window needs before throttling starts.")
    name = setting("_name", "The name given at construction, or ``None``.")
    #: Gate protocol: the throttle needs no durations, never waits, raises Throttled.
    timed = False
    waits = False
    rejection = Throttled

    def __init__(
        self,
        k: float = DEFAULT_THROTTLE_K,
        window: float | timedelta = DEFAULT_THROTTLE_WINDOW,
        *,
        on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        min_requests: int = 0,
        name: str | None = None,
        random: _random.Random | None = None,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int | float) or not 1.0 <= k < math.inf:
            raise ValueError(
                f"k must be a finite number >= 1.0, got {k!r}; 2.0 lets the client send "
                "about twice what the backend accepts (lower throttles harder)"
            )
        self._k = float(k)
        converted = seconds(window, "window")
        assert converted is not None
        window_seconds(converted, "window")
        if converted < 1.0:
            raise ValueError(
                f"window must be at least 1 second (requests are counted in one-second "
                f"buckets), got {converted!r}; the SRE book suggests 120 seconds"
            )
        self._window = converted
        self._window_seconds = math.ceil(converted)
        types = on if isinstance(on, tuple) else (on,)
        if not types or not all(isinstance(t, type) and issubclass(t, Exception) for t in types):
            raise TypeError(
                f"on must be an Exception subclass or a tuple of them, got {on!r}; "
                "it names the errors that mean the backend rejected the request"
            )
        self._on: tuple[type[BaseException], ...] = types
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 0:
            raise ValueError(
                f"min_requests must be an int >= 0, got {min_requests!r}; "
                "it is how many requests the window needs before throttling starts"
            )
        self._min_requests = min_requests
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self._name = name
        if random is not None and not isinstance(random, _random.Random):
            raise TypeError(f"random must be a random.Random instance, got {random!r}")
        self._random = random if random is not None else JITTER
        self._lock = threading.Lock()
        self._buckets: deque[_Bucket] = deque()
        self._requests = 0
        self._accepts = 0
        _fork.track(self)

    def _after_fork(self) -> None:
        # pragma: no mutate start (runs only in a forked child, where mutmut cannot link it to
        # a test; tests/test_mutation_fork.py checks it)
        self._lock = threading.Lock()
        # pragma: no mutate end

    # -- the gate protocol -------------------------------------------------------
    def admit(
        self,
        policy_name: str | None,
        key: str | None = None,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> _Bucket:
        """Count a request; raise :class:`Throttled` if it is rejected locally.

        Every permit must be handed back to :meth:`record` exactly once.

        .. versionadded:: 0.1.0
        """
        with self._lock:
            bucket = self._advance(_clock.now())
            probability = self._probability()
            bucket.requests += 1
            self._requests += 1
            # Drawing only when it matters keeps a scripted random source in
            # step with the rejections a test means to provoke.
            rejected = probability > 0.0 and self._random.random() < probability
        if rejected:
            raise Throttled(
                f"throttled locally: the backend accepted too few recent requests "
                f"(reject probability {probability:.2f})",
                policy=policy_name,
            )
        return bucket

    def record(
        self, permit: _Bucket, exc: BaseException | None, duration: float, result: Any = None
    ) -> None:
        """Record how an admitted attempt ended (exactly once per :meth:`admit`).

        .. versionadded:: 0.1.0
        """
        if exc is None or (isinstance(exc, Exception) and not isinstance(exc, self._on)):
            with self._lock:
                # Only count the accept while its request is still in the window,
                # so accepts never outnumber requests.
                if permit.live:
                    permit.accepts += 1
                    self._accepts += 1
        elif not isinstance(exc, Exception):
            # Cancelled or interrupted: the backend's answer is unknown, so the
            # attempt is taken back rather than counted as a rejection.
            with self._lock:
                if permit.live:
                    permit.requests -= 1
                    self._requests -= 1

    # -- decisions -----------------------------------------------------------
    def _expire(self, second: int) -> None:
        buckets = self._buckets
        oldest = second - self._window_seconds
        while buckets and buckets[0].second <= oldest:
            gone = buckets.popleft()
            gone.live = False  # pragma: no mutate (None would read as false too)
            self._requests -= gone.requests
            self._accepts -= gone.accepts

    def _advance(self, now: float) -> _Bucket:
        second = math.floor(now)
        self._expire(second)
        buckets = self._buckets
        if buckets and buckets[-1].second == second:
            return buckets[-1]
        bucket = _Bucket(second)
        buckets.append(bucket)
        return bucket

    def _probability(self) -> float:
        requests = self._requests
        if requests < self._min_requests:
            return 0.0
        p = (requests - self._k * self._accepts) / (requests + 1)
        return p if p > 0.0 else 0.0  # pragma: no mutate (>= returns the same 0.0)

    # -- introspection -------------------------------------------------------
    def _snapshot(self) -> tuple[int, int, float]:
        with self._lock:
            self._expire(math.floor(_clock.now()))
            return self._requests, self._accepts, self._probability()

    @property
    def requests(self) -> int:
        """Requests counted in the current window, local rejections included.

        .. versionadded:: 0.1.0
        """
        return self._snapshot()[0]

    @property
    def accepts(self) -> int:
        """Requests the backend accepted in the current window.

        .. versionadded:: 0.1.0
        """
        return self._snapshot()[1]

    @property
    def rejection_probability(self) -> float:
        """The probability that the next call is rejected locally.

        .. versionadded:: 0.1.0
        """
        return self._snapshot()[2]

    def __repr__(self) -> str:
        requests, accepts, probability = self._snapshot()
        name = f"{self._name!r}, " if self._name is not None else ""
        return (
            f"AdaptiveThrottle({name}k={self._k}, window={self._window}, requests={requests}, "
            f"accepts={accepts}, rejection_probability={probability:.3f})"
        )

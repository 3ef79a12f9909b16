"""Adaptive concurrency limits for :class:`reskit.Bulkhead`.

A fixed ``max_concurrent`` is a guess that goes stale as the backend scales,
deploys or degrades. An adaptive limit learns it instead, the way TCP learns a
congestion window (after Netflix's concurrency-limits): every finished call
reports its duration, how many calls were in flight and whether it was dropped
(timed out or rejected downstream), and the limit moves.

- :class:`AIMDLimit`: additive increase, multiplicative decrease. Simple and
  predictable; reacts to drops and to calls slower than ``timeout``.
- :class:`GradientLimit`: compares the latest round-trip time with a long-term
  average; when calls get slower than usual (queueing somewhere), the limit
  shrinks in proportion, and it grows back when latency returns to normal.

Limits are plain arithmetic with no clock, lock or I/O: the bulkhead feeds them
under its own lock, which is why one limit object belongs to one bulkhead.
"""

from __future__ import annotations

import math
from datetime import timedelta

from ._config import seconds, setting

__all__ = ["DEFAULT_INITIAL_LIMIT", "AIMDLimit", "AdaptiveLimit", "GradientLimit"]

#: Starting limit of :class:`AIMDLimit` and :class:`GradientLimit` unless given.
DEFAULT_INITIAL_LIMIT = 20
#: Upper bound of the adaptive limits unless given.
DEFAULT_MAX_LIMIT = 200
#: Calls slower than this count as drops for :class:`AIMDLimit` unless given.
DEFAULT_AIMD_TIMEOUT = 5.0


def _positive_int(value: object, what: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}; {hint}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {value!r}; {hint}")
    return value


def _ratio(value: object, what: str, low: float, high: float, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {value!r}; {hint}")
    value = float(value)
    if not low < value < high:  # also rejects NaN
        raise ValueError(
            f"{what} must be between {low} and {high} (exclusive), got {value!r}; {hint}"
        )
    return value


class AdaptiveLimit:
    """Base class of the adaptive concurrency limits a :class:`Bulkhead` accepts.

    Subclasses implement :meth:`_update`, which receives one sample per
    finished call and returns the new limit as a float; the base class keeps
    it within ``[min_limit, max_limit]`` and exposes it as :attr:`current`.

    A limit is not thread-safe on its own: the bulkhead that owns it feeds it
    under its lock. Give each :class:`Bulkhead` its own limit object.

    Args:
        initial: the limit to start from.
        min_limit: the limit never falls below this.
        max_limit: the limit never rises above this.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_bound", "_estimate", "_max_limit", "_min_limit")

    _instead = "Build a new limit (one per Bulkhead) and use it in a new Bulkhead(limit=...)."

    min_limit = setting("_min_limit", "The limit never falls below this.")
    max_limit = setting("_max_limit", "The limit never rises above this.")

    def __init__(self, *, initial: int, min_limit: int, max_limit: int) -> None:
        hint = "pass a whole number of concurrent calls"
        self._min_limit = _positive_int(min_limit, "min_limit", hint)
        self._max_limit = _positive_int(max_limit, "max_limit", hint)
        initial = _positive_int(initial, "initial", hint)
        if self._min_limit > self._max_limit:
            raise ValueError(
                f"min_limit ({min_limit}) is above max_limit ({max_limit}); "
                "lower min_limit or raise max_limit"
            )
        if not self._min_limit <= initial <= self._max_limit:
            raise ValueError(
                f"initial ({initial}) must lie between min_limit ({min_limit}) and "
                f"max_limit ({max_limit}); choose a starting limit inside that range"
            )
        self._estimate = float(initial)
        self._bound = False  # pragma: no mutate (None would read as false too)

    @property
    def current(self) -> int:
        """The limit now: the most calls the owning bulkhead admits at once.

        .. versionadded:: 0.1.0
        """
        return int(self._estimate)

    def on_sample(self, duration: float, in_flight: int, dropped: bool) -> int:
        """Feed one finished call to the algorithm and return the new limit.

        Args:
            duration: how long the call took, in seconds.
            in_flight: how many calls were in flight when it finished
                (including this one).
            dropped: ``True`` when the call timed out or was rejected
                downstream, a sign of overload.

        .. versionadded:: 0.1.0
        """
        estimate = self._update(duration, in_flight, dropped)
        if estimate < self._min_limit:  # pragma: no mutate (<=: the same value either way)
            estimate = float(self._min_limit)
        elif estimate > self._max_limit:  # pragma: no mutate (>=: the same value either way)
            estimate = float(self._max_limit)
        self._estimate = estimate
        return int(estimate)

    def _update(self, duration: float, in_flight: int, dropped: bool) -> float:
        raise NotImplementedError

    def _bind(self) -> None:
        # Samples arrive under the owning bulkhead's lock; a second owner would
        # feed it concurrently and mix two backends' signals into one number.
        if self._bound:
            raise ValueError(
                f"this {type(self).__name__} already belongs to another Bulkhead; "
                f"create one {type(self).__name__} per Bulkhead"
            )
        self._bound = True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(current={self.current}, "
            f"min_limit={self.min_limit}, max_limit={self.max_limit})"
        )


class AIMDLimit(AdaptiveLimit):
    """Additive-increase/multiplicative-decrease concurrency limit.

    On a drop, or a call slower than ``timeout``, the limit is multiplied by
    ``backoff_ratio`` (and falls by at least one). On a success while the
    bulkhead is busy (in flight at least half the limit) it grows by one; an
    idle bulkhead proves nothing about capacity, so the limit holds.

    Its settings are fixed at construction (assigning one raises
    :class:`~reskit.FrozenConfigError`).

    Args:
        initial: the starting limit (default 20).
        min_limit: the lowest limit (default 1).
        max_limit: the highest limit (default 200).
        backoff_ratio: the factor applied on a drop, strictly between 0 and 1
            (default 0.9).
        timeout: calls slower than this (seconds or a timedelta) count as
            drops (default 5 seconds).

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_backoff_ratio", "_timeout")

    backoff_ratio = setting("_backoff_ratio", "The factor applied to the limit on a drop.")
    timeout = setting("_timeout", "Calls slower than this many seconds count as drops.")

    def __init__(
        self,
        *,
        initial: int = DEFAULT_INITIAL_LIMIT,
        min_limit: int = 1,
        max_limit: int = DEFAULT_MAX_LIMIT,
        backoff_ratio: float = 0.9,
        timeout: float | timedelta = DEFAULT_AIMD_TIMEOUT,
    ) -> None:
        super().__init__(initial=initial, min_limit=min_limit, max_limit=max_limit)
        self._backoff_ratio = _ratio(
            backoff_ratio, "backoff_ratio", 0.0, 1.0, "0.9 backs off by 10% on each drop"
        )
        converted = seconds(timeout, "timeout")
        assert converted is not None
        self._timeout = converted

    def _update(self, duration: float, in_flight: int, dropped: bool) -> float:
        limit = int(self._estimate)
        if dropped or duration > self._timeout:
            # Truncating (not rounding) guarantees a drop always costs at least
            # one slot, even at small limits where 10% is less than one.
            return float(int(limit * self._backoff_ratio))
        if in_flight * 2 >= limit:
            return float(limit + 1)
        return float(limit)


class GradientLimit(AdaptiveLimit):
    """Latency-gradient concurrency limit (after Netflix's Gradient2Limit).

    Each sample compares the call's round-trip time (the short-term RTT) with
    an exponential average over roughly ``long_window`` samples (the long-term
    RTT). The gradient ``rtt_tolerance * long / short``, clamped to
    ``[0.5, 1.0]``, says how much queueing the latest call saw: 1.0 means none.
    The new limit is ``limit * gradient + queue_size``, blended into the old one
    by ``smoothing`` and kept within ``[min_limit, max_limit]``.

    So when latency rises above ``rtt_tolerance`` times its usual value the
    limit falls (at most halving per sample before smoothing), and when it
    returns to normal the limit grows back by ``queue_size * smoothing`` per
    sample. A dropped call counts as the steepest gradient (0.5) with no
    headroom added, so repeated drops can take the limit down to ``min_limit``
    (slow calls alone bottom out near ``2 * queue_size``). While the
    bulkhead is far below its limit (in flight under half of it) the limit
    holds, since an idle system says nothing about its capacity. When the
    long-term RTT is more than twice the latest one (latency recovered after a
    long overload) it is pulled down faster than the average alone would.

    Its settings are fixed at construction (assigning one raises
    :class:`~reskit.FrozenConfigError`).

    Args:
        initial: the starting limit (default 20).
        min_limit: the lowest limit (default 1).
        max_limit: the highest limit (default 200).
        smoothing: weight of each new estimate, strictly between 0 and 1
            (default 0.2); lower is steadier and slower.
        rtt_tolerance: how much slower than usual a call may be before the
            limit falls (default 1.5, must be at least 1).
        long_window: roughly how many samples the long-term RTT averages over
            (default 600).
        queue_size: headroom added to each new estimate so the limit can probe
            upwards (default 4).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_long_rtt",
        "_long_window",
        "_queue_size",
        "_rtt_tolerance",
        "_samples",
        "_smoothing",
        "_warmup",
    )

    smoothing = setting("_smoothing", "Weight of each new estimate.")
    rtt_tolerance = setting("_rtt_tolerance", "How much slower than usual a call may be.")
    long_window = setting("_long_window", "Samples the long-term RTT averages over.")
    queue_size = setting("_queue_size", "Headroom added to each new estimate.")

    def __init__(
        self,
        *,
        initial: int = DEFAULT_INITIAL_LIMIT,
        min_limit: int = 1,
        max_limit: int = DEFAULT_MAX_LIMIT,
        smoothing: float = 0.2,
        rtt_tolerance: float = 1.5,
        long_window: int = 600,
        queue_size: int = 4,
    ) -> None:
        super().__init__(initial=initial, min_limit=min_limit, max_limit=max_limit)
        self._smoothing = _ratio(smoothing, "smoothing", 0.0, 1.0, "0.2 is a steady default")
        if (
            isinstance(rtt_tolerance, bool)
            or not isinstance(rtt_tolerance, int | float)
            or not 1.0 <= rtt_tolerance < math.inf
        ):
            raise ValueError(
                f"rtt_tolerance must be a finite number >= 1.0, got {rtt_tolerance!r}; "
                "1.5 tolerates calls 50% slower than usual before shrinking the limit"
            )
        self._rtt_tolerance = float(rtt_tolerance)
        self._long_window = _positive_int(
            long_window, "long_window", "pass how many samples the long-term RTT averages over"
        )
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(
                f"queue_size must be an int >= 0, got {queue_size!r}; "
                "it is the headroom added to each estimate (4 by default)"
            )
        self._queue_size = queue_size
        # A plain average over the first samples, then an exponential one: an
        # EWMA seeded with a single sample would trust that sample for a long time.
        self._warmup = min(10, self._long_window)
        self._samples = 0
        self._long_rtt = 0.0

    @property
    def long_rtt(self) -> float:
        """The long-term average round-trip time in seconds (0.0 before any sample).

        .. versionadded:: 0.1.0
        """
        return self._long_rtt

    def _update(self, duration: float, in_flight: int, dropped: bool) -> float:
        # A zero duration (a fake clock, a cached answer) must not divide by zero;
        # a nanosecond floor reads it as "no queueing at all".
        short = duration if duration > 1e-9 else 1e-9  # pragma: no mutate (>= picks 1e-9 too)
        self._samples += 1
        if self._samples <= self._warmup:
            self._long_rtt += (short - self._long_rtt) / self._samples
        else:
            self._long_rtt += (short - self._long_rtt) * (2.0 / (self._long_window + 1))
        long = self._long_rtt
        if long / short > 2.0:
            # Latency came back after a long overload: without this the inflated
            # average would hide the next overload for hundreds of samples.
            self._long_rtt = long * 0.95

        estimate = self._estimate
        if not dropped and in_flight < estimate / 2:
            return estimate
        if dropped:
            # The strongest congestion signal there is: the steepest gradient and
            # no headroom, or the limit could never fall below 2 * queue_size.
            target = estimate * 0.5
        else:
            gradient = max(0.5, min(1.0, self._rtt_tolerance * long / short))
            target = estimate * gradient + self._queue_size
        return estimate * (1.0 - self._smoothing) + target * self._smoothing

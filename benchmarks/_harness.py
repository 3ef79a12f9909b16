"""A small, self-contained micro-benchmark runner for comparing variants.

Why not pyperf or pytest-benchmark? Both are fine tools, but the gate needs
*ratios* between variants measured side by side on a noisy, shared 2-core CI
machine, and it must finish quickly. pyperf spawns a worker process per
benchmark (seconds each); pytest-benchmark measures one variant after another,
so a burst of load from a neighbour skews one side of a comparison. This runner
instead:

- times a variant with a generated loop that calls it ``UNROLL`` times per
  iteration, so the loop's own cost is a nanosecond or two per call;
- calibrates the loop count so one *sample* takes about ``Profile.sample_ns``;
- measures the variants of one comparison *interleaved*: every round takes one
  sample of each variant, in an order rotated from round to round, so slow
  drift and load bursts hit all of them alike;
- leaves the garbage collector *on* while timing (a variant that leaves
  reference cycles behind pays for their collection, as it would in a
  service), but first moves every object that exists before timing into
  the permanent generation (``gc.freeze``) so a collection costs the same
  whatever the benchmark process imported, and collects between rounds;
- counts, after timing, the objects the cyclic GC has to free per call
  (reference cycles a hot path leaves behind), reported next to the times;
- reduces the samples of a variant with *min of medians*: the rounds are cut
  into groups, each group gives its median (which shrugs off a single
  preempted sample), and the fastest group median is the estimate (noise only
  ever adds time, so the quietest stretch of the run is the best estimate).

Async variants are timed inside one running event loop (one ``asyncio.Runner``
per comparison): a sample is one coroutine that awaits the variant ``n`` times
in a row and reads the clock itself, so scheduling the sample costs nothing.

Nothing here knows about reskit; ``scenarios.py`` says what to compare.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

__all__ = ["PROFILES", "Measurement", "Profile", "Variant", "measure"]

#: Calls per iteration of a timing loop; keeps the loop's own cost per call tiny.
UNROLL = 10


@dataclass(frozen=True, slots=True)
class Profile:
    """How hard to measure.

    Args:
        name: shown in the report.
        sample_ns: target duration of one sample.
        rounds: samples taken of every variant.
        group: rounds per median group (``rounds // group`` groups).
        warmup: untimed samples of every variant before calibration and timing.
    """

    name: str
    sample_ns: int
    rounds: int
    group: int
    warmup: int


PROFILES: dict[str, Profile] = {
    # Short samples survive a busy machine best: a sample is less likely to be
    # preempted, and with 20 groups one quiet stretch is enough. CI: ~10 s.
    "short": Profile("short", sample_ns=1_000_000, rounds=200, group=10, warmup=3),
    # 3x the rounds of 2x longer samples (~1 min): for the docs and for chasing a
    # regression.
    "default": Profile("default", sample_ns=2_000_000, rounds=600, group=20, warmup=5),
}


@dataclass(frozen=True, slots=True)
class Variant:
    """One thing to time: a zero-argument callable.

    Args:
        name: the label in reports (``"reskit"``, ``"tenacity"``, ``"bare"``).
        fn: a zero-argument function (sync), or a zero-argument ``async def``
            whose result is awaited (async).
        catch: an exception type (or tuple) each call is expected to raise;
            the timing loop catches it inline, so a ``try`` costs nothing extra.
        setup: called, untimed, before every sample (for example to re-open a
            circuit breaker whose reset timeout could otherwise run out).
    """

    name: str
    fn: Callable[[], Any]
    catch: type[BaseException] | tuple[type[BaseException], ...] | None = None
    setup: Callable[[], None] | None = None


@dataclass(slots=True)
class Measurement:
    """What :func:`measure` found for one variant."""

    name: str
    ns_per_call: float
    calls_per_sample: int
    samples: list[float] = field(repr=False)
    #: Objects the cyclic GC had to free, per call: reference cycles a call
    #: leaves behind (0 for a well-behaved hot path). Not judged, reported.
    garbage_per_call: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Relative spread of the samples: (p75 - p25) / median."""
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / statistics.median(self.samples)


_SYNC_TIMER = """
def timer(n, _fn=_fn, _clock=_clock, _catch=_catch):
    started = _clock()
    for _ in range(n):
{body}
    return _clock() - started
"""

_ASYNC_TIMER = """
async def timer(n, _fn=_fn, _clock=_clock, _catch=_catch):
    started = _clock()
    for _ in range(n):
{body}
    return _clock() - started
"""


def _timer(variant: Variant, is_async: bool) -> Callable[[int], Any]:
    """Compile a loop that calls ``variant.fn`` ``UNROLL`` times per iteration."""
    call = "await _fn()" if is_async else "_fn()"
    if variant.catch is None:
        step = f"        {call}\n"
    else:
        step = f"        try:\n            {call}\n        except _catch:\n            pass\n"
    source = (_ASYNC_TIMER if is_async else _SYNC_TIMER).format(body=step * UNROLL)
    namespace: dict[str, Any] = {
        "_fn": variant.fn,
        "_clock": perf_counter_ns,
        "_catch": variant.catch,
    }
    exec(compile(source, f"<timer {variant.name}>", "exec"), namespace)
    return namespace["timer"]  # type: ignore[no-any-return]


def _sampler(variant: Variant, runner: asyncio.Runner | None) -> Callable[[int], int]:
    """Return ``sample(n)``: ns taken by ``n * UNROLL`` calls of the variant."""
    timer = _timer(variant, runner is not None)
    setup = variant.setup
    if runner is None:
        if setup is None:
            return timer  # type: ignore[return-value]

        def sample(n: int) -> int:
            setup()
            return timer(n)  # type: ignore[no-any-return]

        return sample

    def asample(n: int) -> int:
        if setup is not None:
            setup()
        return runner.run(timer(n))  # type: ignore[no-any-return]

    return asample


def _calibrate(sample: Callable[[int], int], target_ns: int) -> int:
    """The loop count that makes one sample take about ``target_ns``."""
    n = 1
    while True:
        elapsed = min(sample(n), sample(n))
        if elapsed >= target_ns // 8 or n >= 1 << 24:
            break
        n *= 4 if elapsed < target_ns // 64 else 2
    return max(1, math.ceil(n * target_ns / max(elapsed, 1)))


def _min_of_medians(samples: Sequence[float], group: int) -> float:
    groups = [samples[i : i + group] for i in range(0, len(samples), group)]
    groups = [g for g in groups if len(g) == group] or [list(samples)]
    return min(statistics.median(g) for g in groups)


def measure(
    variants: Sequence[Variant],
    profile: Profile,
    *,
    is_async: bool = False,
    runner: asyncio.Runner | None = None,
) -> dict[str, Measurement]:
    """Time ``variants`` against each other, interleaved; return one result each.

    For async variants pass ``is_async=True`` and the ``asyncio.Runner`` whose
    loop the variants belong to (a bulkhead or semaphore may be bound to it).
    """
    if is_async and runner is None:
        raise ValueError("async variants need the asyncio.Runner they run on")
    samplers = [_sampler(v, runner if is_async else None) for v in variants]
    for _ in range(profile.warmup):
        for sample in samplers:
            sample(64)
    loops = [_calibrate(sample, profile.sample_ns) for sample in samplers]
    results: list[list[float]] = [[] for _ in variants]
    count = len(variants)
    gc.collect()
    gc.freeze()
    try:
        for round_no in range(profile.rounds):
            for offset in range(count):
                i = (round_no + offset) % count
                results[i].append(samplers[i](loops[i]) / (loops[i] * UNROLL))
            gc.collect()
    finally:
        gc.unfreeze()
    garbage = [_garbage_per_call(sample, n) for sample, n in zip(samplers, loops, strict=True)]
    return {
        v.name: Measurement(
            name=v.name,
            ns_per_call=_min_of_medians(samples, profile.group),
            calls_per_sample=n * UNROLL,
            samples=samples,
            garbage_per_call=g,
        )
        for v, n, samples, g in zip(variants, loops, results, garbage, strict=True)
    }


def _garbage_per_call(sample: Callable[[int], int], n: int) -> float:
    """Run one sample with the GC off and count the unreachable objects it left."""
    gc.collect()
    gc.disable()
    try:
        sample(n)
        found = gc.collect()
    finally:
        gc.enable()
    return found / (n * UNROLL)

"""The open-loop load generator and the analysis behind ``overload.py``.

Nothing here starts a server or knows a variant: :func:`plan` turns phases into
a seeded Poisson schedule, :func:`drive` sends it to a URL and records every
request, :func:`summarize` and :func:`series` reduce the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import random
import ssl
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

CRITICAL = "/checkout"
LOW_PRIORITY = "/recommendations"

#: Statuses that count as rejections by the service (load shed, not failed).
REJECTED = (503, 429)
#: ``Result.status`` of a request the client gave up on (its timeout).
TIMED_OUT = -1
#: Connection pools the generator spreads its requests over (see :func:`drive`).
POOLS = 32
#: ``Result.status`` of a request that failed without an answer (connection refused, reset).
FAILED = -2


@dataclass(frozen=True, slots=True)
class Phase:
    """One step of the load: ``duration`` seconds at ``load`` times the capacity.

    ``slots`` is the backend's size during the phase, as a fraction of its full
    size (``0.5``: capacity halved).
    """

    name: str
    duration: float
    load: float
    slots: float = 1.0
    overload: bool = False


def phases(durations: Sequence[float], *, overload: float = 3.0) -> list[Phase]:
    """The benchmark's four phases, with the given durations in seconds.

    Half the capacity; ``overload`` times it; the same load while the backend
    loses half its slots; and half the (restored) capacity again.
    """
    warm, over, halved, recovery = durations
    return [
        Phase("half load", warm, 0.5),
        Phase(f"{overload:g}x overload", over, overload, overload=True),
        Phase("capacity halved", halved, overload, slots=0.5, overload=True),
        Phase("recovery", recovery, 0.5),
    ]


def boundaries(plan_phases: Sequence[Phase]) -> list[tuple[float, float]]:
    """``(start, end)`` of every phase, in seconds from the start of the run."""
    out = []
    start = 0.0
    for phase in plan_phases:
        out.append((start, start + phase.duration))
        start += phase.duration
    return out


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # seconds from the start of the run
    route: str


def plan(
    plan_phases: Sequence[Phase], capacity: float, *, seed: int, critical_share: float = 0.2
) -> list[Arrival]:
    """A Poisson arrival schedule: exponential gaps at each phase's rate.

    The same ``seed`` always gives the same schedule. A phase's arrivals are
    drawn afresh at its start (the memoryless property makes that exact), so
    changing one phase's rate leaves the earlier phases' arrivals unchanged.
    """
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    for phase, (start, end) in zip(plan_phases, boundaries(plan_phases), strict=True):
        rate = phase.load * capacity
        if rate <= 0:
            continue
        at = start + rng.expovariate(rate)
        while at < end:
            route = CRITICAL if rng.random() < critical_share else LOW_PRIORITY
            arrivals.append(Arrival(at, route))
            at += rng.expovariate(rate)
    return arrivals


@dataclass(frozen=True, slots=True)
class Action:
    """A control request the generator sends at ``at`` seconds (``path`` with its query)."""

    at: float
    path: str
    what: str


def actions(
    plan_phases: Sequence[Phase], slots: int, *, brownout_after: float | None
) -> list[Action]:
    """The operator's moves: resize the backend at phase starts, and raise/lower brownout.

    The brownout level goes to 1 ``brownout_after`` seconds after the first
    overloaded phase starts (an alert firing, a person or a runbook reacting)
    and back to 0 when the last overloaded phase ends. ``None``: never.
    """
    out: list[Action] = []
    current = slots
    for phase, (start, _) in zip(plan_phases, boundaries(plan_phases), strict=True):
        size = max(1, round(slots * phase.slots))
        if size != current:
            out.append(Action(start, f"/_control/slots?n={size}", f"backend slots {size}"))
            current = size
    if brownout_after is not None:
        spans = [
            span
            for phase, span in zip(plan_phases, boundaries(plan_phases), strict=True)
            if phase.overload
        ]
        if spans:
            out.append(
                Action(spans[0][0] + brownout_after, "/_control/brownout?level=1", "brownout 1")
            )
            out.append(Action(spans[-1][1], "/_control/brownout?level=0", "brownout 0"))
    return sorted(out, key=lambda a: a.at)


@dataclass(slots=True)
class Result:
    at: float  # scheduled send time, seconds from the start of the run
    route: str
    status: int  # the HTTP status, TIMED_OUT or FAILED
    latency: float  # from the *scheduled* send time to the answer (or the give-up)
    lag: float  # how late the generator started sending it


@dataclass(slots=True)
class Run:
    results: list[Result]
    actions: list[tuple[float, str]]  # (time taken effect, what), seconds from the start
    started: float  # time.monotonic() of the run's time zero
    cpu: float = 0.0  # CPU seconds the generator used while sending
    server: dict[str, Any] = field(default_factory=dict)


async def drive(
    url: str,
    arrivals: Sequence[Arrival],
    moves: Sequence[Action] = (),
    *,
    timeout: float,
    peak: float = 0.0,
    lead: float = 0.3,
) -> Run:
    """Send ``arrivals`` to ``url`` open-loop, and ``moves`` to its control routes.

    Every request is started at its scheduled time, whether earlier ones were
    answered or not: each is its own task, and the clients' connection pools
    are unbounded so no request waits for another's connection. A request that
    gets no answer within ``timeout`` seconds is abandoned (its connection
    closed) and recorded as timed out. Latency runs from the *scheduled* time,
    so a generator that falls behind cannot hide the service's slowness; its
    lag is recorded per request, so the run can be judged valid. Before the
    first request, enough connections are opened for ``peak`` requests a
    second to wait ``timeout`` each.
    """
    import time

    import httpx

    _cheap_missing_sniffio()
    loop = asyncio.get_running_loop()
    results: list[Result] = []
    done: list[tuple[float, str]] = []
    # httpcore scans every connection of its pool for each request, so one pool
    # holding the hundreds of connections of an overload costs the generator
    # more than the requests do. Many small pools keep each scan short.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    tls = ssl.create_default_context()  # unused over http://, but each client would load one
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, verify=tls)
            )
            for _ in range(POOLS)
        ]
        control = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=10.0))
        # Open the connections the busiest second will need before the clock starts:
        # a client fleet has its pools warm, and opening hundreds at the step to
        # overload would make the generator, not the service, late.
        warm = min(2000, int(peak * timeout * 1.1))
        await asyncio.gather(*(clients[i % POOLS].get("/_control/health") for i in range(warm)))
        # Time zero a little ahead, so the first arrivals are not late by construction.
        zero = loop.time() + lead
        started = time.monotonic() + (zero - loop.time())

        async def one(arrival: Arrival, client: httpx.AsyncClient) -> None:
            due = zero + arrival.at
            lag = loop.time() - due
            try:
                async with asyncio.timeout(timeout):
                    response = await client.get(arrival.route)
                status = response.status_code
            except TimeoutError:
                status = TIMED_OUT
            except httpx.HTTPError:
                status = FAILED
            results.append(Result(arrival.at, arrival.route, status, loop.time() - due, lag))

        async def operate() -> None:
            for move in moves:
                delay = zero + move.at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                response = await control.post(move.path)
                response.raise_for_status()
                done.append((loop.time() - zero, move.what))

        cpu = time.process_time()
        operator = asyncio.create_task(operate())
        tasks: set[asyncio.Task[None]] = set()
        for index, arrival in enumerate(arrivals):
            delay = zero + arrival.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(arrival, clients[index % POOLS]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await operator
        if tasks:
            await asyncio.wait(tasks)
        cpu = time.process_time() - cpu
        server = (await control.get("/_control/stats")).json()
    results.sort(key=lambda r: r.at)
    return Run(results, done, started, cpu, server)


def _cheap_missing_sniffio() -> None:
    # httpcore tries to import sniffio on every request; when it is not
    # installed each failed import searches sys.path again, which costs more
    # than the request. A None entry makes the failure immediate, with the same
    # outcome (httpcore falls back to asyncio).
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


# -- analysis --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by the nearest-rank method; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def good(result: Result, slo: float) -> bool:
    """Answered 2xx within the SLO: what goodput counts."""
    return 200 <= result.status < 300 and result.latency <= slo


@dataclass(slots=True)
class PhaseSummary:
    name: str
    duration: float
    offered: float  # requests sent per second
    goodput: float  # 2xx within the SLO, per second
    p50: float | None  # latency of 2xx answers, seconds
    p99: float | None
    rejected: int  # 503 and 429
    timeouts: int
    failed: int  # no answer at all (connection refused or reset), or another 5xx
    critical: float | None  # share of critical requests answered 2xx within the SLO
    critical_reacted: float | None  # the same, from the brownout reaction to the phase's end
    follows_overload: bool  # the phase right after the overload: time to recover is measured
    recovered_after: float | None  # seconds into the phase until healthy; None: never
    lag_p99: float  # the generator's lag sending this phase's requests, seconds
    lag_max: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    run: Run,
    plan_phases: Sequence[Phase],
    *,
    slo: float,
    window: float = 0.5,
    healthy_for: float = 2.0,
) -> list[PhaseSummary]:
    """Reduce a run's records to one :class:`PhaseSummary` per phase.

    A request belongs to the phase in which it was scheduled to be sent.
    ``recovered_after`` is computed for every phase that follows an overloaded
    one: the start of the first ``window`` from which every window is healthy
    for ``healthy_for`` seconds (or to the end of the phase). A window is
    healthy when at least 95% of the requests sent in it were answered 2xx
    within the SLO and the p99 of its 2xx answers is within the SLO.
    """
    reacted_at = next((at for at, what in run.actions if what == "brownout 1"), None)
    out = []
    spans = boundaries(plan_phases)
    for index, (phase, (start, end)) in enumerate(zip(plan_phases, spans, strict=True)):
        mine = [r for r in run.results if start <= r.at < end]
        answered = [r.latency for r in mine if 200 <= r.status < 300]
        critical = [r for r in mine if r.route == CRITICAL]
        reacted = (
            [r for r in critical if r.at >= reacted_at]
            if reacted_at is not None and phase.overload
            else []
        )
        recovered = None
        follows = index > 0 and plan_phases[index - 1].overload and not phase.overload
        if follows:
            recovered = recovery_time(mine, start, end, slo, window, healthy_for)
        lags = [r.lag for r in mine]
        out.append(
            PhaseSummary(
                name=phase.name,
                duration=phase.duration,
                offered=len(mine) / phase.duration,
                goodput=sum(good(r, slo) for r in mine) / phase.duration,
                p50=percentile(answered, 50),
                p99=percentile(answered, 99),
                rejected=sum(r.status in REJECTED for r in mine),
                timeouts=sum(r.status == TIMED_OUT for r in mine),
                failed=sum(
                    r.status == FAILED or (r.status >= 500 and r.status not in REJECTED)
                    for r in mine
                ),
                critical=_share(critical, slo),
                critical_reacted=_share(reacted, slo),
                follows_overload=follows,
                recovered_after=recovered,
                lag_p99=percentile(lags, 99) or 0.0,
                lag_max=max(lags, default=0.0),
            )
        )
    return out


def _share(results: Sequence[Result], slo: float) -> float | None:
    if not results:
        return None
    return sum(good(r, slo) for r in results) / len(results)


def healthy(results: Sequence[Result], slo: float) -> bool:
    """Whether requests sent in one window saw a healthy service (see :func:`summarize`)."""
    if not results:
        return True
    answered = [r.latency for r in results if 200 <= r.status < 300]
    p99 = percentile(answered, 99)
    within = sum(good(r, slo) for r in results) / len(results)
    return within >= 0.95 and p99 is not None and p99 <= slo


def recovery_time(
    results: Sequence[Result],
    start: float,
    end: float,
    slo: float,
    window: float,
    healthy_for: float,
) -> float | None:
    """Seconds from ``start`` to the first window that begins a lasting healthy stretch."""
    count = max(1, round((end - start) / window))
    buckets: list[list[Result]] = [[] for _ in range(count)]
    for r in results:
        buckets[min(count - 1, int((r.at - start) / window))].append(r)
    flags = [healthy(b, slo) for b in buckets]
    need = max(1, round(healthy_for / window))
    for i in range(count):
        if all(flags[i : i + need]):
            return i * window
    return None


@dataclass(slots=True)
class Series:
    """Per-window figures over a whole run, for the plot (windows by scheduled send time)."""

    t: list[float]  # window middles, seconds
    goodput: list[float]  # per second
    p99: list[float | None]
    critical: list[float | None]


def series(run: Run, total: float, *, slo: float, window: float = 0.5) -> Series:
    count = max(1, math.ceil(total / window))
    buckets: list[list[Result]] = [[] for _ in range(count)]
    for r in run.results:
        buckets[min(count - 1, int(r.at / window))].append(r)
    return Series(
        t=[(i + 0.5) * window for i in range(count)],
        goodput=[sum(good(r, slo) for r in b) / window for b in buckets],
        p99=[percentile([r.latency for r in b if 200 <= r.status < 300], 99) for b in buckets],
        critical=[_share([r for r in b if r.route == CRITICAL], slo) for b in buckets],
    )


def lag(run: Run) -> dict[str, float]:
    """How far behind its schedule the generator sent requests, seconds."""
    lags = [r.lag for r in run.results]
    if not lags:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    return {
        "p50": statistics.median(lags),
        "p99": percentile(lags, 99) or 0.0,
        "max": max(lags),
    }

"""``reskit demo``: real reskit policies against simulated flaky dependencies.

Each *scene* is one policy in front of one simulated dependency. The
dependencies answer after real ``asyncio.sleep`` (or ``time.sleep``) calls of a
few milliseconds, and fail, hang or go down according to draws from a seeded
random source. Callers offer a fixed rate of calls to every scene (a seeded
Poisson arrival schedule), from asyncio tasks or from threads, so a run lasts
about as long on a slow machine as on a fast one.

What a seed fixes, and what it cannot:

- Fixed: the arrival schedule, and what the dependency does on every attempt of
  every call (answer after N ms, raise, or hang); a draw depends only on the
  seed, the scene, the call number and the attempt number, never on the order in
  which concurrent calls happen to run.
- Varies a little between runs: whatever depends on real time or on the
  interleaving of concurrent calls: whether a retry still fits in a deadline
  (the jitter source is shared by concurrent calls), the retry budget (a
  per-second window), the circuit breaker (``reset_timeout`` is real time), the
  bulkhead (how many calls overlap) and, of course, the latencies.

reskit logs a ``reskit.retry.scheduled`` warning for every retry; a demo makes
hundreds. While it runs, the demo routes structlog through a processor that
counts reskit's events instead of printing them, and shows the counts and a few
samples at the end. The previous structlog configuration is restored afterwards.

Only the base dependencies are used: no OpenTelemetry SDK, no httpx, no Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import shutil
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

# The demo uses reskit as an application does: through its public names only.
import reskit
from reskit import Fallback, Policy, ReskitError, Retry, RetryBudget, TimeoutExceeded
from reskit.stores import Store

__all__ = [
    "ARRIVAL_RATE",
    "DEFAULT_CALLS",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_SEED",
    "DemoResult",
    "Dependency",
    "Profile",
    "build_scenes",
    "render_details",
    "render_logs",
    "render_table",
    "run",
    "run_demo",
]

DEFAULT_CALLS = 4000
DEFAULT_SEED = 1
DEFAULT_CONCURRENCY = 16
#: Calls a second offered to each scene. Fixed rather than "as fast as
#: possible" so the run takes the same few seconds on any machine, and so a
#: breaker's ``reset_timeout`` means the same number of calls everywhere.
ARRIVAL_RATE = 120.0
#: Threads that call the synchronous scene; each sync attempt with a timeout
#: borrows one more from reskit's worker pool, so keep a 2-core machine calm.
MAX_THREADS = 8

OUTCOMES = ("success", "fallback", "rejected", "failure")
_RETRY_EVENT = "reskit.retry.scheduled"


# -- the simulated dependencies --------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """How a simulated dependency behaves. Times are in seconds.

    Args:
        median: the typical latency of an answer.
        ceiling: no ordinary answer takes longer. Kept well under the policy's
            timeout so that only spikes time out, whatever the machine's load.
        error_rate: the share of attempts that raise :class:`ConnectionError`.
        spike_rate: the share of attempts that hang for ``spike`` seconds.
        spike: the range a hang's length is drawn from.
        spread: the sigma of the lognormal latency distribution.
        degraded: a stretch of the scene's calls, as fractions of the scene
            (``(0.3, 0.5)``), during which ``degraded_error_rate`` applies.
        degraded_error_rate: the error rate during ``degraded``.
        outage: a stretch of calls during which every attempt fails fast.

    .. versionadded:: 0.1.0
    """

    median: float
    ceiling: float
    error_rate: float
    spike_rate: float
    spike: tuple[float, float] = (0.25, 0.5)
    spread: float = 0.5
    degraded: tuple[float, float] | None = None
    degraded_error_rate: float = 0.0
    outage: tuple[float, float] | None = None


class Call:
    """One caller's call: its number and how many attempts reached the dependency."""

    __slots__ = ("attempts", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.attempts = 0


class Dependency:
    """A simulated remote dependency whose every answer is drawn from a seeded source.

    .. versionadded:: 0.1.0
    """

    def __init__(self, name: str, profile: Profile, *, seed: int, calls: int) -> None:
        self.name = name
        self.profile = profile
        self._seed = seed
        self._calls = max(calls, 1)
        self._log_median = math.log(profile.median)

    def draw(self, call: int, attempt: int) -> tuple[str, float]:
        """What attempt ``attempt`` of call ``call`` does: ``(kind, seconds)``.

        ``kind`` is ``"ok"``, ``"error"`` or ``"spike"``. The draw is a pure
        function of the seed, the dependency, the call and the attempt, so
        concurrent calls cannot change each other's luck.
        """
        # A string seed goes through SHA-512: stable across processes, unlike hash().
        rng = random.Random(f"{self._seed}/{self.name}/{call}/{attempt}")
        p = self.profile
        at = call / self._calls
        latency = min(rng.lognormvariate(self._log_median, p.spread), p.ceiling)
        if p.outage is not None and p.outage[0] <= at < p.outage[1]:
            # Connection refused: a dead host answers at once.
            return "error", latency * 0.1
        error_rate = p.error_rate
        if p.degraded is not None and p.degraded[0] <= at < p.degraded[1]:
            error_rate = p.degraded_error_rate
        roll = rng.random()
        if roll < p.spike_rate:
            return "spike", rng.uniform(*p.spike)
        if roll < p.spike_rate + error_rate:
            return "error", latency * 0.5
        return "ok", latency

    def _error(self, call: Call) -> ConnectionError:
        return ConnectionError(
            f"{self.name}: connection reset (call {call.index}, attempt {call.attempts})"
        )

    async def acall(self, call: Call) -> object:
        """Answer like the real thing would, asynchronously."""
        call.attempts += 1
        kind, seconds = self.draw(call.index, call.attempts)
        await asyncio.sleep(seconds)
        if kind == "error":
            raise self._error(call)
        return kind

    def call(self, call: Call) -> object:
        """Answer like the real thing would, blocking the calling thread."""
        call.attempts += 1
        kind, seconds = self.draw(call.index, call.attempts)
        time.sleep(seconds)
        if kind == "error":
            raise self._error(call)
        return kind


# -- outcomes -------------------------------------------------------------------


class _FellBack:
    """What the demo's fallbacks return, so the caller can tell them from answers."""

    __slots__ = ("cause",)

    def __init__(self, cause: str) -> None:
        self.cause = cause


def _fallback(exc: Exception) -> _FellBack:
    return _FellBack(_cause(exc))


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutExceeded):
        return "deadline" if exc.kind == "deadline" else "timeout"
    if isinstance(exc, ReskitError) and exc.rejected_by is not None:
        return exc.rejected_by
    return type(exc).__name__


def _outcome(exc: BaseException) -> str:
    # The rule of the ``reskit.outcome`` span attribute: a local protection's
    # refusal is "rejected"; the dependency's own error, or its slowness (a
    # timeout or the deadline, the span's "timeout"), is a "failure".
    if isinstance(exc, reskit.Rejected):
        return "rejected"
    return "failure"


class Tally:
    """The outcomes and latencies of one scene; safe to update from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.causes: Counter[tuple[str, str]] = Counter()
        self.latencies: list[float] = []
        self.done = 0

    def add(self, outcome: str, cause: str | None, latency: float) -> None:
        """Count one finished call."""
        with self._lock:
            self.outcomes[outcome] += 1
            if cause is not None:
                self.causes[outcome, cause] += 1
            self.latencies.append(latency)
            self.done += 1

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """``(calls done, count by outcome)``, consistent with each other."""
        with self._lock:
            return self.done, {name: self.outcomes[name] for name in OUTCOMES}


class LogCollector:
    """A structlog processor that counts events and keeps one sample of each.

    It drops every event it sees, so nothing is printed while the live display
    owns the terminal.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        #: ``(event, policy or breaker name)`` -> count.
        self.by_owner: Counter[tuple[str, str]] = Counter()
        #: The first event of each ``(event, owner)``, in the order they came.
        self.samples: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        """Count ``event_dict`` and drop it."""
        event = str(event_dict.get("event"))
        owner = event_dict.get("policy") or event_dict.get("breaker")
        with self._lock:
            self.counts[event] += 1
            key = (event, "" if owner is None else str(owner))
            self.by_owner[key] += 1
            if key not in self.samples:
                self.samples[key] = dict(event_dict)
        raise structlog.DropEvent

    def retries(self, policy: str) -> int:
        """How many retries ``policy`` scheduled."""
        with self._lock:
            return self.by_owner[_RETRY_EVENT, policy]


@contextlib.contextmanager
def collecting_logs(collector: LogCollector) -> Iterator[None]:
    """Send structlog's events to ``collector`` for the duration of the block."""
    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            collector,
        ]
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


# -- scenes ---------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Scene:
    """One policy in front of one simulated dependency."""

    name: str
    driver: str
    policy_text: str
    dependency_text: str
    policy: Policy
    dependency: Dependency
    calls: int
    arrivals: list[float]
    status: Callable[[], str] | None = None
    #: Called with each call's index before it starts (an operator's flips).
    before_call: Callable[[int], None] | None = None
    #: What the policy calls, when not the dependency itself (async scenes).
    target: Callable[[Call], Awaitable[object]] | None = None
    #: A sentence for the report's details, after the causes.
    notes: Callable[[], str] | None = None
    tally: Tally = field(default_factory=Tally)


def _arrivals(
    seed: int,
    name: str,
    calls: int,
    surge: tuple[float, float] | None = None,
    factor: float = 1.0,
) -> list[float]:
    """Seconds after the start at which each call is offered (a Poisson process)."""
    rng = random.Random(f"{seed}/{name}/arrivals")
    at = 0.0
    out: list[float] = []
    for i in range(calls):
        rate = ARRIVAL_RATE
        if surge is not None and surge[0] <= i / calls < surge[1]:
            rate *= factor
        at += rng.expovariate(rate)
        out.append(at)
    return out


def _jitter(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}/{name}/jitter")


def _payments(seed: int, calls: int, concurrency: int) -> Scene:
    name = "payments"
    profile = Profile(median=0.02, ceiling=0.05, error_rate=0.06, spike_rate=0.08)
    policy = Policy(
        name,
        timeout=0.08,
        deadline=0.15,
        retry=Retry(
            attempts=4,
            on=(ConnectionError, TimeoutError),
            wait_initial=0.01,
            wait_max=0.04,
            budget=RetryBudget(0.2, min_per_second=1.0),
            random=_jitter(seed, name),
        ),
    )
    return Scene(
        name=name,
        driver="async",
        policy_text="timeout 80 ms, deadline 150 ms, retry x4 under a 20% budget",
        dependency_text="6% errors, 8% hangs",
        policy=policy,
        dependency=Dependency(name, profile, seed=seed, calls=calls),
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
    )


def _inventory(seed: int, calls: int, concurrency: int) -> Scene:
    name = "inventory"
    profile = Profile(
        median=0.03,
        ceiling=0.06,
        error_rate=0.08,
        spike_rate=0.04,
        degraded=(0.3, 0.5),
        degraded_error_rate=0.55,
    )
    policy = Policy(
        name,
        timeout=0.1,
        retry=Retry(
            attempts=3,
            on=(ConnectionError, TimeoutError),
            wait_initial=0.01,
            wait_max=0.05,
            budget=RetryBudget(0.2, min_per_second=1.0),
            random=_jitter(seed, name),
        ),
        fallback=_fallback,
    )
    return Scene(
        name=name,
        driver="async",
        policy_text="timeout 100 ms, retry x3 under a 20% budget, fallback to cached stock",
        dependency_text="8% errors, 4% hangs; 55% errors for calls 30-50%",
        policy=policy,
        dependency=Dependency(name, profile, seed=seed, calls=calls),
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
    )


def _ledger(seed: int, calls: int, concurrency: int) -> Scene:
    name = "ledger"
    profile = Profile(median=0.015, ceiling=0.04, error_rate=0.08, spike_rate=0.05)
    policy = Policy(
        name,
        timeout=0.08,
        retry=Retry(
            attempts=2,
            on=(ConnectionError, TimeoutError),
            wait_initial=0.01,
            wait_max=0.04,
            random=_jitter(seed, name),
        ),
        fallback=Fallback(_fallback),
    )
    return Scene(
        name=name,
        driver="threads",
        policy_text="sync: timeout 80 ms (in a worker thread), retry x2, fallback to a queue",
        dependency_text="8% errors, 5% hangs",
        policy=policy,
        dependency=Dependency(name, profile, seed=seed, calls=calls),
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
    )


def _recommendations(seed: int, calls: int, concurrency: int) -> Scene:
    name = "recommendations"
    profile = Profile(
        median=0.025, ceiling=0.06, error_rate=0.02, spike_rate=0.01, outage=(0.35, 0.6)
    )
    breaker = reskit.CircuitBreaker(fail_max=5, reset_timeout=0.4, name=name)
    policy = Policy(
        name,
        timeout=0.1,
        retry=Retry(
            attempts=2,
            on=(ConnectionError, TimeoutError),
            wait_initial=0.005,
            wait_max=0.02,
            random=_jitter(seed, name),
        ),
        breaker=breaker,
        fallback=_fallback,
    )

    def status() -> str:
        return f"breaker {getattr(breaker, 'state', '?')}"

    return Scene(
        name=name,
        driver="async",
        policy_text="breaker (5 failures, probe after 400 ms), timeout 100 ms, retry x2, fallback",
        dependency_text="2% errors, 1% hangs; down for calls 35-60%",
        policy=policy,
        dependency=Dependency(name, profile, seed=seed, calls=calls),
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
        status=status,
    )


def _search(seed: int, calls: int, concurrency: int) -> Scene:
    name = "search"
    slots = max(1, concurrency // 4)
    profile = Profile(median=0.025, ceiling=0.06, error_rate=0.01, spike_rate=0.0)
    bulkhead = reskit.Bulkhead(
        max_concurrent=slots, max_waiting=slots, wait_timeout=0.02, name=name
    )
    policy = Policy(name, timeout=0.1, bulkhead=bulkhead)

    def status() -> str:
        running = getattr(bulkhead, "in_flight", "?")
        waiting = getattr(bulkhead, "waiting", "?")
        return f"bulkhead {running}/{slots} running, {waiting} waiting"

    return Scene(
        name=name,
        driver="async",
        policy_text=f"bulkhead ({slots} running + {slots} waiting, 20 ms wait), timeout 100 ms",
        dependency_text="1% errors; 4x traffic for calls 40-60%",
        policy=policy,
        dependency=Dependency(name, profile, seed=seed, calls=calls),
        calls=calls,
        arrivals=_arrivals(seed, name, calls, surge=(0.4, 0.6), factor=4.0),
        status=status,
    )


class _Operator:
    """Flips a kill switch and the brownout level when traffic reaches given calls.

    Through reskit's public functions, as ``reskit kill`` and ``reskit brownout``
    would from another terminal: each flip is audited, and the report shows
    the audit log at the end.
    """

    def __init__(self, calls: int, flips: Sequence[tuple[float, Callable[[], object]]]) -> None:
        self._due = sorted(((int(at * calls), flip) for at, flip in flips), key=lambda due: due[0])
        self._lock = threading.Lock()

    def __call__(self, index: int) -> None:
        while True:
            with self._lock:
                if not self._due or self._due[0][0] > index:
                    return
                _, flip = self._due.pop(0)
            flip()


def _reviews(seed: int, calls: int, concurrency: int) -> Scene:
    name = "reviews"
    profile = Profile(median=0.015, ceiling=0.04, error_rate=0.01, spike_rate=0.0)
    switch = reskit.KillSwitch(
        name,
        owner="team-reviews",
        description="product pages render without reviews",
        fail_mode="open",
    )
    policy = Policy(name, timeout=0.1, kill_switch=switch, shed_at=2, fallback=_fallback)
    who = "demo operator"
    operator = _Operator(
        calls,
        [
            (0.2, lambda: reskit.set_brownout_level(2, reason="demo: dim the site", actor=who)),
            (0.4, lambda: reskit.set_brownout_level(0, reason="demo: load is down", actor=who)),
            (0.55, lambda: reskit.kill(name, reason="demo: reviews misbehave", actor=who)),
            (0.75, lambda: reskit.revive(name, reason="demo: reviews fixed", actor=who)),
        ],
    )

    def status() -> str:
        state = "killed" if reskit.is_killed(name) else "on"
        return f"switch {state}, brownout level {reskit.brownout_level()}"

    return Scene(
        name=name,
        driver="async",
        policy_text="kill switch 'reviews', shed at brownout level 2, timeout 100 ms, fallback",
        dependency_text=("1% errors; level 2 for calls 20-40%, switch killed for calls 55-75%"),
        policy=policy,
        dependency=Dependency(name, profile, seed=seed, calls=calls),
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
        status=status,
        before_call=operator,
    )


class _Checkout:
    """Charges behind an idempotency key, called by a client that retries on timeouts.

    The charge runs on its own task (``asyncio.shield``), as a server's handler
    runs on when its client gives up: a retry then finds the first charge in
    flight, waits for it (``wait=True``) and gets its result, instead of
    charging the card again.
    """

    def __init__(self, dependency: Dependency) -> None:
        self.dependency = dependency
        self.charges: Counter[int] = Counter()
        self.asked = 0
        self._charge = reskit.idempotent(
            key=lambda call: f"order-{call.index}",
            fingerprint=lambda call: call.index,
            wait=True,
        )(self._run)

    async def _run(self, call: Call) -> object:
        self.charges[call.index] += 1
        return await self.dependency.acall(call)

    async def __call__(self, call: Call) -> object:
        self.asked += 1
        return await asyncio.shield(self._charge(call))

    def notes(self) -> str:
        twice = sum(1 for n in self.charges.values() if n > 1)
        return (
            f"{self.asked} charge requests for {len(self.charges)} orders made "
            f"{sum(self.charges.values())} charges ({twice} orders charged twice)"
        )


def _checkout(seed: int, calls: int, concurrency: int) -> Scene:
    name = "checkout"
    profile = Profile(
        median=0.02, ceiling=0.04, error_rate=0.0, spike_rate=0.12, spike=(0.08, 0.15)
    )
    dependency = Dependency(name, profile, seed=seed, calls=calls)
    checkout = _Checkout(dependency)
    policy = Policy(
        name,
        timeout=0.06,
        deadline=0.4,
        retry=Retry(
            attempts=5,
            on=(TimeoutError,),
            wait_initial=0.005,
            wait_max=0.02,
            random=_jitter(seed, name),
        ),
    )
    return Scene(
        name=name,
        driver="async",
        policy_text=(
            "timeout 60 ms, deadline 400 ms, retry x5 on timeouts, around a charge behind "
            "@reskit.idempotent(wait=True)"
        ),
        dependency_text="12% of charges take 80-150 ms: the client times out and retries",
        policy=policy,
        dependency=dependency,
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
        target=checkout,
        notes=checkout.notes,
    )


class _Regions:
    """Two regions of one HTTP API behind an httpx transport: ``eu`` flaky, ``us`` healthy.

    Each request is answered by an in-process ``MockTransport`` (no sockets): the
    ``eu`` answers are drawn from the scene's :class:`Dependency` (an error is a
    ``503`` with ``Retry-After: 0``, a hang a slow answer); ``us`` always answers.
    The caller goes through :class:`reskit.httpx.AsyncTransport`: retries, failover
    to ``us``, outlier ejection and hedging. httpx (or httpx2) is imported only
    when the scene is asked for (``reskit demo --http``).
    """

    def __init__(self, name: str, dependency: Dependency, seed: int) -> None:
        import reskit.httpx as rhttpx

        try:
            import httpx2 as lib
        except ImportError:
            import httpx as lib  # type: ignore[no-redef]

        self.lib: Any = lib
        self.dependency = dependency
        self.served: Counter[str] = Counter()
        self._attempts: Counter[int] = Counter()
        self.transport = rhttpx.AsyncTransport(
            Policy(
                name,
                deadline=0.3,
                retry=Retry(
                    attempts=3,
                    on=OSError,
                    wait_initial=0.005,
                    wait_max=0.02,
                    random=_jitter(seed, name),
                ),
                breaker=reskit.CircuitBreaker(failure_rate=0.5, window=20, minimum_calls=10),
            ),
            lib.MockTransport(self._answer),
            failover=rhttpx.Failover(
                endpoints=["https://eu.api.demo", "https://us.api.demo"],
                consecutive_failures=5,
                ejection_time=0.5,
            ),
            hedging=rhttpx.Hedging(initial_delay=0.05, budget=RetryBudget(0.1)),
        )
        self.client = lib.AsyncClient(transport=self.transport, base_url="https://eu.api.demo")

    async def _answer(self, request: Any) -> Any:
        region = request.url.host.split(".")[0]
        self.served[region] += 1
        lib = self.lib
        if region != "eu":
            await asyncio.sleep(self.dependency.profile.median)
            return lib.Response(200, json={"region": region})
        index = int(request.headers["x-demo-call"])
        self._attempts[index] += 1
        kind, seconds = self.dependency.draw(index, self._attempts[index])
        await asyncio.sleep(seconds)
        if kind == "error":
            return lib.Response(503, headers={"Retry-After": "0"})
        return lib.Response(200, json={"region": region})

    async def __call__(self, call: Call) -> object:
        response = await self.client.get("/items", headers={"X-Demo-Call": str(call.index)})
        response.raise_for_status()
        return response.json()["region"]

    def notes(self) -> str:
        return (
            f"the eu region answered {self.served['eu']} requests and us "
            f"{self.served['us']}: retries and hedges fail over, a failing eu is ejected"
        )


def _outbound_http(seed: int, calls: int, concurrency: int) -> Scene:
    name = "outbound-http"
    profile = Profile(
        median=0.01,
        ceiling=0.03,
        error_rate=0.15,
        spike_rate=0.05,
        spike=(0.1, 0.2),
        outage=(0.6, 0.75),
    )
    dependency = Dependency(name, profile, seed=seed, calls=calls)
    regions = _Regions(name, dependency, seed)
    return Scene(
        name=name,
        driver="async",
        policy_text=(
            "httpx transport: deadline 300 ms, retry x3 honouring Retry-After, a breaker per "
            "region, failover eu -> us with outlier ejection, hedging at p90 (10% budget)"
        ),
        dependency_text="eu: 15% 503s, 5% slow answers, down for calls 60-75%; us healthy",
        policy=Policy(f"{name} caller"),
        dependency=dependency,
        calls=calls,
        arrivals=_arrivals(seed, name, calls),
        target=regions,
        notes=regions.notes,
    )


_SCENES: tuple[Callable[[int, int, int], Scene], ...] = (
    _payments,
    _inventory,
    _ledger,
    _recommendations,
    _search,
    _reviews,
    _checkout,
)


def build_scenes(calls: int, seed: int, concurrency: int, *, http: bool = False) -> list[Scene]:
    """The scenes of a run, sharing ``calls`` between them as evenly as possible.

    A scene that would get no call is left out. ``http`` adds the outbound HTTP
    scene (it needs httpx or httpx2).

    .. versionadded:: 0.1.0
    """
    builders = (*_SCENES, _outbound_http) if http else _SCENES
    share, extra = divmod(calls, len(builders))
    scenes: list[Scene] = []
    for i, builder in enumerate(builders):
        n = share + (1 if i < extra else 0)
        if n:
            scenes.append(builder(seed, n, concurrency))
    return scenes


# -- driving the calls ------------------------------------------------------------


def _settled(result: object) -> tuple[str, str | None]:
    if isinstance(result, _FellBack):
        return "fallback", result.cause
    return "success", None


async def _call_async(scene: Scene, index: int) -> None:
    if scene.before_call is not None:
        scene.before_call(index)
    call = Call(index)
    started = time.perf_counter()
    with reskit.bind_correlation_id(f"demo-{scene.name}-{index:05d}"):
        try:
            target = scene.target or scene.dependency.acall
            outcome, cause = _settled(await scene.policy.acall(target, call))
        except Exception as exc:
            outcome, cause = _outcome(exc), _cause(exc)
    scene.tally.add(outcome, cause, time.perf_counter() - started)


def _call_sync(scene: Scene, index: int) -> None:
    if scene.before_call is not None:
        scene.before_call(index)
    call = Call(index)
    started = time.perf_counter()
    with reskit.bind_correlation_id(f"demo-{scene.name}-{index:05d}"):
        try:
            outcome, cause = _settled(scene.policy.call(scene.dependency.call, call))
        except Exception as exc:
            outcome, cause = _outcome(exc), _cause(exc)
    scene.tally.add(outcome, cause, time.perf_counter() - started)


async def _drive_async(scene: Scene, concurrency: int, start: float) -> None:
    # Callers share one iterator: each takes the next call and waits for its
    # arrival time; when all are busy, later calls simply start late.
    pending = iter(range(scene.calls))

    async def caller() -> None:
        for index in pending:
            delay = start + scene.arrivals[index] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await _call_async(scene, index)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, scene.calls)):
            group.create_task(caller())


async def _drive_threads(scene: Scene, concurrency: int, start: float) -> None:
    lock = threading.Lock()
    pending = iter(range(scene.calls))
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            with lock:
                index = next(pending, None)
            if index is None:
                return
            delay = start + scene.arrivals[index] - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            _call_sync(scene, index)

    threads = min(concurrency, MAX_THREADS, scene.calls)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"demo-{scene.name}")
    try:
        await asyncio.gather(*(loop.run_in_executor(executor, caller) for _ in range(threads)))
    finally:
        # On Ctrl-C the callers stop after their current call instead of
        # running through the rest of the schedule. Waiting for that call
        # (bounded by its policy's timeouts) keeps its log events from reaching
        # the terminal after the structlog configuration has been restored.
        stop.set()
        executor.shutdown(wait=True)


# -- the live display -------------------------------------------------------------


class Display:
    """Progress on the terminal: redrawn in place on a TTY, plain lines otherwise."""

    TTY_INTERVAL = 0.1
    PLAIN_INTERVAL = 1.0

    def __init__(
        self,
        scenes: Sequence[Scene],
        collector: LogCollector,
        out: TextIO,
        *,
        tty: bool,
        started: float,
    ) -> None:
        self.scenes = scenes
        self.collector = collector
        self.out = out
        self.tty = tty
        self.started = started
        self.total = sum(scene.calls for scene in scenes)
        self._drawn = 0
        self._width = max(len(scene.name) for scene in scenes)
        self.interval = self.TTY_INTERVAL if tty else self.PLAIN_INTERVAL

    def _scene_line(self, scene: Scene) -> str:
        done, counts = scene.tally.snapshot()
        filled = round(10 * done / scene.calls)
        bar = "#" * filled + "." * (10 - filled)
        line = (
            f"  {scene.name:<{self._width}} [{bar}] {done:>{len(str(scene.calls))}}/{scene.calls}"
            f"  ok {counts['success']} fb {counts['fallback']}"
            f" rej {counts['rejected']} fail {counts['failure']}"
            f" retry {self.collector.retries(scene.name)}"
        )
        if scene.status is not None and done < scene.calls:
            line += f"  | {scene.status()}"
        return line

    def draw(self) -> None:
        """Show the current state of every scene."""
        elapsed = time.monotonic() - self.started
        if not self.tty:
            done = 0
            counts: Counter[str] = Counter()
            for scene in self.scenes:
                n, by_outcome = scene.tally.snapshot()
                done += n
                counts.update(by_outcome)
            retries = sum(self.collector.retries(scene.name) for scene in self.scenes)
            self.out.write(
                f"{elapsed:5.1f}s {done}/{self.total}: {counts['success']} ok, "
                f"{counts['fallback']} fallback, {counts['rejected']} rejected, "
                f"{counts['failure']} failed, {retries} retries\n"
            )
            self.out.flush()
            return
        width = shutil.get_terminal_size((80, 24)).columns - 1
        done = sum(scene.tally.snapshot()[0] for scene in self.scenes)
        lines = [f"  {elapsed:5.1f}s  {done}/{self.total} calls"]
        lines += [self._scene_line(scene) for scene in self.scenes]
        # A wrapped line would throw the cursor arithmetic off; cut instead.
        text = "".join(f"\x1b[2K{line[:width]}\n" for line in lines)
        # Later frames first move back up over the previous one; the first hides the cursor.
        text = (f"\x1b[{self._drawn}F" if self._drawn else "\x1b[?25l") + text
        self._drawn = len(lines)
        self.out.write(text)
        self.out.flush()

    async def run(self) -> None:
        """Redraw every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.draw()

    def close(self) -> None:
        """Draw the final state and give the cursor back."""
        if self.tty:
            self.draw()
            self.out.write("\x1b[?25h")
            self.out.flush()


# -- running and reporting ----------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class DemoResult:
    """What a run produced: its scenes (with their tallies), logs and duration."""

    scenes: list[Scene]
    collector: LogCollector
    seconds: float
    seed: int
    concurrency: int

    @property
    def calls(self) -> int:
        """Calls made, over all scenes."""
        return sum(scene.tally.done for scene in self.scenes)


async def _run_scenes(scenes: Sequence[Scene], concurrency: int, display: Display | None) -> None:
    start = time.monotonic()
    # The display runs in the outer group so that its failure (a closed pipe:
    # ``reskit demo | head``) stops the calls instead of letting them run on
    # with nobody watching.
    async with asyncio.TaskGroup() as outer:
        ticker = outer.create_task(display.run()) if display is not None else None
        async with asyncio.TaskGroup() as group:
            for scene in scenes:
                drive = _drive_threads if scene.driver == "threads" else _drive_async
                group.create_task(drive(scene, concurrency, start))
        if ticker is not None:
            ticker.cancel()


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run(
    scenes: Sequence[Scene],
    *,
    seed: int = DEFAULT_SEED,
    concurrency: int = DEFAULT_CONCURRENCY,
    out: TextIO | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run ``scenes`` (from :func:`build_scenes`) and return their tallies.

    Args:
        scenes: what to run; each is run once.
        seed: the seed the scenes were built with, for the report.
        concurrency: callers per scene (at most ``MAX_THREADS`` for a
            threaded scene).
        out: where progress goes (default ``sys.stdout``).
        progress: show live progress on ``out``.

    .. versionadded:: 0.1.0
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    stream = sys.stdout if out is None else out
    collector = LogCollector()
    started = time.monotonic()
    display = (
        Display(scenes, collector, stream, tty=_is_tty(stream), started=started)
        if progress and scenes
        else None
    )
    with collecting_logs(collector):
        try:
            asyncio.run(_run_scenes(scenes, concurrency, display))
        except BaseExceptionGroup as group:
            # Callers (the CLI's BrokenPipeError handling, a test) expect the
            # error itself, not the task groups it travelled through.
            raise _first_error(group) from None
        finally:
            if display is not None:
                display.close()
    return DemoResult(
        scenes=list(scenes),
        collector=collector,
        seconds=time.monotonic() - started,
        seed=seed,
        concurrency=concurrency,
    )


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


#: The report fits an 80-column terminal: outcomes in one table, latency in another.
REPORT_WIDTH = 79

_COLUMNS = (
    ("calls", 6),
    ("success", 9),
    ("fallback", 10),
    ("rejected", 10),
    ("failure", 9),
    ("retries", 9),
)
_LATENCY = (("p50 ms", 9), ("p95 ms", 9), ("p99 ms", 9), ("max ms", 9))


def _outcome_row(name: str, driver: str, width: int, counts: Sequence[int]) -> str:
    cells = "".join(f"{value:>{w}}" for value, (_, w) in zip(counts, _COLUMNS, strict=True))
    return f"{name:<{width}}  {driver:<7}{cells}"


def _latency_row(name: str, width: int, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    cells = "".join(
        f"{_percentile(ordered, p) * 1000:>{w}.1f}" if ordered else f"{'-':>{w}}"
        for p, (_, w) in zip((50, 95, 99, 100), _LATENCY, strict=True)
    )
    return f"{name:<{width}}{cells}"


def render_table(result: DemoResult) -> str:
    """The final tables: outcomes and retries per policy, then latency percentiles.

    .. versionadded:: 0.1.0
    """
    width = max([len("policy"), len("total")] + [len(s.name) for s in result.scenes])
    header = f"{'policy':<{width}}  {'driver':<7}" + "".join(
        f"{title:>{w}}" for title, w in _COLUMNS
    )
    lines = [header, "-" * len(header)]
    totals = [0] * len(_COLUMNS)
    everything: list[float] = []
    latency = [f"{'latency':<{width}}" + "".join(f"{t:>{w}}" for t, w in _LATENCY)]
    latency.append("-" * len(latency[0]))
    for scene in result.scenes:
        tally = scene.tally
        counts = [tally.done] + [tally.outcomes[name] for name in OUTCOMES]
        counts.append(result.collector.retries(scene.name))
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        everything += tally.latencies
        lines.append(_outcome_row(scene.name, scene.driver, width, counts))
        latency.append(_latency_row(scene.name, width, tally.latencies))
    lines.append("-" * len(header))
    lines.append(_outcome_row("total", "", width, totals))
    latency.append("-" * len(latency[0]))
    latency.append(_latency_row("all", width, everything))
    return "\n".join([*lines, "", *latency])


def _wrapped(text: str, indent: str = "  ", then: str = "      ") -> str:
    return textwrap.fill(
        text,
        width=REPORT_WIDTH,
        initial_indent=indent,
        subsequent_indent=then,
        break_on_hyphens=False,
    )


def render_details(result: DemoResult) -> str:
    """Why calls did not simply succeed, per policy and cause."""
    width = max(len(scene.name) for scene in result.scenes)
    lines: list[str] = []
    for scene in result.scenes:
        parts: list[str] = []
        for outcome in OUTCOMES[1:]:
            causes = sorted(
                ((n, cause) for (o, cause), n in scene.tally.causes.items() if o == outcome),
                reverse=True,
            )
            if causes:
                parts.append(f"{outcome}: " + ", ".join(f"{c} {n}" for n, c in causes))
        opened = result.collector.by_owner["reskit.breaker.opened", scene.name]
        if opened:
            parts.append(f"breaker opened {opened}x")
        if scene.notes is not None:
            parts.append(scene.notes())
        text = f"{scene.name:<{width}}  " + ("; ".join(parts) or "every call succeeded")
        lines.append(_wrapped(text, then="  " + " " * (width + 2)))
    return "\n".join(lines)


def render_logs(result: DemoResult, samples: int = 3) -> str:
    """reskit's log events: counts, and a sample of the most frequent ones."""
    collector = result.collector
    if not collector.counts:
        return "  (none)"
    lines = [f"  {n:>6}  {event}" for event, n in collector.counts.most_common()]
    # One sample of each kind of event first, then more of the frequent kinds
    # from other policies, so a run with only retries still shows a few.
    rank = {event: i for i, (event, _) in enumerate(collector.counts.most_common())}
    seen: Counter[str] = Counter()
    order: list[tuple[int, int, dict[str, Any]]] = []
    for (event, _), sample in collector.samples.items():
        order.append((seen[event], rank[event], sample))
        seen[event] += 1
    order.sort(key=lambda item: item[:2])
    renderer = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    lines.append("  samples:")
    for _, _, sample in order[:samples]:
        level = str(sample.get("level", "info"))
        lines.append(_wrapped(renderer(None, level, dict(sample)), "    ", "        "))
    return "\n".join(lines)


def render_audit(store: Store) -> str:
    """The audit entries the demo's operator wrote, and whether the chain verifies."""
    entries = store.audit()
    if not entries:
        return "  (none)"
    lines = [
        _wrapped(f"#{entry.seq} {entry.action:<8} {entry.target:<15} {entry.reason}")
        for entry in entries
    ]
    lines.append(f"  {store.verify_audit()}")
    return "\n".join(lines)


def run_demo(
    *,
    calls: int = DEFAULT_CALLS,
    seed: int = DEFAULT_SEED,
    concurrency: int = DEFAULT_CONCURRENCY,
    quiet: bool = False,
    out: TextIO | None = None,
    http: bool = False,
) -> int:
    """Run ``reskit demo`` and print its report; returns the exit status.

    With ``quiet`` only the final table is printed; ``http`` adds the outbound
    HTTP scene (``reskit.httpx`` in front of two simulated regions).

    .. versionadded:: 0.1.0
    """
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    stream = sys.stdout if out is None else out
    # The demo's flips stay in this process, whatever RESKIT_STORE says.
    from reskit.stores import MemoryStore

    store = MemoryStore()
    previous = reskit.configure(store)
    try:
        return _run_demo(calls, seed, concurrency, quiet, stream, store, http)
    finally:
        reskit.configure(previous)


def _run_demo(
    calls: int,
    seed: int,
    concurrency: int,
    quiet: bool,
    stream: TextIO,
    store: Store,
    http: bool = False,
) -> int:
    scenes = build_scenes(calls, seed, concurrency, http=http)
    if not quiet:
        intro = (
            f"reskit demo: {_count(calls, 'call')} to "
            f"{_count(len(scenes), 'simulated dependency', 'simulated dependencies')}, "
            f"{ARRIVAL_RATE:.0f} calls/s each, {concurrency} callers per dependency, "
            f"seed {seed}"
        )
        stream.write(_wrapped(intro, "", "  ") + "\n\n")
        for scene in scenes:
            stream.write(_wrapped(f"{scene.name} ({scene.driver}): {scene.policy_text}") + "\n")
            stream.write(_wrapped(f"dependency: {scene.dependency_text}", "      ") + "\n")
        stream.write("\n")
        stream.flush()
    result = run(scenes, seed=seed, concurrency=concurrency, out=stream, progress=not quiet)
    if not quiet:
        stream.write("\n")
    stream.write(render_table(result) + "\n")
    if not quiet:
        stream.write("\nwhy calls did not simply succeed:\n" + render_details(result) + "\n")
        stream.write(
            "\nreskit's log events (counted by a structlog processor, not printed):\n"
            + render_logs(result)
            + "\n"
        )
        stream.write("\nthe audit log of the demo's flips:\n" + render_audit(store) + "\n")
        outro = (
            f"{_count(result.calls, 'call')} in {result.seconds:.1f} s (seed {seed}; the same "
            "seed gives the same draws, timing-dependent counts vary a little)"
        )
        stream.write("\n" + _wrapped(outro, "", "") + "\n")
    stream.flush()
    return 0

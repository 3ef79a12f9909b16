"""The benchmark scenarios: what reskit is compared with, and the budget.

Each :class:`Scenario` is data: a name, whether it is sync or async, the budget
(the most ``reskit / competitor`` may be, before the gate's margin) and a
``build`` function returning the callables to time. ``build`` runs only when
the scenario is measured, so a scenario whose pieces are missing (a strategy
not written yet, a competitor not installed) raises :class:`Unavailable` and
is reported as skipped instead of breaking the import.

Every variant is a zero-argument callable (or ``async def``) around a trivial
function that returns 1, so what is timed is the overhead each library adds
to a call that succeeds at once: the common case in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import tenacity
from _harness import Variant

import reskit

__all__ = ["SCENARIOS", "Scenario", "Setup", "Unavailable"]


class Unavailable(Exception):
    """A scenario cannot run here; the message says what is missing."""


@dataclass(slots=True)
class Setup:
    """The built callables of a scenario.

    Args:
        reskit: the reskit variant.
        competitor: what reskit is measured against (the ratio's denominator).
        extras: further variants reported for context, not gated (``bare``,
            other libraries).
        context: entered around the measurement (for example to route
            reskit's telemetry to an SDK provider) and exited after it.
        verify: called inside ``context`` before timing; raises when a variant
            does not do what the scenario claims (no span recorded, ...).
    """

    reskit: Variant
    competitor: Variant
    extras: tuple[Variant, ...] = ()
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    verify: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    """One comparison the gate runs.

    Args:
        key: short name used on the command line and in the JSON.
        title: one line saying what is compared.
        issue: the tracker issue the scenario's budget comes from.
        kind: ``"sync"`` or ``"async"`` (async ones run in one event loop).
        budget: the most ``reskit / competitor`` may be (before the margin).
        competitor: the label of the competitor variant.
        build: returns the :class:`Setup`; raises :class:`Unavailable`.
    """

    key: str
    title: str
    issue: int
    kind: Literal["sync", "async"]
    budget: float
    competitor: str
    build: Callable[[], Setup] = field(repr=False)


# -- optional pieces -------------------------------------------------------------


def _breaker_cls() -> Any:
    cls = getattr(reskit, "CircuitBreaker", None)
    if cls is None:
        try:
            from reskit._breaker import CircuitBreaker as cls
        except ImportError as exc:
            raise Unavailable(f"reskit.CircuitBreaker is not available ({exc})") from None
    return cls


def _bulkhead_cls() -> Any:
    cls = getattr(reskit, "Bulkhead", None)
    if cls is None:
        try:
            from reskit._bulkhead import Bulkhead as cls
        except ImportError as exc:
            raise Unavailable(f"reskit.Bulkhead is not available ({exc})") from None
    return cls


def _module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise Unavailable(f"{name} is not installed (pip install -e '.[dev]')") from None


def _retry() -> reskit.Retry:
    return reskit.Retry(attempts=3, on=Exception)


def _tenacity_retry() -> Any:
    return tenacity.retry(stop=tenacity.stop_after_attempt(3))


# -- the functions being protected -------------------------------------------------


def _sync_fn() -> Callable[[], int]:
    def f() -> int:
        return 1

    return f


def _async_fn() -> Callable[[], Any]:
    async def f() -> int:
        return 1

    return f


# -- issue 2 -------------------------------------------------------------------------


def build_sync_retry() -> Setup:
    f = _sync_fn()
    extras = [Variant("bare", f)]
    try:
        stamina = _module("stamina")
        extras.append(Variant("stamina", stamina.retry(on=Exception, attempts=3)(f)))
    except Unavailable:
        pass
    try:
        backoff = _module("backoff")
        extras.append(
            Variant("backoff", backoff.on_exception(backoff.expo, Exception, max_tries=3)(f))
        )
    except Unavailable:
        pass
    return Setup(
        reskit=Variant("reskit", reskit.Policy("r", retry=_retry())(f)),
        competitor=Variant("tenacity", _tenacity_retry()(f)),
        extras=tuple(extras),
    )


def build_sync_deadline_retry() -> Setup:
    pybreaker = _module("pybreaker")
    f = _sync_fn()
    return Setup(
        reskit=Variant("reskit", reskit.Policy("d", deadline=5, retry=_retry())(f)),
        competitor=Variant("tenacity+pybreaker", _tenacity_retry()(pybreaker.CircuitBreaker()(f))),
        extras=(Variant("bare", f),),
    )


def build_otel() -> Setup:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        raise Unavailable("opentelemetry-sdk is not installed") from None

    class NullExporter(SpanExporter):
        """Counts spans and drops them: the same exporter serves both sides."""

        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans: Any) -> SpanExportResult:
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    exporter = NullExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("benchmarks")
    f = _sync_fn()
    start_span = tracer.start_as_current_span

    def bare_span() -> int:
        with start_span("x"):
            return f()

    protected = reskit.Policy("o", retry=_retry())(f)

    @contextlib.contextmanager
    def configured() -> Iterator[None]:
        # The context manager restores reskit's previous (no SDK) telemetry, so
        # the scenarios measured after this one still run without an SDK.
        with reskit.configure_telemetry(tracer_provider=provider):
            yield
        provider.shutdown()

    def verify() -> None:
        before = exporter.exported
        protected()
        bare_span()
        if exporter.exported - before != 2:
            raise RuntimeError(
                f"expected one span from reskit and one from the bare span, the exporter "
                f"got {exporter.exported - before}: reskit is not recording to the provider"
            )

    return Setup(
        reskit=Variant("reskit", protected),
        competitor=Variant("otel span", bare_span),
        extras=(Variant("bare", f),),
        context=configured,
        verify=verify,
    )


def build_async_timeout_retry() -> Setup:
    f = _async_fn()
    retried = _tenacity_retry()(f)
    timeout = asyncio.timeout

    async def tenacity_timeout() -> Any:
        async with timeout(1):
            return await retried()

    return Setup(
        reskit=Variant("reskit", reskit.Policy("a", timeout=1, retry=_retry())(f)),
        competitor=Variant("tenacity+asyncio.timeout", tenacity_timeout),
        extras=(Variant("bare", f),),
    )


# -- issue 3 -------------------------------------------------------------------------


def build_closed_breaker() -> Setup:
    breaker_cls = _breaker_cls()
    pybreaker = _module("pybreaker")
    f = _sync_fn()
    ours = reskit.Policy("b", breaker=breaker_cls(fail_max=5, reset_timeout=30))(f)
    theirs = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)(f)
    return Setup(
        reskit=Variant("reskit", ours),
        competitor=Variant("pybreaker", theirs),
        extras=(Variant("bare", f),),
    )


def build_open_breaker() -> Setup:
    breaker_cls = _breaker_cls()
    pybreaker = _module("pybreaker")
    f = _sync_fn()
    breaker = breaker_cls(fail_max=5, reset_timeout=30)
    ours = reskit.Policy("open", breaker=breaker)(f)
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    theirs = cb(f)
    breaker.open()
    cb.open()

    def reopen_ours() -> None:
        # Both breakers would half-open after 30 s; keep them open for every sample.
        if breaker.state != "open":
            breaker.open()

    return Setup(
        reskit=Variant("reskit", ours, catch=reskit.CircuitOpen, setup=reopen_ours),
        competitor=Variant("pybreaker", theirs, catch=pybreaker.CircuitBreakerError, setup=cb.open),
    )


def build_async_bulkhead() -> Setup:
    bulkhead_cls = _bulkhead_cls()
    f = _async_fn()
    sem = asyncio.Semaphore(10)

    async def semaphore() -> Any:
        async with sem:
            return await f()

    return Setup(
        reskit=Variant("reskit", reskit.Policy("bh", bulkhead=bulkhead_cls(max_concurrent=10))(f)),
        competitor=Variant("asyncio.Semaphore", semaphore),
        extras=(Variant("bare", f),),
    )


def build_full_sync() -> Setup:
    breaker_cls = _breaker_cls()
    bulkhead_cls = _bulkhead_cls()
    pybreaker = _module("pybreaker")
    f = _sync_fn()
    full = reskit.Policy(
        "full",
        deadline=5,
        retry=_retry(),
        breaker=breaker_cls(fail_max=5, reset_timeout=30),
        bulkhead=bulkhead_cls(max_concurrent=10),
        kill_switch="bench-full",
        shed_at=3,
        fallback=lambda exc: None,
    )
    return Setup(
        reskit=Variant("reskit", full(f)),
        competitor=Variant(
            "tenacity+pybreaker",
            _tenacity_retry()(pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)(f)),
        ),
        extras=(Variant("bare", f),),
    )


def build_full_async() -> Setup:
    breaker_cls = _breaker_cls()
    bulkhead_cls = _bulkhead_cls()
    aiobreaker = _module("aiobreaker")
    f = _async_fn()
    full = reskit.Policy(
        "afull",
        timeout=1,
        retry=_retry(),
        breaker=breaker_cls(fail_max=5, reset_timeout=30),
        bulkhead=bulkhead_cls(max_concurrent=10),
        kill_switch="bench-full",
        shed_at=3,
        fallback=lambda exc: None,
    )

    # The same strategies in reskit's order, as a user would stack them today:
    # fallback -> semaphore -> retry -> breaker -> per-attempt timeout -> call.
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
    sem = asyncio.Semaphore(10)
    timeout = asyncio.timeout

    async def attempt() -> Any:
        async with timeout(1):
            return await f()

    @_tenacity_retry()
    async def retried() -> Any:
        return await breaker.call_async(attempt)

    async def stack() -> Any:
        try:
            async with sem:
                return await retried()
        except Exception:
            return None

    return Setup(
        reskit=Variant("reskit", full(f)),
        competitor=Variant("tenacity+aiobreaker+timeout+sem", stack),
        extras=(Variant("bare", f),),
    )


# -- issue 6 -------------------------------------------------------------------------

#: Items a benchmarked stream yields: a short stream, where per-call overhead shows.
STREAM_ITEMS = 10


def _full_policy(name: str, **extra: Any) -> reskit.Policy:
    return reskit.Policy(
        name,
        deadline=5,
        retry=_retry(),
        breaker=_breaker_cls()(fail_max=5, reset_timeout=30),
        bulkhead=_bulkhead_cls()(max_concurrent=10),
        kill_switch="bench-full",
        shed_at=3,
        fallback=lambda exc: None,
        **extra,
    )


def build_sync_generator() -> Setup:
    def stream() -> Iterator[int]:
        yield from range(STREAM_ITEMS)

    protected = _full_policy("gen")(stream)

    def bare() -> int:
        for _ in stream():
            pass
        return 1

    def ours() -> int:
        for _ in protected():
            pass
        return 1

    return Setup(reskit=Variant("reskit", ours), competitor=Variant("bare generator", bare))


def build_async_generator() -> Setup:
    async def stream() -> Any:
        for i in range(STREAM_ITEMS):
            yield i

    protected = _full_policy("agen", timeout=1)(stream)

    async def bare() -> int:
        async for _ in stream():
            pass
        return 1

    async def ours() -> int:
        async for _ in protected():
            pass
        return 1

    return Setup(reskit=Variant("reskit", ours), competitor=Variant("bare async generator", bare))


# -- issue 8 -------------------------------------------------------------------------


def build_switch_check() -> Setup:
    """The check a policy with kill_switch= and shed_at= makes on every call.

    The engine inlines it (see ``_compose._gate``): one flag read per gate,
    and a call into the gate only while a flag is up. Measured here as that
    code, with the flags of real gates, against the cheapest way to keep the
    same state by hand: a dict of switches and a compare with the level.
    """
    from reskit._switches import KillSwitch, brownout_gate

    switch = KillSwitch("bench-check")
    shed = brownout_gate(3)
    f0, f1 = switch.flag, shed.flag
    g0, g1 = switch.admit, shed.admit
    killed = {"bench-check": False}
    level = {"": 0}

    def ours() -> int:
        if f0.up:
            g0("bench")
        if f1.up:
            g1("bench")
        return 1

    def by_hand() -> int:
        if killed["bench-check"] or level[""] >= 3:
            raise RuntimeError("off")
        return 1

    def nothing() -> int:
        return 1

    return Setup(
        reskit=Variant("reskit", ours),
        competitor=Variant("dict lookup + compare", by_hand),
        extras=(Variant("no check", nothing),),
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "sync-retry",
        "Policy(retry=Retry(3)) vs tenacity @retry(stop_after_attempt(3)), no OTel SDK",
        2,
        "sync",
        0.10,
        "tenacity",
        build_sync_retry,
    ),
    Scenario(
        "sync-deadline-retry",
        "Policy(deadline=5, retry) vs tenacity stacked on pybreaker",
        2,
        "sync",
        0.10,
        "tenacity+pybreaker",
        build_sync_deadline_retry,
    ),
    Scenario(
        "otel",
        "Policy(retry) with an SDK TracerProvider vs a bare start_as_current_span",
        2,
        "sync",
        1.3,
        "otel span",
        build_otel,
    ),
    Scenario(
        "async-timeout-retry",
        "async Policy(timeout=1, retry) vs tenacity @retry inside asyncio.timeout(1)",
        2,
        "async",
        0.25,
        "tenacity+asyncio.timeout",
        build_async_timeout_retry,
    ),
    Scenario(
        "breaker-closed",
        "Policy(breaker=CircuitBreaker(5, 30)) vs pybreaker.CircuitBreaker(5, 30), closed",
        3,
        "sync",
        0.25,
        "pybreaker",
        build_closed_breaker,
    ),
    Scenario(
        "breaker-open",
        "rejection by an open breaker (CircuitOpen) vs pybreaker's CircuitBreakerError",
        3,
        "sync",
        0.33,
        "pybreaker",
        build_open_breaker,
    ),
    Scenario(
        "async-bulkhead",
        "async Policy(bulkhead=Bulkhead(10)) vs async with asyncio.Semaphore(10)",
        3,
        "async",
        1.5,
        "asyncio.Semaphore",
        build_async_bulkhead,
    ),
    Scenario(
        "sync-full",
        "Policy(deadline, retry, breaker, bulkhead, fallback) vs tenacity on pybreaker",
        3,
        "sync",
        0.10,
        "tenacity+pybreaker",
        build_full_sync,
    ),
    Scenario(
        "async-full",
        "async Policy(timeout, retry, breaker, bulkhead, fallback) vs tenacity + aiobreaker "
        "+ asyncio.timeout + Semaphore",
        3,
        "async",
        0.25,
        "tenacity+aiobreaker+timeout+sem",
        build_full_async,
    ),
    Scenario(
        "switch-check",
        "a policy's inlined kill-switch and brownout check vs a dict lookup plus a compare",
        8,
        "sync",
        1.5,
        "dict lookup + compare",
        build_switch_check,
    ),
    Scenario(
        "sync-generator",
        f"a {STREAM_ITEMS}-item generator through Policy(deadline, retry, breaker, bulkhead, "
        "fallback) vs the same generator bare",
        6,
        "sync",
        10.0,
        "bare generator",
        build_sync_generator,
    ),
    Scenario(
        "async-generator",
        f"a {STREAM_ITEMS}-item async generator through Policy(timeout, deadline, retry, breaker, "
        "bulkhead, fallback) vs the same async generator bare",
        6,
        "async",
        15.0,
        "bare async generator",
        build_async_generator,
    ),
)

"""The engine: drivers composed from the order table, kinds checked, the gate seam.

The parity matrix (``test_parity.py``) checks each layer in each kind of call;
here: every combination of layers compiles and runs, what the composer refuses,
how a policy dispatches on the kind of what it is given, and the regressions
that one composition for all kinds fixed by construction.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import random
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import reskit
from reskit import (
    AdaptiveThrottle,
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    Policy,
    Retry,
    RetryBudget,
    RetryBudgetExhausted,
    Throttled,
)
from reskit._compose import Kind, kind_of, source_for
from reskit._gate import Gate, WaitingGate
from reskit._order import ORDER, Role, outer_gates
from reskit.testing import FakeClock, SpanCapture


class Scripted(random.Random):
    """A random source whose every draw is ``draw`` (1.0 never throttles, 0.0 always may)."""

    def __init__(self, draw: float) -> None:
        super().__init__(0)
        self.draw = draw

    def random(self) -> float:
        return self.draw


# -- the order table ---------------------------------------------------------------------


def test_the_order_table_is_the_documented_canonical_order() -> None:
    assert [row.keyword for row in ORDER] == [
        "fallback",
        "kill_switch",
        "shed_at",
        "bulkhead",
        "deadline",
        "retry",
        None,
        "breaker",
        "throttle",
        "timeout",
    ]
    assert [row.keyword for row in outer_gates()] == ["kill_switch", "shed_at", "bulkhead"]
    # Every keyword is a Policy keyword.
    parameters = inspect.signature(Policy).parameters
    assert all(row.keyword in parameters for row in ORDER if row.keyword is not None)
    assert all(row.role is Role.GATE for row in outer_gates())


def test_the_gates_implement_the_protocol() -> None:
    breaker = CircuitBreaker()
    bulkhead = Bulkhead(1)
    throttle = AdaptiveThrottle()
    for gate in (breaker, bulkhead, throttle):
        assert isinstance(gate, Gate)
        assert issubclass(gate.rejection, reskit.Rejected)
    assert isinstance(bulkhead, WaitingGate)
    assert bulkhead.waits
    assert not breaker.waits
    assert not throttle.waits
    assert breaker.timed is False
    assert CircuitBreaker(slow_call_duration=1.0).timed is True


# -- every combination compiles and runs --------------------------------------------------

LAYERS: dict[str, Any] = {
    "fallback": lambda: {"fallback": lambda exc: "fallback"},
    "bulkhead": lambda: {"bulkhead": Bulkhead(4)},
    "deadline": lambda: {"deadline": 10.0},
    "retry": lambda: {"retry": Retry(2, on=ConnectionError, wait=0)},
    "breaker": lambda: {"breaker": CircuitBreaker(fail_max=100)},
    "throttle": lambda: {"throttle": AdaptiveThrottle(random=Scripted(1.0))},
    "timeout": lambda: {"timeout": 5.0},
}
COMBINATIONS = [
    combo for n in range(len(LAYERS) + 1) for combo in itertools.combinations(LAYERS, n)
]


def build(combo: tuple[str, ...]) -> Policy:
    kwargs: dict[str, Any] = {}
    for layer in combo:
        kwargs.update(LAYERS[layer]())
    return Policy("combo", **kwargs)


def fails_once() -> Any:
    state = {"calls": 0}

    def body() -> str:
        state["calls"] += 1
        if state["calls"] == 1:
            raise ConnectionError("once")
        return "ok"

    return body


async def run(kind: Kind, policy: Policy, body: Any) -> Any:
    if kind is Kind.FUNCTION:
        return policy(lambda: body())()

    if kind is Kind.COROUTINE:

        async def coroutine() -> Any:
            return body()

        return await policy(coroutine)()

    if kind is Kind.GENERATOR:

        def generator() -> Iterator[Any]:
            yield body()
            yield "more"

        return list(policy(generator)())

    async def async_generator() -> AsyncIterator[Any]:
        yield body()
        yield "more"

    return [item async for item in policy(async_generator)()]


@pytest.mark.parametrize("kind", list(Kind))
async def test_every_combination_of_layers_compiles_and_runs(kind: Kind, clock: FakeClock) -> None:
    for combo in COMBINATIONS:
        policy = build(combo)
        if kind is Kind.GENERATOR and "timeout" in combo:
            with pytest.raises(TypeError):
                source_for(policy, kind)
            continue
        compile(source_for(policy, kind), "<check>", "exec")
        stream = kind in (Kind.GENERATOR, Kind.ASYNC_GENERATOR)
        if "retry" in combo:
            result = await run(kind, policy, fails_once())
            assert result == (["ok", "more"] if stream else "ok"), combo
        elif "fallback" in combo:
            result = await run(kind, policy, fails_once())
            # A stream's fallback value is iterated: the string's characters.
            assert result == (list("fallback") if stream else "fallback"), combo
        else:
            with pytest.raises(ConnectionError):
                await run(kind, policy, fails_once())
        assert policy.statistics.calls == 1, combo


def test_a_driver_holds_only_the_layers_configured() -> None:
    source = source_for(Policy("r", retry=Retry(3, on=ValueError)))
    for absent in ("g0_admit", "DEADLINE", "TIMEOUT", "FB(", "_run_in_worker"):
        assert absent not in source
    assert "_RetryCall" in source


def test_tracebacks_show_the_drivers_lines() -> None:
    @Policy("shown", retry=Retry(1, on=ValueError))
    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError) as raised:
        boom()
    text = "".join(traceback.format_exception(raised.value))
    assert "<reskit driver" in text
    assert "result = fn(*args, **kwargs)" in text


def test_identical_shapes_share_compiled_code() -> None:
    from reskit import _compose

    Policy("a", retry=Retry(3, on=ValueError))(lambda: 1)()
    before = len(_compose._codes)
    for name in "bcdef":
        Policy(name, retry=Retry(5, on=KeyError, wait=1))(lambda: 1)()
    assert len(_compose._codes) == before


# -- kinds -----------------------------------------------------------------------------------


def plain(x: int) -> int:
    return x


async def coroutine(x: int) -> int:
    return x


def generator(n: int) -> Iterator[int]:
    yield from range(n)


async def async_generator(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


class AsyncCallable:
    async def __call__(self, x: int) -> int:
        return x


class Methods:
    def method(self, x: int) -> int:
        return x

    async def amethod(self, x: int) -> int:
        return x


@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (plain, Kind.FUNCTION),
        (coroutine, Kind.COROUTINE),
        (generator, Kind.GENERATOR),
        (async_generator, Kind.ASYNC_GENERATOR),
        (functools.partial(coroutine, 1), Kind.COROUTINE),
        (functools.partial(generator, 1), Kind.GENERATOR),
        (AsyncCallable(), Kind.COROUTINE),
        (Methods().method, Kind.FUNCTION),
        (Methods().amethod, Kind.COROUTINE),
        (len, Kind.FUNCTION),
        (lambda: None, Kind.FUNCTION),
    ],
)
def test_kind_of(fn: Any, kind: Kind) -> None:
    assert kind_of(fn) is kind


def test_call_with_a_coroutine_function_names_acall() -> None:
    with pytest.raises(TypeError, match=r"coroutine function.*policy\.acall"):
        Policy("k").call(coroutine, 1)


async def test_acall_with_a_sync_function_names_call() -> None:
    with pytest.raises(TypeError, match=r"not a coroutine function.*policy\.call"):
        await Policy("k").acall(plain, 1)  # type: ignore[arg-type]


async def test_acall_with_an_async_generator_says_to_iterate_call() -> None:
    with pytest.raises(TypeError, match="async for"):
        await Policy("k").acall(async_generator, 1)  # type: ignore[arg-type]


def test_call_with_a_generator_function_returns_a_protected_generator(clock: FakeClock) -> None:
    attempts = []

    def flaky(n: int) -> Iterator[int]:
        attempts.append(n)
        if len(attempts) == 1:
            raise ConnectionError
        yield from range(n)

    policy = Policy("k", retry=Retry(2, on=ConnectionError, wait=0))
    stream = policy.call(flaky, 3)
    assert inspect.isgenerator(stream)
    assert list(stream) == [0, 1, 2]
    assert attempts == [3, 3]


async def test_call_with_an_async_generator_function_returns_a_protected_one() -> None:
    stream = Policy("k", deadline=5).call(async_generator, 2)
    assert inspect.isasyncgen(stream)
    assert [item async for item in stream] == [0, 1]


def test_before_call_listeners_get_the_function_and_arguments_through_a_policy() -> None:
    seen: list[tuple[Any, ...]] = []

    class Listener:
        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            seen.append((func, args, kwargs))

    policy = Policy("k", breaker=CircuitBreaker(listeners=[Listener()]))
    policy(plain)(1)
    policy.call(plain, x=2)
    assert seen == [(plain, (1,), {}), (plain, (), {"x": 2})]


async def test_before_call_listeners_get_the_arguments_of_coroutines_and_streams() -> None:
    seen: list[tuple[Any, ...]] = []

    class Listener:
        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            seen.append((func, args))

    policy = Policy("k", breaker=CircuitBreaker(listeners=[Listener()]))
    await policy.acall(coroutine, 1)
    assert list(policy.call(generator, 2)) == [0, 1]
    assert [item async for item in policy.call(async_generator, 3)] == [0, 1, 2]
    assert seen == [(coroutine, (1,)), (generator, (2,)), (async_generator, (3,))]


def test_async_strategies_on_a_sync_function_are_refused_at_decoration() -> None:
    async def never(result: Any) -> bool:
        return False

    policy = Policy("k", retry=Retry(on_result=never))
    with pytest.raises(TypeError, match="async strategies"):
        policy(plain)
    with pytest.raises(TypeError, match="async strategies"):
        policy.call(plain, 1)
    with pytest.raises(TypeError, match="async strategies"):
        policy(generator)


def test_result_conditions_on_streams_are_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="yields a stream"):
        Policy("k", retry=Retry(on_result=lambda r: False))(generator)
    with pytest.raises(TypeError, match="yields a stream"):
        Policy("k", breaker=CircuitBreaker(on_result=lambda r: False))(async_generator)


# -- the drift bugs of the hand-written drivers, fixed by construction --------------------------


def throttle_rejecting_everything() -> AdaptiveThrottle:
    source = Scripted(1.0)
    throttle = AdaptiveThrottle(random=source)
    for _ in range(50):
        throttle.record(throttle.admit("warm-up"), ConnectionError(), 0.0)
    source.draw = 0.0  # from now on every draw rejects
    return throttle


def test_a_throttle_applies_to_generators_as_to_functions() -> None:
    policy = Policy("streams", throttle=throttle_rejecting_everything())
    with pytest.raises(Throttled):
        list(policy(generator)(3))
    with pytest.raises(Throttled):
        policy(plain)(1)


async def test_a_throttle_applies_to_async_generators() -> None:
    policy = Policy("streams", throttle=throttle_rejecting_everything())
    with pytest.raises(Throttled):
        [item async for item in policy(async_generator)(3)]


def test_a_generators_fallback_sees_bulkhead_full_and_an_exhausted_budget(
    clock: FakeClock,
) -> None:
    seen: list[type[BaseException]] = []

    def fallback(exc: Exception) -> list[str]:
        seen.append(type(exc))
        return ["fallback"]

    bulkhead = Bulkhead(1)
    full = Policy("full", bulkhead=bulkhead, fallback=fallback)
    held = bulkhead.admit("other")
    assert list(full(generator)(2)) == ["fallback"]
    bulkhead.record(held, None, 0.0)

    def failing() -> Iterator[int]:
        raise ConnectionError
        yield 0

    broke = Policy(
        "broke",
        retry=Retry(3, on=ConnectionError, wait=0, budget=RetryBudget(0, min_per_second=0)),
        fallback=fallback,
    )
    assert list(broke(failing)()) == ["fallback"]
    assert seen == [BulkheadFull, RetryBudgetExhausted]


async def test_remaining_deadline_inside_an_async_generator_step_bounded_by_timeout(
    clock: FakeClock,
) -> None:
    @Policy("steps", timeout=2.0)
    async def stream() -> AsyncIterator[float | None]:
        yield reskit.remaining_deadline()
        clock.advance(0.5)
        yield reskit.remaining_deadline()

    assert [item async for item in stream()] == [2.0, 1.5]


# -- permits of a stream are never stranded ---------------------------------------------------


async def test_a_probe_taken_by_a_stream_is_freed_when_an_outer_layer_raises_after_it(
    clock: FakeClock,
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10)
    breaker.open()
    clock.advance(10)  # half-open: one probe slot

    @Policy("probe", deadline=1.0, breaker=breaker)
    async def stream() -> AsyncIterator[int]:
        # The first step succeeds, so the breaker's probe is held for the stream;
        # then the deadline layer, settling its own expiry, meets an outer
        # cancellation that arrived meanwhile and raises it.
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        clock.advance(2.0)
        yield 1

    async def consume() -> list[int]:
        return [item async for item in stream()]

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(consume())
    # The probe slot was given back: a new probe is admitted.
    permit = breaker.admit("next")
    breaker.record(permit, None, 0.0)
    assert breaker.state == "closed"


# -- found in review ----------------------------------------------------------------------------


class FaultyLimit(reskit.AdaptiveLimit):
    """A custom adaptive limit with a bug: every sample raises."""

    def __init__(self) -> None:
        super().__init__(initial=5, min_limit=1, max_limit=5)

    def _update(self, duration: float, in_flight: int, dropped: bool) -> float:
        raise ZeroDivisionError("bug in a custom limit")


def test_a_stream_permit_is_recorded_once_when_recording_raises() -> None:
    bulkhead = Bulkhead(1, limit=FaultyLimit())

    @Policy("faulty", bulkhead=bulkhead)
    def failing() -> Iterator[int]:
        raise TimeoutError  # a drop: the adaptive limit is fed, and raises
        yield 0

    with pytest.raises(ZeroDivisionError):
        list(failing())
    assert bulkhead.in_flight == 0
    with pytest.raises(ZeroDivisionError):
        list(failing())  # one slot, handed back exactly once each time
    assert bulkhead.in_flight == 0


def test_every_stream_permit_is_recorded_and_the_span_ends_when_one_record_raises() -> None:
    breaker = CircuitBreaker(fail_max=1)
    policy = Policy("faulty", bulkhead=Bulkhead(5, limit=FaultyLimit()), breaker=breaker)
    breaker.half_open()
    with SpanCapture() as capture, pytest.raises(ZeroDivisionError):
        list(policy(generator)(2))
    # The breaker (recorded before the bulkhead) got its probe back: it closed.
    assert breaker.state == "closed"
    assert len(capture.spans()) == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_stream_cut_by_its_deadline_closes_the_generator_it_protects(
    kind: str, clock: FakeClock
) -> None:
    bulkhead = Bulkhead(1)
    open_streams: list[int] = []
    policy = Policy("db", deadline=1.0, bulkhead=bulkhead)

    def rows() -> Iterator[int]:
        open_streams.append(1)
        try:
            yield 1
            yield 2
        finally:
            open_streams.pop()

    async def arows() -> AsyncIterator[int]:
        open_streams.append(1)
        try:
            yield 1
            yield 2
        finally:
            open_streams.pop()

    if kind == "sync":
        stream: Any = policy(rows)()
        next(stream)
        clock.advance(2.0)  # a slow consumer: the deadline passes between items
        with pytest.raises(reskit.TimeoutExceeded):
            next(stream)
    else:
        stream = policy(arows)()
        await anext(stream)
        clock.advance(2.0)
        with pytest.raises(reskit.TimeoutExceeded):
            await anext(stream)
    assert open_streams == []
    assert bulkhead.in_flight == 0


class Client:
    async def __call__(self, x: int) -> int:
        return x


class RetryingClient(Client):
    pass


class Rows:
    def __call__(self, n: int) -> Iterator[int]:
        yield from range(n)


def test_kind_of_callable_objects_follows_their_inherited_call() -> None:
    assert kind_of(RetryingClient()) is Kind.COROUTINE
    assert kind_of(Rows()) is Kind.GENERATOR
    with pytest.raises(TypeError, match="acall"):
        Policy("k").call(RetryingClient(), 1)


async def test_acall_accepts_a_callable_object_with_an_inherited_async_call() -> None:
    assert await Policy("k").acall(RetryingClient(), 21) == 21


def test_a_callable_object_returning_a_generator_gets_a_protected_one() -> None:
    fallback = Policy("k", fallback=lambda exc: ["fallback"])

    class Broken:
        def __call__(self) -> Iterator[int]:
            raise ConnectionError
            yield 0

    assert list(fallback.call(Broken())) == ["fallback"]


@pytest.mark.parametrize("kind", list(Kind))
async def test_a_fallback_that_raises_is_counted_once(kind: Kind, clock: FakeClock) -> None:
    def fallback(exc: Exception) -> Any:
        raise KeyError("fallback bug")

    policy = Policy("fb", fallback=fallback)
    with pytest.raises(KeyError):
        await run(kind, policy, lambda: (_ for _ in ()).throw(ConnectionError()))
    stats = policy.statistics
    assert (stats.calls, stats.failures, stats.fallbacks) == (1, 1, 0)


async def test_closing_an_async_stream_closes_its_fallbacks_replacement() -> None:
    closed: list[str] = []

    async def replacement() -> AsyncIterator[str]:
        try:
            yield "a"
            yield "b"
        finally:
            closed.append("async")

    def sync_replacement() -> Iterator[str]:
        try:
            yield "a"
            yield "b"
        finally:
            closed.append("sync")

    async def failing() -> AsyncIterator[int]:
        raise ConnectionError
        yield 0

    for fallback in (lambda exc: replacement(), lambda exc: sync_replacement()):
        stream = Policy("fb", fallback=fallback)(failing)()
        assert await anext(stream) == "a"
        await stream.aclose()
    assert closed == ["async", "sync"]

"""The Policy engine: shared use, canonical order, construction, public surface."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import reskit
from reskit import Policy, Retry, TimeoutExceeded
from reskit.testing import FakeClock


def test_public_names_are_exported_and_sorted() -> None:
    assert reskit.__all__ == sorted(reskit.__all__)
    public = {name for name in dir(reskit) if not name.startswith("_")}
    submodules = {"testing", "cli", "stores", "openfeature", "asgi", "wsgi", "httpx"}
    assert public - submodules - {"annotations"} == set(reskit.__all__)
    # Every name is loaded on first use from the module the lazy table names.
    assert set(reskit._HOME) == set(reskit.__all__)
    for name in reskit.__all__:
        assert getattr(reskit, name).__doc__, f"{name} has no docstring"


def test_version() -> None:
    assert isinstance(reskit.__version__, str)
    with pytest.raises(AttributeError):
        reskit.does_not_exist  # noqa: B018


def test_200_threads_share_one_policy_with_independent_state() -> None:
    """Each thread fails a different number of times; attempt counts must not mix."""
    policy = Policy("shared", deadline=60.0, retry=Retry(attempts=4, on=ValueError, wait=0))
    barrier = threading.Barrier(200)
    results: dict[int, tuple[int, int]] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        failures = i % 4  # 0..3 failures: always within 4 attempts
        calls = 0

        def fn() -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                barrier.wait(30)
            if calls <= failures:
                raise ValueError(i)
            return i

        value = policy.call(fn)
        with lock:
            results[i] = (value, calls)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 200
    assert all(results[i] == (i, i % 4 + 1) for i in range(200))


async def test_500_tasks_share_one_policy_with_independent_state(clock: FakeClock) -> None:
    policy = Policy("shared", timeout=5.0, retry=Retry(attempts=4, on=ValueError, wait=0.01))
    calls = [0] * 500

    async def fn(i: int) -> int:
        calls[i] += 1
        await asyncio.sleep(0)  # interleave every task at every attempt
        if calls[i] <= i % 4:
            raise ValueError(i)
        return i

    results = await asyncio.gather(*(policy.acall(fn, i) for i in range(500)))
    assert results == list(range(500))
    assert calls == [i % 4 + 1 for i in range(500)]


def test_exhausted_retries_in_threads_are_counted_per_call() -> None:
    policy = Policy("shared", retry=Retry(attempts=3, on=ValueError, wait=0))
    counts: list[int] = []
    notes: list[list[str]] = []
    lock = threading.Lock()

    def worker() -> None:
        calls = 0

        def fn() -> None:
            nonlocal calls
            calls += 1
            raise ValueError("always")

        try:
            policy.call(fn)
        except ValueError as exc:
            with lock:
                notes.append(exc.__notes__)
        with lock:
            counts.append(calls)

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counts == [3] * 100
    assert notes == [["reskit: policy 'shared' gave up after 3 attempt(s)"]] * 100


def test_call_passes_arguments() -> None:
    def fn(a: int, b: int, *, c: int) -> tuple[int, int, int]:
        return a, b, c

    assert Policy("p").call(fn, 1, 2, c=3) == (1, 2, 3)


async def test_acall_passes_arguments() -> None:
    async def fn(a: int, *, b: str) -> str:
        return f"{a}{b}"

    assert await Policy("p").acall(fn, 1, b="x") == "1x"


def test_sync_policy_decorates_async_function_as_async() -> None:
    import inspect

    @Policy("p", retry=Retry(on=ValueError))
    async def fn() -> int:
        return 1

    assert inspect.iscoroutinefunction(fn)
    assert asyncio.run(fn()) == 1


def test_fallback_sits_outside_everything(clock: FakeClock) -> None:
    seen: list[BaseException] = []

    def fallback(exc: Exception) -> str:
        seen.append(exc)
        return "fallback"

    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    policy = Policy("o", retry=Retry(attempts=3, on=ConnectionError), fallback=fallback)
    assert policy.call(down) == "fallback"
    assert calls == 3
    assert isinstance(seen[0], ConnectionError)


def test_timeout_inside_retry_each_attempt_gets_a_fresh_timeout(clock: FakeClock) -> None:
    starts: list[float | None] = []

    def fn() -> None:
        starts.append(reskit.remaining_deadline())
        clock.advance(0.4)
        raise ConnectionError

    policy = Policy("o", timeout=1.0, retry=Retry(attempts=3, on=ConnectionError, wait=0))
    with pytest.raises(ConnectionError):
        policy.call(fn)
    assert starts == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"retry": 3}, TypeError, "reskit.Retry"),
        ({"breaker": object()}, TypeError, "CircuitBreaker"),
        ({"bulkhead": object()}, TypeError, "Bulkhead"),
        ({"fallback": 42}, TypeError, "callable"),
    ],
)
def test_invalid_strategies(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Policy("p", **kwargs)


@pytest.mark.parametrize("name", ["", 42])
def test_invalid_name(name: Any) -> None:
    with pytest.raises(TypeError, match="name"):
        Policy(name)


def test_repr() -> None:
    policy = Policy("p", timeout=1.0, retry=Retry(attempts=2, on=ValueError))
    # The strategies are listed in the canonical order, outermost first.
    assert repr(policy) == (
        "Policy('p', retry=Retry(attempts=2, on=<class 'ValueError'>), timeout=1.0)"
    )


def test_policy_stores_no_per_call_state() -> None:
    policy = Policy("p", retry=Retry(on=ValueError, wait=0))
    before = {slot: getattr(policy, slot) for slot in Policy.__slots__ if hasattr(policy, slot)}
    for _ in range(3):
        policy.call(lambda: 1)
    after = {slot: getattr(policy, slot) for slot in Policy.__slots__ if hasattr(policy, slot)}
    assert before == after


def test_timeout_exceeded_pickles() -> None:
    import pickle

    exc = TimeoutExceeded("late", policy="p", timeout=1.0, kind="deadline")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.policy, back.timeout, back.kind, str(back)) == ("p", 1.0, "deadline", "late")
    other = reskit.CircuitOpen("open", policy="b", retry_after=3.0)
    back2 = pickle.loads(pickle.dumps(other))
    assert (type(back2), back2.policy, back2.retry_after) == (reskit.CircuitOpen, "b", 3.0)

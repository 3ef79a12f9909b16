"""Single-strategy decorators: one-strategy Policies that stack, outer wrapping inner."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import reskit
from reskit.testing import FakeClock, SpanCapture


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


# -- the decorators return Policies ------------------------------------------------------


def test_timeout_returns_a_policy_with_only_a_timeout() -> None:
    policy = reskit.timeout(2.0)
    assert isinstance(policy, reskit.Policy)
    assert policy.timeout == 2.0
    assert policy.name is None
    assert (policy.deadline, policy.retry, policy.breaker, policy.bulkhead) == (None,) * 4
    assert policy.fallback is None
    assert reskit.timeout(timedelta(milliseconds=250)).timeout == 0.25
    assert reskit.timeout(1, name="db").name == "db"


def test_retry_returns_a_policy_with_only_a_retry() -> None:
    policy = reskit.retry(attempts=4, on=ConnectionError, deadline=10.0)
    assert isinstance(policy, reskit.Policy)
    assert isinstance(policy.retry, reskit.Retry)
    assert policy.retry.attempts == 4
    assert policy.retry.on is ConnectionError
    assert policy.deadline == 10.0
    assert (policy.timeout, policy.breaker, policy.bulkhead, policy.fallback) == (None,) * 4


def test_fallback_returns_a_policy_with_only_a_fallback() -> None:
    def spare(exc: Exception) -> str:
        return "spare"

    policy = reskit.fallback(spare, on=KeyError)
    assert isinstance(policy, reskit.Policy)
    assert isinstance(policy.fallback, reskit.Fallback)
    assert policy.fallback.fn is spare
    assert policy.fallback.on is KeyError
    assert (policy.timeout, policy.deadline, policy.retry) == (None, None, None)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: reskit.timeout(0), ValueError),
        (lambda: reskit.timeout(-1), ValueError),
        (lambda: reskit.timeout(float("nan")), ValueError),
        (lambda: reskit.timeout("1"), TypeError),
        (lambda: reskit.retry(attempts=0, on=KeyError), ValueError),
        (lambda: reskit.retry(attempts=3), TypeError),  # on= is required
        (lambda: reskit.fallback(42), TypeError),
        (lambda: reskit.Policy(""), TypeError),
    ],
)
def test_invalid_arguments_raise_at_construction(
    make: Callable[[], Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make()


# -- metadata and kind -------------------------------------------------------------------------


def sync_fn(a: int, b: str = "x", *args: int, key: bool = False, **kwargs: Any) -> str:
    """Sync docstring."""
    return f"{a}{b}{args}{key}{sorted(kwargs)}"


async def async_fn(a: int, b: str = "x", *args: int, key: bool = False, **kwargs: Any) -> str:
    """Async docstring."""
    return f"{a}{b}{args}{key}{sorted(kwargs)}"


DECORATORS: list[Any] = [
    pytest.param(lambda: reskit.timeout(5.0), id="timeout"),
    pytest.param(lambda: reskit.retry(attempts=2, on=ConnectionError), id="retry"),
    pytest.param(lambda: reskit.fallback(lambda exc: None), id="fallback"),
    pytest.param(lambda: reskit.Policy("named", timeout=5.0), id="Policy"),
]


@pytest.mark.parametrize("make", DECORATORS)
@pytest.mark.parametrize("fn", [sync_fn, async_fn], ids=["sync", "async"])
def test_decorated_functions_keep_their_metadata(make: Callable[[], Any], fn: Any) -> None:
    decorated = make()(fn)
    assert decorated is not fn
    assert decorated.__name__ == fn.__name__
    assert decorated.__qualname__ == fn.__qualname__
    assert decorated.__doc__ == fn.__doc__
    assert decorated.__module__ == fn.__module__
    assert decorated.__annotations__ == fn.__annotations__
    assert decorated.__wrapped__ is fn
    assert inspect.signature(decorated) == inspect.signature(fn)
    assert inspect.iscoroutinefunction(decorated) is inspect.iscoroutinefunction(fn)


@pytest.mark.parametrize("make", DECORATORS)
def test_decorated_functions_pass_arguments_through(make: Callable[[], Any]) -> None:
    policy = make()
    expected = sync_fn(1, "y", 2, 3, key=True, z=1, w=2)
    assert policy(sync_fn)(1, "y", 2, 3, key=True, z=1, w=2) == expected
    assert asyncio.run(policy(async_fn)(1, "y", 2, 3, key=True, z=1, w=2)) == expected


def test_stacked_decorators_keep_metadata_and_kind() -> None:
    async def fetch(url: str, *, retries: int = 0) -> str:
        """Fetch a URL."""
        return url

    inner = reskit.timeout(1.0)(fetch)
    middle = reskit.retry(attempts=2, on=ConnectionError)(inner)
    outer = reskit.fallback(lambda exc: "spare")(middle)

    assert outer.__name__ == "fetch"
    assert outer.__doc__ == "Fetch a URL."
    assert inspect.iscoroutinefunction(outer)
    assert str(inspect.signature(outer)) == "(url: 'str', *, retries: 'int' = 0) -> 'str'"
    assert outer.__wrapped__ is middle
    assert middle.__wrapped__ is inner
    assert inner.__wrapped__ is fetch
    assert inspect.unwrap(outer) is fetch
    assert asyncio.run(outer("https://example.test")) == "https://example.test"


def test_decorating_a_method() -> None:
    class Client:
        def __init__(self) -> None:
            self.calls = 0

        @reskit.retry(attempts=3, on=ConnectionError, wait=0)
        def get(self, key: str) -> str:
            self.calls += 1
            if self.calls < 2:
                raise ConnectionError
            return key.upper()

    client = Client()
    assert client.get("k") == "K"
    assert client.calls == 2
    assert Client.get.__qualname__.endswith("Client.get")


# -- stacking order ----------------------------------------------------------------------


def test_fallback_outside_retry_sees_the_final_exception_after_all_attempts(
    clock: FakeClock,
) -> None:
    events: list[str] = []

    def spare(exc: Exception) -> str:
        events.append(f"fallback {exc} after {len(events)} attempts")
        events.append("; ".join(getattr(exc, "__notes__", [])))
        return "spare"

    @reskit.fallback(spare)
    @reskit.retry(attempts=3, on=ConnectionError, wait=0.5, name="inner")
    def call() -> str:
        events.append("attempt")
        raise ConnectionError(f"refused {len(events)}")

    assert call() == "spare"
    assert events == [
        "attempt",
        "attempt",
        "attempt",
        "fallback refused 3 after 3 attempts",
        "reskit: policy 'inner' gave up after 3 attempt(s)",
    ]
    assert clock.sleeps == [0.5, 0.5]


def test_retry_outside_fallback_never_retries(clock: FakeClock) -> None:
    events: list[str] = []

    def spare(exc: Exception) -> str:
        events.append("fallback")
        return "spare"

    @reskit.retry(attempts=3, on=ConnectionError, wait=0.5)
    @reskit.fallback(spare)
    def call() -> str:
        events.append("attempt")
        raise ConnectionError("refused")

    assert call() == "spare"
    assert events == ["attempt", "fallback"]
    assert clock.sleeps == []


async def test_retry_outside_timeout_bounds_each_attempt(clock: FakeClock) -> None:
    attempts: list[float] = []

    @reskit.retry(attempts=3, on=TimeoutError, wait=0.25)
    @reskit.timeout(1.0)
    async def call() -> str:
        attempts.append(clock.now())
        if len(attempts) < 3:
            clock.advance(2.0)  # too slow: this attempt times out
            await asyncio.sleep(0)
        return "ok"

    assert await call() == "ok"
    start = attempts[0]
    # Each attempt is cut off at its own timeout; the retry waits 0.25 s between them.
    assert [t - start for t in attempts] == [0.0, 2.25, 4.5]
    assert clock.sleeps == [0.25, 0.25]


def test_retry_outside_a_sync_timeout_bounds_each_attempt(clock: FakeClock) -> None:
    releases = [threading.Event(), threading.Event()]
    attempts = 0

    @reskit.retry(attempts=3, on=TimeoutError, wait=0.0)
    @reskit.timeout(1.0)
    def call() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            clock.advance(2.0)
            releases[attempts - 1].wait(10)  # hung until the test ends
        return f"attempt {attempts}"

    try:
        assert call() == "attempt 3"
    finally:
        for release in releases:
            release.set()
    assert attempts == 3


async def test_timeout_outside_retry_bounds_all_attempts_together(clock: FakeClock) -> None:
    attempts = 0

    @reskit.timeout(1.0)
    @reskit.retry(attempts=10, on=ConnectionError, wait=0.0)
    async def call() -> None:
        nonlocal attempts
        attempts += 1
        clock.advance(0.4)
        await asyncio.sleep(0)
        raise ConnectionError(f"refused {attempts}")

    with pytest.raises(reskit.TimeoutExceeded) as info:
        await call()
    # 0.4 s per attempt: the third one is cut off by the outer timeout at 1.0 s.
    assert attempts == 3
    assert info.value.kind == "attempt"
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_fallback_outside_timeout_gets_the_timeout(clock: FakeClock) -> None:
    received: list[Exception] = []

    @reskit.fallback(lambda exc: received.append(exc) or "spare")
    @reskit.timeout(1.0)
    async def call() -> str:
        clock.advance(2.0)
        await asyncio.sleep(0)
        return "late"

    assert await call() == "spare"
    assert isinstance(only(received), reskit.TimeoutExceeded)


def test_stacked_policies_emit_one_span_each_inner_first(
    spans: SpanCapture, clock: FakeClock
) -> None:
    @reskit.fallback(lambda exc: "spare", name="outer")
    @reskit.retry(attempts=3, on=ConnectionError, wait=0.0, name="inner")
    def call() -> str:
        raise ConnectionError("refused")

    assert call() == "spare"
    inner, outer = spans.spans()
    assert inner.name == "reskit inner"
    assert inner.attributes["reskit.outcome"] == "failure"
    assert inner.attributes["reskit.attempts"] == 3
    assert outer.name == "reskit outer"
    assert outer.attributes["reskit.outcome"] == "fallback"
    assert outer.attributes["reskit.attempts"] == 1
    assert outer.start_time <= inner.start_time <= inner.end_time <= outer.end_time


# -- span names ------------------------------------------------------------------------------


def test_unnamed_policy_span_is_named_after_the_qualname(spans: SpanCapture) -> None:
    @reskit.retry(attempts=2, on=ConnectionError)
    def fetch_user() -> str:
        return "u"

    fetch_user()
    span = only(spans.spans())
    qualname = "test_unnamed_policy_span_is_named_after_the_qualname.<locals>.fetch_user"
    assert fetch_user.__qualname__ == qualname
    assert span.name == f"reskit {qualname}"
    assert span.attributes["reskit.policy"] == qualname


async def test_one_unnamed_policy_names_each_function_after_itself(spans: SpanCapture) -> None:
    policy = reskit.timeout(5.0)

    @policy
    def first() -> int:
        return 1

    @policy
    async def second() -> int:
        return 2

    assert first() == 1
    assert await second() == 2
    assert policy.call(len, "abc") == 3
    names = [span.name for span in spans.spans()]
    assert names == [
        f"reskit {first.__qualname__}",
        f"reskit {second.__qualname__}",
        "reskit len",
    ]
    assert policy.name is None  # the shared policy was not renamed by its first use


def test_named_decorator_uses_its_name(spans: SpanCapture) -> None:
    @reskit.fallback(lambda exc: None, name="users-db")
    def fetch() -> None:
        pass

    fetch()
    assert only(spans.spans()).name == "reskit users-db"


def test_method_span_is_named_after_the_class_and_method(spans: SpanCapture) -> None:
    class Repo:
        @reskit.timeout(5.0)
        def load(self) -> str:
            return "loaded"

    assert Repo().load() == "loaded"
    assert only(spans.spans()).name == f"reskit {Repo.load.__qualname__}"
    assert Repo.load.__qualname__.endswith("Repo.load")

"""Correlation IDs and the propagated deadline (``reskit._context``)."""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import structlog

import reskit
from reskit.testing import FakeClock

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(autouse=True)
def _clean_structlog_context() -> Iterator[None]:
    before = structlog.contextvars.get_contextvars()
    yield
    assert structlog.contextvars.get_contextvars() == before, "a test leaked structlog context"


# -- bind_correlation_id -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("abc\r\nX-Injected: 1", id="crlf"),
        pytest.param("abc\ndef", id="lf"),
        pytest.param("abc\x00def", id="nul"),
        pytest.param("a" * 10 * 1024, id="10kb"),
        pytest.param("a" * 129, id="129-chars"),
        pytest.param("réquest", id="non-ascii"),
        pytest.param("abc\u200b", id="zero-width-space"),
        pytest.param("<script>alert(1)</script>", id="html"),
        pytest.param("a b", id="space"),
        pytest.param("a/b", id="slash"),
        pytest.param("", id="empty"),
    ],
)
def test_bind_rejects_unsafe_ids(value: str) -> None:
    with (
        pytest.raises(ValueError, match="correlation ID"),
        reskit.bind_correlation_id(value),
    ):
        pytest.fail("the body must not run")
    assert reskit.correlation_id() is None
    assert "correlation_id" not in structlog.contextvars.get_contextvars()
    assert not reskit.valid_correlation_id(value)


@pytest.mark.parametrize(
    "value",
    ["abc", "A", "req-1.2_3", "0123456789abcdef0123456789abcdef", "a" * 128, "...", "-_-"],
)
def test_bind_accepts_safe_ids(value: str) -> None:
    assert reskit.valid_correlation_id(value)
    with reskit.bind_correlation_id(value) as bound:
        assert bound == value
        assert reskit.correlation_id() == value
    assert reskit.correlation_id() is None


def test_bind_none_generates_32_hex_characters() -> None:
    with reskit.bind_correlation_id() as first:
        assert HEX32.fullmatch(first)
        assert reskit.correlation_id() == first
    with reskit.bind_correlation_id(None) as second:
        assert HEX32.fullmatch(second)
    assert first != second
    assert reskit.correlation_id() is None


def test_generated_ids_are_unique() -> None:
    ids = {reskit.new_correlation_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(HEX32.fullmatch(value) for value in ids)


def test_nesting_restores_the_previous_id() -> None:
    assert reskit.correlation_id() is None
    with reskit.bind_correlation_id("outer"):
        assert reskit.correlation_id() == "outer"
        with reskit.bind_correlation_id("inner"):
            assert reskit.correlation_id() == "inner"
            assert structlog.contextvars.get_contextvars()["correlation_id"] == "inner"
        assert reskit.correlation_id() == "outer"
        assert structlog.contextvars.get_contextvars()["correlation_id"] == "outer"
    assert reskit.correlation_id() is None


def test_an_exception_in_the_block_still_restores_the_previous_id() -> None:
    with reskit.bind_correlation_id("outer"):
        with pytest.raises(RuntimeError), reskit.bind_correlation_id("inner"):
            raise RuntimeError("boom")
        assert reskit.correlation_id() == "outer"
        assert structlog.contextvars.get_contextvars()["correlation_id"] == "outer"
    assert reskit.correlation_id() is None


def test_id_is_bound_into_structlog_contextvars_and_removed_after() -> None:
    assert "correlation_id" not in structlog.contextvars.get_contextvars()
    with reskit.bind_correlation_id("log-me"):
        assert structlog.contextvars.get_contextvars()["correlation_id"] == "log-me"
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as captured:
            structlog.get_logger().info("hello")
    assert captured == [{"event": "hello", "correlation_id": "log-me", "log_level": "info"}]
    assert "correlation_id" not in structlog.contextvars.get_contextvars()


def test_a_correlation_id_bound_in_structlog_by_the_app_is_restored() -> None:
    tokens = structlog.contextvars.bind_contextvars(correlation_id="app-level", user="u1")
    try:
        with reskit.bind_correlation_id("reskit-level"):
            assert structlog.contextvars.get_contextvars() == {
                "correlation_id": "reskit-level",
                "user": "u1",
            }
        assert structlog.contextvars.get_contextvars() == {
            "correlation_id": "app-level",
            "user": "u1",
        }
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


# -- no leaks between concurrent tasks -----------------------------------------------------


async def test_no_leak_between_a_thousand_concurrent_tasks() -> None:
    n = 1_000
    entered = 0
    all_in = asyncio.Event()
    mismatches: list[tuple[int, str | None, object]] = []
    policy = reskit.Policy("ctx")

    @policy
    async def protected(i: int) -> str | None:
        await asyncio.sleep(0)
        return reskit.correlation_id()

    async def request(i: int) -> None:
        nonlocal entered
        expected = f"req-{i}"

        def check() -> None:
            seen = reskit.correlation_id()
            logged = structlog.contextvars.get_contextvars().get("correlation_id")
            if seen != expected or logged != expected:
                mismatches.append((i, seen, logged))

        assert reskit.correlation_id() is None
        with reskit.bind_correlation_id(expected):
            check()
            entered += 1
            if entered == n:
                all_in.set()
            await all_in.wait()  # every task is inside its binding at once
            for _ in range(5):
                await asyncio.sleep(0)
                check()
            if await protected(i) != expected:
                mismatches.append((i, "in policy", None))
            check()
        if reskit.correlation_id() is not None:
            mismatches.append((i, "after", reskit.correlation_id()))

    await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(n))), timeout=60)
    assert entered == n
    assert len(mismatches) == 0, mismatches[:5]
    assert reskit.correlation_id() is None


async def test_task_created_inside_a_binding_keeps_it_after_the_block_ends() -> None:
    release = asyncio.Event()

    async def later() -> str | None:
        await release.wait()
        return reskit.correlation_id()

    with reskit.bind_correlation_id("spawned"):
        task = asyncio.create_task(later())
    assert reskit.correlation_id() is None
    release.set()
    assert await asyncio.wait_for(task, timeout=10) == "spawned"


# -- thread pools ------------------------------------------------------------------------


def test_propagates_into_a_thread_pool_with_copy_context() -> None:
    n = 50
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = []
        for i in range(n):
            with reskit.bind_correlation_id(f"job-{i}"):
                ctx = contextvars.copy_context()
                futures.append(pool.submit(ctx.run, reskit.correlation_id))
        # Without copying the context the worker sees nothing: the ID is not global.
        with reskit.bind_correlation_id("not-copied"):
            bare = pool.submit(reskit.correlation_id)
        results = [future.result(timeout=30) for future in futures]
        assert bare.result(timeout=30) is None
    assert results == [f"job-{i}" for i in range(n)]


async def test_propagates_through_asyncio_to_thread() -> None:
    with reskit.bind_correlation_id("to-thread"):
        seen = await asyncio.wait_for(asyncio.to_thread(reskit.correlation_id), timeout=30)
    assert seen == "to-thread"


def test_sync_timeout_worker_sees_the_callers_id_and_deadline(clock: FakeClock) -> None:
    @reskit.Policy("worker", timeout=2.0)
    def work() -> tuple[str, str | None, object, float | None]:
        return (
            threading.current_thread().name,
            reskit.correlation_id(),
            structlog.contextvars.get_contextvars().get("correlation_id"),
            reskit.remaining_deadline(),
        )

    with reskit.bind_correlation_id("abc"):
        thread, cid, logged, remaining = work()
    assert thread != threading.current_thread().name
    assert thread.startswith("reskit-timeout-")
    assert cid == "abc"
    assert logged == "abc"
    assert remaining is not None
    assert 0.0 < remaining <= 2.0
    assert remaining == 2.0  # the fake clock did not move
    assert reskit.remaining_deadline() is None


def test_sync_timeout_workers_do_not_mix_up_concurrent_callers(clock: FakeClock) -> None:
    n = 40
    policy = reskit.Policy("worker", timeout=30.0)
    barrier = threading.Barrier(n, timeout=30)

    @policy
    def work() -> str | None:
        return reskit.correlation_id()

    results: dict[int, str | None] = {}
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            barrier.wait()
            with reskit.bind_correlation_id(f"caller-{i}"):
                results[i] = work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert results == {i: f"caller-{i}" for i in range(n)}


# -- remaining_deadline ----------------------------------------------------------------


def test_remaining_deadline_is_none_outside_any_policy(clock: FakeClock) -> None:
    assert reskit.remaining_deadline() is None

    @reskit.Policy("plain")
    def inside() -> float | None:
        return reskit.remaining_deadline()

    # A policy without deadline= or timeout= sets no deadline either.
    assert inside() is None
    assert reskit.remaining_deadline() is None


def test_remaining_deadline_shrinks_with_the_fake_clock_and_never_goes_negative(
    clock: FakeClock,
) -> None:
    seen: list[float | None] = []

    @reskit.Policy("deadline", deadline=5.0)
    def work() -> None:
        seen.append(reskit.remaining_deadline())
        clock.advance(2.0)
        seen.append(reskit.remaining_deadline())
        clock.advance(2.5)
        seen.append(reskit.remaining_deadline())
        clock.advance(10.0)
        seen.append(reskit.remaining_deadline())

    work()
    assert seen == [5.0, 3.0, 0.5, 0.0]
    assert reskit.remaining_deadline() is None


async def test_async_remaining_deadline_shrinks_with_the_fake_clock(clock: FakeClock) -> None:
    @reskit.Policy("deadline", deadline=5.0)
    async def work() -> list[float | None]:
        seen = [reskit.remaining_deadline()]
        clock.advance(1.5)
        await asyncio.sleep(0)
        seen.append(reskit.remaining_deadline())
        return seen

    assert await work() == [5.0, 3.5]
    assert reskit.remaining_deadline() is None


async def test_async_attempt_timeout_bounds_remaining_deadline(clock: FakeClock) -> None:
    @reskit.Policy("attempt", timeout=1.0, deadline=10.0)
    async def work() -> float | None:
        return reskit.remaining_deadline()

    assert await work() == 1.0


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    # The inner call starts one second into the outer one.
    [(5.0, 10.0, 4.0), (10.0, 3.0, 3.0), (4.0, 4.0, 3.0)],
)
def test_nested_policies_see_the_tighter_deadline(
    clock: FakeClock, outer: float, inner: float, expected: float
) -> None:
    seen: list[float | None] = []

    @reskit.Policy("inner", deadline=inner)
    def inner_call() -> None:
        seen.append(reskit.remaining_deadline())

    @reskit.Policy("outer", deadline=outer)
    def outer_call() -> None:
        seen.append(reskit.remaining_deadline())
        clock.advance(1.0)
        inner_call()
        seen.append(reskit.remaining_deadline())

    outer_call()
    # ... and the outer policy sees its own deadline again afterwards.
    assert seen == [outer, expected, outer - 1.0]
    assert reskit.remaining_deadline() is None


async def test_async_nested_policies_see_the_tighter_deadline(clock: FakeClock) -> None:
    @reskit.Policy("inner", deadline=10.0)
    async def inner_call() -> float | None:
        await asyncio.sleep(0)
        return reskit.remaining_deadline()

    @reskit.Policy("outer", deadline=3.0)
    async def outer_call() -> tuple[float | None, float | None]:
        clock.advance(0.5)
        return await inner_call(), reskit.remaining_deadline()

    assert await outer_call() == (2.5, 2.5)


def test_nested_sync_timeout_shrinks_to_the_outer_deadline(clock: FakeClock) -> None:
    @reskit.Policy("inner", timeout=2.0)
    def inner_call() -> float | None:
        return reskit.remaining_deadline()

    @reskit.Policy("outer", deadline=5.0)
    def outer_call() -> float | None:
        clock.advance(4.0)
        return inner_call()

    # The worker gets 2 s of its own, but only 1 s is left of the outer deadline.
    assert outer_call() == 1.0


def test_remaining_deadline_is_not_visible_in_an_uncopied_thread(clock: FakeClock) -> None:
    seen: list[float | None] = []

    @reskit.Policy("deadline", deadline=5.0)
    def work() -> float | None:
        thread = threading.Thread(target=lambda: seen.append(reskit.remaining_deadline()))
        thread.start()
        thread.join(timeout=30)
        return reskit.remaining_deadline()

    assert work() == 5.0
    assert seen == [None]

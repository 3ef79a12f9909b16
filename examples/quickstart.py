"""reskit in one short script: run it with ``python examples/quickstart.py``.

It shows, in order, a Policy on sync and async functions, the single-strategy
decorators, a fallback, a timeout, deadline propagation and correlation IDs,
and prints what happens at each step. It needs only reskit and finishes in
about a second.
"""

from __future__ import annotations

import asyncio
import time

import structlog

import reskit

# reskit logs every retry through structlog (``reskit.retry.scheduled``). A
# compact renderer keeps those lines readable next to the script's own output;
# merge_contextvars adds the correlation ID bound for the current call.
structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0),
    ]
)


def section(title: str) -> None:
    print(f"\n== {title}")


class Flaky:
    """A dependency that fails ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def fetch(self, item: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"connection reset (call {self.calls})")
        return f"{item}: ok after {self.calls} call(s)"

    async def afetch(self, item: str) -> str:
        await asyncio.sleep(0.01)
        return self.fetch(item)


# One policy: each attempt may take 0.5 s, the whole call 2 s; connection errors
# and timeouts are retried up to three attempts in all, 10 ms apart.
payments = reskit.Policy(
    "payments",
    timeout=0.5,
    deadline=2.0,
    retry=reskit.Retry(attempts=3, on=(ConnectionError, TimeoutError), wait=0.01),
)


def sync_and_async() -> None:
    section("A Policy protects sync and async functions alike")
    flaky = Flaky(failures=2)
    print("sync: ", payments.call(flaky.fetch, "charge #1"))

    flaky = Flaky(failures=1)

    @payments
    async def charge(order: str) -> str:
        return await flaky.afetch(order)

    print("async:", asyncio.run(charge("charge #2")))


def single_strategy_decorators() -> None:
    section("Single-strategy decorators stack, outermost first")
    flaky = Flaky(failures=5)

    @reskit.fallback(lambda exc: f"cached price (live call failed: {exc})")
    @reskit.retry(attempts=2, on=ConnectionError, wait=0.01)
    @reskit.timeout(0.5)
    def price(sku: str) -> str:
        return flaky.fetch(sku)

    print(price("sku-42"))
    print(f"the dependency was called {flaky.calls} times (2 attempts, then the fallback)")


def fallback_and_timeout() -> None:
    section("A fallback answers when the protected call cannot")
    recommendations = reskit.Policy(
        "recommendations",
        timeout=0.05,
        fallback=lambda exc: ["bestseller-1", "bestseller-2"],
    )

    async def slow() -> list[str]:
        await asyncio.sleep(1.0)
        return ["personalised"]

    started = time.perf_counter()
    items = asyncio.run(recommendations.acall(slow))
    took = (time.perf_counter() - started) * 1000
    print(f"got {items} after {took:.0f} ms: the attempt timed out at 50 ms")

    section("Without a fallback the caller gets TimeoutExceeded (a TimeoutError)")
    strict = reskit.Policy("strict", timeout=0.05)
    try:
        asyncio.run(strict.acall(slow))
    except TimeoutError as exc:
        print(f"{type(exc).__name__}: {exc}")


def deadline_propagation() -> None:
    section("The deadline propagates to nested calls")
    inner = reskit.Policy("inventory", timeout=1.0)

    async def check_stock() -> str:
        left = reskit.remaining_deadline()
        assert left is not None
        return f"inner call sees {left * 1000:.0f} ms left (its own timeout is 1000 ms)"

    @reskit.Policy("checkout", deadline=0.3)
    async def checkout() -> str:
        left = reskit.remaining_deadline()
        assert left is not None
        print(f"checkout starts with {left * 1000:.0f} ms left")
        await asyncio.sleep(0.1)
        return await inner.acall(check_stock)

    print(asyncio.run(checkout()))
    print(f"outside any policy: remaining_deadline() = {reskit.remaining_deadline()}")


def correlation_ids() -> None:
    section("Correlation IDs follow the call, into reskit's log events")
    with reskit.bind_correlation_id("order-1234") as cid:
        print(f"bound {cid!r}; reskit.correlation_id() = {reskit.correlation_id()!r}")
        # The retry below logs reskit.retry.scheduled with correlation_id=order-1234.
        print(payments.call(Flaky(failures=1).fetch, "charge #3"))
    print(f"after the block: reskit.correlation_id() = {reskit.correlation_id()!r}")
    with reskit.bind_correlation_id() as generated:
        print(f"bind_correlation_id() with no value generates one: {generated}")


def main() -> None:
    sync_and_async()
    single_strategy_decorators()
    fallback_and_timeout()
    deadline_propagation()
    correlation_ids()


if __name__ == "__main__":
    main()

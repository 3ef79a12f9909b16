"""Checked by mypy (strict): the public API keeps signatures and return types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import reskit

policy = reskit.Policy("typing", timeout=1.0, retry=reskit.Retry(attempts=2, on=ValueError))


@policy
def add(a: int, b: int = 1) -> int:
    return a + b


@policy
async def fetch(url: str) -> bytes:
    return url.encode()


@reskit.timeout(0.5)
def quick() -> str:
    return "ok"


@reskit.retry(attempts=3, on=(ConnectionError, TimeoutError))
def connect(host: str) -> str:
    return host


def numbers() -> Iterator[int]:
    yield 1


async def stream() -> AsyncIterator[int]:
    yield 1


total: int = add(1, b=2)
text: str = quick()
host: str = connect("db")
called: int = policy.call(add, 1, 2)


async def use() -> None:
    data: bytes = await fetch("x")
    again: bytes = await policy.acall(fetch, "y")
    del data, again


remaining: float | None = reskit.remaining_deadline()
cid: str | None = reskit.correlation_id()
with reskit.bind_correlation_id("abc") as bound:
    same: str = bound

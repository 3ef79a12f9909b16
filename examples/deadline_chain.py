"""Three services and one budget: a request's deadline carried from A through B to C.

Service A (the edge) calls B, B calls C, each under its own uvicorn, each
behind ``reskit.asgi.DeadlineMiddleware``, B and A calling on through
``reskit.httpx.AsyncTransport``. A client asks A for a quote with a budget in
``X-Request-Timeout-Ms``. Each hop turns what is left into the request's
deadline and sends what is left on, keeping a few milliseconds back
(``deadline_reserve``) so the answer of a callee that gave up arrives while its
caller still listens. When C is too slow for the budget, C's handler is
cancelled, B's call gets C's 504 at once, and A answers 504 within the budget
the client gave: nothing runs on for a caller who is gone.

Run it (from the repository root, with ``pip install -e ".[dev]"``)::

    python examples/deadline_chain.py                       # C takes 50 ms: 200 within 300 ms
    python examples/deadline_chain.py --work-ms 800         # C too slow: 504 within 300 ms
    python examples/deadline_chain.py --budget-ms 1000 --work-ms 800

It starts the three services on free ports, sends one request and prints
what each service saw and how it ended, as a timeline in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import reskit
import reskit.httpx
from reskit import Policy, Retry
from reskit.asgi import CorrelationIdMiddleware, DeadlineMiddleware

#: What each hop keeps back from the budget it sends on, in seconds.
RESERVE = 0.01


@dataclass
class Event:
    """One thing that happened in a service, at a time on this machine's monotonic clock."""

    service: str
    what: str  # arrived | called | answered | cancelled | finished
    at: float
    detail: str = ""
    request: str | None = None  # the correlation ID, the same in every service


@dataclass
class Ledger:
    """What the services did, for the timeline and for tests: events and work in flight."""

    events: list[Event] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, service: str, what: str, detail: str = "") -> None:
        with self.lock:
            event = Event(service, what, time.monotonic(), detail, reskit.correlation_id())
            self.events.append(event)
            if what == "arrived":
                self.running[service] = self.running.get(service, 0) + 1
            elif what in ("answered", "cancelled", "finished"):
                self.running[service] -= 1

    def of(self, service: str) -> list[Event]:
        with self.lock:
            return [event for event in self.events if event.service == service]


def budget_ms() -> str:
    left = reskit.remaining_deadline()
    return "none" if left is None else f"{left * 1000:.0f} ms left"


def caller(
    name: str,
    upstream: str,
    ledger: Ledger,
    *,
    propagate: bool = True,
    retry: Retry | None = None,
) -> Starlette:
    """A service that answers by calling ``upstream`` (A calls B, B calls C).

    Its calls are retried (``retry``; by default three attempts with a short
    backoff) while the budget covers another attempt.
    """
    if retry is None:
        retry = Retry(attempts=3, wait_initial=0.02, wait_max=0.1)
    transport = reskit.httpx.AsyncTransport(
        Policy(name, retry=retry),
        deadline_reserve=RESERVE,
        deadline_header="X-Request-Timeout-Ms" if propagate else None,
    )
    client = httpx.AsyncClient(transport=transport, base_url=upstream)

    async def quote(request: Request) -> JSONResponse:
        ledger.note(name, "arrived", budget_ms())
        try:
            ledger.note(name, "called", budget_ms())
            response = await client.get("/quote")
        except reskit.TimeoutExceeded:
            # The budget cannot cover another attempt (or ran out waiting): say so now.
            ledger.note(name, "answered", "504")
            return JSONResponse({"via": name, "error": "deadline exceeded"}, status_code=504)
        except asyncio.CancelledError:
            ledger.note(name, "cancelled", budget_ms())
            raise
        ledger.note(name, "answered", str(response.status_code))
        body = response.json()
        if response.status_code == 200:
            body["via"] = [name, *body["via"]]
        return JSONResponse(body, status_code=response.status_code)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/quote", quote)], lifespan=lifespan)


def worker(ledger: Ledger, work: Callable[[], Awaitable[None]], name: str = "C") -> Starlette:
    """The last service: it does the work (``work``), unless its budget runs out first."""

    async def quote(request: Request) -> JSONResponse:
        ledger.note(name, "arrived", budget_ms())
        try:
            await work()
        except asyncio.CancelledError:
            ledger.note(name, "cancelled", budget_ms())
            raise
        ledger.note(name, "finished")
        return JSONResponse({"price": 42, "via": [name]})

    return Starlette(routes=[Route("/quote", quote)])


def protect(app: Any, *, propagate: bool = True) -> Any:
    """What every service wears: the correlation ID, and the deadline its caller sent."""
    if propagate:
        app = DeadlineMiddleware(app, maximum=10.0)
    return CorrelationIdMiddleware(app)


def chain(
    urls: tuple[str, str, str],
    ledger: Ledger,
    work: Callable[[], Awaitable[None]],
    *,
    propagate: bool = True,
) -> tuple[Any, Any, Any]:
    """The apps of A, B and C, given the base URLs they will be served at."""
    _, b_url, c_url = urls
    a = protect(caller("A", b_url, ledger, propagate=propagate), propagate=propagate)
    b = protect(caller("B", c_url, ledger, propagate=propagate), propagate=propagate)
    c = protect(worker(ledger, work), propagate=propagate)
    return a, b, c


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def serve_and_ask(budget: float, work_seconds: float) -> None:
    ports = [free_port() for _ in range(3)]
    urls = tuple(f"http://127.0.0.1:{port}" for port in ports)
    ledger = Ledger()

    async def work() -> None:
        await asyncio.sleep(work_seconds)

    apps = chain((urls[0], urls[1], urls[2]), ledger, work)
    servers = [
        uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on"))
        for app, port in zip(apps, ports, strict=True)
    ]
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):  # noqa: ASYNC110 (uvicorn has no event)
        await asyncio.sleep(0.01)
    print(f"A, B and C listening on {', '.join(urls)}", flush=True)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=urls[0], timeout=budget + 1.0) as client:
        response = await client.get(
            "/quote", headers={"X-Request-Timeout-Ms": str(int(budget * 1000))}
        )
    took = time.monotonic() - started
    print(f"client: {response.status_code} after {took * 1000:.0f} ms: {response.text}")
    for event in sorted(ledger.events, key=lambda e: e.at):
        offset = (event.at - started) * 1000
        print(f"  {offset:7.1f} ms  {event.service}  {event.what:<9} {event.detail}")
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-ms", type=int, default=300, help="the client's budget")
    parser.add_argument("--work-ms", type=int, default=50, help="how long C works")
    args = parser.parse_args()
    asyncio.run(serve_and_ask(args.budget_ms / 1000, args.work_ms / 1000))


if __name__ == "__main__":
    main()

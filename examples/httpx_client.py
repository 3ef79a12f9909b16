"""A client of a flaky HTTP API in two regions, through ``reskit.httpx``.

The upstream is a small Starlette app (``region_app``) that answers
``GET /v1/items/{sku}``; a region can be made to fail a share of its requests
with ``503`` and a ``Retry-After`` header, and to answer a share of them slowly.
The client (``catalog_client``) sends every request through
:class:`reskit.httpx.Transport`:

- retries (idempotent GETs) with backoff that honours ``Retry-After``, within a
  2-second deadline per lookup;
- failover from the preferred region to the other, with outlier ejection of a
  region that keeps failing;
- hedging: a lookup still unanswered after the observed p90 is sent again, at
  most 10% more requests;
- a circuit breaker per region, and ``X-Request-ID`` / ``X-Request-Timeout-Ms``
  on every attempt.

Run it (from the repository root, with starlette and uvicorn installed, e.g.
``pip install -e ".[dev]"``)::

    python examples/httpx_client.py                  # starts both regions itself
    python examples/httpx_client.py --requests 200 --failure-rate 0.5

It prints how the lookups ended and which region served them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import reskit
import reskit.httpx

DEADLINE = 2.0  # seconds a lookup may take, retries and hedges included


class Region:
    """How one region of the upstream behaves (changeable while it runs)."""

    def __init__(
        self, name: str, *, failure_rate: float = 0.0, slow_rate: float = 0.0, seed: int = 1
    ) -> None:
        self.name = name
        self.failure_rate = failure_rate
        self.slow_rate = slow_rate
        self.served = 0
        self._random = random.Random(seed)


def region_app(region: Region) -> Starlette:
    """The upstream API of one region."""

    async def item(request: Request) -> JSONResponse:
        region.served += 1
        draw = region._random.random()
        if draw < region.failure_rate:
            return JSONResponse(
                {"error": "overloaded"}, status_code=503, headers={"Retry-After": "0"}
            )
        if draw < region.failure_rate + region.slow_rate:
            await asyncio.sleep(0.2)  # a slow answer, for the hedges to beat
        return JSONResponse(
            {
                "sku": request.path_params["sku"],
                "region": region.name,
                "request_id": request.headers.get("x-request-id"),
            }
        )

    return Starlette(routes=[Route("/v1/items/{sku}", item)])


def catalog_client(regions: list[str], *, seed: int | None = None) -> httpx.Client:
    """An httpx client for the catalog API, resilient across ``regions`` (base URLs)."""
    policy = reskit.Policy(
        "catalog",
        deadline=DEADLINE,
        timeout=1.0,
        retry=reskit.Retry(
            attempts=3,
            on=httpx.TransportError,
            wait_initial=0.05,
            wait_max=0.5,
            random=random.Random(seed) if seed is not None else None,
        ),
        breaker=reskit.CircuitBreaker(
            failure_rate=0.5, window=20, minimum_calls=10, reset_timeout=5.0
        ),
    )
    transport = reskit.httpx.Transport(
        policy,
        httpx.HTTPTransport(),
        failover=reskit.httpx.Failover(
            endpoints=[f"{url}/v1" for url in regions], consecutive_failures=5, ejection_time=5.0
        ),
        hedging=reskit.httpx.Hedging(initial_delay=0.1),
    )
    return httpx.Client(transport=transport, base_url=f"{regions[0]}/v1")


def lookups(client: httpx.Client, count: int) -> Counter[str]:
    """Look up ``count`` items; count how they ended (``"eu"``, ``"us"``, ``"503"``, ...)."""
    outcomes: Counter[str] = Counter()
    for n in range(count):
        try:
            response = client.get(f"/items/sku-{n}")
        except (httpx.HTTPError, reskit.ReskitError) as exc:
            outcomes[type(exc).__name__] += 1
            continue
        if response.status_code == 200:
            outcomes[response.json()["region"]] += 1
        else:
            outcomes[str(response.status_code)] += 1
    return outcomes


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread."""
    import uvicorn

    sock = socket.socket()
    # Without it, an answer whose head and body are written apart waits on a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:  # a moment to bind; the one wait here
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--failure-rate", type=float, default=0.3, help="of the eu region")
    parser.add_argument("--slow-rate", type=float, default=0.05)
    args = parser.parse_args(argv)

    eu = Region("eu", failure_rate=args.failure_rate, slow_rate=args.slow_rate)
    us = Region("us", slow_rate=args.slow_rate, seed=2)
    with (
        serving(region_app(eu)) as eu_url,
        serving(region_app(us)) as us_url,
        catalog_client([eu_url, us_url], seed=7) as client,
    ):
        started = time.perf_counter()
        outcomes = lookups(client, args.requests)
        elapsed = time.perf_counter() - started
        transport = client._transport
        assert isinstance(transport, reskit.httpx.Transport)
        names = {eu_url.removeprefix("http://"): "eu", us_url.removeprefix("http://"): "us"}
        breakers = ", ".join(
            f"{names[host]} {breaker.state}" for host, breaker in transport.breakers.items()
        )
    print(
        f"{args.requests} lookups in {elapsed:.2f} s: "
        + ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    )
    print(f"requests served: eu {eu.served}, us {us.served}; breakers: {breakers}")


if __name__ == "__main__":
    main()

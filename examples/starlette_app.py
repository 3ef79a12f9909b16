"""A Starlette app whose handlers call a flaky dependency through reskit policies.

Its edge is guarded too: :class:`reskit.asgi.CorrelationIdMiddleware` gives
every request an ``X-Request-ID``, and :class:`reskit.asgi.ShedMiddleware`
keeps orders flowing when too much traffic arrives: ``/orders`` is critical
(a bulkhead, never shed), ``/stock`` is shed at brownout level 1, has a kill
switch and lets each tenant (``X-Tenant``) have four lookups in flight (429
beyond that).

Run it with either of (from the repository root, with starlette and uvicorn
installed, e.g. ``pip install -e ".[dev]"``)::

    uvicorn examples.starlette_app:app
    python examples/starlette_app.py [--host 127.0.0.1] [--port 8000]

Then try::

    curl -i localhost:8000/stock/sku-1           # retried, falls back when it must
    curl -i localhost:8000/stock/sku-1/strict    # no fallback: 503 when the call fails
    curl -i -H 'X-Request-ID: my-trace-1' localhost:8000/stock/sku-1
    curl -i -X POST localhost:8000/orders/sku-1  # critical: kept under brownout
    # with the server and the CLI on one store (RESKIT_STORE=redis://... for both):
    reskit brownout 1                            # /stock answers 503, /orders still 201
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import zlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import reskit
from reskit import Bulkhead, Policy
from reskit.asgi import CorrelationIdMiddleware, ShedMiddleware

# A tenant name as the gateway in front sets it in X-Tenant; anything else is no tenant.
_TENANT = re.compile(r"[a-z0-9-]{1,64}")


def tenant_of(scope: Any) -> str | None:
    """``ShedMiddleware``'s ``tenant=``: the ``X-Tenant`` of an ASGI request, if well formed."""
    for name, value in scope.get("headers", ()):
        if name == b"x-tenant":
            tenant = value.decode("latin-1")
            return tenant if _TENANT.fullmatch(tenant) else None
    return None


class FlakyInventory:
    """Stands in for a remote stock service that is sometimes slow and sometimes down.

    Each call answers in 5-30 ms, except that ``error_rate`` of them raise
    :class:`ConnectionError` and ``hang_rate`` of them hang for seconds.
    """

    def __init__(
        self, *, error_rate: float = 0.2, hang_rate: float = 0.1, seed: int | None = None
    ) -> None:
        self.error_rate = error_rate
        self.hang_rate = hang_rate
        self.calls = 0
        self.orders = 0  # orders placed against this stock
        self._random = random.Random(seed)

    async def stock(self, sku: str) -> int:
        self.calls += 1
        roll = self._random.random()
        if roll < self.hang_rate:
            await asyncio.sleep(10.0)  # the policy's timeout cuts this short
        await asyncio.sleep(self._random.uniform(0.005, 0.03))
        if roll < self.hang_rate + self.error_rate:
            raise ConnectionError(f"inventory: connection reset while reading {sku}")
        return zlib.crc32(sku.encode()) % 100


def create_app(
    inventory: FlakyInventory | None = None,
    *,
    timeout: float | None = 0.2,
    deadline: float | None = 0.5,
) -> CorrelationIdMiddleware:
    """Build the app around ``inventory`` (a new :class:`FlakyInventory` by default).

    ``timeout`` bounds each call to the inventory and ``deadline`` a request's
    whole call, retries included (``None``: unbounded, which the tests use to
    hold requests in flight). Returns the ASGI app with its middleware; the
    Starlette app inside is ``app.app.app``.
    """
    backend = inventory if inventory is not None else FlakyInventory()
    retry = reskit.Retry(
        attempts=3, on=(ConnectionError, TimeoutError), wait_initial=0.01, wait_max=0.05
    )
    # By default each attempt may take 200 ms and the whole call, retries included, 500 ms:
    # a request never waits on the dependency for longer than that.
    strict = reskit.Policy("inventory", timeout=timeout, deadline=deadline, retry=retry)
    lenient = reskit.Policy(
        "inventory.with_fallback",
        timeout=timeout,
        deadline=deadline,
        retry=retry,
        fallback=lambda exc: {"stock": None, "source": "fallback", "error": type(exc).__name__},
    )

    async def live_stock(sku: str) -> dict[str, Any]:
        return {"stock": await backend.stock(sku), "source": "live"}

    def respond(body: dict[str, Any], status: int = 200) -> JSONResponse:
        # CorrelationIdMiddleware bound the ID and puts it on the response headers.
        body["correlation_id"] = reskit.correlation_id()
        headers = {}
        retry_after = body.pop("retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        return JSONResponse(body, status_code=status, headers=headers)

    async def index(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "routes": {
                    "/stock/{sku}": "stock level; retried, falls back when the call fails",
                    "/stock/{sku}/strict": "stock level; 503 when the call fails",
                    "POST /orders/{sku}": "order one; critical, never shed",
                    "/healthz": "liveness",
                }
            }
        )

    async def stock(request: Request) -> JSONResponse:
        sku = request.path_params["sku"]
        body = await lenient.acall(live_stock, sku)
        return respond({"sku": sku, **body})

    async def strict_stock(sku: str) -> tuple[dict[str, Any], int]:
        try:
            body = await strict.acall(live_stock, sku)
        except (reskit.ReskitError, ConnectionError) as exc:
            return {
                "sku": sku,
                "error": type(exc).__name__,
                "detail": str(exc),
                "retry_after": getattr(exc, "retry_after", None),
            }, 503
        return {"sku": sku, **body}, 200

    async def stock_strict(request: Request) -> JSONResponse:
        return respond(*await strict_stock(request.path_params["sku"]))

    async def order(request: Request) -> JSONResponse:
        body, status = await strict_stock(request.path_params["sku"])
        if status == 200:
            if not body["stock"]:
                return respond({**body, "error": "out of stock"}, 409)
            backend.orders += 1
            return respond({**body, "order": f"ord_{backend.orders}"}, 201)
        return respond(body, status)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/stock/{sku}", stock),
            Route("/stock/{sku}/strict", stock_strict),
            Route("/orders/{sku}", order, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )
    app.state.inventory = backend
    # Policies for the edge, built per app: a policy follows its store's switches.
    routes = {
        # Critical: no shed_at, so no brownout level turns orders off.
        "/orders": Policy("orders", bulkhead=Bulkhead(max_concurrent=32)),
        # Browsing: shed first, killable, and four lookups in flight per tenant.
        "/stock": Policy(
            "stock",
            shed_at=1,
            kill_switch=True,
            bulkhead=Bulkhead(max_concurrent=4, max_partitions=1000),
        ),
    }
    # Correlation IDs outermost: shed requests and 500s carry the ID too.
    return CorrelationIdMiddleware(ShedMiddleware(app, routes=routes, tenant=tenant_of))


app = create_app()


def main() -> None:
    """Serve :data:`app` with uvicorn on 127.0.0.1 (``--port`` to change the port)."""
    parser = argparse.ArgumentParser(description="Serve the reskit Starlette example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""A Starlette app whose handlers call a flaky dependency through reskit policies.

Run it with either of (from the repository root, with starlette and uvicorn
installed, e.g. ``pip install -e ".[dev]"``)::

    uvicorn examples.starlette_app:app
    python examples/starlette_app.py [--host 127.0.0.1] [--port 8000]

Then try::

    curl -i localhost:8000/stock/sku-1           # retried, falls back when it must
    curl -i localhost:8000/stock/sku-1/strict    # no fallback: 503 when the call fails
    curl -i -H 'X-Request-ID: my-trace-1' localhost:8000/stock/sku-1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import zlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import reskit


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


def create_app(inventory: FlakyInventory | None = None) -> Starlette:
    """Build the app around ``inventory`` (a new :class:`FlakyInventory` by default)."""
    backend = inventory if inventory is not None else FlakyInventory()
    retry = reskit.Retry(
        attempts=3, on=(ConnectionError, TimeoutError), wait_initial=0.01, wait_max=0.05
    )
    # Each attempt may take 200 ms and the whole call, retries included, 500 ms:
    # a request never waits on the dependency for longer than that.
    strict = reskit.Policy("inventory", timeout=0.2, deadline=0.5, retry=retry)
    lenient = reskit.Policy(
        "inventory.with_fallback",
        timeout=0.2,
        deadline=0.5,
        retry=retry,
        fallback=lambda exc: {"stock": None, "source": "fallback", "error": type(exc).__name__},
    )

    async def live_stock(sku: str) -> dict[str, Any]:
        return {"stock": await backend.stock(sku), "source": "live"}

    def respond(body: dict[str, Any], cid: str, status: int = 200) -> JSONResponse:
        body["correlation_id"] = cid
        headers = {"X-Request-ID": cid}
        retry_after = body.pop("retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        return JSONResponse(body, status_code=status, headers=headers)

    def request_id(request: Request) -> str | None:
        # Adopt the caller's ID only when it is safe to echo and log.
        value = request.headers.get("x-request-id")
        return value if reskit.valid_correlation_id(value) else None

    async def index(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "routes": {
                    "/stock/{sku}": "stock level; retried, falls back when the call fails",
                    "/stock/{sku}/strict": "stock level; 503 when the call fails",
                    "/healthz": "liveness",
                }
            }
        )

    async def stock(request: Request) -> JSONResponse:
        sku = request.path_params["sku"]
        with reskit.bind_correlation_id(request_id(request)) as cid:
            body = await lenient.acall(live_stock, sku)
            return respond({"sku": sku, **body}, cid)

    async def stock_strict(request: Request) -> JSONResponse:
        sku = request.path_params["sku"]
        with reskit.bind_correlation_id(request_id(request)) as cid:
            try:
                body = await strict.acall(live_stock, sku)
            except (reskit.ReskitError, ConnectionError) as exc:
                return respond(
                    {
                        "sku": sku,
                        "error": type(exc).__name__,
                        "detail": str(exc),
                        "retry_after": getattr(exc, "retry_after", None),
                    },
                    cid,
                    status=503,
                )
            return respond({"sku": sku, **body}, cid)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/stock/{sku}", stock),
            Route("/stock/{sku}/strict", stock_strict),
            Route("/healthz", healthz),
        ]
    )
    app.state.inventory = backend
    return app


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

"""A Starlette app whose POST /charges runs once per Idempotency-Key, however often it is sent.

Run it with either of (from the repository root, with starlette and uvicorn
installed, e.g. ``pip install -e ".[dev]"``)::

    uvicorn examples.starlette_idempotency:app
    python examples/starlette_idempotency.py [--host 127.0.0.1] [--port 8000]

Then try::

    curl -i localhost:8000/charges -H 'Idempotency-Key: "order-1"' -d '{"amount": 500}'
    curl -i localhost:8000/charges -H 'Idempotency-Key: order-1' -d '{"amount": 500}'
    curl -i localhost:8000/charges -H 'Idempotency-Key: order-1' -d '{"amount": 900}'
    curl -i localhost:8000/charges -d '{"amount": 500}'

The first creates a charge (201); the second (the same key, bare instead of
quoted) gets the same charge back with ``Idempotent-Replayed: true``; the third
reuses the key for another amount and gets 422; the last has no key, and this
app requires one on /charges: 400.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reskit.asgi import IdempotencyMiddleware


class Ledger:
    """Stands in for a payment provider: every charge it makes is a charge a customer pays."""

    def __init__(self) -> None:
        self.charges: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    async def charge(self, amount: int, currency: str) -> dict[str, Any]:
        await asyncio.sleep(0.01)  # the provider's round trip
        charge = {"id": f"ch_{next(self._ids)}", "amount": amount, "currency": currency}
        self.charges.append(charge)
        return charge


def create_app(ledger: Ledger | None = None) -> IdempotencyMiddleware:
    """Build the app around ``ledger`` (a new :class:`Ledger` by default)."""
    book = ledger if ledger is not None else Ledger()

    async def create_charge(request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            payload = None
        amount = payload.get("amount") if isinstance(payload, dict) else None
        if type(amount) is not int or amount <= 0:
            # A 4xx is not stored: the client may fix the body and send the same key again.
            return JSONResponse({"error": "amount must be a whole number of cents > 0"}, 400)
        currency = str(payload.get("currency", "eur")) if isinstance(payload, dict) else "eur"
        return JSONResponse(await book.charge(amount, currency), status_code=201)

    async def list_charges(request: Request) -> JSONResponse:
        return JSONResponse({"charges": book.charges})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    starlette = Starlette(
        routes=[
            Route("/charges", create_charge, methods=["POST"]),
            Route("/charges", list_charges, methods=["GET"]),
            Route("/healthz", healthz),
        ]
    )
    starlette.state.ledger = book
    # Outermost, so the key is checked before anything else runs; a POST to /charges
    # without one is refused rather than risk charging twice on a retry.
    return IdempotencyMiddleware(starlette, required=lambda method, path: path == "/charges")


app = create_app()


def main() -> None:
    """Serve :data:`app` with uvicorn on 127.0.0.1 (``--port`` to change the port)."""
    parser = argparse.ArgumentParser(description="Serve the reskit Starlette idempotency example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

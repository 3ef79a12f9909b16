"""A Flask app whose POST /charges runs once per Idempotency-Key, however often it is sent.

Run it with (from the repository root, with Flask installed, e.g. ``pip install -e ".[dev]"``)::

    python examples/flask_app.py [--host 127.0.0.1] [--port 8000]

Then try::

    curl -i localhost:8000/charges -H 'Idempotency-Key: order-1' -d '{"amount": 500}'
    curl -i localhost:8000/charges -H 'Idempotency-Key: order-1' -d '{"amount": 500}'
    curl -i localhost:8000/charges -H 'Idempotency-Key: order-1' -d '{"amount": 900}'

The first creates a charge (201); the second gets the same charge back with
``Idempotent-Replayed: true`` and charges nothing; the third reuses the key for
another amount and gets 422.
"""

from __future__ import annotations

import argparse
import itertools
import threading
from typing import Any

from flask import Flask, request

from reskit.wsgi import IdempotencyMiddleware


class Ledger:
    """Stands in for a payment provider: every charge it makes is a charge a customer pays."""

    def __init__(self) -> None:
        self.charges: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def charge(self, amount: int, currency: str) -> dict[str, Any]:
        with self._lock:
            charge = {"id": f"ch_{next(self._ids)}", "amount": amount, "currency": currency}
            self.charges.append(charge)
            return charge


def create_app(ledger: Ledger | None = None) -> Flask:
    """Build the app around ``ledger`` (a new :class:`Ledger` by default)."""
    book = ledger if ledger is not None else Ledger()
    app = Flask(__name__)
    app.extensions["ledger"] = book

    @app.post("/charges")
    def create_charge() -> tuple[dict[str, Any], int]:
        payload = request.get_json(force=True, silent=True)
        amount = payload.get("amount") if isinstance(payload, dict) else None
        if type(amount) is not int or amount <= 0:
            # A 4xx is not stored: the client may fix the body and send the same key again.
            return {"error": "amount must be a whole number of cents > 0"}, 400
        currency = payload.get("currency", "eur") if isinstance(payload, dict) else "eur"
        return book.charge(amount, str(currency)), 201

    @app.get("/charges")
    def list_charges() -> dict[str, Any]:
        return {"charges": book.charges}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # Wraps the WSGI app, not the Flask object: routes, errors and all pass through it.
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


app = create_app()


def main() -> None:
    """Serve :data:`app` with Flask's threaded development server (``--port`` to change it)."""
    parser = argparse.ArgumentParser(description="Serve the reskit Flask idempotency example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()

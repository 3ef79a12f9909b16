"""A Flask shop behind reskit's WSGI edge middleware: correlation IDs and load shedding.

Run it with (from the repository root, with Flask installed, e.g. ``pip install -e ".[dev]"``)::

    python examples/flask_shed.py [--host 127.0.0.1] [--port 8000]

Then try::

    curl -i -H 'X-Request-ID: order-1' -X POST 'localhost:8000/orders?sku=boots'
    curl -i localhost:8000/suggestions
    curl -i -H 'X-Tenant: acme' localhost:8000/exports/sales
    # with the server and the CLI on one store (RESKIT_STORE=redis://... for both):
    reskit brownout 1                      # /suggestions answers 503, /orders 201
    reskit kill suggestions --reason test --actor me

``app.wsgi_app`` is wrapped in :class:`reskit.wsgi.ShedMiddleware` and, outermost,
:class:`reskit.wsgi.CorrelationIdMiddleware`, so every request has an
``X-Request-ID`` and everything it logs carries it. The routes, by priority:

- ``/orders`` is critical: a bulkhead and no ``shed_at``;
- ``/suggestions`` is a feature with a kill switch, shed at brownout level 1;
- ``/exports`` lets each tenant (``X-Tenant``, or an ``X-API-Key``'s owner)
  run two exports at a time, 429 beyond that; it is shed at level 2.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import threading
from typing import Any

from flask import Flask, request

import reskit
from reskit import Bulkhead, KillSwitch, Policy
from reskit.wsgi import CorrelationIdMiddleware, ShedMiddleware

log = logging.getLogger("shop")

#: API keys and the tenants they belong to (a real service looks them up).
API_KEYS = {"key-acme": "acme", "key-globex": "globex"}
_TENANT = re.compile(r"[a-z0-9-]{1,64}")


def tenant_from(api_key: str | None, tenant: str | None) -> str | None:
    """The tenant a request belongs to: its API key's owner, else a well-formed ``X-Tenant``."""
    if api_key is not None:
        return API_KEYS.get(api_key)
    if tenant is not None and _TENANT.fullmatch(tenant):
        return tenant
    return None


def tenant_of(environ: dict[str, Any]) -> str | None:
    """``ShedMiddleware``'s ``tenant=``: the tenant of a WSGI request."""
    return tenant_from(environ.get("HTTP_X_API_KEY"), environ.get("HTTP_X_TENANT"))


class Shop:
    """Stands in for the services behind the shop: orders, suggestions, exports."""

    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def place_order(self, sku: str, quantity: int) -> dict[str, Any]:
        with self._lock:
            order = {"id": f"ord_{next(self._ids)}", "sku": sku, "quantity": quantity}
            self.orders.append(order)
            return order

    def suggest(self) -> list[str]:
        return ["socks", "laces"]

    def export(self, tenant: str | None, name: str) -> dict[str, Any]:
        return {"export": name, "tenant": tenant, "rows": 3}


def create_app(shop: Shop | None = None) -> Flask:
    """Build the app around ``shop`` (a new :class:`Shop` by default)."""
    backend = shop if shop is not None else Shop()
    app = Flask(__name__)
    app.extensions["shop"] = backend

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/orders")
    def place_order() -> tuple[dict[str, Any], int]:
        sku = request.args.get("sku", "")
        if not sku:
            return {"error": "sku is required"}, 400
        order = backend.place_order(sku, request.args.get("quantity", 1, type=int))
        log.info("order %s placed for %s", order["id"], sku)
        return {**order, "correlation_id": reskit.correlation_id()}, 201

    @app.get("/suggestions")
    def suggestions() -> dict[str, Any]:
        return {"items": backend.suggest()}

    @app.get("/exports/<name>")
    def export(name: str) -> dict[str, Any]:
        tenant = tenant_from(request.headers.get("X-API-Key"), request.headers.get("X-Tenant"))
        log.info("export %s started for %s", name, tenant)
        return backend.export(tenant, name)

    # Built per app, after the store is configured: a policy follows its store's switches.
    routes = {
        "/orders": Policy("orders", bulkhead=Bulkhead(max_concurrent=16)),
        "/suggestions": Policy(
            "suggestions",
            shed_at=1,
            kill_switch=KillSwitch(
                "suggestions",
                owner="team-discovery",
                description="hides suggestions; the shop still sells",
            ),
        ),
        "/exports": Policy(
            "exports", shed_at=2, bulkhead=Bulkhead(max_concurrent=2, max_partitions=1000)
        ),
    }
    # Wraps the WSGI app, not the Flask object: Flask's routing and error pages run inside,
    # with the correlation ID bound.
    app.wsgi_app = CorrelationIdMiddleware(  # type: ignore[method-assign]
        ShedMiddleware(app.wsgi_app, routes=routes, tenant=tenant_of)
    )
    return app


app = create_app()


def configure_logging() -> None:
    """Log to stderr with the correlation ID on every line."""
    handler = logging.StreamHandler()
    handler.addFilter(reskit.CorrelationIdFilter())
    handler.setFormatter(
        logging.Formatter("%(levelname)-7s [%(correlation_id)s] %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main() -> None:
    """Serve :data:`app` with Flask's threaded development server (``--port`` to change it)."""
    parser = argparse.ArgumentParser(description="Serve the reskit Flask shedding example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    configure_logging()
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()

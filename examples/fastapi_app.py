"""A FastAPI shop that keeps taking orders when more traffic arrives than it can serve.

Run it with either of (from the repository root, with FastAPI and uvicorn
installed, e.g. ``pip install -e ".[dev]"``)::

    python examples/fastapi_app.py [--host 127.0.0.1] [--port 8000]
    uvicorn examples.fastapi_app:app

Then try::

    curl -i -H 'X-Request-ID: order-1' -X POST 'localhost:8000/checkout?sku=boots'
    curl -i localhost:8000/recommendations
    curl -i -H 'X-API-Key: key-acme' localhost:8000/reports/sales
    # with the server and the CLI on one store (RESKIT_STORE=redis://... for both):
    reskit brownout 1                      # /recommendations answers 503, /checkout 200
    reskit kill recommendations --reason test --actor me

Every request gets an ``X-Request-ID`` (the caller's when it is safe to echo,
a new one otherwise), bound for everything the request does: the access log
line, the structlog events, the receipt sent after the response.

``reskit.asgi.ShedMiddleware`` guards three routes, by priority:

- ``/checkout`` is critical: no ``shed_at``, only a bulkhead, so no brownout
  level turns it off;
- ``/recommendations`` is a nice-to-have: ``shed_at=1`` sheds it at the first
  brownout level, and its kill switch turns it off outright;
- ``/reports`` is expensive: each tenant (from its API key, or the
  ``X-Tenant`` header the gateway in front sets) may build two at a time and
  gets 429 beyond that, while other tenants are served; ``shed_at=2`` sheds it
  at the second level.
"""

from __future__ import annotations

import argparse
import itertools
import logging.config
import re
import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import BackgroundTasks, FastAPI, Request

import reskit
from reskit import Bulkhead, KillSwitch, Policy
from reskit.asgi import CorrelationIdMiddleware, ShedMiddleware

log = structlog.get_logger("shop")

#: API keys and the tenants they belong to (a real service looks them up).
API_KEYS = {"key-acme": "acme", "key-globex": "globex"}
# A tenant name as the gateway sets it; anything else is not a tenant.
_TENANT = re.compile(r"[a-z0-9-]{1,64}")

#: stdlib logging with the correlation ID on every line, uvicorn's access log included.
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"correlation_id": {"()": "reskit.CorrelationIdFilter"}},
    "formatters": {
        "line": {"format": "%(levelname)-7s [%(correlation_id)s] %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            # On the handler, not a logger: every record that reaches it gets the ID.
            "filters": ["correlation_id"],
            "formatter": "line",
        },
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
    "root": {"handlers": ["stderr"], "level": "INFO"},
}


def configure_logging() -> None:
    """Configure stdlib logging (:data:`LOGGING`) and structlog on top of it."""
    logging.config.dictConfig(LOGGING)
    structlog.configure(
        processors=[
            # The middleware binds correlation_id in structlog's context variables.
            structlog.contextvars.merge_contextvars,
            structlog.processors.KeyValueRenderer(key_order=["event", "correlation_id"]),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def tenant_from(api_key: str | None, tenant: str | None) -> str | None:
    """The tenant a request belongs to: its API key's owner, else a well-formed ``X-Tenant``."""
    if api_key is not None:
        return API_KEYS.get(api_key)
    if tenant is not None and _TENANT.fullmatch(tenant):
        return tenant
    return None  # shares the default partition, and answers 503 rather than 429


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def tenant_of(scope: Any) -> str | None:
    """``ShedMiddleware``'s ``tenant=``: the tenant of an ASGI request."""
    headers = scope.get("headers", ())
    return tenant_from(_header(headers, b"x-api-key"), _header(headers, b"x-tenant"))


class Shop:
    """Stands in for the services behind the shop: orders, a recommender, a report builder."""

    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def place_order(self, sku: str, quantity: int) -> dict[str, Any]:
        with self._lock:
            order = {"id": f"ord_{next(self._ids)}", "sku": sku, "quantity": quantity}
            self.orders.append(order)
            return order

    def recommend(self) -> list[str]:
        return ["socks", "laces"]

    def build_report(self, tenant: str | None, name: str) -> dict[str, Any]:
        return {"report": name, "tenant": tenant, "rows": 3}


class Mailer:
    """Stands in for an email service; remembers what it sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_receipt(self, order: dict[str, Any]) -> None:
        self.sent.append({"order": order["id"], "correlation_id": reskit.correlation_id()})


def create_app(shop: Shop | None = None, mailer: Mailer | None = None) -> CorrelationIdMiddleware:
    """Build the service around ``shop`` and ``mailer`` (new ones by default).

    Returns the ASGI app with its middleware; the FastAPI app inside is
    ``app.app.app``. Build it after :func:`reskit.configure` when the service
    shares a store.
    """
    backend = shop if shop is not None else Shop()
    outbox = mailer if mailer is not None else Mailer()

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        # Under the uvicorn command line as under main(): the service's own log format.
        configure_logging()
        yield

    api = FastAPI(title="reskit shop", lifespan=lifespan)

    def send_receipt(order: dict[str, Any]) -> None:
        # Runs after the response went out, still under the request's correlation ID.
        outbox.send_receipt(order)
        log.info("receipt.sent", order=order["id"])

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/checkout", status_code=201)
    def checkout(sku: str, background: BackgroundTasks, quantity: int = 1) -> dict[str, Any]:
        order = backend.place_order(sku, quantity)
        log.info("order.placed", order=order["id"], sku=sku)
        background.add_task(send_receipt, order)
        return {**order, "correlation_id": reskit.correlation_id()}

    @api.get("/recommendations")
    def recommendations() -> dict[str, Any]:
        return {"items": backend.recommend()}

    @api.get("/reports/{name}")
    def report(name: str, request: Request) -> dict[str, Any]:
        tenant = tenant_from(request.headers.get("x-api-key"), request.headers.get("x-tenant"))
        log.info("report.started", report=name, tenant=tenant)
        return backend.build_report(tenant, name)

    # Policies are built per app, after the store is configured: a policy follows the
    # switches of the store it was built with.
    routes = {
        "/checkout": Policy("checkout", bulkhead=Bulkhead(max_concurrent=16)),
        "/recommendations": Policy(
            "recommendations",
            shed_at=1,
            kill_switch=KillSwitch(
                "recommendations",
                owner="team-discovery",
                description="hides recommendations; product pages still render",
            ),
        ),
        # With tenant= each tenant gets its own two slots (and /checkout its own 16).
        "/reports": Policy(
            "reports", shed_at=2, bulkhead=Bulkhead(max_concurrent=2, max_partitions=1000)
        ),
    }
    # Correlation IDs outermost: shed requests, errors and 500s all carry the ID.
    return CorrelationIdMiddleware(ShedMiddleware(api, routes=routes, tenant=tenant_of))


app = create_app()


def main() -> None:
    """Serve :data:`app` with uvicorn on 127.0.0.1 (``--port`` to change the port)."""
    parser = argparse.ArgumentParser(description="Serve the reskit FastAPI example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import uvicorn

    configure_logging()
    uvicorn.run(app, host=args.host, port=args.port, log_config=LOGGING)


if __name__ == "__main__":
    main()

"""A single-file Django project behind reskit's WSGI edge middleware.

Run it with (from the repository root, with Django installed, e.g. ``pip install -e ".[dev]"``)::

    python examples/django_app.py [--host 127.0.0.1] [--port 8000]

That is Django's ``runserver`` (without the reloader). Any WSGI server serves
``application`` as well, for instance ``gunicorn examples.django_app:application``.
Then try::

    curl -i -H 'X-Request-ID: pay-1' -X POST 'localhost:8000/payments?amount=500'
    curl -i localhost:8000/feed
    curl -i -H 'X-Tenant: acme' localhost:8000/exports/sales
    # with the server and the CLI on one store (RESKIT_STORE=redis://... for both):
    reskit brownout 1                      # /feed answers 503, /payments 201
    reskit kill feed --reason test --actor me

As in any Django project, the WSGI application from ``get_wsgi_application()``
is what a server runs; here it is wrapped, as ``wsgi.py`` would wrap it, in
:class:`reskit.wsgi.ShedMiddleware` and, outermost,
:class:`reskit.wsgi.CorrelationIdMiddleware`. The routes, by priority:

- ``/payments`` is critical: a bulkhead and no ``shed_at``;
- ``/feed`` is a feature with a kill switch, shed at brownout level 1;
- ``/exports`` lets each tenant (``X-Tenant``, or an ``X-API-Key``'s owner)
  run two exports at a time, 429 beyond that; it is shed at level 2.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
import threading
from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="reskit-example-not-secret",
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
        ROOT_URLCONF=__name__,
        WSGI_APPLICATION=f"{__name__}.application",
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"correlation_id": {"()": "reskit.CorrelationIdFilter"}},
            "formatters": {
                "line": {"format": "%(levelname)-7s [%(correlation_id)s] %(name)s: %(message)s"}
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "filters": ["correlation_id"],
                    "formatter": "line",
                }
            },
            "loggers": {"shop": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
        },
    )
    django.setup()

# Django modules below read the settings when imported: they come after configure().
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

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
    """Stands in for the services behind the views: payments, a feed, exports."""

    def __init__(self) -> None:
        self.payments: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def pay(self, amount: int) -> dict[str, Any]:
        with self._lock:
            payment = {"id": f"pay_{next(self._ids)}", "amount": amount}
            self.payments.append(payment)
            return payment

    def feed(self) -> list[str]:
        return ["new arrivals", "back in stock"]

    def export(self, tenant: str | None, name: str) -> dict[str, Any]:
        return {"export": name, "tenant": tenant, "rows": 3}


class Services:
    """What the views call; :func:`create_app` sets it."""

    shop = Shop()


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_POST
def payments(request: HttpRequest) -> JsonResponse:
    amount = request.GET.get("amount", "")
    if not amount.isdigit() or int(amount) <= 0:
        return JsonResponse({"error": "amount must be a whole number of cents > 0"}, status=400)
    payment = Services.shop.pay(int(amount))
    log.info("payment %s taken", payment["id"])
    return JsonResponse({**payment, "correlation_id": reskit.correlation_id()}, status=201)


@require_GET
def feed(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"items": Services.shop.feed()})


@require_GET
def export(request: HttpRequest, name: str) -> JsonResponse:
    tenant = tenant_from(request.headers.get("X-API-Key"), request.headers.get("X-Tenant"))
    log.info("export %s started for %s", name, tenant)
    return JsonResponse(Services.shop.export(tenant, name))


urlpatterns = [
    path("healthz", healthz),
    path("payments", payments),
    path("feed", feed),
    path("exports/<str:name>", export),
]


def create_app(shop: Shop | None = None) -> CorrelationIdMiddleware:
    """The project's WSGI application, its views calling ``shop`` (a new :class:`Shop` by default).

    Build it after :func:`reskit.configure` when the service shares a store:
    the policies follow the switches of the store they were built with.
    """
    Services.shop = shop if shop is not None else Shop()
    routes = {
        "/payments": Policy("payments", bulkhead=Bulkhead(max_concurrent=16)),
        "/feed": Policy(
            "feed",
            shed_at=1,
            kill_switch=KillSwitch(
                "feed", owner="team-home", description="hides the feed; the home page still loads"
            ),
        ),
        "/exports": Policy(
            "exports", shed_at=2, bulkhead=Bulkhead(max_concurrent=2, max_partitions=1000)
        ),
    }
    return CorrelationIdMiddleware(
        ShedMiddleware(get_wsgi_application(), routes=routes, tenant=tenant_of)
    )


application = create_app()


def main() -> None:
    """Serve :data:`application` with Django's ``runserver`` (``--port`` to change the port)."""
    parser = argparse.ArgumentParser(description="Serve the reskit Django example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    from django.core.management import execute_from_command_line

    # runserver serves settings.WSGI_APPLICATION, the wrapped application above.
    execute_from_command_line(
        [sys.argv[0], "runserver", f"{args.host}:{args.port}", "--noreload", "--skip-checks"]
    )


if __name__ == "__main__":
    main()

"""The admin endpoint under real servers: bearer tokens, audited changes, clear errors.

The ASGI app is mounted in a Starlette app under uvicorn, the WSGI app under
Werkzeug's dispatcher in a threaded WSGI server; each test talks to both with
httpx.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import reskit
import reskit.asgi
import reskit.wsgi
from http_servers import running_uvicorn, running_wsgi
from redis_servers import RedisServer

KINDS = ["asgi", "wsgi"]
ONCALL = "oncall-token-0123456789abcdef"
BOT = "chatops-bot-token-fedcba9876543210"
TOKENS = {ONCALL: "alice (oncall)", BOT: "chatops-bot"}
PREFIX = "/_reskit"


def asgi_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("home")

    admin = reskit.asgi.AdminApp(tokens=TOKENS)
    return Starlette(routes=[Route("/", home), Mount(PREFIX, app=admin)])


def wsgi_app() -> Any:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    def home(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"home"]

    return DispatcherMiddleware(home, {PREFIX: reskit.wsgi.AdminApp(tokens=TOKENS)})


@pytest.fixture(params=KINDS)
def admin(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    running = running_uvicorn(asgi_app()) if request.param == "asgi" else running_wsgi(wsgi_app())
    with running as url, httpx.Client(base_url=url + PREFIX, timeout=10.0) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit() -> list[reskit.AuditEntry]:
    return reskit.current_store().audit()


# -- who may ---------------------------------------------------------------------------------


def test_no_token_is_401_and_changes_nothing(admin: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Basic b25jYWxsOnB3"}, {"Authorization": "Bearer"}):
        response = admin.post("/switches/payments/kill", json={"reason": "x"}, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="reskit"'
        assert response.headers["content-type"] == "application/problem+json"
    assert admin.get("/switches").status_code == 401  # reads need a token too
    assert not reskit.is_killed("payments")
    assert audit() == []


def test_a_wrong_token_is_403_and_changes_nothing(admin: httpx.Client) -> None:
    for token in (ONCALL[:-1], ONCALL + "x", ONCALL.upper(), "short"):
        response = admin.post(
            "/switches/payments/kill", json={"reason": "x"}, headers=bearer(token)
        )
        assert response.status_code == 403
        assert ONCALL not in response.text
    response = admin.put("/brownout", json={"level": 3, "reason": "x"}, headers=bearer("nope"))
    assert response.status_code == 403
    assert not reskit.is_killed("payments")
    assert reskit.brownout_level() == 0
    assert audit() == []


def test_two_authorization_headers_are_refused(admin: httpx.Client) -> None:
    response = admin.get(
        "/switches", headers=[("Authorization", f"Bearer {ONCALL}"), ("Authorization", "Bearer x")]
    )
    assert response.status_code == 401


def test_every_token_is_compared_whatever_the_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    # No early exit: a right guess and a wrong one compare against every token,
    # each in constant time, so timing tells nothing about which tokens exist.
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    core = reskit.asgi.AdminApp(tokens=TOKENS).core
    assert core.actor([f"Bearer {ONCALL}"]) == "alice (oncall)"
    assert len(compared) == len(TOKENS)
    compared.clear()
    with pytest.raises(Exception, match="not allowed"):
        core.actor(["Bearer guess-guess-guess-guess"])
    assert len(compared) == len(TOKENS)
    assert all(len(a) == len(b) == 32 for a, b in compared)  # digests, never raw tokens


@pytest.mark.parametrize("module", [reskit.asgi, reskit.wsgi])
def test_weak_or_missing_tokens_are_refused_at_construction(module: Any) -> None:
    with pytest.raises(TypeError, match="non-empty mapping"):
        module.AdminApp(tokens={})
    with pytest.raises(ValueError, match="at least 16 characters"):
        module.AdminApp(tokens={"password": "alice"})
    with pytest.raises(ValueError, match="needs an actor name"):
        module.AdminApp(tokens={ONCALL: " "})


# -- what they may do ------------------------------------------------------------------------


def test_kill_and_revive_are_audited_with_the_tokens_actor(admin: httpx.Client) -> None:
    killed = admin.post(
        "/switches/payments/kill", json={"reason": "INC-42 card errors"}, headers=bearer(ONCALL)
    )
    assert killed.status_code == 200
    entry = killed.json()["audit"]
    assert entry["actor"] == "alice (oncall)"
    assert entry["reason"] == "INC-42 card errors"
    assert entry["action"] == "kill"
    assert reskit.is_killed("payments")
    listed = admin.get("/switches", headers=bearer(BOT)).json()["switches"]
    assert [(s["name"], s["killed"], s["actor"]) for s in listed] == [
        ("payments", True, "alice (oncall)")
    ]
    revived = admin.post("/switches/payments/revive", json={"reason": "fixed"}, headers=bearer(BOT))
    assert revived.status_code == 200
    assert not reskit.is_killed("payments")
    assert [(e.action, e.actor) for e in audit()] == [
        ("kill", "alice (oncall)"),
        ("revive", "chatops-bot"),
    ]
    assert reskit.current_store().verify_audit().ok


def test_a_kill_with_ttl_and_a_switch_name_needing_escapes(admin: httpx.Client) -> None:
    response = admin.post(
        "/switches/search%20v2%2Fbeta/kill",
        json={"reason": "r", "ttl": 1800},
        headers=bearer(ONCALL),
    )
    assert response.status_code == 200
    assert reskit.is_killed("search v2/beta")
    (info,) = reskit.switches()
    assert info.until is not None


def test_brownout_levels_global_and_per_tenant(admin: httpx.Client) -> None:
    assert admin.get("/brownout", headers=bearer(BOT)).json() == {"tenant": None, "level": 0}
    set_global = admin.put("/brownout", json={"level": 2, "reason": "peak"}, headers=bearer(BOT))
    assert set_global.status_code == 200
    tenant = admin.put(
        "/brownout",
        json={"level": 4, "reason": "abusive", "tenant": "acme"},
        headers=bearer(ONCALL),
    )
    assert tenant.status_code == 200
    assert reskit.brownout_level() == 2
    assert reskit.brownout_level("acme") == 4
    assert admin.get("/brownout?tenant=acme", headers=bearer(BOT)).json() == {
        "tenant": "acme",
        "level": 4,
    }
    cleared = admin.put(
        "/brownout",
        json={"level": None, "reason": "calm", "tenant": "acme"},
        headers=bearer(ONCALL),
    )
    assert cleared.status_code == 200
    assert reskit.brownout_level("acme") == 2


BAD_REQUESTS = [
    ("POST", "/switches/x/kill", b"not json", "JSON object"),
    ("POST", "/switches/x/kill", b"[1, 2]", "JSON object"),
    ("POST", "/switches/x/kill", b"{}", "Missing field(s): reason"),
    ("POST", "/switches/x/kill", b'{"reason": "  "}', "reason must be a non-empty string"),
    ("POST", "/switches/x/kill", b'{"reason": "r", "actor": "mallory"}', "Unknown field"),
    ("POST", "/switches/x/kill", b'{"reason": "r", "ttl": "soon"}', "ttl must be a number"),
    ("POST", "/switches/x/kill", b'{"reason": "r", "ttl": -5}', "ttl"),
    ("POST", "/switches/x/revive", b'{"reason": "r", "ttl": 5}', "Unknown field"),
    ("PUT", "/brownout", b'{"level": "high", "reason": "r"}', "level must be a whole number"),
    ("PUT", "/brownout", b'{"level": 1000, "reason": "r"}', "level"),
    ("PUT", "/brownout", b'{"level": true, "reason": "r"}', "level must be a whole number"),
    ("PUT", "/brownout", b'{"level": 1, "reason": "r", "tenant": 7}', "tenant must be"),
]


@pytest.mark.parametrize(("method", "path", "body", "detail"), BAD_REQUESTS)
def test_bad_requests_say_what_to_change_and_change_nothing(
    admin: httpx.Client, method: str, path: str, body: bytes, detail: str
) -> None:
    response = admin.request(method, path, content=body, headers=bearer(ONCALL))
    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert audit() == []
    assert not reskit.is_killed("x")


def test_routes_and_methods(admin: httpx.Client) -> None:
    assert admin.get("/nowhere", headers=bearer(ONCALL)).status_code == 404
    assert admin.get("/switches/x/kill", headers=bearer(ONCALL)).status_code == 405
    assert admin.delete("/brownout", headers=bearer(ONCALL)).status_code == 405
    assert admin.post("/switches", headers=bearer(ONCALL)).status_code == 405


def test_an_oversized_body_is_413(admin: httpx.Client) -> None:
    body = b'{"reason": "' + b"x" * 70_000 + b'"}'
    response = admin.post("/switches/x/kill", content=body, headers=bearer(ONCALL))
    assert response.status_code == 413
    assert audit() == []


@pytest.mark.redis
def test_a_store_out_of_reach_is_503_and_nothing_changes(
    admin: httpx.Client, server: RedisServer, stores: Callable[..., Any]
) -> None:
    reskit.configure(stores(server.url, timeout="0.5"))
    assert admin.get("/switches", headers=bearer(ONCALL)).status_code == 200
    server.kill()
    response = admin.post("/switches/payments/kill", json={"reason": "r"}, headers=bearer(ONCALL))
    assert response.status_code == 503
    assert response.json()["type"].endswith("admin.md#store-unavailable")

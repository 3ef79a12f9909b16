"""The admin endpoint's decisions, shared by its ASGI and WSGI apps, with no I/O.

Who is asking (a bearer token, compared in constant time), what they ask for
(a route and a JSON body, checked field by field) and how the answer looks are
decided here once; :mod:`reskit.asgi` and :mod:`reskit.wsgi` only read the
request, run the switch function (awaiting it on ASGI) and write the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._http import Problem

__all__ = [
    "MAX_BODY",
    "AdminCore",
    "Operation",
    "answer",
    "call",
    "failed",
    "functions",
    "too_large",
]

#: The largest request body the admin endpoint reads, in bytes.
MAX_BODY = 64 * 1024
#: The shortest token accepted: anything shorter can be guessed.
MIN_TOKEN = 16
_PAGE = "admin.md"
_JSON = [("content-type", "application/json")]


@dataclass(frozen=True, slots=True)
class Operation:
    """What a request asks for: the switch function to run and its arguments."""

    action: str  # switches | kill | revive | brownout | level
    arguments: dict[str, Any]
    changes: bool  # whether it changes anything (and is audited)


def _problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> Problem:
    return Problem(status, slug, title, detail, page=_PAGE, **extra)


class AdminCore:
    """Bearer tokens, routes and body checks of the admin endpoint."""

    __slots__ = ("_tokens",)

    def __init__(self, where: str, tokens: Mapping[str, str]) -> None:
        if not isinstance(tokens, Mapping) or not tokens:
            raise TypeError(
                f"{where} tokens= must be a non-empty mapping of bearer tokens to the names "
                "of who holds them (the audit log's actor), e.g. {os.environ['ADMIN_TOKEN']: "
                "'oncall'}"
            )
        digests: list[tuple[bytes, str]] = []
        for token, actor in tokens.items():
            if not isinstance(token, str) or len(token) < MIN_TOKEN or not token.isascii():
                raise ValueError(
                    f"{where} tokens must be ASCII strings of at least {MIN_TOKEN} characters; "
                    "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            if not isinstance(actor, str) or not actor.strip():
                raise ValueError(f"{where} each token needs an actor name, got {actor!r}")
            digests.append((hashlib.sha256(token.encode()).digest(), actor))
        # Digests, not tokens: comparing equal-length digests takes the same time
        # whatever the guess, and no token sits in memory in the clear beyond here.
        self._tokens = tuple(digests)

    def actor(self, authorization: list[str]) -> str:
        """The actor whose token the request carries; raises a 401 or 403 :class:`Problem`."""
        scheme, token = "", ""
        if len(authorization) == 1:
            scheme, _, token = authorization[0].strip().partition(" ")
        # None, or several (a comma is how a WSGI server joins a repeated header; no
        # bearer token has one), or not a bearer token: the same answer.
        if scheme.lower() != "bearer" or not token.strip() or "," in token:
            raise _problem(
                401,
                "unauthorized",
                "Authentication required",
                "Send one 'Authorization: Bearer <token>' header.",
            )
        guess = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, actor in self._tokens:  # every token, always: no early exit to time
            if hmac.compare_digest(digest, guess):
                found = actor
        if found is None:
            raise _problem(403, "forbidden", "Forbidden", "This token is not allowed here.")
        return found

    def route(self, method: str, path: str, query: str, body: bytes) -> Operation:
        """The operation a request asks for; raises a 4xx :class:`Problem` otherwise."""
        # Every segment counts: a switch named "/api/orders" arrives as
        # "/switches//api/orders/kill" once the server decoded its %2F.
        parts = path.split("/")
        if parts[-1] == "" and len(parts) > 2 and parts[-2] in ("switches", "brownout"):
            parts.pop()  # a trailing slash on a collection
        if parts[:1] != [""]:
            raise _problem(404, "not-found", "Not found", "The admin endpoint has no such route.")
        parts = parts[1:]
        if parts == ["switches"]:
            _allow(method, "GET")
            return Operation("switches", {}, changes=False)
        if len(parts) >= 3 and parts[0] == "switches" and parts[-1] in ("kill", "revive"):
            if parts[1:-1] == [""]:
                raise invalid("Name the switch: /switches/{name}/" + parts[-1])
            _allow(method, "POST")
            # The server has decoded the path: a name with a "/" (sent as %2F) spans
            # several segments, and decoding again would turn "%25" into "%".
            name = "/".join(parts[1:-1])
            action = parts[-1]
            optional = {"ttl"} if action == "kill" else set()
            fields = _fields(body, required={"reason"}, optional=optional)
            arguments: dict[str, Any] = {"name": name, "reason": fields["reason"]}
            if "ttl" in fields:
                arguments["ttl"] = _number(fields["ttl"], "ttl")
            return Operation(action, arguments, changes=True)
        if parts == ["brownout"]:
            if method == "GET":
                return Operation("level", {"tenant": _tenant_of(query)}, changes=False)
            _allow(method, "PUT")
            fields = _fields(body, required={"level", "reason"}, optional={"tenant"})
            level = fields["level"]
            if level is not None and (type(level) is not int):
                raise invalid("level must be a whole number, or null to clear a tenant's level")
            tenant = fields.get("tenant")
            if tenant is not None and not isinstance(tenant, str):
                raise invalid("tenant must be a string or null")
            return Operation(
                "brownout",
                {"level": level, "reason": fields["reason"], "tenant": tenant},
                changes=True,
            )
        raise _problem(404, "not-found", "Not found", "The admin endpoint has no such route.")


def too_large() -> Problem:
    return _problem(
        413, "body-too-large", "Request body too large", f"The most is {MAX_BODY} bytes."
    )


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _problem(
            405, "method-not-allowed", "Method not allowed", f"Use {allowed} on this route."
        )


def invalid(detail: str) -> Problem:
    return _problem(400, "invalid-request", "Invalid request", detail)


def _fields(body: bytes, *, required: set[str], optional: set[str]) -> dict[str, Any]:
    try:
        document = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise invalid("The body must be a JSON object.") from None
    if not isinstance(document, dict):
        raise invalid("The body must be a JSON object.")
    unknown = set(document) - required - optional
    if unknown:
        raise invalid(
            f"Unknown field(s) {', '.join(sorted(map(repr, unknown)))[:200]}; the fields are "
            f"{', '.join(sorted(required | optional))}."
        )
    missing = required - set(document)
    if missing:
        raise invalid(f"Missing field(s): {', '.join(sorted(missing))}.")
    reason = document.get("reason")
    if "reason" in required and (not isinstance(reason, str) or not reason.strip()):
        raise invalid("reason must be a non-empty string: the audit log records why.")
    return document


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{name} must be a number of seconds")
    return float(value)


def _tenant_of(query: str) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(query, keep_blank_values=True).get("tenant")
    if not values:
        return None
    if len(values) != 1:
        raise invalid("Give tenant once.")
    return values[0]


def answer(operation: Operation, result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """The 200 response for a completed operation."""
    document: Any
    if operation.action == "switches":
        document = {"switches": [info.as_dict() for info in result]}
    elif operation.action == "level":
        document = {"tenant": operation.arguments["tenant"], "level": result}
    else:
        document = {"audit": json.loads(result.to_json())}
    body = json.dumps(document, separators=(",", ":")).encode()
    return 200, [*_JSON, ("content-length", str(len(body)))], body


def failed(exc: Exception) -> Problem:
    """The answer to a switch function that refused or could not reach its store."""
    from ._store import StoreUnavailable

    if isinstance(exc, StoreUnavailable):
        return _problem(
            503,
            "store-unavailable",
            "Store unavailable",
            "The switch store could not be reached, so the change may not have been made; "
            "check with GET /switches, then retry.",
        )
    if isinstance(exc, ValueError | TypeError):
        # reskit's own validation messages say what to change; they name no secret.
        return invalid(str(exc)[:500])
    # Anything else is the server's fault, and its message may say more than it should.
    return _problem(500, "failed", "Internal Server Error", "The change failed on the server.")


def functions(asynchronous: bool) -> dict[str, Callable[..., Any]]:
    """The switch functions each action runs (the async ones await the store)."""
    from . import _switches

    if asynchronous:
        return {
            "kill": _switches.akill,
            "revive": _switches.arevive,
            "brownout": _switches.aset_brownout_level,
            "switches": _switches.switches,
            "level": _switches.brownout_level,
        }
    return {
        "kill": _switches.kill,
        "revive": _switches.revive,
        "brownout": _switches.set_brownout_level,
        "switches": _switches.switches,
        "level": _switches.brownout_level,
    }


def call(function: Callable[..., Any], operation: Operation, actor: str) -> Any:
    """Call ``function`` with the operation's arguments (and the actor, for a change)."""
    arguments = dict(operation.arguments)
    if operation.action in ("kill", "revive"):
        return function(arguments.pop("name"), actor=actor, **arguments)
    if operation.action == "brownout":
        return function(arguments.pop("level"), actor=actor, **arguments)
    return function(**arguments)

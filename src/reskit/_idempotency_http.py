"""What the ASGI and WSGI idempotency middleware share: every decision, no I/O.

Both drivers ask the same questions in the same order (does this request carry
a key, is it well formed, is the body small enough, what does the store say)
and record the app's response the same way; only how they read a body and
write a response differs, so only that lives in :mod:`reskit.asgi` and
:mod:`reskit.wsgi`.

A stored response is JSON: ``{"status": 201, "headers": [[name, value], ...],
"body": "<base64>"}``, names and values as latin-1 strings, so any process (and
any language) can read it and a planted record can only ever be data.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from . import _clock, _telemetry
from ._http import DOCS, Problem
from ._idempotency import MAX_KEY_LENGTH, Claim, IdempotencyStore

if TYPE_CHECKING:
    from ._store import Store

#: The methods whose requests are checked for a key unless ``methods=`` says otherwise.
DEFAULT_METHODS = ("POST", "PATCH")
#: How long a stored response is kept, in seconds (Stripe keeps keys at least 24 hours).
DEFAULT_TTL = 86_400.0
#: How long a claim holds without renewal, in seconds; renewed while the app runs.
DEFAULT_LEASE = 30.0
#: The largest request body, in bytes, a request with a key may have (413 above it).
DEFAULT_MAX_BODY = 10 * 1024 * 1024
#: The largest response body, in bytes, that is stored for replay.
DEFAULT_MAX_STORED = 1024 * 1024

HEADER = "Idempotency-Key"
REPLAYED = ("idempotent-replayed", "true")
PROBLEM_TYPE = DOCS + "idempotency.md#"
# Reads are sized so a body over the limit is noticed one chunk past it at most.
READ_SIZE = 64 * 1024

# What a bare (unquoted) key may hold: visible ASCII, except the quote (it opens an
# RFC 8941 string) and the comma (servers join repeated headers with one, so a comma
# is what a repeated header looks like once a WSGI server has folded it).
_BARE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', ","}
# What may stand inside an RFC 8941 string: printable ASCII, space included.
_QUOTED = frozenset(chr(c) for c in range(0x20, 0x7F))


# -- problems (RFC 9457) -----------------------------------------------------------------


def malformed(detail: str) -> Problem:
    return Problem(400, "key-malformed", "Malformed Idempotency-Key header", detail)


def missing() -> Problem:
    return Problem(
        400,
        "key-missing",
        "Idempotency-Key header required",
        "This endpoint needs an Idempotency-Key header: send one per operation, the same on "
        "every retry of it.",
    )


def too_large(max_body: int) -> Problem:
    return Problem(
        413,
        "body-too-large",
        "Request body too large",
        f"A request with an Idempotency-Key may have a body of at most {max_body} bytes.",
    )


def refused(claim: Claim) -> Problem:
    """The answer to a claim that is neither ``claimed`` nor ``replay``."""
    if claim.status == "mismatch":
        return Problem(
            422,
            "key-reused",
            "Idempotency-Key reused",
            "This Idempotency-Key was used with another request (method, path, body or "
            "credentials); use a new key for a new request.",
        )
    retry_after = None
    if claim.lease_until is not None:
        # Whole seconds, at least one: Retry-After has no fractions, and zero invites a spin.
        retry_after = max(1, math.ceil(claim.lease_until - _clock.wall()))
    return Problem(
        409,
        "request-in-progress",
        "Request in progress",
        "A request with this Idempotency-Key is still being processed; retry it later.",
        retry_after=retry_after,
    )


def store_unavailable() -> Problem:
    return Problem(
        503,
        "store-unavailable",
        "Idempotency store unavailable",
        "Idempotency keys cannot be checked right now, so the request was not processed; "
        "retry it later with the same key.",
    )


def handler_failed() -> Problem:
    return Problem(
        500,
        "handler-failed",
        "Internal Server Error",
        "The server failed while processing this request. Retrying with the same "
        "Idempotency-Key returns this response; use a new key to try the operation again.",
    )


# -- the key -------------------------------------------------------------------------------


def parse_key(values: Sequence[str]) -> str | None:
    """The idempotency key in a request's ``Idempotency-Key`` header values, or ``None``.

    Raises :class:`Problem` (400) when the header is repeated, or its value is
    neither an RFC 8941 string (``"abc"``, with ``\\"`` and ``\\\\`` escapes) nor a
    bare token, or the key is empty or longer than 255 characters. The key
    itself is never echoed in the answer.
    """
    if not values:
        return None
    if len(values) > 1:
        raise malformed("Send the Idempotency-Key header once.")
    text = values[0].strip(" \t")
    # Bound the work on a hostile value: every character of a key costs at most two.
    if len(text) > 2 * MAX_KEY_LENGTH + 2:
        raise _too_long()
    if text.startswith('"'):
        key = _unquote(text)
    elif text and all(c in _BARE for c in text):
        key = text
    else:
        raise malformed(
            "The Idempotency-Key header must be an RFC 8941 string (a quoted string of "
            "printable ASCII) or a token of visible ASCII without quotes or commas."
        )
    if not key:
        raise malformed("The Idempotency-Key header must not be empty.")
    if len(key) > MAX_KEY_LENGTH:
        raise _too_long()
    return key


def _too_long() -> Problem:
    return malformed(f"An Idempotency-Key may have at most {MAX_KEY_LENGTH} characters.")


def _unquote(text: str) -> str:
    out: list[str] = []
    i, end = 1, len(text)
    while i < end:
        char = text[i]
        if char == "\\":
            i += 1
            if i == end or text[i] not in '"\\':
                break
            out.append(text[i])
        elif char == '"':
            if i != end - 1:
                break  # something after the closing quote: a list, parameters, or junk
            return "".join(out)
        elif char in _QUOTED:
            out.append(char)
        else:
            break
        i += 1
    raise malformed(
        'The quoted Idempotency-Key must be printable ASCII, with only \\" and \\\\ '
        "escaped, and end at its closing quote."
    )


def authorization_principal(values: Iterable[bytes]) -> str:
    """The default principal: a SHA-256 of the ``Authorization`` header, ``""`` without one.

    Not cookies: a session cookie the first response set comes back on the
    retry, and the retry must be the same principal. Requests without an
    ``Authorization`` header share one key space, so their replays carry no
    ``Set-Cookie`` (see :func:`decode`).
    """
    joined = b"\n".join(values)
    return hashlib.sha256(joined).hexdigest() if joined else ""


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """One middleware's options, validated once."""

    methods: frozenset[str]
    required: bool | Callable[[str, str], bool]
    store: Store | IdempotencyStore | None
    ttl: float
    lease: float
    max_body: int
    max_stored: int

    @classmethod
    def of(
        cls,
        who: str,
        *,
        methods: Iterable[str],
        required: bool | Callable[[str, str], bool],
        store: Store | IdempotencyStore | None,
        ttl: float | timedelta,
        lease: float | timedelta,
        max_body: int,
        max_stored: int,
    ) -> Settings:
        from ._config import seconds

        if isinstance(methods, str):
            raise TypeError(f"{who} methods= must be a collection of names, like ('POST',)")
        names = frozenset(str(m).upper() for m in methods)
        if not names:
            raise ValueError(f"{who} methods= must name at least one method, like ('POST',)")
        if not isinstance(required, bool) and not callable(required):
            raise TypeError(
                f"{who} required= must be True, False or a function (method, path) -> bool"
            )
        for name, value in (("max_body", max_body), ("max_stored", max_stored)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{who} {name}= must be a whole number of bytes >= 0")
        ttl_s = seconds(ttl, f"{who} ttl")
        lease_s = seconds(lease, f"{who} lease", waited=True)
        assert ttl_s is not None
        assert lease_s is not None
        return cls(
            methods=names,
            required=required,
            store=store,
            ttl=ttl_s,
            lease=lease_s,
            max_body=max_body,
            max_stored=max_stored,
        )

    def key(self, method: str, path: str, values: Sequence[str]) -> str | None:
        """The request's key; ``None`` to pass it through; :class:`Problem` to refuse it."""
        key = parse_key(values)
        if key is None and (
            self.required is True or (callable(self.required) and self.required(method, path))
        ):
            raise missing()
        return key

    def check_length(self, declared: str | None) -> None:
        """Refuse a body whose declared length is over the limit before reading a byte."""
        declared = None if declared is None else declared.strip()
        # isascii too: "²".isdigit() is true, and int() refuses it.
        if declared and declared.isascii() and declared.isdigit() and int(declared) > self.max_body:
            raise too_large(self.max_body)


def _framed(*parts: str) -> str:
    # Each part prefixed with its length: no set of parts can spell another set,
    # whatever characters a principal holds, and cheaper than JSON on every request.
    return "".join(f"{len(part)}:{part}" for part in parts)


def store_key(principal: str, key: str) -> str:
    return _framed("reskit.http", principal, key)


def request_fingerprint(method: str, target: str, body_sha256: str, principal: str) -> str:
    framed = _framed("reskit.http", method, target, body_sha256, principal)
    return hashlib.sha256(framed.encode("utf-8", "surrogatepass")).hexdigest()


def check_principal(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"principal= must return a string, got {type(value).__qualname__}")
    return value


# -- responses ---------------------------------------------------------------------------


def encode(status: int, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    record = {
        "status": status,
        "headers": [[name, value] for name, value in headers],
        "body": base64.b64encode(body).decode("ascii"),
    }
    return json.dumps(record, separators=(",", ":")).encode()


#: Headers about one connection, never replayed on another.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)


def _safe_header(text: object) -> bool:
    # A record is data from a shared store: nothing in it may split a header line.
    return isinstance(text, str) and not any(c in text for c in "\r\n\0")


def decode(value: bytes, *, anonymous: bool = False) -> tuple[int, list[tuple[str, str]], bytes]:
    """The response to replay for a stored record, with ``Idempotent-Replayed: true``."""
    try:
        record = json.loads(value)
        status = record["status"]
        if type(status) is not int or not 100 <= status <= 599:
            raise ValueError("bad status")
        if "omitted" in record:
            status, headers, body = Problem(
                500,
                "response-not-stored",
                "Response not stored",
                f"The request with this Idempotency-Key was processed (status {status}), but "
                f"its response ({record['omitted']} bytes) was too large to store for replay. "
                "It was not processed again.",
                original_status=status,
            ).response()
        else:
            headers = []
            for name, text in record["headers"]:
                if not (_safe_header(name) and _safe_header(text)):
                    raise ValueError("bad header")
                name.encode("latin-1")
                text.encode("latin-1")
                if name.lower() in HOP_BY_HOP:
                    continue  # the connection's own, not the response's (WSGI forbids them)
                if anonymous and name.lower() == "set-cookie":
                    # Without a principal, anyone who knows the key gets the replay:
                    # never someone else's session with it.
                    continue
                headers.append((name, text))
            body = base64.b64decode(record["body"], validate=True)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, binascii.Error) as exc:
        _telemetry.report("reading a stored idempotent response", exc)
        status, headers, body = Problem(
            500,
            "record-unreadable",
            "Stored response unreadable",
            "The response stored for this Idempotency-Key cannot be read. It was not "
            "processed again.",
        ).response()
    return status, [*headers, REPLAYED], body


class Recorder:
    """The app's response as it streams past: kept once, for the store, up to a limit."""

    __slots__ = ("chunks", "ended", "headers", "length", "max_stored", "size", "status")

    def __init__(self, max_stored: int) -> None:
        self.max_stored = max_stored
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] | None = []
        self.size = 0
        self.length: int | None = None
        self.ended = False

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = headers
        self.chunks = []
        self.size = 0
        self.length = None
        for name, value in headers:
            if (
                name.lower() == "content-length"
                and value.strip().isascii()
                and value.strip().isdigit()
            ):
                self.length = int(value)

    def add(self, chunk: bytes) -> bool:
        """Record ``chunk``; ``True`` when it completes a response of declared length."""
        self.size += len(chunk)
        if self.chunks is not None:
            if self.size <= self.max_stored:
                self.chunks.append(bytes(chunk))
            else:
                self.chunks = None  # too large to store: stop holding it
        return self.length is not None and self.size >= self.length

    def outcome(self) -> bytes | None:
        """What to store for the response as recorded; ``None`` to release the claim.

        A 4xx is not stored: the client may fix its request and send it again
        with the same key. A response too large to store is stored as a marker
        that replays as a 500 naming the original status: releasing it instead
        would let a retry run the operation a second time.
        """
        self.ended = True
        if self.status is None or 400 <= self.status < 500:
            return None
        if self.chunks is None:
            record = {"status": self.status, "headers": [], "body": "", "omitted": self.size}
            return json.dumps(record, separators=(",", ":")).encode()
        return encode(self.status, self.headers, b"".join(self.chunks))


def failure_record() -> tuple[Problem, bytes]:
    """The 500 an app that raised answers with, and the record that replays it."""
    problem = handler_failed()
    return problem, encode(*problem.response())

"""ASGI middleware: idempotency keys for HTTP APIs, under any ASGI framework.

Pure ASGI, with no framework's middleware base class (Starlette's breaks
contextvars and streaming): wrap any ASGI app, Starlette, FastAPI, Django or
Litestar alike::

    from reskit.asgi import IdempotencyMiddleware

    app = IdempotencyMiddleware(app)

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _idempotency_http as _http
from . import _telemetry
from ._idempotency import IdempotencyStore, _keeper, _lost_claim, aclaim_shielded, store_for

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["IdempotencyMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Server extensions that send a body from a file, past any middleware: hidden from an app
# whose response is recorded, so it sends the body as messages the middleware can see.
_UNSEEN_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend")


class IdempotencyMiddleware:
    """Run each POST or PATCH with an ``Idempotency-Key`` once; replay its response to repeats.

    Follows the IETF Idempotency-Key draft (-07) and what Stripe's API does. A
    request whose method is in ``methods`` and that carries an
    ``Idempotency-Key`` header (an RFC 8941 string, ``"abc"``, or a bare token,
    ``abc``: the same key) is fingerprinted (method, path with query string,
    SHA-256 of the body, principal) and claimed in the store:

    - first time: the app runs, its response streams to the client as it is
      made and is stored once it ends (2xx, 3xx and 5xx; a 4xx is not stored,
      so the client may fix its request and retry with the same key);
    - a repeat gets the stored status, headers and body, ``Set-Cookie``
      included (as Stripe replays the whole response; not for a request
      without an ``Authorization`` header, and never hop-by-hop headers), with
      ``Idempotent-Replayed: true``, without running the app;
    - a repeat while the first still runs gets 409 with ``Retry-After``; the
      same key with another method, path, body or principal gets 422;
    - a key that is malformed, empty, over 255 characters or sent twice gets
      400, and so does a request without a key where ``required`` says one is
      needed; a body over ``max_body`` gets 413; a store that cannot be reached
      gets 503 (the app does not run unchecked).

    Errors are ``application/problem+json`` (RFC 9457). If the app raises, or
    is cancelled, the client gets a 500 that is stored like any 5xx (the
    operation began: a retry must not run it again). If the client disconnects
    before the response ended, the app runs on and its response is recorded
    and stored all the same, so the retry replays it (Stripe's rule: a request
    that began has a result). A claim's lease is renewed while the app runs, so only a
    crashed process's claim expires (after ``lease`` seconds).

    The body is read in full, up to ``max_body`` bytes, before the app runs:
    the fingerprint needs its hash and the claim must come before the app, so
    no design can hand the app a byte before the last one arrived. The app
    then receives the body in the chunks it arrived in. A response body is
    held for the store up to ``max_stored`` bytes; a larger response is
    recorded as too large, and its repeats get a 500 naming the original
    status rather than running the operation again. Requests without a key,
    other methods and non-HTTP scopes (websocket, lifespan) pass through
    untouched.

    Keys are scoped by ``principal``, so one client never receives another's
    response. The default principal is the ``Authorization`` header (hashed);
    an app that authenticates with a session cookie, or that wants keys per
    tenant, must pass its own: all requests without an ``Authorization``
    header otherwise share one key space.

    Args:
        app: the ASGI app to protect.
        methods: the methods whose requests are checked (``POST``, ``PATCH``).
        required: whether a request with one of ``methods`` must carry a key:
            ``False``, ``True``, or a function ``(method, path) -> bool``.
        principal: a function of the ASGI scope returning the string that
            scopes the key (a user or tenant ID).
        store: a reskit store, an :class:`~reskit.stores.IdempotencyStore`, or
            ``None`` for the store configured with :func:`reskit.configure`.
        ttl: seconds (or a ``timedelta``) a response is kept.
        lease: seconds a claim holds without renewal.
        max_body: the largest request body with a key, in bytes.
        max_stored: the largest response body stored for replay, in bytes.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        methods: Iterable[str] = _http.DEFAULT_METHODS,
        required: bool | Callable[[str, str], bool] = False,
        principal: Callable[[Scope], str] | None = None,
        store: Store | IdempotencyStore | None = None,
        ttl: float | timedelta = _http.DEFAULT_TTL,
        lease: float | timedelta = _http.DEFAULT_LEASE,
        max_body: int = _http.DEFAULT_MAX_BODY,
        max_stored: int = _http.DEFAULT_MAX_STORED,
    ) -> None:
        if principal is not None and not callable(principal):
            raise TypeError("IdempotencyMiddleware() principal= must be a function of the scope")
        self.app = app
        self.settings = _http.Settings.of(
            "IdempotencyMiddleware()",
            methods=methods,
            required=required,
            store=store,
            ttl=ttl,
            lease=lease,
            max_body=max_body,
            max_stored=max_stored,
        )
        self.principal = principal if principal is not None else _authorization

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        settings = self.settings
        if scope["type"] != "http" or scope["method"] not in settings.methods:
            await self.app(scope, receive, send)
            return
        try:
            key = settings.key(scope["method"], scope["path"], _header(scope, b"idempotency-key"))
        except _http.Problem as problem:
            await _respond(send, *problem.response())
            return
        if key is None:
            await self.app(scope, receive, send)
            return
        try:
            length = _header(scope, b"content-length")
            settings.check_length(length[0] if length else None)
            body = await _read(receive, settings.max_body)
        except _http.Problem as problem:
            await _respond(send, *problem.response())
            return
        if body is None:
            return  # the client left before its body ended: nothing ran, nobody to answer
        messages, body_hash = body
        principal = _http.check_principal(self.principal(scope))
        store = store_for(settings.store)
        record = _http.store_key(principal, key)
        identity = _http.request_fingerprint(scope["method"], _target(scope), body_hash, principal)
        try:
            claim = await aclaim_shielded(
                store, record, identity, lease=settings.lease, ttl=settings.ttl
            )
        except Exception as exc:
            _telemetry.report("claiming an idempotency key", exc)
            await _respond(send, *_http.store_unavailable().response())
            return
        if claim.status == "replay":
            await _respond(send, *_http.decode(claim.value or b"", anonymous=not principal))
        elif claim.status != "claimed":
            await _respond(send, *_http.refused(claim).response())
        else:
            exchange = _Exchange(store, record, key, claim.token, settings, messages, receive, send)
            await exchange.run(self.app, _recordable(scope))


class _Exchange:
    """One claimed request: the app's receive and send, recorded, and the claim settled once."""

    __slots__ = (
        "buffered",
        "gone",
        "held",
        "key",
        "record",
        "recorder",
        "settled",
        "store",
        "token",
        "ttl",
        "upstream_receive",
        "upstream_send",
    )

    def __init__(
        self,
        store: IdempotencyStore,
        record: str,
        key: str,
        token: int,
        settings: _http.Settings,
        messages: list[Message],
        receive: Receive,
        send: Send,
    ) -> None:
        self.store = store
        self.record = record
        self.key = key
        self.token = token
        self.ttl = settings.ttl
        self.buffered = deque(messages)
        self.upstream_receive = receive
        self.upstream_send = send
        self.recorder = _http.Recorder(settings.max_stored)
        self.settled = False
        self.gone = False  # the client left before the response ended
        self.held = _keeper.hold(store, record, token, settings.lease)

    async def receive(self) -> Message:
        if self.buffered:
            return self.buffered.popleft()
        message = await self.upstream_receive()
        if message["type"] == "http.disconnect" and not self.recorder.ended:
            self.gone = True
        return message

    async def send(self, message: Message) -> None:
        recorder = self.recorder
        kind = message["type"]
        if kind == "http.response.start":
            headers = [
                (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
                for name, value in message.get("headers", ())
            ]
            recorder.start(int(message["status"]), headers)
        elif kind == "http.response.body" and not recorder.ended:
            recorder.add(message.get("body", b""))
            if not message.get("more_body", False):
                # Settled before the last bytes go out: a client that retries the moment
                # it has the response finds it stored, not still in flight.
                await self.settle(recorder.outcome())
        if self.gone:
            return  # the client left: the rest is recorded, not sent
        try:
            await self.upstream_send(message)
        except OSError:
            # The client left mid-response (ASGI 2.4 servers raise here). The app
            # runs on and its response is recorded and stored, as Stripe does once a
            # request began: a retry replays it instead of running it twice.
            self.gone = True

    async def settle(self, value: bytes | None) -> None:
        """Store ``value`` for the key, or release the claim when it is ``None``; once."""
        if self.settled:
            return
        self.settled = True
        _keeper.drop(self.held)
        try:
            if value is None:
                await self.store.arelease(self.record, self.token)
            elif not await self.store.acomplete(self.record, self.token, value, ttl=self.ttl):
                _lost_claim(self.key)
        except Exception as exc:
            # The client's response matters more than the record: report, and answer.
            _telemetry.report("settling an idempotency claim", exc)

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except BaseException:
            if not self.settled:
                # The app began and did not finish (it raised, or was cancelled): its
                # side effects may have half happened, so a 500 is stored (shielded:
                # a cancelled request must still settle). The exception goes on up,
                # to the server's log and any error reporter outside; an HTTP/1
                # server then drops the connection, so the 500 says not to reuse it.
                await asyncio.shield(self.failed(close=scope.get("http_version") in ("1.0", "1.1")))
            raise
        else:
            if not self.settled:
                await self.failed(close=False)  # it returned without finishing its response
        finally:
            _keeper.drop(self.held)

    async def failed(self, *, close: bool) -> None:
        # The app began and did not finish: like Stripe, store a 500, so a retry cannot
        # run an operation that may have half happened. The client gets that 500 when
        # no response had started; else the server cuts the response short.
        problem, record = _http.failure_record()
        await self.settle(record)
        if self.recorder.status is None and not self.gone:
            status, headers, body = problem.response()
            if close:
                headers.append(("connection", "close"))
            try:
                await _respond(self.upstream_send, status, headers, body)
            except OSError:
                pass  # nobody is left to answer


def _header(scope: Scope, name: bytes) -> list[str]:
    return [
        bytes(value).decode("latin-1")
        for key, value in scope.get("headers", ())
        if bytes(key).lower() == name
    ]


def _authorization(scope: Scope) -> str:
    headers = scope.get("headers", ())
    return _http.authorization_principal(
        [bytes(value) for key, value in headers if bytes(key).lower() == b"authorization"]
    )


def _target(scope: Scope) -> str:
    raw = scope.get("raw_path")
    path = bytes(raw).decode("latin-1") if raw else scope.get("root_path", "") + scope["path"]
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return f"{path}?{query}" if query else path


def _recordable(scope: Scope) -> Scope:
    extensions = scope.get("extensions")
    if not extensions or not any(name in extensions for name in _UNSEEN_EXTENSIONS):
        return scope
    kept = {name: value for name, value in extensions.items() if name not in _UNSEEN_EXTENSIONS}
    return {**scope, "extensions": kept}


async def _read(receive: Receive, limit: int) -> tuple[list[Message], str] | None:
    """The request body's messages and SHA-256, or ``None`` if the client left first."""
    messages: list[Message] = []
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _http.too_large(limit)  # at most one chunk past the limit was held
        digest.update(chunk)
        messages.append(message)
        if not message.get("more_body", False):
            return messages, digest.hexdigest()


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})

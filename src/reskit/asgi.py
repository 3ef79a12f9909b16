"""ASGI middleware: correlation IDs, load shedding and idempotency keys, under any framework.

Pure ASGI, with no framework's middleware base class (Starlette's breaks
contextvars and streaming): wrap any ASGI app, Starlette, FastAPI, Django or
Litestar alike::

    from reskit.asgi import CorrelationIdMiddleware, IdempotencyMiddleware, ShedMiddleware

    app = IdempotencyMiddleware(app)
    app = ShedMiddleware(app, routes={"/api": policy})
    app = CorrelationIdMiddleware(app)  # outermost

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _admin, _clock, _edge, _telemetry
from . import _idempotency_http as _http
from ._context import _deadline, enter_correlation_id, exit_correlation_id, new_correlation_id
from ._errors import Rejected, TimeoutExceeded
from ._http import Problem
from ._idempotency import IdempotencyStore, _keeper, _lost_claim, aclaim_shielded, store_for
from ._policy import OuterGates, Queued
from ._timeout import Expiry, expired, grain_for, settle, wheel_for

if TYPE_CHECKING:
    from ._policy import Policy
    from ._store import Store

__all__ = [
    "AdminApp",
    "CorrelationIdMiddleware",
    "DeadlineMiddleware",
    "IdempotencyMiddleware",
    "ShedMiddleware",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# asyncio.current_task is Python code before 3.12: a call that looks up the running
# loop and then reads this dict. Middleware that has the loop reads the dict itself.
_current_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = (
    asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]
    if sys.version_info < (3, 12)
    else asyncio.current_task
)

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
            key = settings.key(
                scope["method"],
                scope["path"],
                _edge.header_values(scope.get("headers", ()), b"idempotency-key"),
            )
        except Problem as problem:
            await _respond(send, *problem.response())
            return
        if key is None:
            await self.app(scope, receive, send)
            return
        try:
            length = _edge.header_values(scope.get("headers", ()), b"content-length")
            settings.check_length(length[0] if length else None)
            body = await _read(
                receive, settings.max_body, lambda: _http.too_large(settings.max_body)
            )
        except Problem as problem:
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


async def _read(
    receive: Receive, limit: int, too_large: Callable[[], Problem]
) -> tuple[list[Message], str] | None:
    """The request body's messages and SHA-256, or ``None`` if the client left first.

    A body over ``limit`` bytes raises ``too_large()``, at most one chunk past it read.
    """
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
            raise too_large()
        digest.update(chunk)
        messages.append(message)
        if not message.get("more_body", False):
            return messages, digest.hexdigest()


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})


# -- correlation IDs ---------------------------------------------------------------------


class CorrelationIdMiddleware:
    """Give every request a correlation ID, bound for its whole life and echoed on its response.

    The ID comes from the request's ``header`` (``X-Request-ID``) when it was
    sent once and matches ``[A-Za-z0-9._-]{1,128}``; anything else (CRLF, NUL,
    markup, 10 KB, a repeated header) is never echoed or logged: a new ID is
    generated instead, or, with ``reject_invalid=True``, the request is answered
    400. With ``from_traceparent=True`` a request without a usable ID takes the
    trace ID of its W3C ``traceparent`` header, so logs and traces share a key.

    While the app runs, the ID is what :func:`reskit.correlation_id` returns,
    is bound in structlog's context variables as ``correlation_id``, is on the
    records that pass a :class:`reskit.CorrelationIdFilter` (uvicorn's access
    log included) and is set as ``reskit.correlation_id`` on the request's
    server span. Exception handlers, background tasks and threads started
    with ``contextvars.copy_context()`` see it; the next request on the same
    connection does not. The header is on every response, and when the app
    raises before it answered, on the 500 this middleware sends in its place
    (the exception then goes on up to the server's log).

    When an OpenTelemetry tracer provider is configured, the request has a
    server span: the OTel ASGI instrumentation's if it is installed (outside
    this middleware), else one reskit starts, continuing the caller's trace.

    Put it outermost, so everything inside (other middleware, error handlers)
    runs with the ID bound. Non-HTTP scopes (websocket, lifespan) pass through.

    Args:
        app: the ASGI app to wrap.
        header: the request and response header that carries the ID.
        from_traceparent: take the ID from ``traceparent`` when the header
            gives none.
        reject_invalid: answer 400 to a request whose header is present but
            invalid, instead of replacing it.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str = _edge.DEFAULT_HEADER,
        from_traceparent: bool = False,
        reject_invalid: bool = False,
    ) -> None:
        self.app = app
        self.settings = _edge.CorrelationSettings(
            "CorrelationIdMiddleware()", header, from_traceparent, reject_invalid
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        name = settings.key
        size = len(name)
        found = None  # the ID header's first value
        more: list[bytes] | None = None  # its other values, when it came more than once
        parents: list[str] | None = None
        for key, raw in scope.get("headers", ()):
            # As in _edge.header_values: the length rules out most names uncopied.
            length = len(key)
            if length == size and (key == name or key.lower() == name):
                if found is None:
                    found = raw
                elif more is None:
                    more = [raw]
                else:
                    more.append(raw)
            elif length == 11 and (key == b"traceparent" or key.lower() == b"traceparent"):
                if parents is None:
                    parents = []
                parents.append(raw.decode("latin-1"))
        try:
            cid = settings.choose(
                () if found is None else (found,) if more is None else (found, *more),
                parents or (),
            )
        except Problem as problem:
            code, answer, body = problem.response()
            answer.append((settings.header, new_correlation_id()))
            await _respond(send, code, answer, body)
            return
        value = cid.encode("ascii")
        answered: list[int] = []  # the status, once the response starts

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
                headers = message.get("headers", ())
                if type(headers) is not list and type(headers) is not tuple:
                    headers = list(headers)  # any iterable, read once
                for pair in headers:
                    if len(pair[0]) == size and pair[0].lower() == name:
                        # The app set the header itself: ours replaces it, never doubles it.
                        headers = [
                            pair
                            for pair in headers
                            if len(pair[0]) != size or pair[0].lower() != name
                        ]
                        break
                message["headers"] = [*headers, (name, value)]
            await send(message)

        tokens = enter_correlation_id(cid)
        error: BaseException | None = None
        span = None
        source = _edge.span_source()
        if source is not None:
            span = _server_span(
                scope, {"reskit.correlation_id": cid}, propagated=parents is not None, source=source
            )
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            error = exc
            if not answered:
                # Nothing answered yet: answer here, where the ID can still be echoed.
                # The exception goes on to the server, which then drops an HTTP/1
                # connection: the answer says so, or a client reusing it gets a reset.
                answered.append(500)
                answer = [
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", "21"),
                    (settings.header, cid),
                ]
                if scope.get("http_version") in ("1.0", "1.1"):
                    answer.append(("connection", "close"))
                await _respond(send, 500, answer, b"Internal Server Error")
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                if span is not None:
                    span.end(answered[0] if answered else None, error)
            finally:
                exit_correlation_id(tokens)


# -- load shedding -----------------------------------------------------------------------


class ShedMiddleware:
    """Apply policies' kill switches, brownout levels and bulkheads to requests, by path.

    ``routes`` maps path prefixes to :class:`~reskit.Policy` objects; a request
    runs under the policy of the longest prefix it is under (``"/api"`` covers
    ``/api`` and ``/api/orders``, not ``/apiary``), admitted as
    ``async with policy.admit(tenant)`` would admit it: the policy's kill
    switch, its brownout ``shed_at`` and its bulkhead (with its adaptive limit,
    which learns from each request's duration) decide before the app runs. A
    request the policy refuses is answered without running the app:

    - 503 with ``Retry-After`` when the feature is killed, the brownout level
      sheds it or the bulkhead is full;
    - 429 with ``Retry-After`` when ``tenant`` is given and that tenant has
      all of its own bulkhead slots in use (its quota) while others are served.

    The body is a small ``application/problem+json`` document naming the
    ``guard`` that refused and the ``policy``; the server span gets
    ``reskit.outcome="rejected"`` and ``reskit.rejected_by``.

    **Priority.** Give routes a priority through ``shed_at``: raising the
    brownout level (``reskit brownout 2``) sheds every route whose
    ``shed_at`` is at or below it and keeps the others, so critical routes
    (no ``shed_at``, or a high one) keep the capacity the others gave up.

    ``tenant`` is a function of the ASGI scope returning a tenant (an API
    key's owner, an account) or ``None``; it partitions each bulkhead (one
    share of slots per tenant) and selects the tenant's own brownout level.

    The app's response is passed through as it is made (streaming is never
    buffered); the bulkhead slot is held until the response has ended. Paths
    under no prefix and non-HTTP scopes (websocket, lifespan) pass through.

    Args:
        app: the ASGI app to protect.
        routes: path prefix to policy; each policy needs a ``kill_switch``,
            ``shed_at`` or ``bulkhead``.
        tenant: a function of the scope returning the request's tenant.
        retry_after: the ``Retry-After`` seconds sent when the guard does not
            know better (a killed feature, a brownout).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, Policy],
        *,
        tenant: Callable[[Scope], str | None] | None = None,
        retry_after: int = _edge.DEFAULT_RETRY_AFTER,
    ) -> None:
        self.app = app
        self.routes = _edge.Routes("ShedMiddleware()", routes)
        if tenant is not None and not callable(tenant):
            raise TypeError("ShedMiddleware() tenant= must be a function of the ASGI scope")
        self.tenant = tenant
        self.retry_after = _edge.check_retry_after("ShedMiddleware()", retry_after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path")
        policy = self.routes.match(_edge.route_path(path, root) if root else path)
        if policy is None:
            await self.app(scope, receive, send)
            return
        key = None if self.tenant is None else _edge.check_tenant(self.tenant(scope))
        source = _edge.span_source()
        span = None if source is None else _server_span(scope, source=source)
        # What policy.admit(key) does, without an object per request (nor its check of
        # a key checked above).
        gates = OuterGates.of(policy)
        try:
            permits = gates.enter(key)
            if isinstance(permits, Queued):
                permits = await gates.enter_queued(key, permits)
        except Rejected as exc:
            problem = _edge.rejection(exc, self.retry_after)
            if span is not None:
                span.set(_edge.rejected_attributes(exc, problem.status))
            try:
                await _respond(send, *problem.response())
            finally:
                if span is not None:
                    span.end(problem.status, None)
            return
        except BaseException as exc:
            # Cancelled (or failed) while queued for a slot: the request still ends its span.
            if span is not None:
                span.end(None, exc)
            raise
        started = _clock.now()
        answered: list[int] = []  # the status, once the response starts
        watch = send
        if span is not None and span.own:
            # Only a span this middleware started needs the status from here; an outer
            # middleware's (or the instrumentation's) span gets it where it was started.

            async def watch(message: Message) -> None:
                if message["type"] == "http.response.start":
                    answered.append(message["status"])
                await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException as exc:
            try:
                gates.leave(permits, started, exc)
            finally:
                if span is not None:
                    span.end(answered[0] if answered else None, exc)
            raise
        try:
            gates.leave(permits, started, None)
        finally:
            if span is not None:
                span.end(answered[0] if answered else None, None)


def _server_span(
    scope: Scope,
    attributes: dict[str, Any] | None = None,
    *,
    propagated: bool = True,
    source: Any,
) -> _edge.ServerSpan | None:
    """The request's server span (see :class:`reskit._edge.ServerSpan`).

    Called only when :func:`reskit._edge.span_source` found something that
    records (``source``); ``propagated=False`` when the request carries no
    ``traceparent`` to continue.
    """
    return _edge.ServerSpan.begin(
        scope["method"],
        scope["path"],
        scope.get("scheme", "http"),
        (lambda: _text_headers(scope)) if propagated else None,
        attributes,
        source,
    )


def _text_headers(scope: Scope) -> dict[str, str]:
    """The request's headers as a dict of text, for the OTel propagator."""
    return {
        bytes(key).decode("latin-1").lower(): bytes(value).decode("latin-1")
        for key, value in scope.get("headers", ())
    }


# -- deadlines ---------------------------------------------------------------------------


class DeadlineMiddleware:
    """Give each request the deadline its caller sent, and stop its work when that runs out.

    A caller sends what is left of its own budget in ``X-Request-Timeout-Ms``
    (whole milliseconds, relative, so the two machines' clocks need not
    agree; reskit's httpx transports send it on every request). The request
    gets that budget, capped by ``maximum``; without a usable header it gets
    ``default``, or no deadline. Inside the request the deadline is reskit's
    own: policies' timeouts shrink to what is left, retries stop when an
    attempt cannot fit, :func:`reskit.remaining_deadline` reports it and
    reskit's transports send the rest on to the next service.

    - A budget already spent on arrival (``0``) is answered 504 without
      running the app.
    - When the budget runs out before the app started its response, the
      app's task is cancelled (its ``finally`` blocks run; a sync handler in a
      thread pool is waited for, since a thread cannot be stopped) and the
      client gets 504 (problem type ``deadline-exceeded``).
    - When it runs out while the response streams, the app is cancelled and
      the response is cut short; the server closes the connection.

    Hostile values (negative, fractions, text, more than ten digits, the
    header sent twice) are ignored, never trusted beyond ``maximum``. The
    server span records ``reskit.deadline.received_ms`` (what the caller
    sent), ``reskit.deadline.budget_ms`` (what the request got) and
    ``reskit.deadline.exceeded``. Non-HTTP scopes pass through.

    Args:
        app: the ASGI app to wrap.
        default: seconds (or a ``timedelta``) a request without a usable
            header gets; ``None`` for no deadline.
        maximum: the most seconds a caller can ask for; ``None`` for no cap.
        header: the header the budget arrives in, in whole milliseconds
            (``x-envoy-expected-rq-timeout-ms`` reads Envoy's).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default: float | timedelta | None = None,
        maximum: float | timedelta | None = None,
        header: str = _edge.DEADLINE_HEADER,
    ) -> None:
        self.app = app
        self.settings = _edge.DeadlineSettings("DeadlineMiddleware()", header, default, maximum)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        deadline = settings.deadline_in(scope.get("headers", ()))
        if deadline is None:
            await self.app(scope, receive, send)
            return
        when, now, received = deadline
        span = None
        source = _edge.span_source()
        if source is not None:
            span = _server_span(scope, settings.attributes(now, when, received), source=source)
        # [status, late]: one cell for the sender below, cheaper than two nonlocals.
        state: list[Any] = [None, False]
        error: BaseException | None = None
        exceeded = when <= now
        try:
            if exceeded:
                state[0] = 504
                await _respond(send, *_edge.deadline_spent(settings.header).response())
                return
            loop = asyncio.get_running_loop()
            task = _current_task(loop)
            assert task is not None
            expiry = Expiry(task)
            bucket = wheel_for(loop).arm(expiry, when, grain_for(when - now))
            token = _deadline.set(when)

            async def watch(message: Message) -> None:
                kind = message["type"]
                if kind == "http.response.start":
                    if expiry.fired:
                        # The budget ran out first (an app that caught its cancellation):
                        # the caller gets the 504, not an answer it no longer waits for.
                        state[1] = True
                        return
                    state[0] = message["status"]
                elif state[1]:
                    return
                elif kind == "http.response.body" and not message.get("more_body", False):
                    # Answered in time. What the app does next (background tasks) is
                    # not the caller's to wait for: no deadline bounds it.
                    bucket.discard(expiry)
                    _deadline.set(None)
                await send(message)

            try:
                await self.app(scope, receive, watch)
            except asyncio.CancelledError:
                if not expired(expiry):
                    raise
                exceeded = True
            except TimeoutExceeded as exc:
                if expiry.fired:
                    await settle(expiry)
                # A deadline error the app let out, once the request's budget is spent,
                # is the request's own: answered like any other run-out budget.
                if exc.kind != "deadline" or state[0] is not None or _clock.now() < when:
                    error = exc
                    raise
                exceeded = True
            except BaseException as exc:
                error = exc
                if expiry.fired:
                    await settle(expiry)
                raise
            finally:
                bucket.discard(expiry)
                _deadline.reset(token)
            if expiry.fired and not exceeded:
                await settle(expiry)
                exceeded = True  # the app caught its cancellation and went on
            if exceeded and state[0] is None:
                state[0] = 504
                await _respond(send, *_edge.deadline_spent(settings.header).response())
            # Past the start of the response, a timed-out app's response is cut short
            # where it stopped: the server closes the connection.
        finally:
            if span is not None:
                span.set(_DEADLINE_EXCEEDED if exceeded else _DEADLINE_MET)
                span.end(state[0], error)


_DEADLINE_EXCEEDED = {"reskit.deadline.exceeded": True}
_DEADLINE_MET = {"reskit.deadline.exceeded": False}


# -- the admin endpoint ------------------------------------------------------------------


class AdminApp:
    """An HTTP endpoint for operators: list switches, kill and revive them, set brownout.

    Mount it under a path of its own, for the people and tools that run the
    service (a runbook's ``curl``, a chat-ops bot), behind the same network
    rules as any admin surface::

        from starlette.routing import Mount

        admin = AdminApp(tokens={os.environ["RESKIT_ADMIN_TOKEN"]: "oncall-bot"})
        app = Starlette(routes=[..., Mount("/_reskit", app=admin)])

    Routes (relative to where it is mounted; bodies and answers are JSON):

    - ``GET /switches``: every known switch (``reskit switches --json``);
    - ``POST /switches/{name}/kill`` with ``{"reason": ..., "ttl": seconds}``
      (``ttl`` optional) and ``POST /switches/{name}/revive`` with
      ``{"reason": ...}``;
    - ``GET /brownout[?tenant=T]``: the level in force;
    - ``PUT /brownout`` with ``{"level": N, "reason": ..., "tenant": T}``
      (``tenant`` optional; ``level`` ``null`` clears a tenant's own level).

    Every request needs ``Authorization: Bearer <token>``: none (or a
    malformed one) is 401 with ``WWW-Authenticate``, an unknown token 403;
    either way nothing changes. Tokens are compared in constant time. Each
    change runs through :func:`reskit.akill`, :func:`reskit.arevive` or
    :func:`reskit.aset_brownout_level`, so it is audited with the token's
    actor and the given reason, and reaches every process sharing the store.
    A change answers ``{"audit": <the audit entry>}``. Errors are
    ``application/problem+json``: 400 for a body that says what to change
    badly (the detail says what), 503 when the store cannot be reached.

    Args:
        tokens: bearer token → the name recorded as the actor of its changes.
            Tokens must be at least 16 characters; give each holder its own.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, tokens: Mapping[str, str]) -> None:
        self.core = _admin.AdminCore("AdminApp()", tokens)
        self.functions = _admin.functions(asynchronous=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            return  # lifespan and websockets: nothing to do here
        try:
            actor = self.core.actor(_edge.header_values(scope.get("headers", ()), b"authorization"))
            read = await _read(receive, _admin.MAX_BODY, _admin.too_large)
            if read is None:
                return  # the client left
            body = b"".join(message.get("body", b"") for message in read[0])
            query = bytes(scope.get("query_string", b"")).decode("latin-1")
            operation = self.core.route(scope["method"], _route_path(scope), query, body)
            function = self.functions[operation.action]
            try:
                if operation.changes:
                    result = await _admin.call(function, operation, actor)
                else:
                    result = await asyncio.to_thread(_admin.call, function, operation, actor)
            except Exception as exc:
                raise _admin.failed(exc) from None
        except Problem as problem:
            status, headers, answer = problem.response()
            if status == 401:
                headers.append(("www-authenticate", 'Bearer realm="reskit"'))
            await _respond(send, status, headers, answer)
            return
        await _respond(send, *_admin.answer(operation, result))


def _route_path(scope: Scope) -> str:
    """The path the app routes: below ``root_path`` (ASGI's ``path`` includes it)."""
    return _edge.route_path(scope["path"], scope.get("root_path", ""))

"""WSGI middleware: idempotency keys for HTTP APIs, under any WSGI framework.

Wrap any WSGI app (Flask, Django, Pyramid, Falcon)::

    from reskit.wsgi import IdempotencyMiddleware

    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app)  # Flask

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import hashlib
import io
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _idempotency_http as _http
from . import _telemetry
from ._idempotency import IdempotencyStore, _keeper, _lost_claim, store_for

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo

    from ._store import Store

__all__ = ["IdempotencyMiddleware"]


class IdempotencyMiddleware:
    """Run each POST or PATCH with an ``Idempotency-Key`` once; replay its response to repeats.

    The WSGI twin of :class:`reskit.asgi.IdempotencyMiddleware`, with the same
    options, status codes and stored records:

    - first time: the app runs, its response streams to the client as the app
      yields it and is stored once it ends (2xx, 3xx and 5xx; a 4xx is not
      stored, so the client may fix its request and retry with the same key);
    - a repeat gets the stored status, headers and body, ``Set-Cookie``
      included (not for a request without an ``Authorization`` header, and
      never hop-by-hop headers), with ``Idempotent-Replayed: true``, without
      running the app;
    - 409 (with ``Retry-After``) while the first still runs, 422 for the same
      key with another method, path, body or principal, 400 for a malformed,
      empty, over-long or repeated key (or a missing one where ``required``),
      413 for a body over ``max_body``, 503 when the store cannot be reached;
      all as ``application/problem+json`` (RFC 9457).

    If the app raises, the client gets a 500 that is stored (the traceback
    goes to ``wsgi.errors``). WSGI has no disconnect event: when the server
    stops iterating the response and calls ``close()`` before its end (the
    client went away and a write failed), the rest of the body is run to its
    end (up to ``max_stored``) and the response stored, so the retry replays
    it instead of running the operation twice, as Stripe does once a request
    began. The response iterable's ``close()`` is always called.

    WSGI servers join a repeated header with commas, so a bare key may not
    contain a comma (quote it): that is how a repeated header is refused
    here. The request body is read in full, up to ``max_body`` bytes, before
    the app runs (its hash is part of the fingerprint and the claim comes
    first); the app reads it from ``wsgi.input`` as usual. A request without
    ``Content-Length`` has no body unless the server sets
    ``wsgi.input_terminated``.

    The default principal is the ``Authorization`` header, hashed (Apache's
    mod_wsgi passes it on only with ``WSGIPassAuthorization On``); an app
    that authenticates with a session cookie must pass ``principal=``.

    Args:
        app: the WSGI app to protect.
        methods: the methods whose requests are checked (``POST``, ``PATCH``).
        required: whether a request with one of ``methods`` must carry a key:
            ``False``, ``True``, or a function ``(method, path) -> bool`` (the
            path is ``SCRIPT_NAME + PATH_INFO``).
        principal: a function of the WSGI environ returning the string that
            scopes the key (a user or tenant ID).
        store: a reskit store, an :class:`~reskit.stores.IdempotencyStore`, or
            ``None`` for the store configured with :func:`reskit.configure`.
        ttl: seconds (or a ``timedelta``) a response is kept.
        lease: seconds a claim holds without renewal.
        max_body: the largest request body with a key, in bytes.
        max_stored: the largest response body stored for replay, in bytes;
            a larger one replays as a 500 naming the original status.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        methods: Iterable[str] = _http.DEFAULT_METHODS,
        required: bool | Callable[[str, str], bool] = False,
        principal: Callable[[WSGIEnvironment], str] | None = None,
        store: Store | IdempotencyStore | None = None,
        ttl: float | timedelta = _http.DEFAULT_TTL,
        lease: float | timedelta = _http.DEFAULT_LEASE,
        max_body: int = _http.DEFAULT_MAX_BODY,
        max_stored: int = _http.DEFAULT_MAX_STORED,
    ) -> None:
        if principal is not None and not callable(principal):
            raise TypeError("IdempotencyMiddleware() principal= must be a function of the environ")
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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one WSGI request."""
        settings = self.settings
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        if method not in settings.methods:
            return self.app(environ, start_response)
        raw = environ.get("HTTP_IDEMPOTENCY_KEY")
        try:
            key = settings.key(method, _path(environ), [] if raw is None else [raw])
        except _http.Problem as problem:
            return _respond(start_response, *problem.response())
        if key is None:
            return self.app(environ, start_response)
        try:
            settings.check_length(environ.get("CONTENT_LENGTH"))
            body, body_hash = _read(environ, settings.max_body)
        except _http.Problem as problem:
            return _respond(start_response, *problem.response())
        # The app reads the body the middleware already read, as if from the client.
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        principal = _http.check_principal(self.principal(environ))
        store = store_for(settings.store)
        record = _http.store_key(principal, key)
        identity = _http.request_fingerprint(method, _target(environ), body_hash, principal)
        try:
            claim = store.claim(record, identity, lease=settings.lease, ttl=settings.ttl)
        except Exception as exc:
            _telemetry.report("claiming an idempotency key", exc)
            return _respond(start_response, *_http.store_unavailable().response())
        if claim.status == "replay":
            return _respond(
                start_response, *_http.decode(claim.value or b"", anonymous=not principal)
            )
        if claim.status != "claimed":
            return _respond(start_response, *_http.refused(claim).response())
        exchange = _Exchange(store, record, key, claim.token, settings, environ, start_response)
        return exchange.run(self.app)


class _Exchange:
    """One claimed request: the app's response, recorded, and the claim settled once."""

    __slots__ = (
        "environ",
        "gone",
        "held",
        "key",
        "record",
        "recorder",
        "sent",
        "settled",
        "store",
        "token",
        "ttl",
        "upstream_start",
    )

    def __init__(
        self,
        store: IdempotencyStore,
        record: str,
        key: str,
        token: int,
        settings: _http.Settings,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> None:
        self.store = store
        self.record = record
        self.key = key
        self.token = token
        self.ttl = settings.ttl
        self.environ = environ
        self.upstream_start = start_response
        self.recorder = _http.Recorder(settings.max_stored)
        self.settled = False
        self.sent = False  # a byte went to the server: the status and headers are out
        self.gone = False  # a write to the client failed before the response ended
        self.held = _keeper.hold(store, record, token, settings.lease)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.recorder.start(int(status.split(None, 1)[0]), [(str(n), str(v)) for n, v in headers])
        if exc_info is None:
            write = self.upstream_start(status, headers)
        else:
            write = self.upstream_start(status, headers, exc_info)

        def recording_write(data: bytes) -> object:
            self.feed(data)
            if self.gone:
                return None
            try:
                return write(data)
            except OSError:
                # The client left: the app writes on, recorded and stored, so a
                # retry replays its result instead of running it twice.
                self.gone = True
                return None

        return recording_write

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self.sent = True
            if not self.recorder.ended and self.recorder.add(chunk):
                # The declared length is reached: settled before the last bytes go out, so
                # a client that retries the moment it has the response finds it stored.
                self.settle(self.recorder.outcome())

    def settle(self, value: bytes | None) -> None:
        """Store ``value`` for the key, or release the claim when it is ``None``; once."""
        if self.settled:
            return
        self.settled = True
        _keeper.drop(self.held)
        try:
            if value is None:
                self.store.release(self.record, self.token)
            elif not self.store.complete(self.record, self.token, value, ttl=self.ttl):
                _lost_claim(self.key)
        except Exception as exc:
            # The client's response matters more than the record: report, and answer.
            _telemetry.report("settling an idempotency claim", exc)

    def run(self, app: WSGIApplication) -> Iterable[bytes]:
        try:
            result = app(self.environ, self.start_response)
        except Exception:
            return [self.failed()]
        except BaseException:
            # Interrupted once it began (KeyboardInterrupt, SystemExit): stored as a
            # failure like any other, for it may have half run.
            self.settle(_http.failure_record()[1])
            raise
        return _Body(self, result)

    def failed(self) -> bytes:
        """The 500 body for an app that raised, stored like any 5xx (it may have half run)."""
        exc_info = sys.exc_info()
        assert exc_info[1] is not None
        problem, record = _http.failure_record()
        self.settle(record)
        if self.sent:
            raise exc_info[1]  # the response is half out: only the server can end it
        errors = self.environ.get("wsgi.errors")
        if errors is not None:
            _telemetry.guard(
                "writing to wsgi.errors", traceback.print_exception, exc_info[1], file=errors
            )
        status, headers, body = problem.response()
        # With exc_info, start_response may replace headers the app set but that were not sent.
        self.upstream_start(_http.status_line(status), headers, exc_info)
        return body


class _Body:
    """The app's response iterable, recorded as the server iterates it."""

    __slots__ = ("done", "exchange", "iterator", "result")

    def __init__(self, exchange: _Exchange, result: Iterable[bytes]) -> None:
        self.exchange = exchange
        self.result = result
        self.iterator: Iterator[bytes] | None = None
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        exchange = self.exchange
        if self.done:
            raise StopIteration
        try:
            if self.iterator is None:
                self.iterator = iter(self.result)
            chunk = next(self.iterator)
        except StopIteration:
            self.done = True
            # A response without a declared length ends here, before the server ends it
            # for the client (the last chunk, or closing the connection).
            exchange.settle(exchange.recorder.outcome())
            raise
        except Exception:
            self.done = True
            return exchange.failed()
        except BaseException:
            self.done = True
            exchange.settle(_http.failure_record()[1])
            raise
        exchange.feed(chunk)
        return chunk

    def close(self) -> None:
        exchange = self.exchange
        try:
            if not self.done:
                # Closed before its end: the server stopped sending (the client left).
                # The rest of the body is the app's work all the same: run it to its
                # end and store the response, so a retry replays it, as Stripe does.
                self._drain()
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            exchange.settle(_http.failure_record()[1])  # no-op once the body ended
            _keeper.drop(exchange.held)

    def _drain(self) -> None:
        exchange = self.exchange
        exchange.gone = True
        try:
            for chunk in self:
                del chunk  # recorded by __next__; nobody to send it to
                if exchange.recorder.chunks is None:
                    # Past max_stored, the rest could not be replayed anyway, and an
                    # endless body would hold this thread forever: stop here (the
                    # response is stored as too large to replay).
                    exchange.settle(exchange.recorder.outcome())
                    break
        except Exception as exc:
            _telemetry.report("finishing a response after its client left", exc)


def _authorization(environ: WSGIEnvironment) -> str:
    value = environ.get("HTTP_AUTHORIZATION")
    return _http.authorization_principal([] if value is None else [value.encode("latin-1")])


def _path(environ: WSGIEnvironment) -> str:
    return str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))


def _target(environ: WSGIEnvironment) -> str:
    query = environ.get("QUERY_STRING", "")
    path = _path(environ)
    return f"{path}?{query}" if query else path


def _read(environ: WSGIEnvironment, limit: int) -> tuple[bytes, str]:
    """The request body and its SHA-256, read in chunks up to ``limit`` bytes."""
    stream: Any = environ["wsgi.input"]
    declared = str(environ.get("CONTENT_LENGTH") or "").strip()
    length: int | None
    if declared.isascii() and declared.isdigit():
        length = int(declared)
    elif environ.get("wsgi.input_terminated"):
        length = None  # read to the end; the server ends the stream where the body ends
    else:
        length = 0  # PEP 3333: without a length there is no body to read
    chunks: list[bytes] = []
    digest = hashlib.sha256()
    size = 0
    while length is None or size < length:
        want = _http.READ_SIZE if length is None else min(_http.READ_SIZE, length - size)
        chunk = stream.read(want)
        if not chunk:
            if length is None:
                break
            raise _http.Problem(
                400,
                "body-incomplete",
                "Request body incomplete",
                f"The request declared {length} bytes of body and sent {size}.",
            )
        size += len(chunk)
        if size > limit:
            raise _http.too_large(limit)  # at most one chunk past the limit was held
        digest.update(chunk)
        chunks.append(chunk)
    return b"".join(chunks), digest.hexdigest()


def _respond(
    start_response: StartResponse, status: int, headers: list[tuple[str, str]], body: bytes
) -> list[bytes]:
    start_response(_http.status_line(status), headers)
    return [body]

"""WSGI middleware: correlation IDs, load shedding and idempotency keys, under any framework.

Wrap any WSGI app (Flask, Django, Pyramid, Falcon)::

    from reskit.wsgi import CorrelationIdMiddleware, IdempotencyMiddleware, ShedMiddleware

    app.wsgi_app = CorrelationIdMiddleware(  # Flask; outermost
        ShedMiddleware(IdempotencyMiddleware(app.wsgi_app), routes={"/api": policy})
    )

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _admin, _clock, _edge, _telemetry
from . import _idempotency_http as _http
from ._context import _deadline, adopt_correlation_id, new_correlation_id
from ._errors import Rejected
from ._http import Problem, status_line
from ._idempotency import IdempotencyStore, _keeper, _lost_claim, store_for

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo

    from ._policy import Admission, Policy
    from ._store import Store

__all__ = [
    "AdminApp",
    "CorrelationIdMiddleware",
    "DeadlineMiddleware",
    "IdempotencyMiddleware",
    "ShedMiddleware",
]


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
        except Problem as problem:
            return _respond(start_response, *problem.response())
        if key is None:
            return self.app(environ, start_response)
        try:
            settings.check_length(environ.get("CONTENT_LENGTH"))
            body, body_hash = _read(environ, settings.max_body)
        except Problem as problem:
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
        self.upstream_start(status_line(status), headers, exc_info)
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
            raise Problem(
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
    start_response(status_line(status), headers)
    return [body]


# -- correlation IDs ---------------------------------------------------------------------


class CorrelationIdMiddleware:
    """Give every request a correlation ID, bound for its whole life and echoed on its response.

    The WSGI twin of :class:`reskit.asgi.CorrelationIdMiddleware`, with the
    same arguments and rules. Each request runs in a copy of the server
    thread's context (the app call and every step of its response iterable),
    so the ID cannot outlive the request even under a server that reuses
    threads. When the app raises before it started its response, the
    traceback goes to ``wsgi.errors`` (as the server would have written it)
    and the client gets a 500 that carries the ID.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        header: str = _edge.DEFAULT_HEADER,
        from_traceparent: bool = False,
        reject_invalid: bool = False,
    ) -> None:
        self.app = app
        self.settings = _edge.CorrelationSettings(
            "CorrelationIdMiddleware()", header, from_traceparent, reject_invalid
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request."""
        settings = self.settings
        raw = environ.get(settings.wsgi_key)
        try:
            cid = settings.choose(
                [] if raw is None else [raw], _environ_values(environ, "HTTP_TRACEPARENT")
            )
        except Problem as problem:
            status, headers, body = problem.response()
            headers.append((settings.header, new_correlation_id()))
            return _respond(start_response, status, headers, body)
        context = contextvars.copy_context()
        return context.run(self._run, context, cid, environ, start_response)

    def _run(
        self,
        context: contextvars.Context,
        cid: str,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        # Bound in a context of the request's own, so nothing needs undoing.
        adopt_correlation_id(cid)
        header = self.settings.header
        lower = header.lower()
        span = _edge.ServerSpan.begin(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("PATH_INFO", ""),
            environ.get("wsgi.url_scheme", "http"),
            (lambda: _text_headers(environ)) if "HTTP_TRACEPARENT" in environ else None,
            {"reskit.correlation_id": cid},
        )
        exchange = _Watched(span)

        def start_with_id(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            exchange.status = _status_code(status)
            kept = [(name, value) for name, value in headers if name.lower() != lower]
            kept.append((header, cid))
            return start_response(status, kept, exc_info)

        def fail(exc: Exception) -> bytes:
            """Answer 500 with the ID for an app that raised before its first byte went out."""
            errors = environ.get("wsgi.errors")
            if errors is not None:
                _telemetry.guard(
                    "writing to wsgi.errors", traceback.print_exception, exc, file=errors
                )
            exchange.finish(exc, status=500)
            body = b"Internal Server Error"
            # With exc_info, start_response may replace headers the app set but not sent.
            start_response(
                "500 Internal Server Error",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    (header, cid),
                ],
                sys.exc_info(),  # called while the exception is handled
            )
            return body

        try:
            result = self.app(environ, start_with_id)
        except Exception as exc:
            return [fail(exc)]
        except BaseException as exc:
            exchange.finish(exc)
            raise
        return _InContext(context, result, exchange, fail)


class _Watched:
    """A request's response status and its server span, ended once."""

    __slots__ = ("deadline", "ended", "span", "status")

    def __init__(self, span: _edge.ServerSpan | None, deadline: float | None = None) -> None:
        self.span = span
        self.deadline = deadline
        self.status: int | None = None
        self.ended = False

    def watching(self, start_response: StartResponse) -> StartResponse:
        """``start_response``, noting the status for the span."""

        def watched(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            self.status = _status_code(status)
            return start_response(status, headers, exc_info)

        return watched

    def finish(self, exc: BaseException | None, status: int | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        if span is None:
            return
        if self.deadline is not None:
            span.set({"reskit.deadline.exceeded": _clock.now() >= self.deadline})
        span.end(status if status is not None else self.status, exc)


class _InContext:
    """The app's response iterable, each step (and the end of its span) in the request's context.

    With ``fail`` given, a response that raises before its first chunk is
    answered by ``fail`` (a 500 the middleware can still shape) instead of
    the server's own error page.
    """

    __slots__ = ("context", "exchange", "fail", "iterator", "result", "started")

    def __init__(
        self,
        context: contextvars.Context,
        result: Iterable[bytes],
        exchange: _Watched,
        fail: Callable[[Exception], bytes] | None = None,
    ) -> None:
        self.context = context
        self.result = result
        self.exchange = exchange
        self.fail = fail
        self.iterator: Iterator[bytes] | None = None
        self.started = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            if self.iterator is None:
                self.iterator = self.context.run(iter, self.result)
            chunk = self.context.run(next, self.iterator)
        except StopIteration:
            raise
        except Exception as exc:
            if self.fail is not None and not self.started:
                self.started = True
                return self.context.run(self.fail, exc)
            self.context.run(self.exchange.finish, exc)
            raise
        except BaseException as exc:
            self.context.run(self.exchange.finish, exc)
            raise
        self.started = True
        return chunk

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                self.context.run(close)
        finally:
            self.context.run(self.exchange.finish, None)


# -- load shedding -----------------------------------------------------------------------


class ShedMiddleware:
    """Apply policies' kill switches, brownout levels and bulkheads to requests, by path.

    The WSGI twin of :class:`reskit.asgi.ShedMiddleware`, with the same
    arguments and answers; ``tenant`` is a function of the WSGI environ and
    paths are matched against ``PATH_INFO`` (the path the app sees). A queued
    request (a bulkhead with ``max_waiting``) waits in its server thread. The
    bulkhead slot is held until the server closes the response iterable, so a
    streamed response counts for as long as it streams.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        routes: Mapping[str, Policy],
        *,
        tenant: Callable[[WSGIEnvironment], str | None] | None = None,
        retry_after: int = _edge.DEFAULT_RETRY_AFTER,
    ) -> None:
        self.app = app
        self.routes = _edge.Routes("ShedMiddleware()", routes, wsgi=True)
        if tenant is not None and not callable(tenant):
            raise TypeError("ShedMiddleware() tenant= must be a function of the WSGI environ")
        self.tenant = tenant
        self.retry_after = _edge.check_retry_after("ShedMiddleware()", retry_after)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request."""
        path = environ.get("PATH_INFO", "")
        policy = self.routes.match(path)
        if policy is None:
            return self.app(environ, start_response)
        key = None if self.tenant is None else _edge.check_tenant(self.tenant(environ))
        span = _edge.ServerSpan.begin(
            environ.get("REQUEST_METHOD", "GET"),
            path,
            environ.get("wsgi.url_scheme", "http"),
            lambda: _text_headers(environ),
        )
        exchange = _Watched(span)
        admission = policy.admit(key)
        try:
            admission.__enter__()
        except Rejected as exc:
            problem = _edge.rejection(exc, self.retry_after)
            if span is not None:
                span.set(_edge.rejected_attributes(exc, problem.status))
            exchange.finish(None, status=problem.status)
            return _respond(start_response, *problem.response())
        if span is not None:
            start_response = exchange.watching(start_response)

        try:
            result = self.app(environ, start_response)
        except BaseException as exc:
            try:
                admission.__exit__(type(exc), exc, exc.__traceback__)
            finally:
                exchange.finish(exc)
            raise
        return _Admitted(result, admission, exchange)


class _Admitted:
    """The app's response iterable; the admission ends when the server closes it."""

    __slots__ = ("admission", "exchange", "iterator", "result")

    def __init__(self, result: Iterable[bytes], admission: Admission, exchange: _Watched) -> None:
        self.result = result
        self.admission: Admission | None = admission
        self.exchange = exchange
        self.iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            if self.iterator is None:
                self.iterator = iter(self.result)
            return next(self.iterator)
        except StopIteration:
            raise
        except BaseException as exc:
            self._end(exc)
            raise

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        admission, self.admission = self.admission, None
        if admission is None:
            return
        try:
            admission.__exit__(None if exc is None else type(exc), exc, None)
        finally:
            self.exchange.finish(exc)


def _status_code(status: str) -> int | None:
    try:
        return int(status[:3])
    except ValueError:
        return None


def _environ_values(environ: WSGIEnvironment, key: str) -> list[str]:
    value = environ.get(key)
    return [] if value is None else [value]


def _text_headers(environ: WSGIEnvironment) -> dict[str, str]:
    """The request's headers as a dict of text, for the OTel propagator."""
    return {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and isinstance(value, str)
    }


# -- deadlines ---------------------------------------------------------------------------


class DeadlineMiddleware:
    """Give each request the deadline its caller sent; cooperative, as WSGI must be.

    The WSGI twin of :class:`reskit.asgi.DeadlineMiddleware`, with the same
    arguments and header rules. A budget already spent on arrival is
    answered 504 without running the app. Otherwise the request runs with
    reskit's deadline set (in a context of its own, for the app call and
    every step of its response iterable): policies inside shrink their
    timeouts to it, retries stop when an attempt cannot fit,
    :func:`reskit.remaining_deadline` reports it and reskit's transports send
    it on. A thread cannot be interrupted, so code that does not look at the
    deadline runs to its end; the server span records whether it ran out.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        default: float | timedelta | None = None,
        maximum: float | timedelta | None = None,
        header: str = _edge.DEADLINE_HEADER,
    ) -> None:
        self.app = app
        self.settings = _edge.DeadlineSettings("DeadlineMiddleware()", header, default, maximum)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request."""
        settings = self.settings
        deadline = settings.deadline(_environ_values(environ, settings.wsgi_key))
        if deadline is None:
            return self.app(environ, start_response)
        # The span, the deadline and the app all live in a context of the request's own:
        # a span begun in the server thread's context would outlive the request there.
        context = contextvars.copy_context()
        return context.run(self._run, context, *deadline, environ, start_response)

    def _run(
        self,
        context: contextvars.Context,
        when: float,
        now: float,
        received: float | None,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        span = None
        source = _edge.span_source()
        if source is not None:
            span = _edge.ServerSpan.begin(
                environ.get("REQUEST_METHOD", "GET"),
                environ.get("PATH_INFO", ""),
                environ.get("wsgi.url_scheme", "http"),
                lambda: _text_headers(environ),
                self.settings.attributes(now, when, received),
                source,
            )
        exchange = _Watched(span, when)
        if when <= now:
            exchange.finish(None, status=504)
            spent = _edge.deadline_spent(self.settings.header)
            return _respond(start_response, *spent.response())
        _deadline.set(when)
        if span is not None:
            start_response = exchange.watching(start_response)
        try:
            result = self.app(environ, start_response)
        except BaseException as exc:
            exchange.finish(exc)
            raise
        return _InContext(context, result, exchange)


# -- the admin endpoint ------------------------------------------------------------------


class AdminApp:
    """An HTTP endpoint for operators: list switches, kill and revive them, set brownout.

    The WSGI twin of :class:`reskit.asgi.AdminApp`, with the same routes,
    tokens and answers. Mount it with your framework's dispatcher (Werkzeug's
    ``DispatcherMiddleware``, a Django URL that hands the environ on); paths
    are read from ``PATH_INFO``, below the ``SCRIPT_NAME`` it is mounted at.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, tokens: Mapping[str, str]) -> None:
        self.core = _admin.AdminCore("AdminApp()", tokens)
        self.functions = _admin.functions(asynchronous=False)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request."""
        try:
            actor = self.core.actor(_environ_values(environ, "HTTP_AUTHORIZATION"))
            body = _admin_body(environ)
            operation = self.core.route(
                environ.get("REQUEST_METHOD", "GET"),
                # PEP 3333 hands the path over as latin-1 text of the URL's bytes.
                environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace"),
                environ.get("QUERY_STRING", ""),
                body,
            )
            try:
                result = _admin.call(self.functions[operation.action], operation, actor)
            except Exception as exc:
                raise _admin.failed(exc) from None
        except Problem as problem:
            status, headers, answer = problem.response()
            if status == 401:
                headers.append(("WWW-Authenticate", 'Bearer realm="reskit"'))
            return _respond(start_response, status, headers, answer)
        return _respond(start_response, *_admin.answer(operation, result))


def _admin_body(environ: WSGIEnvironment) -> bytes:
    """The request body, refused past the admin endpoint's limit."""
    declared = environ.get("CONTENT_LENGTH") or "0"
    try:
        length = int(declared)
    except ValueError:
        length = -1
    if length < 0:
        raise _admin.invalid("Content-Length must be a whole number of bytes.")
    if length > _admin.MAX_BODY:
        raise _admin.too_large()
    stream = environ.get("wsgi.input")
    if not length or stream is None:
        return b""
    body: bytes = stream.read(length)
    return body

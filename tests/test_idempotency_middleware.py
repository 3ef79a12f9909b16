"""The idempotency middleware under real servers: uvicorn (ASGI) and threaded wsgiref (WSGI).

Every behaviour is checked on both: one set of endpoints (:class:`Backend`) is
served by an ASGI app and by a WSGI app, each behind its middleware, and each
test runs against both through a real httpx client. Handlers that must be
caught mid-flight block on events the test sets; nothing waits for time.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

import reskit.asgi
import reskit.wsgi
from http_servers import running_uvicorn, running_wsgi
from reskit import _idempotency_http
from reskit._http import Problem, status_line
from reskit.stores import MemoryIdempotencyStore

WAIT = 10.0  # seconds an expected event may take before the test fails
PROBLEM = "application/problem+json"


# -- the endpoints, served by an ASGI and a WSGI app -----------------------------------------


class Backend:
    """What both apps serve, the calls they received and the events tests steer them with.

    ``POST /charges``: 201 with the call number, the body and the caller's
    Authorization, and a cookie. ``/validate``: 422 unless the body mentions
    an amount. ``/down``: 503. ``/crash``: raises. ``/slow``: waits for
    ``proceed``. ``/stream``: sends a first chunk, waits for ``proceed``, sends
    the rest. ``/big``: 100 KiB. ``/hang``: the first call waits for its client
    to go away; later calls answer 201.
    """

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.read: collections.Counter[str] = collections.Counter()
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self._lock = threading.Condition()

    def called(self, path: str) -> int:
        with self._lock:
            self.calls[path] += 1
            return self.calls[path]

    def done(self, path: str) -> None:
        with self._lock:
            self.finished[path] += 1
            self._lock.notify_all()

    def count_read(self, path: str, size: int) -> None:
        with self._lock:
            self.read[path] += size

    def wait_finished(self, path: str, count: int) -> None:
        """Block until the middleware has finished ``count`` requests to ``path``."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.finished[path] >= count, WAIT):
                raise AssertionError(f"{path} did not finish {count} time(s)")

    def answer(
        self, path: str, call: int, body: bytes, auth: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers = 201, [("content-type", "application/json")]
        if path == "/charges":
            headers.append(("set-cookie", f"session=s{call}"))
            document: dict[str, Any] = {"charge": call, "body": body.decode(), "auth": auth}
        elif path == "/validate" and b"amount" not in body:
            status, document = 422, {"error": "amount is required", "call": call}
        elif path == "/down":
            status, document = 503, {"error": "down", "call": call}
        elif path == "/big":
            status, headers = 200, [("content-type", "application/octet-stream")]
            content = bytes(range(256)) * 400
            return status, [*headers, ("content-length", str(len(content)))], content
        else:
            document = {"path": path, "call": call}
        content = json.dumps(document).encode()
        return status, [*headers, ("content-length", str(len(content)))], content


def asgi_app(backend: Backend) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        call = backend.called(path)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        if path == "/crash":
            raise RuntimeError("the handler crashed")
        if path == "/slow":
            backend.entered.set()
            await asyncio.to_thread(backend.proceed.wait, WAIT)
        if path == "/hang" and call == 1:
            backend.entered.set()
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        if path == "/stream":
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            await send({"type": "http.response.body", "body": b"first;", "more_body": True})
            await asyncio.to_thread(backend.proceed.wait, WAIT)
            await send({"type": "http.response.body", "body": b"second;", "more_body": True})
            await send({"type": "http.response.body", "body": b"third"})
            return
        status, headers, content = backend.answer(path, call, body, auth)
        raw = [(name.encode(), value.encode()) for name, value in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})

    return app


def asgi_outer(backend: Backend, inner: Any) -> Any:
    """Counts the body bytes the middleware reads and tells when it has finished."""

    async def outer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")

        async def counting_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            backend.count_read(path, len(message.get("body", b"")))
            return message

        try:
            await inner(scope, counting_receive, send)
        finally:
            backend.done(path)

    return outer


def wsgi_app(backend: Backend) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        path = environ["PATH_INFO"]
        call = backend.called(path)
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if path == "/crash":
            raise RuntimeError("the handler crashed")
        if path == "/slow":
            backend.entered.set()
            backend.proceed.wait(WAIT)
        if path == "/hang" and call == 1:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return hang()
        if path == "/stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return stream()
        status, headers, content = backend.answer(path, call, body, auth)
        start_response(status_line(status), headers)
        return [content]

    def stream() -> Iterator[bytes]:
        yield b"first;"
        backend.proceed.wait(WAIT)
        yield b"second;"
        yield b"third"

    def hang() -> Iterator[bytes]:
        yield b"first;"
        backend.proceed.wait(WAIT)
        # Until a write fails: the server then closes this generator.
        for _ in range(10_000):
            yield b"x" * 65_536

    return app


class _Closing:
    def __init__(self, result: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.result = result
        self.on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.result)

    def close(self) -> None:
        try:
            getattr(self.result, "close", lambda: None)()
        finally:
            self.on_close()


class _CountingInput:
    def __init__(self, stream: Any, backend: Backend, path: str) -> None:
        self.stream, self.backend, self.path = stream, backend, path

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.backend.count_read(self.path, len(data))
        return data


def wsgi_outer(backend: Backend, inner: Any) -> Any:
    """Counts the body bytes the middleware reads and tells when it has finished."""

    def outer(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        environ["wsgi.input"] = _CountingInput(environ["wsgi.input"], backend, path)
        try:
            result = inner(environ, start_response)
        except BaseException:
            backend.done(path)
            raise
        return _Closing(result, lambda: backend.done(path))

    return outer


class Served:
    """One app behind its middleware under a real server, and a client for it."""

    def __init__(self, kind: str, url: str, backend: Backend, client: httpx.Client) -> None:
        self.kind = kind
        self.url = url
        self.backend = backend
        self.client = client

    def post(
        self,
        path: str,
        key: str | bytes | None = None,
        body: bytes = b'{"amount": 5}',
        *,
        method: str = "POST",
        headers: list[tuple[str, str | bytes]] | None = None,
    ) -> httpx.Response:
        sent: list[tuple[str, str | bytes]] = list(headers or [])
        if key is not None:
            sent.append(("Idempotency-Key", key))
        return self.client.request(method, path, content=body, headers=sent)


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(kind: str) -> Iterator[Callable[..., Served]]:
    """Start the ``kind`` app behind an IdempotencyMiddleware made with the given options."""
    with ExitStack() as stack:

        def start(**options: Any) -> Served:
            backend = Backend()
            if kind == "asgi":
                middleware = reskit.asgi.IdempotencyMiddleware(asgi_app(backend), **options)
                url = stack.enter_context(running_uvicorn(asgi_outer(backend, middleware)))
            else:
                wsgi_middleware = reskit.wsgi.IdempotencyMiddleware(wsgi_app(backend), **options)
                url = stack.enter_context(running_wsgi(wsgi_outer(backend, wsgi_middleware)))
            # Unblock any handler still waiting before its server is stopped.
            stack.callback(backend.proceed.set)
            client = stack.enter_context(httpx.Client(base_url=url, timeout=WAIT))
            return Served(kind, url, backend, client)

        yield start


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` as bytes on a new connection; everything the server sent back."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as sock:
        sock.sendall(request)
        received = []
        while chunk := sock.recv(65_536):
            received.append(chunk)
    return b"".join(received)


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["type"] == _idempotency_http.PROBLEM_TYPE + slug
    assert problem["title"]
    assert problem["detail"]
    return problem


# -- stored and replayed ------------------------------------------------------------------


def test_a_2xx_is_stored_and_replayed_without_running_the_app(serve: Callable[..., Served]) -> None:
    served = serve()
    auth = [("Authorization", "Bearer alice")]
    first = served.post("/charges", "order-1", headers=auth)
    second = served.post("/charges", "order-1", headers=auth)
    third = served.post("/charges", "order-1", headers=auth)

    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    for replay in (second, third):
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content
        assert replay.headers["content-type"] == "application/json"
        # The whole response is replayed, Set-Cookie included, as Stripe does.
        assert replay.headers["set-cookie"] == "session=s1"
    assert first.json() == {"charge": 1, "body": '{"amount": 5}', "auth": "Bearer alice"}
    assert served.backend.calls["/charges"] == 1


def test_an_anonymous_replay_carries_no_session(serve: Callable[..., Served]) -> None:
    served = serve()
    first = served.post("/charges", "anon-1")  # no Authorization: one shared key space
    replay = served.post("/charges", "anon-1")
    assert first.headers["set-cookie"] == "session=s1"
    assert replay.headers["idempotent-replayed"] == "true"
    assert "set-cookie" not in replay.headers  # whoever knows the key gets no one's session
    assert served.backend.calls["/charges"] == 1


def test_requests_without_a_key_or_with_other_methods_pass_through(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    assert served.post("/charges").status_code == 201
    assert served.post("/charges").status_code == 201
    for _ in range(2):
        response = served.post("/charges", "k", method="PUT")
        assert response.status_code == 201
        assert "idempotent-replayed" not in response.headers
    assert served.backend.calls["/charges"] == 4


def test_methods_option(serve: Callable[..., Served]) -> None:
    served = serve(methods=("put",))
    assert served.post("/charges", "k").status_code == 201
    assert served.post("/charges", "k").status_code == 201
    assert served.post("/charges", "k", method="PUT").status_code == 201
    assert served.post("/charges", "k", method="PUT").headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/charges"] == 3


@pytest.mark.parametrize(
    ("quoted", "bare"),
    [
        ('"order-7"', "order-7"),
        ('"a\\\\b"', "a\\b"),
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ],
)
def test_a_quoted_key_and_its_bare_form_are_one_key(
    serve: Callable[..., Served], quoted: str, bare: str
) -> None:
    served = serve()
    first = served.post("/charges", quoted)
    second = served.post("/charges", bare)
    assert first.status_code == second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/charges"] == 1


def test_escapes_in_a_quoted_key(serve: Callable[..., Served]) -> None:
    served = serve()
    assert served.post("/charges", '"say \\"hi\\""').status_code == 201
    assert served.post("/charges", '"say \\"hi\\""').headers["idempotent-replayed"] == "true"
    # Another key: the escape is part of the key, not of the request.
    assert "idempotent-replayed" not in served.post("/charges", '"say hi"').headers
    assert served.backend.calls["/charges"] == 2


def test_a_key_of_255_characters_is_accepted(serve: Callable[..., Served]) -> None:
    served = serve()
    assert served.post("/charges", "k" * 255).status_code == 201
    assert served.post("/charges", f'"{"k" * 255}"').headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/charges"] == 1


# -- 400 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'""', id="empty-quoted"),
        pytest.param(b'"abc', id="unterminated"),
        pytest.param(b'"abc"def', id="after-closing-quote"),
        pytest.param(b'"abc";p=1', id="parameters"),
        pytest.param(b'"a", "b"', id="list"),
        pytest.param(b"a,b", id="comma"),
        pytest.param(b"a b", id="space-in-bare"),
        pytest.param(b'"a\\qb"', id="bad-escape"),
        pytest.param(b'"a\\"', id="escaped-closing-quote"),
        pytest.param(b"k" * 256, id="256-characters"),
        pytest.param(b'"' + b"k" * 256 + b'"', id="256-characters-quoted"),
        pytest.param(b"x" * 4000, id="very-long"),
        pytest.param("café".encode(), id="utf-8"),
        pytest.param(b'"caf\xe9"', id="latin-1-quoted"),
        pytest.param(b"\xff\xfe", id="binary"),
        pytest.param(b"a\tb", id="tab"),
        pytest.param(b"\x01abc", id="control-character"),
        pytest.param(b'"a\x1bb"', id="escape-character-quoted"),
        pytest.param(b"abc\x7f", id="delete"),
        pytest.param(b"\x1b[31mred", id="terminal-escape"),
    ],
)
def test_a_malformed_key_is_refused_with_400(serve: Callable[..., Served], key: bytes) -> None:
    served = serve()
    response = served.post("/charges", key)
    problem = assert_problem(response, 400, "key-malformed")
    if len(key) > 3:
        assert key not in response.content  # the key is never echoed
    assert problem["title"] == "Malformed Idempotency-Key header"
    assert served.backend.calls["/charges"] == 0


@pytest.mark.parametrize(
    "values", [("a", "a"), ('"a"', '"b"'), ("a", '"a"')], ids=["same", "quoted", "mixed"]
)
def test_a_repeated_header_is_refused_with_400(
    serve: Callable[..., Served], values: tuple[str, str]
) -> None:
    served = serve()
    headers: list[tuple[str, str | bytes]] = [("Idempotency-Key", value) for value in values]
    response = served.post("/charges", headers=headers)
    assert_problem(response, 400, "key-malformed")
    assert served.backend.calls["/charges"] == 0


@pytest.mark.parametrize(
    "value",
    [b"ab\x00cd", b"ab\x0bcd", b"ab\x0ccd", b"\x7f"],
    ids=["nul", "vertical-tab", "form-feed", "delete-alone"],
)
def test_raw_bytes_a_client_library_refuses_to_send_are_refused_too(
    serve: Callable[..., Served], value: bytes
) -> None:
    # Sent on a bare socket: uvicorn's parser refuses some of these itself, wsgiref
    # passes them on. Either way the answer is 400 and the app does not run. (A bare
    # CR is not here: wsgiref ends the header line at it, so no middleware sees it;
    # test_parse_key_refuses_line_breaks_and_control_characters covers it.)
    served = serve()
    request = (
        b"POST /charges HTTP/1.1\r\nHost: test\r\nIdempotency-Key: " + value + b"\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    answer = raw_exchange(served.url, request)
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:200]
    assert served.backend.calls["/charges"] == 0


def test_header_injection_through_the_key_goes_nowhere(serve: Callable[..., Served]) -> None:
    # A CRLF ends the header: the rest is a header of its own, not part of the key,
    # and nothing of the key is ever written into a response header.
    served = serve()
    request = (
        b'POST /charges HTTP/1.1\r\nHost: test\r\nIdempotency-Key: "abc\r\nX-Injected: 1"\r\n'
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    answer = raw_exchange(served.url, request)
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:200]
    assert b"injected" not in answer.lower()
    assert served.backend.calls["/charges"] == 0


@pytest.mark.parametrize(
    "value",
    ["a\r\nb", "a\nb", "a\rb", "a\x00b", "\x00", "a\x85b", "\u2028", '"a\r\nb"', '"a\x00"'],
)
def test_parse_key_refuses_line_breaks_and_control_characters(value: str) -> None:
    with pytest.raises(Problem) as caught:
        _idempotency_http.parse_key([value])
    assert caught.value.status == 400


def test_parse_key() -> None:
    parse = _idempotency_http.parse_key
    assert parse([]) is None
    assert parse(['"a b"']) == "a b"
    assert parse(['"a\\"b\\\\c"']) == 'a"b\\c'
    assert parse(["a;b=c"]) == "a;b=c"
    assert parse(['  "padded"\t']) == "padded"  # what a server left of optional whitespace
    assert parse(["x" * 255]) == "x" * 255


def test_a_missing_key_passes_through_unless_required(serve: Callable[..., Served]) -> None:
    served = serve(required=lambda method, path: path.startswith("/charges"))
    assert_problem(served.post("/charges"), 400, "key-missing")
    assert served.post("/validate").status_code == 201
    assert served.post("/validate").status_code == 201
    assert served.post("/charges", "k").status_code == 201
    assert served.backend.calls == {"/validate": 2, "/charges": 1}


def test_required_true_needs_a_key_on_every_checked_method(serve: Callable[..., Served]) -> None:
    served = serve(required=True)
    assert_problem(served.post("/charges"), 400, "key-missing")
    assert_problem(served.post("/charges", method="PATCH"), 400, "key-missing")
    assert served.post("/charges", method="PUT").status_code == 201  # not a checked method
    assert served.backend.calls["/charges"] == 1


# -- 409 ------------------------------------------------------------------------------------


def test_a_duplicate_while_the_first_runs_gets_409(serve: Callable[..., Served]) -> None:
    served = serve(lease=30.0)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(served.post, "/slow", "k")
        assert served.backend.entered.wait(WAIT)
        duplicate = served.post("/slow", "k")
        served.backend.proceed.set()
        original = first.result(WAIT)

    assert_problem(duplicate, 409, "request-in-progress")
    assert 1 <= int(duplicate.headers["retry-after"]) <= 30
    assert original.status_code == 201
    replay = served.post("/slow", "k")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert served.backend.calls["/slow"] == 1


# -- 422 ------------------------------------------------------------------------------------


def test_the_same_key_on_another_request_gets_422(serve: Callable[..., Served]) -> None:
    served = serve()
    assert served.post("/charges", "k", b'{"amount": 5}').status_code == 201

    assert_problem(served.post("/charges", "k", b'{"amount": 6}'), 422, "key-reused")
    assert_problem(served.post("/other", "k", b'{"amount": 5}'), 422, "key-reused")
    assert_problem(served.post("/charges?x=1", "k", b'{"amount": 5}'), 422, "key-reused")
    assert_problem(served.post("/charges", "k", method="PATCH"), 422, "key-reused")
    # The original request still replays.
    assert served.post("/charges", "k").headers["idempotent-replayed"] == "true"
    assert served.backend.calls == {"/charges": 1}


# -- what is stored -------------------------------------------------------------------------


def test_a_4xx_is_not_stored(serve: Callable[..., Served]) -> None:
    served = serve()
    rejected = served.post("/validate", "k", b"{}")
    again = served.post("/validate", "k", b"{}")
    # Fixed and sent again with the same key: it runs.
    fixed = served.post("/validate", "k", b'{"amount": 5}')
    replay = served.post("/validate", "k", b'{"amount": 5}')

    assert rejected.status_code == again.status_code == 422
    assert rejected.headers["content-type"] == "application/json"  # the app's, not ours
    assert "idempotent-replayed" not in again.headers
    assert again.json()["call"] == 2
    assert fixed.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/validate"] == 3


def test_a_5xx_is_stored(serve: Callable[..., Served]) -> None:
    served = serve()
    first = served.post("/down", "k")
    second = served.post("/down", "k")
    assert first.status_code == second.status_code == 503
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert served.backend.calls["/down"] == 1


def test_a_handler_that_raises_answers_a_stored_500(serve: Callable[..., Served]) -> None:
    served = serve()
    first = served.post("/crash", "k")
    second = served.post("/crash", "k")
    assert_problem(first, 500, "handler-failed")
    assert "idempotent-replayed" not in first.headers
    assert_problem(second, 500, "handler-failed")
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert "connection" not in second.headers
    assert served.backend.calls["/crash"] == 1


def test_a_response_too_large_to_store_replays_as_a_500_naming_its_status(
    serve: Callable[..., Served],
) -> None:
    served = serve(max_stored=1024)
    first = served.post("/big", "k")
    second = served.post("/big", "k")
    assert first.status_code == 200
    assert first.content == bytes(range(256)) * 400  # the first client gets it all
    problem = assert_problem(second, 500, "response-not-stored")
    assert problem["original_status"] == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/big"] == 1


def test_keys_are_scoped_by_principal(serve: Callable[..., Served]) -> None:
    served = serve()
    alice = [("Authorization", "Bearer alice")]
    bob = [("Authorization", "Bearer bob")]
    first_alice = served.post("/charges", "k", headers=alice)
    first_bob = served.post("/charges", "k", headers=bob)
    anonymous = served.post("/charges", "k")
    replay_alice = served.post("/charges", "k", headers=alice)
    replay_bob = served.post("/charges", "k", headers=bob)

    assert first_alice.json()["auth"] == "Bearer alice"
    assert first_bob.json()["auth"] == "Bearer bob"
    assert anonymous.json()["auth"] == ""
    assert "idempotent-replayed" not in first_bob.headers
    assert "idempotent-replayed" not in anonymous.headers
    assert replay_alice.content == first_alice.content
    assert replay_bob.content == first_bob.content
    assert b"alice" not in replay_bob.content
    assert served.backend.calls["/charges"] == 3


def test_a_principal_function_scopes_keys(serve: Callable[..., Served], kind: str) -> None:
    def tenant(request: Any) -> str:
        if kind == "asgi":
            return dict(request["headers"]).get(b"x-tenant", b"").decode()
        return str(request.get("HTTP_X_TENANT", ""))

    served = serve(principal=tenant)
    a = served.post("/charges", "k", headers=[("X-Tenant", "a"), ("Authorization", "one")])
    same_tenant = served.post("/charges", "k", headers=[("X-Tenant", "a"), ("Authorization", "2")])
    other = served.post("/charges", "k", headers=[("X-Tenant", "b"), ("Authorization", "one")])
    assert same_tenant.headers["idempotent-replayed"] == "true"
    assert same_tenant.content == a.content
    assert "idempotent-replayed" not in other.headers
    assert served.backend.calls["/charges"] == 2


# -- streaming and disconnects --------------------------------------------------------------


def test_a_streamed_response_reaches_the_client_as_it_is_made(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    headers = {"Idempotency-Key": "k"}
    with served.client.stream("POST", "/stream", content=b"{}", headers=headers) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        received = b""
        while len(received) < len(b"first;"):
            received += next(chunks)
        # The handler is still waiting: the first chunk came before it finished.
        assert received == b"first;"
        assert not served.backend.proceed.is_set()
        served.backend.proceed.set()
        received += b"".join(chunks)
    assert received == b"first;second;third"

    replay = served.post("/stream", "k", b"{}")
    assert replay.status_code == 200
    assert replay.content == b"first;second;third"
    assert replay.headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/stream"] == 1


def test_a_client_that_disconnects_mid_request_is_never_run_twice(
    serve: Callable[..., Served],
) -> None:
    """Once the app began, its outcome is stored even if the client left (as Stripe does).

    Here the app gives up when its client goes (ASGI: it returns without a
    response; WSGI: its endless body is cut at max_stored): the retry replays a
    500 instead of running the operation a second time.
    """
    served = serve()
    parts = urlsplit(served.url)
    assert parts.hostname is not None
    assert parts.port is not None
    request = (
        b"POST /hang HTTP/1.1\r\nHost: test\r\nIdempotency-Key: k\r\nContent-Length: 2\r\n\r\n{}"
    )
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as sock:
        sock.sendall(request)
        if served.kind == "wsgi":
            received = b""
            while b"first;" not in received:  # the response has begun
                received += sock.recv(65_536)
        else:
            assert served.backend.entered.wait(WAIT)
        sock.shutdown(socket.SHUT_RDWR)
    served.backend.proceed.set()
    served.backend.wait_finished("/hang", 1)

    retry = served.client.post("/hang", content=b"{}", headers={"Idempotency-Key": "k"})
    assert retry.status_code == 500
    assert retry.headers["idempotent-replayed"] == "true"
    assert served.backend.calls["/hang"] == 1


async def test_a_cancelled_asgi_request_stores_a_500() -> None:
    """Cancelled once the app began: it may have half run, so a retry must not run it."""
    entered = asyncio.Event()
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await receive()
        if calls == 1:
            entered.set()
            await asyncio.Event().wait()  # until cancelled
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    middleware = reskit.asgi.IdempotencyMiddleware(app)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/charges",
        "query_string": b"",
        "headers": [(b"idempotency-key", b"k")],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.create_task(middleware(scope, receive, send))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [message["status"] for message in sent if "status" in message] == [500]

    sent.clear()
    await middleware(scope, receive, send)
    assert calls == 1
    assert sent[0]["status"] == 500
    assert (b"idempotent-replayed", b"true") in sent[0]["headers"]


def wsgi_call(middleware: Any, key: str = "k") -> tuple[list[tuple[str, Any]], bytes]:
    """Call a WSGI middleware directly; the start_response calls and the body."""
    started: list[tuple[str, Any]] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        started.append((status, exc_info))
        return lambda data: None

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/charges",
        "HTTP_IDEMPOTENCY_KEY": key,
        "CONTENT_LENGTH": "0",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }
    result = middleware(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return started, body


def test_a_wsgi_app_that_raises_after_start_response_gets_a_stored_500() -> None:
    calls = 0

    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        nonlocal calls
        calls += 1
        start_response("201 Created", [("Content-Type", "application/json")])
        raise RuntimeError("after start_response")

    middleware = reskit.wsgi.IdempotencyMiddleware(app)
    started, body = wsgi_call(middleware)
    # The app's headers were not sent yet: the 500 replaces them (exc_info given).
    assert [status for status, _ in started] == ["201 Created", "500 Internal Server Error"]
    assert started[1][1] is not None
    assert json.loads(body)["status"] == 500
    replayed, again = wsgi_call(middleware)
    assert replayed == [("500 Internal Server Error", None)]
    assert again == body
    assert calls == 1


def test_a_wsgi_generator_that_raises_before_its_first_chunk_gets_a_stored_500() -> None:
    calls = 0

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        nonlocal calls
        calls += 1
        start_response("200 OK", [])
        raise RuntimeError("in the generator")
        yield b"never"

    middleware = reskit.wsgi.IdempotencyMiddleware(app)
    started, body = wsgi_call(middleware)
    assert [status for status, _ in started] == ["200 OK", "500 Internal Server Error"]
    assert json.loads(body)["type"].endswith("handler-failed")
    assert wsgi_call(middleware)[1] == body
    assert calls == 1


def test_a_wsgi_write_that_fails_still_stores_the_response() -> None:
    calls = 0

    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        nonlocal calls
        calls += 1
        write = start_response("200 OK", [])
        write(b"partial")  # the client is gone: this raises
        return [b"rest"]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        def write(data: bytes) -> None:
            raise BrokenPipeError("the client went away")

        return write

    middleware = reskit.wsgi.IdempotencyMiddleware(app)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/charges",
        "HTTP_IDEMPOTENCY_KEY": "k",
        "CONTENT_LENGTH": "0",
        "wsgi.input": io.BytesIO(),
    }
    result = middleware(dict(environ), start_response)  # the app ran on, unharmed
    assert list(result) == [b"rest"]
    getattr(result, "close", lambda: None)()
    assert calls == 1
    # The retry replays the whole response the app made, not a second run.
    started, body = wsgi_call(middleware)
    assert body == b"partialrest"
    assert started == [("200 OK", None)]
    assert calls == 1


async def test_an_asgi_app_that_returns_without_a_response_gets_a_stored_500() -> None:
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = reskit.asgi.IdempotencyMiddleware(app)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"idempotency-key", b"k")]}
    await middleware(scope, receive, send)
    await middleware(scope, receive, send)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [500, 500]
    assert (b"idempotent-replayed", b"true") in sent[2]["headers"]
    assert sent[3]["body"] == sent[1]["body"]
    assert calls == 1


# -- 413 and bounded memory -----------------------------------------------------------------


def test_a_declared_body_over_max_body_gets_413_unread(serve: Callable[..., Served]) -> None:
    served = serve(max_body=64 * 1024)
    response = served.post("/charges", "k", b"x" * (64 * 1024 + 1))
    assert_problem(response, 413, "body-too-large")
    assert served.backend.read["/charges"] == 0
    assert served.backend.calls["/charges"] == 0
    # The limit itself is allowed.
    assert served.post("/charges", "k2", b"x" * (64 * 1024)).status_code == 201


def test_the_default_max_body_refuses_a_declared_10_mib_and_one_byte(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    request = (
        b"POST /charges HTTP/1.1\r\nHost: test\r\nIdempotency-Key: k\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (10 * 1024 * 1024 + 1)
    )
    answer = raw_exchange(served.url, request)
    assert answer.startswith((b"HTTP/1.1 413 ", b"HTTP/1.0 413 ")), answer[:200]
    assert served.backend.read["/charges"] == 0
    assert served.backend.calls["/charges"] == 0


def test_a_streamed_body_over_max_body_gets_413_after_reading_little_of_it() -> None:
    # Chunked upload under uvicorn: the length is known only by reading.
    backend = Backend()
    middleware = reskit.asgi.IdempotencyMiddleware(asgi_app(backend), max_body=64 * 1024)

    def upload() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 65_536  # 4 MiB in all

    with running_uvicorn(asgi_outer(backend, middleware)) as url, httpx.Client() as client:
        response = client.post(
            f"{url}/charges", content=upload(), headers={"Idempotency-Key": "k"}, timeout=WAIT
        )
    assert_problem(response, 413, "body-too-large")
    assert backend.calls["/charges"] == 0
    # The middleware stopped at the first message past the limit; uvicorn's messages are
    # at most its 64 KiB buffer plus one socket read.
    assert 64 * 1024 < backend.read["/charges"] < 1024 * 1024


def test_a_wsgi_body_without_length_is_read_only_up_to_max_body() -> None:
    backend = Backend()
    middleware = reskit.wsgi.IdempotencyMiddleware(wsgi_app(backend), max_body=64 * 1024)

    class Endless:
        read_total = 0

        def read(self, size: int = -1) -> bytes:
            assert 0 < size <= 65_536
            self.read_total += size
            return b"x" * size

    stream = Endless()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/charges",
        "HTTP_IDEMPOTENCY_KEY": "k",
        "wsgi.input": stream,
        "wsgi.input_terminated": True,
    }
    statuses: list[str] = []
    body = b"".join(middleware(environ, lambda status, headers: statuses.append(status)))
    assert [status.split()[0] for status in statuses] == ["413"]
    assert json.loads(body)["status"] == 413
    assert stream.read_total == 64 * 1024 + 65_536
    assert backend.calls["/charges"] == 0


def test_a_wsgi_body_without_length_or_termination_is_empty() -> None:
    backend = Backend()
    middleware = reskit.wsgi.IdempotencyMiddleware(wsgi_app(backend))
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/charges",
        "HTTP_IDEMPOTENCY_KEY": "k",
        "wsgi.input": io.BytesIO(b"never read"),
    }
    statuses: list[str] = []
    body = b"".join(middleware(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["201 Created"]
    assert json.loads(body)["body"] == ""


# -- the store --------------------------------------------------------------------------------


def test_a_store_that_refuses_a_claim_gets_503_and_the_app_does_not_run(
    serve: Callable[..., Served],
) -> None:
    served = serve(store=MemoryIdempotencyStore(max_entries=1))
    assert served.post("/charges", "a").status_code == 201
    assert_problem(served.post("/charges", "b"), 503, "store-unavailable")
    assert served.backend.calls["/charges"] == 1


@pytest.mark.redis
def test_the_middleware_works_on_the_redis_store(serve: Callable[..., Served]) -> None:
    from redis_servers import running_redis
    from reskit.stores.redis import RedisStore

    with running_redis() as server:
        store = RedisStore(server.url)
        try:
            served = serve(store=store)
            first = served.post("/charges", "k")
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(served.post, "/slow", "s")
                assert served.backend.entered.wait(WAIT)
                assert_problem(served.post("/slow", "s"), 409, "request-in-progress")
                served.backend.proceed.set()
                assert slow.result(WAIT).status_code == 201
            replay = served.post("/charges", "k")
            mismatch = served.post("/charges", "k", b'{"amount": 6}')
            rejected = served.post("/validate", "v", b"{}")
            retried = served.post("/validate", "v", b"{}")
        finally:
            store.close()

    assert first.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert_problem(mismatch, 422, "key-reused")
    assert rejected.status_code == retried.status_code == 422
    assert served.backend.calls == {"/charges": 1, "/slow": 1, "/validate": 2}


def test_a_corrupt_record_replays_as_a_500() -> None:
    for value in (
        b"not json",
        b'{"status": 200}',
        b'{"status": 99, "headers": [], "body": ""}',
        b'{"status": 200, "headers": [["x", "a\\r\\nb"]], "body": ""}',
        b'{"status": 200, "headers": [["x", "\\u0100"]], "body": ""}',
        b'{"status": 200, "headers": [], "body": "!!"}',
        b"[" * 100_000,
    ):
        status, headers, body = _idempotency_http.decode(value)
        assert status == 500
        assert ("idempotent-replayed", "true") in headers
        assert json.loads(body)["type"].endswith("record-unreadable")


# -- what passes through ------------------------------------------------------------------


async def test_non_http_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        pass

    middleware = reskit.asgi.IdempotencyMiddleware(app, required=True)
    for scope in (
        {"type": "lifespan"},
        {"type": "websocket", "path": "/ws", "headers": [(b"idempotency-key", b'"')]},
    ):
        await middleware(scope, receive, send)
        assert seen[-1] == (scope, receive, send)
        assert seen[-1][0] is scope


async def test_the_app_sees_no_extension_that_would_bypass_the_recording() -> None:
    scopes: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    extensions = {"http.response.pathsend": {}, "http.response.trailers": {}}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"idempotency-key", b"k")],
        "extensions": extensions,
    }
    await reskit.asgi.IdempotencyMiddleware(app)(scope, receive, send)
    assert scopes[0]["extensions"] == {"http.response.trailers": {}}
    assert scope["extensions"] is extensions  # the server's scope is not changed


def test_the_middleware_modules_do_not_import_starlette() -> None:
    code = "import sys, reskit.asgi, reskit.wsgi; print('starlette' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"methods": "POST"}, TypeError),
        ({"methods": ()}, ValueError),
        ({"required": "yes"}, TypeError),
        ({"principal": "user"}, TypeError),
        ({"ttl": 0}, ValueError),
        ({"lease": -1}, ValueError),
        ({"max_body": -1}, ValueError),
        ({"max_stored": 1.5}, ValueError),
    ],
)
@pytest.mark.parametrize("module", [reskit.asgi, reskit.wsgi])
def test_options_are_validated(module: Any, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        module.IdempotencyMiddleware(lambda *args: None, **options)


def test_a_stream_whose_client_left_is_finished_and_replayed_whole(
    serve: Callable[..., Served],
) -> None:
    """The app runs on after its client leaves; the retry replays the whole response."""
    served = serve()
    parts = urlsplit(served.url)
    assert parts.hostname is not None and parts.port is not None  # noqa: PT018
    request = (
        b"POST /stream HTTP/1.1\r\nHost: test\r\nIdempotency-Key: s\r\nContent-Length: 2\r\n\r\n{}"
    )
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as sock:
        sock.sendall(request)
        received = b""
        while b"first;" not in received:  # the response has begun
            received += sock.recv(65_536)
        sock.shutdown(socket.SHUT_RDWR)
    served.backend.proceed.set()  # the app goes on to its end, with nobody listening
    served.backend.wait_finished("/stream", 1)
    retry = served.client.post("/stream", content=b"{}", headers={"Idempotency-Key": "s"})
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.status_code == 200
    assert retry.content == b"first;second;third"
    assert served.backend.calls["/stream"] == 1


def test_a_replay_drops_headers_that_belong_to_one_connection() -> None:
    record = _idempotency_http.encode(
        200,
        [
            ("Content-Type", "text/plain"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
            ("Keep-Alive", "timeout=5"),
            ("Set-Cookie", "session=1"),
        ],
        b"ok",
    )
    status, headers, body = _idempotency_http.decode(record)
    assert (status, body) == (200, b"ok")
    names = [name.lower() for name, _ in headers]
    assert names == ["content-type", "set-cookie", "idempotent-replayed"]
    _, anonymous, _ = _idempotency_http.decode(record, anonymous=True)
    assert [name.lower() for name, _ in anonymous] == ["content-type", "idempotent-replayed"]


@pytest.mark.parametrize("declared", ["\u00b2", "\u0663", " 12\u00b2 "])
def test_a_content_length_of_non_ascii_digits_is_not_a_crash(declared: str) -> None:
    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"made"]

    middleware = reskit.wsgi.IdempotencyMiddleware(app)
    started: list[str] = []
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/charges",
        "HTTP_IDEMPOTENCY_KEY": "k",
        "CONTENT_LENGTH": declared,
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
    }
    result = middleware(environ, lambda status, headers, exc_info=None: started.append(status))
    b"".join(result)
    getattr(result, "close", lambda: None)()
    assert started
    assert not started[0].startswith("500")

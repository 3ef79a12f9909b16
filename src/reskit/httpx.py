"""Resilient transports for httpx and httpx2 clients.

::

    import httpx
    import reskit.httpx

    client = httpx.Client(transport=reskit.httpx.Transport(reskit.httpx.standard("inventory")))

:class:`Transport` and :class:`AsyncTransport` wrap an inner transport (by
default the library's own ``HTTPTransport``/``AsyncHTTPTransport``) and run
every request through a :class:`~reskit.Policy`:

- responses 408, 429, 500, 502, 503 and 504 and transport errors are retryable
  failures; GET, HEAD, OPTIONS, PUT and DELETE are retried, POST and PATCH only
  when they carry an ``Idempotency-Key`` (the same key on every attempt), and a
  request whose body cannot be replayed never is;
- ``Retry-After`` is honoured within the remaining deadline;
- the last attempt's response is returned after the last retry; the earlier
  ones are drained and closed, so no connection leaks;
- a circuit breaker per host (made from the policy's breaker);
- every attempt carries ``X-Request-ID`` (the correlation ID), W3C
  ``traceparent``/``tracestate`` (through OpenTelemetry's propagator, when the
  application uses it) and the remaining deadline as ``X-Request-Timeout-Ms``
  and as httpx's own timeout; a client span per attempt, with
  ``http.request.resend_count``, under the policy's span;
- optional :class:`Failover` across base URLs with outlier ejection, and
  :class:`Hedging` for idempotent requests within a budget.

httpx and its fork httpx2 are both supported (extras ``reskit[httpx]`` and
``reskit[httpx2]``). The library is the one of the inner transport you pass,
or ``library="httpx"`` / ``"httpx2"``; with neither, the library of the client
that sends through the transport (its first request decides).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import timedelta
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from . import _clock, _fork
from ._breaker import CircuitBreaker
from ._bulkhead import Bulkhead
from ._compose import Kind
from ._config import seconds
from ._context import remaining_deadline
from ._edge import header_name
from ._errors import TimeoutExceeded
from ._http_client import (
    CANCEL,
    CLOSE,
    DEADLINE_HEADER,
    DEFAULT_RETRY_METHODS,
    DEFAULT_RETRY_STATUSES,
    DRAIN_LIMIT,
    SEND,
    START,
    WAIT,
    Core,
    Exchange,
    Failover,
    Flow,
    Hedging,
    HostBreakers,
    parse_retry_after,
)
from ._policy import Policy
from ._retry import Retry

__all__ = [
    "DEFAULT_RETRY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "AsyncTransport",
    "Failover",
    "Hedging",
    "Transport",
    "retryable_response",
    "standard",
]

_LIBRARIES = ("httpx2", "httpx")


def _base(library: str, name: str) -> type:
    """A transport base class of ``library``, or a stand-in when it is not installed."""
    try:
        return getattr(importlib.import_module(library), name)  # type: ignore[no-any-return]
    except ImportError:
        return type(f"_No{library}{name}", (), {})


# The transports subclass both libraries' base classes, so either library's
# Client accepts them, by isinstance and by type checkers.
if TYPE_CHECKING:
    from httpx import AsyncBaseTransport as _AsyncBaseA
    from httpx import BaseTransport as _BaseA
    from httpx2 import AsyncBaseTransport as _AsyncBaseB
    from httpx2 import BaseTransport as _BaseB
else:
    _BaseA = _base("httpx", "BaseTransport")
    _BaseB = _base("httpx2", "BaseTransport")
    _AsyncBaseA = _base("httpx", "AsyncBaseTransport")
    _AsyncBaseB = _base("httpx2", "AsyncBaseTransport")
    if not any(b.__module__.startswith("httpx") for b in (_BaseA, _BaseB)):
        raise ImportError(
            'reskit.httpx needs httpx or httpx2: pip install "reskit[httpx]" or "reskit[httpx2]"'
        )


def _library(transport: Any, name: str | None, async_: bool) -> ModuleType | None:
    """The library to speak: the inner transport's, or the named one; ``None`` if undecided."""
    if name is not None:
        if name not in _LIBRARIES:
            raise ValueError(f"library must be 'httpx' or 'httpx2', got {name!r}")
        candidates: tuple[str, ...] = (name,)
    else:
        candidates = _LIBRARIES
    if transport is not None:
        for lib_name in candidates:
            lib = sys.modules.get(lib_name)
            if lib is None:
                continue
            base = lib.AsyncBaseTransport if async_ else lib.BaseTransport
            if isinstance(transport, base):
                return lib
    # A duck-typed inner transport (a wrapper, a test double) says nothing: the named
    # library, else the first request's, decides.
    return _import_library(name) if name is not None else None


def _import_library(name: str | None) -> ModuleType:
    """``name``, else httpx2, else httpx: the first that imports."""
    for lib_name in (name,) if name is not None else _LIBRARIES:
        try:
            return importlib.import_module(lib_name)
        except ImportError:
            continue
    wanted = name or "httpx"
    raise ImportError(
        f'reskit.httpx needs httpx or httpx2: pip install "reskit[{wanted}]"'
    ) from None


def _retryable_errors(lib: ModuleType) -> tuple[type[BaseException], ...]:
    # Transport errors, minus the ones a retry cannot fix: a URL scheme nobody
    # serves, a request the client itself built wrong.
    return (
        lib.TimeoutException,
        lib.NetworkError,
        lib.RemoteProtocolError,
        lib.ProxyError,
    )


def retryable_response(response: Any) -> bool:
    """Whether ``response`` has one of :data:`DEFAULT_RETRY_STATUSES`.

    Usable as ``Retry(on_result=reskit.httpx.retryable_response)``; a transport
    judges responses by its own ``retry_statuses`` in any case.

    .. versionadded:: 0.1.0
    """
    return getattr(response, "status_code", None) in DEFAULT_RETRY_STATUSES


class _RetryOn:
    """The transport's exception condition: transport errors, attempt timeouts, the user's."""

    __slots__ = ("errors", "user")

    def __init__(self, errors: tuple[type[BaseException], ...], user: Any) -> None:
        self.errors = errors
        self.user = user

    def __call__(self, exc: Exception) -> bool:
        if isinstance(exc, self.errors):
            return True
        if isinstance(exc, TimeoutExceeded) and exc.kind == "attempt":
            return True
        user = self.user
        return user is not None and bool(user(exc))


class _RetryOnStatus:
    __slots__ = ("statuses",)

    #: Sync, and asking it twice changes nothing: the engine may skip the retry
    #: machinery when it says a first attempt's response stands.
    pure = True

    def __init__(self, statuses: frozenset[int]) -> None:
        self.statuses = statuses

    def __call__(self, response: Any) -> bool:
        return getattr(response, "status_code", None) in self.statuses


class _Wait:
    """The policy's wait, stretched to a response's ``Retry-After`` (exceptions carry theirs)."""

    __slots__ = ("retry",)

    def __init__(self, retry: Retry) -> None:
        self.retry = retry

    def __call__(self, state: Any) -> float:
        retry = self.retry
        if retry._tenacity_wait is not None:
            base = float(retry._tenacity_wait(state))
        elif retry._wait_fixed is not None:
            base = retry._wait_fixed
        else:
            base = retry.backoff(state.attempt_number)
        outcome = state.outcome
        if outcome is None or outcome.failed:
            return base
        headers = getattr(outcome.result(), "headers", None)
        asked = parse_retry_after(headers.get("retry-after") if headers is not None else None)
        if asked is None or asked <= base:
            return base
        if remaining_deadline() is None and asked > retry.wait_max:
            # Nothing bounds the wait: a careless "Retry-After: 86400" must not park
            # the caller. An infinite wait makes the engine stop and return this answer.
            return float("inf")
        return asked


def _check_retry(retry: Retry | None) -> None:
    """Refuse, when the transport is made, a retry the transport cannot take over."""
    if retry is None:
        return
    if retry.retry is not None:
        raise TypeError(
            "reskit.httpx transports decide what to retry: give the policy a Retry with "
            "on= (extra exceptions to retry) instead of a tenacity retry= strategy"
        )
    if retry._is_async:
        raise TypeError("reskit.httpx transports need sync retry strategies and hooks")


def _compile(
    policy: Policy, core: Core, errors: tuple[type[BaseException], ...], sync: bool
) -> tuple[Policy, Policy]:
    """The policies a transport runs: one that retries, one that does not."""
    retry = policy.retry
    changes: dict[str, Any] = {"breaker": None}
    if sync:
        # A sync attempt is bounded by httpx's timeout instead of a worker thread.
        changes["timeout"] = None
    if retry is not None:
        changes["retry"] = retry.replace(
            on=_RetryOn(errors, retry._predicate),
            on_result=_RetryOnStatus(core.statuses),
            wait=_Wait(retry),
        )
    retrying = policy.replace(**changes)
    single = retrying.replace(retry=None) if retry is not None else retrying
    return retrying, single


class _Base:
    """What both transports share: the decisions (a :class:`Core`) and the policies."""

    _async = False

    def __init__(
        self,
        policy: Policy | None = None,
        transport: Any = None,
        *,
        retry_statuses: Collection[int] = DEFAULT_RETRY_STATUSES,
        retry_methods: Collection[str] = DEFAULT_RETRY_METHODS,
        idempotency_key: bool | Callable[[Any], str] = False,
        breaker_per_host: bool = True,
        failover: Failover | None = None,
        hedging: Hedging | None = None,
        library: str | None = None,
        deadline_header: str | None = DEADLINE_HEADER,
        deadline_reserve: float | timedelta = 0.0,
    ) -> None:
        if policy is None:
            policy = standard()
        if not isinstance(policy, Policy):
            raise TypeError(f"the transport's policy must be a reskit.Policy, got {policy!r}")
        if failover is not None and not isinstance(failover, Failover):
            raise TypeError(f"failover must be a reskit.httpx.Failover, got {failover!r}")
        if hedging is not None and not isinstance(hedging, Hedging):
            raise TypeError(f"hedging must be a reskit.httpx.Hedging, got {hedging!r}")
        _check_retry(policy.retry)
        self.policy = policy
        self._options: dict[str, Any] = {
            "name": policy.name or "http",
            "attempt_timeout": policy.timeout if not self._async else None,
            "retry_statuses": retry_statuses,
            "retry_methods": retry_methods,
            "idempotency_key": idempotency_key,
            "failover": failover,
            "hedging": hedging,
            "deadline_header": (
                None
                if deadline_header is None
                else header_name("the transport's deadline_header=", deadline_header)
            ),
            "deadline_reserve": seconds(
                deadline_reserve, "the transport's deadline_reserve=", allow_zero=True
            )
            or 0.0,
        }
        self._setup_lock = threading.Lock()
        self.library: ModuleType | None = None
        self.inner: Any = transport
        # Whether reskit made the inner transport (and so renews it in a forked child).
        self._own_inner = transport is None
        self._core: Core | None = None
        self._hosts = HostBreakers(policy.breaker, breaker_per_host, self._options["name"])
        lib = _library(transport, library, self._async)
        if lib is not None:
            self._setup(lib)
        _fork.track(self)

    def _after_fork(self) -> None:
        self._setup_lock = threading.Lock()
        if self._own_inner and self.library is not None:
            # The parent's pooled connections are its own: a child writing on one of
            # them would interleave with the parent's requests on the same socket.
            self.inner = self._new_inner(self.library)
            self._send = self._sender(self.inner)

    def _new_inner(self, lib: ModuleType) -> Any:
        return lib.AsyncHTTPTransport() if self._async else lib.HTTPTransport()

    def _setup(self, lib: ModuleType) -> Core:
        """Speak ``lib``: the inner transport, the decisions and the compiled policies."""
        if self.inner is None:
            self.inner = self._new_inner(lib)
        errors = _retryable_errors(lib)
        core = Core(lib, retryable_errors=errors, hosts=self._hosts, **self._options)
        self._retrying, self._single = _compile(self.policy, core, errors, not self._async)
        # The compiled drivers, found once: Policy.call would inspect _attempt's kind on
        # every request, a few microseconds of a transport's whole cost.
        kind = Kind.COROUTINE if self._async else Kind.FUNCTION
        self._runs = tuple(
            policy._runner_for(self._attempt).driver(kind)["run"]
            for policy in (self._retrying, self._single)
        )
        self.library = lib
        self._send = self._sender(self.inner)
        self._core = core
        return core

    def _sender(self, transport: Any) -> Callable[[Any], Any]:
        raise NotImplementedError

    def _attempt(self, ex: Exchange) -> Any:
        raise NotImplementedError

    def _core_for(self, request: Any) -> Core:
        """The decisions for ``request``, speaking its client's library (set up on first use).

        With no inner transport and no ``library=`` the transport speaks the
        library of the client that sends through it, httpx or httpx2: both are
        importable side by side, so the first request decides.
        """
        core = self._core
        if core is not None and type(request) is core.lib.Request:
            return core  # every request but the first, unless a client mixes libraries
        root = type(request).__module__.partition(".")[0]
        if core is None:
            with self._setup_lock:
                core = self._core
                if core is None:
                    core = self._setup(_import_library(root if root in _LIBRARIES else None))
        if root != core.lib.__name__ and root in _LIBRARIES:
            raise TypeError(
                f"this transport speaks {core.lib.__name__} but the request is {root}'s: "
                f"send through a {core.lib.__name__} client, or give the transport "
                f"library={root!r} (or a {root} inner transport)"
            )
        return core

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The breakers made so far, by host (``"host:port"``).

        .. versionadded:: 0.1.0
        """
        return self._hosts.made()

    def breaker(self, authority: str) -> CircuitBreaker | None:
        """The breaker of ``authority`` (``"host:port"``), made on first use.

        .. versionadded:: 0.1.0
        """
        return self._hosts.get(authority)


class Transport(_Base, _BaseA, _BaseB):
    """A sync httpx transport that runs every request through a policy.

    Args:
        policy: the :class:`~reskit.Policy` (default: :func:`standard`). Its
            ``retry`` needs no ``on=``: the transport retries transport errors
            and ``retry_statuses``; an ``on=`` it has adds exceptions to retry.
            Its ``breaker`` is a template: each host gets its own. Its
            ``timeout`` bounds each attempt (as httpx's timeout: no worker
            thread), its ``deadline`` the whole request.
        transport: the inner transport (default: the library's
            ``HTTPTransport()``). Its class decides between httpx and httpx2.
        retry_statuses: response statuses that are retryable failures.
        retry_methods: methods retried without a key (POST and PATCH are
            retried only with an ``Idempotency-Key``).
        idempotency_key: ``True`` gives every POST and PATCH without one a new
            ``Idempotency-Key`` (so they can be retried); or a function
            ``(request) -> str`` making the key.
        breaker_per_host: one breaker per host (default), or the policy's one
            breaker for all hosts.
        failover: a :class:`Failover` across base URLs.
        hedging: a :class:`Hedging` for idempotent requests.
        library: ``"httpx"`` or ``"httpx2"``, when no inner transport says.
        deadline_header: the header the remaining deadline is sent in, in
            whole milliseconds (``None`` sends none; httpx's own timeout still
            applies).
        deadline_reserve: seconds (or a ``timedelta``) kept back from what is
            sent: the upstream is told the remaining deadline minus this, so it
            gives up, and its answer travels back, before this caller's own
            deadline. An attempt the rest cannot cover is not started.

    A policy ``fallback`` must return an httpx ``Response``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, policy: Policy | None = None, transport: Any = None, **options: Any) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        super().__init__(policy, transport, **options)

    def _after_fork(self) -> None:
        super()._after_fork()
        self._pool = None
        self._pool_lock = threading.Lock()

    def _sender(self, transport: Any) -> Callable[[Any], Any]:
        send: Callable[[Any], Any] = transport.handle_request
        return send

    def handle_request(self, request: Any) -> Any:
        """Send ``request`` through the policy; return the final response.

        .. versionadded:: 0.1.0
        """
        ex = self._core_for(request).exchange(request)
        run = self._runs[0] if ex.retryable else self._runs[1]
        try:
            response = run(self._attempt, (ex,), {})
        except BaseException:
            if ex.previous is not None:
                _discard(ex.previous)
            raise
        previous = ex.previous
        if previous is not None and previous is not response:
            _discard(previous)
        return response

    def _attempt(self, ex: Exchange) -> Any:
        previous = ex.previous
        if previous is not None:  # the last attempt's retryable answer
            ex.previous = None
            _discard(previous)
        if ex.hedged:
            return self._run(ex.hedge())
        t = ex.begin()
        try:
            response = self._send(t.request)
        except BaseException as exc:
            ex.failed(t, exc)
        return ex.answered(t, response)

    def _run(self, flow: Flow) -> Any:
        """Execute a flow's commands on this thread (and on worker threads for hedges)."""
        send = self._send
        value: Any = None
        error: BaseException | None = None
        started: set[Future[Any]] = set()
        try:
            while True:
                try:
                    command = flow.send(value) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value
                value = error = None
                op = command[0]
                try:
                    if op == SEND:
                        value = send(command[1])
                    elif op == CLOSE:
                        _discard(command[1])
                    elif op == START:
                        value = self._executor().submit(send, command[1])
                        started.add(value)
                    elif op == WAIT:
                        value = _first(command[1], command[2])
                        if value is not None:
                            started.discard(value[0])
                    elif op == CANCEL:
                        started.discard(command[1])
                        _abandon(command[1])
                except BaseException as exc:  # handed to the flow, which records and raises
                    error = exc
        finally:
            for future in started:
                _abandon(future)

    def _executor(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = ThreadPoolExecutor(thread_name_prefix="reskit-hedge")
        return pool

    def close(self) -> None:
        """Close the inner transport (and the hedging threads).

        .. versionadded:: 0.1.0
        """
        pool = self._pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self.inner is not None:
            self.inner.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self.close()


def _first(futures: tuple[Future[Any], ...], timeout: float | None) -> tuple[Any, Any, Any] | None:
    """The first of ``futures`` to finish, as (future, response, exc), or None after ``timeout``."""
    for future in futures:
        if future.done():
            return _outcome(future)
    if timeout is None:
        done, _ = wait_futures(futures, return_when=FIRST_COMPLETED)
        return _outcome(next(iter(done)))
    # Waited on reskit's clock, so a test's fake clock decides when a hedge starts.
    ready = threading.Event()
    for future in futures:
        future.add_done_callback(lambda _: ready.set())
    _clock.wait(ready, timeout)
    for future in futures:
        if future.done():
            return _outcome(future)
    return None


def _outcome(future: Future[Any]) -> tuple[Any, Any, Any]:
    exc = future.exception()
    return (future, None if exc is not None else future.result(), exc)


def _abandon(future: Future[Any]) -> None:
    """Stop waiting for a hedge: cancel it if it has not started, else close its answer.

    A sync send cannot be interrupted; its connection is released as soon as
    its response head arrives (closing an unread response closes the connection).
    """
    if future.cancel():
        return

    def close(done: Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    future.add_done_callback(close)


def _discard(response: Any) -> None:
    """Close a response nobody will read; drain a short body first so its connection is reused."""
    try:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= DRAIN_LIMIT:
            for _ in response.iter_raw():
                pass
    except Exception:
        pass  # the connection is closed below instead of reused
    finally:
        response.close()


class AsyncTransport(_Base, _AsyncBaseA, _AsyncBaseB):
    """An async httpx transport that runs every request through a policy.

    The same arguments and rules as :class:`Transport`; the inner transport
    defaults to the library's ``AsyncHTTPTransport()``. The policy's
    ``timeout`` bounds each attempt by cancellation, its ``deadline`` the whole
    request; a losing hedge is cancelled at once.

    .. versionadded:: 0.1.0
    """

    _async = True

    def __init__(self, policy: Policy | None = None, transport: Any = None, **options: Any) -> None:
        super().__init__(policy, transport, **options)

    def _sender(self, transport: Any) -> Callable[[Any], Any]:
        send: Callable[[Any], Any] = transport.handle_async_request
        return send

    async def handle_async_request(self, request: Any) -> Any:
        """Send ``request`` through the policy; return the final response.

        .. versionadded:: 0.1.0
        """
        ex = self._core_for(request).exchange(request)
        run = self._runs[0] if ex.retryable else self._runs[1]
        try:
            response = await run(self._attempt, (ex,), {})
        except BaseException:
            if ex.previous is not None:
                await _adiscard(ex.previous)
            raise
        previous = ex.previous
        if previous is not None and previous is not response:
            await _adiscard(previous)
        return response

    async def _attempt(self, ex: Exchange) -> Any:
        previous = ex.previous
        if previous is not None:  # the last attempt's retryable answer
            ex.previous = None
            await _adiscard(previous)
        if ex.hedged:
            return await self._run(ex.hedge())
        t = ex.begin()
        try:
            response = await self._send(t.request)
        except BaseException as exc:
            ex.failed(t, exc)
        return ex.answered(t, response)

    async def _run(self, flow: Flow) -> Any:
        """Execute a flow's commands on this task (and on tasks of their own for hedges)."""
        import asyncio

        send = self._send
        value: Any = None
        error: BaseException | None = None
        started: set[asyncio.Task[Any]] = set()
        try:
            while True:
                try:
                    command = flow.send(value) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value
                value = error = None
                op = command[0]
                try:
                    if op == SEND:
                        value = await send(command[1])
                    elif op == CLOSE:
                        await _adiscard(command[1])
                    elif op == START:
                        value = asyncio.ensure_future(send(command[1]))
                        started.add(value)
                    elif op == WAIT:
                        value = await _afirst(command[1], command[2])
                        if value is not None:
                            started.discard(value[0])
                    elif op == CANCEL:
                        started.discard(command[1])
                        await _acancel(command[1])
                except BaseException as exc:  # handed to the flow, which records and raises
                    error = exc
        finally:
            for task in started:
                await _acancel(task)

    async def aclose(self) -> None:
        """Close the inner transport.

        .. versionadded:: 0.1.0
        """
        if self.inner is not None:
            await self.inner.aclose()

    async def __aenter__(self) -> AsyncTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.aclose()


async def _afirst(tasks: tuple[Any, ...], delay: float | None) -> tuple[Any, Any, Any] | None:
    import asyncio

    for task in tasks:
        if task.done():
            return _task_outcome(task)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for task in tasks:
        task.add_done_callback(wake)
    # The delay runs on reskit's clock, so a test's fake clock decides when a hedge starts.
    timer = None if delay is None else _clock.call_at(loop, _clock.now() + delay, wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for task in tasks:
            task.remove_done_callback(wake)
    for task in tasks:
        if task.done():
            return _task_outcome(task)
    return None


def _task_outcome(task: Any) -> tuple[Any, Any, Any]:
    if task.cancelled():
        import asyncio

        return (task, None, asyncio.CancelledError())
    exc = task.exception()
    return (task, None if exc is not None else task.result(), exc)


async def _acancel(task: Any) -> None:
    """Cancel a hedge, wait for it to unwind (releasing its connection), close its answer."""
    import asyncio

    if not task.done():
        task.cancel()
        await asyncio.wait((task,))
    if not task.cancelled() and task.exception() is None:
        await task.result().aclose()


async def _adiscard(response: Any) -> None:
    try:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= DRAIN_LIMIT:
            async for _ in response.aiter_raw():
                pass
    except Exception:
        pass
    finally:
        await response.aclose()


def standard(
    name: str = "http",
    *,
    total_timeout: float = 30.0,
    attempt_timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 2.0,
    max_backoff: float = 30.0,
    failure_rate: float = 0.1,
    sampling_seconds: int = 30,
    minimum_calls: int = 100,
    break_duration: float = 5.0,
    max_concurrent: int = 1000,
) -> Policy:
    """The standard policy for an HTTP dependency: .NET's ``AddStandardResilienceHandler``.

    The same numbers: a total timeout of 30 s, 3 retries with exponential
    jittered backoff from 2 s honouring ``Retry-After``, a breaker that opens
    at 10% failures over 30 s (with at least 100 calls) for 5 s, an attempt
    timeout of 10 s, and at most 1000 requests at once. Unlike .NET, a
    transport retries POST and PATCH only with an ``Idempotency-Key``.

    Args:
        name: the policy's name (spans, metrics, the breakers' names).
        total_timeout: the deadline of a request, retries included (seconds).
        attempt_timeout: the timeout of each attempt.
        retries: retries after the first attempt.
        backoff: the base of the full-jitter exponential backoff.
        max_backoff: its cap.
        failure_rate: the failure share that opens the breaker.
        sampling_seconds: the breaker's window (whole seconds).
        minimum_calls: calls in the window before the rate is judged.
        break_duration: seconds the breaker stays open.
        max_concurrent: requests at once; more are rejected (``BulkheadFull``).

    .. versionadded:: 0.1.0
    """
    return Policy(
        name,
        deadline=total_timeout,
        timeout=attempt_timeout,
        retry=Retry(
            attempts=retries + 1,
            on_result=retryable_response,
            wait_initial=backoff,
            wait_max=max_backoff,
        ),
        breaker=CircuitBreaker(
            failure_rate=failure_rate,
            window_seconds=sampling_seconds,
            minimum_calls=minimum_calls,
            reset_timeout=break_duration,
        ),
        bulkhead=Bulkhead(max_concurrent),
    )

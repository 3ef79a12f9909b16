"""Policy: bundle strategies and run them in one canonical order.

Outermost first: fallback → kill switch → brownout shed → bulkhead → deadline →
retry (+ budget) → circuit breaker → throttle → attempt timeout → the call.

A policy is compiled once, when it is built, into a small set of closures (a
sync and an async driver, and their generator twins). The drivers are thin:
every decision (should this be retried and after how long, may this attempt
pass the breaker, is there a free slot) is made by the strategy objects, which
never sleep, wait or await. The drivers only do the waiting, in their own way.

Nothing per call is stored on the policy: attempt counters, retry state and
timers live in the driver's local variables, so one policy can be shared by any
number of threads and tasks.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from datetime import timedelta
from time import perf_counter
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from . import _clock, _telemetry
from ._config import seconds
from ._context import _correlation_id, _deadline, new_correlation_id
from ._errors import ReskitError, TimeoutExceeded
from ._fallback import Fallback
from ._retry import Retry, RetryCall
from ._timeout import Expiry, expired, grain_for, run_in_worker, settle, wheel_for

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker
    from ._bulkhead import Bulkhead
    from ._throttle import AdaptiveThrottle

__all__ = ["Policy"]

P = ParamSpec("P")
R = TypeVar("R")

_CancelledError = asyncio.CancelledError


class _Observation:
    """The span and metrics of one call; only built when something records."""

    __slots__ = ("attempts", "outcome", "rejected_by", "sink", "span", "started", "token")

    def __init__(self, sink: _telemetry.Sink, runner: _Runner) -> None:
        self.sink = sink
        self.attempts = 0
        self.outcome = "success"
        self.rejected_by: str | None = None
        self.started = perf_counter()
        self.span: Any = None
        self.token: Any = None
        tracer = sink.tracer
        if tracer is not None:
            cid = _correlation_id.get()
            if cid is None:
                cid = new_correlation_id()
                self.token = _correlation_id.set(cid)
            self.span = tracer.start_span(
                runner.span_name,
                attributes={"reskit.policy": runner.name, "reskit.correlation_id": cid},
            )

    def retry(self, attempt: int, delay: float, exc: BaseException) -> None:
        span = self.span
        if span is not None:
            span.add_event(
                "reskit.retry",
                {
                    "reskit.attempt": attempt,
                    "reskit.delay": delay,
                    "exception.type": type(exc).__qualname__,
                    "exception.message": str(exc),
                },
            )

    def fell_back(self, exc: BaseException) -> None:
        self.outcome = "fallback"
        self.rejected_by = getattr(exc, "rejected_by", None)
        if self.span is not None:
            self.span.record_exception(exc)

    def finish(self, runner: _Runner, exc: BaseException | None) -> None:
        span = self.span
        if exc is not None:
            if isinstance(exc, ReskitError) and exc.rejected_by is not None:
                self.outcome = "rejected"
                self.rejected_by = exc.rejected_by
            elif isinstance(exc, Exception):
                self.outcome = "failure"
            else:
                self.outcome = "cancelled"
        if span is not None:
            attributes: dict[str, Any] = {
                "reskit.outcome": self.outcome,
                "reskit.attempts": self.attempts,
            }
            if self.rejected_by is not None:
                attributes["reskit.rejected_by"] = self.rejected_by
            breaker = runner.breaker
            if breaker is not None:
                attributes["reskit.breaker.state"] = breaker.state.value
            span.set_attributes(attributes)
            if exc is not None:
                span.record_exception(exc)
                if self.outcome != "cancelled":
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            span.end()
        if self.token is not None:
            _correlation_id.reset(self.token)
        sink = self.sink
        if sink.calls is not None and sink.duration is not None:
            attrs = runner.metric_attributes(self.outcome)
            sink.calls.add(1, attrs)
            sink.duration.record(perf_counter() - self.started, attrs)


def _log_retry(name: str, attempt: int, delay: float, exc: BaseException) -> None:
    _telemetry.log.warning(
        "reskit.retry.scheduled",
        policy=name,
        attempt=attempt,
        delay=round(delay, 6),
        error=repr(exc),
        correlation_id=_correlation_id.get(),
    )


class _Runner:
    """A policy compiled for one name: the closures that run calls."""

    __slots__ = (
        "_metric_attributes",
        "acall",
        "agen",
        "breaker",
        "call",
        "gen",
        "name",
        "span_name",
    )

    call: Callable[[Callable[..., Any], Any, Any], Any]
    acall: Callable[[Callable[..., Awaitable[Any]], Any, Any], Awaitable[Any]]
    gen: Callable[[Callable[..., Generator[Any, Any, Any]], Any, Any], Generator[Any, Any, Any]]
    agen: Callable[[Callable[..., AsyncIterator[Any]], Any, Any], AsyncIterator[Any]]

    def __init__(self, policy: Policy, name: str) -> None:
        self.name = name
        self.span_name = f"reskit {name}"
        self.breaker = policy.breaker
        self._metric_attributes: dict[str, dict[str, str]] = {}
        _compile(self, policy, name)

    def metric_attributes(self, outcome: str) -> dict[str, str]:
        attrs = self._metric_attributes.get(outcome)
        if attrs is None:
            attrs = self._metric_attributes[outcome] = {
                "reskit.policy": self.name,
                "reskit.outcome": outcome,
            }
        return attrs


def _compile(runner: _Runner, policy: Policy, name: str) -> None:
    timeout_s = policy.timeout
    deadline_s = policy.deadline
    retry = policy.retry
    budget = retry.budget if retry is not None else None
    breaker = policy.breaker
    throttle = policy.throttle
    bulkhead = policy.bulkhead
    keyed = bulkhead is not None and bulkhead.key is not None
    fallback = policy.fallback
    grain = grain_for(timeout_s) if timeout_s is not None else 0.0
    deadline_grain = grain_for(deadline_s) if deadline_s is not None else 0.0
    sampled = breaker is not None or throttle is not None
    # tenacity's stop/wait strategies may measure time since the call began;
    # only then is the start worth a clock read on the success path.
    timed_retry = retry is not None and (
        retry._tenacity_stop is not None
        or retry._tenacity_wait is not None
        or retry._tenacity_retry is not None
    )

    def deadline_exceeded(kind: str = "deadline") -> TimeoutExceeded:
        return TimeoutExceeded(
            f"policy {name!r}: deadline exceeded", policy=name, timeout=deadline_s, kind=kind
        )

    def attempt_limit(d: float | None) -> tuple[float, str]:
        """When an attempt with a timeout must end, and which limit that is."""
        assert timeout_s is not None
        when = _clock.now() + timeout_s
        if d is not None and d < when:
            return d, "deadline"
        return when, "attempt"

    # -- sync --------------------------------------------------------------

    def attempt_sync(fn: Callable[..., Any], args: Any, kwargs: Any, d: float | None) -> Any:
        if timeout_s is None:
            return fn(*args, **kwargs)
        when, kind = attempt_limit(d)
        return run_in_worker(fn, args, kwargs, when, name, kind, timeout_s)

    def retry_sync(
        fn: Callable[..., Any], args: Any, kwargs: Any, d: float | None, obs: _Observation | None
    ) -> Any:
        if budget is not None:
            budget._deposit()
        began = _clock.now() if timed_retry else 0.0
        state: RetryCall | None = None
        while True:
            if obs is not None:
                obs.attempts += 1
            try:
                if not sampled:
                    return attempt_sync(fn, args, kwargs, d)
                bp: Any = breaker._admit(name) if breaker is not None else None
                started = perf_counter()
                try:
                    tp: Any = throttle._admit(name) if throttle is not None else None
                    try:
                        result = attempt_sync(fn, args, kwargs, d)
                    except BaseException as exc:
                        if throttle is not None:
                            throttle._record(tp, exc, perf_counter() - started)
                        raise
                    if throttle is not None:
                        throttle._record(tp, None, perf_counter() - started)
                except BaseException as exc:
                    if breaker is not None:
                        breaker._record(bp, exc, perf_counter() - started)
                    raise
                if breaker is not None:
                    breaker._record(bp, None, perf_counter() - started)
                return result
            except Exception as exc:
                if retry is None:
                    raise
                if state is None:
                    state = RetryCall(retry, name, began if timed_retry else _clock.now())
                delay = state.next_delay(exc, d)
                if delay is None:
                    raise
                if obs is not None:
                    obs.retry(state.attempt, delay, exc)
                _log_retry(name, state.attempt, delay, exc)
                if delay > 0:
                    _clock.sleep(delay)

    def guarded_sync(
        fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        d = _deadline.get()
        if deadline_s is None:
            if d is not None and _clock.now() >= d:
                raise deadline_exceeded()
            return retry_sync(fn, args, kwargs, d, obs)
        now = _clock.now()
        own = now + deadline_s
        if d is None or own < d:
            d = own
        elif now >= d:
            raise deadline_exceeded()
        token = _deadline.set(d)
        try:
            return retry_sync(fn, args, kwargs, d, obs)
        finally:
            _deadline.reset(token)

    def protected_sync(
        fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        if bulkhead is None:
            return guarded_sync(fn, args, kwargs, obs)
        permit = bulkhead._acquire(name, bulkhead._partition(args, kwargs) if keyed else None)
        started = perf_counter()
        try:
            result = guarded_sync(fn, args, kwargs, obs)
        except BaseException as exc:
            bulkhead._release(permit, perf_counter() - started, exc)
            raise
        bulkhead._release(permit, perf_counter() - started, None)
        return result

    def fallback_sync(
        fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        assert fallback is not None
        try:
            return protected_sync(fn, args, kwargs, obs)
        except Exception as exc:
            if not fallback.predicate(exc):
                raise
            if obs is not None:
                obs.fell_back(exc)
            return fallback.fn(exc)

    core_sync = protected_sync if fallback is None else fallback_sync

    def call(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        sink = _telemetry.sink()
        if sink is None:
            return core_sync(fn, args, kwargs, None)
        obs = _Observation(sink, runner)
        try:
            result = core_sync(fn, args, kwargs, obs)
        except BaseException as exc:
            obs.finish(runner, exc)
            raise
        obs.finish(runner, None)
        return result

    # -- async -------------------------------------------------------------

    async def attempt_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, d: float | None
    ) -> Any:
        if timeout_s is None:
            return await fn(*args, **kwargs)
        when, kind = attempt_limit(d)
        task = asyncio.current_task()
        assert task is not None
        expiry = Expiry(task)
        bucket = wheel_for(task.get_loop()).arm(expiry, when, grain)
        token = _deadline.set(when)
        try:
            result = await fn(*args, **kwargs)
        except _CancelledError:
            if expired(expiry):
                raise TimeoutExceeded(
                    f"policy {name!r}: attempt timed out after {timeout_s:.3f}s"
                    if kind == "attempt"
                    else f"policy {name!r}: deadline exceeded",
                    policy=name,
                    timeout=timeout_s,
                    kind=kind,
                ) from None
            raise
        except BaseException:
            if expiry.fired:
                await settle(expiry)
            raise
        finally:
            bucket.discard(expiry)
            _deadline.reset(token)
        if expiry.fired:
            await settle(expiry)
        return result

    async def retry_async(
        fn: Callable[..., Awaitable[Any]],
        args: Any,
        kwargs: Any,
        d: float | None,
        obs: _Observation | None,
    ) -> Any:
        if budget is not None:
            budget._deposit()
        began = _clock.now() if timed_retry else 0.0
        state: RetryCall | None = None
        while True:
            if obs is not None:
                obs.attempts += 1
            try:
                if not sampled:
                    return await attempt_async(fn, args, kwargs, d)
                bp: Any = breaker._admit(name) if breaker is not None else None
                started = perf_counter()
                try:
                    tp: Any = throttle._admit(name) if throttle is not None else None
                    try:
                        result = await attempt_async(fn, args, kwargs, d)
                    except BaseException as exc:
                        if throttle is not None:
                            throttle._record(tp, exc, perf_counter() - started)
                        raise
                    if throttle is not None:
                        throttle._record(tp, None, perf_counter() - started)
                except BaseException as exc:
                    if breaker is not None:
                        breaker._record(bp, exc, perf_counter() - started)
                    raise
                if breaker is not None:
                    breaker._record(bp, None, perf_counter() - started)
                return result
            except Exception as exc:
                if retry is None:
                    raise
                if state is None:
                    state = RetryCall(retry, name, began if timed_retry else _clock.now())
                delay = state.next_delay(exc, d)
                if delay is None:
                    raise
                if obs is not None:
                    obs.retry(state.attempt, delay, exc)
                _log_retry(name, state.attempt, delay, exc)
                await _clock.asleep(delay)

    async def guarded_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        d = _deadline.get()
        if deadline_s is None:
            if d is not None and _clock.now() >= d:
                raise deadline_exceeded()
            return await retry_async(fn, args, kwargs, d, obs)
        now = _clock.now()
        own = now + deadline_s
        if d is None or own < d:
            d = own
        elif now >= d:
            raise deadline_exceeded()
        token = _deadline.set(d)
        task = asyncio.current_task()
        assert task is not None
        # Only our own deadline is enforced here; a tighter outer one is
        # enforced by the policy that set it.
        expiry = Expiry(task)
        bucket = wheel_for(task.get_loop()).arm(expiry, d, deadline_grain)
        try:
            result = await retry_async(fn, args, kwargs, d, obs)
        except _CancelledError:
            if expired(expiry):
                raise deadline_exceeded() from None
            raise
        except BaseException:
            if expiry.fired:
                await settle(expiry)
            raise
        finally:
            bucket.discard(expiry)
            _deadline.reset(token)
        if expiry.fired:
            await settle(expiry)
        return result

    async def protected_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        if bulkhead is None:
            return await guarded_async(fn, args, kwargs, obs)
        permit = await bulkhead._aacquire(
            name, bulkhead._partition(args, kwargs) if keyed else None
        )
        started = perf_counter()
        try:
            result = await guarded_async(fn, args, kwargs, obs)
        except BaseException as exc:
            bulkhead._release(permit, perf_counter() - started, exc)
            raise
        bulkhead._release(permit, perf_counter() - started, None)
        return result

    async def fallback_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        assert fallback is not None
        try:
            return await protected_async(fn, args, kwargs, obs)
        except Exception as exc:
            if not fallback.predicate(exc):
                raise
            if obs is not None:
                obs.fell_back(exc)
            value = fallback.fn(exc)
            if inspect.isawaitable(value):
                value = await value
            return value

    core_async = protected_async if fallback is None else fallback_async

    async def acall(fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> Any:
        sink = _telemetry.sink()
        if sink is None:
            return await core_async(fn, args, kwargs, None)
        obs = _Observation(sink, runner)
        try:
            result = await core_async(fn, args, kwargs, obs)
        except BaseException as exc:
            obs.finish(runner, exc)
            raise
        obs.finish(runner, None)
        return result

    runner.call = call
    runner.acall = acall
    runner.gen, runner.agen = _compile_streams(
        runner, policy, name, deadline_exceeded, attempt_limit
    )


# -- generators -----------------------------------------------------------------


class _Stream:
    """The decisions for one protected generator; shared by both stream drivers.

    A generator is protected as one call spanning its whole iteration: its
    bulkhead slot, breaker sample and span last until it is exhausted, fails or
    is closed. It is retried only while it has yielded nothing: once the caller
    has seen an item, starting again would repeat data.
    """

    __slots__ = ("d", "name", "obs", "permit", "policy", "probe", "retry_call", "runner", "started")

    def __init__(self, runner: _Runner, policy: Policy) -> None:
        self.runner = runner
        self.policy = policy
        self.name = runner.name
        sink = _telemetry.sink()
        self.obs = _Observation(sink, runner) if sink is not None else None
        self.permit: Any = None
        self.probe: Any = None
        self.retry_call: RetryCall | None = None
        self.started = perf_counter()
        d = _deadline.get()
        if policy.deadline is not None:
            own = _clock.now() + policy.deadline
            if d is None or own < d:
                d = own
        self.d = d

    def partition(self, args: Any, kwargs: Any) -> str | None:
        bulkhead = self.policy.bulkhead
        assert bulkhead is not None
        return bulkhead._partition(args, kwargs) if bulkhead.key is not None else None

    def admit(self) -> None:
        """Start an attempt: check the deadline, pass the breaker."""
        if self.d is not None and _clock.now() >= self.d:
            raise TimeoutExceeded(
                f"policy {self.name!r}: deadline exceeded",
                policy=self.name,
                timeout=self.policy.deadline,
                kind="deadline",
            )
        if self.obs is not None:
            self.obs.attempts += 1
        breaker = self.policy.breaker
        if breaker is not None:
            self.probe = breaker._admit(self.name)
            self.started = perf_counter()

    def sample(self, exc: BaseException | None) -> None:
        """The attempt ended (or the stream did): feed the breaker once."""
        breaker = self.policy.breaker
        if breaker is not None and self.probe is not None:
            probe, self.probe = self.probe, None
            breaker._record(probe, exc, perf_counter() - self.started)

    def retry_delay(self, exc: Exception) -> float | None:
        """Seconds to wait before restarting the generator, or None to give up."""
        retry = self.policy.retry
        if retry is None:
            return None
        if self.retry_call is None:
            self.retry_call = RetryCall(retry, self.name, _clock.now())
            if retry.budget is not None:
                retry.budget._deposit()
        delay = self.retry_call.next_delay(exc, self.d)
        if delay is not None:
            if self.obs is not None:
                self.obs.retry(self.retry_call.attempt, delay, exc)
            _log_retry(self.name, self.retry_call.attempt, delay, exc)
        return delay

    def fallback_for(self, exc: Exception) -> Any:
        """The fallback's replacement iterable, or None when it does not apply."""
        fallback = self.policy.fallback
        if fallback is None or not fallback.predicate(exc):
            return None
        if self.obs is not None:
            self.obs.fell_back(exc)
        return fallback.fn(exc)

    def enter(self) -> tuple[Any, Any]:
        """Context for one step: our deadline and span, never left set across a yield."""
        token = _deadline.set(self.d) if self.d is not None else None
        span_token = None
        if self.obs is not None and self.obs.span is not None:
            from opentelemetry import context, trace

            span_token = context.attach(trace.set_span_in_context(self.obs.span))
        return token, span_token

    def leave(self, tokens: tuple[Any, Any]) -> None:
        token, span_token = tokens
        if span_token is not None:
            from opentelemetry import context

            context.detach(span_token)
        if token is not None:
            _deadline.reset(token)

    def close(self, exc: BaseException | None) -> None:
        self.sample(exc)
        bulkhead = self.policy.bulkhead
        if bulkhead is not None and self.permit is not None:
            permit, self.permit = self.permit, None
            bulkhead._release(permit, perf_counter() - self.started, exc)
        if self.obs is not None:
            obs, self.obs = self.obs, None
            obs.finish(self.runner, exc)


def _compile_streams(
    runner: _Runner,
    policy: Policy,
    name: str,
    deadline_exceeded: Callable[..., TimeoutExceeded],
    attempt_limit: Callable[[float | None], tuple[float, str]],
) -> tuple[Callable[..., Generator[Any, Any, Any]], Callable[..., AsyncIterator[Any]]]:
    timeout_s = policy.timeout
    grain = grain_for(timeout_s) if timeout_s is not None else 0.0
    enforce_deadline = policy.deadline is not None
    deadline_grain = grain_for(policy.deadline) if policy.deadline is not None else 0.0

    def gen(
        fn: Callable[..., Generator[Any, Any, Any]], args: Any, kwargs: Any
    ) -> Generator[Any, Any, Any]:
        stream = _Stream(runner, policy)
        failure: BaseException | None = None
        try:
            if policy.bulkhead is not None:
                stream.permit = policy.bulkhead._acquire(name, stream.partition(args, kwargs))
            while True:
                tokens = stream.enter()
                try:
                    stream.admit()
                    it = fn(*args, **kwargs)
                    item = next(it)
                except StopIteration as stop:
                    return stop.value
                except Exception as exc:
                    stream.sample(exc)
                    delay = stream.retry_delay(exc)
                    if delay is None:
                        replacement = stream.fallback_for(exc)
                        if replacement is None:
                            raise
                        return (yield from replacement)
                    if delay > 0:
                        _clock.sleep(delay)
                    continue
                finally:
                    stream.leave(tokens)
                break
            while True:
                try:
                    sent = yield item
                except GeneratorExit:
                    it.close()
                    raise
                except BaseException as thrown:
                    advance: Callable[[], Any] = functools.partial(it.throw, thrown)
                else:
                    advance = functools.partial(it.send, sent)
                tokens = stream.enter()
                try:
                    item = advance()
                except StopIteration as stop:
                    return stop.value
                finally:
                    stream.leave(tokens)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            stream.close(failure)

    async def step(stream: _Stream, advance: Callable[[], Awaitable[Any]]) -> Any:
        """One async step, bounded by the attempt timeout and our own deadline."""
        tokens = stream.enter()
        try:
            when: float | None = None
            kind = "attempt"
            if timeout_s is not None:
                when, kind = attempt_limit(stream.d if enforce_deadline else None)
            elif enforce_deadline:
                when, kind = stream.d, "deadline"
            if when is None:
                return await advance()
            task = asyncio.current_task()
            assert task is not None
            expiry = Expiry(task)
            bucket = wheel_for(task.get_loop()).arm(
                expiry, when, grain if kind == "attempt" else deadline_grain
            )
            try:
                result = await advance()
            except _CancelledError:
                if expired(expiry):
                    raise (
                        deadline_exceeded()
                        if kind == "deadline"
                        else TimeoutExceeded(
                            f"policy {name!r}: step timed out after {timeout_s}s",
                            policy=name,
                            timeout=timeout_s,
                            kind="attempt",
                        )
                    ) from None
                raise
            except BaseException:
                if expiry.fired:
                    await settle(expiry)
                raise
            finally:
                bucket.discard(expiry)
            if expiry.fired:
                await settle(expiry)
            return result
        finally:
            stream.leave(tokens)

    async def agen(fn: Callable[..., AsyncIterator[Any]], args: Any, kwargs: Any) -> Any:
        stream = _Stream(runner, policy)
        failure: BaseException | None = None
        try:
            if policy.bulkhead is not None:
                stream.permit = await policy.bulkhead._aacquire(
                    name, stream.partition(args, kwargs)
                )
            while True:
                try:
                    stream.admit()
                    it: Any = fn(*args, **kwargs)
                    item = await step(stream, it.__anext__)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    stream.sample(exc)
                    delay = stream.retry_delay(exc)
                    if delay is None:
                        replacement = stream.fallback_for(exc)
                        if replacement is None:
                            raise
                        if inspect.isawaitable(replacement):
                            replacement = await replacement
                        if hasattr(replacement, "__aiter__"):
                            async for value in replacement:
                                yield value
                        else:
                            for value in replacement:
                                yield value
                        return
                    await _clock.asleep(delay)
                    continue
                break
            while True:
                try:
                    sent = yield item
                except GeneratorExit:
                    await it.aclose()
                    raise
                except BaseException as thrown:
                    advance: Callable[[], Awaitable[Any]] = functools.partial(it.athrow, thrown)
                else:
                    advance = functools.partial(it.asend, sent)
                try:
                    item = await step(stream, advance)
                except StopAsyncIteration:
                    return
        except BaseException as exc:
            failure = exc
            raise
        finally:
            stream.close(failure)

    return gen, agen


# -- the public class ---------------------------------------------------------------


class Policy:
    """A bundle of resilience strategies, applied in one canonical order.

    Use it as a decorator on ``def``, ``async def`` and (async) generator
    functions, or call through it with :meth:`call` / :meth:`acall`::

        payments = reskit.Policy(
            "payments",
            timeout=2.0,
            deadline=5.0,
            retry=reskit.Retry(attempts=3, on=(ConnectionError, TimeoutError)),
            fallback=lambda exc: {"status": "queued"},
        )

        @payments
        def charge(order_id: str) -> dict: ...

    The strategies run outermost first: fallback → kill switch → brownout shed →
    bulkhead → deadline → retry (+ budget) → circuit breaker → throttle →
    attempt timeout → the call. So a rejected call costs no retry and no
    breaker sample, and each attempt is sampled by the breaker.

    Args:
        name: names the span (``reskit <name>``), the metrics and log events.
            Single-strategy decorators leave it ``None`` and use the decorated
            function's qualified name.
        timeout: seconds (or a ``timedelta``) each attempt may take. Async
            attempts are cancelled; sync attempts run in a worker thread and
            the caller stops waiting (the thread runs on; see the docs).
        deadline: seconds the whole call may take, across attempts and waits.
            It propagates: nested policies and :func:`reskit.remaining_deadline`
            see what is left.
        retry: a :class:`Retry`.
        breaker: a :class:`CircuitBreaker`.
        bulkhead: a :class:`Bulkhead`.
        throttle: an :class:`AdaptiveThrottle` (client-side adaptive throttling).
        kill_switch: a kill switch name, or ``True`` for the policy's name.
        shed_at: shed the call while the brownout level is at least this.
        fallback: ``fn(exc)`` returning a value instead of raising, or a
            :class:`Fallback`.

    Invalid combinations raise at construction with a message saying what to
    change (for example a ``deadline`` shorter than the ``timeout``).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_runner",
        "_runners",
        "breaker",
        "bulkhead",
        "deadline",
        "fallback",
        "kill_switch",
        "name",
        "retry",
        "shed_at",
        "throttle",
        "timeout",
    )

    def __init__(
        self,
        name: str | None = None,
        *,
        timeout: float | timedelta | None = None,
        deadline: float | timedelta | None = None,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        bulkhead: Bulkhead | None = None,
        throttle: AdaptiveThrottle | None = None,
        kill_switch: str | bool | None = None,
        shed_at: int | None = None,
        fallback: Callable[[Exception], Any] | Fallback | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"Policy name must be a non-empty string, got {name!r}")
        self.name = name
        self.timeout = seconds(timeout, "Policy timeout")
        self.deadline = seconds(deadline, "Policy deadline")
        if self.timeout is not None and self.deadline is not None and self.deadline < self.timeout:
            raise ValueError(
                f"Policy deadline ({self.deadline}s) is shorter than its attempt timeout "
                f"({self.timeout}s): the timeout could never fire; lower timeout= or raise "
                "deadline="
            )
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"Policy retry= must be a reskit.Retry, got {retry!r}")
        self.retry = retry
        if breaker is not None:
            from ._breaker import CircuitBreaker

            if not isinstance(breaker, CircuitBreaker):
                raise TypeError(f"Policy breaker= must be a reskit.CircuitBreaker, got {breaker!r}")
        self.breaker = breaker
        if bulkhead is not None:
            from ._bulkhead import Bulkhead

            if not isinstance(bulkhead, Bulkhead):
                raise TypeError(f"Policy bulkhead= must be a reskit.Bulkhead, got {bulkhead!r}")
        self.bulkhead = bulkhead
        if throttle is not None:
            from ._throttle import AdaptiveThrottle

            if not isinstance(throttle, AdaptiveThrottle):
                raise TypeError(
                    f"Policy throttle= must be a reskit.AdaptiveThrottle, got {throttle!r}"
                )
        self.throttle = throttle
        if kill_switch is not None and kill_switch is not False:
            raise NotImplementedError(
                "Policy(kill_switch=...) needs kill switches, which this version of reskit "
                "does not ship yet"
            )
        if shed_at is not None:
            raise NotImplementedError(
                "Policy(shed_at=...) needs brownout levels, which this version of reskit "
                "does not ship yet"
            )
        self.kill_switch = None
        self.shed_at = None
        if fallback is not None and not isinstance(fallback, Fallback):
            fallback = Fallback(fallback)
        self.fallback = fallback
        self._runners: dict[str, _Runner] = {}
        self._runner = _Runner(self, name) if name is not None else None

    def _runner_for(self, fn: Callable[..., Any]) -> _Runner:
        runner = self._runner
        if runner is not None:
            return runner
        key = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = _Runner(self, key)
        return runner

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate ``fn``, keeping its kind (sync, async, generator) and signature."""
        runner = self._runner_for(fn)
        if inspect.isasyncgenfunction(fn):
            agen = runner.agen

            @functools.wraps(fn)
            def agen_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return agen(fn, args, kwargs)

            return agen_wrapper
        if inspect.isgeneratorfunction(fn):
            if self.timeout is not None:
                raise TypeError(
                    "timeout= cannot be enforced on a sync generator (its steps run in the "
                    "caller's thread); use deadline= or make it an async generator"
                )
            gen = runner.gen

            @functools.wraps(fn)
            def gen_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return gen(fn, args, kwargs)

            return gen_wrapper
        if inspect.iscoroutinefunction(fn):
            acall = runner.acall

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await acall(fn, args, kwargs)

            return async_wrapper
        call = runner.call

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return call(fn, args, kwargs)

        return wrapper

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the policy (sync).

        .. versionadded:: 0.1.0
        """
        result: R = self._runner_for(fn).call(fn, args, kwargs)
        return result

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` through the policy (async).

        .. versionadded:: 0.1.0
        """
        result: R = await self._runner_for(fn).acall(fn, args, kwargs)
        return result

    def __repr__(self) -> str:
        parts = [repr(self.name)] if self.name is not None else []
        for field in ("timeout", "deadline", "retry", "breaker", "bulkhead", "throttle"):
            value = getattr(self, field)
            if value is not None:
                parts.append(f"{field}={value!r}")
        if self.fallback is not None:
            parts.append(f"fallback={self.fallback.fn!r}")
        return f"Policy({', '.join(parts)})"

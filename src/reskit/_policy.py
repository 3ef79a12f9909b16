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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from datetime import timedelta
from time import perf_counter
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from opentelemetry import context as _otel_context
from opentelemetry import trace as _TRACE_SLOT
from opentelemetry.metrics import _internal as _METER_SLOT
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace import set_span_in_context as _set_span_in_context

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
_sink = _telemetry.sink
_SyncRun = Callable[[Callable[..., Any], Any, Any, "_Observation | None"], Any]
_AsyncRun = Callable[
    [Callable[..., Awaitable[Any]], Any, Any, "_Observation | None"], Awaitable[Any]
]


class _Observation:
    """The span and metrics of one call; only built when something records.

    For a function call (``activate=True``) the span and a generated
    correlation ID are made current for the whole call, so nested policies,
    child spans, the sync timeout's worker and log events all see them. A
    generator cannot keep anything current across its yields (the consumer's
    context would inherit it), so :class:`_Stream` activates them per step.
    """

    __slots__ = (
        "attempts",
        "breaker_state",
        "cid",
        "cid_token",
        "context_token",
        "outcome",
        "rejected_by",
        "sink",
        "span",
        "started",
    )

    def __init__(self, sink: _telemetry.Sink, runner: _Runner, activate: bool = True) -> None:
        self.sink = sink
        self.attempts = 0
        self.outcome = "success"
        self.rejected_by: str | None = None
        self.started = perf_counter()
        self.span: Any = None
        self.cid_token: Any = None
        self.context_token: Any = None
        self.cid: str | None = None
        self.breaker_state: str | None = None
        tracer = sink.tracer
        if tracer is not None:
            cid = _correlation_id.get()
            if cid is None:
                cid = new_correlation_id()
                self.cid = cid
                if activate:
                    self.cid_token = _correlation_id.set(cid)
            # Everything a first-try success needs goes in at the start: each later
            # set_attributes takes the SDK span's lock and copies, about 2 µs.
            attributes: dict[str, Any] = {
                "reskit.policy": runner.name,
                "reskit.correlation_id": cid,
                "reskit.outcome": "success",
                "reskit.attempts": 1,
            }
            breaker = runner.breaker
            if breaker is not None:
                self.breaker_state = attributes["reskit.breaker.state"] = breaker.state.value
            self.span = span = tracer.start_span(runner.span_name, attributes=attributes)
            if activate:
                self.context_token = _otel_context.attach(_set_span_in_context(span))

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
            breaker = runner.breaker
            state = breaker.state.value if breaker is not None else None
            if self.outcome != "success" or self.attempts != 1 or state != self.breaker_state:
                changed: dict[str, Any] = {
                    "reskit.outcome": self.outcome,
                    "reskit.attempts": self.attempts,
                }
                if self.rejected_by is not None:
                    changed["reskit.rejected_by"] = self.rejected_by
                if state is not None:
                    changed["reskit.breaker.state"] = state
                span.set_attributes(changed)
            if exc is not None:
                span.record_exception(exc)
                if self.outcome != "cancelled":
                    span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            if self.context_token is not None:
                _otel_context.detach(self.context_token)
            span.end()
        if self.cid_token is not None:
            _correlation_id.reset(self.cid_token)
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
        "abind",
        "acall",
        "agen_for",
        "bind",
        "breaker",
        "call",
        "gen_for",
        "name",
        "span_name",
    )

    call: Callable[[Callable[..., Any], Any, Any], Any]
    bind: Callable[[Callable[..., Any]], Callable[..., Any]]
    abind: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]
    acall: Callable[[Callable[..., Awaitable[Any]], Any, Any], Awaitable[Any]]
    gen_for: Callable[[Callable[..., Generator[Any, Any, Any]]], Callable[..., Any]]
    agen_for: Callable[[Callable[..., AsyncIterator[Any]]], Callable[..., Any]]

    def __init__(self, policy: Policy, name: str) -> None:
        self.name = name
        self.span_name = f"reskit {name}"
        self.breaker = policy.breaker
        # Unnamed strategies take the name of the first policy that compiles them,
        # so their log events and gauges say whose they are.
        if policy.breaker is not None:
            policy.breaker._adopt_name(name)
        if policy.bulkhead is not None and policy.bulkhead.name is None:
            policy.bulkhead.name = name
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
    # Only slow-call detection needs an attempt's duration; reading the clock
    # twice per attempt is otherwise a third of a closed breaker's cost.
    timed_attempts = breaker is not None and breaker._slow_call_duration is not None
    bare_breaker = (
        breaker is not None and throttle is None and timeout_s is None and not timed_attempts
    )
    # tenacity's stop/wait strategies may measure time since the call began;
    # only then is the start worth a clock read on the success path.
    timed_retry = retry is not None and (
        retry._tenacity_stop is not None
        or retry._tenacity_wait is not None
        or retry._tenacity_retry is not None
    )

    def timed_out(kind: str = "deadline") -> TimeoutExceeded:
        """``timeout`` is the limit that fired: the attempt timeout, or this policy's
        deadline (``None`` when the deadline was inherited from an outer policy)."""
        if kind == "attempt":
            return TimeoutExceeded(
                f"policy {name!r}: attempt timed out after {timeout_s}s",
                policy=name,
                timeout=timeout_s,
                kind=kind,
            )
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

    # How the drivers are built. A Python call per layer of the canonical order
    # would cost more than most strategies, so layers are blocks guarded by
    # constant tests inside as few functions as possible:
    #   [fallback] → [bulkhead] → [core: deadline → retry loop] → attempt
    # The bracketed functions exist only when configured (a policy with neither
    # retry nor deadline runs the attempt directly), and the attempt holds the
    # breaker, throttle, attempt timeout and call.

    def retry_or_raise(
        exc: Exception, state: RetryCall | None, began: float, d: float | None, obs: Any
    ) -> tuple[RetryCall, float] | None:
        """After a failed attempt: the retry state and wait, or None to re-raise."""
        assert retry is not None
        if state is None:
            state = RetryCall(retry, name, began if timed_retry else _clock.now())
        delay = state.next_delay(exc, d)
        if delay is None:
            return None
        if obs is not None:
            obs.retry(state.attempt, delay, exc)
        _log_retry(name, state.attempt, delay, exc)
        return state, delay

    def own_deadline() -> float:
        """This policy's deadline, or the outer one when that is tighter."""
        assert deadline_s is not None
        own = _clock.now() + deadline_s
        outer = _deadline.get()
        return outer if outer is not None and outer < own else own

    def sample(probe: Any, ticket: Any, exc: BaseException | None, started: float) -> None:
        """Tell the throttle and the breaker how the attempt they admitted ended."""
        elapsed = _clock.now() - started if timed_attempts else 0.0
        if ticket is not None:
            throttle._record(ticket, exc, elapsed)  # type: ignore[union-attr]
        if probe is not None:
            breaker._record(probe, exc, elapsed)  # type: ignore[union-attr]

    # -- sync --------------------------------------------------------------

    def attempt_sync(
        fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        """One attempt: breaker → throttle → attempt timeout → the call."""
        d = _deadline.get()
        if d is not None and _clock.now() >= d:
            raise timed_out()
        if obs is not None:
            obs.attempts += 1
        if not sampled:
            if timeout_s is None:
                return fn(*args, **kwargs)
            when, kind = attempt_limit(d)
            return run_in_worker(fn, args, kwargs, when, name, timed_out, kind)
        if bare_breaker:
            # The most common sampled attempt, without the general case's tests.
            probe = breaker._admit(name)  # type: ignore[union-attr]
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                breaker._record(probe, exc, 0.0)  # type: ignore[union-attr]
                raise
            breaker._record(probe, None, 0.0)  # type: ignore[union-attr]
            return result
        probe = breaker._admit(name) if breaker is not None else None
        ticket: Any = None
        started = _clock.now() if timed_attempts else 0.0
        try:
            if throttle is not None:
                ticket = throttle._admit(name)
            if timeout_s is None:
                result = fn(*args, **kwargs)
            else:
                when, kind = attempt_limit(d)
                result = run_in_worker(fn, args, kwargs, when, name, timed_out, kind)
        except BaseException as exc:
            sample(probe, ticket, exc, started)
            raise
        sample(probe, ticket, None, started)
        return result

    def core_sync(fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None) -> Any:
        """Deadline → retry (+ budget) → the attempts."""
        token = _deadline.set(own_deadline()) if deadline_s is not None else None
        try:
            if retry is None:
                return attempt_sync(fn, args, kwargs, obs)
            if budget is not None:
                budget._deposit()
            began = _clock.now() if timed_retry else 0.0
            state: RetryCall | None = None
            while True:
                try:
                    return attempt_sync(fn, args, kwargs, obs)
                except Exception as exc:
                    decision = retry_or_raise(exc, state, began, _deadline.get(), obs)
                    if decision is None:
                        raise
                    state, delay = decision
                    if delay > 0:
                        _clock.sleep(delay)
        finally:
            if token is not None:
                _deadline.reset(token)

    def with_bulkhead_sync(inner: _SyncRun) -> _SyncRun:
        assert bulkhead is not None

        def run(fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None) -> Any:
            permit = bulkhead._acquire(name, bulkhead._partition(args, kwargs) if keyed else None)
            held = _clock.now()
            try:
                result = inner(fn, args, kwargs, obs)
            except BaseException as exc:
                bulkhead._release(permit, _clock.now() - held, exc)
                raise
            bulkhead._release(permit, _clock.now() - held, None)
            return result

        return run

    def with_fallback_sync(inner: _SyncRun) -> _SyncRun:
        assert fallback is not None

        def run(fn: Callable[..., Any], args: Any, kwargs: Any, obs: _Observation | None) -> Any:
            try:
                return inner(fn, args, kwargs, obs)
            except Exception as exc:
                if not fallback.predicate(exc):
                    raise
                if obs is not None:
                    obs.fell_back(exc)
                value = fallback.fn(exc)
                if inspect.isawaitable(value):
                    if inspect.iscoroutine(value):
                        value.close()
                    raise TypeError(
                        f"policy {name!r}: the fallback returned an awaitable for a sync call; "
                        "use a plain function as the fallback of sync functions"
                    ) from exc
                return value

        return run

    # Outer layers exist only when configured: an absent layer costs no frame
    # and no re-raise on the way out (a rejection's path is the hot one).
    # Without a retry or a deadline the attempt is the whole core: a rejection
    # then passes no retry loop's except clause (a third of its cost).
    run_sync: _SyncRun = core_sync if retry is not None or deadline_s is not None else attempt_sync
    if bulkhead is not None:
        run_sync = with_bulkhead_sync(run_sync)
    if fallback is not None:
        run_sync = with_fallback_sync(run_sync)

    def observed_sync(fn: Callable[..., Any], args: Any, kwargs: Any, sink: Any) -> Any:
        obs = _Observation(sink, runner)
        try:
            result = run_sync(fn, args, kwargs, obs)
        except BaseException as exc:
            obs.finish(runner, exc)
            raise
        obs.finish(runner, None)
        return result

    def call(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        sink = _sink()
        if sink is None:
            return run_sync(fn, args, kwargs, None)
        return observed_sync(fn, args, kwargs, sink)

    def bind(fn: Callable[..., Any]) -> Callable[..., Any]:
        """The decorated function: ``call`` inlined, one frame fewer per call."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # "Nothing records", tested inline: calling _telemetry.sink() costs more
            # than the test; decorated functions are where the hot paths live.
            if (
                _TRACE_SLOT._TRACER_PROVIDER is None
                and _METER_SLOT._METER_PROVIDER is None
                and _telemetry._tp_override is None
                and _telemetry._mp_override is None
            ):
                return run_sync(fn, args, kwargs, None)
            sink = _sink()
            if sink is None:
                return run_sync(fn, args, kwargs, None)
            return observed_sync(fn, args, kwargs, sink)

        return wrapper

    # -- async -------------------------------------------------------------

    async def attempt_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        """One attempt: breaker → throttle → attempt timeout → the call."""
        d = _deadline.get()
        if d is not None and _clock.now() >= d:
            raise timed_out()
        if obs is not None:
            obs.attempts += 1
        if not sampled:
            if timeout_s is None:
                return await fn(*args, **kwargs)
            return await timed_async(fn, args, kwargs, d)
        probe: Any = breaker._admit(name) if breaker is not None else None
        ticket: Any = None
        started = _clock.now() if timed_attempts else 0.0
        try:
            if throttle is not None:
                ticket = throttle._admit(name)
            if timeout_s is None:
                result = await fn(*args, **kwargs)
            else:
                result = await timed_async(fn, args, kwargs, d)
        except BaseException as exc:
            sample(probe, ticket, exc, started)
            raise
        sample(probe, ticket, None, started)
        return result

    async def core_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
    ) -> Any:
        """Deadline (enforced by cancellation) → retry (+ budget) → the attempts."""
        token = None
        own: Expiry | None = None
        if deadline_s is not None:
            d = own_deadline()
            token = _deadline.set(d)
            task = asyncio.current_task()
            assert task is not None
            # Only our own deadline is enforced here; a tighter outer one is
            # enforced by the policy that set it.
            own = Expiry(task)
            own_bucket = wheel_for(task.get_loop()).arm(own, d, deadline_grain)
        try:
            if retry is None:
                result = await attempt_async(fn, args, kwargs, obs)
            else:
                if budget is not None:
                    budget._deposit()
                began = _clock.now() if timed_retry else 0.0
                state: RetryCall | None = None
                while True:
                    try:
                        result = await attempt_async(fn, args, kwargs, obs)
                        break
                    except Exception as exc:
                        decision = retry_or_raise(exc, state, began, _deadline.get(), obs)
                        if decision is None:
                            raise
                        state, delay = decision
                        await _clock.asleep(delay)
        except _CancelledError:
            if own is not None and expired(own):
                raise timed_out() from None
            raise
        except BaseException:
            if own is not None and own.fired:
                await settle(own)
            raise
        finally:
            if own is not None:
                own_bucket.discard(own)
            if token is not None:
                _deadline.reset(token)
        if own is not None and own.fired:
            await settle(own)
        return result

    def with_bulkhead_async(inner: _AsyncRun) -> _AsyncRun:
        assert bulkhead is not None

        async def run(
            fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
        ) -> Any:
            key = bulkhead._partition(args, kwargs) if keyed else None
            # A free slot is taken without creating a coroutine; only a wait awaits.
            permit = bulkhead._take(key)
            if permit is None:
                permit = await bulkhead._aacquire(name, key)
            held = _clock.now()
            try:
                result = await inner(fn, args, kwargs, obs)
            except BaseException as exc:
                bulkhead._release(permit, _clock.now() - held, exc)
                raise
            bulkhead._release(permit, _clock.now() - held, None)
            return result

        return run

    def with_fallback_async(inner: _AsyncRun) -> _AsyncRun:
        assert fallback is not None

        async def run(
            fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, obs: _Observation | None
        ) -> Any:
            try:
                return await inner(fn, args, kwargs, obs)
            except Exception as exc:
                if not fallback.predicate(exc):
                    raise
                if obs is not None:
                    obs.fell_back(exc)
                value = fallback.fn(exc)
                if inspect.isawaitable(value):
                    value = await value
                return value

        return run

    run_async: _AsyncRun = (
        core_async if retry is not None or deadline_s is not None else attempt_async
    )
    if bulkhead is not None:
        run_async = with_bulkhead_async(run_async)
    if fallback is not None:
        run_async = with_fallback_async(run_async)

    async def timed_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, d: float | None
    ) -> Any:
        """The attempt timeout: cancel the attempt when its bucket fires."""
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
                raise timed_out(kind) from None
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

    async def observed_async(
        fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, sink: Any
    ) -> Any:
        obs = _Observation(sink, runner)
        try:
            result = await run_async(fn, args, kwargs, obs)
        except BaseException as exc:
            obs.finish(runner, exc)
            raise
        obs.finish(runner, None)
        return result

    async def acall(fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> Any:
        sink = _sink()
        if sink is None:
            return await run_async(fn, args, kwargs, None)
        return await observed_async(fn, args, kwargs, sink)

    def abind(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if (
                _TRACE_SLOT._TRACER_PROVIDER is None
                and _METER_SLOT._METER_PROVIDER is None
                and _telemetry._tp_override is None
                and _telemetry._mp_override is None
            ):
                return await run_async(fn, args, kwargs, None)
            sink = _sink()
            if sink is None:
                return await run_async(fn, args, kwargs, None)
            return await observed_async(fn, args, kwargs, sink)

        return wrapper

    runner.call = call
    runner.bind = bind
    runner.abind = abind
    runner.acall = acall
    runner.gen_for, runner.agen_for = _compile_streams(
        runner, policy, name, timed_out, attempt_limit
    )


# -- generators -----------------------------------------------------------------


_NO_FALLBACK: Any = object()


class _Stream:
    """The decisions for one protected generator; shared by both stream drivers.

    A generator is protected as one call spanning its whole iteration: its
    bulkhead slot, breaker sample and span last until it is exhausted, fails or
    is closed. It is retried only while it has yielded nothing: once the caller
    has seen an item, starting again would repeat data.
    """

    __slots__ = (
        "began",
        "d",
        "held",
        "name",
        "obs",
        "permit",
        "policy",
        "probe",
        "retry_call",
        "runner",
        "started",
    )

    def __init__(self, runner: _Runner, policy: Policy) -> None:
        self.runner = runner
        self.policy = policy
        self.name = runner.name
        sink = _telemetry.sink()
        self.obs = _Observation(sink, runner, activate=False) if sink is not None else None
        self.permit: Any = None
        self.probe: Any = None
        self.retry_call: RetryCall | None = None
        self.started = self.held = self.began = _clock.now()
        d = _deadline.get()
        if policy.deadline is not None:
            own = _clock.now() + policy.deadline
            if d is None or own < d:
                d = own
        self.d = d
        retry = policy.retry
        if retry is not None and retry.budget is not None:
            retry.budget._deposit()

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
            self.started = _clock.now()

    def sample(self, exc: BaseException | None) -> None:
        """The attempt ended (or the stream did): feed the breaker once."""
        breaker = self.policy.breaker
        if breaker is not None and self.probe is not None:
            probe, self.probe = self.probe, None
            breaker._record(probe, exc, _clock.now() - self.started)

    def retry_delay(self, exc: Exception) -> float | None:
        """Seconds to wait before restarting the generator, or None to give up."""
        retry = self.policy.retry
        if retry is None:
            return None
        if self.retry_call is None:
            self.retry_call = RetryCall(retry, self.name, self.began)
        delay = self.retry_call.next_delay(exc, self.d)
        if delay is not None:
            if self.obs is not None:
                self.obs.retry(self.retry_call.attempt, delay, exc)
            _log_retry(self.name, self.retry_call.attempt, delay, exc)
        return delay

    def fallback_for(self, exc: Exception) -> Any:
        """The fallback's replacement iterable (``None`` = empty), or ``_NO_FALLBACK``."""
        fallback = self.policy.fallback
        if fallback is None or not fallback.predicate(exc):
            return _NO_FALLBACK
        if self.obs is not None:
            self.obs.fell_back(exc)
        value = fallback.fn(exc)
        return () if value is None else value

    def enter(self) -> tuple[Any, Any, Any]:
        """Context for one step: deadline, span and correlation ID, never left set
        across a yield (the consumer's context would inherit them)."""
        token = _deadline.set(self.d) if self.d is not None else None
        span_token = cid_token = None
        obs = self.obs
        if obs is not None:
            if obs.span is not None:
                span_token = _otel_context.attach(_set_span_in_context(obs.span))
            if obs.cid is not None:
                cid_token = _correlation_id.set(obs.cid)
        return token, span_token, cid_token

    def leave(self, tokens: tuple[Any, Any, Any]) -> None:
        token, span_token, cid_token = tokens
        if cid_token is not None:
            _correlation_id.reset(cid_token)
        if span_token is not None:
            _otel_context.detach(span_token)
        if token is not None:
            _deadline.reset(token)

    def close(self, exc: BaseException | None) -> None:
        self.sample(exc)
        bulkhead = self.policy.bulkhead
        if bulkhead is not None and self.permit is not None:
            permit, self.permit = self.permit, None
            bulkhead._release(permit, _clock.now() - self.held, exc)
        if self.obs is not None:
            obs, self.obs = self.obs, None
            obs.finish(self.runner, exc)


def _compile_streams(
    runner: _Runner,
    policy: Policy,
    name: str,
    timed_out: Callable[..., TimeoutExceeded],
    attempt_limit: Callable[[float | None], tuple[float, str]],
) -> tuple[Callable[..., Callable[..., Any]], Callable[..., Callable[..., Any]]]:
    timeout_s = policy.timeout
    grain = grain_for(timeout_s) if timeout_s is not None else 0.0
    enforce_deadline = policy.deadline is not None
    deadline_grain = grain_for(policy.deadline) if policy.deadline is not None else 0.0

    def gen_for(fn: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Any]:
        def gen(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            stream = _Stream(runner, policy)
            failure: BaseException | None = None
            try:
                if policy.bulkhead is not None:
                    stream.permit = policy.bulkhead._acquire(name, stream.partition(args, kwargs))
                replacement = _NO_FALLBACK
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
                            if replacement is _NO_FALLBACK:
                                raise
                            break
                        if delay > 0:
                            _clock.sleep(delay)
                        continue
                    finally:
                        stream.leave(tokens)
                    break
                if replacement is not _NO_FALLBACK:
                    # Yielded outside enter()/leave(): nothing of ours may stay set
                    # in the consumer's context while it reads the items.
                    return (yield from replacement)
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

        return gen

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
            if when <= _clock.now():
                raise timed_out(kind)
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
                    raise timed_out(kind) from None
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

    def agen_for(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def agen(*args: Any, **kwargs: Any) -> Any:
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
                            if replacement is _NO_FALLBACK:
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

        return agen

    return gen_for, agen_for


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
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate ``fn``, keeping its kind (sync, async, generator) and signature."""
        runner = self._runner_for(fn)
        if inspect.isasyncgenfunction(fn):
            # The driver is compiled for this function, so the wrapper *is* an
            # async generator function (inspect and frameworks see its kind).
            return functools.wraps(fn)(runner.agen_for(fn))
        if inspect.isgeneratorfunction(fn):
            if self.timeout is not None:
                raise TypeError(
                    "timeout= cannot be enforced on a sync generator (its steps run in the "
                    "caller's thread); use deadline= or make it an async generator"
                )
            return functools.wraps(fn)(runner.gen_for(fn))
        if inspect.iscoroutinefunction(fn):
            return functools.wraps(fn)(runner.abind(fn))
        return functools.wraps(fn)(runner.bind(fn))

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

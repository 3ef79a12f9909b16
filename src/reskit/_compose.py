"""Compose a policy into drivers: one description, four kinds of call.

The canonical order lives in ``_order.ORDER``. For each row a policy
configures, a *writer* below emits that layer's part of a driver around the
layers inside it: a gate's admit/record, the retry loop, the deadline... The
result is the source of one function per kind of call (function, coroutine,
generator, async generator), compiled once and executed per policy with the
policy's strategies as its globals.

Why generate code? A call per layer would cost more than most strategies do
(a Python frame is ~50 ns; a closed breaker's whole decision is less), and
writing the composition out by hand for each kind is how the copies drifted
apart before. So each layer is written once, here, with the few places where
a kind differs made explicit: how it waits (``_clock.sleep`` or ``await``),
how an attempt's timeout is enforced (a worker thread or cancellation), and,
for streams, that gates record when the stream ends rather than when its first
item arrives. The generated code contains only the layers a policy has, so a
policy with a retry alone runs one frame around the call. (attrs and
``dataclasses`` generate ``__init__`` for the same reason.)

Generated sources depend only on a policy's *shape* (which layers, which
kinds); values such as the name and the timeout are globals of the executed
code. Compiled code is cached by source text and registered with
:mod:`linecache`, so tracebacks show the driver's lines, and
:func:`source_for` shows the driver of any policy.
"""

from __future__ import annotations

import enum
import inspect
import linecache
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _clock, _telemetry
from ._context import _correlation_id, _deadline, new_correlation_id
from ._errors import Rejected, TimeoutExceeded
from ._observe import Observation, log_retry
from ._order import ORDER, Role
from ._retry import Flow, Retry, RetryCall, arun_flow, require_condition, run_flow
from ._timeout import Expiry, expired, grain_for, run_in_worker, settle, wheel_for

if TYPE_CHECKING:
    from ._policy import Policy, Runner
    from ._stats import Counters

__all__ = ["Kind", "compile_driver", "kind_of", "source_for"]


class Kind(enum.Enum):
    """The four kinds of protected call."""

    FUNCTION = "function"
    COROUTINE = "coroutine"
    GENERATOR = "generator"
    ASYNC_GENERATOR = "async generator"

    @property
    def is_async(self) -> bool:
        return self is Kind.COROUTINE or self is Kind.ASYNC_GENERATOR

    @property
    def is_stream(self) -> bool:
        return self is Kind.GENERATOR or self is Kind.ASYNC_GENERATOR


_CO_COROUTINE = inspect.CO_COROUTINE
_CO_GENERATOR = inspect.CO_GENERATOR
_CO_ASYNC_GENERATOR = inspect.CO_ASYNC_GENERATOR


def kind_of(fn: Callable[..., Any]) -> Kind:
    """The kind of call ``fn`` makes: cheap for plain functions and methods."""
    if type(fn) is types.FunctionType or type(fn) is types.MethodType:
        flags = fn.__code__.co_flags
        if flags & _CO_ASYNC_GENERATOR:
            return Kind.ASYNC_GENERATOR
        if flags & _CO_COROUTINE:
            return Kind.COROUTINE
        if flags & _CO_GENERATOR:
            return Kind.GENERATOR
        if not inspect.iscoroutinefunction(fn):  # 3.12+'s markcoroutinefunction
            return Kind.FUNCTION
        return Kind.COROUTINE
    # Partials, callable objects, builtins: inspect unwraps them.
    kind = _inspected_kind(fn)
    if kind is not Kind.FUNCTION:
        return kind
    # A callable object: the kind of its class's __call__ (inherited or not).
    call = None if isinstance(fn, type) else inspect.getattr_static(type(fn), "__call__", None)
    if isinstance(call, types.FunctionType):
        return _inspected_kind(call)
    return Kind.FUNCTION


def _inspected_kind(fn: Callable[..., Any]) -> Kind:
    if inspect.isasyncgenfunction(fn):
        return Kind.ASYNC_GENERATOR
    if inspect.isgeneratorfunction(fn):
        return Kind.GENERATOR
    if inspect.iscoroutinefunction(fn):
        return Kind.COROUTINE
    return Kind.FUNCTION


# -- what a driver is built from ----------------------------------------------------


@dataclass(slots=True)
class _Layer:
    writer: Callable[[_Writer, _Layer, Callable[[], None]], None]
    value: Any
    index: int = -1  # among the gates, for unique names


class _Writer:
    """The source of one driver being written, and the values it refers to."""

    def __init__(self, kind: Kind, observe: str) -> None:
        self.kind = kind
        # "none": no observation in this driver; "always": ``obs`` is set;
        # "maybe": ``obs`` may be None (generators decide per call).
        self.observe = observe
        self.lines: list[str] = []
        self.depth = 0
        # A stream's gates hold their permits until it ends: (index, duration).
        self.held: list[tuple[int, str]] = []
        # What a deadline TimeoutExceeded reports as its limit: the deadline layer's
        # ``limit`` variable, or None when the policy only inherits a deadline.
        self.limit = "None"
        # Whether the layer being written runs inside the retry loop.
        self.in_retry = False

    def __call__(self, *lines: str) -> None:
        pad = "    " * self.depth
        self.lines.extend(pad + line for line in lines)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def obs(self, line: str) -> None:
        """A line that reports to the observation, when this driver has one."""
        if self.observe == "always":
            self(line)
        elif self.observe == "maybe":
            self(f"if obs is not None: {line}")

    @property
    def obs_ref(self) -> str:
        return "None" if self.observe == "none" else "obs"

    def await_(self) -> str:
        return "await " if self.kind.is_async else ""


_Inner = Callable[[], None]


# -- the layers: one writer per role ---------------------------------------------------


def _fallback(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    with w.block("try:"):
        inner()
    with w.block("except Exception as exc:"):
        w("if not FB_PREDICATE(exc):", "    raise")
        w.obs("obs.fell_back(exc)")
        if w.kind is Kind.FUNCTION:
            w("result = FB(exc)", "if _isawaitable(result):")
            w("    _awaitable_fallback(result, exc, NAME)")
        elif w.kind is Kind.COROUTINE:
            w("result = FB(exc)", "if _isawaitable(result):", "    result = await result")
        else:
            # Streams yield the replacement after this block, outside our context.
            w("replacement = FB(exc)")
        # Counted once the fallback answered: what it raises is counted as the call's end.
        w("_counters.fell_back(exc)")


def _gate(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    gate = layer.value
    i = layer.index
    if not getattr(gate, "records", True):
        # A flag gate (kill switch, brownout): no permit, nothing to record, and
        # admit is asked only while its flag is up; the common case costs two
        # attribute reads.
        w(f"if f{i}.up:", f"    g{i}_admit(NAME, None, fn, args, kwargs)")
        inner()
        return
    if w.kind.is_async and gate.waits:
        # A free permit is taken without creating a coroutine; only queueing awaits.
        # (Into a temporary: a stream's p{i} must stay "not held" if queueing fails.)
        w(f"permit = g{i}_try(NAME, None, fn, args, kwargs)")
        w(
            "if permit is None:",
            f"    permit = await g{i}_admit_async(NAME, None, fn, args, kwargs)",
        )
        w(f"p{i} = permit")
    else:
        w(f"p{i} = g{i}_admit(NAME, None, fn, args, kwargs)")
    duration = "0.0"
    if gate.timed:
        w(f"t{i} = _clock.now()")
        duration = f"_clock.now() - t{i}"
    with w.block("try:"):
        inner()
    with w.block("except BaseException as exc:"):
        if w.in_retry:
            # A failed attempt of a retried call: its ID is made now, before the
            # breaker may log a transition, so all the call's events share it.
            w("if rcall is None:", "    rcall = _RetryCall(RETRY, NAME, began, fn, args, kwargs)")
            w("_bind_call_id(rcall)")
        if w.kind.is_stream:
            # Not held any more, even if recording raises: never recorded twice.
            w(f"permit, p{i} = p{i}, _NOT_HELD", f"g{i}_record(permit, exc, {duration})")
        else:
            w(f"g{i}_record(p{i}, exc, {duration})")
        w("raise")
    if w.kind.is_stream:
        # The permit lives as long as the stream: the driver records it when the
        # stream ends, however it ends (see _stream_driver).
        w.held.append((i, duration))
    else:
        w(f"g{i}_record(p{i}, None, {duration}, result)")


def _deadline_layer(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    w(
        "D = _clock.now() + DEADLINE",
        "limit = DEADLINE",
        "outer = _deadline.get()",
        "if outer is not None and outer < D:",
        "    D = outer",
        "    limit = None  # the caller's deadline is the tighter one",
    )
    if w.kind.is_async:
        # Enforced by cancelling the task when the deadline's wheel bucket fires.
        _bounded(w, False, "D", inner, prefix="d_")
        return
    # Cooperative: attempts, nested timeouts and remaining_deadline() honour it.
    w("dtoken = _deadline.set(D)")
    with w.block("try:"):
        inner()
    with w.block("finally:"):
        w("_deadline.reset(dtoken)")


def _sleep(w: _Writer) -> None:
    if w.kind.is_async:
        w("await _clock.asleep(delay)")
    else:
        w("if delay > 0:", "    _clock.sleep(delay)")


def _retry(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    retry: Retry = layer.value
    if retry.budget is not None:
        w("BUDGET_DEPOSIT()")
    w("began = _clock.now()" if retry._timed else "began = 0.0", "rcall = None")
    # In async code any strategy or hook may hand back an awaitable (a lambda around a
    # coroutine function), so async drivers always run the flow with arun_flow.
    run = "await _arun_flow" if w.kind.is_async else "_run_flow"
    with w.block("try:"):
        w.in_retry = True
        _retry_loop(w, retry, run, inner)
        w.in_retry = False
    with w.block("finally:"):
        # A correlation ID made for this call's retry events ends with the call.
        w("if rcall is not None and rcall.cid_token is not None:")
        w("    _correlation_id.reset(rcall.cid_token)")


def _retry_loop(w: _Writer, retry: Retry, run: str, inner: _Inner) -> None:
    with w.block("while True:"):
        with w.block("try:"):
            inner()
        with w.block("except Exception as exc:"):
            w("if rcall is None:", "    rcall = _RetryCall(RETRY, NAME, began, fn, args, kwargs)")
            w(f"delay = {run}(_decide(rcall, exc, None, {w.obs_ref}))")
            w("if delay is None:", "    raise")
            _sleep(w)
            w("continue")
        if retry._inspects_results:
            # Only functions and coroutines get here (see _check).
            if getattr(retry.on_result, "pure", False) is True:
                # A predicate that may be asked twice (the httpx transport's status
                # check): a first attempt whose result stands ends the loop here,
                # without building the retry's state, on every successful call's path.
                w("if rcall is None and not RETRY_ON_RESULT(result):", "    break")
            w("if rcall is None:", "    rcall = _RetryCall(RETRY, NAME, began, fn, args, kwargs)")
            w(f"delay = {run}(_decide(rcall, None, result, {w.obs_ref}))")
            with w.block("if delay is not None:"):
                _sleep(w)
                w("continue")
        w("break")


def _attempt(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    w(
        "DL = _deadline.get()",
        "if DL is not None and _clock.now() >= DL:",
        f"    raise TIMED_OUT('deadline', {w.limit})",
    )
    w.obs("obs.attempts += 1")
    w("_counters.attempts += 1")
    inner()


def _bounded(
    w: _Writer,
    timeout: bool,
    cap: str | None,
    inner: _Inner,
    *,
    check: str | None = None,
    prefix: str = "",
) -> None:
    """Await ``inner`` cancelled at ``now + TIMEOUT`` or ``cap``, whichever is first.

    While it runs, ``remaining_deadline()`` reports that bound. With ``check`` (a
    line to run first, such as closing the stream), a bound already reached raises
    before anything is awaited. ``prefix`` keeps the variables of nested bounds
    (the deadline's around an attempt's) apart.
    """
    when, kind, lim, grain = (f"{prefix}{name}" for name in ("when", "kind", "lim", "grain"))
    expiry, bucket, token = (f"{prefix}{name}" for name in ("expiry", "bucket", "token"))
    if timeout or check is not None:
        w("now = _clock.now()")
    if timeout:
        w(f"{when} = now + TIMEOUT", f"{kind} = 'attempt'", f"{lim} = TIMEOUT")
        w(f"{grain} = TIMEOUT_GRAIN")
        if cap is not None:
            w(
                f"if {cap} is not None and {cap} < {when}:",
                f"    {when} = {cap}",
                f"    {kind} = 'deadline'",
                f"    {lim} = {w.limit}",
            )
    else:
        assert cap is not None
        w(f"{when} = {cap}", f"{kind} = 'deadline'", f"{lim} = {w.limit}")
        w(f"{grain} = DEADLINE_GRAIN")
    if check is not None:
        w(f"if {when} <= now:", f"    {check}", f"    raise TIMED_OUT({kind}, {lim})")
    w(
        "task = _current_task()",
        f"{expiry} = _Expiry(task)",
        f"{bucket} = _wheel_for(task.get_loop()).arm({expiry}, {when}, {grain})",
        f"{token} = _deadline.set({when})",
    )
    with w.block("try:"):
        inner()
    with w.block("except _CancelledError:"):
        w(f"if _expired({expiry}):", f"    raise TIMED_OUT({kind}, {lim}) from None", "raise")
    with w.block("except BaseException:"):
        w(f"if {expiry}.fired:", f"    await _settle({expiry})", "raise")
    with w.block("finally:"):
        w(f"{bucket}.discard({expiry})", f"_deadline.reset({token})")
    w(f"if {expiry}.fired:", f"    await _settle({expiry})")


def _timeout(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    if w.kind is Kind.FUNCTION:
        # A thread cannot be interrupted: the attempt runs in a worker and the
        # caller stops waiting for it on time. The worker makes the call.
        w("when = _clock.now() + TIMEOUT", "kind = 'attempt'", "lim = TIMEOUT")
        w("if DL is not None and DL < when:", "    when = DL", "    kind = 'deadline'")
        w(f"    lim = {w.limit}")
        w("result = _run_in_worker(fn, args, kwargs, when, NAME, TIMED_OUT, kind, lim)")
        return
    assert w.kind.is_async, "timeout= on a sync generator is refused before compiling"
    _bounded(w, True, "DL", inner)


def _call(w: _Writer) -> None:
    """The innermost layer: the call itself (a stream's first step)."""
    kind = w.kind
    if kind is Kind.FUNCTION:
        w("result = fn(*args, **kwargs)")
    elif kind is Kind.COROUTINE:
        w("result = await fn(*args, **kwargs)")
    elif kind is Kind.GENERATOR:
        w("it = fn(*args, **kwargs)")
        w("try:", "    result = next(it)", "except StopIteration as stop:")
        w("    it = None", "    result = stop.value")
    else:
        w("it = fn(*args, **kwargs)")
        w("try:", "    result = await it.__anext__()", "except StopAsyncIteration:")
        w("    it = None", "    result = None")


def _stream_scope(w: _Writer, layer: _Layer, inner: _Inner) -> None:
    """Inside a stream's fallback: the span and correlation ID, for one step only."""
    w("tokens = obs.enter() if obs is not None else None")
    with w.block("try:"):
        inner()
    with w.block("finally:"):
        w("if tokens is not None:", "    obs.leave(tokens)")


_WRITERS: dict[Role, Callable[[_Writer, _Layer, _Inner], None]] = {
    Role.FALLBACK: _fallback,
    Role.GATE: _gate,
    Role.DEADLINE: _deadline_layer,
    Role.RETRY: _retry,
    Role.ATTEMPT: _attempt,
    Role.TIMEOUT: _timeout,
}


def _compose(w: _Writer, layers: list[_Layer]) -> None:
    """Write ``layers``, outermost first, around the call."""
    if any(layer.writer is _deadline_layer for layer in layers):
        w.limit = "limit"

    def write(position: int) -> None:
        if position == len(layers):
            _call(w)
            return
        layer = layers[position]
        layer.writer(w, layer, lambda: write(position + 1))

    write(0)


# -- the drivers of each kind -------------------------------------------------------------


def _layers_of(policy: Policy, kind: Kind) -> list[_Layer]:
    """The layers ``policy`` configures, in the canonical order."""
    layers: list[_Layer] = []
    gates = 0
    for row in ORDER:
        value = None if row.keyword is None else getattr(policy, row.keyword)
        if row.keyword is not None and value is None:
            continue
        if row.role is Role.GATE:
            if row.gate is not None:
                value = row.gate(value)
            layers.append(_Layer(_gate, value, gates))
            gates += 1
        else:
            if row.role is Role.RETRY:
                assert value is not None
                require_condition(value)
            layers.append(_Layer(_WRITERS[row.role], value))
    if kind.is_stream:
        # A stream's context is set for one step at a time, just inside its fallback.
        at = 1 if layers[0].writer is _fallback else 0
        layers.insert(at, _Layer(_stream_scope, None))
    return layers


# "Nothing records": the test of _telemetry.quiet(), inlined where calls start.
# It reads the providers in force through _telemetry.watch; an API module that
# is imported but not adopted yet fails the test, and _sink() adopts it.
_QUIET = (
    "(_W.trace._TRACER_PROVIDER is None and _W.metrics._METER_PROVIDER is None)"
    " if _W.settled else"
    " ('opentelemetry.trace' not in _modules"
    " and 'opentelemetry.metrics._internal' not in _modules)"
    " if _W.blank else"
    " (_W.trace._TRACER_PROVIDER is None and _W.metrics._METER_PROVIDER is None"
    " and (_W.trace_resolved or 'opentelemetry.trace' not in _modules)"
    " and (_W.metrics_resolved or 'opentelemetry.metrics._internal' not in _modules))"
)


def _rejections(layers: list[_Layer]) -> list[type[Rejected]]:
    """The rejection classes the policy's own gates raise, without duplicates."""
    classes: list[type[Rejected]] = []
    for layer in layers:
        if layer.writer is _gate and layer.value.rejection not in classes:
            classes.append(layer.value.rejection)
    return classes


def _call_driver(kind: Kind, layers: list[_Layer]) -> list[str]:
    """``make(fn)`` (the decorator's wrapper), ``run`` (for policy.call) and ``observed``."""
    plain = _Writer(kind, "none")
    plain.depth = 2
    _compose(plain, layers)
    seen = _Writer(kind, "always")
    seen.depth = 2
    _compose(seen, layers)
    d = "async def" if kind.is_async else "def"
    aw = "await " if kind.is_async else ""
    # Rejections are counted inline, with a clause per class the policy's gates
    # raise: binding the exception to look at it costs a fifth of an open
    # breaker's whole rejection.
    own = [
        line
        for i, _ in enumerate(_rejections(layers))
        for line in (f"    except REJECTION_{i}:", f"        TALLY_{i}.n += 1", "        raise")
    ]
    plain_body = [
        "    _counters.calls += 1",
        "    try:",
        *plain.lines,
        *own,
        "    except _Rejected as exc:",
        "        _rejected[exc.rejected_by].n += 1",
        "        raise",
        "    except Exception:",
        "        _counters.failures += 1",
        "        raise",
        "    return result",
    ]
    return [
        f"{d} observed(fn, args, kwargs, sink):",
        "    _counters.calls += 1",
        "    obs = _Observation(sink, RUNNER)",
        "    try:",
        *seen.lines,
        "    except BaseException as exc:",
        "        _counters.ended(exc)",
        "        obs.finish(exc)",
        "        raise",
        "    obs.finish(None)",
        "    return result",
        "",
        f"{d} run(fn, args, kwargs):",
        f"    if not ({_QUIET}):",
        "        sink = _sink()",
        "        if sink is not None:",
        f"            return {aw}observed(fn, args, kwargs, sink)",
        *plain_body,
        "",
        "def make(fn):",
        f"    {d} wrapper(*args, **kwargs):",
        # "Nothing records", tested inline: calling _telemetry.sink() costs more
        # than the test, and decorated functions are where the hot paths live.
        f"        if not ({_QUIET}):",
        "            sink = _sink()",
        "            if sink is not None:",
        f"                return {aw}observed(fn, args, kwargs, sink)",
        *("    " + line for line in plain_body),
        "    return wrapper",
    ]


def _stream_driver(kind: Kind, layers: list[_Layer], policy: Policy) -> list[str]:
    """``make(fn)`` for a generator function: a generator that protects ``fn``'s."""
    start = _Writer(kind, "maybe")
    start.depth = 3
    has_fallback = policy.fallback is not None
    if policy.deadline is None:
        start("D = _deadline.get()")
    if has_fallback:
        start("replacement = _NO_FALLBACK")
    _compose(start, layers)
    w = start
    is_async = kind.is_async
    if has_fallback:
        with w.block("if replacement is not _NO_FALLBACK:"):
            if is_async:
                w("if _isawaitable(replacement):", "    replacement = await replacement")
                with w.block("if replacement is not None:"):
                    # The replacement is closed however the consumer ends (yield from
                    # does that for sync streams).
                    with w.block("if hasattr(replacement, '__aiter__'):"):
                        w("replacement = replacement.__aiter__()")
                        with w.block("try:"):
                            w("async for value in replacement:", "    yield value")
                        with w.block("finally:"):
                            w("if hasattr(replacement, 'aclose'):")
                            w("    await replacement.aclose()")
                    with w.block("else:"):
                        w("replacement = iter(replacement)")
                        with w.block("try:"):
                            w("for value in replacement:", "    yield value")
                        with w.block("finally:"):
                            w("if hasattr(replacement, 'close'):", "    replacement.close()")
                w("return")
            else:
                w("if replacement is None:", "    replacement = ()")
                w("return (yield from replacement)")
    # The stream: forward each item, and send/throw/close back, one step at a
    # time with our context set only while a step runs.
    with w.block("if it is not None:"):
        w("thrown = None")
        with w.block("while True:"):
            with w.block("try:"):
                w("sent = yield result")
            with w.block("except GeneratorExit:"):
                w("await it.aclose()" if is_async else "it.close()", "raise")
            with w.block("except BaseException as error:"):
                w("thrown = error")
            with w.block("else:"):
                w("thrown = None")
            w("tokens = obs.enter() if obs is not None else None")
            own_bound = policy.timeout is not None or policy.deadline is not None
            bounded = is_async and own_bound
            # A bounded step sets the deadline to its bound, which is never later than D.
            set_d = "stoken = _deadline.set(D) if D is not None else None"
            w("stoken = None" if bounded else set_d)
            with w.block("try:"):
                close = "await it.aclose()" if is_async else "it.close()"
                if not bounded:
                    # Cooperative, as attempts are: no step starts past the deadline. The
                    # stream ends there, so the generator it protects is closed first.
                    w(
                        "if D is not None and _clock.now() >= D:",
                        f"    {close}",
                        f"    raise TIMED_OUT('deadline', {w.limit})",
                    )
                if is_async:
                    advance = "aw = it.asend(sent) if thrown is None else it.athrow(thrown)"
                    with w.block("try:"):
                        if bounded:
                            # Each step is bounded by the attempt timeout and this
                            # policy's own deadline, as an attempt is.
                            _bounded(
                                w,
                                policy.timeout is not None,
                                "D",
                                lambda: w(advance, "result = await aw"),
                                check=close,
                            )
                        else:
                            w(advance, "result = await aw")
                    with w.block("except StopAsyncIteration:"):
                        w("result = None", "break")
                else:
                    with w.block("try:"):
                        w("result = it.send(sent) if thrown is None else it.throw(thrown)")
                    with w.block("except StopIteration as stop:"):
                        w("result = stop.value", "break")
            with w.block("finally:"):
                w("if stoken is not None:", "    _deadline.reset(stoken)")
                w("if tokens is not None:", "    obs.leave(tokens)")
    if not is_async:
        w("return result")
    d = "async def" if is_async else "def"
    # Each held permit is recorded, innermost first, and the span ends, even if a
    # record raises (a faulty custom adaptive limit): nested try/finally blocks.
    release: list[str] = []
    pad = " " * 12
    for i, duration in reversed(w.held):
        release += [
            f"{pad}try:",
            f"{pad}    if p{i} is not _NOT_HELD:",
            f"{pad}        permit, p{i} = p{i}, _NOT_HELD",
            f"{pad}        g{i}_record(permit, call_exc, {duration})",
            f"{pad}finally:",
        ]
        pad += "    "
    release += [f"{pad}if obs is not None:", f"{pad}    obs.finish(call_exc)"]
    return [
        "def make(fn):",
        f"    {d} wrapper(*args, **kwargs):",
        "        _counters.calls += 1",
        "        sink = _sink()",
        "        obs = _Observation(sink, RUNNER, False) if sink is not None else None",
        "        call_exc = None",
        *(f"        p{i} = _NOT_HELD" for i, _ in w.held),
        "        try:",
        *w.lines,
        "        except BaseException as exc:",
        "            call_exc = exc",
        "            _counters.ended(exc)",
        "            raise",
        "        finally:",
        # Permits still held (the stream started) are recorded with how it ended.
        *release,
        "    return wrapper",
    ]


def _check(policy: Policy, kind: Kind) -> None:
    """Refuse, before compiling, what a kind cannot honour."""
    retry = policy.retry
    if not kind.is_async and retry is not None and retry._is_async:
        raise TypeError(
            f"policy {policy.name!r}: its Retry has async strategies or hooks (tenacity.asyncio, "
            f"async def predicates), which need an async function; this is a {kind.value}"
        )
    if kind is Kind.GENERATOR and policy.timeout is not None:
        raise TypeError(
            "timeout= cannot be enforced on a sync generator (its steps run in the "
            "caller's thread); use deadline= or make it an async generator"
        )
    if kind.is_stream:
        if retry is not None and retry._inspects_results:
            raise TypeError(
                f"policy {policy.name!r}: Retry(on_result=...) and tenacity strategies that judge "
                f"results need a function's result; a {kind.value} yields a stream"
            )
        breaker = policy.breaker
        if breaker is not None and breaker.on_result is not None:
            raise TypeError(
                f"policy {policy.name!r}: CircuitBreaker(on_result=...) needs a function's "
                f"result; a {kind.value} yields a stream"
            )


_code_lock = threading.Lock()
_codes: dict[str, types.CodeType] = {}


def _renew_code_lock() -> None:
    global _code_lock
    _code_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_code_lock)


def _source(policy: Policy, kind: Kind) -> str:
    layers = _layers_of(policy, kind)
    lines = _stream_driver(kind, layers, policy) if kind.is_stream else _call_driver(kind, layers)
    return "\n".join(lines) + "\n"


def source_for(policy: Policy, kind: Kind = Kind.FUNCTION) -> str:
    """The source of the driver ``policy`` runs for ``kind`` (for contributors)."""
    _check(policy, kind)
    return _source(policy, kind)


def _code(source: str) -> types.CodeType:
    with _code_lock:
        code = _codes.get(source)
        if code is None:
            filename = f"<reskit driver {len(_codes) + 1}>"
            code = compile(source, filename, "exec")
            # Tracebacks through a driver show its lines, as for any module.
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            _codes[source] = code
    return code


def _timed_out(name: str) -> Callable[[str, float | None], TimeoutExceeded]:
    def timed_out(kind: str, limit: float | None) -> TimeoutExceeded:
        """``limit`` is the limit that fired: the attempt timeout, or this policy's
        deadline (``None`` when the deadline was inherited from an outer policy)."""
        if kind == "attempt":
            message = f"policy {name!r}: attempt timed out after {limit}s"
        elif limit is None:
            message = f"policy {name!r}: deadline exceeded (the caller's deadline)"
        else:
            message = f"policy {name!r}: deadline exceeded ({limit}s)"
        return TimeoutExceeded(message, policy=name, timeout=limit, kind=kind)

    return timed_out


def _decider(name: str, counters: Counters) -> Callable[..., Flow[float | None]]:
    def decide(
        rcall: RetryCall, exc: BaseException | None, result: Any, obs: Observation | None
    ) -> Flow[float | None]:
        delay = yield from rcall.decide(exc, result, _deadline.get())
        if delay is None:
            if exc is None and rcall.asked:
                counters.failures += 1
                if obs is not None:
                    obs.result_failed = True
            return None
        counters.retries += 1
        if obs is not None:
            obs.retry(rcall.attempt, delay, exc, result)
        _bind_call_id(rcall)
        log_retry(name, rcall.attempt, delay, exc, result)
        return delay

    return decide


def _bind_call_id(rcall: RetryCall) -> None:
    """Give a retried call a correlation ID for its events, if none is bound.

    It stays current until the call ends (the retry layer resets it), so every
    event of the call, retries and the breaker transitions they cause, carries it.
    """
    if rcall.cid_token is None and _correlation_id.get() is None:
        rcall.cid_token = _correlation_id.set(new_correlation_id())


def _awaitable_fallback(value: Any, exc: BaseException, name: str) -> None:
    if inspect.iscoroutine(value):
        value.close()
    raise TypeError(
        f"policy {name!r}: the fallback returned an awaitable for a sync call; "
        "use a plain function as the fallback of sync functions"
    ) from exc


_NO_FALLBACK: Any = object()
_NOT_HELD: Any = object()

_HELPERS: dict[str, Any] = {
    "_clock": _clock,
    "_deadline": _deadline,
    "_run_in_worker": run_in_worker,
    "_Expiry": Expiry,
    "_wheel_for": wheel_for,
    "_expired": expired,
    "_settle": settle,
    "_isawaitable": inspect.isawaitable,
    "_run_flow": run_flow,
    "_arun_flow": arun_flow,
    "_RetryCall": RetryCall,
    "_Observation": Observation,
    "_sink": _telemetry.sink,
    "_W": _telemetry.watch,
    "_modules": sys.modules,
    "_correlation_id": _correlation_id,
    "_bind_call_id": _bind_call_id,
    "_NO_FALLBACK": _NO_FALLBACK,
    "_NOT_HELD": _NOT_HELD,
    "_Rejected": Rejected,
    "_awaitable_fallback": _awaitable_fallback,
}


def compile_driver(runner: Runner, policy: Policy, kind: Kind) -> dict[str, Any]:
    """Compile ``policy`` for ``kind``; returns the namespace holding ``make`` (and ``run``)."""
    _check(policy, kind)
    code = _code(_source(policy, kind))
    name = runner.name
    namespace: dict[str, Any] = dict(_HELPERS)
    if kind.is_async:
        # Only async drivers need asyncio; an application with async code has it already.
        import asyncio

        namespace.update(_current_task=asyncio.current_task, _CancelledError=asyncio.CancelledError)
    namespace.update(
        NAME=name,
        RUNNER=runner,
        _counters=runner.counters,
        _rejected=runner.counters.rejected,
        TIMED_OUT=_timed_out(name),
        _decide=_decider(name, runner.counters),
    )
    if policy.timeout is not None:
        namespace["TIMEOUT"] = policy.timeout
        namespace["TIMEOUT_GRAIN"] = grain_for(policy.timeout)
    if policy.deadline is not None:
        namespace["DEADLINE"] = policy.deadline
        namespace["DEADLINE_GRAIN"] = grain_for(policy.deadline)
    if policy.fallback is not None:
        namespace["FB"] = policy.fallback.fn
        namespace["FB_PREDICATE"] = policy.fallback._predicate
    if policy.retry is not None:
        namespace["RETRY"] = policy.retry
        namespace["RETRY_ON_RESULT"] = policy.retry.on_result
        if policy.retry.budget is not None:
            namespace["BUDGET_DEPOSIT"] = policy.retry.budget._deposit
    layers = _layers_of(policy, kind)
    for i, rejection in enumerate(_rejections(layers)):
        namespace[f"REJECTION_{i}"] = rejection
        namespace[f"TALLY_{i}"] = runner.counters.rejected[rejection.rejected_by]
    for layer in layers:
        if layer.writer is _gate:
            gate = layer.value
            i = layer.index
            namespace[f"g{i}_admit"] = gate.admit
            namespace[f"g{i}_record"] = gate.record
            if not getattr(gate, "records", True):
                namespace[f"f{i}"] = gate.flag
            if gate.waits:
                namespace[f"g{i}_try"] = gate.try_admit
                namespace[f"g{i}_admit_async"] = gate.admit_async
    exec(code, namespace)
    return namespace

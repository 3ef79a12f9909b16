"""Fallback: what a call returns instead of raising."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._config import Frozen
from ._retry import ExceptionFilter, _sync_predicate

__all__ = ["Fallback"]


class Fallback(Frozen):
    """Return ``fn(exc)`` instead of raising when the protected call fails.

    ``fn`` receives the exception that ended the call: a :class:`ReskitError`
    when a protection rejected it (circuit open, bulkhead full, timeout...) or
    the function's own exception after the last retry. For ``async`` policies
    ``fn`` may be a coroutine function; its result is awaited. For generators
    the fallback's return value is an iterable whose items are yielded instead
    (``None`` yields nothing); it applies only while the generator has yielded
    nothing. A result that a retry's ``on_result`` still rejects after the last
    attempt is returned as it is: the fallback answers exceptions only.

    Args:
        fn: the fallback, called with the exception.
        on: which exceptions fall back: an exception type, a tuple of them, or a
            predicate (default: every ``Exception``; cancellation and other
            ``BaseException``\\ s always propagate).

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_predicate", "fn", "on")

    _instead = "Build a new Fallback(...) and use policy.replace(fallback=...)."

    fn: Callable[[Exception], Any]
    on: ExceptionFilter
    _predicate: Callable[[Exception], bool]

    def __init__(self, fn: Callable[[Exception], Any], *, on: ExceptionFilter = Exception) -> None:
        if not callable(fn):
            raise TypeError(f"fallback must be callable with the exception, got {fn!r}")
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "on", on)
        object.__setattr__(self, "_predicate", _sync_predicate(on, "Fallback on="))

    def __repr__(self) -> str:
        return f"Fallback({self.fn!r}, on={self.on!r})"

"""Fallback: what a call returns instead of raising."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._retry import ExceptionFilter, _as_predicate

__all__ = ["Fallback"]


class Fallback:
    """Return ``fn(exc)`` instead of raising when the protected call fails.

    ``fn`` receives the exception that ended the call: a :class:`ReskitError`
    when a protection rejected it (circuit open, bulkhead full, timeout...) or
    the function's own exception after the last retry. For ``async`` policies
    ``fn`` may be a coroutine function; its result is awaited.

    Args:
        fn: the fallback, called with the exception.
        on: which exceptions fall back: an exception type, a tuple of them, or a
            predicate (default: every ``Exception``; cancellation and other
            ``BaseException``\\ s always propagate).

    .. versionadded:: 0.1.0
    """

    __slots__ = ("fn", "on", "predicate")

    def __init__(self, fn: Callable[[Exception], Any], *, on: ExceptionFilter = Exception) -> None:
        if not callable(fn):
            raise TypeError(f"fallback must be callable with the exception, got {fn!r}")
        self.fn = fn
        self.on = on
        self.predicate = _as_predicate(on)

    def __repr__(self) -> str:
        return f"Fallback({self.fn!r}, on={self.on!r})"

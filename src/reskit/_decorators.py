"""Single-strategy decorators: each returns a one-strategy :class:`Policy`.

They stack like any decorators; the outer one wraps the inner one::

    @reskit.fallback(lambda exc: [])
    @reskit.retry(attempts=3, on=ConnectionError)
    @reskit.timeout(2.0)
    def fetch() -> list[str]: ...

A single :class:`Policy` with all three runs them in the canonical order and
costs less; stacking is for when the order must differ.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from ._fallback import Fallback
from ._policy import Policy
from ._retry import (
    DEFAULT_WAIT_INITIAL,
    DEFAULT_WAIT_MAX,
    Retry,
    RetryBudget,
    RetryDetails,
    require_condition,
)

if TYPE_CHECKING:
    import random as _random

    from ._retry import ExceptionFilter

__all__ = ["circuit_breaker", "bulkhead", "fallback", "retry", "timeout"]


def timeout(seconds: float | timedelta, *, name: str | None = None) -> Policy:
    """A policy that bounds each call to ``seconds``.

    .. versionadded:: 0.1.0
    """
    return Policy(name, timeout=seconds)


def retry(
    attempts: int | None = None,
    on: ExceptionFilter | None = None,
    *,
    on_result: Callable[[Any], bool] | None = None,
    wait: float | timedelta | wait_base | Callable[[Any], float] | None = None,
    wait_initial: float | timedelta = DEFAULT_WAIT_INITIAL,
    wait_max: float | timedelta = DEFAULT_WAIT_MAX,
    stop: stop_base | Callable[[Any], bool] | None = None,
    retry: retry_base | Callable[[Any], bool] | None = None,
    budget: RetryBudget | None = None,
    on_retry: Callable[[RetryDetails], Any] | None = None,
    random: _random.Random | None = None,
    deadline: float | timedelta | None = None,
    name: str | None = None,
) -> Policy:
    """A policy that retries; the arguments are :class:`Retry`'s.

    ``deadline=`` bounds the whole call across attempts.

    .. versionadded:: 0.1.0
    """
    strategy = Retry(
        attempts,
        on,
        on_result=on_result,
        wait=wait,
        wait_initial=wait_initial,
        wait_max=wait_max,
        stop=stop,
        retry=retry,
        budget=budget,
        on_retry=on_retry,
        random=random,
    )
    require_condition(strategy)  # a decorator always protects a function
    return Policy(name, deadline=deadline, retry=strategy)


def fallback(
    fn: Callable[[Exception], Any], *, on: ExceptionFilter = Exception, name: str | None = None
) -> Policy:
    """A policy that returns ``fn(exc)`` when the call raises a matching exception.

    .. versionadded:: 0.1.0
    """
    return Policy(name, fallback=Fallback(fn, on=on))


def circuit_breaker(*args: Any, name: str | None = None, **kwargs: Any) -> Policy:
    """A policy with a :class:`CircuitBreaker` built from these arguments.

    .. versionadded:: 0.1.0
    """
    from ._breaker import CircuitBreaker

    return Policy(name, breaker=CircuitBreaker(*args, name=name, **kwargs))


def bulkhead(*args: Any, name: str | None = None, **kwargs: Any) -> Policy:
    """A policy with a :class:`Bulkhead` built from these arguments.

    .. versionadded:: 0.1.0
    """
    from ._bulkhead import Bulkhead

    return Policy(name, bulkhead=Bulkhead(*args, name=name, **kwargs))

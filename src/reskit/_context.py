"""Per-call context: the correlation ID and the propagated deadline.

Both live in context variables, so they follow a request through ``await``,
``asyncio.create_task`` and (because reskit copies the context into its worker
threads) through sync timeouts, and never leak from one request to the next.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

from . import _clock

__all__ = [
    "CORRELATION_ID_PATTERN",
    "CorrelationIdFilter",
    "bind_correlation_id",
    "correlation_id",
    "new_correlation_id",
    "remaining_deadline",
    "valid_correlation_id",
]

#: What a correlation ID received from outside must look like to be trusted.
CORRELATION_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# IDs come from a generator of their own: drawing from the global one would shift
# an application's seeded random sequence (a test's jitter) whenever reskit made
# an ID. A forked child reseeds it, or parent and child would make the same IDs.
_ids = random.Random()
_random_bits = _ids.getrandbits
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)
_correlation_id: ContextVar[str | None] = ContextVar("reskit_correlation_id", default=None)
# Absolute time on reskit's monotonic clock by which the current call must end.
_deadline: ContextVar[float | None] = ContextVar("reskit_deadline", default=None)


def correlation_id() -> str | None:
    """Return the correlation ID bound to the current context, if any.

    .. versionadded:: 0.1.0
    """
    return _correlation_id.get()


def new_correlation_id() -> str:
    """Return a fresh random correlation ID (32 hex characters).

    .. versionadded:: 0.1.0
    """
    # Not a secret, only unique: the OTel SDK draws trace IDs the same way, at a
    # fraction of the cost of os.urandom on the hot path of a recorded call.
    return f"{_random_bits(128):032x}"


def valid_correlation_id(value: object) -> bool:
    """Return whether ``value`` is safe to adopt as a correlation ID.

    Only ``[A-Za-z0-9._-]{1,128}`` passes, so header injection, control
    characters, markup and oversized values never reach logs or responses.

    .. versionadded:: 0.1.0
    """
    return isinstance(value, str) and CORRELATION_ID_PATTERN.fullmatch(value) is not None


@contextmanager
def bind_correlation_id(value: str | None = None) -> Iterator[str]:
    """Bind a correlation ID for the duration of a ``with`` block.

    The ID is visible to :func:`correlation_id`, recorded on reskit's spans and
    bound into structlog's context variables as ``correlation_id``. ``None``
    generates a new ID. An ID that does not match ``[A-Za-z0-9._-]{1,128}``
    raises :class:`ValueError`; use :func:`valid_correlation_id` to check
    untrusted input first. Yields the bound ID.

    .. versionadded:: 0.1.0
    """
    if value is None:
        value = new_correlation_id()
    elif not valid_correlation_id(value):
        raise ValueError(
            "a correlation ID must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'; "
            "generate one with reskit.new_correlation_id() instead of passing this value"
        )
    tokens = enter_correlation_id(value)
    try:
        yield value
    finally:
        exit_correlation_id(tokens)


def enter_correlation_id(value: str) -> tuple[Token[str | None], dict[str, Any] | None]:
    """Bind a checked ID until :func:`exit_correlation_id`; what middleware uses per request."""
    token = _correlation_id.set(value)
    if _STRUCTLOG_CONTEXTVARS not in sys.modules:
        return token, None  # no structlog in this process: the usual case, without a call
    try:
        return token, _bind_for_logs(value)
    except BaseException:
        _correlation_id.reset(token)
        raise


def exit_correlation_id(tokens: tuple[Token[str | None], dict[str, Any] | None]) -> None:
    token, log_tokens = tokens
    try:
        if log_tokens is not None:
            sys.modules[_STRUCTLOG_CONTEXTVARS].reset_contextvars(**log_tokens)
    finally:
        _correlation_id.reset(token)


def adopt_correlation_id(value: str) -> None:
    """Bind a checked ID in the current context, with nothing to undo.

    For a context made for one request (``contextvars.copy_context()``), which
    is dropped when the request ends.
    """
    _correlation_id.set(value)
    _bind_for_logs(value)


_STRUCTLOG_CONTEXTVARS = "structlog.contextvars"


def _bind_for_logs(value: str) -> dict[str, Any] | None:
    """Bind ``correlation_id`` in structlog's context variables, if structlog is in use."""
    # Only an application that uses structlog has imported it; reskit does not. (It
    # may be half-imported by another thread: then it is not bound to yet.)
    contextvars = sys.modules.get(_STRUCTLOG_CONTEXTVARS)
    bind = getattr(contextvars, "bind_contextvars", None)
    if bind is None:
        return None
    tokens: dict[str, Any] = bind(correlation_id=value)
    return tokens


class CorrelationIdFilter(logging.Filter):
    """A logging filter that puts the current correlation ID on every record.

    Each record that passes gets a ``correlation_id`` attribute (``default``
    when none is bound), so a format string can show it::

        handler.addFilter(reskit.CorrelationIdFilter())
        handler.setFormatter(logging.Formatter("%(correlation_id)s %(message)s"))

    Add it to a *handler* to cover every logger that reaches it (uvicorn's
    access log included: uvicorn logs a request while the app's context is
    current). It never drops a record.

    .. versionadded:: 0.1.0
    """

    def __init__(self, default: str = "-") -> None:
        super().__init__()
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        """Set ``record.correlation_id``; keep the record."""
        record.correlation_id = _correlation_id.get() or self.default
        return True


def remaining_deadline() -> float | None:
    """Return the seconds left before the innermost deadline, or ``None``.

    Inside a policy with ``deadline=`` (or ``timeout=``, which bounds each
    attempt), this is what is left of the tighter of the two; it never goes
    below ``0.0``. Code that does I/O (the httpx transport, Redis calls) should
    honour it.

    .. versionadded:: 0.1.0
    """
    deadline = _deadline.get()
    if deadline is None:
        return None
    left = deadline - _clock.now()
    return left if left > 0.0 else 0.0

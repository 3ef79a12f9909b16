"""The exceptions reskit raises.

Everything reskit raises on its own account derives from :class:`ReskitError`::

    ReskitError
    ├── TimeoutExceeded        (also a builtin TimeoutError)
    ├── Rejected               a call refused before it ran; never retried
    │   ├── CircuitOpen
    │   ├── BulkheadFull
    │   ├── KillSwitchOff
    │   ├── Shed
    │   ├── Throttled
    │   └── RetryBudgetExhausted
    ├── IdempotencyConflict
    ├── IdempotencyMismatch
    ├── IdempotentFailure
    └── FrozenConfigError      (also a builtin AttributeError)

Exceptions raised by the protected function itself pass through unchanged: after
the last retry the last exception is re-raised with a note, never wrapped.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BulkheadFull",
    "CircuitOpen",
    "FrozenConfigError",
    "IdempotencyConflict",
    "IdempotencyMismatch",
    "IdempotentFailure",
    "KillSwitchOff",
    "Rejected",
    "ReskitError",
    "RetryBudgetExhausted",
    "Shed",
    "Throttled",
    "TimeoutExceeded",
]


class ReskitError(Exception):
    """Base class of every exception reskit raises itself.

    Attributes:
        policy: the name of the policy that raised it, or ``None``.
        retry_after: seconds after which trying again may succeed, where known.

    .. versionadded:: 0.1.0
    """

    #: The value of the ``reskit.rejected_by`` span attribute for this error.
    rejected_by: ClassVar[str | None] = None

    def __init__(
        self,
        message: str = "",
        *,
        policy: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.policy = policy
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments are not restored by BaseException's default
        # pickling (multiprocessing and concurrent.futures rely on it).
        return (_rebuild, (type(self), str(self), self.policy, self.retry_after))


def _rebuild(
    cls: type[ReskitError], message: str, policy: str | None, retry_after: float | None
) -> ReskitError:
    err = cls.__new__(cls)
    ReskitError.__init__(err, message, policy=policy, retry_after=retry_after)
    return err


class TimeoutExceeded(ReskitError, TimeoutError):
    """An attempt outlived its ``timeout`` or the call outlived its ``deadline``.

    ``kind`` is ``"attempt"`` for a per-attempt timeout (retryable when the
    retry's ``on`` matches :class:`TimeoutError`) and ``"deadline"`` when the whole
    call's time ran out (never retried).

    .. versionadded:: 0.1.0
    """

    rejected_by = "timeout"

    def __init__(
        self,
        message: str = "",
        *,
        policy: str | None = None,
        timeout: float | None = None,
        kind: str = "attempt",
    ) -> None:
        super().__init__(message, policy=policy)
        self.timeout = timeout
        self.kind = kind

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_timeout,
            (str(self), self.policy, self.timeout, self.kind),
        )


def _rebuild_timeout(
    message: str, policy: str | None, timeout: float | None, kind: str
) -> TimeoutExceeded:
    return TimeoutExceeded(message, policy=policy, timeout=timeout, kind=kind)


class Rejected(ReskitError):
    """A protection refused the call before the protected function ran.

    Rejections are never retried and never sampled by a circuit breaker.

    .. versionadded:: 0.1.0
    """

    # Rejections are raised on hot paths (an open breaker, a full bulkhead):
    # slots spare each one an instance dict. ReskitError itself cannot have
    # them, because TimeoutExceeded also inherits OSError's layout.
    __slots__ = ("policy", "retry_after")


class CircuitOpen(Rejected):
    """The circuit breaker is open (or its half-open probes are all taken).

    ``retry_after`` is the time left until the breaker turns half-open.

    .. versionadded:: 0.1.0
    """

    rejected_by = "breaker"


class BulkheadFull(Rejected):
    """The bulkhead has no free slot and its waiting queue is full or timed out.

    ``partition`` is the key (a tenant) whose own share of slots was all in
    use, or ``None`` when the whole bulkhead was full (its adaptive limit, its
    ``max_partitions``, or the default partition). Middleware answers the
    first with 429 (that client is over its quota) and the second with 503
    (the service is over its capacity).

    .. versionadded:: 0.1.0
    """

    __slots__ = ("partition",)

    rejected_by = "bulkhead"

    def __init__(
        self,
        message: str = "",
        *,
        policy: str | None = None,
        retry_after: float | None = None,
        partition: str | None = None,
    ) -> None:
        super().__init__(message, policy=policy, retry_after=retry_after)
        self.partition = partition

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_full, (str(self), self.policy, self.retry_after, self.partition))


def _rebuild_full(
    message: str, policy: str | None, retry_after: float | None, partition: str | None
) -> BulkheadFull:
    return BulkheadFull(message, policy=policy, retry_after=retry_after, partition=partition)


class KillSwitchOff(Rejected):
    """The policy's kill switch is off (the feature was killed).

    .. versionadded:: 0.1.0
    """

    rejected_by = "kill_switch"


class Shed(Rejected):
    """The call was shed because the brownout level reached the policy's ``shed_at``.

    .. versionadded:: 0.1.0
    """

    rejected_by = "brownout"


class Throttled(Rejected):
    """Client-side adaptive throttling rejected the call locally.

    .. versionadded:: 0.1.0
    """

    rejected_by = "throttle"


class RetryBudgetExhausted(Rejected):
    """A retry was due but the retry budget had no tokens left.

    The failure that asked for the retry is chained as ``__cause__``.

    .. versionadded:: 0.1.0
    """

    rejected_by = "budget"


class IdempotencyConflict(ReskitError):
    """Another call with the same idempotency key is still in flight.

    .. versionadded:: 0.1.0
    """


class IdempotencyMismatch(ReskitError):
    """The idempotency key was used before with different arguments.

    .. versionadded:: 0.1.0
    """


class IdempotentFailure(ReskitError):
    """The first call with this idempotency key failed, and its failure was stored.

    Raised on a repeat of a call made with ``store_failures=`` matching the
    first call's exception: the repeat gets the same answer without running.
    ``type_name`` and ``message`` say what the first call raised.

    .. versionadded:: 0.1.0
    """

    def __init__(self, message: str, *, type_name: str, policy: str | None = None) -> None:
        super().__init__(message, policy=policy)
        self.type_name = type_name

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_failure, (str(self), self.type_name, self.policy))


def _rebuild_failure(message: str, type_name: str, policy: str | None) -> IdempotentFailure:
    return IdempotentFailure(message, type_name=type_name, policy=policy)


class FrozenConfigError(ReskitError, AttributeError):
    """An attribute of a configuration object was assigned after construction.

    Policies and strategy configurations are frozen so that a change never goes
    silently unused (a compiled policy would keep the old value). The message
    says what to do instead, usually ``policy.replace(...)``.

    .. versionadded:: 0.1.0
    """

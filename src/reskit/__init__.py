"""reskit: in-process resilience for Python services."""

from __future__ import annotations

from ._adaptive import AdaptiveLimit, AIMDLimit, GradientLimit
from ._breaker import BreakerState, CircuitBreaker
from ._bulkhead import Bulkhead
from ._context import (
    bind_correlation_id,
    correlation_id,
    new_correlation_id,
    remaining_deadline,
    valid_correlation_id,
)
from ._decorators import bulkhead, circuit_breaker, fallback, retry, timeout
from ._errors import (
    BulkheadFull,
    CircuitOpen,
    FrozenConfigError,
    IdempotencyConflict,
    IdempotencyMismatch,
    KillSwitchOff,
    Rejected,
    ReskitError,
    RetryBudgetExhausted,
    Shed,
    Throttled,
    TimeoutExceeded,
)
from ._fallback import Fallback
from ._policy import Policy
from ._retry import Retry, RetryBudget, RetryDetails
from ._stats import PolicyStatistics
from ._telemetry import configure_telemetry
from ._throttle import AdaptiveThrottle

__all__ = [
    "AIMDLimit",
    "AdaptiveLimit",
    "AdaptiveThrottle",
    "BreakerState",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpen",
    "Fallback",
    "FrozenConfigError",
    "GradientLimit",
    "IdempotencyConflict",
    "IdempotencyMismatch",
    "KillSwitchOff",
    "Policy",
    "PolicyStatistics",
    "Rejected",
    "ReskitError",
    "Retry",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryDetails",
    "Shed",
    "Throttled",
    "TimeoutExceeded",
    "bind_correlation_id",
    "bulkhead",
    "circuit_breaker",
    "configure_telemetry",
    "correlation_id",
    "fallback",
    "new_correlation_id",
    "remaining_deadline",
    "retry",
    "timeout",
    "valid_correlation_id",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("reskit")
    raise AttributeError(f"module 'reskit' has no attribute {name!r}")

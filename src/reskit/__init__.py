"""reskit: in-process resilience for Python services.

The public names are loaded on first use (PEP 562), so ``import reskit`` costs
next to nothing and each name brings only the modules it needs.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing would cost more than this module.
# Type checkers read any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._adaptive import AdaptiveLimit, AIMDLimit, GradientLimit
    from ._audit import (
        AuditEntry,
        Verification,
    )
    from ._breaker import BreakerState, CircuitBreaker
    from ._bulkhead import Bulkhead
    from ._context import (
        CorrelationIdFilter,
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
        IdempotentFailure,
        KillSwitchOff,
        Rejected,
        ReskitError,
        RetryBudgetExhausted,
        Shed,
        Throttled,
        TimeoutExceeded,
    )
    from ._fallback import Fallback
    from ._idempotency import JSONCodec, idempotent
    from ._policy import Policy
    from ._retry import Retry, RetryBudget, RetryDetails
    from ._stats import PolicyStatistics
    from ._store import (
        StoreUnavailable,
        configure,
        current_store,
    )
    from ._switches import (
        KillSwitch,
        SwitchInfo,
        aforce_breaker,
        aforget_switch,
        akill,
        arelease_breaker,
        arevive,
        aset_brownout_level,
        bind_tenant,
        brownout_level,
        current_tenant,
        force_breaker,
        forget_switch,
        is_killed,
        kill,
        kill_switch,
        release_breaker,
        revive,
        set_brownout_level,
        switches,
    )
    from ._telemetry import configure_telemetry
    from ._throttle import AdaptiveThrottle

__all__ = [
    "AIMDLimit",
    "AdaptiveLimit",
    "AdaptiveThrottle",
    "AuditEntry",
    "BreakerState",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpen",
    "CorrelationIdFilter",
    "Fallback",
    "FrozenConfigError",
    "GradientLimit",
    "IdempotencyConflict",
    "IdempotencyMismatch",
    "IdempotentFailure",
    "JSONCodec",
    "KillSwitch",
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
    "StoreUnavailable",
    "SwitchInfo",
    "Throttled",
    "TimeoutExceeded",
    "Verification",
    "aforce_breaker",
    "aforget_switch",
    "akill",
    "arelease_breaker",
    "arevive",
    "aset_brownout_level",
    "bind_correlation_id",
    "bind_tenant",
    "brownout_level",
    "bulkhead",
    "circuit_breaker",
    "configure",
    "configure_telemetry",
    "correlation_id",
    "current_store",
    "current_tenant",
    "fallback",
    "force_breaker",
    "forget_switch",
    "idempotent",
    "is_killed",
    "kill",
    "kill_switch",
    "new_correlation_id",
    "release_breaker",
    "remaining_deadline",
    "retry",
    "revive",
    "set_brownout_level",
    "switches",
    "timeout",
    "valid_correlation_id",
]

# Where each public name lives.
_HOMES = {
    "._adaptive": ("AIMDLimit", "AdaptiveLimit", "GradientLimit"),
    "._breaker": ("BreakerState", "CircuitBreaker"),
    "._bulkhead": ("Bulkhead",),
    "._context": (
        "CorrelationIdFilter",
        "bind_correlation_id",
        "correlation_id",
        "new_correlation_id",
        "remaining_deadline",
        "valid_correlation_id",
    ),
    "._decorators": ("bulkhead", "circuit_breaker", "fallback", "retry", "timeout"),
    "._errors": (
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
    ),
    "._fallback": ("Fallback",),
    "._idempotency": ("JSONCodec", "idempotent"),
    "._policy": ("Policy",),
    "._retry": ("Retry", "RetryBudget", "RetryDetails"),
    "._stats": ("PolicyStatistics",),
    "._audit": (
        "AuditEntry",
        "Verification",
    ),
    "._store": (
        "StoreUnavailable",
        "configure",
        "current_store",
    ),
    "._switches": (
        "KillSwitch",
        "SwitchInfo",
        "aforce_breaker",
        "aforget_switch",
        "akill",
        "arelease_breaker",
        "arevive",
        "aset_brownout_level",
        "bind_tenant",
        "brownout_level",
        "current_tenant",
        "force_breaker",
        "forget_switch",
        "is_killed",
        "kill",
        "kill_switch",
        "release_breaker",
        "revive",
        "set_brownout_level",
        "switches",
    ),
    "._telemetry": ("configure_telemetry",),
    "._throttle": ("AdaptiveThrottle",),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


del TYPE_CHECKING


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is not None:
        from importlib import import_module

        value = getattr(import_module(module, __name__), name)
        globals()[name] = value  # from now on a plain module attribute
        return value
    if name == "__version__":
        from importlib.metadata import version

        return version("reskit")
    raise AttributeError(f"module 'reskit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

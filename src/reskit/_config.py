"""Process-wide toggles and value conversions shared by every strategy."""

from __future__ import annotations

import math
import threading
from datetime import timedelta

__all__ = ["CONFIG", "seconds", "set_testing"]


class _Config:
    """Process-wide switches, read on the failure path only (never per success)."""

    __slots__ = ("lock", "testing", "testing_attempts", "testing_cap")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.testing = False
        self.testing_attempts = 1
        self.testing_cap = False


CONFIG = _Config()


def set_testing(testing: bool, *, attempts: int = 1, cap: bool = False) -> _RestoreTesting:
    """Turn testing mode on or off for every policy in the process.

    In testing mode retries never sleep, and each call makes ``attempts``
    attempts (with ``cap=True``: at most ``attempts``, fewer if the policy asks
    for fewer). The default, ``attempts=1``, deactivates retries entirely.

    The return value can be used as a context manager that restores the
    previous setting::

        with reskit.testing.set_testing(True):
            ...

    .. versionadded:: 0.1.0
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1 in testing mode, got {attempts}")
    with CONFIG.lock:
        previous = (CONFIG.testing, CONFIG.testing_attempts, CONFIG.testing_cap)
        CONFIG.testing, CONFIG.testing_attempts, CONFIG.testing_cap = testing, attempts, cap
    return _RestoreTesting(*previous)


class _RestoreTesting:
    __slots__ = ("_previous",)

    def __init__(self, testing: bool, attempts: int, cap: bool) -> None:
        self._previous = (testing, attempts, cap)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        with CONFIG.lock:
            CONFIG.testing, CONFIG.testing_attempts, CONFIG.testing_cap = self._previous


def seconds(
    value: float | timedelta | None, what: str, *, allow_zero: bool = False
) -> float | None:
    """Convert a duration given as seconds or a timedelta, validating it once."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds or a timedelta, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be {bound} seconds, got {value!r}; pass a positive duration")
    return value

"""Process-wide toggles, value conversions and the frozen-configuration helpers.

Configuration objects (a :class:`~reskit.Policy`, a :class:`~reskit.Retry`, a
breaker's settings...) are read once, when a policy is compiled; an assignment
afterwards would be silently ignored. So they refuse it, in one of two ways:

- :class:`Frozen` objects hold configuration only: every assignment after
  ``__init__`` raises :class:`~reskit.FrozenConfigError`.
- Objects that also keep runtime state (a breaker's counters, a bulkhead's slots)
  update that state on hot paths, where a Python-level ``__setattr__`` would cost
  more than the work itself. Their public settings are :func:`setting`
  properties over private slots instead: reading is a C-level attribute get,
  assigning raises the same error.
"""

from __future__ import annotations

import math
import operator
import os
import random
import threading
from datetime import timedelta
from typing import Any, ClassVar

from ._errors import FrozenConfigError

__all__ = ["CONFIG", "Frozen", "seconds", "set_testing", "setting"]


class _Config:
    """Process-wide switches, read on the failure path only (never per success)."""

    __slots__ = ("lock", "testing", "testing_attempts", "testing_cap")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.testing = False
        self.testing_attempts = 1
        self.testing_cap = False


CONFIG = _Config()

#: The random source of jitter (retry backoff, throttle draws) when none is given.
#: Jitter needs spread, not secrecy; one source serves every policy, and a forked
#: child reseeds it, or every worker of a prefork server would back off in step.
JITTER = random.Random()


def _renew_config_lock() -> None:
    CONFIG.lock = threading.Lock()
    JITTER.seed()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_config_lock)


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


#: The longest duration reskit waits for (``threading.TIMEOUT_MAX``, about 292
#: years on 64-bit Linux): a longer wait raises OverflowError in the platform.
MAX_WAIT = threading.TIMEOUT_MAX

#: The longest window of history kept in one-second buckets: one day. A longer one
#: would allocate a bucket per second of it.
MAX_WINDOW_SECONDS = 86_400


def seconds(
    value: float | timedelta | None, what: str, *, allow_zero: bool = False, waited: bool = False
) -> float | None:
    """Convert a duration given as seconds or a timedelta, validating it once.

    ``waited`` durations (a timeout, a deadline, a wait) are something a thread
    or a timer will wait for, so they must also fit what the platform supports.
    """
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
    if waited and value > MAX_WAIT:
        raise ValueError(
            f"{what} must be at most {MAX_WAIT:.0f} seconds (threading.TIMEOUT_MAX, the "
            f"longest wait the platform supports), got {value!r}; for no limit, pass None"
        )
    return value


def window_seconds(value: float, what: str) -> None:
    """Refuse a window of one-second buckets longer than :data:`MAX_WINDOW_SECONDS`."""
    if value > MAX_WINDOW_SECONDS:
        raise ValueError(
            f"{what} must be at most {MAX_WINDOW_SECONDS} seconds (one day): it keeps a "
            f"bucket per second, and {value!r} would allocate gigabytes; a shorter window "
            "also reacts sooner"
        )


def _refusal(obj: object, name: str, instead: str) -> FrozenConfigError:
    return FrozenConfigError(
        f"cannot assign {type(obj).__name__}.{name}: its configuration is fixed at "
        f"construction (a policy reads it once, when it is compiled). "
        f"{instead.format(name=name)}"
    )


class Frozen:
    """Base of configuration-only objects: every assignment after ``__init__`` raises.

    ``__init__`` sets fields with ``object.__setattr__``; subclasses say in
    ``_instead`` what to do instead (``{name}`` is the refused attribute).
    """

    __slots__ = ()

    _instead: ClassVar[str] = "Build a new one instead."

    def __setattr__(self, name: str, value: Any) -> None:
        raise _refusal(self, name, self._instead)

    def __delattr__(self, name: str) -> None:
        raise _refusal(self, name, self._instead)

    def __setstate__(self, state: Any) -> None:
        # copy, deepcopy and pickle rebuild an object by setting its fields.
        dict_state, slot_state = state if isinstance(state, tuple) else (state, None)
        for fields in (dict_state, slot_state):
            for name, value in (fields or {}).items():
                object.__setattr__(self, name, value)


class _Setting(property):
    # A property that learns its public name, for the error message.

    def __set_name__(self, owner: type, name: str) -> None:
        self._public = name


def setting(private: str, doc: str) -> Any:
    """A public, read-only setting stored in the slot ``private`` (see the module docstring).

    The owning class says in ``_instead`` what to do instead of assigning it.
    """
    prop: _Setting

    def refuse(obj: Any, value: Any) -> None:
        raise _refusal(obj, prop._public, type(obj)._instead)

    def refuse_delete(obj: Any) -> None:
        raise _refusal(obj, prop._public, type(obj)._instead)

    prop = _Setting(operator.attrgetter(private), refuse, refuse_delete)
    # A property subclass does not take ``doc`` from the constructor on 3.11.
    prop.__doc__ = doc
    return prop

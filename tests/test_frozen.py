"""Frozen configuration: assignments are refused with a message saying what to do instead."""

from __future__ import annotations

from typing import Any

import pytest
import tenacity

import reskit
from reskit import (
    AdaptiveThrottle,
    AIMDLimit,
    Bulkhead,
    CircuitBreaker,
    Fallback,
    FrozenConfigError,
    GradientLimit,
    Policy,
    Retry,
    RetryBudget,
)

# (object, an attribute to assign, a value, what the message recommends)
CASES: list[tuple[Any, str, Any, str]] = [
    (Policy("p"), "retry", Retry(on=KeyError), "policy.replace(retry=...)"),
    (Policy("p"), "timeout", 3.0, "policy.replace(timeout=...)"),
    (Policy("p"), "name", "other", "policy.replace(name=...)"),
    (Policy("p"), "brand_new", 1, "policy.replace(brand_new=...)"),
    (Retry(on=KeyError), "on", ValueError, "retry.replace(on=...)"),
    (Retry(on=KeyError), "attempts", 5, "retry.replace(attempts=...)"),
    (Retry(on=KeyError), "_predicate", None, "retry.replace"),
    (Fallback(lambda exc: None), "fn", print, "policy.replace(fallback=...)"),
    (CircuitBreaker(), "fail_max", 1, "new CircuitBreaker(...)"),
    (CircuitBreaker(), "reset_timeout", 1.0, "policy.replace(breaker=...)"),
    (CircuitBreaker(), "failure_rate", 0.5, "new CircuitBreaker(...)"),
    (CircuitBreaker(), "on_result", None, "new CircuitBreaker(...)"),
    (CircuitBreaker(), "name", "x", "new CircuitBreaker(...)"),
    (Bulkhead(3), "max_concurrent", 10, "policy.replace(bulkhead=...)"),
    (Bulkhead(3), "wait_timeout", 1.0, "new Bulkhead(...)"),
    (Bulkhead(3), "key", None, "new Bulkhead(...)"),
    (AdaptiveThrottle(), "k", 1.5, "policy.replace(throttle=...)"),
    (AdaptiveThrottle(), "window", 10.0, "new AdaptiveThrottle(...)"),
    (AIMDLimit(), "max_limit", 5, "new limit"),
    (AIMDLimit(), "backoff_ratio", 0.5, "new limit"),
    (GradientLimit(), "smoothing", 0.5, "new limit"),
    (RetryBudget(), "ratio", 0.5, "new RetryBudget(...)"),
]


@pytest.mark.parametrize(("obj", "attribute", "value", "instead"), CASES)
def test_configuration_refuses_assignment(
    obj: Any, attribute: str, value: Any, instead: str
) -> None:
    before = getattr(obj, attribute, None)
    with pytest.raises(FrozenConfigError, match=f"cannot assign {type(obj).__name__}.") as raised:
        setattr(obj, attribute, value)
    assert instead in str(raised.value)
    assert getattr(obj, attribute, None) is before
    assert isinstance(raised.value, AttributeError)  # like attrs' and dataclasses' errors


@pytest.mark.parametrize(("obj", "attribute"), [(Policy("p"), "retry"), (Retry(on=KeyError), "on")])
def test_configuration_refuses_deletion(obj: Any, attribute: str) -> None:
    with pytest.raises(FrozenConfigError):
        delattr(obj, attribute)


def test_every_public_configuration_class_is_covered() -> None:
    covered = {type(obj) for obj, *_ in CASES}
    configuration = {
        Policy,
        Retry,
        Fallback,
        CircuitBreaker,
        Bulkhead,
        AdaptiveThrottle,
        AIMDLimit,
        GradientLimit,
        RetryBudget,
    }
    assert configuration <= covered


def test_replace_returns_a_new_policy_and_leaves_the_original_intact() -> None:
    breaker = CircuitBreaker()
    retry = Retry(3, on=KeyError)
    original = Policy("payments", timeout=1.0, retry=retry, breaker=breaker)
    changed = original.replace(timeout=2.0, retry=None)
    assert (original.timeout, original.retry) == (1.0, retry)
    assert (changed.timeout, changed.retry) == (2.0, None)
    assert changed.name == "payments"
    # Strategy objects with state are shared unless replaced.
    assert changed.breaker is breaker
    renamed = original.replace(name="refunds")
    assert (renamed.name, original.name) == ("refunds", "payments")


def test_replace_validates_like_the_constructor() -> None:
    with pytest.raises(ValueError, match="deadline"):
        Policy("p", timeout=1.0).replace(deadline=0.5)
    with pytest.raises(TypeError, match="unknown field"):
        Policy("p").replace(retries=3)


def test_replaced_policies_keep_their_own_statistics() -> None:
    original = Policy("p")
    changed = original.replace()
    original.call(lambda: 1)
    assert (original.statistics.calls, changed.statistics.calls) == (1, 0)


def test_retry_replace() -> None:
    retry = Retry(3, on=KeyError, wait=0.5)
    changed = retry.replace(attempts=5)
    assert (retry.attempts, changed.attempts) == (3, 5)
    assert changed.on is KeyError
    assert changed.wait == 0.5
    assert retry.replace(stop=tenacity.stop_after_attempt(2)).attempts == 3
    with pytest.raises(TypeError, match="unknown field"):
        retry.replace(tries=2)


def test_runtime_state_still_changes_through_methods() -> None:
    breaker = CircuitBreaker()
    breaker.open()
    assert breaker.state == "open"
    breaker.reset()
    breaker.add_listener(reskit_listener())
    assert len(breaker.listeners) == 1


def reskit_listener() -> Any:
    class Listener:
        def success(self, cb: Any) -> None:
            pass

    return Listener()


def test_frozen_config_error_is_a_reskit_error() -> None:
    assert issubclass(FrozenConfigError, reskit.ReskitError)
    assert issubclass(FrozenConfigError, AttributeError)


def test_frozen_configuration_copies_and_pickles() -> None:
    import copy
    import pickle

    retry = Retry(3, on=KeyError, wait=0.5)
    for clone in (copy.copy(retry), copy.deepcopy(retry), pickle.loads(pickle.dumps(retry))):
        assert (clone.attempts, clone.on, clone.wait) == (3, KeyError, 0.5)
        assert clone._predicate(KeyError())
        with pytest.raises(FrozenConfigError):
            clone.attempts = 4  # type: ignore[misc]
    fallback = Fallback(print, on=KeyError)
    assert copy.deepcopy(fallback).fn is print
    # A policy is immutable: a copy is the policy itself; replace() makes a new one.
    policy = Policy("p", retry=retry)
    assert copy.copy(policy) is policy
    assert copy.deepcopy(policy) is policy

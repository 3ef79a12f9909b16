"""reskit.openfeature: kill switches and brownout levels through the real OpenFeature SDK."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import EventDetails, ProviderEvent, ProviderEventDetails
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus

import reskit
from reskit._store import SWITCH
from reskit.openfeature import Provider
from reskit.stores import MemoryStore
from reskit.testing import FakeClock

WAIT = 5.0  # only a bound on a broken test; events arrive in milliseconds


class RecordingProvider(Provider):
    """The provider, with every event it hands the SDK recorded as it is emitted.

    The SDK runs handlers on a thread pool, so exact counts are checked here,
    where emitting is synchronous; :class:`Handlers` checks they are delivered.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.emitted: list[tuple[ProviderEvent, list[str] | None]] = []

    def emit(self, event: ProviderEvent, details: ProviderEventDetails) -> None:
        self.emitted.append((event, details.flags_changed))
        super().emit(event, details)


class Handlers:
    """Client event handlers that record what the SDK delivers to them."""

    def __init__(self, client: OpenFeatureClient) -> None:
        self._done = threading.Condition()
        self.seen: list[tuple[ProviderEvent, EventDetails]] = []
        for event in ProviderEvent:
            client.add_handler(event, self._handler(event))

    def _handler(self, event: ProviderEvent) -> Any:
        def handle(details: EventDetails) -> None:
            with self._done:
                self.seen.append((event, details))
                self._done.notify_all()

        return handle

    def wait_for(self, count: int) -> list[tuple[ProviderEvent, list[str] | None]]:
        """The first ``count`` events delivered, sorted (the pool may reorder them)."""
        with self._done:
            assert self._done.wait_for(lambda: len(self.seen) >= count, timeout=WAIT), self.seen
            seen = list(self.seen)
        assert {details.provider_name for _, details in seen} == {"reskit"}
        return sorted(
            ((event, details.flags_changed) for event, details in seen),
            key=lambda item: (item[0].value, item[1] or []),
        )


class FlakyStore(MemoryStore):
    """A memory store whose backend can be made to look out of reach."""

    def __init__(self) -> None:
        super().__init__()
        self._out_of_reach = False

    @property
    def stale(self) -> bool:
        return self._out_of_reach

    def staleness(self) -> float:
        return 12.5 if self._out_of_reach else 0.0

    def lose(self) -> None:
        self._out_of_reach = True
        self._notify()

    def regain(self) -> None:
        self._out_of_reach = False
        self._notify()


@pytest.fixture
def provider() -> Iterator[RecordingProvider]:
    provider = RecordingProvider()
    api.set_provider_and_wait(provider)
    yield provider
    api.shutdown()


@pytest.fixture
def client(provider: RecordingProvider) -> OpenFeatureClient:
    return api.get_client()


def kill(name: str) -> None:
    reskit.kill(name, reason="r", actor="a")


def revive(name: str) -> None:
    reskit.revive(name, reason="r", actor="a")


# -- kill switches ------------------------------------------------------------------------


def test_metadata_names_reskit(provider: RecordingProvider) -> None:
    assert api.get_provider_metadata().name == "reskit"
    assert provider.get_metadata().name == "reskit"


def test_a_switch_is_true_while_on_and_false_while_killed(client: OpenFeatureClient) -> None:
    reskit.KillSwitch("of-payments")

    on = client.get_boolean_details("of-payments", False)
    assert (on.value, on.reason, on.variant, on.error_code) == (True, Reason.CACHED, "on", None)
    assert on.flag_metadata == {"killed": False}

    kill("of-payments")
    off = client.get_boolean_details("of-payments", True)
    assert (off.value, off.reason, off.variant) == (False, Reason.DISABLED, "killed")
    assert off.flag_metadata["killed"] is True
    assert off.flag_metadata["change_reason"] == "r"
    assert off.flag_metadata["changed_by"] == "a"

    revive("of-payments")
    back = client.get_boolean_details("of-payments", False)
    assert (back.value, back.reason) == (True, Reason.CACHED)


def test_a_switch_flipped_in_the_store_is_known_without_a_declaration(
    client: OpenFeatureClient,
) -> None:
    revive("of-flipped-elsewhere")
    assert client.get_boolean_details("of-flipped-elsewhere", False).value is True


@pytest.mark.parametrize("default", [True, False])
def test_an_unknown_switch_is_not_found_and_gets_the_default(
    client: OpenFeatureClient, default: bool
) -> None:
    details = client.get_boolean_details("of-nobody-declared-this", default)
    assert details.value is default
    assert details.reason == Reason.ERROR
    assert details.error_code == ErrorCode.FLAG_NOT_FOUND


def test_a_kill_with_a_ttl_is_over_when_the_ttl_is(
    client: OpenFeatureClient, provider: RecordingProvider, clock: FakeClock
) -> None:
    reskit.kill("of-ttl", reason="r", actor="a", ttl=10)
    assert client.get_boolean_value("of-ttl", True) is False
    clock.advance(11)
    assert client.get_boolean_details("of-ttl", False).reason == Reason.CACHED
    assert client.get_boolean_value("of-ttl", False) is True
    # The revival is written (and audited) when noticed, and announced like any flip.
    changed = (ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, ["of-ttl"])
    assert provider.emitted == [changed, changed]


def test_a_prefix_names_the_switch_flags() -> None:
    provider = RecordingProvider(prefix="reskit.")
    api.set_provider_and_wait(provider)
    try:
        client = api.get_client()
        kill("of-prefixed")
        assert client.get_boolean_details("reskit.of-prefixed", True).value is False
        missing = client.get_boolean_details("of-prefixed", True)
        assert missing.error_code == ErrorCode.FLAG_NOT_FOUND
        assert provider.emitted == [
            (ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, ["reskit.of-prefixed"])
        ]
    finally:
        api.shutdown()


async def test_async_evaluation(client: OpenFeatureClient) -> None:
    kill("of-async")
    details = await client.get_boolean_details_async("of-async", True)
    assert (details.value, details.reason) == (False, Reason.DISABLED)
    assert await client.get_integer_value_async("brownout", 7) == 0


# -- brownout -------------------------------------------------------------------------------


def test_brownout_is_the_global_level_without_a_tenant(client: OpenFeatureClient) -> None:
    assert client.get_integer_details("brownout", 99).value == 0
    reskit.set_brownout_level(30, reason="r", actor="a")
    details = client.get_integer_details("brownout", 99)
    assert (details.value, details.reason, details.variant) == (30, Reason.CACHED, "global")
    assert details.flag_metadata == {}


@pytest.mark.parametrize(
    ("context", "level", "variant"),
    [
        (EvaluationContext(attributes={"tenant": "acme"}), 80, "tenant"),
        (EvaluationContext(targeting_key="acme"), 80, "tenant"),
        (EvaluationContext(targeting_key="user-1", attributes={"tenant": "acme"}), 80, "tenant"),
        (EvaluationContext(targeting_key="acme", attributes={"tenant": "globex"}), 30, "global"),
        (EvaluationContext(attributes={"tenant": "globex"}), 30, "global"),
    ],
)
def test_brownout_picks_the_tenant_from_the_context(
    client: OpenFeatureClient, context: EvaluationContext, level: int, variant: str
) -> None:
    reskit.set_brownout_level(30, reason="r", actor="a")
    reskit.set_brownout_level(80, reason="r", actor="a", tenant="acme")
    details = client.get_integer_details("brownout", 99, context)
    assert (details.value, details.variant, details.reason) == (level, variant, Reason.CACHED)


@pytest.mark.parametrize("tenant", [7, ""])
def test_a_tenant_that_is_not_a_name_is_an_invalid_context(
    client: OpenFeatureClient, tenant: object
) -> None:
    context = EvaluationContext(attributes={"tenant": tenant})  # type: ignore[dict-item]
    details = client.get_integer_details("brownout", 99, context)
    assert (details.value, details.error_code) == (99, ErrorCode.INVALID_CONTEXT)


def test_the_brownout_key_is_configurable() -> None:
    api.set_provider_and_wait(Provider(brownout_key="ops.brownout"))
    try:
        reskit.set_brownout_level(40, reason="r", actor="a")
        client = api.get_client()
        assert client.get_integer_value("ops.brownout", 0) == 40
        assert client.get_integer_details("brownout", 0).error_code == ErrorCode.FLAG_NOT_FOUND
    finally:
        api.shutdown()


# -- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "key", "default", "error"),
    [
        ("get_integer_details", "of-typed", 0, ErrorCode.TYPE_MISMATCH),
        ("get_float_details", "of-typed", 0.0, ErrorCode.TYPE_MISMATCH),
        ("get_string_details", "of-typed", "", ErrorCode.TYPE_MISMATCH),
        ("get_object_details", "of-typed", {}, ErrorCode.TYPE_MISMATCH),
        ("get_boolean_details", "brownout", True, ErrorCode.TYPE_MISMATCH),
        ("get_float_details", "brownout", 0.0, ErrorCode.TYPE_MISMATCH),
        ("get_string_details", "brownout", "", ErrorCode.TYPE_MISMATCH),
        ("get_object_details", "brownout", [], ErrorCode.TYPE_MISMATCH),
        ("get_integer_details", "of-untyped", 0, ErrorCode.FLAG_NOT_FOUND),
        ("get_string_details", "of-untyped", "", ErrorCode.FLAG_NOT_FOUND),
    ],
)
def test_asking_for_another_type_is_a_type_mismatch(
    client: OpenFeatureClient, method: str, key: str, default: object, error: ErrorCode
) -> None:
    reskit.KillSwitch("of-typed")
    details = getattr(client, method)(key, default)
    assert (details.value, details.reason, details.error_code) == (default, Reason.ERROR, error)


# -- events ---------------------------------------------------------------------------------


def test_each_flip_announces_the_flags_it_changed(
    client: OpenFeatureClient, provider: RecordingProvider
) -> None:
    handlers = Handlers(client)
    changed = ProviderEvent.PROVIDER_CONFIGURATION_CHANGED

    kill("of-events")
    reskit.set_brownout_level(50, reason="r", actor="a", tenant="acme")
    revive("of-events")
    # A breaker forced by an operator is in the store but is no flag of this provider.
    reskit.force_breaker("of-breaker", "open", reason="r", actor="a")

    assert provider.emitted == [
        (changed, ["of-events"]),
        (changed, ["brownout"]),
        (changed, ["of-events"]),
    ]
    # The READY is the SDK's answer to adding a handler to a ready client.
    assert handlers.wait_for(4) == sorted(
        [*provider.emitted, (ProviderEvent.PROVIDER_READY, None)],
        key=lambda item: (item[0].value, item[1] or []),
    )


def test_staleness_is_announced_once_each_way(client: OpenFeatureClient) -> None:
    store = FlakyStore()
    reskit.configure(store)
    kill("of-stale")
    handlers = Handlers(client)

    store.lose()
    store.lose()  # still out of reach: nothing new to say
    assert client.get_provider_status() == ProviderStatus.STALE
    details = client.get_boolean_details("of-stale", True)
    assert (details.value, details.reason) == (False, Reason.STALE)
    assert details.flag_metadata["killed"] is True
    assert details.flag_metadata["staleness"] == 12.5
    level = client.get_integer_details("brownout", 99)
    assert (level.value, level.reason) == (0, Reason.STALE)

    store.regain()
    assert client.get_provider_status() == ProviderStatus.READY
    assert client.get_boolean_details("of-stale", True).reason == Reason.DISABLED

    assert handlers.wait_for(3) == [
        (ProviderEvent.PROVIDER_READY, None),
        (ProviderEvent.PROVIDER_READY, None),
        (ProviderEvent.PROVIDER_STALE, None),
    ]


def test_staleness_events_are_exact(provider: RecordingProvider) -> None:
    store = FlakyStore()
    reskit.configure(store)
    store.lose()
    store.lose()
    store.regain()
    store.regain()
    assert provider.emitted == [
        (ProviderEvent.PROVIDER_STALE, None),
        (ProviderEvent.PROVIDER_READY, None),
    ]


def test_a_provider_started_while_the_store_is_stale_says_so_in_its_reasons() -> None:
    store = FlakyStore()
    reskit.configure(store)
    store.lose()
    provider = RecordingProvider()
    api.set_provider_and_wait(provider)
    try:
        client = api.get_client()
        assert client.get_integer_details("brownout", 99).reason == Reason.STALE
        store.regain()
        assert provider.emitted == [(ProviderEvent.PROVIDER_READY, None)]
    finally:
        api.shutdown()


def test_the_provider_follows_configure(provider: RecordingProvider) -> None:
    changed = ProviderEvent.PROVIDER_CONFIGURATION_CHANGED
    kill("of-old-only")
    old = reskit.current_store()
    new = MemoryStore()
    new.change(
        SWITCH + "of-new-only",
        {"killed": True, "reason": "r", "actor": "a", "at": 1.0, "until": None, "last_killed": 1.0},
        actor="a",
        action="kill",
        target="switch:of-new-only",
        reason="r",
    )

    reskit.configure(new)
    # Both switches changed: one is gone with the old store, one came with the new.
    assert provider.emitted == [
        (changed, ["of-old-only"]),
        (changed, ["of-new-only", "of-old-only"]),
    ]
    client = api.get_client()
    assert client.get_boolean_value("of-new-only", True) is False

    revive("of-new-only")
    assert provider.emitted[-1] == (changed, ["of-new-only"])
    old.change(
        SWITCH + "of-old-only",
        None,
        actor="a",
        action="revive",
        target="switch:of-old-only",
        reason="r",
    )
    assert len(provider.emitted) == 3  # the old store is no longer listened to


def test_a_store_that_goes_stale_on_configure_is_announced(provider: RecordingProvider) -> None:
    store = FlakyStore()
    store._out_of_reach = True
    reskit.configure(store)
    reskit.configure(MemoryStore())
    assert provider.emitted == [
        (ProviderEvent.PROVIDER_STALE, None),
        (ProviderEvent.PROVIDER_READY, None),
    ]


def test_shutdown_stops_listening() -> None:
    provider = RecordingProvider()
    api.set_provider_and_wait(provider)
    api.shutdown()
    kill("of-after-shutdown")
    reskit.configure(MemoryStore())
    assert provider.emitted == []
    # Evaluating needs no listener: it reads the store in use.
    revive("of-after-shutdown")
    assert provider.resolve_boolean_details("of-after-shutdown", False).value is True


# -- packaging ------------------------------------------------------------------------------


def test_without_the_sdk_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "reskit.openfeature")
    monkeypatch.setitem(sys.modules, "openfeature.provider", None)
    with pytest.raises(ImportError, match=r'pip install "reskit\[openfeature\]"'):
        importlib.import_module("reskit.openfeature")

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import structlog

from redis_servers import RedisServer, running_redis
from reskit import _telemetry
from reskit.testing import FakeClock, SpanCapture, set_testing

if TYPE_CHECKING:
    from reskit.stores.redis import RedisStore


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    """A FakeClock installed for the test: reskit's time moves only when told."""
    with FakeClock() as fake:
        yield fake


@pytest.fixture
def spans() -> Iterator[SpanCapture]:
    """reskit's spans and metrics, captured by the OTel SDK's in-memory exporter."""
    with SpanCapture() as capture:
        yield capture


@pytest.fixture
def logs() -> Iterator[list[structlog.typing.EventDict]]:
    """structlog events emitted during the test."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture(autouse=True)
def _reset_testing_mode() -> Iterator[None]:
    with set_testing(False):
        yield


@pytest.fixture(autouse=True)
def _fresh_failure_reports() -> Iterator[None]:
    """reskit reports a telemetry failure once a minute per kind: each test starts afresh."""
    _telemetry._reported.clear()
    yield
    _telemetry._reported.clear()


@pytest.fixture(autouse=True)
def _structlog_as_found() -> Iterator[None]:
    """structlog's configuration is the process's: what a test (or an example it imports)
    configures is undone after it, so reskit's events go where the next test expects
    (through structlog only once an application configured it)."""
    configured = structlog.is_configured()
    before = structlog.get_config()
    yield
    if structlog.is_configured() != configured or structlog.get_config() != before:
        structlog.reset_defaults()
        if configured:
            structlog.configure(**before)


@pytest.fixture(autouse=True)
def _fresh_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts on an empty memory store: no switch or level leaks between tests."""
    from reskit._store import configure
    from reskit._switches import forget
    from reskit.stores import MemoryStore

    monkeypatch.delenv("RESKIT_STORE", raising=False)
    forget()
    configure(MemoryStore())
    yield
    forget()
    configure(MemoryStore())


# -- Redis: real servers the tests start (tests/redis_servers.py) ----------------------------


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port; skipped without the binary
    unless RESKIT_REQUIRE_REDIS=1."""
    with running_redis() as srv:
        yield srv


@pytest.fixture
def stores() -> Iterator[Callable[..., RedisStore]]:
    """Make RedisStores (``stores(url, resync_interval="0.05")``), closed after the test."""
    from reskit.stores.redis import RedisStore

    made: list[RedisStore] = []

    def make(url: str, **options: str) -> RedisStore:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        store = RedisStore(f"{url}?{query}" if query else url)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()

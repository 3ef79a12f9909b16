from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from reskit import _telemetry
from reskit.testing import FakeClock, SpanCapture, set_testing


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

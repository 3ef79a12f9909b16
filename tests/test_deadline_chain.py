"""One budget across three services: examples/deadline_chain.py under real uvicorn servers.

A calls B, B calls C, each behind ``DeadlineMiddleware``, calling on through
``reskit.httpx.AsyncTransport``. C's slow work waits on an event nobody sets:
only the deadline ends it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from http_servers import running_uvicorn
from reskit import Retry
from reskit.testing import FakeClock

EXAMPLE = Path(__file__).parent.parent / "examples" / "deadline_chain.py"
# The deadline itself takes its 300 ms of real time here: that is the behaviour under test.
# What a loaded machine adds on top (the event loops' lag, three servers on 2 cores) is
# what this margin allows for; the budget is what A must keep to.
MARGIN = 0.25


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deadline_chain", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deadline_chain"] = module
    spec.loader.exec_module(module)
    return module


def left_ms(detail: str) -> int:
    """``"287 ms left"`` → 287."""
    return int(detail.split()[0])


def serve_chain(
    example: ModuleType, stack: ExitStack, c_app: Any, **caller_options: Any
) -> tuple[str, Any]:
    """Start C, then B calling it, then A calling B; return A's URL and the ledger."""
    ledger = example.Ledger()
    c_url = stack.enter_context(running_uvicorn(example.protect(c_app(ledger))))
    b = example.caller("B", c_url, ledger, **caller_options.get("b", {}))
    b_url = stack.enter_context(running_uvicorn(example.protect(b), lifespan="on"))
    a = example.caller("A", b_url, ledger, **caller_options.get("a", {}))
    return stack.enter_context(running_uvicorn(example.protect(a), lifespan="on")), ledger


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def test_a_budget_that_runs_out_in_c_stops_every_service(
    example: ModuleType, stack: ExitStack
) -> None:
    slow = {"on": False}

    async def work() -> None:
        if slow["on"]:
            await asyncio.Event().wait()  # only the deadline ends it

    a_url, ledger = serve_chain(example, stack, lambda ledger: example.worker(ledger, work))
    with httpx.Client(base_url=a_url, timeout=10.0) as client:
        warm = client.get("/quote", headers={"X-Request-Timeout-Ms": "5000"})
        assert warm.json() == {"price": 42, "via": ["A", "B", "C"]}
        ledger.events.clear()
        slow["on"] = True
        started = time.monotonic()
        response = client.get("/quote", headers={"X-Request-Timeout-Ms": "300"})
        took = time.monotonic() - started
        # Read at once: whatever still ran in any service would show here.
        running = dict(ledger.running)
    assert response.status_code == 504
    assert took < 0.3 + MARGIN
    assert running == {"A": 0, "B": 0, "C": 0}
    by = {service: ledger.of(service) for service in "ABC"}
    assert [event.what for event in by["C"]] == ["arrived", "cancelled"]  # never finished
    assert [event.what for event in by["B"]] == ["arrived", "called", "answered"]
    assert [event.what for event in by["A"]] == ["arrived", "called", "answered"]
    assert by["B"][-1].detail == "504"
    # Each hop kept its reserve back and lost the time spent on the way.
    a_budget = left_ms(by["A"][0].detail)
    c_budget = left_ms(by["C"][0].detail)
    assert a_budget <= 300
    assert c_budget <= 300 - 2 * round(example.RESERVE * 1000)
    # C gave up first, then B answered, then A: nothing outlived the budget.
    assert by["C"][-1].at <= by["B"][-1].at <= by["A"][-1].at


def test_retries_inside_b_stop_when_the_budget_cannot_cover_another_attempt(
    example: ModuleType, stack: ExitStack, clock: FakeClock
) -> None:
    budgets: list[int] = []

    def failing_c(ledger: Any) -> Starlette:
        async def quote(request: Request) -> JSONResponse:
            budgets.append(int(request.headers["x-request-timeout-ms"]))
            return JSONResponse({"error": "overloaded"}, status_code=503)

        return Starlette(routes=[Route("/quote", quote)])

    a_url, _ = serve_chain(
        example,
        stack,
        failing_c,
        a={"retry": Retry(attempts=1)},
        b={"retry": Retry(attempts=10, wait=1.0)},
    )
    # Seconds, not milliseconds: the waits are on the fake clock, but each attempt's
    # budget is also httpx's own timeout, in real time, on a machine that may be busy.
    with httpx.Client(base_url=a_url, timeout=10.0) as client:
        response = client.get("/quote", headers={"X-Request-Timeout-Ms": "3000"})
    # A sends B 3000 - 10 ms; B's attempts go at 0, 1 and 2 s on the fake clock, each
    # sending what is left minus its reserve; a fourth would start past B's 2990 ms.
    assert budgets == [2980, 1980, 980]
    assert response.status_code == 503


def test_the_example_runs_as_a_script() -> None:
    import subprocess

    for work_ms, expected in (("20", "client: 200"), ("2000", "client: 504")):
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), "--budget-ms", "500", "--work-ms", work_ms],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert expected in done.stdout, done.stdout + done.stderr

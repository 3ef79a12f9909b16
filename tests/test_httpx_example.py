"""examples/httpx_client.py against a real upstream: its region apps under uvicorn."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from http_servers import running_uvicorn

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "httpx_client.py"

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reskit_example_httpx_client", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lookups_survive_a_failing_region(example: ModuleType) -> None:
    eu = example.Region("eu", failure_rate=0.5, seed=3)
    us = example.Region("us", seed=4)
    with (
        running_uvicorn(example.region_app(eu)) as eu_url,
        running_uvicorn(example.region_app(us)) as us_url,
        example.catalog_client([eu_url, us_url], seed=1) as client,
    ):
        outcomes = example.lookups(client, 40)
        response = client.get("/items/sku-1", headers={"X-Request-ID": "lookup-1"})
    assert set(outcomes) <= {"eu", "us"}, outcomes
    assert sum(outcomes.values()) == 40
    assert outcomes["eu"] > 0
    assert response.json()["request_id"] == "lookup-1"
    assert eu.served + us.served >= 41


def test_every_answer_from_a_region_that_is_down_fails_over(example: ModuleType) -> None:
    eu = example.Region("eu", failure_rate=1.0)
    us = example.Region("us")
    with (
        running_uvicorn(example.region_app(eu)) as eu_url,
        running_uvicorn(example.region_app(us)) as us_url,
        example.catalog_client([eu_url, us_url], seed=1) as client,
    ):
        outcomes = example.lookups(client, 20)
    assert outcomes == {"us": 20}
    assert eu.served == 5  # then it was ejected


def test_the_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--requests", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.startswith("20 lookups in ")
    assert "requests served: eu " in done.stdout
    assert done.stderr == ""

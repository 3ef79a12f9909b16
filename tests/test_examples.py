"""The scripts in ``examples/`` run; the web apps serve under real servers (uvicorn, wsgiref)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from http_servers import running_uvicorn, running_wsgi

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"reskit_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def starlette_example() -> ModuleType:
    return load_example("starlette_app")


@pytest.fixture(scope="module")
def idempotency_example() -> ModuleType:
    return load_example("starlette_idempotency")


@pytest.fixture(scope="module")
def flask_example() -> ModuleType:
    pytest.importorskip("flask")
    return load_example("flask_app")


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """Start an ASGI app under uvicorn on a free 127.0.0.1 port; return its base URL."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(running_uvicorn(app))


@pytest.fixture
def serve_wsgi() -> Iterator[Callable[[Any], str]]:
    """Start a WSGI app under a threaded wsgiref server; return its base URL."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(running_wsgi(app))


@contextmanager
def running_script(name: str) -> Iterator[httpx.Client]:
    """Run ``examples/<name>.py --port N``; yield a client once its /healthz answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    drain: threading.Thread | None = None
    try:
        # Both servers say so when they listen (uvicorn "Uvicorn running on",
        # Flask's " * Running on"): wait for that line, not for time to pass.
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if "running on" in line.lower():
                break
        else:
            pytest.fail(f"the example server exited before listening:\n{''.join(output)}")
        # Keep reading what it logs, so a full pipe can never block it.
        drain = threading.Thread(target=proc.stdout.read, daemon=True)
        drain.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            response = client.get("/healthz")
            assert response.json() == {"status": "ok"}
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            drain.join()
        if proc.stdout is not None:
            proc.stdout.close()


def test_quickstart_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sync:  charge #1: ok after 3 call(s)" in out
    assert "async: charge #2: ok after 2 call(s)" in out
    assert "cached price (live call failed" in out
    assert "TimeoutExceeded: policy 'strict'" in out
    assert "inner call sees" in out
    assert "correlation_id=order-1234" in out
    assert "outside any policy: remaining_deadline() = None" in out


def test_switches_example_runs() -> None:
    env = {key: value for key, value in os.environ.items() if key != "RESKIT_STORE"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "switches.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("normal:       reviews=['boots: five stars']")
    assert lines[1].startswith("brownout 2:   reviews=[] recommended=['people who bought")
    assert lines[2].startswith("vip tenant:   reviews=['boots: five stars']")
    assert lines[3].endswith("| is_killed: True")
    assert "switch 'reviews': owner team-reviews, killed=False" in lines
    assert lines[-1] == "audit log intact: 6 entries, one unbroken chain"
    assert proc.stderr == ""


def test_stock_is_served_live(starlette_example: ModuleType, serve: Callable[[Any], str]) -> None:
    inventory = starlette_example.FlakyInventory(error_rate=0.0, hang_rate=0.0, seed=1)
    base = serve(starlette_example.create_app(inventory))

    with httpx.Client(base_url=base, timeout=5) as client:
        response = client.get("/stock/sku-1", headers={"X-Request-ID": "test-req-1"})
        strict = client.get("/stock/sku-1/strict")
        index = client.get("/")
        health = client.get("/healthz")

    assert response.status_code == 200
    assert response.headers["x-request-id"] == "test-req-1"
    body = response.json()
    assert body["source"] == "live"
    assert body["correlation_id"] == "test-req-1"
    assert isinstance(body["stock"], int)
    assert strict.status_code == 200
    assert strict.json()["stock"] == body["stock"]
    # Without an X-Request-ID the app generates one.
    assert strict.headers["x-request-id"] not in ("", "test-req-1")
    assert "/stock/{sku}" in index.json()["routes"]
    assert health.json() == {"status": "ok"}
    assert inventory.calls == 2


def test_failing_dependency_falls_back_or_answers_503(
    starlette_example: ModuleType, serve: Callable[[Any], str]
) -> None:
    inventory = starlette_example.FlakyInventory(error_rate=1.0, hang_rate=0.0, seed=1)
    base = serve(starlette_example.create_app(inventory))

    with httpx.Client(base_url=base, timeout=5) as client:
        lenient = client.get("/stock/sku-2", headers={"X-Request-ID": "bad id with spaces"})
        strict = client.get("/stock/sku-2/strict")

    assert lenient.status_code == 200
    assert lenient.json()["source"] == "fallback"
    assert lenient.json()["error"] == "ConnectionError"
    assert lenient.headers["x-request-id"] != "bad id with spaces"
    assert strict.status_code == 503
    assert strict.json()["error"] == "ConnectionError"
    # Three attempts per request, two requests.
    assert inventory.calls == 6


def test_hanging_dependency_is_cut_by_the_timeout(
    starlette_example: ModuleType, serve: Callable[[Any], str]
) -> None:
    inventory = starlette_example.FlakyInventory(error_rate=0.0, hang_rate=1.0, seed=1)
    base = serve(starlette_example.create_app(inventory))

    with httpx.Client(base_url=base, timeout=5) as client:
        started = time.monotonic()
        response = client.get("/stock/sku-3/strict")
        took = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["error"] == "TimeoutExceeded"
    # The deadline (0.5 s) bounds the request, retries included.
    assert took < 2.0


def test_starlette_example_runs_as_a_script() -> None:
    with running_script("starlette_app"):
        pass


# -- idempotency keys -------------------------------------------------------------------------


def charge(client: httpx.Client, key: str | None, amount: Any) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/charges", json={"amount": amount}, headers=headers)


def check_charges(client: httpx.Client) -> list[dict[str, Any]]:
    """The idempotency story both example apps tell, from the client's side."""
    first = charge(client, '"order-1"', 500)
    repeat = charge(client, "order-1", 500)  # the same key, bare
    reused = charge(client, "order-1", 900)
    invalid = charge(client, "order-2", -1)
    fixed = charge(client, "order-2", 700)  # the same key again, after a 400

    assert first.status_code == 201
    assert first.json() == {"id": "ch_1", "amount": 500, "currency": "eur"}
    assert "idempotent-replayed" not in first.headers
    assert repeat.status_code == 201
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json() == first.json()
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"
    assert invalid.status_code == 400
    assert invalid.json() == {"error": "amount must be a whole number of cents > 0"}
    assert fixed.status_code == 201
    assert fixed.json()["id"] == "ch_2"
    charges: list[dict[str, Any]] = client.get("/charges").json()["charges"]
    return charges


def test_starlette_idempotency_example_charges_once_per_key(
    idempotency_example: ModuleType, serve: Callable[[Any], str]
) -> None:
    ledger = idempotency_example.Ledger()
    base = serve(idempotency_example.create_app(ledger))

    with httpx.Client(base_url=base, timeout=5) as client:
        charges = check_charges(client)
        missing = charge(client, None, 500)

    assert [c["id"] for c in charges] == ["ch_1", "ch_2"]
    assert missing.status_code == 400  # this app requires a key on /charges
    assert missing.json()["title"] == "Idempotency-Key header required"
    assert len(ledger.charges) == 2


def test_flask_example_charges_once_per_key(
    flask_example: ModuleType, serve_wsgi: Callable[[Any], str]
) -> None:
    ledger = flask_example.Ledger()
    base = serve_wsgi(flask_example.create_app(ledger))

    with httpx.Client(base_url=base, timeout=5) as client:
        charges = check_charges(client)
        without_key = [charge(client, None, 100) for _ in range(2)]

    assert [c["id"] for c in charges] == ["ch_1", "ch_2"]
    # Keys are optional here: without one, each request is a new charge.
    assert [r.json()["id"] for r in without_key] == ["ch_3", "ch_4"]
    assert len(ledger.charges) == 4


@pytest.mark.parametrize("name", ["starlette_idempotency", "flask_app"])
def test_idempotency_examples_run_as_scripts(name: str) -> None:
    if name == "flask_app":
        pytest.importorskip("flask")
    with running_script(name) as client:
        first = charge(client, "script-1", 250)
        repeat = charge(client, "script-1", 250)
    assert first.status_code == 201
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json() == first.json()

"""The edge-middleware examples serve as their READMEs say, under real servers.

Each of ``examples/fastapi_app.py``, ``starlette_app.py``, ``flask_shed.py`` and
``django_app.py`` runs under uvicorn (ASGI) or a threaded WSGI server, behind
reskit's ``CorrelationIdMiddleware`` and ``ShedMiddleware`` as the example wires
them, and is driven by a real httpx client: correlation IDs, brownout priority,
per-tenant quotas and kill switches. Handlers that must be caught in flight
block on an event the test sets; nothing waits for time. Each example also runs
once as a script.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

import reskit
from http_servers import running_uvicorn, running_wsgi

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 10.0  # seconds an expected event may take before the test fails

_loaded: dict[str, ModuleType] = {}


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` once per process, registered in ``sys.modules``.

    Registered because Django imports its ``ROOT_URLCONF`` by name, and loaded
    once because Django's settings can be configured only once.
    """
    if name not in _loaded:
        module_name = f"reskit_edge_example_{name}"
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        _loaded[name] = module
    return _loaded[name]


class Gate:
    """Holds the handlers that ask for it until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.proceed = threading.Event()
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}

    def note(self, what: str) -> None:
        with self.lock:
            self.calls[what] = self.calls.get(what, 0) + 1

    def hold(self) -> None:
        self.entered.release()
        assert self.proceed.wait(WAIT), "the test never opened the gate"

    def arrivals(self, count: int) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=WAIT), "a held handler never arrived"


@dataclass
class Example:
    """How one example is built and which of its routes play which part."""

    name: str
    kind: str  # "asgi" or "wsgi"
    build: Callable[[ModuleType, Gate], Any]
    critical: tuple[str, str]  # method, path: never shed
    critical_status: int
    feature: str  # path shed at brownout level 1, behind...
    switch: str  # ...this kill switch
    quota: str  # path prefix with a per-tenant quota, shed at level 2
    quota_size: int
    listening: str  # what the script prints once it listens
    quota_shed_at: int = 2  # the brownout level that sheds the quota route

    def held(self) -> str:
        return f"{self.quota}/held"

    def quick(self) -> str:
        return f"{self.quota}/quick"


def build_fastapi(module: ModuleType, gate: Gate) -> Any:
    class Shop(module.Shop):  # type: ignore[name-defined,misc]
        def build_report(self, tenant: str | None, name: str) -> dict[str, Any]:
            gate.note(name)
            if name == "held":
                gate.hold()
            return super().build_report(tenant, name)  # type: ignore[no-any-return]

    class Mailer(module.Mailer):  # type: ignore[name-defined,misc]
        sent_event = threading.Event()

        def send_receipt(self, order: dict[str, Any]) -> None:
            super().send_receipt(order)
            self.sent_event.set()

    mailer = Mailer()
    gate.mailer = mailer  # type: ignore[attr-defined]
    return module.create_app(Shop(), mailer)


def build_starlette(module: ModuleType, gate: Gate) -> Any:
    import anyio.to_thread

    class Inventory(module.FlakyInventory):  # type: ignore[name-defined,misc]
        async def stock(self, sku: str) -> int:
            gate.note(sku)
            if sku == "held":
                await anyio.to_thread.run_sync(gate.hold)
            self.calls += 1
            return 7

    # No timeout or deadline: a held lookup stays in flight until the gate opens.
    return module.create_app(Inventory(), timeout=None, deadline=None)


def build_wsgi(module: ModuleType, gate: Gate) -> Any:
    class Shop(module.Shop):  # type: ignore[name-defined,misc]
        def export(self, tenant: str | None, name: str) -> dict[str, Any]:
            gate.note(name)
            if name == "held":
                gate.hold()
            return super().export(tenant, name)  # type: ignore[no-any-return]

    app = module.create_app(Shop())
    return app.wsgi_app if hasattr(app, "wsgi_app") else app


EXAMPLE_LIST = [
    Example(
        "fastapi_app",
        "asgi",
        build_fastapi,
        ("POST", "/checkout?sku=boots"),
        201,
        "/recommendations",
        "recommendations",
        "/reports",
        2,
        "Uvicorn running on",
    ),
    Example(
        "starlette_app",
        "asgi",
        build_starlette,
        ("POST", "/orders/boots"),
        201,
        "/stock/sku-1",
        "stock",
        "/stock",
        4,
        "Uvicorn running on",
        quota_shed_at=1,  # its quota guards the feature route itself
    ),
    Example(
        "flask_shed",
        "wsgi",
        build_wsgi,
        ("POST", "/orders?sku=boots"),
        201,
        "/suggestions",
        "suggestions",
        "/exports",
        2,
        "Running on",
    ),
    Example(
        "django_app",
        "wsgi",
        build_wsgi,
        ("POST", "/payments?amount=500"),
        201,
        "/feed",
        "feed",
        "/exports",
        2,
        "Starting development server at",
    ),
]
EXAMPLES_BY_NAME = {example.name: example for example in EXAMPLE_LIST}
ALL = pytest.mark.parametrize("example", EXAMPLE_LIST, ids=[e.name for e in EXAMPLE_LIST])


def requirements(example: Example) -> None:
    for package in {
        "fastapi_app": ["fastapi", "uvicorn"],
        "starlette_app": ["starlette", "uvicorn"],
        "flask_shed": ["flask"],
        "django_app": ["django"],
    }[example.name]:
        pytest.importorskip(package)


@dataclass
class Served:
    example: Example
    gate: Gate
    client: httpx.Client

    def critical(self, **headers: str) -> httpx.Response:
        method, path = self.example.critical
        return self.client.request(method, path, headers=headers)


@pytest.fixture
def serve() -> Iterator[Callable[[Example], Served]]:
    """Build an example app afresh (after the test's fresh store) and serve it."""
    stack: list[tuple[Any, httpx.Client]] = []

    def start(example: Example) -> Served:
        requirements(example)
        module = load_example(example.name)
        gate = Gate()
        app = example.build(module, gate)
        running = running_uvicorn(app) if example.kind == "asgi" else running_wsgi(app)
        url = running.__enter__()
        client = httpx.Client(base_url=url, timeout=WAIT)
        stack.append((running, client))
        return Served(example, gate, client)

    yield start
    for running, client in reversed(stack):
        client.close()
        running.__exit__(None, None, None)


# -- correlation IDs -----------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(reskit.CorrelationIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured(name: str) -> Iterator[list[logging.LogRecord]]:
    """Records of logger ``name`` at INFO, as a handler with the ID filter sees them."""
    handler = _Capture()
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@ALL
def test_the_request_id_is_echoed_and_bound(
    serve: Callable[[Example], Served], example: Example
) -> None:
    served = serve(example)
    given = served.critical(**{"X-Request-ID": "order-42.a_b"})
    fresh = served.critical()
    hostile = served.critical(**{"X-Request-ID": "<script>alert(1)</script>"})
    assert given.status_code == example.critical_status, given.text
    assert given.headers["x-request-id"] == "order-42.a_b"
    assert given.json()["correlation_id"] == "order-42.a_b"  # the handler sees it bound
    for response in (fresh, hostile):
        cid = response.headers["x-request-id"]
        assert reskit.valid_correlation_id(cid)
        assert response.json()["correlation_id"] == cid
    assert "script" not in hostile.headers["x-request-id"]
    assert fresh.headers["x-request-id"] != hostile.headers["x-request-id"]


@pytest.mark.parametrize("name", ["flask_shed", "django_app"])
def test_wsgi_examples_log_with_the_request_id(
    serve: Callable[[Example], Served], name: str
) -> None:
    served = serve(EXAMPLES_BY_NAME[name])
    with captured("shop") as records:
        served.critical(**{"X-Request-ID": "logged-1"})
        served.client.get(served.example.quick(), headers={"X-Request-ID": "logged-2"})
    assert [record.correlation_id for record in records] == [  # type: ignore[attr-defined]
        "logged-1",
        "logged-2",
    ]


def test_fastapi_logs_structlog_events_access_lines_and_receipts_with_the_id(
    serve: Callable[[Example], Served],
) -> None:
    import structlog

    served = serve(EXAMPLES_BY_NAME["fastapi_app"])
    mailer = served.gate.mailer  # type: ignore[attr-defined]
    with (
        structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs,
        captured("uvicorn.access") as access,
    ):
        response = served.critical(**{"X-Request-ID": "checkout-7"})
        # The receipt is a BackgroundTask: it runs after the response went out.
        assert mailer.sent_event.wait(WAIT), "the receipt was never sent"
    assert response.status_code == 201
    order = response.json()["id"]
    assert mailer.sent == [{"order": order, "correlation_id": "checkout-7"}]
    events = {event["event"]: event for event in logs}
    assert events["order.placed"]["correlation_id"] == "checkout-7"
    assert events["receipt.sent"]["correlation_id"] == "checkout-7"
    assert events["receipt.sent"]["order"] == order
    assert [record.correlation_id for record in access] == ["checkout-7"]  # type: ignore[attr-defined]


def test_fastapi_logging_config_puts_the_id_in_the_format() -> None:
    pytest.importorskip("fastapi")
    module = load_example("fastapi_app")
    config = module.LOGGING
    assert "%(correlation_id)s" in config["formatters"]["line"]["format"]
    assert config["handlers"]["stderr"]["filters"] == ["correlation_id"]
    assert {"uvicorn", "uvicorn.access"} <= set(config["loggers"])


# -- shedding ------------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status: int, guard: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    assert reskit.valid_correlation_id(response.headers["x-request-id"])
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["guard"] == guard
    return problem


@ALL
def test_brownout_sheds_low_priority_routes_and_keeps_the_critical_one(
    serve: Callable[[Example], Served], example: Example
) -> None:
    served = serve(example)
    client = served.client

    def statuses() -> list[int]:
        return [
            served.critical().status_code,
            client.get(example.feature).status_code,
            client.get(example.quick()).status_code,
        ]

    ok = example.critical_status
    assert statuses() == [ok, 200, 200]
    reskit.set_brownout_level(1, reason="overload", actor="oncall")
    shed = client.get(example.feature, headers={"X-Request-ID": "shed-1"})
    assert shed.headers["x-request-id"] == "shed-1"
    assert assert_problem(shed, 503, "brownout")["title"] == "Shed under brownout"
    assert statuses() == [ok, 503, 503 if example.quota_shed_at == 1 else 200]
    reskit.set_brownout_level(2, reason="overload", actor="oncall")
    assert statuses() == [ok, 503, 503]
    reskit.set_brownout_level(0, reason="calm", actor="oncall")
    assert statuses() == [ok, 200, 200]


@ALL
def test_a_tenant_over_its_quota_gets_429_while_another_is_served(
    serve: Callable[[Example], Served], example: Example
) -> None:
    served = serve(example)
    gate = served.gate
    size = example.quota_size
    acme = {"X-Tenant": "acme"}
    with ThreadPoolExecutor(size) as pool:
        held = [pool.submit(served.client.get, example.held(), headers=acme) for _ in range(size)]
        gate.arrivals(size)
        over = served.client.get(example.quick(), headers=acme)
        other = served.client.get(example.quick(), headers={"X-Tenant": "globex"})
        critical = served.critical(**acme)
        gate.proceed.set()
        finished = [future.result() for future in held]
    again = served.client.get(example.quick(), headers=acme)

    problem = assert_problem(over, 429, "bulkhead")
    assert problem["type"].endswith("#quota")
    assert other.status_code == 200
    assert critical.status_code == example.critical_status  # its own bulkhead
    assert [response.status_code for response in finished] == [200] * size
    assert again.status_code == 200
    # The refused request never reached the handler: globex's and the last one did.
    assert {what: gate.calls.get(what, 0) for what in ("held", "quick")} == {
        "held": size,
        "quick": 2,
    }


@pytest.mark.parametrize(
    "name", [n for n in EXAMPLES_BY_NAME if n != "starlette_app"]
)  # the Starlette app names no API keys
def test_an_api_key_names_the_tenant(serve: Callable[[Example], Served], name: str) -> None:
    example = EXAMPLES_BY_NAME[name]
    served = serve(example)
    size = example.quota_size
    key = {"X-API-Key": "key-acme"}
    with ThreadPoolExecutor(size) as pool:
        held = [pool.submit(served.client.get, example.held(), headers=key) for _ in range(size)]
        served.gate.arrivals(size)
        # The same tenant by its gateway header: one quota, whichever header named it.
        over = served.client.get(example.quick(), headers={"X-Tenant": "acme"})
        other = served.client.get(example.quick(), headers={"X-API-Key": "key-globex"})
        served.gate.proceed.set()
        assert [future.result().status_code for future in held] == [200] * size
    assert over.status_code == 429
    assert other.status_code == 200
    assert other.json()["tenant"] == "globex"


@ALL
def test_the_kill_switch_turns_the_feature_off_and_revives_it(
    serve: Callable[[Example], Served], example: Example
) -> None:
    served = serve(example)
    client = served.client
    assert client.get(example.feature).status_code == 200
    reskit.kill(example.switch, reason="incident 12", actor="oncall")
    killed = client.get(example.feature)
    critical = served.critical()
    reskit.revive(example.switch, reason="fixed", actor="oncall")
    revived = client.get(example.feature)

    problem = assert_problem(killed, 503, "kill_switch")
    assert problem["title"] == "Feature switched off"
    assert killed.headers["retry-after"] == "1"
    assert critical.status_code == example.critical_status
    assert revived.status_code == 200
    if example.name == "starlette_app":  # the one feature route that reaches the gate
        assert served.gate.calls["sku-1"] == 2  # the killed request never looked stock up


# -- as scripts ----------------------------------------------------------------------------


@contextmanager
def running_script(example: Example) -> Iterator[tuple[httpx.Client, queue.Queue[str]]]:
    """Run ``examples/<name>.py --port N``; yield a client once it says it listens.

    Also yields the queue of the lines it prints after that, read by a thread so
    a full pipe can never block the server.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key != "RESKIT_STORE"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{example.name}.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []
    reader: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if example.listening in line:
                break
        else:
            pytest.fail(f"{example.name} exited before listening:\n{''.join(output)}")
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: [lines.put(line) for line in stdout])
        reader.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
            yield client, lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if reader is not None:
            reader.join(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()


def line_with(lines: queue.Queue[str], *parts: str) -> str:
    """The first line printed that contains every one of ``parts``."""
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"no line with {parts} in:\n{''.join(seen)}")
        seen.append(line)
        if all(part in line for part in parts):
            return line


# A line the script logs with the ID bound, when it logs one.
LOGGED = {
    "fastapi_app": ("[script-1]", "uvicorn.access", "POST /checkout"),
    "flask_shed": ("[script-1] shop: order ord_1 placed",),
    "django_app": ("[script-1] shop: payment pay_1 taken",),
}


@ALL
def test_the_example_runs_as_a_script(example: Example) -> None:
    requirements(example)
    with running_script(example) as (client, lines):
        health = client.get("/healthz", headers={"X-Request-ID": "health-1"})
        method, path = example.critical
        placed = client.request(method, path, headers={"X-Request-ID": "script-1"})
        if example.name in LOGGED:
            line_with(lines, *LOGGED[example.name])
        if example.name == "fastapi_app":
            line_with(lines, "receipt.sent", "correlation_id='script-1'")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert health.headers["x-request-id"] == "health-1"
    assert placed.headers["x-request-id"] == "script-1"
    # The Starlette script's stock service fails at random; the others always take the order.
    expected = (201, 409, 503) if example.name == "starlette_app" else (201,)
    assert placed.status_code in expected, placed.text

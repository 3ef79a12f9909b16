"""A fleet of real processes sharing one real Redis: propagation and shared breakers.

Each worker is a fresh Python process (``sys.executable``) that configures the
Redis store and talks to the test over its stdin and stdout, one line at a
time, so the test coordinates them without sleeping.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

import reskit
from redis_servers import RedisServer
from reskit.stores.redis import RedisStore

pytestmark = pytest.mark.redis

WAIT = 20.0

# A worker: configures the store, then obeys one command per line of stdin.
WORKER = textwrap.dedent(
    """
    import json, sys, threading, time
    import reskit
    from reskit.stores.redis import RedisStore
    from reskit.testing import FakeClock

    # Every worker's clock starts at the same wall time and moves only when told.
    clock = FakeClock(epoch=1_800_000_000.0)
    clock.install()
    store = RedisStore(sys.argv[1])
    reskit.configure(store)
    assert store.wait_synced(20)
    policy = reskit.Policy("checkout", kill_switch="checkout")
    breaker = reskit.CircuitBreaker(
        int(sys.argv[2]), float(sys.argv[3]), name="shared-db", shared=True,
        half_open_max_calls=int(sys.argv[4]), max_half_open_wait=float(sys.argv[5]),
    )
    guarded = reskit.Policy("db", breaker=breaker)
    assert store.flush(20)
    killed = threading.Event()

    def seen(snapshot):
        record = snapshot.switch("checkout")
        if record is not None and record["killed"] and not killed.is_set():
            killed.set()
            print(json.dumps({"saw_kill": time.time()}), flush=True)

    store.listen(seen)
    seen(store.snapshot())
    print(json.dumps({"ready": True}), flush=True)

    def fail():
        raise ConnectionError("down")

    hang = threading.Event()

    def probe():
        hang.wait()  # a probe that never returns (the process is killed during it)

    for line in sys.stdin:
        command = line.strip()
        if command == "fail":
            try:
                guarded.call(fail)
                outcome = "passed"
            except reskit.CircuitOpen:
                outcome = "rejected"
            except ConnectionError:
                outcome = "failed"
            store.flush(20)
            print(json.dumps({"outcome": outcome}), flush=True)
        elif command == "try":
            try:
                guarded.call(lambda: None)
                outcome = "passed"
            except reskit.CircuitOpen:
                outcome = "rejected"
            store.flush(20)
            print(json.dumps({"outcome": outcome}), flush=True)
        elif command == "hang":
            threading.Thread(target=lambda: guarded.call(probe), daemon=True).start()
            print(json.dumps({"hanging": True}), flush=True)
        elif command.startswith("advance "):
            clock.advance(float(command.split()[1]))
            print(json.dumps({"advanced": True}), flush=True)
        elif command == "state":
            store.flush(20)
            print(json.dumps({"state": breaker.state.value}), flush=True)
        elif command == "quit":
            break
    store.close()
    """
)


class Worker:
    def __init__(self, url: str, *settings: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, *settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"worker {self.process.pid} exited ({self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        stdin = self.process.stdin
        if self.process.poll() is None:
            try:
                assert stdin is not None
                stdin.write("quit\n")
                stdin.flush()
                self.process.wait(timeout=WAIT)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for pipe in (stdin, self.process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass  # a killed worker's stdin may have unflushed bytes: nobody reads them


@pytest.fixture
def fleet(server: RedisServer) -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        worker.close()


def start(fleet: list[Worker], url: str, count: int, *settings: str) -> list[Worker]:
    new = [Worker(url, *settings) for _ in range(count)]
    fleet.extend(new)
    for worker in new:
        assert worker.read() == {"ready": True}
    return new


DEFAULTS = ("3", "60", "1", "60")  # fail_max, reset_timeout, half_open_max_calls, lease


def test_a_kill_reaches_20_processes_and_the_latency_is_recorded(
    server: RedisServer, fleet: list[Worker], record_property: Any
) -> None:
    workers = start(fleet, server.url, 20, *DEFAULTS)
    admin = RedisStore(server.url)
    try:
        assert admin.wait_synced(WAIT)
        reskit.configure(admin)
        flipped = time.time()
        reskit.kill("checkout", reason="propagation test", actor="pytest")
        latencies = sorted(worker.read()["saw_kill"] - flipped for worker in workers)
    finally:
        admin.close()
    assert len(latencies) == 20
    p99 = latencies[-1]
    record_property("propagation_p50_ms", round(latencies[10] * 1000, 2))
    record_property("propagation_max_ms", round(p99 * 1000, 2))
    print(f"kill reached 20 processes: p50 {latencies[10] * 1000:.1f} ms, max {p99 * 1000:.1f} ms")
    # Correctness, not speed: every process heard it (the benchmark reports the speed).
    assert all(latency < WAIT for latency in latencies)


def breaker_state(server: RedisServer) -> dict[str, Any]:
    admin = RedisStore(server.url)
    try:
        states = {b["name"]: b for b in admin.shared_breakers()}
    finally:
        admin.close()
    return states["shared-db"]


def test_processes_failing_together_open_the_shared_breaker_exactly_once(
    server: RedisServer, fleet: list[Worker]
) -> None:
    workers = start(fleet, server.url, 6, *DEFAULTS)
    # Six processes fail once each, all at the same time: 6 failures > fail_max=3.
    for worker in workers:
        assert worker.process.stdin is not None
        worker.process.stdin.write("fail\n")
        worker.process.stdin.flush()
    outcomes = [worker.read()["outcome"] for worker in workers]
    assert outcomes.count("failed") >= 3
    state = breaker_state(server)
    assert state["state"] == "open"
    assert state["opens"] == 1  # one transition, however many crossed the threshold
    # Every process follows: its calls are rejected without running.
    assert [worker.ask("try")["outcome"] for worker in workers] == ["rejected"] * 6
    # A process that starts now adopts the open state; it does not reset it.
    late = start(fleet, server.url, 1, *DEFAULTS)[0]
    assert late.ask("state") == {"state": "open"}
    assert breaker_state(server)["opens"] == 1


def advance(workers: list[Worker], seconds: float) -> None:
    for worker in workers:
        assert worker.ask(f"advance {seconds}") == {"advanced": True}


def test_half_open_probes_are_capped_fleet_wide_and_a_crashed_probe_lease_expires(
    server: RedisServer, fleet: list[Worker]
) -> None:
    # fail_max 1, reset_timeout 20 s, one probe fleet-wide, its lease held 30 s at most.
    workers = start(fleet, server.url, 4, "1", "20", "1", "30")
    assert workers[0].ask("fail") == {"outcome": "failed"}
    assert breaker_state(server)["state"] == "open"
    assert [worker.ask("state")["state"] for worker in workers] == ["open"] * 4
    advance(workers, 21)
    # The first process to ask takes the one lease and its probe hangs; then it dies.
    prober = workers[0]
    assert prober.ask("state") == {"state": "half_open"}
    assert prober.ask("try")["outcome"] == "rejected"  # no lease yet: it asks the fleet
    assert prober.ask("hang") == {"hanging": True}
    assert prober.ask("state") == {"state": "half_open"}
    others = [worker.ask("try")["outcome"] for worker in workers[1:]]
    assert others == ["rejected"] * 3  # one probe fleet-wide, and it is taken
    assert [worker.ask("try")["outcome"] for worker in workers[1:]] == ["rejected"] * 3
    prober.process.kill()
    prober.process.wait()
    # Its lease runs out 30 s after it was taken; until then nobody else probes.
    advance(workers[1:], 29)
    assert [worker.ask("try")["outcome"] for worker in workers[1:]] == ["rejected"] * 3
    advance(workers[1:], 2)
    # The first to ask after that asks the fleet for the lease, and the next call probes.
    assert workers[1].ask("try")["outcome"] == "rejected"
    assert workers[1].ask("try")["outcome"] == "passed"
    assert breaker_state(server)["state"] == "closed"
    assert [worker.ask("try")["outcome"] for worker in workers[1:]] == ["passed"] * 3

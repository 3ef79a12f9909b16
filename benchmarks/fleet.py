"""The fleet benchmark: a policy on the Redis store, and how fast a flip spreads.

Two measurements, against a redis-server this script starts on a free port:

1. **Store cost.** The same full policy (deadline, retry, breaker, bulkhead,
   kill switch, brownout shed, fallback) timed in a process configured with
   the memory store and in one configured with the Redis store, whose
   subscriber and writer threads run meanwhile. Each side runs in fresh
   processes, alternated, and the fastest run of each is kept; the ratio
   ``redis / memory`` has a budget of 1.1 (the hot path reads local memory
   only, so it should be about 1.0).
2. **Propagation.** 20 processes subscribe; a kill (then a revive, and so on)
   is made from this process; each subscriber notes when its snapshot shows
   the flip. Reported: p50 and p99 over every (flip, process) pair; the budget
   for p99 is 100 ms.

``--check`` exits 1 when a figure is over its budget times ``--margin``
(default 1.5, as the gate's), so CI can run it. Absolute times are reported,
never gated. Without a redis-server binary the script says so and exits 0
(or 1 with ``--require``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time

STORE_BUDGET = 1.1
PROPAGATION_BUDGET_MS = 100.0

TIMER = textwrap.dedent(
    """
    import sys, time
    import reskit
    store = reskit.configure(sys.argv[1])
    if hasattr(store, "wait_synced"):
        assert store.wait_synced(10)
    policy = reskit.Policy(
        "fleet-bench", deadline=5, retry=reskit.Retry(attempts=3, on=ConnectionError),
        breaker=reskit.CircuitBreaker(5, 30), bulkhead=reskit.Bulkhead(max_concurrent=10),
        kill_switch="fleet-bench", shed_at=3, fallback=lambda exc: None,
    )
    f = policy(lambda: 1)
    n = int(sys.argv[2])
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter_ns()
        for _ in range(n):
            f(); f(); f(); f(); f(); f(); f(); f(); f(); f()
        best = min(best, (time.perf_counter_ns() - start) / (n * 10))
    print(best)
    store.close()
    """
)

LISTENER = textwrap.dedent(
    """
    import json, sys, time
    import reskit
    store = reskit.configure(sys.argv[1])
    assert store.wait_synced(10)
    last = [None]

    def seen(snapshot):
        record = snapshot.switch("fleet-bench")
        state = None if record is None else record["killed"]
        if state is not None and state != last[0]:
            last[0] = state
            print(json.dumps({"state": state, "at": time.time()}), flush=True)

    store.listen(seen)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
    store.close()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(binary: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            break
    else:
        raise RuntimeError("redis-server did not start")
    return process, f"redis://127.0.0.1:{port}/0"


def time_policy(store: str, calls: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", TIMER, store, str(calls)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return float(out.stdout.strip())


def store_cost(url: str, rounds: int, calls: int) -> dict[str, float]:
    memory, redis = [], []
    for _ in range(rounds):
        memory.append(time_policy("memory", calls))
        redis.append(time_policy(url, calls))
    return {
        "memory_ns": min(memory),
        "redis_ns": min(redis),
        "ratio": min(redis) / min(memory),
    }


def propagation(url: str, processes: int, flips: int) -> dict[str, float]:
    import reskit

    listeners = [
        subprocess.Popen(
            [sys.executable, "-c", LISTENER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    latencies: list[float] = []
    store = reskit.configure(url)
    try:
        for listener in listeners:
            assert listener.stdout is not None
            assert json.loads(listener.stdout.readline()) == {"ready": True}
        for flip in range(flips):
            flipped = time.time()
            if flip % 2 == 0:
                reskit.kill("fleet-bench", reason="benchmark", actor="fleet.py")
            else:
                reskit.revive("fleet-bench", reason="benchmark", actor="fleet.py")
            for listener in listeners:
                assert listener.stdout is not None
                message = json.loads(listener.stdout.readline())
                assert message["state"] == (flip % 2 == 0)
                latencies.append((message["at"] - flipped) * 1000)
    finally:
        for listener in listeners:
            assert listener.stdin is not None
            listener.stdin.close()
            listener.wait(timeout=30)
            if listener.stdout is not None:
                listener.stdout.close()
        store.close()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": latencies[-1],
        "samples": len(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer rounds (for CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 over budget x margin")
    parser.add_argument("--margin", type=float, default=1.5)
    parser.add_argument("--require", action="store_true", help="fail without redis-server")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("fleet benchmark skipped: no redis-server on PATH")
        return 1 if args.require else 0
    server, url = start_redis(binary)
    try:
        cost = store_cost(
            url, rounds=3 if args.short else 7, calls=20_000 if args.short else 50_000
        )
        spread = propagation(url, processes=20, flips=4 if args.short else 20)
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
    print(
        f"store cost: full policy {cost['memory_ns']:.0f} ns/call on memory, "
        f"{cost['redis_ns']:.0f} ns/call on Redis: ratio {cost['ratio']:.3f} "
        f"(budget {STORE_BUDGET})"
    )
    print(
        f"propagation to 20 processes: p50 {spread['p50_ms']:.1f} ms, "
        f"p99 {spread['p99_ms']:.1f} ms, max {spread['max_ms']:.1f} ms over "
        f"{spread['samples']:.0f} deliveries (budget p99 {PROPAGATION_BUDGET_MS:.0f} ms)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"store": cost, "propagation": spread}, out, indent=2)
    failed = []
    if cost["ratio"] > STORE_BUDGET * args.margin:
        failed.append(f"store ratio {cost['ratio']:.3f} > {STORE_BUDGET} x {args.margin}")
    if spread["p99_ms"] > PROPAGATION_BUDGET_MS * args.margin:
        failed.append(f"p99 {spread['p99_ms']:.1f} ms > {PROPAGATION_BUDGET_MS} x {args.margin}")
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

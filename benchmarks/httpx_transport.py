"""What reskit.httpx.Transport costs, and what its hedging buys, against plain httpx.

A uvicorn process on loopback serves a raw ASGI app; one sync client with
keep-alive talks to it, in interleaved rounds so every variant sees the same
machine load.

**Overhead.** The upstream answers ``GET /fast`` at once. Per request, median
of rounds, for httpx and httpx2 each:

- **plain**: ``Client()`` with the library's own transport;
- **reskit**: ``Client(transport=reskit.httpx.Transport(standard(...)))`` — the
  standard policy (deadline, attempt timeout, retry, a breaker per host, a
  bulkhead), propagation headers on every request.

Reported: ``(reskit - plain) / plain``, the overhead as a share of httpx's own
per-request cost (budget 10%), measured two ways: the wall-clock time of a
request (which also holds the upstream's time and how the machine schedules
two processes on its CPUs), and the client thread's own CPU time, which is
httpx's cost alone, steadier on a busy machine, and what the budget applies to.

**Hedging.** The upstream answers ``GET /tail`` after 5 ms, except 5% of
requests (drawn at random) after 50 ms (a shared CI machine adds a millisecond
or two of noise to every request: shorter times would measure that noise).
Variants: **plain** httpx, and **hedged**: the transport with ``Hedging()``
(a hedge after the observed p90, budget 10% of requests). Reported: each one's
p50 and p99 latency over all rounds, the ratio of p99s (budget 0.4) and the
extra requests the upstream saw (budget 10%).

``--check`` exits 1 when a figure is over its budget times ``--margin``
(default 1.5; 1.0 for the hedging share, which the budget enforces).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

OVERHEAD_BUDGET = 0.10
P99_BUDGET = 0.4
EXTRA_BUDGET = 0.10

SERVER = textwrap.dedent(
    """
    import asyncio, random, socket, sys
    import uvicorn

    served = {"tail": 0}
    draw = random.Random(11).random

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/tail":
            served["tail"] += 1
            await asyncio.sleep(0.05 if draw() < 0.05 else 0.005)
            body = b"tail"
        elif path == "/stats":
            body = str(served["tail"]).encode()
        else:
            body = b"fast"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()),
                                (b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    server.run(sockets=[sock])
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start() -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # the server takes a moment to bind: the one wait here
        try:
            httpx.get(url + "/fast", timeout=1)
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the upstream did not start") from None
            time.sleep(0.05)


def overhead(url: str, library: str, rounds: int, per_round: int) -> dict[str, float]:
    import importlib

    import reskit.httpx

    lib: Any = importlib.import_module(library)
    plain = lib.Client(base_url=url)
    wrapped = lib.Client(
        base_url=url,
        transport=reskit.httpx.Transport(reskit.httpx.standard("bench"), lib.HTTPTransport()),
    )
    variants = {"plain": plain, "reskit": wrapped}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for client in variants.values():  # warm-up: connections, compiled drivers
            for _ in range(per_round):
                client.get("/fast")
        for round_number in range(rounds):
            order = list(variants.items())
            if round_number % 2:
                order.reverse()
            for name, client in order:
                get = client.get
                started = time.perf_counter()
                worked = time.thread_time()
                for _ in range(per_round):
                    get("/fast")
                cpu[name].append((time.thread_time() - worked) / per_round)
                samples[name].append((time.perf_counter() - started) / per_round)
    finally:
        plain.close()
        wrapped.close()
    figures = {name: statistics.median(values) * 1e6 for name, values in samples.items()}
    # Per-round differences, so a burst of load that hit one round cancels out.
    ratios = [r / p - 1.0 for r, p in zip(samples["reskit"], samples["plain"], strict=True)]
    figures["overhead"] = statistics.median(ratios)
    # The client's own CPU time (this thread: the sync client does its I/O here), the
    # cost httpx itself has per request, without the upstream's time or the machine's
    # scheduling of two processes on two CPUs in it: the steadier of the two figures.
    for name, values in cpu.items():
        figures[f"{name}_cpu"] = statistics.median(values) * 1e6
    cpu_ratios = [r / p - 1.0 for r, p in zip(cpu["reskit"], cpu["plain"], strict=True)]
    figures["cpu_overhead"] = statistics.median(cpu_ratios)
    return figures


def hedging(url: str, rounds: int, per_round: int, quantile: float = 0.9) -> dict[str, float]:
    import httpx

    import reskit
    import reskit.httpx

    def served() -> int:
        return int(httpx.get(url + "/stats").text)

    plain = httpx.Client(base_url=url)
    hedges = reskit.httpx.Hedging(
        quantile=quantile, budget=reskit.RetryBudget(0.1, min_per_second=0.0)
    )
    transport = reskit.httpx.Transport(
        reskit.Policy("bench", deadline=5.0), httpx.HTTPTransport(), hedging=hedges
    )
    hedged = httpx.Client(base_url=url, transport=transport)
    variants = {"plain": plain, "hedged": hedged}
    latencies: dict[str, list[float]] = {name: [] for name in variants}
    requests = dict.fromkeys(variants, 0)
    sent = dict.fromkeys(variants, 0)
    try:
        for client in variants.values():  # warm-up: connections, observed latencies
            for _ in range(100):
                client.get("/tail")
        for round_number in range(rounds):
            order = list(variants.items())
            if round_number % 2:
                order.reverse()
            for name, client in order:
                get = client.get
                before = served()
                for _ in range(per_round):
                    started = time.perf_counter()
                    get("/tail")
                    latencies[name].append(time.perf_counter() - started)
                sent[name] += per_round
                requests[name] += served() - before
    finally:
        plain.close()
        hedged.close()
    figures: dict[str, float] = {}
    for name, values in latencies.items():
        ordered = sorted(values)
        figures[f"{name}_p50"] = ordered[len(ordered) // 2] * 1e3
        figures[f"{name}_p99"] = ordered[int(len(ordered) * 0.99)] * 1e3
    figures["p99_ratio"] = figures["hedged_p99"] / figures["plain_p99"]
    figures["extra"] = requests["hedged"] / sent["hedged"] - 1.0
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer rounds (for CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 over budget")
    parser.add_argument("--margin", type=float, default=1.5)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    process, url = start()
    figures: dict[str, Any] = {}
    try:
        for library in ("httpx", "httpx2"):
            figures[library] = overhead(
                url, library, rounds=15 if args.short else 41, per_round=100 if args.short else 200
            )
        figures["hedging"] = hedging(
            url, rounds=6 if args.short else 20, per_round=250 if args.short else 500
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    failed = []
    for library in ("httpx", "httpx2"):
        f = figures[library]
        print(
            f"{library}: per request, median of rounds: plain {f['plain']:.0f} us, through "
            f"reskit.httpx.Transport {f['reskit']:.0f} us, overhead {f['overhead']:+.1%}; "
            f"the client's CPU time: plain {f['plain_cpu']:.0f} us, through the transport "
            f"{f['reskit_cpu']:.0f} us, overhead {f['cpu_overhead']:+.1%} "
            f"(budget {OVERHEAD_BUDGET:.0%})"
        )
        if f["cpu_overhead"] > OVERHEAD_BUDGET * args.margin:
            failed.append(
                f"{library} overhead {f['cpu_overhead']:.1%} of the client's CPU time > "
                f"{OVERHEAD_BUDGET:.0%} x margin"
            )
    h = figures["hedging"]
    print(
        f"hedging, 5% of answers 10x slower: plain p50 {h['plain_p50']:.1f} ms, "
        f"p99 {h['plain_p99']:.1f} ms; hedged p50 {h['hedged_p50']:.1f} ms, "
        f"p99 {h['hedged_p99']:.1f} ms (x{h['p99_ratio']:.2f}, budget {P99_BUDGET}); "
        f"extra requests {h['extra']:.1%} (budget {EXTRA_BUDGET:.0%})"
    )
    if h["p99_ratio"] > P99_BUDGET * args.margin:
        failed.append(f"hedged p99 x{h['p99_ratio']:.2f} > {P99_BUDGET} x margin")
    if h["extra"] > EXTRA_BUDGET:
        failed.append(f"hedging sent {h['extra']:.1%} extra requests > {EXTRA_BUDGET:.0%}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

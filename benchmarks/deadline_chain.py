"""The work a deadline saves: three services under a burst of requests with short budgets.

The services are those of ``examples/deadline_chain.py``: A calls B, B calls C,
each under its own uvicorn server (here all on one event loop, so their
clocks agree to the microsecond). C's work takes a seeded random time, from a
few milliseconds to well over the budget. A load generator sends ``--requests``
requests to A at Poisson arrival times (open loop: each at its time, answered
or not), each with a budget of ``--budget-ms`` in ``X-Request-Timeout-Ms`` and
an httpx timeout of the same length: when it runs out, the client gives up.

Two runs, the same requests:

- **with** the deadline carried: every service behind ``DeadlineMiddleware``,
  the transports sending what is left on;
- **without**: no middleware, no header; the client still gives up on time,
  but nobody behind A knows.

Reported for each: C's handler time in all, the part of it spent on requests
whose client had already given up ("zombie" work: the goal is near zero with
the deadline), and how many requests C finished for nobody. ``--check`` exits 1
unless the run with the deadline spends at most 5% of C's time on zombie work
and less than a tenth of what the run without spends. ``--plot PATH`` draws the
timeline of one request whose budget runs out in C, with and without (SVG or
PNG, with matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import uvicorn

EXAMPLE = Path(__file__).parent.parent / "examples" / "deadline_chain.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deadline_chain", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deadline_chain"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Chain:
    """A, B and C served on this event loop; ``work`` says how long C takes per request."""

    def __init__(self, example: ModuleType, propagate: bool, work: dict[str, float]) -> None:
        self.example = example
        self.ledger = example.Ledger()
        self.ports = [free_port() for _ in range(3)]
        urls = tuple(f"http://127.0.0.1:{port}" for port in self.ports)
        self.url = urls[0]

        async def c_work() -> None:
            await asyncio.sleep(work.get(example.reskit.correlation_id() or "", 0.0))

        apps = example.chain(urls, self.ledger, c_work, propagate=propagate)
        self.servers = [
            uvicorn.Server(
                uvicorn.Config(app, port=port, log_level="error", lifespan="on", access_log=False)
            )
            for app, port in zip(apps, self.ports, strict=True)
        ]
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Chain:
        self.tasks = [asyncio.create_task(server.serve()) for server in self.servers]
        while not all(server.started for server in self.servers):
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            server.should_exit = True
        await asyncio.gather(*self.tasks)


async def burst(
    example: ModuleType, propagate: bool, requests: int, rate: float, budget: float, seed: int
) -> dict[str, float]:
    draw = random.Random(seed)
    # C's work: mostly quick, with a long tail well past the budget.
    work = {f"r{i}": min(draw.lognormvariate(-2.6, 0.9), 2.0) for i in range(requests)}
    gaps = [draw.expovariate(rate) for _ in range(requests)]
    gave_up: dict[str, float] = {}
    answered: dict[str, int] = {}
    async with Chain(example, propagate, work) as chain:
        limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
        async with httpx.AsyncClient(base_url=chain.url, limits=limits) as client:
            # One warm-up request: imports and first connections are not the burst's.
            await client.get("/quote", headers={"X-Request-ID": "warm"}, timeout=5.0)
            chain.ledger.events.clear()

            async def ask(cid: str) -> None:
                sent = time.monotonic()
                gave_up[cid] = sent + budget
                headers = {"X-Request-ID": cid}
                if propagate:
                    headers["X-Request-Timeout-Ms"] = str(int(budget * 1000))
                try:
                    response = await client.get("/quote", headers=headers, timeout=budget)
                    answered[cid] = response.status_code
                except httpx.TimeoutException:
                    answered[cid] = 0

            tasks = []
            for i, gap in enumerate(gaps):
                await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(ask(f"r{i}")))
            await asyncio.gather(*tasks)
            # What C still runs for callers who left: let it end, and count it.
            await asyncio.sleep(max(work.values()) + 0.5)
    c_started: dict[str, float] = {}
    c_ended: dict[str, tuple[float, str]] = {}
    for event in chain.ledger.of("C"):
        if event.request is None:
            continue
        if event.what == "arrived":
            c_started[event.request] = event.at
        else:
            c_ended[event.request] = (event.at, event.what)
    total = zombie = 0.0
    for_nobody = 0
    for cid, started in c_started.items():
        ended, how = c_ended.get(cid, (started, "lost"))
        total += ended - started
        giveup = gave_up[cid]
        client_left = answered.get(cid) != 200
        if client_left and ended > giveup:
            zombie += ended - max(started, giveup)
            if how == "finished":
                for_nobody += 1
    ok = sum(1 for status in answered.values() if status == 200)
    return {
        "requests": float(requests),
        "answered_200": float(ok),
        "c_seconds": total,
        "c_zombie_seconds": zombie,
        "c_zombie_share": zombie / total if total else 0.0,
        "c_finished_for_nobody": float(for_nobody),
    }


async def timeline(example: ModuleType, propagate: bool, budget: float, work: float) -> Any:
    """One request whose budget runs out in C: the events, relative to the client's send."""
    chain = Chain(example, propagate, {"t": work, "warm": 0.0})
    async with chain, httpx.AsyncClient(base_url=chain.url) as client:
        await client.get("/quote", headers={"X-Request-ID": "warm"}, timeout=5.0)
        chain.ledger.events.clear()
        headers = {"X-Request-ID": "t"}
        if propagate:
            headers["X-Request-Timeout-Ms"] = str(int(budget * 1000))
        sent = time.monotonic()
        try:
            await client.get("/quote", headers=headers, timeout=budget)
        except httpx.TimeoutException:
            pass
        gave_up = time.monotonic()
        await asyncio.sleep(work + 0.3)
    return sent, gave_up, [e for e in chain.ledger.events if e.request == "t"]


def plot(example: ModuleType, path: str, budget: float, work: float) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [
        ("with DeadlineMiddleware: C is cancelled, B and A answer 504 in time", True),
        ("without: the client gives up, A, B and C run on for nobody", False),
    ]
    fig, axes = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True)
    for ax, (title, propagate) in zip(axes, runs, strict=True):
        sent, gave_up, events = asyncio.run(timeline(example, propagate, budget, work))
        lanes = ["A", "B", "C"]
        for row, service in enumerate(lanes):
            mine = [e for e in events if e.service == service]
            start = next(e.at for e in mine if e.what == "arrived")
            end_event = mine[-1]
            color = "#c0392b" if end_event.what == "cancelled" else "#2e86c1"
            ax.broken_barh(
                [((start - sent) * 1000, (end_event.at - start) * 1000)],
                (row - 0.3, 0.6),
                color=color,
            )
            label = {
                "cancelled": "cancelled: its budget ran out",
                "finished": "finished, for nobody" if not propagate else "finished",
                "answered": f"answered {end_event.detail}",
            }
            ax.text(
                (end_event.at - sent) * 1000 + 8,
                row,
                label.get(end_event.what, end_event.what),
                va="center",
                fontsize=8,
            )
        ax.axvline(budget * 1000, color="black", linestyle="--", linewidth=1)
        ax.text(budget * 1000 + 5, 2.6, "the client's budget", fontsize=8)
        ax.axvline((gave_up - sent) * 1000, color="grey", linewidth=1)
        ax.set_yticks(range(3), ["A", "B", "C"])
        ax.set_ylim(-0.6, 3.0)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("milliseconds since the client sent its request")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    # Modest, so the three services and the client, all on one event loop, keep up: under
    # a saturated loop, time queued between hops is time no relative budget accounts for.
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--budget-ms", type=int, default=150)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--short", action="store_true", help="100 requests (for CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 when over budget")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw one request's timeline")
    args = parser.parse_args(argv)
    example = load_example()
    requests = 100 if args.short else args.requests
    budget = args.budget_ms / 1000
    figures = {
        name: asyncio.run(burst(example, propagate, requests, args.rate, budget, args.seed))
        for name, propagate in (("with", True), ("without", False))
    }
    for name, run in figures.items():
        print(
            f"{name:>7} the deadline: {run['answered_200']:.0f}/{run['requests']:.0f} answered "
            f"in time; C worked {run['c_seconds']:.2f} s, {run['c_zombie_seconds']:.2f} s of it "
            f"({run['c_zombie_share']:.1%}) for callers who had given up; "
            f"{run['c_finished_for_nobody']:.0f} requests finished for nobody"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.plot:
        plot(example, args.plot, 0.3, 0.8)
    with_, without = figures["with"], figures["without"]
    failed = []
    if with_["c_zombie_share"] > 0.05:
        failed.append(f"zombie share with the deadline {with_['c_zombie_share']:.1%} > 5%")
    if with_["c_zombie_seconds"] * 10 > without["c_zombie_seconds"]:
        failed.append("the deadline saved less than nine tenths of the zombie work")
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

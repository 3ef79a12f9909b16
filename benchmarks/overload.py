"""The overload benchmark: does a service keep its goodput under three times its capacity?

A Starlette service under uvicorn, in a process of its own
(``_overload_server.py``), whose backend has ``--slots`` slots each held
``--service-time`` seconds per request: its capacity is ``slots / service_time``
requests a second (100 by default). An open-loop load generator in this
process (``_overload_load.py``: Poisson arrivals from a seeded
``random.Random``, every request sent at its scheduled time whether or not the
earlier ones were answered, an ``httpx.AsyncClient`` that gives up after
``--timeout``) sends 20% of its requests to ``/checkout`` (critical) and 80% to
``/recommendations`` (low priority), through four phases:

1. half the capacity;
2. three times the capacity;
3. the same load while the backend loses half its slots (a control route of
   the service resizes it);
4. recovery: half the (restored) capacity.

The same schedule (same seed) is sent to each variant in turn:

- ``bare``: no middleware;
- ``static``: ``ShedMiddleware`` with a bulkhead sized to the backend;
- ``adaptive``: a bulkhead whose limit is a ``GradientLimit``;
- ``brownout``: as ``adaptive``, and ``/recommendations`` has ``shed_at=1``; an
  operator raises the brownout level to 1 ``--reaction`` seconds after the
  overload starts and back to 0 when it ends (through a control route that
  calls ``reskit.set_brownout_level`` in the service's process).

Reported per phase: goodput (2xx answered within ``--slo``, per second),
p50/p99 latency of 2xx answers (from the scheduled send time), rejections
(503/429), client timeouts, critical-route availability (share of
``/checkout`` requests answered 2xx within the SLO) and, after the overload,
the time to recover. The generator's lag is reported too: a run in which it
fell behind its schedule (p99 lag over ``--max-lag``) is invalid.

``--check`` exits 1 when a target is missed (looser targets with ``--short``)
and 2 when the run is invalid. ``docs/overload.md`` explains the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _overload_load import (
    Phase,
    PhaseSummary,
    Run,
    actions,
    drive,
    lag,
    phases,
    plan,
    series,
    summarize,
)

SERVER = Path(__file__).resolve().with_name("_overload_server.py")
VARIANTS = ("bare", "static", "adaptive", "brownout")
#: Run only when named with ``--variant``.
EXTRA_VARIANTS = ("adaptive-defaults",)
#: Phase durations in seconds: half load, overload, capacity halved, recovery.
FULL_DURATIONS = (10.0, 30.0, 20.0, 20.0)
SHORT_DURATIONS = (2.0, 4.0, 3.0, 3.0)


@dataclass(frozen=True, slots=True)
class Targets:
    """What ``--check`` demands (see docs/overload.md)."""

    overload_goodput: float  # x capacity, static and adaptive, in the overload phase
    bare_collapse: float  # the bare service's overload goodput must be at most this x capacity
    halved_goodput: float  # x the new capacity, adaptive variants, capacity halved
    critical: float  # brownout: critical availability in the overload phase once reacted


TARGETS = Targets(overload_goodput=0.9, bare_collapse=0.5, halved_goodput=0.8, critical=0.99)
#: ``--short`` measures a few seconds per phase: a few hundred critical requests, a
#: limit that has little time to settle. Its targets leave room for that.
SHORT_TARGETS = Targets(
    overload_goodput=0.75, bare_collapse=0.5, halved_goodput=0.65, critical=0.95
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(variant: str, slots: int, service_time: float) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER), variant, str(port), str(slots), str(service_time)]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # the server takes a moment to bind: the one wait here
        try:
            httpx.get(url + "/_control/health", timeout=1).raise_for_status()
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"the {variant} server did not start") from None
            time.sleep(0.05)


@dataclass(slots=True)
class Outcome:
    variant: str
    phases: list[PhaseSummary]
    lag: dict[str, float]
    actions: list[tuple[float, str]]
    series: dict[str, list[Any]]
    cpu: dict[str, float]  # share of one core used while sending: generator, server
    server: list[list[float]]  # [t, slots, busy, queued, limit, in_flight, waiting, level, cpu]
    discarded: list[float] = field(default_factory=list)  # p99 lag of invalid runs run again


def run_variant(variant: str, config: argparse.Namespace, plan_phases: list[Phase]) -> Outcome:
    capacity = config.slots / config.service_time
    arrivals = plan(plan_phases, capacity, seed=config.seed, critical_share=config.critical_share)
    moves = actions(
        plan_phases, config.slots, brownout_after=config.reaction if variant == "brownout" else None
    )
    process, url = start(variant, config.slots, config.service_time)
    try:
        peak = max(p.load for p in plan_phases) * capacity
        run: Run = asyncio.run(drive(url, arrivals, moves, timeout=config.timeout, peak=peak))
    finally:
        # The bare service still holds the requests its clients gave up on, and a
        # graceful shutdown would serve them all first: a second, then kill.
        process.terminate()
        try:
            process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    total = sum(p.duration for p in plan_phases)
    server = [
        [round(row[0] - run.started, 3), *row[1:]]
        for row in run.server.get("samples", [])
        if -1 <= row[0] - run.started <= total + config.timeout
    ]
    inside = [row for row in server if 0 <= row[0] <= total]
    server_cpu = (
        (inside[-1][8] - inside[0][8]) / (inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0
    )
    return Outcome(
        variant=variant,
        phases=summarize(run, plan_phases, slo=config.slo),
        lag=lag(run),
        actions=run.actions,
        cpu={"generator": run.cpu / total, "server": server_cpu},
        # Half-second windows show a short run's detail; a full run reads better by the second.
        series=asdict(series(run, total, slo=config.slo, window=0.5 if total < 30 else 1.0)),
        server=server,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def table(outcomes: list[Outcome], capacity: float, plan_phases: list[Phase]) -> str:
    head = (
        f"{'variant':<17} {'phase':<16} {'offered':>7} {'goodput':>7} {'x cap':>5} "
        f"{'p50 ms':>6} {'p99 ms':>6} {'rejected':>8} {'timeouts':>8} {'critical':>8} "
        f"{'reacted':>7} {'recovered':>9}"
    )
    lines = [head, "-" * len(head)]
    for outcome in outcomes:
        for summary, phase in zip(outcome.phases, plan_phases, strict=True):
            cap = capacity * phase.slots
            recovered = "-"
            if summary.follows_overload:
                after = summary.recovered_after
                recovered = "never" if after is None else f"{after:.1f} s"
            lines.append(
                f"{outcome.variant:<17} {summary.name:<16} {summary.offered:>7.1f} "
                f"{summary.goodput:>7.1f} {summary.goodput / cap:>5.2f} {_ms(summary.p50):>6} "
                f"{_ms(summary.p99):>6} {summary.rejected:>8} {summary.timeouts:>8} "
                f"{_pct(summary.critical):>8} {_pct(summary.critical_reacted):>7} {recovered:>9}"
            )
        lines.append(
            f"{'':<17} generator lag p50/p99/max: {_ms(outcome.lag['p50'])}/"
            f"{_ms(outcome.lag['p99'])}/{_ms(outcome.lag['max'])} ms; CPU (share of a core) "
            f"generator {outcome.cpu['generator']:.0%}, server {outcome.cpu['server']:.0%}"
            + (
                f"; run again after {len(outcome.discarded)} invalid run(s) (p99 lag "
                + ", ".join(f"{p99 * 1000:.0f}" for p99 in outcome.discarded)
                + " ms)"
                if outcome.discarded
                else ""
            )
        )
    return "\n".join(lines)


def markdown(outcomes: list[Outcome], capacity: float, plan_phases: list[Phase]) -> str:
    """The result table as Markdown, for docs/overload.md."""
    lines = [
        "| Variant | Phase | Offered/s | Goodput/s | x capacity | p50 ms | p99 ms | Rejected "
        "| Timeouts | /checkout | Reacted | Recovered |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for outcome in outcomes:
        for summary, phase in zip(outcome.phases, plan_phases, strict=True):
            recovered = "-"
            if summary.follows_overload:
                after = summary.recovered_after
                recovered = "never" if after is None else f"{after:.1f} s"
            lines.append(
                f"| `{outcome.variant}` | {summary.name} | {summary.offered:.0f} | "
                f"{summary.goodput:.1f} | {summary.goodput / (capacity * phase.slots):.2f} | "
                f"{_ms(summary.p50)} | {_ms(summary.p99)} | {summary.rejected} | "
                f"{summary.timeouts} | {_pct(summary.critical)} | "
                f"{_pct(summary.critical_reacted)} | {recovered} |"
            )
    lines.append("")
    lines.append(
        "Generator lag p99 (max): "
        + ", ".join(
            f"`{o.variant}` {_ms(o.lag['p99'])} ms ({_ms(o.lag['max'])} ms)" for o in outcomes
        )
        + "."
    )
    again = [o for o in outcomes if o.discarded]
    if again:
        lines.append(
            "Run again because the generator fell behind (p99 lag of the discarded runs): "
            + ", ".join(
                f"`{o.variant}` ({', '.join(_ms(p99) + ' ms' for p99 in o.discarded)})"
                for o in again
            )
            + "."
        )
    return "\n".join(lines)


def check(
    outcomes: list[Outcome], capacity: float, targets: Targets, max_lag: float
) -> tuple[list[str], list[str]]:
    """Return ``(failures, invalid)``: the missed targets, and why the run cannot be trusted."""
    failures: list[str] = []
    invalid: list[str] = []
    by_name = {o.variant: o for o in outcomes}
    for outcome in outcomes:
        if outcome.lag["p99"] > max_lag:
            invalid.append(
                f"{outcome.variant}: the generator fell behind its schedule "
                f"(p99 lag {outcome.lag['p99'] * 1000:.0f} ms > {max_lag * 1000:.0f} ms)"
            )
    over, halved = 1, 2  # phase indexes
    for name in ("static", "adaptive"):
        if name in by_name:
            got = by_name[name].phases[over].goodput / capacity
            if got < targets.overload_goodput:
                failures.append(
                    f"{name}: overload goodput {got:.2f}x capacity < {targets.overload_goodput}"
                )
    if "bare" in by_name:
        got = by_name["bare"].phases[over].goodput / capacity
        if got > targets.bare_collapse:
            failures.append(
                f"bare: overload goodput {got:.2f}x capacity did not collapse "
                f"(> {targets.bare_collapse}): the benchmark does not overload the service"
            )
    for name in ("adaptive", "brownout"):
        if name in by_name:
            got = by_name[name].phases[halved].goodput / (capacity / 2)
            if got < targets.halved_goodput:
                failures.append(
                    f"{name}: goodput with capacity halved {got:.2f}x the new capacity "
                    f"< {targets.halved_goodput}"
                )
    if "brownout" in by_name:
        got_or_none = by_name["brownout"].phases[over].critical_reacted
        if got_or_none is None or got_or_none < targets.critical:
            failures.append(
                f"brownout: critical availability in the overload once the level was raised "
                f"{_pct(got_or_none)} < {targets.critical * 100:g}%"
            )
    return failures, invalid


def plot(
    outcomes: list[Outcome], plan_phases: list[Phase], config: argparse.Namespace, path: str
) -> None:
    from _overload_plot import draw

    draw(outcomes, plan_phases, config, path)


def replot(source: str, path: str | None, table_path: str | None) -> int:
    """Redraw the figure (and the Markdown table) of an earlier run from its ``--json`` file."""
    with open(source) as data:
        figures = json.load(data)
    config = argparse.Namespace(**figures["config"])
    plan_phases = [Phase(**p) for p in figures["phases"]]
    outcomes = [
        Outcome(
            variant=v["variant"],
            phases=[PhaseSummary(**p) for p in v["phases"]],
            lag=v["lag"],
            actions=[tuple(a) for a in v["actions"]],
            cpu=v["cpu"],
            series=v["series"],
            server=v["server"],
            discarded=v.get("discarded", []),
        )
        for v in figures["variants"]
    ]
    if path:
        plot(outcomes, plan_phases, config, path)
    if table_path:
        with open(table_path, "w") as out:
            out.write(markdown(outcomes, figures["capacity"], plan_phases) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a few seconds per phase (for CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 on a missed target")
    parser.add_argument("--seed", type=int, default=1, help="the arrival schedule's seed")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument(
        "--plot", metavar="PATH", help="draw goodput and p99 over time (matplotlib)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        choices=VARIANTS + EXTRA_VARIANTS,
        help="run this variant (repeatable)",
    )
    parser.add_argument("--slots", type=int, default=10, help="the backend's slots")
    parser.add_argument("--service-time", type=float, default=0.1, help="seconds per request")
    parser.add_argument("--slo", type=float, default=0.5, help="latency objective, seconds")
    parser.add_argument("--timeout", type=float, default=1.0, help="client timeout, seconds")
    parser.add_argument("--overload", type=float, default=3.0, help="overload, x capacity")
    parser.add_argument("--critical-share", type=float, default=0.2)
    parser.add_argument(
        "--reaction", type=float, default=1.0, help="seconds until the operator raises brownout"
    )
    parser.add_argument(
        "--durations",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        help="the four phases' seconds, e.g. 10,30,20,20",
    )
    parser.add_argument(
        "--max-lag", type=float, default=0.05, help="the generator's p99 lag that invalidates a run"
    )
    parser.add_argument(
        "--rerun-invalid",
        type=int,
        default=2,
        metavar="N",
        help="run a variant again, up to N times, while the generator falls behind (default 2)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    parser.add_argument(
        "--replot",
        metavar="JSON",
        help="only redraw --plot and --markdown from a --json file of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.replot:
        if not (args.plot or args.markdown):
            parser.error("--replot needs --plot PATH or --markdown PATH")
        return replot(args.replot, args.plot, args.markdown)
    durations = args.durations or (SHORT_DURATIONS if args.short else FULL_DURATIONS)
    if len(durations) != 4:
        parser.error("--durations takes four numbers")
    plan_phases = phases(durations, overload=args.overload)
    capacity = args.slots / args.service_time
    variants = args.variant or list(VARIANTS)
    targets = SHORT_TARGETS if args.short else TARGETS

    outcomes = []
    for variant in variants:
        # A run the generator could not keep to its schedule says nothing about the
        # service, whatever its figures: run it again (same schedule), and say so.
        discarded: list[float] = []
        outcome = run_variant(variant, args, plan_phases)
        while outcome.lag["p99"] > args.max_lag and len(discarded) < args.rerun_invalid:
            discarded.append(outcome.lag["p99"])
            outcome = run_variant(variant, args, plan_phases)
        outcome.discarded = discarded
        outcomes.append(outcome)
    print(
        f"capacity {capacity:g} req/s ({args.slots} slots x {args.service_time * 1000:g} ms), "
        f"SLO {args.slo * 1000:g} ms, client timeout {args.timeout:g} s, seed {args.seed}, "
        f"phases {', '.join(f'{p.name} {p.duration:g} s' for p in plan_phases)}"
    )
    print(table(outcomes, capacity, plan_phases))
    failures, invalid = check(outcomes, capacity, targets, args.max_lag)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "capacity": capacity,
                    "config": {
                        k: v
                        for k, v in vars(args).items()
                        if k not in ("json", "plot", "replot", "markdown")
                    },
                    "phases": [asdict(p) for p in plan_phases],
                    "targets": asdict(targets),
                    "failures": failures,
                    "invalid": invalid,
                    "variants": [
                        {
                            "variant": o.variant,
                            "phases": [s.as_dict() for s in o.phases],
                            "lag": o.lag,
                            "actions": o.actions,
                            "cpu": o.cpu,
                            "discarded": o.discarded,
                            "series": o.series,
                            "server": o.server,
                        }
                        for o in outcomes
                    ],
                },
                out,
                indent=1,
            )
    if args.plot:
        plot(outcomes, plan_phases, args, args.plot)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(outcomes, capacity, plan_phases) + "\n")
    for line in invalid:
        print(f"INVALID: {line}")
    for line in failures:
        print(f"MISSED: {line}")
    if args.check and invalid:
        return 2
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

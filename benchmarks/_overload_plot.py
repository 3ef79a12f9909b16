"""Draw ``overload.py``'s figures over time, per variant.

Goodput, p99, critical availability (by scheduled send time) and the
bulkhead's limit as the service saw it (its own samples, every 100 ms).

Needs matplotlib (imported here only): ``pip install matplotlib``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from _overload_load import Phase, boundaries

COLOURS = {
    "bare": "#d62728",
    "static": "#7f7f7f",
    "adaptive": "#1f77b4",
    "brownout": "#2ca02c",
    "adaptive-defaults": "#9467bd",
}


def draw(outcomes: Sequence[Any], plan_phases: Sequence[Phase], config: Any, path: str) -> None:
    """Write the figure to ``path`` (SVG or PNG, by its suffix)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "reskit"})
    capacity = config.slots / config.service_time
    spans = boundaries(plan_phases)
    total = spans[-1][1]
    figure, (goodput, latency, critical, limit) = plt.subplots(
        4, 1, figsize=(9, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 2]}
    )
    axes = (goodput, latency, critical, limit)
    for axis in axes:
        for index, (phase, (start, end)) in enumerate(zip(plan_phases, spans, strict=True)):
            if phase.overload:
                axis.axvspan(start, end, color="#fbe3d6" if index % 2 else "#f6cdb8", lw=0)
        axis.grid(True, color="#dddddd", lw=0.5)
        axis.set_xlim(0, total)
    for phase, (start, end) in zip(plan_phases, spans, strict=True):
        goodput.text(
            (start + end) / 2,
            1.02,
            phase.name,
            ha="center",
            va="bottom",
            transform=goodput.get_xaxis_transform(),
            fontsize=8,
        )

    cap_x: list[float] = []
    cap_y: list[float] = []
    for phase, (start, end) in zip(plan_phases, spans, strict=True):
        cap_x += [start, end]
        cap_y += [capacity * phase.slots] * 2
    goodput.plot(cap_x, cap_y, color="black", lw=1, ls="--", label="backend capacity")
    latency.axhline(config.slo, color="black", lw=1, ls="--", label=f"SLO {config.slo:g} s")
    critical.axhline(99, color="black", lw=1, ls="--", label="99%")
    slot_x = [row[0] for row in outcomes[0].server] if outcomes else []
    slot_y = [row[1] for row in outcomes[0].server] if outcomes else []
    limit.plot(slot_x, slot_y, color="black", lw=1, ls="--", label="backend slots")

    for outcome in outcomes:
        colour = COLOURS.get(outcome.variant)
        series = outcome.series
        goodput.plot(series["t"], series["goodput"], color=colour, lw=1.3, label=outcome.variant)
        latency.plot(series["t"], series["p99"], color=colour, lw=1.3, label=outcome.variant)
        critical.plot(
            series["t"],
            [None if c is None else 100 * c for c in series["critical"]],
            color=colour,
            lw=1.3,
            label=outcome.variant,
        )
        if outcome.server and outcome.server[0][4] >= 0:
            limit.plot(
                [row[0] for row in outcome.server],
                [row[4] for row in outcome.server],
                color=colour,
                lw=1,
                label=outcome.variant,
            )
        for at, what in outcome.actions:
            if what == "brownout 1":
                for axis in axes:
                    axis.axvline(at, color=colour, lw=0.8, ls=":")

    goodput.set_ylabel("goodput (2xx within SLO), req/s")
    goodput.set_ylim(0, capacity * 1.35)
    goodput.legend(loc="upper right", fontsize=8, ncol=3)
    latency.set_ylabel("p99 of 2xx answers, s")
    latency.set_yscale("log")
    latency.set_ylim(0.05, config.timeout * 1.2)
    critical.set_ylabel("/checkout availability, %")
    critical.set_ylim(-2, 105)
    limit.set_ylabel("bulkhead limit")
    limit.set_ylim(0, 60)
    limit.legend(loc="upper right", fontsize=8, ncol=2)
    limit.set_xlabel(
        "seconds (requests placed by scheduled send time; shaded: overload; "
        "dotted: brownout level raised)"
    )
    figure.suptitle(
        f"Open-loop load on a {capacity:g} req/s service (seed {config.seed})", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, metadata={"Date": None} if path.endswith(".svg") else None)
    plt.close(figure)

"""The overload benchmark's pieces: its schedule, phases, operator moves and analysis.

The benchmark itself (``benchmarks/overload.py``) is run for figures, not here;
one tiny run of one variant checks that the whole thing holds together. No
assertion here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.append(str(BENCHMARKS))

import _overload_load as load  # noqa: E402
import overload  # noqa: E402

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def test_phases_step_from_half_load_to_overload_to_halved_capacity_to_recovery() -> None:
    plan_phases = load.phases((10, 30, 20, 20))
    assert [(p.duration, p.load, p.slots, p.overload) for p in plan_phases] == [
        (10, 0.5, 1.0, False),
        (30, 3.0, 1.0, True),
        (20, 3.0, 0.5, True),
        (20, 0.5, 1.0, False),
    ]
    assert load.boundaries(plan_phases) == [(0, 10), (10, 40), (40, 60), (60, 80)]
    assert load.phases((1, 2, 3, 4), overload=5)[1].load == 5


def test_the_schedule_is_seeded_and_reproducible() -> None:
    plan_phases = load.phases((2, 4, 3, 3))
    first = load.plan(plan_phases, 100, seed=7)
    assert first == load.plan(plan_phases, 100, seed=7)
    assert first != load.plan(plan_phases, 100, seed=8)
    assert [a.at for a in first] == sorted(a.at for a in first)
    assert all(0 <= a.at < 12 for a in first)


def test_changing_a_later_phase_keeps_the_earlier_arrivals() -> None:
    calm = load.plan(load.phases((5, 5, 5, 5), overload=3), 100, seed=1)
    harsh = load.plan(load.phases((5, 5, 5, 5), overload=4), 100, seed=1)
    assert [a for a in calm if a.at < 5] == [a for a in harsh if a.at < 5]


def test_arrivals_follow_each_phases_rate_and_the_critical_share() -> None:
    plan_phases = load.phases((100, 100, 100, 100))
    arrivals = load.plan(plan_phases, 100, seed=3, critical_share=0.2)
    for phase, (start, end) in zip(plan_phases, load.boundaries(plan_phases), strict=True):
        count = sum(start <= a.at < end for a in arrivals)
        expected = phase.load * 100 * phase.duration
        # Poisson: the standard deviation is sqrt(expected); 5 of them is a wide berth.
        assert abs(count - expected) < 5 * expected**0.5
    routes = Counter(a.route for a in arrivals)
    assert set(routes) == {load.CRITICAL, load.LOW_PRIORITY}
    assert abs(routes[load.CRITICAL] / len(arrivals) - 0.2) < 0.01


def test_the_operator_halves_the_backend_and_raises_brownout_after_the_reaction_delay() -> None:
    plan_phases = load.phases((10, 30, 20, 20))
    moves = load.actions(plan_phases, 10, brownout_after=1.0)
    assert [(m.at, m.path) for m in moves] == [
        (11.0, "/_control/brownout?level=1"),
        (40.0, "/_control/slots?n=5"),
        (60.0, "/_control/slots?n=10"),
        (60.0, "/_control/brownout?level=0"),
    ]
    assert [m.path for m in load.actions(plan_phases, 10, brownout_after=None)] == [
        "/_control/slots?n=5",
        "/_control/slots?n=10",
    ]


def result(at: float, status: int, latency: float, route: str = load.LOW_PRIORITY) -> load.Result:
    return load.Result(at=at, route=route, status=status, latency=latency, lag=0.001)


def test_summaries_count_goodput_rejections_timeouts_and_critical_availability() -> None:
    plan_phases = [
        load.Phase("calm", 2, 0.5),
        load.Phase("over", 2, 3, overload=True),
        load.Phase("after", 2, 0.5),
    ]
    results = [
        result(0.1, 200, 0.1),
        result(0.2, 200, 0.7),  # answered, but outside the 0.5 s SLO
        result(1.0, 200, 0.2, load.CRITICAL),
        result(2.1, 503, 0.01),
        result(2.2, 429, 0.01, load.CRITICAL),
        result(2.3, load.TIMED_OUT, 1.0),
        result(2.4, load.FAILED, 0.01),
        result(2.5, 500, 0.05),
        result(3.5, 200, 0.3, load.CRITICAL),
        result(3.6, 200, 0.4, load.CRITICAL),
        result(4.1, 200, 0.1),
    ]
    run = load.Run(results, [(3.0, "brownout 1")], started=0.0)
    calm, over, after = load.summarize(run, plan_phases, slo=0.5, window=0.5, healthy_for=1.0)
    assert (calm.goodput, calm.rejected, calm.timeouts, calm.critical) == (1.0, 0, 0, 1.0)
    assert (calm.p50, calm.p99) == (0.2, 0.7)
    assert (over.rejected, over.timeouts, over.failed) == (2, 1, 2)
    assert over.goodput == 1.0
    assert over.critical == pytest.approx(2 / 3)
    assert over.critical_reacted == 1.0  # only the two sent after the reaction
    assert calm.critical_reacted is None  # not an overloaded phase
    assert (calm.follows_overload, after.follows_overload) == (False, True)
    assert after.recovered_after == 0.0


def test_recovery_is_the_start_of_a_lasting_healthy_stretch() -> None:
    unhealthy = [result(0.1, load.TIMED_OUT, 1.0), result(0.6, 200, 0.9)]
    healthy = [result(t / 10, 200, 0.1) for t in range(10, 40)]
    relapse = [result(1.2, 503, 0.01)] * 20  # a window where most were rejected
    assert load.recovery_time(unhealthy + healthy, 0, 4, 0.5, 0.5, 1.0) == 1.0
    assert load.recovery_time(unhealthy + healthy + relapse, 0, 4, 0.5, 0.5, 1.0) == 1.5
    never = [result(t / 2 + 0.1, load.TIMED_OUT, 1.0) for t in range(8)]
    assert load.recovery_time(never, 0, 4, 0.5, 0.5, 1.0) is None
    # A window nobody sent a request in has nothing wrong with it.
    assert load.recovery_time(unhealthy, 0, 4, 0.5, 0.5, 1.0) == 1.0


def test_percentiles_use_the_nearest_rank() -> None:
    values = [i / 100 for i in range(1, 101)]
    assert load.percentile(values, 50) == 0.5
    assert load.percentile(values, 99) == 0.99
    assert load.percentile([], 99) is None


def test_a_short_run_of_one_variant_on_a_tiny_load_completes(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    code = overload.main(
        [
            "--short",
            "--variant",
            "static",
            "--durations",
            "0.5,1,0.5,0.5",
            "--slots",
            "2",
            "--service-time",
            "0.05",
            "--seed",
            "5",
            "--rerun-invalid",
            "0",
            "--json",
            str(out),
        ]
    )
    assert code == 0  # no --check: a missed target is reported, not an error
    figures = json.loads(out.read_text())
    assert figures["capacity"] == 40
    (variant,) = figures["variants"]
    assert variant["variant"] == "static"
    assert [p["name"] for p in variant["phases"]] == [p.name for p in load.phases((1, 1, 1, 1))]
    sent = sum(round(p["offered"] * p["duration"]) for p in variant["phases"])
    expected = load.plan(load.phases((0.5, 1, 0.5, 0.5)), 40, seed=5)
    assert sent == len(expected)  # every scheduled request was sent and recorded
    assert [what for _, what in variant["actions"]] == ["backend slots 1", "backend slots 2"]
    assert variant["server"], "the service reported its own samples"

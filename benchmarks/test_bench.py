"""The gate's scenarios for pytest-benchmark users (optional; CI runs ``gate.py``).

Not part of the test suite (``testpaths`` is ``tests``) and skipped without
pytest-benchmark, which the ``dev`` extra does not install::

    pip install pytest-benchmark
    python -m pytest benchmarks/test_bench.py --benchmark-group-by=param:scenario

pytest-benchmark times one variant after the other, so its numbers drift more
than the gate's interleaved ratios on a busy machine. Async rows time a batch of
``ASYNC_BATCH`` awaits inside one running event loop, so divide by it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("pytest_benchmark")

from _harness import Variant
from scenarios import SCENARIOS, Scenario, Unavailable

ASYNC_BATCH = 1000


def _sync_call(variant: Variant) -> Callable[[], Any]:
    fn, catch = variant.fn, variant.catch
    if catch is None:
        return fn

    def call() -> None:
        try:
            fn()
        except catch:
            pass

    return call


async def _batch(fn: Callable[[], Any]) -> None:
    for _ in range(ASYNC_BATCH):
        await fn()


@pytest.mark.parametrize("side", ["reskit", "competitor"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.key)
def test_scenario(benchmark: Any, scenario: Scenario, side: str) -> None:
    try:
        setup = scenario.build()
    except Unavailable as exc:
        pytest.skip(f"not available: {exc}")
    variant = setup.reskit if side == "reskit" else setup.competitor
    benchmark.extra_info["budget"] = scenario.budget
    with setup.context():
        if variant.setup is not None:
            variant.setup()
        if scenario.kind == "sync":
            benchmark(_sync_call(variant))
            return
        with asyncio.Runner() as runner:
            benchmark.extra_info["calls_per_round"] = ASYNC_BATCH
            benchmark(lambda: runner.run(_batch(variant.fn)))

"""``reskit demo``: the command; the demo itself is in ``_demo.py``.

Apart from the other commands because ``_demo.py`` imports asyncio, structlog
and reskit's policies: ``reskit.cli`` imports this module only when the demo
is run or listed.
"""

from __future__ import annotations

import click

from ._common import WholeNumber
from ._demo import DEFAULT_CALLS, DEFAULT_CONCURRENCY, DEFAULT_SEED, run_demo

__all__ = ["demo_command"]


@click.command("demo")
@click.option(
    "--calls",
    type=WholeNumber(minimum=1),
    default=DEFAULT_CALLS,
    metavar="N",
    help=f"Calls in total, shared between the dependencies (default {DEFAULT_CALLS}).",
)
@click.option(
    "--seed",
    type=WholeNumber(),
    default=DEFAULT_SEED,
    metavar="S",
    help=f"Seed of every random draw (default {DEFAULT_SEED}).",
)
@click.option(
    "--concurrency",
    type=WholeNumber(minimum=1),
    default=DEFAULT_CONCURRENCY,
    metavar="C",
    help=f"Concurrent callers per dependency (default {DEFAULT_CONCURRENCY}).",
)
@click.option("--quiet", is_flag=True, help="Print only the final table.")
@click.option(
    "--http",
    is_flag=True,
    help="Add the outbound HTTP scene: reskit's httpx transport (needs httpx or httpx2).",
)
def demo_command(calls: int, seed: int, concurrency: int, quiet: bool, http: bool) -> int:
    """Run reskit's policies against flaky dependencies.

    Call simulated flaky dependencies a few thousand times through reskit
    policies (timeout, deadline, retry with a budget, fallback, and the circuit
    breaker and bulkhead), show live progress, then a table of outcomes, retries
    and latency percentiles per policy. Everything runs in this process, in
    memory.
    """
    return run_demo(calls=calls, seed=seed, concurrency=concurrency, quiet=quiet, http=http)

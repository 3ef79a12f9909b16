"""How long ``import reskit`` takes, against ``import stamina``, in fresh interpreters.

Run from the repository root::

    python benchmarks/import_time.py          # report, exit 0
    python benchmarks/gate.py --only import   # the same, judged against its budget

Each statement runs in a new ``python -c`` process, ``RUNS`` times, and the best
wall time is kept (noise only ever adds time). Bytecode caches are written
first (one untimed run with ``PYTHONDONTWRITEBYTECODE`` unset), so every
module is measured as an installed package is imported, not compiled from
source. The interpreter's own start-up (``python -c pass``) is reported too:
it is part of every number.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

RUNS = 7

#: The statements timed, with the label shown for each.
STATEMENTS = {
    "python -c pass": "pass",
    "import stamina": "import stamina",
    "import tenacity": "import tenacity",
    "import reskit": "import reskit",
    "from reskit import Policy, Retry, CircuitBreaker": (
        "from reskit import Policy, Retry, CircuitBreaker"
    ),
}
#: ``import reskit`` may take at most this times ``import stamina`` (before the margin).
BUDGET = 1.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def best_of(statement: str, runs: int = RUNS) -> float:
    """The fastest of ``runs`` fresh interpreters running ``statement``, in milliseconds."""
    env = _env()
    subprocess.run([sys.executable, "-c", statement], env=env, check=True)  # warm the caches
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], env=env, check=True)
        best = min(best, time.perf_counter() - started)
    return best * 1000.0


def measure(runs: int = RUNS) -> dict[str, float]:
    return {label: best_of(statement, runs) for label, statement in STATEMENTS.items()}


def record(margin: float, runs: int = RUNS) -> dict[str, Any]:
    """The gate's record: ``import reskit`` / ``import stamina`` against :data:`BUDGET`."""
    times = measure(runs)
    ratio = times["import reskit"] / times["import stamina"]
    limit = BUDGET * margin
    verdict = "ok" if ratio <= BUDGET else "ok (over budget, within margin)"
    if ratio > limit:
        verdict = "FAIL"
    return {
        "key": "import",
        "title": "import reskit vs import stamina, best of fresh interpreters",
        "issue": 7,
        "budget": BUDGET,
        "limit": round(limit, 4),
        "ratio": round(ratio, 4),
        "verdict": verdict,
        "milliseconds": {label: round(ms, 2) for label, ms in times.items()},
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{'statement':<52} {'best ms':>8}", "-" * 61]
    for label, ms in result["milliseconds"].items():
        lines.append(f"{label:<52} {ms:>8.1f}")
    lines.append(
        f"ratio import reskit / import stamina = {result['ratio']:.3f} "
        f"(budget {result['budget']}, limit {result['limit']:.3f}): {result['verdict']}"
    )
    return "\n".join(lines)


def main() -> int:
    print(table(record(margin=1.5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

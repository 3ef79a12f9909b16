"""Developer sessions for reskit.

``nox`` runs the default sessions (tests, lint, typecheck); ``nox -s bench`` and
``nox -s docs`` run the benchmark gate and the strict docs build. ``.ci/run`` runs the
same checks in one fresh virtualenv, which is what CI uses.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent

# Paths ruff checks. Git keeps no empty folders, so a folder with no files yet is skipped
# rather than reported as missing.
LINT_PATHS = ("src", "tests", "benchmarks", "examples", "noxfile.py")


def _lint_paths() -> list[str]:
    return [path for path in LINT_PATHS if (ROOT / path).exists()]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite; extra arguments go to pytest (``nox -s tests -- -k breaker``).

    Redis tests start their own ``redis-server`` and skip without one, unless
    ``RESKIT_REQUIRE_REDIS=1`` is set, which makes a missing binary an error.
    """
    session.install(".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check lint rules and formatting with ruff (configured in pyproject.toml)."""
    session.install("ruff>=0.5")
    paths = _lint_paths()
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check with mypy in strict mode (files and options in pyproject.toml)."""
    session.install(".[dev]")
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmark gate; it fails when a ratio to a baseline exceeds its budget.

    Extra arguments replace the default ``--short`` profile (``nox -s bench -- --help``).
    """
    session.install(".[dev]")
    session.run("python", "benchmarks/gate.py", *(session.posargs or ["--short"]))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with mkdocs in strict mode (any warning fails)."""
    session.install(".[docs]")
    # Material for MkDocs prints a notice about MkDocs 2.0 on every build; it is not about us.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})

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


# Mutation testing: each strategy module with the test files that are its own. mutmut
# runs a mutant only against the tests (of these) that call the mutated function.
MUTATION_TARGETS: dict[str, tuple[str, ...]] = {
    "_retry": (
        "test_retry.py",
        "test_retry_boundaries.py",
        "test_tenacity_differential.py",
        "test_outcomes.py",
        "test_mutation_fork.py",
    ),
    "_breaker": (
        "test_breaker.py",
        "test_breaker_concurrency.py",
        "test_breaker_policy.py",
        "test_breaker_statemachine.py",
        "test_breaker_model.py",
        "test_mutation_fork.py",
        "test_outcomes.py",  # on_result
        "test_switches.py",  # an operator's forced state
        # A shared breaker following the fleet (Redis).
        "test_store_redis.py::test_a_shared_breaker_recovers_when_redis_loses_its_state",
        "test_store_redis.py::test_a_shared_breaker_that_opened_here_is_not_closed_by_older_replies",
        "test_store_redis.py::test_a_shared_breaker_works_on_its_own_while_redis_is_down",
    ),
    "_bulkhead": (
        "test_bulkhead.py",
        "test_bulkhead_policy.py",
        "test_bulkhead_statemachine.py",
        "test_bulkhead_boundaries.py",
        "test_mutation_fork.py",
    ),
    "_throttle": ("test_throttle.py", "test_throttle_boundaries.py", "test_mutation_fork.py"),
    "_adaptive": ("test_adaptive.py", "test_adaptive_model.py"),
    # _gate.py is a Protocol: nothing in it runs, so mutmut has nothing to mutate.
    "_order": ("test_engine.py",),
}
# The score below which the session fails: killed (and timed-out) mutants over all mutants.
MUTATION_MIN_SCORE = 95.0


def _toml_value(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # A JSON string is a valid TOML basic string.
    return json.dumps(value)


def _pragmas_by_function(source: str) -> dict[str, list[str]]:
    """The ``# pragma: no mutate`` lines of each function, keyed as mutmut names them."""
    import ast

    lines = source.splitlines()
    found: dict[str, list[str]] = {}

    def visit(body: list[ast.stmt], cls: str | None) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"x\u01c1{cls}\u01c1{node.name}" if cls else f"x_{node.name}"
                span = lines[node.lineno - 1 : node.end_lineno]
                found[key] = [line.strip() for line in span if "pragma: no mutate" in line]
            elif isinstance(node, ast.ClassDef):
                visit(node.body, node.name)

    visit(ast.parse(source).body, None)
    return found


def _mutation_tree(module: str, work: Path) -> None:
    """Copy the sources, the tests and pyproject.toml into ``work``, narrowed to ``module``.

    mutmut's results (``work/mutants``) are kept, so a second run only tests what changed
    (and the session then retests the survivors). mutmut spots a changed function by its
    syntax tree, which has no comments: a new ``# pragma: no mutate`` renumbers the
    function's mutants but would keep their old verdicts, so the verdicts of a function
    whose pragmas changed are cleared here.
    """
    import json
    import shutil
    import tomllib

    source = (ROOT / "src" / "reskit" / f"{module}.py").read_text(encoding="utf-8")
    pragmas = _pragmas_by_function(source)
    stamp = work / "pragmas.json"
    old = json.loads(stamp.read_text(encoding="utf-8")) if stamp.exists() else {}
    changed = {n for n in pragmas.keys() | old.keys() if pragmas.get(n, []) != old.get(n, [])}
    meta = work / "mutants" / "src" / "reskit" / f"{module}.py.meta"
    if (changed or not stamp.exists()) and meta.exists():
        results = json.loads(meta.read_text(encoding="utf-8"))
        codes = results["exit_code_by_key"]
        for key in codes:
            function = key.removeprefix(f"reskit.{module}.").partition("__mutmut_")[0]
            if function in changed or not stamp.exists():
                codes[key] = None
        meta.write_text(json.dumps(results), encoding="utf-8")
    stamp.write_text(json.dumps(pragmas), encoding="utf-8")
    for folder in ("src", "tests"):
        shutil.rmtree(work / folder, ignore_errors=True)
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    settings = tomllib.loads(text)["tool"]["mutmut"]
    settings["only_mutate"] = [f"src/reskit/{module}.py"]
    settings["pytest_add_cli_args_test_selection"] = [
        f"tests/{name}" for name in MUTATION_TARGETS[module]
    ]
    head, _, _ = text.partition("\n[tool.mutmut]\n")
    table = "".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items())
    (work / "pyproject.toml").write_text(f"{head}\n[tool.mutmut]\n{table}", encoding="utf-8")


def _mutation_results(work: Path, module: str) -> dict[str, int | None]:
    """mutmut's exit code for each mutant of ``module`` (``None``: not run yet)."""
    import json

    meta = work / "mutants" / "src" / "reskit" / f"{module}.py.meta"
    # A module with nothing to mutate (a Protocol's "...") may get no results file.
    results = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
    codes: dict[str, int | None] = results.get("exit_code_by_key", {})
    return codes


def _mutation_score(work: Path, module: str) -> tuple[int, int, int, int, int, float]:
    """(mutants, killed, timed out, survived, no tests, score) for ``module``."""
    codes = list(_mutation_results(work, module).values())
    # mutmut's exit codes: 1 and 3 killed, 37 caught by the type checker; 36, 24, -24,
    # 152 and 255 timed out (a hang: it counts as killed); 0 survived; 5 and 33 no tests.
    killed = sum(code in (1, 3, 37) for code in codes)
    timeouts = sum(code in (24, -24, 36, 152, 255) for code in codes)
    survived = codes.count(0)
    untested = sum(code in (5, 33) for code in codes)
    score = 100.0 * (killed + timeouts) / len(codes) if codes else 100.0
    return len(codes), killed, timeouts, survived, untested, score


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation-test the strategy modules with mutmut and print each module's score.

    Names pick modules (``nox -s mutation -- _breaker _retry``); options go to
    ``mutmut run`` (``-- --max-children 1`` on a shared machine). Each module runs in
    its own copy of the tree under ``.nox/mutation/tmp``, with only its own tests.
    Afterwards, ``cd .nox/mutation/tmp/_breaker && mutmut results`` lists the
    survivors and ``mutmut show NAME`` shows one. Not part of CI: it takes tens of
    minutes on two cores.
    """
    session.install(".[dev]", "mutmut>=3.8,<4")
    modules = [arg for arg in session.posargs if arg in MUTATION_TARGETS]
    options = [arg for arg in session.posargs if arg not in MUTATION_TARGETS]
    unknown = [arg for arg in options if not arg.startswith("-") and not arg.isdigit()]
    if unknown:
        session.error(f"unknown module(s) {unknown}; choose from {sorted(MUTATION_TARGETS)}")
    base = Path(session.create_tmp()).resolve()  # the session changes directory below
    rows = []
    for module in modules or list(MUTATION_TARGETS):
        work = base / module
        work.mkdir(parents=True, exist_ok=True)
        _mutation_tree(module, work)
        # mutmut keeps a survivor's verdict until asked again, so the survivors of the last
        # run (those whose code did not change) are retested against today's tests.
        before = {n for n, code in _mutation_results(work, module).items() if code in (0, 5, 33)}
        with session.chdir(work):
            session.run("mutmut", "run", *options)
            again = [
                name
                for name, code in _mutation_results(work, module).items()
                if name in before and code in (0, 5, 33)
            ]
            if again:
                session.run("mutmut", "run", *options, *again)
        rows.append((module, *_mutation_score(work, module)))
    session.log("module      mutants  killed  timeout  survived  no tests  score")
    for module, total, killed, timeouts, survived, untested, score in rows:
        session.log(
            f"{module:<11} {total:>7} {killed:>7} {timeouts:>8} {survived:>9} {untested:>9}"
            f" {score:>5.1f}%"
        )
    low = [row[0] for row in rows if row[-1] < MUTATION_MIN_SCORE]
    if low:
        session.error(f"mutation score under {MUTATION_MIN_SCORE}% for {', '.join(low)}")

"""The ``reskit`` command and ``reskit demo``."""

from __future__ import annotations

import importlib.metadata
import io
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from reskit.cli import _demo, main

OUTCOMES = ("success", "fallback", "rejected", "failure")
SCENES = ["payments", "inventory", "ledger", "recommendations", "search"]
COLUMNS = (
    "calls",
    "success",
    "fallback",
    "rejected",
    "failure",
    "retries",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
)


def run_main(argv: list[str], timeout: float = 30.0) -> int:
    """Run ``main(argv)`` in a thread, so a hang fails the test instead of the suite."""
    result: list[int] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(main(argv))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"reskit {' '.join(argv)} did not finish within {timeout} s")
    if errors:
        raise errors[0]
    return result[0]


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """The final tables as ``{policy: {column: value}}``, ``total`` included.

    The outcomes table (``policy driver calls ... retries``) and the latency table
    (``latency p50 ms ... max ms``, whose ``all`` row is the total's) are merged.
    """
    lines = text.splitlines()
    rows: dict[str, dict[str, float]] = {}

    def read(title: str, columns: tuple[str, ...], last: str) -> None:
        start = next(i for i, line in enumerate(lines) if line.startswith(title + " "))
        for line in lines[start + 2 :]:
            if set(line) == {"-"}:
                continue
            cells = line.split()
            values = [float(cell) for cell in cells[-len(columns) :]]
            name = "total" if cells[0] == last else cells[0]
            rows.setdefault(name, {}).update(zip(columns, values, strict=True))
            if cells[0] == last:
                return

    header = next(line for line in lines if line.startswith("policy "))
    assert header.split()[:2] == ["policy", "driver"]
    read("policy", COLUMNS[:6], "total")
    read("latency", COLUMNS[6:], "all")
    return rows


def assert_counts_add_up(rows: dict[str, dict[str, float]], calls: int) -> None:
    scenes = {name: row for name, row in rows.items() if name != "total"}
    for name, row in rows.items():
        assert sum(row[outcome] for outcome in OUTCOMES) == row["calls"], name
        assert row["p50 ms"] <= row["p95 ms"] <= row["p99 ms"] <= row["max ms"], name
    assert rows["total"]["calls"] == calls
    for column in (*OUTCOMES, "calls", "retries"):
        assert sum(row[column] for row in scenes.values()) == rows["total"][column], column


# -- reskit demo ------------------------------------------------------------------


def test_demo_counts_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["demo", "--calls", "200", "--seed", "5", "--concurrency", "8", "--quiet"]) == 0

    out = capsys.readouterr().out
    rows = parse_table(out)
    assert list(rows) == [*SCENES, "total"]
    assert_counts_add_up(rows, 200)
    # --quiet prints the table and nothing else: no progress, no log events.
    assert out.startswith("policy ")
    assert "reskit.retry.scheduled" not in out


def test_demo_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["demo", "--calls", "150", "--seed", "2"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("reskit demo: 150 calls to 5 simulated dependencies")
    rows = parse_table(out)
    assert_counts_add_up(rows, 150)
    assert "why calls did not simply succeed:" in out
    assert "reskit's log events" in out
    # Not a terminal: plain lines only, no cursor movement.
    assert "\x1b" not in out
    # Retries are counted and sampled (three samples at most), never printed one by one.
    retry_lines = [line for line in out.splitlines() if "reskit.retry.scheduled" in line]
    assert 2 <= len(retry_lines) <= 4
    assert f"{int(rows['total']['retries'])}  reskit.retry.scheduled" in out


def test_demo_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert _demo.run_demo(calls=120, seed=3, out=out) == 0

    text = out.getvalue()
    assert "\x1b[?25l" in text  # cursor hidden while drawing...
    assert text.rstrip().endswith("vary a little)")
    assert "\x1b[?25h" in text  # ...and given back
    assert "\x1b[2K" in text
    assert_counts_add_up(parse_table(text), 120)


@pytest.fixture
def keep_structlog() -> Iterator[None]:
    """Put back whatever structlog configuration the test found."""
    configured = structlog.is_configured()
    config = structlog.get_config()
    yield
    if configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


@pytest.mark.usefixtures("keep_structlog")
def test_demo_restores_structlog_configuration() -> None:
    structlog.configure(processors=[structlog.processors.KeyValueRenderer()])
    before = structlog.get_config()
    assert _demo.run_demo(calls=60, quiet=True, out=io.StringIO()) == 0
    assert structlog.get_config() == before


@pytest.mark.usefixtures("keep_structlog")
def test_demo_leaves_structlog_unconfigured_when_it_was() -> None:
    structlog.reset_defaults()
    assert _demo.run_demo(calls=30, quiet=True, out=io.StringIO()) == 0
    assert not structlog.is_configured()


def test_dependency_draws_depend_only_on_seed_call_and_attempt() -> None:
    profile = _demo.Profile(median=0.02, ceiling=0.05, error_rate=0.2, spike_rate=0.1)
    one = _demo.Dependency("payments", profile, seed=1, calls=100)
    again = _demo.Dependency("payments", profile, seed=1, calls=100)
    other = _demo.Dependency("payments", profile, seed=2, calls=100)

    keys = [(call, attempt) for call in range(100) for attempt in (1, 2, 3)]
    draws = [one.draw(*key) for key in keys]
    # Asked in another order, as concurrent calls would: the same answers.
    shuffled = {key: again.draw(*key) for key in reversed(keys)}
    assert draws == [shuffled[key] for key in keys]
    assert draws != [other.draw(*key) for key in keys]
    kinds = {kind for kind, _ in draws}
    assert kinds == {"ok", "error", "spike"}
    for kind, seconds in draws:
        if kind == "spike":
            assert profile.spike[0] <= seconds <= profile.spike[1]
        else:
            assert 0 < seconds <= profile.ceiling


def test_outage_fails_every_attempt() -> None:
    profile = _demo.Profile(
        median=0.02, ceiling=0.05, error_rate=0.0, spike_rate=0.0, outage=(0.5, 1.0)
    )
    dependency = _demo.Dependency("recommendations", profile, seed=1, calls=10)
    assert [dependency.draw(call, 1)[0] for call in range(10)] == ["ok"] * 5 + ["error"] * 5


def test_calls_are_shared_between_scenes() -> None:
    scenes = _demo.build_scenes(calls=12, seed=1, concurrency=4)
    assert [scene.calls for scene in scenes] == [3, 3, 2, 2, 2]
    # A scene that would get no call is left out.
    assert [scene.name for scene in _demo.build_scenes(2, 1, 4)] == ["payments", "inventory"]


# -- the command ------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"reskit {importlib.metadata.version('reskit')}\n"


def test_help_lists_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
        (["demo", "--calls", "0"], "argument --calls: expected a number of at least 1, got '0'"),
        (["demo", "--calls", "many"], "expected a whole number, got 'many'"),
        (["demo", "--concurrency", "-1"], "--concurrency"),
        (["demo", "--loud"], "unrecognized arguments: --loud"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("reskit")
    assert captured.err.count("\n") == 1
    assert message in captured.err


def test_console_script_points_at_main() -> None:
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="reskit")
    assert entry.load() is main


def test_demo_as_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reskit.cli", "demo", "--calls", "100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert_counts_add_up(parse_table(proc.stdout), 100)


def test_demo_needs_only_the_base_dependencies() -> None:
    code = (
        "import sys\n"
        "from reskit.cli import main\n"
        "assert main(['demo', '--calls', '40', '--quiet']) == 0\n"
        "extras = ('opentelemetry.sdk', 'httpx', 'redis', 'starlette', 'uvicorn')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in extras "
        "or m.startswith('opentelemetry.sdk'))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_the_demo_fits_an_80_column_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    # Progress lines too, as a long run to a pipe prints them.
    monkeypatch.setattr(_demo.Display, "PLAIN_INTERVAL", 0.01)
    plain = io.StringIO()
    assert _demo.run_demo(calls=150, seed=4, out=plain) == 0

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    assert _demo.run_demo(calls=150, seed=4, out=terminal) == 0
    escapes = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    assert re.search(r"\d+/150: ", plain.getvalue()), "no progress line was printed"
    for text in (plain.getvalue(), escapes.sub("", terminal.getvalue())):
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert wide == []

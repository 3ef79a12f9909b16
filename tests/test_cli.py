"""The ``reskit`` command and ``reskit demo``."""

from __future__ import annotations

import gc
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

import reskit
from reskit._audit import AuditHead, entries_from_json_lines, verify
from reskit.cli import _demo, main
from reskit.cli._common import format_duration, format_time, parse_duration
from reskit.stores import MemoryStore
from reskit.testing import FakeClock

OUTCOMES = ("success", "fallback", "rejected", "failure")
SCENES = ["payments", "inventory", "ledger", "recommendations", "search", "reviews", "checkout"]
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
    assert out.startswith("reskit demo: 150 calls to 7 simulated dependencies")
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
    scenes = _demo.build_scenes(calls=16, seed=1, concurrency=4)
    assert [scene.calls for scene in scenes] == [3, 3, 2, 2, 2, 2, 2]
    # A scene that would get no call is left out.
    assert [scene.name for scene in _demo.build_scenes(2, 1, 4)] == ["payments", "inventory"]


# -- the command ------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"reskit {importlib.metadata.version('reskit')}\n"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("audit", "breakers", "brownout", "demo", "kill", "revive", "switches"):
        assert f"  {command} " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "reskit: error: No such command 'frobnicate'"),
        ([], "Missing command"),
        (["demo", "--calls", "0"], "'--calls': expected a number of at least 1, got '0'"),
        (["demo", "--calls", "many"], "expected a whole number, got 'many'"),
        (["demo", "--concurrency", "-1"], "--concurrency"),
        (["demo", "--loud"], "--loud"),
        (["kill", "cli-x", "--actor", "a"], "reskit kill: error: Missing option '--reason'"),
        (["kill", "cli-x", "--reason", "r"], "Missing option '--actor'"),
        (["kill", "--reason", "r", "--actor", "a"], "Missing argument 'NAME'"),
        (["kill", "cli-x", "--reason", " ", "--actor", "a"], "'--reason': must not be empty"),
        (["kill", "cli-x", "--reason", "r", "--actor", "a", "--ttl", "soon"], "duration"),
        (["kill", "cli-x", "--reason", "r", "--actor", "a", "--ttl", "0s"], "longer than zero"),
        (["revive", "cli-x", "--reason", "r", "--actor", ""], "'--actor': must not be empty"),
        (["switches", "--stale", "30m1h"], "largest first"),
        (["brownout", "40"], "needs --reason and --actor"),
        (["brownout", "40", "--reason", "r"], "needs --reason and --actor"),
        (["brownout", "--reason", "r", "--actor", "a"], "go with a new LEVEL"),
        (["brownout", "101", "--reason", "r", "--actor", "a"], "from 0 to 100, or 'clear'"),
        (["brownout", "high", "--reason", "r", "--actor", "a"], "got 'high'"),
        (["brownout", "clear", "--reason", "r", "--actor", "a"], "give --tenant"),
        (["breakers", "force-open", "db", "--actor", "a"], "Missing option '--reason'"),
        (["breakers", "melt", "db"], "No such command 'melt'"),
        (["audit"], "reskit audit: error: Missing command"),
        (["audit", "tail", "-n", "0"], "expected a number of at least 1, got '0'"),
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


# -- the operator commands --------------------------------------------------------
#
# The conftest gives each test a fresh MemoryStore, configured in this process,
# and unsets RESKIT_STORE: main() without --store acts on that store, so a test
# runs kill, then switches, and sees the kill. Switch declarations outlive a
# store (the process re-declares them in each new one), so names here start
# with "cli-" and tests look only at their own rows.

# 2026-09-21T14:13:20Z, where the FakeClock's wall clock starts.
START = "2026-09-21T14:13:20Z"


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Output as a ``reskit`` process writes it to a pipe.

    Whatever the environment asks of rich; and with structlog unconfigured, as
    in a ``reskit`` process, where reskit's log events go to the silent
    ``reskit`` logger. A test elsewhere that leaves structlog printing to
    stdout would otherwise mix its events into the output compared here.
    """
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    configured = structlog.is_configured()
    config = structlog.get_config()
    structlog.reset_defaults()
    yield
    if configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


def table(text: str) -> list[dict[str, str]]:
    """The rows of a table printed to a pipe, as ``{column: cell}``."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    assert set(lines[1]) == {"─"}, lines[1]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in rows}


UNDECLARED = "reskit: warning: no process has declared switch"


def run(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 0) -> str:
    """``main(argv)``, checked for ``status`` and a quiet stderr; its stdout.

    Most tests kill switches no code declared; the warning that says so has a
    test of its own and is left out here.
    """
    assert main(argv) == status, capsys.readouterr()
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if not line.startswith(UNDECLARED)] == []
    return captured.out


WHO = ["--reason", "INC-7 double charges", "--actor", "alice"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("90d", 90 * 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        ("1.5h", 5400),
        ("45", 45),
        ("0.5", 0.5),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a duration such as 90s, 30m, 2h, 90d or 1h30m"),
        ("soon", "got 'soon'"),
        ("30m1h", "largest first"),
        ("1h1h", "expected a duration"),
        ("1w", "expected a duration"),
        ("1 h", "expected a duration"),
        ("-5", "expected a duration"),
        ("inf", "expected a duration"),
        ("0", "longer than zero, got '0'"),
        ("0m", "longer than zero"),
    ],
)
def test_parse_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(45, "45s"), (1800, "30m"), (5400, "1h30m"), (90 * 86400, "90d")]
)
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_format_time_is_utc_iso_8601() -> None:
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(1_790_000_000.9) == START
    assert format_time(None) == "-"


def test_kill_with_ttl_and_the_switches_table(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    reskit.kill_switch("cli-payments", owner="team-pay", description="card payments")

    out = run(["kill", "cli-payments", *WHO, "--ttl", "30m"], capsys)
    assert out == (
        "killed switch 'cli-payments' for 30m, until 2026-09-21T14:43:20Z (audit entry 0)\n"
    )
    assert reskit.is_killed("cli-payments")

    row = by_name(table(run(["switches"], capsys)))["cli-payments"]
    assert row == {
        "name": "cli-payments",
        "state": "killed",
        "owner": "team-pay",
        "fail mode": "open",
        "last flipped": START,
        "last exercised": START,
        "until": "2026-09-21T14:43:20Z",
        "reason": "INC-7 double charges",
    }

    clock.advance(1801)  # the ttl runs out: the switch revives by itself
    row = by_name(table(run(["switches"], capsys)))["cli-payments"]
    assert (row["state"], row["until"], row["last exercised"]) == ("on", "-", START)


def test_kill_and_revive(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["kill", "cli-search", *WHO], capsys) == (
        "killed switch 'cli-search' (audit entry 0)\n"
    )
    clock.advance(60)
    out = run(["revive", "cli-search", "--reason", "fixed", "--actor", "bob"], capsys)
    assert out == "revived switch 'cli-search' (audit entry 1)\n"
    assert not reskit.is_killed("cli-search")

    row = by_name(table(run(["switches"], capsys)))["cli-search"]
    assert row["state"] == "on"
    assert row["owner"] == "-"
    assert row["last flipped"] == "2026-09-21T14:14:20Z"
    assert row["last exercised"] == START
    assert row["reason"] == "fixed"


def test_a_change_with_json_prints_its_audit_entry(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(["kill", "cli-ledger", *WHO, "--ttl", "2h", "--json"], capsys)
    (entry,) = reskit.current_store().audit()
    assert out == entry.to_json() + "\n"
    data = json.loads(out)
    assert (data["action"], data["target"], data["actor"]) == ("kill", "switch:cli-ledger", "alice")
    assert data["after"]["until"] == clock.wall() + 7200


def test_switches_json(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    reskit.kill_switch("cli-recs", owner="team-recs", fail_mode="closed")
    run(["kill", "cli-recs", *WHO], capsys)

    data = json.loads(run(["switches", "--json"], capsys))
    (info,) = [item for item in data if item["name"] == "cli-recs"]
    assert info == {
        "name": "cli-recs",
        "killed": True,
        "owner": "team-recs",
        "description": None,
        "fail_mode": "closed",
        "reason": "INC-7 double charges",
        "actor": "alice",
        "last_flipped": clock.wall(),
        "last_exercised": clock.wall(),
        "until": None,
        "last_declared": info["last_declared"],
    }
    assert info == next(i.as_dict() for i in reskit.switches() if i.name == "cli-recs")


def test_switches_stale(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    reskit.kill_switch("cli-never-pulled", owner="team-a")
    run(["kill", "cli-drilled", *WHO], capsys)
    run(["kill", "cli-old", *WHO], capsys)
    run(["revive", "cli-old", *WHO], capsys)
    clock.advance(100 * 86400)
    run(["kill", "cli-drilled", *WHO], capsys)

    names = set(by_name(table(run(["switches", "--stale", "90d"], capsys))))
    assert {"cli-never-pulled", "cli-old"} <= names
    assert "cli-drilled" not in names
    listed = json.loads(run(["switches", "--stale", "200d", "--json"], capsys))
    names = {item["name"] for item in listed}
    assert {"cli-never-pulled"} <= names
    assert not {"cli-old", "cli-drilled"} & names


def test_switches_without_any(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Other tests' declarations live on in this process: ask for none outright.
    monkeypatch.setattr(reskit, "switches", lambda stale=None: [])
    assert run(["switches"], capsys) == "no kill switches known to this store\n"
    assert run(["switches", "--stale", "90d"], capsys) == "every switch was exercised within 90d\n"
    assert json.loads(run(["switches", "--json"], capsys)) == []


def test_table_cells_are_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    run(["kill", "cli-markup", "--reason", "[bold]INC-9[/bold] [red]", "--actor", "a"], capsys)
    row = by_name(table(run(["switches"], capsys)))["cli-markup"]
    assert row["reason"] == "[bold]INC-9[/bold] [red]"


def test_a_table_on_a_terminal_is_styled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    run(["kill", "cli-styled", *WHO], capsys)
    out = run(["switches"], capsys)
    assert "\x1b[1m" in out  # a bold header
    assert "cli-styled" in out


def test_brownout(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["brownout"], capsys) == "brownout level 0 (global; never set)\n"

    out = run(["brownout", "40", "--reason", "overload", "--actor", "carol"], capsys)
    assert out == "set the global brownout level to 40 (audit entry 0)\n"
    assert reskit.brownout_level() == 40
    assert run(["brownout"], capsys) == (
        f"brownout level 40 (global; set by carol at {START}: overload)\n"
    )

    clock.advance(60)
    out = run(["brownout", "70", "--tenant", "acme", "--reason", "abuse", "--actor", "dan"], capsys)
    assert out == "set the brownout level of tenant 'acme' to 70 (audit entry 1)\n"
    assert reskit.brownout_level("acme") == 70
    assert reskit.brownout_level() == 40
    assert run(["brownout", "--tenant", "acme"], capsys) == (
        "brownout level 70 for tenant 'acme' (its own override; set by dan at "
        "2026-09-21T14:14:20Z: abuse)\n"
    )
    assert run(["brownout", "--tenant", "other"], capsys) == (
        f"brownout level 40 for tenant 'other' (the global level, set by carol at {START}: "
        "overload; the tenant has no override)\n"
    )

    out = run(["brownout", "clear", "--tenant", "acme", "--reason", "ok", "--actor", "dan"], capsys)
    assert out == (
        "removed the brownout override of tenant 'acme'; the global level (40) applies to it "
        "(audit entry 2)\n"
    )
    assert reskit.brownout_level("acme") == 40
    assert reskit.current_store().snapshot().level("acme") is None


def test_brownout_json(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads(run(["brownout", "--json"], capsys)) == {
        "level": 0,
        "tenant": None,
        "source": "global",
        "reason": None,
        "actor": None,
        "at": None,
    }
    run(["brownout", "25", "--reason", "slow db", "--actor", "carol"], capsys)
    run(["brownout", "90", "--tenant", "acme", "--reason", "abuse", "--actor", "dan"], capsys)
    assert json.loads(run(["brownout", "--tenant", "acme", "--json"], capsys)) == {
        "level": 90,
        "tenant": "acme",
        "source": "tenant",
        "reason": "abuse",
        "actor": "dan",
        "at": clock.wall(),
    }
    shown = json.loads(run(["brownout", "--tenant", "zeta", "--json"], capsys))
    assert (shown["level"], shown["source"], shown["reason"]) == (25, "global", "slow db")

    out = run(["brownout", "0", "--reason", "over", "--actor", "carol", "--json"], capsys)
    assert json.loads(out)["after"]["level"] == 0


def test_breakers(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["breakers"], capsys) == "no breaker is forced open or closed, and none is shared\n"
    assert json.loads(run(["breakers", "--json"], capsys)) == []

    out = run(["breakers", "force-open", "db", "--reason", "failover", "--actor", "dave"], capsys)
    assert out == "forced breaker 'db' open (audit entry 0)\n"
    clock.advance(5)
    out = run(["breakers", "force-close", "cache", "--reason", "flaps", "--actor", "eve"], capsys)
    assert out == "forced breaker 'cache' closed (audit entry 1)\n"

    assert table(run(["breakers"], capsys)) == [
        {
            "name": "cache",
            "state": "forced closed",
            "fleet": "-",
            "since": "2026-09-21T14:13:25Z",
            "actor": "eve",
            "reason": "flaps",
        },
        {
            "name": "db",
            "state": "forced open",
            "fleet": "-",
            "since": START,
            "actor": "dave",
            "reason": "failover",
        },
    ]
    assert json.loads(run(["breakers", "--json"], capsys)) == [
        {
            "name": "cache",
            "state": "forced_closed",
            "reason": "flaps",
            "actor": "eve",
            "at": clock.wall(),
            "shared": None,
        },
        {
            "name": "db",
            "state": "forced_open",
            "reason": "failover",
            "actor": "dave",
            "at": clock.wall() - 5,
            "shared": None,
        },
    ]

    out = run(["breakers", "release", "db", "--reason", "recovered", "--actor", "dave"], capsys)
    assert out == "released breaker 'db' (audit entry 2)\n"
    assert [row["name"] for row in table(run(["breakers"], capsys))] == ["cache"]


def test_json_given_to_the_group_reaches_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["breakers", "--json", "force-open", "db", "--reason", "r", "--actor", "a"], capsys)
    assert json.loads(out)["action"] == "breaker.force_open"
    out = run(["audit", "--json", "verify"], capsys)
    assert json.loads(out)["ok"] is True


def test_audit_tail(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "tail"], capsys) == "the audit log is empty\n"
    assert run(["audit", "tail", "--json"], capsys) == ""

    run(["kill", "cli-a", *WHO, "--ttl", "1h"], capsys)
    clock.advance(1)
    run(["revive", "cli-a", *WHO], capsys)
    run(["brownout", "30", *WHO], capsys)
    run(["brownout", "5", "--tenant", "acme", *WHO], capsys)
    run(["brownout", "clear", "--tenant", "acme", *WHO], capsys)
    run(["breakers", "force-open", "db", *WHO], capsys)

    rows = table(run(["audit", "tail", "-n", "5"], capsys))
    assert [row["seq"] for row in rows] == ["1", "2", "3", "4", "5"]
    rows = table(run(["audit", "tail"], capsys))
    del rows[3]  # acme's override, set to be cleared
    assert rows[0] == {
        "seq": "0",
        "time": START,
        "actor": "alice",
        "action": "kill",
        "target": "switch:cli-a",
        "reason": "INC-7 double charges",
        "after": "killed until 2026-09-21T15:13:20Z",
    }
    assert [row["after"] for row in rows[1:]] == ["on", "level 30", "(removed)", "forced open"]
    assert rows[1]["time"] == "2026-09-21T14:13:21Z"

    assert [row["seq"] for row in table(run(["audit", "tail", "-n", "2"], capsys))] == ["4", "5"]
    assert len(table(run(["audit", "tail", "--last", "100"], capsys))) == 6


def test_audit_tail_json_is_the_export_format(capsys: pytest.CaptureFixture[str]) -> None:
    for number in range(4):
        run(["brownout", str(number), *WHO], capsys)

    out = run(["audit", "tail", "--json", "-n", "3"], capsys)
    assert out.endswith("\n")
    assert out.splitlines() == [e.to_json() for e in reskit.current_store().audit(last=3)]

    everything = run(["audit", "tail", "--json"], capsys)
    entries = list(entries_from_json_lines(everything.splitlines()))
    assert [entry.seq for entry in entries] == [0, 1, 2, 3]
    assert verify(entries, AuditHead(3, entries[-1].hash)).ok


def test_audit_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "verify"], capsys) == "audit log intact: 0 entries, one unbroken chain\n"
    for name in ("cli-a", "cli-b", "cli-c"):
        run(["kill", name, *WHO], capsys)
    assert run(["audit", "verify"], capsys) == "audit log intact: 3 entries, one unbroken chain\n"
    assert json.loads(run(["audit", "verify", "--json"], capsys)) == {
        "ok": True,
        "checked": 3,
        "position": None,
        "problem": None,
    }


def test_audit_verify_finds_a_tampered_entry(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("cli-a", "cli-b", "cli-c"):
        run(["kill", name, *WHO], capsys)
    store = reskit.current_store()
    assert isinstance(store, MemoryStore)
    store._lines[1] = store._lines[1].replace("alice", "mallory")

    # The command ran and found a problem: status 1, the finding on stdout.
    out = run(["audit", "verify"], capsys, status=1)
    assert out == "audit log broken at entry 1: its contents were edited after writing\n"
    assert json.loads(run(["audit", "verify", "--json"], capsys, status=1)) == {
        "ok": False,
        "checked": 2,
        "position": 1,
        "problem": "its contents were edited after writing",
    }
    # The listing marks the edited entry too.
    rows = table(run(["audit", "tail"], capsys))
    assert [(row["seq"], row["actor"]) for row in rows] == [
        ("0", "alice"),
        ("1 (edited!)", "mallory"),
        ("2", "alice"),
    ]


def test_audit_verify_finds_a_removed_entry(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("cli-a", "cli-b", "cli-c"):
        run(["kill", name, *WHO], capsys)
    store = reskit.current_store()
    assert isinstance(store, MemoryStore)
    del store._lines[0]

    out = run(["audit", "verify"], capsys, status=1)
    assert out.startswith("audit log broken at entry 0: sequence number 1 where 0 belongs")


# -- which store --------------------------------------------------------------------


def test_commands_share_the_store_this_process_configured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = reskit.configure(MemoryStore())
    run(["kill", "cli-shared", *WHO], capsys)
    assert reskit.current_store() is store
    assert len(store.audit()) == 1


def test_store_memory_is_a_fresh_store(capsys: pytest.CaptureFixture[str]) -> None:
    run(["kill", "cli-gone", *WHO], capsys)
    before = reskit.current_store()

    assert run(["audit", "tail", "--store", "memory"], capsys) == "the audit log is empty\n"
    assert reskit.current_store() is not before
    assert not reskit.is_killed("cli-gone")
    # --store given to the group applies to its commands too.
    run(["breakers", "force-open", "db", *WHO], capsys)
    assert (
        run(["breakers", "--store", "memory"], capsys)
        == "no breaker is forced open or closed, and none is shared\n"
    )


def test_reskit_store_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["kill", "cli-env", *WHO], capsys)
    before = reskit.current_store()
    monkeypatch.setenv("RESKIT_STORE", "memory")
    assert run(["audit", "tail"], capsys) == "the audit log is empty\n"
    assert reskit.current_store() is not before

    monkeypatch.setenv("RESKIT_STORE", "carrier-pigeon://loft")
    assert main(["audit", "verify"]) == 2
    assert capsys.readouterr().err.startswith(
        "reskit: error: unknown store 'carrier-pigeon://loft'"
    )


def test_a_shared_store_is_refreshed_before_a_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    refreshed: list[bool] = []

    class SharedStore(MemoryStore):
        def refresh(self) -> None:
            refreshed.append(True)

    reskit.configure(SharedStore())
    run(["switches", "--json"], capsys)
    assert refreshed == [True]


# -- errors and exit statuses ---------------------------------------------------------


def test_changes_that_have_nothing_to_do_say_so_and_audit_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["revive", "never-killed", *WHO], capsys) == (
        "switch 'never-killed' is not killed; nothing changed\n"
    )
    assert run(["brownout", "clear", "--tenant", "nobody", *WHO], capsys) == (
        "tenant 'nobody' has no brownout override; nothing changed\n"
    )
    assert run(["breakers", "release", "nothing", *WHO], capsys) == (
        "breaker 'nothing' is not forced open or closed; nothing changed\n"
    )
    assert run(["audit", "tail", "--json"], capsys) == ""


def test_killing_a_switch_no_code_declared_warns(capsys: pytest.CaptureFixture[str]) -> None:
    reskit.KillSwitch("payments", owner="team-payments")
    assert main(["kill", "payments", *WHO]) == 0
    assert capsys.readouterr().err == ""
    assert main(["kill", "paymnets", *WHO]) == 0  # a typo: killed, and said so
    err = capsys.readouterr().err
    assert err.startswith("reskit: warning: no process has declared switch 'paymnets'")


def test_reading_with_no_store_says_which_store_it_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reskit._store, "_current", None)
    assert main(["audit", "verify"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "audit log intact: 0 entries, one unbroken chain\n"
    assert captured.err.startswith("reskit: note: no --store and no RESKIT_STORE")


def test_an_extra_that_is_not_installed_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if reskit[redis] were not installed
    monkeypatch.delitem(sys.modules, "reskit.stores.redis", raising=False)
    assert main(["switches", "--store", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'pip install "reskit[redis]"' in err


@pytest.mark.parametrize(
    "argv",
    [
        ["kill", "nowhere", *WHO],
        ["revive", "nowhere", *WHO],
        ["brownout", "3", *WHO],
        ["breakers", "force-open", "db", *WHO],
    ],
)
def test_a_change_with_no_store_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # As in a fresh `reskit` process: nothing configured, no RESKIT_STORE.
    monkeypatch.setattr(reskit._store, "_current", None)
    assert main(argv) == 2
    assert "no store to change" in capsys.readouterr().err
    assert reskit._store._current is None  # nothing was configured either
    # Reading commands still work (on an empty memory store), and so does an explicit one.
    assert main(["switches", "--json"]) == 0
    assert main([*argv, "--store", "memory"]) == 0


def test_an_unreachable_store_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    class DownStore(MemoryStore):
        def change(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise reskit.StoreUnavailable("cannot reach the reskit store at redis://db:6379/0")

    reskit.configure(DownStore())
    assert main(["kill", "cli-down", *WHO]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("reskit: error: cannot reach the reskit store at redis://db:6379/0\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["kill", "x" * 257, *WHO], "a kill switch name must be a string of 1 to 256 characters"),
        (["brownout", "10", "--tenant", "t" * 257, *WHO], "a tenant must be a string"),
        (["breakers", "release", "b" * 257, *WHO], "a breaker name must be a string"),
    ],
)
def test_bad_input_reskit_refuses_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"reskit: error: {message}")
    assert captured.err.count("\n") == 1


def test_interrupted_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(stale: float | None = None) -> list[reskit.SwitchInfo]:
        raise KeyboardInterrupt

    monkeypatch.setattr(reskit, "switches", interrupted)
    assert main(["switches"]) == 130
    assert capsys.readouterr().err.endswith("reskit: interrupted\n")


@pytest.mark.parametrize("argv", [["audit", "verify"], ["--help"]])
def test_a_closed_pipe_exits_141(argv: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reskit.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "RESKIT_STORE": "memory"},
    )
    # Closed before the interpreter has even started: its first write fails.
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert stderr == b""


def test_operator_commands_as_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reskit.cli", "kill", "cli-sub", *WHO, "--ttl", "90s", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "RESKIT_STORE": "memory"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"] == "switch:cli-sub"


@pytest.mark.parametrize(
    ("source", "absent"),
    [
        (
            "import reskit\nreskit.kill('x', reason='r', actor='a')\nreskit.switches()\n",
            ("click", "rich"),
        ),
        # rich only prints tables; the demo's imports come with the demo.
        (
            "from reskit.cli import main\nassert main(['switches', '--json']) == 0\n",
            ("rich", "asyncio", "reskit.cli._demo"),
        ),
    ],
)
def test_what_is_not_imported(source: str, absent: tuple[str, ...]) -> None:
    code = (
        f"import sys\n{source}"
        f"loaded = sorted(m for m in {absent!r} if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_the_demo_flips_a_switch_and_a_level_while_traffic_runs() -> None:
    out = io.StringIO()
    assert _demo.run_demo(calls=600, seed=1, out=out) == 0
    report = out.getvalue()
    audit = report.split("the audit log of the demo's flips:\n", 1)[1]
    assert [line.split()[1] for line in audit.splitlines()[:4]] == [
        "brownout",
        "brownout",
        "kill",
        "revive",
    ]
    assert "audit log intact: 4 entries, one unbroken chain" in audit
    details = report.split("why calls did not simply succeed:\n", 1)[1]
    reviews = next(line for line in details.splitlines() if line.strip().startswith("reviews"))
    answered = {
        cause: int(count) for cause, count in re.findall(r"(kill_switch|brownout) (\d+)", reviews)
    }
    # Calls 20-40% were shed and 55-75% killed: each about a fifth of 100 calls.
    assert answered["kill_switch"] >= 10
    assert answered["brownout"] >= 10
    # The demo's flips stay in its own memory store: nothing leaks into the caller's.
    assert not reskit.is_killed("reviews")
    assert reskit.brownout_level() == 0


def test_forget_removes_a_switch_and_its_declaration(capsys: pytest.CaptureFixture[str]) -> None:
    reskit.KillSwitch("old-feature", owner="team-gone")
    run(["kill", "paymnets", *WHO], capsys)  # a typo
    names = [info["name"] for info in json.loads(run(["switches", "--json"], capsys))]
    assert names == ["old-feature", "paymnets"]
    assert run(["forget", "paymnets", *WHO], capsys) == "forgot switch 'paymnets' (audit entry 1)\n"
    assert run(["forget", "old-feature", *WHO], capsys) == (
        "forgot switch 'old-feature' (audit entry 2)\n"
    )
    assert json.loads(run(["switches", "--json"], capsys)) == []
    assert not reskit.is_killed("paymnets")
    assert run(["forget", "never", *WHO], capsys) == (
        "no switch 'never' is known to this store; nothing changed\n"
    )
    lines = run(["audit", "tail", "--json"], capsys).splitlines()
    actions = [json.loads(line)["action"] for line in lines]
    assert actions == ["kill", "switch.forget", "switch.forget"]


def test_the_checkout_scene_never_charges_an_order_twice() -> None:
    out = io.StringIO()
    assert _demo.run_demo(calls=1400, seed=3, out=out) == 0
    details = out.getvalue().split("why calls did not simply succeed:\n", 1)[1]
    line = " ".join(
        details.split("checkout", 1)[1].split("\n\n", 1)[0].split()
    )  # the sentence may wrap
    match = re.search(r"(\d+) charge requests for (\d+) orders made (\d+) charges", line)
    assert match is not None, line
    requests, orders, charges = (int(group) for group in match.groups())
    assert orders == charges == 200
    assert requests > orders  # timeouts made the client retry...
    assert "(0 orders charged twice)" in line  # ...and no retry charged again


@pytest.fixture
def steady_heap() -> Iterator[None]:
    """Keep the collector's full passes over the test process's heap out of a real-time run.

    The demo runs in real time against 300 ms deadlines. Late in a suite the test
    process holds enough objects that one full collection takes a quarter of a
    second (measured at this test's place in the suite), which would stall the
    event loop past those deadlines. The objects made before the demo are frozen
    out of the collector while it runs.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("steady_heap")
def test_demo_outbound_http_scene() -> None:
    pytest.importorskip("httpx")
    out = io.StringIO()
    assert _demo.run_demo(calls=160, seed=3, http=True, out=out) == 0
    text = out.getvalue()
    assert text.startswith("reskit demo: 160 calls to 8 simulated dependencies")
    rows = parse_table(text)
    assert list(rows) == [*SCENES, "outbound-http", "total"]
    assert_counts_add_up(rows, 160)
    # eu fails 15% of the time and is down for a stretch: failover keeps calls succeeding.
    assert rows["outbound-http"]["failure"] <= 2
    assert "the eu region answered" in text
    assert [s.name for s in _demo.build_scenes(16, 1, 4)] == SCENES  # opt-in only

"""Every ```python block in docs/*.md must run as-is.

The blocks of one page run in order, in one fresh namespace, in a subprocess
started with the current interpreter: a page reads like one session (a later
block may use what an earlier one defined), and global state an example leaves
behind (a fake clock, testing mode, telemetry providers, an abandoned timeout
thread) cannot leak into another page or into this test run.

A block is skipped when the line before its opening fence is
``<!-- skip-example -->``. Only the info string ``python`` (optionally followed by
attributes such as ``title="..."``) marks an example; ``pycon``, ``bash`` and the
rest are left alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src"
SKIP_MARKER = "<!-- skip-example -->"
# Pages that promise at least one runnable example.
PAGES_WITH_EXAMPLES = (
    "admin.md",
    "architecture.md",
    "audit.md",
    "breaker.md",
    "brownout.md",
    "deadlines.md",
    "errors.md",
    "fallback.md",
    "idempotency.md",
    "fleet.md",
    "httpx.md",
    "middleware.md",
    "migrating.md",
    "policy.md",
    "retries.md",
    "switches.md",
    "telemetry.md",
    "testing.md",
    "timeouts.md",
)
# A page's examples are meant to finish well under a second each; this only
# stops a hung example from hanging the suite.
PAGE_TIMEOUT = 120.0

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool


def extract_examples(path: Path) -> list[Example]:
    """The ```python blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        info = match["info"].strip()
        language = info.split(maxsplit=1)[0].lstrip("{.").rstrip("}") if info else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # past the closing fence
        if language != "python":
            continue
        previous = next(
            (lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), ""
        )
        examples.append(
            Example(
                path=path,
                line=start + 1,
                code=textwrap.dedent("\n".join(body)) + "\n",
                skipped=previous == SKIP_MARKER,
            )
        )
    return examples


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", _pages(), ids=lambda page: page.name)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    examples = [example for example in extract_examples(page) if not example.skipped]
    if not examples:
        pytest.skip(f"{page.name} has no runnable python examples")
    # The checkout's src/ first, so the examples run against this tree even when
    # reskit is not installed in editable mode.
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-W", "error", __file__, str(page)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"an example in {page.name} failed:\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )


@pytest.mark.parametrize("name", PAGES_WITH_EXAMPLES)
def test_page_has_runnable_examples(name: str) -> None:
    examples = extract_examples(DOCS / name)
    assert any(not example.skipped for example in examples), f"{name} has no runnable example"


def test_extract_examples(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            ```python
            a = 1
            ```

            ```bash
            echo no
            ```

            <!-- skip-example -->
            ```python
            raise SystemExit("skipped")
            ```

            !!! note
                ```python title="indented"
                if a:
                    b = 2
                ```

            ````python
            s = '''
            ```
            '''
            ````
            """
        ),
        encoding="utf-8",
    )
    examples = extract_examples(page)
    assert [(e.line, e.skipped) for e in examples] == [
        (1, False),
        (10, True),
        (15, False),
        (20, False),
    ]
    assert examples[0].code == "a = 1\n"
    assert examples[2].code == "if a:\n    b = 2\n"
    assert examples[3].code == "s = '''\n```\n'''\n"


def _run_page(path: Path) -> int:
    """Run one page's examples in order in one namespace (the subprocess side)."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for example in extract_examples(path):
        if example.skipped:
            continue
        where = f"{path.name}:{example.line}"
        # Blank lines keep tracebacks pointing at the page's own line numbers.
        source = "\n" * example.line + example.code
        started = time.perf_counter()
        try:
            exec(compile(source, str(path), "exec", dont_inherit=True), namespace)
        except BaseException:
            print(f"example at {where} failed:", file=sys.stderr)
            traceback.print_exc()
            return 1
        print(f"# {where} ran in {time.perf_counter() - started:.3f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_run_page(Path(sys.argv[1])))

"""Output: tables for people (rich), JSON for scripts.

rich is imported only when a table is printed, so ``reskit demo`` and every
``--json`` command run without it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

__all__ = ["PIPE_WIDTH", "print_json", "print_table"]

#: The width of a table written to a pipe or a file.
PIPE_WIDTH = 1000


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str) -> None:
    """Print ``rows`` under ``columns``, or the sentence ``empty`` when there is none."""
    if not rows:
        click.echo(empty)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        # Text, not str: a reason like "[INC-42]" is not rich markup.
        table.add_row(*(Text(cell) for cell in row))
    if console.is_terminal:
        console.print(table)
        return
    # Into a pipe or a file: a row stays one line however long (rich would wrap
    # at 80 columns), without the padding after the last column, so grep and
    # awk see whole rows.
    console.width = PIPE_WIDTH
    with console.capture() as captured:
        console.print(table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))

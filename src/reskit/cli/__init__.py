"""The ``reskit`` command.

Built on click: :data:`cli` is the ``reskit`` group, and each command is a
click command added to it (the operator commands live in ``_operator.py``,
what they share in ``_common.py``, tables in ``_output.py``, the demo's in
``_democli.py``, imported only when it is used). rich is imported only to
print a table, and ``import reskit`` imports neither click nor rich.

A command returns its exit status (``None`` for 0). :func:`main` maps
everything else to one: 0 success, 1 the command ran and reports a problem
(``reskit audit verify`` on a broken chain), 2 a usage error, a
:class:`CommandError`, a :class:`~reskit.ReskitError` or a ``ValueError`` from
bad input, 3 the store could not be reached (:class:`~reskit.StoreUnavailable`:
nothing was changed; worth retrying), each shown as one line on stderr; 130
interrupted; 141 the output pipe was closed.

``--store URL`` selects the store; without it, ``$RESKIT_STORE``, else memory.
When :func:`main` is called inside a process that already configured a store
(and ``$RESKIT_STORE`` is unset), the commands act on that store instead of a
new memory store, so a test can run ``kill`` then ``switches`` and see the kill.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import click

from reskit._errors import ReskitError
from reskit._store import StoreUnavailable

from ._common import CommandError
from ._operator import COMMANDS

__all__ = ["CommandError", "cli", "main"]

PROG = "reskit"


class _BrokenPipe(Exception):
    """The output pipe closed; carried past click, whose own handler would ``sys.exit(1)``."""


class _Group(click.Group):
    #: Commands whose module is imported only when they are run or listed: the
    #: demo's imports (asyncio, structlog, the policies) would slow every command.
    lazy: ClassVar[dict[str, tuple[str, str]]] = {"demo": ("._democli", "demo_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            from importlib import import_module

            module, name = self.lazy[cmd_name]
            self.add_command(getattr(import_module(module, __name__), name), cmd_name)
        return super().get_command(ctx, cmd_name)

    # Parsing prints too (--help, --version), then the command runs.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            raise _BrokenPipe from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _BrokenPipe from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reskit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"{PROG} {_version()}")
        ctx.exit()


@click.group(
    PROG,
    cls=_Group,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print reskit's version and exit.",
)
def cli() -> None:
    """Operate reskit: kill switches, brownout levels, breakers, the audit log.

    Every command but demo takes --store URL ($RESKIT_STORE, else memory) and
    --json for scripts.
    """


for _command in COMMANDS:
    cli.add_command(_command)


# -- the entry point ------------------------------------------------------------------


def _error(message: str, ctx: click.Context | None = None) -> None:
    where = PROG if ctx is None else ctx.command_path
    hint = "" if ctx is None else f" (see '{where} --help')"
    # One line, whatever the message: easier to read in a terminal and a CI log.
    sys.stderr.write(f"{where}: error: {' '.join(message.splitlines())}{hint}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reskit`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status instead of exiting, so it can be called in-process.

    .. versionadded:: 0.1.0
    """
    try:
        status = cli.main(
            args=None if argv is None else list(argv), prog_name=PROG, standalone_mode=False
        )
    except click.UsageError as exc:
        _error(exc.format_message(), exc.ctx)
        return 2
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    # ValueError too: reskit rejects bad input (a name too long, a level out of
    # range) with it, and to the operator that is a usage error, not a crash.
    except StoreUnavailable as exc:
        _error(str(exc))
        return 3
    except ImportError as exc:
        # An extra that is not installed (the Redis store needs reskit[redis]):
        # its message says what to install.
        _error(str(exc))
        return 2
    except (CommandError, ReskitError, ValueError) as exc:
        _error(str(exc))
        return 2
    except click.Abort:  # click's name for KeyboardInterrupt
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except _BrokenPipe:
        # The reader went away (``reskit audit tail --json | head``). Point
        # stdout at devnull so the interpreter's final flush does not complain,
        # and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return status if isinstance(status, int) else 0

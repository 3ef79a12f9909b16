"""The ``reskit`` command.

Each command is a subparser with a ``handler`` default that takes the parsed
arguments and returns the exit status, so a new command is one ``_add_*``
function registered in :func:`build_parser`. Handlers import the machinery
they run, so no command pays for another's imports.

Exit statuses: 0 success, 1 the command ran and reports a problem, 2 a usage
error or a :class:`CommandError` (one line on stderr), 130 interrupted, 141
the output pipe was closed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from reskit._errors import ReskitError

__all__ = ["CommandError", "build_parser", "main"]

PROG = "reskit"

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A command cannot do what it was asked; the message is shown to the user.

    .. versionadded:: 0.1.0
    """


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports errors on one line and never calls ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block first; one line that names the
        # problem and where to look is easier to read in a terminal and a CI log.
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reskit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


# -- commands -------------------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction[_Parser]) -> None:
    from ._demo import DEFAULT_CALLS, DEFAULT_CONCURRENCY, DEFAULT_SEED

    parser = commands.add_parser(
        "demo",
        help="run reskit's policies against simulated flaky dependencies",
        description=(
            "Call simulated flaky dependencies a few thousand times through reskit policies "
            "(timeout, deadline, retry with a budget, fallback, and the circuit breaker and "
            "bulkhead), show live progress, then a table of outcomes, retries and latency "
            "percentiles per policy. Everything runs in this process, in memory."
        ),
    )
    parser.add_argument(
        "--calls",
        type=_positive_int,
        default=DEFAULT_CALLS,
        metavar="N",
        help=f"calls in total, shared between the dependencies (default {DEFAULT_CALLS})",
    )
    parser.add_argument(
        "--seed",
        type=_int,
        default=DEFAULT_SEED,
        metavar="S",
        help=f"seed of every random draw (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="C",
        help=f"concurrent callers per dependency (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only the final table",
    )
    parser.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(
        calls=args.calls, seed=args.seed, concurrency=args.concurrency, quiet=args.quiet
    )


# -- the parser and the entry point ---------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the ``reskit`` argument parser with every command.

    .. versionadded:: 0.1.0
    """
    parser = _Parser(
        prog=PROG,
        description="Resilience for Python services: run the demo, and more to come.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=_Parser
    )
    commands.required = True
    _add_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reskit`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status instead of exiting, so it can be called in-process.

    .. versionadded:: 0.1.0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except _Exit as exc:
        return exc.status
    except (CommandError, ReskitError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (``reskit demo | head``). Point stdout at devnull
        # so the interpreter's final flush does not complain, and exit as a
        # process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141

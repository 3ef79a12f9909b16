"""What the commands share: the ``--store`` and ``--json`` options, parameter types, errors.

``--store`` and ``--json`` may be given to a group (``reskit breakers --json``)
or to the command under it (``reskit breakers force-open --json``). Their
callbacks write into ``ctx.meta``, which click shares along the chain of
contexts, so a command reads one place whichever level the option was on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

if TYPE_CHECKING:
    from reskit.stores import Store

    # Generic in the click type stubs of 8.2 and later, not at run time in 8.1.
    _FloatType = click.ParamType[float]
    _IntType = click.ParamType[int]
    _LevelType = click.ParamType[int | Literal["clear"]]
else:
    _FloatType = _IntType = _LevelType = click.ParamType

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "DURATION",
    "CommandError",
    "Duration",
    "Level",
    "WholeNumber",
    "format_duration",
    "format_time",
    "warn",
    "json_option",
    "open_store",
    "parse_duration",
    "store_option",
    "wants_json",
    "who_options",
]

_STORE = "reskit.store"
_JSON = "reskit.json"


class CommandError(Exception):
    """A command cannot do what it was asked; the message is shown to the user.

    :func:`reskit.cli.main` prints it on one line and exits with status 2.

    .. versionadded:: 0.1.0
    """


# -- --store and --json ---------------------------------------------------------------


def _remember(key: str) -> Callable[[click.Context, click.Parameter, object], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: object) -> None:
        # Only a given value is kept: the command's own (unset) option must not
        # erase what its group was given.
        if value is not None and value is not False:
            ctx.meta[key] = value

    return callback


store_option = click.option(
    "--store",
    metavar="URL",
    expose_value=False,
    callback=_remember(_STORE),
    help=(
        "Where the switches, levels and audit log live: 'memory' or a redis:// URL "
        "(default: $RESKIT_STORE, else memory)."
    ),
)

json_option = click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    callback=_remember(_JSON),
    help="Print JSON, for scripts, instead of text for people.",
)


def open_store(*, change: bool = False) -> Store:
    """Configure and return the store the command works on.

    A command that changes state refuses a memory store nobody asked for:
    it would forget the change as the command exits, and report success.

    Which store: ``--store``, then ``$RESKIT_STORE``, then the store this process
    already configured, then a new memory store. The third applies only when
    :func:`reskit.cli.main` runs inside a process that called
    :func:`reskit.configure` (a test, a notebook, an admin endpoint): there a
    sequence of commands acts on that one store, where a fresh memory store per
    command would forget each change at once. A ``reskit`` process has none, so
    for the command line the default is ``$RESKIT_STORE``, else memory.
    """
    import reskit
    from reskit import _store

    url = click.get_current_context().meta.get(_STORE) or os.environ.get("RESKIT_STORE")
    if not url and _store._current is not None:
        store = _store._current
    elif not url and change:
        raise CommandError(
            "no store to change: pass --store redis://HOST:6379/0 or set RESKIT_STORE (a "
            "memory store would forget the change when this command exits; pass "
            "--store memory if that is what you want)"
        )
    else:
        if not url:
            # Reading an empty store of its own, a command would report all is
            # well: say which store it read, on stderr, so scripts are unaffected.
            click.echo(
                "reskit: note: no --store and no RESKIT_STORE: reading an empty memory "
                "store (pass --store redis://HOST:6379/0 to read the fleet's)",
                err=True,
            )
        store = reskit.configure(url or "memory")
    # A shared store (Redis) reads its snapshot on a background thread, and a
    # command started a moment ago may not have it yet: read it now, so the
    # command shows and changes the current state, or fails here if the store
    # is down.
    refresh = getattr(store, "refresh", None)
    if refresh is not None:
        refresh()
    return store


def warn(message: str) -> None:
    """One line on stderr that does not change the outcome (stdout stays clean for scripts)."""
    click.echo(f"reskit: warning: {message}", err=True)


def wants_json() -> bool:
    """Whether ``--json`` was given to the command or to its group."""
    return bool(click.get_current_context().meta.get(_JSON))


def _not_blank(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty: the audit log records who and why")
    return value


def who_options(*, required: bool) -> Callable[[F], F]:
    """``--reason`` and ``--actor``, which the audit log records with every change."""

    def decorate(fn: F) -> F:
        fn = click.option(
            "--actor",
            required=required,
            callback=_not_blank,
            help="Who makes the change (a person or a system), for the audit log.",
        )(fn)
        return click.option(
            "--reason",
            required=required,
            callback=_not_blank,
            help="Why, for the audit log (an incident or a ticket helps).",
        )(fn)

    return decorate


# -- durations and times --------------------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?"
_SECONDS = re.compile(_NUMBER)
_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
# Largest unit first, each at most once: "1h30m" reads one way only.
_DURATION = re.compile("".join(f"(?:({_NUMBER}){unit})?" for unit, _ in _UNITS))


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``30m``, ``2h``, ``90d``, ``1h30m``, or plain seconds.

    Raises ``ValueError`` with a message for the user when ``text`` is not a
    duration, or is zero.
    """
    value = text.strip().lower()
    match = _DURATION.fullmatch(value)
    if _SECONDS.fullmatch(value):
        seconds = float(value)
    elif value and match is not None and any(match.groups()):
        seconds = sum(
            float(amount) * size
            for amount, (_, size) in zip(match.groups(), _UNITS, strict=True)
            if amount is not None
        )
    else:
        raise ValueError(
            "expected a duration such as 90s, 30m, 2h, 90d or 1h30m (units d, h, m, s, "
            f"largest first) or a number of seconds, got {text!r}"
        )
    if seconds <= 0:
        raise ValueError(f"a duration must be longer than zero, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` the way :func:`parse_duration` reads it: ``1h30m``, ``90d``, ``45s``."""
    left = round(seconds)
    if left <= 0:
        return "0s"
    parts = []
    for unit, size in _UNITS:
        amount, left = divmod(left, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


def format_time(epoch: float | None) -> str:
    """Seconds since the epoch as UTC ISO-8601 (``2026-09-21T14:26:40Z``); ``-`` for none."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- parameter types ------------------------------------------------------------------


class Duration(_FloatType):
    """A click parameter read by :func:`parse_duration`."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


class WholeNumber(_IntType):
    """A click parameter for a whole number of at least ``minimum``."""

    name = "integer"

    def __init__(self, minimum: int | None = None) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(value)
            except ValueError:
                self.fail(f"expected a whole number, got {value!r}", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"expected a number of at least {self.minimum}, got {value!r}", param, ctx)
        return number


class Level(_LevelType):
    """A brownout level, 0 to 100, or ``clear`` (remove a tenant's override)."""

    name = "level"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | Literal["clear"]:
        if isinstance(value, int):
            return value
        if value == "clear":
            return "clear"
        from reskit._switches import MAX_LEVEL

        try:
            level = int(value)
        except ValueError:
            level = -1
        if not 0 <= level <= MAX_LEVEL:
            self.fail(
                f"expected a level from 0 to {MAX_LEVEL}, or 'clear', got {value!r}", param, ctx
            )
        return level

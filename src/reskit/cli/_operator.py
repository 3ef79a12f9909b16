"""The operator commands: kill switches, brownout levels, forced breakers, the audit log.

Each command configures the store first (:func:`~._common.open_store`), calls
reskit's public functions, and prints a table or a sentence for people, JSON
with ``--json``. A change prints the audit entry it made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from reskit._store import check_name

from ._common import (
    DURATION,
    Level,
    WholeNumber,
    format_duration,
    format_time,
    json_option,
    open_store,
    store_option,
    wants_json,
    warn,
    who_options,
)
from ._output import print_json, print_table

if TYPE_CHECKING:
    from reskit import AuditEntry
    from reskit.stores import Store

__all__ = ["COMMANDS", "breaker_rows", "short_state"]


def _changed(entry: AuditEntry, sentence: str) -> None:
    if wants_json():
        click.echo(entry.to_json())
    else:
        click.echo(f"{sentence} (audit entry {entry.seq})")


# -- kill switches --------------------------------------------------------------------


@click.command("kill")
@click.argument("name")
@who_options(required=True)
@click.option(
    "--ttl",
    type=DURATION,
    metavar="DURATION",
    help="Revive the switch by itself after this long (90s, 30m, 2h, 1h30m, 90d).",
)
@store_option
@json_option
def kill_command(name: str, reason: str, actor: str, ttl: float | None) -> None:
    """Kill a switch: policies using it reject every call.

    Kill switch NAME in every process that shares the store, until
    `reskit revive` or, with --ttl, until the time runs out.
    """
    import reskit

    store = open_store(change=True)
    entry = reskit.kill(name, reason=reason, actor=actor, ttl=ttl)
    _warn_undeclared(store, name)
    until = (
        ""
        if ttl is None
        else f" for {format_duration(ttl)}, until {format_time(entry.after['until'])}"
    )
    _changed(entry, f"killed switch {name!r}{until}")


@click.command("revive")
@click.argument("name")
@who_options(required=True)
@store_option
@json_option
def revive_command(name: str, reason: str, actor: str) -> None:
    """Turn a killed switch back on.

    Revive switch NAME in every process that shares the store.
    """
    import reskit

    store = open_store(change=True)
    check_name(name, "kill switch name")
    record = store.snapshot().switch(name)
    if record is None or not record["killed"]:
        # Nothing to undo: an audit entry saying otherwise would only mislead.
        _unchanged(f"switch {name!r} is not killed; nothing changed")
        return
    entry = reskit.revive(name, reason=reason, actor=actor)
    _changed(entry, f"revived switch {name!r}")


@click.command("forget")
@click.argument("name")
@who_options(required=True)
@store_option
@json_option
def forget_command(name: str, reason: str, actor: str) -> None:
    """Remove a switch from the store: its state and its registry entry.

    For a switch whose code is gone, or a name killed by mistake. A process
    whose code still declares NAME registers it again when it restarts.
    """
    import reskit

    store = open_store(change=True)
    check_name(name, "kill switch name")
    if store.snapshot().switch(name) is None and name not in store.declarations():
        _unchanged(f"no switch {name!r} is known to this store; nothing changed")
        return
    entry = reskit.forget_switch(name, reason=reason, actor=actor)
    _changed(entry, f"forgot switch {name!r}")


def _warn_undeclared(store: Store, name: str) -> None:
    if name not in store.declarations():
        warn(
            f"no process has declared switch {name!r} (is it a typo? `reskit switches` lists "
            "the known ones); killing it anyway, for code that declares it later"
        )


def _unchanged(sentence: str) -> None:
    """Report a change that had nothing to do: no audit entry, exit 0."""
    if wants_json():
        print_json(None)
    else:
        click.echo(sentence)


@click.command("switches")
@click.option(
    "--stale",
    type=DURATION,
    metavar="DURATION",
    help=(
        "Only switches nobody killed within DURATION (never-killed ones included): "
        "due for a drill, or for removal."
    ),
)
@store_option
@json_option
def switches_command(stale: float | None) -> None:
    """List the kill switches.

    Every switch the store knows, declared by code or flipped, with its state
    and when it was last flipped and last exercised (killed).
    """
    import reskit

    open_store()
    infos = reskit.switches(stale=stale)
    if wants_json():
        print_json([info.as_dict() for info in infos])
        return
    print_table(
        (
            "name",
            "state",
            "owner",
            "fail mode",
            "last flipped",
            "last exercised",
            "until",
            "reason",
        ),
        [
            (
                info.name,
                "killed" if info.killed else "on",
                info.owner or "-",
                info.fail_mode,
                format_time(info.last_flipped),
                format_time(info.last_exercised),
                format_time(info.until),
                info.reason or "-",
            )
            for info in infos
        ],
        empty=(
            "no kill switches known to this store"
            if stale is None
            else f"every switch was exercised within {format_duration(stale)}"
        ),
    )


# -- brownout -------------------------------------------------------------------------


@click.command("brownout")
@click.argument("level", required=False, type=Level())
@click.option("--tenant", help="One tenant's level (an override of the global one).")
@who_options(required=False)
@store_option
@json_option
def brownout_command(
    level: int | str | None, tenant: str | None, reason: str | None, actor: str | None
) -> None:
    """Show or set the brownout level.

    Without LEVEL, show the level in force; with LEVEL (0 to 100) and --reason
    and --actor, set it. Policies with shed_at=N shed their calls while the level is at least N.
    With --tenant, show or set that tenant's level; "clear" removes the
    tenant's override, so the global level applies to it again.
    """
    import reskit

    store = open_store(change=level is not None)
    if level is None:
        if reason is not None or actor is not None:
            raise click.UsageError("--reason and --actor go with a new LEVEL")
        _show_brownout(store, tenant)
        return
    if reason is None or actor is None:
        raise click.UsageError(
            "changing the brownout level needs --reason and --actor (the audit log records "
            "who and why)"
        )
    if level == "clear":
        if tenant is None:
            raise click.UsageError(
                "'clear' removes a tenant's override: give --tenant (or a LEVEL to set the "
                "global level)"
            )
        check_name(tenant, "tenant")
        if store.snapshot().level(tenant) is None:
            _unchanged(f"tenant {tenant!r} has no brownout override; nothing changed")
            return
        entry = reskit.set_brownout_level(None, reason=reason, actor=actor, tenant=tenant)
        sentence = (
            f"removed the brownout override of tenant {tenant!r}; the global level "
            f"({reskit.brownout_level()}) applies to it"
        )
    else:
        assert isinstance(level, int)
        entry = reskit.set_brownout_level(level, reason=reason, actor=actor, tenant=tenant)
        scope = (
            "the global brownout level"
            if tenant is None
            else (f"the brownout level of tenant {tenant!r}")
        )
        sentence = f"set {scope} to {level}"
    _changed(entry, sentence)


def _show_brownout(store: Store, tenant: str | None) -> None:
    import reskit

    level = reskit.brownout_level(tenant)
    snapshot = store.snapshot()
    own = tenant is not None and snapshot.level(tenant) is not None
    record = snapshot.level(tenant if own else None)
    if wants_json():
        print_json(
            {
                "level": level,
                "tenant": tenant,
                "source": "tenant" if own else "global",
                "reason": None if record is None else record["reason"],
                "actor": None if record is None else record["actor"],
                "at": None if record is None else record["at"],
            }
        )
        return
    who = (
        "never set"
        if record is None
        else f"set by {record['actor']} at {format_time(record['at'])}: {record['reason']}"
    )
    if tenant is None:
        click.echo(f"brownout level {level} (global; {who})")
    elif own:
        click.echo(f"brownout level {level} for tenant {tenant!r} (its own override; {who})")
    else:
        click.echo(
            f"brownout level {level} for tenant {tenant!r} (the global level, {who}; "
            "the tenant has no override)"
        )


# -- breakers -------------------------------------------------------------------------


def breaker_rows(store: Store) -> list[dict[str, Any]]:
    """Every breaker whose state the store holds, as the listing shows it.

    The one place the listing reads the store: the table and ``--json`` both
    print these rows, so a new kind of breaker state is one more loop here.
    """
    from reskit._store import BREAKER

    rows = [
        {
            "name": name,
            "state": record["mode"],
            "reason": record["reason"],
            "actor": record["actor"],
            "at": record["at"],
            "shared": None,
        }
        for name, record in store.snapshot().items(BREAKER)
    ]
    forced = {row["name"]: row for row in rows}
    # Shared breakers (a Redis store): the fleet's own state, under the operator's if any.
    shared = getattr(store, "shared_breakers", None)
    for state in shared() if shared is not None else []:
        row = forced.get(state["name"])
        if row is None:
            row = {
                "name": state["name"],
                "state": state["state"],
                "reason": None,
                "actor": None,
                "at": None,
            }
            rows.append(row)
        row["shared"] = {
            "state": state["state"],
            "failures": state["failures"],
            "opens": state["opens"],
        }
    return sorted(rows, key=lambda row: row["name"])


@click.group("breakers", invoke_without_command=True, no_args_is_help=False)
@store_option
@json_option
@click.pass_context
def breakers_command(ctx: click.Context) -> None:
    """List, force or release breakers.

    Without a command, list the breakers an operator forced open or closed,
    and (on a Redis store) every shared breaker with the fleet's state.
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = breaker_rows(open_store())
    if wants_json():
        print_json(rows)
        return
    print_table(
        ("name", "state", "fleet", "since", "actor", "reason"),
        [
            (
                row["name"],
                row["state"].replace("_", " "),
                _fleet_text(row["shared"]),
                format_time(row["at"]),
                row["actor"] or "",
                row["reason"] or "",
            )
            for row in rows
        ],
        empty="no breaker is forced open or closed, and none is shared",
    )


def _fleet_text(shared: dict[str, Any] | None) -> str:
    if shared is None:
        return "-"  # not shared, or not on a store that shares breakers
    return (
        f"{shared['state'].replace('_', ' ')}, {shared['failures']} failures, "
        f"opened {shared['opens']}x"
    )


def _force(name: str, state: str, reason: str, actor: str) -> None:
    import reskit

    open_store(change=True)
    entry = reskit.force_breaker(name, state, reason=reason, actor=actor)
    _changed(entry, f"forced breaker {name!r} {state}")


@breakers_command.command("force-open")
@click.argument("name")
@who_options(required=True)
@store_option
@json_option
def force_open_command(name: str, reason: str, actor: str) -> None:
    """Force breakers named NAME open: every call is rejected until released."""
    _force(name, "open", reason, actor)


@breakers_command.command("force-close")
@click.argument("name")
@who_options(required=True)
@store_option
@json_option
def force_close_command(name: str, reason: str, actor: str) -> None:
    """Force breakers named NAME closed: calls pass and nothing is counted."""
    _force(name, "closed", reason, actor)


@breakers_command.command("release")
@click.argument("name")
@who_options(required=True)
@store_option
@json_option
def release_command(name: str, reason: str, actor: str) -> None:
    """Give breakers named NAME back to their own state machine."""
    import reskit

    store = open_store(change=True)
    check_name(name, "breaker name")
    if store.snapshot().breaker(name) is None:
        _unchanged(f"breaker {name!r} is not forced open or closed; nothing changed")
        return
    entry = reskit.release_breaker(name, reason=reason, actor=actor)
    _changed(entry, f"released breaker {name!r}")


# -- the audit log --------------------------------------------------------------------


@click.group("audit", no_args_is_help=False)
@store_option
@json_option
def audit_command() -> None:
    """Read and verify the audit log.

    Every change (a kill, a revive, a level, a forced breaker) is an entry in
    one hash chain.
    """


@audit_command.command("verify")
@store_option
@json_option
def verify_command() -> int:
    """Check the audit log's hash chain.

    Exit 1 if an entry was edited, removed, reordered or cut off the end.
    """
    verification = open_store().verify_audit()
    if wants_json():
        print_json(
            {
                "ok": verification.ok,
                "checked": verification.checked,
                "position": verification.position,
                "problem": verification.problem,
            }
        )
    else:
        click.echo(str(verification))
    return 0 if verification.ok else 1


@audit_command.command("tail")
@click.option(
    "-n",
    "--last",
    type=WholeNumber(minimum=1),
    default=20,
    show_default=True,
    metavar="N",
    help="How many of the newest entries.",
)
@store_option
@json_option
def tail_command(last: int) -> None:
    """Show the newest audit entries.

    Oldest first. With --json, one canonical JSON entry per line: the export
    format.
    """
    entries = open_store().audit(last=last)
    if wants_json():
        # One canonical line per entry, exactly as hashed: the export format.
        for entry in entries:
            click.echo(entry.to_json())
        return
    print_table(
        ("seq", "time", "actor", "action", "target", "reason", "after"),
        [
            (
                # An entry whose hash does not match its contents was edited:
                # marked here, and `reskit audit verify` says where the chain breaks.
                str(entry.seq) if entry.is_intact() else f"{entry.seq} (edited!)",
                format_time(entry.time),
                entry.actor,
                entry.action,
                entry.target,
                entry.reason,
                short_state(entry.after),
            )
            for entry in entries
        ],
        empty="the audit log is empty",
    )


def short_state(after: Any) -> str:
    """A record as an audit entry left it, in a few words."""
    if after is None:
        return "(removed)"
    if isinstance(after, Mapping):
        if "killed" in after:
            if not after["killed"]:
                return "on"
            until = after.get("until")
            return "killed" if until is None else f"killed until {format_time(until)}"
        if "level" in after:
            return f"level {after['level']}"
        if "mode" in after:
            return str(after["mode"]).replace("_", " ")
    from reskit._audit import canonical

    text = canonical(after)
    return text if len(text) <= 40 else text[:39] + "…"


#: Every operator command; ``reskit.cli`` adds them to the ``reskit`` group.
COMMANDS: tuple[click.Command, ...] = (
    kill_command,
    revive_command,
    forget_command,
    switches_command,
    brownout_command,
    breakers_command,
    audit_command,
)

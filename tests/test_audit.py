"""The audit log: one hash chain of every change, on the memory store.

Tampering is simulated on the stored lines (what a store hands back), then
checked with :func:`reskit._audit.verify` against the head the store keeps.
"""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reskit
from reskit import AuditEntry, Verification
from reskit._audit import (
    GENESIS,
    MAX_ENTRY_BYTES,
    AuditHead,
    canonical,
    entries_from_json_lines,
    verify,
)
from reskit._store import current_store
from reskit.stores import MemoryStore
from reskit.testing import FakeClock

FIELDS = ("seq", "time", "actor", "action", "target", "reason", "before", "after", "prev", "hash")


# -- helpers -------------------------------------------------------------------------------------


def build_chain(n: int) -> tuple[list[str], AuditHead]:
    """``n`` entries chained by hand, and the head a store would keep."""
    lines: list[str] = []
    head = AuditHead()
    for i in range(n):
        entry = AuditEntry.make(
            seq=i,
            time=1_790_000_000.0 + i * 1.5,
            actor=f"actor-{i}",
            action="kill" if i % 2 == 0 else "revive",
            target=f"switch:s{i % 3}",
            reason=f"reason {i}",
            before=None if i == 0 else {"killed": i % 2 == 0, "n": i - 1},
            after={"killed": i % 2 == 1, "n": i},
            prev=head.hash,
        )
        lines.append(entry.to_json())
        head = head.after(entry)
    return lines, head


def edited(line: str, field: str, value: Any) -> str:
    data = json.loads(line)
    data[field] = value
    return canonical(data)


def flip_hex(text: str) -> str:
    return ("1" if text[0] != "1" else "2") + text[1:]


def changed_value(field: str, old: Any) -> Any:
    """A different value of the same kind for ``field``."""
    if field == "seq":
        return old + 1
    if field == "time":
        return old + 0.5
    if field in ("prev", "hash"):
        return flip_hex(old)
    if field in ("before", "after"):
        return {"tampered": True} if old is None else None
    return old + "!"


def store_ops(clock: FakeClock) -> list[AuditEntry]:
    """One of every kind of change, a second apart; the entries they return."""
    ops: list[Callable[[], AuditEntry]] = [
        lambda: reskit.kill("pay", reason="outage", actor="alice", ttl=30),
        lambda: reskit.revive("pay", reason="fixed", actor="bob"),
        lambda: reskit.set_brownout_level(3, reason="load", actor="carol"),
        lambda: reskit.set_brownout_level(5, tenant="acme", reason="noisy", actor="dave"),
        lambda: reskit.set_brownout_level(None, tenant="acme", reason="calm", actor="dave"),
        lambda: reskit.force_breaker("db", "open", reason="failover", actor="erin"),
        lambda: reskit.force_breaker("db", "closed", reason="flapping", actor="erin"),
        lambda: reskit.release_breaker("db", reason="stable", actor="frank"),
    ]
    entries = []
    for op in ops:
        clock.advance(1)
        entries.append(op())
    return entries


@pytest.fixture
def chain(clock: FakeClock) -> tuple[list[str], AuditHead]:
    store_ops(clock)
    store = current_store()
    head = store.audit_head()
    assert head is not None
    return store.audit_lines(), head


# -- what each change appends ----------------------------------------------------------------


def test_every_change_appends_exactly_one_entry(clock: FakeClock) -> None:
    store = current_store()
    assert store.audit_lines() == []
    assert store.audit_head() == AuditHead(-1, GENESIS)
    t = clock.wall

    clock.advance(1)
    kill = reskit.kill("pay", reason="outage", actor="alice", ttl=30)
    assert len(store.audit_lines()) == 1
    killed = {
        "killed": True,
        "reason": "outage",
        "actor": "alice",
        "at": t(),
        "until": t() + 30,
        "last_killed": t(),
    }
    assert kill.body() == {
        "seq": 0,
        "time": t(),
        "actor": "alice",
        "action": "kill",
        "target": "switch:pay",
        "reason": "outage",
        "before": None,
        "after": killed,
        "prev": GENESIS,
    }
    assert kill.is_intact()
    kill_time = t()

    clock.advance(1)
    revive = reskit.revive("pay", reason="fixed", actor="bob")
    assert len(store.audit_lines()) == 2
    assert revive.body() == {
        "seq": 1,
        "time": t(),
        "actor": "bob",
        "action": "revive",
        "target": "switch:pay",
        "reason": "fixed",
        "before": killed,
        "after": {
            "killed": False,
            "reason": "fixed",
            "actor": "bob",
            "at": t(),
            "until": None,
            "last_killed": kill_time,
        },
        "prev": kill.hash,
    }

    clock.advance(1)
    level = reskit.set_brownout_level(3, reason="load", actor="carol")
    assert len(store.audit_lines()) == 3
    assert level.body() == {
        "seq": 2,
        "time": t(),
        "actor": "carol",
        "action": "brownout",
        "target": "brownout",
        "reason": "load",
        "before": None,
        "after": {"level": 3, "reason": "load", "actor": "carol", "at": t()},
        "prev": revive.hash,
    }

    clock.advance(1)
    tenant = reskit.set_brownout_level(5, tenant="acme", reason="noisy", actor="dave")
    tenant_after = {"level": 5, "reason": "noisy", "actor": "dave", "at": t()}
    assert (tenant.seq, tenant.target, tenant.before, tenant.after, tenant.prev) == (
        3,
        "brownout:acme",
        None,
        tenant_after,
        level.hash,
    )

    clock.advance(1)
    removed = reskit.set_brownout_level(None, tenant="acme", reason="calm", actor="dave")
    assert (removed.seq, removed.action, removed.target) == (4, "brownout", "brownout:acme")
    assert (removed.before, removed.after, removed.prev) == (tenant_after, None, tenant.hash)

    clock.advance(1)
    forced = reskit.force_breaker("db", "open", reason="failover", actor="erin")
    forced_after = {"mode": "forced_open", "reason": "failover", "actor": "erin", "at": t()}
    assert forced.body() == {
        "seq": 5,
        "time": t(),
        "actor": "erin",
        "action": "breaker.force_open",
        "target": "breaker:db",
        "reason": "failover",
        "before": None,
        "after": forced_after,
        "prev": removed.hash,
    }

    clock.advance(1)
    disabled = reskit.force_breaker("db", "closed", reason="flapping", actor="erin")
    disabled_after = {"mode": "forced_closed", "reason": "flapping", "actor": "erin", "at": t()}
    assert (disabled.action, disabled.before, disabled.after, disabled.prev) == (
        "breaker.force_closed",
        forced_after,
        disabled_after,
        forced.hash,
    )

    clock.advance(1)
    released = reskit.release_breaker("db", reason="stable", actor="frank")
    assert released.body() == {
        "seq": 7,
        "time": t(),
        "actor": "frank",
        "action": "breaker.release",
        "target": "breaker:db",
        "reason": "stable",
        "before": disabled_after,
        "after": None,
        "prev": disabled.hash,
    }

    entries = [kill, revive, level, tenant, removed, forced, disabled, released]
    assert store.audit() == entries
    assert [e.time for e in entries] == [1_790_000_000.0 + i for i in range(1, 9)]
    assert all(e.is_intact() for e in entries)
    assert store.audit_head() == AuditHead(7, released.hash)
    assert store.audit(last=2) == entries[-2:]
    assert store.audit(last=0) == []
    result = store.verify_audit()
    assert result == Verification(True, 8)
    assert str(result) == "audit log intact: 8 entries, one unbroken chain"


def test_the_audit_of_a_new_store_starts_a_new_chain(clock: FakeClock) -> None:
    store_ops(clock)
    from reskit._store import configure

    configure(MemoryStore())
    entry = reskit.kill("x", reason="r", actor="a")
    assert (entry.seq, entry.prev) == (0, GENESIS)


def test_a_change_that_cannot_be_hashed_changes_nothing() -> None:
    # A lone surrogate cannot be encoded as UTF-8, so it cannot be hashed.
    with pytest.raises(ValueError):
        reskit.kill("pay", reason="bad \ud800", actor="a")
    assert current_store().audit_lines() == []
    assert reskit.is_killed("pay") is False


# -- tampering is found at the entry it touched --------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("position", range(8))
def test_editing_any_field_of_any_entry_is_found_there(
    chain: tuple[list[str], AuditHead], position: int, field: str
) -> None:
    lines, head = chain
    assert verify(lines, head).ok
    old = json.loads(lines[position])[field]
    lines[position] = edited(lines[position], field, changed_value(field, old))
    result = verify(lines, head)
    assert result.ok is False
    assert result.position == position
    assert result.checked == position + 1
    expected = {
        "seq": "sequence number",
        "prev": "link to the previous entry",
    }.get(field, "edited after writing")
    assert result.problem is not None
    assert expected in result.problem
    assert str(result).startswith(f"audit log broken at entry {position}: ")


@pytest.mark.parametrize("position", range(8))
def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(
    chain: tuple[list[str], AuditHead], position: int
) -> None:
    lines, head = chain
    entry = AuditEntry.from_json(lines[position])
    forged = AuditEntry.make(**{**entry.body(), "reason": "nothing to see"})
    lines[position] = forged.to_json()
    result = verify(lines, head)
    assert result.ok is False
    assert result.position == (position + 1 if position < 7 else 7)
    assert result.problem is not None
    if position < 7:
        assert "link to the previous entry" in result.problem
    else:
        assert "does not end where its head says" in result.problem


@pytest.mark.parametrize(("deleted", "position"), [(0, 0), (3, 3), (7, 7)])
def test_deleting_an_entry_is_found_where_it_was(
    chain: tuple[list[str], AuditHead], deleted: int, position: int
) -> None:
    lines, head = chain
    del lines[deleted]
    result = verify(lines, head)
    assert result.ok is False
    assert result.position == position
    assert result.problem is not None
    if deleted == 7:
        assert "cut off the end" in result.problem
    else:
        assert f"sequence number {deleted + 1} where {deleted} belongs" in result.problem


@pytest.mark.parametrize(("i", "j"), [(0, 1), (2, 3), (1, 6), (6, 7), (0, 7)])
def test_reordering_two_entries_is_found_at_the_first(
    chain: tuple[list[str], AuditHead], i: int, j: int
) -> None:
    lines, head = chain
    lines[i], lines[j] = lines[j], lines[i]
    result = verify(lines, head)
    assert result.ok is False
    assert result.position == i
    assert result.problem is not None
    assert "reordered" in result.problem


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_truncating_the_tail_shows_against_the_head(
    chain: tuple[list[str], AuditHead], cut: int
) -> None:
    lines, head = chain
    result = verify(lines[:-cut], head)
    assert result.ok is False
    assert result.position == 8 - cut
    assert result.checked == 8 - cut
    assert result.problem == (
        f"the log ends after {8 - cut} entries but its head records 8 "
        "(entries were cut off the end)"
    )


@pytest.mark.parametrize("cut", [1, 2, 7])
def test_truncating_the_head_is_found_at_the_start(
    chain: tuple[list[str], AuditHead], cut: int
) -> None:
    lines, head = chain
    result = verify(lines[cut:], head)
    assert result.ok is False
    assert result.position == 0
    assert result.problem is not None
    assert f"sequence number {cut} where 0 belongs" in result.problem


def test_a_replayed_entry_is_found(chain: tuple[list[str], AuditHead]) -> None:
    lines, head = chain
    lines.insert(4, lines[3])
    result = verify(lines, head)
    assert (result.ok, result.position) == (False, 4)


def test_entries_appended_outside_reskit_show_against_the_head(
    chain: tuple[list[str], AuditHead],
) -> None:
    lines, head = chain
    last = AuditEntry.from_json(lines[-1])
    extra = AuditEntry.make(**{**last.body(), "seq": 8, "prev": last.hash, "reason": "sneaky"})
    lines.append(extra.to_json())
    result = verify(lines, head)
    assert result.ok is False
    assert result.position == 8
    assert result.problem is not None
    assert "does not end where its head says" in result.problem


def test_a_head_pointing_elsewhere_is_found(chain: tuple[list[str], AuditHead]) -> None:
    lines, head = chain
    result = verify(lines, AuditHead(head.seq, flip_hex(head.hash)))
    assert (result.ok, result.position) == (False, 7)


def test_an_unreadable_entry_is_named(chain: tuple[list[str], AuditHead]) -> None:
    lines, head = chain
    lines[5] = "\x80\x04\x95 not json"
    result = verify(lines, head)
    assert (result.ok, result.position, result.checked) == (False, 5, 6)
    assert result.problem is not None
    assert result.problem.startswith("unreadable (")


def test_tampering_the_memory_store_is_found_by_verify_audit(clock: FakeClock) -> None:
    store_ops(clock)
    store = current_store()
    assert isinstance(store, MemoryStore)
    store._lines[2] = edited(store._lines[2], "actor", "mallory")
    result = store.verify_audit()
    assert (result.ok, result.position) == (False, 2)
    # Reading leaves nothing out (the entry parses); verifying is what catches it.
    assert [e.actor for e in store.audit()][2] == "mallory"
    store._lines[4] = "{not json"
    assert len(store.audit()) == 7  # the unreadable one is left out
    assert store.verify_audit().position == 2  # still the first bad one


def test_an_empty_log() -> None:
    assert verify([], AuditHead()) == Verification(True, 0)
    assert verify([], None) == Verification(True, 0)
    result = verify([], AuditHead(2, "f" * 64))
    assert (result.ok, result.position) == (False, 0)
    assert result.problem is not None
    assert "head records 3" in result.problem


def test_without_a_head_edits_are_still_found_but_not_a_cut_tail(
    chain: tuple[list[str], AuditHead],
) -> None:
    lines, _ = chain
    assert verify(lines[:-3], None).ok  # documented: the head is what shows a cut tail
    assert verify(lines[2:], None).position == 0
    lines[1] = edited(lines[1], "reason", "x")
    assert verify(lines, None).position == 1


def test_verify_takes_entries_text_or_bytes(chain: tuple[list[str], AuditHead]) -> None:
    lines, head = chain
    assert verify([AuditEntry.from_json(line) for line in lines], head).ok
    assert verify([line.encode() for line in lines], head).ok
    assert verify(iter(lines), head) == Verification(True, 8)


# -- hypothesis: any tampering is found, and where ------------------------------------------

N = 6
LINES, HEAD = build_chain(N)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(position=st.integers(0, N - 1), field=st.sampled_from(FIELDS), value=json_values)
def test_any_single_field_edit_is_found_at_its_entry(position: int, field: str, value: Any) -> None:
    old = json.loads(LINES[position])[field]
    assume(canonical(value) != canonical(old))
    lines = list(LINES)
    lines[position] = edited(lines[position], field, value)
    result = verify(lines, HEAD)
    assert result.ok is False
    assert result.position == position


@given(
    position=st.integers(0, N - 1),
    start=st.integers(0, 10_000),
    replacement=st.text(min_size=1, max_size=3),
)
def test_any_byte_level_edit_is_found_at_its_entry(
    position: int, start: int, replacement: str
) -> None:
    line = LINES[position]
    at = start % len(line)
    changed = line[:at] + replacement + line[at + len(replacement) :]
    assume(changed != line)
    # Same JSON in another spelling (e.g. "1.0" vs "1.00") is not an edit of the entry.
    try:
        assume(canonical(json.loads(changed)) != line)
    except ValueError:
        pass
    lines = list(LINES)
    lines[position] = changed
    result = verify(lines, HEAD)
    assert result.ok is False
    assert result.position == position


@given(order=st.lists(st.integers(0, N - 1), max_size=N + 2))
def test_any_rearrangement_fails_at_the_first_difference(order: list[int]) -> None:
    lines = [LINES[i] for i in order]
    result = verify(lines, HEAD)
    if order == list(range(N)):
        assert result == Verification(True, N)
        return
    first = next(i for i in range(max(len(order), N)) if i >= len(order) or i >= N or order[i] != i)
    assert result.ok is False
    assert result.position == first


# -- concurrent appends ------------------------------------------------------------------------


@pytest.fixture
def eager_switching() -> Iterator[None]:
    """Threads switch every microsecond, so races happen in every run, not once in a while."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_concurrent_appends_form_one_chain(eager_switching: None) -> None:
    threads_n, each = 32, 25
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []
    returned: list[AuditEntry] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        barrier.wait()
        try:
            for i in range(each):
                actor = f"writer-{t}"
                if i % 4 == 0:
                    entry = reskit.kill(f"s{t}", reason=f"r{i}", actor=actor)
                elif i % 4 == 1:
                    entry = reskit.revive(f"s{t}", reason=f"r{i}", actor=actor)
                elif i % 4 == 2:
                    entry = reskit.set_brownout_level(i, tenant=f"t{t}", reason="b", actor=actor)
                else:
                    entry = reskit.force_breaker(f"b{t % 3}", "open", reason="f", actor=actor)
                with lock:
                    returned.append(entry)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = current_store()
    entries = store.audit()
    total = threads_n * each
    assert len(entries) == total
    assert [e.seq for e in entries] == list(range(total))
    assert [e.prev for e in entries] == [GENESIS, *(e.hash for e in entries[:-1])]
    assert sorted(entries, key=lambda e: e.seq) == sorted(returned, key=lambda e: e.seq)
    per_actor: dict[str, int] = {}
    for e in entries:
        per_actor[e.actor] = per_actor.get(e.actor, 0) + 1
    assert per_actor == {f"writer-{t}": each for t in range(threads_n)}
    assert store.verify_audit() == Verification(True, total)
    assert store.audit_head() == AuditHead(total - 1, entries[-1].hash)


# -- reading entries back ----------------------------------------------------------------------

GOOD = json.loads(LINES[1])


def with_(**changes: Any) -> str:
    return canonical({**GOOD, **changes})


def test_a_good_entry_round_trips() -> None:
    entry = AuditEntry.from_json(LINES[1])
    assert entry.to_json() == LINES[1]
    assert AuditEntry.from_json(LINES[1].encode()) == entry
    assert entry.is_intact()
    # Canonical: sorted keys, no spaces.
    assert LINES[1] == json.dumps(json.loads(LINES[1]), sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize(
    "text", ["", "{", '{"seq": 0,', "nul", "{'seq': 0}", b"\xff\xfe{}", "\x00"]
)
def test_from_json_rejects_malformed_json(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        AuditEntry.from_json(text)


@pytest.mark.parametrize("text", ["[]", "[1, 2]", "0", '"entry"', "null", "true", "1.5"])
def test_from_json_rejects_non_objects(text: str) -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        AuditEntry.from_json(text)


@pytest.mark.parametrize("field", FIELDS)
def test_from_json_rejects_a_missing_field(field: str) -> None:
    data = dict(GOOD)
    del data[field]
    with pytest.raises(ValueError, match=f"lacks the field '{field}'"):
        AuditEntry.from_json(canonical(data))


def test_from_json_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown fields: \['extra'\]"):
        AuditEntry.from_json(with_(extra=1))
    with pytest.raises(ValueError, match=r"unknown fields: \['a', 'z'\]"):
        AuditEntry.from_json(with_(z=None, a="x"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("actor", 1),
        ("action", None),
        ("target", ["switch:x"]),
        ("reason", {"why": "x"}),
        ("prev", 0),
        ("hash", None),
        ("seq", "1"),
        ("seq", 1.0),
        ("seq", True),
        ("seq", None),
        ("time", "yesterday"),
        ("time", None),
        ("time", [1]),
    ],
)
def test_from_json_rejects_wrong_types(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{field}|seq or time"):
        AuditEntry.from_json(with_(**{field: value}))


def test_from_json_rejects_a_boolean_time() -> None:
    with pytest.raises(ValueError, match="time"):
        AuditEntry.from_json(with_(time=True))


def test_from_json_accepts_an_integer_time() -> None:
    entry = AuditEntry.from_json(with_(time=1_790_000_000))
    assert entry.time == 1_790_000_000


def _padded_entry(size: int, fill: str = "x") -> str:
    """A well-formed entry whose text is exactly ``size`` characters long."""
    base = with_(reason="")
    return with_(reason=fill * (size - len(base)))


def test_from_json_accepts_an_entry_at_the_size_limit() -> None:
    text = _padded_entry(MAX_ENTRY_BYTES)
    assert len(text) == MAX_ENTRY_BYTES
    entry = AuditEntry.from_json(text)
    assert len(entry.reason) > 60_000


@pytest.mark.parametrize("as_bytes", [False, True])
def test_from_json_rejects_oversized_input_unread(as_bytes: bool) -> None:
    text = _padded_entry(MAX_ENTRY_BYTES + 1)
    with pytest.raises(ValueError, match="over the limit"):
        AuditEntry.from_json(text.encode() if as_bytes else text)
    # Never parsed: even garbage of that size is refused for its size.
    with pytest.raises(ValueError, match="over the limit"):
        AuditEntry.from_json("[" * (10 * MAX_ENTRY_BYTES))


def test_from_json_limit_is_in_bytes_for_text_too() -> None:
    text = _padded_entry(MAX_ENTRY_BYTES - 1000, fill="\u20ac")
    assert len(text.encode()) > 2 * MAX_ENTRY_BYTES
    with pytest.raises(ValueError, match="over the limit"):
        AuditEntry.from_json(text)


# -- exports -------------------------------------------------------------------------------------


def test_entries_from_json_lines_round_trips_an_export(clock: FakeClock) -> None:
    written = store_ops(clock)
    store = current_store()
    export = "\n".join(store.audit_lines()) + "\n\n   \n"
    parsed = list(entries_from_json_lines(io.StringIO(export)))
    assert parsed == written == store.audit()
    assert verify(parsed, store.audit_head()) == Verification(True, len(written))
    # Indented or CRLF lines read the same.
    crlf = "".join(f"  {line}\r\n" for line in store.audit_lines())
    assert list(entries_from_json_lines(crlf.splitlines(True))) == written


def test_entries_from_json_lines_refuses_a_bad_line(clock: FakeClock) -> None:
    store_ops(clock)
    lines = current_store().audit_lines()
    lines.insert(2, '{"seq": 2}')
    parsed = entries_from_json_lines(lines)
    assert next(parsed).seq == 0
    assert next(parsed).seq == 1
    with pytest.raises(ValueError, match="lacks the field"):
        next(parsed)


@settings(max_examples=50)
@given(
    actor=st.text(min_size=1, max_size=30),
    reason=st.text(min_size=1, max_size=30),
    before=json_values,
    after=json_values,
    time=st.floats(0, 4e9, allow_nan=False),
)
def test_any_entry_round_trips_and_stays_intact(
    actor: str, reason: str, before: Any, after: Any, time: float
) -> None:
    entry = AuditEntry.make(
        seq=3,
        time=time,
        actor=actor,
        action="kill",
        target="switch:x",
        reason=reason,
        before=before,
        after=after,
        prev=GENESIS,
    )
    again = AuditEntry.from_json(entry.to_json())
    assert again.to_json() == entry.to_json()
    assert again.is_intact()
    assert list(entries_from_json_lines([entry.to_json()])) == [again]

"""The done table at scale (ledger/domain.py DoneTable, DoneBase): rows that reached a snapshot
live in flat columns with a keyed hash table over them, and every lookup stays exact: a retried
client id gets the same answer forever, after any number of snapshots and restarts.

First the table alone (no store), then whole writers on SQLite and PostgreSQL: every client id in
the log, sent again after a restart from a snapshot, gets exactly the answer (and record) a full
replay gives."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import START_MS, FakeClock  # type: ignore[import-not-found]
from test_snapshots import (  # type: ignore[import-not-found]
    _assert_same,
    _fallback_is_full,
    _full,
    _rewrite,
    _table,
    _writer,
    build,
)
from workload import CHECKER, PLATFORM  # type: ignore[import-not-found]

from controls.policy import DAY_MS
from ledger import commands as c
from ledger import domain, records, snapshot
from ledger.config import Config
from ledger.domain import DONE_KEY_LEN, Done, DoneBase, DoneTable, PlatformState, StateError
from ledger.service import LedgerService
from ledger.store import log_stream
from ledger.writer import PlatformWriter, Request

KINDS = ["transferred", "deposited", "hold_placed", "approval_requested", "fee_charged"]


def _cid(rng: random.Random, i: int) -> str:
    """Client ids of many shapes: short, long, non-ASCII, prefixes of one another."""
    shape = i % 4
    if shape == 0:
        return f"t{i}"
    if shape == 1:
        return f"t{i}-" + "x" * rng.randrange(0, 60)
    if shape == 2:
        return f"überweisung-{i}-€" if i % 3 else f"lone-{i}-\ud800"  # any str is a key
    return f"{i:x}"


def _rows(n: int, seed: int, start: int = 0) -> dict[str, Done]:
    rng = random.Random(seed)
    out: dict[str, Done] = {}
    for i in range(start, start + n):
        cid = _cid(rng, i)
        out[cid] = Done(rng.getrandbits(128), i, rng.choice(KINDS), [["a", "b", i + 1]])
    return out


def _same_row(got: Done | None, want: Done) -> None:
    assert got is not None
    assert (got.fingerprint, got.seq, got.kind, got.reversed_by) == (
        want.fingerprint,
        want.seq,
        want.kind,
        want.reversed_by,
    )


def _absent(present: dict[str, Done]) -> list[str]:
    """Near misses of present client ids: one character more or less, other case."""
    near = []
    for cid in list(present)[:500]:
        near += [cid + "0", cid[:-1], cid.upper(), "x" + cid]
    return [n for n in near if n not in present]


def test_frozen_rows_are_found_exactly_and_absent_ones_are_not() -> None:
    table = DoneTable()
    first = _rows(3000, seed=1)
    for cid, done in first.items():
        assert table.add(cid, done)
    table.freeze(os.urandom(DONE_KEY_LEN))
    assert table.base is not None and table.base.n == 3000 and not table.rows
    more = _rows(5000, seed=2, start=3000)  # enough to grow the hash table twice
    for cid, done in more.items():
        assert cid not in table
        assert table.add(cid, done)
    bits = table.base.bits
    table.freeze()
    assert table.base.bits > bits
    everything = {**first, **more}
    assert len(table) == len(everything)
    assert list(table) == list(everything)  # insertion order, across freezes
    for cid, done in everything.items():
        assert cid in table
        _same_row(table.get(cid), done)
        assert not table.add(cid, done)  # accepted twice: refused
    for cid in _absent(everything):
        assert cid not in table
        assert table.get(cid) is None
    with pytest.raises(KeyError):
        table["never-seen"]


class _Constant:
    """A "hash" that gives every client id the same tag."""

    def copy(self) -> _Constant:
        return self

    def update(self, data: bytes) -> None:
        pass

    def digest(self) -> bytes:
        return b"\x00\x01\x02\x03"


def test_lookups_stay_exact_when_every_hash_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash only finds a slot; the client id decides. All rows on one tag still works."""
    monkeypatch.setattr(domain, "_keyed", lambda key: _Constant())
    table = DoneTable()
    rows = _rows(300, seed=3)
    for cid, done in rows.items():
        table[cid] = done
    table.freeze(os.urandom(DONE_KEY_LEN))
    for cid, done in rows.items():
        _same_row(table.get(cid), done)
    for cid in _absent(rows):
        assert cid not in table


class _Failing:
    """A hash that breaks after `left` client ids (to fail a freeze half-way)."""

    def __init__(self, inner: Any, left: int) -> None:
        self.inner, self.left = inner, left

    def copy(self) -> Any:
        self.left -= 1
        if self.left < 0:
            raise MemoryError("injected")
        return self.inner.copy()


def test_a_failed_freeze_changes_nothing() -> None:
    table = DoneTable()
    old = _rows(100, seed=6)
    for cid, done in old.items():
        table.add(cid, done)
    base = table.freeze(os.urandom(DONE_KEY_LEN))
    before = (
        bytes(base.cids),
        base.offsets.tolist(),
        bytes(base.fps),
        base.seqs.tolist(),
        bytes(base.kinds),
        base.table.tolist(),
        base.n,
        list(base.kind_names),
    )
    new = _rows(20, seed=7, start=100)
    new["odd-kind"] = Done(1, 120, "a_kind_never_seen", None)
    for cid, done in new.items():
        table.add(cid, done)
    table.add("too-big", Done(1 << 130, 121, "transferred", None))  # no 16-byte fingerprint
    with pytest.raises(OverflowError):
        table.freeze()
    del table.rows["too-big"]
    base.keyed = _Failing(base.keyed, 10)  # the 11th client id's hash fails
    with pytest.raises(MemoryError):
        table.freeze()
    after = (
        bytes(base.cids),
        base.offsets.tolist(),
        bytes(base.fps),
        base.seqs.tolist(),
        bytes(base.kinds),
        base.table.tolist(),
        base.n,
        list(base.kind_names),
    )
    assert after == before
    base.keyed = base.keyed.inner
    assert len(table) == 121 and table.rows  # the new rows are still where they were
    table.freeze()
    for cid, done in {**old, **new}.items():
        _same_row(table.get(cid), done)


def test_a_miss_remembered_for_add_is_forgotten_at_freeze() -> None:
    table = DoneTable()
    table.add("a", Done(1, 0, "transferred", None))
    table.freeze(os.urandom(DONE_KEY_LEN))
    assert "b" not in table  # remembered as a miss
    assert table.add("b", Done(2, 1, "transferred", None))
    table.freeze()
    assert not table.add("b", Done(3, 2, "transferred", None))  # now in the base
    assert not table.add("a", Done(3, 2, "transferred", None))
    assert len(table) == 2


def test_reversal_marks_on_frozen_rows_persist_and_roll_back() -> None:
    state = PlatformState("p")
    rows = _rows(50, seed=4)
    for cid, done in rows.items():
        state.add_done(cid, done)
    state.done.freeze(os.urandom(DONE_KEY_LEN))
    first, second = list(rows)[:2]
    state.mark_reversed(first, "rev-1", 100)
    assert state.done[first] is state.done.get(first)  # one object per row, once read
    assert state.done[first].reversed_by == "rev-1"
    sp = state.savepoint()
    state.mark_reversed(second, "rev-2", 101)
    state.add_done("new", Done(9, 101, "transferred", None))
    state.rollback(sp)
    assert state.done[second].reversed_by is None and "new" not in state.done
    with pytest.raises(StateError):
        state.mark_reversed(first, "rev-3", 102)  # already reversed
    base = state.done.freeze()
    assert base.reversed == {first: "rev-1"}
    assert state.done[first].reversed_by == "rev-1" and state.done[second].reversed_by is None


def test_frozen_postings_come_from_the_source_or_fail_clearly() -> None:
    table = DoneTable()
    table.add("m", Done(1, 7, "transferred", [["a", "b", 5]]))
    base = table.freeze(os.urandom(DONE_KEY_LEN))
    with pytest.raises(StateError, match="in the store"):
        _ = table["m"].entries
    base.source = lambda seq, kind: [["a", "b", seq]]
    table.loaded.clear()
    assert table["m"].entries == [["a", "b", 7]]


def test_columns_load_from_a_body_without_copying() -> None:
    """What restore does: memoryviews over the payload's bytes; the same answers."""
    table = DoneTable()
    rows = _rows(2000, seed=5)
    for cid, done in rows.items():
        table.add(cid, done)
    base = table.freeze(os.urandom(DONE_KEY_LEN))
    blob = {
        n: memoryview(bytes(memoryview(getattr(base, n)).cast("B")))
        for n in base.__slots__
        if n in ("cids", "offsets", "fps", "seqs", "kinds", "table")
    }
    loaded = DoneBase(
        base.key,
        base.kind_names,
        blob["cids"],
        blob["offsets"].cast("Q"),
        blob["fps"],
        blob["seqs"].cast("q"),
        blob["kinds"],
        blob["table"].cast("Q"),
        {},
    )
    again = DoneTable()
    again.base = loaded
    for cid, done in rows.items():
        _same_row(again.get(cid), done)
    again.add("later", Done(1, 2000, "transferred", None))
    again.freeze()  # grows out of the read-only views into arrays
    assert "later" in again and list(again)[:-1] == list(rows)
    with pytest.raises(ValueError):  # a column that does not fit the others
        DoneBase(
            base.key,
            base.kind_names,
            b"",
            blob["offsets"].cast("Q"),
            b"",
            b"",
            b"",
            blob["table"].cast("Q"),
            {},
        )


# -- whole writers ---------------------------------------------------------------------------------


@pytest.fixture
def built(store_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Config, LedgerService]]:
    cfg = build(store_env, tmp_path / "data", batches=12, snapshot_after=8)
    svc = LedgerService(cfg, clock_ms=FakeClock(START_MS + 3 * DAY_MS))
    try:
        yield cfg, svc
    finally:
        svc.close()


def _every_instruction_again(writer: PlatformWriter) -> list[Request]:
    """Every accepted instruction of the log, sent again by its actor (one request each)."""
    out = []
    for _, kind, packed in writer.store.iter_rows(writer.stream):
        if kind == records.REFUSED_KIND:
            continue
        rec = records.decode(packed[records.HASH_LEN :])
        if "cid" not in rec:
            continue
        cmd: Any = msgspec.convert(rec["cmd"], c.AnyCommand)
        out.append(Request([cmd], rec["actor"]))
    return out


def _answers(writer: PlatformWriter, requests: list[Request]) -> tuple[Any, Any]:
    prepared = writer.prepare(requests)
    return prepared.answers, prepared.rows


def test_every_client_id_gets_its_answer_after_a_snapshot_restart(
    built: tuple[Config, LedgerService],
) -> None:
    _, svc = built
    fast = _writer(svc, use_snapshots=True)
    assert fast.snapshot_position > 0
    base = fast.state.done.base
    assert base is not None and base.n > 100  # most client ids are in the frozen base
    full = _full(svc)
    requests = _every_instruction_again(full)
    answers, rows = _answers(fast, requests)
    assert (answers, rows) == _answers(full, requests)
    statuses = [o.status for group in answers for o in group]
    assert statuses.count("replayed") > len(statuses) // 2
    assert len(fast.state.done) == len(full.state.done)


def test_answers_stay_after_snapshots_of_restored_writers(
    built: tuple[Config, LedgerService],
) -> None:
    """A snapshot of a snapshot-loaded writer (rows added to an existing base), restarted
    again: still every client id answered as a full replay does; reversals of base rows read
    their postings from their records and are refused a second time."""
    _, svc = built
    first = _writer(svc, use_snapshots=True)
    victim = next(
        cid
        for cid in first.state.done
        if first.state.done[cid].kind == "transferred" and first.state.done[cid].reversed_by is None
    )
    reverse = Request(
        [c.Reverse(client_id="rev-base", movement_id=victim, reason="e")], "operator:alice"
    )
    approve = Request([c.ApproveRequest(client_id="ok-rev", request_id="rev-base")], CHECKER)
    [[asked]], [[done]] = first.execute([reverse]), first.execute([approve])
    assert (asked.status, done.status) == ("pending", "accepted")
    marked = first.state.done[victim].reversed_by
    assert marked is not None
    assert first.save_snapshot() == first.state.next_seq
    second = _writer(svc, use_snapshots=True)
    assert second.snapshot_position == first.state.next_seq
    assert second.state.done[victim].reversed_by == marked
    full = _full(svc)
    _assert_same(second, full)
    again = [
        *_every_instruction_again(full),
        reverse,
        approve,
        Request([c.Reverse(client_id="rev-2", movement_id=victim, reason="e")], "operator:alice"),
    ]
    assert _answers(second, again) == _answers(full, again)


def test_a_v1_snapshot_is_refused_and_the_log_replayed(
    built: tuple[Config, LedgerService],
) -> None:
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    body = _table(svc).body(PLATFORM, position)
    v1 = snapshot.MAGIC_V1 + body[len(snapshot.MAGIC) :]
    _rewrite(svc, position, v1)
    with pytest.raises(snapshot.SnapshotError, match="v1 is no longer read"):
        snapshot.open_body(v1)
    _fallback_is_full(svc)
    assert svc.store.last_row(log_stream(PLATFORM)) is not None


def test_a_big_full_replay_is_compacted_before_serving(
    built: tuple[Config, LedgerService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SETTLE_MIN_ROWS a full replay moves the done rows into the base itself (so the first
    capture does not, under the platform lock); the state and every answer stay the same."""
    _, svc = built
    monkeypatch.setattr(snapshot, "SETTLE_MIN_ROWS", 1)
    settled = _full(svc)
    assert settled.state.done.base is not None and not settled.state.done.rows
    monkeypatch.setattr(snapshot, "SETTLE_MIN_ROWS", 10**9)
    plain = _full(svc)
    assert plain.state.done.base is None and plain.state.done.rows
    _assert_same(settled, plain)
    requests = _every_instruction_again(plain)
    assert _answers(settled, requests) == _answers(plain, requests)

"""The runner: rebuild equality, incremental = one shot, live balances, as-of = prefix replay."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
from helpers import FakeClock, balances, last_position, log_records
from proj_workload import append_raw, prefix_states, run_workload

from ledger.domain import ASSET_KINDS
from ledger.service import LedgerService
from projections import statements as st
from projections.audit_trail import AUDIT_RUNS, AuditFilter, audit_page
from projections.base import (
    NotProjected,
    PositionConflict,
    ProjectionError,
    key_range,
    platform_number,
)
from projections.db import Db
from projections.runner import EmbeddedRunner, ProjectionRunner

STEPS = 400


@pytest.fixture
def workload(service: LedgerService, clock: FakeClock) -> LedgerService:
    run_workload(service, clock, STEPS)
    return service


def test_rebuild_is_byte_identical(workload: LedgerService) -> None:
    runner = ProjectionRunner(workload.store, batch_size=7)
    runner.catch_up()
    first = b"\n".join(runner.dump("p1"))
    assert first
    runner.rebuild("p1")
    assert b"\n".join(runner.dump("p1")) == first
    runner.rebuild()  # every platform
    other = ProjectionRunner(workload.store, batch_size=10_000)  # another batching, same rows
    other.rebuild()
    assert b"\n".join(other.dump("p1")) == first
    assert other.digest("p1") == runner.digest("p1")


def test_following_while_writing_equals_one_shot(service: LedgerService, clock: FakeClock) -> None:
    runner = ProjectionRunner(service.store, batch_size=13)
    for seed in range(3):
        run_workload(service, clock, 60, seed=seed)
        runner.catch_up("p1")
    incremental = runner.digest("p1")
    runner.rebuild("p1")
    assert runner.digest("p1") == incremental
    [s_stmt, s_audit] = runner.status("p1")
    assert s_stmt.position == s_audit.position == last_position(service, "p1")
    assert s_stmt.lag == 0


def test_statements_match_the_live_balances(workload: LedgerService) -> None:
    runner = ProjectionRunner(workload.store, batch_size=50)
    runner.catch_up("p1")
    live = balances(workload, "p1")
    for account, (posted, held, available) in live.items():
        b = st.balance_at(runner.db, "p1", account)
        assert (b.posted_minor, b.held_minor) == (posted, held), account
        if b.kind not in ASSET_KINDS:
            assert b.available_minor == available, account
    projected = {r["account"]: r for r in st.current_balances(runner.db, "p1")}
    assert set(projected) == set(live)
    for account, (posted, held, _) in live.items():
        assert (projected[account]["posted_minor"], projected[account]["held_minor"]) == (
            posted,
            held,
        )


def test_as_of_equals_replaying_the_log_prefix(workload: LedgerService) -> None:
    runner = ProjectionRunner(workload.store, batch_size=64)
    runner.catch_up("p1")
    db = runner.db
    rnd = random.Random(5)
    last = last_position(workload, "p1")
    samples = set(rnd.sample(range(last + 1), 40)) | {0, last}
    ts_by_seq: dict[int, int] = {}
    expected_at: dict[int, dict[str, tuple[int, int]]] = {}
    for seq, ts, state in prefix_states(workload, "p1"):
        ts_by_seq[seq] = ts
        if seq in samples:
            expected_at[seq] = {
                a.id: (a.posted_minor, a.held_minor) for a in state.accounts.values()
            }
    for seq, expected in sorted(expected_at.items()):
        for account, want in expected.items():
            b = st.balance_at(db, "p1", account, at_seq=seq)
            assert (b.posted_minor, b.held_minor) == want, (seq, account)
            assert b.at_seq == seq
    # by time: the balance after the last record written at or before that millisecond
    for seq in sorted(samples):
        ts = ts_by_seq[seq]
        last_at_ts = max(s for s, t in ts_by_seq.items() if t <= ts)
        b = st.balance_at(db, "p1", "alice", at_ms=ts)
        assert b.at_seq == last_at_ts
        assert (b.posted_minor, b.held_minor) == expected_or_replay(workload, last_at_ts)
    before = st.balance_at(db, "p1", "alice", at_ms=ts_by_seq[0] - 1)
    assert (before.at_seq, before.posted_minor, before.held_minor) == (-1, 0, 0)
    with pytest.raises(NotProjected):
        st.balance_at(db, "p1", "alice", at_seq=last + 1)
    with pytest.raises(LookupError):
        st.balance_at(db, "p1", "nobody")


def expected_or_replay(service: LedgerService, seq: int) -> tuple[int, int]:
    for s, _, state in prefix_states(service, "p1"):
        if s == seq:
            a = state.accounts["alice"]
            return a.posted_minor, a.held_minor
    raise AssertionError(seq)


def test_a_second_runner_cannot_count_a_batch_twice(workload: LedgerService) -> None:
    a = ProjectionRunner(workload.store, batch_size=20)
    b = ProjectionRunner(workload.store, batch_size=20)
    a.run_once("p1")
    b.run_once("p1")  # b loads position 19 and moves to 39
    with pytest.raises(PositionConflict):
        a.run_once("p1")  # a still believes it is at 19: its batch is rolled back
    a.catch_up("p1")  # reloads, continues from 39
    b.catch_up("p1")
    reference = ProjectionRunner(workload.store)
    digest = a.digest("p1")
    reference.rebuild("p1")
    assert reference.digest("p1") == digest


def test_unknown_kinds_tags_and_executes_are_kept(workload: LedgerService) -> None:
    runner = ProjectionRunner(workload.store)
    runner.catch_up("p1")
    before = runner.digest("p1")
    balance = st.balance_at(runner.db, "p1", "alice")
    policy = append_raw(workload.store, "p1", {"kind": "policy_set", "policy": {"v": 3}})
    moved = append_raw(
        workload.store,
        "p1",
        {
            "kind": "transferred",
            "ccy": "CNY",
            "entries": [["alice", "bob", 1]],
            "tags": ["large_value"],
            "executes": "req-9",
        },
    )
    runner.catch_up("p1")
    assert runner.digest("p1") != before
    after = st.balance_at(runner.db, "p1", "alice")
    assert after.posted_minor == balance.posted_minor - 1
    page = audit_page(runner.db, "p1", AuditFilter(from_seq=policy), page_size=10)
    assert [r["seq"] for r in page.rows] == [policy, moved]
    assert page.rows[0]["kind"] == "policy_set" and page.rows[0]["pv"] == 3
    assert page.rows[1]["tags"] == '["large_value"]' and page.rows[1]["executes"] == "req-9"
    assert page.rows[1]["accounts"] == "alice;bob"


def test_a_broken_chain_stops_the_projection(workload: LedgerService) -> None:
    runner = ProjectionRunner(workload.store)
    runner.catch_up("p1")
    last = last_position(workload, "p1")
    from ledger import records
    from ledger.store import log_stream

    rec = log_records(workload, "p1")[-1]
    rec2 = {**rec, "seq": last + 1, "cid": "forged"}
    data = records.encode(rec2)
    workload.store.append([(log_stream("p1"), last + 1, rec2["kind"], b"\x01" * 32 + data)])
    with pytest.raises(ProjectionError, match="chain broken"):
        runner.run_once("p1")
    assert runner.status("p1")[0].position == last


def test_embedded_runner_follows_new_records(service: LedgerService, clock: FakeClock) -> None:
    embedded = EmbeddedRunner(service.store, batch_size=50).start()
    try:
        run_workload(service, clock, 50)
        last = last_position(service, "p1")
        done = threading.Event()
        for _ in range(200):
            if all(s.position == last for s in embedded.runner.status("p1")):
                done.set()
                break
            done.wait(0.05)
        assert done.is_set()
    finally:
        embedded.close()
    assert not embedded.thread.is_alive()


def _table_exists(db: Db, name: str) -> bool:
    with db.reading() as cur:
        row = db.fetchone(
            cur,
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = %s AND table_name = %s"
            if db.is_pg
            else "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
            (db.schema, name) if db.is_pg else (name,),
        )
    return bool(row and row[0])


def test_a_changed_table_layout_is_projected_again(workload: LedgerService) -> None:
    runner = ProjectionRunner(workload.store, batch_size=100)
    runner.catch_up("p1")
    digest = runner.digest("p1")
    db = runner.db
    with db.tx() as cur:  # a database written before layouts were recorded (layout 1)
        cur.execute(f"DELETE FROM {db.t('proj_layouts')}")
        cur.execute(f"CREATE TABLE {db.t('proj_stmt_moves')} (platform TEXT, seq BIGINT)")
    assert _table_exists(db, "proj_stmt_moves")
    upgraded = ProjectionRunner(workload.store, batch_size=100)
    # tables dropped (the retired one too) and positions reset, in one transaction
    assert {s.position for s in upgraded.status("p1")} == {-1}
    assert not _table_exists(db, "proj_stmt_moves")
    upgraded.catch_up("p1")
    assert upgraded.digest("p1") == digest
    again = ProjectionRunner(workload.store)  # the layout is recorded now: nothing is dropped
    assert {s.position for s in again.status("p1")} == {last_position(workload, "p1")}


def test_integer_keys_keep_each_platform_apart(service: LedgerService, clock: FakeClock) -> None:
    """Accounts and audit names are integer keys in the platform's own range (its directory
    position): rebuilding one platform leaves the other's rows, and keys, exactly as they were,
    and a name known only on another platform matches nothing."""
    run_workload(service, clock, 120, seed=1, pid="p1")
    run_workload(service, clock, 120, seed=2, pid="p2")
    runner = ProjectionRunner(service.store, batch_size=37)
    runner.catch_up()
    db = runner.db
    with db.reading() as cur:
        numbers = {pid: platform_number(db, cur, pid) for pid in ("p1", "p2")}
        assert numbers == {"p1": 0, "p2": 1}  # directory order
        for pid, pno in numbers.items():
            first, last = key_range(pno)
            keys = db.fetchall(
                cur,
                f"SELECT akey FROM {db.t(st.ACCOUNTS)} WHERE platform = {db.ph} ORDER BY akey",
                (pid,),
            )
            # opened order, no gaps, inside the platform's range
            assert [k for (k,) in keys] == list(range(first, first + len(keys)))
            assert first + len(keys) - 1 <= last
    p2 = b"\n".join(runner.dump("p2"))
    runner.rebuild("p1")
    assert b"\n".join(runner.dump("p2")) == p2
    append_raw(service.store, "p2", {"kind": "noted", "subject": "only-on-p2"})
    runner.catch_up()
    assert audit_page(db, "p2", AuditFilter(account="only-on-p2")).rows
    assert audit_page(db, "p1", AuditFilter(account="only-on-p2")).rows == []
    assert audit_page(db, "p1", AuditFilter(actor="nobody:ever")).rows == []


def test_actor_and_op_runs_partition_the_log(workload: LedgerService) -> None:
    """The actor and op filters' runs: maximal (neighbours differ), gapless from position 0 to
    the projected head, whatever the batch size that wrote them (runs cross batches)."""
    runner = ProjectionRunner(workload.store, batch_size=7)
    runner.catch_up("p1")
    db = runner.db
    last = last_position(workload, "p1")
    with db.reading() as cur:
        pno = platform_number(db, cur, "p1")
        for kind in (0, 1):
            runs = db.fetchall(
                cur,
                f"SELECT first_seq, last_seq, nkey FROM {db.t(AUDIT_RUNS)} "
                f"WHERE pno = {db.ph} AND kind = {db.ph} ORDER BY first_seq",
                (pno, kind),
            )
            assert runs[0][0] == 0 and runs[-1][1] == last
            for (_, end, key), (start, _, next_key) in itertools.pairwise(runs):
                assert start == end + 1 and key != next_key
            assert len(runs) > 1  # the workload mixes actors and ops

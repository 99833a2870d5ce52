"""State snapshots: a restart from a snapshot plus the log's tail gives exactly the state a full
replay gives, and decides exactly alike afterwards; a snapshot that does not check out against
the log (corrupt, forged, foreign, from a truncated log) is ignored and the full replay decides.
SQLite and PostgreSQL (`store_env` from tests/conftest.py)."""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import (  # type: ignore[import-not-found]
    START_MS,
    FakeClock,
    actor_for,
    deposit,
    make_platform,
    transfer,
)
from workload import (  # type: ignore[import-not-found]
    CCY,
    CHECKER,
    OPERATOR,
    PLATFORM,
    POLICY,
    Workload,
)

from controls.policy import DAY_MS
from ledger import commands as c
from ledger import records, snapshot
from ledger.config import Config
from ledger.domain import Account, Done, DoneTable, PlatformState, StateError
from ledger.service import SHUTDOWN_SNAPSHOT_MIN, LedgerService
from ledger.store import LedgerStore, log_stream
from ledger.writer import PlatformWriter, Request

NOT_YET_REACHED: frozenset[str] = frozenset()

# -- building a log -------------------------------------------------------------------------------


def _take_snapshot(svc: LedgerService) -> int | None:
    """What the service must do: the platform lock held and its pipeline drained."""
    platform = svc._platform(PLATFORM)
    with platform.cond:
        platform.wait_drained()
        return platform.writer.save_snapshot()


def _extras(work: Workload, svc: LedgerService, clock: FakeClock) -> None:
    """Record kinds the random workload may not reach: account lifecycle, hold expiry, a
    liabilities statement, a shortfall top-up, a failed withdrawal."""
    run = work.run
    run(
        [
            c.OpenAccount(
                client_id="o-x1", account_id="x1", kind="customer", currency=CCY, role="other"
            ),
            c.OpenAccount(
                client_id="o-x2", account_id="x2", kind="customer", currency=CCY, role="other"
            ),
            c.OpenAccount(
                client_id="o-pbank", account_id="pbank", kind="platform_bank", currency=CCY
            ),
        ]
    )
    run([c.FreezeAccount(client_id="frz-x1", account_id="x1", reason="kyc")], OPERATOR)
    run([c.UnfreezeAccount(client_id="unf-x1", account_id="x1", reason="kyc ok")], OPERATOR)
    run([c.ApproveRequest(client_id="ok-unf-x1", request_id="unf-x1")], CHECKER)
    run([c.CloseAccount(client_id="cls-x2", account_id="x2")], OPERATOR)
    run(
        [
            c.Deposit(
                client_id="dep-own",
                mirror_account_id="pbank",
                account_id="own",
                amount_minor=50_000,
                currency=CCY,
            )
        ]
    )
    run(
        [
            c.TopUpShortfall(
                client_id="top-up",
                from_account_id="own",
                to_account_id="susp",
                amount_minor=100,
                currency=CCY,
                reason="shortfall",
            )
        ],
        OPERATOR,
    )
    run([c.ApproveRequest(client_id="ok-top-up", request_id="top-up")], CHECKER)
    run(
        [
            c.PublishLiabilities(
                client_id="liab-1",
                snapshot_size=5,
                currency=CCY,
                depth=3,
                root="A" * 43 + "=",
                total_minor=0,
            )
        ],
        OPERATOR,
    )
    clock.advance(DAY_MS)  # a new business day: per-day tables restart
    svc.sweep_expired()


def build(store_env: dict[str, str], data_dir: Path, batches: int, snapshot_after: int) -> Config:
    """The workload with a snapshot after `snapshot_after` batches; returns the config."""
    env = {**store_env, "CUSTODY_DATA_DIR": str(data_dir), "CUSTODY_CHECKPOINT_EVERY": "0"}
    cfg = Config.from_env(env)
    clock = FakeClock(START_MS)
    svc = LedgerService(cfg, clock_ms=clock)
    svc.start()
    try:
        assert svc.create_platform(PLATFORM, "Platform One", "operator:alice", POLICY).ok
        work = Workload(svc, clock, random.Random(7))
        work.setup()
        for b in range(batches):
            work.batch(60, b)
            if b % 7 == 6:
                clock.advance(30 * 60_000)
            if b + 1 == snapshot_after:
                assert _take_snapshot(svc) is not None
        _extras(work, svc, clock)
        # a hold that expires, then the sweep: holds_expired
        cust = work.customers[3]
        hold = c.PlaceHold(
            client_id="short-hold",
            from_account_id=cust.id,
            to_account_id=work.customers[4].id,
            amount_minor=1,
            currency=CCY,
            expires_at_ms=clock.now + 60_000,
            reason="bid",
        )
        work.run([work.sign(hold, cust)])
        clock.advance(120_000)
        svc.sweep_expired()
        for _ in range(3):
            work.batch(40, batches)
    finally:
        svc.close()
    return cfg


# -- a complete structural dump of the live state -------------------------------------------------


def dump(value: Any, ordered: bool = False) -> Any:
    """Every slot of every object, every container with its type; the state's own tables in
    their order (the expiry sweep walks pending holds in placement order), dicts inside values
    (sealed data, reconciliation figures) as sets of items: their key order means nothing."""
    if isinstance(value, PlatformState):
        return {n: dump(getattr(value, n), True) for n in PlatformState.__slots__ if n != "_sp"}
    if isinstance(value, DoneTable):  # however it is split into base and new rows
        return ("done", [(cid, dump(d)) for cid, d in value.items()])
    if isinstance(value, Done):  # its postings, in memory or read back from its record
        return ("Done", value.fingerprint, value.seq, value.kind, value.entries, value.reversed_by)
    if isinstance(value, enum.Enum):
        return (type(value).__name__, value.value)
    if isinstance(value, msgspec.Struct):
        return (type(value).__name__, msgspec.to_builtins(value, order="sorted"))
    if isinstance(value, dict):
        items = [(dump(k), dump(v)) for k, v in value.items()]
        return ("dict", items if ordered else sorted(items, key=repr))
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, sorted(dump(v) for v in value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [dump(v) for v in value])
    slots = getattr(type(value), "__slots__", None)
    if slots is not None:
        return (type(value).__name__, {n: dump(getattr(value, n)) for n in slots})
    return (type(value).__name__, value)


def _held_twice_same(state: PlatformState) -> None:
    for hold_id, hold in state.pending_holds.items():
        assert state.holds[hold_id] is hold


# -- loading --------------------------------------------------------------------------------------


def _writer(svc: LedgerService, use_snapshots: bool, key: bytes | None = None) -> PlatformWriter:
    writer = svc._new_writer(PLATFORM)  # with the service's snapshot key
    writer.use_snapshots = use_snapshots
    if key is not None:
        writer.snapshot_key = key
    writer.load()
    return writer


def _full(svc: LedgerService) -> PlatformWriter:
    writer = _writer(svc, use_snapshots=False)
    assert writer.snapshot_position == -1
    return writer


def _assert_same(a: PlatformWriter, b: PlatformWriter) -> None:
    assert dump(a.state) == dump(b.state)
    assert a.head == b.head
    assert a.tree.size == b.tree.size == a.state.next_seq
    assert a.tree.root() == b.tree.root()
    assert a.committed_next_seq == b.committed_next_seq
    _held_twice_same(a.state)
    _held_twice_same(b.state)


@pytest.fixture
def built(store_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Config, LedgerService]]:
    cfg = build(store_env, tmp_path / "data", batches=16, snapshot_after=10)
    svc = LedgerService(cfg, clock_ms=FakeClock(START_MS + 3 * DAY_MS))
    try:
        yield cfg, svc
    finally:
        svc.close()


def _table(svc: LedgerService) -> snapshot.SnapshotStore:
    return snapshot.SnapshotStore(svc.store)


def _sql(svc: LedgerService, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    table = _table(svc)
    sql = sql.replace("{t}", table._table).replace("?", table._ph)
    with table._datastore.transaction(commit=True) as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if sql.startswith("SELECT") else []


def _rewrite(svc: LedgerService, position: int, body: bytes) -> None:
    _sql(svc, "DELETE FROM {t} WHERE platform=? AND position=?", (PLATFORM, position))
    _table(svc).save(PLATFORM, position, 0, body, keep=10)


def _forged(body: bytes, key: bytes | None = None, **changes: Any) -> bytes:
    """A well-formed body (valid digest) whose payload says something else."""
    data = body[len(snapshot.MAGIC) + snapshot.MAC_LEN :]
    payload = msgspec.structs.replace(
        msgspec.msgpack.decode(data, type=snapshot.Payload), **changes
    )
    new = msgspec.msgpack.encode(payload)
    return snapshot.MAGIC + snapshot._mac(key, new) + new


# -- equivalence ----------------------------------------------------------------------------------


def test_the_workload_reaches_every_record_kind(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    kinds = {kind for _, kind, _ in svc.store.iter_rows(log_stream(PLATFORM))}
    assert kinds <= records.RECORD_KINDS
    # kinds added after this workload was written; extend `_extras` to reach them
    assert records.RECORD_KINDS - kinds <= NOT_YET_REACHED


def test_snapshot_plus_tail_equals_full_replay(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    fast = _writer(svc, use_snapshots=True)
    assert fast.snapshot_position == position
    full = _full(svc)
    assert 0 < position < full.state.next_seq  # a real tail was replayed
    _assert_same(fast, full)
    # the state carries what the controls read: nonces, day tables, pending work
    state = fast.state
    assert state.nonces and state.day_counters and state.day_lvt and state.done
    assert state.requests and state.alerts and state.reconciliations and state.liabilities
    assert any(d.reversed_by for d in state.done.values())


def test_snapshot_at_the_end_and_from_a_restored_writer(
    built: tuple[Config, LedgerService],
) -> None:
    """A snapshot of a state that itself came from a snapshot, at the log's end (no tail)."""
    _, svc = built
    fast = _writer(svc, use_snapshots=True)
    assert fast.save_snapshot() == fast.state.next_seq
    again = _writer(svc, use_snapshots=True)
    assert again.snapshot_position == fast.state.next_seq
    _assert_same(again, _full(svc))
    assert len(_table(svc).positions(PLATFORM)) == 2


def _followups(writer: PlatformWriter) -> list[Request]:
    """Instructions whose answers depend on the done table (fingerprints, entries), holds,
    requests, nonces and day tables."""
    state = writer.state
    store = writer.store
    moves = [d for d in state.done.values() if d.kind == "transferred" and d.entries]
    commands = []
    for done in moves:
        [(_, _, packed)] = store.read(writer.stream, after=done.seq - 1, limit=1)
        cmd = msgspec.convert(records.decode(packed[records.HASH_LEN :])["cmd"], c.AnyCommand)
        if isinstance(cmd, c.Transfer):
            commands.append(cmd)
    original, old_cid = commands[-1], commands[0].client_id
    changed = msgspec.structs.replace(original, amount_minor=original.amount_minor + 1)
    holds = list(state.pending_holds)
    pending = [r.id for r in state.requests.values() if r.status == "pending"]
    platform_cmds: list[c.Command] = [
        original,  # replayed: same fingerprint
        changed,  # ID_REUSED: other fingerprint
        c.CaptureHold(client_id="f-cap", hold_id=holds[0], amount_minor=1),
        c.ReleaseHold(client_id="f-rel", hold_id=holds[-1], reason="done"),
        c.Transfer(
            client_id="f-t",
            from_account_id="c3",
            to_account_id="c4",
            amount_minor=10,
            currency=CCY,
        ),
    ]
    requests = [Request(platform_cmds, actor_for(platform_cmds[-1]))]
    requests.append(
        Request([c.Reverse(client_id="f-rev", movement_id=old_cid, reason="error")], OPERATOR)
    )
    if pending:
        requests.append(
            Request([c.ApproveRequest(client_id="f-ok", request_id=pending[0])], CHECKER)
        )
    requests.append(Request([c.ExpireHolds(client_id="f-exp")], "system:sweeper"))
    return requests


def test_identical_decisions_after_a_snapshot_restart(
    built: tuple[Config, LedgerService],
) -> None:
    _, svc = built
    fast = _writer(svc, use_snapshots=True)
    full = _full(svc)
    assert fast.snapshot_position > 0
    requests = _followups(full)
    a = fast.prepare(requests)
    b = full.prepare(requests)
    assert a.answers == b.answers
    assert a.rows == b.rows  # the same records, byte for byte, with the same chain links
    statuses = [o.status for group in a.answers for o in group]
    assert statuses[:2] == ["replayed", "refused"]
    assert a.answers[0][1].code == "ID_REUSED"
    assert len(set(statuses)) >= 3
    assert dump(fast.state) == dump(full.state) and fast.head == full.head


# -- snapshots that must not be used --------------------------------------------------------------


def _fallback_is_full(svc: LedgerService, key: bytes | None = None) -> None:
    writer = _writer(svc, use_snapshots=True, key=key)
    assert writer.snapshot_position == -1
    _assert_same(writer, _full(svc))


def test_flipped_byte_falls_back(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    body = bytearray(_table(svc).body(PLATFORM, position))
    for offset in (len(body) // 2, len(snapshot.MAGIC) + 3, 0, len(body) - 1):
        flipped = bytearray(body)
        flipped[offset] ^= 0x01
        _rewrite(svc, position, bytes(flipped))
        _fallback_is_full(svc)
    _rewrite(svc, position, bytes(body))  # the original still loads
    assert _writer(svc, use_snapshots=True).snapshot_position == position


def test_wrong_chain_head_falls_back(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    body = _table(svc).body(PLATFORM, position)
    _rewrite(svc, position, _forged(body, head=b"\x07" * 32))
    _fallback_is_full(svc)


def test_unknown_version_and_other_code_fall_back(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    body = _table(svc).body(PLATFORM, position)
    _rewrite(svc, position, _forged(body, format="custody-snapshot/v3"))
    _fallback_is_full(svc)
    _rewrite(svc, position, _forged(body, code="0" * 32))
    _fallback_is_full(svc)
    _rewrite(svc, position, b"custody-snapshot/v3\n" + body[len(snapshot.MAGIC) :])
    _fallback_is_full(svc)
    _rewrite(svc, position, snapshot.MAGIC + b"\x00" * 40)  # too short to decode
    _fallback_is_full(svc)


def test_future_position_is_ignored(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    end = svc.store.last_row(log_stream(PLATFORM))[0] + 1  # type: ignore[index]
    body = _table(svc).body(PLATFORM, position)
    # claims a position beyond the log: the row and the payload agree, the log does not
    _sql(svc, "DELETE FROM {t} WHERE platform=?", (PLATFORM,))
    _table(svc).save(PLATFORM, end + 5, 0, _forged(body, position=end + 5, next_seq=end + 5), 2)
    _fallback_is_full(svc)
    # a row moved to another position than its payload names
    _sql(svc, "DELETE FROM {t} WHERE platform=?", (PLATFORM,))
    _table(svc).save(PLATFORM, position - 1, 0, body, 2)
    _fallback_is_full(svc)


def test_forged_state_is_refused_when_snapshots_are_keyed(
    built: tuple[Config, LedgerService],
) -> None:
    """With a key, someone who can write the database cannot make a snapshot say anything
    else; without one, the digest only catches accidents (docs/SNAPSHOTS.md)."""
    _, svc = built
    key = b"k" * 32
    writer = _writer(svc, use_snapshots=True, key=key)
    assert writer.snapshot_position == -1  # the stored one is unkeyed: not accepted
    position = writer.save_snapshot()
    assert position is not None
    assert _writer(svc, use_snapshots=True, key=key).snapshot_position == position
    body = _table(svc).body(PLATFORM, position)
    _rewrite(svc, position, _forged(body, None, gate="FROZEN"))  # re-digested, no key
    _fallback_is_full(svc, key)


def test_bad_tail_falls_back_to_full_replay(built: tuple[Config, LedgerService]) -> None:
    """A snapshot whose (forged, validly digested) state cannot take the tail is dropped."""
    _, svc = built
    [position] = _table(svc).positions(PLATFORM)
    body = _table(svc).body(PLATFORM, position)
    payload = msgspec.msgpack.decode(body[len(snapshot.MAGIC) + 32 :], type=snapshot.Payload)
    credits = Account.__slots__.index("credits_posted_minor")
    emptied = [[0 if i == credits else v for i, v in enumerate(a)] for a in payload.accounts]
    _rewrite(svc, position, _forged(body, accounts=emptied))  # no money: the tail overdraws
    with pytest.raises(StateError):
        snapshot_writer = _writer(svc, use_snapshots=False)
        snapshot_writer.state, snapshot_writer.tree = snapshot.restore(
            snapshot.open_body(_table(svc).body(PLATFORM, position))
        )
        snapshot_writer.head = payload.head
        snapshot_writer._replay_from(position - 1, None)
    _fallback_is_full(svc)


def test_snapshot_of_a_truncated_log_is_ignored(built: tuple[Config, LedgerService]) -> None:
    """An attacker deletes the log's last records: the newer snapshot is beyond the end and
    ignored; the older one is still a prefix and is used; the state is the truncated log's."""
    _, svc = built
    [older] = _table(svc).positions(PLATFORM)
    newest = _writer(svc, use_snapshots=True).save_snapshot()
    assert newest is not None and newest > older + 20
    events = "custody_events" if svc.store.is_postgres else "stored_events"
    schema = svc.store.datastore.schema if svc.store.is_postgres else ""
    table = f'"{schema}".{events}' if schema else events
    ph = "%s" if svc.store.is_postgres else "?"
    with svc.store.datastore.transaction(commit=True) as cur:
        cur.execute(
            f"DELETE FROM {table} WHERE originator_id={ph} AND originator_version >= {ph}",
            (log_stream(PLATFORM), newest - 10),
        )
    writer = _writer(svc, use_snapshots=True)
    assert writer.snapshot_position == older
    assert writer.state.next_seq == newest - 10
    _assert_same(writer, _full(svc))


def test_keeps_the_newest_two(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    writer = _writer(svc, use_snapshots=True)
    first = _table(svc).positions(PLATFORM)
    assert writer.save_snapshot() is not None
    assert writer.save_snapshot() is not None  # same position again: replaced, not added
    positions = _table(svc).positions(PLATFORM)
    assert positions == [writer.state.next_seq, *first]
    writer.snapshot_keep = 1
    writer.save_snapshot()
    assert _table(svc).positions(PLATFORM) == [writer.state.next_seq]


def test_big_snapshots_are_stored_in_parts(
    built: tuple[Config, LedgerService], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, svc = built
    monkeypatch.setattr(snapshot, "PART_BYTES", 1000)
    writer = _writer(svc, use_snapshots=True)
    position = writer.save_snapshot()
    parts = _sql(svc, "SELECT part FROM {t} WHERE platform=? AND position=?", (PLATFORM, position))
    assert len(parts) > 3
    assert _writer(svc, use_snapshots=True).snapshot_position == position
    _sql(svc, "DELETE FROM {t} WHERE platform=? AND position=? AND part=1", (PLATFORM, position))
    reloaded = _writer(svc, use_snapshots=True)
    assert reloaded.snapshot_position not in (-1, position)  # the older snapshot
    _assert_same(reloaded, _full(svc))


def test_no_snapshot_while_work_is_undecided(built: tuple[Config, LedgerService]) -> None:
    _, svc = built
    writer = _writer(svc, use_snapshots=True)
    writer.prepare(_followups(writer))  # decided, not committed
    with pytest.raises(RuntimeError, match="not drained"):
        writer.save_snapshot()


def test_a_service_restarts_from_its_snapshot(built: tuple[Config, LedgerService]) -> None:
    cfg, svc = built
    clock = FakeClock(START_MS + 3 * DAY_MS)
    served = LedgerService(cfg, clock_ms=clock)
    served.start()
    try:
        writer = served._platform(PLATFORM).writer
        assert writer.snapshot_position > 0
        _assert_same(writer, _full(svc))
        deposit = c.Deposit(
            client_id="after-restart",
            mirror_account_id="pbank",
            account_id="own",
            amount_minor=7,
            currency=CCY,
        )
        out = served.execute(PLATFORM, [deposit], actor_for(deposit))
        assert out[0].status == "accepted"
    finally:
        served.close()
    store = LedgerStore(cfg)
    try:
        assert store.last_row(log_stream(PLATFORM)) is not None
    finally:
        store.close()


def test_a_snapshot_cut_short_is_never_listed_and_is_cleared_by_the_next(
    built: tuple[Config, LedgerService],
) -> None:
    """Parts are written in transactions of their own; only the marker, written last, makes a
    snapshot visible: a crash between parts leaves nothing a restart would try."""
    _, svc = built
    table = _table(svc)
    before = table.positions(PLATFORM)
    fast = _writer(svc, use_snapshots=True)
    captured = fast.capture_snapshot()
    assert captured is not None
    position, body = captured
    # a crash after the first part of an earlier save: the rows are there, the marker is not
    stale = position - 1
    assert stale not in before
    ph = "%s" if svc.store.is_postgres else "?"
    with svc.store.datastore.transaction(commit=True) as cur:
        cur.execute(
            f"INSERT INTO {table._table} (platform, position, part, created_ms, body) "
            f"VALUES ({ph},{ph},{ph},{ph},{ph})",
            (PLATFORM, stale, 0, 0, body[: snapshot.PART_BYTES]),
        )
    assert table.positions(PLATFORM) == before
    assert _writer(svc, use_snapshots=True).snapshot_position == before[0]
    # the next save lists itself and clears the unfinished older one (a newer unfinished one
    # could be another save in progress: left alone)
    fast.store_snapshot(position, body)
    assert table.positions(PLATFORM) == [position, *before][:2]
    with svc.store.datastore.transaction(commit=False) as cur:
        cur.execute(
            f"SELECT COUNT(*) AS n FROM {table._table} WHERE platform={ph} AND position={ph}",
            (PLATFORM, stale),
        )
        assert cur.fetchone()["n"] == 0


def test_a_planned_stop_leaves_a_snapshot_so_the_next_start_replays_nothing(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**store_env, "CUSTODY_DATA_DIR": str(tmp_path), "CUSTODY_CHECKPOINT_EVERY": "0"}
    config = Config.from_env(env)  # CUSTODY_SNAPSHOT_EVERY keeps its default (1,000,000)
    svc = LedgerService(config)
    svc.start()
    p = make_platform(svc, PLATFORM)
    assert svc.execute(PLATFORM, [deposit(p, "seed", "alice", 10**9)], "operator:root")[0].ok
    for start in range(0, SHUTDOWN_SNAPSHOT_MIN, 2_000):
        batch = [transfer(p, f"t{start + i}", "alice", "bob", 1) for i in range(2_000)]
        assert all(o.ok for o in svc.execute(PLATFORM, batch, "platform:test"))
    end = svc.head(PLATFORM)[0]
    assert _table(svc).positions(PLATFORM) == []  # far below the scheduled interval
    svc.close()
    again = LedgerService(config)
    again.start()
    try:
        assert _table(again).positions(PLATFORM) == [end]
        assert again._platform(PLATFORM).writer.snapshot_position == end
        assert again.execute(PLATFORM, [transfer(p, "after", "alice", "bob", 1)], "platform:t")[
            0
        ].ok
    finally:
        again.close()

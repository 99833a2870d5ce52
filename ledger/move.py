"""Move a platform from one PostgreSQL store (database) to another with its chain intact.

The log is copied byte for byte, so every record keeps its position, its chain link and its
place in the Merkle tree: checkpoints auditors hold from before the move stay valid, and the
target's later checkpoints are consistent with them (same ledger id and signing key on every
store of a placement). Nothing in either store is updated or deleted: the source keeps its rows
as history and says, in its insert-only `custody_moves` table, where the platform went.

The procedure (`custody platform move PLATFORM --to STORE`), each step safe to repeat:

1. `out-start` in the source: every server of the source stops writing the platform at its next
   lease poll and releases the write lease; callers get a retryable WRITER_ELSEWHERE meanwhile.
2. The mover takes the platform's write lease in the source and records itself as its writer
   (a new epoch): a writer that has not noticed yet can no longer commit (`WriterSuperseded`).
   Its lease session is kept talking for the whole move (PostgreSQL ends silent sessions).
3. `arriving` in the target: the target's servers will not serve the platform until `in`.
4. The target must not serve the platform and must hold nothing but a prefix of the source's
   log (compared by chain hash). The side data is copied (customer data keys, bank statements,
   disclosures, signed checkpoints, the risk engine's state), then the log is appended in chunks
   (only the missing tail of a platform coming back), every chain link checked on the way; the
   directory entry goes in the last chunk's transaction.
5. The copy is read back and checked link by link against the source's head.
6. The commit point: `out-done` in the source, by a compare-and-set in one transaction (still
   this move's `out-start`, nobody aborted; the log still ends where it was copied; the writers
   row still names the mover's epoch). Then `in` in the target, whose servers take it over;
   the source's servers redirect callers there.

If the mover stops before step 6, run the move again (it resumes) or abort it
(`--abort`: `aborted` in the source, which serves the platform again, and the target sends
callers back to the source); an abort takes the source's lease first, so it cannot overtake a
mover at work. If it stops after the `out-done`, running it again records the missing `in`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from hashlib import sha256
from typing import Any, Final

import psycopg
from psycopg import sql

from ledger import records
from ledger.config import Config, ConfigError
from ledger.lease import LeaseLost, LeaseManager, TakeoverBlocked, connect_kwargs
from ledger.placement import (
    ABORTED,
    ARRIVING,
    GONE,
    IN,
    OUT_DONE,
    OUT_START,
    MoveState,
    ensure_moves_table,
    latest_moves,
    record_move,
    table_exists,
)
from ledger.store import WRITERS_TABLE, LedgerStore, NewRow, Row, log_stream

log = logging.getLogger("ledger.move")

CHUNK_ROWS_MAX: Final = 10_000
LEASE_WAIT_S_MAX: Final = 3_600.0
# Side tables that belong to a platform and cannot be rebuilt from its log. Append-only ones
# are merged (missing rows inserted, present rows must be equal); the engine's mutable state is
# replaced. Projections are not copied: the target's workers rebuild them from the log.
MERGED_TABLES: Final = (
    "custody_pii_keys",
    "recon_files",
    "recon_statements",
    "recon_entries",
    "recon_events",
    "api_disclosures",
    "custody_checkpoints",
)
REPLACED_TABLES: Final = (
    "recon_items",
    "risk_positions",
    "risk_state",
    "risk_outbox",
    "risk_alerts",
    "risk_alert_events",
    "risk_reconciliations",
    "risk_indicators",
)
_SIDE_ROWS_MAX: Final = 5_000_000  # per table and platform; more means something is wrong


class MoveError(RuntimeError):
    """The move cannot go on; nothing was changed that a rerun or `--abort` cannot finish."""


@dataclass
class MoveReport:
    platform: str
    source: str
    target: str
    records: int = 0
    copied: int = 0  # log rows appended to the target by this run (a resumed move: the rest)
    head: str = ""
    side_rows: dict[str, int] = field(default_factory=dict)
    lease_wait_s: float = 0.0
    elapsed_s: float = 0.0
    state: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "source": self.source,
            "target": self.target,
            "records": self.records,
            "copied": self.copied,
            "head": self.head,
            "side_rows": dict(sorted(self.side_rows.items())),
            "lease_wait_s": round(self.lease_wait_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "state": self.state,
        }


def _schema(config: Config) -> str:
    return config.postgres.get("POSTGRES_SCHEMA") or "public"


def _connect(config: Config) -> psycopg.Connection[Any]:
    return psycopg.connect(**connect_kwargs(config, timeout_s=10.0, purpose="move"))


def _latest(conn: psycopg.Connection[Any], config: Config, platform_id: str) -> MoveState | None:
    return latest_moves(conn, _schema(config)).get(platform_id)


def _record(
    config: Config, platform_id: str, state: str, peer: str, size: int, head: str, actor: str
) -> MoveState:
    with _connect(config) as conn, conn.transaction():
        ensure_moves_table(conn, _schema(config))
        # one move row at a time per platform, whoever writes it
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"custody-move/{platform_id}",))
        return record_move(conn, _schema(config), platform_id, state, peer, size, head, actor)


def _serves(store: LedgerStore, config: Config, platform_id: str) -> bool:
    """Whether `store` serves the platform now: in its directory and not moved out."""
    if platform_id not in store.platform_ids():
        return False
    with _connect(config) as conn:
        move = _latest(conn, config, platform_id)
    return move is None or move.state not in GONE


def move_platform(
    config: Config,
    platform_id: str,
    target: str,
    actor: str,
    *,
    lease_wait_s: float = 60.0,
    chunk_rows: int = CHUNK_ROWS_MAX,
    progress: Callable[[str, int, int], None] | None = None,
) -> MoveReport:
    """Move the platform from this configuration's store to `target` (see the module doc).

    `progress(step, done, total)` is called as the copy goes (step: "copy", then "verify")."""
    placement = config.placement
    if placement is None:
        raise ConfigError("moving a platform needs a placement (CUSTODY_PLACEMENT)")
    source = config.store_name
    if target == source:
        raise MoveError(f"platform {platform_id} is already in store {source}")
    if target not in placement.stores:
        raise MoveError(f"no store named {target!r} in the placement")
    assert 1 <= chunk_rows <= CHUNK_ROWS_MAX
    assert 0 < lease_wait_s <= LEASE_WAIT_S_MAX
    started = time.monotonic()
    report = MoveReport(platform_id, source, target)
    target_config = config.for_store(target)
    src = LedgerStore(config)
    dst = LedgerStore(target_config)
    try:
        if platform_id not in src.platform_ids():
            raise MoveError(f"platform {platform_id} is not in store {source}")
        move = _latest_of(config, platform_id)
        if move is not None and move.state == OUT_DONE:
            # committed earlier; finish the target's side if the mover stopped before it
            if move.peer == target and _finish_arrival(target_config, move, source, actor):
                report.records, report.head, report.state = move.size, move.head, OUT_DONE
                report.elapsed_s = time.monotonic() - started
                return report
            raise MoveError(f"platform {platform_id} already moved from {source} to {move.peer}")
        if move is not None and move.state == OUT_START and move.peer != target:
            raise MoveError(
                f"platform {platform_id} is moving to {move.peer}: finish or abort that move first"
            )
        if move is None or move.state != OUT_START:
            move = _record(config, platform_id, OUT_START, target, _size(src, platform_id), "",
                           actor)  # fmt: skip
            log.info("platform %s: moving from %s to %s", platform_id, source, target)
        lease, claim = _take_lease(config, platform_id, lease_wait_s, report, src)
        keepalive = _Keepalive(lease)
        try:
            _check_target(src, dst, config, target_config, platform_id)  # before touching it
            arriving = _latest_of(target_config, platform_id)
            if arriving is None or arriving.state != ARRIVING:
                # the target's servers leave it alone until the source commits the move
                _record(target_config, platform_id, ARRIVING, source, 0, "", actor)
            size, head = _copy(src, dst, config, target_config, platform_id, chunk_rows, report,
                               progress)  # fmt: skip
            report.records, report.head = size, head.hex()
            keepalive.confirm()  # the lease was held from the fence to here
            events_table = src.recorder.events_table_name  # type: ignore[attr-defined]
            done = _commit_move(config, events_table, move, size, head.hex(), claim, actor)
            _finish_arrival(target_config, done, source, actor)
            report.state = OUT_DONE
        finally:
            keepalive.stop()
            lease.close()
    finally:
        src.close()
        dst.close()
    report.elapsed_s = time.monotonic() - started
    log.info("platform %s moved to %s: %d records", platform_id, target, report.records)
    return report


def _latest_of(config: Config, platform_id: str) -> MoveState | None:
    with _connect(config) as conn:
        return _latest(conn, config, platform_id)


def _commit_move(
    config: Config,
    events_table: str,
    started: MoveState,
    size: int,
    head: str,
    claim: tuple[str, str, int],
    actor: str,
) -> MoveState:
    """The move's single commit point: `out-done` in the source, in one transaction, only if
    nothing changed since the mover fenced the platform (still our `out-start`, nobody aborted;
    the log still ends at `size`; the writers row still names the mover at its epoch)."""
    platform_id = started.platform_id
    schema = _schema(config)
    with _connect(config) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"custody-move/{platform_id}",))
        latest = _latest(conn, config, platform_id)
        if latest is None or (latest.seq, latest.state, latest.peer) != (
            started.seq, OUT_START, started.peer
        ):  # fmt: skip
            raise MoveError(
                f"platform {platform_id}: the move was aborted or restarted meanwhile "
                f"(latest: {latest.state if latest else 'none'}); nothing was switched"
            )
        writer = conn.execute(
            sql.SQL("SELECT server_id, epoch FROM {} WHERE platform_id = %s FOR SHARE").format(
                sql.Identifier(schema, WRITERS_TABLE)
            ),
            (platform_id,),
        ).fetchone()
        if writer is None or (str(writer[0]), int(writer[1])) != (claim[1], claim[2]):
            raise MoveError(
                f"platform {platform_id}: another writer took the platform during the copy; "
                "nothing was switched, run the move again"
            )
        found = conn.execute(
            sql.SQL(
                "SELECT COALESCE(MAX(originator_version), -1) FROM {} WHERE originator_id = %s"
            ).format(sql.Identifier(schema, events_table)),
            (log_stream(platform_id),),
        ).fetchone()
        if found is None or int(found[0]) + 1 != size:
            raise MoveError(
                f"platform {platform_id}: the source log changed during the copy; nothing was "
                "switched, run the move again"
            )
        return record_move(conn, schema, platform_id, OUT_DONE, started.peer, size, head, actor)


def _finish_arrival(target_config: Config, done: MoveState, source: str, actor: str) -> bool:
    """Record `in` in the target after the source's `out-done` (again, if the mover stopped in
    between). False when the target is not waiting for this move."""
    latest = _latest_of(target_config, done.platform_id)
    if latest is None or latest.state != ARRIVING:
        return False
    _record(target_config, done.platform_id, IN, source, done.size, done.head, actor)
    return True


class _Keepalive:
    """Keeps the mover's lease session talking while it copies: a silent lease session is
    ended by PostgreSQL (idle_session_timeout), which would free the lease mid-copy."""

    def __init__(self, lease: LeaseManager) -> None:
        self._lease = lease
        self._stop = threading.Event()
        self.lost: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="move-keepalive", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._lease.poll_s):
            try:
                self._lease.check()
            except BaseException as exc:  # reported by confirm()
                self.lost = exc
                return

    def confirm(self) -> None:
        """Raise MoveError unless the lease is still held (checked now, and all along)."""
        try:
            self._lease.check()
        except LeaseLost as exc:
            self.lost = exc
        if self.lost is not None:
            raise MoveError(f"the mover lost the write lease during the copy: {self.lost}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def abort_move(config: Config, platform_id: str, actor: str) -> MoveState:
    """Give up a move that has not finished: the source serves the platform again. Refused once
    the target serves it (the copy is complete there: run the move again to finish it)."""
    placement = config.placement
    if placement is None:
        raise ConfigError("moves need a placement (CUSTODY_PLACEMENT)")
    with _connect(config) as conn:
        move = _latest(conn, config, platform_id)
    if move is None or move.state != OUT_START:
        raise MoveError(f"platform {platform_id} is not moving out of {config.store_name}")
    # A mover at work holds the source's lease until it has recorded the end of the move:
    # holding it here means no copy can complete between the check below and the abort.
    lease = LeaseManager(replace(config, server_id=f"abort-{os.getpid()}", advertise=""))
    lease.connect()
    target_config = config.for_store(move.peer)
    dst = LedgerStore(target_config)
    src = LedgerStore(config)
    try:
        if not lease.try_acquire(platform_id):
            raise MoveError(
                f"a move of {platform_id} is in progress (its mover holds the write lease): "
                "let it finish, or stop it first"
            )
        if _serves(dst, target_config, platform_id):
            raise MoveError(
                f"store {move.peer} already serves platform {platform_id}: the copy is complete, "
                "run the move again to finish it"
            )
        aborted = _record(config, platform_id, ABORTED, move.peer, _size(src, platform_id), "",
                          actor)  # fmt: skip
        if (arriving := _latest_of(target_config, platform_id)) and arriving.state == ARRIVING:
            # the target sends callers back to the source instead of asking them to wait
            _record(target_config, platform_id, OUT_DONE, config.store_name, 0, "", actor)
        return aborted
    finally:
        lease.close()
        src.close()
        dst.close()


def move_history(config: Config, platform_id: str) -> list[MoveState]:
    from ledger.placement import history

    with _connect(config) as conn:
        return history(conn, _schema(config), platform_id)


# -- steps ---------------------------------------------------------------------------------------


def _size(store: LedgerStore, platform_id: str) -> int:
    last = store.last_row(log_stream(platform_id))
    return 0 if last is None else last[0] + 1


def _take_lease(
    config: Config, platform_id: str, wait_s: float, report: MoveReport, src: LedgerStore
) -> tuple[LeaseManager, tuple[str, str, int]]:
    """Hold the platform's write lease in the source and record the mover as its writer (a new
    epoch: a writer that has not noticed the move can no longer commit). Returns the lease and
    the mover's claim (platform, server id, epoch)."""
    mover = replace(
        config,
        server_id=f"mover-{os.getpid()}-{secrets.token_hex(3)}",
        advertise="",
    )
    lease = LeaseManager(mover)
    lease.connect()
    started = time.monotonic()
    try:
        while not lease.try_acquire(platform_id):
            if time.monotonic() - started > wait_s:
                raise MoveError(
                    f"the servers of {config.store_name} did not release platform {platform_id} "
                    f"within {wait_s:.0f} s (are they running this version, with leases?); it "
                    "stays frozen until the move is run again or aborted (--abort)"
                )
            time.sleep(min(0.2, config.lease_poll_ms / 1000))
        while True:  # a commit of the old writer may still hold its row: wait for it
            try:
                info = lease.announce(platform_id, _size(src, platform_id))
                break
            except TakeoverBlocked:
                if time.monotonic() - started > wait_s:
                    raise
    except BaseException:
        lease.close()
        raise
    report.lease_wait_s = time.monotonic() - started
    return lease, (platform_id, info.server_id, info.epoch)


def _chain(rows: Iterator[tuple[int, str, bytes]]) -> Iterator[tuple[int, str, bytes, bytes]]:
    """The rows with their checked chain hash; raises MoveError on a gap or a broken link."""
    head = records.CHAIN_GENESIS
    expected = 0
    for seq, kind, packed in rows:
        if seq != expected:
            raise MoveError(f"position {expected} is missing from the source log")
        stored, data = records.unpack_state(packed)
        head = sha256(head + data).digest()
        if head != stored:
            raise MoveError(f"the source chain is broken at position {seq}")
        yield seq, kind, packed, stored
        expected += 1


def _stream(
    store: LedgerStore, config: Config, stream: str, after: int = -1
) -> Iterator[tuple[int, str, bytes]]:
    """The stream's rows after `after`, in order, by one binary COPY (several times faster than
    paging through the recorder, which builds an object per row)."""
    table = sql.Identifier(_schema(config), store.recorder.events_table_name)  # type: ignore[attr-defined]
    query = sql.SQL(
        "COPY (SELECT originator_version, topic, state FROM {} WHERE originator_id = {} "
        "AND originator_version > {} ORDER BY originator_version) TO STDOUT (FORMAT BINARY)"
    ).format(table, sql.Literal(stream), sql.Literal(after))
    with _connect(config) as conn, conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(["int8", "text", "bytea"])
        for seq, kind, state in copy.rows():
            yield int(seq), str(kind), bytes(state)


def _check_target(
    src: LedgerStore, dst: LedgerStore, config: Config, target_config: Config, platform_id: str
) -> tuple[int, int, Row | None]:
    """Refuse a target that serves the platform or holds a history that is not a prefix of the
    source's; returns (source size, target size, target's last row)."""
    stream = log_stream(platform_id)
    size = _size(src, platform_id)
    if size == 0:
        raise MoveError(f"platform {platform_id} has an empty log in {config.store_name}")
    dst_last = dst.last_row(stream)
    dst_size = 0 if dst_last is None else dst_last[0] + 1
    if dst_size > size:
        raise MoveError(
            f"store {target_config.store_name} holds {dst_size} records of {platform_id}, more "
            f"than the source's {size}: the logs have diverged, nothing was copied"
        )
    if _serves(dst, target_config, platform_id):
        raise MoveError(f"store {target_config.store_name} already serves {platform_id}")
    if dst_last is not None:
        [(_, _, src_packed)] = src.read(stream, after=dst_size - 2, limit=1)
        if records.unpack_state(dst_last[2])[0] != records.unpack_state(src_packed)[0]:
            raise MoveError(
                f"store {target_config.store_name} holds a different history of {platform_id} "
                f"(position {dst_size - 1} differs): nothing was copied"
            )
    return size, dst_size, dst_last


def _copy(
    src: LedgerStore,
    dst: LedgerStore,
    config: Config,
    target_config: Config,
    platform_id: str,
    chunk_rows: int,
    report: MoveReport,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[int, bytes]:
    stream = log_stream(platform_id)
    size, dst_size, dst_last = _check_target(src, dst, config, target_config, platform_id)
    report.side_rows = _copy_side_tables(config, target_config, platform_id)
    in_directory = platform_id in dst.platform_ids()
    pending: list[NewRow] = []
    head = records.CHAIN_GENESIS
    for seq, kind, packed, stored in _chain(_stream(src, config, stream)):
        head = stored
        if seq < dst_size:
            if seq == dst_size - 1 and records.unpack_state(dst_last[2])[0] != stored:  # type: ignore[index]
                raise MoveError(f"the source log of {platform_id} changed during the move")
            continue
        pending.append((stream, seq, kind, packed))
        if len(pending) == chunk_rows:
            dst.append(pending)
            report.copied += len(pending)
            pending = []
            if progress is not None:
                progress("copy", seq + 1, size)
    if head is records.CHAIN_GENESIS or report.copied + len(pending) + dst_size != size:
        raise MoveError(f"the source log of {platform_id} changed during the move")
    if not in_directory:
        pending.append(dst.directory_entry(platform_id))
    if pending:
        dst.append(pending)  # the last rows and the directory entry: one transaction
        report.copied += sum(1 for row in pending if row[0] == stream)
    if progress is not None:
        progress("copy", size, size)
    # Read the target's copy back and check every link: equal heads mean equal bytes throughout.
    checked, target_head = 0, b""
    try:
        for _, _, _, stored in _chain(_stream(dst, target_config, stream)):
            checked += 1
            target_head = stored
    except MoveError as exc:
        raise MoveError(f"the target's copy does not verify: {exc}") from None
    if checked != size or target_head != head:
        raise MoveError(f"the target's copy differs: {checked} records, head {target_head.hex()}")
    if progress is not None:
        progress("verify", size, size)
    return size, head


def _columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[tuple[str, str, bool]]:
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull "
        "FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY a.attnum",
        (f'"{schema}".{table}',),
    ).fetchall()
    return [(str(r[0]), str(r[1]), bool(r[2])) for r in rows]


def _primary_key(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary "
        "ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (f'"{schema}".{table}',),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _create_like(
    src: psycopg.Connection[Any],
    dst: psycopg.Connection[Any],
    src_schema: str,
    dst_schema: str,
    table: str,
) -> None:
    """The table as the source has it (columns, types, NOT NULL, primary key); the owning
    module adds its indexes when it first opens the target."""
    parts = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(name), sql.SQL(type_), sql.SQL(" NOT NULL" if not_null else "")
        )
        for name, type_, not_null in _columns(src, src_schema, table)
    ]
    key = _primary_key(src, src_schema, table)
    if key:
        parts.append(
            sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, key)))
        )
    dst.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
            sql.Identifier(dst_schema, table), sql.SQL(", ").join(parts)
        )
    )


def _platform_rows(
    conn: psycopg.Connection[Any], schema: str, table: str, names: Sequence[str], pid: str
) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE platform = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), sql.Identifier(schema, table)
        ),
        (pid,),
    ).fetchall()
    if len(rows) > _SIDE_ROWS_MAX:
        raise MoveError(f"{table} holds more than {_SIDE_ROWS_MAX} rows of {pid}")
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]


def _copy_side_tables(config: Config, target_config: Config, platform_id: str) -> dict[str, int]:
    """Copy the platform's side data in one target transaction; returns rows per table."""
    src_schema, dst_schema = _schema(config), _schema(target_config)
    copied: dict[str, int] = {}
    with _connect(config) as src, _connect(target_config) as dst:
        with src.transaction():
            src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            plan: list[tuple[str, list[str], list[tuple[Any, ...]]]] = []
            for table in MERGED_TABLES + REPLACED_TABLES:
                if not table_exists(src, src_schema, table):
                    continue
                names = [name for name, _, _ in _columns(src, src_schema, table)]
                plan.append(
                    (table, names, _platform_rows(src, src_schema, table, names, platform_id))
                )
        with dst.transaction():
            for table, names, rows in plan:
                if not table_exists(dst, dst_schema, table):
                    _create_like(src, dst, src_schema, dst_schema, table)
                target = sql.Identifier(dst_schema, table)
                if table in REPLACED_TABLES:
                    # the engine's state of the last time the platform was here is stale
                    dst.execute(
                        sql.SQL("DELETE FROM {} WHERE platform = %s").format(target),
                        (platform_id,),
                    )
                insert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                    target,
                    sql.SQL(", ").join(map(sql.Identifier, names)),
                    sql.SQL(", ").join(sql.Placeholder() * len(names)),
                )
                with dst.cursor() as cur:
                    for start in range(0, len(rows), 1000):
                        cur.executemany(insert, rows[start : start + 1000])
                present = set(_platform_rows(dst, dst_schema, table, names, platform_id))
                missing = [row for row in rows if row not in present]
                if missing:
                    raise MoveError(
                        f"{table}: {len(missing)} rows of {platform_id} differ in the target "
                        "from the source; nothing was copied"
                    )
                copied[table] = len(rows)
    return copied

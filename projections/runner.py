"""Runs projections over each platform's ordered log: batches, positions, crash safety.

For one platform the runner reads the next page of the log (`LedgerStore.read`, never a write),
checks it is the continuation of what was projected (positions without gaps, hash chain links
from the stored head), and gives the records to every projection that has not seen them. Each
projection's rows AND its new position commit in ONE database transaction, behind a
compare-and-set on the old position: a crash loses the whole batch or nothing, and a second
runner on the same projection gets `PositionConflict` instead of counting a batch twice.

Workers (`follow`, i.e. `custody project run --follow` and the runner embedded in `custody
serve`) on PostgreSQL also take a **lease** per (projection, platform): a session-level advisory
lock on a dedicated connection (`ProjectionLeases`), so each projection of each platform is
processed by exactly one worker at a time while the others poll and take over when its session
ends. The holder records itself in `proj_leases` (worker, epoch, where it started) and
`proj_lease_history`; every batch it commits first moves its own `proj_leases` row, in the same
transaction, only if that row still names it at its epoch (the fence: a worker whose lease
session died unnoticed cannot commit after a takeover). SQLite (one process) takes no lease.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ledger import records
from ledger.config import Config
from ledger.lease import connect_kwargs, lease_key
from ledger.store import READ_PAGE_MAX, LedgerStore, log_stream
from projections.audit_trail import AuditTrailProjection
from projections.base import (
    RECORD_DECODER,
    PositionConflict,
    Projection,
    ProjectionError,
    Record,
    scope,
)
from projections.db import Db
from projections.statements import StatementsProjection

log = logging.getLogger("custody.projections")

POSITIONS: Final = "proj_positions"
LAYOUTS: Final = "proj_layouts"  # the table layout each projection's rows were written in
LEASES: Final = "proj_leases"  # who processes each (projection, platform) now, since when
LEASE_HISTORY: Final = "proj_lease_history"  # every takeover, oldest first (insert only)
LEASE_CHECK_S: Final = 1.0  # how often a worker confirms its lease session answers
DEFAULT_BATCH: Final = 5_000
BATCH_MAX: Final = READ_PAGE_MAX  # one page of the log per transaction at most
GENESIS_HEX: Final = records.CHAIN_GENESIS.hex()
FOLLOW_POLL_S: Final = 0.2
_HASH_LEN: Final = records.HASH_LEN
_DECODE: Final = RECORD_DECODER.decode
_BAD_RECORD: Final = (msgspec.DecodeError, msgspec.ValidationError)


def default_projections() -> list[Projection]:
    return [StatementsProjection(), AuditTrailProjection()]


@dataclass(frozen=True)
class Status:
    name: str
    platform: str
    position: int  # last projected log position, -1 = nothing yet
    log_position: int  # last stored log position
    lag: int


@dataclass
class _Pos:
    position: int
    head: bytes


class LeaseSuperseded(PositionConflict):
    """This worker's lease on a projection was taken over: its batch was not committed."""


@dataclass(frozen=True)
class LeaseInfo:
    """A row of `proj_leases` or `proj_lease_history`."""

    name: str
    platform: str
    epoch: int
    worker: str
    since_ms: int
    from_position: int  # the projection's stored position when the worker took it
    position: int = -1  # proj_leases only: the last position this epoch committed


class ProjectionLeases:
    """One worker's leases on (projection, platform) pairs, all on one dedicated PostgreSQL
    session (never a pooled connection: the session holds the locks). PostgreSQL's lock manager
    decides who holds a lease and frees every lock of a session that ends (worker killed)."""

    def __init__(self, db: Db, config: Config) -> None:
        assert db.is_pg, "projection leases are PostgreSQL session locks"
        self.db = db
        self.config = config
        self.worker = config.server_id
        self.schema = db.schema or "public"
        self.held: dict[tuple[str, str], int] = {}  # (name, platform) -> epoch
        self._conn: Any = None
        self._checked = 0.0
        self.check_every_s = LEASE_CHECK_S
        self._lock = threading.Lock()

    def key(self, name: str, platform: str) -> int:
        # ':' never appears in a platform id, so no projection key equals a writer lease key
        return lease_key(self.config.ledger_id, self.schema, f"projection:{name}:{platform}")

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            import psycopg

            self.held.clear()
            self._conn = psycopg.connect(
                **connect_kwargs(self.config, timeout_s=2.0, purpose="projection")
            )
            self._checked = time.monotonic()
        return self._conn

    def _drop_session(self) -> None:
        conn, self._conn = self._conn, None
        self.held.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken session is closed anyway
                log.debug("closing the projection lease session failed", exc_info=True)

    def close(self) -> None:
        """End the session: PostgreSQL releases every lease it held."""
        with self._lock:
            self._drop_session()

    def check(self) -> bool:
        """Whether the session still answers (asked at most every LEASE_CHECK_S); on failure
        every lease is dropped (another worker may have them by now). False if any was lost."""
        with self._lock:
            if self._conn is None or time.monotonic() - self._checked < self.check_every_s:
                return True
            try:
                self._conn.execute("SELECT 1")
            except Exception as exc:
                had = bool(self.held)
                log.error("projection lease session lost: %s", exc)
                self._drop_session()
                return not had
            self._checked = time.monotonic()
            return True

    def take(self, name: str, platform: str) -> bool:
        """Hold the lease of `name` on `platform` (True), newly taken or already held; False if
        another worker holds it. A new holder announces itself (new epoch) before projecting."""
        with self._lock:
            if (name, platform) in self.held:
                return True
            for attempt in (1, 2):  # a session that died since the last check: once more, anew
                try:
                    conn = self._connection()
                    row = conn.execute(
                        "SELECT pg_try_advisory_lock(%s)", (self.key(name, platform),)
                    ).fetchone()
                    if row is None or not row[0]:
                        return False
                    info = self._announce(conn, name, platform)
                    break
                except Exception:
                    self._drop_session()  # whatever it held is gone with it
                    if attempt == 2:
                        raise
            self.held[(name, platform)] = info.epoch
        log.info(
            "projecting %s of %s from position %d (epoch %d, worker %s)",
            name,
            platform,
            info.from_position,
            info.epoch,
            self.worker,
        )
        return True

    def _announce(self, conn: Any, name: str, platform: str) -> LeaseInfo:
        """New epoch for this worker. The UPDATE waits for a batch of the previous holder that
        is committing (it moves the same row), so the position read after it is where that
        holder stopped: the new holder resumes exactly there."""
        db = self.db
        with conn.transaction():
            row = conn.execute(
                f"INSERT INTO {db.t(LEASES)} AS l (name, platform, worker, epoch, since_ms, "
                "from_position, position) VALUES (%s, %s, %s, 1, "
                "(extract(epoch FROM clock_timestamp()) * 1000)::bigint, -1, -1) "
                "ON CONFLICT (name, platform) DO UPDATE SET worker = excluded.worker, "
                "epoch = l.epoch + 1, since_ms = excluded.since_ms RETURNING epoch, since_ms",
                (name, platform, self.worker),
            ).fetchone()
            assert row is not None
            epoch, since_ms = int(row[0]), int(row[1])
            found = conn.execute(
                f"SELECT position FROM {db.t(POSITIONS)} WHERE name = %s AND platform = %s",
                (name, platform),
            ).fetchone()
            position = -1 if found is None else int(found[0])
            conn.execute(
                f"UPDATE {db.t(LEASES)} SET from_position = %s, position = %s "
                "WHERE name = %s AND platform = %s",
                (position, position, name, platform),
            )
            conn.execute(
                f"INSERT INTO {db.t(LEASE_HISTORY)} (name, platform, epoch, worker, since_ms, "
                "from_position) VALUES (%s, %s, %s, %s, %s, %s)",
                (name, platform, epoch, self.worker, since_ms, position),
            )
        return LeaseInfo(name, platform, epoch, self.worker, since_ms, position)

    def fence(self, cur: Any, name: str, platform: str, last: int) -> None:
        """In a batch's transaction: move this worker's `proj_leases` row to `last`, or raise
        LeaseSuperseded if the row no longer names it at its epoch (nothing is committed)."""
        epoch = self.held.get((name, platform))
        if epoch is not None:
            cur.execute(
                f"UPDATE {self.db.t(LEASES)} SET position = %s WHERE name = %s "
                "AND platform = %s AND epoch = %s AND worker = %s",
                (last, name, platform, epoch, self.worker),
            )
            if cur.rowcount == 1:
                return
        with self._lock:
            self.held.pop((name, platform), None)
        raise LeaseSuperseded(f"{platform}: projection {name} is processed by another worker")


def lease_rows(db: Db, history: bool = False) -> list[LeaseInfo]:
    """`proj_leases` (who processes what now) or `proj_lease_history` (every takeover)."""
    with db.reading() as cur:
        if history:
            rows = db.fetchall(
                cur,
                "SELECT name, platform, epoch, worker, since_ms, from_position "
                f"FROM {db.t(LEASE_HISTORY)} ORDER BY name, platform, epoch",
            )
        else:
            rows = db.fetchall(
                cur,
                "SELECT name, platform, epoch, worker, since_ms, from_position, position "
                f"FROM {db.t(LEASES)} ORDER BY name, platform",
            )
    return [LeaseInfo(*row) for row in rows]


class ProjectionRunner:
    """Keeps a set of projections up to date with the platforms' logs in one database."""

    def __init__(
        self,
        store: LedgerStore,
        projections: Sequence[Projection] | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        assert 1 <= batch_size <= BATCH_MAX, f"batch_size must be in 1..{BATCH_MAX}"
        self.store = store
        self.db = Db(store)
        self.projections = list(projections) if projections is not None else default_projections()
        names = [p.name for p in self.projections]
        assert self.projections and len(set(names)) == len(names), names
        self.batch_size = batch_size
        self._pos: dict[tuple[str, str], _Pos] = {}
        self._created = False
        # One batch at a time per runner, whichever thread asks (follow loop, API, CLI).
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self._writer_pool: ThreadPoolExecutor | None = None  # PostgreSQL: one per projection
        # platform -> (after, head, the page after it being read): at most one page ahead
        self._ahead: dict[str, tuple[int, bytes, Future[tuple[list[Record], list[bytes]]]]] = {}
        # set by `use_leases` (follow does it on PostgreSQL): only leased projections are run
        self.leases: ProjectionLeases | None = None
        # records this runner committed per (projection, platform): with leases, the sum over
        # all workers is each log's length (every record projected once, by one worker)
        self.projected: dict[tuple[str, str], int] = {}

    def _prefetcher(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="projection-prefetch")
        return self._pool

    def close(self) -> None:
        """Stop the prefetch thread and end the lease session (the store is the caller's)."""
        self._ahead.clear()
        for pool in (self._pool, self._writer_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._writer_pool = None
        if self.leases is not None:
            self.leases.close()

    def use_leases(self) -> bool:
        """From now on run only the (projection, platform) pairs this runner holds the lease
        of (PostgreSQL; True). On SQLite there is one process, no lease: False."""
        if not self.db.is_pg:
            return False
        if self.leases is None:
            self.ensure_tables()
            with self._lock:
                self.leases = ProjectionLeases(self.db, self.store.config)
        return True

    def _active(self, platform: str) -> list[Projection]:
        """The projections this runner may run on `platform` now: every one without leases;
        with leases the ones it holds or can take (a takeover reloads every position)."""
        leases = self.leases
        if leases is None:
            return self.projections
        if not leases.check():
            self._forget()
        active = []
        for p in self.projections:
            had = (p.name, platform) in leases.held
            if leases.take(p.name, platform):
                if not had:
                    self._forget()  # positions and caches: the previous holder moved them
                active.append(p)
        return active

    # -- setup ----------------------------------------------------------------------------------

    def ensure_tables(self) -> None:
        if self._created:
            return
        db = self.db
        with self._lock, db.tx() as cur:
            if db.is_pg:  # concurrent CREATE ... IF NOT EXISTS can still collide in pg_type
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('custody-projections'))")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(POSITIONS)} (name TEXT NOT NULL, "
                "platform TEXT NOT NULL, position BIGINT NOT NULL, head TEXT NOT NULL, "
                "PRIMARY KEY (name, platform))"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(LAYOUTS)} (name TEXT NOT NULL, "
                "layout INTEGER NOT NULL, PRIMARY KEY (name))"
            )
            if db.is_pg:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {db.t(LEASES)} (name TEXT NOT NULL, "
                    "platform TEXT NOT NULL, worker TEXT NOT NULL, epoch BIGINT NOT NULL, "
                    "since_ms BIGINT NOT NULL, from_position BIGINT NOT NULL, "
                    "position BIGINT NOT NULL, PRIMARY KEY (name, platform))"
                )
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {db.t(LEASE_HISTORY)} (name TEXT NOT NULL, "
                    "platform TEXT NOT NULL, epoch BIGINT NOT NULL, worker TEXT NOT NULL, "
                    "since_ms BIGINT NOT NULL, from_position BIGINT NOT NULL, "
                    "PRIMARY KEY (name, platform, epoch))"
                )
            for p in self.projections:
                self._upgrade(cur, p)
                p.create(db, cur)
        self._created = True

    def _upgrade(self, cur: Any, p: Projection) -> None:
        """A projection whose table layout changed starts again from position -1: drop its
        tables (and retired ones) and reset its positions, in the creating transaction."""
        db = self.db
        row = db.fetchone(
            cur, f"SELECT layout FROM {db.t(LAYOUTS)} WHERE name = {db.ph}", (p.name,)
        )
        stored = 1 if row is None else int(row[0])  # layout 1: before layouts were recorded
        if stored == p.layout:
            return
        for table in (*(t for t, _, _ in p.tables), *p.retired):
            cur.execute(f"DROP TABLE IF EXISTS {db.t(table)}")
        cur.execute(
            f"UPDATE {db.t(POSITIONS)} SET position = -1, head = {db.ph} WHERE name = {db.ph}",
            (GENESIS_HEX, p.name),
        )
        cur.execute(f"DELETE FROM {db.t(LAYOUTS)} WHERE name = {db.ph}", (p.name,))
        cur.execute(
            f"INSERT INTO {db.t(LAYOUTS)} (name, layout) VALUES ({db.ph}, {db.ph})",
            (p.name, p.layout),
        )
        p.reset()
        log.info("projection %s: table layout %d -> %d, projecting again", p.name, stored, p.layout)

    def _load_positions(self, platform: str) -> dict[str, _Pos]:
        db = self.db
        ph = db.ph
        missing = [p.name for p in self.projections if (p.name, platform) not in self._pos]
        if missing:
            with db.tx() as cur:
                for name in missing:
                    cur.execute(
                        f"INSERT INTO {db.t(POSITIONS)} (name, platform, position, head) "
                        f"VALUES ({ph}, {ph}, -1, {ph}) ON CONFLICT DO NOTHING",
                        (name, platform, GENESIS_HEX),
                    )
                for name in missing:
                    row = db.fetchone(
                        cur,
                        f"SELECT position, head FROM {db.t(POSITIONS)} "
                        f"WHERE name = {ph} AND platform = {ph}",
                        (name, platform),
                    )
                    assert row is not None
                    self._pos[(name, platform)] = _Pos(int(row[0]), bytes.fromhex(row[1]))
        return {p.name: self._pos[(p.name, platform)] for p in self.projections}

    def _forget(self) -> None:
        """After a failed transaction nothing cached can be trusted: reload from the database."""
        self._pos.clear()
        self._ahead.clear()
        for p in self.projections:
            p.reset()

    # -- running --------------------------------------------------------------------------------

    def run_once(self, platform: str) -> int:
        """Project at most one batch of `platform`'s log; returns how many records were read."""
        self.ensure_tables()
        with self._lock:
            try:
                return self._run_batch(platform)
            except BaseException:
                self._forget()
                raise

    def _fetch(self, platform: str, start: int, head: bytes) -> tuple[list[Record], list[bytes]]:
        """Read, chain-check and decode the page after `start` (safe on another thread)."""
        rows = self._read(platform, start)
        return _verified(platform, rows, start, head) if rows else ([], [])

    def _run_batch(self, platform: str) -> int:
        active = self._active(platform)
        if not active:
            return 0  # other workers hold every lease of this platform
        loaded = self._load_positions(platform)
        positions = {p.name: loaded[p.name] for p in active}
        start = min(pos.position for pos in positions.values())
        starter = next(pos for pos in positions.values() if pos.position == start)
        ahead = self._ahead.pop(platform, None)
        if ahead is not None and ahead[0] == start and ahead[1] == starter.head:
            recs, heads = ahead[2].result()
        else:
            recs, heads = self._fetch(platform, start, starter.head)
        if not recs:
            return 0
        last = recs[-1].seq
        for name, pos in positions.items():
            if start < pos.position <= last and heads[pos.position - start - 1] != pos.head:
                raise ProjectionError(
                    f"{platform}: projection {name} stopped at {pos.position} on another chain"
                )
        db = self.db
        new_head = heads[len(recs) - 1]
        if len(recs) == self.batch_size:
            # More is probably waiting: read and decode the next page on the prefetch thread
            # while this one is written (SQLite and psycopg release the GIL during I/O).
            future = self._prefetcher().submit(self._fetch, platform, last, new_head)
            self._ahead[platform] = (last, new_head, future)
        todo = [p for p in active if positions[p.name].position < last]
        done: list[Projection] = []
        try:
            if db.is_pg and len(todo) > 1:
                # Positions are independent: each projection commits in its own transaction,
                # on its own pooled connection, so the server writes one projection's rows while
                # this process builds the other's. (SQLite has one writer at a time: one
                # transaction for all.)
                writing = [
                    (p, self._writers().submit(self._write_alone, p, platform, recs, start, last,
                                               new_head, positions[p.name].position))
                    for p in todo
                ]  # fmt: skip
                failed: BaseException | None = None
                for p, written in writing:
                    try:
                        written.result()
                        done.append(p)
                    except BaseException as exc:
                        failed = failed or exc
                if failed is not None:
                    raise failed
            elif todo:
                with db.tx() as cur:
                    for p in todo:
                        self._write(cur, p, platform, recs, start, last, new_head,
                                    positions[p.name].position)  # fmt: skip
                done = todo
        finally:  # what committed stays committed, even when another projection failed
            for p in done:
                self._pos[(p.name, platform)] = _Pos(last, new_head)
                old = positions[p.name].position
                key = (p.name, platform)
                self.projected[key] = self.projected.get(key, 0) + last - old
        return len(recs)

    def _writers(self) -> ThreadPoolExecutor:
        if self._writer_pool is None:
            self._writer_pool = ThreadPoolExecutor(
                len(self.projections), thread_name_prefix="projection-write"
            )
        return self._writer_pool

    def _write_alone(
        self,
        p: Projection,
        platform: str,
        recs: list[Record],
        start: int,
        last: int,
        new_head: bytes,
        old: int,
    ) -> None:
        with self.db.tx() as cur:
            self._write(cur, p, platform, recs, start, last, new_head, old)

    def _write(
        self,
        cur: Any,
        p: Projection,
        platform: str,
        recs: list[Record],
        start: int,
        last: int,
        new_head: bytes,
        old: int,
    ) -> None:
        """One projection's part of a batch, in the caller's transaction: the lease fence, the
        position's compare-and-set, then its rows."""
        db = self.db
        ph = db.ph
        if self.leases is not None:  # first: waits for, or stops, a takeover
            self.leases.fence(cur, p.name, platform, last)
        # Position first: on SQLite this takes the write lock before anything is read.
        cur.execute(
            f"UPDATE {db.t(POSITIONS)} SET position = {ph}, head = {ph} "
            f"WHERE name = {ph} AND platform = {ph} AND position = {ph}",
            (last, new_head.hex(), p.name, platform, old),
        )
        if cur.rowcount != 1:
            raise PositionConflict(f"{platform}: projection {p.name} is no longer at {old}")
        p.apply(db, cur, platform, recs[old - start :])

    def _read(self, platform: str, after: int) -> list[tuple[int, str, bytes]]:
        """The next page of the log after `after`, read straight from the event table.

        Read-only and paged by position like `LedgerStore.read`, but without building one
        eventsourcing `StoredEvent` per row, which costs more than projecting the record.
        Positions have no gaps, so the page is also bounded above: with stale statistics
        after a bulk load PostgreSQL otherwise sorts every remaining row for each page.
        The table layout is the documented one (docs/FORMAT.md §1); if the recorder does not
        expose its table, fall back to `LedgerStore.read`.
        """
        table = getattr(self.store.recorder, "events_table_name", None)
        if not isinstance(table, str) or not table.replace("_", "").isalnum():
            return self.store.read(log_stream(platform), after=after, limit=self.batch_size)
        db = self.db
        name = f'"{db.schema}".{table}' if db.schema else table
        with db.reading() as cur:
            if not db.is_pg:  # plain tuples: this cursor's rows need no sqlite3.Row per row
                cur.row_factory = None
            cur.execute(
                f"SELECT originator_version, topic, state FROM {name} "
                f"WHERE originator_id = {db.ph} AND originator_version > {db.ph} "
                f"AND originator_version <= {db.ph} "
                f"ORDER BY originator_version LIMIT {int(self.batch_size)}",
                (log_stream(platform), after, after + self.batch_size),
            )
            rows = cur.fetchall()
        if db.is_pg:
            return [(r["originator_version"], r["topic"], bytes(r["state"])) for r in rows]
        return rows  # type: ignore[no-any-return]

    def catch_up(
        self,
        platform: str | None = None,
        stop: threading.Event | None = None,
        max_batches: int | None = None,
    ) -> dict[str, int]:
        """Project until every platform (or one) is at its log head; records read per platform."""
        assert max_batches is None or max_batches >= 1
        done: dict[str, int] = {}
        batches = 0
        for pid in [platform] if platform is not None else self.store.platform_ids():
            done[pid] = 0
            while stop is None or not stop.is_set():
                if max_batches is not None and batches >= max_batches:
                    return done
                try:
                    n = self.run_once(pid)
                except PositionConflict:  # another runner moved on: reload and go on from there
                    log.info("projection position of %s moved under us; reloading", pid)
                    continue
                batches += 1
                done[pid] += n
                if n < self.batch_size:
                    break
        return done

    def follow(
        self,
        stop: threading.Event,
        platform: str | None = None,
        poll_s: float = FOLLOW_POLL_S,
        lease: bool = True,
    ) -> None:
        """Catch up, then keep up, until `stop` is set. Failures are logged and retried.

        With `lease` (PostgreSQL) this runner is one of any number of workers: it projects
        only what it holds the lease of, and takes over a lease within `poll_s` of its holder's
        session ending."""
        assert 0 < poll_s <= 60
        if lease:
            self.use_leases()
        while not stop.is_set():
            try:
                moved = sum(self.catch_up(platform, stop=stop).values())
            except Exception:
                log.exception("projection batch failed; retrying")
                moved = 0
                stop.wait(min(5.0, poll_s * 10))
            if not moved:
                stop.wait(poll_s)

    # -- maintenance ----------------------------------------------------------------------------

    def rebuild(self, platform: str | None = None) -> dict[str, int]:
        """Drop the read models (one platform or all) and their positions, then project again."""
        self.ensure_tables()
        db = self.db
        pids = [platform] if platform is not None else self.store.platform_ids()
        with self._lock, db.tx() as cur:
            try:
                for pid in pids:
                    for p in self.projections:
                        p.drop(db, cur, pid)
                        cur.execute(
                            f"UPDATE {db.t(POSITIONS)} SET position = -1, head = {db.ph} "
                            f"WHERE name = {db.ph} AND platform = {db.ph}",
                            (GENESIS_HEX, p.name, pid),
                        )
            finally:
                self._forget()
        return {pid: self.catch_up(pid)[pid] for pid in pids}

    def status(self, platform: str | None = None) -> list[Status]:
        self.ensure_tables()
        db = self.db
        out = []
        for pid in [platform] if platform is not None else self.store.platform_ids():
            with db.reading() as cur:  # the stored positions, not this runner's cache
                stored = dict(
                    db.fetchall(
                        cur,
                        f"SELECT name, position FROM {db.t(POSITIONS)} WHERE platform = {db.ph}",
                        (pid,),
                    )
                )
            last = self.store.last_row(log_stream(pid))
            log_position = -1 if last is None else last[0]
            for p in self.projections:
                position = int(stored.get(p.name, -1))
                out.append(Status(p.name, pid, position, log_position, log_position - position))
        return out

    def dump(self, platform: str) -> Iterator[bytes]:
        """Every row of every read model of `platform`, canonical and in key order (for tests
        and audits: two runs are identical iff their dumps are byte-identical)."""
        self.ensure_tables()
        db = self.db
        with db.reading() as cur:
            for p in self.projections:
                for table, key, column in p.tables:
                    where, params = scope(db, cur, platform, column)
                    cur.execute(
                        f"SELECT * FROM {db.t(table)} WHERE {where} ORDER BY {', '.join(key)}",
                        params,
                    )
                    while True:
                        page = cur.fetchmany(READ_PAGE_MAX)
                        if not page:
                            break
                        for row in page:
                            vals = row.values() if isinstance(row, dict) else tuple(row)
                            yield table.encode() + b" " + msgspec.json.encode(list(vals))

    def digest(self, platform: str) -> str:
        h = hashlib.sha256()
        for line in self.dump(platform):
            h.update(line + b"\n")
        return h.hexdigest()


def _verified(
    platform: str, rows: list[tuple[int, str, bytes]], start: int, head: bytes
) -> tuple[list[Record], list[bytes]]:
    """Decode rows that continue the projected prefix; chain links checked from `head`.

    Stops at the first gap (not yet visible); raises on anything that is not the same log.
    """
    recs: list[Record] = []
    heads: list[bytes] = []
    expected = start + 1
    sha256 = hashlib.sha256
    for seq, kind, packed in rows:
        if seq != expected:
            break
        link, data = packed[:_HASH_LEN], packed[_HASH_LEN:]
        if sha256(head + data).digest() != link:
            raise ProjectionError(f"{platform}: chain broken at position {seq}")
        try:
            rec = _DECODE(data)
        except _BAD_RECORD:
            raise ProjectionError(f"{platform}: record at position {seq} is malformed") from None
        if rec.seq != seq or rec.kind != kind or rec.platform != platform:
            raise ProjectionError(f"{platform}: record at position {seq} is misplaced")
        recs.append(rec)
        heads.append(link)
        head = link
        expected += 1
    return recs, heads


class EmbeddedRunner:
    """A follow loop on a daemon thread, for `custody serve` (stop it with `close`)."""

    def __init__(self, store: LedgerStore, batch_size: int = DEFAULT_BATCH) -> None:
        self.runner = ProjectionRunner(store, batch_size=batch_size)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.runner.follow, args=(self.stop,), name="projections", daemon=True
        )

    def start(self) -> EmbeddedRunner:
        self.thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        self.stop.set()
        self.thread.join(timeout_s)
        self.runner.close()

"""Runs projections over each platform's ordered log: batches, positions, crash safety.

For one platform the runner reads the next page of the log (`LedgerStore.read`, never a write),
checks it is the continuation of what was projected (positions without gaps, hash chain links
from the stored head), and gives the records to every projection that has not seen them. Each
projection's rows AND its new position commit in ONE database transaction, behind a
compare-and-set on the old position: a crash loses the whole batch or nothing, and a second
runner on the same projection gets `PositionConflict` instead of counting a batch twice.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ledger import records
from ledger.store import READ_PAGE_MAX, LedgerStore, log_stream
from projections.audit_trail import AuditTrailProjection
from projections.base import (
    RECORD_DECODER,
    PositionConflict,
    Projection,
    ProjectionError,
    Record,
)
from projections.db import Db
from projections.statements import StatementsProjection

log = logging.getLogger("custody.projections")

POSITIONS: Final = "proj_positions"
LAYOUTS: Final = "proj_layouts"  # the table layout each projection's rows were written in
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
        # platform -> (after, head, the page after it being read): at most one page ahead
        self._ahead: dict[str, tuple[int, bytes, Future[tuple[list[Record], list[bytes]]]]] = {}

    def _prefetcher(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="projection-prefetch")
        return self._pool

    def close(self) -> None:
        """Stop the prefetch thread (the store belongs to the caller)."""
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

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
        for table in (*(t for t, _ in p.tables), *p.retired):
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
        positions = self._load_positions(platform)
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
        ph = db.ph
        update = (
            f"UPDATE {db.t(POSITIONS)} SET position = {ph}, head = {ph} "
            f"WHERE name = {ph} AND platform = {ph} AND position = {ph}"
        )
        new_head = heads[len(recs) - 1]
        if len(recs) == self.batch_size:
            # More is probably waiting: read and decode the next page on the prefetch thread
            # while this one is written (SQLite and psycopg release the GIL during I/O).
            future = self._prefetcher().submit(self._fetch, platform, last, new_head)
            self._ahead[platform] = (last, new_head, future)
        with db.tx() as cur:
            for p in self.projections:
                pos = positions[p.name]
                if pos.position >= last:
                    continue
                # Position first: on SQLite this takes the write lock before anything is read.
                cur.execute(update, (last, new_head.hex(), p.name, platform, pos.position))
                if cur.rowcount != 1:
                    raise PositionConflict(
                        f"{platform}: projection {p.name} is no longer at {pos.position}"
                    )
                p.apply(db, cur, platform, recs[pos.position - start :])
        for p in self.projections:
            self._pos[(p.name, platform)] = _Pos(last, new_head)
        return len(recs)

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
        return [(r[0], r[1], r[2]) for r in rows]

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
    ) -> None:
        """Catch up, then keep up, until `stop` is set. Failures are logged and retried."""
        assert 0 < poll_s <= 60
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
                for table, key in p.tables:
                    cur.execute(
                        f"SELECT * FROM {db.t(table)} WHERE platform = {db.ph} "
                        f"ORDER BY {', '.join(key)}",
                        (platform,),
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

"""The event store: eventsourcing's application recorder, one ordered log per platform.

Each platform's log is one stream in the recorder's table: originator_id `log:<platform>`,
originator_version = the record's position (0, 1, 2, ...), topic = record kind, state = the
32-byte chain hash followed by the canonical record bytes. One `append` is one database
transaction; the primary key (originator_id, originator_version) makes a second writer for the
same platform fail instead of forking the log. A `directory` stream lists the platforms.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Final

from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import Environment
from psycopg.sql import SQL, Identifier

from ledger.config import STORE_POSTGRES, Config

_log = logging.getLogger("ledger.store")
DIRECTORY_STREAM: Final = "directory"
APP_NAME: Final = "custody"
READ_PAGE_MAX: Final = 10_000
WRITERS_TABLE: Final = "custody_writers"  # who writes each platform (ledger/lease.py)
# A leased writer's group transaction that goes silent (a stalled or cut network between this
# server and PostgreSQL) holds the events table's EXCLUSIVE lock and its writers row: every
# other server's commits and any takeover of the platform wait behind it. PostgreSQL ends it
# after GROUP_SILENCE_MS instead (idle_in_transaction_session_timeout between statements,
# statement_timeout on the COPY once the table lock is held): the group is rolled back and the
# locks are free. A healthy group commits in milliseconds. Waiting for those locks (behind such
# a silent peer) may take up to GROUP_LOCK_WAIT_MS, so the waiter outlives the silent one.
GROUP_SILENCE_MS: Final = 5_000
GROUP_LOCK_WAIT_MS: Final = 3 * GROUP_SILENCE_MS

__all__ = [
    "IntegrityError",
    "LedgerStore",
    "NewRow",
    "Row",
    "WriterClaim",
    "WriterSuperseded",
    "log_stream",
]

Row = tuple[int, str, bytes]  # a stored record as read: (position, kind, packed state)
# A record to insert, already in the table's column order (originator_id, originator_version,
# topic, state), so a group goes to the database without building any further objects.
NewRow = tuple[str, int, str, bytes]
# A leased writer's identity as recorded in `custody_writers`: (platform id, server id, epoch).
WriterClaim = tuple[str, str, int]


class WriterSuperseded(RuntimeError):
    """The platform's recorded writer is no longer this server at this epoch (another server
    took the lease over): the group's transaction was rolled back, nothing was stored."""

    def __init__(self, claim: WriterClaim, recorded: tuple[str, int] | None) -> None:
        self.claim = claim
        self.recorded = recorded
        platform_id, server_id, epoch = claim
        now = "nobody" if recorded is None else f"server {recorded[0]} (epoch {recorded[1]})"
        super().__init__(
            f"platform {platform_id}: server {server_id} (epoch {epoch}) is no longer its "
            f"recorded writer; {now} is"
        )


def log_stream(platform_id: str) -> str:
    return f"log:{platform_id}"


class BatchSQLiteRecorder(SQLiteApplicationRecorder):
    """Inserts a group with one executemany: we number records ourselves and need no rowids."""

    def _insert_events(self, c: Any, stored_events: Sequence[StoredEvent], **_: Any) -> None:
        c.executemany(
            self.insert_events_statement,
            [(s.originator_id, s.originator_version, s.topic, s.state) for s in stored_events],
        )

    def insert_rows(self, rows: Sequence[NewRow]) -> None:
        """The hot path: rows straight into executemany, one transaction."""
        with self.datastore.transaction(commit=True) as c:
            c.executemany(self.insert_events_statement, rows)


class BatchPostgresRecorder(PostgresApplicationRecorder):
    """Inserts a group with one binary COPY inside one transaction.

    The library's composite-type unnest path escapes every field in Python (~50 µs per row
    measured here, ~30 µs with typed arrays); binary COPY costs ~10 µs per row, most of it in
    the server process, which runs on the other core while the writer decides the next group.
    The library's table lock and NOTIFY are kept, so commit order is still log order for every
    reader. Unlike the library's pipelined path, any exception here rolls the transaction back.
    No automatic retry: after a failed commit the writer rebuilds its state from the store, which
    tells it whether the group landed, and callers retry safely with the same client ids.
    """

    def __init__(self, datastore: Any, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self._copy_statement = SQL(
            "COPY {schema}.{table} (originator_id, originator_version, topic, state) "
            "FROM STDIN (FORMAT BINARY)"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
        )
        # Leased groups only (several servers share the store): bound how long a silent
        # transaction holds its locks (GROUP_SILENCE_MS), without an extra round trip: the
        # guard replaces the library's lock_timeout statement, the second bound rides on NOTIFY.
        assert "lock_timeout" in repr(self.lock_table_statements[0]), self.lock_table_statements
        self._guard_statement = SQL(
            "SET LOCAL statement_timeout = '{wait}ms'; "
            "SET LOCAL idle_in_transaction_session_timeout = '{silence}ms'; "
            "SET LOCAL lock_timeout = '{lock}s'"
        ).format(
            wait=GROUP_LOCK_WAIT_MS,
            silence=GROUP_SILENCE_MS,
            lock=int(self.datastore.lock_timeout),
        )
        self._notify_bounded = SQL(
            "NOTIFY {channel}; SET LOCAL statement_timeout = '{ms}ms'"
        ).format(channel=Identifier(self.channel_name), ms=GROUP_SILENCE_MS)
        # The writer check: FOR SHARE holds the row until this transaction ends, so a takeover
        # (`LeaseManager.announce`, an UPDATE of the same row) waits for a commit already past
        # the check, and a commit that comes after the takeover sees the new writer and aborts.
        self._writer_statement = SQL(
            "SELECT server_id, epoch FROM {schema}.{table} WHERE platform_id = %s FOR SHARE"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(WRITERS_TABLE))

    def _lock_table(self, curs: Any) -> None:
        """LOCK TABLE only: `insert_rows` has set lock_timeout already (with the guard)."""
        for statement in self.lock_table_statements[1:]:
            curs.execute(statement, prepare=True)

    def insert_events(self, stored_events: Sequence[StoredEvent], **_: Any) -> None:
        self.insert_rows(
            [(str(s.originator_id), s.originator_version, s.topic, s.state) for s in stored_events]
        )

    def insert_rows(self, rows: Sequence[NewRow], claim: WriterClaim | None = None) -> None:
        """The hot path: rows straight into COPY, one transaction.

        With a `claim` (a leased writer), the same transaction first checks that the claim is
        still the platform's row in `custody_writers` and raises `WriterSuperseded` (rolling
        back) otherwise: a writer whose lease was taken over cannot commit anything more.
        """
        if not rows:
            return
        with (
            self.datastore.get_connection() as conn,
            conn.transaction(),
            conn.cursor() as curs,
        ):
            if claim is None:
                curs.execute(self.lock_table_statements[0], prepare=True)  # lock_timeout
            else:
                curs.execute(self._guard_statement)
                curs.execute(self._writer_statement, (claim[0],))
                found: Any = curs.fetchone()
                if isinstance(found, dict):  # eventsourcing's pool hands out dict rows
                    found = (found["server_id"], found["epoch"])
                recorded = None if found is None else (str(found[0]), int(found[1]))
                if recorded != (claim[1], claim[2]):
                    raise WriterSuperseded(claim, recorded)
            self._lock_table(curs)
            if claim is None:
                self._notify_channel(curs)
            else:
                curs.execute(self._notify_bounded)  # the table lock is held from here on
            with curs.copy(self._copy_statement) as copy:
                copy.set_types(["text", "int8", "text", "bytea"])
                write_row = copy.write_row
                for row in rows:
                    write_row(row)


@contextmanager
def _ddl_lock(config: Config) -> Iterator[None]:
    """Serialise table creation between processes starting at once on an empty schema: two
    concurrent CREATE TABLE IF NOT EXISTS can fail ("tuple concurrently updated"). A session
    advisory lock on a short-lived connection of its own, released when it closes."""
    import psycopg

    from ledger.lease import connect_kwargs

    schema = config.postgres.get("POSTGRES_SCHEMA") or "public"
    with psycopg.connect(**connect_kwargs(config, timeout_s=10.0, purpose="ddl")) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"custody-ddl/{schema}",))
        yield


class LedgerStore:
    def __init__(self, config: Config) -> None:
        self.config = config
        env: dict[str, str] = {"ORIGINATOR_ID_TYPE": "text", "CREATE_TABLE": "y"}
        if config.store == STORE_POSTGRES:
            env["PERSISTENCE_MODULE"] = "eventsourcing.postgres"
            env["APPLICATION_RECORDER_TOPIC"] = "ledger.store:BatchPostgresRecorder"
            env.update(config.postgres)
        else:
            config.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
            env["SQLITE_DBNAME"] = str(config.sqlite_path)
            env["SQLITE_LOCK_TIMEOUT"] = "10"
            env["APPLICATION_RECORDER_TOPIC"] = "ledger.store:BatchSQLiteRecorder"
        self.is_postgres = config.store == STORE_POSTGRES
        with _ddl_lock(config) if self.is_postgres else nullcontext():
            self.factory = InfrastructureFactory.construct(Environment(APP_NAME, env))
            self.recorder: ApplicationRecorder = self.factory.application_recorder()

    @property
    def datastore(self) -> Any:
        """The recorder's connection pool, for the few tables that live beside the events."""
        return self.recorder.datastore  # type: ignore[attr-defined]

    def close(self) -> None:
        self.factory.close()

    def discard_broken_connections(self) -> None:
        """After a failed commit: test every idle pooled connection (one empty query each) and
        replace the broken ones. A dropped network or a restarted PostgreSQL breaks all of them
        at once; unchecked, the next reads and commits would each meet one and fail in turn.
        PostgreSQL only (SQLite has no network)."""
        if not self.is_postgres:
            return
        try:
            self.datastore.pool.check()
        except Exception:  # the pool replaces what it can; the next use reports the rest
            _log.warning("checking the pooled connections failed", exc_info=True)

    # -- writes ---------------------------------------------------------------------------------

    def append(self, rows: Sequence[NewRow], claim: WriterClaim | None = None) -> None:
        """Commit `rows` (of any streams, e.g. a log and the directory) in ONE transaction.

        `claim` (PostgreSQL with write leases only): the transaction first checks that this
        server is still the platform's recorded writer at that epoch (`WriterSuperseded`)."""
        assert rows
        if claim is None:
            self.recorder.insert_rows(rows)  # type: ignore[attr-defined]
        else:
            self.recorder.insert_rows(rows, claim)  # type: ignore[attr-defined]

    # -- reads ----------------------------------------------------------------------------------

    def read(self, stream: str, after: int = -1, limit: int = READ_PAGE_MAX) -> list[Row]:
        assert 1 <= limit <= READ_PAGE_MAX
        # Positions have no gaps, so an upper bound is free and keeps PostgreSQL on the primary
        # key index even when its statistics are stale (after a bulk load it sorted every row).
        events = self.recorder.select_events(stream, gt=after, lte=after + limit, limit=limit)
        return [(e.originator_version, e.topic, bytes(e.state)) for e in events]

    def iter_rows(self, stream: str, after: int = -1, stop: int | None = None) -> Iterator[Row]:
        """Every row after `after` (up to and including `stop`), page by page, in order."""
        while True:
            page = self.read(stream, after)
            for row in page:
                if stop is not None and row[0] > stop:
                    return
                yield row
            if len(page) == READ_PAGE_MAX:
                after = page[-1][0]
                continue
            # A short page (bounded by position) ends the stream unless rows follow a gap, a
            # deleted row: hand on the next one, so the reader sees the gap and stops there.
            last = page[-1][0] if page else after
            tail = self.recorder.select_events(stream, gt=last, limit=1)
            if not tail:
                return
            row = (tail[0].originator_version, tail[0].topic, bytes(tail[0].state))
            if stop is not None and row[0] > stop:
                return
            yield row
            after = row[0]

    def last_row(self, stream: str) -> Row | None:
        events = self.recorder.select_events(stream, desc=True, limit=1)
        if not events:
            return None
        e = events[0]
        return (e.originator_version, e.topic, bytes(e.state))

    def platform_ids(self) -> list[str]:
        return [state.decode() for _, _, state in self.iter_rows(DIRECTORY_STREAM)]

    def directory_entry(self, platform_id: str) -> NewRow:
        last = self.last_row(DIRECTORY_STREAM)
        position = 0 if last is None else last[0] + 1
        return (DIRECTORY_STREAM, position, "platform", platform_id.encode())

"""Write leases on PostgreSQL: for each platform, exactly one server process holds the write role.

A lease is a PostgreSQL *session-level* advisory lock (`pg_try_advisory_lock`) on a stable 64-bit
key derived from the ledger id, the schema and the platform id, held on ONE dedicated connection
per server (never a pooled one: a pool would hand the session, and with it the lock, to whoever
borrows it next). PostgreSQL releases a session's advisory locks when the session ends, so a
server that dies (SIGKILL, power loss, a dropped connection) loses every lease it held as soon as
the database notices, and a follower polling `pg_try_advisory_lock` takes it over. Nothing here
is home-made consensus: the database's lock manager decides, and the event table's primary key
(originator_id, originator_version) remains the last guard against two writers (see
`PlatformWriter.recover`).

The lease connection is checked every poll interval (`SELECT 1`, with TCP keepalives and a TCP
user timeout so a stalled network errors instead of hanging); if the check fails or has not
succeeded for `timeout_s = max(3 × poll, 2 s)` the lease is treated as lost at once (the service
fences its writers) even if the database has not noticed yet: the safe direction is to stop
writing first. The database side is bounded too: the session runs with
`idle_session_timeout = 2 × timeout_s`, so when the holder goes silent (a partition or a stalled
network, where PostgreSQL's own TCP keepalives would take hours) PostgreSQL ends the session and
frees its leases, and another server takes them over instead of the platform staying unwritten.
A takeover waits at most `timeout_s / 4` for a silent writer's commit to let go of the writers
row (`TakeoverBlocked`), so the new writer's own lease checks never stall behind it.

The holder of a lease records itself in `custody_writers` (platform, server id, advertised
address, since, epoch, first position it wrote) and appends the same row to
`custody_writer_history`, so any server can tell a caller where to send a platform's writes
(`WriterElsewhere`) and operators can audit who wrote which part of the log.

That row is also the fence of the commits themselves: every group a leased writer stores checks,
inside its own transaction, that the row still names this server at the epoch it announced
(`SELECT ... FOR SHARE`, `ledger/store.py`), and aborts with `WriterSuperseded` otherwise. A
takeover commits its `announce` before writing anything, and that UPDATE waits for any commit
holding the row, so once it has committed the previous writer cannot store another group, even
when its lease session died unnoticed while its pooled connections still work.

SQLite (embedded, one process) takes no lease: a second process on the same file is stopped by
the primary key, which fences it (`WriterFenced`); nothing else is needed for a single machine.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Final

import msgspec
import psycopg
from psycopg import sql

from ledger.config import Config
from ledger.store import WRITERS_TABLE
from ledger.writer import StoreUnavailable, WriterFenced

log = logging.getLogger("ledger.lease")

HISTORY_TABLE: Final = "custody_writer_history"
_DDL_KEY_LABEL: Final = "custody-lease/ddl"


class WriterElsewhere(WriterFenced):
    """This server does not write the platform: send the write to `address` (HOST:PORT).

    An empty `address` means that no server holds the platform's lease right now (a failover in
    progress, or the writer did not advertise an address): retry after `retry_after_ms`.
    Nothing was written; retrying elsewhere with the same client ids is safe.
    """

    def __init__(
        self,
        platform_id: str,
        server_id: str = "",
        address: str = "",
        since_ms: int = 0,
        epoch: int = 0,
        retry_after_ms: int = 1000,
    ) -> None:
        self.platform_id = platform_id
        self.server_id = server_id
        self.address = address
        self.since_ms = since_ms
        self.epoch = epoch
        self.retry_after_ms = retry_after_ms
        where = f"server {server_id} at {address or '(no address)'}" if server_id else "nobody"
        super().__init__(f"platform {platform_id} is written by {where}")


class WriterInfo(msgspec.Struct, frozen=True):
    """A row of `custody_writers`: who took a platform's write role, when and where."""

    platform_id: str
    server_id: str
    address: str
    since_ms: int
    epoch: int
    from_seq: int
    held: bool = True  # somebody holds the platform's advisory lock right now


def lease_key(ledger_id: str, schema: str, platform_id: str) -> int:
    """The platform's advisory lock key: a signed 64-bit integer, stable across versions."""
    digest = hashlib.sha256(f"custody-lease/v1\n{ledger_id}\n{schema}\n{platform_id}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def _split_key(key: int) -> tuple[int, int]:
    """(classid, objid) under which pg_locks shows a bigint advisory key (objsubid = 1)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def connect_kwargs(config: Config, *, timeout_s: float, purpose: str) -> dict[str, Any]:
    pg = config.postgres
    return {
        "host": pg.get("POSTGRES_HOST", "127.0.0.1"),
        "port": int(pg.get("POSTGRES_PORT", "5432")),
        "user": pg.get("POSTGRES_USER", "postgres"),
        "password": pg.get("POSTGRES_PASSWORD", ""),
        "dbname": pg.get("POSTGRES_DBNAME", "postgres"),
        "connect_timeout": max(1, int(timeout_s)),
        "application_name": f"custody-{purpose}:{config.server_id}"[:63],
        "autocommit": True,
        # a stalled network must surface as an error, not a hang (libpq >= 12)
        "keepalives": 1,
        "keepalives_idle": max(1, int(timeout_s)),
        "keepalives_interval": 1,
        "keepalives_count": 2,
        "tcp_user_timeout": max(1000, int(timeout_s * 1000)),
    }


class LeaseLost(RuntimeError):
    """The lease connection failed: every lease this server held is gone."""


class TakeoverBlocked(StoreUnavailable):
    """The writers row is still held by the previous writer's commit (a silent one that
    PostgreSQL has not ended yet): nothing was announced; release the lease and try again."""


class LeaseManager:
    """A server's write leases, all on one dedicated PostgreSQL connection.

    Thread-safety: one lock serialises every use of the connection; the service's lease thread
    is its only regular user. `held` is the set of platforms whose lock this session holds.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server_id = config.server_id
        self.address = config.advertise
        self.schema = config.postgres.get("POSTGRES_SCHEMA") or "public"
        self.poll_s = config.lease_poll_ms / 1000
        self.timeout_s = max(3 * self.poll_s, 2.0)
        # PostgreSQL ends the session (freeing every lease) once it has been silent this long
        self.session_timeout_s = 2 * self.timeout_s
        self.takeover_wait_s = self.timeout_s / 4
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self.held: set[str] = set()
        self.last_ok = 0.0  # monotonic time of the last successful check of the connection
        self._writers = sql.Identifier(self.schema, WRITERS_TABLE)
        self._history = sql.Identifier(self.schema, HISTORY_TABLE)

    def key(self, platform_id: str) -> int:
        return lease_key(self.config.ledger_id, self.schema, platform_id)

    # -- the connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def connect(self) -> None:
        """Open the dedicated session (holding nothing yet) and create the writers tables."""
        with self._lock:
            self._close_locked()
            conn = psycopg.connect(
                **connect_kwargs(self.config, timeout_s=self.timeout_s, purpose="lease")
            )
            try:
                silence_ms = int(self.session_timeout_s * 1000)
                for setting in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
                    try:
                        conn.execute(
                            sql.SQL("SET {} = {}").format(
                                sql.Identifier(setting), sql.Literal(f"{silence_ms}ms")
                            )
                        )
                    except psycopg.errors.UndefinedObject:  # idle_session_timeout: PG >= 14
                        log.warning(
                            "PostgreSQL has no %s: a silent holder keeps its leases "
                            "until its TCP connection times out",
                            setting,
                        )
                with conn.transaction():
                    ddl_key = lease_key(self.config.ledger_id, self.schema, _DDL_KEY_LABEL)
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ddl_key,))
                    conn.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} (platform_id text PRIMARY KEY, "
                            "server_id text NOT NULL, address text NOT NULL, "
                            "since timestamptz NOT NULL, epoch bigint NOT NULL, "
                            "from_seq bigint NOT NULL)"
                        ).format(self._writers)
                    )
                    conn.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} (platform_id text NOT NULL, "
                            "epoch bigint NOT NULL, server_id text NOT NULL, "
                            "address text NOT NULL, since timestamptz NOT NULL, "
                            "from_seq bigint NOT NULL, PRIMARY KEY (platform_id, epoch))"
                        ).format(self._history)
                    )
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self.held.clear()
            self.last_ok = time.monotonic()

    def close(self) -> None:
        """Close the session: PostgreSQL releases every lease it held."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        conn, self._conn = self._conn, None
        self.held.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection may fail: it is closed anyway
                log.debug("closing the lease connection failed", exc_info=True)

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            raise LeaseLost("no lease connection")
        return conn

    def check(self) -> None:
        """Raise LeaseLost (and drop the session) unless the lease connection answers."""
        with self._lock:
            try:
                self._connection().execute("SELECT 1")
            except Exception as exc:
                self._close_locked()
                raise LeaseLost(f"lease connection failed: {exc}") from exc
            self.last_ok = time.monotonic()

    def stale(self) -> bool:
        """True when the connection has not been confirmed for longer than the lease timeout
        (e.g. the check itself hangs on a stalled network): treat every lease as lost."""
        return bool(self.held) and time.monotonic() - self.last_ok > self.timeout_s

    # -- leases ---------------------------------------------------------------------------------

    def try_acquire(self, platform_id: str) -> bool:
        """Take the platform's advisory lock if nobody holds it (never waits)."""
        with self._lock:
            if platform_id in self.held:
                return True
            try:
                row = (
                    self._connection()
                    .execute("SELECT pg_try_advisory_lock(%s)", (self.key(platform_id),))
                    .fetchone()
                )
            except LeaseLost:
                raise
            except Exception as exc:
                self._close_locked()
                raise LeaseLost(f"lease connection failed: {exc}") from exc
            self.last_ok = time.monotonic()
            if row is not None and row[0]:
                self.held.add(platform_id)
                return True
            return False

    def announce(self, platform_id: str, from_seq: int) -> WriterInfo:
        """As the lease holder: record this server as the platform's writer (new epoch)."""
        with self._lock:
            if platform_id not in self.held:
                raise LeaseLost(f"lease for {platform_id} is not held")
            conn = self._connection()
            try:
                with conn.transaction():
                    self._bound_wait(conn)
                    row = conn.execute(
                        sql.SQL(
                            "INSERT INTO {w} AS w (platform_id, server_id, address, since, epoch, "
                            "from_seq) VALUES (%s, %s, %s, now(), 1, %s) "
                            "ON CONFLICT (platform_id) DO UPDATE SET server_id = "
                            "excluded.server_id, address = excluded.address, since = now(), "
                            "epoch = w.epoch + 1, from_seq = excluded.from_seq "
                            "RETURNING epoch, (extract(epoch FROM since) * 1000)::bigint"
                        ).format(w=self._writers),
                        (platform_id, self.server_id, self.address, from_seq),
                    ).fetchone()
                    assert row is not None
                    epoch, since_ms = int(row[0]), int(row[1])
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {h} (platform_id, epoch, server_id, address, since, "
                            "from_seq) VALUES (%s, %s, %s, %s, now(), %s)"
                        ).format(h=self._history),
                        (platform_id, epoch, self.server_id, self.address, from_seq),
                    )
            except psycopg.errors.LockNotAvailable as exc:
                self.last_ok = time.monotonic()  # it answered: the session is fine
                raise TakeoverBlocked(f"{platform_id}: the writers row is still held") from exc
            except Exception as exc:
                self._close_locked()
                raise LeaseLost(f"lease connection failed: {exc}") from exc
            self.last_ok = time.monotonic()
            return WriterInfo(platform_id, self.server_id, self.address, since_ms, epoch, from_seq)

    def restate_start(self, platform_id: str, epoch: int, from_seq: int) -> None:
        """Correct where this server's epoch starts writing: a group the previous writer had
        checked before `announce` committed was stored after the caller's catch-up."""
        with self._lock:
            if platform_id not in self.held:
                raise LeaseLost(f"lease for {platform_id} is not held")
            conn = self._connection()
            try:
                with conn.transaction():
                    self._bound_wait(conn)
                    for table in (self._writers, self._history):
                        conn.execute(
                            sql.SQL(
                                "UPDATE {} SET from_seq = %s WHERE platform_id = %s "
                                "AND epoch = %s AND server_id = %s"
                            ).format(table),
                            (from_seq, platform_id, epoch, self.server_id),
                        )
            except psycopg.errors.LockNotAvailable as exc:
                self.last_ok = time.monotonic()
                raise TakeoverBlocked(f"{platform_id}: the writers row is still held") from exc
            except Exception as exc:
                self._close_locked()
                raise LeaseLost(f"lease connection failed: {exc}") from exc
            self.last_ok = time.monotonic()

    def _bound_wait(self, conn: psycopg.Connection[Any]) -> None:
        """In a transaction: wait at most `takeover_wait_s` for a row another session holds."""
        conn.execute(
            sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{int(self.takeover_wait_s * 1000)}ms")
            )
        )

    def release(self, platform_id: str) -> None:
        with self._lock:
            if platform_id not in self.held:
                return
            self.held.discard(platform_id)
            try:
                self._connection().execute(
                    "SELECT pg_advisory_unlock(%s)", (self.key(platform_id),)
                )
            except Exception:  # a broken session holds nothing: closing it releases all
                self._close_locked()


def lookup_writer(datastore: Any, schema: str, key: int, platform_id: str) -> WriterInfo | None:
    """Who writes the platform, read through the store's pool (any server may ask).

    `held` says whether anybody holds the platform's advisory lock right now: a row whose holder
    is gone (killed, not yet replaced) is reported with held=False.
    """
    classid, objid = _split_key(key)
    query = sql.SQL(
        "SELECT server_id, address, (extract(epoch FROM since) * 1000)::bigint AS since_ms, "
        "epoch, from_seq, EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = %s AND objid = %s AND objsubid = 1 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) AS held "
        "FROM {w} WHERE platform_id = %s"
    ).format(w=sql.Identifier(schema, WRITERS_TABLE))
    try:
        with datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(query, (classid, objid, platform_id))
            row = curs.fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    if row is None:
        return None
    if isinstance(row, dict):  # eventsourcing's pool may hand out dict rows
        row = tuple(row.values())
    server_id, address, since_ms, epoch, from_seq, held = row
    return WriterInfo(
        platform_id,
        str(server_id),
        str(address),
        int(since_ms),
        int(epoch),
        int(from_seq),
        bool(held),
    )


def writer_history(datastore: Any, schema: str, platform_id: str) -> list[WriterInfo]:
    """Every takeover of the platform's write role, oldest first (for audits and tests)."""
    query = sql.SQL(
        "SELECT server_id, address, (extract(epoch FROM since) * 1000)::bigint AS since_ms, "
        "epoch, from_seq FROM {h} WHERE platform_id = %s ORDER BY epoch"
    ).format(h=sql.Identifier(schema, HISTORY_TABLE))
    with datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(query, (platform_id,))
        rows = curs.fetchall()
    out: list[WriterInfo] = []
    for row in rows:
        if isinstance(row, dict):
            row = tuple(row.values())
        server_id, address, since_ms, epoch, from_seq = row
        out.append(
            WriterInfo(
                platform_id, str(server_id), str(address), int(since_ms), int(epoch), int(from_seq)
            )
        )
    return out

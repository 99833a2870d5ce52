"""Signed checkpoints in the database, so that every server of a store shares one history.

Each server keeps its checkpoint notes in its own data folder (`ledger/checkpoint.py`). With
several servers taking turns at writing a platform, each folder would hold only the notes its
server signed: after a failover the new writer would not know the last signed size, and an
auditor asking for a note signed by the previous writer would not find it. On PostgreSQL every
note is therefore also inserted into `custody_checkpoints` (insert-only; one row per platform and
size) in the store's own database, and a server signing the next checkpoint first reads the latest
row. Rows are never trusted blindly: Ed25519 signatures are deterministic, so a row is adopted
only if signing its body again with this ledger's key gives the very same note.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final

from psycopg import sql

from ledger.checkpoint import SignedCheckpoint

TABLE: Final = "custody_checkpoints"
log = logging.getLogger("ledger.checkpoint_store")
_created_lock = threading.Lock()


def _values(row: Any) -> tuple[Any, ...]:
    return tuple(row.values()) if isinstance(row, dict) else tuple(row)


class SharedCheckpoints:
    """One platform's rows of `custody_checkpoints`, through the store's connection pool."""

    def __init__(self, datastore: Any, schema: str, platform_id: str) -> None:
        self._datastore = datastore
        self._platform_id = platform_id
        self._table = sql.Identifier(schema, TABLE)
        with _created_lock:
            # per pool and schema: two stores may use the same schema name in two databases
            key = f"{id(datastore)}/{schema}"
            if getattr(datastore, "_custody_checkpoints_table", None) != key:
                with datastore.transaction(commit=True) as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(hashtext('custody-checkpoints'))")
                    cur.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} (platform text NOT NULL, "
                            "size bigint NOT NULL, root bytea NOT NULL, note bytea NOT NULL, "
                            "signed_ms bigint NOT NULL, PRIMARY KEY (platform, size))"
                        ).format(self._table)
                    )
                datastore._custody_checkpoints_table = key

    def append(self, cp: SignedCheckpoint) -> None:
        """Insert the note; the same size again is the same note (deterministic signatures)."""
        with self._datastore.transaction(commit=True) as cur:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (platform, size, root, note, signed_ms) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (platform, size) DO NOTHING"
                ).format(self._table),
                (self._platform_id, cp.size, cp.root, cp.note, time.time_ns() // 1_000_000),
            )
            inserted = cur.rowcount
        if inserted == 0 and self.at_size(cp.size) != cp:
            # someone wrote another note at this size: readers ignore it (not this log's), but
            # the operators must hear of it
            log.error(
                "custody_checkpoints holds a different note for %s at size %d than the one "
                "signed now: the table was written by someone else",
                self._platform_id,
                cp.size,
            )

    def latest(self) -> SignedCheckpoint | None:
        rows = self._select("ORDER BY size DESC LIMIT 1", ())
        return rows[0] if rows else None

    def at_size(self, size: int) -> SignedCheckpoint | None:
        rows = self._select("AND size = %s", (size,))
        return rows[0] if rows else None

    def history(self, page: int = 10_000) -> list[SignedCheckpoint]:
        """Every row, oldest first, read page by page (a year of notes every minute is ~525k)."""
        assert 1 <= page <= 100_000
        out: list[SignedCheckpoint] = []
        after = -1
        while True:
            rows = self._select("AND size > %s ORDER BY size LIMIT %s", (after, page))
            out.extend(rows)
            if len(rows) < page:
                return out
            after = rows[-1].size

    def _select(self, tail: str, params: tuple[Any, ...]) -> list[SignedCheckpoint]:
        query = sql.SQL("SELECT size, root, note FROM {} WHERE platform = %s " + tail).format(
            self._table
        )
        with self._datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(query, (self._platform_id, *params))
            rows = cur.fetchall()
        out = []
        for row in rows:
            size, root, note = _values(row)
            out.append(SignedCheckpoint(int(size), bytes(root), bytes(note)))
        return out

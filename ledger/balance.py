"""Spreading write leases over the live servers of a store (`CUSTODY_LEASE_BALANCE=1`).

Without balancing the first server to start takes every platform's lease and keeps it until it
dies: correct, but one server does all the writing. With balancing each server announces itself
every lease poll in `custody_servers` (server id, address, last seen), counts the servers seen
within the lease timeout, and holds at most its fair share, ceil(platforms / live servers): it
takes a free lease only below its share and hands over what it holds above it (a short,
retryable WRITER_ELSEWHERE for those platforms, like a failover). A server that dies stops
announcing itself, the share of the others grows, and they take its platforms.
"""

from __future__ import annotations

from typing import Any, Final

from psycopg import sql

TABLE: Final = "custody_servers"
SERVERS_MAX: Final = 1_000


_DB_NOW_MS: Final = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


def heartbeat(datastore: Any, schema: str, server_id: str, address: str) -> None:
    """Record that this server is alive now (creates the table on first use)."""
    table = sql.Identifier(schema, TABLE)
    with datastore.transaction(commit=True) as cur:
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (server_id text PRIMARY KEY, address text NOT NULL, "
                "seen_ms bigint NOT NULL)"
            ).format(table)
        )
        # the database's clock, not the servers': one server's clock running ahead or behind
        # would otherwise keep a dead server counted, or a live one uncounted
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (server_id, address, seen_ms) VALUES (%s, %s, " + _DB_NOW_MS + ") "
                "ON CONFLICT (server_id) DO UPDATE SET address = excluded.address, "
                "seen_ms = excluded.seen_ms"
            ).format(table),
            (server_id, address),
        )


def live_servers(datastore: Any, schema: str, within_ms: int) -> int:
    """How many servers announced themselves within the last `within_ms` (at least 1: us)."""
    assert within_ms > 0
    query = sql.SQL("SELECT count(*) FROM {} WHERE seen_ms >= " + _DB_NOW_MS + " - %s").format(
        sql.Identifier(schema, TABLE)
    )
    with datastore.get_connection() as conn, conn.cursor() as cur:
        cur.execute(query, (within_ms,))
        row = cur.fetchone()
    count = int(next(iter(row.values())) if isinstance(row, dict) else row[0])
    return max(1, min(count, SERVERS_MAX))


def fair_share(platforms: int, servers: int) -> int:
    """The most leases one of `servers` live servers should hold among `platforms`."""
    assert platforms >= 0 and servers >= 1
    return -(-platforms // servers)

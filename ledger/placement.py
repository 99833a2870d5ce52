"""Platforms across PostgreSQL databases: which store holds which platform, and where each moved.

A ledger that outgrows one database spreads its platforms over several *stores* (PostgreSQL
databases, on one instance or several). A placement file, the same on every server, names the
stores and says where each platform starts; each `custody serve` serves exactly one store
(`CUSTODY_STORE_NAME`) and answers a request for a platform held elsewhere with
`WRITER_ELSEWHERE` and the address of a server of that store, which the client follows.

    {
      "version": 1,
      "default_store": "east",
      "stores": {
        "east": {"postgres": {"POSTGRES_HOST": "10.0.0.5", "POSTGRES_DBNAME": "custody_east"},
                 "servers": ["10.0.1.1:50051", "10.0.1.2:50051"]},
        "west": {"postgres": {"POSTGRES_HOST": "10.0.0.6", "POSTGRES_DBNAME": "custody_west"},
                 "servers": ["10.0.2.1:50051"]}
      },
      "platforms": {"acme-lending": "west"}
    }

Passwords never go in the file: POSTGRES_PASSWORD comes from the environment.

Moves (`custody platform move`, `ledger/move.py`) are not edits of this file: each store keeps an
insert-only `custody_moves` table whose latest row per platform says whether the platform is
served here (no row, `in`, `aborted`), frozen while it moves out (`out-start`), gone to another
store (`out-done`), or being copied in and not served yet (`arriving`). Servers read it every
lease poll, so a move takes effect everywhere at once; operators update the file afterwards so
that new clients go to the right store first.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any, Final

import msgspec
from psycopg import sql

MOVES_TABLE: Final = "custody_moves"
PLACEMENT_MAX_BYTES: Final = 1 << 20
STORES_MAX: Final = 64
SERVERS_PER_STORE_MAX: Final = 64
PLATFORMS_MAX: Final = 100_000

# the states of a platform in one store, as its latest `custody_moves` row says
IN: Final = "in"  # arrived here (after a move); served here
OUT_START: Final = "out-start"  # moving out: nobody writes it, callers retry
OUT_DONE: Final = "out-done"  # moved to `peer`: callers go there
ABORTED: Final = "aborted"  # a move out was abandoned before it finished; served here again
ARRIVING: Final = "arriving"  # being copied here: not served until `in` (after the source's
# `out-done`, the move's single commit point)
STATES: Final = (IN, OUT_START, OUT_DONE, ABORTED, ARRIVING)
GONE: Final = (OUT_START, OUT_DONE, ARRIVING)  # not served by this store

_ALLOWED_PG_KEYS: Final = frozenset(
    {
        "POSTGRES_HOST",
        "POSTGRES_PORT",
        "POSTGRES_USER",
        "POSTGRES_DBNAME",
        "POSTGRES_SCHEMA",
        "POSTGRES_POOL_SIZE",
        "POSTGRES_MAX_OVERFLOW",
        "POSTGRES_CONNECT_TIMEOUT",
        "POSTGRES_LOCK_TIMEOUT",
    }
)


class PlacementError(ValueError):
    """The placement file is missing, malformed or inconsistent."""


class StoreEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    postgres: dict[str, str]
    servers: list[str] = []


class PlacementFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    version: int
    default_store: str
    stores: dict[str, StoreEntry]
    platforms: dict[str, str] = {}


class MoveState(msgspec.Struct, frozen=True):
    """The latest `custody_moves` row of a platform in one store."""

    platform_id: str
    seq: int
    state: str
    peer: str  # the other store of the move
    size: int  # records of the platform's log when the row was written
    head: str  # hex chain hash at `size` ("" when size is 0 or unknown yet)
    at_ms: int
    actor: str


def _is_name(value: str) -> bool:
    return 0 < len(value) <= 32 and all(ch.isalnum() or ch in "-_" for ch in value)


def _is_address(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return (
        bool(sep and host)
        and len(value) <= 255
        and port.isdigit()
        and 1 <= int(port) <= 65_535
        and not any(ch.isspace() or ch in "/@?#" for ch in host)
    )


class Placement:
    """The parsed, checked placement file."""

    def __init__(self, doc: PlacementFile) -> None:
        if doc.version != 1:
            raise PlacementError("placement version must be 1")
        if not 1 <= len(doc.stores) <= STORES_MAX:
            raise PlacementError(f"a placement names 1..{STORES_MAX} stores")
        if len(doc.platforms) > PLATFORMS_MAX:
            raise PlacementError(f"a placement places at most {PLATFORMS_MAX} platforms")
        for name, entry in doc.stores.items():
            if not _is_name(name):
                raise PlacementError(f"store name {name!r} must be 1..32 of [A-Za-z0-9_-]")
            unknown = set(entry.postgres) - _ALLOWED_PG_KEYS
            if unknown:
                raise PlacementError(
                    f"store {name}: keys {', '.join(sorted(unknown))} are not allowed here "
                    "(POSTGRES_PASSWORD comes from the environment)"
                )
            if "POSTGRES_DBNAME" not in entry.postgres:
                raise PlacementError(f"store {name}: POSTGRES_DBNAME is required")
            if len(entry.servers) > SERVERS_PER_STORE_MAX:
                raise PlacementError(f"store {name}: at most {SERVERS_PER_STORE_MAX} servers")
            for address in entry.servers:
                if not _is_address(address):
                    raise PlacementError(f"store {name}: server {address!r} is not HOST:PORT")
        if doc.default_store not in doc.stores:
            raise PlacementError(f"default_store {doc.default_store!r} is not a store")
        for platform_id, store in doc.platforms.items():
            if store not in doc.stores:
                raise PlacementError(f"platform {platform_id}: store {store!r} is not named")
        locations = {_location(e.postgres) for e in doc.stores.values()}
        if len(locations) != len(doc.stores):
            raise PlacementError("two stores name the same database and schema")
        self.doc = doc

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PlacementError(f"cannot read the placement file {path}: {exc}") from None
        if len(raw) > PLACEMENT_MAX_BYTES:
            raise PlacementError(f"the placement file is larger than {PLACEMENT_MAX_BYTES} bytes")
        try:
            doc = msgspec.json.decode(raw, type=PlacementFile)
        except msgspec.DecodeError as exc:
            raise PlacementError(f"placement file {path}: {exc}") from None
        return cls(doc)

    @property
    def stores(self) -> list[str]:
        return sorted(self.doc.stores)

    def postgres(self, store: str) -> dict[str, str]:
        return dict(self._entry(store).postgres)

    def home(self, platform_id: str) -> str:
        """The store the file places the platform in (moves may have taken it elsewhere)."""
        return self.doc.platforms.get(platform_id, self.doc.default_store)

    def address(self, store: str, platform_id: str) -> str:
        """A server of `store` for the platform's calls ("" when the file names none).

        The same platform always goes to the same server first (spreads platforms, keeps a
        client's channel); that server redirects again if another one writes the platform."""
        servers = self._entry(store).servers
        if not servers:
            return ""
        return servers[zlib.crc32(platform_id.encode()) % len(servers)]

    def _entry(self, store: str) -> StoreEntry:
        entry = self.doc.stores.get(store)
        if entry is None:
            raise PlacementError(f"no store named {store!r} in the placement")
        return entry


def _location(pg: dict[str, str]) -> tuple[str, str, str, str]:
    return (
        pg.get("POSTGRES_HOST", "127.0.0.1"),
        pg.get("POSTGRES_PORT", "5432"),
        pg["POSTGRES_DBNAME"],
        pg.get("POSTGRES_SCHEMA") or "public",
    )


# -- the moves table (one per store) -----------------------------------------------------------


def _table(schema: str) -> sql.Composed:
    return sql.SQL("{}").format(sql.Identifier(schema, MOVES_TABLE))


def ensure_moves_table(conn: Any, schema: str) -> None:
    """Create `custody_moves` if missing (in the caller's transaction)."""
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (platform_id text NOT NULL, seq bigint NOT NULL, "
            "state text NOT NULL, peer text NOT NULL, size bigint NOT NULL, head text NOT NULL, "
            "at_ms bigint NOT NULL, actor text NOT NULL, PRIMARY KEY (platform_id, seq))"
        ).format(_table(schema))
    )


def _row(row: Any) -> MoveState:
    if isinstance(row, dict):  # eventsourcing's pool hands out dict rows
        row = tuple(row.values())
    platform_id, seq, state, peer, size, head, at_ms, actor = row
    assert state in STATES, state
    return MoveState(
        str(platform_id), int(seq), str(state), str(peer), int(size), str(head), int(at_ms),
        str(actor),
    )  # fmt: skip


def table_exists(conn: Any, schema: str, table: str) -> bool:
    """Whether `schema.table` exists (a connection or cursor; tuple or dict rows)."""
    found = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".{table}',)).fetchone()
    first = (
        None
        if found is None
        else next(iter(found.values()))
        if isinstance(found, dict)
        else found[0]
    )
    return first is not None


def latest_moves(conn: Any, schema: str) -> dict[str, MoveState]:
    """Every platform's latest move row in this store (no table yet: no moves)."""
    query = sql.SQL(
        "SELECT DISTINCT ON (platform_id) platform_id, seq, state, peer, size, head, at_ms, "
        "actor FROM {} ORDER BY platform_id, seq DESC"
    ).format(_table(schema))
    if not table_exists(conn, schema, MOVES_TABLE):
        return {}
    return {m.platform_id: m for m in map(_row, conn.execute(query).fetchall())}


def history(conn: Any, schema: str, platform_id: str) -> list[MoveState]:
    """Every move row of the platform in this store, oldest first."""
    if not table_exists(conn, schema, MOVES_TABLE):
        return []
    query = sql.SQL(
        "SELECT platform_id, seq, state, peer, size, head, at_ms, actor FROM {} "
        "WHERE platform_id = %s ORDER BY seq"
    ).format(_table(schema))
    return [_row(r) for r in conn.execute(query, (platform_id,)).fetchall()]


def record_move(
    conn: Any,
    schema: str,
    platform_id: str,
    state: str,
    peer: str,
    size: int,
    head: str,
    actor: str,
) -> MoveState:
    """Append the platform's next move row (in the caller's transaction); never updates one."""
    assert state in STATES, state
    assert size >= 0 and (head == "" or len(head) == 64), (size, head)
    ensure_moves_table(conn, schema)
    found = conn.execute(
        sql.SQL("SELECT COALESCE(MAX(seq), -1) FROM {} WHERE platform_id = %s").format(
            _table(schema)
        ),
        (platform_id,),
    ).fetchone()
    last = found[0] if not isinstance(found, dict) else next(iter(found.values()))
    move = MoveState(platform_id, int(last) + 1, state, peer, size, head, _now_ms(), actor)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (platform_id, seq, state, peer, size, head, at_ms, actor) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(_table(schema)),
        (
            move.platform_id, move.seq, move.state, move.peer, move.size, move.head, move.at_ms,
            move.actor,
        ),
    )  # fmt: skip
    return move


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def describe(moves: list[MoveState]) -> str:
    """One line per move row, for `custody platform moves`."""
    return "\n".join(json.dumps(msgspec.to_builtins(m), sort_keys=True) for m in moves)

"""The projections' own tables, in the ledger's database through the ledger's connection pool.

Read models live beside the event table (same SQLite file, same PostgreSQL schema) so that a
projection's writes and its position commit in ONE transaction of the same database. Nothing
here ever writes the event table: projections only read the log (pages by position, and
record bodies joined by position in queries).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from ledger.store import LedgerStore

PREFIX: Final = "proj_"
# Most rows bound into one executemany/COPY call: keeps statements and memory flat.
INSERT_CHUNK_MAX: Final = 20_000


class Db:
    """Dialect helpers (SQLite `?` / PostgreSQL `%s`, schema-qualified names, bulk insert)."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.is_pg = store.is_postgres
        self.ph = "%s" if self.is_pg else "?"
        self.schema: str = getattr(store.datastore, "schema", "") if self.is_pg else ""
        # WITHOUT ROWID: one b-tree keyed by the primary key instead of rowid table + index.
        self.without_rowid = "" if self.is_pg else " WITHOUT ROWID"
        self.blob = "BYTEA" if self.is_pg else "BLOB"
        # platform id -> its position in the store's directory (fixed once created)
        self.platform_numbers: dict[str, int] = {}

    def t(self, name: str) -> str:
        """The qualified name of one of our tables."""
        assert name.startswith(PREFIX) and name.replace("_", "").isalnum(), name
        return f'"{self.schema}".{name}' if self.schema else name

    def events_table(self) -> str:
        """The qualified name of the ledger's event table (docs/FORMAT.md §1), read-only here:
        queries join it by position to show what a record says instead of copying it."""
        table = getattr(self.store.recorder, "events_table_name", None)
        if not isinstance(table, str) or not table.replace("_", "").isalnum():
            raise RuntimeError("the recorder does not expose its event table")
        return f'"{self.schema}".{table}' if self.schema else table

    def index_name(self, name: str) -> str:
        """Index names: PostgreSQL scopes them to the schema, so no qualification is needed."""
        assert name.startswith(PREFIX), name
        return name

    def create_index(
        self, cur: Any, name: str, table: str, columns: str, unique: bool = False, where: str = ""
    ) -> None:
        """CREATE INDEX IF NOT EXISTS, except that on PostgreSQL an index that exists is not
        asked for at all: the statement takes a SHARE lock on its table even then, and a worker
        starting (creating tables) while another projects would wait on one table while holding
        another (a deadlock with the other's inserts, seen in the lease tests)."""
        if self.is_pg:
            index = self.index_name(name)
            cur.execute(
                "SELECT to_regclass(%s)", (f'"{self.schema}".{index}' if self.schema else index,)
            )
            found = cur.fetchone()
            if found is not None and values(found)[0] is not None:
                return
        cond = f" WHERE {where}" if where else ""
        cur.execute(
            f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {self.index_name(name)} "
            f"ON {self.t(table)} ({columns}){cond}"
        )

    @contextmanager
    def tx(self) -> Iterator[Any]:
        """One read-write transaction; commits on success, rolls back on any exception."""
        with self.store.datastore.transaction(commit=True) as cur:
            yield _raw(cur)

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A read-only transaction (rolled back at the end)."""
        with self.store.datastore.transaction(commit=False) as cur:
            yield _raw(cur)

    def insert_many(
        self, cur: Any, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Bulk insert: executemany on SQLite, COPY on PostgreSQL (~10x cheaper than INSERT)."""
        if not rows:
            return
        if self.is_pg:
            sql = f"COPY {self.t(table)} ({', '.join(columns)}) FROM STDIN"
            for start in range(0, len(rows), INSERT_CHUNK_MAX):
                with cur.copy(sql) as copy:
                    write_row = copy.write_row
                    for row in rows[start : start + INSERT_CHUNK_MAX]:
                        write_row(row)
            return
        marks = ", ".join("?" * len(columns))
        sql = f"INSERT INTO {self.t(table)} ({', '.join(columns)}) VALUES ({marks})"
        for start in range(0, len(rows), INSERT_CHUNK_MAX):
            cur.executemany(sql, rows[start : start + INSERT_CHUNK_MAX])

    def fetchall(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur.execute(sql, tuple(params))
        return [values(r) for r in cur.fetchall()]

    def fetchone(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        cur.execute(sql, tuple(params))
        row = cur.fetchone()
        return None if row is None else values(row)


def values(row: Any) -> tuple[Any, ...]:
    """A row as a plain tuple: psycopg gives dicts here, sqlite3 gives `Row`s."""
    if isinstance(row, dict):
        return tuple(row.values())
    return tuple(row)


def _raw(cur: Any) -> Any:
    """eventsourcing wraps sqlite3 cursors without `rowcount`; use the sqlite3 cursor itself."""
    return getattr(cur, "sqlite_cursor", cur)

"""Bank statement import: raw files kept with their SHA-256, continuity checks, events.

Tables (prefix `recon_`, in the ledger's database next to the event table, through the
ledger's own connection pool; the event table is never written):

- `recon_files` (platform, sha256): the raw file as received, format, size, time, outcome;
- `recon_statements` (platform, sha256, n): statement n of the file: key, account, mirror,
  balances, dates, status `used` / `broken` / `conflict`, reason;
- `recon_entries` (platform, sha256, n, idx): the normalised entries of every statement;
- `recon_events` (platform, event_id): what early warning alerts on (conflicts, breaks, ...);
- `recon_items` (platform, day, side, key): the open items of the day's matching run.

Import is idempotent on the file's hash: the same bytes again change nothing. A different
file claiming a statement (same account, statement id and sequence) that is already in use is
a `statement_conflict`: the new file is kept as evidence, its statement is not used. A
statement that fails its checks (account not the platform's omnibus account, currency,
entries not summing to closing - opening, opening not the previous closing, a gap in the
sequence) is stored with status `broken` and a break event, and is not used.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ledger.store import LedgerStore
from projections.db import Db
from reconciliation import camt053, csv_import
from reconciliation.ledger_view import LedgerView
from reconciliation.ledger_view import read as read_ledger
from reconciliation.model import (
    MAX_FILE_BYTES,
    Entry,
    Statement,
    StatementError,
    normalise_account,
)

PREFIX: Final = "recon_"
FILES: Final = "recon_files"
STATEMENTS: Final = "recon_statements"
ENTRIES: Final = "recon_entries"
EVENTS: Final = "recon_events"
ITEMS: Final = "recon_items"
FORMATS: Final = ("camt053", "csv")
# Event kinds (early warning maps them to rules: continuity and conflicts are W04).
STATEMENT_CONFLICT: Final = "statement_conflict"
STATEMENT_RESENT: Final = "statement_resent"
CONTINUITY_BREAK: Final = "continuity_break"
SEQUENCE_GAP: Final = "sequence_gap"
ARITHMETIC_BREAK: Final = "arithmetic_break"
ACCOUNT_UNKNOWN: Final = "account_unknown"
STATEMENT_MISSING: Final = "statement_missing"
RECON_SHORTFALL: Final = "reconciliation_shortfall"
RECON_EXCESS: Final = "reconciliation_excess"
RECON_BALANCED: Final = "reconciliation_balanced"


class _ReconDb(Db):
    """The projections' dialect helpers, for tables with our own prefix."""

    def t(self, name: str) -> str:
        assert name.startswith(PREFIX) and name.replace("_", "").isalnum(), name
        return f'"{self.schema}".{name}' if self.schema else name

    def index_name(self, name: str) -> str:
        assert name.startswith(PREFIX), name
        return name


@dataclass(frozen=True)
class PlatformConfig:
    """Per platform: which bank accounts are its omnibus account(s), and matching knobs."""

    accounts: dict[str, str]  # bank IBAN / account number -> omnibus mirror account id
    counterparties: dict[str, str] = field(default_factory=dict)  # bank account -> ledger ref
    match_window_days: int = 2  # amount + date matching: |bank date - ledger day| <= this
    timing_days: int = 1  # ledger items this close to the cut-off are timing differences
    batch_max_items: int = 24  # subset-sum search: candidates per bank entry
    batch_max_steps: int = 200_000  # subset-sum search: nodes visited per bank entry
    xsd_dir: str = ""  # folder with official camt.053.001.NN.xsd files (optional)

    def mirror_for(self, bank_account: str) -> str | None:
        return self.accounts.get(normalise_account(bank_account))


def config_from_json(doc: Any, platform: str) -> PlatformConfig:
    """`{"<platform>": {"accounts": {...}, ...}}` (a file for several platforms) or the
    platform's object itself."""
    if not isinstance(doc, dict):
        raise ValueError("reconciliation config must be a JSON object")
    if platform in doc and isinstance(doc[platform], dict):
        doc = doc[platform]
    accounts = doc.get("accounts")
    if not isinstance(accounts, dict) or not accounts:
        raise ValueError(f"reconciliation config for {platform!r} needs 'accounts'")
    counterparties = doc.get("counterparties", {})
    for name, table in (("accounts", accounts), ("counterparties", counterparties)):
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in table.items()
        ):
            raise ValueError(f"'{name}' maps bank account numbers to ledger ids")
    ints = {}
    for key in ("match_window_days", "timing_days", "batch_max_items", "batch_max_steps"):
        value = doc.get(key, getattr(PlatformConfig, key))
        if type(value) is not int or not 0 <= value <= 10_000_000:
            raise ValueError(f"{key!r} must be a non-negative integer")
        ints[key] = value
    if ints["batch_max_items"] > 64:
        raise ValueError("'batch_max_items' is at most 64")
    xsd = doc.get("xsd_dir", "")
    if not isinstance(xsd, str):
        raise ValueError("'xsd_dir' must be a string")
    return PlatformConfig(
        accounts={normalise_account(k): v for k, v in accounts.items()},
        counterparties={normalise_account(k): v for k, v in counterparties.items()},
        xsd_dir=xsd,
        **ints,
    )


def load_config(path: Path, platform: str) -> PlatformConfig:
    return config_from_json(json.loads(path.read_bytes()), platform)


@dataclass(frozen=True)
class StatementResult:
    key: str
    status: str  # used | broken | conflict
    reason: str = ""
    entries: int = 0


@dataclass(frozen=True)
class ImportResult:
    sha256: str
    status: str  # imported | duplicate | broken | conflict
    statements: tuple[StatementResult, ...] = ()
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "status": self.status,
            "message": self.message,
            "statements": [s.__dict__ for s in self.statements],
        }


@dataclass(frozen=True)
class StoredStatement:
    sha256: str
    n: int
    key: str
    account: str
    mirror: str
    currency: str
    statement_id: str
    sequence: int | None
    opening_minor: int
    closing_minor: int
    opening_date: str
    closing_date: str
    entries: int
    status: str
    reason: str
    imported_ms: int


@dataclass(frozen=True)
class Event:
    event_id: str
    at_ms: int
    kind: str
    sha256: str
    statement_key: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


_STMT_COLS: Final = (
    "platform, sha256, n, skey, account, mirror, ccy, stmt_id, seq, opening, closing, "
    "opening_date, closing_date, entries, status, reason, imported_ms"
)
_ENTRY_COLS: Final = (
    "platform",
    "sha256",
    "n",
    "idx",
    "amount",
    "ccy",
    "booking_date",
    "value_date",
    "status",
    "entry_ref",
    "bank_ref",
    "e2e",
    "instr",
    "batch_id",
    "cp_name",
    "cp_acct",
    "remittance",
    "btc",
    "return_reason",
    "reversal",
)


def parse_file(
    raw: bytes,
    fmt: str,
    mapping: csv_import.Mapping | None = None,
    xsd_dir: Path | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> list[Statement]:
    if fmt == "camt053":
        return camt053.parse(raw, xsd_dir, max_bytes)
    if fmt == "csv":
        if mapping is None:
            raise StatementError("a CSV statement needs a column mapping (--mapping)")
        return csv_import.parse(raw, mapping, max_bytes)
    raise StatementError(f"unknown format {fmt!r}; use one of {FORMATS}")


class ReconStore:
    """The reconciliation tables of one ledger database."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.db = _ReconDb(store)
        self._created = False

    def ensure_tables(self) -> None:
        if self._created:
            return
        db = self.db
        blob = db.blob
        wr = db.without_rowid
        with db.tx() as cur:
            if db.is_pg:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('custody-recon'))")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(FILES)} (platform TEXT NOT NULL, "
                "sha256 TEXT NOT NULL, fmt TEXT NOT NULL, size BIGINT NOT NULL, "
                f"raw {blob} NOT NULL, imported_ms BIGINT NOT NULL, status TEXT NOT NULL, "
                f"message TEXT NOT NULL, PRIMARY KEY (platform, sha256)){wr}"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(STATEMENTS)} (platform TEXT NOT NULL, "
                "sha256 TEXT NOT NULL, n INTEGER NOT NULL, skey TEXT NOT NULL, "
                "account TEXT NOT NULL, mirror TEXT NOT NULL, ccy TEXT NOT NULL, "
                "stmt_id TEXT NOT NULL, seq BIGINT, opening BIGINT NOT NULL, "
                "closing BIGINT NOT NULL, opening_date TEXT NOT NULL, "
                "closing_date TEXT NOT NULL, entries BIGINT NOT NULL, status TEXT NOT NULL, "
                "reason TEXT NOT NULL, imported_ms BIGINT NOT NULL, "
                f"PRIMARY KEY (platform, sha256, n)){wr}"
            )
            cur.execute(
                f"CREATE INDEX IF NOT EXISTS {db.index_name('recon_statements_by_key')} "
                f"ON {db.t(STATEMENTS)} (platform, skey)"
            )
            cur.execute(
                f"CREATE INDEX IF NOT EXISTS {db.index_name('recon_statements_by_day')} "
                f"ON {db.t(STATEMENTS)} (platform, account, closing_date)"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(ENTRIES)} (platform TEXT NOT NULL, "
                "sha256 TEXT NOT NULL, n INTEGER NOT NULL, idx BIGINT NOT NULL, "
                "amount BIGINT NOT NULL, ccy TEXT NOT NULL, booking_date TEXT NOT NULL, "
                "value_date TEXT NOT NULL, status TEXT NOT NULL, entry_ref TEXT NOT NULL, "
                "bank_ref TEXT NOT NULL, e2e TEXT NOT NULL, instr TEXT NOT NULL, "
                "batch_id TEXT NOT NULL, cp_name TEXT NOT NULL, cp_acct TEXT NOT NULL, "
                "remittance TEXT NOT NULL, btc TEXT NOT NULL, return_reason TEXT NOT NULL, "
                f"reversal INTEGER NOT NULL, PRIMARY KEY (platform, sha256, n, idx)){wr}"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(EVENTS)} (platform TEXT NOT NULL, "
                "event_id TEXT NOT NULL, at_ms BIGINT NOT NULL, kind TEXT NOT NULL, "
                "sha256 TEXT NOT NULL, skey TEXT NOT NULL, detail TEXT NOT NULL, "
                f"PRIMARY KEY (platform, event_id)){wr}"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(ITEMS)} (platform TEXT NOT NULL, "
                "day TEXT NOT NULL, side TEXT NOT NULL, item_key TEXT NOT NULL, "
                "state TEXT NOT NULL, mirror TEXT NOT NULL, amount BIGINT NOT NULL, "
                "item_date TEXT NOT NULL, age_days INTEGER NOT NULL, refs TEXT NOT NULL, "
                f"counterparty TEXT NOT NULL, PRIMARY KEY (platform, day, side, item_key)){wr}"
            )
        self._created = True

    # -- open items of a matching run ---------------------------------------------------------

    def save_open_items(self, platform: str, day: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Replace the open items recorded for `day` (side, key, state, mirror, amount, date,
        age, refs, counterparty)."""
        self.ensure_tables()
        db = self.db
        with db.tx() as cur:
            cur.execute(
                f"DELETE FROM {db.t(ITEMS)} WHERE platform = {db.ph} AND day = {db.ph}",
                (platform, day),
            )
            db.insert_many(
                cur,
                ITEMS,
                (
                    "platform",
                    "day",
                    "side",
                    "item_key",
                    "state",
                    "mirror",
                    "amount",
                    "item_date",
                    "age_days",
                    "refs",
                    "counterparty",
                ),
                [(platform, day, *r) for r in rows],
            )

    def open_items(self, platform: str, day: str | None = None) -> tuple[str, list[dict[str, Any]]]:
        """(day, items) of `day`, or of the latest day a matching run recorded."""
        self.ensure_tables()
        db = self.db
        ph = db.ph
        with db.reading() as cur:
            if day is None:
                row = db.fetchone(
                    cur, f"SELECT MAX(day) FROM {db.t(ITEMS)} WHERE platform = {ph}", (platform,)
                )
                if row is None or row[0] is None:
                    return "", []
                day = str(row[0])
            rows = db.fetchall(
                cur,
                "SELECT side, item_key, state, mirror, amount, item_date, age_days, refs, "
                f"counterparty FROM {db.t(ITEMS)} WHERE platform = {ph} AND day = {ph} "
                "ORDER BY side, item_date, item_key",
                (platform, day),
            )
        names = (
            "side",
            "key",
            "state",
            "mirror",
            "amount_minor",
            "date",
            "age_days",
            "refs",
            "counterparty",
        )
        items = []
        for r in rows:
            d = dict(zip(names, r, strict=True))
            d["refs"] = [x for x in str(d["refs"]).split("\n") if x]
            items.append(d)
        return day, items

    # -- import ---------------------------------------------------------------------------------

    def import_file(
        self,
        platform: str,
        raw: bytes,
        fmt: str,
        config: PlatformConfig,
        mapping: csv_import.Mapping | None = None,
        now_ms: int | None = None,
        view: LedgerView | None = None,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> ImportResult:
        """Import one raw statement file. A malformed or hostile file raises StatementError
        and nothing is stored; the same file twice is `duplicate` and changes nothing."""
        if len(raw) > max_bytes:
            raise StatementError(f"the file is larger than {max_bytes} bytes")
        self.ensure_tables()
        sha = hashlib.sha256(raw).hexdigest()
        if self._file_status(platform, sha) is not None:
            return ImportResult(sha, "duplicate", message="this file was imported before")
        xsd = Path(config.xsd_dir) if config.xsd_dir else None
        stmts = parse_file(raw, fmt, mapping, xsd, max_bytes)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if view is None:
            view = read_ledger(self.store, platform)
        db = self.db
        ph = db.ph
        results: list[StatementResult] = []
        with db.tx() as cur:
            if db.is_pg:  # one import per platform at a time: continuity reads then writes
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"recon:{platform}",))
            else:  # take SQLite's write lock before reading what continuity depends on
                cur.execute(f"DELETE FROM {db.t(FILES)} WHERE 1 = 0")
            if db.fetchone(
                cur,
                f"SELECT 1 FROM {db.t(FILES)} WHERE platform = {ph} AND sha256 = {ph}",
                (platform, sha),
            ):
                return ImportResult(sha, "duplicate", message="this file was imported before")
            for n, stmt in enumerate(stmts):
                result = self._store_statement(cur, platform, sha, n, stmt, config, view, now)
                results.append(result)
            statuses = {r.status for r in results}
            status = (
                "conflict"
                if "conflict" in statuses
                else "broken"
                if "broken" in statuses
                else "imported"
            )
            message = "; ".join(f"{r.key}: {r.reason}" for r in results if r.reason)
            cur.execute(
                f"INSERT INTO {db.t(FILES)} (platform, sha256, fmt, size, raw, imported_ms, "
                f"status, message) VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph})",
                (platform, sha, fmt, len(raw), raw, now, status, message[:2000]),
            )
        return ImportResult(sha, status, tuple(results), message)

    def _file_status(self, platform: str, sha: str) -> str | None:
        db = self.db
        with db.reading() as cur:
            row = db.fetchone(
                cur,
                f"SELECT status FROM {db.t(FILES)} WHERE platform = {db.ph} AND sha256 = {db.ph}",
                (platform, sha),
            )
        return None if row is None else str(row[0])

    def _store_statement(
        self,
        cur: Any,
        platform: str,
        sha: str,
        n: int,
        stmt: Statement,
        config: PlatformConfig,
        view: LedgerView,
        now: int,
    ) -> StatementResult:
        db = self.db
        ph = db.ph
        key = stmt.key
        account = normalise_account(stmt.account)
        mirror = config.mirror_for(stmt.account) or ""
        status, reason, kind = "used", "", ""
        detail: dict[str, Any] = {"statement_id": stmt.statement_id, "sequence": stmt.sequence}
        same = db.fetchall(
            cur,
            f"SELECT sha256, status FROM {db.t(STATEMENTS)} WHERE platform = {ph} AND skey = {ph}",
            (platform, key),
        )
        if any(s == "used" for _, s in same):
            other = next(h for h, s in same if s == "used")
            status, kind = "conflict", STATEMENT_CONFLICT
            reason = f"statement {key} was already imported from another file ({other[:12]}...)"
            detail["other_sha256"] = other
        elif not mirror:
            status, kind = "broken", ACCOUNT_UNKNOWN
            reason = f"bank account {stmt.account} is not a configured omnibus account"
        elif view.kind_of(mirror) != "omnibus":
            status, kind = "broken", ACCOUNT_UNKNOWN
            reason = f"ledger account {mirror!r} is not an omnibus account of {platform}"
        elif view.accounts[mirror].ccy != stmt.currency:
            status, kind = "broken", ACCOUNT_UNKNOWN
            reason = f"statement in {stmt.currency}, {mirror!r} in {view.accounts[mirror].ccy}"
        elif stmt.booked_sum() != stmt.closing_minor - stmt.opening_minor:
            status, kind = "broken", ARITHMETIC_BREAK
            reason = (
                f"entries sum to {stmt.booked_sum()}, closing - opening is "
                f"{stmt.closing_minor - stmt.opening_minor}"
            )
            detail.update(
                entries_sum=stmt.booked_sum(),
                opening=stmt.opening_minor,
                closing=stmt.closing_minor,
            )
        else:
            prev = self._previous(cur, platform, account, stmt)
            if prev is not None:
                prev_seq, prev_closing, prev_sha = prev
                if prev_closing != stmt.opening_minor:
                    status, kind = "broken", CONTINUITY_BREAK
                    reason = (
                        f"opening balance {stmt.opening_minor} is not the previous closing "
                        f"balance {prev_closing}"
                    )
                    detail.update(
                        previous_sha256=prev_sha,
                        previous_closing=prev_closing,
                        opening=stmt.opening_minor,
                    )
                elif (
                    prev_seq is not None
                    and stmt.sequence is not None
                    and stmt.sequence != prev_seq + 1
                ):
                    status, kind = "broken", SEQUENCE_GAP
                    reason = f"sequence {stmt.sequence} does not follow {prev_seq}"
                    detail.update(previous_sequence=prev_seq)
        if status == "used" and same:
            self._event(
                cur,
                platform,
                now,
                STATEMENT_RESENT,
                sha,
                key,
                {"replaces_broken": [h for h, _ in same]},
            )
        if kind:
            detail["reason"] = reason
            self._event(cur, platform, now, kind, sha, key, detail)
        cur.execute(
            f"INSERT INTO {db.t(STATEMENTS)} ({_STMT_COLS}) VALUES ({', '.join([ph] * 17)})",
            (
                platform,
                sha,
                n,
                key,
                account,
                mirror,
                stmt.currency,
                stmt.statement_id,
                stmt.sequence,
                stmt.opening_minor,
                stmt.closing_minor,
                stmt.opening_date,
                stmt.closing_date,
                len(stmt.entries),
                status,
                reason,
                now,
            ),
        )
        db.insert_many(
            cur,
            ENTRIES,
            _ENTRY_COLS,
            [
                (
                    platform,
                    sha,
                    n,
                    e.index,
                    e.amount_minor,
                    e.currency,
                    e.booking_date,
                    e.value_date,
                    e.status,
                    e.entry_ref,
                    e.bank_ref,
                    "\n".join(e.end_to_end_ids),
                    "\n".join(e.instruction_ids),
                    e.batch_id,
                    e.counterparty_name,
                    e.counterparty_account,
                    e.remittance,
                    e.bank_tx_code,
                    e.return_reason,
                    int(e.reversal),
                )
                for e in stmt.entries
            ],
        )
        return StatementResult(key, status, reason, len(stmt.entries))

    def _previous(
        self, cur: Any, platform: str, account: str, stmt: Statement
    ) -> tuple[int | None, int, str] | None:
        """The used statement of the same account just before `stmt` (by closing date, then
        sequence)."""
        db = self.db
        ph = db.ph
        seq = -1 if stmt.sequence is None else stmt.sequence
        row = db.fetchone(
            cur,
            f"SELECT seq, closing, sha256 FROM {db.t(STATEMENTS)} WHERE platform = {ph} "
            f"AND account = {ph} AND status = 'used' AND (closing_date < {ph} OR "
            f"(closing_date = {ph} AND COALESCE(seq, -1) < {ph})) "
            "ORDER BY closing_date DESC, COALESCE(seq, -1) DESC LIMIT 1",
            (platform, account, stmt.closing_date, stmt.closing_date, seq),
        )
        if row is None:
            return None
        return (None if row[0] is None else int(row[0])), int(row[1]), str(row[2])

    # -- events ---------------------------------------------------------------------------------

    def _event(
        self,
        cur: Any,
        platform: str,
        at_ms: int,
        kind: str,
        sha: str,
        key: str,
        detail: dict[str, Any],
    ) -> str:
        body = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        event_id = hashlib.sha256(f"{kind}\n{sha}\n{key}\n{body}".encode()).hexdigest()[:32]
        db = self.db
        ph = db.ph
        cur.execute(
            f"INSERT INTO {db.t(EVENTS)} (platform, event_id, at_ms, kind, sha256, skey, detail) "
            f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT DO NOTHING",
            (platform, event_id, at_ms, kind, sha, key, body),
        )
        return event_id

    def add_event(
        self,
        platform: str,
        kind: str,
        detail: dict[str, Any],
        sha: str = "",
        key: str = "",
        at_ms: int | None = None,
    ) -> str:
        """Record an event (idempotent: the same kind, file, statement and detail once)."""
        self.ensure_tables()
        now = int(time.time() * 1000) if at_ms is None else at_ms
        with self.db.tx() as cur:
            return self._event(cur, platform, now, kind, sha, key, detail)

    def events(self, platform: str, kinds: Sequence[str] = (), limit: int = 10_000) -> list[Event]:
        """Events in the order they were recorded (time, then id), optionally of some kinds."""
        self.ensure_tables()
        db = self.db
        ph = db.ph
        sql = (
            f"SELECT event_id, at_ms, kind, sha256, skey, detail FROM {db.t(EVENTS)} "
            f"WHERE platform = {ph}"
        )
        params: list[Any] = [platform]
        if kinds:
            sql += f" AND kind IN ({', '.join([ph] * len(kinds))})"
            params += list(kinds)
        sql += f" ORDER BY at_ms, event_id LIMIT {int(limit)}"
        with db.reading() as cur:
            rows = db.fetchall(cur, sql, params)
        return [
            Event(str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), json.loads(r[5]))
            for r in rows
        ]

    # -- reads ----------------------------------------------------------------------------------

    def statements(self, platform: str, status: str | None = None) -> list[StoredStatement]:
        self.ensure_tables()
        db = self.db
        ph = db.ph
        sql = (
            "SELECT sha256, n, skey, account, mirror, ccy, stmt_id, seq, opening, closing, "
            "opening_date, closing_date, entries, status, reason, imported_ms "
            f"FROM {db.t(STATEMENTS)} WHERE platform = {ph}"
        )
        params: list[Any] = [platform]
        if status is not None:
            sql += f" AND status = {ph}"
            params.append(status)
        sql += " ORDER BY closing_date, COALESCE(seq, -1), imported_ms, sha256, n"
        with db.reading() as cur:
            rows = db.fetchall(cur, sql, params)
        return [
            StoredStatement(
                str(r[0]),
                int(r[1]),
                str(r[2]),
                str(r[3]),
                str(r[4]),
                str(r[5]),
                str(r[6]),
                None if r[7] is None else int(r[7]),
                int(r[8]),
                int(r[9]),
                str(r[10]),
                str(r[11]),
                int(r[12]),
                str(r[13]),
                str(r[14]),
                int(r[15]),
            )
            for r in rows
        ]

    def entries(self, platform: str, sha: str, n: int) -> list[Entry]:
        db = self.db
        ph = db.ph
        with db.reading() as cur:
            rows = db.fetchall(
                cur,
                f"SELECT {', '.join(_ENTRY_COLS[3:])} FROM {db.t(ENTRIES)} "
                f"WHERE platform = {ph} AND sha256 = {ph} AND n = {ph} ORDER BY idx",
                (platform, sha, n),
            )
        return [
            Entry(
                index=int(r[0]),
                amount_minor=int(r[1]),
                currency=str(r[2]),
                booking_date=str(r[3]),
                value_date=str(r[4]),
                status=str(r[5]),
                entry_ref=str(r[6]),
                bank_ref=str(r[7]),
                end_to_end_ids=tuple(x for x in str(r[8]).split("\n") if x),
                instruction_ids=tuple(x for x in str(r[9]).split("\n") if x),
                batch_id=str(r[10]),
                counterparty_name=str(r[11]),
                counterparty_account=str(r[12]),
                remittance=str(r[13]),
                bank_tx_code=str(r[14]),
                return_reason=str(r[15]),
                reversal=bool(r[16]),
            )
            for r in rows
        ]

    def raw_file(self, platform: str, sha: str) -> bytes | None:
        db = self.db
        with db.reading() as cur:
            row = db.fetchone(
                cur,
                f"SELECT raw FROM {db.t(FILES)} WHERE platform = {db.ph} AND sha256 = {db.ph}",
                (platform, sha),
            )
        return None if row is None else bytes(row[0])

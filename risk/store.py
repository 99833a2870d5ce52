"""The engine's own tables (`risk_` prefix) beside the ledger's, and the alerts read model.

Same database as the log (the SQLite file, or the PostgreSQL schema), through the ledger's
connection pool, so that a batch's position, rule state, outbox rows and read-model rows commit
in ONE transaction. Nothing here writes the event table.

- `risk_positions` (platform): last position read, its chain hash, the platform-wide part of
  the rule state (msgpack);
- `risk_state` (platform, key): the keyed part of the rule state, one msgpack row per account
  (`a:<id>`), alert id found (`k:`), alert status (`s:`), pending hold (`h:`), open LVT report
  (`l:`); a batch writes only the rows that changed, in the same transaction as the position;
- `risk_outbox` (platform, client_id): commands for the ledger and what became of them;
- `risk_alerts` (platform, alert_id): every alert in the log and where it is in its lifecycle;
- `risk_alert_events` (platform, seq): the lifecycle steps, one per alert record;
- `risk_reconciliations` (platform, seq): each `reconciliation_completed` record's figures;
- `risk_indicators` (platform, day, name): figures per business day (records, refusals,
  inflow/outflow, custody balance, alerts by level, LVT tags).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from ledger.store import LedgerStore
from projections.db import Db

PREFIX: Final = "risk_"

_TABLES: Final = (
    (
        "risk_positions",
        "platform TEXT NOT NULL, position BIGINT NOT NULL, head TEXT NOT NULL, "
        "state {blob} NOT NULL, PRIMARY KEY (platform)",
    ),
    (
        "risk_state",
        "platform TEXT NOT NULL, key TEXT NOT NULL, value {blob} NOT NULL, "
        "PRIMARY KEY (platform, key)",
    ),
    (
        "risk_outbox",
        "platform TEXT NOT NULL, client_id TEXT NOT NULL, position BIGINT NOT NULL, "
        "n INTEGER NOT NULL, op TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL, "
        "result TEXT NOT NULL, PRIMARY KEY (platform, client_id)",
    ),
    (
        "risk_alerts",
        "platform TEXT NOT NULL, alert_id TEXT NOT NULL, rule TEXT NOT NULL, level TEXT NOT NULL, "
        "subject TEXT NOT NULL, summary TEXT NOT NULL, status TEXT NOT NULL, "
        "raised_seq BIGINT NOT NULL, raised_ts BIGINT NOT NULL, raised_by TEXT NOT NULL, "
        "ack_seq BIGINT, ack_ts BIGINT, ack_by TEXT, ack_note TEXT, "
        "closed_seq BIGINT, closed_ts BIGINT, closed_by TEXT, close_reason TEXT, "
        "PRIMARY KEY (platform, alert_id)",
    ),
    (
        "risk_alert_events",
        "platform TEXT NOT NULL, seq BIGINT NOT NULL, alert_id TEXT NOT NULL, step TEXT NOT NULL, "
        "actor TEXT NOT NULL, ts BIGINT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (platform, seq)",
    ),
    (
        "risk_reconciliations",
        "platform TEXT NOT NULL, seq BIGINT NOT NULL, id TEXT NOT NULL, ccy TEXT NOT NULL, "
        "as_of BIGINT NOT NULL, requirement BIGINT NOT NULL, resource BIGINT NOT NULL, "
        "difference BIGINT NOT NULL, breaks BIGINT NOT NULL, result TEXT NOT NULL, "
        "actor TEXT NOT NULL, ts BIGINT NOT NULL, PRIMARY KEY (platform, seq)",
    ),
    (
        "risk_indicators",
        "platform TEXT NOT NULL, day BIGINT NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL, "
        "PRIMARY KEY (platform, day, name)",
    ),
)
# (table, key columns) in dump order; the read model proper (rebuildable from the log)
READ_MODEL: Final = (
    ("risk_alerts", ("alert_id",)),
    ("risk_alert_events", ("seq",)),
    ("risk_reconciliations", ("seq",)),
    ("risk_indicators", ("day", "name")),
)


class RiskDb(Db):
    """The projections' dialect helpers, for tables named `risk_*`."""

    def t(self, name: str) -> str:
        assert name.startswith(PREFIX) and name.replace("_", "").isalnum(), name
        return f'"{self.schema}".{name}' if self.schema else name

    def index_name(self, name: str) -> str:
        assert name.startswith(PREFIX), name
        return name


def open_db(store: LedgerStore) -> RiskDb:
    db = RiskDb(store)
    with db.tx() as cur:
        if db.is_pg:  # concurrent CREATE ... IF NOT EXISTS can still collide in pg_type
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('custody-risk'))")
        for name, columns in _TABLES:
            without_rowid = db.without_rowid
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {db.t(name)} ({columns.format(blob=db.blob)})"
                f"{without_rowid}"
            )
        cur.execute(
            f"CREATE INDEX IF NOT EXISTS {db.index_name('risk_alerts_open')} ON "
            f"{db.t('risk_alerts')} (platform, status, level)"
        )
        cur.execute(
            f"CREATE INDEX IF NOT EXISTS {db.index_name('risk_outbox_queued')} ON "
            f"{db.t('risk_outbox')} (platform, status, position, n)"
        )
    return db


# -- the read model, from the alert and reconciliation records -------------------------------


def apply_records(db: RiskDb, cur: Any, platform: str, recs: Sequence[dict[str, Any]]) -> None:
    """Write the read-model rows of `recs` (in log order) in the caller's transaction.

    Statements are sent with `executemany`, one call per run of the same statement: the
    `risk_alerts` statements (insert, acknowledge, close) keep their log order (an update must
    see the insert before it); the history and reconciliation inserts touch rows of their own
    and go last. A catch-up reads back thousands of alerts at once (one round trip each before).
    """
    ph = db.ph
    alerts_runs: list[tuple[str, list[tuple[Any, ...]]]] = []
    events: list[tuple[Any, ...]] = []
    recons: list[tuple[Any, ...]] = []

    def alerts_sql(sql: str, params: tuple[Any, ...]) -> None:
        if alerts_runs and alerts_runs[-1][0] == sql:
            alerts_runs[-1][1].append(params)
        else:
            alerts_runs.append((sql, [params]))

    def event(rec: dict[str, Any], alert: str, step: str, text: str) -> None:
        events.append((platform, rec["seq"], alert, step, rec["actor"], rec["ts"], text))

    insert_alert = (
        f"INSERT INTO {db.t('risk_alerts')} (platform, alert_id, rule, level, subject, "
        "summary, status, raised_seq, raised_ts, raised_by) VALUES "
        f"({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, 'raised', {ph}, {ph}, {ph})"
    )
    acknowledge = (
        f"UPDATE {db.t('risk_alerts')} SET status = 'acknowledged', ack_seq = {ph}, "
        f"ack_ts = {ph}, ack_by = {ph}, ack_note = {ph} "
        f"WHERE platform = {ph} AND alert_id = {ph} AND status <> 'closed'"
    )
    close = (
        f"UPDATE {db.t('risk_alerts')} SET status = 'closed', closed_seq = {ph}, "
        f"closed_ts = {ph}, closed_by = {ph}, close_reason = {ph} "
        f"WHERE platform = {ph} AND alert_id = {ph}"
    )
    for rec in recs:
        kind = rec["kind"]
        if kind == "alert_raised":
            a = rec["alert"]
            summary = rec["cmd"].get("summary", "")
            alerts_sql(
                insert_alert,
                (
                    platform,
                    a["id"],
                    a["rule"],
                    a["level"],
                    a["subject"],
                    summary,
                    rec["seq"],
                    rec["ts"],
                    rec["actor"],
                ),
            )
            event(rec, a["id"], "raised", summary)
        elif kind == "alert_acknowledged":
            alert = rec["alert_acknowledged"]
            note = rec["cmd"].get("note", "")
            alerts_sql(acknowledge, (rec["seq"], rec["ts"], rec["actor"], note, platform, alert))
            event(rec, alert, "acknowledged", note)
        elif kind == "alert_closed":
            alert = rec["alert_closed"]
            reason = rec["cmd"].get("reason", "")
            alerts_sql(close, (rec["seq"], rec["ts"], rec["actor"], reason, platform, alert))
            event(rec, alert, "closed", reason)
        elif kind == "reconciliation_completed":
            r = rec["reconciliation"]
            recons.append(
                (
                    platform,
                    rec["seq"],
                    r["id"],
                    r["ccy"],
                    r["as_of"],
                    r["requirement"],
                    r["closing"] + r["transit"],
                    r["difference"],
                    r["breaks"],
                    r["result"],
                    rec["actor"],
                    rec["ts"],
                )
            )
    for sql, rows in alerts_runs:
        cur.executemany(sql, rows)
    if events:
        cur.executemany(
            f"INSERT INTO {db.t('risk_alert_events')} (platform, seq, alert_id, step, actor, ts, "
            f"text) VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph})",
            events,
        )
    if recons:
        cur.executemany(
            f"INSERT INTO {db.t('risk_reconciliations')} (platform, seq, id, ccy, as_of, "
            "requirement, resource, difference, breaks, result, actor, ts) VALUES "
            f"({', '.join([ph] * 12)})",
            recons,
        )


def write_indicators(
    db: RiskDb,
    cur: Any,
    platform: str,
    counters: dict[tuple[int, str], int],
    gauges: dict[tuple[int, str], int],
) -> None:
    ph = db.ph
    table = db.t("risk_indicators")
    for (day, name), value in sorted(counters.items()):
        cur.execute(
            f"INSERT INTO {table} (platform, day, name, value) VALUES ({ph}, {ph}, {ph}, {ph}) "
            "ON CONFLICT (platform, day, name) DO UPDATE SET value = "
            f"{table}.value + excluded.value",
            (platform, day, name, value),
        )
    for (day, name), value in sorted(gauges.items()):
        cur.execute(
            f"INSERT INTO {table} (platform, day, name, value) VALUES ({ph}, {ph}, {ph}, {ph}) "
            "ON CONFLICT (platform, day, name) DO UPDATE SET value = excluded.value",
            (platform, day, name, value),
        )


# -- queries --------------------------------------------------------------------------------

ALERT_COLUMNS: Final = (
    "alert_id",
    "rule",
    "level",
    "subject",
    "summary",
    "status",
    "raised_seq",
    "raised_ts",
    "raised_by",
    "ack_seq",
    "ack_ts",
    "ack_by",
    "ack_note",
    "closed_seq",
    "closed_ts",
    "closed_by",
    "close_reason",
)
LEVEL_ORDER_SQL: Final = (
    "CASE level WHEN 'RED' THEN 0 WHEN 'ORANGE' THEN 1 WHEN 'YELLOW' THEN 2 ELSE 3 END"
)
MAX_ROWS: Final = 10_000


def alerts(
    db: RiskDb,
    platform: str,
    level: str | None = None,
    open_only: bool = False,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Alerts of a platform, most severe and newest first."""
    ph = db.ph
    where = [f"platform = {ph}"]
    params: list[Any] = [platform]
    if level is not None:
        where.append(f"level = {ph}")
        params.append(level)
    if open_only:
        where.append("status <> 'closed'")
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT {', '.join(ALERT_COLUMNS)} FROM {db.t('risk_alerts')} "
            f"WHERE {' AND '.join(where)} ORDER BY {LEVEL_ORDER_SQL}, raised_seq DESC "
            f"LIMIT {int(min(limit, MAX_ROWS))}",
            params,
        )
    return [dict(zip(ALERT_COLUMNS, row, strict=True)) for row in rows]


def open_counts(db: RiskDb, platform: str) -> dict[str, int]:
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT level, COUNT(*) FROM {db.t('risk_alerts')} WHERE platform = {db.ph} "
            "AND status <> 'closed' GROUP BY level",
            (platform,),
        )
    return {str(level): int(n) for level, n in rows}


def history(db: RiskDb, platform: str, limit: int = 1000) -> list[dict[str, Any]]:
    cols = ("seq", "alert_id", "step", "actor", "ts", "text")
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT {', '.join(cols)} FROM {db.t('risk_alert_events')} WHERE platform = {db.ph} "
            f"ORDER BY seq DESC LIMIT {int(min(limit, MAX_ROWS))}",
            (platform,),
        )
    return [dict(zip(cols, row, strict=True)) for row in rows]


def reconciliations(db: RiskDb, platform: str, limit: int = 60) -> list[dict[str, Any]]:
    cols = (
        "seq",
        "id",
        "ccy",
        "as_of",
        "requirement",
        "resource",
        "difference",
        "breaks",
        "result",
        "actor",
        "ts",
    )
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT {', '.join(cols)} FROM {db.t('risk_reconciliations')} "
            f"WHERE platform = {db.ph} ORDER BY seq DESC LIMIT {int(min(limit, MAX_ROWS))}",
            (platform,),
        )
    return [dict(zip(cols, row, strict=True)) for row in rows]


def indicators(db: RiskDb, platform: str, since_day: int) -> dict[str, list[tuple[int, int]]]:
    """name -> [(day, value)] in day order, from `since_day` on."""
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT name, day, value FROM {db.t('risk_indicators')} WHERE platform = {db.ph} "
            f"AND day >= {db.ph} ORDER BY name, day",
            (platform, since_day),
        )
    out: dict[str, list[tuple[int, int]]] = {}
    for name, day, value in rows:
        out.setdefault(str(name), []).append((int(day), int(value)))
    return out


def outbox(db: RiskDb, platform: str) -> list[dict[str, Any]]:
    cols = ("client_id", "position", "n", "op", "status", "result")
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT {', '.join(cols)} FROM {db.t('risk_outbox')} WHERE platform = {db.ph} "
            "ORDER BY position, n",
            (platform,),
        )
    return [dict(zip(cols, row, strict=True)) for row in rows]

"""Projection catch-up speed and as-of / statement latency on a million-movement account.

Builds one platform's log through the real ledger service (every record a transfer touching the
hot account `hot`), then, on the same database:

  catch-up     drop every read model and project the whole log from a cold start, both
               projections in one runner (statements + audit trail), then each alone
  baselines    measured in the same run: (a) reading + decoding + chain-checking the log alone
               (the floor any projection pays), (b) a plain executemany of the SAME rows the
               projections write into bare tables (no indexes beyond the primary key, one
               transaction per batch); the ratio is projection rate / baseline rate
  as-of        `balance_at` on `hot` at random positions and random times, p50/p99 in ms
  statement    one page of 100 lines of `hot` starting at a random time, p50/p99 in ms
  audit        one page of 100 rows filtered by actor (one long run) or by account, from a
               random position, p50/p99 in ms

  python bench/projections.py [--records N] [--store sqlite|postgres|both] [--batch N]

PostgreSQL: 127.0.0.1:5432 user postgres database test, in a fresh schema dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file is named like the package it measures: drop bench/ from the path so that
# `import projections` finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ledger import commands as c  # noqa: E402
from ledger.config import Config  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.store import log_stream  # noqa: E402
from projections import statements as st  # noqa: E402
from projections.audit_trail import AuditFilter, AuditTrailProjection, audit_page  # noqa: E402
from projections.runner import BATCH_MAX, ProjectionRunner, _verified  # noqa: E402
from projections.statements import StatementsProjection  # noqa: E402

PLATFORM = "bench"
CUSTOMERS = 1000
GEN_BATCH = 8192
PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"


@contextmanager
def store_env(kind: str) -> Iterator[dict[str, str]]:
    data = Path(tempfile.mkdtemp(prefix="bench-proj-"))
    try:
        if kind == "sqlite":
            yield {"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(data)}
            return
        import psycopg

        schema = "bench_" + uuid.uuid4().hex[:12]
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield {
                "CUSTODY_STORE": "postgres",
                "POSTGRES_DBNAME": "test",
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": "5432",
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "POSTGRES_SCHEMA": schema,
                "CUSTODY_DATA_DIR": str(data),
            }
        finally:
            with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        shutil.rmtree(data, ignore_errors=True)


def generate(service: LedgerService, records: int, budget_s: float) -> tuple[int, float]:
    """A log of ~`records` records, each a transfer to or from `hot`; stops at the time budget."""
    actor = "operator:bench"
    try:  # the bookkeeping policy: plain transfers without customer signatures
        from tests.helpers import BOOKKEEPING_POLICY

        _check([service.create_platform(PLATFORM, "Bench", actor, BOOKKEEPING_POLICY)])
    except ImportError:  # a ledger before versioned policies
        _check([service.create_platform(PLATFORM, "Bench", actor)])
    opens: list[c.Command] = [
        c.OpenAccount(client_id="o:omni", account_id="omni", kind="omnibus", currency="CNY"),
        c.OpenAccount(
            client_id="o:hot", account_id="hot", kind="customer", currency="CNY", role="lender"
        ),
    ]
    opens += [
        c.OpenAccount(
            client_id=f"o:c{i}", account_id=f"c{i}", kind="customer", currency="CNY", role="other"
        )
        for i in range(CUSTOMERS)
    ]
    _check(service.execute(PLATFORM, opens, actor))
    deposits: list[c.Command] = [
        c.Deposit(
            client_id=f"d:{a}",
            mirror_account_id="omni",
            account_id=a,
            amount_minor=10**12,
            currency="CNY",
        )
        for a in ["hot", *(f"c{i}" for i in range(CUSTOMERS))]
    ]
    _check(service.execute(PLATFORM, deposits, "platform:bench"))
    t0 = time.perf_counter()
    i = 0
    while i < records and time.perf_counter() - t0 < budget_s:
        batch: list[c.Command] = []
        for j in range(i, min(records, i + GEN_BATCH)):
            other = f"c{j % CUSTOMERS}"
            src, dst = ("hot", other) if j % 2 == 0 else (other, "hot")
            batch.append(
                c.Transfer(
                    client_id=f"t{j}",
                    from_account_id=src,
                    to_account_id=dst,
                    amount_minor=j % 997 + 1,
                    currency="CNY",
                )
            )
        _check(service.execute(PLATFORM, batch, "platform:bench"))
        i += len(batch)
    return i, time.perf_counter() - t0


def _check(outcomes: list[Any]) -> None:
    bad = [o for o in outcomes if o.status != "accepted"]
    if bad:
        raise SystemExit(f"the ledger did not accept the workload: {bad[0]}")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def read_floor(runner: ProjectionRunner, batch: int) -> float:
    """Seconds to read, decode and chain-check the whole log (what every projection pays)."""
    t0 = time.perf_counter()
    after, head = -1, b"\x00" * 32
    while True:
        rows = runner._read(PLATFORM, after)
        if not rows:
            break
        recs, heads = _verified(PLATFORM, rows, after, head)
        last = recs[-1]
        after, head = (last["seq"] if isinstance(last, dict) else last.seq), heads[-1]
    return time.perf_counter() - t0


def plain_sqlite_baseline(runner: ProjectionRunner, batch: int, dump_dir: Path) -> float:
    """Seconds for a plain sqlite3 executemany of the same rows into bare tables."""
    db = runner.db
    tables = {}
    with db.reading() as cur:
        for p in runner.projections:
            for table, *_ in p.tables:
                cur.execute(f"SELECT * FROM {db.t(table)}")
                tables[table] = [tuple(r.values() if isinstance(r, dict) else r) for r in cur]
    path = dump_dir / "baseline.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for table, rows in tables.items():
        if rows:
            cols = ", ".join(f"c{k}" for k in range(len(rows[0])))
            conn.execute(f"CREATE TABLE {table} ({cols})")
    total = sum(len(r) for r in tables.values())
    t0 = time.perf_counter()
    for table, rows in tables.items():
        if not rows:
            continue
        marks = ", ".join("?" * len(rows[0]))
        # spread each table over as many transactions as the projection used batches
        per = max(1, len(rows) * batch // max(1, runner_records(runner)))
        for start in range(0, len(rows), per):
            conn.execute("BEGIN")
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows[start : start + per])
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    print(f"    baseline rows inserted: {total:,}")
    return elapsed


def runner_records(runner: ProjectionRunner) -> int:
    last = runner.store.last_row(log_stream(PLATFORM))
    return 0 if last is None else last[0] + 1


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latencies(runner: ProjectionRunner, n_log: int, queries: int) -> None:
    db = runner.db
    rnd = random.Random(7)
    with db.reading() as cur:
        first_ts = db.fetchone(
            cur, f"SELECT min(ts), max(ts) FROM {db.t(st.CLOCK)} WHERE platform = {db.ph}",
            (PLATFORM,),
        )  # fmt: skip
    assert first_ts is not None
    lo_ms, hi_ms = int(first_ts[0]), int(first_ts[1])
    for label, fn in (
        ("as-of position", lambda: st.balance_at(db, PLATFORM, "hot", at_seq=rnd.randrange(n_log))),
        ("as-of time", lambda: st.balance_at(db, PLATFORM, "hot", at_ms=rnd.randint(lo_ms, hi_ms))),
        (
            "statement page (100 lines from a random time)",
            lambda: st.statement(db, PLATFORM, "hot", 100, from_ms=rnd.randint(lo_ms, hi_ms)),
        ),
        ("current balance", lambda: st.balance_at(db, PLATFORM, "hot")),
        (
            "audit page (100 rows, actor filter, from a random position)",
            lambda: audit_page(
                db,
                PLATFORM,
                AuditFilter(actor="platform:bench", from_seq=rnd.randrange(n_log)),
                100,
            ),
        ),
        (
            "audit page (100 rows, account filter, from a random position)",
            lambda: audit_page(
                db, PLATFORM, AuditFilter(account="hot", from_seq=rnd.randrange(n_log)), 100
            ),
        ),
    ):
        times = []
        for _ in range(queries):
            _, dt = timed(fn)
            times.append(dt * 1000)
        print(
            f"  {label:<62} p50 {statistics.median(times):6.3f} ms   "
            f"p99 {pct(times, 0.99):6.3f} ms   ({queries} queries)"
        )
    # deep pages: walk 5 consecutive pages from the middle of a million-line statement
    mid_ms = (lo_ms + hi_ms) // 2
    page = st.statement(db, PLATFORM, "hot", 1000, from_ms=mid_ms)
    t0 = time.perf_counter()
    pages = 0
    while page.next_page_token and pages < 5:
        page = st.statement(db, PLATFORM, "hot", 1000, page.next_page_token, from_ms=mid_ms)
        pages += 1
    if pages:
        print(f"  next page (1000 lines, deep)  {(time.perf_counter() - t0) * 1000 / pages:.3f} ms")


def bench_store(kind: str, records: int, batch: int, budget_s: float, queries: int) -> None:
    print(f"\n== {kind} ==")
    with store_env(kind) as env:
        config = Config.from_env(env)
        service = LedgerService(config)
        service.start()
        try:
            made, gen_s = generate(service, records, budget_s)
        finally:
            service.close()
        note = "" if made == records else f" (time budget {budget_s:.0f}s reached)"
        print(f"  generated {made:,} transfers in {gen_s:.1f}s through the ledger{note}")
        from ledger.store import LedgerStore

        store = LedgerStore(config)
        try:
            n_log = runner_records(ProjectionRunner(store))
            print(f"  log: {n_log:,} records; hot account movements: {made:,}")
            floor = read_floor(ProjectionRunner(store, batch_size=batch), batch)
            print(f"  floor: read + decode + chain check    {n_log / floor:>10,.0f} records/s")
            results = {}
            for label, projs in (
                ("statements + audit (one runner)", None),
                ("statements alone", [StatementsProjection()]),
                ("audit trail alone", [AuditTrailProjection()]),
            ):
                runner = ProjectionRunner(store, projs, batch_size=batch)
                runner.ensure_tables()
                _drop(runner)
                cpu0 = time.process_time()
                _, dt = timed(lambda r=runner: r.catch_up(PLATFORM))  # type: ignore[misc]
                cpu = time.process_time() - cpu0
                results[label] = n_log / dt
                # CPU seconds of this process (every thread): steadier than wall time on a
                # machine shared with other work; PostgreSQL's own CPU is not in it.
                print(
                    f"  catch-up, {label:<32} {n_log / dt:>10,.0f} records/s ({dt:.2f}s); "
                    f"{n_log / cpu:>8,.0f} records per CPU-second"
                )
                runner.close()
            runner = ProjectionRunner(store, batch_size=batch)
            if kind == "sqlite":
                with tempfile.TemporaryDirectory() as tmp:
                    base = plain_sqlite_baseline(runner, batch, Path(tmp))
                rate = n_log / base
                print(f"  baseline: plain sqlite3 executemany of the same rows {rate:,.0f} rec/s")
                print(
                    "  ratio projection / plain insert: "
                    f"{results['statements + audit (one runner)'] / rate:.2f}"
                )
            print(f"  ratio projection / read floor: "
                  f"{results['statements + audit (one runner)'] * floor / n_log:.2f}")  # fmt: skip
            latencies(runner, n_log, queries)
        finally:
            store.close()


def _drop(runner: ProjectionRunner) -> None:
    """Cold start: delete the read models and positions without projecting again."""
    db = runner.db
    with db.tx() as cur:
        for p in runner.projections:
            p.drop(db, cur, PLATFORM)
            cur.execute(
                f"DELETE FROM {db.t('proj_positions')} WHERE name = {db.ph} AND platform = {db.ph}",
                (p.name, PLATFORM),
            )
    runner._forget()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--batch", type=int, default=BATCH_MAX)
    ap.add_argument("--budget-s", type=float, default=120.0, help="most seconds of generation")
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, batch {args.batch}")
    for kind in ("sqlite", "postgres") if args.store == "both" else (args.store,):
        bench_store(kind, args.records, args.batch, args.budget_s, args.queries)


if __name__ == "__main__":
    main()

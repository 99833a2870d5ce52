"""How long moving a platform between two PostgreSQL databases takes (`custody platform move`).

Builds a platform with --records records in store `a` (database `test`), moves it to store `b`
(database `custody_bench_move`, created if missing), and prints the move's time and records per
second against a baseline in the same run: a plain binary COPY of the same rows from one
database to the other without any checking (what the copy cannot beat). Both stores use fresh
schemas, dropped afterwards.

    /work/venv/bin/python bench/move.py --records 200000

Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.transfers import BENCH_POLICY  # noqa: E402
from ledger import commands as c  # noqa: E402
from ledger.config import Config  # noqa: E402
from ledger.move import move_platform  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.store import LedgerStore, log_stream  # noqa: E402

CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname={db}"
SECOND_DB = "custody_bench_move"
BATCH = 5_000


def _execute(db: str, statement: str) -> None:
    with psycopg.connect(CONNINFO.format(db=db), autocommit=True) as conn:
        conn.execute(statement)


def _build(service: LedgerService, records: int) -> None:
    ok = service.create_platform("pm", "Moved platform", "operator:root", BENCH_POLICY)
    assert ok.ok, ok
    opens = [
        c.OpenAccount(client_id=f"open:{a}", account_id=a, kind=k, currency="CNY")
        for a, k in (("omni", "omnibus"), ("pbank", "platform_bank"), ("own", "own_funds"))
    ]
    opens += [
        c.OpenAccount(
            client_id=f"open:{a}", account_id=a, kind="customer", currency="CNY", role="lender"
        )
        for a in ("alice", "bob")
    ]
    assert all(o.ok for o in service.execute("pm", opens, "operator:root"))
    dep = c.Deposit(client_id="d0", mirror_account_id="omni", account_id="alice",
                    amount_minor=10**12, currency="CNY")  # fmt: skip
    assert service.execute("pm", [dep], "operator:root")[0].ok
    done = 0
    while done < records:
        n = min(BATCH, records - done)
        batch = [
            c.Transfer(
                client_id=f"t{done + i}",
                from_account_id="alice",
                to_account_id="bob",
                amount_minor=1,
                currency="CNY",
                purpose="transfer",
            )
            for i in range(n)
        ]
        outcomes = service.execute("pm", batch, "platform:pm")
        assert all(o.ok for o in outcomes), outcomes[0]
        done += n


def _baseline(src: Config, dst_db: str, dst_schema: str) -> float:
    """Binary COPY of the log's rows from one database to the other, nothing checked."""
    started = time.perf_counter()
    with (
        psycopg.connect(CONNINFO.format(db="test")) as a,
        psycopg.connect(CONNINFO.format(db=dst_db)) as b,
    ):
        b.execute(
            f"CREATE TABLE {dst_schema}.baseline (originator_id text, originator_version bigint, "
            "topic text, state bytea)"
        )
        schema = src.postgres["POSTGRES_SCHEMA"]
        with (
            a.cursor().copy(
                f"COPY (SELECT originator_id, originator_version, topic, state FROM "
                f"{schema}.custody_events WHERE originator_id = %s) TO STDOUT (FORMAT BINARY)",
                (log_stream("pm"),),
            ) as out,
            b.cursor().copy(f"COPY {dst_schema}.baseline FROM STDIN (FORMAT BINARY)") as into,
        ):
            for block in out:
                into.write(block)
        b.commit()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="transfers to build")
    args = parser.parse_args()
    assert 1 <= args.records <= 10_000_000
    with psycopg.connect(CONNINFO.format(db="test"), autocommit=True) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (SECOND_DB,)
        ).fetchone():
            conn.execute(f"CREATE DATABASE {SECOND_DB}")
    schema = "bm_" + uuid.uuid4().hex[:12]
    _execute("test", f"CREATE SCHEMA {schema}")
    _execute(SECOND_DB, f"CREATE SCHEMA {schema}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            placement = Path(tmp) / "placement.json"
            placement.write_text(json.dumps({
                "version": 1,
                "default_store": "a",
                "stores": {
                    "a": {"postgres": {"POSTGRES_DBNAME": "test", "POSTGRES_SCHEMA": schema}},
                    "b": {"postgres": {"POSTGRES_DBNAME": SECOND_DB, "POSTGRES_SCHEMA": schema}},
                },
            }))  # fmt: skip
            config = Config.from_env(
                {
                    "CUSTODY_PLACEMENT": str(placement),
                    "CUSTODY_STORE_NAME": "a",
                    "CUSTODY_DATA_DIR": tmp,
                    "CUSTODY_CHECKPOINT_EVERY": "0",
                }
            )
            service = LedgerService(config)
            service.start()
            t0 = time.perf_counter()
            _build(service, args.records)
            build_s = time.perf_counter() - t0
            service.close()  # the move runs with no server: measures the copy alone
            store = LedgerStore(config)
            last = store.last_row(log_stream("pm"))
            store.close()
            assert last is not None
            size = last[0] + 1
            base_s = _baseline(config, SECOND_DB, schema)
            report = move_platform(config, "pm", "b", "operator:bench", lease_wait_s=60)
            assert report.records == size
    finally:
        _execute("test", f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        _execute(SECOND_DB, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    load = os.getloadavg()
    print(f"records in the log        {size:>12,}   (built in {build_s:.1f} s)")
    print(
        f"move (copy+verify+switch) {report.elapsed_s:>12.2f} s  "
        f"{size / report.elapsed_s:>10,.0f} records/s"
    )
    print(f"baseline binary COPY      {base_s:>12.2f} s  {size / base_s:>10,.0f} records/s")
    print(f"ratio move / baseline     {base_s / report.elapsed_s:>12.2f}   (records/s)")
    print(f"load average              {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

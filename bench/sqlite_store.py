"""What storing one record costs in SQLite, by table layout (µs per record, batches of 1,000).

Every variant stores the same rows (stream, position, kind, 32-byte chain hash + ~330 bytes of
record JSON like a `transferred` record) in WAL mode with synchronous=FULL, one transaction per
batch, and reports insert and commit time per record separately:

  ledger-store   ledger.store.LedgerStore.append (eventsourcing StoredEvent objects, the
                 application recorder's rowid table + (originator_id, originator_version)
                 primary-key index)
  raw-same       the same table, plain sqlite3 executemany over tuples (no StoredEvent)
  without-rowid  same columns, WITHOUT ROWID table (one b-tree instead of table + index)
  int-pk         one table per platform log: (seq INTEGER PRIMARY KEY, kind, state)

  python bench/sqlite_store.py [--records N] [--batch N] [--repeat K]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ledger.config import Config  # noqa: E402
from ledger.store import LedgerStore  # noqa: E402

STREAM = "log:bench"


def make_rows(n: int) -> list[tuple[int, str, bytes]]:
    rows = []
    head = b"\x00" * 32
    for i in range(n):
        a, b, amount = f"c{i % 997:05d}", f"c{i % 991 + 997:05d}", i % 1000 + 1
        cmd = {
            "amount_minor": amount,
            "client_id": f"t{i}",
            "currency": "CNY",
            "from_account_id": a,
            "op": "transfer",
            "purpose": "transfer",
            "to_account_id": b,
        }
        rec = {
            "actor": "platform:bench",
            "ccy": "CNY",
            "cid": f"t{i}",
            "cmd": cmd,
            "entries": [[a, b, amount]],
            "kind": "transferred",
            "platform": "bench",
            "pv": 0,
            "seq": i,
            "ts": 1_800_000_000_000,
            "v": 1,
        }
        data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        head = hashlib.sha256(head + data).digest()
        rows.append((i, "transferred", head + data))
    return rows


Timed = tuple[float, float]  # insert seconds, commit seconds


def raw_variant(create: str, insert: str, with_stream: bool) -> Callable[..., Timed]:
    def run(path: str, rows: list[tuple[int, str, bytes]], batch: int) -> Timed:
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute(create)
        ins = com = 0.0
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            t0 = time.perf_counter()
            con.execute("BEGIN")
            if with_stream:
                con.executemany(insert, [(STREAM, s, k, st) for s, k, st in chunk])
            else:
                con.executemany(insert, chunk)
            t1 = time.perf_counter()
            con.execute("COMMIT")
            t2 = time.perf_counter()
            ins += t1 - t0
            com += t2 - t1
        con.close()
        return ins, com

    return run


def ledger_store(path: str, rows: list[tuple[int, str, bytes]], batch: int) -> Timed:
    cfg = Config.from_env({"CUSTODY_DATA_DIR": os.path.dirname(path), "CUSTODY_SQLITE_PATH": path})
    store = LedgerStore(cfg)
    total = 0.0
    for start in range(0, len(rows), batch):
        t0 = time.perf_counter()
        store.append(STREAM, rows[start : start + batch])
        total += time.perf_counter() - t0
    store.close()
    return total, 0.0  # not separable from outside: reported as insert + commit


VARIANTS: dict[str, Callable[..., Timed]] = {
    "ledger-store": ledger_store,
    "raw-same": raw_variant(
        "CREATE TABLE ev (originator_id TEXT, originator_version INTEGER, topic TEXT,"
        " state BLOB, PRIMARY KEY (originator_id, originator_version))",
        "INSERT INTO ev VALUES (?, ?, ?, ?)",
        True,
    ),
    "without-rowid": raw_variant(
        "CREATE TABLE ev (originator_id TEXT, originator_version INTEGER, topic TEXT,"
        " state BLOB, PRIMARY KEY (originator_id, originator_version)) WITHOUT ROWID",
        "INSERT INTO ev VALUES (?, ?, ?, ?)",
        True,
    ),
    "int-pk": raw_variant(
        "CREATE TABLE log_bench (seq INTEGER PRIMARY KEY, kind TEXT, state BLOB)",
        "INSERT INTO log_bench VALUES (?, ?, ?)",
        False,
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    rows = make_rows(args.records)
    results: dict[str, list[Timed]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeat):
        for name, fn in VARIANTS.items():
            tmp = tempfile.mkdtemp(prefix="custody-sqlbench-")
            try:
                results[name].append(fn(os.path.join(tmp, "s.sqlite3"), rows, args.batch))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    n = len(rows)
    print(f"{n} records of ~{len(rows[0][2])} bytes, batch {args.batch}, median of {args.repeat}")
    print(f"{'variant':16s} {'insert µs':>10s} {'commit µs':>10s} {'total µs':>10s}")
    for name, rs in results.items():
        ins = statistics.median(r[0] for r in rs) * 1e6 / n
        com = statistics.median(r[1] for r in rs) * 1e6 / n
        tot = statistics.median(r[0] + r[1] for r in rs) * 1e6 / n
        print(f"{name:16s} {ins:10.2f} {com:10.2f} {tot:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

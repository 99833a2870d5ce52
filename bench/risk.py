"""Early-warning rule throughput: the risk engine over a log of customer transfers.

Builds one platform's log through the real ledger service (1,000 customers, 100,000 transfers
by default, on SQLite), then, on the same database and in the same process:

  baseline   read the log page by page (the engine's page size) and JSON-decode every record:
             the floor any reader of the log pays
  floor      the engine's own reading without the rules: its page reads straight from the
             event table, the chain link of every record, the typed decode (`Rec`); what is
             left above it is the rules, the state and read-model writes, the ticks and W17
  engine     a fresh `RiskEngine` with ALL rules on catches up the whole log (`catch_up`: the
             rules, the chain check, one transaction per page with position + rule state +
             read model + outbox, the ticks, sending the alerts to the ledger and reading them
             back); records/s = records read / wall time
  restart    a second engine stopped half-way and resumed by a third one must end in the same
             read model and raise nothing twice (checked, not timed)

The workload (seeded, deterministic): transfers between random customers (amounts mostly
small), inside `--span-hours` of log time (default 72 h: the whole log sits in W09's window and
a third of it in W08's, so the windows are full and the per-movement work is the real one);
~1 % near the large-value threshold (W07), ~0.5 % over it (LVT tags, W06), a few mule accounts
that collect from many and pay one (W09), rapid in-and-out of large amounts (W08), a few refused
transfers (W23 counts them), and the clock moving so the day-based rules see several days.

  python bench/risk.py [--customers N] [--transfers N] [--store sqlite|postgres|both]
                       [--span-hours H] [--batch N] [--no-restart-check]

PostgreSQL: 127.0.0.1:5432 user postgres database test, in a fresh schema dropped afterwards.
Memory: the process's peak RSS before and after the engine ran, and the size of the stored rule
state (bytes in `risk_positions` + `risk_state`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
# This file is named like the package it measures: drop bench/ from the path so that
# `import risk` finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ledger import commands as c  # noqa: E402
from ledger import records  # noqa: E402
from ledger.config import Config  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.store import READ_PAGE_MAX, log_stream  # noqa: E402
from risk import store as rs  # noqa: E402
from risk.engine import DEFAULT_BATCH, RiskEngine  # noqa: E402
from risk.rules import REC_DECODER  # noqa: E402
from tests.helpers import BOOKKEEPING_POLICY, FakeClock  # noqa: E402

PLATFORM = "bench"
ACTOR = "platform:bench"
PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"
LVT = 50_000_000  # the default policy's individual large-value threshold (CNY)
CHUNK = 2_000  # transfers per ledger request while generating


@contextmanager
def store_env(kind: str) -> Iterator[dict[str, str]]:
    data = Path(tempfile.mkdtemp(prefix="bench-risk-"))
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


def _check(outcomes: list[Any]) -> None:
    bad = [o for o in outcomes if o.status != "accepted"]
    if bad:
        raise SystemExit(f"generation refused: {bad[:3]}")


def _transfer(cid: str, src: str, dst: str, amount: int) -> c.Transfer:
    return c.Transfer(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency="CNY",
    )


def generate(
    service: LedgerService, clock: FakeClock, customers: int, transfers: int, span_ms: int
) -> dict[str, int]:
    """The platform, its accounts, a deposit each, then `transfers` transfers (mostly accepted)."""
    rnd = random.Random(7)
    outcome = service.create_platform(PLATFORM, "Bench", "operator:root", BOOKKEEPING_POLICY)
    assert outcome.status == "accepted", outcome
    names = [f"c{i}" for i in range(customers)]
    opens: list[c.Command] = [
        c.OpenAccount(client_id="o:omni", account_id="omni", kind="omnibus", currency="CNY"),
    ]
    opens += [
        c.OpenAccount(
            client_id=f"o:{n}", account_id=n, kind="customer", currency="CNY", role="other"
        )
        for n in names
    ]
    _check(service.execute(PLATFORM, opens, "operator:root"))
    _check(
        service.execute(
            PLATFORM,
            [
                c.Deposit(
                    client_id=f"d:{n}",
                    mirror_account_id="omni",
                    account_id=n,
                    amount_minor=10**13,
                    currency="CNY",
                )
                for n in names
            ],
            ACTOR,
        )
    )
    mules = names[:10]  # collect from many, pay one
    kinds = {"plain": 0, "near": 0, "large": 0, "mule": 0, "rapid": 0, "refused": 0}
    step = max(1, span_ms * CHUNK // max(1, transfers))
    done = 0
    while done < transfers:
        batch: list[c.Command] = []
        for i in range(done, min(transfers, done + CHUNK)):
            x = rnd.random()
            src, dst = rnd.sample(names, 2)
            if x < 0.01:
                kind, amount = "near", rnd.randrange(LVT * 9 // 10, LVT - 1)
            elif x < 0.015:
                kind, amount = "large", rnd.randrange(LVT, 3 * LVT)
            elif x < 0.03:
                kind, amount = "mule", rnd.randrange(1_000, 100_000)
                if rnd.random() < 0.9:
                    dst = rnd.choice(mules)
                else:
                    src, dst = rnd.choice(mules), names[-1]
                if src == dst:
                    src = names[-2]
            elif x < 0.035:
                kind, amount = "rapid", rnd.randrange(5_000_000, 20_000_000)
                mid = rnd.choice(names[10:60])
                batch.append(_transfer(f"t{i}a", src, mid, amount))
                src, dst = mid, dst if dst != mid else src
            elif x < 0.036:
                kind, amount, dst = "refused", 1, "nobody"
            else:
                kind, amount = "plain", rnd.randrange(1, 100_000)
            kinds[kind] += 1
            batch.append(_transfer(f"t{i}", src, dst, amount))
        outcomes = service.execute(PLATFORM, batch, ACTOR)
        refused = sum(o.status != "accepted" for o in outcomes)
        if refused > len(batch) // 20:
            raise SystemExit(f"too many refusals while generating: {refused} of {len(batch)}")
        done += CHUNK
        clock.advance(step)
    return kinds


def baseline(service: LedgerService, batch: int) -> tuple[int, float, float]:
    """Read every record page by page and JSON-decode it: the floor of any log reader.
    (records, wall s, CPU s)"""
    decode = msgspec.json.Decoder().decode
    batch = min(batch, READ_PAGE_MAX)
    c0 = time.process_time()
    t0 = time.perf_counter()
    n, after = 0, -1
    stream = log_stream(PLATFORM)
    while True:
        rows = service.store.read(stream, after=after, limit=batch)
        if not rows:
            break
        for _seq, _kind, packed in rows:
            decode(packed[32:])
        n += len(rows)
        after = rows[-1][0]
    return n, time.perf_counter() - t0, time.process_time() - c0


def floor(engine: RiskEngine) -> tuple[int, float, float]:
    """The engine's reading without the rules: pages from the event table, the chain link of
    every record, the typed decode. (records, wall s, CPU s)"""
    c0 = time.process_time()
    t0 = time.perf_counter()
    head, after, n = records.CHAIN_GENESIS, -1, 0
    while True:
        rows = engine._read(PLATFORM, after)
        for seq, _kind, packed in rows:
            link, data = packed[: records.HASH_LEN], packed[records.HASH_LEN :]
            if hashlib.sha256(head + data).digest() != link:
                raise SystemExit(f"chain broken at {seq}")
            REC_DECODER.decode(data)
            head = link
        n += len(rows)
        if len(rows) < engine.batch_size:
            break
        after = rows[-1][0]
    return n, time.perf_counter() - t0, time.process_time() - c0


def state_bytes(engine: RiskEngine) -> int:
    db = engine.db
    total = 0
    with db.reading() as cur:
        for table, column in (("risk_positions", "state"), ("risk_state", "value")):
            try:
                row = db.fetchone(
                    cur,
                    f"SELECT COALESCE(SUM(LENGTH({column})), 0) FROM {db.t(table)} "
                    f"WHERE platform = {db.ph}",
                    (PLATFORM,),
                )
            except Exception:  # the table does not exist (an engine before per-account rows)
                if db.is_pg:
                    raise
                continue
            total += int(row[0]) if row else 0
    return total


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(store: str, args: argparse.Namespace) -> None:
    with store_env(store) as env:
        clock = FakeClock()
        service = LedgerService(Config.from_env(env), clock_ms=clock)
        service.start()
        try:
            t0 = time.perf_counter()
            span_ms = args.span_hours * 3_600_000
            kinds = generate(service, clock, args.customers, args.transfers, span_ms)
            size = service.head(PLATFORM)[0] + 1
            print(
                f"[{store}] log: {size:,} records ({kinds}) in {args.span_hours} h of log time, "
                f"generated in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            gc.collect()
            nb, tb, cb = min((baseline(service, args.batch) for _ in range(2)), key=lambda r: r[1])
            base_rate, base_cpu = nb / tb, nb / cb
            print(
                f"[{store}] baseline LedgerStore.read + JSON decode: {nb:,} records in "
                f"{tb:.2f} s = {base_rate:,.0f} records/s (CPU {cb:.2f} s = {base_cpu:,.0f}/s)",
                flush=True,
            )

            probe = RiskEngine(service, clock_ms=clock, batch_size=args.batch)
            nf, tf, cf = min((floor(probe) for _ in range(2)), key=lambda r: r[1])
            floor_rate, floor_cpu = nf / tf, nf / cf
            print(
                f"[{store}] floor (engine's read + chain check + typed decode, no rules): "
                f"{nf:,} records in {tf:.2f} s = {floor_rate:,.0f} records/s (CPU {cf:.2f} s = "
                f"{floor_cpu:,.0f}/s)",
                flush=True,
            )

            verify = [0.0]
            real_verify = RiskEngine.verify_chain

            def timed_verify(self: RiskEngine, platform: str) -> Any:
                t = time.perf_counter()
                try:
                    return real_verify(self, platform)
                finally:
                    verify[0] += time.perf_counter() - t

            RiskEngine.verify_chain = timed_verify  # type: ignore[method-assign]
            rss0 = rss_mb()
            engine = RiskEngine(service, clock_ms=clock, batch_size=args.batch)
            gc.collect()
            c0 = time.process_time()
            t0 = time.perf_counter()
            read = engine.catch_up(PLATFORM)[PLATFORM]
            te = time.perf_counter() - t0
            ce = time.process_time() - c0
            RiskEngine.verify_chain = real_verify  # type: ignore[method-assign]
            rss1 = rss_mb()
            rate, cpu_rate = read / te, read / ce
            alerts = rs.alerts(engine.db, PLATFORM, limit=10_000)
            by_rule: dict[str, int] = {}
            for a in alerts:
                by_rule[a["rule"]] = by_rule.get(a["rule"], 0) + 1
            print(
                f"[{store}] engine catch-up, all rules, batch {args.batch:,}: {read:,} records in "
                f"{te:.2f} s = {rate:,.0f} records/s (CPU {ce:.2f} s = {cpu_rate:,.0f}/s); "
                f"{rate / base_rate:.2f} x the baseline (CPU {cpu_rate / base_cpu:.2f} x), "
                f"{rate / floor_rate:.2f} x the floor (CPU {cpu_rate / floor_cpu:.2f} x); of "
                f"which the scheduled W17 full-chain verification {verify[0]:.2f} s; without it "
                f"{read / (te - verify[0]):,.0f} records/s",
                flush=True,
            )
            print(f"[{store}] alerts: {dict(sorted(by_rule.items()))}", flush=True)
            print(
                f"[{store}] memory: peak RSS {rss0:,.0f} MB before the engine, {rss1:,.0f} MB "
                f"after; stored rule state {state_bytes(engine) / 1024:,.0f} KiB",
                flush=True,
            )
            if args.restart_check:
                dump = engine.dump(PLATFORM)
                head = service.head(PLATFORM)[0]
                engine.rebuild(PLATFORM)
                assert engine.dump(PLATFORM) == dump, "rebuild differs"
                # a restart half-way: one engine reads half the log, a new one resumes
                engine.reset(PLATFORM)
                first = RiskEngine(service, clock_ms=clock, batch_size=args.batch)
                while first.status(PLATFORM)["position"] < size // 2:
                    first.run_once(PLATFORM)
                RiskEngine(service, clock_ms=clock, batch_size=args.batch).catch_up(PLATFORM)
                assert engine.dump(PLATFORM) == dump, "a restart half-way differs"
                assert service.head(PLATFORM)[0] == head, "alerts raised twice"
                print(
                    f"[{store}] rebuild and restart half-way: same read model ({len(dump):,} "
                    "rows), nothing raised twice",
                    flush=True,
                )
        finally:
            service.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--customers", type=int, default=1_000)
    ap.add_argument("--transfers", type=int, default=100_000)
    ap.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    ap.add_argument("--span-hours", type=int, default=72)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--no-restart-check", dest="restart_check", action="store_false")
    args = ap.parse_args()
    for store in ("sqlite", "postgres") if args.store == "both" else (args.store,):
        run(store, args)


if __name__ == "__main__":
    main()

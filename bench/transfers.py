"""Benchmark: durable, controlled, hash-chained transfers through LedgerService, in process.

What is measured (BRIEF §9, first row):

  ledger (batched)  `LedgerService.execute(platform, commands, actor)` with --batch transfers per
                    call; every call is ONE database transaction. Each transfer is validated,
                    fingerprinted, checked for replay, planned, run through every control,
                    turned into one canonical record, SHA-256 chained, folded into the live state
                    and committed durably (SQLite WAL with synchronous=FULL, or PostgreSQL with
                    its default synchronous_commit=on) before the call returns.
  baseline          In the SAME process and on the same workload: a plain SQLite double-entry
                    table (WAL, synchronous=FULL). Per transfer: a guarded debit
                    `UPDATE accounts SET balance=balance-? WHERE id=? AND balance>=?`, a credit
                    UPDATE and one INSERT into `transfers`; --batch transfers per transaction.
                    The printed ratio is ledger/baseline, both measured in this run.
  group commit      (--group) K threads (--threads, default 32) each loop on
                    `service.submit(platform, [one Transfer], actor).result()`; the platform's
                    committer thread folds whatever is waiting into one transaction. Reports
                    transfers/s and p50/p99 latency of one submit-to-result round trip.

Workload: --accounts customer accounts (CNY) opened and each seeded with 1,000,000 minor units by
a deposit from an omnibus mirror account (not timed); then --transfers transfers between random
distinct pairs (seeded RNG, amounts 1..1000). Commands are built before the clock starts; the
clock covers only execute()/submit() (or the baseline's SQL) including every commit. Refusals
(insufficient funds) are counted; with this seeding there should be none.

Every run uses a fresh database (a temp folder for SQLite, a fresh schema for PostgreSQL, dropped
afterwards) and is verified afterwards; any mismatch exits non-zero. Checks: outcome counts;
balances equal an independent shadow model of the accepted transfers; per-currency posted debits
== credits; no non-negative account below zero; stored record count == the state's position; and
for the ledger, a fresh LedgerService reloads the log (re-chaining every record) to the same
balances.

Examples:
  python bench/transfers.py                        # SQLite + baseline, 100,000 transfers
  python bench/transfers.py --store both --repeat 3
  python bench/transfers.py --group --threads 32 --group-transfers 20000
  python bench/transfers.py --store postgres --json
PostgreSQL settings come from the usual POSTGRES_* variables (defaults 127.0.0.1:5432, user
postgres, database `test`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import os
import platform as pyplatform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controls.policy import Policy  # noqa: E402
from ledger import commands as c  # noqa: E402
from ledger.config import Config  # noqa: E402
from ledger.service import LedgerService  # noqa: E402

PLATFORM = "bench"
ACTOR = "platform:bench"
CCY = "CNY"
OMNIBUS = "omni"
SEED_MINOR = 1_000_000
SEED_BATCH = 1_000


class VerificationFailed(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise VerificationFailed(what)


# -- workload ------------------------------------------------------------------------------------


def make_workload(n: int, accounts: int, seed: int) -> list[tuple[int, int, int]]:
    """(debit index, credit index, amount) for n transfers between random distinct accounts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(accounts)
        b = rng.randrange(accounts - 1)
        if b >= a:
            b += 1
        out.append((a, b, rng.randint(1, 1000)))
    return out


def account_id(i: int) -> str:
    return f"c{i:05d}"


def transfer_cmds(work: list[tuple[int, int, int]], prefix: str) -> list[c.Transfer]:
    return [
        c.Transfer(
            client_id=f"{prefix}{i}",
            from_account_id=account_id(a),
            to_account_id=account_id(b),
            amount_minor=amt,
            currency=CCY,
        )
        for i, (a, b, amt) in enumerate(work)
    ]


class Shadow:
    """An independent model of the customer balances, to check the system under test against."""

    def __init__(self, accounts: int) -> None:
        self.balance = [SEED_MINOR] * accounts

    def apply(self, a: int, b: int, amt: int, accepted: bool) -> None:
        if accepted:
            check(self.balance[a] >= amt, f"accepted transfer overdraws account {a}")
            self.balance[a] -= amt
            self.balance[b] += amt
        else:
            check(self.balance[a] < amt, f"refused a transfer that account {a} could pay")


# -- stores --------------------------------------------------------------------------------------


def pg_settings() -> dict[str, str]:
    env = os.environ
    return {
        "POSTGRES_HOST": env.get("POSTGRES_HOST", "127.0.0.1"),
        "POSTGRES_PORT": env.get("POSTGRES_PORT", "5432"),
        "POSTGRES_USER": env.get("POSTGRES_USER", "postgres"),
        "POSTGRES_PASSWORD": env.get("POSTGRES_PASSWORD", ""),
        "POSTGRES_DBNAME": env.get("POSTGRES_DBNAME", "test"),
    }


def pg_connect() -> Any:
    import psycopg

    s = pg_settings()
    return psycopg.connect(
        host=s["POSTGRES_HOST"],
        port=int(s["POSTGRES_PORT"]),
        user=s["POSTGRES_USER"],
        password=s["POSTGRES_PASSWORD"] or None,
        dbname=s["POSTGRES_DBNAME"],
        autocommit=True,
    )


@contextmanager
def fresh_config(store: str) -> Iterator[Config]:
    """A Config on a fresh temp folder (and, for PostgreSQL, a fresh schema), removed after."""
    tmp = tempfile.mkdtemp(prefix="custody-bench-")
    env = {"CUSTODY_DATA_DIR": tmp, "CUSTODY_STORE": store}
    schema = None
    try:
        if store == "postgres":
            schema = f"bench_{uuid.uuid4().hex[:12]}"
            with pg_connect() as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            env.update(pg_settings())
            env["POSTGRES_SCHEMA"] = schema
        yield Config.from_env(env)
    finally:
        if schema is not None:
            with pg_connect() as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        shutil.rmtree(tmp, ignore_errors=True)


def stored_count(cfg: Config) -> int:
    stream = f"log:{PLATFORM}"
    if cfg.store == "postgres":
        schema = cfg.postgres["POSTGRES_SCHEMA"]
        with pg_connect() as conn:
            row = conn.execute(
                f'SELECT count(*) FROM "{schema}".custody_events WHERE originator_id = %s',
                (stream,),
            ).fetchone()
    else:
        conn = sqlite3.connect(cfg.sqlite_path)
        try:
            row = conn.execute(
                "SELECT count(*) FROM stored_events WHERE originator_id = ?", (stream,)
            ).fetchone()
        finally:
            conn.close()
    return int(row[0])


def sqlite_synchronous(svc: LedgerService) -> str:
    """The synchronous level of the ledger's own SQLite writer connection (2 = FULL)."""
    ds = svc.store.recorder.datastore
    with ds.transaction(commit=False) as cur:
        cur.execute("PRAGMA synchronous")
        sync = cur.fetchone()[0]
        cur.execute("PRAGMA journal_mode")
        mode = cur.fetchone()[0]
    return f"journal_mode={mode} synchronous={sync}"


# -- ledger runs ---------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    transfers: int
    seconds: float
    accepted: int
    refused: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.transfers / self.seconds


# Every control runs; the ones that need per-customer setup (a signature on each debit, a bound
# payee) or would stop a synthetic load (daily limits, the approval threshold) are relaxed.
# bench/controls.py measures the strict default policy with signatures separately.
BENCH_POLICY = Policy(
    require_customer_signature=0,
    require_bound_payee=0,
    limits={},
    outflow_cap_bp=0,
    approval_above_minor=0,
)


def seed_ledger(svc: LedgerService, accounts: int) -> None:
    out = svc.create_platform(PLATFORM, "Benchmark platform", "operator:bench", BENCH_POLICY)
    check(out.status == "accepted", f"create_platform: {out}")
    setup: list[c.Command] = [
        c.OpenAccount(client_id="open-omni", account_id=OMNIBUS, kind="omnibus", currency=CCY)
    ]
    for i in range(accounts):
        setup.append(
            c.OpenAccount(
                client_id=f"open-{i}",
                account_id=account_id(i),
                kind="customer",
                currency=CCY,
                role="lender",
            )
        )
    for i in range(accounts):
        setup.append(
            c.Deposit(
                client_id=f"seed-{i}",
                mirror_account_id=OMNIBUS,
                account_id=account_id(i),
                amount_minor=SEED_MINOR,
                currency=CCY,
            )
        )
    for start in range(0, len(setup), SEED_BATCH):
        for o in svc.execute(PLATFORM, setup[start : start + SEED_BATCH], ACTOR):
            check(o.status == "accepted", f"seeding: {o}")


def ledger_balances(svc: LedgerService) -> tuple[dict[str, int], int, dict[str, list[int]]]:
    with svc.reading(PLATFORM) as st:
        bal = {a.id: a.posted_minor for a in st.accounts.values()}
        negative = [
            a.id for a in st.accounts.values() if a.must_not_go_negative and a.available_minor < 0
        ]
        check(not negative, f"accounts below zero: {negative[:5]}")
        totals = {k: list(v) for k, v in st.totals_by_currency.items()}
        return bal, st.next_seq, totals


def verify_ledger(
    svc: LedgerService,
    cfg: Config,
    accounts: int,
    work: list[tuple[int, int, int]],
    outcomes: list[Any],
    reload: bool,
) -> dict[str, Any]:
    check(len(outcomes) == len(work), "one outcome per transfer")
    bad = [o for o in outcomes if o is None or o.status not in ("accepted", "refused")]
    check(not bad, f"unexpected outcomes: {bad[:3]}")
    # replay the transfers in the order the ledger recorded them (callers may interleave)
    order = sorted(range(len(work)), key=lambda i: outcomes[i].seq)
    seqs = [outcomes[i].seq for i in order]
    check(len(set(seqs)) == len(seqs), "two transfers share a record position")
    shadow = Shadow(accounts)
    for i in order:
        a, b, amt = work[i]
        shadow.apply(a, b, amt, outcomes[i].status == "accepted")
    bal, next_seq, totals = ledger_balances(svc)
    for ccy, (debits, credits) in totals.items():
        check(debits == credits, f"{ccy}: posted debits {debits} != credits {credits}")
    for i in range(accounts):
        got = bal[account_id(i)]
        check(got == shadow.balance[i], f"{account_id(i)}: {got} != expected {shadow.balance[i]}")
    check(bal[OMNIBUS] == accounts * SEED_MINOR, "omnibus mirror != customer money")
    check(sum(bal[account_id(i)] for i in range(accounts)) == accounts * SEED_MINOR, "money sum")
    # records: create platform, open omnibus, open + deposit per account, one per transfer
    expected_records = 2 + 2 * accounts + len(work)
    check(next_seq == expected_records, f"state position {next_seq} != {expected_records}")
    stored = stored_count(cfg)
    check(stored == expected_records, f"stored records {stored} != {expected_records}")
    info: dict[str, Any] = {"records": stored}
    if reload:
        t0 = time.perf_counter()
        svc2 = LedgerService(cfg)
        try:
            svc2.start()  # replays and re-chains every stored record
            info["reload_s"] = round(time.perf_counter() - t0, 3)
            bal2, next2, _ = ledger_balances(svc2)
        finally:
            svc2.close()
        check(next2 == next_seq and bal2 == bal, "reloaded state differs from live state")
    return info


def run_ledger_batched(
    store: str,
    accounts: int,
    work: list[tuple[int, int, int]],
    batch: int,
    reload: bool,
    clients: int = 1,
    api: str = "execute",
) -> Result:
    """Batches of `batch` transfers; `clients` threads take turns (batch k goes to k % clients)."""
    with fresh_config(store) as cfg:
        svc = LedgerService(cfg)
        svc.start()
        try:
            seed_ledger(svc, accounts)
            cmds = transfer_cmds(work, "t")
            starts = list(range(0, len(cmds), batch))
            outcomes: list[Any] = [None] * len(cmds)
            errors: list[BaseException] = []

            def client(k: int) -> None:
                try:
                    for start in starts[k::clients]:
                        chunk = cmds[start : start + batch]
                        if api == "execute":
                            answer = svc.execute(PLATFORM, chunk, ACTOR)
                        else:
                            answer = svc.submit(PLATFORM, chunk, ACTOR).result()
                        outcomes[start : start + batch] = answer
                except BaseException as exc:  # reported after the run
                    errors.append(exc)

            gc.collect()  # start clean: garbage of earlier runs in this process is not ours
            if clients == 1:
                c0, t0 = time.process_time(), time.perf_counter()
                client(0)
            else:
                pool = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
                c0, t0 = time.process_time(), time.perf_counter()
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - c0
            if errors:
                raise errors[0]
            extra = verify_ledger(svc, cfg, accounts, work, outcomes, reload)
            extra["cpu_us"] = round(1e6 * cpu / len(work), 2)
            if store == "sqlite":
                extra["sqlite"] = sqlite_synchronous(svc)
            if clients != 1 or api != "execute":
                extra["clients"] = clients
                extra["api"] = api
        finally:
            svc.close()
    return Result(
        f"ledger-{store}",
        len(work),
        seconds,
        sum(o.status == "accepted" for o in outcomes),
        sum(o.status == "refused" for o in outcomes),
        extra,
    )


def count_commits(svc: LedgerService) -> list[int]:
    """Count the store's append calls (= database transactions) from here on; [count]."""
    counter = [0]
    append = svc.store.append

    def counting_append(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return append(*args, **kwargs)

    svc.store.append = counting_append  # type: ignore[method-assign]
    return counter


def run_ledger_group(
    store: str, accounts: int, work: list[tuple[int, int, int]], threads: int, reload: bool
) -> Result:
    with fresh_config(store) as cfg:
        svc = LedgerService(cfg)
        svc.start()
        try:
            seed_ledger(svc, accounts)
            cmds = transfer_cmds(work, "g")
            # thread k takes transfers k, k+threads, ...; statuses land at their index
            outcomes: list[Any] = [None] * len(cmds)
            commits = count_commits(svc)
            latencies: list[list[float]] = [[] for _ in range(threads)]
            errors: list[BaseException] = []
            barrier = threading.Barrier(threads + 1)

            def client(k: int) -> None:
                lat = latencies[k]
                submit = svc.submit
                clock = time.perf_counter
                barrier.wait()
                try:
                    for i in range(k, len(cmds), threads):
                        t = clock()
                        [outcome] = submit(PLATFORM, [cmds[i]], ACTOR).result()
                        lat.append(clock() - t)
                        outcomes[i] = outcome
                except BaseException as exc:  # reported after the join
                    errors.append(exc)

            pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
            for t in pool:
                t.start()
            gc.collect()
            barrier.wait()
            c0, t0 = time.process_time(), time.perf_counter()
            for t in pool:
                t.join()
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - c0
            if errors:
                raise errors[0]
            n_commits = commits[0]
            extra = verify_ledger(svc, cfg, accounts, work, outcomes, reload)
            extra["cpu_us"] = round(1e6 * cpu / len(work), 2)
            extra["commits"] = n_commits
            extra["avg_group"] = round(len(work) / max(1, n_commits), 1)
        finally:
            svc.close()
    lat_all = sorted(x for lat in latencies for x in lat)
    extra["threads"] = threads
    extra["p50_ms"] = round(1000 * lat_all[len(lat_all) // 2], 3)
    extra["p99_ms"] = round(1000 * lat_all[min(len(lat_all) - 1, int(len(lat_all) * 0.99))], 3)
    extra["max_ms"] = round(1000 * lat_all[-1], 3)
    return Result(
        f"group-{store}",
        len(work),
        seconds,
        sum(o.status == "accepted" for o in outcomes),
        sum(o.status == "refused" for o in outcomes),
        extra,
    )


# -- baseline ------------------------------------------------------------------------------------


def run_baseline(accounts: int, work: list[tuple[int, int, int]], batch: int) -> Result:
    tmp = tempfile.mkdtemp(prefix="custody-baseline-")
    try:
        con = sqlite3.connect(os.path.join(tmp, "baseline.sqlite3"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        con.execute(
            "CREATE TABLE transfers (id INTEGER PRIMARY KEY, debit INTEGER NOT NULL,"
            " credit INTEGER NOT NULL, amount INTEGER NOT NULL)"
        )
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO accounts (id, balance) VALUES (?, ?)",
            [(i, SEED_MINOR) for i in range(accounts)],
        )
        con.execute("COMMIT")
        sync = con.execute("PRAGMA synchronous").fetchone()[0]
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
        cur = con.cursor()
        debit_sql = "UPDATE accounts SET balance = balance - ? WHERE id = ? AND balance >= ?"
        credit_sql = "UPDATE accounts SET balance = balance + ? WHERE id = ?"
        insert_sql = "INSERT INTO transfers (debit, credit, amount) VALUES (?, ?, ?)"
        statuses: list[str] = []
        append = statuses.append
        execute = cur.execute
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, len(work), batch):
            execute("BEGIN")
            for a, b, amt in work[start : start + batch]:
                if execute(debit_sql, (amt, a, amt)).rowcount == 1:
                    execute(credit_sql, (amt, b))
                    execute(insert_sql, (a, b, amt))
                    append("accepted")
                else:
                    append("refused")
            execute("COMMIT")
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        shadow = Shadow(accounts)
        for (a, b, amt), status in zip(work, statuses, strict=True):
            shadow.apply(a, b, amt, status == "accepted")
        rows = dict(con.execute("SELECT id, balance FROM accounts").fetchall())
        check(rows == dict(enumerate(shadow.balance)), "baseline balances differ from shadow")
        check(min(rows.values()) >= 0, "baseline: negative balance")
        n = con.execute("SELECT count(*) FROM transfers").fetchone()[0]
        check(n == statuses.count("accepted"), "baseline: transfer rows != accepted")
        con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Result(
        "baseline-sqlite",
        len(work),
        seconds,
        statuses.count("accepted"),
        statuses.count("refused"),
        {
            "cpu_us": round(1e6 * cpu / len(work), 2),
            "sqlite": f"journal_mode={mode} synchronous={sync}",
        },
    )


# -- driver --------------------------------------------------------------------------------------


def code_version() -> str:
    """The git commit plus a digest of ledger/ and controls/ as they are on disk right now."""
    digest = hashlib.sha256()
    for folder in ("ledger", "controls"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            head = (ROOT / ".git" / head[5:]).read_text().strip()
    except OSError:
        head = "unknown"
    return f"{head[:10]}+src:{digest.hexdigest()[:10]}"


def contention() -> str:
    """Load average and CPU pressure (share of time runnable tasks waited for a CPU)."""
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "?"
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0].split()
        psi = some[1].split("=")[1] + "%"
    except (OSError, IndexError):
        psi = "?"
    return f"load={load} cpu_pressure10s={psi}"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": pyplatform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": pyplatform.platform(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--transfers", type=int, default=100_000, help="transfers per batched run")
    p.add_argument("--accounts", type=int, default=1_000, help="customer accounts")
    p.add_argument("--batch", type=int, default=1_000, help="transfers per transaction")
    p.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    p.add_argument("--repeat", type=int, default=1, help="runs of each; the median is reported")
    p.add_argument("--seed", type=int, default=42, help="RNG seed of the workload")
    p.add_argument(
        "--clients",
        type=int,
        default=1,
        help="threads issuing the batches (default 1: one caller, batches back to back)",
    )
    p.add_argument(
        "--api",
        choices=("execute", "submit"),
        default="execute",
        help="batched path: execute() (default) or submit(batch).result() (group committer)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the plain SQLite baseline")
    p.add_argument("--no-reload", action="store_true", help="skip the reload check (faster)")
    p.add_argument("--group", action="store_true", help="also measure the group-commit path")
    p.add_argument("--group-only", action="store_true", help="only the group-commit path")
    p.add_argument("--threads", type=int, default=32, help="client threads for --group")
    p.add_argument("--group-transfers", type=int, default=20_000, help="transfers for --group")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = p.parse_args(argv)
    if args.accounts < 2 or args.transfers < 1 or args.batch < 1 or args.repeat < 1:
        p.error("need --accounts >= 2, --transfers >= 1, --batch >= 1, --repeat >= 1")
    if args.batch > c.MAX_BATCH_COMMANDS:
        p.error(f"--batch is at most {c.MAX_BATCH_COMMANDS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    say: Callable[[str], None] = (lambda s: None) if args.json else print
    runs: dict[str, list[Result]] = {}
    batched = not args.group_only
    work = make_workload(args.transfers, args.accounts, args.seed) if batched else []
    gwork = (
        make_workload(args.group_transfers, args.accounts, args.seed + 1)
        if args.group or args.group_only
        else []
    )
    say(
        f"{dt.datetime.now().isoformat(timespec='seconds')}  cpus={os.cpu_count()}  "
        f"python {pyplatform.python_version()}  sqlite {sqlite3.sqlite_version}  "
        f"code {code_version()}"
    )
    say(
        f"accounts={args.accounts} transfers={args.transfers} batch={args.batch} "
        f"repeat={args.repeat} seed={args.seed}"
    )
    try:
        for rep in range(args.repeat):
            jobs: list[tuple[str, Callable[[], Result]]] = []
            if batched:
                for s in stores:
                    jobs.append(
                        (
                            f"ledger-{s}",
                            lambda s=s: run_ledger_batched(
                                s,
                                args.accounts,
                                work,
                                args.batch,
                                not args.no_reload,
                                args.clients,
                                args.api,
                            ),
                        )
                    )
                if not args.no_baseline:
                    jobs.append(
                        ("baseline-sqlite", lambda: run_baseline(args.accounts, work, args.batch))
                    )
            if gwork:
                for s in stores:
                    jobs.append(
                        (
                            f"group-{s}",
                            lambda s=s: run_ledger_group(
                                s, args.accounts, gwork, args.threads, not args.no_reload
                            ),
                        )
                    )
            for name, job in jobs:
                before = contention()
                r = job()
                r.extra["contention"] = f"{before} -> {contention()}"
                runs.setdefault(name, []).append(r)
                extra = " ".join(f"{k}={v}" for k, v in r.extra.items())
                say(
                    f"  run {rep + 1}/{args.repeat} {name:16s} {r.tps:>10,.0f} transfers/s  "
                    f"({r.seconds:.2f} s, accepted {r.accepted}, refused {r.refused}) {extra}"
                )
    except VerificationFailed as exc:
        print(f"VERIFICATION FAILED: {exc}", file=sys.stderr)
        return 2

    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        tps = [r.tps for r in rs]
        entry: dict[str, Any] = {
            "median_tps": round(statistics.median(tps)),
            "runs_tps": [round(x) for x in tps],
            "refused": [r.refused for r in rs],
            "cpu_us": statistics.median(r.extra["cpu_us"] for r in rs),
        }
        if name.startswith("group-"):
            entry["p50_ms"] = statistics.median(r.extra["p50_ms"] for r in rs)
            entry["p99_ms"] = statistics.median(r.extra["p99_ms"] for r in rs)
            entry["threads"] = args.threads
        summary[name] = entry
    base = runs.get("baseline-sqlite")
    ratios: dict[str, float] = {}
    if base:
        for s in stores:
            led = runs.get(f"ledger-{s}")
            if led:
                # per-repeat ratios (same moment, same load), then their median
                ratios[f"ledger-{s}/baseline-sqlite"] = round(
                    statistics.median(lr.tps / br.tps for lr, br in zip(led, base, strict=True)),
                    3,
                )
    targets = {"ledger-sqlite": 100_000, "ledger-postgres": 30_000, "group-sqlite": 5_000}

    if args.json:
        doc = {
            "benchmark": "transfers",
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "code": code_version(),
            "params": {k: v for k, v in vars(args).items() if k != "json"},
            "summary": summary,
            "ratios": ratios,
            "targets": {k: v for k, v in targets.items() if k in summary},
            "runs": {k: [asdict(r) | {"tps": round(r.tps)} for r in v] for k, v in runs.items()},
        }
        print(json.dumps(doc, indent=2))
        return 0
    print("median:")
    for name, entry in summary.items():
        target = targets.get(name)
        line = f"  {name:16s} {entry['median_tps']:>10,} transfers/s  cpu {entry['cpu_us']:6.2f} µs"
        if "p99_ms" in entry:
            line += f"  p50 {entry['p50_ms']:.2f} ms  p99 {entry['p99_ms']:.2f} ms"
        if target:
            verdict = "meets" if entry["median_tps"] >= target else "BELOW"
            line += f"  ({verdict} target {target:,}/s)"
        print(line)
    for k, v in ratios.items():
        print(f"  ratio {k} = {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

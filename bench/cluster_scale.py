"""Throughput with 1, 2 and 3 `custody serve` processes on one PostgreSQL schema, in one run, with
the ratio against the 1-server figure of the same run.

Write leases give a platform to the first server that asks, and nothing moves them afterwards
(a server started first takes every platform that exists). So each variant starts its servers
on an EMPTY schema and creates its platforms through them in turn (platform k through server
k mod N, over gRPC as an operator): a server that creates a platform holds its lease, so each
server writes `--platforms / N` of them. The script prints which server writes which platform.

Load: client PROCESSES (multiprocessing, spawn), one thread per platform, each a loop of
SubmitBatch RPCs of `--batch` transfers between random customer accounts of that platform,
sent straight to the platform's writer (mutual TLS, platform certificates of a dev PKI).
Throughput counts the transfers of the calls that complete inside the measured window.
Checks after each variant (exit 2 on failure): every transfer accepted, each platform's log
holds exactly setup + transfers records, and each chain verifies.

    /work/venv/bin/python bench/cluster_scale.py [--platforms 6] [--seconds 15] [--batch 1000]

Needs PostgreSQL at 127.0.0.1:5432 (database `test`, user postgres, trust); each variant uses a
fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CCY = "CNY"
FUNDS = 10**12


def account(i: int) -> str:
    return f"c{i:04d}"


def _client_process(spec: dict[str, Any], results: Any) -> None:
    """One client process: a thread per platform, SubmitBatch in a loop until the stop time."""
    import grpc

    from ledger.api.pb import common_pb, movement_grpc, movement_pb

    out: dict[str, dict[str, int]] = {}

    def run(platform: str, address: str) -> None:
        pki = Path(spec["pki"])
        creds = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / f"platform-{platform}.key").read_bytes(),
            (pki / f"platform-{platform}.pem").read_bytes(),
        )
        rng = random.Random(f"{spec['seed']}-{platform}")
        stats = {"window": 0, "accepted": 0, "calls": 0, "errors": 0, "refused": 0}
        with grpc.secure_channel(address, creds) as channel:
            stub = movement_grpc.MovementServiceStub(channel)
            n = 0
            n_acc = spec["accounts"]
            while time.time() < spec["t_stop"]:
                items = []
                for _ in range(spec["batch"]):
                    a = rng.randrange(n_acc)
                    b = (a + 1 + rng.randrange(n_acc - 1)) % n_acc
                    items.append(
                        common_pb.Instruction(
                            transfer=common_pb.Transfer(
                                client_id=f"{platform}-{n}",
                                from_account_id=account(a),
                                to_account_id=account(b),
                                amount_minor=rng.randint(1, 100),
                                currency=CCY,
                            )
                        )
                    )
                    n += 1
                request = movement_pb.SubmitBatchRequest(platform_id=platform, instructions=items)
                try:
                    answer = stub.SubmitBatch(request, timeout=60)
                except grpc.RpcError:
                    stats["errors"] += 1
                    if stats["errors"] > 5:
                        break
                    continue
                done = time.time()
                stats["calls"] += 1
                accepted = sum(1 for r in answer.results if r.status == 1)
                stats["accepted"] += accepted
                stats["refused"] += len(items) - accepted
                if spec["t_start"] <= done <= spec["t_stop"]:
                    stats["window"] += accepted
        out[platform] = stats

    threads = [threading.Thread(target=run, args=(p, addr)) for p, addr in spec["targets"].items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(out)


def _setup(
    cluster: Any,
    pki: Path,
    platforms: list[str],
    accounts: int,
    home: dict[str, str],
    stores: dict[str, Any],
) -> dict[str, str]:
    """Create each platform through the server `home[platform]` (it takes the lease), open and
    fund its accounts. Returns platform -> the address of its writer (read back from the
    writers table of the platform's store)."""
    from helpers import BOOKKEEPING_POLICY

    from ledger.api.client import CustodyClient, instruction

    writers: dict[str, str] = {}
    for platform in platforms:
        with CustodyClient.mtls(
            home[platform], pki / "ca.pem", pki / "operator-dev.pem", pki / "operator-dev.key"
        ) as op:
            op.create_platform(platform, f"Bench {platform}", policy=BOOKKEEPING_POLICY)
        with CustodyClient.mtls(
            home[platform],
            pki / "ca.pem",
            pki / f"platform-{platform}.pem",
            pki / f"platform-{platform}.key",
            platform_id=platform,
        ) as client:
            items = [
                instruction(
                    "open_account",
                    client_id="open:omni",
                    account_id="omni",
                    kind="omnibus",
                    currency=CCY,
                )
            ]
            for i in range(accounts):
                items.append(
                    instruction(
                        "open_account",
                        client_id=f"open:{account(i)}",
                        account_id=account(i),
                        kind="customer",
                        currency=CCY,
                        role="lender",
                    )
                )
            for i in range(accounts):
                items.append(
                    instruction(
                        "deposit",
                        client_id=f"fund:{account(i)}",
                        mirror_account_id="omni",
                        account_id=account(i),
                        amount_minor=FUNDS,
                        currency=CCY,
                    )
                )
            results = client.submit_batch(items)
            assert all(r.status == "accepted" for r in results), results[:3]
        info = cluster.writer(platform, stores[platform])
        assert info is not None, platform
        writers[platform] = info.address
    return writers


SECOND_DB = "custody_bench2"


def _pg(dbname: str, statement: str) -> None:
    import psycopg

    conninfo = f"host=127.0.0.1 port=5432 user=postgres dbname={dbname} connect_timeout=5"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(statement)


def _second_database(schema: str) -> None:
    """`custody_bench2` on the same instance (created if missing), with a fresh schema."""
    import psycopg
    from helpers import pg_execute

    if not pg_execute("SELECT 1 FROM pg_database WHERE datname = %s", (SECOND_DB,)):
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # made meanwhile
            pg_execute(f"CREATE DATABASE {SECOND_DB}")
    _pg(SECOND_DB, f"CREATE SCHEMA {schema}")


def run_variant(
    args: argparse.Namespace, servers: int, tmp: Path, two_databases: bool = False
) -> dict[str, Any]:
    """One measurement: `servers` servers on one schema, or (two_databases) two servers each
    serving one of two databases through a placement file, platforms alternating."""
    from helpers import pg_env
    from serve_harness import ServeCluster, base_env, free_port, make_pki

    from ledger.config import Config
    from ledger.store import LedgerStore, log_stream
    from ledger.writer import verify_stored_chain

    assert not two_databases or servers == 2
    platforms = [f"b{i + 1}" for i in range(args.platforms)]
    tmp.mkdir(parents=True)
    with pg_env(tmp) as store_env:
        env = base_env(store_env, tmp.parent / "shared", 1000)
        env["CUSTODY_CHECKPOINT_EVERY"] = "0"  # the throughput of writing, not of signing
        ports = [free_port() for _ in range(servers)]
        addresses = [f"127.0.0.1:{port}" for port in ports]
        slot_env: list[dict[str, str]] = [{} for _ in ports]
        schema = store_env["POSTGRES_SCHEMA"]
        extra: list[LedgerStore] = []
        if two_databases:
            _second_database(schema)
            placement = {
                "version": 1,
                "default_store": "a",
                "stores": {
                    "a": {
                        "postgres": {"POSTGRES_DBNAME": "test", "POSTGRES_SCHEMA": schema},
                        "servers": [addresses[0]],
                    },
                    "b": {
                        "postgres": {"POSTGRES_DBNAME": SECOND_DB, "POSTGRES_SCHEMA": schema},
                        "servers": [addresses[1]],
                    },
                },
                "platforms": {p: "ab"[k % 2] for k, p in enumerate(platforms)},
            }
            path = tmp / "placement.json"
            path.write_text(json.dumps(placement))
            env["CUSTODY_PLACEMENT"] = str(path)
            slot_env = [{"CUSTODY_STORE_NAME": "a"}, {"CUSTODY_STORE_NAME": "b"}]
            config = Config.from_env({**env, **slot_env[0]})
        else:
            config = Config.from_env(env)
        pki = make_pki(tmp.parent / "pki", platforms)
        cluster = ServeCluster(env, config, tmp, pki, ports=ports, slot_env=slot_env)
        try:
            stores: dict[str, Any] = {p: cluster.store for p in platforms}
            if two_databases:
                second = LedgerStore(config.for_store("b"))
                extra.append(second)
                stores.update({p: second for k, p in enumerate(platforms) if k % 2})
            cluster.start()
            home = {p: addresses[k % servers] for k, p in enumerate(platforms)}
            writers = _setup(cluster, pki, platforms, args.accounts, home, stores)
            by_server: dict[str, list[str]] = {}
            for p, addr in writers.items():
                by_server.setdefault(addr, []).append(p)
            heads = {p: stores[p].last_row(log_stream(p)) for p in platforms}
            t_start = time.time() + 2.0 + args.warmup
            t_stop = t_start + args.seconds
            procs_n = min(args.client_procs, len(platforms))
            results: Any = mp.get_context("spawn").Queue()
            procs = []
            for i in range(procs_n):
                mine = platforms[i::procs_n]
                spec = {
                    "pki": str(pki),
                    "targets": {p: writers[p] for p in mine},
                    "batch": args.batch,
                    "accounts": args.accounts,
                    "t_start": t_start,
                    "t_stop": t_stop,
                    "seed": args.seed,
                }
                proc = mp.get_context("spawn").Process(target=_client_process, args=(spec, results))
                proc.start()
                procs.append(proc)
            stats: dict[str, dict[str, int]] = {}
            for _ in procs:
                stats.update(results.get(timeout=args.seconds + args.warmup + 300))
            for proc in procs:
                proc.join(60)
            load = os.getloadavg()
            cluster.stop()
            problems = []
            for p in platforms:
                s = stats[p]
                if s["errors"] or s["refused"]:
                    problems.append(f"{p}: {s}")
                before = heads[p]
                assert before is not None
                last = stores[p].last_row(log_stream(p))
                assert last is not None
                if last[0] - before[0] != s["accepted"]:
                    problems.append(f"{p}: {last[0] - before[0]} records for {s['accepted']}")
                _, bad, why = verify_stored_chain(stores[p], p)
                if bad is not None:
                    problems.append(f"{p}: chain broken at {bad}: {why}")
        finally:
            cluster.close()
            for store in extra:
                store.close()
            if two_databases:
                _pg(SECOND_DB, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    total = sum(s["window"] for s in stats.values())
    return {
        "servers": servers,
        "variant": "2 databases" if two_databases else "1 database",
        "rate": total / args.seconds,
        "by_server": {a: sorted(ps) for a, ps in sorted(by_server.items())},
        "per_server_rate": {
            a: sum(stats[p]["window"] for p in ps) / args.seconds for a, ps in by_server.items()
        },
        "load": load,
        "problems": problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--servers",
        default="1,2,3",
        help="variants in run order, comma-separated (repeats ok; 2db = two servers, two "
        "databases)",
    )
    parser.add_argument(
        "--two-databases",
        action="store_true",
        help="after every 2-server run, also run 2 servers each serving its own database "
        "(placement: platforms alternate between `test` and `custody_bench2`)",
    )
    parser.add_argument("--platforms", type=int, default=6)
    parser.add_argument("--accounts", type=int, default=50, help="customers per platform")
    parser.add_argument("--batch", type=int, default=1000, help="transfers per SubmitBatch")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    variants: list[str] = []
    for token in args.servers.split(","):
        variants.append(token)
        if args.two_databases and token == "2":
            variants.append("2db")
    for token in variants:
        assert token == "2db" or 1 <= int(token) <= 8, token
    assert args.platforms >= max(2 if t == "2db" else int(t) for t in variants)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, token in enumerate(variants):
            n = 2 if token == "2db" else int(token)
            result = run_variant(args, n, Path(tmp) / f"run{i}", two_databases=token == "2db")
            result["label"] = f"{n}, 2 databases" if token == "2db" else str(n)
            out.append(result)
            print(
                f"{result['label']} server(s): {result['rate']:,.0f} transfers/s (per server "
                f"{sorted(round(v) for v in result['per_server_rate'].values())})  writers "
                f"{result['by_server']}  load {result['load'][0]:.2f}"
                + (f"  PROBLEMS {result['problems']}" if result["problems"] else ""),
                flush=True,
            )
    rates: dict[str, list[float]] = {}
    for r in out:
        rates.setdefault(r["label"], []).append(r["rate"])
    mean = {label: sum(v) / len(v) for label, v in rates.items()}
    base = mean.get("1")
    print()
    print(
        f"platforms {args.platforms} x {args.accounts} customers, SubmitBatch of {args.batch}, "
        f"{args.client_procs} client processes, {args.seconds:.0f} s measured per run, one "
        f"PostgreSQL instance, order {','.join(variants)}"
    )
    print(f"{'servers':>18} {'transfers/s':>12} {'vs 1 server':>12}  runs")
    for label in sorted(mean):
        ratio = f"{mean[label] / base:.2f}" if base else "-"
        runs = ", ".join(f"{v:,.0f}" for v in rates[label])
        print(f"{label:>18} {mean[label]:>12,.0f} {ratio:>12}  {runs}")
    return 2 if any(r["problems"] for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())

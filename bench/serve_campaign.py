"""Failover campaign with real processes: three `custody serve` (mutual TLS, write leases) and two
`custody project run --follow` workers on one PostgreSQL schema, gRPC clients (CustodyClient,
SubmitBatch, retrying with the same client ids), the writer of a platform SIGKILLed again and
again (a fresh process replaces it on its port), and the projection worker holding the most
leases SIGKILLed every `--worker-kill-every` kills.

Prints kills survived, movements acknowledged vs found, duplicates (must be 0), acknowledged
outside its writer's epoch, overlapping writer stretches (from the servers' own logs), chains,
failover (kill -> the new writer's announce, from custody_writer_history) median/p90/max with a
breakdown of every slow one (the new writer's log: start of its process, its "serving" line,
its "writing platform" line), projection takeovers, and throughput in the `--window-s` after
each kill against the steady state of the same run.

    /work/venv/bin/python bench/serve_campaign.py --kills 20 [--gap-s 3] [--poll-ms 1000]

Needs PostgreSQL at 127.0.0.1:5432 (database `test`, user postgres, trust); uses a fresh schema
and drops it afterwards. Exits 1 if anything acknowledged is missing or duplicated, a chain
fails, or a projection differs from its rebuild.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
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

from helpers import pg_env  # noqa: E402
from serve_harness import (  # noqa: E402
    LoadClient,
    ServeCluster,
    _ts_ms,
    base_env,
    check_ledger,
    check_projections,
    make_pki,
    overlapping,
    prepare_platforms,
    throughput,
)

from ledger.config import Config  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def _explain(cluster: ServeCluster, kill: dict[str, Any], platform: str) -> str:
    """Where a takeover's time went, from the new writer's own log (ms after the kill)."""
    sid = kill["new_writer"][platform]
    proc = next(
        (s for s in [*cluster.servers.values(), *cluster.retired] if s.server_id == sid), None
    )
    if proc is None:
        return f"{platform}: new writer {sid} (no log)"
    at = kill["at_ms"]
    parts = [f"{platform} -> {sid}", f"process started {proc.started_ms - at:+d}"]
    for rec in proc.log():
        msg = str(rec.get("message", ""))
        if msg.startswith("serving custody.v1"):
            parts.append(f"serving {_ts_ms(rec['ts']) - at:+d}")
        elif msg.startswith(f"writing platform {platform} ") and _ts_ms(rec["ts"]) >= at:
            parts.append(f"writing {_ts_ms(rec['ts']) - at:+d}")
            break
    parts.append(f"announce {kill['failover_ms'][platform]:+d}")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--poll-ms", type=int, default=1000, help="CUSTODY_LEASE_POLL_MS")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--batch", type=int, default=10, help="transfers per SubmitBatch")
    parser.add_argument("--platforms", type=int, default=2)
    parser.add_argument("--gap-s", type=float, default=3.0, help="mean load time between kills")
    parser.add_argument("--window-s", type=float, default=3.0, help="'after a kill' window")
    parser.add_argument("--worker-kill-every", type=int, default=5)
    parser.add_argument("--slow-ms", type=int, default=2000, help="explain failovers above")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    platforms = [f"p{i + 1}" for i in range(args.platforms)]
    with tempfile.TemporaryDirectory() as tmp_name, pg_env(Path(tmp_name)) as store_env:
        tmp = Path(tmp_name)
        env = base_env(store_env, tmp / "shared", args.poll_ms)
        config = Config.from_env(env)
        prepare_platforms(config, platforms, funds=10**15)
        pki = make_pki(tmp / "pki", platforms)
        cluster = ServeCluster(env, config, tmp, pki, size=3)
        stop = threading.Event()
        clients: list[LoadClient] = []
        kills: list[dict[str, Any]] = []
        worker_kills: list[dict[str, Any]] = []
        started = time.monotonic()
        try:
            cluster.start()
            cluster.start_worker("w1")
            cluster.start_worker("w2")
            clients = [
                LoadClient(
                    f"c{i}",
                    cluster.addresses(),
                    pki,
                    platforms[i % len(platforms)],
                    args.batch,
                    stop,
                    seed=args.seed * 100 + i,
                )
                for i in range(args.clients)
            ]
            for client in clients:
                client.start()
            cluster.wait(lambda: all(c.stats.acks for c in clients), 60, "first acks")
            time.sleep(2.0)
            for k in range(args.kills):
                time.sleep(rng.uniform(0.5, 1.5) * args.gap_s)
                kills.append(cluster.kill_writer(rng.choice(platforms)))
                print(f"kill {k + 1}/{args.kills}: {kills[-1]}", flush=True)
                if args.worker_kill_every and (k + 1) % args.worker_kill_every == 0:
                    worker_kills.append(cluster.kill_lease_holder(f"w{3 + len(worker_kills)}"))
                    print(f"  projection worker: {worker_kills[-1]}", flush=True)
            time.sleep(2.0)
            stop.set()
            for client in clients:
                client.join(timeout=180)
            elapsed = time.monotonic() - started
            caught = time.monotonic()
            cluster.wait(cluster.projections_at_head, 300, "projections at the head")
            catch_up_s = time.monotonic() - caught
            slow = [
                _explain(cluster, k, p)
                for k in kills
                for p, ms in k["failover_ms"].items()
                if ms > args.slow_ms
            ]
        finally:
            stop.set()
            cluster.stop()
        try:
            acks = {cid: a for c in clients for cid, a in c.stats.acks.items()}
            found = check_ledger(cluster, acks)
            everything = overlapping(cluster.intervals(during_shutdown=True))
            shutdown_overlaps = [x for x in everything if x not in found.overlaps]
            proj = check_projections(cluster)
        finally:
            cluster.close()

    fatal = [f for c in clients for f in c.stats.fatal]
    failovers = [float(ms) for k in kills for ms in k["failover_ms"].values()]
    steady, during = throughput(acks, [k["at_ms"] for k in kills], int(args.window_s * 1000))
    load = os.getloadavg()
    print()
    print(
        f"custody serve x3, projection workers x2, platforms {len(platforms)}, clients "
        f"{args.clients} x SubmitBatch of {args.batch}, lease poll {args.poll_ms} ms, run "
        f"{elapsed:.0f} s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"kills survived           {len(kills)} servers, {len(worker_kills)} projection workers")
    print(f"movements acknowledged   {found.acknowledged}")
    print(
        f"movements found          {found.found} (lost {len(found.lost)}, misplaced "
        f"{len(found.misplaced)})"
    )
    print(f"duplicates               {len(found.duplicates)}")
    print(f"acked outside its epoch  {len(found.outside_epoch)}")
    print(f"overlapping writers      {len(found.overlaps)} (servers' own logs)")
    for line in found.overlaps[:10]:
        print(f"  overlap: {line}")
    for line in shutdown_overlaps:
        print(f"  (handover while stopping, not counted: {line})")
    print(f"writer epochs            { {p: len(h) for p, h in found.history.items()} }")
    print(f"chains verify            {found.chains_ok} ({found.records} records)")
    if failovers:
        print(
            f"failover ms              median {statistics.median(failovers):.0f}, p90 "
            f"{_pct(failovers, 0.9):.0f}, max {max(failovers):.0f} (n={len(failovers)})"
        )
    for line in slow:
        print(f"  slow: {line}")
    if worker_kills:
        takeovers = [float(w["takeover_ms"]) for w in worker_kills]
        print(
            f"projection takeover ms   median {statistics.median(takeovers):.0f}, max "
            f"{max(takeovers):.0f} (n={len(takeovers)})"
        )
    print(
        f"projections              at head {proj.at_head} ({catch_up_s:.1f} s after load "
        f"stopped), equal to rebuild {proj.equal_to_rebuild}, lease problems "
        f"{len(proj.one_at_a_time)}, lease epochs {len(proj.history)}"
    )
    print(
        f"throughput /s            steady {steady:.0f}, in the {args.window_s:.0f} s after a "
        f"kill {during:.0f} (ratio {during / max(steady, 1):.2f}); overall "
        f"{found.acknowledged / elapsed:.0f}"
    )
    print(
        f"client retries {sum(c.stats.retries for c in clients)}, replayed acknowledgements "
        f"{sum(a.status == 'replayed' for a in acks.values())}, fatal {len(fatal)} {fatal[:3]}"
    )
    bad = not found.clean or fatal or not proj.at_head or proj.one_at_a_time
    bad = bad or not all(proj.equal_to_rebuild.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

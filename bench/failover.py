"""Failover campaign: three servers on one PostgreSQL schema, clients under load, the writer of a
platform SIGKILLed again and again. Prints kills survived, movements acknowledged vs found,
duplicates (must be 0), failover times (kill -> a new writer serving) and throughput around the
kills against the steady state of the same run.

    /work/venv/bin/python bench/failover.py --kills 30 [--poll-ms 1000] [--clients 8]

Needs PostgreSQL at 127.0.0.1:5432 (database `test`, user postgres, trust); uses a fresh schema
and drops it afterwards. Exits 1 if anything acknowledged is missing or anything is duplicated.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from cluster_harness import Client, Cluster, check_log, prepare_platforms  # noqa: E402
from helpers import pg_env  # noqa: E402

from ledger.config import Config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--poll-ms", type=int, default=1000, help="CUSTODY_LEASE_POLL_MS")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=10, help="transfers per request")
    parser.add_argument("--platforms", type=int, default=2)
    parser.add_argument("--gap-s", type=float, default=2.0, help="mean load time between kills")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    platforms = [f"p{i + 1}" for i in range(args.platforms)]
    with tempfile.TemporaryDirectory() as tmp, pg_env(Path(tmp)) as store_env:
        env = {**store_env, "CUSTODY_LEASE_POLL_MS": str(args.poll_ms)}
        config = Config.from_env(env)
        prepare_platforms(config, platforms, funds=10**15)
        cluster = Cluster(env, Path(tmp), size=3)
        stop = threading.Event()
        clients = [
            Client(f"c{i}", cluster.ports, platforms, args.batch, stop, seed=args.seed * 100 + i)
            for i in range(args.clients)
        ]
        kills = []
        started = time.monotonic()
        try:
            cluster.start()
            for client in clients:
                client.start()
            time.sleep(2.0)
            for k in range(args.kills):
                time.sleep(rng.uniform(0.5, 1.5) * args.gap_s)
                kills.append(cluster.kill_writer(rng.choice(platforms)))
                print(f"kill {k + 1}/{args.kills}: {kills[-1]}", flush=True)
            time.sleep(2.0)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=180)
            cluster.stop()
        elapsed = time.monotonic() - started
        acks = {cid: ack for cl in clients for cid, ack in cl.stats.acks.items()}
        findings = check_log(config, platforms, acks)

    failovers = sorted(ms for k in kills for ms in k["failover_ms"].values())
    # throughput: acknowledgements per second in 250 ms buckets. "Around a kill" = the 5 s that
    # follow it (outage, takeover, clients finding the new writer); the rest is the steady state.
    per_bucket: Counter[int] = Counter(ack.at_ms // 250 for ack in acks.values())
    first, last = min(per_bucket), max(per_bucket)
    around: set[int] = set()
    for k in kills:
        around.update(range(k["at_ms"] // 250, (k["at_ms"] + 5000) // 250))
    steady = [per_bucket[b] * 4 for b in range(first + 4, last - 4) if b not in around]
    during = [per_bucket[b] * 4 for b in range(first, last + 1) if b in around]
    steady_rate = statistics.mean(steady) if steady else 0.0
    during_rate = statistics.mean(during) if during else 0.0
    chains_ok = all(bad is None for _, bad, _ in findings.chain.values())
    print()
    print(
        f"servers 3, platforms {len(platforms)}, clients {args.clients} x {args.batch} "
        f"transfers per request, lease poll {args.poll_ms} ms, run {elapsed:.0f} s"
    )
    print(f"kills survived           {len(kills)}")
    print(f"movements acknowledged   {findings.acknowledged}")
    print(
        f"movements found          {findings.found} (lost {len(findings.lost)}, "
        f"misplaced {len(findings.misplaced)})"
    )
    print(f"duplicates               {len(findings.duplicates)}")
    print(f"acked outside its epoch  {len(findings.outside_epoch)}")
    print(f"chains verify            {chains_ok} ({findings.records} records)")
    print(f"writer epochs            { {p: len(h) for p, h in findings.history.items()} }")
    print(
        f"failover ms              median {statistics.median(failovers):.0f}, "
        f"p90 {failovers[int(0.9 * (len(failovers) - 1))]:.0f}, max {failovers[-1]:.0f} "
        f"(n={len(failovers)})"
    )
    print(
        f"throughput /s            steady {steady_rate:.0f}, in the 5 s after a kill "
        f"{during_rate:.0f} (ratio {during_rate / max(steady_rate, 1):.2f}); overall "
        f"{findings.acknowledged / elapsed:.0f}"
    )
    print(
        f"client redirects {sum(c.stats.redirects for c in clients)}, retries "
        f"{sum(c.stats.retries for c in clients)}, replayed acknowledgements "
        f"{sum(a.status == 'replayed' for a in acks.values())}"
    )
    bad = findings.lost or findings.duplicates or findings.misplaced or findings.outside_epoch
    return 1 if bad or not chains_ok else 0


if __name__ == "__main__":
    sys.exit(main())

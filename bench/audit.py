"""Benchmark the audit side: the offline verifier's speed and memory, and the Merkle tree's cost
in the write path.

  verifier    builds a real log through LedgerService (deposits, transfers, refusals), exports
              it as a bundle, then runs `python -m custody_verify bundle` as a separate process
              for each size in --sizes and reports records/s and the child's peak RSS, so that
              "memory flat in log size" can be read off the table.
  merkle      transfer throughput (batches of 1,000, SQLite, in process) with the tree in the
              write path and, in the same process, with its append disabled; prints the ratio.

Run: python bench/audit.py [--sizes 100000,400000] [--transfers 50000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controls.policy import Policy
from ledger import commands as c
from ledger.config import Config
from ledger.export import export_bundle
from ledger.merkle import MerkleLog
from ledger.service import LedgerService

ACCOUNTS = 1000


def _service(data_dir: str) -> LedgerService:
    env = {"CUSTODY_DATA_DIR": data_dir, "CUSTODY_CHECKPOINT_EVERY": "0"}
    service = LedgerService(Config.from_env(env))
    service.start()
    # The verifier's figures need a log of movements: customer signatures, limits and the
    # approval threshold are off here (bench/controls.py measures them).
    policy = Policy(
        require_customer_signature=0,
        require_bound_payee=0,
        limits={},
        outflow_cap_bp=0,
        approval_above_minor=0,
        refusal_records_per_min=1_000_000,
    )
    assert service.create_platform("p1", "Bench", "operator:bench", policy).ok
    opened = [c.OpenAccount(client_id="o-om", account_id="om", kind="omnibus", currency="CNY")]
    opened += [
        c.OpenAccount(
            client_id=f"o{i}", account_id=f"a{i}", kind="customer", currency="CNY", role="lender"
        )
        for i in range(ACCOUNTS)
    ]
    service.execute("p1", opened, "operator:bench")
    seed = [
        c.Deposit(
            client_id=f"d{i}",
            mirror_account_id="om",
            account_id=f"a{i}",
            amount_minor=10**9,
            currency="CNY",
        )
        for i in range(ACCOUNTS)
    ]
    service.execute("p1", seed, "operator:bench")
    return service


def _transfers(n: int, rnd: random.Random, prefix: str) -> list[list[c.Command]]:
    batches: list[list[c.Command]] = []
    for b in range(0, n, 1000):
        batch: list[c.Command] = []
        for j in range(min(1000, n - b)):
            x, y = rnd.sample(range(ACCOUNTS), 2)
            amount = rnd.randint(1, 1000) if j % 50 else 10**15  # 2% refused: overdrafts
            batch.append(
                c.Transfer(
                    client_id=f"{prefix}{b}-{j}",
                    from_account_id=f"a{x}",
                    to_account_id=f"a{y}",
                    amount_minor=amount,
                    currency="CNY",
                )
            )
        batches.append(batch)
    return batches


def bench_verifier(sizes: list[int]) -> list[dict[str, Any]]:
    results = []
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        service = _service(tmp)
        written = 2 * ACCOUNTS + 2
        for size in sorted(sizes):
            for batch in _transfers(size - written, rnd, f"t{size}-"):
                service.execute("p1", batch, "platform:p1")
            written = size
            checkpoints = service._platform("p1").checkpoints
            bundle = Path(tmp) / f"log-{size}.bundle"
            export_bundle(
                service.store,
                "p1",
                bundle,
                checkpoints.signer,
                checkpoint_log=checkpoints,
                every=100_000,
            )
            vkey = service.vkey("p1")
            t0 = time.perf_counter()
            # a fresh intermediate process, so RUSAGE_CHILDREN is the verifier's own peak RSS
            probe = (
                "import resource, subprocess, sys; "
                "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                "sys.stderr.write(r.stdout + r.stderr); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                "sys.exit(r.returncode)"
            )
            run = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    probe,
                    sys.executable,
                    "-m",
                    "custody_verify",
                    "bundle",
                    str(bundle),
                    "--vkey",
                    vkey,
                    "--json",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            wall_s = time.perf_counter() - t0
            assert run.returncode == 0, run.stdout + run.stderr
            peak_kib = int(run.stdout.split()[-1])
            results.append(
                {
                    "records": size,
                    "wall_s": round(wall_s, 2),
                    "records_per_s": round(size / wall_s),
                    "peak_rss_mib": round(peak_kib / 1024, 1),
                    "bundle_mib": round(bundle.stat().st_size / 2**20, 1),
                }
            )
            bundle.unlink()
        service.close()
    return results


def _count_only(self: MerkleLog, leaves: Any, progress: Any = None) -> None:
    self.size += len(leaves)


def bench_merkle(transfers: int) -> dict[str, Any]:
    def run(tree_on: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            service = _service(tmp)
            batches = _transfers(transfers, random.Random(3), "m")
            original = MerkleLog.extend
            if not tree_on:
                # count the leaves (the writer checks the size) but hash nothing
                MerkleLog.extend = _count_only  # type: ignore[method-assign]
            try:
                t0 = time.perf_counter()
                for batch in batches:
                    service.execute("p1", batch, "platform:p1")
                elapsed = time.perf_counter() - t0
            finally:
                MerkleLog.extend = original  # type: ignore[method-assign]
                service.close()
            return transfers / elapsed

    with_tree, without_tree = [], []
    for _ in range(3):  # interleaved so drift hits both alike
        with_tree.append(run(True))
        without_tree.append(run(False))
    a, b = sorted(with_tree)[1], sorted(without_tree)[1]
    return {"with_tree_per_s": round(a), "without_tree_per_s": round(b), "ratio": round(a / b, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,400000", help="log sizes for the verifier")
    parser.add_argument("--transfers", type=int, default=30_000, help="merkle cost workload")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {
        "load_avg": os.getloadavg(),
        "verifier": bench_verifier([int(s) for s in args.sizes.split(",")]),
        "merkle_write_path": bench_merkle(args.transfers),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"load average {report['load_avg']}")
    for r in report["verifier"]:
        print(
            f"verifier  {r['records']:>9,} records  {r['records_per_s']:>8,} records/s  "
            f"peak RSS {r['peak_rss_mib']} MiB  ({r['bundle_mib']} MiB bundle)"
        )
    m = report["merkle_write_path"]
    print(
        f"merkle    with tree {m['with_tree_per_s']:,}/s  without {m['without_tree_per_s']:,}/s"
        f"  ratio {m['ratio']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

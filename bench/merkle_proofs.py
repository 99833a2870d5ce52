"""Benchmark: inclusion and consistency proof generation at 10 million records (target ≤ 5 ms).

    python bench/merkle_proofs.py [--leaves 10000000] [--proofs 2000] [--store DATA_DIR]

Builds the writer's MerkleLog (ledger/merkle.py) over synthetic record-sized leaves, then times
proofs between random sizes with a COLD chunk cache (every proof re-fetches and re-hashes the
≤ 2 chunks of records it needs; the fetch callback regenerates them, standing in for the
store). Every proof is checked with the auditor's verifier (custody_verify.merkle).

With --store DATA_DIR (a SQLite data folder holding platform p1), it also times the real store
read of one 256-record chunk, the part of a proof's cost that depends on the database.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custody_verify import merkle as vm
from ledger.merkle import CHUNK_LEVEL, MerkleLog

PAD = b"x" * 300


def leaf(i: int) -> bytes:
    return b'{"kind":"transferred","seq":%d,"pad":"%s"}' % (i, PAD)


def fetch(a: int, b: int) -> list[bytes]:
    return [leaf(i) for i in range(a, b)]


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (
        f"median {statistics.median(xs) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, "
        f"max {xs[-1] * 1e3:.3f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--leaves", type=int, default=10_000_000)
    ap.add_argument("--proofs", type=int, default=2000)
    ap.add_argument("--chunk-level", type=int, default=CHUNK_LEVEL, help="log2 of the chunk size")
    ap.add_argument("--store", type=Path, help="SQLite data dir with platform p1, for fetch cost")
    args = ap.parse_args()
    n = args.leaves

    t0 = time.perf_counter()
    tree = MerkleLog(fetch, chunk_level=args.chunk_level)
    tree.extend(leaf(i) for i in range(n))
    build = time.perf_counter() - t0
    snap = tree.snapshot()
    print(f"built {n:,} leaves in {build:.1f} s ({n / build:,.0f} appends/s incl. leaf generation)")
    print(f"in-memory tree state: {len(snap) / 1e6:.2f} MB (snapshot size)")

    rng = random.Random(1)
    root_n = tree.root()
    t_root = time.perf_counter()
    for _ in range(100):
        tree.root()
    print(f"root at the current size: {(time.perf_counter() - t_root) * 10:.3f} ms")

    inc: list[float] = []
    for _ in range(args.proofs):
        size = rng.randint(n // 2, n)
        index = rng.randrange(size)
        tree._cache.clear()  # cold: the chunk must be fetched and re-hashed
        t = time.perf_counter()
        path = tree.inclusion_proof(index, size)
        inc.append(time.perf_counter() - t)
        if len(inc) <= 50:
            root = tree.root(size)
            assert vm.verify_inclusion(index, size, vm.leaf_hash(leaf(index)), path, root)
    con: list[float] = []
    for _ in range(args.proofs):
        m = rng.randint(1, n - 1)
        k = rng.randint(m, n)
        tree._cache.clear()
        t = time.perf_counter()
        path = tree.consistency_proof(m, k)
        con.append(time.perf_counter() - t)
        if len(con) <= 50:
            assert vm.verify_consistency(m, k, tree.root(m), tree.root(k), path)
    latest = []
    for _ in range(args.proofs):
        index = rng.randrange(n)
        tree._cache.clear()
        t = time.perf_counter()
        tree.inclusion_proof(index, n)
        latest.append(time.perf_counter() - t)
    assert tree.root() == root_n
    print(f"inclusion proof, random size in [n/2, n], cold cache: {ms(inc)}")
    print(f"inclusion proof at the latest size, cold cache:       {ms(latest)}")
    print(f"consistency proof, random m < n', cold cache:         {ms(con)}")

    if args.store is not None:
        from ledger.config import Config
        from ledger.merkle import store_fetcher
        from ledger.store import LedgerStore, log_stream

        store = LedgerStore(Config.from_env({"CUSTODY_DATA_DIR": str(args.store)}))
        last = store.last_row(log_stream("p1"))
        assert last is not None, "no platform p1 in that store"
        total = last[0] + 1
        f = store_fetcher(store, "p1")
        chunk = 1 << args.chunk_level
        times = []
        for _ in range(200):
            a = rng.randrange(max(1, total // chunk)) * chunk
            t = time.perf_counter()
            rows = f(a, a + chunk)
            times.append(time.perf_counter() - t)
            assert len(rows) == min(chunk, total - a)
        print(f"store read of one {chunk}-record chunk ({total:,} records, SQLite): {ms(times)}")
        print("a proof needs at most 2 such reads (none when the chunk is cached or current)")
        store.close()


if __name__ == "__main__":
    main()

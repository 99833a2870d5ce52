"""Benchmark: restart with a long log, with and without a state snapshot (BRIEF §9: serving in
<= 5 s with 10 million records).

Steps (one fresh database, or the one kept in --data-dir):
  1. generate   --records records through the in-process batched path (LedgerService.execute,
                batches of 1,000 transfers between --accounts customer accounts, like
                bench/transfers.py; not timed as part of any figure below): first the prefix,
                then --tail more transfers. With --data-dir this happens once; later runs with
                the same parameters reuse the stored log (a 10 M log takes long to build).
  2. full       a fresh writer replays and re-chains the prefix (snapshots off): the baseline;
                past 1 M done rows it then compacts them (`snapshot.settle`, as `load` does)
  3. save       that writer captures a snapshot at the prefix's end (the part that holds the
                platform lock) and stores it (one transaction): times and size
  4. restart    a fresh writer loads the snapshot, checks it against the log and replays the
                tail; then a whole `LedgerService.start()` (what `custody serve` does before
                serving: every platform loaded, GC tuned)
                Then that restarted writer captures a snapshot again (not stored): what a
                scheduled snapshot costs under the platform lock once the tail's rows are new.
  5. check      the snapshot-loaded state equals a full replay's (balances, done table size,
                chain head, Merkle root)

Prints each figure and the ratio full replay / snapshot restart, measured in this run.

Examples:
  python bench/restart.py                                  # 1,000,000 records, SQLite
  python bench/restart.py --records 100000 --store postgres
  python bench/restart.py --records 10000000 --data-dir /tmp/restart10m --no-check
  python bench/restart.py --records 10000000 --data-dir /tmp/restart10m --no-check \
      --reuse-snapshot                                     # again, restart only (same code)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself must not be on the path: bench/controls.py would shadow the `controls` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ledger import snapshot  # noqa: E402
from ledger.config import Config  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.snapshot import SnapshotStore  # noqa: E402
from ledger.writer import PlatformWriter  # noqa: E402


def _load_transfers() -> Any:
    """bench/transfers.py by path: putting bench/ on sys.path would shadow `controls`."""
    spec = importlib.util.spec_from_file_location(
        "bench_transfers", ROOT / "bench" / "transfers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_transfers"] = module
    spec.loader.exec_module(module)
    return module


_tb = _load_transfers()
ACTOR, PLATFORM, check = _tb.ACTOR, _tb.PLATFORM, _tb.check
fresh_config, make_workload = _tb.fresh_config, _tb.make_workload
seed_ledger, transfer_cmds = _tb.seed_ledger, _tb.transfer_cmds
BATCH = 1_000


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append(svc: LedgerService, n: int, accounts: int, seed: int, prefix: str) -> None:
    work = make_workload(n, accounts, seed)
    t0 = time.perf_counter()
    for start in range(0, n, 100_000):
        cmds = transfer_cmds(work[start : start + 100_000], f"{prefix}{start}-")
        for i in range(0, len(cmds), BATCH):
            out = svc.execute(PLATFORM, cmds[i : i + BATCH], ACTOR)
            check(all(o.status in ("accepted", "refused") for o in out), "unexpected outcome")
        done = start + len(cmds)
        rate = done / (time.perf_counter() - t0)
        print(f"  generated {done:,} / {n:,} ({rate:,.0f}/s)", file=sys.stderr, flush=True)


def fresh_writer(cfg: Config, svc: LedgerService, use_snapshots: bool) -> PlatformWriter:
    writer = svc._new_writer(PLATFORM)
    writer.use_snapshots = use_snapshots
    return writer


def fingerprint(writer: PlatformWriter) -> tuple[Any, ...]:
    st = writer.state
    return (
        st.next_seq,
        writer.head,
        writer.tree.root(),
        len(st.done),
        sorted((a.id, a.posted_minor, a.available_minor) for a in st.accounts.values()),
    )


def replay_prefix(writer: PlatformWriter, end: int) -> float:
    """A full replay (re-chain + fold) of records 0 .. end-1 only: the state a writer had when
    the log ended at `end`, so the tail after it can already be stored (a reused database).
    Then what `load` does after a full replay: `snapshot.settle`; returns its seconds."""
    writer._reset()
    for seq, kind, packed in writer.store.iter_rows(writer.stream, after=-1, stop=end - 1):
        writer._replay_row(seq, kind, packed)
    check(writer.state.next_seq == end, f"log holds fewer than {end} records")
    t0 = time.perf_counter()
    snapshot.settle(writer.state, writer.tree)
    writer.committed_next_seq = writer.prepared_next_seq = end
    return time.perf_counter() - t0


@contextmanager
def bench_config(args: argparse.Namespace) -> Iterator[Config]:
    """A fresh temporary database, or the one kept in --data-dir (generated on first use).
    The service's own scheduled snapshots are off: this bench takes and times its own (and on
    SQLite, storing a big one while the generator commits can time a commit out)."""
    if args.data_dir is None:
        with fresh_config(args.store) as cfg:
            yield replace(cfg, snapshot_every=0)
        return
    check(args.store == "sqlite", "--data-dir is for SQLite")
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    env = {"CUSTODY_DATA_DIR": args.data_dir, "CUSTODY_STORE": "sqlite"}
    yield replace(Config.from_env(env), snapshot_every=0)


def generate(args: argparse.Namespace, cfg: Config) -> int:
    """Store the log (prefix, then tail); returns the prefix's length, where the snapshot goes.
    With --data-dir the log is generated once and its parameters are kept beside it."""
    params = {k: getattr(args, k) for k in ("records", "tail", "accounts", "seed")}
    meta = Path(args.data_dir or "/nonexistent") / "restart-bench.json"
    if args.data_dir is not None and meta.exists():
        kept = json.loads(meta.read_text())
        check(kept["params"] == params, f"{meta} was generated with {kept['params']}")
        print(f"reusing the log in {args.data_dir}", file=sys.stderr)
        return int(kept["prefix"])
    svc = LedgerService(cfg)
    svc.start()
    try:
        seed_ledger(svc, args.accounts)
        setup = 2 + 2 * args.accounts
        append(svc, args.records - setup - args.tail, args.accounts, args.seed, "t")
        prefix = svc._platform(PLATFORM).writer.committed_next_seq
        append(svc, args.tail, args.accounts, args.seed + 1, "tail")
    finally:
        svc.close()
    if args.data_dir is not None:
        meta.write_text(json.dumps({"params": params, "prefix": prefix}))
    return int(prefix)


class _Skip(Exception):
    """--reuse-snapshot: no full replay, no capture."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"store": args.store, "tail": args.tail}
    with bench_config(args) as cfg:
        position = generate(args, cfg)
        out["records_at_snapshot"] = position
        svc = LedgerService(cfg)  # not started: only its store, vault and writer factory
        if args.reuse_snapshot:
            check(args.data_dir is not None, "--reuse-snapshot needs --data-dir")
            check(position in SnapshotStore(svc.store).positions(PLATFORM), "no snapshot kept")
        try:
            if args.reuse_snapshot:
                raise _Skip
            gc.collect()
            full = fresh_writer(cfg, svc, use_snapshots=False)
            t0 = time.perf_counter()
            out["settle_s"] = replay_prefix(full, position)
            out["full_replay_s"] = time.perf_counter() - t0
            print(f"full replay: {out['full_replay_s']:.2f} s", file=sys.stderr)

            t0 = time.perf_counter()
            captured = full.capture_snapshot()
            out["capture_s"] = time.perf_counter() - t0
            check(captured is not None, "no snapshot captured")
            assert captured is not None
            check(captured[0] == position, "snapshot not at the prefix's end")
            body = captured[1]
            t0 = time.perf_counter()
            full.store_snapshot(position, body)
            out["store_s"] = time.perf_counter() - t0
            out["snapshot_bytes"] = len(body)
            print(
                f"capture {out['capture_s']:.2f} s, store {out['store_s']:.2f} s", file=sys.stderr
            )
            del body, captured
            del full
            gc.collect()
        except _Skip:
            print("steps 2-3 skipped: the kept snapshot is loaded", file=sys.stderr)
        finally:
            svc.close()

        svc = LedgerService(cfg)
        try:
            gc.collect()
            fast = fresh_writer(cfg, svc, use_snapshots=True)
            t0 = time.perf_counter()
            fast.load()
            out["snapshot_restart_s"] = time.perf_counter() - t0
            check(fast.snapshot_position == position, "the snapshot was not used")
            out["records"] = fast.state.next_seq
            print(f"snapshot restart: {out['snapshot_restart_s']:.2f} s", file=sys.stderr)
            fast_print = fingerprint(fast)
            # what a scheduled snapshot costs this restarted writer under its lock: the tail's
            # rows join the done table's base (ledger/domain.py DoneBase), then encode + MAC
            t0 = time.perf_counter()
            check(fast.capture_snapshot() is not None, "no snapshot captured after restart")
            out["capture_after_restart_s"] = time.perf_counter() - t0
            del fast
            gc.collect()
            if not args.no_check:
                t0 = time.perf_counter()
                again = fresh_writer(cfg, svc, use_snapshots=False)
                again.load()
                out["full_replay_with_tail_s"] = time.perf_counter() - t0
                check(fingerprint(again) == fast_print, "snapshot restart != full replay")
                del again
                gc.collect()
        finally:
            svc.close()

        # the whole service start, as `custody serve` does it (snapshot + tail + GC tuning)
        served = LedgerService(cfg)
        t0 = time.perf_counter()
        served.start()
        out["service_start_s"] = time.perf_counter() - t0
        served.close()
        tables = SnapshotStore(LedgerService(cfg).store).positions(PLATFORM)
        out["snapshots_kept"] = tables
    if "full_replay_s" in out:
        out["ratio_full_over_snapshot"] = out["full_replay_s"] / out["snapshot_restart_s"]
    out["peak_rss_mib"] = round(rss_mib())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=1_000_000, help="records in the log")
    p.add_argument("--tail", type=int, default=10_000, help="records after the snapshot")
    p.add_argument("--accounts", type=int, default=1_000, help="customer accounts")
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-check", action="store_true", help="skip the second full replay")
    p.add_argument(
        "--reuse-snapshot",
        action="store_true",
        help="with --data-dir: skip the full replay and capture, restart from the snapshot an "
        "earlier run of the same code stored (it must load, or the run fails)",
    )
    p.add_argument(
        "--data-dir",
        help="SQLite: keep the database in this folder and reuse it on later runs with the same "
        "--records/--tail/--accounts/--seed (generated on first use; default: a temp folder)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)
    check(args.records > 2 + 2 * args.accounts + args.tail, "--records too small")
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    n = res["records"]
    print(f"store {res['store']}, {n:,} records ({res['records_at_snapshot']:,} in the snapshot)")
    lines = [
        ("full_replay_s", "full replay of the prefix (re-chain + fold)", "s"),
        ("settle_s", "  of which: done rows into the compact base", "s"),
        ("capture_s", "snapshot capture (platform lock held)", "s"),
        ("store_s", "snapshot store (one transaction)", "s"),
        ("snapshot_bytes", "snapshot size", "MiB"),
        ("snapshot_restart_s", f"restart: snapshot + {res['tail']:,}-record tail", "s"),
        ("capture_after_restart_s", "capture by the restarted writer (tail rows)", "s"),
        ("service_start_s", "LedgerService.start() with the snapshot", "s"),
        ("full_replay_with_tail_s", "full replay incl. tail (check: same state)", "s"),
        ("ratio_full_over_snapshot", "ratio full replay / snapshot restart", "x"),
    ]
    for key, label, unit in lines:
        if key in res:
            value = res[key] / 2**20 if unit == "MiB" else res[key]
            print(f"  {label:<44}{value:8.2f} {unit}")
    print(f"  peak RSS {res['peak_rss_mib']:,} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

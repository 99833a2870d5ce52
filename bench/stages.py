"""Where the time of one batched, durable transfer goes: µs per stage of the writer's hot path.

Runs the same workload as bench/transfers.py on SQLite, twice, on two fresh databases with the
same fixed clock:

  end-to-end  LedgerService.execute() per batch, as the benchmark does.
  staged      the steps of PlatformWriter._one / _append / _commit for a Transfer, re-enacted
              here stage by stage over each whole batch (each stage runs for all commands of a
              batch before the next, so one clock read covers 1,000 calls), using the ledger's
              own functions: validate, encode, fingerprint, classify, plan, run_controls, record
              build, record encode, SHA-256 chain, apply_record, Outcome, StoredEvent build,
              executemany, commit.

The staged run must end at the SAME chain head as the end-to-end run (checked): that proves it
did exactly what the writer does. If the writer's hot path changes, this file must follow it
(the check fails loudly until it does). "unattributed" = end-to-end minus the sum of stages
(loop and call overhead, cache effects, garbage collection).

  python bench/stages.py [--transfers N] [--accounts N] [--batch N] [--json]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec  # noqa: E402
import transfers as tb  # noqa: E402
from eventsourcing.persistence import StoredEvent  # noqa: E402

from controls.idempotency import Replay, classify  # noqa: E402
from controls.registry import run_controls  # noqa: E402
from ledger import records  # noqa: E402
from ledger.decide import plan  # noqa: E402
from ledger.fold import apply_record  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.validate import validate  # noqa: E402
from ledger.writer import Outcome  # noqa: E402

FIXED_TS = 1_800_000_000_000
STAGES = (
    "validate",
    "encode cmd",
    "fingerprint",
    "idempotency",
    "plan",
    "controls",
    "record build",
    "record encode",
    "sha256 chain",
    "apply (fold)",
    "outcome",
    "StoredEvent build",
    "sqlite executemany",
    "sqlite commit",
)


def fresh_service(cfg: Any) -> LedgerService:
    svc = LedgerService(cfg, clock_ms=lambda: FIXED_TS)
    svc.start()
    tb.seed_ledger(svc, ACCOUNTS)
    return svc


def run_end_to_end(cmds: list[Any], batch: int, gc_on: bool) -> tuple[complex, bytes]:
    with tb.fresh_config("sqlite") as cfg:
        svc = fresh_service(cfg)
        try:
            gc.collect()
            if not gc_on:
                gc.disable()
            t0 = complex(time.perf_counter(), time.process_time())
            for i in range(0, len(cmds), batch):
                out = svc.execute(tb.PLATFORM, cmds[i : i + batch], tb.ACTOR)
                assert out[-1].status == "accepted", out[-1]
            seconds = complex(time.perf_counter(), time.process_time()) - t0
            gc.enable()
            head = svc.head(tb.PLATFORM)[1]
        finally:
            gc.enable()
            svc.close()
    return seconds, head


def run_staged(cmds: list[Any], batch: int, gc_on: bool) -> tuple[dict[str, complex], bytes]:
    encode = records.ENCODER.encode
    fingerprint = records.fingerprint
    sha256 = hashlib.sha256
    kind_by_op = records.KIND_BY_OP
    raw = msgspec.Raw
    t: dict[str, complex] = dict.fromkeys(STAGES, 0j)
    wall, cpu = time.perf_counter, time.thread_time

    def clock() -> complex:  # real part: wall seconds, imaginary part: this thread's CPU seconds
        return complex(wall(), cpu())

    with tb.fresh_config("sqlite") as cfg:
        svc = fresh_service(cfg)
        try:
            writer = svc._platforms[tb.PLATFORM].writer
            state = writer.state
            recorder = svc.store.recorder
            ds = recorder.datastore
            stream = writer.stream
            platform_id = writer.platform_id
            policy = writer.policy
            pv = policy.version
            actor = tb.ACTOR
            gc.collect()
            if not gc_on:
                gc.disable()
            for start in range(0, len(cmds), batch):
                chunk = cmds[start : start + batch]
                ts = max(writer.clock_ms(), state.last_ts_ms)
                t0 = clock()
                for cmd in chunk:
                    validate(cmd)
                t1 = clock()
                cbytes = [encode(cmd) for cmd in chunk]  # transfers carry no personal data
                t2 = clock()
                fps = [fingerprint(b) for b in cbytes]
                t3 = clock()
                done = state.done
                for cmd, fp in zip(chunk, fps, strict=True):
                    assert classify(done, cmd.client_id, fp) is Replay.NEW
                t4 = clock()
                plans = [plan(state, cmd, ts) for cmd in chunk]
                t5 = clock()
                for proposal, _ in plans:
                    assert run_controls(state, proposal, policy) is None
                t6 = clock()
                recs = []
                seq = state.next_seq
                for cmd, b, (proposal, effects) in zip(chunk, cbytes, plans, strict=True):
                    rec = {
                        "v": 1,
                        "platform": platform_id,
                        "seq": seq,
                        "ts": ts,
                        "kind": kind_by_op[proposal.op],
                        "cid": cmd.client_id,
                        "actor": actor,
                        "pv": pv,
                        "cmd": raw(b),
                    }
                    rec.update(effects)
                    recs.append(rec)
                    seq += 1
                t7 = clock()
                datas = [encode(rec) for rec in recs]
                t8 = clock()
                rows = []
                head = writer.head
                for rec, data in zip(recs, datas, strict=True):
                    head = sha256(head + data).digest()
                    rows.append((rec["seq"], rec["kind"], head + data))
                writer.head = head
                t9 = clock()
                for rec, fp in zip(recs, fps, strict=True):
                    apply_record(state, rec, fp)
                t10 = clock()
                outs = [Outcome(r["cid"], "accepted", seq=r["seq"], kind=r["kind"]) for r in recs]
                t11 = clock()
                events = [StoredEvent(stream, s, k, st) for s, k, st in rows]
                t12 = clock()
                with ds.transaction(commit=True) as cur:
                    t13 = clock()
                    recorder._insert_events(cur, events)
                    t14 = clock()
                t15 = clock()
                assert len(outs) == len(chunk)
                for name, dt_ in zip(
                    STAGES,
                    (
                        t1 - t0,
                        t2 - t1,
                        t3 - t2,
                        t4 - t3,
                        t5 - t4,
                        t6 - t5,
                        t7 - t6,
                        t8 - t7,
                        t9 - t8,
                        t10 - t9,
                        t11 - t10,
                        t12 - t11,
                        t14 - t13 + (t13 - t12),  # BEGIN + executemany
                        t15 - t14,
                    ),
                    strict=True,
                ):
                    t[name] += dt_
            gc.enable()
            head = svc.head(tb.PLATFORM)[1]
            assert head == writer.head
        finally:
            gc.enable()
            svc.close()
    return t, head


ACCOUNTS = 1000


def main(argv: list[str] | None = None) -> int:
    global ACCOUNTS
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--transfers", type=int, default=100_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--batch", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeat", type=int, default=1, help="medians over this many runs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ACCOUNTS = args.accounts
    work = tb.make_workload(args.transfers, args.accounts, args.seed)
    cmds = tb.transfer_cmds(work, "t")
    n = len(cmds)
    e2e: dict[bool, list[complex]] = {True: [], False: []}
    staged: dict[bool, list[dict[str, complex]]] = {True: [], False: []}
    for _ in range(args.repeat):
        for gc_on in (True, False):
            seconds, head_e2e = run_end_to_end(cmds, args.batch, gc_on)
            e2e[gc_on].append(seconds)
            times, head_staged = run_staged(cmds, args.batch, gc_on)
            staged[gc_on].append(times)
            if head_staged != head_e2e:
                print("staged run diverged from the writer (chain heads differ): fix stages.py")
                return 2

    def med_us(xs: list[complex]) -> dict[str, float]:
        return {
            "wall": round(1e6 * statistics.median(x.real for x in xs) / n, 2),
            "cpu": round(1e6 * statistics.median(x.imag for x in xs) / n, 2),
        }

    doc: dict[str, Any] = {"transfers": n, "batch": args.batch, "repeat": args.repeat}
    for gc_on in (True, False):
        stages = {k: med_us([t[k] for t in staged[gc_on]]) for k in STAGES}
        total = med_us(e2e[gc_on])
        doc["gc_on" if gc_on else "gc_off"] = {
            "end_to_end_us": total,
            "end_to_end_tps": round(1e6 / total["wall"]),
            "stages_us": stages,
            "sum_of_stages_us": {
                m: round(sum(v[m] for v in stages.values()), 2) for m in ("wall", "cpu")
            },
        }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    on, off = doc["gc_on"], doc["gc_off"]
    print(f"{n} transfers, batch {args.batch}, SQLite, median of {args.repeat}, chain heads agree")
    print("µs per transfer; wall = elapsed, cpu = CPU time of the thread (process for end-to-end)")
    head = ("GC on wall", "GC on cpu", "GC off wall", "GC off cpu")
    print(f"{'':22s}" + "".join(f"{h:>12s}" for h in head))

    def line(label: str, a: dict[str, float], b: dict[str, float]) -> None:
        vals = (a["wall"], a["cpu"], b["wall"], b["cpu"])
        print(f"{label:22s}" + "".join(f"{v:12.2f}" for v in vals))

    line("end-to-end", on["end_to_end_us"], off["end_to_end_us"])
    for k in STAGES:
        line(f"  {k}", on["stages_us"][k], off["stages_us"][k])
    line("  sum of stages", on["sum_of_stages_us"], off["sum_of_stages_us"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

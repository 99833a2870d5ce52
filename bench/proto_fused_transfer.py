"""PROTOTYPE, measurement only: what a fused decide path for transfers would cost.

Not ledger code and not used by it. It decides a batch of plain transfers in ONE loop: the same
shape checks, replay check, every rule of the integrity / available_funds / account_state controls
on the two looked-up accounts, the same record (as a msgspec Struct whose fields are declared in
code-point order, so the bytes equal the sorted-dict encoding), the same SHA-256 chain and the same
in-place postings. Any transfer that is not the plain accepted case raises (the real thing would
fall back to the generic path there). The run checks that its chain head equals a real
`LedgerService.execute()` run on the same workload and clock, i.e. the records are byte-identical.

  python bench/proto_fused_transfer.py [--transfers N]

See docs/BENCHMARKS.md, "Prototype: what a fused transfer path costs".
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import stages
import transfers as tb

from controls.flows import ALLOWED_FLOWS
from ledger import commands as c
from ledger import records
from ledger.domain import AccountStatus, Done
from ledger.money import CURRENCY_EXPONENTS
from ledger.writer import Outcome

_CID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-/]{0,127}").fullmatch
_FLOWS = ALLOWED_FLOWS["transfer"]
_MAX = 2**63 - 1
_OPEN = AccountStatus.OPEN
_ENC = records.ENCODER.encode
_RENC = msgspec.json.Encoder().encode  # Struct fields below are already in sorted order
_RAW = msgspec.Raw
_SHA = hashlib.sha256


class TransferRecord(msgspec.Struct):
    actor: str
    ccy: str
    cid: str
    cmd: msgspec.Raw
    entries: list[list[Any]]
    kind: str
    platform: str
    pv: int
    seq: int
    ts: int
    v: int


class SlowPath(Exception):
    pass


def decide_transfers(w: Any, cmds: list[c.Transfer], actor: str, ts: int, rows: list[Any]) -> list:
    state = w.state
    accounts, done, totals = state.accounts, state.done, state.totals_by_currency
    head, seq, platform, pv = w.head, state.next_seq, w.platform_id, w.policy.version
    outs = []
    for cmd in cmds:
        cid, d_id, c_id = cmd.client_id, cmd.from_account_id, cmd.to_account_id
        amt, ccy = cmd.amount_minor, cmd.currency
        if (
            type(cmd) is not c.Transfer
            or type(cid) is not str
            or _CID(cid) is None
            or type(amt) is not int
            or not 1 <= amt <= _MAX
            or cmd.purpose != "transfer"
            or ccy not in CURRENCY_EXPONENTS
            or cid in done
        ):
            raise SlowPath(cid)
        debit, credit = accounts.get(d_id), accounts.get(c_id)
        if (
            debit is None
            or credit is None
            or d_id == c_id
            or debit.currency != ccy
            or credit.currency != ccy
            or (debit.kind, credit.kind) not in _FLOWS
            or debit.status is not _OPEN
            or credit.status is not _OPEN
            or credit.credits_posted_minor + amt > _MAX
            or debit.debits_posted_minor + amt > _MAX
            or (
                debit.must_not_go_negative
                and debit.credits_posted_minor
                - debit.debits_posted_minor
                - debit.debits_pending_minor
                < amt
            )
        ):
            raise SlowPath(cid)
        cmd_bytes = _ENC(cmd)
        entries = [[d_id, c_id, amt]]
        data = _RENC(
            TransferRecord(
                actor, ccy, cid, _RAW(cmd_bytes), entries, "transferred", platform, pv, seq, ts, 1
            )
        )
        head = _SHA(head + data).digest()
        rows.append((seq, "transferred", head + data))
        debit.debits_posted_minor += amt
        credit.credits_posted_minor += amt
        debit.last_seq = seq
        credit.last_seq = seq
        t = totals[ccy]
        t[0] += amt
        t[1] += amt
        done[cid] = Done(records.fingerprint(cmd_bytes), seq, "transferred", entries)
        outs.append(Outcome(cid, "accepted", seq, "transferred"))
        seq += 1
    state.next_seq, state.last_ts_ms, w.head = seq, ts, head
    return outs


def run(cmds: list[c.Transfer], batch: int, raw_insert: bool) -> tuple[complex, ...]:
    def clock() -> complex:
        return complex(time.perf_counter(), time.thread_time())

    with tb.fresh_config("sqlite") as cfg:
        svc = stages.fresh_service(cfg)
        try:
            w = svc._platforms[tb.PLATFORM].writer
            recorder = svc.store.recorder
            gc.collect()
            dec = ins = com = 0j
            for i in range(0, len(cmds), batch):
                rows: list[Any] = []
                a = clock()
                decide_transfers(w, cmds[i : i + batch], tb.ACTOR, stages.FIXED_TS, rows)
                b = clock()
                if raw_insert:
                    with recorder.datastore.transaction(commit=True) as cur:
                        cur.executemany(
                            recorder.insert_events_statement,
                            [(w.stream, s, k, st) for s, k, st in rows],
                        )
                        d = clock()
                    e = clock()
                else:
                    svc.store.append(w.stream, rows)
                    d = e = clock()
                dec, ins, com = dec + b - a, ins + d - b, com + e - d
            head = svc.head(tb.PLATFORM)[1]
        finally:
            svc.close()
    return dec, ins, com, head  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--transfers", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1_000)
    args = p.parse_args(argv)
    stages.ACCOUNTS = 1000
    cmds = tb.transfer_cmds(tb.make_workload(args.transfers, 1000, 42), "t")
    n = len(cmds)
    _, ref_head = stages.run_end_to_end(cmds, args.batch, True)
    for raw_insert in (False, True):
        dec, ins, com, head = run(cmds, args.batch, raw_insert)
        if head != ref_head:
            print("prototype records differ from the ledger's (chain heads differ)")
            return 2
        total = dec + ins + com

        def f(x: complex) -> str:
            return f"{1e6 * x.real / n:5.2f} wall {1e6 * x.imag / n:5.2f} cpu"

        label = "executemany(tuples)" if raw_insert else "LedgerStore.append "
        print(
            f"{label} decide {f(dec)} | insert {f(ins)} | commit {f(com)} | total {f(total)}"
            f" => {n / total.real:,.0f}/s (bytes identical to the ledger's)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

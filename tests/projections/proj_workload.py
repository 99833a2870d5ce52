"""A random but reproducible workload for the projection tests, and a log-prefix oracle.

Plain functions (no pytest) so that the crash child can use them too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from helpers import FakeClock, Platform, deposit, hold, log_records, make_platform, transfer

from ledger import commands as c
from ledger import records
from ledger.domain import PlatformState
from ledger.fold import apply_record
from ledger.service import LedgerService
from ledger.store import LedgerStore, log_stream

ACTORS = ("platform:web", "platform:app", "operator:alice", "operator:bob")


def run_workload(
    service: LedgerService, clock: FakeClock, steps: int, seed: int = 1, pid: str = "p1"
) -> Platform:
    """`steps` instructions of every kind, some refused, time moving on between groups."""
    rnd = random.Random(seed)
    if pid in service.platform_ids():  # a later round on the same platform
        p = Platform(pid, "CNY", "omni", "pbank", "own", "fee", "susp", ("alice", "bob", "carol"))
    else:
        p = make_platform(service, pid)
    customers = list(p.customers)
    holds: list[str] = []
    withdrawals: list[str] = []
    movements: list[str] = []
    for acc in customers:
        _exec(service, pid, [deposit(p, f"seed{seed}-{acc}", acc, 50_000)], "operator:alice")
    for i in range(steps):
        if i % 7 == 0:
            clock.advance(rnd.choice((1, 1, 500, 60_000)))
        src, dst = rnd.sample(customers, 2)
        amount = rnd.randint(1, 9_000)  # sometimes more than the payer has: refused
        roll = rnd.random()
        cid = f"s{seed}-{i}"
        cmd: c.Command
        if roll < 0.30:
            cmd = transfer(p, cid, src, dst, amount)
            movements.append(cid)
        elif roll < 0.40:
            cmd = deposit(p, cid, src, amount)
            movements.append(cid)
        elif roll < 0.48:
            cmd = c.ChargeFee(
                client_id=cid,
                from_account_id=src,
                to_account_id=p.fee,
                amount_minor=rnd.randint(1, 300),
                currency=p.currency,
                fee_code="svc",
            )
        elif roll < 0.58:
            cmd = hold(p, cid, src, dst, amount, clock.now + rnd.choice((10, 10**7)))
            holds.append(cid)
        elif roll < 0.64 and holds:
            h = holds.pop(rnd.randrange(len(holds)))
            cmd = c.CaptureHold(client_id=cid, hold_id=h, amount_minor=rnd.randint(1, 3_000))
        elif roll < 0.68 and holds:
            h = holds.pop(rnd.randrange(len(holds)))
            cmd = c.ReleaseHold(client_id=cid, hold_id=h, reason="cancelled")
        elif roll < 0.71:
            cmd = c.ExpireHolds(client_id=cid, max_holds=50)
        elif roll < 0.78:
            cmd = c.RequestWithdrawal(
                client_id=cid,
                account_id=src,
                mirror_account_id=p.omni,
                amount_minor=amount,
                currency=p.currency,
                payee_ref=f"payee-{src}",
                expires_at_ms=clock.now + 10**8,
            )
            withdrawals.append(cid)
        elif roll < 0.84 and withdrawals:
            w = withdrawals.pop(rnd.randrange(len(withdrawals)))
            if rnd.random() < 0.7:
                cmd = c.SettleWithdrawal(client_id=cid, withdrawal_id=w, bank_ref="b")
            else:
                cmd = c.FailWithdrawal(client_id=cid, withdrawal_id=w, reason="bank")
        elif roll < 0.90 and movements:
            m = movements.pop(rnd.randrange(len(movements)))
            cmd = c.Reverse(client_id=cid, movement_id=m, reason="mistake")
        elif roll < 0.94:
            cmd = c.FreezeAccount(client_id=cid, account_id=src, reason="review")
        elif roll < 0.97:
            cmd = c.UnfreezeAccount(client_id=cid, account_id=src, reason="cleared")
        else:
            cmd = transfer(p, cid, src, "nobody", amount)  # refused: unknown account
        _exec(service, pid, [cmd], rnd.choice(ACTORS))
    return p


def _exec(service: LedgerService, pid: str, cmds: list[c.Command], actor: str) -> None:
    service.execute(pid, cmds, actor)


def append_raw(store: LedgerStore, pid: str, fields: dict[str, Any]) -> int:
    """Append one chained record straight to the log (a kind the writer does not make yet)."""
    last = store.last_row(log_stream(pid))
    assert last is not None
    prev_head, prev = records.unpack_state(last[2])
    prev_rec = records.decode(prev)
    seq = last[0] + 1
    rec = {
        "v": 1,
        "platform": pid,
        "seq": seq,
        "ts": prev_rec["ts"],
        "cid": f"raw-{seq}",
        "actor": "operator:raw",
        "pv": 3,
        "cmd": {"op": "raw"},
        **fields,
    }
    data = records.encode(rec)
    head = records.chain_next(prev_head, data)
    store.append([(log_stream(pid), seq, rec["kind"], records.pack_state(head, data))])
    return seq


def prefix_states(service: LedgerService, pid: str) -> Iterator[tuple[int, int, PlatformState]]:
    """(seq, ts, state after seq) for every record, folded by the ledger's own replay code.

    The state object is reused: read what you need before advancing the iterator.
    """
    state = PlatformState(pid)
    for rec in log_records(service, pid):
        # any fingerprint: reversals need the accepted instructions remembered
        apply_record(state, rec, None if rec["kind"] == records.REFUSED_KIND else 0)
        yield rec["seq"], rec["ts"], state

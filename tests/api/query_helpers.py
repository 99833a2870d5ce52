"""A platform history for the query tests, and oracles computed from the log itself.

The oracles never use the read models: they decode the records the log subscription streams
and fold them with the ledger's own replay code (`ledger.fold.apply_record`), so an answer from
the read models is checked against an independent computation of the same prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from api_helpers import CCY, World

from ledger import records
from ledger.api.client import CustodyClient, CustodyError
from ledger.domain import PlatformState
from ledger.fold import apply_record


def make_history(world: World) -> None:
    """Transfers both ways, a captured and a released hold, a fee, a refusal, a reversal by the
    operator; with small pauses so that writer times differ along the log."""
    p1 = world.p1
    for i in range(12):
        p1.transfer(f"t-ab-{i}", "alice", "bob", 100 + i, CCY)
        if i % 3 == 0:
            p1.transfer(f"t-ba-{i}", "bob", "alice", 7, CCY)
        if i % 4 == 1:
            time.sleep(0.004)
    p1.place_hold("h-1", "alice", "carol", 500, CCY, "bid", world.future_ms())
    p1.capture_hold("c-1", "h-1", 300)
    time.sleep(0.004)
    p1.place_hold("h-2", "alice", "carol", 200, CCY, "bid", world.future_ms())
    p1.release_hold("r-2", "h-2", "lost")
    p1.charge_fee("fee-1", "alice", "fee", 50, CCY, "service")
    with pytest.raises(CustodyError) as refused:
        p1.transfer("t-too-much", "carol", "bob", 1_000_000, CCY)
    assert refused.value.reason == "INSUFFICIENT_FUNDS"
    time.sleep(0.004)
    world.operator.reverse("rev-1", "t-ab-0", "mistake", platform_id="p1")


def log_records(client: CustodyClient, platform_id: str = "p1") -> list[dict[str, Any]]:
    return [records.decode(r.record) for r in client.subscribe_log(0, platform_id=platform_id)]


@dataclass(frozen=True)
class Snapshot:
    seq: int
    ts: int
    posted: int
    held: int
    available: int


def account_after_each(recs: list[dict[str, Any]], account: str) -> list[Snapshot]:
    """The account's balances after each record (0 before it is opened), by replaying."""
    state = PlatformState(recs[0]["platform"])
    out = []
    for rec in recs:
        apply_record(state, rec, None if rec["kind"] == records.REFUSED_KIND else 0)
        acc = state.accounts.get(account)
        if acc is None:
            out.append(Snapshot(rec["seq"], rec["ts"], 0, 0, 0))
        else:
            out.append(
                Snapshot(
                    rec["seq"], rec["ts"], acc.posted_minor, acc.held_minor, acc.available_minor
                )
            )
    return out


def refused_with(
    exc: pytest.ExceptionInfo[CustodyError], code: grpc.StatusCode, reason: str
) -> None:
    assert exc.value.code is code, exc.value
    assert exc.value.reason == reason, exc.value
    assert exc.value.domain == "custody.v1"

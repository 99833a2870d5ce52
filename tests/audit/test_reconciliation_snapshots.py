"""The verifier recomputes a reconciliation's requirement at its snapshot when it still knows it:
at the request's own position, or at a business-day boundary (where the daily reconciliation of
the day before takes its snapshot, reconciliation/ledger_view.py), however many records later the
request comes. A snapshot elsewhere is counted as unchecked, never failed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from bundle_tools import lines_of, rebuild, verify_bytes  # type: ignore[import-not-found]
from helpers import (  # type: ignore[import-not-found]
    CHECKER,
    OPERATOR,
    FakeClock,
    deposit,
    make_platform,
    ok,
)

from ledger import commands as c
from ledger.service import LedgerService
from reconciliation.ledger_view import day_end_ms
from reconciliation.ledger_view import read as read_ledger

D1, D2 = "2023-11-15", "2023-11-16"
OFFSET = 8 * 3_600_000  # the policy's business day starts at 00:00 UTC+8
HOUR = 3_600_000


def _reconcile(
    service: LedgerService, clock: FakeClock, rid: str, snapshot: int, requirement: int
) -> int:
    """Request a reconciliation (bank closing 500 above the requirement) and have it approved;
    the position of the request."""
    closing = requirement + 500
    cmd = c.RecordReconciliation(
        client_id=rid,
        reconciliation_id=rid,
        currency="CNY",
        as_of_ms=clock.now,
        snapshot_size=snapshot,
        statements=["ab" * 32, "cd" * 32],
        bank_closing_minor=closing,
        in_transit_minor=0,
        requirement_minor=requirement,
        difference_minor=closing - requirement,
        breaks=0,
        result="excess",
    )
    [asked] = service.execute("p1", [cmd], OPERATOR)
    assert asked.status == "pending", asked
    [done] = service.execute(
        "p1", [c.ApproveRequest(client_id=f"ok-{rid}", request_id=rid)], CHECKER
    )
    assert done.status == "accepted", done
    return service.head("p1")[0] - 2


def test_requirement_at_a_day_boundary_is_recomputed(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    clock.now = day_end_ms(D1, OFFSET) - 5 * HOUR  # D1, 19:00 local
    p = make_platform(service)
    alice, bob, carol = p.customers
    ok(service, "p1", deposit(p, "d1", alice, 40_000), deposit(p, "d-susp", p.susp, 3_000))
    ok(
        service,
        "p1",
        c.Transfer(
            client_id="t1",
            from_account_id=alice,
            to_account_id=bob,
            amount_minor=1_000,
            currency="CNY",
        ),
    )
    clock.now = day_end_ms(D1, OFFSET) + HOUR  # D2 01:00: the first record of D2 opens the day
    ok(service, "p1", deposit(p, "d2", bob, 2_000), deposit(p, "d3", carol, 700))
    clock.now = day_end_ms(D2, OFFSET) + HOUR  # D3
    ok(service, "p1", deposit(p, "d4", carol, 300))
    # D1's figures, as the daily reconciliation takes them: the log up to D1's last record
    d1 = read_ledger(service.store, "p1", D1)
    assert d1.requirement["CNY"] == 43_000 and d1.snapshot_size < d1.size
    at_day = _reconcile(service, clock, "r-d1", d1.snapshot_size, d1.requirement["CNY"])
    # now, taken a record before the request: a snapshot the replay cannot recompute
    now = read_ledger(service.store, "p1")
    ok(service, "p1", deposit(p, "d5", carol, 50))
    clock.advance(HOUR)  # a later cut-off: one reconciliation per currency and cut-off
    _reconcile(service, clock, "r-now", now.snapshot_size, now.requirement["CNY"])

    buf = io.BytesIO()
    service.export("p1", buf)
    data = buf.getvalue()
    vkey = service.vkey("p1")
    failure, summary = verify_bytes(data, vkey)
    assert failure is None, failure.describe()
    assert (summary.reconciliations, summary.requirements_checked) == (2, 1)
    assert summary.requirements_unchecked == 1

    # the D1 request with the requirement understated (figures still adding up): named there
    lines = lines_of(data)
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    records = [ln.raw.split(b" ", 3)[3][:-1] for ln in lines if ln.kind == "record"]
    rec: dict[str, Any] = json.loads(records[at_day])
    assert rec["kind"] == "approval_requested" and rec["cid"] == "r-d1"
    rec["cmd"]["requirement_minor"] -= 3_000  # the suspense balance left out
    rec["cmd"]["difference_minor"] += 3_000
    records[at_day] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    signer = service._platform("p1").checkpoints.signer
    failure, _ = verify_bytes(rebuild(header, records, signer, []), vkey)
    assert failure is not None and (failure.where, failure.position) == ("record", at_day)
    assert "not the customer + suspense balance 43000 CNY" in failure.reason, failure.reason

"""SettleReconciliation: a checker-approved bank transfer that settles a recorded difference,
in the reconciliation's currency, never past what is left."""

from __future__ import annotations

from helpers import CHECKER, OPERATOR, START_MS, Platform, bal, deposit, ok

from ledger import commands as c
from ledger.service import LedgerService


def _record(service: LedgerService, p: Platform, difference: int) -> None:
    closing = 1_000 + difference
    cmd = c.RecordReconciliation(
        client_id="rc1",
        reconciliation_id="rc-1",
        currency="CNY",
        as_of_ms=START_MS,
        snapshot_size=1,
        statements=["ab" * 32],
        bank_closing_minor=closing,
        in_transit_minor=0,
        requirement_minor=1_000,
        difference_minor=difference,
        breaks=0,
        result="shortfall" if difference < 0 else "excess",
    )
    assert service.execute(p.id, [cmd], OPERATOR)[0].status == "pending"
    approve = c.ApproveRequest(client_id="ok-rc1", request_id="rc1")
    assert service.execute(p.id, [approve], CHECKER)[0].kind == "reconciliation_completed"


def _settle(p: Platform, cid: str, amount: int, currency: str = "CNY") -> c.SettleReconciliation:
    return c.SettleReconciliation(
        client_id=cid,
        reconciliation_id="rc-1",
        own_account_id=p.own,
        platform_bank_account_id=p.pbank,
        amount_minor=amount,
        currency=currency,
    )


def _approved(service: LedgerService, p: Platform, cmd: c.Command) -> str:
    asked = service.execute(p.id, [cmd], OPERATOR)[0]
    if asked.status != "pending":
        return asked.code
    return service.execute(
        p.id, [c.ApproveRequest(client_id=f"ok-{cmd.client_id}", request_id=cmd.client_id)], CHECKER
    )[0].kind


def test_a_shortfall_is_covered_from_own_funds_never_past_what_is_left(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    ok(service, p.id, deposit(p, "d1", "alice", 1_000))
    own = c.Deposit(
        client_id="own", mirror_account_id=p.pbank, account_id=p.own, amount_minor=500,
        currency="CNY",
    )  # fmt: skip
    ok(service, p.id, own)
    _record(service, p, -100)
    assert _approved(service, p, _settle(p, "too-much", 150)) == "INVALID_AMOUNT"
    assert _approved(service, p, _settle(p, "usd", 50, "USD")) == "CURRENCY_MISMATCH"
    assert _approved(service, p, _settle(p, "s1", 60)) == "reconciliation_settled"
    assert _approved(service, p, _settle(p, "s2", 40)) == "reconciliation_settled"
    assert _approved(service, p, _settle(p, "s3", 1)) == "INVALID_ARGUMENT"  # nothing left
    assert bal(service, p.id, p.own)[0] == 400  # own funds paid the 100 into the custody bank
    assert bal(service, p.id, "alice")[0] == 1_000  # customer liabilities unchanged

"""A scripted workload over three business days (UTC+8) for the disclosure tests, with the
figures of its middle day worked out by hand (not by any code under test).

Day 0 = 2023-11-14 (before the period): the platform, its accounts, alice's deposit.
Day 1 = 2023-11-15 (the period): every kind of movement, holds, withdrawals, a maker-checker
reversal (and a rejected one), a reconciliation shortfall partly covered by a settlement a
checker approves, refusals of three codes, large-value tags.
Day 2 = 2023-11-16 (after the period): one deposit.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from helpers import (
    BOOKKEEPING_POLICY,
    CHECKER,
    OPERATOR,
    START_MS,
    FakeClock,
    Platform,
    deposit,
    hold,
    make_platform,
    ok,
    run1,
    transfer,
)

from controls.policy import DAY_MS, LvtThresholds, Policy
from ledger import commands as c
from ledger.service import LedgerService

PLATFORM_ID: Final = "p1"
DAY1: Final = "2023-11-15"
# business day 2023-11-15 in UTC+8 starts at 2023-11-14T16:00Z
DAY1_FROM_MS: Final = 1_699_977_600_000
DAY1_TO_MS: Final = DAY1_FROM_MS + DAY_MS
LVT_MINOR: Final = 1_000_000

POLICY: Final = msgspec.structs.replace(
    BOOKKEEPING_POLICY,
    approval_ops=frozenset({"reverse"}),  # reversals go through a checker
    lvt={"CNY": LvtThresholds(individual_minor=LVT_MINOR, corporate_minor=5 * LVT_MINOR)},
)


def _fee(p: Platform, cid: str, src: str, amount: int, code: str) -> c.ChargeFee:
    return c.ChargeFee(
        client_id=cid,
        from_account_id=src,
        to_account_id=p.fee,
        amount_minor=amount,
        currency=p.currency,
        fee_code=code,
    )


def _withdraw(p: Platform, cid: str, account: str, amount: int, expires: int) -> c.Command:
    return c.RequestWithdrawal(
        client_id=cid,
        account_id=account,
        mirror_account_id=p.omni,
        amount_minor=amount,
        currency=p.currency,
        payee_ref="bank-1",
        expires_at_ms=expires,
    )


def _as(service: LedgerService, actor: str, cmd: c.Command) -> Any:
    [outcome] = service.execute(PLATFORM_ID, [cmd], actor)
    return outcome


def run_workload(
    service: LedgerService, clock: FakeClock, policy: Policy = POLICY, recent_kinds: bool = True
) -> Platform:
    """The three days; `recent_kinds=False` leaves out the alert, reconciliation and
    settlement records (a log of the older kinds only)."""
    clock.now = START_MS - DAY_MS  # 2023-11-14 06:13:20 in UTC+8
    p = make_platform(service, PLATFORM_ID, policy=policy)
    alice, bob, carol = p.customers  # lender, borrower, guarantor
    ok(service, PLATFORM_ID, deposit(p, "d-alice", alice, 5_000_000))

    clock.now = START_MS  # 2023-11-15 06:13:20 in UTC+8
    far = clock.now + 7 * DAY_MS
    ok(
        service,
        PLATFORM_ID,
        deposit(p, "d-bob", bob, 2_000_000),  # LVT in (bob)
        c.Deposit(
            client_id="d-susp",
            mirror_account_id=p.omni,
            account_id=p.susp,
            amount_minor=30_000,
            currency=p.currency,
        ),
        c.Deposit(
            client_id="d-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=100_000,
            currency=p.currency,
        ),
        transfer(p, "t-bid", alice, bob, 1_200_000, "bid"),  # LVT out (alice) and in (bob)
        transfer(p, "t-rep", bob, carol, 100_000, "repayment"),
        transfer(p, "t-x", alice, carol, 50_000),  # LVT out (alice: day total 1,250,000)
        _fee(p, "f1", carol, 1_000, "svc"),
        _fee(p, "f2", bob, 2_000, "F"),
        hold(p, "h1", carol, bob, 20_000, far, "bid"),
        hold(p, "h2", bob, alice, 30_000, far, "judicial"),
        c.CaptureHold(client_id="cap-h2", hold_id="h2", amount_minor=10_000),
        hold(p, "h3", carol, alice, 5_000, far, "bid"),
        c.ReleaseHold(client_id="rel-h3", hold_id="h3", reason="lost bid"),
        _withdraw(p, "w1", carol, 10_000, far),
        c.SettleWithdrawal(client_id="s-w1", withdrawal_id="w1"),
        _withdraw(p, "w2", bob, 7_000, far),
        c.FailWithdrawal(client_id="f-w2", withdrawal_id="w2", reason="bank refused"),
        _withdraw(p, "w3", alice, 3_000, far),  # in transit at the end
        c.TopUpShortfall(
            client_id="tu1",
            from_account_id=p.own,
            to_account_id=alice,
            amount_minor=5_000,
            currency=p.currency,
            reason="cure",
        ),
    )
    # suspense clearing by an operator (a manual operation, no checker under this policy)
    ok(service, PLATFORM_ID, transfer(p, "clr", p.susp, carol, 30_000, "clearing"))
    # maker-checker: one reversal approved, one rejected
    rev1 = _as(service, OPERATOR, c.Reverse(client_id="rev1", movement_id="t-x", reason="typo"))
    assert rev1.status == "pending", rev1
    assert _as(service, CHECKER, c.ApproveRequest(client_id="ok1", request_id="rev1")).status == (
        "accepted"
    )
    rev2 = _as(service, OPERATOR, c.Reverse(client_id="rev2", movement_id="t-bid", reason="?"))
    assert rev2.status == "pending", rev2
    rejected = _as(
        service, CHECKER, c.RejectRequest(client_id="no2", request_id="rev2", reason="valid")
    )
    assert rejected.status == "accepted", rejected
    if recent_kinds:
        _alerts_and_reconciliation(service)
    _refusals(service, p)
    clock.now = START_MS + DAY_MS  # 2023-11-16: after the period
    ok(service, PLATFORM_ID, deposit(p, "d-late", carol, 1_000))
    return p


def _alerts_and_reconciliation(service: LedgerService) -> None:
    # alerts: a YELLOW one closed by an operator, a RED one acknowledged by a checker
    for alert_id, rule, level in (("al1", "refusal_spike", "YELLOW"), ("al2", "shortfall", "RED")):
        raised = _as(
            service,
            OPERATOR,
            c.RaiseAlert(
                client_id=alert_id, alert_id=alert_id, rule=rule, level=level, summary="-"
            ),
        )
        assert raised.status == "accepted", raised
    closed = _as(service, OPERATOR, c.CloseAlert(client_id="x-al1", alert_id="al1", reason="ok"))
    assert closed.status == "accepted", closed
    acked = _as(service, CHECKER, c.AcknowledgeAlert(client_id="k-al2", alert_id="al2", note="-"))
    assert acked.status == "accepted", acked
    # the day's reconciliation, signed off by a checker: a shortfall of 7,000
    recon = c.RecordReconciliation(
        client_id="rec1",
        reconciliation_id="r-2023-11-15",
        currency="CNY",
        as_of_ms=START_MS + 1000,
        snapshot_size=12,
        statements=["ab" * 32],
        bank_closing_minor=7_015_000,
        in_transit_minor=0,
        requirement_minor=7_022_000,
        difference_minor=-7_000,
        breaks=1,
        result="shortfall",
    )
    assert _as(service, OPERATOR, recon).status == "pending"
    assert _as(
        service, CHECKER, c.ApproveRequest(client_id="ok-rec1", request_id="rec1")
    ).status == ("accepted")
    # the platform covers 4,000 of it from its own bank (own funds -> platform bank)
    settle = c.SettleReconciliation(
        client_id="settle1",
        reconciliation_id="r-2023-11-15",
        own_account_id="own",
        platform_bank_account_id="pbank",
        amount_minor=4_000,
        currency="CNY",
    )
    assert _as(service, OPERATOR, settle).status == "pending"
    approved = _as(service, CHECKER, c.ApproveRequest(client_id="ok-s1", request_id="settle1"))
    assert approved.kind == "reconciliation_settled", approved


def _refusals(service: LedgerService, p: Platform) -> None:
    alice, bob, carol = p.customers
    # refusals of three codes
    too_much = run1(service, PLATFORM_ID, transfer(p, "bad1", carol, alice, 10_000_000))
    assert too_much.status == "refused" and too_much.code == "INSUFFICIENT_FUNDS", too_much
    no_fee = run1(service, PLATFORM_ID, _fee(p, "bad2", bob, 10, "NOPE"))
    assert no_fee.status == "refused" and no_fee.code == "FEE_NOT_IN_SCHEDULE", no_fee
    regulator = _as(service, "regulator:rita", deposit(p, "bad3", alice, 1))
    assert regulator.status == "refused" and regulator.code == "ROLE_NOT_PERMITTED", regulator


def _m(count: int, amount: int) -> dict[str, int]:
    return {"count": count, "amount_minor": amount}


# Day 1's figures, by hand from the script above.
EXPECTED_BALANCES: Final = {
    # 5,000,000 + 2,000,000 + 30,000 deposited, 10,000 paid out
    "custody_omnibus": 7_020_000,
    "platform_bank": 96_000,  # 100,000 - 4,000 (settle1)
    "customer_liabilities": {
        # alice: 5,000,000 - 1,200,000 - 50,000 + 10,000 (h2) + 50,000 (rev1) + 5,000 (tu1)
        "lender": 3_815_000,
        # bob: 2,000,000 + 1,200,000 - 100,000 - 2,000 (f2) - 10,000 (h2)
        "borrower": 3_088_000,
        # carol: 100,000 + 50,000 - 1,000 (f1) - 10,000 (w1) - 50,000 (rev1) + 30,000 (clr)
        "guarantor": 119_000,
        "other": 0,
        "total": 7_022_000,
    },
    "suspense": 0,
    "customer_money": 7_022_000,
    "own_funds": 91_000,  # 100,000 - 5,000 (tu1) - 4,000 (settle1)
    "fee_income": 3_000,
    "custody_minus_customer_money": -2_000,
    "coverage_bp": 9_997,  # floor(7,020,000 * 10,000 / 7,022,000)
}
EXPECTED_HOLDS: Final = {
    "pending_by_reason": {"bid": _m(1, 20_000)},
    "pending_total": _m(1, 20_000),
    "withdrawals_in_transit": _m(1, 3_000),
    "pending_past_expiry": _m(0, 0),
}
EXPECTED_FLOWS: Final = {
    "deposits": _m(1, 2_000_000),
    "deposits_unidentified": _m(1, 30_000),
    "own_funds_deposits": _m(1, 100_000),
    "fees_total": _m(2, 3_000),
    "fees": {"svc": _m(1, 1_000), "F": _m(1, 2_000)},
    "top_ups": _m(1, 5_000),
    "reversals": _m(1, 50_000),
    "manual_adjustments": _m(4, 89_000),  # tu1, clr, rev1, settle1
    "reconciliation_settlements": {
        "shortfall_covered": _m(1, 4_000),  # settle1
        "excess_returned": _m(0, 0),
    },
    "holds_placed": _m(3, 55_000),
    "holds_captured": _m(1, 10_000),
    "holds_released": _m(1, 5_000),
    "holds_expired": _m(0, 0),
    "withdrawals_requested": _m(3, 20_000),
    "withdrawals_settled": _m(1, 10_000),
    "withdrawals_failed": _m(1, 7_000),
    "withdrawals_expired": _m(0, 0),
    "platform_withdrawals_requested": _m(0, 0),
    "platform_withdrawals_settled": _m(0, 0),
    "platform_withdrawals_failed": _m(0, 0),
    "platform_withdrawals_expired": _m(0, 0),
    "transfers": {
        "bid": _m(1, 1_200_000),
        "clearing": _m(1, 30_000),
        "compensation": _m(0, 0),
        "disbursement": _m(0, 0),
        "repayment": _m(1, 100_000),
        "transfer": _m(1, 50_000),
    },
}
EXPECTED_LARGE_VALUE: Final = {
    "in": {"count": 2, "amount_minor": 3_200_000, "accounts": 1},  # d-bob, t-bid
    "out": {"count": 2, "amount_minor": 1_250_000, "accounts": 1},  # t-bid, t-x
}
EXPECTED_DAILY_DAY1: Final = {
    "day": DAY1,
    "from_ms": DAY1_FROM_MS,
    "to_ms": DAY1_TO_MS,
    "deposits": 2_030_000,
    "withdrawals": 10_000,
    "transfers": 1_380_000,
    "fees": 3_000,
    "custody_end": 7_020_000,
    "customer_money_end": 7_022_000,
}
EXPECTED_CUSTOMERS: Final = {
    "total": 3,
    "open": 3,
    "new": 0,
    "active": 3,
    "funded": 3,
    "by_role": {
        "lender": {"total": 1, "open": 1, "new": 0, "active": 1, "funded": 1},
        "borrower": {"total": 1, "open": 1, "new": 0, "active": 1, "funded": 1},
        "guarantor": {"total": 1, "open": 1, "new": 0, "active": 1, "funded": 1},
        "other": {"total": 0, "open": 0, "new": 0, "active": 0, "funded": 0},
    },
}
EXPECTED_REFUSALS: Final = {
    "total": 3,
    "by_code": {"INSUFFICIENT_FUNDS": 1, "FEE_NOT_IN_SCHEDULE": 1, "ROLE_NOT_PERMITTED": 1},
    "by_control": {"available_funds": 1, "segregation": 1, "roles": 1},
    "suppressed": 0,
    "authorisation_failures": 0,
}
EXPECTED_APPROVALS: Final = {
    "requested": 4,
    "approved": 3,
    "rejected": 1,
    "by_op": {
        "reverse": {"requested": 2, "approved": 1, "rejected": 1},
        "record_reconciliation": {"requested": 1, "approved": 1, "rejected": 0},
        "settle_reconciliation": {"requested": 1, "approved": 1, "rejected": 0},
    },
    "open_at_end": 0,
    "open_past_expiry_at_end": 0,
}
EXPECTED_MANUAL: Final = {
    "reverse": {"count": 1, "approved": 1},
    "top_up_shortfall": {"count": 1, "approved": 0},
    "clear_suspense": {"count": 1, "approved": 0},
    "record_reconciliation": {"count": 1, "approved": 1},
    "settle_reconciliation": {"count": 1, "approved": 1},
}
EXPECTED_ALERTS: Final = {
    "engine": (
        "alert records in the log (raised by the early-warning engine, docs/RISK.md, "
        "or by an operator)"
    ),
    "by_level": {
        "GREEN": {"raised": 0, "acknowledged": 0, "closed": 0, "open_at_end": 0},
        "YELLOW": {"raised": 1, "acknowledged": 0, "closed": 1, "open_at_end": 0},
        "ORANGE": {"raised": 0, "acknowledged": 0, "closed": 0, "open_at_end": 0},
        "RED": {"raised": 1, "acknowledged": 1, "closed": 0, "open_at_end": 1},
    },
    "by_rule": {"refusal_spike": 1, "shortfall": 1},
    "open_at_end": 1,
}
EXPECTED_RECONCILIATION: Final = {
    "completed": 1,
    "results": {"balanced": 0, "excess": 0, "shortfall": 1},
    "days_reconciled": 1,
    "max_shortfall_minor": 7_000,
    "shortfall_total_minor": 7_000,
    "last": {
        "id": "r-2023-11-15",
        # "seq" is where the checker's approval landed; the test finds it in the log
        "as_of_ms": START_MS + 1000,
        "snapshot": 12,
        "bank_closing_minor": 7_015_000,
        "in_transit_minor": 0,
        "requirement_minor": 7_022_000,
        "difference_minor": -7_000,
        "breaks": 1,
        "result": "shortfall",
    },
}
EXPECTED_KINDS: Final = {
    "deposited": 3,
    "transferred": 4,
    "fee_charged": 2,
    "hold_placed": 3,
    "hold_captured": 1,
    "hold_released": 1,
    "withdrawal_requested": 3,
    "withdrawal_settled": 1,
    "withdrawal_failed": 1,
    "shortfall_topped_up": 1,
    "approval_requested": 4,
    "alert_raised": 2,
    "alert_closed": 1,
    "alert_acknowledged": 1,
    "reconciliation_completed": 1,
    "reconciliation_settled": 1,
    "reversed": 1,
    "approval_rejected": 1,
    "command_refused": 3,
}
# platform_created, 8 accounts, d-alice
EXPECTED_BEFORE: Final = 10

"""Roles (who may start what) and segregation (customer money never becomes platform money
except by a published fee or a shortfall top-up), under the strict default policy."""

from __future__ import annotations

import msgspec
import pytest
from ctl_helpers import (
    CHECKER,
    OPERATOR,
    PLATFORM,
    CtlPlatform,
    MakePlatform,
    accepted,
    approve,
    assert_refused,
    available,
    deposit,
    fund,
    new_key,
    pending,
    place_hold,
    posted,
    pub_b64,
    transfer,
    withdrawal,
)

from controls.policy import DEFAULT_POLICY, FeeRule
from ledger import commands as c
from ledger.service import LedgerService

ROLES = "roles"
SEG = "segregation"


@pytest.fixture
def funded(service: LedgerService, p: CtlPlatform) -> CtlPlatform:
    fund(service, p, "alice", 10_000)
    accepted(
        service,
        p,
        c.Deposit(
            client_id="own-capital",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=50_000,
            currency="CNY",
        ),
    )
    return p


def test_platform_relays_a_signed_customer_transfer(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    out = accepted(service, p, p.sign(transfer("t1", "alice", "bob", 700), "alice"))
    assert out.kind == "transferred"
    assert (available(service, p, "alice"), available(service, p, "bob")) == (9_300, 700)


@pytest.mark.parametrize(
    ("actor", "make_cmd", "code"),
    [
        # the platform never runs manual operations
        (
            PLATFORM,
            lambda p: c.Reverse(client_id="x", movement_id="own-capital", reason="r"),
            "ROLE_NOT_PERMITTED",
        ),
        (
            PLATFORM,
            lambda p: c.SetPolicy(
                client_id="x", policy=msgspec.structs.replace(DEFAULT_POLICY, version=1)
            ),
            "ROLE_NOT_PERMITTED",
        ),
        (
            PLATFORM,
            lambda p: c.SetGate(client_id="x", gate="FROZEN", reason="r"),
            "ROLE_NOT_PERMITTED",
        ),
        (
            PLATFORM,
            lambda p: c.ResetKey(
                client_id="x", account_id="alice", public_key=pub_b64(new_key()), reason="lost"
            ),
            "ROLE_NOT_PERMITTED",
        ),
        (
            PLATFORM,
            lambda p: c.UnfreezeAccount(client_id="x", account_id="alice", reason="r"),
            "ROLE_NOT_PERMITTED",
        ),
        # suspense clearing is the custodian's
        (PLATFORM, lambda p: transfer("x", p.susp, "alice", 10), "ROLE_NOT_PERMITTED"),
        # the operator never moves customer money on a customer's behalf
        (
            OPERATOR,
            lambda p: p.sign(transfer("x", "alice", "bob", 10), "alice"),
            "ROLE_NOT_PERMITTED",
        ),
        (
            OPERATOR,
            lambda p: p.sign(place_hold("x", "alice", "bob", 10, p.clock.now + 3_600_000), "alice"),
            "ROLE_NOT_PERMITTED",
        ),
        (
            OPERATOR,
            lambda p: p.sign(
                withdrawal(p, "x", "alice", 10, "alice-bank", p.clock.now + 3_600_000), "alice"
            ),
            "ROLE_NOT_PERMITTED",
        ),
        (
            OPERATOR,
            lambda p: c.ChargeFee(
                client_id="x",
                from_account_id="alice",
                to_account_id=p.fee,
                amount_minor=1,
                currency="CNY",
                fee_code="svc",
            ),
            "ROLE_NOT_PERMITTED",
        ),
        # checkers only approve or reject; readers never write
        (CHECKER, lambda p: deposit(p, "x", "alice", 10), "ROLE_NOT_PERMITTED"),
        ("auditor:eve", lambda p: deposit(p, "x", "alice", 10), "ROLE_NOT_PERMITTED"),
        (
            "regulator:csrc",
            lambda p: c.FreezeAccount(client_id="x", account_id="alice", reason="r"),
            "ROLE_NOT_PERMITTED",
        ),
        (
            "system:sweeper",
            lambda p: p.sign(transfer("x", "alice", "bob", 10), "alice"),
            "ROLE_NOT_PERMITTED",
        ),
        # approvals are a checker's
        (
            PLATFORM,
            lambda p: c.ApproveRequest(client_id="x", request_id="any"),
            "CHECKER_ROLE_REQUIRED",
        ),
        (
            OPERATOR,
            lambda p: c.ApproveRequest(client_id="x", request_id="any"),
            "CHECKER_ROLE_REQUIRED",
        ),
        (
            OPERATOR,
            lambda p: c.RejectRequest(client_id="x", request_id="any", reason="no"),
            "CHECKER_ROLE_REQUIRED",
        ),
    ],
    ids=[
        "platform-reverse",
        "platform-set-policy",
        "platform-set-gate",
        "platform-reset-key",
        "platform-unfreeze",
        "platform-clears-suspense",
        "operator-transfer",
        "operator-hold",
        "operator-withdrawal",
        "operator-fee",
        "checker-deposit",
        "auditor-deposit",
        "regulator-freeze",
        "system-transfer",
        "platform-approves",
        "operator-approves",
        "operator-rejects",
    ],
)
def test_role_refusals(
    service: LedgerService, funded: CtlPlatform, actor: str, make_cmd: object, code: str
) -> None:
    cmd = make_cmd(funded)  # type: ignore[operator]
    rec = assert_refused(service, funded, cmd, code, ROLES, actor=actor)
    assert rec["actor"] == actor


def test_operator_clears_suspense_with_a_checker(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    accepted(service, p, deposit(p, "unknown-receipt", p.susp, 900))
    req = pending(service, p, transfer("clear-1", p.susp, "bob", 900, purpose="clearing"))
    assert posted(service, p, "bob") == 0
    out = approve(service, p, "clear-1")
    assert out.status == "accepted" and out.kind == "transferred", out
    assert posted(service, p, "bob") == 900 and posted(service, p, p.susp) == 0
    assert req.seq < out.seq


# -- segregation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_cmd",
    [
        lambda p: p.sign(transfer("x", "alice", p.own, 100), "alice"),
        lambda p: transfer("x", "alice", p.own, 100),
        lambda p: p.sign(transfer("x", "alice", p.fee, 100), "alice"),
        lambda p: p.sign(place_hold("x", "alice", p.fee, 100, p.clock.now + 3_600_000), "alice"),
        lambda p: p.sign(
            c.RequestWithdrawal(
                client_id="x",
                account_id="alice",
                mirror_account_id=p.pbank,
                amount_minor=100,
                currency="CNY",
                payee_ref="alice-bank",
                expires_at_ms=p.clock.now + 3_600_000,
            ),
            "alice",
        ),
        lambda p: c.Deposit(
            client_id="x",
            mirror_account_id=p.pbank,
            account_id="alice",
            amount_minor=100,
            currency="CNY",
        ),
        lambda p: c.Deposit(
            client_id="x",
            mirror_account_id=p.omni,
            account_id=p.own,
            amount_minor=100,
            currency="CNY",
        ),
        lambda p: c.ChargeFee(
            client_id="x",
            from_account_id=p.own,
            to_account_id="alice",
            amount_minor=100,
            currency="CNY",
            fee_code="svc",
        ),
    ],
    ids=[
        "signed-transfer-to-own-funds",
        "unsigned-transfer-to-own-funds",
        "transfer-to-fee-income",
        "hold-towards-fee-income",
        "withdrawal-via-platform-bank",
        "deposit-from-platform-bank",
        "customer-receipt-to-own-funds",
        "reverse-direction-fee",
    ],
)
def test_segregation_breaches(
    service: LedgerService, funded: CtlPlatform, make_cmd: object
) -> None:
    cmd = make_cmd(funded)  # type: ignore[operator]
    assert_refused(service, funded, cmd, "SEGREGATION_BREACH", SEG)


def test_shortfall_top_up_is_whitelisted_with_a_checker(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    cmd = c.TopUpShortfall(
        client_id="topup-1",
        from_account_id=p.own,
        to_account_id="bob",
        amount_minor=1_500,
        currency="CNY",
        reason="shortfall on project 7",
    )
    pending(service, p, cmd)
    assert posted(service, p, "bob") == 0
    out = approve(service, p, "topup-1")
    assert out.kind == "shortfall_topped_up", out
    assert (posted(service, p, "bob"), posted(service, p, p.own)) == (1_500, 48_500)


def test_fee_not_in_the_default_schedule(service: LedgerService, funded: CtlPlatform) -> None:
    fee = c.ChargeFee(
        client_id="fee-1",
        from_account_id="alice",
        to_account_id=funded.fee,
        amount_minor=100,
        currency="CNY",
        fee_code="svc",
    )
    assert_refused(service, funded, fee, "FEE_NOT_IN_SCHEDULE", SEG)


def test_fee_schedule(service: LedgerService, make: MakePlatform) -> None:
    p = make(fees={"svc": FeeRule(fixed_minor=100), "var": FeeRule(max_minor=500)})
    fund(service, p, "alice", 10_000)

    def fee(cid: str, code: str, amount: int) -> c.ChargeFee:
        return c.ChargeFee(
            client_id=cid,
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=amount,
            currency="CNY",
            fee_code=code,
        )

    accepted(service, p, fee("f1", "svc", 100))
    accepted(service, p, fee("f2", "var", 500))
    accepted(service, p, fee("f3", "var", 1))
    assert posted(service, p, p.fee) == 601
    assert_refused(service, p, fee("f4", "svc", 101), "FEE_NOT_IN_SCHEDULE", SEG)
    assert_refused(service, p, fee("f5", "svc", 99), "FEE_NOT_IN_SCHEDULE", SEG)
    assert_refused(service, p, fee("f6", "var", 501), "FEE_NOT_IN_SCHEDULE", SEG)
    assert_refused(service, p, fee("f7", "other", 1), "FEE_NOT_IN_SCHEDULE", SEG)
    # a refund of a charged fee is a whitelisted crossing too (a manual reversal)
    pending(service, p, c.Reverse(client_id="refund-f1", movement_id="f1", reason="waived"))
    out = approve(service, p, "refund-f1")
    assert out.kind == "reversed", out
    assert posted(service, p, p.fee) == 501 and posted(service, p, "alice") == 10_000 - 501

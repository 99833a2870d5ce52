"""End-to-end scenarios, one per risk the custody business exists to stop (issue #3, "How it
is checked"). Each runs under the strict default policy on SQLite and PostgreSQL."""

from __future__ import annotations

import msgspec
import pytest
from ctl_helpers import (
    CHECKER,
    OPERATOR,
    OPERATOR2,
    PLATFORM,
    SYSTEM,
    CtlPlatform,
    accepted,
    approve,
    assert_refused,
    available,
    bind,
    bind_payee,
    customer_money,
    ex,
    fund,
    new_key,
    pending,
    place_hold,
    posted,
    pub_b64,
    transfer,
    withdrawal,
)
from helpers import log_records

from controls.policy import DAY_MS, HOUR_MS
from ledger import commands as c
from ledger.service import LedgerService


@pytest.fixture
def funded(service: LedgerService, p: CtlPlatform) -> CtlPlatform:
    fund(service, p, "alice", 50_000_000)
    fund(service, p, "bob", 10_000)
    bind(service, p, "alice")
    return p


def test_platform_cannot_move_customer_money_to_its_own_account(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    before = customer_money(service, p.id)
    exp = p.clock.now + HOUR_MS
    attempts: list[c.Command] = [
        transfer("grab-1", "alice", p.own, 1_000),
        p.sign(transfer("grab-2", "alice", p.own, 1_000), "alice"),  # even with consent
        transfer("grab-3", "alice", p.fee, 1_000),
        p.sign(place_hold("grab-4", "alice", p.fee, 1_000, exp), "alice"),
        c.ChargeFee(
            client_id="grab-5",
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=1_000,
            currency="CNY",
            fee_code="made-up",
        ),
        p.sign(
            c.RequestWithdrawal(
                client_id="grab-6",
                account_id="alice",
                mirror_account_id=p.pbank,
                amount_minor=1_000,
                currency="CNY",
                payee_ref="alice-bank",
                expires_at_ms=exp,
            ),
            "alice",
        ),
    ]
    codes = []
    for cmd in attempts:
        out = ex(service, p, cmd)
        assert out.status == "refused", out
        codes.append(out.code)
    assert codes == ["SEGREGATION_BREACH"] * 4 + ["FEE_NOT_IN_SCHEDULE", "SEGREGATION_BREACH"]
    # and as an operator it cannot either: manual reversal of the customer's deposit is a
    # request a checker sees, never a silent move
    assert (
        ex(service, p, transfer("grab-7", "alice", p.own, 1), OPERATOR).code == "ROLE_NOT_PERMITTED"
    )
    refusals = {r["cid"]: r for r in log_records(service, p.id) if r["kind"] == "command_refused"}
    for cmd, code in zip(attempts, codes, strict=True):
        rec = refusals[cmd.client_id]
        assert (rec["actor"], rec["code"], rec["pv"]) == (PLATFORM, code, 0)
    assert customer_money(service, p.id) == before
    assert posted(service, p, p.own) == posted(service, p, p.fee) == 0


def test_duplicate_instruction_moves_money_once(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    signed = p.sign(transfer("pay-1", "alice", "bob", 2_500), "alice")
    first = accepted(service, p, signed)
    for _ in range(3):
        again = ex(service, p, signed)
        assert (again.status, again.seq) == ("replayed", first.seq)
    # the platform resubmits it under new client ids: the authorisation was spent
    for i in range(2):
        out = ex(service, p, msgspec.structs.replace(signed, client_id=f"pay-1-retry-{i}"))
        assert out.code == "REPLAYED", out
    assert posted(service, p, "bob") == 12_500
    moves = [r for r in log_records(service, p.id) if r["kind"] == "transferred"]
    assert [r["cid"] for r in moves] == ["pay-1"]


def test_stolen_session_cannot_withdraw_to_another_bank_account(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    thief_key = new_key()
    exp = p.clock.now + HOUR_MS
    before = available(service, p, "alice")
    # straight to the thief's account: not bound
    wd = withdrawal(p, "steal-1", "alice", 1_000, "thief-bank", exp)
    assert ex(service, p, wd).code == "AUTHORISATION_REQUIRED"
    assert (
        ex(
            service,
            p,
            p.sign(msgspec.structs.replace(wd, client_id="steal-2"), "alice", key=thief_key),
        ).code
        == "AUTHORISATION_INVALID"
    )
    # rebinding to the thief's account without the customer's key
    rebind = bind_payee(p, "steal-3", "alice", payee_ref="thief-bank", bank="6666-6666")
    assert ex(service, p, rebind).code == "AUTHORISATION_REQUIRED"
    # replacing the customer's key
    swap = c.RegisterKey(client_id="steal-4", account_id="alice", public_key=pub_b64(thief_key))
    assert ex(service, p, swap).code == "AUTHORISATION_REQUIRED"
    # a same-name account that is the thief's: the name does not match
    named = p.sign(
        bind_payee(p, "steal-5", "alice", payee_ref="thief-bank", bank="6666-6666", name="Thief"),
        "alice",
    )
    assert ex(service, p, named).code == "PAYEE_NAME_MISMATCH"
    # even if the customer is tricked into signing a rebinding, the cool-off holds the payout
    tricked = p.sign(
        bind_payee(p, "steal-6", "alice", payee_ref="thief-bank", bank="6666-6666"), "alice"
    )
    accepted(service, p, tricked)
    cool = p.sign(withdrawal(p, "steal-7", "alice", 1_000, "thief-bank", exp), "alice")
    assert_refused(service, p, cool, "PAYOUT_COOLOFF", "payout_binding")
    assert available(service, p, "alice") == before
    assert not [r for r in log_records(service, p.id) if r["kind"] == "withdrawal_requested"]


def test_hold_past_its_expiry_is_released_by_the_sweep(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    now = p.clock.now
    accepted(
        service,
        p,
        p.sign(
            place_hold("bid-1", "alice", "bob", 7_000, now + HOUR_MS, owner_ref="proj-1"), "alice"
        ),
    )
    accepted(
        service,
        p,
        p.sign(withdrawal(p, "wd-1", "alice", 3_000, "alice-bank", now + 2 * HOUR_MS), "alice"),
    )
    assert available(service, p, "alice") == 50_000_000 - 10_000
    p.clock.advance(HOUR_MS)
    accepted(service, p, c.ExpireHolds(client_id="sweep-1"), SYSTEM)
    assert available(service, p, "alice") == 50_000_000 - 3_000  # the bid hold expired
    p.clock.advance(HOUR_MS)
    accepted(service, p, c.ExpireHolds(client_id="sweep-2"), SYSTEM)
    assert available(service, p, "alice") == 50_000_000
    assert posted(service, p, "alice") == 50_000_000
    assert (
        ex(
            service,
            p,
            c.CaptureHold(client_id="cap", hold_id="bid-1", amount_minor=1, owner_ref="proj-1"),
        ).code
        == "HOLD_NOT_PENDING"
    )
    expired = [r["resolve"] for r in log_records(service, p.id) if r["kind"] == "holds_expired"]
    assert expired == [[["bid-1", 0, "expired"]], [["wd-1", 0, "expired"]]]


def test_large_manual_adjustment_waits_for_a_second_person(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    accepted(
        service,
        p,
        c.Deposit(
            client_id="own-cap",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=40_000_000,
            currency="CNY",
        ),
    )
    top_up = c.TopUpShortfall(
        client_id="adj-1",
        from_account_id=p.own,
        to_account_id="bob",
        amount_minor=30_000_000,
        currency="CNY",
        reason="loss on project 9",
    )
    reversal = c.Reverse(client_id="adj-2", movement_id="own-cap", reason="wrong account")
    pending(service, p, top_up)
    pending(service, p, reversal, actor=OPERATOR2)
    before = posted(service, p, "bob")
    # the makers, another operator and the platform cannot approve
    for actor, rid in (
        (OPERATOR, "adj-1"),
        (OPERATOR2, "adj-2"),
        (OPERATOR2, "adj-1"),
        (PLATFORM, "adj-1"),
    ):
        out = ex(
            service, p, c.ApproveRequest(client_id=f"try:{actor}:{rid}", request_id=rid), actor
        )
        assert out.code == "CHECKER_ROLE_REQUIRED", out
    assert posted(service, p, "bob") == before  # nothing happened yet
    out = approve(service, p, "adj-1")
    assert out.kind == "shortfall_topped_up"
    assert posted(service, p, "bob") == before + 30_000_000
    # the reversal is now refused on the state of the moment: own funds are spent
    out = ex(service, p, c.ApproveRequest(client_id="ok:adj-2", request_id="adj-2"), CHECKER)
    assert out.code == "INSUFFICIENT_FUNDS", out
    executed = [r for r in log_records(service, p.id) if r.get("executes")]
    assert [(r["executes"], r["actor"]) for r in executed] == [("adj-1", CHECKER)]


def test_old_signature_with_a_new_nonce_is_refused(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    signed = p.sign(transfer("pay-1", "alice", "bob", 1_000), "alice")
    accepted(service, p, signed)
    assert signed.auth is not None
    forged = msgspec.structs.replace(
        signed,
        client_id="pay-2",
        auth=msgspec.structs.replace(signed.auth, nonce=signed.auth.nonce + "x"),
    )
    rec = assert_refused(service, p, forged, "AUTHORISATION_INVALID", "customer_authorisation")
    assert rec["auth_failed"] == "alice"
    assert posted(service, p, "bob") == 11_000


def test_same_signed_authorisation_under_a_new_client_id_is_refused(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    signed = p.sign(
        withdrawal(p, "wd-1", "alice", 1_000, "alice-bank", p.clock.now + DAY_MS), "alice"
    )
    accepted(service, p, signed)
    again = msgspec.structs.replace(signed, client_id="wd-2")
    assert_refused(service, p, again, "REPLAYED", "customer_authorisation")
    assert available(service, p, "alice") == 50_000_000 - 1_000


def test_platform_cannot_give_a_funded_keyless_account_its_own_key(
    service: LedgerService, p: CtlPlatform
) -> None:
    """Trust on first use ends once money arrived: otherwise a platform could register its
    own key on a funded keyless account, bind a same-name bank account and pay itself out."""
    fund(service, p, "dave", 10_000)
    platform_key = new_key()
    grab = c.RegisterKey(client_id="k", account_id="dave", public_key=pub_b64(platform_key))
    assert_refused(service, p, grab, "AUTHORISATION_REQUIRED", "customer_authorisation")
    # a first key for a funded account is a manual reset: an operator and a checker
    reset = c.ResetKey(
        client_id="reset",
        account_id="dave",
        public_key=pub_b64(platform_key),
        reason="customer identified at the branch",
    )
    pending(service, p, reset)
    assert approve(service, p, "reset").kind == "key_registered"

"""Payout binding (withdrawals only to the customer's bound, same-name bank account, with a
cool-off after a rebinding) and holds discipline (bounded expiry, owning reference)."""

from __future__ import annotations

import msgspec
import pytest
from ctl_helpers import (
    CtlPlatform,
    MakePlatform,
    accepted,
    assert_refused,
    available,
    bind,
    bind_payee,
    ex,
    fund,
    place_hold,
    posted,
    tick,
    withdrawal,
)
from helpers import log_records

from controls.policy import DAY_MS, HOUR_MS
from ledger import commands as c
from ledger.service import LedgerService

PB = "payout_binding"
CA = "customer_authorisation"
HOLDS = "holds"


@pytest.fixture
def funded(service: LedgerService, p: CtlPlatform) -> CtlPlatform:
    fund(service, p, "alice", 100_000)
    fund(service, p, "bob", 100_000)
    return p


def _wd(
    p: CtlPlatform, cid: str, amount: int = 1_000, payee: str = "alice-bank"
) -> c.RequestWithdrawal:
    return withdrawal(p, cid, "alice", amount, payee, p.clock.now + HOUR_MS)


# -- payout binding -------------------------------------------------------------------------------


def test_withdrawal_to_the_bound_account(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    bind(service, p, "alice")
    out = accepted(service, p, p.sign(_wd(p, "w1"), "alice"))
    assert out.kind == "withdrawal_requested"
    assert available(service, p, "alice") == 99_000
    accepted(service, p, c.SettleWithdrawal(client_id="s1", withdrawal_id="w1", bank_ref="b-1"))
    assert posted(service, p, "alice") == 99_000
    # the bank account is sealed in the log, never in clear
    rec = next(r for r in log_records(service, p.id) if r["kind"] == "payee_bound")
    assert p["alice"].bank not in msgspec.json.encode(rec).decode()
    assert p["alice"].name not in msgspec.json.encode(rec).decode()


def test_withdrawal_refusals(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    assert_refused(service, p, p.sign(_wd(p, "w-unbound"), "alice"), "PAYEE_NOT_BOUND", PB)
    bind(service, p, "alice")
    assert_refused(
        service, p, p.sign(_wd(p, "w-other", payee="mallory-bank"), "alice"), "PAYEE_NOT_BOUND", PB
    )
    assert_refused(service, p, _wd(p, "w-unsigned"), "AUTHORISATION_REQUIRED", CA)


def test_binding_refusals(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    # the holder of the bank account must be the customer (compared blinded)
    mismatch = p.sign(bind_payee(p, "b-name", "alice", name="Mallory Thief"), "alice")
    assert_refused(service, p, mismatch, "PAYEE_NAME_MISMATCH", PB)
    # the customer signs the binding; the platform cannot bind on its own
    assert_refused(service, p, bind_payee(p, "b-unsigned", "alice"), "AUTHORISATION_REQUIRED", CA)
    forged = p.sign(bind_payee(p, "b-forged", "alice", bank="9999-mallory"), "bob")
    assert_refused(service, p, forged, "AUTHORISATION_INVALID", CA)
    # only customer accounts bind payees
    own = c.BindPayee(
        client_id="b-own", account_id=p.own, payee_ref="x", bank_account="1", holder_name="P"
    )
    assert_refused(service, p, own, "ACCOUNT_NOT_FOUND", "integrity")
    # bob's own signature does not make another person's account his
    other = bind_payee(p, "b-other", "bob", bank=p["dave"].bank, name=p["dave"].name)
    assert_refused(service, p, p.sign(other, "bob"), "PAYEE_NAME_MISMATCH", PB)


def test_cool_off_after_a_rebinding(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    bind(service, p, "alice")  # the first binding has no cool-off
    accepted(service, p, p.sign(_wd(p, "w1"), "alice"))
    p.clock.advance(HOUR_MS)
    rebind = bind_payee(p, "rebind", "alice", payee_ref="alice-new", bank="6222-7777-0001")
    accepted(service, p, p.sign(rebind, "alice"))
    assert_refused(
        service, p, p.sign(_wd(p, "w2", payee="alice-new"), "alice"), "PAYOUT_COOLOFF", PB
    )
    # the old account is no longer bound
    assert_refused(service, p, p.sign(_wd(p, "w3"), "alice"), "PAYEE_NOT_BOUND", PB)
    p.clock.advance(DAY_MS - 1)
    assert_refused(
        service, p, p.sign(_wd(p, "w4", payee="alice-new"), "alice"), "PAYOUT_COOLOFF", PB
    )
    p.clock.advance(1)
    accepted(service, p, p.sign(_wd(p, "w5", payee="alice-new"), "alice"))


def test_cool_off_is_a_policy_parameter(service: LedgerService, make: MakePlatform) -> None:
    p = make(payout_cooloff_ms=HOUR_MS)
    fund(service, p, "alice", 10_000)
    bind(service, p, "alice")
    accepted(service, p, p.sign(bind_payee(p, "rebind", "alice", payee_ref="alice-2"), "alice"))
    assert_refused(service, p, p.sign(_wd(p, "w1", payee="alice-2"), "alice"), "PAYOUT_COOLOFF", PB)
    p.clock.advance(HOUR_MS)
    accepted(service, p, p.sign(_wd(p, "w2", payee="alice-2"), "alice"))


def test_unbound_payouts_when_the_policy_allows(service: LedgerService, make: MakePlatform) -> None:
    p = make(require_bound_payee=0)
    fund(service, p, "alice", 10_000)
    accepted(service, p, p.sign(_wd(p, "w1", payee="anywhere"), "alice"))
    # the customer's signature is still required
    assert_refused(service, p, _wd(p, "w2", payee="anywhere"), "AUTHORISATION_REQUIRED", CA)


# -- holds ----------------------------------------------------------------------------------------


def test_hold_with_owner_reference(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    exp = p.clock.now + DAY_MS
    accepted(
        service,
        p,
        p.sign(place_hold("h1", "alice", "bob", 5_000, exp, owner_ref="proj-7"), "alice"),
    )
    for cmd in (
        c.CaptureHold(client_id="cap-x", hold_id="h1", amount_minor=100, owner_ref="proj-8"),
        c.CaptureHold(client_id="cap-y", hold_id="h1", amount_minor=100),
        c.ReleaseHold(client_id="rel-x", hold_id="h1", reason="r", owner_ref="proj-8"),
        c.ReleaseHold(client_id="rel-y", hold_id="h1", reason="r"),
    ):
        assert_refused(service, p, cmd, "HOLD_REFERENCE_INVALID", HOLDS)
    assert_refused(
        service,
        p,
        c.CaptureHold(client_id="cap-big", hold_id="h1", amount_minor=5_001, owner_ref="proj-7"),
        "HOLD_EXCEEDED",
        "integrity",
    )
    accepted(
        service,
        p,
        c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=3_000, owner_ref="proj-7"),
    )
    assert (posted(service, p, "alice"), posted(service, p, "bob")) == (97_000, 103_000)
    assert available(service, p, "alice") == 97_000  # the remainder went back

    accepted(
        service,
        p,
        p.sign(place_hold("h2", "alice", "bob", 1_000, exp, owner_ref="proj-9"), "alice"),
    )
    accepted(
        service, p, c.ReleaseHold(client_id="rel", hold_id="h2", reason="lost", owner_ref="proj-9")
    )
    assert available(service, p, "alice") == 97_000


def test_hold_placement_refusals(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    now = p.clock.now
    assert_refused(
        service,
        p,
        p.sign(place_hold("h-long", "alice", "bob", 10, now + 30 * DAY_MS + 1), "alice"),
        "HOLD_EXPIRY_INVALID",
        HOLDS,
    )
    bind(service, p, "alice")
    assert_refused(
        service,
        p,
        p.sign(withdrawal(p, "w-long", "alice", 10, "alice-bank", now + 31 * DAY_MS), "alice"),
        "HOLD_EXPIRY_INVALID",
        HOLDS,
    )
    assert_refused(
        service,
        p,
        p.sign(place_hold("h-past", "alice", "bob", 10, now), "alice"),
        "HOLD_EXPIRY_INVALID",
        "integrity",
    )
    assert_refused(
        service,
        p,
        p.sign(place_hold("h-why", "alice", "bob", 10, now + HOUR_MS, reason=""), "alice"),
        "HOLD_REASON_REQUIRED",
        "integrity",
    )
    accepted(
        service, p, p.sign(place_hold("h-max", "alice", "bob", 10, now + 30 * DAY_MS), "alice")
    )


def test_hold_max_is_a_policy_parameter(service: LedgerService, make: MakePlatform) -> None:
    p = make(hold_max_ms=HOUR_MS)
    fund(service, p, "alice", 1_000)
    now = p.clock.now
    assert_refused(
        service,
        p,
        p.sign(place_hold("h1", "alice", "bob", 10, now + HOUR_MS + 1), "alice"),
        "HOLD_EXPIRY_INVALID",
        HOLDS,
    )
    accepted(service, p, p.sign(place_hold("h2", "alice", "bob", 10, now + HOUR_MS), "alice"))


def test_expired_hold_is_void_and_swept(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    accepted(
        service, p, p.sign(place_hold("h1", "alice", "bob", 2_000, p.clock.now + HOUR_MS), "alice")
    )
    p.clock.advance(HOUR_MS)
    assert_refused(
        service,
        p,
        c.CaptureHold(client_id="late", hold_id="h1", amount_minor=1),
        "HOLD_EXPIRED",
        "integrity",
    )
    assert available(service, p, "alice") == 98_000
    tick(service, p, "sweep-1")
    assert available(service, p, "alice") == 100_000
    rec = log_records(service, p.id)[-1]
    assert rec["kind"] == "holds_expired" and rec["resolve"] == [["h1", 0, "expired"]]
    assert ex(service, p, c.ReleaseHold(client_id="rel", hold_id="h1", reason="r")).code == (
        "HOLD_NOT_PENDING"
    )

"""Customer authorisation: a customer debit needs the customer's Ed25519 signature (bound to
the platform, amount, payee, nonce and expiry) or a standing authorisation within its terms;
bad signatures are recorded and lock the account for a while."""

from __future__ import annotations

import msgspec
import pytest
from ctl_helpers import (
    MINUTE_MS,
    CtlPlatform,
    MakePlatform,
    accepted,
    approve,
    assert_refused,
    available,
    bind_payee,
    ex,
    fund,
    new_key,
    pending,
    place_hold,
    pub_b64,
    sign,
    signature_verifies,
    standing,
    transfer,
    withdrawal,
)
from helpers import log_records

from controls.policy import DAY_MS, HOUR_MS
from ledger import commands as c
from ledger.service import LedgerService

CA = "customer_authorisation"


@pytest.fixture
def funded(service: LedgerService, p: CtlPlatform) -> CtlPlatform:
    for who in ("alice", "bob", "dave"):
        fund(service, p, who, 10_000)
    return p


def _hold_expiry(p: CtlPlatform) -> int:
    return p.clock.now + HOUR_MS


def test_signed_debits_are_accepted(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    accepted(service, p, p.sign(transfer("t1", "alice", "bob", 100), "alice"))
    accepted(service, p, p.sign(place_hold("h1", "alice", "bob", 200, _hold_expiry(p)), "alice"))
    assert available(service, p, "alice") == 9_700
    # the nonce is consumed, kept until its expiry
    with service.reading(p.id) as st:
        assert sum(1 for (acc, _n) in st.nonces if acc == "alice") == 2


@pytest.mark.parametrize(
    ("make_cmd", "code"),
    [
        (lambda p: transfer("x", "alice", "bob", 100), "AUTHORISATION_REQUIRED"),
        (lambda p: place_hold("x", "alice", "bob", 100, _hold_expiry(p)), "AUTHORISATION_REQUIRED"),
        # signed by someone else's key (bob's, or a key the platform made up)
        (lambda p: p.sign(transfer("x", "alice", "bob", 100), "bob"), "AUTHORISATION_INVALID"),
        (
            lambda p: p.sign(transfer("x", "alice", "bob", 100), "alice", key=new_key()),
            "AUTHORISATION_INVALID",
        ),
        # a signature for another platform
        (
            lambda p: sign("p2", transfer("x", "alice", "bob", 100), p["alice"].key, p.expiry()),
            "AUTHORISATION_INVALID",
        ),
        # the platform changes what the customer signed: amount, payee, purpose, expiry
        (
            lambda p: msgspec.structs.replace(
                p.sign(transfer("x", "alice", "bob", 100), "alice"), amount_minor=101
            ),
            "AUTHORISATION_INVALID",
        ),
        (
            lambda p: msgspec.structs.replace(
                p.sign(transfer("x", "alice", "bob", 100), "alice"), to_account_id="carol"
            ),
            "AUTHORISATION_INVALID",
        ),
        (
            lambda p: msgspec.structs.replace(
                p.sign(transfer("x", "alice", "bob", 100), "alice"), purpose="bid"
            ),
            "AUTHORISATION_INVALID",
        ),
        (
            lambda p: (
                lambda t: msgspec.structs.replace(
                    t,
                    auth=msgspec.structs.replace(t.auth, expires_at_ms=t.auth.expires_at_ms + 1),
                )
            )(p.sign(transfer("x", "alice", "bob", 100), "alice")),
            "AUTHORISATION_INVALID",
        ),
        # expiry passed, or further ahead than the policy's TTL (5 minutes)
        (
            lambda p: sign(
                "p1", transfer("x", "alice", "bob", 100), p["alice"].key, p.clock.now - 1
            ),
            "AUTHORISATION_EXPIRED",
        ),
        (
            lambda p: sign(
                "p1",
                transfer("x", "alice", "bob", 100),
                p["alice"].key,
                p.clock.now + 6 * MINUTE_MS,
            ),
            "AUTHORISATION_INVALID",
        ),
        # an account without a registered key cannot be debited on a signature
        (lambda p: p.sign(transfer("x", "dave", "bob", 100), "alice"), "KEY_NOT_REGISTERED"),
        (lambda p: transfer("x", "dave", "bob", 100), "AUTHORISATION_REQUIRED"),
        (lambda p: standing(transfer("x", "alice", "bob", 100), "no-such"), "STANDING_NOT_FOUND"),
    ],
    ids=[
        "unsigned-transfer",
        "unsigned-hold",
        "other-customers-key",
        "made-up-key",
        "other-platform",
        "amount-changed",
        "payee-changed",
        "purpose-changed",
        "expiry-changed",
        "expired",
        "expiry-too-far",
        "no-key-registered",
        "no-key-unsigned",
        "unknown-standing",
    ],
)
def test_refusals(service: LedgerService, funded: CtlPlatform, make_cmd: object, code: str) -> None:
    p = funded
    cmd = make_cmd(p)  # type: ignore[operator]
    rec = assert_refused(service, p, cmd, code, CA)
    # only a signature that does not verify counts towards the lock (not a bad expiry)
    with service.reading(p.id) as st:
        key = st.accounts[cmd.from_account_id].public_key
    signed = cmd.auth is not None and bool(cmd.auth.signature) and bool(key)
    bad_signature = signed and not signature_verifies(p.id, msgspec.to_builtins(cmd), key)
    assert rec.get("auth_failed") == (cmd.from_account_id if bad_signature else None)


def test_same_authorisation_under_a_new_client_id_is_replayed(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    signed = p.sign(transfer("t1", "alice", "bob", 100), "alice")
    accepted(service, p, signed)
    assert ex(service, p, signed).status == "replayed"  # same id: the same answer, no new record
    again = msgspec.structs.replace(signed, client_id="t1-again")
    assert_refused(service, p, again, "REPLAYED", CA)
    assert available(service, p, "bob") == 10_100


def test_first_key_then_rotation_signed_by_the_old_key(
    service: LedgerService, p: CtlPlatform
) -> None:
    fund(service, p, "alice", 10_000)
    # dave has no key and never held money: the platform registers his first key at
    # onboarding (trust on first use)
    dave_key = new_key()
    accepted(
        service,
        p,
        c.RegisterKey(client_id="k-dave", account_id="dave", public_key=pub_b64(dave_key)),
    )
    fund(service, p, "dave", 10_000)
    accepted(service, p, p.sign(transfer("t-dave", "dave", "bob", 10), "dave", key=dave_key))
    # alice's key exists: replacing it needs her signature with the current key
    new = new_key()
    swap = c.RegisterKey(client_id="k-alice", account_id="alice", public_key=pub_b64(new))
    assert_refused(service, p, swap, "AUTHORISATION_REQUIRED", CA)
    assert_refused(
        service,
        p,
        msgspec.structs.replace(p.sign(swap, "alice", key=new), client_id="k-alice2"),
        "AUTHORISATION_INVALID",
        CA,
    )
    accepted(service, p, msgspec.structs.replace(p.sign(swap, "alice"), client_id="k-alice3"))
    old_signed = p.sign(transfer("t-old", "alice", "bob", 10), "alice")
    assert_refused(service, p, old_signed, "AUTHORISATION_INVALID", CA)
    p["alice"].key = new
    accepted(service, p, p.sign(transfer("t-new", "alice", "bob", 10), "alice"))
    with service.reading(p.id) as st:
        assert st.accounts["alice"].public_key == pub_b64(new)


def test_lost_key_reset_needs_an_operator_and_a_checker(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    new = new_key()
    reset = c.ResetKey(
        client_id="reset-1", account_id="alice", public_key=pub_b64(new), reason="lost"
    )
    pending(service, p, reset)
    with service.reading(p.id) as st:
        assert st.accounts["alice"].public_key == p["alice"].pub  # not before the checker
    out = approve(service, p, "reset-1")
    assert out.kind == "key_registered", out
    p["alice"].key = new
    accepted(service, p, p.sign(transfer("t1", "alice", "bob", 10), "alice"))


# -- standing authorisations ----------------------------------------------------------------------


def _grant(
    p: CtlPlatform, sid: str, cap: int = 1_000, payee: str = "bob", days: int = 1
) -> c.GrantStanding:
    return c.GrantStanding(
        client_id=f"grant-{sid}",
        account_id="alice",
        standing_id=sid,
        purpose="bid",
        payee_account_id=payee,
        per_txn_max_minor=cap,
        valid_until_ms=p.clock.now + days * DAY_MS,
    )


def test_standing_authorisation_within_its_terms(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    assert_refused(service, p, _grant(p, "auto-bid"), "AUTHORISATION_REQUIRED", CA)
    grant = msgspec.structs.replace(p.sign(_grant(p, "auto-bid"), "alice"), client_id="grant-ok")
    accepted(service, p, grant)
    accepted(service, p, standing(transfer("b1", "alice", "bob", 1_000, purpose="bid"), "auto-bid"))
    accepted(
        service, p, standing(place_hold("b2", "alice", "bob", 500, _hold_expiry(p)), "auto-bid")
    )
    assert available(service, p, "alice") == 8_500

    for cid, cmd, code in [
        ("s-cap", transfer("s-cap", "alice", "bob", 1_001, purpose="bid"), "AUTHORISATION_INVALID"),
        (
            "s-payee",
            transfer("s-payee", "alice", "carol", 10, purpose="bid"),
            "AUTHORISATION_INVALID",
        ),
        ("s-purpose", transfer("s-purpose", "alice", "bob", 10), "AUTHORISATION_INVALID"),
        ("s-other", transfer("s-other", "bob", "alice", 10, purpose="bid"), "STANDING_NOT_FOUND"),
        (
            "s-wd",
            withdrawal(p, "s-wd", "alice", 10, "alice-bank", _hold_expiry(p)),
            "AUTHORISATION_INVALID",
        ),
    ]:
        assert cmd.client_id == cid
        assert_refused(service, p, standing(cmd, "auto-bid"), code, CA)

    # expired after its validity
    p.clock.advance(DAY_MS + 1)
    assert_refused(
        service,
        p,
        standing(transfer("late", "alice", "bob", 10, purpose="bid"), "auto-bid"),
        "AUTHORISATION_EXPIRED",
        CA,
    )


def test_revoked_standing_authorisation(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    accepted(service, p, p.sign(_grant(p, "auto-repay"), "alice"))
    accepted(
        service, p, c.RevokeStanding(client_id="rv", account_id="alice", standing_id="auto-repay")
    )
    assert_refused(
        service,
        p,
        standing(transfer("b1", "alice", "bob", 10, purpose="bid"), "auto-repay"),
        "STANDING_NOT_FOUND",
        CA,
    )


def test_standing_validity_is_bounded_by_policy(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    too_long = p.sign(_grant(p, "forever", days=366), "alice")
    assert_refused(service, p, too_long, "AUTHORISATION_INVALID", "integrity")


def test_standing_terms_violation_is_not_a_bad_signature(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    accepted(service, p, p.sign(_grant(p, "auto-bid", cap=100), "alice"))
    rec = assert_refused(
        service,
        p,
        standing(transfer("over", "alice", "bob", 101, purpose="bid"), "auto-bid"),
        "AUTHORISATION_INVALID",
        CA,
    )
    assert "auth_failed" not in rec


# -- lockout after bad signatures -----------------------------------------------------------------


def _bad_signatures(service: LedgerService, p: CtlPlatform, n: int, prefix: str = "bad") -> None:
    for i in range(n):
        forged = p.sign(transfer(f"{prefix}-{i}", "alice", "bob", 10), "alice", key=new_key())
        rec = assert_refused(service, p, forged, "AUTHORISATION_INVALID", CA)
        assert rec["auth_failed"] == "alice"


def test_lockout_after_max_failures_and_unlock_after_lock_time(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    _bad_signatures(service, p, 4)
    accepted(service, p, p.sign(transfer("ok-1", "alice", "bob", 10), "alice"))  # 4 < 5: not yet
    _bad_signatures(service, p, 1, "bad5")
    # locked: even a valid signature, for any signed operation of alice
    for cmd in (
        p.sign(transfer("l1", "alice", "bob", 10), "alice"),
        p.sign(place_hold("l2", "alice", "bob", 10, _hold_expiry(p)), "alice"),
        p.sign(bind_payee(p, "l3", "alice"), "alice"),
        p.sign(
            c.RegisterKey(client_id="l4", account_id="alice", public_key=pub_b64(new_key())),
            "alice",
        ),
    ):
        rec = assert_refused(service, p, cmd, "AUTHORISATION_LOCKED", CA)
        assert "auth_failed" not in rec  # the lock refusal is not a new failure
    accepted(service, p, p.sign(transfer("bob-ok", "bob", "alice", 10), "bob"))  # bob is not locked
    with service.reading(p.id) as st:
        assert len(st.auth_failures["alice"]) == 5
    # the lock ends auth_lock_ms (30 minutes) after the last failure
    p.clock.advance(30 * MINUTE_MS + 1)
    accepted(service, p, p.sign(transfer("ok-2", "alice", "bob", 10), "alice"))


def test_lock_lasts_auth_lock_ms_not_the_failure_window(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    _bad_signatures(service, p, 5)
    p.clock.advance(20 * MINUTE_MS)  # past the 15 minute window, inside the 30 minute lock
    assert_refused(
        service, p, p.sign(transfer("t", "alice", "bob", 10), "alice"), "AUTHORISATION_LOCKED", CA
    )


def test_auth_max_failures_is_a_policy_parameter(
    service: LedgerService, make: MakePlatform
) -> None:
    p = make(auth_max_failures=2)
    fund(service, p, "alice", 1_000)
    _bad_signatures(service, p, 2)
    assert_refused(
        service, p, p.sign(transfer("t", "alice", "bob", 10), "alice"), "AUTHORISATION_LOCKED", CA
    )


def test_auth_lock_ms_is_a_policy_parameter(service: LedgerService, make: MakePlatform) -> None:
    p = make(auth_lock_ms=5 * MINUTE_MS)
    fund(service, p, "alice", 1_000)
    _bad_signatures(service, p, 5)
    p.clock.advance(4 * MINUTE_MS)
    assert_refused(
        service, p, p.sign(transfer("t1", "alice", "bob", 10), "alice"), "AUTHORISATION_LOCKED", CA
    )
    p.clock.advance(MINUTE_MS + 1)
    accepted(service, p, p.sign(transfer("t2", "alice", "bob", 10), "alice"))


def test_refusal_budget_does_not_bypass_the_lockout(
    service: LedgerService, make: MakePlatform
) -> None:
    p = make(refusal_records_per_min=3)
    fund(service, p, "alice", 1_000)
    for i in range(10):  # all in the same minute
        forged = p.sign(transfer(f"bad-{i}", "alice", "bob", 10), "alice", key=new_key())
        codes = ("AUTHORISATION_INVALID",) if i < 5 else ("AUTHORISATION_LOCKED",)
        assert ex(service, p, forged).code in codes
    out = ex(service, p, p.sign(transfer("t", "alice", "bob", 10), "alice"))
    assert out.code == "AUTHORISATION_LOCKED", out


def test_suppressed_refusals_are_counted_on_the_next_record(
    service: LedgerService, make: MakePlatform
) -> None:
    p = make(refusal_records_per_min=3)
    for i in range(5):
        out = ex(service, p, transfer(f"u-{i}", "alice", "bob", 10))
        assert out.code == "INSUFFICIENT_FUNDS"
    refusals = [r for r in log_records(service, p.id) if r["kind"] == "command_refused"]
    assert [r["cid"] for r in refusals] == ["u-0", "u-1", "u-2"]
    p.clock.advance(MINUTE_MS)
    ex(service, p, transfer("u-5", "alice", "bob", 10))
    last = log_records(service, p.id)[-1]
    assert (last["cid"], last["suppressed"]) == ("u-5", 2)

"""Property: whatever a platform-role actor sends, customer money (customer + suspense
balances) only goes down through instructions its customers signed (withdrawals) or through
whitelisted flows (fees per the published schedule).

Hypothesis writes random programs of platform instructions, honest and hostile (unsigned,
forged, tampered, replayed, to platform accounts, to foreign bank accounts, key and payee
swaps). The check reads the log alone and verifies every signature independently of the
ledger's own (memoised) verification.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from ctl_helpers import (
    MINUTE_MS,
    PLATFORM,
    SYSTEM,
    CtlPlatform,
    bind,
    bind_payee,
    customer_money,
    ex,
    make_ctl_platform,
    new_key,
    place_hold,
    pub_b64,
    signature_verifies,
    standing,
    transfer,
    withdrawal,
)
from helpers import BOOKKEEPING_POLICY, FakeClock, assert_balanced, assert_no_negative, log_records
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controls.policy import DEFAULT_POLICY, HOUR_MS, FeeRule
from ledger import commands as c
from ledger.service import LedgerService

FEE_CODE = "svc"
FEE = 50
POLICY = msgspec.structs.replace(DEFAULT_POLICY, fees={FEE_CODE: FeeRule(fixed_minor=FEE)})
WHO = ("alice", "bob", "carol", "dan")
# every customer has a key here: a keyless account is a separate, known gap (see
# test_scenarios.test_platform_registers_its_own_key_on_a_keyless_account)
NAMES = (
    ("alice", "Alice Liddell", "individual"),
    ("bob", "Bob Marley", "individual"),
    ("carol", "Carol Corp Ltd", "corporate"),
    ("dan", "Dan Brown", "individual"),
)
CUSTOMER_SIDE = frozenset({"customer", "suspense"})

OPS = (
    "deposit",
    "deposit_suspense",
    "signed_transfer",
    "unsigned_transfer",
    "forged_transfer",
    "tampered_transfer",
    "replay",
    "renonce",
    "to_own",
    "to_fee",
    "fee",
    "fee_wrong",
    "signed_hold",
    "unsigned_hold",
    "hold_to_fee",
    "capture",
    "release",
    "signed_withdrawal",
    "unsigned_withdrawal",
    "thief_withdrawal",
    "settle",
    "fail",
    "reverse",
    "top_up",
    "thief_key",
    "thief_bind",
    "grant",
    "thief_grant",
    "use_standing",
    "clear_suspense",
    "expire",
    "advance",
    "freeze",
    "approve",
)
# honest instructions weigh more, so that money really moves (and settles) in most programs
WEIGHTED = (
    *OPS,
    *("signed_transfer", "signed_hold", "capture", "signed_withdrawal", "settle", "fee") * 3,
)
_platforms = itertools.count()


@dataclass
class World:
    service: LedgerService
    p: CtlPlatform
    thief = new_key()
    signed: list[c.Command] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)
    withdrawals: list[str] = field(default_factory=list)
    standing: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    n: itertools.count[int] = field(default_factory=itertools.count)

    def cid(self, op: str) -> str:
        return f"{op}-{next(self.n)}"


def _command(w: World, op: str, i: int, j: int, amount: int) -> tuple[c.Command, str] | None:
    p = w.p
    a, b = WHO[i], WHO[j if j != i else (j + 1) % len(WHO)]
    cid = w.cid(op)
    exp = p.clock.now + HOUR_MS
    if op == "deposit":
        return c.Deposit(
            client_id=cid,
            mirror_account_id=p.omni,
            account_id=a,
            amount_minor=amount * 10,
            currency="CNY",
        ), PLATFORM
    if op == "deposit_suspense":
        return c.Deposit(
            client_id=cid,
            mirror_account_id=p.omni,
            account_id=p.susp,
            amount_minor=amount,
            currency="CNY",
        ), PLATFORM
    if op in ("signed_transfer", "unsigned_transfer", "forged_transfer", "tampered_transfer"):
        t = transfer(cid, a, b, amount)
        if op == "unsigned_transfer":
            return t, PLATFORM
        if op == "forged_transfer":
            return p.sign(t, a, key=w.thief), PLATFORM
        signed = p.sign(t, a)
        if op == "tampered_transfer":
            return msgspec.structs.replace(
                signed, amount_minor=amount + 1, to_account_id=b
            ), PLATFORM
        w.signed.append(signed)
        return signed, PLATFORM
    if op in ("replay", "renonce"):
        if not w.signed:
            return None
        old: Any = w.signed[(i * 7 + j) % len(w.signed)]
        if op == "replay" or old.auth is None:
            return msgspec.structs.replace(old, client_id=cid), PLATFORM
        auth = msgspec.structs.replace(old.auth, nonce=old.auth.nonce + "r")
        return msgspec.structs.replace(old, client_id=cid, auth=auth), PLATFORM
    if op in ("to_own", "to_fee"):
        t = transfer(cid, a, p.own if op == "to_own" else p.fee, amount)
        return (p.sign(t, a) if j % 2 else t), PLATFORM
    if op in ("fee", "fee_wrong"):
        return c.ChargeFee(
            client_id=cid,
            from_account_id=a,
            to_account_id=p.fee,
            amount_minor=FEE if op == "fee" else amount,
            currency="CNY",
            fee_code=FEE_CODE if op == "fee" else "other",
        ), PLATFORM
    if op in ("signed_hold", "unsigned_hold", "hold_to_fee"):
        h = place_hold(cid, a, p.fee if op == "hold_to_fee" else b, amount, exp, owner_ref=f"o{j}")
        if op != "unsigned_hold":
            h = p.sign(h, a)
        w.holds.append(cid)
        return h, PLATFORM
    if op in ("capture", "release"):
        if not w.holds:
            return None
        hid = w.holds[-1 - (i + j) % min(3, len(w.holds))]
        owner = f"o{j}" if amount % 3 else f"o{i}"
        if op == "capture":
            return c.CaptureHold(
                client_id=cid, hold_id=hid, amount_minor=amount, owner_ref=owner
            ), PLATFORM
        return c.ReleaseHold(client_id=cid, hold_id=hid, reason="lost", owner_ref=owner), PLATFORM
    if op in ("signed_withdrawal", "unsigned_withdrawal", "thief_withdrawal"):
        payee = "thief-bank" if op == "thief_withdrawal" else f"{a}-bank"
        wd: Any = withdrawal(p, cid, a, amount, payee, exp)
        if op == "signed_withdrawal":
            wd = p.sign(wd, a)
            w.signed.append(wd)
        elif op == "thief_withdrawal":
            wd = p.sign(wd, a, key=w.thief)
        w.withdrawals.append(cid)
        return wd, PLATFORM
    if op in ("settle", "fail"):
        if not w.withdrawals:
            return None
        wid = w.withdrawals[-1 - (i + j) % min(3, len(w.withdrawals))]
        if op == "settle":
            return c.SettleWithdrawal(client_id=cid, withdrawal_id=wid, bank_ref="b"), PLATFORM
        return c.FailWithdrawal(client_id=cid, withdrawal_id=wid, reason="bounced"), PLATFORM
    if op == "reverse":
        if not w.done:
            return None
        return c.Reverse(
            client_id=cid, movement_id=w.done[(i + j) % len(w.done)], reason="platform says so"
        ), PLATFORM
    if op == "top_up":
        return c.TopUpShortfall(
            client_id=cid,
            from_account_id=p.own,
            to_account_id=a,
            amount_minor=amount,
            currency="CNY",
            reason="r",
        ), PLATFORM
    if op == "thief_key":
        k = c.RegisterKey(client_id=cid, account_id=a, public_key=pub_b64(w.thief))
        return (p.sign(k, a, key=w.thief) if j % 2 else k), PLATFORM
    if op == "thief_bind":
        bp = bind_payee(
            p, cid, a, payee_ref="thief-bank", bank="6666-0000", name="Thief" if j % 3 == 0 else ""
        )
        return (p.sign(bp, a, key=w.thief) if j % 2 else bp), PLATFORM
    if op in ("grant", "thief_grant"):
        sid = f"s-{cid}"
        g = c.GrantStanding(
            client_id=cid,
            account_id=a,
            standing_id=sid,
            purpose="bid",
            payee_account_id=b,
            per_txn_max_minor=amount,
            valid_until_ms=p.clock.now + 24 * HOUR_MS,
        )
        if op == "grant":
            g = p.sign(g, a)
        elif op == "thief_grant":
            g = p.sign(g, a, key=w.thief)
        w.standing.append(sid)
        return g, PLATFORM
    if op == "use_standing":
        if not w.standing:
            return None
        sid = w.standing[(i + j) % len(w.standing)]
        return standing(transfer(cid, a, b, amount, purpose="bid"), sid), PLATFORM
    if op == "clear_suspense":
        return transfer(cid, p.susp, a, amount, purpose="clearing"), PLATFORM
    if op == "expire":
        return c.ExpireHolds(client_id=cid), SYSTEM
    if op == "freeze":
        return c.FreezeAccount(client_id=cid, account_id=a, reason="r"), PLATFORM
    if op == "approve":
        return c.ApproveRequest(client_id=cid, request_id=f"top_up-{j}"), PLATFORM
    raise AssertionError(op)


def run_program(w: World, program: list[tuple[str, int, int, int]]) -> None:
    for op, i, j, amount in program:
        if op == "advance":
            w.p.clock.advance((amount % 120 + 1) * MINUTE_MS)
            continue
        built = _command(w, op, i, j, amount)
        if built is None:
            continue
        cmd, actor = built
        out = ex(w.service, w.p, cmd, actor)
        assert out.status in ("accepted", "refused", "pending", "invalid"), out
        event(f"{op}: {out.status} {out.code}".strip())
        if out.status == "accepted" and isinstance(cmd, c.Deposit | c.Transfer):
            w.done.append(cmd.client_id)


def check_customer_money_from_the_log(service: LedgerService, platform_id: str) -> None:
    """Every accepted record that takes money out of customer money is a signed withdrawal's
    settlement or a fee per schedule; every customer debit was signed (or covered by a
    standing authorisation the customer signed); no authorisation was used twice."""
    kinds: dict[str, str] = {}
    keys: dict[str, str] = {}
    holds: dict[str, dict[str, Any]] = {}  # hold id -> hold spec + the record that placed it
    standings: dict[str, dict[str, Any]] = {}
    used_nonces: set[tuple[str, str]] = set()
    inflow = outflow = 0

    def signed_by_customer(rec: dict[str, Any], account: str) -> bool:
        return signature_verifies(platform_id, rec["cmd"], keys.get(account, ""))

    for rec in log_records(service, platform_id):
        kind = rec["kind"]
        if kind in ("command_refused", "approval_requested", "platform_created"):
            continue
        cmd = rec["cmd"]
        if kind == "account_opened":
            kinds[rec["account"]["id"]] = rec["account"]["kind"]
            keys[rec["account"]["id"]] = cmd.get("public_key", "")
            continue
        assert rec["actor"] in (PLATFORM, SYSTEM), rec  # nobody else acts in the program
        if kind == "key_registered":
            account = rec["key"]["account"]
            assert not keys[account] or signed_by_customer(rec, account), rec
            keys[account] = rec["key"]["pub"]
        if kind == "payee_bound":
            # the customer signed the bank account and name in clear; the log holds only
            # their blinds, so this signature cannot be checked from the log alone
            assert cmd["auth"]["signature"], rec
        if kind == "standing_granted":
            assert signed_by_customer(rec, cmd["account_id"]), rec
            standings[rec["standing"]["id"]] = rec["standing"]
        auth = cmd.get("auth")
        if auth and auth.get("nonce"):
            account = cmd.get("from_account_id") or cmd["account_id"]
            assert (account, auth["nonce"]) not in used_nonces, rec
            used_nonces.add((account, auth["nonce"]))
        debit = None
        if "hold" in rec:
            holds[rec["hold"]["id"]] = {**rec["hold"], "rec": rec}
            debit = rec["hold"]["debit"]
        elif kind == "transferred":
            debit = rec["entries"][0][0]
        if debit is not None and kinds[debit] == "customer":
            if auth and auth.get("standing_id"):
                grant = standings[auth["standing_id"]]
                assert grant["account"] == debit and cmd["amount_minor"] <= grant["cap"], rec
                assert rec["ts"] <= grant["until"] and cmd.get("purpose", "bid") == grant["purpose"]
            else:
                assert signed_by_customer(rec, debit), rec
        moves = [tuple(e) for e in rec.get("entries", ())]
        for hold_id, captured, _status in rec.get("resolve", ()):
            if captured:
                hold = holds[hold_id]
                moves.append((hold["debit"], hold["credit"], captured))
        for dr, cr, amount in moves:
            out_of = kinds[dr] in CUSTOMER_SIDE and kinds[cr] not in CUSTOMER_SIDE
            into = kinds[cr] in CUSTOMER_SIDE and kinds[dr] not in CUSTOMER_SIDE
            if into:
                inflow += amount
            if not out_of:
                continue
            outflow += amount
            if kind == "fee_charged":
                rule = POLICY.fees.get(cmd["fee_code"])
                assert rule is not None and amount == rule.fixed_minor, rec
            elif kind == "withdrawal_settled":
                placed = holds[cmd["withdrawal_id"]]
                assert placed["kind"] == "withdrawal" and placed["amount"] == amount, rec
                assert signed_by_customer(placed["rec"], dr), placed["rec"]
            else:
                raise AssertionError(f"customer money left by {kind}: {rec}")
    assert customer_money(service, platform_id) == inflow - outflow


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    program=st.lists(
        st.tuples(
            st.sampled_from(WEIGHTED),
            st.integers(0, len(WHO) - 1),
            st.integers(0, len(WHO) - 1),
            st.integers(1, 5_000),
        ),
        min_size=5,
        max_size=40,
    )
)
def test_platform_cannot_reduce_customer_money_on_its_own(
    service: LedgerService, clock: FakeClock, program: list[tuple[str, int, int, int]]
) -> None:
    p = make_ctl_platform(service, clock, f"h{next(_platforms)}", POLICY, NAMES)
    w = World(service, p)
    for who in ("alice", "bob", "carol"):
        ex(
            service,
            p,
            c.Deposit(
                client_id=f"seed-{who}",
                mirror_account_id=p.omni,
                account_id=who,
                amount_minor=20_000,
                currency="CNY",
            ),
        )
        bind(service, p, who)
    run_program(w, program)
    check_customer_money_from_the_log(service, p.id)
    assert_balanced(service, p.id)
    assert_no_negative(service, p.id)


def test_the_check_is_not_vacuous(service: LedgerService, clock: FakeClock) -> None:
    """Under the bookkeeping policy (no signatures) an unsigned customer debit is accepted,
    and the log check must say so."""
    p = make_ctl_platform(service, clock, "meta", BOOKKEEPING_POLICY)
    ex(
        service,
        p,
        c.Deposit(
            client_id="d",
            mirror_account_id=p.omni,
            account_id="alice",
            amount_minor=1_000,
            currency="CNY",
        ),
    )
    check_customer_money_from_the_log(service, p.id)
    assert ex(service, p, transfer("t", "alice", "bob", 10)).status == "accepted"
    with pytest.raises(AssertionError):
        check_customer_money_from_the_log(service, p.id)

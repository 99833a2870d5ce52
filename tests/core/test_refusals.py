"""Every refusal the core produces is recorded (code, control) and changes no balance;
every malformed instruction is answered `invalid` and writes nothing at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from helpers import (
    ACTOR,
    BOOKKEEPING_POLICY,
    OPERATOR,
    START_MS,
    FakeClock,
    Platform,
    actor_for,
    assert_balanced,
    deposit,
    hold,
    last_position,
    make_platform,
    money_state,
    ok,
    open_service,
    record_at,
    run,
    run1,
    snapshot,
    transfer,
)

from controls.codes import Code
from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService
from ledger.writer import verify_stored_chain

PID = "p1"
LATER = START_MS + 3_600_000
MAX = 2**63 - 1

INTEGRITY = "integrity"
SEGREGATION = "segregation"
FUNDS = "available_funds"
STATE = "account_state"
IDEMPOTENCY = "idempotency"


def assert_refused(
    service: LedgerService, cmd: Any, code: str, control: str, linked_to: str | None = None
) -> None:
    """`cmd` is refused with `code` by `control`, recorded in the log, and nothing else changes."""
    before = snapshot(service, PID)
    outcome = run1(service, PID, cmd)
    assert outcome.status == "refused", outcome
    assert (outcome.code, outcome.control) == (code, control), outcome
    assert outcome.kind == "command_refused" and outcome.message
    assert outcome.seq == before["next_seq"] == last_position(service, PID)
    rec = record_at(service, PID, outcome.seq)
    assert rec["kind"] == "command_refused"
    assert (rec["code"], rec["control"], rec["cid"], rec["actor"]) == (
        code,
        control,
        cmd.client_id,
        actor_for(cmd),
    )
    assert rec["pv"] == 0 and rec["message"] == outcome.message
    assert rec["cmd"]["op"] == c.op_of(cmd) and rec["cmd"]["client_id"] == cmd.client_id
    assert rec.get("linked_to") == linked_to
    assert not ({"entries", "hold", "resolve", "account"} & rec.keys())
    after = snapshot(service, PID)
    assert money_state(after) == money_state(before)
    assert after["next_seq"] == before["next_seq"] + 1
    assert_balanced(service, PID)


# -- setups: each prepares state and returns the command to be refused -----------------------------

Setup = Callable[[LedgerService, Platform], Any]


def _funded(service: LedgerService, p: Platform, amount: int = 10_000) -> None:
    ok(service, PID, deposit(p, "fund-alice", "alice", amount))


def _own_funded(service: LedgerService, p: Platform, amount: int = 5_000) -> None:
    ok(
        service,
        PID,
        c.Deposit(
            client_id="fund-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=amount,
            currency="CNY",
        ),
    )


def _usd(service: LedgerService, p: Platform) -> Platform:
    return make_platform(service, PID, currency="USD", customers=("dave",), prefix="usd-")


def _held(service: LedgerService, p: Platform, amount: int = 3_000) -> None:
    _funded(service, p)
    ok(service, PID, hold(p, "h1", "alice", "bob", amount, LATER))


def _withdrawal(p: Platform, cid: str, amount: int, **kw: Any) -> c.RequestWithdrawal:
    fields: dict[str, Any] = {
        "account_id": "alice",
        "mirror_account_id": p.omni,
        "amount_minor": amount,
        "currency": "CNY",
        "payee_ref": "bank:alice",
        "expires_at_ms": LATER,
    }
    fields.update(kw)
    return c.RequestWithdrawal(client_id=cid, **fields)


def _fee(p: Platform, cid: str, src: str, dst: str, amount: int) -> c.ChargeFee:
    return c.ChargeFee(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency="CNY",
        fee_code="F1",
    )


def _topup(p: Platform, cid: str, src: str, dst: str, amount: int) -> c.TopUpShortfall:
    return c.TopUpShortfall(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency="CNY",
        reason="recon",
    )


def _setup_overflow_debit(service: LedgerService, p: Platform) -> Any:
    ok(service, PID, deposit(p, "big", "alice", MAX))
    return deposit(p, "one-more", "bob", 1)  # the omnibus' posted debits would pass 2^63-1


def _setup_overflow_credit(service: LedgerService, p: Platform) -> Any:
    ok(service, PID, deposit(p, "big", "alice", MAX))
    return deposit(p, "one-more", "alice", 1)  # alice's posted credits would pass 2^63-1


def _setup_frozen(service: LedgerService, p: Platform) -> None:
    _funded(service, p)
    ok(service, PID, deposit(p, "fund-bob", "bob", 1_000))
    ok(service, PID, c.FreezeAccount(client_id="fz", account_id="alice", reason="court order"))


def _setup_closed(service: LedgerService, p: Platform) -> None:
    _funded(service, p)
    ok(service, PID, c.CloseAccount(client_id="close-carol", account_id="carol"))


def _setup_capture_frozen(service: LedgerService, p: Platform) -> Any:
    _held(service, p)
    ok(service, PID, c.FreezeAccount(client_id="fz", account_id="alice", reason="court order"))
    return c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=1)


def _setup_id_reused(service: LedgerService, p: Platform) -> Any:
    _funded(service, p)
    ok(service, PID, transfer(p, "t1", "alice", "bob", 100))
    return transfer(p, "t1", "alice", "bob", 101)


def _setup_not_pending(resolve: Any, then: Any) -> Setup:
    def setup(service: LedgerService, p: Platform) -> Any:
        _held(service, p)
        ok(service, PID, _withdrawal(p, "w1", 500))
        ok(service, PID, resolve)
        return then

    return setup


def _setup_expired_then_capture(service: LedgerService, p: Platform) -> Any:
    _funded(service, p)
    ok(service, PID, hold(p, "h1", "alice", "bob", 100, START_MS + 5))
    clock: FakeClock = service._clock_ms  # type: ignore[assignment]
    clock.now = START_MS + 5
    ok(service, PID, c.ExpireHolds(client_id="sweep"))
    return c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=100)


def _setup_expired_unswept(service: LedgerService, p: Platform) -> Any:
    _funded(service, p)
    ok(service, PID, hold(p, "h1", "alice", "bob", 100, START_MS + 5))
    clock: FakeClock = service._clock_ms  # type: ignore[assignment]
    clock.now = START_MS + 5  # expiry is at or before now
    return c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=100)


def _setup_reverse(*cmds: Callable[[Platform], Any], target: str) -> Setup:
    def setup(service: LedgerService, p: Platform) -> Any:
        _funded(service, p)
        for make in cmds:
            ok(service, PID, make(p))
        return c.Reverse(client_id="rev-x", movement_id=target, reason="undo")

    return setup


CASES: list[tuple[str, Setup, str, str]] = [
    # integrity: amounts
    ("amount-zero", lambda s, p: transfer(p, "x", "alice", "bob", 0), "INVALID_AMOUNT", INTEGRITY),
    (
        "amount-negative",
        lambda s, p: transfer(p, "x", "alice", "bob", -1),
        "INVALID_AMOUNT",
        INTEGRITY,
    ),
    (
        "amount-2^63",
        lambda s, p: transfer(p, "x", "alice", "bob", 2**63),
        "INVALID_AMOUNT",
        INTEGRITY,
    ),
    (
        "amount-u64max",
        lambda s, p: deposit(p, "x", "alice", 2**64 - 1),
        "INVALID_AMOUNT",
        INTEGRITY,
    ),
    ("deposit-zero", lambda s, p: deposit(p, "x", "alice", 0), "INVALID_AMOUNT", INTEGRITY),
    ("fee-zero", lambda s, p: _fee(p, "x", "alice", p.fee, 0), "INVALID_AMOUNT", INTEGRITY),
    (
        "topup-negative",
        lambda s, p: _topup(p, "x", p.own, "alice", -5),
        "INVALID_AMOUNT",
        INTEGRITY,
    ),
    ("hold-zero", lambda s, p: hold(p, "x", "alice", "bob", 0, LATER), "INVALID_AMOUNT", INTEGRITY),
    ("withdrawal-2^63", lambda s, p: _withdrawal(p, "x", 2**63), "INVALID_AMOUNT", INTEGRITY),
    (
        "capture-zero",
        lambda s, p: (_held(s, p), c.CaptureHold(client_id="x", hold_id="h1", amount_minor=0))[1],
        "INVALID_AMOUNT",
        INTEGRITY,
    ),
    (
        "capture-negative",
        lambda s, p: (_held(s, p), c.CaptureHold(client_id="x", hold_id="h1", amount_minor=-9))[1],
        "INVALID_AMOUNT",
        INTEGRITY,
    ),
    # integrity: currency
    (
        "currency-of-instruction",
        lambda s, p: c.Transfer(
            client_id="x",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency="USD",
        ),
        "CURRENCY_MISMATCH",
        INTEGRITY,
    ),
    (
        "currency-of-accounts",
        lambda s, p: (_usd(s, p), transfer(p, "x", "alice", "usd-dave", 1))[1],
        "CURRENCY_MISMATCH",
        INTEGRITY,
    ),
    (
        "currency-deposit-mirror",
        lambda s, p: (_usd(s, p), deposit(p, "x", "usd-dave", 1))[1],
        "CURRENCY_MISMATCH",
        INTEGRITY,
    ),
    # integrity: accounts
    (
        "to-unknown",
        lambda s, p: transfer(p, "x", "alice", "ghost", 1),
        "ACCOUNT_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "from-unknown",
        lambda s, p: transfer(p, "x", "ghost", "alice", 1),
        "ACCOUNT_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "mirror-unknown",
        lambda s, p: c.Deposit(
            client_id="x",
            mirror_account_id="nobank",
            account_id="alice",
            amount_minor=1,
            currency="CNY",
        ),
        "ACCOUNT_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "hold-to-unknown",
        lambda s, p: hold(p, "x", "alice", "ghost", 1, LATER),
        "ACCOUNT_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "freeze-unknown",
        lambda s, p: c.FreezeAccount(client_id="x", account_id="ghost", reason="r"),
        "ACCOUNT_NOT_FOUND",
        STATE,
    ),
    (
        "close-unknown",
        lambda s, p: c.CloseAccount(client_id="x", account_id="ghost"),
        "ACCOUNT_NOT_FOUND",
        STATE,
    ),
    (
        "open-existing",
        lambda s, p: c.OpenAccount(
            client_id="x", account_id="alice", kind="customer", currency="CNY", role="lender"
        ),
        "ACCOUNT_EXISTS",
        INTEGRITY,
    ),
    (
        "open-existing-other-kind",
        lambda s, p: c.OpenAccount(
            client_id="x", account_id=p.omni, kind="suspense", currency="USD"
        ),
        "ACCOUNT_EXISTS",
        INTEGRITY,
    ),
    ("same-account", lambda s, p: transfer(p, "x", "alice", "alice", 1), "SAME_ACCOUNT", INTEGRITY),
    (
        "same-account-hold",
        lambda s, p: hold(p, "x", "bob", "bob", 1, LATER),
        "SAME_ACCOUNT",
        INTEGRITY,
    ),
    # flows: segregation (it runs first) refuses whatever crosses the customer/platform money
    # line outside its whitelist; the flow table refuses wrong shapes within one side
    (
        "transfer-to-fee",
        lambda s, p: transfer(p, "x", "alice", p.fee, 1),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "transfer-to-own",
        lambda s, p: transfer(p, "x", "alice", p.own, 1),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "transfer-from-own",
        lambda s, p: transfer(p, "x", p.own, "alice", 1),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "transfer-to-suspense",
        lambda s, p: transfer(p, "x", "alice", p.susp, 1),
        "FLOW_NOT_ALLOWED",
        INTEGRITY,
    ),
    (
        "deposit-to-own",
        lambda s, p: deposit(p, "x", p.own, 1),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "deposit-pbank-to-customer",
        lambda s, p: c.Deposit(
            client_id="x",
            mirror_account_id=p.pbank,
            account_id="alice",
            amount_minor=1,
            currency="CNY",
        ),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "deposit-from-customer",
        lambda s, p: c.Deposit(
            client_id="x",
            mirror_account_id="bob",
            account_id="alice",
            amount_minor=1,
            currency="CNY",
        ),
        "FLOW_NOT_ALLOWED",
        INTEGRITY,
    ),
    (
        "fee-to-customer",
        lambda s, p: _fee(p, "x", "alice", "bob", 1),
        "FLOW_NOT_ALLOWED",
        INTEGRITY,
    ),
    ("fee-from-own", lambda s, p: _fee(p, "x", p.own, p.fee, 1), "FLOW_NOT_ALLOWED", INTEGRITY),
    ("topup-to-fee", lambda s, p: _topup(p, "x", p.own, p.fee, 1), "FLOW_NOT_ALLOWED", INTEGRITY),
    (
        "topup-from-customer",
        lambda s, p: _topup(p, "x", "alice", "bob", 1),
        "FLOW_NOT_ALLOWED",
        INTEGRITY,
    ),
    (
        "hold-to-own",
        lambda s, p: hold(p, "x", "alice", p.own, 1, LATER),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "hold-to-fee",  # a hold is not a fee: fees are charged per schedule
        lambda s, p: (_funded(s, p), hold(p, "x", "alice", p.fee, 1, LATER))[1],
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "hold-to-suspense",
        lambda s, p: hold(p, "x", "alice", p.susp, 1, LATER),
        "FLOW_NOT_ALLOWED",
        INTEGRITY,
    ),
    (
        "withdrawal-of-suspense",
        lambda s, p: _withdrawal(p, "x", 1, account_id=p.susp),
        "FLOW_NOT_ALLOWED",
        INTEGRITY,
    ),
    (
        "withdrawal-to-platform-bank",
        lambda s, p: _withdrawal(p, "x", 1, mirror_account_id=p.pbank),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    (
        "withdrawal-of-own-to-omnibus",
        lambda s, p: _withdrawal(p, "x", 1, account_id=p.own),
        "SEGREGATION_BREACH",
        SEGREGATION,
    ),
    # integrity: overflow
    ("overflow-debit-total", _setup_overflow_debit, "AMOUNT_OVERFLOW", INTEGRITY),
    ("overflow-credit-total", _setup_overflow_credit, "AMOUNT_OVERFLOW", INTEGRITY),
    # available funds
    ("funds-empty", lambda s, p: transfer(p, "x", "alice", "bob", 1), "INSUFFICIENT_FUNDS", FUNDS),
    (
        "funds-one-over",
        lambda s, p: (_funded(s, p), transfer(p, "x", "alice", "bob", 10_001))[1],
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    (
        "funds-held",
        lambda s, p: (_held(s, p, 3_000), transfer(p, "x", "alice", "bob", 7_001))[1],
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    (
        "funds-hold",
        lambda s, p: (_held(s, p, 3_000), hold(p, "x", "alice", "carol", 7_001, LATER))[1],
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    (
        "funds-withdrawal",
        lambda s, p: (_funded(s, p), _withdrawal(p, "x", 10_001))[1],
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    (
        "funds-fee",
        lambda s, p: (_funded(s, p, 10), _fee(p, "x", "alice", p.fee, 11))[1],
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    ("funds-topup", lambda s, p: _topup(p, "x", p.own, "alice", 1), "INSUFFICIENT_FUNDS", FUNDS),
    (
        "funds-own-withdrawal",
        lambda s, p: (
            _own_funded(s, p, 5),
            _withdrawal(p, "x", 6, account_id=p.own, mirror_account_id=p.pbank),
        )[1],
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    (
        "funds-suspense",
        lambda s, p: transfer(p, "x", p.susp, "alice", 1, "clearing"),
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    (
        "funds-reverse-spent-deposit",
        _setup_reverse(lambda p: transfer(p, "spend", "alice", "bob", 1), target="fund-alice"),
        "INSUFFICIENT_FUNDS",
        FUNDS,
    ),
    # account state
    (
        "frozen-debit",
        lambda s, p: (_setup_frozen(s, p), transfer(p, "x", "alice", "bob", 1))[1],
        "ACCOUNT_FROZEN",
        STATE,
    ),
    (
        "frozen-credit",
        lambda s, p: (_setup_frozen(s, p), transfer(p, "x", "bob", "alice", 1))[1],
        "ACCOUNT_FROZEN",
        STATE,
    ),
    (
        "frozen-deposit",
        lambda s, p: (_setup_frozen(s, p), deposit(p, "x", "alice", 1))[1],
        "ACCOUNT_FROZEN",
        STATE,
    ),
    (
        "frozen-hold",
        lambda s, p: (_setup_frozen(s, p), hold(p, "x", "alice", "bob", 1, LATER))[1],
        "ACCOUNT_FROZEN",
        STATE,
    ),
    (
        "frozen-withdrawal",
        lambda s, p: (_setup_frozen(s, p), _withdrawal(p, "x", 1))[1],
        "ACCOUNT_FROZEN",
        STATE,
    ),
    ("frozen-capture", _setup_capture_frozen, "ACCOUNT_FROZEN", STATE),
    (
        "freeze-frozen",
        lambda s, p: (
            _setup_frozen(s, p),
            c.FreezeAccount(client_id="x", account_id="alice", reason="again"),
        )[1],
        "ACCOUNT_FROZEN",
        STATE,
    ),
    (
        "closed-deposit",
        lambda s, p: (_setup_closed(s, p), deposit(p, "x", "carol", 1))[1],
        "ACCOUNT_CLOSED",
        STATE,
    ),
    (
        "closed-credit",
        lambda s, p: (_setup_closed(s, p), transfer(p, "x", "alice", "carol", 1))[1],
        "ACCOUNT_CLOSED",
        STATE,
    ),
    (
        "closed-freeze",
        lambda s, p: (
            _setup_closed(s, p),
            c.FreezeAccount(client_id="x", account_id="carol", reason="r"),
        )[1],
        "ACCOUNT_CLOSED",
        STATE,
    ),
    (
        "closed-unfreeze",
        lambda s, p: (
            _setup_closed(s, p),
            c.UnfreezeAccount(client_id="x", account_id="carol", reason="r"),
        )[1],
        "ACCOUNT_CLOSED",
        STATE,
    ),
    (
        "closed-close",
        lambda s, p: (_setup_closed(s, p), c.CloseAccount(client_id="x", account_id="carol"))[1],
        "ACCOUNT_CLOSED",
        STATE,
    ),
    (
        "close-with-balance",
        lambda s, p: (_funded(s, p, 1), c.CloseAccount(client_id="x", account_id="alice"))[1],
        "ACCOUNT_NOT_EMPTY",
        STATE,
    ),
    (
        "close-with-incoming-hold",
        lambda s, p: (_held(s, p), c.CloseAccount(client_id="x", account_id="bob"))[1],
        "ACCOUNT_NOT_EMPTY",
        STATE,
    ),
    (
        "close-omnibus-with-balance",
        lambda s, p: (_funded(s, p), c.CloseAccount(client_id="x", account_id=p.omni))[1],
        "ACCOUNT_NOT_EMPTY",
        STATE,
    ),
    (
        "unfreeze-open",
        lambda s, p: c.UnfreezeAccount(client_id="x", account_id="alice", reason="r"),
        "ACCOUNT_NOT_FROZEN",
        STATE,
    ),
    # idempotency
    ("id-reused", _setup_id_reused, "ID_REUSED", IDEMPOTENCY),
    (
        "id-reused-across-kinds",
        lambda s, p: deposit(p, "open:alice", "alice", 1),
        "ID_REUSED",
        IDEMPOTENCY,
    ),
    # holds
    (
        "capture-unknown",
        lambda s, p: c.CaptureHold(client_id="x", hold_id="nohold", amount_minor=1),
        "HOLD_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "release-unknown",
        lambda s, p: c.ReleaseHold(client_id="x", hold_id="nohold", reason="r"),
        "HOLD_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "settle-unknown",
        lambda s, p: c.SettleWithdrawal(client_id="x", withdrawal_id="now"),
        "HOLD_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "capture-a-withdrawal",
        lambda s, p: (
            _funded(s, p),
            ok(s, PID, _withdrawal(p, "w1", 5)),
            c.CaptureHold(client_id="x", hold_id="w1", amount_minor=5),
        )[2],
        "HOLD_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "settle-a-hold",
        lambda s, p: (_held(s, p), c.SettleWithdrawal(client_id="x", withdrawal_id="h1"))[1],
        "HOLD_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "fail-a-hold",
        lambda s, p: (_held(s, p), c.FailWithdrawal(client_id="x", withdrawal_id="h1", reason="r"))[
            1
        ],
        "HOLD_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "capture-released",
        _setup_not_pending(
            c.ReleaseHold(client_id="rel", hold_id="h1", reason="r"),
            c.CaptureHold(client_id="x", hold_id="h1", amount_minor=1),
        ),
        "HOLD_NOT_PENDING",
        INTEGRITY,
    ),
    (
        "release-captured",
        _setup_not_pending(
            c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=10),
            c.ReleaseHold(client_id="x", hold_id="h1", reason="r"),
        ),
        "HOLD_NOT_PENDING",
        INTEGRITY,
    ),
    (
        "capture-captured",
        _setup_not_pending(
            c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=10),
            c.CaptureHold(client_id="x", hold_id="h1", amount_minor=10),
        ),
        "HOLD_NOT_PENDING",
        INTEGRITY,
    ),
    (
        "settle-failed",
        _setup_not_pending(
            c.FailWithdrawal(client_id="wf", withdrawal_id="w1", reason="r"),
            c.SettleWithdrawal(client_id="x", withdrawal_id="w1"),
        ),
        "HOLD_NOT_PENDING",
        INTEGRITY,
    ),
    (
        "fail-settled",
        _setup_not_pending(
            c.SettleWithdrawal(client_id="ws", withdrawal_id="w1"),
            c.FailWithdrawal(client_id="x", withdrawal_id="w1", reason="r"),
        ),
        "HOLD_NOT_PENDING",
        INTEGRITY,
    ),
    ("capture-expired-swept", _setup_expired_then_capture, "HOLD_NOT_PENDING", INTEGRITY),
    ("capture-expired-unswept", _setup_expired_unswept, "HOLD_EXPIRED", INTEGRITY),
    (
        "capture-exceeds",
        lambda s, p: (
            _held(s, p, 3_000),
            c.CaptureHold(client_id="x", hold_id="h1", amount_minor=3_001),
        )[1],
        "HOLD_EXCEEDED",
        INTEGRITY,
    ),
    (
        "hold-expiry-now",
        lambda s, p: (_funded(s, p), hold(p, "x", "alice", "bob", 1, START_MS))[1],
        "HOLD_EXPIRY_INVALID",
        INTEGRITY,
    ),
    (
        "hold-expiry-past",
        lambda s, p: (_funded(s, p), hold(p, "x", "alice", "bob", 1, START_MS - 1))[1],
        "HOLD_EXPIRY_INVALID",
        INTEGRITY,
    ),
    (
        "withdrawal-expiry-now",
        lambda s, p: (_funded(s, p), _withdrawal(p, "x", 1, expires_at_ms=START_MS))[1],
        "HOLD_EXPIRY_INVALID",
        INTEGRITY,
    ),
    (
        "hold-no-reason",
        lambda s, p: (_funded(s, p), hold(p, "x", "alice", "bob", 1, LATER, reason=""))[1],
        "HOLD_REASON_REQUIRED",
        INTEGRITY,
    ),
    (
        "withdrawal-no-payee",
        lambda s, p: (_funded(s, p), _withdrawal(p, "x", 1, payee_ref=""))[1],
        "INVALID_ARGUMENT",
        INTEGRITY,
    ),
    # reversals
    (
        "reverse-unknown",
        lambda s, p: c.Reverse(client_id="x", movement_id="nothing", reason="r"),
        "MOVEMENT_NOT_FOUND",
        INTEGRITY,
    ),
    (
        "reverse-refused",
        lambda s, p: (
            run1(s, PID, transfer(p, "refused-t", "alice", "bob", 5)),
            c.Reverse(client_id="x", movement_id="refused-t", reason="r"),
        )[1],
        "MOVEMENT_NOT_FOUND",
        INTEGRITY,
    ),
    ("reverse-account-opening", _setup_reverse(target="open:alice"), "NOT_REVERSIBLE", INTEGRITY),
    (
        "reverse-a-reversal",
        _setup_reverse(
            lambda p: transfer(p, "t1", "alice", "bob", 5),
            lambda p: c.Reverse(client_id="r1", movement_id="t1", reason="r"),
            target="r1",
        ),
        "NOT_REVERSIBLE",
        INTEGRITY,
    ),
    (
        "reverse-hold-placement",
        _setup_reverse(lambda p: hold(p, "h1", "alice", "bob", 5, LATER), target="h1"),
        "NOT_REVERSIBLE",
        INTEGRITY,
    ),
    (
        "reverse-release",
        _setup_reverse(
            lambda p: hold(p, "h1", "alice", "bob", 5, LATER),
            lambda p: c.ReleaseHold(client_id="rel", hold_id="h1", reason="r"),
            target="rel",
        ),
        "NOT_REVERSIBLE",
        INTEGRITY,
    ),
    (
        "reverse-settled-withdrawal",
        _setup_reverse(
            lambda p: _withdrawal(p, "w1", 5),
            lambda p: c.SettleWithdrawal(client_id="ws", withdrawal_id="w1"),
            target="ws",
        ),
        "NOT_REVERSIBLE",
        INTEGRITY,
    ),
    (
        "reverse-freeze",
        _setup_reverse(
            lambda p: c.FreezeAccount(client_id="fz", account_id="bob", reason="r"), target="fz"
        ),
        "NOT_REVERSIBLE",
        INTEGRITY,
    ),
    (
        "reverse-twice",
        _setup_reverse(
            lambda p: transfer(p, "t1", "alice", "bob", 5),
            lambda p: c.Reverse(client_id="r1", movement_id="t1", reason="r"),
            target="t1",
        ),
        "ALREADY_REVERSED",
        INTEGRITY,
    ),
    # platform
    (
        "create-platform-again",
        lambda s, p: c.CreatePlatform(client_id="again", name="Other name"),
        "PLATFORM_EXISTS",
        INTEGRITY,
    ),
]


@pytest.mark.parametrize(
    ("setup", "code", "control"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_refusal(
    service: LedgerService, platform: Platform, setup: Setup, code: str, control: str
) -> None:
    cmd = setup(service, platform)
    assert_refused(service, cmd, code, control)


CORE_CODES = {
    "INVALID_ARGUMENT",
    "INVALID_AMOUNT",
    "CURRENCY_MISMATCH",
    "ACCOUNT_NOT_FOUND",
    "ACCOUNT_EXISTS",
    "SAME_ACCOUNT",
    "FLOW_NOT_ALLOWED",
    "SEGREGATION_BREACH",
    "AMOUNT_OVERFLOW",
    "INSUFFICIENT_FUNDS",
    "ACCOUNT_FROZEN",
    "ACCOUNT_CLOSED",
    "ACCOUNT_NOT_EMPTY",
    "ACCOUNT_NOT_FROZEN",
    "ID_REUSED",
    "HOLD_NOT_FOUND",
    "HOLD_NOT_PENDING",
    "HOLD_EXCEEDED",
    "HOLD_EXPIRY_INVALID",
    "HOLD_REASON_REQUIRED",
    "HOLD_EXPIRED",
    "MOVEMENT_NOT_FOUND",
    "NOT_REVERSIBLE",
    "ALREADY_REVERSED",
    "LINKED_FAILED",
    "PLATFORM_EXISTS",
}


def test_every_core_code_is_covered() -> None:
    covered = {case[2] for case in CASES} | {"LINKED_FAILED"}  # LINKED_FAILED: tests below
    assert covered == CORE_CODES
    assert {code.value for code in Code} >= CORE_CODES


def test_linked_failed_is_recorded(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(service, PID, deposit(p, "d", "alice", 100))
    before = snapshot(service, PID)
    outcomes = run(
        service,
        PID,
        transfer(p, "l1", "alice", "bob", 60),
        transfer(p, "l2", "alice", "carol", 60),
        linked=True,
    )
    assert [(o.status, o.code) for o in outcomes] == [
        ("refused", "LINKED_FAILED"),
        ("refused", "INSUFFICIENT_FUNDS"),
    ]
    r1, r2 = (record_at(service, PID, o.seq) for o in outcomes)
    assert (r1["code"], r1["control"], r1["linked_to"]) == ("LINKED_FAILED", "linked_batch", "l2")
    assert (r2["code"], r2["control"]) == ("INSUFFICIENT_FUNDS", FUNDS) and "linked_to" not in r2
    assert money_state(snapshot(service, PID)) == money_state(before)


def test_refused_retry_is_decided_afresh(service: LedgerService, platform: Platform) -> None:
    """A refused client id is not 'done': the same instruction can succeed once funds arrive."""
    p = platform
    first = run1(service, PID, transfer(p, "t1", "alice", "bob", 50))
    assert first.code == "INSUFFICIENT_FUNDS"
    ok(service, PID, deposit(p, "d", "alice", 100))
    second = run1(service, PID, transfer(p, "t1", "alice", "bob", 50))
    assert second.status == "accepted" and second.seq > first.seq


def test_create_platform_retry_is_idempotent(service: LedgerService, platform: Platform) -> None:
    before, last = snapshot(service, PID), last_position(service, PID)
    # the same instruction: same name and same initial policy (the fixture's)
    again = service.create_platform(PID, "Platform p1", "operator:root", BOOKKEEPING_POLICY)
    assert (again.status, again.seq) == ("replayed", 0)
    assert snapshot(service, PID) == before and last_position(service, PID) == last
    assert service.platform_ids() == [PID]
    # another initial policy (here the default one) is another instruction under the same id
    other = service.create_platform(PID, "Platform p1", "operator:root")
    assert (other.status, other.code) == ("refused", "ID_REUSED")
    assert money_state(snapshot(service, PID)) == money_state(before)


def test_create_platform_with_another_name_is_refused_and_recorded(
    service: LedgerService, platform: Platform
) -> None:
    before = snapshot(service, PID)
    outcome = service.create_platform(PID, "Another name", "operator:root")
    assert (outcome.status, outcome.code) == ("refused", "ID_REUSED")
    rec = record_at(service, PID, outcome.seq)
    assert (rec["kind"], rec["code"], rec["cid"]) == ("command_refused", "ID_REUSED", "create:p1")
    assert money_state(snapshot(service, PID)) == money_state(before)
    assert service.platform_ids() == [PID]


def test_refused_creation_leaves_the_platform_id_free(service: LedgerService) -> None:
    """Only an operator creates platforms; a refused attempt must not claim the id."""
    refused = service.create_platform("p9", "Platform p9", ACTOR)
    assert (refused.status, refused.code, refused.control) == (
        "refused",
        "ROLE_NOT_PERMITTED",
        "roles",
    )
    assert service.platform_ids() == [] and service.store.platform_ids() == []
    created = service.create_platform("p9", "Platform p9", OPERATOR)
    assert (created.status, created.seq) == ("accepted", 0)


def test_capture_after_expiry_without_sweep_is_refused(
    service: LedgerService, platform: Platform, clock: FakeClock
) -> None:
    """An expired hold is void even before a sweep records it (like a TigerBeetle timeout)."""
    p = platform
    _funded(service, p)
    ok(service, PID, hold(p, "h1", "alice", "bob", 100, START_MS + 5))
    clock.now = START_MS + 10
    assert_refused(
        service,
        c.CaptureHold(client_id="cap", hold_id="h1", amount_minor=100),
        "HOLD_EXPIRED",
        INTEGRITY,
    )
    with service.reading(PID) as st:
        assert str(st.holds["h1"].status) == "pending"  # until the sweep records the expiry
    [o] = ok(service, PID, c.ExpireHolds(client_id="sweep"))
    assert record_at(service, PID, o.seq)["resolve"] == [["h1", 0, "expired"]]


def test_currency_total_overflow_is_refused(service: LedgerService, platform: Platform) -> None:
    """Each account's totals fit, but the currency's total of postings would not."""
    p = platform
    ok(service, PID, deposit(p, "big", "alice", 2**62))
    big_own = c.Deposit(
        client_id="big-own",
        mirror_account_id=p.pbank,
        account_id=p.own,
        amount_minor=2**62,
        currency="CNY",
    )
    assert_refused(service, big_own, "AMOUNT_OVERFLOW", INTEGRITY)
    # the platform keeps working and its chain stays whole
    ok(service, PID, deposit(p, "small", "bob", 1))
    assert verify_stored_chain(service.store, PID)[1:] == (None, "ok")


def test_exception_mid_batch_leaves_state_consistent(
    service: LedgerService, platform: Platform, config: Config, clock: FakeClock
) -> None:
    """A failure half-way through deciding a batch (here: the PII vault is down) acknowledges
    nothing, and the live state is rebuilt from the store before the next instruction."""
    p = platform
    before = snapshot(service, PID)

    def broken_seal(platform_id: str, subject: str, text: str) -> dict[str, str]:
        raise RuntimeError("vault unavailable")

    service.vault.seal = broken_seal  # type: ignore[method-assign]
    good = deposit(p, "good", "alice", 5)
    with_name = c.OpenAccount(
        client_id="open-dan",
        account_id="dan",
        kind="customer",
        currency="CNY",
        role="other",
        holder_name="Dan",
    )
    with pytest.raises(RuntimeError, match="vault unavailable"):
        run(service, PID, good, with_name)
    assert snapshot(service, PID) == before  # nothing of the half-decided batch is visible
    del service.vault.seal  # the vault is back
    [again] = ok(service, PID, good)  # not a replay: the first attempt never happened
    assert again.seq == before["next_seq"]
    ok(service, PID, with_name)
    assert verify_stored_chain(service.store, PID)[1:] == (None, "ok")
    snap = snapshot(service, PID)
    fresh = open_service(config, clock)  # a second reader of the same store
    try:
        assert snapshot(fresh, PID) == snap
    finally:
        fresh.close()


# -- malformed instructions: answered `invalid`, nothing written --------------------------------


class Bogus(c.Command, tag="bogus", frozen=True, kw_only=True):
    amount_minor: int = 1


def _t(**kw: Any) -> c.Transfer:
    fields: dict[str, Any] = {
        "client_id": "bad",
        "from_account_id": "alice",
        "to_account_id": "bob",
        "amount_minor": 1,
        "currency": "CNY",
    }
    fields.update(kw)
    return c.Transfer(**fields)


def _open(**kw: Any) -> c.OpenAccount:
    fields: dict[str, Any] = {
        "client_id": "bad",
        "account_id": "newacc",
        "kind": "customer",
        "currency": "CNY",
        "role": "lender",
    }
    fields.update(kw)
    return c.OpenAccount(**fields)


LONG = "x" * 257
INVALID: list[tuple[str, Any, str]] = [
    ("client-id-empty", _t(client_id=""), "client_id"),
    ("client-id-space", _t(client_id="a b"), "client_id"),
    ("client-id-leading-dash", _t(client_id="-a"), "client_id"),
    ("client-id-too-long", _t(client_id="a" * 129), "client_id"),
    ("client-id-none", _t(client_id=None), "client_id"),
    ("client-id-int", _t(client_id=7), "client_id"),
    ("account-id-space", _t(to_account_id="bo b"), "to_account_id"),
    ("account-id-too-long", _t(from_account_id="a" * 65), "from_account_id"),
    ("account-id-empty", _t(from_account_id=""), "from_account_id"),
    ("account-id-slash", _open(account_id="a/b"), "account_id"),
    ("account-id-unicode", _open(account_id="账户"), "account_id"),
    ("amount-float", _t(amount_minor=1.5), "amount_minor"),
    ("amount-float-integral", _t(amount_minor=100.0), "amount_minor"),
    ("amount-bool", _t(amount_minor=True), "amount_minor"),
    ("amount-str", _t(amount_minor="100"), "amount_minor"),
    ("amount-none", _t(amount_minor=None), "amount_minor"),
    ("amount-2^64", _t(amount_minor=2**64), "amount_minor"),
    ("amount-below-int64", _t(amount_minor=-(2**63) - 1), "amount_minor"),
    ("currency-lower", _t(currency="cny"), "currency"),
    ("currency-unknown", _t(currency="XXX"), "currency"),
    ("currency-short", _t(currency="US"), "currency"),
    ("currency-long", _t(currency="USDT"), "currency"),
    ("currency-int", _t(currency=156), "currency"),
    ("purpose-unknown", _t(purpose="gift"), "purpose"),
    ("purpose-too-long", _t(purpose=LONG), "purpose"),
    ("kind-unknown", _open(kind="wallet"), "kind"),
    ("role-unknown", _open(role="ceo"), "role"),
    ("customer-without-role", _open(role=None), "role"),
    ("omnibus-with-role", _open(kind="omnibus", role="lender"), "role"),
    ("holder-name-too-long", _open(holder_name="N" * 257), "holder_name"),
    ("holder-name-control-char", _open(holder_name="Zhang\x00San"), "holder_name"),
    (
        "reason-too-long",
        c.FreezeAccount(client_id="bad", account_id="alice", reason=LONG),
        "reason",
    ),
    (
        "reason-newline",
        c.FreezeAccount(client_id="bad", account_id="alice", reason="a\nb"),
        "reason",
    ),
    (
        "reason-lone-surrogate",
        c.FreezeAccount(client_id="bad", account_id="alice", reason="\ud800"),
        "reason",
    ),
    ("reason-not-str", c.ReleaseHold(client_id="bad", hold_id="h1", reason=5), "reason"),
    (
        "bank-ref-del",
        c.Deposit(
            client_id="bad",
            mirror_account_id="omni",
            account_id="alice",
            amount_minor=1,
            currency="CNY",
            bank_ref="x\x7f",
        ),
        "bank_ref",
    ),
    (
        "fee-code-empty",
        c.ChargeFee(
            client_id="bad",
            from_account_id="alice",
            to_account_id="fee",
            amount_minor=1,
            currency="CNY",
            fee_code="",
        ),
        "fee_code",
    ),
    ("platform-name-empty", c.CreatePlatform(client_id="bad", name=""), "name"),
    (
        "expiry-zero",
        c.PlaceHold(
            client_id="bad",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency="CNY",
            reason="r",
            expires_at_ms=0,
        ),
        "expires_at_ms",
    ),
    (
        "expiry-float",
        c.PlaceHold(
            client_id="bad",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency="CNY",
            reason="r",
            expires_at_ms=float(LATER),
        ),
        "expires_at_ms",
    ),
    (
        "expiry-year-10000",
        c.PlaceHold(
            client_id="bad",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency="CNY",
            reason="r",
            expires_at_ms=253402300800000,
        ),
        "expires_at_ms",
    ),
    ("hold-id-bad", c.CaptureHold(client_id="bad", hold_id="h 1", amount_minor=1), "hold_id"),
    (
        "capture-amount-float",
        c.CaptureHold(client_id="bad", hold_id="h1", amount_minor=0.5),
        "amount_minor",
    ),
    ("max-holds-zero", c.ExpireHolds(client_id="bad", max_holds=0), "max_holds"),
    ("max-holds-huge", c.ExpireHolds(client_id="bad", max_holds=10_001), "max_holds"),
    ("unknown-instruction", Bogus(client_id="bad"), "op"),
    ("not-an-instruction", object(), "op"),
]


def _assert_nothing_written(service: LedgerService, before: dict[str, Any], last: int) -> None:
    assert snapshot(service, PID) == before
    assert last_position(service, PID) == last


@pytest.mark.parametrize(
    ("cmd", "field"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_writes_nothing(
    service: LedgerService, platform: Platform, cmd: Any, field: str
) -> None:
    ok(service, PID, deposit(platform, "d", "alice", 100))
    before, last = snapshot(service, PID), last_position(service, PID)
    [outcome] = service.execute(PID, [cmd], ACTOR)
    assert outcome.status == "invalid", outcome
    assert outcome.code == "INVALID_ARGUMENT" and outcome.seq == -1 and not outcome.ok
    assert outcome.field == field and outcome.message
    _assert_nothing_written(service, before, last)


def test_invalid_in_linked_batch_writes_nothing(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(service, PID, deposit(p, "d", "alice", 100))
    before, last = snapshot(service, PID), last_position(service, PID)
    outcomes = run(
        service,
        PID,
        transfer(p, "ok1", "alice", "bob", 10),
        _open(client_id="new-acc", account_id="acc2"),
        _t(client_id="broken", amount_minor=1.5),
        transfer(p, "ok2", "alice", "bob", 10),
        linked=True,
    )
    assert [(o.client_id, o.status, o.code) for o in outcomes] == [
        ("ok1", "invalid", "LINKED_FAILED"),
        ("new-acc", "invalid", "LINKED_FAILED"),
        ("broken", "invalid", "INVALID_ARGUMENT"),
        ("ok2", "invalid", "LINKED_FAILED"),
    ]
    _assert_nothing_written(service, before, last)


def test_malformed_item_after_refusable_linked_item_writes_nothing(
    service: LedgerService, platform: Platform
) -> None:
    """The whole linked batch is checked for shape before anything is decided."""
    p = platform
    before, last = snapshot(service, PID), last_position(service, PID)
    outcomes = run(
        service,
        PID,
        transfer(p, "l1", "alice", "bob", 5),  # would be refused: no funds
        _t(client_id="bad-item", amount_minor=1.5, purpose=LONG),
        linked=True,
    )
    assert [(o.status, o.code) for o in outcomes] == [
        ("invalid", "LINKED_FAILED"),
        ("invalid", "INVALID_ARGUMENT"),
    ]
    _assert_nothing_written(service, before, last)


def test_surrogate_text_is_invalid(service: LedgerService, platform: Platform) -> None:
    """Unencodable text (a lone surrogate) must be answered `invalid`, writing nothing."""
    p = platform
    cmd = c.Deposit(
        client_id="sur",
        mirror_account_id=p.omni,
        account_id="alice",
        amount_minor=1,
        currency="CNY",
        bank_ref="\ud800",
    )
    before, last = snapshot(service, PID), last_position(service, PID)
    [outcome] = service.execute(PID, [cmd], ACTOR)
    assert outcome.status == "invalid"
    _assert_nothing_written(service, before, last)


def test_decode_rejects_unknown_op() -> None:
    with pytest.raises(msgspec.ValidationError):
        c.decode_command_json(b'{"op":"steal","client_id":"x"}')
    with pytest.raises(msgspec.ValidationError):
        c.decode_command_json(b'{"op":"transfer","client_id":"x","amount_minor":"1"}')
    cmd = c.decode_command_json(
        b'{"op":"transfer","client_id":"x","from_account_id":"a","to_account_id":"b",'
        b'"amount_minor":1,"currency":"CNY"}'
    )
    assert isinstance(cmd, c.Transfer) and cmd.purpose == "transfer"


@pytest.mark.parametrize("bad_id", ["P1", "-x", "a" * 64, "", "a_b", "a.b", "p 1"])
def test_invalid_platform_id(service: LedgerService, bad_id: str) -> None:
    outcome = service.create_platform(bad_id, "name", "operator:root")
    assert (outcome.status, outcome.code, outcome.field) == (
        "invalid",
        "INVALID_ARGUMENT",
        "platform_id",
    )
    assert service.platform_ids() == []
    assert service.store.platform_ids() == []


def test_batch_too_large_writes_nothing(service: LedgerService, platform: Platform) -> None:
    before, last = snapshot(service, PID), last_position(service, PID)
    cmds = [c.ExpireHolds(client_id=f"s{i}") for i in range(c.MAX_BATCH_COMMANDS + 1)]
    with pytest.raises(ValueError):
        service.execute(PID, cmds, ACTOR)
    _assert_nothing_written(service, before, last)


def test_unknown_platform(service: LedgerService) -> None:
    from ledger.service import PlatformNotFound

    with pytest.raises(PlatformNotFound):
        service.execute("nope", [c.ExpireHolds(client_id="s")], ACTOR)
    assert service.store.platform_ids() == []


def test_platforms_do_not_see_each_other(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(service, PID, deposit(p, "d", "alice", 100))
    other = make_platform(service, "p2", customers=("zoe",))
    before = snapshot(service, "p2")
    [o] = service.execute(
        "p2",
        [
            c.Transfer(
                client_id="x",
                from_account_id="alice",
                to_account_id="zoe",
                amount_minor=1,
                currency="CNY",
            )
        ],
        ACTOR,
    )
    assert (o.code, o.control) == ("ACCOUNT_NOT_FOUND", INTEGRITY)
    [r] = service.execute("p2", [c.Reverse(client_id="y", movement_id="d", reason="r")], OPERATOR)
    assert r.code == "MOVEMENT_NOT_FOUND"
    assert money_state(snapshot(service, "p2")) == money_state(before)
    assert other.customers == ("zoe",)


def test_closed_service_refuses_work(config: Config, clock: FakeClock) -> None:
    from ledger.service import ServiceClosed

    service = open_service(config, clock)
    make_platform(service)
    service.close()
    with pytest.raises(ServiceClosed):
        service.execute(PID, [c.ExpireHolds(client_id="s")], ACTOR)
    with pytest.raises(ServiceClosed):
        service.submit(PID, [c.ExpireHolds(client_id="s")], ACTOR)

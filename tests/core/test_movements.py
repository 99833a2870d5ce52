"""Every movement kind: exact posted, held and available balances; double entry per currency."""

from __future__ import annotations

import msgspec
import pytest
from helpers import (
    START_MS,
    FakeClock,
    Platform,
    assert_balanced,
    assert_no_negative,
    bal,
    balances,
    deposit,
    hold,
    make_platform,
    money_state,
    ok,
    record_at,
    run1,
    snapshot,
    transfer,
)

from ledger import commands as c
from ledger.service import LedgerService

PID = "p1"
LATER = START_MS + 3_600_000


def check(service: LedgerService, expected: dict[str, tuple[int, int, int]]) -> None:
    """Exact (posted, held, available) of the named accounts, every other account at zero."""
    actual = balances(service, PID)
    for account_id, values in actual.items():
        if account_id not in expected and not account_id.startswith(("omni", "pbank", "usd-")):
            assert values == (0, 0, 0), (account_id, values)
    for account_id, values in expected.items():
        assert actual[account_id] == values, (account_id, actual[account_id], values)
    assert_balanced(service, PID)
    assert_no_negative(service, PID)


def omni_posted(service: LedgerService, p: Platform) -> int:
    return bal(service, PID, p.omni)[0]


def hold_status(service: LedgerService, hold_id: str) -> str:
    with service.reading(PID) as st:
        return str(st.holds[hold_id].status)


def fund(service: LedgerService, p: Platform, account: str, amount: int, cid: str = "fund") -> None:
    ok(service, PID, deposit(p, f"{cid}:{account}", account, amount))


# -- deposits -------------------------------------------------------------------------------------


def test_deposit_to_customer(service: LedgerService, platform: Platform) -> None:
    p = platform
    [o] = ok(service, PID, deposit(p, "d1", "alice", 10_000))
    assert o.kind == "deposited"
    check(service, {"alice": (10_000, 0, 10_000)})
    assert omni_posted(service, p) == 10_000
    rec = record_at(service, PID, o.seq)
    assert rec["entries"] == [[p.omni, "alice", 10_000]]
    assert rec["ccy"] == "CNY" and rec["cid"] == "d1" and rec["kind"] == "deposited"


def test_deposit_to_suspense_and_own_funds(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(
        service,
        PID,
        deposit(p, "d-susp", p.susp, 700),
        c.Deposit(
            client_id="d-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=5_000,
            currency="CNY",
            bank_ref="stmt-1",
        ),
    )
    check(service, {p.susp: (700, 0, 700), p.own: (5_000, 0, 5_000)})
    assert omni_posted(service, p) == 700
    assert bal(service, PID, p.pbank)[0] == 5_000


# -- transfers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("purpose", sorted(c.TRANSFER_PURPOSES))
def test_transfer_each_purpose(service: LedgerService, platform: Platform, purpose: str) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    [o] = ok(service, PID, transfer(p, "t1", "alice", "bob", 3_000, purpose))
    assert o.kind == "transferred"
    check(service, {"alice": (7_000, 0, 7_000), "bob": (3_000, 0, 3_000)})
    assert omni_posted(service, p) == 10_000
    rec = record_at(service, PID, o.seq)
    assert rec["entries"] == [["alice", "bob", 3_000]]
    # the record keeps the instruction as given; a default field is left out (omit_defaults)
    assert msgspec.convert(rec["cmd"], c.Transfer).purpose == purpose
    assert ("purpose" in rec["cmd"]) == (purpose != "transfer")


def test_transfer_whole_balance_and_suspense_clearing(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(service, PID, deposit(p, "d-susp", p.susp, 700))
    ok(
        service,
        PID,
        transfer(p, "t-all", "alice", "carol", 10_000, "repayment"),
        transfer(p, "t-clear", p.susp, "bob", 700, "clearing"),
    )
    check(service, {"alice": (0, 0, 0), "carol": (10_000, 0, 10_000), "bob": (700, 0, 700)})
    assert omni_posted(service, p) == 10_700


# -- fee and shortfall top-up --------------------------------------------------------------------


def test_fee(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    [o] = ok(
        service,
        PID,
        c.ChargeFee(
            client_id="f1",
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=150,
            currency="CNY",
            fee_code="SERVICE-2024",
        ),
    )
    assert o.kind == "fee_charged"
    check(service, {"alice": (9_850, 0, 9_850), p.fee: (150, 0, 150)})


def test_shortfall_top_up(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(
        service,
        PID,
        c.Deposit(
            client_id="d-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=5_000,
            currency="CNY",
        ),
    )
    outcomes = ok(
        service,
        PID,
        c.TopUpShortfall(
            client_id="top1",
            from_account_id=p.own,
            to_account_id="alice",
            amount_minor=1_200,
            currency="CNY",
            reason="recon 2024-01-02 shortfall",
        ),
        c.TopUpShortfall(
            client_id="top2",
            from_account_id=p.own,
            to_account_id=p.susp,
            amount_minor=300,
            currency="CNY",
            reason="recon shortfall in suspense",
        ),
    )
    assert [o.kind for o in outcomes] == ["shortfall_topped_up"] * 2
    check(
        service,
        {p.own: (3_500, 0, 3_500), "alice": (1_200, 0, 1_200), p.susp: (300, 0, 300)},
    )
    assert bal(service, PID, p.pbank)[0] == 5_000


# -- holds ----------------------------------------------------------------------------------------


def test_hold_place(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    [o] = ok(service, PID, hold(p, "h1", "alice", "bob", 3_000, LATER))
    assert o.kind == "hold_placed"
    check(service, {"alice": (10_000, 3_000, 7_000), "bob": (0, 0, 0)})
    with service.reading(PID) as st:
        h = st.holds["h1"]
        assert (h.debit, h.credit, h.amount_minor, h.expires_at_ms) == (
            "alice",
            "bob",
            3_000,
            LATER,
        )
        assert str(h.status) == "pending" and h.reason == "bid"
        assert st.accounts["bob"].credits_pending_minor == 3_000
    rec = record_at(service, PID, o.seq)
    assert rec["hold"]["amount"] == 3_000 and rec["hold"]["kind"] == "hold"


@pytest.mark.parametrize("captured", [1, 1_200, 2_999, 3_000])
def test_hold_capture(service: LedgerService, platform: Platform, captured: int) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(service, PID, hold(p, "h1", "alice", "bob", 3_000, LATER))
    [o] = ok(service, PID, c.CaptureHold(client_id="cap1", hold_id="h1", amount_minor=captured))
    assert o.kind == "hold_captured"
    check(
        service,
        {"alice": (10_000 - captured, 0, 10_000 - captured), "bob": (captured, 0, captured)},
    )
    assert hold_status(service, "h1") == "captured"
    with service.reading(PID) as st:
        assert st.accounts["bob"].credits_pending_minor == 0
    assert record_at(service, PID, o.seq)["resolve"] == [["h1", captured, "captured"]]


def test_hold_to_fee_income_is_a_segregation_breach(
    service: LedgerService, platform: Platform
) -> None:
    """A hold is not a fee: reserving customer money for the platform's fee income crosses the
    customer/platform line outside the whitelisted flows, so segregation refuses it (fees go
    through ChargeFee and the published schedule)."""
    p = platform
    fund(service, p, "alice", 1_000)
    before = money_state(snapshot(service, PID))
    o = run1(service, PID, hold(p, "hf", "alice", p.fee, 100, LATER, reason="fee reserve"))
    assert (o.status, o.code, o.control) == ("refused", "SEGREGATION_BREACH", "segregation")
    assert money_state(snapshot(service, PID)) == before
    check(service, {"alice": (1_000, 0, 1_000), p.fee: (0, 0, 0)})
    # the fee itself is charged per schedule, and lands in fee income
    ok(
        service,
        PID,
        c.ChargeFee(
            client_id="fee1",
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=80,
            currency="CNY",
            fee_code="F",
        ),
    )
    check(service, {"alice": (920, 0, 920), p.fee: (80, 0, 80)})


def test_hold_release(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(service, PID, hold(p, "h1", "alice", "bob", 3_000, LATER))
    [o] = ok(service, PID, c.ReleaseHold(client_id="rel1", hold_id="h1", reason="bid lost"))
    assert o.kind == "hold_released"
    check(service, {"alice": (10_000, 0, 10_000)})
    assert hold_status(service, "h1") == "released"
    assert record_at(service, PID, o.seq)["resolve"] == [["h1", 0, "released"]]


def test_several_holds_reduce_available(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(
        service,
        PID,
        hold(p, "h1", "alice", "bob", 3_000, LATER),
        hold(p, "h2", "alice", "carol", 7_000, LATER),
    )
    check(service, {"alice": (10_000, 10_000, 0)})
    ok(
        service,
        PID,
        c.CaptureHold(client_id="c1", hold_id="h1", amount_minor=3_000),
        c.ReleaseHold(client_id="r2", hold_id="h2", reason="cancelled"),
    )
    check(service, {"alice": (7_000, 0, 7_000), "bob": (3_000, 0, 3_000)})


def test_expire_sweep(service: LedgerService, platform: Platform, clock: FakeClock) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(
        service,
        PID,
        hold(p, "h-soon", "alice", "bob", 1_000, START_MS + 1_000),
        hold(p, "h-later", "alice", "bob", 2_000, START_MS + 10_000),
        c.RequestWithdrawal(
            client_id="w-soon",
            account_id="alice",
            mirror_account_id=p.omni,
            amount_minor=500,
            currency="CNY",
            payee_ref="bank:alice-1",
            expires_at_ms=START_MS + 999,
        ),
    )
    check(service, {"alice": (10_000, 3_500, 6_500)})
    clock.now = START_MS + 999  # only the withdrawal is due (expiry at or before now)
    [o1] = ok(service, PID, c.ExpireHolds(client_id="sweep-1"))
    assert record_at(service, PID, o1.seq)["resolve"] == [["w-soon", 0, "expired"]]
    clock.now = START_MS + 1_000
    [o2] = ok(service, PID, c.ExpireHolds(client_id="sweep-2"))
    assert o2.kind == "holds_expired"
    assert record_at(service, PID, o2.seq)["resolve"] == [["h-soon", 0, "expired"]]
    check(service, {"alice": (10_000, 2_000, 8_000)})
    assert hold_status(service, "h-soon") == "expired"
    assert hold_status(service, "h-later") == "pending"
    assert hold_status(service, "w-soon") == "expired"
    clock.now = START_MS + 20_000
    [o3] = ok(service, PID, c.ExpireHolds(client_id="sweep-3"))
    assert record_at(service, PID, o3.seq)["resolve"] == [["h-later", 0, "expired"]]
    check(service, {"alice": (10_000, 0, 10_000)})
    [o4] = ok(service, PID, c.ExpireHolds(client_id="sweep-4"))
    assert record_at(service, PID, o4.seq)["resolve"] == []


def test_expire_sweep_respects_max_holds(
    service: LedgerService, platform: Platform, clock: FakeClock
) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(service, PID, *(hold(p, f"h{i}", "alice", "bob", 100, START_MS + 10) for i in range(5)))
    clock.now = START_MS + 10
    [o] = ok(service, PID, c.ExpireHolds(client_id="sweep", max_holds=2))
    assert len(record_at(service, PID, o.seq)["resolve"]) == 2
    check(service, {"alice": (10_000, 300, 9_700)})


# -- withdrawals ----------------------------------------------------------------------------------


def _withdrawal(
    p: Platform, cid: str, account: str, amount: int, mirror: str | None = None
) -> c.RequestWithdrawal:
    return c.RequestWithdrawal(
        client_id=cid,
        account_id=account,
        mirror_account_id=mirror or p.omni,
        amount_minor=amount,
        currency="CNY",
        payee_ref=f"bank:{account}",
        expires_at_ms=LATER,
    )


def test_withdrawal_request_and_settle(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    [o] = ok(service, PID, _withdrawal(p, "w1", "alice", 4_000))
    assert o.kind == "withdrawal_requested"
    check(service, {"alice": (10_000, 4_000, 6_000)})
    assert omni_posted(service, p) == 10_000
    rec = record_at(service, PID, o.seq)
    assert rec["hold"]["kind"] == "withdrawal" and rec["hold"]["credit"] == p.omni
    [s] = ok(
        service, PID, c.SettleWithdrawal(client_id="w1-settle", withdrawal_id="w1", bank_ref="b-9")
    )
    assert s.kind == "withdrawal_settled"
    check(service, {"alice": (6_000, 0, 6_000)})
    assert omni_posted(service, p) == 6_000
    assert hold_status(service, "w1") == "captured"
    assert record_at(service, PID, s.seq)["resolve"] == [["w1", 4_000, "captured"]]


def test_withdrawal_request_and_fail(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(service, PID, _withdrawal(p, "w1", "alice", 4_000))
    [f] = ok(
        service,
        PID,
        c.FailWithdrawal(client_id="w1-fail", withdrawal_id="w1", reason="bank rejected"),
    )
    assert f.kind == "withdrawal_failed"
    check(service, {"alice": (10_000, 0, 10_000)})
    assert omni_posted(service, p) == 10_000
    assert hold_status(service, "w1") == "released"


def test_own_funds_withdrawal_to_platform_bank(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(
        service,
        PID,
        c.Deposit(
            client_id="d-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=5_000,
            currency="CNY",
        ),
        _withdrawal(p, "w-own", p.own, 2_000, mirror=p.pbank),
        c.SettleWithdrawal(client_id="w-own-s", withdrawal_id="w-own"),
    )
    check(service, {p.own: (3_000, 0, 3_000)})
    assert bal(service, PID, p.pbank)[0] == 3_000


# -- reversals ------------------------------------------------------------------------------------


def test_reverse_deposit(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000, cid="d")
    [r] = ok(service, PID, c.Reverse(client_id="r1", movement_id="d:alice", reason="bank recalled"))
    assert r.kind == "reversed"
    check(service, {"alice": (0, 0, 0)})
    assert omni_posted(service, p) == 0
    rec = record_at(service, PID, r.seq)
    assert rec["entries"] == [["alice", p.omni, 10_000]] and rec["reverses"] == "d:alice"
    with service.reading(PID) as st:
        assert st.done["d:alice"].reversed_by == "r1"


def test_reverse_transfer(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(service, PID, transfer(p, "t1", "alice", "bob", 3_000, "bid"))
    ok(service, PID, c.Reverse(client_id="r1", movement_id="t1", reason="mistake"))
    check(service, {"alice": (10_000, 0, 10_000), "bob": (0, 0, 0)})


def test_reverse_fee(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(
        service,
        PID,
        c.ChargeFee(
            client_id="f1",
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=150,
            currency="CNY",
            fee_code="X",
        ),
        c.Reverse(client_id="r1", movement_id="f1", reason="fee waived"),
    )
    check(service, {"alice": (10_000, 0, 10_000), p.fee: (0, 0, 0)})


def test_reverse_top_up(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(
        service,
        PID,
        c.Deposit(
            client_id="d-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=5_000,
            currency="CNY",
        ),
        c.TopUpShortfall(
            client_id="top",
            from_account_id=p.own,
            to_account_id="bob",
            amount_minor=400,
            currency="CNY",
            reason="x",
        ),
        c.Reverse(client_id="r-top", movement_id="top", reason="shortfall was a timing difference"),
    )
    check(service, {p.own: (5_000, 0, 5_000), "bob": (0, 0, 0)})


@pytest.mark.parametrize("captured", [1_200, 3_000])
def test_reverse_capture(service: LedgerService, platform: Platform, captured: int) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    ok(
        service,
        PID,
        hold(p, "h1", "alice", "bob", 3_000, LATER),
        c.CaptureHold(client_id="cap1", hold_id="h1", amount_minor=captured),
    )
    [r] = ok(service, PID, c.Reverse(client_id="r1", movement_id="cap1", reason="disputed"))
    check(service, {"alice": (10_000, 0, 10_000), "bob": (0, 0, 0)})
    assert record_at(service, PID, r.seq)["entries"] == [["bob", "alice", captured]]
    assert hold_status(service, "h1") == "captured"  # the original stays as it was


def test_reversal_leaves_original_record_untouched(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    fund(service, p, "alice", 10_000)
    [t] = ok(service, PID, transfer(p, "t1", "alice", "bob", 3_000))
    before = record_at(service, PID, t.seq)
    ok(service, PID, c.Reverse(client_id="r1", movement_id="t1", reason="mistake"))
    assert record_at(service, PID, t.seq) == before


# -- several currencies, lifecycle ----------------------------------------------------------------


def test_currencies_balance_separately(service: LedgerService, platform: Platform) -> None:
    p = platform
    usd = make_platform(service, PID, currency="USD", customers=("dave", "erin"), prefix="usd-")
    ok(
        service,
        PID,
        deposit(p, "d-cny", "alice", 10_000),
        deposit(usd, "d-usd", "usd-dave", 777),
        transfer(usd, "t-usd", "usd-dave", "usd-erin", 77),
        transfer(p, "t-cny", "alice", "bob", 1),
    )
    check(
        service,
        {
            "alice": (9_999, 0, 9_999),
            "bob": (1, 0, 1),
            "usd-dave": (700, 0, 700),
            "usd-erin": (77, 0, 77),
        },
    )
    with service.reading(PID) as st:
        assert st.totals_by_currency == {"CNY": [10_001, 10_001], "USD": [854, 854]}
    assert bal(service, PID, usd.omni)[0] == 777


def test_freeze_unfreeze_close(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 500)
    outcomes = ok(
        service,
        PID,
        c.FreezeAccount(client_id="fz", account_id="alice", reason="court order"),
        c.UnfreezeAccount(client_id="ufz", account_id="alice", reason="order lifted"),
        transfer(p, "t-out", "alice", "bob", 500),
        c.CloseAccount(client_id="close", account_id="alice"),
    )
    assert [o.kind for o in outcomes] == [
        "account_frozen",
        "account_unfrozen",
        "transferred",
        "account_closed",
    ]
    with service.reading(PID) as st:
        assert str(st.accounts["alice"].status) == "closed"
    check(service, {"alice": (0, 0, 0), "bob": (500, 0, 500)})


def test_release_and_fail_run_on_frozen_account(service: LedgerService, platform: Platform) -> None:
    p = platform
    fund(service, p, "alice", 1_000)
    ok(
        service,
        PID,
        hold(p, "h1", "alice", "bob", 100, LATER),
        _withdrawal(p, "w1", "alice", 200),
        c.FreezeAccount(client_id="fz", account_id="alice", reason="investigation"),
        c.ReleaseHold(client_id="rel", hold_id="h1", reason="frozen"),
        c.FailWithdrawal(client_id="wf", withdrawal_id="w1", reason="frozen"),
    )
    check(service, {"alice": (1_000, 0, 1_000)})


def test_a_long_mixed_sequence_stays_balanced(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(
        service,
        PID,
        *(deposit(p, f"d{i}", acc, 1_000 * (i + 1)) for i, acc in enumerate(p.customers)),
    )
    cmds: list[c.Command] = []
    for i in range(60):
        src, dst = p.customers[i % 3], p.customers[(i + 1) % 3]
        cmds.append(transfer(p, f"t{i}", src, dst, 7 + i))
    ok(service, PID, *cmds)
    snap = snapshot(service, PID)
    total = sum(bal(service, PID, a)[0] for a in p.customers)
    assert total == 6_000 == omni_posted(service, p)
    assert snap["totals"]["CNY"][0] == 6_000 + sum(7 + i for i in range(60))
    assert_balanced(service, PID)
    run1(service, PID, c.ExpireHolds(client_id="noop-sweep"))
    assert_balanced(service, PID)


def test_settlement_is_a_fact_even_after_expiry(
    service: LedgerService, platform: Platform, clock: FakeClock
) -> None:
    """The bank already paid: a withdrawal past its expiry (not yet swept) still settles."""
    p = platform
    fund(service, p, "alice", 1_000)
    ok(service, PID, _withdrawal(p, "w1", "alice", 400))
    clock.now = LATER + 1
    ok(service, PID, c.SettleWithdrawal(client_id="w1-s", withdrawal_id="w1"))
    check(service, {"alice": (600, 0, 600)})
    assert omni_posted(service, p) == 600

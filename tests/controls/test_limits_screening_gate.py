"""Limits (per transaction, daily amount and count, platform outflow cap, reset on the next
business day), screening (generic refusals that reveal nothing), the platform gate, and
large-value tags with their report due dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from ctl_helpers import (
    CHECKER,
    OPERATOR,
    SYSTEM,
    CtlPlatform,
    MakePlatform,
    accepted,
    approve,
    assert_refused,
    bind,
    bind_payee,
    ex,
    fund,
    next_business_day,
    pending,
    place_hold,
    posted,
    set_policy,
    tick,
    transfer,
    withdrawal,
)
from helpers import FakeClock, record_at

from controls.policy import DAY_MS, DEFAULT_POLICY, HOUR_MS, Limit
from controls.screening import GENERIC_MESSAGE
from ledger import commands as c
from ledger.service import LedgerService

LIM = "limits"
GATE = "platform_gate"
M = 1_000_000  # 10,000.00 CNY


def _wd(p: CtlPlatform, cid: str, who: str, amount: int) -> c.RequestWithdrawal:
    return p.sign(withdrawal(p, cid, who, amount, f"{who}-bank", p.clock.now + HOUR_MS), who)


# -- limits ---------------------------------------------------------------------------------------


@pytest.fixture
def rich(service: LedgerService, p: CtlPlatform, clock: FakeClock) -> CtlPlatform:
    """alice 100M, bob 200M deposited yesterday (day-start custody 300M: outflow cap 60M)."""
    fund(service, p, "alice", 100 * M)
    fund(service, p, "bob", 200 * M)
    bind(service, p, "alice")
    bind(service, p, "bob")
    next_business_day(clock)
    return p


def test_withdrawal_per_transaction_and_daily_amount(
    service: LedgerService, rich: CtlPlatform
) -> None:
    p = rich
    assert_refused(service, p, _wd(p, "w-big", "alice", 5 * M + 1), "LIMIT_EXCEEDED", LIM)
    for i in range(4):
        accepted(service, p, _wd(p, f"w{i}", "alice", 5 * M))
    assert_refused(service, p, _wd(p, "w-over", "alice", 1), "LIMIT_EXCEEDED", LIM)
    accepted(service, p, _wd(p, "w-bob", "bob", 5 * M))  # per account
    with service.reading(p.id) as st:
        assert st.day_counters[("alice", "request_withdrawal")] == (20 * M, 4)
    # the next business day starts afresh, from its very first instruction
    next_business_day(p.clock)
    accepted(service, p, _wd(p, "w-next", "alice", 5 * M))


def test_withdrawal_daily_count(service: LedgerService, rich: CtlPlatform) -> None:
    p = rich
    for i in range(20):
        accepted(service, p, _wd(p, f"w{i}", "alice", 100))
    assert_refused(service, p, _wd(p, "w20", "alice", 100), "LIMIT_EXCEEDED", LIM)
    p.clock.now = (p.clock.now + 8 * HOUR_MS) // DAY_MS * DAY_MS + DAY_MS - 8 * HOUR_MS - 1
    assert_refused(service, p, _wd(p, "w21", "alice", 100), "LIMIT_EXCEEDED", LIM)  # 23:59:59.999
    p.clock.advance(1)  # 00:00 in China: a new business day
    accepted(service, p, _wd(p, "w22", "alice", 100))


def test_transfer_per_transaction_limit(service: LedgerService, rich: CtlPlatform) -> None:
    p = rich
    big = DEFAULT_POLICY.limits["transfer"].per_txn_max_minor
    assert_refused(
        service, p, p.sign(transfer("t1", "bob", "alice", big + 1), "bob"), "LIMIT_EXCEEDED", LIM
    )
    pending(service, p, p.sign(transfer("t2", "bob", "alice", big), "bob"), actor="platform:test")


def test_daily_transfer_limit_is_a_policy_parameter(
    service: LedgerService, make: MakePlatform
) -> None:
    p = make(limits={"transfer": Limit(daily_max_minor=1_000, daily_count_max=3)})
    fund(service, p, "alice", 10_000)
    accepted(service, p, p.sign(transfer("t1", "alice", "bob", 600), "alice"))
    accepted(service, p, p.sign(transfer("t2", "alice", "bob", 400), "alice"))
    assert_refused(
        service, p, p.sign(transfer("t3", "alice", "bob", 1), "alice"), "LIMIT_EXCEEDED", LIM
    )
    accepted(service, p, p.sign(transfer("t4", "bob", "alice", 1), "bob"))
    next_business_day(p.clock)
    accepted(service, p, p.sign(transfer("t5", "alice", "bob", 1), "alice"))
    accepted(service, p, p.sign(transfer("t6", "alice", "bob", 1), "alice"))
    accepted(service, p, p.sign(transfer("t7", "alice", "bob", 1), "alice"))
    assert_refused(
        service, p, p.sign(transfer("t8", "alice", "bob", 1), "alice"), "LIMIT_EXCEEDED", LIM
    )


def test_platform_daily_net_outflow_cap(
    service: LedgerService, p: CtlPlatform, clock: FakeClock
) -> None:
    fund(service, p, "alice", 10 * M)
    fund(service, p, "bob", 10 * M)
    bind(service, p, "alice")
    bind(service, p, "bob")
    next_business_day(clock)  # custody at day start 20M: cap 20% = 4M
    accepted(service, p, _wd(p, "w1", "alice", 3 * M))
    assert_refused(service, p, _wd(p, "w2", "bob", 2 * M), "LIMIT_EXCEEDED", LIM)
    fund(service, p, "carol", 1 * M)  # net: deposits today offset withdrawals
    accepted(service, p, _wd(p, "w3", "bob", 2 * M))
    assert_refused(service, p, _wd(p, "w4", "bob", 1), "LIMIT_EXCEEDED", LIM)
    next_business_day(clock)
    accepted(service, p, _wd(p, "w5", "bob", 1 * M))


def test_outflow_cap_is_a_policy_parameter(
    service: LedgerService, make: MakePlatform, clock: FakeClock
) -> None:
    p = make(outflow_cap_bp=5_000)
    fund(service, p, "alice", 4 * M)
    fund(service, p, "bob", 4 * M)
    bind(service, p, "alice")
    bind(service, p, "bob")
    next_business_day(clock)  # 8M at day start: cap 50% = 4M
    accepted(service, p, _wd(p, "w1", "alice", 4 * M))
    assert_refused(service, p, _wd(p, "w2", "bob", 1), "LIMIT_EXCEEDED", LIM)


# -- screening ------------------------------------------------------------------------------------


def test_blocked_account_id(service: LedgerService, p: CtlPlatform) -> None:
    fund(service, p, "alice", 1_000)
    set_policy(service, p, blocklist=frozenset({"bob"}))
    fund(service, p, "bob", 1_000)  # bank facts are still recorded for a blocked party
    accepted(service, p, p.sign(transfer("ok", "alice", "carol", 10), "alice"))
    for cmd in (
        p.sign(transfer("t1", "alice", "bob", 10), "alice"),
        p.sign(transfer("t2", "bob", "alice", 10), "bob"),
        p.sign(place_hold("h1", "alice", "bob", 10, p.clock.now + HOUR_MS), "alice"),
        p.sign(bind_payee(p, "b1", "bob"), "bob"),
    ):
        rec = assert_refused(service, p, cmd, "BLOCKED", "screening", pv=1)
        assert rec["message"] == GENERIC_MESSAGE and "bob" not in rec["message"]
    # protective steps still run
    accepted(service, p, c.FreezeAccount(client_id="frz", account_id="bob", reason="sanctions"))


def test_blocked_screening_tokens(service: LedgerService, make: MakePlatform) -> None:
    token_name = service.vault.screening_token("Mallory Evil")
    token_bank = service.vault.screening_token("9999-0000-6666")
    p = make(blocklist=frozenset({token_name, token_bank}))
    fund(service, p, "alice", 1_000)
    opening = c.OpenAccount(
        client_id="open-m",
        account_id="c-0042",
        kind="customer",
        currency="CNY",
        role="lender",
        holder_name="  mallory   EVIL ",  # normalised before hashing
    )
    rec = assert_refused(service, p, opening, "BLOCKED", "screening")
    binding = p.sign(bind_payee(p, "b1", "alice", bank="9999-0000-6666"), "alice")
    rec2 = assert_refused(service, p, binding, "BLOCKED", "screening")
    for r in (rec, rec2):
        raw = msgspec.json.encode(r).decode()
        assert r["message"] == GENERIC_MESSAGE
        for secret in (token_name, token_bank, "allory", "9999-0000-6666"):
            assert secret not in raw


# -- platform gate --------------------------------------------------------------------------------


def _set_gate(service: LedgerService, p: CtlPlatform, gate: str) -> None:
    cid = f"gate-{gate}-{p.clock.now}"
    pending(service, p, c.SetGate(client_id=cid, gate=gate, reason="supervisor"))
    assert approve(service, p, cid).kind == "gate_set"
    with service.reading(p.id) as st:
        assert st.gate == gate


@pytest.mark.parametrize("gate", ["RESTRICTED", "WIND_DOWN"])
def test_restricted_gate_stops_new_business_only(
    service: LedgerService, p: CtlPlatform, gate: str
) -> None:
    fund(service, p, "alice", 10_000)
    bind(service, p, "alice")
    _set_gate(service, p, gate)
    exp = p.clock.now + HOUR_MS
    for cmd in (
        c.OpenAccount(
            client_id="o1", account_id="erin", kind="customer", currency="CNY", role="lender"
        ),
        p.sign(place_hold("h1", "alice", "bob", 10, exp), "alice"),
        p.sign(transfer("t-bid", "alice", "bob", 10, purpose="bid"), "alice"),
        p.sign(transfer("t-disb", "alice", "bob", 10, purpose="disbursement"), "alice"),
    ):
        assert_refused(service, p, cmd, "PLATFORM_RESTRICTED", GATE)
    accepted(
        service, p, p.sign(transfer("t-rep", "alice", "bob", 10, purpose="repayment"), "alice")
    )
    accepted(service, p, _wd(p, "w1", "alice", 100))
    accepted(
        service,
        p,
        c.Deposit(
            client_id="d2",
            mirror_account_id=p.omni,
            account_id="alice",
            amount_minor=5,
            currency="CNY",
        ),
    )
    _set_gate(service, p, "NORMAL")
    accepted(service, p, p.sign(place_hold("h2", "alice", "bob", 10, exp), "alice"))


def test_frozen_gate_records_bank_facts_only(service: LedgerService, p: CtlPlatform) -> None:
    fund(service, p, "alice", 10_000)
    bind(service, p, "alice")
    accepted(service, p, _wd(p, "w0", "alice", 100))
    _set_gate(service, p, "FROZEN")
    for cmd in (
        _wd(p, "w1", "alice", 100),
        p.sign(transfer("t-rep", "alice", "bob", 10, purpose="repayment"), "alice"),
    ):
        assert_refused(service, p, cmd, "PLATFORM_RESTRICTED", GATE)
    accepted(
        service,
        p,
        c.Deposit(
            client_id="d2",
            mirror_account_id=p.omni,
            account_id="alice",
            amount_minor=5,
            currency="CNY",
        ),
    )
    accepted(service, p, c.SettleWithdrawal(client_id="s0", withdrawal_id="w0"))
    accepted(service, p, c.ExpireHolds(client_id="sweep"), SYSTEM)
    accepted(service, p, c.FreezeAccount(client_id="frz", account_id="bob", reason="court"))
    assert_refused(
        service,
        p,
        c.SetGate(client_id="g-same", gate="FROZEN", reason="again"),
        "GATE_UNCHANGED",
        "integrity",
        actor=OPERATOR,
    )
    _set_gate(service, p, "NORMAL")
    accepted(service, p, _wd(p, "w2", "alice", 100))


# -- large-value tags -----------------------------------------------------------------------------


CHINA = timedelta(hours=8)


def _china_ms(y: int, mo: int, d: int, h: int) -> int:
    return int((datetime(y, mo, d, h, tzinfo=UTC) - CHINA).timestamp() * 1000)


def _due(business_day: datetime, working_days: int = 5) -> int:
    """The last millisecond (China time) of the n-th Mon-Fri day after `business_day`."""
    day = business_day
    while working_days:
        day += timedelta(days=1)
        if day.weekday() < 5:
            working_days -= 1
    end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1) - CHINA
    return int(end.timestamp() * 1000) - 1


@pytest.mark.parametrize(
    ("y", "mo", "d"),
    [(2023, 11, 20), (2023, 11, 15), (2023, 11, 17), (2023, 11, 18)],
    ids=["monday", "wednesday", "friday", "saturday"],
)
def test_large_value_tags_and_due_dates(
    service: LedgerService, make: MakePlatform, clock: FakeClock, y: int, mo: int, d: int
) -> None:
    clock.now = _china_ms(y, mo, d, 10)  # 10:00 in China
    p = make()
    due = _due(datetime(y, mo, d, tzinfo=UTC))
    thresholds = DEFAULT_POLICY.lvt["CNY"]
    below = accepted(
        service,
        p,
        c.Deposit(
            client_id="d1",
            mirror_account_id=p.omni,
            account_id="bob",
            amount_minor=30 * M,
            currency="CNY",
        ),
    )
    assert "tags" not in record_at(service, p.id, below.seq)
    # the day's total reaches the individual threshold: this deposit is tagged
    out = accepted(
        service,
        p,
        c.Deposit(
            client_id="d2",
            mirror_account_id=p.omni,
            account_id="bob",
            amount_minor=20 * M,
            currency="CNY",
        ),
    )
    assert record_at(service, p.id, out.seq)["tags"] == [
        {
            "tag": "LVT",
            "account": "bob",
            "side": "in",
            "day_total_minor": thresholds.individual_minor,
            "due_ms": due,
        }
    ]
    # a corporate customer reports from a higher threshold
    corp = accepted(
        service,
        p,
        c.Deposit(
            client_id="d3",
            mirror_account_id=p.omni,
            account_id="carol",
            amount_minor=60 * M,
            currency="CNY",
        ),
    )
    assert "tags" not in record_at(service, p.id, corp.seq)
    # money out is cumulated apart from money in; an approved large transfer is tagged on both
    pending(
        service, p, p.sign(transfer("big", "bob", "alice", 50 * M), "bob"), actor="platform:test"
    )
    out = approve(service, p, "big")
    tags = record_at(service, p.id, out.seq)["tags"]
    assert {(t["account"], t["side"], t["day_total_minor"]) for t in tags} == {
        ("bob", "out", 50 * M),
        ("alice", "in", 50 * M),
    }
    assert {t["due_ms"] for t in tags} == {due}
    # the next business day starts from zero
    next_business_day(clock)
    nxt = accepted(
        service,
        p,
        c.Deposit(
            client_id="d4",
            mirror_account_id=p.omni,
            account_id="bob",
            amount_minor=30 * M,
            currency="CNY",
        ),
    )
    assert "tags" not in record_at(service, p.id, nxt.seq)
    assert posted(service, p, "bob") == 30 * M
    assert ex(service, p, c.ApproveRequest(client_id="x", request_id="big"), CHECKER).code == (
        "APPROVAL_NOT_PENDING"
    )


def test_first_instruction_of_the_day_sees_the_new_day(
    service: LedgerService, rich: CtlPlatform
) -> None:
    p = rich
    tick(service, p)
    with service.reading(p.id) as st:
        assert st.day_start_custody == {"CNY": 300 * M}

"""Each early-warning rule fires on its pattern at the right level, and not on a near-miss.

Every test switches on only the rule under test (others, like a missing reconciliation, would
fire too as the clock moves), runs against the real ledger on SQLite and PostgreSQL, and moves
time with the fake clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from helpers import (
    OPERATOR,
    FakeClock,
    Platform,
    deposit,
    hold,
    make_platform,
    ok,
    run1,
    transfer,
)
from risk_helpers import DAY, DIGEST, HOUR, engine, found, gate, levels, reconcile, withdraw

from ledger import commands as c
from ledger.service import LedgerService
from risk.feed import StatementBreak, UnmatchedItem

CST = dt.timezone(dt.timedelta(hours=8))


def local(y: int, m: int, d: int, h: int = 0, minute: int = 0) -> int:
    """Unix ms of a local (UTC+8) wall time; the fake clock starts Wed 2023-11-15 06:13."""
    return int(dt.datetime(y, m, d, h, minute, tzinfo=CST).timestamp() * 1000)


# -- W01 / W02: reconciliation shortfall and excess ---------------------------------------------


def test_w01_small_shortfall_is_orange_and_a_top_up_cures_it(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W01"})
    ok(service, "p1", deposit(p, "d1", "alice", 1_000_000))
    reconcile(service, "r1", clock.now, closing=999_500, requirement=1_000_000)
    assert levels(eng, "W01") == ["ORANGE"]
    ok(
        service,
        "p1",
        c.Deposit(
            client_id="own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=10_000,
            currency="CNY",
        ),
    )
    ok(
        service,
        "p1",
        c.TopUpShortfall(
            client_id="top",
            from_account_id=p.own,
            to_account_id="alice",
            amount_minor=500,
            currency="CNY",
            reason="cure r1",
        ),
    )
    clock.advance(DAY)
    assert levels(eng, "W01") == ["ORANGE"]  # cured the same day: no RED
    assert gate(service) == "NORMAL"


def test_w01_uncured_shortfall_turns_red_at_day_end_and_restricts(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W01"})
    ok(service, "p1", deposit(platform, "d1", "alice", 1_000_000))
    reconcile(service, "r1", clock.now, closing=999_500, requirement=1_000_000)
    clock.advance(HOUR)
    assert levels(eng, "W01") == ["ORANGE"]
    clock.advance(DAY)
    assert levels(eng, "W01") == ["ORANGE", "RED"]
    assert gate(service) == "RESTRICTED"


def test_w01_large_shortfall_is_red_at_once_balanced_is_nothing(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W01", "W02"})
    ok(service, "p1", deposit(platform, "d1", "alice", 1_000_000))
    reconcile(service, "r0", clock.now, closing=1_000_000, requirement=1_000_000)
    clock.advance(DAY)
    assert found(eng) == []  # near-miss: balanced
    reconcile(service, "r1", clock.now, closing=998_000, requirement=1_000_000)  # 0.2 %
    assert levels(eng, "W01") == ["RED"]


def test_w02_excess_yellow_then_orange_on_the_next_business_day(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W02"})
    ok(service, "p1", deposit(platform, "d1", "alice", 1_000_000))
    reconcile(service, "r1", local(2023, 11, 15, 23, 59), closing=1_000_100, requirement=1_000_000)
    assert levels(eng, "W02") == ["YELLOW"]
    clock.now = local(2023, 11, 16, 12)
    reconcile(service, "r2", local(2023, 11, 16, 23, 59), closing=1_000_000, requirement=1_000_000)
    assert levels(eng, "W02") == ["YELLOW"]  # near-miss: returned by the next day
    reconcile(service, "r3", local(2023, 11, 17, 23, 59), closing=1_000_100, requirement=1_000_000)
    clock.now = local(2023, 11, 20, 12)
    reconcile(service, "r4", local(2023, 11, 20, 23, 59), closing=1_000_100, requirement=1_000_000)
    assert levels(eng, "W02") == ["YELLOW", "YELLOW", "ORANGE"]


# -- W03: late or missing reconciliation ----------------------------------------------------------


def test_w03_missing_reconciliation_orange_then_red(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W03"})
    clock.now = local(2023, 11, 16, 9, 59)  # day 11-15 is due 11-16 10:00
    assert found(eng) == []
    clock.now = local(2023, 11, 16, 10, 1)
    assert levels(eng, "W03") == ["ORANGE"]
    clock.now = local(2023, 11, 20, 10, 1)  # two business days (Fri, Mon) after the due time
    got = found(eng, rule="W03")
    assert sorted(a["level"] for a in got) == ["ORANGE", "ORANGE", "ORANGE", "RED"]
    assert any("2023-11-15" in a["summary"] and a["level"] == "RED" for a in got)


def test_w03_reconciled_in_time_raises_nothing(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W03"})
    clock.now = local(2023, 11, 16, 9)
    reconcile(service, "r1", local(2023, 11, 15, 23, 59), closing=0, requirement=0)
    clock.now = local(2023, 11, 16, 23)
    assert found(eng) == []


# -- W04 / W05: from the reconciliation feed ------------------------------------------------------


class FakeFeed:
    def __init__(self) -> None:
        self.breaks: list[StatementBreak] = []
        self.items: list[UnmatchedItem] = []

    def continuity_breaks(self, platform: str) -> Sequence[StatementBreak]:
        return self.breaks

    def unmatched_items(self, platform: str) -> Sequence[UnmatchedItem]:
        return self.items


def test_w04_continuity_break_is_red_once(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    feed = FakeFeed()
    eng = engine(service, clock, {"W04"}, feed=feed)
    assert found(eng) == []
    feed.breaks.append(
        StatementBreak(
            id="brk-1",
            statement=DIGEST,
            reason="opening balance differs from the previous closing",
            detected_ms=clock.now,
        )
    )
    assert levels(eng, "W04") == ["RED"]
    clock.advance(HOUR)
    assert levels(eng, "W04") == ["RED"]  # asked again: the same alert, not a new one
    assert gate(service) == "RESTRICTED"


def test_w05_unmatched_item_ages_by_business_days_and_amount(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    feed = FakeFeed()
    eng = engine(service, clock, {"W05"}, feed=feed)
    since = local(2023, 11, 15, 9)
    feed.items = [
        UnmatchedItem(id="small", side="bank", amount_minor=5_000, currency="CNY", since_ms=since),
        UnmatchedItem(
            id="big", side="ledger", amount_minor=2_000_000, currency="CNY", since_ms=since
        ),
    ]
    clock.now = local(2023, 11, 16, 12)  # 1 business day: not yet
    assert found(eng) == []
    clock.now = local(2023, 11, 17, 12)  # 2 business days
    assert sorted((a["subject"], a["level"]) for a in found(eng)) == [
        ("big", "ORANGE"),
        ("small", "YELLOW"),
    ]
    clock.now = local(2023, 11, 24, 12)  # 7 business days
    assert sorted(levels(eng, "W05")) == ["ORANGE", "RED", "RED", "YELLOW"]


# -- W06: large-value report due --------------------------------------------------------------


def test_w06_lvt_yellow_on_tag_orange_before_due_red_after(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W06"})
    ok(service, "p1", deposit(platform, "d1", "alice", 60_000_000))
    [yellow] = found(eng, rule="W06")
    assert yellow["level"] == "YELLOW" and yellow["subject"] == "alice"
    clock.now = local(2023, 11, 22, 12)  # due end of 11-22 (5 working days after 11-15)
    assert levels(eng, "W06") == ["YELLOW", "ORANGE"]
    clock.now = local(2023, 11, 23, 1)
    assert levels(eng, "W06") == ["YELLOW", "ORANGE", "RED"]


def test_w06_closing_the_alert_as_filed_stops_escalation(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W06"})
    ok(service, "p1", deposit(platform, "d1", "alice", 60_000_000))
    ok(service, "p1", deposit(platform, "d2", "bob", 49_000_000))  # near-miss: below threshold
    [yellow] = found(eng, rule="W06")
    [o] = service.execute(
        "p1",
        [
            c.CloseAlert(
                client_id="close",
                alert_id=yellow["alert_id"],
                reason="LVT report filed, ref 2023-114",
            )
        ],
        OPERATOR,
    )
    assert o.status == "accepted", o
    clock.now = local(2023, 11, 24)
    assert levels(eng, "W06") == ["YELLOW"]


# -- W07: structuring ---------------------------------------------------------------------------


def test_w07_three_near_threshold_amounts_in_a_week(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W07"})
    for i in range(2):
        ok(service, "p1", deposit(platform, f"a{i}", "alice", 46_000_000))  # 92 % of 50M
        ok(service, "p1", deposit(platform, f"b{i}", "bob", 46_000_000))
        clock.advance(DAY)
    ok(service, "p1", deposit(platform, "a2", "alice", 47_500_000))
    ok(service, "p1", deposit(platform, "b2", "bob", 40_000_000))  # near-miss: 80 %
    got = found(eng, rule="W07")
    assert [(a["subject"], a["level"]) for a in got] == [("alice", "ORANGE")]


def test_w07_same_day_splits_crossing_the_threshold(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W07"})
    for i in range(3):
        ok(service, "p1", deposit(platform, f"a{i}", "alice", 20_000_000))
    for i in range(2):  # near-miss: only two splits
        ok(service, "p1", deposit(platform, f"b{i}", "bob", 30_000_000))
    got = found(eng, rule="W07")
    assert [(a["subject"], a["level"]) for a in got] == [("alice", "ORANGE")]


# -- W08: rapid in and out ------------------------------------------------------------------------


def test_w08_rapid_in_out_twice_in_a_month(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W08"})
    ok(service, "p1", deposit(p, "a1", "alice", 6_000_000), deposit(p, "c1", "carol", 6_000_000))
    ok(
        service,
        "p1",
        transfer(p, "a1o", "alice", "bob", 5_000_000),
        transfer(p, "c1o", "carol", "bob", 5_000_000),
    )
    clock.advance(3 * DAY)
    ok(service, "p1", deposit(p, "a2", "alice", 6_000_000), deposit(p, "c2", "carol", 6_000_000))
    clock.advance(10 * HOUR)
    ok(
        service,
        "p1",
        transfer(p, "a2o", "alice", "bob", 5_000_000),
        transfer(p, "c2o", "carol", "bob", 4_000_000),
    )  # near-miss: 4M of 7M is < 80 %
    got = found(eng, rule="W08")
    assert [(a["subject"], a["level"]) for a in got] == [("alice", "ORANGE")]


# -- W09: fan-in / fan-out ----------------------------------------------------------------------


def _fan(service: LedgerService, p: Platform, senders: int, target: str) -> None:
    for i in range(senders):
        ok(service, "p1", deposit(p, f"{target}d{i}", f"{target}{i}", 1_000))
        ok(service, "p1", transfer(p, f"{target}t{i}", f"{target}{i}", target, 100))
    ok(service, "p1", transfer(p, f"{target}out", target, f"{target}sink", 50))


def test_w09_fan_in_then_concentrated_out(service: LedgerService, clock: FakeClock) -> None:
    names = [f"x{i}" for i in range(10)] + [f"y{i}" for i in range(9)]
    p = make_platform(service, "p1", customers=[*names, "x", "xsink", "y", "ysink"])
    eng = engine(service, clock, {"W09"})
    _fan(service, p, 10, "x")
    _fan(service, p, 9, "y")  # near-miss: nine payers
    got = found(eng, rule="W09")
    assert [(a["subject"], a["level"]) for a in got] == [("x", "ORANGE")]


# -- W10: dormant account reactivated ------------------------------------------------------------


def test_w10_dormant_a_year_then_large_inflow(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W10"})
    ok(service, "p1", deposit(platform, "b0", "bob", 100))
    clock.advance(300 * DAY)
    ok(service, "p1", deposit(platform, "b1", "bob", 6_000_000))  # near-miss: 300 days quiet
    clock.advance(66 * DAY)
    ok(service, "p1", deposit(platform, "a1", "alice", 6_000_000))  # 366 days since opening
    got = found(eng, rule="W10")
    assert [(a["subject"], a["level"]) for a in got] == [("alice", "ORANGE")]


# -- W12: account takeover --------------------------------------------------------------------


def _bind(ref: str, account: str) -> c.BindPayee:
    return c.BindPayee(
        client_id=f"bind-{account}-{ref}",
        account_id=account,
        payee_ref=ref,
        bank_account="6222020000000000",
        holder_name=f"{account} Example",
    )


def test_w12_binding_replaced_then_withdrawal_orange_then_red_when_paid(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W12"})
    for name in ("dave", "erin"):
        ok(
            service,
            "p1",
            c.OpenAccount(
                client_id=f"open-{name}",
                account_id=name,
                kind="customer",
                currency="CNY",
                role="lender",
                holder_name=f"{name} Example",
            ),
        )
        ok(service, "p1", deposit(p, f"d-{name}", name, 1_000_000))
        ok(service, "p1", _bind("card-1", name))
    clock.advance(HOUR)
    ok(service, "p1", _bind("card-2", "dave"))  # replaces dave's binding
    clock.advance(HOUR)
    ok(service, "p1", withdraw(p, "w-erin", "erin", 10_000, clock.now + DAY))  # near-miss
    ok(service, "p1", withdraw(p, "w-dave", "dave", 900_000, clock.now + DAY))
    assert [(a["subject"], a["level"]) for a in found(eng, rule="W12")] == [("dave", "ORANGE")]
    ok(service, "p1", c.SettleWithdrawal(client_id="s-dave", withdrawal_id="w-dave"))
    assert levels(eng, "W12") == ["ORANGE", "RED"]
    assert gate(service) == "RESTRICTED"


# -- W14: stale holds -------------------------------------------------------------------------


def test_w14_expired_hold_not_released_escalates(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W14"})
    ok(service, "p1", deposit(p, "a", "alice", 10_000), deposit(p, "b", "bob", 10_000))
    ok(service, "p1", hold(p, "h-a", "alice", "carol", 1_000, clock.now + HOUR))
    ok(service, "p1", hold(p, "h-b", "bob", "carol", 1_000, clock.now + HOUR))
    ok(service, "p1", c.ReleaseHold(client_id="r-b", hold_id="h-b", reason="bid lost"))  # near-miss
    clock.advance(HOUR + 30 * 60_000)  # inside the sweep's grace
    assert found(eng) == []
    clock.advance(HOUR)
    assert [(a["subject"], a["level"]) for a in found(eng, rule="W14")] == [("h-a", "YELLOW")]
    clock.now = local(2023, 11, 17, 12)
    assert levels(eng, "W14") == ["YELLOW", "ORANGE"]


# -- W15: segregation attempts ----------------------------------------------------------------


def test_w15_segregation_attempts_orange_then_red(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W15"})
    ok(service, "p1", deposit(p, "a", "alice", 10_000))
    assert run1(service, "p1", transfer(p, "s1", "alice", p.own, 100)).code == "SEGREGATION_BREACH"
    assert levels(eng, "W15") == ["ORANGE"]
    assert gate(service) == "NORMAL"
    clock.advance(HOUR)
    assert run1(service, "p1", transfer(p, "s2", "alice", p.own, 100)).code == "SEGREGATION_BREACH"
    assert levels(eng, "W15") == ["ORANGE"]  # near-miss: two in 24 h
    assert run1(service, "p1", transfer(p, "s3", "alice", p.own, 100)).code == "SEGREGATION_BREACH"
    assert levels(eng, "W15") == ["ORANGE", "RED"]
    assert gate(service) == "RESTRICTED"


# -- W16: maker-checker anomalies -------------------------------------------------------------


def test_w16_many_rejections_of_one_maker(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W16"})
    for maker, n in (("operator:test", 5), ("operator:other", 4)):  # other: near-miss
        for i in range(n):
            [o] = service.execute(
                "p1",
                [c.SetGate(client_id=f"g-{maker}-{i}", gate="WIND_DOWN", reason="drill")],
                maker,
            )
            assert o.status == "pending", o
            [r] = service.execute(
                "p1",
                [c.RejectRequest(client_id=f"rj-{maker}-{i}", request_id=o.client_id, reason="no")],
                "checker:reviewer",
            )
            assert r.status == "accepted", r
    got = found(eng, rule="W16")
    assert [(a["subject"], a["level"]) for a in got] == [("operator:test", "YELLOW")]


def test_w16_approvals_right_before_expiry(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W16"})
    gates = ["WIND_DOWN", "RESTRICTED", "NORMAL"]
    for i, target in enumerate(gates):
        [o] = service.execute(
            "p1", [c.SetGate(client_id=f"g{i}", gate=target, reason="drill")], OPERATOR
        )
        assert o.status == "pending", o
        clock.advance(24 * HOUR - (5 * 60_000 if i < 2 else 3 * HOUR))  # last: near-miss
        [a] = service.execute(
            "p1", [c.ApproveRequest(client_id=f"a{i}", request_id=o.client_id)], "checker:reviewer"
        )
        assert a.status == "accepted", a
    assert found(eng, rule="W16") == []
    [o] = service.execute(
        "p1", [c.SetGate(client_id="g9", gate="FROZEN", reason="drill")], OPERATOR
    )
    clock.advance(24 * HOUR - 60_000)
    service.execute(
        "p1", [c.ApproveRequest(client_id="a9", request_id=o.client_id)], "checker:reviewer"
    )
    got = found(eng, rule="W16")
    assert [(a["subject"], a["level"]) for a in got] == [("checker:reviewer", "YELLOW")]


# -- W19: run on the platform ------------------------------------------------------------------


def test_w19_net_outflow_share_in_24h(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W19"})
    ok(service, "p1", deposit(p, "a", "alice", 10_000_000), deposit(p, "b", "bob", 10_000_000))
    clock.advance(DAY + HOUR)
    ok(service, "p1", withdraw(p, "w1", "alice", 1_900_000, clock.now + DAY))
    ok(service, "p1", c.SettleWithdrawal(client_id="s1", withdrawal_id="w1"))
    assert found(eng) == []  # near-miss: 9.5 %
    ok(service, "p1", withdraw(p, "w2", "alice", 200_000, clock.now + DAY))
    ok(service, "p1", c.SettleWithdrawal(client_id="s2", withdrawal_id="w2"))
    assert levels(eng, "W19") == ["ORANGE"]  # 10.5 %
    ok(service, "p1", withdraw(p, "w3", "bob", 2_000_000, clock.now + DAY))
    ok(service, "p1", c.SettleWithdrawal(client_id="s3", withdrawal_id="w3"))
    assert levels(eng, "W19") == ["ORANGE", "RED"]  # 20.5 %


# -- W23: refusal spikes ----------------------------------------------------------------------


def test_w23_refusal_spike_over_the_baseline(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    p = platform
    eng = engine(service, clock, {"W23"})
    for i in range(19):  # near-miss: under the minimum count in the hour
        assert run1(service, "p1", transfer(p, f"x{i}", "carol", "bob", 1)).status == "refused"
    assert found(eng) == []
    clock.advance(HOUR)
    for i in range(25):
        assert run1(service, "p1", transfer(p, f"y{i}", "carol", "bob", 1)).status == "refused"
    assert levels(eng, "W23") == ["YELLOW"]

"""Disclosure figures for a scripted workload against a hand-worked expectation, period
boundaries in the policy's day offset, determinism across computations and restarts."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from disc_workload import (
    DAY1,
    DAY1_FROM_MS,
    DAY1_TO_MS,
    EXPECTED_ALERTS,
    EXPECTED_APPROVALS,
    EXPECTED_BALANCES,
    EXPECTED_BEFORE,
    EXPECTED_CUSTOMERS,
    EXPECTED_DAILY_DAY1,
    EXPECTED_FLOWS,
    EXPECTED_HOLDS,
    EXPECTED_KINDS,
    EXPECTED_LARGE_VALUE,
    EXPECTED_MANUAL,
    EXPECTED_RECONCILIATION,
    EXPECTED_REFUSALS,
    PLATFORM_ID,
    run_workload,
)
from helpers import (
    BOOKKEEPING_POLICY,
    FakeClock,
    deposit,
    log_records,
    make_platform,
    ok,
    open_service,
)

from controls.policy import DAY_MS, HOUR_MS, MANUAL_OPS
from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import LedgerStore
from projections import disclosure as D


def _snapshot(service: LedgerService, spec: D.PeriodSpec) -> dict[str, Any]:
    return D.build(service, PLATFORM_ID, spec).snapshot


def test_manual_ops_match_the_policy_module() -> None:
    assert D.MANUAL_OPS == MANUAL_OPS


def test_day_figures_match_the_hand_worked_expectation(
    service: LedgerService, clock: FakeClock
) -> None:
    run_workload(service, clock)
    snap = _snapshot(service, D.PeriodSpec.day(DAY1))
    assert snap["format"] == "custody-disclosure/v1"
    assert snap["platform"] == PLATFORM_ID
    assert snap["period"] == {
        "type": "day",
        "label": DAY1,
        "from_ms": DAY1_FROM_MS,
        "to_ms": DAY1_TO_MS,
        "day_offset_ms": 8 * HOUR_MS,
        "business_days": 1,
    }
    assert list(snap["currencies"]) == ["CNY"]
    cny = snap["currencies"]["CNY"]
    assert cny["balances"] == EXPECTED_BALANCES
    assert cny["holds"] == EXPECTED_HOLDS
    assert cny["flows"] == EXPECTED_FLOWS
    assert cny["large_value"] == EXPECTED_LARGE_VALUE
    assert cny["daily"] == [EXPECTED_DAILY_DAY1]
    assert snap["customers"] == EXPECTED_CUSTOMERS
    assert snap["refusals"] == EXPECTED_REFUSALS
    assert snap["approvals"] == EXPECTED_APPROVALS
    assert snap["manual_operations"] == EXPECTED_MANUAL
    assert snap["policy"] == {"version_at_end": 0, "versions_in_force": [0], "changes_in_period": 0}
    assert snap["gate"] == {"at_end": "NORMAL", "sequence": ["NORMAL"], "changes_in_period": 0}
    assert snap["alerts"] == EXPECTED_ALERTS
    recon = dict(cny["reconciliation"])
    last = dict(recon.pop("last"))
    [approved] = [r for r in log_records(service, PLATFORM_ID) if r.get("executes") == "rec1"]
    assert last.pop("seq") == approved["seq"]
    assert {**recon, "last": last} == EXPECTED_RECONCILIATION
    records = snap["records"]
    assert records["by_kind"] == EXPECTED_KINDS
    assert records["before_period"] == EXPECTED_BEFORE
    assert records["in_period"] == sum(EXPECTED_KINDS.values())
    assert records["after_period"] == 1 and records["period_closed"] == 1
    assert records["first_in_period"] == EXPECTED_BEFORE
    assert records["last_in_period"] == EXPECTED_BEFORE + sum(EXPECTED_KINDS.values()) - 1
    # the checkpoint named is a signed one, and its root is the snapshot's
    cp = service.checkpoint(PLATFORM_ID, snap["checkpoint"]["size"])
    assert cp is not None and cp.root.hex() == snap["checkpoint"]["root"]


def test_month_series_carries_balances_across_days(
    service: LedgerService, clock: FakeClock
) -> None:
    run_workload(service, clock)
    snap = _snapshot(service, D.PeriodSpec.month("2023-11"))
    assert snap["period"]["business_days"] == 30
    assert snap["period"]["from_ms"] == 1_698_768_000_000  # 2023-11-01 00:00 UTC+8
    daily = {d["day"]: d for d in snap["currencies"]["CNY"]["daily"]}
    assert len(daily) == 30
    assert daily["2023-11-13"]["custody_end"] == 0
    assert daily["2023-11-14"]["deposits"] == 5_000_000
    assert daily["2023-11-14"]["custody_end"] == 5_000_000
    assert daily["2023-11-15"] == EXPECTED_DAILY_DAY1
    assert daily["2023-11-16"]["deposits"] == 1_000
    assert daily["2023-11-16"]["custody_end"] == 7_021_000
    assert daily["2023-11-30"]["customer_money_end"] == 7_023_000
    # the whole month: alice's deposit, the new customers, the late deposit
    flows = snap["currencies"]["CNY"]["flows"]
    assert flows["deposits"] == {"count": 3, "amount_minor": 7_001_000}
    assert snap["customers"]["new"] == 3
    assert snap["records"]["before_period"] == 0 and snap["records"]["after_period"] == 0
    assert snap["records"]["period_closed"] == 0


def _boundary_log(service: LedgerService, clock: FakeClock, offset_ms: int) -> None:
    policy = msgspec.structs.replace(BOOKKEEPING_POLICY, day_offset_ms=offset_ms)
    clock.now = DAY1_FROM_MS - HOUR_MS
    p = make_platform(service, PLATFORM_ID, policy=policy)
    clock.now = DAY1_TO_MS - 1  # 2023-11-15 23:59:59.999 in UTC+8
    ok(service, PLATFORM_ID, deposit(p, "last-ms", p.customers[0], 100))
    clock.now = DAY1_TO_MS  # 2023-11-16 00:00 in UTC+8 (16:00 UTC on the 15th)
    ok(service, PLATFORM_ID, deposit(p, "next-day", p.customers[0], 7))


def test_day_boundaries_follow_the_policy_offset(service: LedgerService, clock: FakeClock) -> None:
    _boundary_log(service, clock, 8 * HOUR_MS)
    day1 = _snapshot(service, D.PeriodSpec.day(DAY1))
    assert day1["period"]["to_ms"] == DAY1_TO_MS
    assert day1["currencies"]["CNY"]["flows"]["deposits"] == {"count": 1, "amount_minor": 100}
    day2 = _snapshot(service, D.PeriodSpec.day("2023-11-16"))
    assert day2["period"]["from_ms"] == DAY1_TO_MS
    assert day2["currencies"]["CNY"]["flows"]["deposits"] == {"count": 1, "amount_minor": 7}
    assert day2["currencies"]["CNY"]["balances"]["customer_liabilities"]["lender"] == 107


def test_day_boundaries_in_utc(service: LedgerService, clock: FakeClock) -> None:
    _boundary_log(service, clock, 0)
    day1 = _snapshot(service, D.PeriodSpec.day(DAY1))
    assert day1["period"]["from_ms"] == DAY1_FROM_MS + 8 * HOUR_MS
    assert day1["period"]["day_offset_ms"] == 0
    assert day1["currencies"]["CNY"]["flows"]["deposits"] == {"count": 2, "amount_minor": 107}
    assert day1["records"]["period_closed"] == 0  # nothing at or after its end yet


def test_explicit_range_cuts_the_daily_series(service: LedgerService, clock: FakeClock) -> None:
    run_workload(service, clock)
    start = DAY1_FROM_MS + 12 * HOUR_MS
    snap = _snapshot(service, D.PeriodSpec.range(start, start + DAY_MS))
    assert snap["period"]["label"] == "" and snap["period"]["business_days"] == 2
    daily = snap["currencies"]["CNY"]["daily"]
    assert [(d["day"], d["from_ms"], d["to_ms"]) for d in daily] == [
        ("2023-11-15", start, DAY1_TO_MS),
        ("2023-11-16", DAY1_TO_MS, start + DAY_MS),
    ]
    # the day-1 workload ran at 06:13 local time, before the range starts
    assert daily[0]["deposits"] == 0 and daily[1]["deposits"] == 1_000


def test_two_computations_and_a_restart_give_identical_bytes(
    config: Config, clock: FakeClock, service: LedgerService
) -> None:
    run_workload(service, clock)
    spec = D.PeriodSpec.day(DAY1)
    first = D.build(service, PLATFORM_ID, spec)
    again = D.build(service, PLATFORM_ID, spec)
    assert again.data == first.data
    size = first.snapshot["checkpoint"]["size"]
    service.close()
    # a fresh store, no service: the fold over the stored records alone
    store = LedgerStore(config)
    try:
        alone = D.compute_from_store(store, PLATFORM_ID, spec, size)
    finally:
        store.close()
    assert D.canonical(alone) == first.data
    restarted = open_service(config, clock)
    try:
        after = D.build(restarted, PLATFORM_ID, spec, size)
        assert after.data == first.data
        assert after.note == first.note  # Ed25519 signatures are deterministic too
    finally:
        restarted.close()


def test_canonical_json_has_integers_only(service: LedgerService, clock: FakeClock) -> None:
    run_workload(service, clock)
    built = D.build(service, PLATFORM_ID, D.PeriodSpec.month("2023-11"))

    def scalars(x: Any) -> list[Any]:
        if isinstance(x, dict):
            return [v for value in x.values() for v in scalars(value)]
        if isinstance(x, list):
            return [v for value in x for v in scalars(value)]
        return [x]

    kinds = {type(v) for v in scalars(built.snapshot)}
    assert kinds <= {int, str, type(None)}, kinds
    assert b".0" not in built.data and b"e+" not in built.data
    assert built.data == msgspec.json.encode(msgspec.json.decode(built.data), order="sorted")


def test_checkpoint_choice_and_mismatch(service: LedgerService, clock: FakeClock) -> None:
    p = run_workload(service, clock)
    spec = D.PeriodSpec.day(DAY1)
    cp = service.sign_checkpoint(PLATFORM_ID)
    # the period ended before the last record: the latest checkpoint covers it, none is signed
    built = D.build(service, PLATFORM_ID, spec)
    assert built.snapshot["checkpoint"]["size"] == cp.size
    with pytest.raises(D.DisclosureError, match="no checkpoint"):
        D.build(service, PLATFORM_ID, spec, cp.size - 1)
    with pytest.raises(D.DisclosureError, match="does not match"):
        D.compute_from_store(service.store, PLATFORM_ID, spec, cp.size, b"\x00" * 32)
    # an open period (today and later): a checkpoint at the current size is signed first
    clock.advance(HOUR_MS)
    ok(service, PLATFORM_ID, deposit(p, "more", "alice", 5))
    later = D.build(service, PLATFORM_ID, D.PeriodSpec.day("2023-11-16"))
    assert later.snapshot["checkpoint"]["size"] == cp.size + 1
    assert later.snapshot["records"]["period_closed"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        lambda: D.PeriodSpec.day("2023-13-01"),
        lambda: D.PeriodSpec.month("2023-1"),
        lambda: D.PeriodSpec.range(5, 5),
        lambda: D.PeriodSpec.day("1969-12-31"),
    ],
)
def test_bad_periods_are_refused(bad: Any) -> None:
    with pytest.raises(D.DisclosureError):
        bad()


def test_too_long_a_range_is_refused(service: LedgerService, clock: FakeClock) -> None:
    run_workload(service, clock)
    with pytest.raises(D.DisclosureError, match="at most"):
        D.build(service, PLATFORM_ID, D.PeriodSpec.range(0, DAY1_TO_MS))

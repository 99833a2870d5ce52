"""Matching (reference, amount + date + counterparty, batch payouts, timing, unmatched on both
sides) and the daily internal reconciliation: balanced, excess, shortfall covered by a
settlement a checker approves, missing statement; the CLI group (test_recon_settle.py follows
settlements to the next day's statement)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import recon_helpers as h
from helpers import (
    ACTOR,
    BOOKKEEPING_POLICY,
    CHECKER,
    OPERATOR,
    FakeClock,
    Platform,
    bal,
    log_records,
    make_platform,
    open_service,
)

from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService
from reconciliation import cli, daily, matching, statements
from reconciliation.ledger_view import day_end_ms
from reconciliation.ledger_view import read as read_ledger
from reconciliation.statements import PlatformConfig, ReconStore

D1, D2, D3 = "2023-11-15", "2023-11-16", "2023-11-17"
OFFSET = 8 * 3_600_000
CONFIG = PlatformConfig(accounts={h.IBAN: "omni"}, counterparties={"CN66BOB01": "bob"})
POLICY = msgspec.structs.replace(BOOKKEEPING_POLICY, approval_ops=frozenset({"top_up_shortfall"}))


def _ok(service: LedgerService, actor: str, *cmds: c.Command) -> None:
    outcomes = service.execute("p1", list(cmds), actor)
    assert [o.status for o in outcomes] == ["accepted"] * len(cmds), outcomes


def _dep(cid: str, account: str, amount: int, ref: str = "", mirror: str = "omni") -> c.Deposit:
    return c.Deposit(
        client_id=cid,
        mirror_account_id=mirror,
        account_id=account,
        amount_minor=amount,
        currency="CNY",
        bank_ref=ref,
    )


def _payout(service: LedgerService, clock: FakeClock, cid: str, amount: int, ref: str) -> None:
    req = c.RequestWithdrawal(
        client_id=cid,
        account_id="carol",
        mirror_account_id="omni",
        amount_minor=amount,
        currency="CNY",
        payee_ref="carol-bank",
        expires_at_ms=clock.now + 86_400_000,
    )
    _ok(service, ACTOR, req)
    _ok(
        service,
        ACTOR,
        c.SettleWithdrawal(client_id=f"settle-{cid}", withdrawal_id=cid, bank_ref=ref),
    )


def two_days(service: LedgerService, clock: FakeClock) -> ReconStore:
    """D1: three deposits the bank shows, one it never got (GHOST), one bank receipt the ledger
    does not know; D2: three payouts the bank books as one line, a deposit near the cut-off."""
    make_platform(service, policy=POLICY)
    _ok(service, ACTOR, _dep("own-1", "own", 100_000, mirror="pbank"))
    _ok(
        service,
        ACTOR,
        _dep("dep-alice", "alice", 100_000, "E2E-A"),
        _dep("dep-bob", "bob", 50_000),
        _dep("dep-carol", "carol", 90_000, "E2E-C"),
        _dep("dep-ghost", "bob", 3_000, "GHOST"),
    )
    clock.now = day_end_ms(D1, OFFSET) + 7 * 3_600_000  # D2 07:00 local
    for cid, amount in (("w1", 10_000), ("w2", 20_000), ("w3", 25_000)):
        _payout(service, clock, cid, amount, f"PAY-{cid}")
    clock.now = day_end_ms(D2, OFFSET) - 3_600_000  # D2 23:00 local
    _ok(service, ACTOR, _dep("dep-late", "alice", 7_000, "LATE-1"))
    clock.now = day_end_ms(D2, OFFSET) + 2 * 3_600_000  # D3 02:00: the reconciliation runs
    s1 = h.Stmt(
        "S-1",
        1,
        0,
        252_345,
        D1,
        [
            h.Tx(100_000, D1, ("E2E-A",), "B1", "Alice", "CN55ALICE01"),
            h.Tx(50_000, D1, (), "B2", "Bob", "CN66BOB01"),
            h.Tx(90_000, D1, ("E2E-C",), "B3", "Carol", "CN77CAROL1"),
            h.Tx(12_345, D1, ("UNKNOWN-1",), "B4", "Somebody", "CN88WHO1"),
        ],
    )
    s2 = h.Stmt("S-2", 2, 252_345, 197_345, D2, [h.Tx(-55_000, D2, (), "PAYBATCH-1")])
    recon = ReconStore(service.store)
    for version, s in ((2, s1), (8, s2)):
        res = recon.import_file("p1", h.camt053([s], version), "camt053", CONFIG, now_ms=clock.now)
        assert res.status == "imported", res
    return recon


def test_matching_finds_all_four_kinds_and_a_batch_payout(
    service: LedgerService, clock: FakeClock
) -> None:
    recon = two_days(service, clock)
    view = read_ledger(service.store, "p1", D2)
    bank, shas = matching.bank_items(recon, "p1", D2)
    assert len(shas) == 2 and len(bank) == 5
    res = matching.match(view, bank, D2, CONFIG)
    methods = sorted((m.method, tuple(x.key for x in m.ledger)) for m in res.matches)
    assert methods == [
        ("amount_date", ("dep-bob",)),
        ("batch", ("settle-w1", "settle-w2", "settle-w3")),
        ("reference", ("dep-alice",)),
        ("reference", ("dep-carol",)),
    ]
    assert all(m.state == matching.MATCHED for m in res.matches)
    [unknown] = res.of_state(matching.UNMATCHED_BANK)
    assert (unknown.amount_minor, unknown.refs[0], unknown.age_days) == (12_345, "UNKNOWN-1", 1)
    [ghost] = res.of_state(matching.UNMATCHED_LEDGER)
    assert (ghost.key, ghost.amount_minor, ghost.age_days) == ("dep-ghost", 3_000, 1)
    [late] = res.of_state(matching.TIMING)
    assert (late.key, late.amount_minor, late.age_days) == ("dep-late", 7_000, 0)
    assert res.in_transit_minor == 7_000
    assert res.breaks == 2
    # the unknown receipt goes to suspense, never to a customer
    [suggestion] = res.suggestions
    assert (suggestion.account_id, suggestion.mirror_account_id) == ("susp", "omni")
    assert (suggestion.amount_minor, suggestion.bank_ref) == (12_345, "UNKNOWN-1")
    # as at D1 the D2 payouts and the late deposit are not there yet; the ghost is in transit
    res1 = matching.match(
        read_ledger(service.store, "p1", D1), matching.bank_items(recon, "p1", D1)[0], D1, CONFIG
    )
    assert [o.key for o in res1.of_state(matching.TIMING)] == ["dep-ghost"]
    assert res1.in_transit_minor == 3_000


def test_reference_batch_and_counterparty_rules() -> None:
    """Several payouts sharing one bank reference match its single bank line; a counterparty
    that is known on both sides and differs prevents an amount + date match."""
    from reconciliation.ledger_view import LedgerItem, LedgerView
    from reconciliation.model import Entry

    def item(key: str, amount: int, refs: tuple[str, ...], cp: str = "") -> LedgerItem:
        return LedgerItem(key, 1, 0, D1, "payout", "omni", amount, "CNY", refs, cp)

    view = LedgerView("p1", day_offset_ms=OFFSET)
    view.items = [
        item("a", -1_000, ("BATCH-9",)),
        item("b", -2_500, ("BATCH-9",)),
        item("c", -700, (), "dave"),
    ]
    entries = [
        Entry(0, -3_500, "CNY", D1, D1, batch_id="BATCH-9"),
        Entry(1, -700, "CNY", D1, D1, counterparty_account="CN66BOB01"),
    ]
    bank = [matching.BankItem("f" * 64, 0, "omni", e) for e in entries]
    res = matching.match(view, bank, D1, CONFIG)
    [m] = res.matches
    assert (m.method, [x.key for x in m.ledger]) == ("batch", ["a", "b"])
    assert {o.key for o in res.of_state(matching.UNMATCHED_BANK)} == {bank[1].key}


def test_subset_sum_is_bounded() -> None:
    values3 = [5, 3, 9, 1]
    found = matching.subset_sum(values3, 13, 1_000)
    assert found is not None and sum(values3[k] for k in found) == 13
    assert len(set(found)) == len(found)
    values = [2 * k + 1 for k in range(40)]
    assert matching.subset_sum(values, 10**9, 10_000) is None  # unreachable: pruned quickly
    assert matching.subset_sum(values, 2, 10_000) is None  # odd values never make 2
    trap = [6] * 20 + [5, 5, 5]  # 15 = 5 + 5 + 5, found only after the 6s are given up
    assert matching.subset_sum(trap, 15, 50) is None  # the budget runs out first
    found = matching.subset_sum(trap, 15, 1_000_000)
    assert found == [20, 21, 22]


def _approve(service: LedgerService, request_id: str) -> Any:
    [out] = service.execute(
        "p1", [c.ApproveRequest(client_id=f"ok-{request_id}", request_id=request_id)], CHECKER
    )
    return out


def _completed(service: LedgerService) -> list[dict[str, Any]]:
    return [r for r in log_records(service, "p1") if r["kind"] == "reconciliation_completed"]


def test_balanced_day_is_recorded_after_a_checker_signs_it_off(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _ok(service, ACTOR, _dep("d1", "alice", 40_000, "E1"), _dep("d2", "bob", 2_000, "E2"))
    clock.now = day_end_ms(D1, OFFSET) + 1
    recon = ReconStore(service.store)
    s = h.Stmt("S-1", 7, 0, 42_000, D1, [h.Tx(40_000, D1, ("E1",)), h.Tx(2_000, D1, ("E2",))])
    recon.import_file("p1", h.camt053([s], 8), "camt053", CONFIG, now_ms=clock.now)
    res = daily.run_daily(service, "p1", D1, CONFIG, OPERATOR, now_ms=clock.now)
    [f] = res.figures
    assert (f.bank_closing_minor, f.in_transit_minor, f.requirement_minor) == (42_000, 0, 42_000)
    assert (f.result, f.breaks) == ("balanced", 0)
    assert res.record["CNY"].status == "pending"  # always a checker's sign-off
    assert res.settlement == {} and _completed(service) == []
    assert _approve(service, res.record["CNY"].client_id).status == "accepted"
    [rec] = _completed(service)
    spec = rec["reconciliation"]
    assert (spec["result"], spec["closing"], spec["requirement"]) == ("balanced", 42_000, 42_000)
    assert spec["statements"] == f.statements and spec["snapshot"] == f.snapshot_size
    assert rec["actor"] == CHECKER
    # running again with the same inputs asks for the same record: nothing new is logged
    again = daily.run_daily(service, "p1", D1, CONFIG, OPERATOR, now_ms=clock.now)
    assert again.record["CNY"].status == "replayed"
    kinds = [e.kind for e in recon.events("p1")]
    assert kinds == [statements.RECON_BALANCED]


def test_excess_is_recorded_and_documented(service: LedgerService, clock: FakeClock) -> None:
    recon = two_days(service, clock)
    res = daily.run_daily(service, "p1", D2, CONFIG, OPERATOR, now_ms=clock.now)
    [f] = res.figures
    # bank 197,345 + in transit 7,000 - requirement 195,000: the unknown receipt less the ghost
    assert (f.bank_closing_minor, f.in_transit_minor, f.requirement_minor) == (
        197_345,
        7_000,
        195_000,
    )
    assert (f.difference_minor, f.result, f.breaks) == (9_345, "excess", 2)
    assert res.settlement == {}
    assert any("once the reconciliation is approved" in a for a in res.actions)
    [event] = recon.events("p1", [statements.RECON_EXCESS])
    assert event.detail["difference_minor"] == 9_345
    assert _approve(service, res.record["CNY"].client_id).status == "accepted"
    assert _completed(service)[0]["reconciliation"]["result"] == "excess"


def test_shortfall_is_covered_by_a_settlement_a_checker_approves(
    service: LedgerService, clock: FakeClock
) -> None:
    recon = two_days(service, clock)
    res = daily.run_daily(
        service, "p1", D2, CONFIG, OPERATOR, book_unmatched_receipts=True, now_ms=clock.now
    )
    # the unknown receipt is booked into suspense after the cut-off (in transit -12,345)
    [receipt] = res.receipts
    assert receipt.status == "accepted"
    assert bal(service, "p1", "susp")[0] == 12_345
    [f] = res.figures
    assert (f.in_transit_minor, f.difference_minor, f.result) == (
        7_000 - 12_345,
        -3_000,
        "shortfall",
    )
    assert f.breaks == 1  # the ghost deposit the bank never received
    record = res.record["CNY"]
    assert record.status == "pending" and res.settlement == {}  # nothing to settle yet
    assert _approve(service, record.client_id).status == "accepted"
    [rec] = _completed(service)
    assert (rec["reconciliation"]["difference"], rec["reconciliation"]["breaks"]) == (-3_000, 1)
    assert recon.events("p1", [statements.RECON_SHORTFALL])
    # recorded: running again replays the record and asks a checker for the settlement
    again = daily.run_daily(service, "p1", D2, CONFIG, OPERATOR, now_ms=clock.now)
    assert again.record["CNY"].status == "replayed"
    settlement = again.settlement["CNY"]
    assert settlement.status == "pending"
    own_before = bal(service, "p1", "own")[0]
    assert _approve(service, settlement.client_id).kind == "reconciliation_settled"
    assert bal(service, "p1", "own")[0] == own_before - 3_000
    assert bal(service, "p1", "susp")[0] == 12_345  # customer money is not touched
    # the booked receipt now matches its bank line by reference (as a timing item at D2)
    view = read_ledger(service.store, "p1", D2)
    matched = matching.match(view, matching.bank_items(recon, "p1", D2)[0], D2, CONFIG)
    assert matched.of_state(matching.UNMATCHED_BANK) == []
    assert [m.state for m in matched.matches if m.ledger[0].key.startswith("recon-receipt:")] == [
        matching.TIMING
    ]


def test_missing_statement_stops_the_reconciliation(
    service: LedgerService, clock: FakeClock
) -> None:
    recon = two_days(service, clock)
    with pytest.raises(daily.ReconciliationError, match="no usable bank statement"):
        daily.run_daily(service, "p1", D3, CONFIG, OPERATOR, now_ms=clock.now)
    [event] = recon.events("p1", [statements.STATEMENT_MISSING])
    assert event.detail == {"day": D3, "mirrors": ["omni"]}
    assert _completed(service) == []
    with pytest.raises(daily.ReconciliationError, match="operator"):
        daily.run_daily(service, "p1", D2, CONFIG, ACTOR, now_ms=clock.now)


def _cli(argv: list[str], data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code = cli.main(["--data-dir", str(data_dir), "--json", "--actor", OPERATOR, *argv])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_cli_import_match_run_breaks(
    config: Config,
    store_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in store_env.items():
        monkeypatch.setenv(k, v)
    clock = FakeClock()
    service = open_service(config, clock)
    try:
        make_platform(service)
        _ok(service, ACTOR, _dep("d1", "alice", 40_000, "E1"))
    finally:
        service.close()
    accounts = tmp_path / "recon.json"
    accounts.write_text(json.dumps({"p1": {"accounts": {h.IBAN: "omni"}}}))
    stmt = tmp_path / "s1.xml"
    stmt.write_bytes(
        h.camt053(
            [
                h.Stmt(
                    "S-1", 1, 0, 45_000, D1, [h.Tx(40_000, D1, ("E1",)), h.Tx(5_000, D1, ("X9",))]
                )
            ],
            8,
        )
    )
    common = ["--platform", "p1", "--accounts", str(accounts)]
    data = Path(store_env["CUSTODY_DATA_DIR"])
    code, out = _cli(["recon", "import", str(stmt), "--format", "camt053", *common], data, capsys)
    assert (code, out["status"]) == (0, "imported")
    code, out = _cli(["recon", "import", str(stmt), "--format", "camt053", *common], data, capsys)
    assert (code, out["status"]) == (0, "duplicate")
    code, out = _cli(["recon", "match", "--day", D1, *common], data, capsys)
    assert code == 0 and out["counts"]["unmatched_bank"] == 1
    assert out["suggested_deposits"][0]["account_id"] == "susp"
    code, out = _cli(["recon", "run", "--day", D1, *common], data, capsys)
    assert code == 0
    assert out["figures"][0]["result"] == "excess" and out["record"]["CNY"]["status"] == "pending"
    code, out = _cli(["recon", "breaks", *common], data, capsys)
    assert code == 0 and [e["kind"] for e in out["events"]] == ["reconciliation_excess"]
    assert [i["state"] for i in out["open_items"]] == ["unmatched_bank"]
    hostile = tmp_path / "evil.xml"
    hostile.write_bytes(b'<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><d>&x;</d>')
    code, out = _cli(
        ["recon", "import", str(hostile), "--format", "camt053", *common], data, capsys
    )
    assert code == 1 and out is None
    code, _ = _cli(["recon", "run", "--day", D1, *common[:2]], tmp_path / "none", capsys)
    assert code == 2  # no reconciliation config in that data folder
    parser = argparse.ArgumentParser()
    handlers = cli.register(parser.add_subparsers(dest="command"))
    assert set(handlers) == {"recon"}

"""A reconciliation's difference settled for real: a shortfall covered by the platform's payment
into the omnibus account, an excess paid back to the platform's bank; each through a checker,
each shown by the next statement and matched there, the next day balanced. Over-settling,
settling an unknown, balanced or settled reconciliation, and self-approval are refused."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import recon_helpers as h
from helpers import (
    ACTOR,
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
from ledger.writer import Outcome
from reconciliation import cli, daily, matching
from reconciliation.ledger_view import day_end_ms
from reconciliation.ledger_view import read as read_ledger
from reconciliation.statements import PlatformConfig, ReconStore

D1, D2, D3 = "2023-11-15", "2023-11-16", "2023-11-17"
OFFSET = 8 * 3_600_000
HOUR = 3_600_000
PLATFORM_IBAN = "CN44PLAT0000000000000009"  # the platform's own bank account
CONFIG = PlatformConfig(accounts={h.IBAN: "omni"}, counterparties={PLATFORM_IBAN: "pbank"})


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


def _approve(service: LedgerService, request_id: str, actor: str = CHECKER) -> Outcome:
    [out] = service.execute(
        "p1", [c.ApproveRequest(client_id=f"ok-{request_id}", request_id=request_id)], actor
    )
    return out


def _import(recon: ReconStore, clock: FakeClock, stmt: h.Stmt) -> None:
    res = recon.import_file("p1", h.camt053([stmt], 8), "camt053", CONFIG, now_ms=clock.now)
    assert res.status == "imported" and res.statements[0].status == "used", res


def _settle(rid: str, amount: int, cid: str) -> c.SettleReconciliation:
    return c.SettleReconciliation(
        client_id=cid,
        reconciliation_id=rid,
        own_account_id="own",
        platform_bank_account_id="pbank",
        amount_minor=amount,
        currency="CNY",
    )


def _settled(service: LedgerService) -> list[dict[str, Any]]:
    return [r for r in log_records(service, "p1") if r["kind"] == "reconciliation_settled"]


def _recorded_day(service: LedgerService, clock: FakeClock, day: str) -> daily.Figures:
    """Run `day`'s reconciliation (the day after, 01:00) and have a checker record it."""
    clock.now = day_end_ms(day, OFFSET) + HOUR
    res = daily.run_daily(service, "p1", day, CONFIG, OPERATOR, now_ms=clock.now)
    [f] = res.figures
    assert res.record["CNY"].status == "pending" and res.settlement == {}
    assert _approve(service, res.record["CNY"].client_id).kind == "reconciliation_completed"
    return f


def shortfall_day(service: LedgerService, clock: FakeClock) -> tuple[ReconStore, daily.Figures]:
    """D1: the platform holds 100,000 of own funds; alice deposits 40,000; the bank also takes
    a 500 charge from the omnibus account the ledger knows nothing of: a shortfall of 500."""
    _ok(service, ACTOR, _dep("own-1", "own", 100_000, mirror="pbank"))
    _ok(service, ACTOR, _dep("dep-alice", "alice", 40_000, "E2E-A"))
    recon = ReconStore(service.store)
    clock.now = day_end_ms(D1, OFFSET) + HOUR
    _import(
        recon,
        clock,
        h.Stmt(
            "S-1", 1, 0, 39_500, D1, [h.Tx(40_000, D1, ("E2E-A",)), h.Tx(-500, D1, (), "CHG-1")]
        ),
    )
    f = _recorded_day(service, clock, D1)
    assert (f.difference_minor, f.result, f.breaks) == (-500, "shortfall", 1)
    return recon, f


def test_shortfall_settled_by_the_platform_and_the_next_day_balances(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    recon, f = shortfall_day(service, clock)
    rid = f.reconciliation_id
    # the record is there: running the day again replays it and prepares the settlement
    res = daily.run_daily(service, "p1", D1, CONFIG, OPERATOR, now_ms=clock.now)
    assert res.record["CNY"].status == "replayed"
    settlement = res.settlement["CNY"]
    assert (settlement.status, settlement.client_id) == ("pending", f"settle:{rid}:1")
    assert any("pays 500 CNY from its own bank account" in a and rid in a for a in res.actions)
    assert res.to_json()["settlement"]["CNY"]["status"] == "pending"
    # the maker (operator:test) cannot approve it under a checker identity of their own
    mine = _approve(service, settlement.client_id, "checker:test")
    assert (mine.status, mine.code) == ("refused", "SELF_APPROVAL")
    assert _settled(service) == []
    own_before, pbank_before = bal(service, "p1", "own")[0], bal(service, "p1", "pbank")[0]
    susp_before = bal(service, "p1", "susp")[0]
    clock.now += HOUR
    assert _approve(service, settlement.client_id).kind == "reconciliation_settled"
    [rec] = _settled(service)
    assert (rec["settles"], rec["executes"], rec["actor"]) == (rid, settlement.client_id, CHECKER)
    assert rec["entries"] == [["own", "pbank", 500]]
    # own funds and the platform's bank pay; what customers are owed does not change
    assert bal(service, "p1", "own")[0] == own_before - 500
    assert bal(service, "p1", "pbank")[0] == pbank_before - 500
    assert bal(service, "p1", "susp")[0] == susp_before and bal(service, "p1", "alice")[0] == 40_000
    assert read_ledger(service.store, "p1").reconciliations[rid].left_minor == 0
    # running the day again prepares nothing more
    again = daily.run_daily(service, "p1", D1, CONFIG, OPERATOR, now_ms=clock.now)
    assert again.record["CNY"].status == "replayed" and again.settlement == {}
    # D2: the platform's payment arrives in the custody account with the reconciliation id
    _import(
        recon,
        clock,
        h.Stmt(
            "S-2", 2, 39_500, 40_000, D2, [h.Tx(500, D2, (rid,), "IN-7", "Platform", PLATFORM_IBAN)]
        ),
    )
    f2 = _recorded_day(service, clock, D2)
    assert (f2.bank_closing_minor, f2.in_transit_minor, f2.requirement_minor) == (40_000, 0, 40_000)
    assert (f2.result, f2.breaks) == ("balanced", 1)  # the bank charge stays a break
    view = read_ledger(service.store, "p1", D2)
    res2 = matching.match(view, matching.bank_items(recon, "p1", D2)[0], D2, CONFIG)
    [cover] = [m for m in res2.matches if m.ledger and m.ledger[0].settles == rid]
    assert (cover.method, cover.state, cover.bank[0].amount_minor) == ("reference", "matched", 500)
    assert [o.refs[-1] for o in res2.of_state(matching.UNMATCHED_BANK)] == ["CHG-1"]
    assert res2.suggestions == []


def test_a_settlement_not_yet_at_the_bank_is_in_transit(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    recon, f = shortfall_day(service, clock)
    cmd, out = daily.prepare_settlement(
        service, "p1", f.reconciliation_id, OPERATOR, now_ms=clock.now
    )
    assert (out.status, cmd.amount_minor, cmd.own_account_id) == ("pending", 500, "own")
    clock.now = day_end_ms(D2, OFFSET) - HOUR  # approved late on D2
    assert _approve(service, out.client_id).ok
    _import(recon, clock, h.Stmt("S-2", 2, 39_500, 39_500, D2))  # not at the bank yet
    f2 = _recorded_day(service, clock, D2)
    assert (f2.bank_closing_minor, f2.in_transit_minor, f2.result) == (39_500, 500, "balanced")
    # D3: it arrives, matched by amount, date and counterparty (no reference given)
    _import(
        recon,
        clock,
        h.Stmt("S-3", 3, 39_500, 40_000, D3, [h.Tx(500, D3, (), "IN-9", "Plat", PLATFORM_IBAN)]),
    )
    f3 = _recorded_day(service, clock, D3)
    assert (f3.bank_closing_minor, f3.in_transit_minor, f3.result) == (40_000, 0, "balanced")
    res3 = matching.match(
        read_ledger(service.store, "p1", D3),
        matching.bank_items(recon, "p1", D3)[0],
        D3,
        CONFIG,
    )
    assert [m.method for m in res3.matches if m.ledger and m.ledger[0].settles] == ["amount_date"]


def test_excess_returned_to_the_platform_and_the_next_day_balances(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    """D1: the bank credits 800 of interest the contract gives the platform: an excess. It is
    not customer money, so it is returned (a person decides that: the daily run does not
    prepare a return while an unknown receipt is open)."""
    _ok(service, ACTOR, _dep("dep-alice", "alice", 40_000, "E2E-A"))
    recon = ReconStore(service.store)
    clock.now = day_end_ms(D1, OFFSET) + HOUR
    _import(
        recon,
        clock,
        h.Stmt("S-1", 1, 0, 40_800, D1, [h.Tx(40_000, D1, ("E2E-A",)), h.Tx(800, D1, ("INT-11",))]),
    )
    f = _recorded_day(service, clock, D1)
    rid = f.reconciliation_id
    assert (f.difference_minor, f.result, f.breaks) == (800, "excess", 1)
    res = daily.run_daily(service, "p1", D1, CONFIG, OPERATOR, now_ms=clock.now)
    assert res.settlement == {}
    assert any("recon settle --reconciliation " + rid in a for a in res.actions)
    cmd, out = daily.prepare_settlement(service, "p1", rid, OPERATOR, now_ms=clock.now)
    assert (out.status, cmd.amount_minor) == ("pending", 800)
    clock.now += HOUR
    assert _approve(service, out.client_id).kind == "reconciliation_settled"
    [rec] = _settled(service)
    assert rec["entries"] == [["pbank", "own", 800]]
    assert bal(service, "p1", "own")[0] == 800 and bal(service, "p1", "pbank")[0] == 800
    # D2: the omnibus account pays it back to the platform's bank
    _import(
        recon,
        clock,
        h.Stmt(
            "S-2", 2, 40_800, 40_000, D2, [h.Tx(-800, D2, (rid,), "OUT-3", "Plat", PLATFORM_IBAN)]
        ),
    )
    clock.now = day_end_ms(D2, OFFSET) + HOUR
    res2 = daily.run_daily(service, "p1", D2, CONFIG, OPERATOR, now_ms=clock.now)
    [f2] = res2.figures
    assert (f2.bank_closing_minor, f2.in_transit_minor, f2.requirement_minor) == (40_000, 0, 40_000)
    assert (f2.result, f2.breaks) == ("balanced", 0)
    # the returned credit is explained by the settlement; nothing is suggested for suspense
    methods = sorted(m.method for m in res2.match.matches)
    assert methods == ["reference", "reference", "returned_excess"]
    assert res2.match.suggestions == [] and res2.settlement == {}
    # re-running D1 now gives the same figures (the later return does not change them)
    again = daily.run_daily(service, "p1", D1, CONFIG, OPERATOR, now_ms=clock.now)
    assert again.figures[0].reconciliation_id == rid and again.record["CNY"].status == "replayed"


def test_over_settling_is_refused(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _recon, f = shortfall_day(service, clock)
    rid = f.reconciliation_id
    with pytest.raises(daily.ReconciliationError, match=r"600 is not in 1\.\.500"):
        daily.prepare_settlement(service, "p1", rid, OPERATOR, amount_minor=600, now_ms=clock.now)
    [too_much] = service.execute("p1", [_settle(rid, 600, "s-600")], OPERATOR)
    assert (too_much.status, too_much.code) == ("refused", "INVALID_AMOUNT")
    # two requests that each fit, but not together: the second approval is refused
    [a] = service.execute("p1", [_settle(rid, 300, "s-a")], OPERATOR)
    [b] = service.execute("p1", [_settle(rid, 300, "s-b")], OPERATOR)
    assert (a.status, b.status) == ("pending", "pending")
    assert _approve(service, "s-a").kind == "reconciliation_settled"
    second = _approve(service, "s-b")
    assert (second.status, second.code) == ("refused", "INVALID_AMOUNT")
    assert [r["entries"][0][2] for r in _settled(service)] == [300]
    # the refused approval leaves s-b waiting: it counts against what is left until rejected
    with pytest.raises(daily.ReconciliationError, match="in requests waiting for a checker"):
        daily.prepare_settlement(service, "p1", rid, OPERATOR, amount_minor=200, now_ms=clock.now)
    [rejected] = service.execute(
        "p1", [c.RejectRequest(client_id="no-s-b", request_id="s-b", reason="too much")], CHECKER
    )
    assert rejected.status == "accepted"
    # what is left (200) can still be settled, under a client id never used before
    cmd, out = daily.prepare_settlement(service, "p1", rid, OPERATOR, now_ms=clock.now)
    assert (cmd.amount_minor, out.client_id, out.status) == (200, f"settle:{rid}:4", "pending")
    assert _approve(service, out.client_id).ok
    with pytest.raises(daily.ReconciliationError, match="is settled"):
        daily.prepare_settlement(service, "p1", rid, OPERATOR, now_ms=clock.now)
    [after] = service.execute("p1", [_settle(rid, 1, "s-after")], OPERATOR)
    assert (after.status, after.code) == ("refused", "INVALID_ARGUMENT")
    assert sum(r["entries"][0][2] for r in _settled(service)) == 500


def test_settling_an_unknown_or_balanced_reconciliation_is_refused(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _ok(service, ACTOR, _dep("own-1", "own", 10_000, mirror="pbank"))
    _ok(service, ACTOR, _dep("d1", "alice", 40_000, "E1"))
    recon = ReconStore(service.store)
    clock.now = day_end_ms(D1, OFFSET) + HOUR
    _import(recon, clock, h.Stmt("S-1", 1, 0, 40_000, D1, [h.Tx(40_000, D1, ("E1",))]))
    f = _recorded_day(service, clock, D1)
    assert f.result == "balanced"
    for rid in (f.reconciliation_id, "2023-11-15-CNY-000000000000"):
        [out] = service.execute("p1", [_settle(rid, 100, f"s-{rid}")], OPERATOR)
        assert (out.status, out.code) == ("refused", "INVALID_ARGUMENT"), rid
    with pytest.raises(daily.ReconciliationError, match="is balanced"):
        daily.prepare_settlement(service, "p1", f.reconciliation_id, OPERATOR, now_ms=clock.now)
    with pytest.raises(daily.ReconciliationError, match="no recorded reconciliation"):
        daily.prepare_settlement(service, "p1", "nope", OPERATOR, now_ms=clock.now)
    with pytest.raises(daily.ReconciliationError, match="operator"):
        daily.prepare_settlement(service, "p1", f.reconciliation_id, ACTOR, now_ms=clock.now)
    # the platform itself may not ask for a settlement at all
    [by_platform] = service.execute("p1", [_settle(f.reconciliation_id, 1, "s-p")], ACTOR)
    assert by_platform.status == "refused"
    assert _settled(service) == []


def _cli(argv: list[str], data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code = cli.main(["--data-dir", str(data_dir), "--json", "--actor", OPERATOR, *argv])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_cli_run_and_settle(
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
        _ok(service, ACTOR, _dep("own-1", "own", 10_000, mirror="pbank"))
        _ok(service, ACTOR, _dep("d1", "alice", 40_000, "E1"))
    finally:
        service.close()
    accounts = tmp_path / "recon.json"
    accounts.write_text(json.dumps({"p1": {"accounts": {h.IBAN: "omni"}}}))
    stmt = tmp_path / "s1.xml"
    stmt.write_bytes(
        h.camt053([h.Stmt("S-1", 1, 0, 39_000, D1, [h.Tx(40_000, D1, ("E1",)), h.Tx(-1_000, D1)])])
    )
    common = ["--platform", "p1", "--accounts", str(accounts)]
    data = Path(store_env["CUSTODY_DATA_DIR"])
    code, _ = _cli(["recon", "import", str(stmt), "--format", "camt053", *common], data, capsys)
    assert code == 0
    code, out = _cli(["recon", "run", "--day", D1, *common], data, capsys)
    assert code == 0 and out["figures"][0]["result"] == "shortfall"
    assert out["settlement"] == {} and out["record"]["CNY"]["status"] == "pending"
    rid = out["figures"][0]["reconciliation_id"]
    settle = ["recon", "settle", "--reconciliation", rid, *common]
    code, _ = _cli(settle, data, capsys)
    assert code == 1  # not recorded yet: nothing to settle
    checker_clock = FakeClock(int(time.time() * 1000) + 60_000)  # after the CLI's records
    service = open_service(config, checker_clock)
    try:
        assert _approve(service, out["record"]["CNY"]["client_id"]).ok
    finally:
        service.close()
    code, out = _cli([*settle, "--amount", "400"], data, capsys)
    assert code == 0 and out["direction"] == "cover_shortfall"
    assert out["outcome"]["status"] == "pending" and out["settlement"]["amount_minor"] == 400
    assert out["reconciliation"]["left_minor"] == -1_000
    code, out = _cli(["recon", "run", "--day", D1, *common], data, capsys)
    assert code == 0 and out["record"]["CNY"]["status"] == "replayed"
    # the run gives the waiting request again (replayed), it does not ask twice
    assert out["settlement"]["CNY"] == {**out["settlement"]["CNY"], "status": "pending"}
    assert out["settlement"]["CNY"]["client_id"] == f"settle:{rid}:1"
    code, out = _cli([*settle, "--amount", "600"], data, capsys)  # the rest, explicitly
    assert code == 0 and out["outcome"]["client_id"] == f"settle:{rid}:2"
    assert out["reconciliation"]["pending"] == {f"settle:{rid}:1": 400}
    code, _ = _cli([*settle, "--amount", "1"], data, capsys)  # all of it is asked for already
    assert code == 1

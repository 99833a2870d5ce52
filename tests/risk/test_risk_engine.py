"""The engine around the rules: dedupe, restart, rebuild, the gate, the lifecycle, integrity,
the dashboard, the CLI and the risk matrix."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from helpers import (
    BOOKKEEPING_POLICY,
    CHECKER,
    OPERATOR,
    FakeClock,
    Platform,
    deposit,
    log_records,
    make_platform,
    ok,
    run1,
    sqlite_env,
    transfer,
)
from risk_helpers import DAY, HOUR, alert_records, engine, found, gate, levels

from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import log_stream
from risk import matrix
from risk import store as rs
from risk.cli import main as risk_main
from risk.dashboard import render
from risk.engine import RiskEngine
from risk.rules import Finding, alert_id
from risk.ruleset import DEFAULT_RULES, RuleSet, decode_rules, encode_rules


def _segregation_attempts(service: LedgerService, p: Platform, n: int, prefix: str = "s") -> None:
    ok(service, p.id, deposit(p, f"{prefix}-fund", p.customers[0], 10_000))
    for i in range(n):
        o = run1(service, p.id, transfer(p, f"{prefix}{i}", p.customers[0], p.own, 100))
        assert o.code == "SEGREGATION_BREACH", o


# -- dedupe, restart, rebuild -----------------------------------------------------------------


def test_alert_ids_are_stable_and_each_is_raised_once(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W15"})
    _segregation_attempts(service, platform, 3)
    first = found(eng)
    for _ in range(3):
        eng.catch_up()
    assert found(eng) == first
    assert len(alert_records(service)) == len(first) == 2
    f = Finding(rule="W15", subject="platform:test", window="9", level="ORANGE", summary="x")
    assert f.alert_id == alert_id("W15", "platform:test", "9", "ORANGE")
    assert f.alert_id != alert_id("W15", "platform:test", "9", "RED")


def test_restart_resumes_without_duplicates(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W15"})
    _segregation_attempts(service, platform, 1, "a")
    assert levels(eng, "W15") == ["ORANGE"]
    _segregation_attempts(service, platform, 2, "b")
    # a new engine (a restart) on the same tables picks up from the stored position
    again = engine(service, clock, {"W15"})
    assert again.status("p1")["position"] < service.head("p1")[0] - 1
    assert levels(again, "W15") == ["ORANGE", "RED"]
    assert len(alert_records(service)) == 2
    # a crash after the ledger's commit but before the outbox was marked: sent again, replayed
    db = again.db
    with db.tx() as cur:
        cur.execute(f"UPDATE {db.t('risk_outbox')} SET status = 'queued'")
    third = engine(service, clock, {"W15"})
    third.catch_up()
    assert len(alert_records(service)) == 2
    rows = rs.outbox(db, "p1")
    assert {r["result"].split()[0] for r in rows if r["op"] == "raise_alert"} == {"replayed"}
    [gate_row] = [r for r in rows if r["op"] == "set_gate"]
    assert gate_row["status"] == "skipped"  # the gate is already restricted
    assert gate(service) == "RESTRICTED"


def test_rebuild_gives_the_same_read_model_and_no_new_alerts(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W15", "W23"})
    _segregation_attempts(service, platform, 3)
    eng.catch_up()
    before = eng.dump("p1")
    size = service.head("p1")[0]
    eng.rebuild("p1")
    assert eng.dump("p1") == before
    assert service.head("p1")[0] == size  # nothing raised twice, no new gate change


# -- the gate ---------------------------------------------------------------------------------


def test_red_alert_restricts_only_when_the_policy_says_auto_restrict(
    service: LedgerService, clock: FakeClock
) -> None:
    strict = make_platform(service, "p1")
    lax = make_platform(
        service, "p2", policy=msgspec.structs.replace(BOOKKEEPING_POLICY, auto_restrict=0)
    )
    eng = engine(service, clock, {"W15"})
    _segregation_attempts(service, strict, 3)
    _segregation_attempts(service, lax, 3)
    assert levels(eng, "W15", "p1") == ["ORANGE", "RED"]
    assert levels(eng, "W15", "p2") == ["ORANGE", "RED"]
    assert gate(service, "p1") == "RESTRICTED"
    assert gate(service, "p2") == "NORMAL"
    [gate_rec] = [r for r in log_records(service, "p1") if r["kind"] == "gate_set"]
    assert gate_rec["actor"] == "system:early-warning" and "executes" not in gate_rec
    assert not [
        r for r in log_records(service, "p2") if r["kind"] in ("gate_set", "approval_requested")
    ]
    # restricted: new business refused, withdrawals and alerts still flow
    o = run1(service, "p1", transfer(strict, "after", "alice", "bob", 1))
    assert o.code == "PLATFORM_RESTRICTED"


def test_manual_red_alert_restricts_too(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, set())
    [o] = service.execute(
        "p1",
        [
            c.RaiseAlert(
                client_id="manual",
                alert_id="M-1",
                rule="MANUAL",
                level="RED",
                summary="bank says funds frozen",
            )
        ],
        OPERATOR,
    )
    assert o.status == "accepted", o
    eng.catch_up()
    assert gate(service) == "RESTRICTED"
    assert [a["alert_id"] for a in rs.alerts(eng.db, "p1")] == ["M-1"]


# -- the lifecycle ----------------------------------------------------------------------------


def test_lifecycle_roles_and_read_model(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W15"})
    _segregation_attempts(service, platform, 3)
    orange, red = (a["alert_id"] for a in found(eng))
    assert [a["level"] for a in found(eng)] == ["ORANGE", "RED"]

    def step(cmd: c.Command, actor: str) -> str:
        [o] = service.execute("p1", [cmd], actor)
        return o.code or o.status

    close = c.CloseAlert
    assert step(close(client_id="c1", alert_id=red, reason="mine"), "platform:test") == (
        "ALERT_LEVEL_FORBIDDEN"
    )
    assert step(close(client_id="c2", alert_id=red, reason="x"), OPERATOR) == (
        "ALERT_LEVEL_FORBIDDEN"
    )
    assert step(c.AcknowledgeAlert(client_id="k1", alert_id=red, note="looking"), OPERATOR) == (
        "accepted"
    )
    assert (
        step(close(client_id="c3", alert_id=red, reason="platform told; gate kept"), CHECKER)
        == "accepted"
    )
    assert step(close(client_id="c4", alert_id=red, reason="again"), CHECKER) == "ALERT_CLOSED"
    assert (
        step(c.AcknowledgeAlert(client_id="k2", alert_id=orange, note="seen"), "platform:test")
        == "ALERT_LEVEL_FORBIDDEN"
    )
    eng.catch_up()
    rows = {a["alert_id"]: a for a in rs.alerts(eng.db, "p1")}
    assert rows[red]["status"] == "closed" and rows[red]["closed_by"] == CHECKER
    assert rows[red]["ack_by"] == OPERATOR and rows[red]["ack_note"] == "looking"
    assert rows[red]["close_reason"] == "platform told; gate kept"
    assert rows[orange]["status"] == "raised"
    assert [a["alert_id"] for a in rs.alerts(eng.db, "p1", open_only=True)] == [orange]
    assert [a["alert_id"] for a in rs.alerts(eng.db, "p1", level="RED")] == [red]
    steps = [(h["alert_id"], h["step"]) for h in rs.history(eng.db, "p1")]
    assert steps[:3] == [(red, "closed"), (red, "acknowledged"), (red, "raised")]


def test_platform_closes_its_own_yellow(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W06"})
    ok(service, "p1", deposit(platform, "d", "alice", 60_000_000))
    [yellow] = found(eng)
    [o] = service.execute(
        "p1",
        [c.CloseAlert(client_id="c", alert_id=yellow["alert_id"], reason="report filed")],
        "platform:test",
    )
    assert o.status == "accepted", o
    assert found(eng)[0]["status"] == "closed"


# -- integrity -----------------------------------------------------------------------------


def test_tampered_chain_is_red_and_restricts(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W17"})
    ok(service, "p1", deposit(platform, "d", "alice", 1_000))
    assert found(eng) == []
    db, ph = eng.db, eng.db.ph
    table = service.store.recorder.events_table_name  # type: ignore[attr-defined]
    name = f'"{db.schema}".{table}' if db.schema else table
    [row] = service.store.read(log_stream("p1"), after=2, limit=1)
    state = bytearray(row[2])
    state[-3] ^= 0x01
    with db.tx() as cur:
        cur.execute(
            f"UPDATE {name} SET state = {ph} WHERE originator_id = {ph} AND "
            f"originator_version = {ph}",
            (bytes(state), log_stream("p1"), 3),
        )
    clock.advance(HOUR)  # the scheduled verification is due
    [red] = found(eng, rule="W17")
    assert red["level"] == "RED" and "position 3" in red["summary"]
    assert gate(service) == "RESTRICTED"


# -- dashboard and CLI ----------------------------------------------------------------------


def test_dashboard_shows_levels_in_both_languages(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W15", "W01"})
    _segregation_attempts(service, platform, 3)
    eng.catch_up()
    page = render(eng.db, ["p1"], clock.now)
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>")
    for text in (
        "当前风险等级",
        "Current level",
        "未关闭预警",
        "Open alerts",
        "对账记录",
        "Reconciliation history",
        "RED",
        "ORANGE",
        "严重",
        "<svg",
        "限制 RESTRICTED",
    ):
        assert text in page, text
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page and "https://" not in page
    assert 'class="badge level-RED"' in page


def test_cli_run_alerts_close_dashboard(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sqlite_env(tmp_path)
    svc = LedgerService(Config.from_env(env), clock_ms=clock)
    svc.start()
    try:
        _segregation_attempts(svc, make_platform(svc), 3)
    finally:
        svc.close()
    base = ["--data-dir", str(tmp_path)]
    rules = tmp_path / "rules.json"
    rules.write_bytes(encode_rules(DEFAULT_RULES.__class__(enabled=frozenset({"W15"}))))
    assert risk_main([*base, "risk", "run", "--rules", str(rules)]) == 0
    capsys.readouterr()
    assert (
        risk_main(
            [
                *base,
                "--json",
                "risk",
                "alerts",
                "--platform",
                "p1",
                "--level",
                "RED",
                "--no-catch-up",
            ]
        )
        == 0
    )
    [red] = json.loads(capsys.readouterr().out)
    assert red["rule"] == "W15"
    assert (
        risk_main(
            [
                *base,
                "--actor",
                "platform:test",
                "risk",
                "close",
                red["alert_id"],
                "--platform",
                "p1",
                "--reason",
                "no",
            ]
        )
        == 1
    )
    assert (
        risk_main(
            [
                *base,
                "--actor",
                CHECKER,
                "risk",
                "close",
                red["alert_id"],
                "--platform",
                "p1",
                "--reason",
                "investigated",
            ]
        )
        == 0
    )
    out = tmp_path / "dash.html"
    assert risk_main([*base, "risk", "dashboard", "--out", str(out), "--no-catch-up"]) == 0
    assert "Custody risk" in out.read_text(encoding="utf-8")


# -- the matrix and the rules document --------------------------------------------------------


def test_matrix_bands_floors_and_impacts() -> None:
    assert [matrix.band(s) for s in (1, 4, 5, 9, 10, 15, 16, 25)] == [
        "GREEN",
        "GREEN",
        "YELLOW",
        "YELLOW",
        "ORANGE",
        "ORANGE",
        "RED",
        "RED",
    ]
    assert matrix.level(2, 2) == "GREEN" and matrix.level(2, 2, "RED") == "RED"
    assert matrix.level(4, 4, "YELLOW") == "RED"
    assert [matrix.amount_impact(a) for a in (999_999, 1_000_000, 10**8, 10**9)] == [1, 2, 4, 5]
    assert matrix.amount_impact(10, custody_minor=1_000) == 5  # >= 1 % of the custody balance
    assert [matrix.customers_impact(n) for n in (1, 10, 11, 1000, 1001)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        matrix.level(0, 3)


def test_rules_document_round_trips_and_rejects_nonsense() -> None:
    assert decode_rules(encode_rules(DEFAULT_RULES)) == DEFAULT_RULES
    with pytest.raises(ValueError, match="unknown rules"):
        decode_rules(b'{"enabled": ["W99"]}')
    with pytest.raises(ValueError, match=r"run\.orange_bp"):
        decode_rules(b'{"run": {"orange_bp": 3000, "red_bp": 2000}}')
    with pytest.raises(ValueError):
        decode_rules(b'{"surprise": 1}')


# -- per-account state rows, sliding windows, restarts ----------------------------------------


def _window_workload(service: LedgerService, clock: FakeClock) -> None:
    """Movements that fill the W07/W08/W09/W19 windows and let some of them expire."""
    names = [f"m{i}" for i in range(12)] + ["hub", "sink", "mid", "fast"]
    p = make_platform(service, "p1", customers=names)
    ok(service, "p1", *(deposit(p, f"d{n}", n, 200_000_000) for n in names))
    for i in range(12):  # fan-in to hub, then one payee
        ok(service, "p1", transfer(p, f"f{i}", f"m{i}", "hub", 100 + i))
        clock.advance(HOUR)
    ok(service, "p1", transfer(p, "fout", "hub", "sink", 50))
    for i in range(3):  # near the LVT threshold (50,000,000) in a week
        ok(service, "p1", transfer(p, f"n{i}", f"m{i}", "mid", 49_000_000))
        clock.advance(DAY)
    for i in range(2):  # rapid in and out, twice
        ok(service, "p1", transfer(p, f"ri{i}", "m5", "fast", 6_000_000))
        ok(service, "p1", transfer(p, f"ro{i}", "fast", "sink", 5_500_000))
        clock.advance(2 * DAY)
    clock.advance(4 * DAY)  # the fan window expires: the same shape fires again
    for i in range(12):
        ok(service, "p1", transfer(p, f"g{i}", f"m{i}", "hub", 7))
    ok(service, "p1", transfer(p, "gout", "hub", "sink", 5))


def test_restarting_every_few_records_gives_the_same_alerts_and_read_model(
    service: LedgerService, clock: FakeClock
) -> None:
    rules = {"W07", "W08", "W09", "W10", "W19"}
    _window_workload(service, clock)
    once = engine(service, clock, rules)
    once.catch_up()
    alerts = [a["alert_id"] for a in found(once)]
    assert {a["rule"] for a in found(once)} >= {"W07", "W08", "W09"}
    assert len([a for a in found(once) if a["rule"] == "W09"]) == 2
    dump = once.dump("p1")
    size = service.head("p1")[0]
    once.reset("p1")
    # a new engine (a restart) for every step of 3 records: state rows reloaded each time
    for _ in range(1000):
        eng = RiskEngine(service, RuleSet(enabled=frozenset(rules)), clock_ms=clock, batch_size=3)
        if eng.run_once("p1") == 0:
            break
    eng.catch_up()
    assert [a["alert_id"] for a in found(eng)] == alerts
    assert eng.dump("p1") == dump
    assert service.head("p1")[0] == size  # nothing raised twice
    db = eng.db
    with db.reading() as cur:
        keys = {
            str(k)
            for (k,) in db.fetchall(
                cur, f"SELECT key FROM {db.t('risk_state')} WHERE platform = {db.ph}", ("p1",)
            )
        }
    assert {"a:hub", "a:mid", "a:m0", "a:omni"} <= keys
    assert {f"k:{a}" for a in alerts} <= keys


def test_a_step_writes_only_the_accounts_it_touched(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W08", "W09"})
    ok(
        service,
        "p1",
        deposit(platform, "d1", "alice", 1_000),
        deposit(platform, "d2", "bob", 1_000),
    )
    eng.catch_up()
    db = eng.db

    def rows() -> dict[str, bytes]:
        with db.reading() as cur:
            return {
                str(k): bytes(v)
                for k, v in db.fetchall(
                    cur,
                    f"SELECT key, value FROM {db.t('risk_state')} WHERE platform = {db.ph}",
                    ("p1",),
                )
            }

    before = rows()
    ok(service, "p1", transfer(platform, "t1", "alice", "carol", 10))
    pos = eng._load("p1")
    assert pos.state.dirty == set()
    eng.run_once("p1")
    after = rows()
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"a:alice", "a:carol"}


def test_a_state_stored_in_the_old_single_blob_is_rebuilt_from_the_log(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    eng = engine(service, clock, {"W15"})
    _segregation_attempts(service, platform, 3)
    eng.catch_up()
    dump = eng.dump("p1")
    size = service.head("p1")[0]
    db = eng.db
    old_blob = msgspec.msgpack.encode({"gate": "RESTRICTED", "known": [], "kinds": {}})
    with db.tx() as cur:
        cur.execute(
            f"UPDATE {db.t('risk_positions')} SET state = {db.ph} WHERE platform = {db.ph}",
            (old_blob, "p1"),
        )
    again = engine(service, clock, {"W15"})
    assert again.status("p1")["position"] == -1  # the old format is not trusted
    again.catch_up()
    assert again.dump("p1") == dump
    assert service.head("p1")[0] == size

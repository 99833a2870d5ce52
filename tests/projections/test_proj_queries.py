"""Statement pages and filters, audit-trail filters, CSV/JSON export, the CLI."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from helpers import FakeClock, log_records
from proj_workload import run_workload

from ledger import records
from ledger.service import LedgerService
from projections import cli
from projections import statements as st
from projections.audit_trail import (
    PUBLIC_COLUMNS,
    AuditFilter,
    audit_page,
    export_text,
    iter_audit,
    role_of,
)
from projections.runner import ProjectionRunner


@pytest.fixture
def projected(service: LedgerService, clock: FakeClock) -> tuple[LedgerService, ProjectionRunner]:
    run_workload(service, clock, 300, seed=2)
    runner = ProjectionRunner(service.store, batch_size=100)
    runner.catch_up("p1")
    return service, runner


def _all_lines(runner: ProjectionRunner, account: str, size: int, **kw: Any) -> list[Any]:
    out: list[Any] = []
    token = ""
    while True:
        page = st.statement(runner.db, "p1", account, size, token, **kw)
        assert len(page.lines) <= size
        out += page.lines
        token = page.next_page_token
        if not token:
            return out


def _touches(rec: dict[str, Any], account: str, holds: dict[str, tuple[str, str]]) -> bool:
    if rec["kind"] == records.REFUSED_KIND:
        return False
    if "entries" in rec:
        return any(account in (d, c) for d, c, _ in rec["entries"])
    if "hold" in rec:
        h = rec["hold"]
        holds[h["id"]] = (h["debit"], h["credit"])
        return bool(h["debit"] == account)
    return any(
        holds[hid][0] == account or (captured and holds[hid][1] == account)
        for hid, captured, _ in rec.get("resolve", ())
    )


def test_statement_pages_cover_every_line_once(
    projected: tuple[LedgerService, ProjectionRunner],
) -> None:
    service, runner = projected
    lines = _all_lines(runner, "alice", 7)
    keys = [(x["seq"], x["n"]) for x in lines]
    assert keys == sorted(set(keys))
    assert lines == _all_lines(runner, "alice", 1000)
    holds: dict[str, tuple[str, str]] = {}
    expected = [r["seq"] for r in log_records(service, "p1") if _touches(r, "alice", holds)]
    assert sorted({x["seq"] for x in lines}) == expected
    # running balance: each line's posted = previous posted + amount
    posted = 0
    held = 0
    for x in lines:
        posted += x["amount"]
        held += x["held_delta"]
        assert (x["posted"], x["held"]) == (posted, held), x


def test_statement_filters_by_time_and_kind(
    projected: tuple[LedgerService, ProjectionRunner],
) -> None:
    _, runner = projected
    lines = _all_lines(runner, "bob", 1000)
    times = sorted({x["ts"] for x in lines})
    lo, hi = times[len(times) // 4], times[3 * len(times) // 4]
    ranged = _all_lines(runner, "bob", 5, from_ms=lo, to_ms=hi)
    assert ranged == [x for x in lines if lo <= x["ts"] <= hi]
    assert ranged
    kinds = ["transferred", "fee_charged"]
    assert _all_lines(runner, "bob", 3, kinds=kinds) == [x for x in lines if x["kind"] in kinds]


def test_statement_page_bounds_and_tokens(
    projected: tuple[LedgerService, ProjectionRunner],
) -> None:
    _, runner = projected
    for size in (0, st.PAGE_SIZE_MAX + 1):
        with pytest.raises(ValueError):
            st.statement(runner.db, "p1", "alice", size)
    page = st.statement(runner.db, "p1", "alice", 2)
    assert page.next_page_token
    with pytest.raises(ValueError, match="another query"):
        st.statement(runner.db, "p1", "bob", 2, page.next_page_token)
    with pytest.raises(ValueError, match="not valid"):
        st.statement(runner.db, "p1", "alice", 2, "garbage!")
    with pytest.raises(LookupError):
        st.statement(runner.db, "p1", "nobody")


def _audit_all(runner: ProjectionRunner, flt: AuditFilter, size: int = 9) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = ""
    while True:
        page = audit_page(runner.db, "p1", flt, size, token)
        out += page.rows
        token = page.next_page_token
        if not token:
            return out


def test_audit_trail_has_every_record_and_filters(
    projected: tuple[LedgerService, ProjectionRunner],
) -> None:
    service, runner = projected
    recs = log_records(service, "p1")
    rows = _audit_all(runner, AuditFilter(), 50)
    assert [r["seq"] for r in rows] == [r["seq"] for r in recs]
    for row, rec in zip(rows, recs, strict=True):
        assert row["actor"] == rec["actor"] and row["role"] == role_of(rec["actor"])
        assert row["kind"] == rec["kind"] and row["op"] == rec["cmd"]["op"]
        assert row["pv"] == rec["pv"] and row["ts"] == rec["ts"]
        refused = rec["kind"] == records.REFUSED_KIND
        assert row["outcome"] == ("refused" if refused else "accepted")
        assert (row["code"], row["control"]) == (rec.get("code"), rec.get("control"))
        if "entries" in rec:
            assert row["amount"] == sum(a for _, _, a in rec["entries"])
    refusals = [r for r in recs if r["kind"] == records.REFUSED_KIND]
    assert refusals, "the workload must produce refusals"
    checks: list[tuple[AuditFilter, Any]] = [
        (AuditFilter(actor="operator:bob"), lambda r: r["actor"] == "operator:bob"),
        (AuditFilter(role="platform"), lambda r: r["actor"].startswith("platform:")),
        (AuditFilter(role="operator"), lambda r: r["actor"].startswith("operator:")),
        (AuditFilter(role="platform:web"), lambda r: False),  # a role has no ':' in it
        (AuditFilter(role="platfor"), lambda r: False),  # a whole prefix, not its start
        (AuditFilter(op="transfer"), lambda r: r["cmd"]["op"] == "transfer"),
        (AuditFilter(outcome="refused"), lambda r: r["kind"] == records.REFUSED_KIND),
        (
            AuditFilter(code="INSUFFICIENT_FUNDS", op="transfer"),
            lambda r: r.get("code") == "INSUFFICIENT_FUNDS" and r["cmd"]["op"] == "transfer",
        ),
        (AuditFilter(kind="hold_placed"), lambda r: r["kind"] == "hold_placed"),
    ]
    mid_ts = recs[len(recs) // 2]["ts"]
    end_ts = recs[3 * len(recs) // 4]["ts"]
    checks.append(
        (AuditFilter(from_ms=mid_ts, to_ms=end_ts), lambda r: mid_ts <= r["ts"] <= end_ts)
    )
    checks.append(
        (
            AuditFilter(account="alice", from_seq=20, to_seq=200, outcome="accepted"),
            lambda r: 20 <= r["seq"] <= 200 and r["kind"] != records.REFUSED_KIND,
        )
    )
    for flt, pred in checks:
        got = [r["seq"] for r in _audit_all(runner, flt)]
        want = [r["seq"] for r in recs if pred(r)]
        if flt.account is None:
            assert got == want, flt
        else:  # account filter: a subset of the other conditions, each touching alice
            assert got and set(got) <= set(want)
            assert all("alice" in row["accounts"].split(";") for row in rows if row["seq"] in got)
    # the account filter finds refusals naming the account too (by account or by hold)
    alice_refused = _audit_all(runner, AuditFilter(account="alice", outcome="refused"))
    named = {
        r["seq"]
        for r in refusals
        if "alice" in {v for k, v in r["cmd"].items() if k.endswith("account_id")}
    }
    assert named and named <= {r["seq"] for r in alice_refused}
    assert all("alice" in r["accounts"].split(";") for r in alice_refused)


def test_csv_and_json_exports(projected: tuple[LedgerService, ProjectionRunner]) -> None:
    _, runner = projected
    flt = AuditFilter(outcome="refused")
    rows = list(iter_audit(runner.db, "p1", flt))
    text = export_text(runner.db, "p1", "csv", flt, max_rows=10_000)
    parsed = list(csv.reader(io.StringIO(text)))
    assert tuple(parsed[0]) == PUBLIC_COLUMNS
    assert [int(r[0]) for r in parsed[1:]] == [r["seq"] for r in rows]
    doc = json.loads(export_text(runner.db, "p1", "json", flt, max_rows=10_000))
    assert [r["seq"] for r in doc] == [r["seq"] for r in rows]
    assert all(isinstance(r["accounts"], list) and r["code"] for r in doc)
    capped = json.loads(export_text(runner.db, "p1", "json", None, max_rows=3))
    assert [r["seq"] for r in capped] == [0, 1, 2]
    assert json.loads(export_text(runner.db, "p1", "json", AuditFilter(actor="x:none"))) == []
    with pytest.raises(ValueError):
        export_text(runner.db, "p1", "xml")


def test_cli(
    projected: tuple[LedgerService, ProjectionRunner],
    store_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for k, v in store_env.items():
        monkeypatch.setenv(k, v)

    def run(*argv: str) -> Any:
        assert cli.main(["--json", "project", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    status = run("status", "--platform", "p1")
    assert {s["name"] for s in status} == {"statements", "audit"}
    assert run("run")["p1"] == 0  # already caught up by the fixture
    b = run("balance-at", "alice", "--platform", "p1", "--at-seq", "10")
    assert b["at_seq"] == 10 and b["account"] == "alice"
    page = run("statement", "alice", "--platform", "p1", "--page-size", "3")
    assert len(page["lines"]) == 3 and page["next_page_token"]
    nxt = run(
        "statement", "alice", "--platform", "p1", "--page-size", "3",
        "--page-token", page["next_page_token"],
    )  # fmt: skip
    assert nxt["lines"][0]["seq"] >= page["lines"][-1]["seq"]
    audit = run("audit", "--platform", "p1", "--outcome", "refused", "--page-size", "5")
    assert audit["rows"] and all(r["outcome"] == "refused" for r in audit["rows"])
    assert cli.main(["project", "audit", "--platform", "p1", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seq,ts,actor,")
    assert run("rebuild", "--platform", "p1")["p1"] > 0
    assert cli.main(["project", "balance-at", "nobody", "--platform", "p1"]) == cli.EXIT_REFUSED
    assert (
        cli.main(["project", "balance-at", "alice", "--platform", "p1", "--at-seq", "999999"])
        == cli.EXIT_ERROR
    )

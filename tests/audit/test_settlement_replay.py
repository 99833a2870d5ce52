"""The verifier's replay of reconciliation settlements (`reconciliation_settled`).

The log (tests/audit/workload.py) records a CNY excess of 300 and returns it to the platform's
bank in two settlements (100, then 200), each an operator's request a checker approves. Each
forgery below is what an operator holding the signing key could publish (re-chained and
re-signed); the verifier names it at the record where it happens."""

from __future__ import annotations

from typing import Any

from bundle_tools import verify_bytes  # type: ignore[import-not-found]
from test_early_warning_replay import (  # type: ignore[import-not-found]
    _assert_at,
    _decoded,
    _first,
    _forged,
    _request_of,
)
from workload import OPERATOR  # type: ignore[import-not-found]


def _is_settlement(r: dict[str, Any]) -> bool:
    return bool(r["kind"] == "reconciliation_settled")


def _settlements(recs: list[dict[str, Any]]) -> list[int]:
    return [i for i, r in enumerate(recs) if _is_settlement(r)]


def test_workload_returns_an_excess_in_two_settlements(exported: Any) -> None:
    failure, summary = verify_bytes(exported.data, exported.vkey)
    assert failure is None, failure.describe()
    recs = _decoded(exported)
    first, second = _settlements(recs)
    assert summary.settlements == 2 and summary.kinds["reconciliation_settled"] == 2
    rid = recs[first]["settles"]
    assert recs[second]["settles"] == rid
    recorded = next(
        r
        for r in recs
        if _is_settlement(r) is False and r.get("reconciliation", {}).get("id") == rid
    )
    assert recorded["reconciliation"]["difference"] == 300  # an excess
    assert [recs[i]["entries"] for i in (first, second)] == [
        [["bank-p1", "own", 100]],
        [["bank-p1", "own", 200]],
    ]
    for i in (first, second):
        assert recs[i]["actor"].startswith("checker:")
        assert recs[_request_of(recs, i)]["actor"] == OPERATOR
    # the other reconciliations of the workload stay unsettled
    unsettled = {
        r["reconciliation"]["id"]
        for r in recs
        if r["kind"] == "reconciliation_completed" and r["reconciliation"]["difference"]
    } - {rid}
    assert summary.unsettled == len(unsettled) > 0


def test_settlement_without_approval_is_caught(exported: Any) -> None:
    """The operator books the settlement alone: named for lacking the checker that
    settle_reconciliation always needs."""
    recs = _decoded(exported)
    i = _settlements(recs)[0]
    request = recs[_request_of(recs, i)]
    del recs[i]["executes"]
    recs[i].update(actor=request["actor"], cmd=request["cmd"])
    _assert_at(_forged(exported, recs, {i}), i, "without a checker's approval")
    # nor may the operator's own checker identity approve it
    recs = _decoded(exported)
    recs[i]["actor"] = "checker:" + OPERATOR.partition(":")[2]
    _assert_at(_forged(exported, recs, {i}), i, "approved by its own maker")


def test_over_settlement_is_caught(exported: Any) -> None:
    """The second settlement takes 201 where 200 is left (its request forged to match)."""
    recs = _decoded(exported)
    i = _settlements(recs)[1]
    j = _request_of(recs, i)
    recs[i]["entries"][0][2] = 201
    recs[j]["cmd"]["amount_minor"] = 201
    # the request itself is named: the ledger never asks for more than is left
    _assert_at(_forged(exported, recs, {i, j}), j, "which has 200 left")
    # a record settling more than its request asked for (the request untouched)
    recs = _decoded(exported)
    recs[i]["entries"][0][2] = 250
    _assert_at(_forged(exported, recs, {i}), i, "exceeds the 200 left")
    recs = _decoded(exported)
    recs[i]["entries"][0][2] = 150
    _assert_at(_forged(exported, recs, {i}), i, "differs from the operator's instruction")


def test_wrong_direction_is_caught(exported: Any) -> None:
    """An excess paid by own funds to the platform's bank (the shortfall's direction), and a
    settlement to a customer account: both named."""
    recs = _decoded(exported)
    i = _settlements(recs)[0]
    recs[i]["entries"] = [["own", "bank-p1", 100]]
    _assert_at(_forged(exported, recs, {i}), i, "must post platform_bank -> own_funds")
    recs = _decoded(exported)
    recs[i]["entries"] = [["bank-p1", "c1", 100]]
    _assert_at(_forged(exported, recs, {i}), i, "must post platform_bank -> own_funds")


def test_settling_another_or_an_unknown_reconciliation_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _settlements(recs)[0]
    recs[i]["settles"] = "r-nope"
    _assert_at(_forged(exported, recs, {i}), i, "not a reconciliation with a difference left")
    # a balanced or settled one has nothing left either: settling the same one a third time
    recs = _decoded(exported)
    first, second = _settlements(recs)
    j = _request_of(recs, second)
    later = _first(
        recs,
        lambda r: r["kind"] == "approval_requested" and r["actor"].startswith("operator:"),
        second + 1,
    )
    recs[later]["cmd"] = recs[j]["cmd"]
    recs[later]["request"]["op"] = "settle_reconciliation"
    _assert_at(_forged(exported, recs, {later}), later, "nothing left to settle")
    # a settlement with two postings, or tags
    recs = _decoded(exported)
    recs[first]["entries"] = [["bank-p1", "own", 50], ["bank-p1", "own", 50]]
    _assert_at(_forged(exported, recs, {first}), first, "exactly one entry")
    recs = _decoded(exported)
    recs[first]["tags"] = []
    _assert_at(_forged(exported, recs, {first}), first, "unexpected ['tags']")

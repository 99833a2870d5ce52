"""The verifier's replay of the daily reconciliation, the early-warning alerts and the automatic
restriction of the gate.

The log (tests/audit/workload.py) holds reconciliations requested by an operator and signed off
by a checker, a RED alert raised by `system:early-warning` followed by its automatic SetGate
RESTRICTED, and alerts acknowledged and closed by roles allowed for their level. Each forgery
below is what an operator holding the signing key could publish (re-chained and re-signed); the
verifier must name it at the record where it happens."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from bundle_tools import lines_of, rebuild, verify_bytes  # type: ignore[import-not-found]
from workload import EARLY_WARNING, OPERATOR  # type: ignore[import-not-found]


def _dump(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _decoded(exported: Any) -> list[dict[str, Any]]:
    return [json.loads(data) for data in exported.records]


def _forged(exported: Any, recs: list[dict[str, Any]], changed: set[int]) -> Any:
    """The verifier's failure (or None) on the log re-chained and re-signed with the records at
    `changed` re-encoded."""
    header = b"".join(ln.raw for ln in lines_of(exported.data) if ln.kind == "header")
    records = [
        _dump(rec) if i in changed else data
        for i, (rec, data) in enumerate(zip(recs, exported.records, strict=True))
    ]
    return verify_bytes(rebuild(header, records, exported.signer, [1000]), exported.vkey)[0]


def _first(
    recs: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool], start: int = 1
) -> int:
    return next(i for i in range(start, len(recs)) if pred(recs[i]))


def _request_of(recs: list[dict[str, Any]], i: int) -> int:
    rid = recs[i]["executes"]
    return _first(recs, lambda r: r["kind"] == "approval_requested" and r["cid"] == rid)


def _assert_at(failure: Any, pos: int, words: str) -> None:
    assert failure is not None, "forgery not detected"
    assert (failure.where, failure.position) == ("record", pos), failure.describe()
    assert words in failure.reason, failure.reason


def _is_reconciliation(r: dict[str, Any]) -> bool:
    return bool(r["kind"] == "reconciliation_completed")


def _alert_record(kind: str, alert_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["kind"] == kind and r.get(kind) == alert_id


def _replace_with(recs: list[dict[str, Any]], source: int, target: int) -> None:
    """Put a copy of record `source` at position `target` (a refusal, which changed nothing)."""
    assert recs[target]["kind"] == "command_refused"
    forged = copy.deepcopy(recs[source])
    forged.update({k: recs[target][k] for k in ("seq", "ts", "pv", "cid")})
    recs[target] = forged


def _later_refusal(recs: list[dict[str, Any]], start: int) -> int:
    return _first(recs, lambda r: r["kind"] == "command_refused" and "auth_failed" not in r, start)


def test_workload_has_reconciliations_alerts_and_an_automatic_restriction(exported: Any) -> None:
    failure, summary = verify_bytes(exported.data, exported.vkey)
    assert failure is None, failure.describe()
    assert {
        "reconciliation_completed",
        "alert_raised",
        "alert_acknowledged",
        "alert_closed",
    } <= set(summary.kinds)
    recs = _decoded(exported)
    # every reconciliation is a checker's execution of an operator's request
    reconciled = [i for i, r in enumerate(recs) if _is_reconciliation(r)]
    assert len(reconciled) == summary.reconciliations >= 4
    for i in reconciled:
        assert recs[i]["actor"].startswith("checker:")
        assert recs[_request_of(recs, i)]["actor"] == OPERATOR
    # the requirement of each was recomputed by the replay and found equal
    assert summary.requirements_checked == len(reconciled)
    assert summary.requirements_unchecked == 0
    results = {recs[i]["reconciliation"]["result"] for i in reconciled}
    assert results == {"excess", "shortfall"}
    # the RED alert, then the gate restricted by the same system actor without a checker
    red = _first(recs, lambda r: r["kind"] == "alert_raised" and r["alert"]["level"] == "RED")
    gate = _first(recs, lambda r: r["kind"] == "gate_set", red)
    assert recs[red]["actor"] == recs[gate]["actor"] == EARLY_WARNING
    assert "executes" not in recs[gate] and recs[gate]["gate"] == "RESTRICTED"
    assert summary.alerts == 4 and summary.open_alerts == 0
    # every alert step by a role allowed for its level, the RED close by a checker
    close_red = _first(recs, _alert_record("alert_closed", recs[red]["alert"]["id"]))
    assert recs[close_red]["actor"].startswith("checker:")
    steppers = {r["actor"].partition(":")[0] for r in recs if r["kind"] == "alert_closed"}
    assert steppers == {"platform", "operator", "checker"}


def test_reconciliation_without_approval_is_caught(exported: Any) -> None:
    """The operator records the reconciliation alone: the request stays pending, and the record
    is named for lacking the checker that record_reconciliation always needs."""
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    request = recs[_request_of(recs, i)]
    del recs[i]["executes"]
    recs[i].update(actor=request["actor"], cmd=request["cmd"])
    _assert_at(_forged(exported, recs, {i}), i, "without a checker's approval")


def test_reconciliation_request_by_a_checker_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    j = _request_of(recs, i)
    recs[j]["actor"] = "checker:bob"
    _assert_at(_forged(exported, recs, {j}), j, "may not ask for record_reconciliation")


def test_reconciliation_figures_that_do_not_add_up_are_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    recs[i]["reconciliation"]["difference"] += 1
    _assert_at(_forged(exported, recs, {i}), i, "figures do not add up")
    # the same, in the operator's instruction: named at the request
    recs = _decoded(exported)
    j = _request_of(recs, i)
    recs[j]["cmd"]["bank_closing_minor"] += 1
    _assert_at(_forged(exported, recs, {j}), j, "figures do not add up")


def test_reconciliation_result_against_its_sign_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: _is_reconciliation(r) and r["reconciliation"]["result"] == "excess")
    recs[i]["reconciliation"]["result"] = "balanced"
    _assert_at(_forged(exported, recs, {i}), i, "the figures say excess")


def test_reconciliation_statements_are_checked(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    statements = recs[i]["reconciliation"]["statements"]
    for bad in ([statements[0], statements[0]], [statements[0].upper()], []):
        recs[i]["reconciliation"]["statements"] = bad
        _assert_at(_forged(exported, recs, {i}), i, "statement")


def test_reconciliation_differing_from_its_request_is_caught(exported: Any) -> None:
    """Figures that add up, but not the ones the operator asked the checker to sign off."""
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    spec = recs[i]["reconciliation"]
    spec["closing"] += 1000
    spec["difference"] += 1000
    spec["result"] = "excess" if spec["difference"] > 0 else spec["result"]
    _assert_at(_forged(exported, recs, {i}), i, "differs from the operator's instruction")


def test_reconciliation_requirement_not_the_logs_is_caught(exported: Any) -> None:
    """An understated requirement with figures that still add up: the replay recomputes the
    customer + suspense balances at the snapshot and names the request."""
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    j = _request_of(recs, i)
    cmd = recs[j]["cmd"]
    cmd["requirement_minor"] -= 100
    cmd["difference_minor"] += 100
    cmd["result"] = "excess" if cmd["difference_minor"] > 0 else cmd["result"]
    _assert_at(_forged(exported, recs, {j}), j, "is not the customer + suspense balance")


def test_reconciliation_in_an_unknown_currency_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    recs[i]["reconciliation"]["ccy"] = "EUR"
    _assert_at(_forged(exported, recs, {i}), i, "not a currency of an opened account")


def test_reconciliation_recorded_twice_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, _is_reconciliation)
    j = _later_refusal(recs, i + 1)
    _replace_with(recs, i, j)
    _assert_at(_forged(exported, recs, {j}), j, "not a pending request")


def test_alert_closed_by_a_role_not_allowed_for_its_level_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    red = _first(recs, lambda r: r["kind"] == "alert_raised" and r["alert"]["level"] == "RED")
    i = _first(recs, _alert_record("alert_closed", recs[red]["alert"]["id"]))
    recs[i]["actor"] = OPERATOR  # an operator acknowledges any alert but closes GREEN/YELLOW
    _assert_at(_forged(exported, recs, {i}), i, "may not close a RED alert")
    recs = _decoded(exported)
    recs[i]["actor"] = "platform:p1"
    _assert_at(_forged(exported, recs, {i}), i, "may not close a RED alert")
    recs = _decoded(exported)
    recs[i]["actor"] = EARLY_WARNING  # early warning raises alerts; it never closes them
    _assert_at(_forged(exported, recs, {i}), i, "may not close_alert")


def test_alert_acknowledged_by_the_platform_beyond_yellow_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    orange = _first(recs, lambda r: r["kind"] == "alert_raised" and r["alert"]["level"] == "ORANGE")
    i = _first(recs, _alert_record("alert_acknowledged", recs[orange]["alert"]["id"]))
    recs[i]["actor"] = "platform:p1"
    _assert_at(_forged(exported, recs, {i}), i, "may not acknowledge a ORANGE alert")


def test_alert_closed_twice_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "alert_closed")
    j = _later_refusal(recs, i + 1)
    _replace_with(recs, i, j)
    _assert_at(_forged(exported, recs, {j}), j, "already closed")


def test_alert_raised_twice_and_unknown_alerts_are_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "alert_raised")
    j = _later_refusal(recs, i + 1)
    _replace_with(recs, i, j)
    _assert_at(_forged(exported, recs, {j}), j, "raised twice")
    recs = _decoded(exported)
    k = _first(recs, lambda r: r["kind"] == "alert_acknowledged")
    recs[k]["alert_acknowledged"] = recs[k]["cmd"]["alert_id"] = "no-such-alert"
    _assert_at(_forged(exported, recs, {k}), k, "not a raised alert")


def test_alert_level_and_shape_are_checked(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "alert_raised")
    recs[i]["alert"]["level"] = recs[i]["cmd"]["level"] = "PURPLE"
    _assert_at(_forged(exported, recs, {i}), i, "not GREEN, YELLOW, ORANGE or RED")
    recs = _decoded(exported)
    recs[i]["alert"]["extra"] = 1
    _assert_at(_forged(exported, recs, {i}), i, "alert must be")
    recs = _decoded(exported)
    recs[i]["alert"]["level"] = "GREEN"  # the record says GREEN, the instruction RED/YELLOW
    _assert_at(_forged(exported, recs, {i}), i, "differs from its instruction")


def _system_gate(recs: list[dict[str, Any]]) -> int:
    return _first(recs, lambda r: r["kind"] == "gate_set" and r["actor"] == EARLY_WARNING)


def test_system_gate_change_that_loosens_is_caught(exported: Any) -> None:
    """The checker's reopening (RESTRICTED -> NORMAL) rewritten as early warning's own act."""
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "gate_set" and r["gate"] == "NORMAL")
    j = _request_of(recs, i)
    del recs[i]["executes"]
    recs[i].update(actor=EARLY_WARNING, cmd=recs[j]["cmd"])
    _assert_at(_forged(exported, recs, {i}), i, "may only tighten the gate")


def test_system_gate_change_under_auto_restrict_0_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _system_gate(recs)
    assert recs[i]["pv"] == 0 and recs[0]["policy"]["auto_restrict"] == 1
    recs[0]["policy"]["auto_restrict"] = 0
    _assert_at(_forged(exported, recs, {0}), i, "auto_restrict is 0")


def test_gate_change_without_a_checker_by_other_roles_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _system_gate(recs)
    recs[i]["actor"] = OPERATOR
    _assert_at(_forged(exported, recs, {i}), i, "without a checker's approval")
    recs = _decoded(exported)
    recs[i]["cmd"]["gate"] = "FROZEN"  # the record and its instruction disagree
    _assert_at(_forged(exported, recs, {i}), i, "differs from its instruction")

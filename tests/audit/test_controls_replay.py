"""The verifier's replay of the controls' records: customer keys, payout bindings, standing
authorisations, maker-checker requests and their execution, policy versions and the role matrix.

A dishonest operator holding the signing key can re-chain and re-sign anything; these forgeries
are only caught because the verifier replays what the records claim, and each must be named at
the record where it happens."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bundle_tools import lines_of, rebuild, verify_bytes  # type: ignore[import-not-found]
from workload import PLATFORM, build_log  # type: ignore[import-not-found]

from ledger.checkpoint import NoteSigner, generate_key, origin_for
from ledger.export import export_bundle
from ledger.store import LedgerStore

NEW_KINDS = {
    "key_registered",
    "payee_bound",
    "standing_granted",
    "standing_revoked",
    "policy_set",
    "gate_set",
    "approval_requested",
    "approval_rejected",
}


def _dump(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _decoded(exported: Any) -> list[dict[str, Any]]:
    return [json.loads(data) for data in exported.records]


def _header(exported: Any) -> bytes:
    return b"".join(ln.raw for ln in lines_of(exported.data) if ln.kind == "header")


def _verify_forged(exported: Any, recs: list[dict[str, Any]], changed: set[int]) -> Any:
    """Re-chain and re-sign the log with the records at `changed` re-encoded (what an operator
    with the signing key could publish); the verifier's failure, or None."""
    records = [
        _dump(rec) if i in changed else data
        for i, (rec, data) in enumerate(zip(recs, exported.records, strict=True))
    ]
    bundle = rebuild(_header(exported), records, exported.signer, [1000, 2000])
    return verify_bytes(bundle, exported.vkey)[0]


def _first(
    recs: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool], start: int = 1
) -> int:
    return next(i for i in range(start, len(recs)) if pred(recs[i]))


def _request_of(recs: list[dict[str, Any]], i: int) -> dict[str, Any]:
    """The approval_requested record that the executing record at `i` names."""
    rid = recs[i]["executes"]
    return next(r for r in recs[:i] if r["kind"] == "approval_requested" and r["cid"] == rid)


def _assert_at(failure: Any, pos: int, words: str) -> None:
    assert failure is not None, "forgery not detected"
    assert (failure.where, failure.position) == ("record", pos), failure.describe()
    assert words in failure.reason, failure.reason


def test_workload_covers_every_new_kind_and_field(exported: Any) -> None:
    failure, summary = verify_bytes(exported.data, exported.vkey)
    assert failure is None, failure.describe()
    assert set(summary.kinds) >= NEW_KINDS, summary.kinds
    recs = _decoded(exported)
    executed = [r for r in recs if "executes" in r]
    assert {r["kind"] for r in executed} >= {"transferred", "reversed", "policy_set", "gate_set"}
    assert all(r["actor"].startswith("checker:") for r in executed)
    assert any("tags" in r for r in recs)
    assert any("auth_failed" in r for r in recs)
    assert summary.policy_version == max(r["pv"] for r in recs) >= 2
    # signed instructions reached the log with their signatures
    assert any(r["kind"] == "transferred" and "auth" in r["cmd"] for r in recs)


def test_approval_by_the_maker_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: "executes" in r)
    recs[i]["actor"] = _request_of(recs, i)["actor"]
    _assert_at(_verify_forged(exported, recs, {i}), i, "approved by its own maker")


def test_approval_by_a_non_checker_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "policy_set")
    assert _request_of(recs, i)["actor"] != "operator:bob"
    recs[i]["actor"] = "operator:bob"
    _assert_at(_verify_forged(exported, recs, {i}), i, "not a checker")


def test_manual_operation_without_approval_is_caught(exported: Any) -> None:
    """A policy change recorded as the operator's own act, with no checker: the request it
    should have executed is left pending and the change itself is refused by the replay."""
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "policy_set")
    request = _request_of(recs, i)
    del recs[i]["executes"]
    recs[i].update(actor=request["actor"], cmd=request["cmd"])
    _assert_at(_verify_forged(exported, recs, {i}), i, "without a checker's approval")


def test_large_transfer_without_approval_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "transferred" and "executes" in r)
    request = _request_of(recs, i)
    del recs[i]["executes"]
    recs[i].update(actor=request["actor"], cmd=request["cmd"])
    _assert_at(_verify_forged(exported, recs, {i}), i, "without a checker's approval")


def test_request_executed_twice_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "transferred" and "executes" in r)
    j = _first(recs, lambda r: r["kind"] == "transferred" and "executes" in r, i + 1)
    recs[j]["executes"] = recs[i]["executes"]
    recs[j]["cmd"]["request_id"] = recs[i]["executes"]
    _assert_at(_verify_forged(exported, recs, {j}), j, "not a pending request")


def test_approval_after_expiry_is_caught(exported: Any) -> None:
    """Shorten the first policy's approval window to 1 ms (and every request made under it, so
    they stay consistent): the first approval that came later than that is caught."""
    recs = _decoded(exported)
    recs[0]["policy"]["approval_ttl_ms"] = 1
    changed = {0}
    made: dict[str, int] = {}
    for i, rec in enumerate(recs):
        if rec["kind"] == "approval_requested" and rec["pv"] == 0:
            rec["request"]["expires"] = rec["ts"] + 1
            made[rec["cid"]] = rec["ts"]
            changed.add(i)
    late = _first(recs, lambda r: r.get("executes") in made and r["ts"] > made[r["executes"]] + 1)
    _assert_at(_verify_forged(exported, recs, changed), late, "after it expired")


@pytest.mark.parametrize("delta", [-1, 1])
def test_policy_version_that_is_not_in_force_is_caught(exported: Any, delta: int) -> None:
    recs = _decoded(exported)
    first_change = _first(recs, lambda r: r["kind"] == "policy_set")
    i = _first(recs, lambda r: r["kind"] == "transferred", first_change + 1)
    recs[i]["pv"] += delta
    _assert_at(_verify_forged(exported, recs, {i}), i, "policy version in force")


def test_policy_version_skipped_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "policy_set")
    recs[i]["policy"]["version"] += 1
    _assert_at(_verify_forged(exported, recs, {i}), i, "policy version")


def test_actor_beyond_its_role_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "transferred" and "executes" not in r)
    recs[i]["actor"] = "auditor:mallory"
    _assert_at(_verify_forged(exported, recs, {i}), i, "may not transfer")
    recs = _decoded(exported)
    recs[i]["actor"] = "operator:alice"  # the custodian moving customer money itself
    _assert_at(_verify_forged(exported, recs, {i}), i, "suspense clearing is the operator's")


def test_new_kind_carrying_money_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "key_registered")
    recs[i]["entries"] = [["omni", recs[i]["key"]["account"], 5]]
    recs[i]["ccy"] = "CNY"
    _assert_at(_verify_forged(exported, recs, {i}), i, "carries unexpected")


def test_unknown_kind_may_not_execute_a_request(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "transferred" and "executes" in r)
    recs[i] = {k: v for k, v in recs[i].items() if k not in ("entries", "ccy", "tags")}
    recs[i]["kind"] = "transfer_noted"
    _assert_at(_verify_forged(exported, recs, {i}), i, "unknown record kind")


def test_unknown_kind_without_effects_is_counted(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "command_refused" and "auth_failed" not in r)
    recs[i] = {k: v for k, v in recs[i].items() if k not in ("code", "control", "message")}
    recs[i]["kind"] = "note_added"
    recs[i].pop("linked_to", None)
    failure = _verify_forged(exported, recs, {i})
    assert failure is None, failure.describe()


def test_refusal_fields_are_checked(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "command_refused" and "auth_failed" not in r)
    recs[i]["suppressed"] = 12  # twelve refusals of this actor were not recorded before it
    assert _verify_forged(exported, recs, {i}) is None
    recs[i]["suppressed"] = 0
    _assert_at(_verify_forged(exported, recs, {i}), i, "not a positive count")
    recs = _decoded(exported)
    j = _first(recs, lambda r: r["kind"] == "command_refused" and r["code"] == "INSUFFICIENT_FUNDS")
    recs[j]["auth_failed"] = "c1"  # only a bad signature counts towards a lock
    _assert_at(_verify_forged(exported, recs, {j}), j, "only bad signatures count")


def test_keys_out_of_canonical_order_are_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "gate_set")
    rec = recs[i]
    unsorted = {"v": rec["v"], **{k: v for k, v in rec.items() if k != "v"}}
    records = list(exported.records)
    records[i] = json.dumps(unsorted, separators=(",", ":"), ensure_ascii=False).encode()
    bundle = rebuild(_header(exported), records, exported.signer, [1000, 2000])
    failure = verify_bytes(bundle, exported.vkey)[0]
    _assert_at(failure, i, "canonical")


def test_standing_revoked_twice_is_caught(exported: Any) -> None:
    recs = _decoded(exported)
    i = _first(recs, lambda r: r["kind"] == "standing_revoked")
    j = _first(recs, lambda r: r["kind"] == "command_refused" and r["actor"] == recs[i]["actor"], i)
    forged = {k: v for k, v in recs[i].items()}
    forged.update(seq=recs[j]["seq"], ts=recs[j]["ts"], pv=recs[j]["pv"], cid=recs[j]["cid"])
    recs[j] = forged
    _assert_at(_verify_forged(exported, recs, {j}), j, "not a granted authorisation")


def test_controls_workload_verifies_on_both_stores(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    """The same mixed workload written to SQLite and to PostgreSQL exports a bundle that
    verifies, and a forged self-approval in it is named at its position."""
    config = build_log(tmp_path / "data", n_batches=8, per_batch=60, store_env=store_env)
    store = LedgerStore(config)
    try:
        signer = NoteSigner(generate_key(tmp_path / "k.pem"), origin_for("ledger-test", PLATFORM))
        buf = io.BytesIO()
        result = export_bundle(store, PLATFORM, buf, signer)
    finally:
        store.close()
    failure, summary = verify_bytes(buf.getvalue(), signer.vkey)
    assert failure is None, failure.describe()
    assert summary.records == result.records > 500
    assert {"approval_requested", "payee_bound", "standing_granted", "key_registered"} <= set(
        summary.kinds
    )
    lines = lines_of(buf.getvalue())
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    records = [ln.raw.split(b" ", 3)[3][:-1] for ln in lines if ln.kind == "record"]
    recs = [json.loads(r) for r in records]
    i = _first(recs, lambda r: "executes" in r)
    recs[i]["actor"] = _request_of(recs, i)["actor"]
    records[i] = _dump(recs[i])
    failure, _ = verify_bytes(rebuild(header, records, signer, []), signer.vkey)
    _assert_at(failure, i, "approved by its own maker")

"""DisclosureService and LiabilitiesService through a real server with mutual TLS, on SQLite and
PostgreSQL: what the API hands out is byte for byte what the projections produce for the same
inputs, and verifies offline with custody_verify."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_helpers import CCY, World
from helpers import pg_env, require_postgres, sqlite_env

from custody_verify import disclosure as V
from custody_verify import liabilities as VL
from ledger.api.client import CustodyError
from ledger.api.server import RunningServer, ServerOptions, running_server
from ledger.checkpoint import NoteSigner, origin_for
from ledger.config import Config
from ledger.service import LedgerService
from projections import disclosure as D
from projections import liabilities as pol
from projections.liabilities_cli import publish

SC = grpc.StatusCode


@pytest.fixture(params=["sqlite", "postgres"])
def api_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerService]:
    """The ledger behind the server (overrides conftest's SQLite-only one for this module)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            env = sqlite_env(tmp_path / "data")
        else:
            require_postgres()
            env = stack.enter_context(pg_env(tmp_path / "data"))
        service = LedgerService(Config.from_env(env))
        service.start()
        stack.callback(service.close)
        yield service


@pytest.fixture
def api_server(api_service: LedgerService, pki: Path, tmp_path: Path) -> Iterator[RunningServer]:
    options = ServerOptions(liabilities_dir=str(tmp_path / "liabilities"))
    with running_server(api_service, host="127.0.0.1", port=0, tls_dir=pki, options=options) as srv:
        yield srv


def _history(world: World) -> None:
    p1 = world.p1
    for i in range(6):
        p1.transfer(f"dt-{i}", "alice", "bob", 100 + i, CCY)
    p1.charge_fee("d-fee", "alice", "fee", 25, CCY, "service")
    with pytest.raises(CustodyError):
        p1.transfer("d-too-much", "carol", "bob", 1_000_000, CCY)


def _range() -> tuple[int, int]:
    now = time.time_ns() // 1_000_000
    return now - 3_600_000, now + 3_600_000


def test_built_disclosure_is_the_projection_and_verifies(world: World, tmp_path: Path) -> None:
    _history(world)
    lo, hi = _range()
    built = world.operator.build_disclosure(
        from_ms=lo, to_ms=hi, html=True, csv=True, platform_id="p1"
    )
    size = built.checkpoint_size
    assert size > 0 and built.period_type == "range" and built.built_by == "operator:dev"
    # the same inputs through projections.disclosure give the same bytes
    service = world.service
    cp = service.checkpoint("p1", size)
    assert cp is not None
    snapshot = D.compute_from_store(service.store, "p1", D.PeriodSpec.range(lo, hi), size, cp.root)
    signer = NoteSigner(service.signing_key, origin_for(service.config.ledger_id, "p1"))
    data, note = D.sign_snapshot(snapshot, signer)
    assert built.json == data and built.note == note and built.vkey == signer.vkey
    assert built.html == D.render_html(json.loads(data)).encode()
    assert built.csv == D.render_csv(json.loads(data))
    assert (
        "监管信息披露快照" in built.html.decode() and "Regulator disclosure" in built.html.decode()
    )
    # building again at the same checkpoint gives the same bytes
    again = world.operator.build_disclosure(
        from_ms=lo, to_ms=hi, checkpoint_size=size, platform_id="p1"
    )
    assert (again.json, again.note) == (built.json, built.note)
    assert again.html == b"" and again.csv == b""  # only when asked for
    # and it verifies offline against a bundle exported through the API
    bundle = tmp_path / "p1.bundle"
    with bundle.open("wb") as f:
        world.auditor.export_bundle(f, platform_id="p1")
    (tmp_path / "snap.json").write_bytes(built.json)
    (tmp_path / "snap.note").write_bytes(built.note)
    report = V.verify_disclosure(tmp_path / "snap.json", bundle, built.vkey)
    assert report["ok"], report
    # a tampered figure does not
    (tmp_path / "snap.json").write_bytes(
        built.json.replace(b'"fees_total":{"amount_minor":25', b'"fees_total":{"amount_minor":26')
    )
    assert not V.verify_disclosure(tmp_path / "snap.json", bundle, built.vkey)["ok"]


def test_regulator_reads_but_cannot_build(world: World) -> None:
    _history(world)
    lo, hi = _range()
    with pytest.raises(CustodyError) as denied:
        world.regulator.build_disclosure(from_ms=lo, to_ms=hi, platform_id="p1")
    assert (denied.value.code, denied.value.reason) == (SC.PERMISSION_DENIED, "READ_ONLY_ROLE")
    with pytest.raises(CustodyError) as missing:
        world.regulator.get_disclosure(from_ms=lo, to_ms=hi, platform_id="p1")
    assert (missing.value.code, missing.value.reason) == (SC.NOT_FOUND, "DISCLOSURE_NOT_FOUND")
    built = world.operator.build_disclosure(from_ms=lo, to_ms=hi, platform_id="p1")
    for reader in (world.regulator, world.auditor, world.checker, world.operator):
        got = reader.get_disclosure(from_ms=lo, to_ms=hi, platform_id="p1", html=True)
        assert (got.json, got.note) == (built.json, built.note)
        assert got.html.startswith(b"<!DOCTYPE html>")
    for platform in (world.p1,):
        got = platform.get_disclosure(from_ms=lo, to_ms=hi)
        assert got.json == built.json
    with pytest.raises(CustodyError) as denied_p1:
        world.p1.build_disclosure(from_ms=lo, to_ms=hi)
    assert denied_p1.value.code is SC.PERMISSION_DENIED


def test_a_platform_sees_only_its_own_disclosures(world: World) -> None:
    lo, hi = _range()
    world.operator.build_disclosure(from_ms=lo, to_ms=hi, platform_id="p1")
    world.operator.build_disclosure(from_ms=lo, to_ms=hi, platform_id="p2")
    with pytest.raises(CustodyError) as denied:
        world.p2.get_disclosure(from_ms=lo, to_ms=hi, platform_id="p1")
    assert denied.value.reason == "PLATFORM_MISMATCH"
    with pytest.raises(CustodyError) as listed:
        world.p2.list_disclosures(platform_id="p1")
    assert listed.value.reason == "PLATFORM_MISMATCH"
    own = world.p2.list_disclosures()
    assert [d.platform_id for d in own.items] == ["p2"]
    assert own.items[0].json == b""  # lists carry no documents


def test_list_pages_through_every_snapshot(world: World) -> None:
    lo, hi = _range()
    sizes = []
    for i in range(5):
        world.p1.transfer(f"l-{i}", "alice", "bob", 1, CCY)
        world.operator.sign_checkpoint(platform_id="p1")
        d = world.operator.build_disclosure(from_ms=lo - i, to_ms=hi, platform_id="p1")
        sizes.append((d.from_ms, d.checkpoint_size))
    walked = list(world.auditor.iter_disclosures(page_size=2, platform_id="p1"))
    assert [(d.from_ms, d.checkpoint_size) for d in walked] == sorted(sizes, reverse=True)
    with pytest.raises(CustodyError) as bad:
        world.auditor.list_disclosures(page_token="bm90LWEtdG9rZW4", platform_id="p1")
    assert bad.value.reason == "INVALID_PAGE_TOKEN"
    latest = world.auditor.get_disclosure(from_ms=lo - 4, to_ms=hi, platform_id="p1")
    assert latest.checkpoint_size == sizes[-1][1]


def test_disclosure_refusals(world: World) -> None:
    op = world.operator
    with pytest.raises(CustodyError) as bad_day:
        op.build_disclosure(day="2024-02-30", platform_id="p1")
    assert (bad_day.value.code, bad_day.value.reason) == (SC.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert "period.day" in bad_day.value.fields
    with pytest.raises(CustodyError) as no_cp:
        op.build_disclosure(day="2024-02-01", checkpoint_size=999_999, platform_id="p1")
    assert (no_cp.value.code, no_cp.value.reason) == (SC.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
    with pytest.raises(CustodyError) as too_long:
        op.build_disclosure(from_ms=0, to_ms=2**62, platform_id="p1")
    assert (too_long.value.code, too_long.value.reason) == (
        SC.FAILED_PRECONDITION,
        "DISCLOSURE_REFUSED",
    )
    with pytest.raises(CustodyError) as nowhere:
        op.build_disclosure(day="2024-02-01", platform_id="p9")
    assert nowhere.value.reason == "PLATFORM_NOT_FOUND"
    month = op.build_disclosure(month="2024-02", platform_id="p1")
    assert month.period_label == "2024-02" and month.period_closed == 1


# -- proof of liabilities -----------------------------------------------------------------------


def _published(world: World, out: Path) -> pol.Tree:
    tree, log = publish(world.service, "p1", CCY, "operator:dev", min_depth=3, out=out)
    pol.write_outputs(tree, out, log)
    return tree


def test_statement_and_customer_proof_verify(world: World, tmp_path: Path) -> None:
    _history(world)
    with pytest.raises(CustodyError) as none_yet:
        world.auditor.get_liabilities_statement(platform_id="p1")
    assert (none_yet.value.code, none_yet.value.reason) == (
        SC.NOT_FOUND,
        "LIABILITIES_NOT_PUBLISHED",
    )
    tree = _published(world, tmp_path / "liabilities" / "p1" / CCY)
    [stmt] = world.regulator.get_liabilities_statement(platform_id="p1")
    assert (stmt.currency, stmt.snapshot_size, stmt.depth, stmt.total_minor) == (
        CCY,
        tree.snapshot,
        tree.depth,
        tree.total,
    )
    assert stmt.root == tree.statement()["root"]
    assert stmt.statement_text == tree.text()
    vkey = world.p1.get_verifier_key()
    # the statement's own tlog-proof verifies like the one inside a customer's file
    logged, _ = VL.verify_logged(
        {
            "position": stmt.position,
            "record": stmt.record.decode(),
            "tlog_proof": stmt.tlog_proof.decode(),
        },
        "p1",
        [VL._verifiers(vkey)[0]],
    )
    assert logged.total == tree.total
    # a platform fetches its customer's proof; it verifies with custody-verify's code
    proof = world.p1.get_customer_proof("alice", CCY)
    assert proof.snapshot_size == tree.snapshot and proof.position == stmt.position
    balance = world.p1.get_balance_at("alice", at_position=tree.snapshot - 1).posted_minor
    result = VL.verify_customer_proof(proof.proof, vkey, "alice", expected_balance=balance)
    assert result.balance == balance
    with pytest.raises(VL.PolFailure):
        VL.verify_customer_proof(proof.proof, vkey, "bob")
    # bytes as the build wrote them
    assert (
        proof.proof_json
        == (tmp_path / "liabilities" / "p1" / CCY / "proofs" / "alice.json").read_bytes()
    )


def test_customer_proofs_are_private_and_precise(world: World, tmp_path: Path) -> None:
    out = tmp_path / "liabilities" / "p1" / CCY
    tree = _published(world, out)
    for staff in (world.operator, world.auditor, world.regulator, world.checker):
        with pytest.raises(CustodyError) as denied:
            staff.get_customer_proof("alice", CCY, platform_id="p1")
        assert (denied.value.code, denied.value.reason) == (
            SC.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    with pytest.raises(CustodyError) as other:
        world.p2.get_customer_proof("alice", CCY, platform_id="p1")
    assert other.value.reason == "PLATFORM_MISMATCH"
    with pytest.raises(CustodyError) as not_p2s:
        world.p2.get_customer_proof("alice", CCY)
    assert not_p2s.value.code is SC.NOT_FOUND  # p2 has no such account / statement
    (out / "proofs" / "bob.json").unlink()
    with pytest.raises(CustodyError) as missing:
        world.p1.get_customer_proof("bob", CCY)
    assert (missing.value.code, missing.value.reason) == (
        SC.NOT_FOUND,
        "LIABILITIES_PROOF_NOT_FOUND",
    )
    salt = json.loads((out / "proofs" / "alice.json").read_bytes())["salt"]
    assert salt not in missing.value.message
    with pytest.raises(CustodyError) as traversal:
        world.p1.get_customer_proof("../alice", CCY)
    assert traversal.value.code is SC.INVALID_ARGUMENT
    with pytest.raises(CustodyError) as no_statement:
        world.p1.get_customer_proof("alice", CCY, snapshot_size=tree.snapshot + 1)
    assert no_statement.value.reason == "LIABILITIES_NOT_PUBLISHED"
    # a file from another snapshot is not served for this one
    world.p1.transfer("after", "alice", "bob", 1, CCY)
    newer = publish(world.service, "p1", CCY, "operator:dev", min_depth=3)[0]
    with pytest.raises(CustodyError) as stale:
        world.p1.get_customer_proof("alice", CCY)  # latest = newer; files are the old build's
    assert stale.value.reason == "LIABILITIES_PROOF_NOT_FOUND"
    old = world.p1.get_customer_proof("alice", CCY, snapshot_size=tree.snapshot)
    assert old.snapshot_size == tree.snapshot != newer.snapshot

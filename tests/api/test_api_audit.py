"""AuditService end to end: what the API hands out verifies offline with custody-verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from api_helpers import CCY, World

from custody_verify.merkle import verify_consistency
from custody_verify.note import parse_vkey
from ledger.api.client import CustodyError


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody_verify", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_proofs_from_the_api_verify_offline(world: World, tmp_path: Path) -> None:
    p1 = world.p1
    for i in range(20):
        p1.transfer(f"a-t{i}", "alice", "bob", 10, CCY)
    vkey = p1.get_verifier_key()
    assert parse_vkey(vkey)  # a well-formed C2SP vkey
    first = p1.sign_checkpoint()
    assert first.size > 20 and len(first.root) == 32
    assert p1.get_checkpoint().note == first.note

    proof = p1.get_inclusion_proof(first.size - 1)
    (tmp_path / "r.tlog-proof").write_bytes(proof.tlog_proof)
    (tmp_path / "r.json").write_bytes(proof.record)
    ok = _verify(
        "inclusion",
        str(tmp_path / "r.tlog-proof"),
        "--vkey",
        vkey,
        "--leaf",
        str(tmp_path / "r.json"),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "r.json").write_bytes(
        proof.record.replace(b'"amount_minor":10', b'"amount_minor":99')
    )
    assert (
        _verify(
            "inclusion",
            str(tmp_path / "r.tlog-proof"),
            "--vkey",
            vkey,
            "--leaf",
            str(tmp_path / "r.json"),
        ).returncode
        == 1
    )

    p1.transfer("a-after", "alice", "bob", 1, CCY)
    second = p1.sign_checkpoint()
    hashes = p1.get_consistency_proof(first.size, second.size)
    assert verify_consistency(first.size, second.size, first.root, second.root, hashes)
    assert p1.get_checkpoint(first.size).note == first.note

    bundle = tmp_path / "p1.bundle"
    with bundle.open("wb") as f:
        assert p1.export_bundle(f) > 0
    checked = _verify("bundle", str(bundle), "--vkey", vkey)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_audit_errors_are_precise(world: World) -> None:
    p1 = world.p1
    with pytest.raises(CustodyError) as missing:
        p1.get_checkpoint(size=999_999)
    assert missing.value.reason == "CHECKPOINT_NOT_FOUND"
    cp = p1.sign_checkpoint()
    with pytest.raises(CustodyError) as outside:
        p1.get_inclusion_proof(cp.size + 5)
    assert outside.value.reason == "PROOF_OUT_OF_RANGE"
    with pytest.raises(CustodyError) as negative:
        p1.get_consistency_proof(-1, cp.size)
    assert negative.value.reason == "INVALID_ARGUMENT"


def test_a_platform_cannot_audit_another(world: World) -> None:
    with pytest.raises(CustodyError) as denied:
        world.p1.get_verifier_key(platform_id="p2")
    assert denied.value.reason == "PLATFORM_MISMATCH"

"""Checkpoints and proofs served by the running ledger verify with the offline verifier."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from custody_verify.merkle import verify_consistency
from ledger import commands as c
from ledger.checkpoint import InconsistentCheckpoint, tlog_proof
from ledger.config import Config
from ledger.service import LedgerService


def _deposits(prefix: str, n: int) -> list[c.Command]:
    return [
        c.Deposit(
            client_id=f"{prefix}{i}",
            mirror_account_id="om",
            account_id="a",
            amount_minor=3,
            currency="CNY",
        )
        for i in range(n)
    ]


@pytest.fixture
def service(config: Config) -> Any:
    svc = LedgerService(config)
    svc.start()
    assert svc.create_platform("p1", "P", "operator:test").ok
    setup: list[c.Command] = [
        c.OpenAccount(client_id="o-om", account_id="om", kind="omnibus", currency="CNY"),
        c.OpenAccount(
            client_id="o-a", account_id="a", kind="customer", currency="CNY", role="lender"
        ),
    ]
    assert all(o.ok for o in svc.execute("p1", setup + _deposits("d", 297), "platform:p1"))
    yield svc
    svc.close()


def test_inclusion_proof_round_trip_through_the_offline_verifier(
    service: LedgerService, tmp_path: Path
) -> None:
    cp = service.sign_checkpoint("p1")
    assert cp.size == 300
    proof_file, leaf_file = tmp_path / "r.tlog-proof", tmp_path / "leaf"
    for index in (0, 1, 150, 299):
        checkpoint, path, leaf = service.inclusion_proof("p1", index)
        proof_file.write_bytes(tlog_proof(index, path, checkpoint.note))
        leaf_file.write_bytes(leaf)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "custody_verify",
                "inclusion",
                str(proof_file),
                "--vkey",
                service.vkey("p1"),
                "--leaf",
                str(leaf_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    leaf_file.write_bytes(leaf.replace(b'"amount_minor":3', b'"amount_minor":4'))
    forged = subprocess.run(
        [
            sys.executable,
            "-m",
            "custody_verify",
            "inclusion",
            str(proof_file),
            "--vkey",
            service.vkey("p1"),
            "--leaf",
            str(leaf_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert forged.returncode == 1


def test_consistency_between_checkpoints_and_across_restart(
    service: LedgerService, config: Config
) -> None:
    first = service.sign_checkpoint("p1")
    assert all(o.ok for o in service.execute("p1", _deposits("e", 77), "platform:p1"))
    second = service.sign_checkpoint("p1")
    assert second.size == first.size + 77
    proof = service.consistency_proof("p1", first.size, second.size)
    assert verify_consistency(first.size, second.size, first.root, second.root, proof)
    service.close()
    reopened = LedgerService(config)
    reopened.start()
    try:
        assert reopened.checkpoint("p1") == second  # every checkpoint is kept
        assert reopened.checkpoint("p1", first.size) == first
        assert reopened.sign_checkpoint("p1") == second  # nothing new: same note, no re-sign
        again = reopened.consistency_proof("p1", first.size, second.size)
        assert [base64.b64encode(h) for h in again] == [base64.b64encode(h) for h in proof]
    finally:
        reopened.close()


def test_a_checkpoint_log_never_signs_a_forked_history(service: LedgerService) -> None:
    cp = service.sign_checkpoint("p1")
    checkpoints = service._platform("p1").checkpoints
    with pytest.raises(InconsistentCheckpoint):
        checkpoints.sign(cp.size, b"\x00" * 32)  # another root at a signed size
    with pytest.raises(InconsistentCheckpoint):
        checkpoints.sign(cp.size - 1, b"\x01" * 32)  # going back


def test_a_torn_last_checkpoint_line_does_not_stop_the_ledger(
    service: LedgerService, config: Config
) -> None:
    cp = service.sign_checkpoint("p1")
    notes = config.data_dir / "checkpoints" / "p1" / "notes.log"
    with notes.open("a") as f:
        f.write("999 AAAA")  # a crash in the middle of the next append
    service.close()
    reopened = LedgerService(config)
    reopened.start()
    try:
        assert reopened.checkpoint("p1") == cp
        assert all(o.ok for o in reopened.execute("p1", _deposits("g", 5), "platform:p1"))
        later = reopened.sign_checkpoint("p1")  # the next note lands on a line of its own
        assert [c.size for c in reopened._platform("p1").checkpoints.history()] == [
            cp.size,
            later.size,
        ]
    finally:
        reopened.close()

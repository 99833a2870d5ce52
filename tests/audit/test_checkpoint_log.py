"""The writer never signs two inconsistent checkpoints, and remembers what it signed."""

from __future__ import annotations

import base64
import json

import pytest

from custody_verify import note as vn
from ledger.checkpoint import (
    CheckpointLog,
    InconsistentCheckpoint,
    NoteSigner,
    generate_key,
    origin_for,
    tree_consistency,
)
from ledger.merkle import MerkleLog


def _tree(n, tag=b"r"):
    leaves = [tag + b"%d" % i for i in range(n)]
    return MerkleLog.build(leaves, lambda a, b: leaves[a:b], chunk_level=3)


@pytest.fixture
def signer(tmp_path):
    return NoteSigner(generate_key(tmp_path / "k.pem"), origin_for("L", "p1"))


def test_signs_consistent_extensions_only(tmp_path, signer):
    tree = _tree(100)
    log = CheckpointLog(tmp_path / "cp", signer, tree_consistency(tree))
    verifier = vn.parse_vkey(signer.vkey)
    n10 = log.sign(10, tree.root(10))
    assert vn.open_checkpoint(n10, [verifier]).size == 10
    assert log.sign(10, tree.root(10)) == n10  # re-signing the same checkpoint is a no-op
    log.sign(57, tree.root(57))
    with pytest.raises(InconsistentCheckpoint):
        log.sign(40, tree.root(40))  # going back
    with pytest.raises(InconsistentCheckpoint):
        log.sign(57, tree.root(56))  # another root at the signed size
    forked = _tree(100, b"x")
    with pytest.raises(InconsistentCheckpoint):
        log.sign(80, forked.root(80))  # a root the tree does not have
    fork_log = CheckpointLog(tmp_path / "cp", signer, tree_consistency(forked))
    with pytest.raises(InconsistentCheckpoint):
        fork_log.sign(90, forked.root(90))  # consistent with itself, not with what was signed
    log.sign(100, tree.root(100))
    assert [cp.size for cp in log.history()] == [10, 57, 100]


def test_persisted_across_restarts_and_crash_between_files(tmp_path, signer):
    tree = _tree(64)
    log = CheckpointLog(tmp_path / "cp", signer, tree_consistency(tree))
    log.sign(20, tree.root(20))
    again = CheckpointLog(tmp_path / "cp", signer, tree_consistency(tree))
    assert again.last.size == 20
    with pytest.raises(InconsistentCheckpoint):
        again.sign(19, tree.root(19))
    # simulate a crash after notes.log was appended but before last.json was replaced
    note = again.sign(30, tree.root(30))
    (tmp_path / "cp" / "last.json").write_text(
        json.dumps(
            {
                "origin": signer.name,
                "size": 20,
                "root": base64.b64encode(tree.root(20)).decode(),
                "note": base64.b64encode(log.last.note).decode(),
            }
        )
    )
    recovered = CheckpointLog(tmp_path / "cp", signer, tree_consistency(tree))
    assert recovered.last.size == 30 and recovered.last.note == note
    assert recovered.at_size(20) is not None


def test_origin_names_ledger_and_platform(signer):
    assert signer.name == "custody-ledger.example/L/p1"
    with pytest.raises(ValueError):
        origin_for("a b", "p1")


def test_first_checkpoint_must_match_the_tree(tmp_path, signer):
    tree = _tree(30)
    log = CheckpointLog(tmp_path / "cp", signer, tree_consistency(tree))
    with pytest.raises(InconsistentCheckpoint):
        log.sign(30, tree.root(29))
    assert log.last is None
    log.sign(30, tree.root(30))

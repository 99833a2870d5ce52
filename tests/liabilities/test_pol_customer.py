"""A customer's proof verifies; every kind of tampering fails with a named check."""

from __future__ import annotations

import base64
import copy
import json
import stat
from collections.abc import Callable
from typing import Any

import pytest
from pol_helpers import CUSTOMERS, MIN_DEPTH, Published, expected_balances

from custody_verify.liabilities import PolFailure, verify_customer_proof
from custody_verify.note import parse_vkey
from custody_verify.proof import verify_tlog_proof
from ledger.checkpoint import NoteSigner, generate_key
from ledger.service import LedgerService
from projections import liabilities as pol

Proof = dict[str, Any]


def test_every_customer_proof_verifies(service: LedgerService, honest: Published) -> None:
    balances = expected_balances(service, "p1")
    assert balances == {"alice": 96_766, "bob": 26_234, "carol": 2_007, "dave": 0}
    assert honest.tree.total == sum(balances.values())
    assert honest.tree.depth == MIN_DEPTH
    for account in CUSTOMERS:
        result = verify_customer_proof(
            honest.proof(account), honest.vkey, account, balances[account]
        )
        assert result.balance == balances[account]
        assert result.statement.total == sum(balances.values())
        assert result.statement.position == honest.log.position
        assert result.checkpoint_size > honest.log.position


def test_zero_balance_customer_gets_a_proof(honest: Published) -> None:
    proof = honest.proof("dave")
    assert proof["balance"] == 0
    assert verify_customer_proof(proof, honest.vkey, "dave", 0).balance == 0


def test_files_are_private(honest: Published) -> None:
    files = [honest.out / "auditor.jsonl", *(honest.out / "proofs").iterdir()]
    assert len(files) == 1 + len(CUSTOMERS)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((honest.out / "proofs").stat().st_mode) == 0o700


def test_published_record_is_covered_by_a_checkpoint(honest: Published) -> None:
    proof = honest.proof("alice")
    log = proof["log"]
    record = log["record"].encode()
    _, cp = verify_tlog_proof(log["tlog_proof"].encode(), record, [parse_vkey(honest.vkey)])
    assert cp.size > log["position"]
    rec = json.loads(record)
    assert rec["kind"] == "liabilities_published"
    assert rec["actor"].startswith("operator:")
    assert rec["liabilities"] == honest.tree.statement()
    assert rec["liabilities"]["snapshot"] <= rec["seq"] == log["position"]


def test_padding_leaves_look_like_zero_balance_leaves(honest: Published) -> None:
    """Siblings a customer sees are (32-byte hash, sum) whatever is behind them; a padding leaf
    and a zero-balance customer's leaf differ only in who holds the tag's preimage."""
    leaves = honest.tree.leaves
    padding = [leaf for leaf in leaves if leaf.account is None]
    dave = leaves[honest.tree.index_of["dave"]]
    assert len(padding) == 2**MIN_DEPTH - len(CUSTOMERS)
    for leaf in [*padding, dave]:
        assert (len(leaf.hash), leaf.sum, len(leaf.tag)) == (32, 0, 32)
        assert leaf.hash == pol.leaf_hash(leaf.tag, 0)
    assert len({leaf.hash for leaf in leaves}) == len(leaves)
    lines = (honest.out / "auditor.jsonl").read_text().splitlines()[1:]
    shapes = {tuple(type(x).__name__ for x in json.loads(line)[:4]) for line in lines}
    assert shapes == {("str", "int", "str", "int")}
    for account in CUSTOMERS:
        for h, s in honest.proof(account)["siblings"]:
            assert len(base64.b64decode(h)) == 32 and type(s) is int and s >= 0


def _set(path: list[Any], value: Any) -> Callable[[Proof], None]:
    def change(proof: Proof) -> None:
        target = proof
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return change


def _flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _edit_record(field: str, value: Any) -> Callable[[Proof], None]:
    def change(proof: Proof) -> None:
        rec = json.loads(proof["log"]["record"])
        rec["liabilities"][field] = value
        proof["log"]["record"] = json.dumps(rec, sort_keys=True, separators=(",", ":"))

    return change


def _edit_tlog(proof: Proof) -> None:
    lines = proof["log"]["tlog_proof"].split("\n")
    lines[2] = _flip_b64(lines[2])  # the first hash of the inclusion path
    proof["log"]["tlog_proof"] = "\n".join(lines)


TAMPERING: dict[str, tuple[Callable[[Proof], None], str]] = {
    "balance": (_set(["balance"], lambda b: b + 1), "root"),
    "salt": (_set(["salt"], _flip_b64), "root"),
    "sibling hash": (_set(["siblings", 1, 0], _flip_b64), "root"),
    "sibling sum": (_set(["siblings", 1, 1], lambda s: s + 1), "root"),
    "leaf sibling sum at 2^64": (_set(["siblings", 0, 1], 2**64), "range"),
    "sum overflowing 2^128": (_set(["siblings", 2, 1], 2**128 - 1), "range"),
    "negative sibling sum": (_set(["siblings", 1, 1], -1), "range"),
    "index": (_set(["leaf_index"], lambda i: i ^ 1), "root"),
    "index out of range": (_set(["leaf_index"], 2**MIN_DEPTH), "depth"),
    "one sibling short": (_set(["siblings"], lambda s: s[:-1]), "depth"),
    "statement root": (_set(["statement", "root"], _flip_b64), "statement"),
    "statement total": (_set(["statement", "total"], lambda t: t - 1), "statement"),
    "logged record's root": (_edit_record("root", "A" * 43 + "="), "log"),
    "logged record's total": (_edit_record("total", 1), "log"),
    "inclusion path": (_edit_tlog, "log"),
    "position": (_set(["log", "position"], lambda p: p - 1), "log"),
    "not published": (_set(["log"], None), "log"),
    "snapshot": (_set(["snapshot"], lambda n: n - 1), "statement"),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampered_proof_fails_with_named_check(honest: Published, name: str) -> None:
    change, check = TAMPERING[name]
    proof = copy.deepcopy(honest.proof("bob"))
    change(proof)
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(proof, honest.vkey, "bob")
    assert info.value.check == check, info.value
    assert proof["salt"] not in str(info.value)  # never a salt in a message


def test_expected_balance_mismatch_is_named(honest: Published) -> None:
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(honest.proof("bob"), honest.vkey, "bob", expected_balance=26_235)
    assert info.value.check == "balance"


def test_another_customers_proof_fails(honest: Published) -> None:
    """Alice cannot pass Bob's leaf off as hers: the file names Bob, and rewriting the name
    changes the tag, so the path no longer reaches the root."""
    bobs = honest.proof("bob")
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(bobs, honest.vkey, "alice")
    assert info.value.check == "account"
    bobs["account"] = "alice"
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(bobs, honest.vkey, "alice")
    assert info.value.check == "root"


def test_checkpoint_by_another_key_fails(honest: Published, tmp_path: Any) -> None:
    other = NoteSigner(generate_key(tmp_path / "other.pem"), "custody-ledger.example/x/p1")
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(honest.proof("alice"), other.vkey, "alice")
    assert info.value.check == "checkpoint"

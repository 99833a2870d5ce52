"""The auditor's full check, dishonest trees, and the bundle replay of liabilities_published."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import OPERATOR, make_platform
from pol_helpers import (
    MIN_DEPTH,
    Published,
    expected_balances,
    history,
    mod_tree,
    publish_statement,
    publish_tree,
    rewrite_bundle,
    signer_for,
)

from custody_verify.bundle import VerificationFailed, verify_bundle
from custody_verify.liabilities import PolFailure, verify_customer_proof, verify_full
from custody_verify.note import parse_vkey
from ledger import commands as c
from ledger.service import LedgerService
from projections import liabilities as pol


def _snapshot(service: LedgerService, platform_id: str) -> int:
    return service.head(platform_id)[0]


def _failure(pub: Published) -> PolFailure:
    with pytest.raises(PolFailure) as info:
        verify_full(pub.out / "auditor.jsonl", pub.bundle, pub.vkey)
    return info.value


def test_auditor_passes_on_an_honest_tree(service: LedgerService, honest: Published) -> None:
    result = verify_full(honest.out / "auditor.jsonl", honest.bundle, honest.vkey)
    balances = expected_balances(service, "p1")
    assert result.customers == len(balances)
    assert result.total == sum(balances.values()) == honest.tree.total
    assert result.leaves == 2**MIN_DEPTH
    assert result.log_position == honest.log.position


def test_omitted_customer_is_caught(service: LedgerService, tmp_path: Path) -> None:
    p = history(service)
    balances = expected_balances(service, p.id)
    del balances["bob"]
    tree = pol.build_tree(p.id, _snapshot(service, p.id), "CNY", balances, MIN_DEPTH)
    pub = publish_tree(service, p, tree, tmp_path)
    failure = _failure(pub)
    assert failure.check == "customers" and "'bob'" in failure.reason
    # the customers left in the tree still verify: only bob (if he checks) or the auditor notice
    assert verify_customer_proof(pub.proof("alice"), pub.vkey, "alice").balance > 0
    assert not (pub.out / "proofs" / "bob.json").exists()


def test_understated_balance_is_caught(service: LedgerService, tmp_path: Path) -> None:
    p = history(service)
    balances = expected_balances(service, p.id)
    balances["bob"] -= 1_000
    tree = pol.build_tree(p.id, _snapshot(service, p.id), "CNY", balances, MIN_DEPTH)
    pub = publish_tree(service, p, tree, tmp_path)
    failure = _failure(pub)
    assert failure.check == "balance" and "'bob'" in failure.reason
    # bob himself sees it when he compares with his own statement
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(pub.proof("bob"), pub.vkey, "bob", expected_balance=26_234)
    assert info.value.check == "balance"


def _negative_trick(service: LedgerService, tmp_path: Path) -> Published:
    """A fake account whose "negative" balance (-5000 wrapped modulo 2^128) hides 5000 of
    liabilities; every sum is computed modulo 2^128 by the dishonest builder."""
    p = history(service)
    snapshot = _snapshot(service, p.id)
    honest = pol.build_tree(p.id, snapshot, "CNY", expected_balances(service, p.id), MIN_DEPTH)
    leaves = list(honest.leaves)
    # the fake leaf goes right beside alice's (a padding leaf moves to make room)
    slot = honest.index_of["alice"] ^ 1
    spare = next(i for i, leaf in enumerate(leaves) if leaf.account is None)
    leaves[slot], leaves[spare] = leaves[spare], leaves[slot]
    salt = bytes(32)
    tag = pol.tag_for(snapshot, "CNY", "zz-fake", salt)
    wrapped = pol.MAX_SUM - 5_000
    leaves[slot] = pol.Leaf(pol.leaf_hash(tag, wrapped), wrapped, tag, "zz-fake", salt)
    tree = mod_tree(p.id, snapshot, "CNY", leaves)
    assert tree.total == honest.total - 5_000
    return publish_tree(service, p, tree, tmp_path)


def test_negative_sum_trick_is_caught(service: LedgerService, tmp_path: Path) -> None:
    pub = _negative_trick(service, tmp_path)
    failure = _failure(pub)
    assert failure.check == "range"
    # the customer beside the fake leaf sees an out-of-range leaf sum on the first level
    assert pub.tree.index_of["zz-fake"] == pub.tree.index_of["alice"] ^ 1
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(pub.proof("alice"), pub.vkey, "alice")
    assert info.value.check == "range"


def test_negative_balance_written_as_such_is_caught(service: LedgerService, tmp_path: Path) -> None:
    pub = _negative_trick(service, tmp_path)
    path = pub.out / "auditor.jsonl"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines[1:], start=1):
        item = json.loads(line)
        if item[4] == "zz-fake":
            item[1] = item[3] = -5_000
            lines[i] = json.dumps(item, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    failure = _failure(pub)
    assert failure.check == "range" and "-5000" in failure.reason


def test_total_mismatch_is_caught(service: LedgerService, tmp_path: Path) -> None:
    p = history(service)
    tree = pol.build_tree(
        p.id, _snapshot(service, p.id), "CNY", expected_balances(service, p.id), MIN_DEPTH
    )
    stmt = {**tree.statement(), "total": tree.total - 1}
    pub = publish_statement(service, p, tree, stmt, tmp_path)
    assert _failure(pub).check == "total"
    with pytest.raises(PolFailure) as info:
        verify_customer_proof(pub.proof("alice"), pub.vkey, "alice")
    assert info.value.check == "total"


def test_auditor_file_tampering(honest: Published) -> None:
    path = honest.out / "auditor.jsonl"
    original = path.read_text()

    def tampered(change: Callable[[Any], None], line: int) -> PolFailure:
        lines = original.splitlines()
        item = json.loads(lines[line])
        change(item)
        lines[line] = json.dumps(item, separators=(",", ":"))
        path.write_text("\n".join(lines) + "\n")
        return _failure(honest)

    real = next(i for i, ln in enumerate(original.splitlines()[1:], 1) if json.loads(ln)[4])
    assert (
        tampered(lambda it: it.__setitem__(5, base64.b64encode(bytes(32)).decode()), real).check
        == "tag"
    )
    assert tampered(lambda it: it.__setitem__(1, it[1] + 1), real).check == "leaf"
    assert tampered(lambda it: it.__setitem__("total", it["total"] + 1), 0).check == "statement"
    lines = original.splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    assert _failure(honest).check == "depth"
    path.write_text(original)
    assert verify_full(path, honest.bundle, honest.vkey).customers == 4


# -- the bundle replay of liabilities_published -------------------------------------------------


def _canonical(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _publication_edit(
    edit: Callable[[dict[str, Any]], None],
) -> Callable[[list[bytes]], list[bytes]]:
    def change(records: list[bytes]) -> list[bytes]:
        out = []
        for data in records:
            rec = json.loads(data)
            if rec["kind"] == "liabilities_published":
                edit(rec)
                data = _canonical(rec)
            out.append(data)
        return out

    return change


def _both(field: str, cmd_field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(rec: dict[str, Any]) -> None:
        rec["liabilities"][field] = value
        rec["cmd"][cmd_field] = value

    return edit


BUNDLE_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "platform actor": (lambda r: r.__setitem__("actor", "platform:test"), "may not"),
    "snapshot after itself": (_both("snapshot", "snapshot_size", 10**6), "snapshot"),
    "unknown currency": (_both("asset", "currency", "USD"), "asset"),
    "short root": (_both("root", "root", "A" * 42 + "=="), "root"),
    "non-canonical root": (_both("root", "root", "A" * 42 + "B="), "root"),
    "depth 0": (_both("depth", "depth", 0), "depth"),
    "negative total": (_both("total", "total_minor", -1), "total"),
    "extra field": (lambda r: r["liabilities"].__setitem__("zz", 1), "liabilities must be"),
    "differs from its instruction": (
        lambda r: r["liabilities"].__setitem__("total", r["liabilities"]["total"] + 1),
        "instruction",
    ),
}


def test_bundle_with_a_publication_verifies(honest: Published) -> None:
    with open(honest.bundle, "rb") as f:
        summary = verify_bundle(f, [parse_vkey(honest.vkey)])
    assert summary.kinds["liabilities_published"] == 1


@pytest.mark.parametrize("name", sorted(BUNDLE_EDITS))
def test_bundle_rejects_a_malformed_publication(
    service: LedgerService, honest: Published, name: str
) -> None:
    edit, words = BUNDLE_EDITS[name]
    data = rewrite_bundle(
        honest.bundle.read_bytes(), signer_for(service, "p1"), _publication_edit(edit)
    )
    with pytest.raises(VerificationFailed) as info:
        verify_bundle(io.BytesIO(data), [parse_vkey(honest.vkey)])
    failure = info.value.failure
    assert failure.where == "record" and failure.position == honest.log.position
    assert words in failure.reason, failure.reason


def test_rewritten_but_unchanged_bundle_still_verifies(
    service: LedgerService, honest: Published
) -> None:
    """The rewriting helper itself changes nothing but what the edit changes."""
    data = rewrite_bundle(honest.bundle.read_bytes(), signer_for(service, "p1"), lambda r: r)
    summary = verify_bundle(io.BytesIO(data), [parse_vkey(honest.vkey)])
    assert summary.records == honest.log.position + 1


def test_ledger_refuses_publication_by_platform_or_into_the_future(
    service: LedgerService,
) -> None:
    p = make_platform(service)
    size = _snapshot(service, p.id)
    cmd = c.PublishLiabilities(
        client_id="pol-1",
        snapshot_size=size + 5,
        currency="CNY",
        depth=16,
        root=base64.b64encode(bytes(32)).decode(),
        total_minor=0,
    )
    [future] = service.execute(p.id, [cmd], OPERATOR)
    assert future.status == "refused"
    [by_platform] = service.execute(
        p.id, [c.PublishLiabilities(**{**_fields(cmd), "snapshot_size": size})], "platform:test"
    )
    assert by_platform.status == "refused" and by_platform.code == "ROLE_NOT_PERMITTED"


def _fields(cmd: c.PublishLiabilities) -> dict[str, Any]:
    return {f: getattr(cmd, f) for f in cmd.__struct_fields__}

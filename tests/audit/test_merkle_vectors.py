"""Every case of shared/vectors/merkle-rfc6962.json, for the auditor's verifier AND the writer's
tree, read directly from the vector file; plus an exhaustive cross-check for sizes 1..64."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from custody_verify import merkle as vm
from ledger import merkle as wm

VECTORS = Path("/work/shared/vectors/merkle-rfc6962.json")
V = json.loads(VECTORS.read_text())
LEAVES = [bytes.fromhex(x) for x in V["leaves_hex"]]
H = bytes.fromhex


def _leaves_fetch(leaves):
    return lambda a, b: leaves[a:b]


def _writer_tree(leaves, chunk_level=1):
    # a small chunk level exercises the fetch/recompute path on tiny trees
    return wm.MerkleLog.build(leaves, _leaves_fetch(leaves), chunk_level=chunk_level)


# -- hashers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V["hasher_vectors"], ids=lambda c: c["desc"][:40])
@pytest.mark.parametrize("impl", [vm, wm], ids=["verifier", "writer"])
def test_hasher_vectors(case, impl):
    want = H(case["hash_hex"])
    if case["kind"] == "empty_root":
        assert want == impl.EMPTY_ROOT
        assert hashlib.sha256(H(case["input_hex"])).digest() == want
    elif case["kind"] == "leaf":
        assert impl.leaf_hash(H(case["input_hex"])) == want
    else:
        assert impl.node_hash(H(case["left_hex"]), H(case["right_hex"])) == want


def test_empty_root_is_not_leaf_of_empty():
    assert vm.leaf_hash(b"") != vm.EMPTY_ROOT
    assert wm.MerkleLog().root() == vm.EMPTY_ROOT


# -- roots and node hashes ----------------------------------------------------------------------


@pytest.mark.parametrize("case", V["roots"], ids=lambda c: f"size{c['size']}")
def test_roots(case):
    n, want = case["size"], H(case["root_hex"])
    assert vm.root_from_leaves(LEAVES[:n]) == want
    for level in (1, 2, 3):
        assert _writer_tree(LEAVES[:n], level).root() == want
    full = _writer_tree(LEAVES, 1)
    assert full.root(n) == want  # historical root from the full tree


@pytest.mark.parametrize("case", V["node_hashes"], ids=lambda c: f"l{c['level']}i{c['index']}")
def test_node_hashes(case):
    lvl, idx, want = case["level"], case["index"], H(case["hash_hex"])
    a, b = idx << lvl, (idx + 1) << lvl
    assert vm.root_from_leaves(LEAVES[a:b]) == want
    tree = _writer_tree(LEAVES, 1)
    assert tree._mth(a, b) == want


# -- proofs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V["inclusion_proofs"], ids=lambda c: f"{c['index']}of{c['size']}")
def test_inclusion_proofs(case):
    i, n = case["index"], case["size"]
    path = [H(x) for x in case["path_hex"]]
    leaf = vm.leaf_hash(H(case["leaf_hex"]))
    assert leaf == H(case["leaf_hash_hex"])
    root = H(case["root_hex"])
    assert vm.verify_inclusion(i, n, leaf, path, root)
    assert wm.verify_inclusion(i, n, leaf, path, root)
    for level in (1, 2, 8):
        assert _writer_tree(LEAVES, level).inclusion_proof(i, n) == path


@pytest.mark.parametrize(
    "case", V["consistency_proofs"], ids=lambda c: f"{c['size1']}to{c['size2']}"
)
def test_consistency_proofs(case):
    m, n = case["size1"], case["size2"]
    path = [H(x) for x in case["path_hex"]]
    r1, r2 = H(case["root1_hex"]), H(case["root2_hex"])
    assert vm.verify_consistency(m, n, r1, r2, path)
    assert wm.verify_consistency(m, n, r1, r2, path)
    for level in (1, 2, 8):
        tree = _writer_tree(LEAVES, level)
        assert tree.consistency_proof(m, n) == path
        assert tree.root(m) == r1 and tree.root(n) == r2


def _label_hashes():
    ex = V["rfc9162_example"]
    out = {}
    for name, spec in ex["labels"].items():
        if spec[0] == "leaf":
            out[name] = vm.leaf_hash(LEAVES[spec[1]])
    for name, spec in ex["labels"].items():
        if spec[0] == "node":
            out[name] = vm.node_hash(out[spec[1]], out[spec[2]])
    return out


def test_rfc9162_example():
    ex = V["rfc9162_example"]
    labels = _label_hashes()
    seven = LEAVES[:7]
    tree = _writer_tree(seven, 1)
    root7 = vm.root_from_leaves(seven)
    for case in ex["inclusion"]:
        path = [labels[x] for x in case["path"]]
        assert tree.inclusion_proof(case["index"], case["size"]) == path
        leaf = vm.leaf_hash(seven[case["index"]])
        assert vm.verify_inclusion(case["index"], 7, leaf, path, root7)
        assert wm.verify_inclusion(case["index"], 7, leaf, path, root7)
    for case in ex["consistency"]:
        path = [labels[x] for x in case["path"]]
        assert tree.consistency_proof(case["size1"], case["size2"]) == path
        r1 = vm.root_from_leaves(seven[: case["size1"]])
        assert vm.verify_consistency(case["size1"], 7, r1, root7, path)
        assert wm.verify_consistency(case["size1"], 7, r1, root7, path)


# -- the 196 upstream accept/reject probes ------------------------------------------------------


def _hexes(xs):
    return [H(x) for x in xs]


@pytest.mark.parametrize(
    "probe", V["probes"]["inclusion"], ids=lambda p: p["file"].removeprefix("testdata/")
)
def test_inclusion_probes(probe):
    args = (
        probe["index"],
        probe["size"],
        H(probe["leaf_hash_hex"]),
        _hexes(probe["path_hex"]),
        H(probe["root_hex"]),
    )
    assert vm.verify_inclusion(*args) is probe["want_ok"]
    assert wm.verify_inclusion(*args) is probe["want_ok"]


@pytest.mark.parametrize(
    "probe", V["probes"]["consistency"], ids=lambda p: p["file"].removeprefix("testdata/")
)
def test_consistency_probes(probe):
    args = (
        probe["size1"],
        probe["size2"],
        H(probe["root1_hex"]),
        H(probe["root2_hex"]),
        _hexes(probe["path_hex"]),
    )
    assert vm.verify_consistency(*args) is probe["want_ok"]
    assert wm.verify_consistency(*args) is probe["want_ok"]


def test_probe_counts():
    assert len(V["probes"]["inclusion"]) + len(V["probes"]["consistency"]) == 196
    oks = [p["want_ok"] for k in ("inclusion", "consistency") for p in V["probes"][k]]
    assert oks.count(True) == 12


# -- exhaustive: sizes 1..64, writer proofs against the auditor's verifier ----------------------


def _flip(h: bytes, bit: int = 0) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


def test_exhaustive_sizes_1_to_64():
    leaves = [b"leaf %d" % i for i in range(64)]
    tree = wm.MerkleLog.build(leaves, _leaves_fetch(leaves), chunk_level=2)
    roots = [vm.root_from_leaves(leaves[:n]) for n in range(65)]
    lhs = [vm.leaf_hash(x) for x in leaves]
    for n in range(1, 65):
        assert tree.root(n) == roots[n]
        for i in range(n):
            path = tree.inclusion_proof(i, n)
            assert vm.verify_inclusion(i, n, lhs[i], path, roots[n])
            assert wm.verify_inclusion(i, n, lhs[i], path, roots[n])
            assert not vm.verify_inclusion(i, n, _flip(lhs[i]), path, roots[n])
            for j in range(len(path)):
                bad = [*path[:j], _flip(path[j], j % 8), *path[j + 1 :]]
                assert not vm.verify_inclusion(i, n, lhs[i], bad, roots[n])
                assert not wm.verify_inclusion(i, n, lhs[i], bad, roots[n])
            if n > 1:
                assert not vm.verify_inclusion(i, n, lhs[i], path[:-1], roots[n])
            assert not vm.verify_inclusion(i, n, lhs[i], [*path, roots[n]], roots[n])
        for m in range(1, n + 1):
            path = tree.consistency_proof(m, n)
            assert vm.verify_consistency(m, n, roots[m], roots[n], path)
            assert wm.verify_consistency(m, n, roots[m], roots[n], path)
            for j in range(len(path)):
                bad = [*path[:j], _flip(path[j], j % 8), *path[j + 1 :]]
                assert not vm.verify_consistency(m, n, roots[m], roots[n], bad)
                assert not wm.verify_consistency(m, n, roots[m], roots[n], bad)
            if m < n:
                assert not vm.verify_consistency(m, n, _flip(roots[m]), roots[n], path)
                assert not vm.verify_consistency(m, n, roots[m], _flip(roots[n]), path)


def test_snapshot_roundtrip():
    leaves = [b"r%d" % i for i in range(1000)]
    tree = wm.MerkleLog.build(leaves, _leaves_fetch(leaves), chunk_level=4)
    again = wm.MerkleLog.restore(tree.snapshot(), _leaves_fetch(leaves))
    assert again.root() == tree.root() == vm.root_from_leaves(leaves)
    assert again.inclusion_proof(517, 999) == tree.inclusion_proof(517, 999)
    again.append(b"x")
    assert again.root() == vm.root_from_leaves([*leaves, b"x"])


def test_fetch_detects_changed_records():
    leaves = [b"r%d" % i for i in range(64)]
    changed = list(leaves)
    changed[5] = b"forged"
    tree = wm.MerkleLog.build(leaves, _leaves_fetch(changed), chunk_level=3)
    with pytest.raises(wm.TreeCorrupted):
        tree.inclusion_proof(5, 64)

"""custody-pol/v1 vectors derived by hand: every hash below is computed here with hashlib from
the byte layout in docs/LIABILITIES.md, independently of the builder and the verifier, and
pinned as hex so a silent change of either is caught."""

from __future__ import annotations

import hashlib

import pytest

from custody_verify import liabilities as v
from projections import liabilities as pol

SNAPSHOT = 42
ASSET = "CNY"
SALT_A = bytes(range(32))
SALT_B = bytes(range(32, 64))
SALT_C = bytes(range(64, 96))
PAD_1 = b"\xaa" * 32
PAD_2 = b"\xbb" * 32


def sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def tag(account: bytes, salt: bytes) -> bytes:
    # lp(x) = 4-byte big-endian length || x; the snapshot as ASCII decimal "42"
    return sha(
        b"custody-pol/v1 tag",
        b"\x00\x00\x00\x02" + b"42",
        b"\x00\x00\x00\x03" + b"CNY",
        len(account).to_bytes(4, "big") + account,
        salt,
    )


def u128(x: int) -> bytes:
    return x.to_bytes(16, "big")


def leaf(t: bytes, b: int) -> bytes:
    return sha(b"\x10", t, u128(b))


def node(lh: bytes, ls: int, rh: bytes, rs: int) -> bytes:
    return sha(b"\x11", lh, u128(ls), rh, u128(rs))


TWO_LEAF_ROOT = "9daa977178e5a8f3aebfc26af8e4014d11e7b157b859e2dd48fff9ecf1277848"
FOUR_LEAF_ROOT = "36f376b0dac97b8123563b4206742cee3b8935743d639c557bcdb4e4972b29d2"
TAG_ALICE = tag(b"alice", SALT_A)
TAG_BOB = tag(b"bob", SALT_B)
TAG_CAROL = tag(b"carol", SALT_C)


def test_tag_and_leaf_encodings() -> None:
    assert pol.tag_for(SNAPSHOT, ASSET, "alice", SALT_A) == TAG_ALICE
    assert v.tag_for(SNAPSHOT, ASSET, "alice", SALT_A) == TAG_ALICE
    assert pol.leaf_hash(TAG_ALICE, 1234) == leaf(TAG_ALICE, 1234) == v.pol_leaf(TAG_ALICE, 1234)
    assert TAG_ALICE.hex() == "5ff308e02e8f0689eb675e654d30c05a06002eb184101e9b95f5a56c350196e7"
    with pytest.raises(pol.LiabilitiesError):
        pol.u128be(2**128)
    with pytest.raises(pol.LiabilitiesError):
        pol.u128be(-1)


def test_two_leaf_tree() -> None:
    l0 = leaf(TAG_ALICE, 1234)
    l1 = leaf(PAD_1, 0)
    root = node(l0, 1234, l1, 0)
    leaves = [
        pol.Leaf(pol.leaf_hash(TAG_ALICE, 1234), 1234, TAG_ALICE, "alice", SALT_A),
        pol.Leaf(pol.leaf_hash(PAD_1, 0), 0, PAD_1),
    ]
    tree = pol.assemble("p1", SNAPSHOT, ASSET, leaves)
    assert (tree.depth, tree.root, tree.total) == (1, root, 1234)
    assert tree.siblings(0) == [(l1, 0)]
    assert tree.siblings(1) == [(l0, 1234)]
    assert v.climb(l0, 1234, 0, [(l1, 0)]) == (root, 1234)
    assert root.hex() == TWO_LEAF_ROOT


def test_four_leaf_tree() -> None:
    big = 2**64 - 1  # the largest leaf balance
    l0 = leaf(TAG_BOB, 0)
    l1 = leaf(TAG_ALICE, 1234)
    l2 = leaf(PAD_2, 0)
    l3 = leaf(TAG_CAROL, big)
    n01 = node(l0, 0, l1, 1234)
    n23 = node(l2, 0, l3, big)
    root = node(n01, 1234, n23, big)
    total = 1234 + big
    leaves = [
        pol.Leaf(l0, 0, TAG_BOB, "bob", SALT_B),
        pol.Leaf(l1, 1234, TAG_ALICE, "alice", SALT_A),
        pol.Leaf(l2, 0, PAD_2),
        pol.Leaf(l3, big, TAG_CAROL, "carol", SALT_C),
    ]
    tree = pol.assemble("p1", SNAPSHOT, ASSET, leaves)
    assert (tree.depth, tree.root, tree.total) == (2, root, total)
    # carol (index 3 = binary 11): right child at both levels
    assert tree.siblings(3) == [(l2, 0), (n01, 1234)]
    assert v.climb(l3, big, 3, [(l2, 0), (n01, 1234)]) == (root, total)
    # alice (index 1 = binary 01): right child, then left child
    assert tree.siblings(1) == [(l0, 0), (n23, big)]
    assert v.climb(l1, 1234, 1, [(l0, 0), (n23, big)]) == (root, total)
    assert root.hex() == FOUR_LEAF_ROOT
    # the statement a customer finds in the log
    assert tree.text() == (
        f"custody-pol/v1\nsnapshot 42\nasset CNY\ndepth 2\nroot {pol.b64(root)}\ntotal {total}\n"
    )


def test_range_checks_on_the_path() -> None:
    l1 = leaf(TAG_ALICE, 1234)
    with pytest.raises(v.PolFailure, match="sibling leaf"):
        v.climb(l1, 1234, 1, [(leaf(PAD_1, 2**64), 2**64)])
    with pytest.raises(v.PolFailure, match="reaches 2"):
        v.climb(l1, 1234, 1, [(l1, 0), (l1, 2**128 - 1000)])
    with pytest.raises(pol.LiabilitiesError):
        pol.build_tree("p1", 1, ASSET, {"x": -1}, 1)
    with pytest.raises(pol.LiabilitiesError):
        pol.build_tree("p1", 1, ASSET, {"x": 2**64}, 1)


@pytest.mark.parametrize(
    ("accounts", "min_depth", "depth"),
    [
        (0, 16, 16),
        (1, 1, 1),
        (2, 1, 2),
        (3, 1, 3),
        (4, 1, 3),
        (5, 1, 4),
        (3, 16, 16),
        (40_000, 16, 17),
        (2**20, 16, 21),
    ],
)
def test_depth_rule(accounts: int, min_depth: int, depth: int) -> None:
    assert pol.depth_for(accounts, min_depth) == depth
    assert 2**depth >= 2 * accounts


def test_built_tree_is_shuffled_padded_and_salted() -> None:
    balances = {"alice": 5, "bob": 0, "carol": 7}
    a = pol.build_tree("p1", 9, ASSET, balances, 3)
    b = pol.build_tree("p1", 9, ASSET, balances, 3)
    assert len(a.leaves) == 8 and a.total == 12 and a.accounts == 3
    assert a.root != b.root  # fresh salts and padding tags every time
    assert {leaf.salt for leaf in a.leaves if leaf.salt}.isdisjoint(
        {leaf.salt for leaf in b.leaves if leaf.salt}
    )
    orders = {
        tuple(sorted(pol.build_tree("p1", 9, ASSET, balances, 3).index_of.values()))
        for _ in range(20)
    }
    assert len(orders) > 1  # positions differ from build to build
    for account, i in a.index_of.items():
        leaf_ = a.leaves[i]
        assert leaf_.salt is not None
        assert leaf_.tag == pol.tag_for(9, ASSET, account, leaf_.salt)
        assert v.climb(leaf_.hash, leaf_.sum, i, a.siblings(i)) == (a.root, a.total)

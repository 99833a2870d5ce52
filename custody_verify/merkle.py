"""RFC 6962 / RFC 9162 Merkle tree hashing and proof verification (auditor side).

Standard library only. This is deliberately an independent implementation: it shares no code
with the writer's tree (`ledger/merkle.py`), so a bug in one is caught by the other.

    LEAF(d)   = SHA-256(0x00 || d)
    NODE(l,r) = SHA-256(0x01 || l || r)
    MTH([])   = SHA-256("")

Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) step by step,
with the edge-case policy of transparency-dev/merkle for the cases the RFC leaves open, and our
hygiene checks: every hash is exactly 32 bytes, 0 <= index < size < 2^64.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
MAX_SIZE = 2**64
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256
_LEAF = b"\x00"
_NODE = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """LEAF(d): the hash of one entry. Always computed by the verifier, never taken on trust."""
    return _sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """NODE(l, r): the hash of an interior node."""
    return _sha256(_NODE + left + right).digest()


class RootBuilder:
    """Root of a growing list of leaves in O(log n) memory (RFC 9162 §2.1.2 stack algorithm).

    `push(leaf_hash)` appends one leaf; `root()` is the MTH of everything pushed so far and may
    be called at any time (it does not disturb the stack).
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def push(self, lh: bytes) -> None:
        stack = self._stack
        stack.append(lh)
        n = self.size
        # one merge per trailing 1-bit of the index of the leaf just pushed
        while n & 1:
            right = stack.pop()
            stack[-1] = _sha256(_NODE + stack[-1] + right).digest()
            n >>= 1
        self.size += 1

    def push_data(self, data: bytes) -> None:
        self.push(_sha256(_LEAF + data).digest())

    def root(self) -> bytes:
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        r = stack[-1]
        for left in reversed(stack[:-1]):
            r = _sha256(_NODE + left + r).digest()
        return r


def root_from_leaves(leaves: Iterable[bytes]) -> bytes:
    """MTH of the given leaf inputs (raw entry bytes), streaming."""
    builder = RootBuilder()
    for data in leaves:
        builder.push_data(data)
    return builder.root()


def _is_size(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_SIZE


def _is_hash(h: object) -> bool:
    return isinstance(h, (bytes, bytearray)) and len(h) == HASH_SIZE


def inclusion_failure(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> str | None:
    """Why the inclusion proof fails, or None when it verifies (RFC 9162 §2.1.3.2)."""
    if not _is_size(index) or not _is_size(size):
        return "index and size must be integers in [0, 2^64)"
    if index >= size:
        return f"index {index} is not below tree size {size}"
    if not _is_hash(leaf):
        return "leaf hash is not 32 bytes"
    if not _is_hash(root):
        return "root hash is not 32 bytes"
    for i, p in enumerate(path):
        if not _is_hash(p):
            return f"proof element {i} is not 32 bytes"
    fn = index
    sn = size - 1
    r = bytes(leaf)
    for p in path:
        if sn == 0:
            return "proof is longer than the tree is tall"
        if fn & 1 or fn == sn:
            r = _sha256(_NODE + p + r).digest()
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _sha256(_NODE + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return "proof is shorter than the tree is tall"
    if r != root:
        return "computed root does not match"
    return None


def verify_inclusion(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> bool:
    """True iff `path` proves that `leaf` (a LEAF hash) is entry `index` of the tree `root`."""
    return inclusion_failure(index, size, leaf, path, root) is None


def consistency_failure(
    first: int, second: int, first_hash: bytes, second_hash: bytes, path: Sequence[bytes]
) -> str | None:
    """Why the consistency proof fails, or None when it verifies (RFC 9162 §2.1.4.2)."""
    if not _is_size(first) or not _is_size(second):
        return "sizes must be integers in [0, 2^64)"
    if second < first:
        return f"second size {second} is smaller than first size {first}"
    if first == 0:
        return "a consistency proof from the empty tree proves nothing"
    if first == second:
        # transparency-dev policy: equal sizes need an empty proof and equal roots
        if path:
            return "equal sizes need an empty proof"
        if first_hash != second_hash:
            return "equal sizes but different roots"
        return None
    if not _is_hash(first_hash) or not _is_hash(second_hash):
        return "root hashes must be 32 bytes"
    if not path:
        return "empty proof"
    for i, p in enumerate(path):
        if not _is_hash(p):
            return f"proof element {i} is not 32 bytes"
    # step 2: when the old tree is a complete subtree its root was left out of the proof
    nodes = list(path)
    if first & (first - 1) == 0:
        nodes.insert(0, bytes(first_hash))
    fn = first - 1
    sn = second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            return "proof is longer than needed"
        if fn & 1 or fn == sn:
            fr = _sha256(_NODE + c + fr).digest()
            sr = _sha256(_NODE + c + sr).digest()
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _sha256(_NODE + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return "proof is shorter than needed"
    if fr != first_hash:
        return "proof does not lead to the first root"
    if sr != second_hash:
        return "proof does not lead to the second root"
    return None


def verify_consistency(
    first: int, second: int, first_hash: bytes, second_hash: bytes, path: Sequence[bytes]
) -> bool:
    """True iff `path` proves that the tree `first_hash` is a prefix of the tree `second_hash`."""
    return consistency_failure(first, second, first_hash, second_hash, path) is None

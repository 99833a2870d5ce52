"""The writer's RFC 6962 / RFC 9162 Merkle tree over one platform's log.

Leaves are the canonical record bytes (without the 32-byte chain link that precedes them in
the store), in log order: LEAF(d) = SHA-256(0x00 || d), NODE(l, r) = SHA-256(0x01 || l || r).

Memory layout, for fast appends and proofs at any size in O(log n) work:

* `levels[j]` holds, back to back, the 32-byte hashes of every COMPLETE subtree of height
  `CHUNK_LEVEL + j` (so `levels[0]` has one hash per full chunk of 128 leaves). At 10 million
  leaves that is ~156,000 hashes, 5 MB.
* `tail` holds the leaf hashes of the current, incomplete chunk (fewer than 128).
* Leaf hashes of older chunks are not kept: when a proof needs a subtree below chunk level, the
  chunk's records are fetched through the `fetch(a, b)` callback (record bytes of leaves
  [a, b)), re-hashed, checked against the stored chunk hash, and kept in a small LRU cache.

An inclusion or consistency proof therefore costs O(log n) lookups plus at most two chunk
recomputations (≤ 256 leaf hashes, ≤ 2 store reads of 128 records). Appending costs one leaf
hash plus, once per 128 leaves, 127 node hashes for the chunk and a few above it.

The verification functions here are the writer's own (decomposition into inner and border
parts), deliberately a different algorithm from the auditor's `custody_verify.merkle`.

Not thread-safe: the platform's single writer owns its tree.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Final

HASH_LEN: Final = 32
CHUNK_LEVEL: Final = 7
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_SNAPSHOT_MAGIC: Final = b"custody-merkle/v1\n"

Fetch = Callable[[int, int], Sequence[bytes]]

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _reduce(hashes: bytes | bytearray | memoryview, count: int) -> bytes:
    """MTH over `count` consecutive 32-byte leaf-level hashes (any count >= 1)."""
    if count == 1:
        return bytes(hashes[:HASH_LEN])
    k = _split(count)
    if k * 2 == count:  # complete: pairwise, level by level
        layer = [bytes(hashes[i : i + HASH_LEN]) for i in range(0, count * HASH_LEN, HASH_LEN)]
        while len(layer) > 1:
            layer = [
                _sha256(b"\x01" + layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)
            ]
        return layer[0]
    view = memoryview(hashes)
    return node_hash(_reduce(view[: k * HASH_LEN], k), _reduce(view[k * HASH_LEN :], count - k))


class TreeCorrupted(RuntimeError):
    """Records fetched for a proof do not hash to the stored chunk hash: the store changed."""


class MerkleLog:
    """An appendable RFC 6962 tree that proves inclusion and consistency for any past size."""

    def __init__(
        self, fetch: Fetch | None = None, *, chunk_level: int = CHUNK_LEVEL, cache_chunks: int = 64
    ) -> None:
        assert 1 <= chunk_level <= 16
        self.fetch = fetch
        self.chunk_level = chunk_level
        self.chunk = 1 << chunk_level
        self.size = 0
        self.levels: list[bytearray] = []
        self.tail = bytearray()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        leaves: Iterable[bytes],
        fetch: Fetch | None = None,
        *,
        chunk_level: int = CHUNK_LEVEL,
        progress: Callable[[int], None] | None = None,
    ) -> MerkleLog:
        """A tree over every leaf of `leaves` (record bytes, in log order)."""
        tree = cls(fetch, chunk_level=chunk_level)
        tree.extend(leaves, progress=progress)
        return tree

    def append(self, data: bytes) -> int:
        """Add one leaf (record bytes); returns its index."""
        tail = self.tail
        tail += _sha256(b"\x00" + data).digest()
        index = self.size
        self.size = index + 1
        if len(tail) == self.chunk * HASH_LEN:
            self._close_chunk()
        return index

    def extend(
        self, leaves: Iterable[bytes | memoryview], progress: Callable[[int], None] | None = None
    ) -> None:
        sha = _sha256
        full = self.chunk * HASH_LEN
        tail = self.tail
        size = self.size
        for data in leaves:
            tail += sha(b"\x00" + data).digest()
            size += 1
            if len(tail) == full:
                self.size = size
                self._close_chunk()
                tail = self.tail
                if progress is not None and size % (1 << 20) == 0:
                    progress(size)
        self.size = size

    def _close_chunk(self) -> None:
        h = _reduce(self.tail, self.chunk)
        self.tail = bytearray()
        levels = self.levels
        j = 0
        while True:
            if j == len(levels):
                levels.append(bytearray())
            level = levels[j]
            level += h
            count = len(level) // HASH_LEN
            if count & 1:
                return
            h = node_hash(
                bytes(level[(count - 2) * HASH_LEN : (count - 1) * HASH_LEN]),
                bytes(level[(count - 1) * HASH_LEN :]),
            )
            j += 1

    # -- snapshots (so a restart need not re-hash the whole log) --------------------------------

    def snapshot(self) -> bytes:
        parts = [
            _SNAPSHOT_MAGIC,
            struct.pack(">QBI", self.size, self.chunk_level, len(self.levels)),
        ]
        for level in self.levels:
            parts.append(struct.pack(">Q", len(level)))
            parts.append(bytes(level))
        parts.append(struct.pack(">Q", len(self.tail)))
        parts.append(bytes(self.tail))
        return b"".join(parts)

    @classmethod
    def restore(cls, data: bytes, fetch: Fetch | None = None) -> MerkleLog:
        if not data.startswith(_SNAPSHOT_MAGIC):
            raise ValueError("not a custody-merkle/v1 snapshot")
        off = len(_SNAPSHOT_MAGIC)
        size, chunk_level, nlevels = struct.unpack_from(">QBI", data, off)
        off += struct.calcsize(">QBI")
        tree = cls(fetch, chunk_level=chunk_level)
        for _ in range(nlevels):
            (n,) = struct.unpack_from(">Q", data, off)
            off += 8
            tree.levels.append(bytearray(data[off : off + n]))
            off += n
        (n,) = struct.unpack_from(">Q", data, off)
        off += 8
        tree.tail = bytearray(data[off : off + n])
        off += n
        tree.size = size
        if off != len(data) or len(tree.tail) != (size % tree.chunk) * HASH_LEN:
            raise ValueError("snapshot is inconsistent")
        for j, level in enumerate(tree.levels):
            if len(level) != (size >> (chunk_level + j)) * HASH_LEN:
                raise ValueError("snapshot is inconsistent")
        return tree

    # -- subtree hashes -------------------------------------------------------------------------

    def _chunk_leaves(self, c: int) -> bytes:
        """Leaf hashes (concatenated) of chunk c, which must be complete."""
        cached = self._cache.get(c)
        if cached is not None:
            self._cache.move_to_end(c)
            return cached
        if self.fetch is None:
            raise RuntimeError("this tree has no fetch callback for old records")
        a = c * self.chunk
        records = self.fetch(a, a + self.chunk)
        if len(records) != self.chunk:
            raise TreeCorrupted(f"fetch({a}, {a + self.chunk}) returned {len(records)} records")
        sha = _sha256
        leaves = b"".join([sha(b"\x00" + r).digest() for r in records])
        stored = bytes(self.levels[0][c * HASH_LEN : (c + 1) * HASH_LEN])
        if _reduce(leaves, self.chunk) != stored:
            raise TreeCorrupted(f"records {a}..{a + self.chunk - 1} no longer match the tree")
        self._cache[c] = leaves
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return leaves

    def _complete(self, a: int, height: int) -> bytes:
        """Hash of the complete, aligned subtree of 2^height leaves starting at leaf a."""
        cl = self.chunk_level
        if height >= cl:
            j = height - cl
            i = a >> height
            return bytes(self.levels[j][i * HASH_LEN : (i + 1) * HASH_LEN])
        c = a >> cl
        n = 1 << height
        if c == self.size >> cl:  # the current, incomplete chunk
            off = (a - (c << cl)) * HASH_LEN
            return _reduce(memoryview(self.tail)[off : off + n * HASH_LEN], n)
        leaves = self._chunk_leaves(c)
        off = (a - (c << cl)) * HASH_LEN
        return _reduce(memoryview(leaves)[off : off + n * HASH_LEN], n)

    def _mth(self, a: int, b: int) -> bytes:
        """MTH of leaves [a, b) where a is aligned to the subtree the RFC recursion reaches."""
        n = b - a
        if n & (n - 1) == 0 and a % n == 0:
            return self._complete(a, n.bit_length() - 1)
        k = _split(n)
        return node_hash(self._mth(a, a + k), self._mth(a + k, b))

    # -- the public API -------------------------------------------------------------------------

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first `size` leaves (default: all of them)."""
        if size is None:
            size = self.size
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} outside 0..{self.size}")
        if size == 0:
            return EMPTY_ROOT
        return self._mth(0, size)

    def leaf_hash_at(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise ValueError(f"index {index} outside 0..{self.size - 1}")
        return self._complete(index, 0)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 PATH(index, D[0:size]), the leaf's sibling first."""
        if size is None:
            size = self.size
        if not 0 <= index < size <= self.size:
            raise ValueError(f"need 0 <= index < size <= {self.size}, got {index}, {size}")
        path: list[bytes] = []
        a, b = 0, size
        while b - a > 1:
            k = _split(b - a)
            if index < a + k:
                path.append(self._mth(a + k, b))
                b = a + k
            else:
                path.append(self._mth(a, a + k))
                a += k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 9162 PROOF(first, D[0:second]); empty when first == second."""
        if second is None:
            second = self.size
        if not 0 < first <= second <= self.size:
            raise ValueError(f"need 0 < first <= second <= {self.size}, got {first}, {second}")
        path: list[bytes] = []
        a, b, m, known = 0, second, first, True
        while m != b - a:
            k = _split(b - a)
            if m <= k:
                path.append(self._mth(a + k, b))
                b = a + k
            else:
                path.append(self._mth(a, a + k))
                a += k
                m -= k
                known = False
        if not known:
            path.append(self._mth(a, b))
        path.reverse()
        return path


# -- the writer's own verification (inner/border decomposition) --------------------------------


def _ok_hash(h: object) -> bool:
    return isinstance(h, (bytes, bytearray)) and len(h) == HASH_LEN


def _inner_border(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    if not (type(index) is int and type(size) is int and 0 <= index < size < 2**64):
        return False
    if not _ok_hash(leaf) or not _ok_hash(root) or not all(_ok_hash(h) for h in proof):
        return False
    inner, border = _inner_border(index, size)
    if len(proof) != inner + border:
        return False
    r = _chain_inner(bytes(leaf), proof[:inner], index)
    return _chain_border_right(r, proof[inner:]) == root


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> bool:
    if not (type(size1) is int and type(size2) is int and 0 <= size1 <= size2 < 2**64):
        return False
    if size1 == 0:
        return False
    if size1 == size2:
        return len(proof) == 0 and root1 == root2
    if not proof or not _ok_hash(root1) or not _ok_hash(root2):
        return False
    if not all(_ok_hash(h) for h in proof):
        return False
    inner, border = _inner_border(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1
    inner -= shift
    if size1 == 1 << shift:
        seed, start = bytes(root1), 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        return False
    rest = proof[start:]
    mask = (size1 - 1) >> shift
    h1 = _chain_border_right(_chain_inner_right(seed, rest[:inner], mask), rest[inner:])
    if h1 != root1:
        return False
    h2 = _chain_border_right(_chain_inner(seed, rest[:inner], mask), rest[inner:])
    return h2 == root2


def store_fetcher(store: object, platform_id: str) -> Fetch:
    """A `fetch(a, b)` callback reading record bytes of positions [a, b) from a LedgerStore.

    Reads exactly b - a rows (one indexed range query per 10,000), never a whole page more.
    """
    from ledger.records import unpack_state
    from ledger.store import READ_PAGE_MAX, LedgerStore, log_stream

    assert isinstance(store, LedgerStore)
    stream = log_stream(platform_id)

    def fetch(a: int, b: int) -> list[bytes]:
        out: list[bytes] = []
        after = a - 1
        while after < b - 1:
            rows = store.read(stream, after, min(READ_PAGE_MAX, b - 1 - after))
            if not rows:
                break
            out.extend(unpack_state(packed)[1] for _, _, packed in rows)
            after = rows[-1][0]
        return out

    return fetch

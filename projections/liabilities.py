"""Proof of liabilities (`custody-pol/v1`, docs/LIABILITIES.md): a Merkle-sum tree over the
customer balances of one platform and currency at one log size (the snapshot).

Pure computation plus file output. Like every projection this reads the log and never writes
to it: the statement (root, total, depth) is published through the ledger's own
`PublishLiabilities` instruction (`projections/liabilities_cli.py` does that), which puts it in
the log so that checkpoints cover it.

Balances are folded here, independently of the ledger's live state, from the records' effect
fields exactly as `ledger/fold.py` applies them: `entries` (movements and reversals), `hold` /
`resolve` (a capture posts hold.debit -> hold.credit), `account` and `subject` (opening,
freezing, closing); refusals move nothing. A customer's liability is its posted balance
(credits - debits posted): money under a pending hold is still the customer's until captured.

Secrets: the per-(account, snapshot, asset) salts bind each leaf to one customer and keep the
balances of neighbours private. They are never logged, never put in an exception message, and
the files that carry them (proof files, the auditor file) are created with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from ledger import records
from ledger.store import LedgerStore, log_stream

POL_VERSION: Final = "custody-pol/v1"
PROOF_FORMAT: Final = "custody-pol-proof/v1"
AUDIT_FORMAT: Final = "custody-pol-audit/v1"
STATEMENT_FORMAT: Final = "custody-pol-statement/v1"
TAG_PREFIX: Final = b"custody-pol/v1 tag"
LEAF_PREFIX: Final = b"\x10"
NODE_PREFIX: Final = b"\x11"
MAX_LEAF: Final = 2**64  # exclusive
MAX_SUM: Final = 2**128  # exclusive
DEFAULT_MIN_DEPTH: Final = 16  # at least 2^16 leaves, so the depth says little
MAX_DEPTH: Final = 40  # what the ledger accepts in a PublishLiabilities instruction
SALT_BYTES: Final = 32
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700

_sha256 = hashlib.sha256
_DECODE = msgspec.json.Decoder().decode
_ZERO16: Final = bytes(16)


class LiabilitiesError(Exception):
    """The tree cannot be built honestly (negative or out-of-range balance, bad log, ...).

    Messages name accounts and positions, never a salt."""


# -- encodings (docs/LIABILITIES.md §2) --------------------------------------------------------


def u128be(x: int) -> bytes:
    if not 0 <= x < MAX_SUM:
        raise LiabilitiesError("a value outside [0, 2^128) cannot be encoded")
    return x.to_bytes(16, "big")


def lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def tag_for(snapshot: int, asset: str, account_id: str, salt: bytes) -> bytes:
    """tag = SHA-256("custody-pol/v1 tag" || lp(snapshot) || lp(asset) || lp(account) || salt),
    the snapshot as ASCII decimal, strings as UTF-8."""
    return _sha256(
        TAG_PREFIX
        + lp(str(snapshot).encode())
        + lp(asset.encode())
        + lp(account_id.encode())
        + salt
    ).digest()


def leaf_hash(tag: bytes, balance: int) -> bytes:
    return _sha256(LEAF_PREFIX + tag + u128be(balance)).digest()


def node(lh: bytes, ls: int, rh: bytes, rs: int) -> tuple[bytes, int]:
    total = ls + rs
    if total >= MAX_SUM:
        raise LiabilitiesError("a node sum reaches 2^128")
    return _sha256(NODE_PREFIX + lh + u128be(ls) + rh + u128be(rs)).digest(), total


def depth_for(accounts: int, min_depth: int = DEFAULT_MIN_DEPTH) -> int:
    """The public depth rule: the smallest D with 2^D >= 2 x accounts, and at least min_depth."""
    if not 1 <= min_depth <= MAX_DEPTH:
        raise LiabilitiesError(f"min depth must be in 1..{MAX_DEPTH}")
    need = (2 * accounts - 1).bit_length() if accounts else 0
    depth = max(min_depth, need)
    if depth > MAX_DEPTH:
        raise LiabilitiesError(f"{accounts} accounts need a tree deeper than 2^{MAX_DEPTH}")
    return depth


def statement_text(snapshot: int, asset: str, depth: int, root: bytes, total: int) -> str:
    return (
        f"{POL_VERSION}\nsnapshot {snapshot}\nasset {asset}\ndepth {depth}\n"
        f"root {b64(root)}\ntotal {total}\n"
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- balances at a snapshot --------------------------------------------------------------------


@dataclass
class _Acc:
    kind: str
    ccy: str
    status: str = "open"
    balance: int = 0  # credits posted - debits posted


@dataclass(frozen=True)
class Snapshot:
    platform: str
    size: int  # log size: records 0 .. size-1
    # currency -> customer account (not closed at the snapshot) -> posted balance
    customers: dict[str, dict[str, int]]
    currencies: frozenset[str]  # currencies of every account opened before the snapshot


def fold_balances(platform: str, rows: Iterable[tuple[int, str, bytes]], size: int) -> Snapshot:
    """Fold stored rows (position, kind, packed state) 0..size-1, checking positions, kinds and
    the hash chain, into the customer balances at log size `size`."""
    accounts: dict[str, _Acc] = {}
    holds: dict[str, tuple[str, str]] = {}
    head = records.CHAIN_GENESIS
    expected = 0

    def post(debit: str, credit: str, amount: int, seq: int) -> None:
        a, b = accounts.get(debit), accounts.get(credit)
        if a is None or b is None:
            raise LiabilitiesError(f"record {seq}: posting names an unknown account")
        a.balance -= amount
        b.balance += amount

    for pos, kind, packed in rows:
        if pos >= size:
            break
        if pos != expected:
            raise LiabilitiesError(f"record {expected} is missing from the log")
        link, data = records.unpack_state(packed)
        head = records.chain_next(head, data)
        if link != head:
            raise LiabilitiesError(f"record {pos}: chain link mismatch")
        rec = _DECODE(data)
        if rec.get("seq") != pos or rec.get("kind") != kind or rec.get("platform") != platform:
            raise LiabilitiesError(f"record {pos}: position, kind or platform mismatch")
        expected += 1
        if kind == records.REFUSED_KIND:
            continue
        entries = rec.get("entries")
        if entries is not None:
            for debit, credit, amount in entries:
                post(debit, credit, amount, pos)
            continue
        hold = rec.get("hold")
        if hold is not None:
            holds[hold["id"]] = (hold["debit"], hold["credit"])
            continue
        resolve = rec.get("resolve")
        if resolve is not None:
            for hold_id, captured, _status in resolve:
                pair = holds.pop(hold_id, None)
                if pair is None:
                    raise LiabilitiesError(f"record {pos}: resolves an unknown hold")
                if captured:
                    post(pair[0], pair[1], captured, pos)
            continue
        spec = rec.get("account")
        if spec is not None:
            accounts[spec["id"]] = _Acc(spec["kind"], spec["ccy"])
            continue
        subject = rec.get("subject")
        if subject is not None:
            acc = accounts.get(subject)
            if acc is None:
                raise LiabilitiesError(f"record {pos}: acts on an unknown account")
            acc.status = {"account_frozen": "frozen", "account_closed": "closed"}.get(kind, "open")
    if expected != size:
        raise LiabilitiesError(f"the log has {expected} records, fewer than the snapshot {size}")
    customers: dict[str, dict[str, int]] = {}
    for account_id, acc in accounts.items():
        if acc.kind == "customer" and acc.status != "closed":
            customers.setdefault(acc.ccy, {})[account_id] = acc.balance
    return Snapshot(platform, size, customers, frozenset(a.ccy for a in accounts.values()))


def read_snapshot(store: LedgerStore, platform: str, size: int | None = None) -> Snapshot:
    """The customer balances at log size `size` (default: everything stored now)."""
    if size is None:
        last = store.last_row(log_stream(platform))
        if last is None:
            raise LiabilitiesError(f"platform {platform!r} has no log")
        size = last[0] + 1
    if size < 1:
        raise LiabilitiesError("the snapshot size must be at least 1")
    rows = store.iter_rows(log_stream(platform), stop=size - 1)
    return fold_balances(platform, rows, size)


# -- the tree ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Leaf:
    hash: bytes
    sum: int
    tag: bytes
    account: str | None = None  # None: a padding leaf
    salt: bytes | None = field(default=None, repr=False)


@dataclass
class Tree:
    platform: str
    snapshot: int
    asset: str
    depth: int
    leaves: list[Leaf]
    # levels[0] = leaf hashes concatenated (32 bytes each), levels[d] = the single root hash;
    # sums[d][i] = the sum of node i at level d
    levels: list[bytes] = field(repr=False)
    sums: list[list[int]] = field(repr=False)
    index_of: dict[str, int] = field(repr=False)  # account -> leaf index

    @property
    def root(self) -> bytes:
        return self.levels[-1]

    @property
    def total(self) -> int:
        return self.sums[-1][0]

    @property
    def accounts(self) -> int:
        return len(self.index_of)

    def text(self) -> str:
        return statement_text(self.snapshot, self.asset, self.depth, self.root, self.total)

    def statement(self) -> dict[str, Any]:
        """The fields of the `liabilities_published` record (docs/FORMAT.md)."""
        return {
            "snapshot": self.snapshot,
            "asset": self.asset,
            "depth": self.depth,
            "root": b64(self.root),
            "total": self.total,
        }

    def siblings(self, index: int) -> list[tuple[bytes, int]]:
        """The D (hash, sum) pairs from the leaf's sibling up to the root's children."""
        out = []
        for d in range(self.depth):
            j = (index >> d) ^ 1
            out.append((self.levels[d][32 * j : 32 * j + 32], self.sums[d][j]))
        return out


def build_tree(
    platform: str,
    snapshot: int,
    asset: str,
    balances: dict[str, int],
    min_depth: int = DEFAULT_MIN_DEPTH,
) -> Tree:
    """Salted leaves for every customer (zero balances included), random padding leaves to 2^D,
    a uniformly random order, and the Merkle-sum tree over them. Aborts on any balance outside
    [0, 2^64) (a negative customer balance means the books are wrong: no tree is published)."""
    for account_id, balance in balances.items():
        if type(balance) is not int or balance < 0:
            raise LiabilitiesError(f"account {account_id!r} has a negative balance: no proof")
        if balance >= MAX_LEAF:
            raise LiabilitiesError(f"account {account_id!r} has a balance of 2^64 or more")
    depth = depth_for(len(balances), min_depth)
    width = 1 << depth
    leaves: list[Leaf] = []
    token = secrets.token_bytes
    for account_id in sorted(balances):
        salt = token(SALT_BYTES)
        tag = tag_for(snapshot, asset, account_id, salt)
        balance = balances[account_id]
        leaves.append(Leaf(leaf_hash(tag, balance), balance, tag, account_id, salt))
    zero_suffix = _ZERO16
    for _ in range(width - len(leaves)):
        tag = token(32)
        leaves.append(Leaf(_sha256(LEAF_PREFIX + tag + zero_suffix).digest(), 0, tag))
    secrets.SystemRandom().shuffle(leaves)
    return assemble(platform, snapshot, asset, leaves)


def assemble(platform: str, snapshot: int, asset: str, leaves: list[Leaf]) -> Tree:
    """The Merkle-sum tree over `leaves` in the given order (a power of two of them)."""
    depth = (len(leaves) - 1).bit_length()
    if len(leaves) != 1 << depth or depth < 1:
        raise LiabilitiesError("a tree needs a power of two (at least 2) of leaves")
    levels = [b"".join(leaf.hash for leaf in leaves)]
    sums = [[leaf.sum for leaf in leaves]]
    for _ in range(depth):
        hashes, vals = levels[-1], sums[-1]
        out_h: list[bytes] = []
        out_s: list[int] = []
        append_h, append_s = out_h.append, out_s.append
        for i in range(0, len(vals), 2):
            ls, rs = vals[i], vals[i + 1]
            total = ls + rs
            if total >= MAX_SUM:
                raise LiabilitiesError("a node sum reaches 2^128")
            append_h(
                _sha256(
                    NODE_PREFIX
                    + hashes[32 * i : 32 * i + 32]
                    + ls.to_bytes(16, "big")
                    + hashes[32 * i + 32 : 32 * i + 64]
                    + rs.to_bytes(16, "big")
                ).digest()
            )
            append_s(total)
        levels.append(b"".join(out_h))
        sums.append(out_s)
    index_of = {leaf.account: i for i, leaf in enumerate(leaves) if leaf.account is not None}
    return Tree(platform, snapshot, asset, depth, leaves, levels, sums, index_of)


def build_from_store(
    store: LedgerStore,
    platform: str,
    asset: str,
    size: int | None = None,
    min_depth: int = DEFAULT_MIN_DEPTH,
) -> Tree:
    snap = read_snapshot(store, platform, size)
    if asset not in snap.currencies:
        raise LiabilitiesError(f"platform {platform!r} has no account in {asset!r}")
    return build_tree(platform, snap.size, asset, snap.customers.get(asset, {}), min_depth)


# -- where the statement was logged ------------------------------------------------------------


@dataclass(frozen=True)
class LogProof:
    """The published statement's record, its position, and a tlog-proof of its inclusion in a
    signed checkpoint (c2sp.org/tlog-proof@v1 text)."""

    position: int
    record: bytes  # the record's canonical bytes, exactly as logged
    tlog_proof: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "record": self.record.decode("utf-8"),
            "tlog_proof": self.tlog_proof.decode("utf-8"),
        }


# -- files -------------------------------------------------------------------------------------


def proof_document(tree: Tree, account_id: str, log: LogProof | None) -> dict[str, Any]:
    """One customer's proof file (delivered privately: it carries the salt)."""
    index = tree.index_of[account_id]
    leaf = tree.leaves[index]
    assert leaf.salt is not None
    return {
        "format": PROOF_FORMAT,
        "platform": tree.platform,
        "snapshot": tree.snapshot,
        "asset": tree.asset,
        "account": account_id,
        "balance": leaf.sum,
        "salt": b64(leaf.salt),
        "leaf_index": index,
        "siblings": [[b64(h), s] for h, s in tree.siblings(index)],
        "statement": tree.statement(),
        "statement_text": tree.text(),
        "log": None if log is None else log.to_json(),
    }


def statement_document(tree: Tree, log: LogProof | None) -> dict[str, Any]:
    return {
        "format": STATEMENT_FORMAT,
        "platform": tree.platform,
        **tree.statement(),
        "accounts": tree.accounts,
        "text": tree.text(),
        "log": None if log is None else log.to_json(),
    }


def audit_lines(tree: Tree, log: LogProof | None) -> Iterator[bytes]:
    """The auditor file, JSON Lines: a header object, then one array per leaf in index order,
    `[hash, sum, tag, balance, account, salt]` (account and salt null for padding)."""
    header = {
        "format": AUDIT_FORMAT,
        "platform": tree.platform,
        **tree.statement(),
        "leaves": len(tree.leaves),
        "log": None if log is None else {"position": log.position, "record": log.record.decode()},
    }
    yield _dumps(header)
    for leaf in tree.leaves:
        yield _dumps(
            [
                b64(leaf.hash),
                leaf.sum,
                b64(leaf.tag),
                leaf.sum,
                leaf.account,
                None if leaf.salt is None else b64(leaf.salt),
            ]
        )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def write_private(path: Path, chunks: Iterable[bytes], sync: bool = True) -> None:
    """Write through `<path>.tmp` created 0600 (never readable by others, even briefly), then
    rename over `path`. Without `sync` the caller makes it durable (one `os.sync` for many)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            for chunk in chunks:
                f.write(chunk)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    os.chmod(path, FILE_MODE)


@dataclass(frozen=True)
class Written:
    statement: Path
    auditor: Path
    proofs: Path  # the folder of per-customer proof files
    count: int


def write_outputs(tree: Tree, out: Path | str, log: LogProof | None = None) -> Written:
    """DIR/statement.json, DIR/auditor.jsonl (0600) and DIR/proofs/<account>.json (0600)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proofs = out / "proofs"
    proofs.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(proofs, DIR_MODE)
    for account_id in tree.index_of:
        doc = proof_document(tree, account_id, log)
        write_private(proofs / f"{account_id}.json", [_dumps(doc)], sync=False)
    auditor = out / "auditor.jsonl"
    write_private(auditor, audit_lines(tree, log), sync=False)
    statement = out / "statement.json"
    tmp = statement.with_name("statement.json.tmp")
    tmp.write_bytes(_dumps_pretty(statement_document(tree, log)))
    os.replace(tmp, statement)
    # one flush for all the files (an fsync per proof file cost ~0.7 ms each): the salts are
    # durable before the caller publishes the root
    os.sync()
    return Written(statement, auditor, proofs, tree.accounts)


def _dumps_pretty(value: Any) -> bytes:
    return json.dumps(value, indent=1, ensure_ascii=False).encode() + b"\n"

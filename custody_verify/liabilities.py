"""Proof of liabilities (`custody-pol/v1`): the customer's check and the auditor's full check.

Standard library and `cryptography` only; nothing from the ledger. Format: docs/LIABILITIES.md.

Customer (`verify_customer_proof`, `custody-verify liabilities PROOF --vkey VKEY --account ID`):

1. the statement is in the log: the checkpoint note is signed by the ledger key, the record is
   RFC 9162-included in it at its position, and it is the `liabilities_published` record of the
   proof's platform whose fields are the proof's statement;
2. the balance is the one the customer expects (when given);
3. there are exactly D siblings and 0 <= leaf_index < 2^D;
4. the leaf is recomputed from the customer's OWN account id, the salt and the balance;
5. every sibling sum is in [0, 2^128) (the first, a leaf, in [0, 2^64)), every running sum too;
6. the path ends at the statement's root hash and total.

Auditor (`verify_full`, `custody-verify liabilities-audit AUDITFILE BUNDLE --vkey VKEY`): the
bundle verifies end to end; the auditor file's statement is the record logged at its position;
every leaf is well formed and in range, real leaves' tags are recomputed from (account, salt);
the rebuilt tree gives the statement's root and total; the bundle replayed to the snapshot
size gives exactly the customer accounts (not closed) of the asset with exactly these balances.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from custody_verify.bundle import (
    _SCAN,
    VerificationFailed,
    _Ledger,
    _no_floats,
    _pairs,
    verify_bundle,
)
from custody_verify.merkle import inclusion_failure, leaf_hash
from custody_verify.note import (
    NoteError,
    Verifier,
    VkeyError,
    b64decode_strict,
    open_checkpoint,
    parse_vkey,
)
from custody_verify.proof import ProofFormatError, parse_tlog_proof

POL_VERSION = "custody-pol/v1"
PROOF_FORMAT = "custody-pol-proof/v1"
AUDIT_FORMAT = "custody-pol-audit/v1"
TAG_PREFIX = b"custody-pol/v1 tag"
MAX_LEAF = 2**64
MAX_SUM = 2**128
MAX_DEPTH = 40
PUBLISHED_KIND = "liabilities_published"
STATEMENT_KEYS = ("asset", "depth", "root", "snapshot", "total")

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

_sha256 = hashlib.sha256


class PolFailure(Exception):
    """Verification failed; `check` names which check (format, checkpoint, log, statement,
    account, balance, depth, range, root, total, bundle, leaf, tag, tree, customers)."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


# -- encodings ---------------------------------------------------------------------------------


def _u128(x: int) -> bytes:
    return x.to_bytes(16, "big")


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def tag_for(snapshot: int, asset: str, account_id: str, salt: bytes) -> bytes:
    return _sha256(
        TAG_PREFIX
        + _lp(str(snapshot).encode())
        + _lp(asset.encode())
        + _lp(account_id.encode())
        + salt
    ).digest()


def pol_leaf(tag: bytes, balance: int) -> bytes:
    return _sha256(b"\x10" + tag + _u128(balance)).digest()


def pol_node(lh: bytes, ls: int, rh: bytes, rs: int) -> bytes:
    return _sha256(b"\x11" + lh + _u128(ls) + rh + _u128(rs)).digest()


def _is_int(x: object) -> bool:
    return type(x) is int


def _b64(text: Any, what: str, size: int | None = 32) -> bytes:
    if type(text) is not str:
        raise PolFailure("format", f"{what} is not a base64 string")
    try:
        raw = b64decode_strict(text)
    except ValueError as exc:
        raise PolFailure("format", f"{what}: {exc}") from None
    if size is not None and len(raw) != size:
        raise PolFailure("format", f"{what} is not {size} bytes")
    return raw


# -- the statement and where it was logged -----------------------------------------------------


@dataclass(frozen=True)
class Statement:
    platform: str
    snapshot: int
    asset: str
    depth: int
    root: bytes
    total: int
    position: int  # log position of the liabilities_published record

    def text(self) -> str:
        return (
            f"{POL_VERSION}\nsnapshot {self.snapshot}\nasset {self.asset}\ndepth {self.depth}\n"
            f"root {base64.b64encode(self.root).decode()}\ntotal {self.total}\n"
        )


_DECODER = json.JSONDecoder(
    parse_float=_no_floats, parse_constant=_no_floats, object_pairs_hook=_pairs
)


def _strict_json(data: bytes | str) -> Any:
    """JSON without floats, NaN or duplicate keys (surrounding whitespace allowed)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at {exc.pos})") from None


def statement_from_record(record: bytes, position: int, platform: str) -> Statement:
    """Parse a `liabilities_published` record's bytes (checked: kind, platform, position, the
    exact statement fields, ranges)."""
    try:
        rec = _strict_json(record)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolFailure("statement", f"the logged record is not canonical JSON ({exc})") from None
    if type(rec) is not dict or rec.get("kind") != PUBLISHED_KIND:
        raise PolFailure("statement", f"the logged record is not a {PUBLISHED_KIND} record")
    if rec.get("platform") != platform:
        raise PolFailure("statement", f"the logged record is of platform {rec.get('platform')!r}")
    if rec.get("seq") != position or not _is_int(rec.get("seq")):
        raise PolFailure("statement", f"the logged record says position {rec.get('seq')!r}")
    actor = rec.get("actor")
    if type(actor) is not str or not (
        actor.startswith("operator:") or ("executes" in rec and actor.startswith("checker:"))
    ):
        raise PolFailure("statement", f"published by {actor!r}, not an operator")
    spec = rec.get("liabilities")
    if type(spec) is not dict or tuple(sorted(spec)) != STATEMENT_KEYS:
        raise PolFailure("statement", f"liabilities must be {{{', '.join(STATEMENT_KEYS)}}}")
    snapshot, asset, depth, total = spec["snapshot"], spec["asset"], spec["depth"], spec["total"]
    if not _is_int(snapshot) or not 1 <= snapshot <= position:
        raise PolFailure("statement", f"snapshot {snapshot!r} is not a log size up to {position}")
    if type(asset) is not str or len(asset) != 3 or not asset.isascii() or not asset.isupper():
        raise PolFailure("statement", f"asset {asset!r} is not a currency code")
    if not _is_int(depth) or not 1 <= depth <= MAX_DEPTH:
        raise PolFailure("statement", f"depth {depth!r} is not in 1..{MAX_DEPTH}")
    if not _is_int(total) or not 0 <= total < MAX_SUM:
        raise PolFailure("statement", f"total {total!r} is out of range")
    try:
        root = _b64(spec["root"], "statement root")
    except PolFailure as exc:
        raise PolFailure("statement", exc.reason) from None
    return Statement(platform, snapshot, asset, depth, root, total, position)


def verify_logged(log: Any, platform: str, verifiers: Sequence[Verifier]) -> tuple[Statement, int]:
    """Step 1: the tlog-proof's checkpoint is signed by a trusted key for this platform's log and
    includes the record at its position. Returns (statement, checkpoint size)."""
    if type(log) is not dict:
        raise PolFailure("log", "the statement was not published in the log (no log proof)")
    position, record, proof_text = log.get("position"), log.get("record"), log.get("tlog_proof")
    if not _is_int(position) or type(record) is not str or type(proof_text) is not str:
        raise PolFailure("format", "log must be {position, record, tlog_proof}")
    record_bytes = record.encode("utf-8")
    try:
        proof = parse_tlog_proof(proof_text.encode("utf-8"))
    except ProofFormatError as exc:
        raise PolFailure("format", f"tlog-proof: {exc}") from None
    try:
        cp = open_checkpoint(proof.note, list(verifiers))
    except NoteError as exc:
        raise PolFailure("checkpoint", str(exc)) from None
    if cp.origin.rsplit("/", 1)[-1] != platform:
        raise PolFailure(
            "checkpoint", f"checkpoint of log {cp.origin!r}, not platform {platform!r}"
        )
    if proof.index != position:
        raise PolFailure("log", f"the tlog-proof is for position {proof.index}, not {position}")
    why = inclusion_failure(position, cp.size, leaf_hash(record_bytes), proof.path, cp.root)
    if why is not None:
        raise PolFailure("log", f"record {position} not included in checkpoint {cp.size}: {why}")
    return statement_from_record(record_bytes, position, platform), cp.size


# -- the customer's check ----------------------------------------------------------------------


@dataclass
class CustomerResult:
    platform: str
    account: str
    balance: int
    statement: Statement
    checkpoint_size: int

    def to_json(self) -> dict[str, Any]:
        s = self.statement
        return {
            "platform": self.platform,
            "account": self.account,
            "balance": self.balance,
            "snapshot": s.snapshot,
            "asset": s.asset,
            "depth": s.depth,
            "root": base64.b64encode(s.root).decode(),
            "total": s.total,
            "log_position": s.position,
            "checkpoint_size": self.checkpoint_size,
        }


def verify_customer_proof(
    proof: dict[str, Any],
    vkey: str | Verifier | Sequence[str | Verifier],
    own_account_id: str,
    expected_balance: int | None = None,
) -> CustomerResult:
    """The six customer steps of custody-pol/v1; raises PolFailure naming the failed check."""
    verifiers = _verifiers(vkey)
    if type(proof) is not dict or proof.get("format") != PROOF_FORMAT:
        raise PolFailure("format", f"not a {PROOF_FORMAT} file")
    platform = proof.get("platform")
    if type(platform) is not str or not platform:
        raise PolFailure("format", "platform missing")
    # 1. the statement is logged, under a checkpoint signed by the ledger's key
    stmt, cp_size = verify_logged(proof.get("log"), platform, verifiers)
    claimed = proof.get("statement")
    if claimed != _statement_json(stmt):
        raise PolFailure("statement", "the proof's statement differs from the logged one")
    if proof.get("snapshot") != stmt.snapshot or proof.get("asset") != stmt.asset:
        raise PolFailure("statement", "the proof's snapshot or asset differs from the logged one")
    # the proof must be about the customer's own account: the leaf is computed from own_account_id
    if proof.get("account") != own_account_id:
        raise PolFailure(
            "account", f"the proof is for account {proof.get('account')!r}, not {own_account_id!r}"
        )
    balance: Any = proof.get("balance")
    if not _is_int(balance) or not 0 <= balance < MAX_LEAF:
        raise PolFailure("range", "the balance is not an integer in [0, 2^64)")
    # 2. the balance the customer knows from their own statement
    if expected_balance is not None and balance != expected_balance:
        raise PolFailure(
            "balance", f"the proof says {balance}, your statement says {expected_balance}"
        )
    # 3. shape of the path
    siblings = proof.get("siblings")
    index: Any = proof.get("leaf_index")
    if type(siblings) is not list or len(siblings) != stmt.depth:
        raise PolFailure("depth", f"the path must have exactly {stmt.depth} siblings")
    if not _is_int(index) or not 0 <= index < (1 << stmt.depth):
        raise PolFailure("depth", f"leaf index {index!r} is not in [0, 2^{stmt.depth})")
    salt = _b64(proof.get("salt"), "salt")
    # 4. the leaf, from the customer's own account id
    cur_h = pol_leaf(tag_for(stmt.snapshot, stmt.asset, own_account_id, salt), balance)
    cur_s = balance
    # 5. up the path, with range checks at every level
    pairs = []
    for i, pair in enumerate(siblings):
        if type(pair) is not list or len(pair) != 2:
            raise PolFailure("format", f"sibling {i} is not [hash, sum]")
        pairs.append((_b64(pair[0], f"sibling {i} hash"), pair[1]))
    cur_h, cur_s = climb(cur_h, cur_s, index, pairs)
    # 6. the published root and total
    if cur_h != stmt.root:
        raise PolFailure(
            "root",
            "the path from your leaf (your account id, salt and balance) does not lead to the "
            "published root",
        )
    if cur_s != stmt.total:
        raise PolFailure("total", f"the path sums to {cur_s}, the published total is {stmt.total}")
    return CustomerResult(platform, own_account_id, balance, stmt, cp_size)


def climb(
    leaf: bytes, balance: int, index: int, siblings: Sequence[tuple[bytes, Any]]
) -> tuple[bytes, int]:
    """Step 5: from a leaf (hash, balance) at `index` up through its (hash, sum) siblings, bottom
    first; every sibling sum in [0, 2^128), the first (a leaf) in [0, 2^64), every running sum
    below 2^128. Returns the (hash, sum) reached."""
    cur_h, cur_s = leaf, balance
    for i, (h, s) in enumerate(siblings):
        if not _is_int(s) or not 0 <= s < MAX_SUM:
            raise PolFailure("range", f"sibling {i} sum is not in [0, 2^128)")
        if i == 0 and s >= MAX_LEAF:
            raise PolFailure("range", "the sibling leaf's sum is not in [0, 2^64)")
        right = (index >> i) & 1  # our node is the right child
        cur_h = pol_node(h, s, cur_h, cur_s) if right else pol_node(cur_h, cur_s, h, s)
        cur_s += s
        if cur_s >= MAX_SUM:
            raise PolFailure("range", f"the sum at level {i + 1} reaches 2^128")
    return cur_h, cur_s


def _statement_json(stmt: Statement) -> dict[str, Any]:
    return {
        "snapshot": stmt.snapshot,
        "asset": stmt.asset,
        "depth": stmt.depth,
        "root": base64.b64encode(stmt.root).decode(),
        "total": stmt.total,
    }


def _verifiers(vkey: str | Verifier | Sequence[str | Verifier]) -> list[Verifier]:
    items = [vkey] if isinstance(vkey, (str, Verifier)) else list(vkey)
    out = []
    for item in items:
        out.append(item if isinstance(item, Verifier) else parse_vkey(item))
    if not out:
        raise VkeyError("at least one verifier key is required")
    return out


# -- the auditor's check -----------------------------------------------------------------------


@dataclass
class AuditResult:
    platform: str
    snapshot: int
    asset: str
    depth: int
    root: str
    total: int
    leaves: int
    customers: int
    log_position: int
    bundle_records: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _AuditLeaves:
    header: dict[str, Any]
    balances: dict[str, int] = field(default_factory=dict)
    root: bytes = b""
    total: int = 0
    count: int = 0


def _read_audit(lines: Iterator[bytes]) -> _AuditLeaves:
    """Parse the auditor file, check every leaf and rebuild the tree in O(depth) memory."""
    try:
        header = _strict_json(next(lines))
    except StopIteration:
        raise PolFailure("format", "empty auditor file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolFailure("format", f"auditor header: {exc}") from None
    if type(header) is not dict or header.get("format") != AUDIT_FORMAT:
        raise PolFailure("format", f"not a {AUDIT_FORMAT} file")
    for key in ("platform", "asset"):
        if type(header.get(key)) is not str:
            raise PolFailure("format", f"auditor header: {key} missing")
    for key in ("snapshot", "depth", "total", "leaves"):
        if not _is_int(header.get(key)):
            raise PolFailure("format", f"auditor header: {key} is not an integer")
    depth = header["depth"]
    if not 1 <= depth <= MAX_DEPTH or header["leaves"] != 1 << depth:
        raise PolFailure("depth", f"{header['leaves']} leaves for depth {depth}")
    snapshot, asset = header["snapshot"], header["asset"]
    out = _AuditLeaves(header)
    stack: list[tuple[int, bytes, int]] = []  # (level, hash, sum): the tree's left frontier
    for n, line in enumerate(lines):
        try:
            item = _strict_json(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PolFailure("format", f"leaf {n}: {exc}") from None
        if type(item) is not list or len(item) != 6:
            raise PolFailure("format", f"leaf {n} is not [hash, sum, tag, balance, account, salt]")
        h_text, s, tag_text, balance, account, salt_text = item
        h = _b64(h_text, f"leaf {n} hash")
        tag = _b64(tag_text, f"leaf {n} tag")
        if not _is_int(balance) or not 0 <= balance < MAX_LEAF:
            raise PolFailure("range", f"leaf {n}: balance {balance!r} is not in [0, 2^64)")
        if not _is_int(s) or s != balance:
            raise PolFailure("leaf", f"leaf {n}: sum {s!r} is not its balance {balance}")
        if pol_leaf(tag, balance) != h:
            raise PolFailure("leaf", f"leaf {n}: hash is not SHA-256(0x10 || tag || balance)")
        if account is not None or salt_text is not None:
            if type(account) is not str or not account:
                raise PolFailure("format", f"leaf {n}: account must be a non-empty string")
            salt = _b64(salt_text, f"leaf {n} salt")
            if tag_for(snapshot, asset, account, salt) != tag:
                raise PolFailure("tag", f"leaf {n}: tag is not the one of account {account!r}")
            if account in out.balances:
                raise PolFailure("leaf", f"account {account!r} has two leaves")
            out.balances[account] = balance
        level, cur_h, cur_s = 0, h, balance
        while stack and stack[-1][0] == level:  # merge complete left siblings
            _, lh, ls = stack.pop()
            cur_h = pol_node(lh, ls, cur_h, cur_s)
            cur_s += ls
            if cur_s >= MAX_SUM:
                raise PolFailure("range", f"a node sum reaches 2^128 (leaf {n})")
            level += 1
        stack.append((level, cur_h, cur_s))
        out.count = n + 1
    if out.count != header["leaves"] or len(stack) != 1 or stack[0][0] != depth:
        raise PolFailure("depth", f"{out.count} leaves in the file, {header['leaves']} expected")
    _, out.root, out.total = stack[0]
    return out


def _file_lines(f: IO[bytes]) -> Iterator[bytes]:
    for line in f:
        if not line.endswith(b"\n"):
            raise PolFailure("format", "the auditor file is truncated (no final newline)")
        yield line[:-1]


def _replay_to(
    bundle_path: str, platform: str, snapshot: int, position: int
) -> tuple[dict[str, dict[str, int]], bytes | None]:
    """Replay the (already verified) bundle up to `snapshot` records with the bundle verifier's
    own replay; the customer balances (not closed) by currency, and the bytes of the record at
    `position`."""
    ledger = _Ledger(platform)
    record: bytes | None = None
    balances: dict[str, dict[str, int]] | None = None
    pos = 0
    with open(bundle_path, "rb", buffering=1 << 20) as f:
        for line in f:
            if line[:2] != b"R ":
                continue
            if pos == snapshot:
                balances = _customer_balances(ledger)
            data = line.split(b" ", 3)[3][:-1]
            if pos == position:
                record = data
            if pos >= snapshot and pos >= position:
                break
            if pos < snapshot:
                text = data.decode("utf-8")
                rec, _ = _SCAN(text, 0)
                ledger.apply(rec, pos)
            pos += 1
    if balances is None:
        if pos < snapshot:
            raise PolFailure("bundle", f"the bundle has {pos} records, fewer than the snapshot")
        balances = _customer_balances(ledger)
    return balances, record


def _customer_balances(ledger: _Ledger) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for account_id, acc in ledger.accounts.items():
        # slots: kind, currency, non-negative, debits posted, credits posted, ...
        if acc[0] == "customer" and ledger.status.get(account_id) != "closed":
            out.setdefault(acc[1], {})[account_id] = acc[4] - acc[3]
    return out


def verify_full(
    auditor_file: str | Path,
    bundle: str | Path,
    vkey: str | Verifier | Sequence[str | Verifier],
    quiet: bool = True,
) -> AuditResult:
    """The auditor's full check; raises PolFailure naming the failed check."""
    verifiers = _verifiers(vkey)
    # the log itself, end to end (chain, checkpoints, replay invariants)
    try:
        with open(bundle, "rb", buffering=1 << 20) as f:
            summary = verify_bundle(f, verifiers)
    except VerificationFailed as exc:
        raise PolFailure("bundle", exc.failure.describe()) from None
    except OSError as exc:
        raise PolFailure("bundle", f"cannot read the bundle: {exc.strerror}") from None
    try:
        with open(auditor_file, "rb", buffering=1 << 20) as f:
            audit = _read_audit(_file_lines(f))
    except OSError as exc:
        raise PolFailure("format", f"cannot read the auditor file: {exc.strerror}") from None
    header = audit.header
    platform = header["platform"]
    if platform != summary.platform:
        raise PolFailure(
            "statement", f"auditor file of {platform!r}, bundle of {summary.platform!r}"
        )
    # the statement the file claims is the one logged at its position
    log = header.get("log")
    if type(log) is not dict or not _is_int(log.get("position")):
        raise PolFailure("log", "the statement was not published in the log (no position)")
    position = log["position"]
    if not 0 <= position < summary.records:
        raise PolFailure("log", f"position {position} is not in the bundle")
    balances, record = _replay_to(str(bundle), platform, header["snapshot"], position)
    assert record is not None
    stmt = statement_from_record(record, position, platform)
    if log.get("record") != record.decode("utf-8"):
        raise PolFailure("statement", f"the file's record differs from the bundle's at {position}")
    claimed = {k: header[k] for k in STATEMENT_KEYS if k in header}
    if claimed != _statement_json(stmt):
        raise PolFailure("statement", "the auditor file's statement differs from the logged one")
    # the tree the file describes
    if audit.root != stmt.root:
        raise PolFailure("root", "the leaves do not rebuild the published root")
    if audit.total != stmt.total:
        raise PolFailure("total", f"the leaves sum to {audit.total}, published {stmt.total}")
    # against the replayed log
    expected = balances.get(stmt.asset, {})
    got = audit.balances
    missing = sorted(set(expected) - set(got))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PolFailure("customers", f"customer {missing[0]!r}{more} missing from the tree")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise PolFailure(
            "customers", f"leaf for {extra[0]!r}, not a {stmt.asset} customer at the snapshot"
        )
    for account_id in sorted(expected):
        if got[account_id] != expected[account_id]:
            raise PolFailure(
                "balance",
                f"account {account_id!r}: {got[account_id]} in the tree, "
                f"{expected[account_id]} in the log",
            )
    log_total = sum(expected.values())
    if log_total != stmt.total:
        raise PolFailure("total", f"the log's customers hold {log_total}, published {stmt.total}")
    return AuditResult(
        platform,
        stmt.snapshot,
        stmt.asset,
        stmt.depth,
        base64.b64encode(stmt.root).decode(),
        stmt.total,
        audit.count,
        len(got),
        position,
        summary.records,
    )


# -- command line ------------------------------------------------------------------------------


def _load_vkeys(values: list[str]) -> list[Verifier]:
    out: list[Verifier] = []
    for value in values:
        texts = [value]
        path = Path(value)
        if "+" not in value or path.is_file():
            try:
                texts = [t for t in path.read_text("utf-8").splitlines() if t.strip()]
            except OSError as exc:
                raise _Usage(
                    f"--vkey {value!r}: not a key and not a readable file ({exc})"
                ) from None
        for text in texts:
            try:
                out.append(parse_vkey(text))
            except VkeyError as exc:
                raise _Usage(f"--vkey: {exc}") from None
    if not out:
        raise _Usage("at least one --vkey is required")
    return out


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser(prog: str = "custody-verify") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "liabilities",
        help="a customer checks their proof of liabilities",
        description="Check a custody-pol/v1 proof file: the statement is in the log (checkpoint "
        "signed by VKEY, RFC 9162 inclusion), your leaf from YOUR account id, salt and balance "
        "leads to the published root and total, every sum in range.",
    )
    p.add_argument("proof", metavar="PROOF", help="your proof file (<account>.json)")
    p.add_argument("--account", help="your account id (default: the one in the file)")
    p.add_argument(
        "--balance", type=int, help="your balance at the snapshot, from your own statement"
    )
    p.add_argument("--vkey", action="append", default=[], required=True, metavar="VKEY")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "liabilities-audit",
        help="an auditor rebuilds the whole tree and reconciles it with the bundle",
    )
    p.add_argument("auditfile", metavar="AUDITFILE", help="auditor.jsonl")
    p.add_argument("bundle", metavar="BUNDLE", help="the export bundle (covering the statement)")
    p.add_argument("--vkey", action="append", default=[], required=True, metavar="VKEY")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`liabilities PROOF --vkey VKEY [--account ID] [--balance N] [--json]` or
    `liabilities-audit AUDITFILE BUNDLE --vkey VKEY [--json]` (argv starts at the subcommand)."""
    args = build_parser().parse_args(argv)
    try:
        verifiers = _load_vkeys(args.vkey)
        if args.command == "liabilities":
            return _customer(args, verifiers)
        return _auditor(args, verifiers)
    except _Usage as exc:
        print(f"custody-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _emit(args: argparse.Namespace, ok: bool, report: dict[str, Any], text: str) -> int:
    if args.json:
        print(json.dumps({"ok": ok, **report}, indent=2, ensure_ascii=False))
    else:
        print(text)
    return EXIT_OK if ok else EXIT_FAIL


def _customer(args: argparse.Namespace, verifiers: list[Verifier]) -> int:
    try:
        data = Path(args.proof).read_bytes()
    except OSError as exc:
        raise _Usage(f"cannot read proof {args.proof!r}: {exc.strerror}") from None
    try:
        proof = _strict_json(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return _emit(args, False, _fail_json("format", str(exc)), f"FAIL format: {exc}")
    account = args.account
    if account is None:
        account = proof.get("account") if type(proof) is dict else None
        if type(account) is not str:
            raise _Usage("give --account: the proof names no account")
    try:
        result = verify_customer_proof(proof, verifiers, account, args.balance)
    except PolFailure as exc:
        return _emit(args, False, _fail_json(exc.check, exc.reason), f"FAIL {exc}")
    s = result.statement
    lines = [
        f"OK account {result.account!r} with balance {result.balance:,} {s.asset} is included",
        f"   in the proof of liabilities of platform {result.platform!r} at log size "
        f"{s.snapshot:,}",
        f"   total {s.total:,} {s.asset}, depth {s.depth}, root "
        f"{base64.b64encode(s.root).decode()}",
        f"   statement logged at position {s.position:,}, in the signed checkpoint of size "
        f"{result.checkpoint_size:,}",
    ]
    if args.balance is None:
        lines.append(
            "   compare the balance with your own statement at that log size (--balance N "
            "checks it)"
        )
    return _emit(args, True, {"result": result.to_json()}, "\n".join(lines))


def _auditor(args: argparse.Namespace, verifiers: list[Verifier]) -> int:
    try:
        result = verify_full(args.auditfile, args.bundle, verifiers)
    except PolFailure as exc:
        return _emit(args, False, _fail_json(exc.check, exc.reason), f"FAIL {exc}")
    r = result
    text = "\n".join(
        [
            f"OK proof of liabilities of platform {r.platform!r}, {r.asset} at log size "
            f"{r.snapshot:,}",
            f"   {r.leaves:,} leaves rebuilt (depth {r.depth}), every balance in [0, 2^64)",
            f"   root {r.root}, total {r.total:,}",
            f"   {r.customers:,} customer accounts and their balances match the replayed bundle "
            f"({r.bundle_records:,} records)",
            f"   statement logged at position {r.log_position:,} and covered by the bundle's "
            "checkpoint",
        ]
    )
    return _emit(args, True, {"result": r.to_json()}, text)


def _fail_json(check: str, reason: str) -> dict[str, Any]:
    return {"failure": {"check": check, "reason": reason}}


__all__ = [
    "PolFailure",
    "main",
    "verify_customer_proof",
    "verify_full",
]

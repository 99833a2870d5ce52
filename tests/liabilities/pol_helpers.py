"""Shared pieces of the proof-of-liabilities tests: a small platform with varied history, a
published honest tree, dishonest trees, bundle rewriting."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import OPERATOR, Platform, deposit, hold, make_platform, ok, transfer

from ledger import commands as c
from ledger.checkpoint import NoteSigner, origin_for, sign_checkpoint, tlog_proof
from ledger.merkle import MerkleLog
from ledger.service import LedgerService
from projections import liabilities as pol
from projections.liabilities_cli import publish

MIN_DEPTH = 3  # 4 customers -> 2^3 leaves: real and padding leaves side by side
CUSTOMERS = ("alice", "bob", "carol", "dave")


def history(service: LedgerService) -> Platform:
    """Deposits, a transfer, a hold captured in part, a hold left pending, a reversal, a refusal
    and a zero-balance customer (dave)."""
    p = make_platform(service, customers=CUSTOMERS)
    ok(
        service,
        p.id,
        deposit(p, "d1", "alice", 100_000),
        deposit(p, "d2", "bob", 25_000),
        deposit(p, "d3", "carol", 7),
        transfer(p, "t1", "alice", "bob", 1_234),
    )
    far = 1_700_000_000_000 + 10**9
    ok(service, p.id, hold(p, "h1", "alice", "carol", 5_000, far))
    ok(service, p.id, hold(p, "h2", "bob", "alice", 300, far))
    ok(service, p.id, c.CaptureHold(client_id="cap1", hold_id="h1", amount_minor=2_000))
    ok(service, p.id, deposit(p, "d4", "bob", 999))
    ok(service, p.id, c.Reverse(client_id="r1", movement_id="d4", reason="typo"))
    # a refusal (no funds) moves nothing
    [refused] = service.execute(p.id, [transfer(p, "t2", "carol", "alice", 10**9)], "platform:test")
    assert refused.status == "refused"
    return p


def expected_balances(service: LedgerService, platform_id: str) -> dict[str, int]:
    with service.reading(platform_id) as st:
        return {
            a.id: a.posted_minor
            for a in st.accounts.values()
            if str(a.kind) == "customer" and str(a.status) != "closed"
        }


@dataclass
class Published:
    tree: pol.Tree
    log: pol.LogProof
    out: Path
    vkey: str
    bundle: Path

    def proof(self, account: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.out / "proofs" / f"{account}.json").read_text())
        return doc


def publish_honest(service: LedgerService, p: Platform, out: Path) -> Published:
    tree, log = publish(service, p.id, p.currency, OPERATOR, min_depth=MIN_DEPTH, out=out)
    pol.write_outputs(tree, out, log)
    bundle = out / "log.bundle"
    service.export(p.id, bundle)
    return Published(tree, log, out, service.vkey(p.id), bundle)


def publish_tree(
    service: LedgerService, p: Platform, tree: pol.Tree, out: Path, cid: str = "pol-x"
) -> Published:
    """Publish a tree built by the caller (honest or not) and write its files."""
    stmt = tree.statement()
    return publish_statement(service, p, tree, stmt, out, cid)


def publish_statement(
    service: LedgerService,
    p: Platform,
    tree: pol.Tree,
    stmt: dict[str, Any],
    out: Path,
    cid: str = "pol-x",
) -> Published:
    cmd = c.PublishLiabilities(
        client_id=cid,
        snapshot_size=stmt["snapshot"],
        currency=stmt["asset"],
        depth=stmt["depth"],
        root=stmt["root"],
        total_minor=stmt["total"],
    )
    [outcome] = service.execute(p.id, [cmd], OPERATOR)
    assert outcome.status == "accepted", outcome
    cp = service.sign_checkpoint(p.id)
    cp, path, record = service.inclusion_proof(p.id, outcome.seq, cp.size)
    log = pol.LogProof(outcome.seq, record, tlog_proof(outcome.seq, path, cp.note))
    fake = copy.copy(tree)
    if stmt != tree.statement():  # a statement that is not the tree's own: show it as such
        fake = _with_statement(tree, stmt)
    pol.write_outputs(fake, out, log)
    bundle = out / "log.bundle"
    service.export(p.id, bundle)
    return Published(fake, log, out, service.vkey(p.id), bundle)


def _with_statement(tree: pol.Tree, stmt: dict[str, Any]) -> pol.Tree:
    fake = copy.copy(tree)
    fake.levels = [*tree.levels[:-1], base64.b64decode(stmt["root"])]
    fake.sums = [*tree.sums[:-1], [stmt["total"]]]
    return fake


def mod_tree(platform: str, snapshot: int, asset: str, leaves: list[pol.Leaf]) -> pol.Tree:
    """A tree over the given leaves whose sums wrap around modulo 2^128, as a dishonest builder
    with fixed-width arithmetic would compute them (no range checks)."""
    depth = (len(leaves) - 1).bit_length()
    levels = [b"".join(leaf.hash for leaf in leaves)]
    sums = [[leaf.sum % pol.MAX_SUM for leaf in leaves]]
    for _ in range(depth):
        h, s = levels[-1], sums[-1]
        nh, ns = [], []
        for i in range(0, len(s), 2):
            nh.append(
                hashlib.sha256(
                    b"\x11"
                    + h[32 * i : 32 * i + 32]
                    + s[i].to_bytes(16, "big")
                    + h[32 * i + 32 : 32 * i + 64]
                    + s[i + 1].to_bytes(16, "big")
                ).digest()
            )
            ns.append((s[i] + s[i + 1]) % pol.MAX_SUM)
        levels.append(b"".join(nh))
        sums.append(ns)
    index_of = {leaf.account: i for i, leaf in enumerate(leaves) if leaf.account is not None}
    return pol.Tree(platform, snapshot, asset, depth, leaves, levels, sums, index_of)


def signer_for(service: LedgerService, platform_id: str) -> NoteSigner:
    return NoteSigner(service.signing_key, origin_for(service.config.ledger_id, platform_id))


def rewrite_bundle(data: bytes, signer: NoteSigner, change: Any) -> bytes:
    """Re-chain, re-root and re-sign a bundle after `change(records)` edited its record bytes:
    what an operator holding the key could produce. One final checkpoint."""
    lines = data.split(b"\n")
    begin = lines.index(b"begin")
    header = b"\n".join(lines[: begin + 1]) + b"\n"
    records = [ln.split(b" ", 3)[3] for ln in lines if ln.startswith(b"R ")]
    records = change(records)
    tree = MerkleLog.build(records, lambda a, b: records[a:b])
    out = [header]
    link = b"\x00" * 32
    for pos, rec in enumerate(records):
        link = hashlib.sha256(link + rec).digest()
        out.append(b"R %d %s %s\n" % (pos, base64.b64encode(link), rec))
    note = sign_checkpoint(signer, len(records), tree.root(len(records)))
    out.append(b"C " + base64.b64encode(note) + b"\n")
    out.append(b"end %d 1\n" % len(records))
    return b"".join(out)

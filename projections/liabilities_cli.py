"""`custody project liabilities build ...`: build a proof-of-liabilities tree, write its files
and, with --publish, record its statement in the log through the ledger's own command.

`register(subparsers)` adds the `liabilities` parser to the `project` group's subparsers (its
handler is `cmd_liabilities`, also set as the parser default `handler`).

    custody project liabilities build --platform P --currency CNY [--snapshot-size N]
        [--min-depth D] --out DIR [--publish]

Without --publish only the files are written (statement, auditor file, proof files; none of
them carries a log position yet). With --publish the files are first written without it (so the
salts are on disk before the root is committed), then `PublishLiabilities` is executed as the
operator given by the global --actor (`operator:<name>`), a checkpoint covering the new record
is signed, and every file is rewritten with the record's position and its tlog-proof.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ledger.config import Config
from projections import liabilities as pol

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3


def _depth(text: str) -> int:
    value = int(text)
    if not 1 <= value <= pol.MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"depth must be in 1..{pol.MAX_DEPTH}")
    return value


def _size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("the snapshot size is a log size of at least 1")
    return int(text)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `liabilities` (with its `build` action) to a subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "liabilities", help="proof of liabilities: Merkle-sum tree over customer balances"
    )
    sub = parser.add_subparsers(dest="pol_action", required=True, metavar="ACTION")
    b = sub.add_parser(
        "build",
        help="build the tree at a snapshot, write statement, auditor file and proof files",
    )
    b.add_argument("--platform", required=True)
    b.add_argument("--currency", required=True, help="the asset, e.g. CNY")
    b.add_argument(
        "--snapshot-size",
        type=_size,
        help="log size of the cut-off (default: every record committed now)",
    )
    b.add_argument(
        "--min-depth",
        type=_depth,
        default=pol.DEFAULT_MIN_DEPTH,
        help=f"at least 2^D leaves (default {pol.DEFAULT_MIN_DEPTH}); the depth is the smallest "
        "D >= this with 2^D >= 2 x accounts",
    )
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument(
        "--publish",
        action="store_true",
        help="record the statement in the log (as the --actor operator) and attach its "
        "inclusion proof to every file",
    )
    parser.set_defaults(handler=cmd_liabilities)
    return parser


def _config(args: argparse.Namespace) -> Config:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        env["CUSTODY_DATA_DIR"] = args.data_dir
    return Config.from_env(env)


def _print(args: argparse.Namespace, payload: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, ensure_ascii=False, sort_keys=True))
    else:
        print(text)


def cmd_liabilities(args: argparse.Namespace) -> int:
    """Handler of `custody project liabilities ...`."""
    if args.publish:
        actor = getattr(args, "actor", None) or ""
        if not actor.startswith("operator:"):
            print(
                f"--publish needs an operator actor (--actor operator:NAME), not {actor!r}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        return _build(args)
    except pol.LiabilitiesError as exc:
        print(f"cannot build the proof of liabilities: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _build(args: argparse.Namespace) -> int:
    config = _config(args)
    out = Path(args.out)
    if not args.publish:
        from ledger.store import LedgerStore

        store = LedgerStore(config)
        try:
            tree = pol.build_from_store(
                store, args.platform, args.currency, args.snapshot_size, args.min_depth
            )
        finally:
            store.close()
        written = pol.write_outputs(tree, out)
        return _report(args, tree, written, None)
    from ledger.service import LedgerService

    service = LedgerService(config)
    service.start()
    try:
        return _publish(args, service, out)
    finally:
        service.close()


def _publish(args: argparse.Namespace, service: Any, out: Path) -> int:
    tree, log = publish(
        service, args.platform, args.currency, args.actor, args.snapshot_size, args.min_depth, out
    )
    written = pol.write_outputs(tree, out, log)
    return _report(args, tree, written, log)


class PublishRefused(pol.LiabilitiesError):
    pass


def publish(
    service: Any,
    platform: str,
    currency: str,
    actor: str,
    snapshot_size: int | None = None,
    min_depth: int = pol.DEFAULT_MIN_DEPTH,
    out: Path | None = None,
) -> tuple[pol.Tree, pol.LogProof]:
    """Build at `snapshot_size` (default: the committed size), write the files to `out` (if
    given) before anything is published, execute `PublishLiabilities` as `actor`, sign a
    checkpoint covering the record and return the tree with the record's inclusion proof."""
    from ledger import commands as c
    from ledger.checkpoint import tlog_proof

    committed, _head = service.head(platform)
    size = committed if snapshot_size is None else snapshot_size
    if size > committed:
        raise pol.LiabilitiesError(f"snapshot {size} is beyond the committed log size {committed}")
    tree = pol.build_from_store(service.store, platform, currency, size, min_depth)
    if out is not None:
        pol.write_outputs(tree, out)
    stmt = tree.statement()
    cmd = c.PublishLiabilities(
        # one statement per (asset, snapshot): a second, different tree for the same cut-off is
        # refused as ID_REUSED instead of logging two roots a customer would have to choose from
        client_id=f"liabilities:{currency}:{size}",
        snapshot_size=size,
        currency=currency,
        depth=tree.depth,
        root=stmt["root"],
        total_minor=tree.total,
    )
    [outcome] = service.execute(platform, [cmd], actor)
    if outcome.status != "accepted":
        raise PublishRefused(
            f"PublishLiabilities {outcome.status}: {outcome.code} {outcome.message}".strip()
        )
    cp = service.sign_checkpoint(platform)
    cp, path, record = service.inclusion_proof(platform, outcome.seq, cp.size)
    return tree, pol.LogProof(outcome.seq, record, tlog_proof(outcome.seq, path, cp.note))


def _report(
    args: argparse.Namespace, tree: pol.Tree, written: pol.Written, log: pol.LogProof | None
) -> int:
    payload = {
        **tree.statement(),
        "platform": tree.platform,
        "accounts": tree.accounts,
        "statement_file": str(written.statement),
        "auditor_file": str(written.auditor),
        "proofs_dir": str(written.proofs),
        "log_position": None if log is None else log.position,
    }
    lines = [
        tree.text().rstrip("\n"),
        f"{tree.accounts:,} customer accounts, {len(tree.leaves):,} leaves",
        f"wrote {written.statement}, {written.auditor} (0600) and {written.count:,} proof files "
        f"in {written.proofs} (0600)",
    ]
    if log is None:
        lines.append("not published: run again with --publish to record the statement in the log")
    else:
        lines.append(f"published at log position {log.position}; proofs carry its tlog-proof")
        lines.append(
            "customers check with: custody-verify liabilities PROOF --vkey VKEY --account ID"
        )
    _print(args, payload, "\n".join(lines))
    return EXIT_OK

"""`custody backup` / `custody restore`: the whole ledger in one verified archive.

    custody backup --out ledger.backup [--include-keys]
    custody restore ledger.backup --data-dir DIR [--force] \\
        [--checkpoint NOTE ... --vkey VKEY ...] [--schema NAME]

Backups exclude the keys unless --include-keys is given (and then the archive must be kept as
secret as the keys). Restore exits 0 only when every platform's log reloads, matches the
manifest and agrees with every checkpoint (the backup's own and the auditor's); otherwise the
restored data stays for inspection, marked RESTORE-UNVERIFIED (`custody serve` refuses it
unless --accept-restore). docs/OPERATIONS.md has the runbook.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ledger.backup import (
    BackupError,
    PgToolMissing,
    RestoreRefused,
    RestoreReport,
    backup,
    keys_note,
    restore,
)
from ledger.config import Config

EXIT_OK = 0
EXIT_UNVERIFIED = 1  # restored, but it does not verify (marked RESTORE-UNVERIFIED)
EXIT_USAGE = 2
EXIT_REFUSED = 3  # nothing restored / no backup written
EXIT_SKIPPED = 4  # PostgreSQL client tools missing
MAX_NOTE_BYTES = 64 << 10

Handler = Callable[[argparse.Namespace], int]


def register(sub: Any) -> dict[str, Handler]:
    """Add `backup` and `restore` to `custody`'s parser; returns their handlers."""
    b = sub.add_parser(
        "backup",
        help="write a consistent, verifiable archive of the ledger (safe while serving)",
        description="SQLite: the online backup API; PostgreSQL: pg_dump --format=custom of the "
        "ledger's schema. Plus the signed checkpoint logs and a manifest (log sizes, chain "
        "heads, latest checkpoints, SHA-256 of every member). Keys are NOT included unless "
        "--include-keys.",
    )
    b.add_argument("--out", required=True, help="the archive file to write (a tar)")
    b.add_argument(
        "--include-keys",
        action="store_true",
        help="also pack the master key and the checkpoint signing key (then the archive is "
        "as secret as the keys; default: keys excluded, back them up offline)",
    )
    b.add_argument("--pg-bin", help="folder of pg_dump (default: PATH, /usr/lib/postgresql/*/bin)")
    r = sub.add_parser(
        "restore",
        help="restore an archive into an empty data folder (and schema), then verify it",
        description="Verifies every member's hash before placing anything, then reloads every "
        "platform's log (chain and replay), compares it with the manifest, the backup's "
        "checkpoints and the auditor's (--checkpoint with --vkey). A restore older than a "
        "known checkpoint, or a fork, exits 1 and stays marked RESTORE-UNVERIFIED.",
    )
    r.add_argument("archive", help="a custody-backup/v1 archive")
    r.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="the (empty) data folder to restore into (CUSTODY_DATA_DIR)",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="restore into a non-empty folder/schema: what it replaces is moved aside "
        "(before-restore-<ms>/, schema <name>_before_restore_<n>), never deleted",
    )
    r.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NOTE",
        help="a signed checkpoint note an auditor holds (repeatable); needs --vkey",
    )
    r.add_argument(
        "--vkey",
        action="append",
        default=[],
        help="a verifier key the auditor trusts (repeatable; `custody keys vkey`)",
    )
    r.add_argument("--schema", help="PostgreSQL: the target schema (default POSTGRES_SCHEMA)")
    r.add_argument("--dbname", help="PostgreSQL: the target database (default POSTGRES_DBNAME)")
    r.add_argument("--pg-bin", help="folder of pg_restore and psql")
    return {"backup": cmd_backup, "restore": cmd_restore}


def _config(args: argparse.Namespace) -> Config:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        env["CUSTODY_DATA_DIR"] = args.data_dir
    if getattr(args, "schema", None):
        env["POSTGRES_SCHEMA"] = args.schema
    if getattr(args, "dbname", None):
        env["POSTGRES_DBNAME"] = args.dbname
    return Config.from_env(env)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(payload, sort_keys=True))
    else:
        print(text)


def cmd_backup(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        result = backup(config, args.out, include_keys=args.include_keys, pg_bin=args.pg_bin)
    except PgToolMissing as exc:
        print(f"backup skipped: {exc}", file=sys.stderr)
        return EXIT_SKIPPED
    except BackupError as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    manifest = result.manifest
    platforms = manifest["platforms"]
    lines = [f"wrote {result.path} ({result.bytes:,} bytes, {config.store})"]
    for pid, info in sorted(platforms.items()):
        cp = info["checkpoint"]
        signed = f"checkpoint at {cp['size']}" if cp else "no checkpoint yet"
        lines.append(
            f"  {pid}: {info['size']:,} records, head {str(info['head'])[:16]}..., {signed}"
        )
    if not result.keys_included:
        # loud, on stderr, every time: the archive alone cannot bring the ledger back whole
        print("\n*** " + keys_note(config) + " ***\n", file=sys.stderr)
    else:
        lines.append(
            "KEYS INCLUDED: this archive holds the master key and the signing key; keep it "
            "encrypted and offline like the keys themselves"
        )
    payload = {
        "path": str(result.path),
        "bytes": result.bytes,
        "keys_included": result.keys_included,
        "manifest": {k: v for k, v in manifest.items() if k != "members"},
        "members": [m["name"] for m in manifest["members"]],
    }
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _read_notes(paths: list[str]) -> list[bytes]:
    notes = []
    for path in paths:
        data = Path(path).read_bytes()
        if len(data) > MAX_NOTE_BYTES:
            raise RestoreRefused(f"{path} is too large to be a checkpoint note")
        notes.append(data)
    return notes


def _report_text(report: RestoreReport) -> str:
    lines = [f"restored {report.archive} into {report.target}"]
    for pid, check in sorted(report.platforms.items()):
        lines.append(
            f"  {pid}: {check.size:,} records, head {check.head[:16]}..., "
            f"{check.checkpoints_checked} backup checkpoint(s) and "
            f"{check.auditor_checkpoints_checked} auditor checkpoint(s) agree"
            if not any(p.platform == pid for p in report.problems)
            else f"  {pid}: {check.size:,} records — see problems below"
        )
    for moved in report.moved_aside:
        lines.append(f"  moved aside: {moved}")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    if report.ok:
        lines.append("VERIFIED: every log reloads, matches the manifest and every checkpoint")
    else:
        lines.append(
            "RESTORE UNVERIFIED (marked; `custody serve` refuses it without --accept-restore):"
        )
        lines.extend(f"  {p.code}: {p.message}" for p in report.problems)
    return "\n".join(lines)


def cmd_restore(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        notes = _read_notes(args.checkpoint)
    except OSError as exc:
        print(f"cannot read checkpoint: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = restore(
            config,
            args.archive,
            force=args.force,
            checkpoints=notes,
            vkeys=args.vkey,
            pg_bin=args.pg_bin,
        )
    except PgToolMissing as exc:
        print(f"restore skipped: {exc}", file=sys.stderr)
        return EXIT_SKIPPED
    except (RestoreRefused, BackupError) as exc:
        print(f"restore refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    _emit(args, report.as_dict(), _report_text(report))
    return EXIT_OK if report.ok else EXIT_UNVERIFIED

"""`custody-verify`: the auditor's offline verifier for Custody Ledger exports and proofs.

Exit status: 0 everything verifies, 1 verification failed, 2 unusable arguments or input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from custody_verify import __version__
from custody_verify.bundle import VerificationFailed, verify_bundle
from custody_verify.merkle import consistency_failure
from custody_verify.note import (
    NoteError,
    Verifier,
    VkeyError,
    b64decode_strict,
    b64encode,
    open_checkpoint,
    open_note,
    parse_checkpoint,
    parse_vkey,
)
from custody_verify.proof import ProofFormatError, ProofInvalid, verify_tlog_proof

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

DESCRIPTION = """\
Verify, offline and without trusting the ledger operator, what a Custody Ledger publishes:

  bundle       a platform's whole exported log (records, chain links, signed checkpoints):
               re-derives every chain link and the Merkle root at every checkpoint, checks
               every checkpoint signature, replays the records and checks the ledger
               invariants (double entry per currency, no negative customer balance, refusals
               change nothing, positions contiguous from 0)
  note         one signed checkpoint (a C2SP signed note)
  inclusion    a C2SP tlog-proof that one record is in a signed checkpoint
  consistency  that an older signed checkpoint is a prefix of a newer one
  liabilities  a customer's proof that their balance is in a published proof-of-liabilities
               tree (custody-pol/v1) whose statement is in a signed checkpoint
               custody-verify liabilities PROOF.json --vkey VKEY [--account ID --balance N]
  liabilities-audit  the whole tree rebuilt from the auditor file and checked against the
               balances replayed from the bundle: AUDITOR.jsonl BUNDLE --vkey VKEY
  disclosure   a signed regulator disclosure snapshot: its signature, and that it equals what
               this program recomputes from the platform's bundle (every differing field named)
               custody-verify disclosure SNAPSHOT.json BUNDLE --vkey VKEY

Every command needs the ledger's verifier key (--vkey), obtained from the operator through a
channel you trust (for example the audit engagement letter). It looks like
  custody-ledger.example/<ledger-id>/<platform>+1a2b3c4d+AXh0...
--vkey may be repeated, or name a file holding one key per line.

Exit status: 0 everything verifies, 1 verification failed (the report names the first bad
record or checkpoint), 2 the arguments or files are unusable.

This program depends only on the Python standard library and `cryptography`; it shares no code
with the ledger that produced the files.
"""

EPILOG = """\
examples:
  custody-verify bundle p1.bundle --vkey "$(cat ledger.vkey)"
  custody-verify bundle p1.bundle --vkey ledger.vkey --json > report.json
  custody-verify note checkpoint.note --vkey ledger.vkey
  custody-verify inclusion rec-1234.tlog-proof --leaf rec-1234.json --vkey ledger.vkey
  custody-verify consistency old.note new.note proof.txt --vkey ledger.vkey

formats are specified in docs/BUNDLE.md (bundle) and c2sp.org (signed-note, tlog-checkpoint,
tlog-proof). A --leaf file holds the record's exact canonical bytes (no trailing newline).
"""


BUNDLE_HELP = """\
Verify a custody-bundle/v1 file (docs/BUNDLE.md) in one streaming pass; memory stays flat in
the log size (only live accounts and pending holds are kept).

Checked, in file order: the header names a key you trust; record positions run 0, 1, 2, ...;
every chain link is SHA-256(previous link || record); at every checkpoint the signature is by a
trusted key and the signed RFC 6962 root equals the root of the records so far; the last
checkpoint covers every record; the replay keeps double entry per currency, no negative
available balance on customer / own-funds / fee-income / suspense accounts, refusals change
nothing, one platform throughout.

--level integrity checks everything above except the replay (the records are hashed, not
decoded), in --jobs processes; it is several times faster and says so in its report.

On failure the report names the FIRST bad place:
  record N        a changed, missing, inserted, duplicated or reordered record, or a record
                  that breaks an invariant
  checkpoint N    a checkpoint (by tree size) not signed by a trusted key, or whose root does
                  not match the records before it (history rewritten, or a forked checkpoint)
  header / end    the bundle header or end line; "bundle": the file is truncated
"""


class UsageError(Exception):
    pass


def _load_vkeys(values: list[str]) -> list[Verifier]:
    verifiers: list[Verifier] = []
    for value in values:
        path = Path(value)
        texts = [value]
        if "+" not in value or path.is_file():
            try:
                texts = [t for t in path.read_text("utf-8").splitlines() if t.strip()]
            except OSError as exc:
                raise UsageError(
                    f"--vkey {value!r}: not a key and not a readable file ({exc})"
                ) from None
        for text in texts:
            try:
                verifiers.append(parse_vkey(text))
            except VkeyError as exc:
                raise UsageError(f"--vkey {text!r}: {exc}") from None
    if not verifiers:
        raise UsageError("at least one --vkey is required")
    return verifiers


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc}") from None


def _emit(args: argparse.Namespace, ok: bool, report: dict[str, Any], lines: list[str]) -> int:
    if args.json:
        report = {"ok": ok, **report}
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        for line in lines:
            print(line)
    return EXIT_OK if ok else EXIT_FAIL


def _load_held(paths: list[str], verifiers: list[Verifier]) -> list[Any]:
    """Checkpoint notes the auditor kept; each must be signed by a key passed with --vkey."""
    held = []
    for path in paths:
        try:
            held.append(open_checkpoint(_read(path, "checkpoint"), verifiers))
        except NoteError as exc:
            raise UsageError(f"--checkpoint {path!r}: {exc}") from None
    return held


def cmd_bundle(args: argparse.Namespace) -> int:
    verifiers = _load_vkeys(args.vkey)
    held = _load_held(args.checkpoint, verifiers)
    try:
        f = open(args.file, "rb", buffering=1 << 20)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read bundle {args.file!r}: {exc}") from None
    started = time.monotonic()
    last = [started]

    def progress(n: int) -> None:
        now = time.monotonic()
        if not args.quiet and now - last[0] >= 1.0:
            last[0] = now
            rate = n / (now - started)
            print(f"custody-verify: {n:,} records verified ({rate:,.0f}/s)", file=sys.stderr)

    with f:
        try:
            summary = verify_bundle(
                f, verifiers, progress, jobs=args.jobs, level=args.level, held=held
            )
        except VerificationFailed as exc:
            failure = exc.failure
            report = {
                "bundle": args.file,
                "failure": failure.to_json(),
                "verified_before_failure": exc.summary.to_json(),
            }
            return _emit(args, False, report, [f"FAIL {failure.describe()}"])
    s = summary
    rate = f"{s.records / s.seconds:,.0f}" if s.seconds else "-"
    if s.level == "integrity":
        lines = [
            f"OK {s.records:,} records of platform {s.platform!r}: integrity verified "
            "(chain, Merkle roots, signatures; records NOT replayed, see --level full)",
            f"   origin      {s.origin}",
            f"   checkpoints {s.checkpoints} signed, last at size {s.checkpoint_size} "
            f"root {s.checkpoint_root}",
            f"   chain head  {s.chain_head}",
            f"   held        {s.held_checkpoints} checkpoint(s) you hold match the records",
            f"   {s.seconds:.2f} s, {rate} records/s",
        ]
        return _emit(args, True, {"bundle": args.file, "summary": s.to_json()}, lines)
    lines = [
        f"OK {s.records:,} records of platform {s.platform!r} verified",
        f"   origin      {s.origin}",
        f"   checkpoints {s.checkpoints} signed, last at size {s.checkpoint_size} "
        f"root {s.checkpoint_root}",
        f"   chain head  {s.chain_head}",
        f"   held        {s.held_checkpoints} checkpoint(s) you hold match the records",
        f"   refused     {s.refused:,} (changed nothing)",
        f"   accounts    {s.accounts:,}, pending holds {s.pending_holds:,}",
        f"   policy      version {s.policy_version}, gate {s.gate}, "
        f"{s.pending_requests:,} requests waiting for a checker, {s.standing:,} standing "
        "authorisations",
        f"   alerts      {s.alerts:,} raised, {s.open_alerts:,} open",
        f"   reconciled  {s.reconciliations:,} days ({s.requirements_checked:,} requirements "
        f"recomputed, {s.requirements_unchecked:,} not recomputable), {s.settlements:,} "
        f"settlements, {s.unsettled:,} unsettled",
    ]
    for ccy, per in sorted(s.balances.items()):
        parts = ", ".join(f"{k} {v:,}" for k, v in sorted(per.items()))
        lines.append(f"   {ccy}         {parts}; held {s.held.get(ccy, 0):,}")
    lines.append(f"   {s.seconds:.2f} s, {rate} records/s")
    return _emit(args, True, {"bundle": args.file, "summary": s.to_json()}, lines)


def _checkpoint_report(cp: Any, verified: list[Any]) -> dict[str, Any]:
    return {
        "origin": cp.origin,
        "size": cp.size,
        "root": b64encode(cp.root),
        "signed_by": [f"{s.name}+{s.key_id_hex}" for s in verified],
    }


def cmd_note(args: argparse.Namespace) -> int:
    verifiers = _load_vkeys(args.vkey)
    data = _read(args.file, "note")
    try:
        note = open_note(data, verifiers)
        cp = parse_checkpoint(note.text)
    except NoteError as exc:
        return _emit(args, False, {"note": args.file, "error": str(exc)}, [f"FAIL {exc}"])
    report = _checkpoint_report(cp, note.verified)
    lines = [
        f"OK checkpoint of {cp.origin} at size {cp.size}",
        f"   root      {report['root']}",
        f"   signed by {', '.join(report['signed_by'])}",
    ]
    return _emit(args, True, {"note": args.file, "checkpoint": report}, lines)


def cmd_inclusion(args: argparse.Namespace) -> int:
    verifiers = _load_vkeys(args.vkey)
    data = _read(args.proof, "proof")
    leaf = _read(args.leaf, "leaf")
    try:
        proof, cp = verify_tlog_proof(data, leaf, verifiers, origin=args.origin)
    except (ProofFormatError, ProofInvalid) as exc:
        msg = str(exc)
        if leaf.endswith(b"\n"):
            msg += " (note: the leaf file ends with a newline; record bytes have none)"
        return _emit(args, False, {"proof": args.proof, "error": msg}, [f"FAIL {msg}"])
    report = {"index": proof.index, "checkpoint": _checkpoint_report(cp, [])}
    lines = [f"OK record {proof.index} is included in {cp.origin} at size {cp.size}"]
    return _emit(args, True, report, lines)


def cmd_consistency(args: argparse.Namespace) -> int:
    verifiers = _load_vkeys(args.vkey)
    old_data = _read(args.old, "old note")
    new_data = _read(args.new, "new note")
    proof_text = _read(args.proof, "proof")
    try:
        path = [b64decode_strict(x) for x in proof_text.split()]
    except ValueError as exc:
        return _emit(args, False, {"error": f"proof: {exc}"}, [f"FAIL proof: {exc}"])
    try:
        old = open_checkpoint(old_data, verifiers)
        new = open_checkpoint(new_data, verifiers)
    except NoteError as exc:
        return _emit(args, False, {"error": str(exc)}, [f"FAIL {exc}"])
    if old.origin != new.origin:
        msg = f"different logs: {old.origin!r} and {new.origin!r}"
        return _emit(args, False, {"error": msg}, [f"FAIL {msg}"])
    why = consistency_failure(old.size, new.size, old.root, new.root, path)
    if why is not None:
        msg = f"size {old.size} -> {new.size}: {why}"
        return _emit(args, False, {"error": msg}, [f"FAIL {msg}"])
    report = {"origin": old.origin, "old_size": old.size, "new_size": new.size}
    lines = [f"OK {old.origin}: size {old.size} is a prefix of size {new.size}"]
    return _emit(args, True, report, lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2 (argparse's default too)
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="custody-verify", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"custody-verify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--vkey",
            action="append",
            default=[],
            required=True,
            metavar="VKEY",
            help="trusted verifier key (name+keyid+base64), or a file of keys; repeatable",
        )
        p.add_argument("--json", action="store_true", help="machine-readable report on stdout")

    p = sub.add_parser(
        "bundle",
        help="verify an exported bundle end to end",
        description=BUNDLE_HELP,
        formatter_class=fmt,
    )
    p.add_argument("file", metavar="FILE", help="the bundle, as written by `custody export`")
    common(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NOTE",
        help="a signed checkpoint of this log you already hold (repeatable): the records' "
        "Merkle root at its size must be its root, so a history rewritten and re-signed since "
        "is caught; a bundle shorter than it fails",
    )
    p.add_argument(
        "--level",
        choices=("full", "integrity"),
        default="full",
        help="full (default): every check, including the replay of every record; "
        "integrity: header, positions, chain links, Merkle roots, checkpoint signatures and "
        "end line only -- the records are NOT decoded or replayed (docs/BUNDLE.md §2.1)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        choices=range(1, 65),
        default=1,
        metavar="N",
        help="processes: at --level full, 2 or more replays the records in a second process, "
        "pipelined with the hashing (~1.3-1.5x on an idle multi-core machine, slower on a busy "
        "one); at --level integrity, N processes check blocks of the file in parallel "
        "(default 1)",
    )
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("note", help="verify one signed checkpoint note")
    p.add_argument("file", metavar="FILE", help="the signed note (tlog-checkpoint)")
    common(p)
    p.set_defaults(func=cmd_note)

    p = sub.add_parser(
        "inclusion",
        help="verify a tlog-proof against a record's bytes",
        description="Check a c2sp.org/tlog-proof@v1 file: the checkpoint signature, then the "
        "RFC 9162 inclusion of LEAF(record bytes), hashed here from --leaf.",
    )
    p.add_argument("proof", metavar="PROOF", help="the .tlog-proof file")
    p.add_argument("--leaf", required=True, metavar="FILE", help="the record's exact bytes")
    p.add_argument("--origin", help="require this checkpoint origin")
    common(p)
    p.set_defaults(func=cmd_inclusion)

    p = sub.add_parser(
        "consistency",
        help="verify that an older checkpoint is a prefix of a newer one",
        description="PROOF_FILE holds the RFC 9162 consistency proof, one base64 hash per line.",
    )
    p.add_argument("old", metavar="OLD_NOTE")
    p.add_argument("new", metavar="NEW_NOTE")
    p.add_argument("proof", metavar="PROOF_FILE")
    common(p)
    p.set_defaults(func=cmd_consistency)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["liabilities"], ["liabilities-audit"]):
        from custody_verify import liabilities

        return int(liabilities.main(argv))
    if argv[:1] == ["disclosure"]:
        from custody_verify import disclosure as disclosure_cmd

        return int(disclosure_cmd.main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"custody-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

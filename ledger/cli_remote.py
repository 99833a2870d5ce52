"""`custody remote`: talk to a running ledger server over the custody.v1 gRPC API.

Everything here goes through `ledger.api.client.CustodyClient`: every call has a deadline,
retries resend the identical request, and every write carries a client id (a new UUID unless
`--client-id` is given, printed with the answer), so running the same command again with that
`--client-id` is always safe: an instruction that already committed is answered REPLAYED.

    custody remote --target ledger:50051 --tls-dir tls --cert platform-p1 balance alice
    custody remote --tls-dir tls --cert platform-p1 transfer --from alice --to bob \\
        --amount 2500 --currency CNY --sign-with alice.pem
    custody remote --tls-dir tls --cert checker-dev --platform p1 requests approve REQ
    custody remote --insecure-dev --role auditor --name ann --platform p1 audit --outcome refused

Exit codes: 0 done (a write may be pending a checker), 1 refused by the ledger (the reason code
is printed), 2 usage, 3 the server could not be reached or did not answer in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import grpc
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
DEFAULT_TARGET: Final = "127.0.0.1:50051"
MAX_BATCH_FILE_BYTES: Final = 64 << 20
UNREACHABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments or input files (exit 2)."""


# -- the parser ------------------------------------------------------------------------------------


def register(subparsers: Any) -> dict[str, Handler]:
    """Add `remote` to `custody`'s subcommands; returns its handler by command name."""
    remote = subparsers.add_parser(
        "remote",
        help="use a running ledger server over gRPC (mutual TLS, or --insecure-dev on loopback)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conn = remote.add_argument_group("connection")
    conn.add_argument("--target", default=DEFAULT_TARGET, help=f"HOST:PORT ({DEFAULT_TARGET})")
    conn.add_argument("--tls-dir", help="folder with ca.pem and the client certificates")
    conn.add_argument("--cert", help="client certificate stem in --tls-dir, e.g. platform-p1")
    conn.add_argument(
        "--server-name", help="TLS name to expect from the server (default: from --target)"
    )
    conn.add_argument(
        "--insecure-dev",
        action="store_true",
        help="no TLS, identity sent as headers: only to a loopback server in development mode",
    )
    conn.add_argument("--role", dest="dev_role", help="--insecure-dev: the role to act as")
    conn.add_argument(
        "--name", dest="dev_name", help="--insecure-dev: your name, or the platform id"
    )
    conn.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    remote.add_argument("--platform", help="platform id (staff roles; platforms: their own)")
    _json_flag(remote)
    sub = remote.add_subparsers(dest="remote_command", required=True, metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--platform", default=argparse.SUPPRESS, help="platform id")
        _json_flag(p)
        return p

    bal = add("balance", "current balances: one account, or every account")
    bal.add_argument("account_id", nargs="?")
    bal.add_argument("--max-pages", type=_positive, default=100)

    st = add("statement", "an account's statement lines, oldest first (read model)")
    st.add_argument("account_id")
    st.add_argument("--from-ms", type=_non_negative, help="from this time (Unix ms, inclusive)")
    st.add_argument("--to-ms", type=_non_negative, help="up to this time (Unix ms, inclusive)")
    st.add_argument("--kind", action="append", default=[], help="only these record kinds")
    _paging(st)

    ba = add("balance-at", "balance after a log position or at a time (read model)")
    ba.add_argument("account_id")
    at = ba.add_mutually_exclusive_group()
    at.add_argument("--at-ms", type=_non_negative, help="Unix ms")
    at.add_argument("--at-position", type=_non_negative, help="log position")

    au = add("audit", "the audit trail: who did what, accepted or refused (read model)")
    au.add_argument("--account")
    au.add_argument("--actor", help="<role>:<name>")
    au.add_argument("--role", dest="filter_role", help="the actor's role")
    au.add_argument("--op", help="operation, e.g. transfer")
    au.add_argument("--kind", help="record kind, e.g. command_refused")
    au.add_argument("--code", help="refusal reason code")
    au.add_argument("--outcome", choices=["accepted", "refused"])
    au.add_argument("--from-ms", type=_non_negative)
    au.add_argument("--to-ms", type=_non_negative)
    au.add_argument("--from-position", type=_non_negative)
    au.add_argument("--to-position", type=_non_negative)
    _paging(au)

    tr = add("transfer", "move customer money (signed by the payer with --sign-with)")
    tr.add_argument("--from", dest="from_account", required=True)
    tr.add_argument("--to", dest="to_account", required=True)
    tr.add_argument("--amount", type=_amount, required=True, help="minor units (integer)")
    tr.add_argument("--currency", required=True)
    tr.add_argument("--purpose", default="transfer")
    tr.add_argument("--sign-with", help="the payer's Ed25519 private key file (PEM)")
    tr.add_argument(
        "--expires-at-ms",
        type=_positive,
        help="signature expiry (default: now + 2 min); give the printed one to retry",
    )
    _client_id(tr)

    sb = add("submit-batch", "submit instructions from a JSON file (one object or a list)")
    sb.add_argument(
        "file",
        help="commands as in docs/FORMAT.md ({'op': 'transfer', 'client_id': ..., ...}), "
        "e.g. from `custody customer sign`; '-' reads stdin",
    )
    sb.add_argument("--linked", action="store_true", help="all or none")

    rq = add("requests", "maker-checker requests: list, approve, reject")
    rq.add_argument("action", choices=["list", "approve", "reject"])
    rq.add_argument("request_id", nargs="?")
    rq.add_argument("--status", choices=["pending", "approved", "rejected", "expired"])
    rq.add_argument("--reason", help="reject: why")
    rq.add_argument("--max-pages", type=_positive, default=100)
    _client_id(rq)

    po = add("policy", "the policy in force, its version and the gate")
    po.add_argument("action", choices=["show"])

    su = add("subscribe", "print the platform's log from a position")
    su.add_argument("--from", dest="start", type=_non_negative, default=0, help="position")
    su.add_argument("--follow", action="store_true", help="wait for new records (Ctrl-C ends)")
    su.add_argument("--count", type=_positive, help="stop after this many records")

    cp = add("checkpoint", "the latest signed checkpoint, or sign one now")
    cp.add_argument("--sign", action="store_true", help="sign a checkpoint of the log now")
    cp.add_argument("--size", type=_non_negative, default=0, help="the one signed at SIZE")

    ex = add("export", "download the export bundle (custody-bundle/v1)")
    ex.add_argument("--out", required=True, help="bundle file to write")
    ex.add_argument("--timeout-export", type=float, default=600.0, help="seconds")

    di = add("disclosure", "regulator disclosure snapshots: build (operators), get, list")
    di.add_argument("action", choices=["build", "get", "list"])
    period = di.add_mutually_exclusive_group()
    period.add_argument("--day", help="business day YYYY-MM-DD")
    period.add_argument("--month", help="calendar month YYYY-MM")
    period.add_argument("--from-ms", type=_non_negative, help="range start, Unix ms")
    di.add_argument("--to-ms", type=_positive, help="range end (exclusive), Unix ms")
    di.add_argument("--checkpoint-size", type=_non_negative, default=0)
    di.add_argument("--out", help="write <name>.json, .note, .html, .csv into this folder")
    di.add_argument("--name", help="file name stem (default: <platform>-disclosure-<period>-<N>)")
    di.add_argument("--max-pages", type=_positive, default=100)

    li = add("liabilities", "proof of liabilities: published statements, a customer's proof")
    li.add_argument("action", choices=["statement", "proof"])
    li.add_argument("account_id", nargs="?", help="proof: the customer account")
    li.add_argument("--currency", default="", help="ISO 4217 (proof: required)")
    li.add_argument("--snapshot-size", type=_non_negative, default=0, help="0 = latest")
    li.add_argument("--out", help="proof: the file to write (0600; it carries the salt)")

    al = add("alerts", "early-warning alerts: list, ack, close, stream, indicators")
    al.add_argument("action", choices=["list", "ack", "close", "stream", "indicators"])
    al.add_argument("alert_id", nargs="?")
    al.add_argument("--level", choices=["GREEN", "YELLOW", "ORANGE", "RED"])
    al.add_argument("--status", choices=["raised", "acknowledged", "closed"])
    al.add_argument("--note", help="ack: what is being done")
    al.add_argument("--reason", help="close: why (e.g. the top-up's id)")
    al.add_argument("--from", dest="start", type=_non_negative, default=0, help="log position")
    al.add_argument("--follow", action="store_true", help="stream: wait for new alerts")
    al.add_argument("--count", type=_positive, help="stream: stop after this many")
    al.add_argument("--from-day", type=_non_negative, default=0, help="indicators: first day")
    al.add_argument("--max-pages", type=_positive, default=100)
    _client_id(al)
    return {"remote": cmd_remote}


def _json_flag(p: argparse.ArgumentParser) -> None:
    """`--json` before or after the subcommand; SUPPRESS keeps an earlier `--json` (argparse
    lets a subparser's defaults overwrite its parent's values)."""
    p.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text"
    )


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=_non_negative, default=0, help="0: the server's (100)")
    p.add_argument("--page-token", default="", help="continue a previous listing")
    p.add_argument("--all", action="store_true", help="every page (up to --max-pages)")
    p.add_argument("--max-pages", type=_positive, default=1000)


def _client_id(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client-id",
        help="idempotency key (default: a new UUID, printed); give the same one to retry safely",
    )


def _amount(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("amount is an integer count of minor units, e.g. 12345")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("give a non-negative integer")
    return int(text)


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError("give a positive integer")
    return value


# -- connecting --------------------------------------------------------------------------------


def _loopback_target(target: str) -> bool:
    from ledger.api.server import is_loopback

    host = target.rsplit(":", 1)[0] if ":" in target else target
    return is_loopback(host.strip("[]"))


@contextmanager
def connect(args: argparse.Namespace) -> Iterator[Any]:
    """A CustodyClient for the arguments (platform id known when the identity is a platform's,
    so customer signatures can be made)."""
    from ledger.api.auth import IdentityError, identity_from_pem
    from ledger.api.client import CustodyClient

    platform = getattr(args, "platform", None) or ""
    common: dict[str, Any] = {"timeout_s": args.timeout}
    if args.insecure_dev:
        if args.tls_dir or args.cert:
            raise UsageError("choose --tls-dir/--cert (mutual TLS) or --insecure-dev, not both")
        if not args.dev_role or not args.dev_name:
            raise UsageError("--insecure-dev needs --role and --name")
        if not _loopback_target(args.target):
            raise UsageError("--insecure-dev only talks to a loopback server (127.0.0.1, ::1)")
        if args.dev_role == "platform":
            platform = platform or args.dev_name
        client = CustodyClient.insecure_dev(
            args.target, args.dev_role, args.dev_name, platform_id=platform, **common
        )
    else:
        if not args.tls_dir or not args.cert:
            raise UsageError("give --tls-dir and --cert (or --insecure-dev for local development)")
        tls = Path(args.tls_dir)
        paths = [tls / "ca.pem", tls / f"{args.cert}.pem", tls / f"{args.cert}.key"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"missing TLS files: {', '.join(missing)}")
        try:
            identity = identity_from_pem(paths[1].read_bytes())
        except (IdentityError, ValueError) as exc:
            raise UsageError(f"{paths[1]} is not a custody client certificate: {exc}") from None
        if identity.platform_id is not None:
            platform = platform or identity.platform_id
        client = CustodyClient.mtls(
            args.target,
            paths[0],
            paths[1],
            paths[2],
            server_name=args.server_name,
            platform_id=platform,
            **common,
        )
    try:
        yield client
    finally:
        client.close()


# -- output ----------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=False, sort_keys=True))
    else:
        print(text)


def _receipt(args: argparse.Namespace, receipt: Any, extra: Mapping[str, Any] | None = None) -> int:
    data = {**dataclasses.asdict(receipt), **(extra or {})}
    if receipt.pending:
        text = (
            f"pending approval: request {receipt.request_id} (position {receipt.position}); "
            "a checker approves it with `requests approve`"
        )
    else:
        text = (
            f"{receipt.status}: {receipt.kind} at position {receipt.position} "
            f"(client id {receipt.client_id})"
        )
    _emit(args, data, text)
    return EXIT_OK


def _balance_dict(b: Any) -> dict[str, Any]:
    return {
        "account_id": b.account_id,
        "currency": b.currency,
        "posted_minor": b.posted_minor,
        "held_minor": b.held_minor,
        "available_minor": b.available_minor,
        "as_of_position": b.as_of_position,
    }


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in out)


def _approval_dict(a: Any) -> dict[str, Any]:
    from ledger.api.pb import approval_pb

    status = approval_pb.ApprovalStatus.Name(a.status).removeprefix("APPROVAL_STATUS_").lower()
    try:
        instruction = json.loads(a.instruction_json) if a.instruction_json else None
    except ValueError:
        instruction = None
    return {
        "request_id": a.request_id,
        "operation": a.operation,
        "status": status,
        "maker": a.maker,
        "expires_at_ms": a.expires_at_ms,
        "position": a.position,
        "approval_client_id": a.approval_client_id,
        "instruction": instruction,
    }


def _checkpoint_dict(cp: Any) -> dict[str, Any]:
    return {"size": cp.size, "root_hex": cp.root.hex(), "note": cp.note.decode()}


# -- subcommands -----------------------------------------------------------------------------------


def _balance(args: argparse.Namespace, client: Any) -> int:
    if args.account_id:
        b = _balance_dict(client.get_balance(args.account_id))
        text = (
            f"{b['account_id']}: posted {b['posted_minor']} held {b['held_minor']} "
            f"available {b['available_minor']} {b['currency']} (position {b['as_of_position']})"
        )
        _emit(args, b, text)
        return EXIT_OK
    rows = [_balance_dict(b) for b in client.iter_balances(max_pages=args.max_pages)]
    cols = ["account_id", "currency", "posted_minor", "held_minor", "available_minor"]
    _emit(args, rows, _table(rows, cols))
    return EXIT_OK


def _pages(args: argparse.Namespace, fetch: Callable[[str], Any]) -> tuple[list[Any], Any, str]:
    """One page, or (--all) every page from --page-token on; (items, last page, next token)."""
    page = fetch(args.page_token)
    items = list(page.items)
    pages = 1
    while args.all and page.next_page_token:
        if pages >= args.max_pages:
            print(
                f"stopped after {pages} pages (--max-pages); continue with --page-token "
                f"{page.next_page_token}",
                file=sys.stderr,
            )
            break
        page = fetch(page.next_page_token)
        items += page.items
        pages += 1
    return items, page, page.next_page_token


def _statement(args: argparse.Namespace, client: Any) -> int:
    items, page, token = _pages(
        args,
        lambda t: client.get_statement(
            args.account_id,
            from_time_ms=args.from_ms,
            to_time_ms=args.to_ms,
            kinds=args.kind,
            page_size=args.page_size,
            page_token=t,
        ),
    )
    rows = [dataclasses.asdict(line) for line in items]
    data = {
        "account_id": args.account_id,
        "currency": page.currency,
        "as_of_position": page.as_of_position,
        "lines": rows,
        "next_page_token": token,
    }
    cols = [
        "position",
        "time_ms",
        "kind",
        "direction",
        "amount_minor",
        "counterparty_account_id",
        "posted_minor",
        "held_minor",
        "client_id",
    ]
    text = (
        f"statement of {args.account_id} ({page.currency}) as of position "
        f"{page.as_of_position}\n{_table(rows, cols)}"
    )
    if token:
        text += f"\nnext page: --page-token {token}"
    _emit(args, data, text)
    return EXIT_OK


def _balance_at(args: argparse.Namespace, client: Any) -> int:
    b = client.get_balance_at(args.account_id, at_time_ms=args.at_ms, at_position=args.at_position)
    data = dataclasses.asdict(b)
    text = (
        f"{b.account_id} after position {b.as_of_position}: posted {b.posted_minor} held "
        f"{b.held_minor} available {b.available_minor} {b.currency} "
        f"(last movement at {b.last_movement_position})"
    )
    _emit(args, data, text)
    return EXIT_OK


def _audit(args: argparse.Namespace, client: Any) -> int:
    filters: dict[str, Any] = {
        "account_id": args.account or "",
        "actor": args.actor or "",
        "role": args.filter_role or "",
        "operation": args.op or "",
        "kind": args.kind or "",
        "code": args.code or "",
        "outcome": args.outcome or "",
        "from_time_ms": args.from_ms,
        "to_time_ms": args.to_ms,
        "from_position": args.from_position,
        "to_position": args.to_position,
    }
    items, page, token = _pages(
        args,
        lambda t: client.list_audit_events(page_size=args.page_size, page_token=t, **filters),
    )
    rows = [dataclasses.asdict(e) for e in items]
    for row in rows:
        row["account_ids"] = list(row["account_ids"])
        row["amounts_minor"] = list(row["amounts_minor"])
    data = {"as_of_position": page.as_of_position, "events": rows, "next_page_token": token}
    shown = [
        {
            **row,
            "accounts": ",".join(row["account_ids"]),
            "amount": "" if row["amount_minor"] is None else row["amount_minor"],
        }
        for row in rows
    ]
    cols = ["position", "time_ms", "actor", "operation", "kind", "outcome", "code", "accounts"]
    cols.append("amount")
    text = f"audit trail as of position {page.as_of_position}\n{_table(shown, cols)}"
    if token:
        text += f"\nnext page: --page-token {token}"
    _emit(args, data, text)
    return EXIT_OK


def load_signing_key(path: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot read the key file {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 private key")
    return key


def signing_nonce(platform_id: str, client_id: str) -> str:
    """The authorisation nonce for a signed instruction: derived from its client id, so a retry
    with the same client id never spends a second nonce (client ids are unique per platform)."""
    digest = hashlib.sha256(f"{platform_id}\n{client_id}".encode()).hexdigest()
    return f"cid-{digest[:40]}"


def _transfer(args: argparse.Namespace, client: Any) -> int:
    from ledger.api.client import DEFAULT_AUTH_TTL_MS, instruction_message, sign_instruction

    cid = args.client_id or str(uuid.uuid4())
    fields = {
        "client_id": cid,
        "from_account_id": args.from_account,
        "to_account_id": args.to_account,
        "amount_minor": args.amount,
        "currency": args.currency,
        "purpose": args.purpose,
    }
    authorisation = None
    expires_at_ms = None
    if args.sign_with:
        key = load_signing_key(args.sign_with)
        if not client.platform_id:
            raise UsageError("signing needs the platform id: give --platform")
        # Same client id, nonce and expiry -> the same signature (Ed25519 is deterministic),
        # so rerunning with --client-id and --expires-at-ms is answered REPLAYED.
        expires_at_ms = args.expires_at_ms or time.time_ns() // 1_000_000 + DEFAULT_AUTH_TTL_MS
        signed = sign_instruction(
            client.platform_id,
            instruction_message("transfer", **fields),
            key,
            nonce=signing_nonce(client.platform_id, cid),
            expires_at_ms=expires_at_ms,
        )
        authorisation = signed.authorisation  # type: ignore[attr-defined]
    elif args.expires_at_ms:
        raise UsageError("--expires-at-ms is for signed transfers (--sign-with)")
    receipt = client.transfer(
        cid,
        args.from_account,
        args.to_account,
        args.amount,
        args.currency,
        args.purpose,
        authorisation=authorisation,
    )
    if expires_at_ms is not None and not getattr(args, "json", False):
        print(f"signed; to retry: --client-id {cid} --expires-at-ms {expires_at_ms}")
    return _receipt(args, receipt, {"expires_at_ms": expires_at_ms} if expires_at_ms else None)


def read_instructions(path: str) -> list[Any]:
    """Batch items from commands in the ledger's JSON form (docs/FORMAT.md): `op` names the
    instruction, `auth` (as `custody customer sign` writes it) becomes `authorisation`."""
    from ledger.api.client import instruction

    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if len(data) > MAX_BATCH_FILE_BYTES:
        raise UsageError(f"{path} is larger than {MAX_BATCH_FILE_BYTES} bytes")
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    items = doc if isinstance(doc, list) else [doc]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("op"), str):
            raise UsageError(f"item {i}: an object with an 'op' is expected")
        fields = dict(item)
        op = fields.pop("op")
        if "auth" in fields:
            fields["authorisation"] = fields.pop("auth")
        try:
            out.append(instruction(op, **fields))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise UsageError(f"item {i} ({op}): {exc}") from None
    return out


def _submit_batch(args: argparse.Namespace, client: Any) -> int:
    items = read_instructions(args.file)
    if not items:
        raise UsageError("the file has no instructions")
    results = client.submit_batch(items, linked=args.linked)
    rows = [dataclasses.asdict(r) for r in results]
    cols = ["client_id", "status", "position", "kind", "reason", "request_id"]
    _emit(args, rows, _table(rows, cols))
    return EXIT_OK if all(r.ok for r in results) else EXIT_REFUSED


def _requests(args: argparse.Namespace, client: Any) -> int:
    if args.action == "list":
        rows = [
            _approval_dict(a) for a in client.iter_requests(args.status, max_pages=args.max_pages)
        ]
        cols = ["request_id", "operation", "status", "maker", "position", "expires_at_ms"]
        _emit(args, rows, _table(rows, cols))
        return EXIT_OK
    if not args.request_id:
        raise UsageError(f"requests {args.action} needs a REQUEST_ID")
    cid = args.client_id or str(uuid.uuid4())
    if args.action == "approve":
        return _receipt(args, client.approve_request(cid, args.request_id))
    if not args.reason:
        raise UsageError("requests reject needs --reason")
    return _receipt(args, client.reject_request(cid, args.request_id, args.reason))


def _policy(args: argparse.Namespace, client: Any) -> int:
    info = client.get_policy()
    doc = json.loads(info.policy_json)
    data = {
        "version": info.version,
        "gate": info.gate,
        "as_of_position": info.as_of_position,
        "policy": doc,
    }
    text = (
        f"policy version {info.version}, gate {info.gate} (position {info.as_of_position})\n"
        + json.dumps(doc, indent=2, sort_keys=True)
    )
    _emit(args, data, text)
    return EXIT_OK


def _subscribe(args: argparse.Namespace, client: Any) -> int:
    from ledger import records

    count = 0
    stream = client.subscribe_log(args.start, follow=args.follow)
    try:
        for rec in stream:
            if getattr(args, "json", False):
                line = {
                    "position": rec.position,
                    "kind": rec.kind,
                    "chain_hash": rec.chain_hash.hex(),
                    "record": records.decode(rec.record),
                }
                print(json.dumps(line, ensure_ascii=False, sort_keys=True), flush=True)
            else:
                print(f"{rec.position}\t{rec.kind}\t{rec.chain_hash.hex()[:16]}", flush=True)
            count += 1
            if args.count is not None and count >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()  # cancels the call
    return EXIT_OK


def _checkpoint(args: argparse.Namespace, client: Any) -> int:
    cp = client.sign_checkpoint() if args.sign else client.get_checkpoint(args.size)
    data = _checkpoint_dict(cp)
    _emit(args, data, f"size {cp.size} root {cp.root.hex()}\n{data['note']}")
    return EXIT_OK


def _export(args: argparse.Namespace, client: Any) -> int:
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists; refusing to overwrite it")
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("xb") as f:
            written = client.export_bundle(f, timeout_s=args.timeout_export)
        partial.rename(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    vkey = client.get_verifier_key()
    data = {"out": str(out), "bytes": written, "vkey": vkey}
    text = (
        f"wrote {out} ({written} bytes)\nverify with: custody-verify bundle {out} --vkey '{vkey}'"
    )
    _emit(args, data, text)
    return EXIT_OK


def _period(args: argparse.Namespace) -> dict[str, Any]:
    if (args.from_ms is None) != (args.to_ms is None):
        raise UsageError("--from-ms and --to-ms go together")
    if args.day is None and args.month is None and args.from_ms is None:
        raise UsageError(f"disclosure {args.action} needs --day, --month or --from-ms/--to-ms")
    return {"day": args.day, "month": args.month, "from_ms": args.from_ms, "to_ms": args.to_ms}


def _disclosure_dict(d: Any) -> dict[str, Any]:
    return {
        "platform": d.platform_id,
        "period_type": d.period_type,
        "period_label": d.period_label,
        "from_ms": d.from_ms,
        "to_ms": d.to_ms,
        "checkpoint_size": d.checkpoint_size,
        "built_by": d.built_by,
        "built_time_ms": d.built_time_ms,
    }


def _disclosure(args: argparse.Namespace, client: Any) -> int:
    if args.action == "list":
        rows = [_disclosure_dict(d) for d in client.iter_disclosures(max_pages=args.max_pages)]
        cols = ["period_type", "period_label", "from_ms", "to_ms", "checkpoint_size", "built_by"]
        _emit(args, rows, _table(rows, cols))
        return EXIT_OK
    period = _period(args)
    want = args.out is not None
    if args.action == "build":
        d = client.build_disclosure(
            checkpoint_size=args.checkpoint_size, html=want, csv=want, **period
        )
    else:
        d = client.get_disclosure(
            checkpoint_size=args.checkpoint_size, html=want, csv=want, **period
        )
    data: dict[str, Any] = {**_disclosure_dict(d), "sha256": d.sha256, "vkey": d.vkey}
    if want:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        what = d.period_label or f"{d.from_ms}-{d.to_ms}"
        name = args.name or f"{d.platform_id}-disclosure-{what}-{d.checkpoint_size}"
        files = {"json": d.json, "note": d.note, "html": d.html, "csv": d.csv}
        paths = {}
        for ext, content in files.items():
            path = out / f"{name}.{ext}"
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(content)
            partial.replace(path)
            paths[ext] = str(path)
        data["files"] = paths
        text = "\n".join(paths.values()) + (
            f"\nverify with: custody-verify disclosure {paths['json']} BUNDLE --vkey '{d.vkey}'"
        )
    else:
        text = d.json.decode()
    _emit(args, data, text)
    return EXIT_OK


def _liabilities(args: argparse.Namespace, client: Any) -> int:
    if args.action == "statement":
        rows = [
            {
                "currency": st.currency,
                "snapshot_size": st.snapshot_size,
                "depth": st.depth,
                "root": st.root,
                "total_minor": st.total_minor,
                "position": st.position,
                "tlog_proof": st.tlog_proof.decode(),
            }
            for st in client.get_liabilities_statement(args.currency, args.snapshot_size)
        ]
        cols = ["currency", "snapshot_size", "depth", "total_minor", "position", "root"]
        _emit(args, rows, _table(rows, cols))
        return EXIT_OK
    if not args.account_id or not args.currency or not args.out:
        raise UsageError("liabilities proof needs ACCOUNT, --currency and --out")
    proof = client.get_customer_proof(args.account_id, args.currency, args.snapshot_size)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(proof.proof_json)
    partial.replace(out)
    data = {"out": str(out), "snapshot_size": proof.snapshot_size, "position": proof.position}
    text = (
        f"wrote {out} (0600: it proves the balance; deliver it privately)\n"
        f"the customer checks it with: custody-verify liabilities {out} --vkey VKEY"
    )
    _emit(args, data, text)  # never the file's content: it carries the salt
    return EXIT_OK


def _alert_dict(a: Any) -> dict[str, Any]:
    """An AlertInfo or AlertEvent as JSON-able fields (the record bytes left out)."""
    return {k: v for k, v in dataclasses.asdict(a).items() if k != "record"}


def _alerts(args: argparse.Namespace, client: Any) -> int:
    if args.action == "list":
        rows = [
            _alert_dict(a)
            for a in client.iter_alerts(args.level, args.status, max_pages=args.max_pages)
        ]
        cols = ["alert_id", "level", "rule", "status", "subject", "raised_position", "summary"]
        _emit(args, rows, _table(rows, cols))
        return EXIT_OK
    if args.action == "indicators":
        series, position = client.get_risk_indicators(args.from_day)
        data = {"engine_position": position, "series": series}
        lines = [f"engine read up to position {position}"]
        lines += [
            f"{name}\t" + " ".join(f"{d}:{v}" for d, v in pts) for name, pts in series.items()
        ]
        _emit(args, data, "\n".join(lines))
        return EXIT_OK
    if args.action == "stream":
        count = 0
        stream = client.stream_alerts(args.start, follow=args.follow)
        try:
            for e in stream:
                if getattr(args, "json", False):
                    row = _alert_dict(e)
                    row["record"] = json.loads(e.record)
                    print(json.dumps(row, ensure_ascii=False, sort_keys=True), flush=True)
                else:
                    print(
                        f"{e.position}\t{e.step}\t{e.level}\t{e.alert_id}\t{e.actor}\t{e.text}",
                        flush=True,
                    )
                count += 1
                if args.count is not None and count >= args.count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stream.close()
        return EXIT_OK
    if not args.alert_id:
        raise UsageError(f"alerts {args.action} needs an ALERT_ID")
    cid = args.client_id or str(uuid.uuid4())
    if args.action == "ack":
        if not args.note:
            raise UsageError("alerts ack needs --note")
        return _receipt(args, client.acknowledge_alert(cid, args.alert_id, args.note))
    if not args.reason:
        raise UsageError("alerts close needs --reason")
    return _receipt(args, client.close_alert(cid, args.alert_id, args.reason))


SUBCOMMANDS: Final[dict[str, Callable[[argparse.Namespace, Any], int]]] = {
    "balance": _balance,
    "statement": _statement,
    "balance-at": _balance_at,
    "audit": _audit,
    "transfer": _transfer,
    "submit-batch": _submit_batch,
    "requests": _requests,
    "policy": _policy,
    "subscribe": _subscribe,
    "checkpoint": _checkpoint,
    "export": _export,
    "disclosure": _disclosure,
    "liabilities": _liabilities,
    "alerts": _alerts,
}


def cmd_remote(args: argparse.Namespace) -> int:
    from ledger.api.client import CustodyError

    try:
        with connect(args) as client:
            return SUBCOMMANDS[args.remote_command](args, client)
    except UsageError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CustodyError as exc:
        where = f" (position {exc.metadata['position']})" if "position" in exc.metadata else ""
        fields = "".join(f"\n  {k}: {v}" for k, v in exc.fields.items())
        if getattr(args, "json", False):
            print(
                json.dumps(
                    {
                        "error": exc.code.name,
                        "reason": exc.reason,
                        "message": exc.message,
                        "metadata": exc.metadata,
                        "fields": exc.fields,
                    },
                    sort_keys=True,
                ),
                file=sys.stderr,
            )
        else:
            print(f"{exc.code.name} {exc.reason}: {exc.message}{where}{fields}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code in UNREACHABLE else EXIT_REFUSED


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ledger.cli_remote remote ...` (the same as `custody remote ...`)."""
    parser = argparse.ArgumentParser(prog="custody")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = register(sub)
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

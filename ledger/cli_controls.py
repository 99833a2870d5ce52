"""`custody policy | gate | requests | customer | submit`: the controls from the command line.

Governance goes through the same writer as everything else: a policy or gate change made here
is a pending request until a different checker approves it (`custody --actor checker:NAME
requests approve ID`). Customer keys and signatures are for development and support: a real
customer signs on their own device; `customer sign` shows exactly what the device must do.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controls.customer_authorisation import b64url_encode, payload
from controls.policy import DEFAULT_POLICY, decode_policy, encode_policy
from ledger import commands as c

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
MAX_COMMAND_BYTES = 1 << 20  # a command file larger than this is not a command
MAX_LIST = 1000  # rows printed by `requests list` at most

Handler = Callable[[argparse.Namespace, Any], int]


def register(
    sub: Any, service_factory: Callable[[argparse.Namespace], Any]
) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the subcommands to `custody`'s parser; returns their handlers by command name."""
    _policy_parser(sub)
    _gate_parser(sub)
    _requests_parser(sub)
    _customer_parser(sub)
    submit = sub.add_parser(
        "submit",
        help="submit instructions from a JSON file (one object, or a list; '-' reads stdin)",
    )
    submit.add_argument("--platform", required=True)
    submit.add_argument(
        "file", help="JSON command(s) as in docs/FORMAT.md, e.g. from 'customer sign'"
    )
    submit.add_argument("--linked", action="store_true", help="all or none")
    handlers: dict[str, Handler] = {
        "policy": cmd_policy,
        "gate": cmd_gate,
        "requests": cmd_requests,
        "customer": cmd_customer,
        "submit": cmd_submit,
    }
    return {name: with_service(h, service_factory) for name, h in handlers.items()}


# -- parsers -----------------------------------------------------------------------------------


def _client_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-id", help="idempotency key (default: a new UUID)")


def _policy_parser(sub: Any) -> None:
    policy = sub.add_parser(
        "policy",
        help="show, template or propose a platform's versioned policy",
        description="A policy change is a request: a checker must approve it "
        "(`custody --actor checker:NAME requests approve ID`).",
    )
    psub = policy.add_subparsers(dest="action", required=True)
    show = psub.add_parser("show", help="the policy in force and its version")
    show.add_argument("--platform", required=True)
    psub.add_parser("template", help="print the built-in default policy as JSON, to edit")
    propose = psub.add_parser("propose", help="propose the next version from a JSON file")
    propose.add_argument("--platform", required=True)
    propose.add_argument("file", help="policy JSON; its version must be the current one + 1")
    _client_id(propose)
    token = psub.add_parser(
        "screen-token",
        help="the screening token of a name or bank account, for the blocklist",
    )
    token.add_argument("text")


def _gate_parser(sub: Any) -> None:
    gate = sub.add_parser("gate", help="set the platform gate (needs a checker)")
    gsub = gate.add_subparsers(dest="action", required=True)
    gset = gsub.add_parser("set", help="NORMAL | RESTRICTED | WIND_DOWN | FROZEN")
    gset.add_argument("--platform", required=True)
    gset.add_argument("state", choices=list(c.GATES))
    gset.add_argument("--reason", required=True)
    _client_id(gset)


def _requests_parser(sub: Any) -> None:
    requests = sub.add_parser("requests", help="list, approve and reject maker-checker requests")
    rsub = requests.add_subparsers(dest="action", required=True)
    rlist = rsub.add_parser("list", help="requests of a platform")
    rlist.add_argument("--platform", required=True)
    rlist.add_argument("--status", choices=["pending", "approved", "rejected", "all"])
    for name in ("approve", "reject"):
        r = rsub.add_parser(name, help=f"{name} a request (checker role: --actor checker:NAME)")
        r.add_argument("--platform", required=True)
        r.add_argument("request_id")
        _client_id(r)
        if name == "reject":
            r.add_argument("--reason", required=True)


def _customer_parser(sub: Any) -> None:
    customer = sub.add_parser(
        "customer",
        help="customer keys and signing",
        description="Customer-signed instructions (transfers, holds, withdrawals, bind_payee, "
        "grant_standing, key rotation) are written as JSON, signed with `customer sign` and "
        "given with `custody submit`.",
        epilog="example:\n  custody customer sign --platform demo --key alice.pem t.json > s.json"
        "\n  custody --actor platform:demo submit --platform demo s.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = customer.add_subparsers(dest="action", required=True)
    keygen = csub.add_parser("keygen", help="create an Ed25519 key file (development)")
    keygen.add_argument("--out", required=True, help="private key file (PEM, mode 0600)")
    reg = csub.add_parser("register-key", help="register a customer's first key")
    reg.add_argument("--platform", required=True)
    reg.add_argument("account_id")
    reg.add_argument("--public-key", required=True, help="base64url, 43 characters")
    _client_id(reg)
    reset = csub.add_parser("reset-key", help="replace a lost key (operator; needs a checker)")
    reset.add_argument("--platform", required=True)
    reset.add_argument("account_id")
    reset.add_argument("--public-key", required=True)
    reset.add_argument("--reason", required=True)
    _client_id(reset)
    sign = csub.add_parser(
        "sign",
        help="sign a command JSON as the customer would; prints the signed command",
        description="Reads a command (JSON, '-' for stdin), adds auth {nonce, expires_at_ms, "
        "signature} over the authorisation payload (docs/FORMAT.md) and prints it.",
    )
    sign.add_argument("--platform", required=True)
    sign.add_argument("--key", required=True, help="the customer's private key file")
    sign.add_argument("--ttl-s", type=int, default=300, help="validity (default 300 s)")
    sign.add_argument("file")


# -- handlers ----------------------------------------------------------------------------------


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, ensure_ascii=False, sort_keys=True))
    else:
        print(text)


def _cid(args: argparse.Namespace) -> str:
    return args.client_id or str(uuid.uuid4())


def _execute(args: argparse.Namespace, service: Any, commands: Sequence[c.Command]) -> int:
    from ledger.cli import _outcome_text

    outcomes = service.execute(args.platform, commands, args.actor, getattr(args, "linked", False))
    for outcome in outcomes:  # the one text for every outcome, pending included
        _print(args, msgspec.to_builtins(outcome), _outcome_text(outcome))
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_REFUSED


def _read(path: str) -> bytes:
    data = sys.stdin.buffer.read(MAX_COMMAND_BYTES + 1) if path == "-" else Path(path).read_bytes()
    if len(data) > MAX_COMMAND_BYTES:
        raise ValueError(f"more than {MAX_COMMAND_BYTES} bytes")
    return data


def cmd_policy(args: argparse.Namespace, service: Any) -> int:
    if args.action == "show":
        with service.reading(args.platform) as state:
            policy = state.policy
        doc = json.loads(encode_policy(policy))
        _print(args, doc, json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_OK
    if args.action == "screen-token":
        token = service.vault.screening_token(args.text)
        _print(args, {"token": token}, token)
        return EXIT_OK
    assert args.action == "propose"
    try:
        policy = decode_policy(_read(args.file))
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        print(f"not a policy document: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _execute(args, service, [c.SetPolicy(client_id=_cid(args), policy=policy)])


def cmd_gate(args: argparse.Namespace, service: Any) -> int:
    cmd = c.SetGate(client_id=_cid(args), gate=args.state, reason=args.reason)
    return _execute(args, service, [cmd])


def _request_row(r: Any) -> dict[str, Any]:
    return {
        "request_id": r.id,
        "op": r.op,
        "status": r.status,
        "maker": r.maker,
        "expires_at_ms": r.expires_at_ms,
        "position": r.seq,
        "executed_by": r.executed_by,
        "command": r.cmd,
    }


def cmd_requests(args: argparse.Namespace, service: Any) -> int:
    if args.action == "approve":
        cmd: c.Command = c.ApproveRequest(client_id=_cid(args), request_id=args.request_id)
        return _execute(args, service, [cmd])
    if args.action == "reject":
        cmd = c.RejectRequest(client_id=_cid(args), request_id=args.request_id, reason=args.reason)
        return _execute(args, service, [cmd])
    wanted = args.status or "pending"
    with service.reading(args.platform) as state:
        rows = [
            _request_row(r)
            for r in state.requests.values()
            if wanted == "all" or r.status == wanted
        ][-MAX_LIST:]
    lines = [f"{'request':<36} {'op':<18} {'status':<9} {'maker':<24} expires_at_ms"]
    lines += [
        f"{r['request_id']:<36} {r['op']:<18} {r['status']:<9} {r['maker']:<24} "
        f"{r['expires_at_ms']}"
        for r in rows
    ]
    _print(args, rows, "\n".join(lines) if rows else f"(no {wanted} requests)")
    return EXIT_OK


def cmd_customer(args: argparse.Namespace, service: Any) -> int:
    if args.action == "register-key":
        cmd: c.Command = c.RegisterKey(
            client_id=_cid(args), account_id=args.account_id, public_key=args.public_key
        )
    else:
        assert args.action == "reset-key"
        cmd = c.ResetKey(
            client_id=_cid(args),
            account_id=args.account_id,
            public_key=args.public_key,
            reason=args.reason,
        )
    return _execute(args, service, [cmd])


def customer_keygen(out: Path) -> str:
    """Write a new private key (PEM, 0600) and return the public key, base64url."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out.touch(mode=0o600, exist_ok=False)
    out.write_bytes(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64url_encode(raw)


def sign_command(
    platform_id: str, cmd: c.Command, key: Ed25519PrivateKey, ttl_s: int, now_ms: int
) -> c.Command:
    """What a customer's device does: pick a nonce and expiry, sign the payload, attach it."""
    assert 1 <= ttl_s <= 3600, "ttl_s must be in 1..3600"
    unsigned = c.Authorisation(nonce=secrets.token_hex(16), expires_at_ms=now_ms + ttl_s * 1000)
    draft = msgspec.structs.replace(cmd, auth=unsigned)  # type: ignore[call-arg]
    signature = key.sign(payload(platform_id, msgspec.to_builtins(draft)))
    signed = msgspec.structs.replace(unsigned, signature=b64url_encode(signature))
    return msgspec.structs.replace(cmd, auth=signed)  # type: ignore[call-arg]


def cmd_customer_offline(args: argparse.Namespace) -> int:
    """keygen and sign need no ledger: they run on the customer's side."""
    if args.action == "keygen":
        public = customer_keygen(Path(args.out))
        _print(args, {"public_key": public, "private_key_file": args.out}, public)
        return EXIT_OK
    key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        print("the key file is not an Ed25519 private key", file=sys.stderr)
        return EXIT_USAGE
    try:
        cmd = c.decode_command_json(_read(args.file))
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        print(f"not a command: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if "auth" not in type(cmd).__struct_fields__:
        print(f"{c.op_of(cmd)} is not signed by customers", file=sys.stderr)
        return EXIT_USAGE
    signed = sign_command(args.platform, cmd, key, args.ttl_s, time.time_ns() // 1_000_000)
    print(msgspec.json.encode(signed).decode())
    return EXIT_OK


_BATCH_DECODER = msgspec.json.Decoder(list[c.AnyCommand])  # type: ignore[valid-type]


def cmd_submit(args: argparse.Namespace, service: Any) -> int:
    try:
        data = _read(args.file)
        stripped = data.lstrip()
        commands: list[c.Command] = (
            list(_BATCH_DECODER.decode(data))
            if stripped.startswith(b"[")
            else [c.decode_command_json(data)]
        )
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        print(f"not a command: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= len(commands) <= c.MAX_BATCH_COMMANDS:
        print(f"give 1..{c.MAX_BATCH_COMMANDS} commands", file=sys.stderr)
        return EXIT_USAGE
    return _execute(args, service, commands)


def with_service(handler: Handler, service_factory: Callable[[argparse.Namespace], Any]) -> Any:
    """Wrap a handler so it gets a started service and always closes it."""

    def run(args: argparse.Namespace) -> int:
        if handler is cmd_customer and args.action in ("keygen", "sign"):
            return cmd_customer_offline(args)
        if handler is cmd_policy and args.action == "template":
            doc = json.loads(encode_policy(DEFAULT_POLICY))
            print(json.dumps(doc, indent=2, sort_keys=True))
            return EXIT_OK
        service = service_factory(args)
        try:
            return handler(args, service)
        finally:
            service.close()

    return run

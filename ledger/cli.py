"""`custody`: run and operate a custody ledger on the embedded store from the command line.

Every subcommand has --help. Money is always an integer count of minor units (fen, cents):
`--amount 12345` is CNY 123.45. Writes print the outcome; `--json` prints machine-readable JSON.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from controls.policy import Policy, decode_policy, policy_problem
from controls.roles import ROLES
from ledger import cli_backup, cli_controls, cli_remote, records
from ledger import commands as c
from ledger.backup import RestoreUnverified
from ledger.config import Config, ConfigError
from ledger.lease import WriterElsewhere
from ledger.store import log_stream
from ledger.validate import is_actor
from projections import cli as project_cli
from projections import disclosure_cli
from reconciliation import cli as recon_cli
from risk import cli as risk_cli

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3

EPILOG = """\
examples (an operator sets up; the platform relays customers' signed instructions):
  custody platform create demo --name "Demo Lending"          # strict default policy
  custody account open --platform demo omni --kind omnibus --currency CNY
  custody customer keygen --out alice.pem                     # the customer's device
  custody --actor platform:demo account open --platform demo alice --kind customer \\
      --role lender --currency CNY --public-key <printed key>
  custody --actor platform:demo deposit --platform demo --mirror omni --to alice \\
      --amount 100000 --currency CNY
  custody customer sign --platform demo --key alice.pem transfer.json > signed.json
  custody --actor platform:demo submit --platform demo signed.json
  custody --actor operator:olga reverse --platform demo <movement id> --reason typo
  custody --actor checker:chen requests approve --platform demo <request id>
  custody balance --platform demo
  custody chain verify --platform demo

configuration comes from the environment (docs/CONFIG.md): CUSTODY_STORE=sqlite|postgres,
CUSTODY_DATA_DIR, POSTGRES_* ... ; --data-dir overrides CUSTODY_DATA_DIR.
"""


def _amount(text: str) -> int:
    """Parse minor units strictly: digits only, so '12.50' or '1e3' can never slip through."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError("amount is an integer count of minor units, e.g. 12345")
    return int(text)


def _add_common_write(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", required=True, help="platform id")
    p.add_argument(
        "--client-id",
        help="idempotency key unique within the platform (default: a new UUID); "
        "re-running with the same id and content returns the original result",
    )


def _money_args(p: argparse.ArgumentParser, from_flag: str | None, to_flag: str | None) -> None:
    if from_flag:
        p.add_argument(from_flag, dest="from_account", required=True, help="debit account id")
    if to_flag:
        p.add_argument(to_flag, dest="to_account", required=True, help="credit account id")
    p.add_argument("--amount", type=_amount, required=True, help="minor units (integer)")
    p.add_argument("--currency", required=True, help="ISO 4217 code, e.g. CNY")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="custody",
        description="Custody Ledger: segregated customer money on a hash-chained event log.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", help="folder of the embedded SQLite store (CUSTODY_DATA_DIR)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--actor",
        help="who is acting, <role>:<name>, recorded in the log (default operator:<user>); "
        "movements a platform relays need --actor platform:<name>",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init", help="create the store and the local master key")

    serve = sub.add_parser("serve", help="run the gRPC server (embedded SQLite by default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--tls-dir", help="folder with ca.pem, server.pem, server.key (mTLS)")
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="no TLS, identity from metadata; refused unless bound to loopback",
    )
    serve.add_argument(
        "--health-port",
        type=int,
        help="also serve plain-text health checks on 127.0.0.1:PORT (for probes without certs)",
    )
    serve.add_argument("--server-id", help="this server's name among several (CUSTODY_SERVER_ID)")
    serve.add_argument(
        "--advertise",
        help="HOST:PORT other servers redirect writes to when this one writes a platform "
        "(CUSTODY_ADVERTISE; default the address it binds)",
    )
    serve.add_argument(
        "--accept-restore",
        action="store_true",
        help="serve a restored ledger whose verification against checkpoints failed (recorded)",
    )
    serve.add_argument(
        "--dashboard-port",
        type=int,
        help="serve the read-only risk dashboard on http://127.0.0.1:PORT/dashboard",
    )

    certs = sub.add_parser(
        "certs",
        help="create a development CA and mTLS certificates for every role",
        add_help=False,
    )
    certs.add_argument("certs_args", nargs=argparse.REMAINDER, help="see `custody certs --help`")

    platform = sub.add_parser("platform", help="create and list platforms (tenants)")
    psub = platform.add_subparsers(dest="action", required=True)
    pc = psub.add_parser("create", help="create a platform with its own log and chain")
    pc.add_argument("platform_id")
    pc.add_argument("--name", required=True)
    pc.add_argument(
        "--policy",
        metavar="FILE",
        help="the platform's initial policy, a JSON policy document (default: the built-in, "
        "strict policy)",
    )
    psub.add_parser("list", help="list platforms")
    pm = psub.add_parser(
        "move",
        help="move a platform to another database of the placement, its chain intact",
        description="Copy a platform's log (byte for byte, chain checked) and its side data from "
        "this store (CUSTODY_STORE_NAME) to another store of the placement (CUSTODY_PLACEMENT), "
        "then switch it over: the servers of this store stop writing it at their next lease "
        "poll and redirect callers to the target's servers. Safe to run again after an "
        "interruption (it resumes); --abort gives up a move the target does not serve yet. "
        "Update the placement file afterwards so new clients go to the target first. "
        "Example: CUSTODY_PLACEMENT=placement.json CUSTODY_STORE_NAME=east "
        "custody platform move acme --to west",
    )
    pm.add_argument("platform_id")
    target = pm.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="STORE", help="the store (database) to move it to")
    target.add_argument("--abort", action="store_true", help="give up an unfinished move")
    pm.add_argument(
        "--lease-wait-s",
        type=float,
        default=60.0,
        help="how long to wait for the servers to release the platform (default 60)",
    )
    pmv = psub.add_parser("moves", help="the platform's move history in this store")
    pmv.add_argument("platform_id")

    account = sub.add_parser("account", help="open, freeze, unfreeze, close accounts")
    asub = account.add_subparsers(dest="action", required=True)
    ao = asub.add_parser("open", help="open an account")
    _add_common_write(ao)
    ao.add_argument("account_id")
    ao.add_argument(
        "--kind",
        required=True,
        choices=["customer", "omnibus", "own_funds", "fee_income", "suspense", "platform_bank"],
    )
    ao.add_argument("--currency", required=True)
    ao.add_argument("--role", choices=["lender", "borrower", "guarantor", "other"])
    ao.add_argument("--holder-name", help="account holder (stored encrypted)")
    ao.add_argument(
        "--holder-type",
        choices=sorted(c.HOLDER_TYPES),
        default="individual",
        help="large-value reporting thresholds differ (default individual)",
    )
    ao.add_argument(
        "--public-key",
        default="",
        help="the customer's Ed25519 key (base64url, from `custody customer keygen`)",
    )
    for name in ("freeze", "unfreeze"):
        a = asub.add_parser(name, help=f"{name} an account")
        _add_common_write(a)
        a.add_argument("account_id")
        a.add_argument("--reason", required=True)
    ac = asub.add_parser("close", help="close an account (only at zero with no holds)")
    _add_common_write(ac)
    ac.add_argument("account_id")

    d = sub.add_parser("deposit", help="bank money in: bank mirror -> account")
    _add_common_write(d)
    d.add_argument("--mirror", required=True, help="omnibus or platform_bank mirror account")
    d.add_argument("--to", dest="to_account", required=True)
    _money_args(d, None, None)
    d.add_argument("--bank-ref", default="")

    t = sub.add_parser("transfer", help="move customer money on the payer's instruction")
    _add_common_write(t)
    _money_args(t, "--from", "--to")
    t.add_argument(
        "--purpose",
        default="transfer",
        choices=sorted(c.TRANSFER_PURPOSES),
    )

    f = sub.add_parser("fee", help="charge a fee: customer -> platform fee income")
    _add_common_write(f)
    _money_args(f, "--from", "--to")
    f.add_argument("--fee-code", required=True)

    tu = sub.add_parser("topup", help="shortfall top-up: platform own funds -> customer money")
    _add_common_write(tu)
    _money_args(tu, "--from", "--to")
    tu.add_argument("--reason", required=True)

    hold = sub.add_parser("hold", help="place, capture, release, expire holds")
    hsub = hold.add_subparsers(dest="action", required=True)
    hp = hsub.add_parser("place", help="reserve funds (the hold id is the client id)")
    _add_common_write(hp)
    _money_args(hp, "--from", "--to")
    hp.add_argument("--reason", required=True)
    hp.add_argument("--expires-at-ms", type=int, required=True, help="Unix time in ms")
    hc = hsub.add_parser("capture", help="post up to the held amount; the rest is released")
    _add_common_write(hc)
    hc.add_argument("hold_id")
    hc.add_argument("--amount", type=_amount, required=True)
    hr = hsub.add_parser("release", help="void a hold")
    _add_common_write(hr)
    hr.add_argument("hold_id")
    hr.add_argument("--reason", required=True)
    he = hsub.add_parser("expire", help="sweep: release every hold past its expiry")
    _add_common_write(he)
    he.add_argument("--max-holds", type=int, default=1000)

    w = sub.add_parser("withdraw", help="two-phase payout: request, then settle or fail")
    wsub = w.add_subparsers(dest="action", required=True)
    wr = wsub.add_parser("request", help="hold funds for a payout")
    _add_common_write(wr)
    wr.add_argument("--from", dest="from_account", required=True)
    wr.add_argument("--mirror", required=True)
    _money_args(wr, None, None)
    wr.add_argument("--payee-ref", required=True)
    wr.add_argument("--expires-at-ms", type=int, required=True)
    ws = wsub.add_parser("settle", help="the bank paid out: post the held funds")
    _add_common_write(ws)
    ws.add_argument("withdrawal_id")
    ws.add_argument("--bank-ref", default="")
    wf = wsub.add_parser("fail", help="the bank failed the payout: release the funds")
    _add_common_write(wf)
    wf.add_argument("withdrawal_id")
    wf.add_argument("--reason", required=True)

    r = sub.add_parser("reverse", help="undo a posted movement with a new opposite movement")
    _add_common_write(r)
    r.add_argument("movement_id", help="client id of the movement to reverse")
    r.add_argument("--reason", required=True)

    b = sub.add_parser("balance", help="show balances (posted, held, available)")
    b.add_argument("--platform", required=True)
    b.add_argument("account_id", nargs="?")

    st = sub.add_parser("statement", help="movements touching an account, oldest first")
    st.add_argument("--platform", required=True)
    st.add_argument("account_id")
    st.add_argument("--after", type=int, default=-1, help="start after this log position")
    st.add_argument("--limit", type=int, default=100, help="at most this many lines (<= 1000)")

    keys = sub.add_parser("keys", help="the checkpoint signing key and the auditors' vkey")
    ksub = keys.add_subparsers(dest="action", required=True)
    kg = ksub.add_parser("generate", help="create a new Ed25519 signing key file (mode 0600)")
    kg.add_argument("--out", help="key file (default: CUSTODY_SIGNING_KEY or the data folder)")
    kv = ksub.add_parser("vkey", help="print the verifier key string auditors need")
    kv.add_argument("--platform", required=True)

    cp = sub.add_parser("checkpoint", help="sign a checkpoint of a platform's log now")
    cp.add_argument("--platform", required=True)
    cp.add_argument("--out", help="also write the signed note to this file")

    ex = sub.add_parser(
        "export", help="write a platform's log, chain links and checkpoints to one bundle file"
    )
    ex.add_argument("--platform", required=True)
    ex.add_argument("--out", required=True, help="bundle file (written atomically)")

    pr = sub.add_parser("proof", help="inclusion and consistency proofs for auditors")
    prsub = pr.add_subparsers(dest="action", required=True)
    pi = prsub.add_parser("inclusion", help="a C2SP tlog-proof that record INDEX is in the log")
    pi.add_argument("--platform", required=True)
    pi.add_argument("--index", type=int, required=True, help="log position of the record")
    pi.add_argument("--size", type=int, help="checkpoint size (default: the latest checkpoint)")
    pi.add_argument("--out", required=True, help="the .tlog-proof file to write")
    pi.add_argument("--leaf-out", help="also write the record's canonical bytes here")
    pc = prsub.add_parser("consistency", help="proof that checkpoint FIRST is a prefix of SECOND")
    pc.add_argument("--platform", required=True)
    pc.add_argument("--first", type=int, required=True)
    pc.add_argument("--second", type=int, required=True)

    ch = sub.add_parser("chain", help="hash-chain tools")
    chsub = ch.add_subparsers(dest="action", required=True)
    cv = chsub.add_parser("verify", help="walk the stored chain; report the first broken link")
    cv.add_argument("--platform", required=True)
    _accept_json_anywhere(parser)
    HANDLERS.update(cli_controls.register(sub, _service))
    project_cli.register(sub)
    HANDLERS["project"] = project_cli.cmd_project
    disclosure_cli.register(sub)
    HANDLERS["disclosure"] = disclosure_cli.cmd_disclosure
    HANDLERS.update(risk_cli.register(sub))
    HANDLERS.update(cli_remote.register(sub))
    HANDLERS.update(recon_cli.register(sub))
    HANDLERS.update(cli_backup.register(sub))
    return parser


def _accept_json_anywhere(parser: argparse.ArgumentParser) -> None:
    """`--json` works before or after the subcommand (`custody chain verify ... --json`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name != "certs":  # the certs tool parses its own arguments
                    if not any("--json" in a.option_strings for a in sub._actions):
                        sub.add_argument(
                            "--json",
                            action="store_true",
                            default=argparse.SUPPRESS,
                            help="print JSON instead of text",
                        )
                    _accept_json_anywhere(sub)


def _command_from_args(args: argparse.Namespace) -> c.Command:
    cid = args.client_id or str(uuid.uuid4())
    cmd, action = args.command, getattr(args, "action", None)
    if cmd == "account":
        if action == "open":
            return c.OpenAccount(
                client_id=cid,
                account_id=args.account_id,
                kind=args.kind,
                currency=args.currency,
                role=args.role,
                holder_name=args.holder_name,
                holder_type=args.holder_type,
                public_key=args.public_key,
            )
        if action == "freeze":
            return c.FreezeAccount(client_id=cid, account_id=args.account_id, reason=args.reason)
        if action == "unfreeze":
            return c.UnfreezeAccount(client_id=cid, account_id=args.account_id, reason=args.reason)
        return c.CloseAccount(client_id=cid, account_id=args.account_id)
    money: dict[str, Any] = {
        "amount_minor": getattr(args, "amount", None),
        "currency": getattr(args, "currency", None),
    }
    if cmd == "deposit":
        return c.Deposit(
            client_id=cid,
            mirror_account_id=args.mirror,
            account_id=args.to_account,
            bank_ref=args.bank_ref,
            **money,
        )
    if cmd == "transfer":
        return c.Transfer(
            client_id=cid,
            from_account_id=args.from_account,
            to_account_id=args.to_account,
            purpose=args.purpose,
            **money,
        )
    if cmd == "fee":
        return c.ChargeFee(
            client_id=cid,
            from_account_id=args.from_account,
            to_account_id=args.to_account,
            fee_code=args.fee_code,
            **money,
        )
    if cmd == "topup":
        return c.TopUpShortfall(
            client_id=cid,
            from_account_id=args.from_account,
            to_account_id=args.to_account,
            reason=args.reason,
            **money,
        )
    if cmd == "reverse":
        return c.Reverse(client_id=cid, movement_id=args.movement_id, reason=args.reason)
    if cmd == "hold":
        if action == "place":
            return c.PlaceHold(
                client_id=cid,
                from_account_id=args.from_account,
                to_account_id=args.to_account,
                reason=args.reason,
                expires_at_ms=args.expires_at_ms,
                **money,
            )
        if action == "capture":
            return c.CaptureHold(client_id=cid, hold_id=args.hold_id, amount_minor=args.amount)
        if action == "release":
            return c.ReleaseHold(client_id=cid, hold_id=args.hold_id, reason=args.reason)
        return c.ExpireHolds(client_id=cid, max_holds=args.max_holds)
    assert cmd == "withdraw"
    if action == "request":
        return c.RequestWithdrawal(
            client_id=cid,
            account_id=args.from_account,
            mirror_account_id=args.mirror,
            payee_ref=args.payee_ref,
            expires_at_ms=args.expires_at_ms,
            **money,
        )
    if action == "settle":
        return c.SettleWithdrawal(
            client_id=cid, withdrawal_id=args.withdrawal_id, bank_ref=args.bank_ref
        )
    return c.FailWithdrawal(client_id=cid, withdrawal_id=args.withdrawal_id, reason=args.reason)


def _print(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(payload, ensure_ascii=False, sort_keys=True))
    else:
        print(text)


def _service(args: argparse.Namespace) -> Any:
    from ledger.backup import restore_guard
    from ledger.service import LedgerService

    config = _config(args)
    restore_guard(config)  # never write on top of a restore nobody verified or accepted
    service = LedgerService(config)
    service.start(progress=_progress if sys.stderr.isatty() else None)
    return service


def _progress(platform_id: str, position: int) -> None:
    print(f"\rloading {platform_id}: {position:,} records", end="", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> Config:
    env = dict(os.environ)
    if args.data_dir:
        env["CUSTODY_DATA_DIR"] = args.data_dir
    if getattr(args, "server_id", None):
        env["CUSTODY_SERVER_ID"] = args.server_id
    if getattr(args, "command", "") == "serve":
        # where other servers send this server's platforms' writers: the flag, the
        # environment, or the address it binds
        env["CUSTODY_ADVERTISE"] = (
            args.advertise or env.get("CUSTODY_ADVERTISE") or f"{args.host}:{args.port}"
        )
    return Config.from_env(env)


def _outcome_text(o: Any) -> str:
    if o.status in ("accepted", "replayed"):
        return f"{o.status}: {o.kind} at log position {o.seq} (client id {o.client_id})"
    if o.status == "pending":
        return (
            f"pending: request {o.client_id} waits for a checker (log position {o.seq}); "
            "approve with: custody --actor checker:NAME requests approve --platform P "
            f"{o.client_id}"
        )
    where = f" [{o.field}]" if o.field else ""
    return f"{o.status}: {o.code}{where} — {o.message} (client id {o.client_id})"


def cmd_write(args: argparse.Namespace) -> int:
    command = _command_from_args(args)
    service = _service(args)
    try:
        [outcome] = service.execute(args.platform, [command], args.actor)
    finally:
        service.close()
    _print(args, msgspec.to_builtins(outcome), _outcome_text(outcome))
    return EXIT_OK if outcome.ok else EXIT_REFUSED


def cmd_init(args: argparse.Namespace) -> int:
    service = _service(args)
    config = service.config
    service.close()
    where = config.sqlite_path if config.store == "sqlite" else "PostgreSQL"
    _print(args, {"store": config.store, "location": str(where)}, f"ledger ready in {where}")
    return EXIT_OK


def _policy_file(path: str) -> Policy | str:
    """The policy document in `path`, or a message saying why it cannot be used."""
    try:
        policy = decode_policy(Path(path).read_bytes())
    except (OSError, msgspec.DecodeError) as exc:  # ValidationError is a DecodeError
        return f"policy {path}: {exc}"
    problem = policy_problem(policy)
    return f"policy {path}: {problem}" if problem is not None else policy


def cmd_platform_move(args: argparse.Namespace) -> int:
    from ledger.move import MoveError, abort_move, move_history, move_platform

    config = _config(args)
    if config.placement is None:
        print("moves need CUSTODY_PLACEMENT and CUSTODY_STORE_NAME (docs/OPERATIONS.md)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if args.action == "moves":
        moves = [msgspec.to_builtins(m) for m in move_history(config, args.platform_id)]
        text = "\n".join(
            f"{m['seq']:>3} {m['state']:<9} peer={m['peer']} size={m['size']} by {m['actor']}"
            for m in moves
        )
        _print(args, moves, text or f"{args.platform_id} never moved in {config.store_name}")
        return EXIT_OK

    def progress(step: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{step}: {done}/{total} records", end="", file=sys.stderr, flush=True)

    try:
        if args.abort:
            move = abort_move(config, args.platform_id, args.actor)
            _print(args, msgspec.to_builtins(move), f"move of {args.platform_id} aborted; "
                   f"{config.store_name} serves it again")  # fmt: skip
            return EXIT_OK
        report = move_platform(config, args.platform_id, args.to, args.actor,
                               lease_wait_s=args.lease_wait_s, progress=progress)  # fmt: skip
    except MoveError as exc:
        print(f"move refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if sys.stderr.isatty():
        print(file=sys.stderr)
    r = report.as_dict()
    _print(args, r, f"moved {r['platform']} from {r['source']} to {r['target']}: log of "
           f"{r['records']:,} records ({r['copied']:,} copied by this run), head "
           f"{r['head'][:16]}..., {sum(r['side_rows'].values()):,} side rows, "
           f"{r['elapsed_s']} s")  # fmt: skip
    return EXIT_OK


def cmd_platform(args: argparse.Namespace) -> int:
    if args.action in ("move", "moves"):
        return cmd_platform_move(args)
    policy: Policy | None = None
    if args.action == "create" and args.policy is not None:
        loaded = _policy_file(args.policy)
        if isinstance(loaded, str):
            print(loaded, file=sys.stderr)
            return EXIT_USAGE
        policy = loaded
    service = _service(args)
    try:
        if args.action == "list":
            ids = service.platform_ids()
            _print(args, ids, "\n".join(ids) if ids else "(no platforms)")
            return EXIT_OK
        outcome = service.create_platform(args.platform_id, args.name, args.actor, policy)
    finally:
        service.close()
    _print(args, msgspec.to_builtins(outcome), _outcome_text(outcome))
    return EXIT_OK if outcome.ok else EXIT_REFUSED


def _account_row(a: Any) -> dict[str, Any]:
    return {
        "account_id": a.id,
        "kind": a.kind.value,
        "role": a.role,
        "currency": a.currency,
        "status": a.status.value,
        "posted_minor": a.posted_minor,
        "held_minor": a.held_minor,
        "available_minor": a.available_minor if a.must_not_go_negative else None,
    }


def cmd_balance(args: argparse.Namespace) -> int:
    service = _service(args)
    try:
        with service.reading(args.platform) as state:
            if args.account_id is not None:
                account = state.accounts.get(args.account_id)
                if account is None:
                    print(f"account {args.account_id!r} not found", file=sys.stderr)
                    return EXIT_REFUSED
                rows = [_account_row(account)]
            else:
                rows = [_account_row(a) for a in state.accounts.values()]
    finally:
        service.close()
    header = f"{'account':<20} {'kind':<13} {'ccy':<4} {'status':<7} {'posted':>16} {'held':>14}"
    lines = [header] + [
        f"{r['account_id']:<20} {r['kind']:<13} {r['currency']:<4} {r['status']:<7} "
        f"{r['posted_minor']:>16,} {r['held_minor']:>14,}"
        for r in rows
    ]
    _print(args, rows, "\n".join(lines))
    return EXIT_OK


def _touches(rec: dict[str, Any], account_id: str) -> list[tuple[str, int]]:
    """(direction, amount) for each posting or reservation of `account_id` in a record."""
    found: list[tuple[str, int]] = []
    for debit, credit, amount in rec.get("entries", ()):
        if debit == account_id:
            found.append(("debit", amount))
        if credit == account_id:
            found.append(("credit", amount))
    hold = rec.get("hold")
    if hold is not None and account_id in (hold["debit"], hold["credit"]):
        found.append(("hold" if hold["debit"] == account_id else "incoming-hold", hold["amount"]))
    return found


def cmd_statement(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        print("--limit must be in 1..1000", file=sys.stderr)
        return EXIT_USAGE
    from ledger.store import LedgerStore

    store = LedgerStore(_config(args))
    lines: list[dict[str, Any]] = []
    try:
        for seq, kind, packed in store.iter_rows(log_stream(args.platform), after=args.after):
            if kind == records.REFUSED_KIND:
                continue
            rec = records.decode(records.unpack_state(packed)[1])
            for direction, amount in _touches(rec, args.account_id):
                lines.append(
                    {
                        "position": seq,
                        "ts_ms": rec["ts"],
                        "kind": kind,
                        "client_id": rec["cid"],
                        "direction": direction,
                        "amount_minor": amount,
                    }
                )
            if len(lines) >= args.limit:
                break
    finally:
        store.close()
    lines = lines[: args.limit]
    text = "\n".join(
        f"{x['position']:>8} {x['kind']:<22} {x['direction']:<13} {x['amount_minor']:>16,} "
        f"{x['client_id']}"
        for x in lines
    )
    _print(args, lines, text or "(no movements)")
    return EXIT_OK


def cmd_chain(args: argparse.Namespace) -> int:
    from ledger.store import LedgerStore
    from ledger.writer import verify_stored_chain

    store = LedgerStore(_config(args))
    try:
        count, bad, reason = verify_stored_chain(store, args.platform)
    finally:
        store.close()
    payload = {
        "platform": args.platform,
        "records_checked": count,
        "first_bad_position": bad,
        "reason": reason,
        "ok": bad is None,
    }
    if bad is None:
        text = f"chain ok: {count:,} records of platform {args.platform} link correctly"
    else:
        text = f"CHAIN BROKEN at position {bad}: {reason} ({count:,} records before it verified)"
    _print(args, payload, text)
    return EXIT_OK if bad is None else EXIT_REFUSED


def cmd_keys(args: argparse.Namespace) -> int:
    from ledger.checkpoint import generate_key

    if args.action == "generate":
        path = Path(args.out) if args.out else _config(args).signing_key_path
        assert path is not None
        if path.exists():
            print(f"{path} exists; refusing to overwrite a signing key", file=sys.stderr)
            return EXIT_REFUSED
        generate_key(path)
        _print(args, {"key_file": str(path)}, f"created {path} (mode 0600)")
        return EXIT_OK
    service = _service(args)
    try:
        vkey = service.vkey(args.platform)
    finally:
        service.close()
    _print(args, {"platform": args.platform, "vkey": vkey}, vkey)
    return EXIT_OK


def cmd_checkpoint(args: argparse.Namespace) -> int:
    service = _service(args)
    try:
        cp = service.sign_checkpoint(args.platform)
    finally:
        service.close()
    if args.out:
        Path(args.out).write_bytes(cp.note)
    payload = {
        "size": cp.size,
        "root": base64.b64encode(cp.root).decode(),
        "note": cp.note.decode(),
    }
    _print(args, payload, cp.note.decode().rstrip("\n"))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    service = _service(args)
    show = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int | None) -> None:
        if show:
            print(f"\rexported {done:,} / {total or 0:,} records", end="", file=sys.stderr)

    try:
        result = service.export(args.platform, args.out, progress=progress)
        vkey = service.vkey(args.platform)
    finally:
        service.close()
    if show:
        print(file=sys.stderr)
    payload: dict[str, Any] = {}
    for key, value in vars(result).items():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        payload[key] = str(value) if isinstance(value, Path) else value
    payload["vkey"] = vkey
    text = f"wrote {args.out}\nverify with: custody-verify bundle {args.out} --vkey '{vkey}'"
    _print(args, payload, text)
    return EXIT_OK


def cmd_proof(args: argparse.Namespace) -> int:
    from ledger.checkpoint import tlog_proof

    service = _service(args)
    try:
        if args.action == "consistency":
            path = service.consistency_proof(args.platform, args.first, args.second)
            lines = [base64.b64encode(h).decode() for h in path]
            _print(
                args, {"first": args.first, "second": args.second, "proof": lines}, "\n".join(lines)
            )
            return EXIT_OK
        cp, audit_path, leaf = service.inclusion_proof(args.platform, args.index, args.size)
    except ValueError as exc:
        print(f"cannot prove: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        service.close()
    Path(args.out).write_bytes(tlog_proof(args.index, audit_path, cp.note))
    if args.leaf_out:
        Path(args.leaf_out).write_bytes(leaf)
    _print(
        args,
        {"index": args.index, "size": cp.size, "proof_file": args.out},
        f"wrote {args.out}: record {args.index} in the checkpoint of size {cp.size}",
    )
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:

    from ledger.api.server import ServeError, serve
    from ledger.backup import RestoreUnverified, restore_guard

    try:
        warning = restore_guard(_config(args), accept_restore=args.accept_restore)
    except RestoreUnverified as exc:
        print(f"cannot serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if warning:
        print(warning, file=sys.stderr)

    from ledger.logs import configure_logging, json_wanted

    configure_logging(json_wanted(_config(args).log_format))  # one JSON line per event
    try:
        return serve(
            _config(args),
            args.host,
            args.port,
            tls_dir=args.tls_dir,
            insecure_dev=args.insecure_dev,
            maintenance_port=args.health_port,
            dashboard_port=args.dashboard_port,
        )
    except ServeError as exc:
        print(f"cannot serve: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_certs(args: argparse.Namespace) -> int:
    from ledger.api.certs import main as certs_main

    return certs_main(args.certs_args)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": cmd_init,
    "serve": cmd_serve,
    "certs": cmd_certs,
    "platform": cmd_platform,
    "balance": cmd_balance,
    "statement": cmd_statement,
    "chain": cmd_chain,
    "keys": cmd_keys,
    "checkpoint": cmd_checkpoint,
    "export": cmd_export,
    "proof": cmd_proof,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "certs":  # everything after `certs` belongs to the certs tool
        args.certs_args = [*args.certs_args, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.actor is None:
        try:
            args.actor = f"operator:{getpass.getuser()}"
        except Exception:
            args.actor = "operator:unknown"
    if not is_actor(args.actor):
        parser.error(
            f"--actor {args.actor!r}: give ROLE:NAME with ROLE one of {', '.join(sorted(ROLES))}"
        )
    handler = HANDLERS.get(args.command, cmd_write)
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RestoreUnverified as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except WriterElsewhere as exc:  # another server or another database holds the platform
        print(f"not here: {exc}; nothing was written", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:  # `custody ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

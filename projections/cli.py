"""`custody project ...`: run, rebuild and query the projections from the command line.

`register(subparsers)` adds the `project` command group to the ledger's parser; `cmd_project`
is its handler. Queries catch up first (unless --no-catch-up) so that they answer about the
whole stored log, and print text by default or JSON with the global `--json`.
Standalone: `python -m projections.cli project status --json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any

from ledger.config import Config, ConfigError
from projections import liabilities_cli
from projections import statements as st
from projections.audit_trail import (
    EXPORT_ROWS_DEFAULT,
    EXPORT_ROWS_MAX,
    AuditFilter,
    audit_page,
    export,
    public_row,
)
from projections.base import ProjectionError
from projections.runner import BATCH_MAX, DEFAULT_BATCH, ProjectionRunner

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3


def _batch(text: str) -> int:
    value = int(text)
    if not 1 <= value <= BATCH_MAX:
        raise argparse.ArgumentTypeError(f"batch must be in 1..{BATCH_MAX}")
    return value


def _page_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= st.PAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(f"page size must be in 1..{st.PAGE_SIZE_MAX}")
    return value


def _max_rows(text: str) -> int:
    value = int(text)
    if not 1 <= value <= EXPORT_ROWS_MAX:
        raise argparse.ArgumentTypeError(f"max rows must be in 1..{EXPORT_ROWS_MAX}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `project` and its subcommands to the `custody` parser's subparsers."""
    project: argparse.ArgumentParser = subparsers.add_parser(
        "project", help="projections: statements, as-of balances, audit trail"
    )
    sub = project.add_subparsers(dest="action", required=True, metavar="ACTION")

    run = sub.add_parser("run", help="project the stored log (and keep following with --follow)")
    run.add_argument("--platform", help="one platform (default: every platform)")
    run.add_argument("--follow", action="store_true", help="keep running until SIGINT/SIGTERM")
    run.add_argument("--batch", type=_batch, default=DEFAULT_BATCH, help="records per transaction")

    rb = sub.add_parser("rebuild", help="drop the read models and project again from zero")
    rb.add_argument("--platform", help="one platform (default: every platform)")
    rb.add_argument("--batch", type=_batch, default=DEFAULT_BATCH)

    stat = sub.add_parser("status", help="each projection's position and lag behind the log")
    stat.add_argument("--platform")

    sm = sub.add_parser("statement", help="an account's lines with running balances")
    sm.add_argument("account_id")
    sm.add_argument("--platform", required=True)
    sm.add_argument("--from-ms", type=int, help="first time included (Unix ms)")
    sm.add_argument("--to-ms", type=int, help="last time included (Unix ms)")
    sm.add_argument("--kind", action="append", default=[], help="record kind (repeatable)")
    sm.add_argument("--page-size", type=_page_size, default=st.PAGE_SIZE_DEFAULT)
    sm.add_argument("--page-token", default="", help="next_page_token of the previous page")

    ba = sub.add_parser("balance-at", help="an account's balance at a past time or position")
    ba.add_argument("account_id")
    ba.add_argument("--platform", required=True)
    at = ba.add_mutually_exclusive_group()
    at.add_argument("--at-ms", type=int, help="Unix ms (default: now)")
    at.add_argument("--at-seq", type=int, help="log position")

    au = sub.add_parser("audit", help="the audit trail: filter, page, export as CSV or JSON")
    au.add_argument("--platform", required=True)
    au.add_argument("--account")
    au.add_argument("--actor")
    au.add_argument("--role")
    au.add_argument("--op", help="operation, e.g. transfer")
    au.add_argument("--kind", help="record kind, e.g. command_refused")
    au.add_argument("--code", help="refusal code, e.g. INSUFFICIENT_FUNDS")
    au.add_argument("--outcome", choices=["accepted", "refused"])
    au.add_argument("--from-ms", type=int)
    au.add_argument("--to-ms", type=int)
    au.add_argument("--from-seq", type=int)
    au.add_argument("--to-seq", type=int)
    au.add_argument("--page-size", type=_page_size, default=st.PAGE_SIZE_DEFAULT)
    au.add_argument("--page-token", default="")
    au.add_argument(
        "--format", choices=["csv", "json"], help="export every matching row (streamed)"
    )
    au.add_argument("--out", help="export file (default: standard output)")
    au.add_argument("--max-rows", type=_max_rows, default=EXPORT_ROWS_DEFAULT)

    for p in (sm, ba, au):
        p.add_argument(
            "--no-catch-up", action="store_true", help="answer from the read model as it is"
        )
    liabilities_cli.register(sub)  # `custody project liabilities build ...`
    project.set_defaults(handler=cmd_project)
    return project


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


def cmd_project(args: argparse.Namespace) -> int:
    """Handler of every `custody project ...` subcommand."""
    if args.action == "liabilities":
        return liabilities_cli.cmd_liabilities(args)
    from ledger.store import LedgerStore

    store = LedgerStore(_config(args))
    try:
        runner = ProjectionRunner(store, batch_size=getattr(args, "batch", DEFAULT_BATCH))
        return _dispatch(args, runner)
    except ProjectionError as exc:
        print(f"projection error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        store.close()


def _dispatch(args: argparse.Namespace, runner: ProjectionRunner) -> int:
    action = args.action
    if action in ("run", "rebuild"):
        from ledger.service import tune_gc

        # as in `custody serve`: catch-up allocates many short-lived objects per record, and
        # the default first-generation threshold (700) collects thousands of times a second
        # (~20 % of a worker's CPU, measured with bench/projections.py)
        tune_gc()
    if action == "run":
        return _run(args, runner)
    if action == "rebuild":
        done = runner.rebuild(args.platform)
        _print(args, done, "\n".join(f"{p}: rebuilt from {n:,} records" for p, n in done.items()))
        return EXIT_OK
    if action == "status":
        rows = [asdict(s) for s in runner.status(args.platform)]
        text = "\n".join(
            f"{r['platform']:<16} {r['name']:<12} position {r['position']:>10,}  "
            f"log {r['log_position']:>10,}  lag {r['lag']:>8,}"
            for r in rows
        )
        _print(args, rows, text or "(no platforms)")
        return EXIT_OK
    if not args.no_catch_up:
        runner.catch_up(args.platform)
    if action == "statement":
        return _statement(args, runner)
    if action == "balance-at":
        b = st.balance_at(runner.db, args.platform, args.account_id, args.at_seq, args.at_ms)
        avail = "-" if b.available_minor is None else f"{b.available_minor:,}"
        text = (
            f"{b.account} ({b.kind}, {b.currency}) after position {b.at_seq:,}: "
            f"posted {b.posted_minor:,}  held {b.held_minor:,}  available {avail}"
        )
        _print(args, asdict(b), text)
        return EXIT_OK
    assert action == "audit"
    return _audit(args, runner)


def _run(args: argparse.Namespace, runner: ProjectionRunner) -> int:
    if not args.follow:
        done = runner.catch_up(args.platform)
        text = "\n".join(f"{p}: {n:,} records projected" for p, n in done.items())
        _print(args, done, text or "(no platforms)")
        return EXIT_OK
    from ledger.logs import configure_logging, json_wanted

    # a long-running worker: its lease takeovers and failures must reach the operator's logs
    configure_logging(json_wanted(_config(args).log_format))
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    runner.follow(stop, args.platform)
    return EXIT_OK


def _statement(args: argparse.Namespace, runner: ProjectionRunner) -> int:
    page = st.statement(
        runner.db,
        args.platform,
        args.account_id,
        args.page_size,
        args.page_token,
        args.from_ms,
        args.to_ms,
        args.kind,
    )
    lines = [
        f"{x['seq']:>10} {x['ts']:>14} {x['kind']:<20} {x['dir']:<8} {x['amount']:>16,} "
        f"{x['posted']:>18,} {x['held']:>14,}  {x['counterparty']:<16} {x['cid']}"
        for x in page.lines
    ]
    header = (
        f"{'position':>10} {'time (ms)':>14} {'kind':<20} {'dir':<8} {'amount':>16} "
        f"{'posted after':>18} {'held after':>14}  {'counterparty':<16} client id"
    )
    text = "\n".join([header, *lines]) if lines else "(no lines)"
    if page.next_page_token:
        text += f"\nnext page: --page-token {page.next_page_token}"
    payload = {
        "lines": page.lines,
        "next_page_token": page.next_page_token,
        "projected_to": page.projected_to,
    }
    _print(args, payload, text)
    return EXIT_OK


def _audit(args: argparse.Namespace, runner: ProjectionRunner) -> int:
    flt = AuditFilter(
        account=args.account,
        actor=args.actor,
        role=args.role,
        op=args.op,
        kind=args.kind,
        code=args.code,
        outcome=args.outcome,
        from_ms=args.from_ms,
        to_ms=args.to_ms,
        from_seq=args.from_seq,
        to_seq=args.to_seq,
    )
    if args.format:
        if args.out:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                result = export(runner.db, args.platform, f, args.format, flt, args.max_rows)
            os.replace(tmp, args.out)
        else:
            result = export(runner.db, args.platform, sys.stdout, args.format, flt, args.max_rows)
        if result.truncated:
            print(
                f"export stopped at --max-rows {args.max_rows:,}; narrow the filter "
                "(e.g. --from-seq) to export the rest",
                file=sys.stderr,
            )
        if args.out:
            print(f"wrote {result.rows:,} rows to {args.out}", file=sys.stderr)
        return EXIT_OK
    page = audit_page(runner.db, args.platform, flt, args.page_size, args.page_token)
    rows = [public_row(r) for r in page.rows]
    text_lines = [
        f"{r['seq']:>10} {r['ts']:>14} {r['actor']:<20} {r['op']:<18} {r['outcome']:<8} "
        f"{r['code'] or '':<22} {','.join(r['accounts']):<24} "
        f"{'' if r['amount'] is None else r['amount']:>12} {r['ccy'] or ''} pv{r['pv']}"
        for r in rows
    ]
    text = "\n".join(text_lines) if text_lines else "(no rows)"
    if page.next_page_token:
        text += f"\nnext page: --page-token {page.next_page_token}"
    _print(
        args,
        {"rows": rows, "next_page_token": page.next_page_token, "projected_to": page.projected_to},
        text,
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the ledger's global options (for `python -m projections.cli`)."""
    parser = argparse.ArgumentParser(prog="custody")
    parser.add_argument("--data-dir", help="folder of the embedded SQLite store (CUSTODY_DATA_DIR)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    project = register(sub)
    for action in project._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_project(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

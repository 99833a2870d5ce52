"""`custody recon ...`: import bank statements, match, run the daily reconciliation, list breaks.

`register(subparsers)` adds the `recon` group to `custody`'s parser and returns its handler
by command name (`{"recon": cmd_recon}`); the global `--json`, `--data-dir` and `--actor`
apply. Standalone: `python -m reconciliation.cli [--json] [--actor operator:NAME] recon ...`.

The platform's omnibus bank accounts come from a JSON file (`--accounts FILE`, else
CUSTODY_RECON_CONFIG, else `<data dir>/reconciliation.json`):
`{"<platform>": {"accounts": {"<IBAN or account no>": "<omnibus account id>"}, ...}}`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ledger.config import Config, ConfigError
from reconciliation import daily
from reconciliation.csv_import import load_mapping
from reconciliation.ledger_view import LedgerReadError
from reconciliation.model import MAX_FILE_BYTES, StatementError
from reconciliation.statements import (
    FORMATS,
    PlatformConfig,
    ReconStore,
    load_config,
)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
CONFIG_ENV = "CUSTODY_RECON_CONFIG"
BREAK_KINDS = (
    "statement_conflict",
    "continuity_break",
    "sequence_gap",
    "arithmetic_break",
    "account_unknown",
    "statement_missing",
    "reconciliation_shortfall",
    "reconciliation_excess",
)


def _day(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError("a day is YYYY-MM-DD") from None


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    recon = subparsers.add_parser(
        "recon",
        help="bank statements: import, match, daily reconciliation, breaks",
        description="Reconciliation against the bank (docs/RECONCILIATION.md).",
    )
    sub = recon.add_subparsers(dest="recon_action", required=True, metavar="ACTION")
    imp = sub.add_parser("import", help="import a camt.053 or CSV bank statement file")
    imp.add_argument("file")
    imp.add_argument("--platform", required=True)
    imp.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    imp.add_argument("--mapping", help="CSV column mapping (JSON), required for --format csv")
    mt = sub.add_parser("match", help="match bank entries with ledger movements as at a day")
    mt.add_argument("--platform", required=True)
    mt.add_argument("--day", required=True, type=_day)
    rn = sub.add_parser(
        "run",
        help="match, compute requirement vs resource, submit the reconciliation for a checker",
    )
    rn.add_argument("--platform", required=True)
    rn.add_argument("--day", required=True, type=_day)
    rn.add_argument(
        "--book-receipts",
        action="store_true",
        help="first book unmatched bank receipts into suspense (as the operator)",
    )
    st = sub.add_parser(
        "settle",
        help="ask a checker to settle a recorded shortfall (cover) or excess (return)",
    )
    st.add_argument("--platform", required=True)
    st.add_argument("--reconciliation", required=True, help="the reconciliation id")
    st.add_argument(
        "--amount", type=int, help="minor units (default: what is left of the difference)"
    )
    br = sub.add_parser("breaks", help="statement breaks, conflicts, results and open items")
    br.add_argument("--platform", required=True)
    br.add_argument("--day", type=_day, help="open items of this day (default: the latest run)")
    for p in (imp, mt, rn, st, br):
        p.add_argument("--accounts", help="reconciliation config JSON (see module help)")
    recon.set_defaults(handler=cmd_recon)
    return {"recon": cmd_recon}


def _config_env(args: argparse.Namespace) -> Config:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        env["CUSTODY_DATA_DIR"] = args.data_dir
    return Config.from_env(env)


def _platform_config(args: argparse.Namespace, cfg: Config) -> PlatformConfig:
    path = getattr(args, "accounts", None) or os.environ.get(CONFIG_ENV)
    p = Path(path) if path else Path(cfg.data_dir) / "reconciliation.json"
    if not p.is_file():
        raise ConfigError(f"no reconciliation config at {p} (--accounts FILE or {CONFIG_ENV})")
    try:
        return load_config(p, args.platform)
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def _print(args: argparse.Namespace, payload: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, ensure_ascii=False, sort_keys=True))
    else:
        print(text)


def cmd_recon(args: argparse.Namespace) -> int:
    try:
        cfg = _config_env(args)
        pcfg = _platform_config(args, cfg)
        action = args.recon_action
        if action == "run":
            return _run(args, cfg, pcfg)
        if action == "settle":
            return _settle(args, cfg)
        from ledger.store import LedgerStore

        store = LedgerStore(cfg)
        try:
            if args.platform not in store.platform_ids():
                print(f"not found: platform {args.platform!r}", file=sys.stderr)
                return EXIT_REFUSED
            recon = ReconStore(store)
            if action == "import":
                return _import(args, recon, pcfg)
            if action == "match":
                return _match(args, store, recon, pcfg)
            return _breaks(args, recon)
        finally:
            store.close()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StatementError as exc:
        print(f"statement refused, nothing imported: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (daily.ReconciliationError, LedgerReadError) as exc:
        print(f"cannot reconcile: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _import(args: argparse.Namespace, recon: ReconStore, pcfg: PlatformConfig) -> int:
    path = Path(args.file)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise StatementError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    raw = path.read_bytes()
    mapping = None
    if args.fmt == "csv":
        if not args.mapping:
            print("--format csv needs --mapping FILE", file=sys.stderr)
            return EXIT_USAGE
        mapping = load_mapping(Path(args.mapping).read_bytes())
    res = recon.import_file(args.platform, raw, args.fmt, pcfg, mapping)
    lines = [f"{res.status}: {path.name} sha256 {res.sha256}"]
    for s in res.statements:
        lines.append(f"  statement {s.key}: {s.status}, {s.entries} entries {s.reason}".rstrip())
    _print(args, res.to_json(), "\n".join(lines))
    return EXIT_OK if res.status in ("imported", "duplicate") else EXIT_REFUSED


def _match(args: argparse.Namespace, store: Any, recon: ReconStore, pcfg: PlatformConfig) -> int:
    _view, result, _shas = daily.run_match(store, recon, args.platform, args.day, pcfg)
    counts = result.counts()
    lines = [
        f"{args.platform} {args.day}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; in transit {result.in_transit_minor}; breaks {result.breaks}"
    ]
    for o in result.open:
        lines.append(
            f"  {o.state:16} {o.side:6} {o.key:40} {o.amount_minor:>14} {o.date} "
            f"age {o.age_days}d {' '.join(o.refs[:2])}"
        )
    for s in result.suggestions:
        lines.append(
            f"  suggest: deposit {s.amount_minor} {s.currency} from {s.mirror_account_id} "
            f"into {s.account_id} (client id {s.client_id}, bank ref {s.bank_ref!r})"
        )
    _print(args, result.to_json(), "\n".join(lines))
    return EXIT_OK


def _run(args: argparse.Namespace, cfg: Config, pcfg: PlatformConfig) -> int:
    actor = getattr(args, "actor", None) or ""
    if not actor.startswith("operator:"):
        print(f"recon run needs --actor operator:NAME, not {actor!r}", file=sys.stderr)
        return EXIT_USAGE
    from ledger.service import LedgerService

    service = LedgerService(cfg)
    service.start()
    try:
        if args.platform not in service.platform_ids():
            print(f"not found: platform {args.platform!r}", file=sys.stderr)
            return EXIT_REFUSED
        recon = ReconStore(service.store)
        statuses: dict[str, int] = {}
        for s in recon.statements(args.platform):
            statuses[s.status] = statuses.get(s.status, 0) + 1
        res = daily.run_daily(service, args.platform, args.day, pcfg, actor, args.book_receipts)
    finally:
        service.close()
    payload = res.to_json()
    payload["statements_by_status"] = statuses
    lines = [f"statements: {statuses}"]
    for f in res.figures:
        lines.append(
            f"{f.currency} {f.day}: bank {f.bank_closing_minor} + in transit "
            f"{f.in_transit_minor} - requirement {f.requirement_minor} = "
            f"{f.difference_minor} ({f.result}); breaks {f.breaks}; snapshot {f.snapshot_size}"
        )
        rec = res.record.get(f.currency)
        if rec is not None:
            lines.append(f"  record: {rec.status} {rec.client_id} {rec.code}".rstrip())
        settle = res.settlement.get(f.currency)
        if settle is not None:
            lines.append(f"  settlement: {settle.status} {settle.client_id} {settle.code}".rstrip())
    lines += [f"  to do: {a}" for a in res.actions]
    _print(args, payload, "\n".join(lines))
    refused = [o for o in [*res.record.values(), *res.settlement.values()] if not o.ok]
    return EXIT_REFUSED if refused else EXIT_OK


def _settle(args: argparse.Namespace, cfg: Config) -> int:
    actor = getattr(args, "actor", None) or ""
    if not actor.startswith("operator:"):
        print(f"recon settle needs --actor operator:NAME, not {actor!r}", file=sys.stderr)
        return EXIT_USAGE
    from ledger.service import LedgerService
    from reconciliation.ledger_view import read as read_ledger

    service = LedgerService(cfg)
    service.start()
    try:
        if args.platform not in service.platform_ids():
            print(f"not found: platform {args.platform!r}", file=sys.stderr)
            return EXIT_REFUSED
        view = read_ledger(service.store, args.platform)
        recorded = view.reconciliations.get(args.reconciliation)
        cmd, outcome = daily.prepare_settlement(
            service, args.platform, args.reconciliation, actor, args.amount, view
        )
    finally:
        service.close()
    assert recorded is not None  # prepare_settlement refused an unknown reconciliation
    shortfall = recorded.difference_minor < 0
    payload = {
        "reconciliation": recorded.to_json(),
        "direction": "cover_shortfall" if shortfall else "return_excess",
        "settlement": msgspec.to_builtins(cmd),
        "outcome": msgspec.to_builtins(outcome),
    }
    lines = [
        f"{args.reconciliation}: {'shortfall' if shortfall else 'excess'} "
        f"{recorded.difference_minor}, left {recorded.left_minor}",
        f"  settlement {cmd.amount_minor} {cmd.currency}: {outcome.status} {outcome.client_id} "
        f"{outcome.code}".rstrip(),
    ]
    if outcome.status == "pending":
        lines.append(f"  to do: {daily.settlement_action(cmd, shortfall)}")
    elif not outcome.ok:
        lines.append(f"  refused: {outcome.message}")
    _print(args, payload, "\n".join(lines))
    return EXIT_OK if outcome.ok else EXIT_REFUSED


def _breaks(args: argparse.Namespace, recon: ReconStore) -> int:
    events = recon.events(args.platform, BREAK_KINDS)
    day, items = recon.open_items(args.platform, args.day)
    open_breaks = [i for i in items if i["state"] in ("unmatched_bank", "unmatched_ledger")]
    payload = {
        "platform": args.platform,
        "events": [e.to_json() for e in events],
        "day": day,
        "open_items": open_breaks,
    }
    lines = [f"{len(events)} event(s):"]
    for e in events:
        reason = e.detail.get("reason") or e.detail.get("result") or ""
        lines.append(f"  {e.kind:26} {e.statement_key:40} {reason}")
    lines.append(f"{len(open_breaks)} open item(s) at {day or '-'}:")
    for i in open_breaks:
        lines.append(
            f"  {i['state']:16} {i['key']:40} {i['amount_minor']:>14} {i['date']} "
            f"age {i['age_days']}d"
        )
    _print(args, payload, "\n".join(lines))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="custody-recon")
    parser.add_argument("--data-dir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--actor", default="operator:recon")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = register(sub)
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""`custody risk ...`: run the early-warning engine, list, acknowledge and close alerts, and
write the dashboard.

`register(subparsers)` adds the `risk` group to the `custody` parser and returns its handler
by command name (`{"risk": cmd_risk}`); the global `--data-dir`, `--json` and `--actor` apply.
Standalone: `python -m risk.cli [--data-dir D] [--actor operator:NAME] risk alerts --platform P`.

    custody risk run [--platform P] [--follow] [--rules FILE]
    custody risk alerts --platform P [--level L] [--open] [--no-catch-up]
    custody --actor operator:NAME risk ack ALERT_ID --platform P --note TEXT
    custody --actor checker:NAME risk close ALERT_ID --platform P --reason TEXT
    custody risk dashboard --out FILE.html [--platform P]...
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ledger import commands as c
from ledger.config import Config, ConfigError
from risk import store as rs
from risk.dashboard import render
from risk.engine import RiskEngine
from risk.recon_feed import ReconStoreFeed
from risk.ruleset import DEFAULT_RULES, RuleSet, decode_rules

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
RULES_ENV = "CUSTODY_RISK_RULES"  # path of a rules document (JSON); default: built-in rules
MAX_RULES_BYTES = 1 << 20

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> dict[str, Handler]:
    """Add `risk` and its subcommands to the `custody` parser; returns {"risk": handler}."""
    risk = subparsers.add_parser("risk", help="early warning: alerts, levels, dashboard")
    sub = risk.add_subparsers(dest="action", required=True, metavar="ACTION")

    run = sub.add_parser("run", help="evaluate the rules over the stored logs (--follow: keep on)")
    run.add_argument("--platform", help="one platform (default: every platform)")
    run.add_argument("--follow", action="store_true", help="keep running until SIGINT/SIGTERM")
    run.add_argument("--rules", help=f"rules document (JSON; default ${RULES_ENV} or built-in)")

    al = sub.add_parser("alerts", help="list alerts, most severe first")
    al.add_argument("--platform", required=True)
    al.add_argument("--level", choices=c.ALERT_LEVELS)
    al.add_argument("--open", action="store_true", help="only alerts not closed")
    al.add_argument("--no-catch-up", action="store_true", help="do not run the rules first")
    al.add_argument("--rules", help="rules document for the catch-up")

    ack = sub.add_parser("ack", help="acknowledge an alert (recorded in the log)")
    ack.add_argument("alert_id")
    ack.add_argument("--platform", required=True)
    ack.add_argument("--note", required=True)
    ack.add_argument("--client-id", help="idempotency key (default: a new UUID)")

    close = sub.add_parser("close", help="close an alert with a reason (ORANGE/RED: a checker)")
    close.add_argument("alert_id")
    close.add_argument("--platform", required=True)
    close.add_argument("--reason", required=True)
    close.add_argument("--client-id", help="idempotency key (default: a new UUID)")

    dash = sub.add_parser("dashboard", help="write the self-contained HTML dashboard")
    dash.add_argument("--out", required=True, help="the .html file to write")
    dash.add_argument("--platform", action="append", help="platforms to show (default: all)")
    dash.add_argument("--no-catch-up", action="store_true", help="do not run the rules first")
    dash.add_argument("--rules", help="rules document for the catch-up")
    return {"risk": cmd_risk}


def load_rules(path: str | None) -> RuleSet:
    path = path or os.environ.get(RULES_ENV) or None
    if path is None:
        return DEFAULT_RULES
    data = Path(path).read_bytes()
    if len(data) > MAX_RULES_BYTES:
        raise ValueError("rules document larger than 1 MiB")
    return decode_rules(data)


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


def cmd_risk(args: argparse.Namespace) -> int:
    from ledger.service import LedgerService

    try:
        rules = load_rules(getattr(args, "rules", None))
    except (OSError, ValueError) as exc:
        print(f"rules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    service = LedgerService(_config(args))
    service.start()
    try:
        engine = RiskEngine(service, rules, feed=ReconStoreFeed(service))
        return _ACTIONS[args.action](args, engine)
    finally:
        service.close()


def _run(args: argparse.Namespace, engine: RiskEngine) -> int:
    if not args.follow:
        done = engine.catch_up(args.platform)
        status = [engine.status(p) for p in done]
        text = "\n".join(
            f"{s['platform']}: read {done[s['platform']]:,} records, at position "
            f"{s['position']} of {s['log_position']}"
            for s in status
        )
        _print(args, status, text or "(no platforms)")
        return EXIT_OK
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print("early warning: following the logs (Ctrl-C stops)", file=sys.stderr)
    engine.follow(stop, args.platform)
    return EXIT_OK


def _alerts(args: argparse.Namespace, engine: RiskEngine) -> int:
    if args.platform not in engine.service.platform_ids():
        raise LookupError(f"platform {args.platform!r}")
    if not args.no_catch_up:
        engine.catch_up(args.platform)
    rows = rs.alerts(engine.db, args.platform, args.level, args.open)
    text = "\n".join(
        f"{a['level']:<7} {a['status']:<13} {a['rule']} {a['alert_id']}  {a['summary']}"
        for a in rows
    )
    _print(args, rows, text or "(no alerts)")
    return EXIT_OK


def _step(args: argparse.Namespace, engine: RiskEngine) -> int:
    client_id = args.client_id or f"risk-{args.action}:{uuid.uuid4()}"
    cmd: c.Command
    if args.action == "ack":
        cmd = c.AcknowledgeAlert(client_id=client_id, alert_id=args.alert_id, note=args.note)
    else:
        cmd = c.CloseAlert(client_id=client_id, alert_id=args.alert_id, reason=args.reason)
    actor = getattr(args, "actor", None) or _default_actor()
    [outcome] = engine.service.execute(args.platform, [cmd], actor)
    payload = {
        "client_id": outcome.client_id,
        "status": outcome.status,
        "seq": outcome.seq,
        "code": outcome.code,
        "message": outcome.message,
    }
    if outcome.status in ("accepted", "replayed"):
        engine.catch_up(args.platform)
        text = f"{outcome.status}: {args.alert_id} at position {outcome.seq}"
        _print(args, payload, text)
        return EXIT_OK
    _print(args, payload, f"{outcome.status} {outcome.code}: {outcome.message}")
    return EXIT_REFUSED


def _dashboard(args: argparse.Namespace, engine: RiskEngine) -> int:
    platforms = args.platform or engine.service.platform_ids()
    for p in platforms:
        if p not in engine.service.platform_ids():
            raise LookupError(f"platform {p!r}")
        if not args.no_catch_up:
            engine.catch_up(p)
    page = render(engine.db, platforms, engine.clock_ms())
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    _print(args, {"out": str(out), "platforms": platforms}, f"wrote {out}")
    return EXIT_OK


def _default_actor() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:
        return "operator:unknown"


_ACTIONS: dict[str, Callable[[argparse.Namespace, RiskEngine], int]] = {
    "run": _run,
    "alerts": _alerts,
    "ack": _step,
    "close": _step,
    "dashboard": _dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="custody", description="early warning (standalone)")
    parser.add_argument("--data-dir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--actor", help="<role>:<name> (default operator:<user>)")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = register(sub)
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())

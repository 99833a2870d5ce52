"""`custody disclosure build ...`: compute, sign and write a regulator disclosure snapshot.

`register(subparsers)` adds the `disclosure` group to the `custody` parser; its handler is
`cmd_disclosure` (also set as the parser default `handler`). Standalone:
`python -m projections.disclosure_cli disclosure build --platform P --day 2024-03-01 --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ledger.config import Config, ConfigError
from projections.disclosure import (
    DisclosureError,
    PeriodSpec,
    build,
    default_name,
    write_files,
)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `disclosure` and its subcommands to the `custody` parser's subparsers."""
    disclosure: argparse.ArgumentParser = subparsers.add_parser(
        "disclosure", help="regulator disclosure snapshots (signed JSON, HTML, CSV)"
    )
    sub = disclosure.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser(
        "build",
        help="compute a snapshot at a signed checkpoint, sign it, write the four files",
        description="Compute the custody-disclosure/v1 snapshot of a platform for a business "
        "day, a calendar month (in the policy's day offset) or an explicit [from, to) range, "
        "at checkpoint --checkpoint-size (default: the latest checkpoint if it covers the "
        "period end, else one signed now); sign it with the ledger's checkpoint key and write "
        "<name>.json, <name>.note, <name>.html and <name>.csv into --out.",
    )
    b.add_argument("--platform", required=True)
    when = b.add_mutually_exclusive_group(required=True)
    when.add_argument("--day", help="business day YYYY-MM-DD")
    when.add_argument("--month", help="calendar month YYYY-MM")
    when.add_argument("--from-ms", type=int, help="range start, Unix ms (with --to-ms)")
    b.add_argument("--to-ms", type=int, help="range end (exclusive), Unix ms")
    b.add_argument("--checkpoint-size", type=int, help="a checkpoint already signed")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--name", help="file name stem (default: <platform>-disclosure-<period>-<size>)")
    disclosure.set_defaults(handler=cmd_disclosure)
    return disclosure


def _spec(args: argparse.Namespace) -> PeriodSpec:
    if args.day is not None:
        return PeriodSpec.day(args.day)
    if args.month is not None:
        return PeriodSpec.month(args.month)
    if args.to_ms is None:
        raise DisclosureError("--from-ms needs --to-ms")
    return PeriodSpec.range(args.from_ms, args.to_ms)


def _config(args: argparse.Namespace) -> Config:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        env["CUSTODY_DATA_DIR"] = args.data_dir
    return Config.from_env(env)


def cmd_disclosure(args: argparse.Namespace) -> int:
    """Handler of `custody disclosure build`."""
    from ledger.service import LedgerService

    try:
        spec = _spec(args)
        if args.to_ms is not None and args.from_ms is None:
            raise DisclosureError("--to-ms needs --from-ms")
        config = _config(args)
    except (DisclosureError, ConfigError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return EXIT_USAGE
    service = LedgerService(config)
    try:
        service.start()
        if args.platform not in service.platform_ids():
            print(f"not found: platform {args.platform!r}", file=sys.stderr)
            return EXIT_REFUSED
        built = build(service, args.platform, spec, args.checkpoint_size)
    except DisclosureError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        service.close()
    name = args.name or default_name(built.snapshot)
    paths = write_files(args.out, name, built)
    cp = built.snapshot["checkpoint"]
    payload = {
        "files": {k: str(v) for k, v in paths.items()},
        "checkpoint": cp,
        "period": built.snapshot["period"],
        "vkey": built.vkey,
    }
    if getattr(args, "json", False):
        print(json.dumps(payload, ensure_ascii=False, sort_keys=True))
    else:
        print("\n".join(str(p) for p in paths.values()))
        print(f"checkpoint size {cp['size']} root {cp['root']}")
        print(
            f"verify with: custody-verify disclosure {paths['json']} BUNDLE --vkey '{built.vkey}'"
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="custody")
    parser.add_argument("--data-dir", help="overrides CUSTODY_DATA_DIR")
    parser.add_argument("--json", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

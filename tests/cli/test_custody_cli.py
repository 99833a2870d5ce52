"""The `custody` command line, run as a real subprocess against a real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ledger.cli import build_parser


def _run(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "POSTGRES_"))}
    full_env.update(env or {})  # the store under test; none means the embedded default
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ledger.cli",
            "--data-dir",
            str(data_dir),
            "--actor",
            "cli:test",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        check=False,
    )


def _json(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    result = _run(data_dir, "--json", *args, env=env)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    paths: list[list[str]] = [[]]
    subactions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, sub in subactions[0].choices.items():  # type: ignore[attr-defined]
        paths.append([name])
        for inner in [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]:
            paths.extend([name, action] for action in inner.choices)
    for path in paths:
        result = subprocess.run(
            [sys.executable, "-m", "ledger.cli", *path, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, path
        assert "usage: custody" in result.stdout


def test_a_day_at_the_platform(tmp_path: Path, store_env: dict[str, str]) -> None:
    env = store_env
    d = tmp_path / "data"
    assert (
        _json(d, "platform", "create", "demo", "--name", "Demo Lending", env=env)["status"]
        == "accepted"
    )
    for args in (
        ["omni", "--kind", "omnibus"],
        ["alice", "--kind", "customer", "--role", "lender", "--holder-name", "Alice Li"],
        ["bob", "--kind", "customer", "--role", "borrower"],
    ):
        out = _json(d, "account", "open", "--platform", "demo", *args, "--currency", "CNY", env=env)
        assert out["status"] == "accepted"
    dep = _json(
        d,
        "deposit",
        "--platform",
        "demo",
        "--mirror",
        "omni",
        "--to",
        "alice",
        "--amount",
        "100000",
        "--currency",
        "CNY",
        "--client-id",
        "dep-1",
        env=env,
    )
    assert dep == {"client_id": "dep-1", "kind": "deposited", "seq": 4, "status": "accepted"}
    again = _json(
        d,
        "deposit",
        "--platform",
        "demo",
        "--mirror",
        "omni",
        "--to",
        "alice",
        "--amount",
        "100000",
        "--currency",
        "CNY",
        "--client-id",
        "dep-1",
        env=env,
    )
    assert again["status"] == "replayed" and again["seq"] == 4
    ok = _json(
        d,
        "transfer",
        "--platform",
        "demo",
        "--from",
        "alice",
        "--to",
        "bob",
        "--amount",
        "2500",
        "--currency",
        "CNY",
        "--purpose",
        "disbursement",
        env=env,
    )
    assert ok["status"] == "accepted"
    refused = _run(
        d,
        "--json",
        "transfer",
        "--platform",
        "demo",
        "--from",
        "bob",
        "--to",
        "alice",
        "--amount",
        "999999",
        "--currency",
        "CNY",
        env=env,
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["code"] == "INSUFFICIENT_FUNDS"

    balances = {r["account_id"]: r for r in _json(d, "balance", "--platform", "demo", env=env)}
    assert balances["alice"]["posted_minor"] == 97_500
    assert balances["bob"]["posted_minor"] == 2_500
    assert balances["omni"]["posted_minor"] == 100_000
    statement = _json(d, "statement", "--platform", "demo", "alice", env=env)
    assert [(x["kind"], x["direction"], x["amount_minor"]) for x in statement] == [
        ("deposited", "credit", 100_000),
        ("transferred", "debit", 2_500),
    ]
    verified = _json(d, "chain", "verify", "--platform", "demo", env=env)
    assert verified["ok"] is True and verified["records_checked"] == 7


@pytest.mark.parametrize("amount", ["12.50", "1e3", "-5", "0x10", ""])
def test_amounts_are_integers_of_minor_units(tmp_path: Path, amount: str) -> None:
    result = _run(
        tmp_path,
        "transfer",
        "--platform",
        "demo",
        "--from",
        "a",
        "--to",
        "b",
        "--amount",
        amount,
        "--currency",
        "CNY",
    )
    assert result.returncode == 2
    assert "minor units" in result.stderr


def test_unknown_platform_is_reported(tmp_path: Path) -> None:
    result = _run(tmp_path, "balance", "--platform", "nowhere")
    assert result.returncode == 1
    assert "not found" in result.stderr

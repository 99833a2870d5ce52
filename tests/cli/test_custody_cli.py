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

# The platform relays its customers' movements; the CLI's default actor is the custodian's
# operator (`operator:<user>`), who creates platforms and starts manual operations.
PLATFORM = "platform:demo"
OPERATOR = None  # the default actor
# Customer signatures off: the CLI relays no customer-signed instructions. Everything else
# (maker-checker for manual operations, limits) stays as in the built-in policy.
POLICY = {"require_customer_signature": 0}


def _run(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    actor: str | None = PLATFORM,
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
            *(["--actor", actor] if actor is not None else []),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        check=False,
    )


def _json(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, actor: str | None = PLATFORM
) -> Any:
    result = _run(data_dir, "--json", *args, env=env, actor=actor)
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


def _policy_file(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _create(d: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return _json(
        d, "platform", "create", "demo", "--name", "Demo Lending", *extra, env=env, actor=OPERATOR
    )


def test_a_day_at_the_platform(tmp_path: Path, store_env: dict[str, str]) -> None:
    env = store_env
    d = tmp_path / "data"
    created = _create(d, "--policy", _policy_file(tmp_path, POLICY), env=env)
    assert (created["status"], created["seq"]) == ("accepted", 0)
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
        "--client-id",
        "t-1",
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
    # the operator (the default actor) never moves customer money on a customer's behalf
    by_operator = _run(
        d,
        "--json",
        "transfer",
        "--platform",
        "demo",
        "--from",
        "alice",
        "--to",
        "bob",
        "--amount",
        "1",
        "--currency",
        "CNY",
        env=env,
        actor=OPERATOR,
    )
    assert by_operator.returncode == 1
    assert json.loads(by_operator.stdout)["code"] == "ROLE_NOT_PERMITTED"
    # a reversal is a manual operation: the platform may not start it, the operator's waits for
    # a checker (the policy keeps maker-checker), and nothing moves meanwhile
    by_platform = _run(
        d, "--json", "reverse", "--platform", "demo", "t-1", "--reason", "wrong payee", env=env
    )
    assert by_platform.returncode == 1
    assert json.loads(by_platform.stdout)["code"] == "ROLE_NOT_PERMITTED"
    pending = _json(
        d,
        "reverse",
        "--platform",
        "demo",
        "t-1",
        "--reason",
        "wrong payee",
        "--client-id",
        "rev-1",
        env=env,
        actor=OPERATOR,
    )
    assert pending == {
        "client_id": "rev-1",
        "kind": "approval_requested",
        "seq": 9,
        "status": "pending",
    }

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
    # 0 created, 1-3 opened, 4 deposit, 5 transfer, 6-8 refusals, 9 the pending reversal
    assert verified["ok"] is True and verified["records_checked"] == 10


def test_platform_policy_comes_from_a_file(tmp_path: Path) -> None:
    """Without --policy the platform runs under the built-in strict policy: a transfer without
    the customer's signature is refused. A policy file that is not a usable policy creates
    nothing."""
    bad = tmp_path / "bad"
    for doc in ({"require_customer_signature": "no"}, {"no_such_field": 1}, {"auth_ttl_ms": 0}):
        result = _run(
            bad,
            "platform",
            "create",
            "demo",
            "--name",
            "Demo",
            "--policy",
            _policy_file(tmp_path, doc),
            actor=OPERATOR,
        )
        assert result.returncode == 2, (doc, result.stderr)
        assert "policy" in result.stderr
    missing = _run(
        bad, "platform", "create", "demo", "--name", "Demo", "--policy", str(tmp_path / "none")
    )
    assert missing.returncode == 2 and "policy" in missing.stderr
    assert _json(bad, "platform", "list", actor=OPERATOR) == []

    d = tmp_path / "strict"
    assert _create(d)["status"] == "accepted"
    for args in (
        ["omni", "--kind", "omnibus"],
        ["alice", "--kind", "customer", "--role", "lender"],
        ["bob", "--kind", "customer", "--role", "borrower"],
    ):
        out = _json(d, "account", "open", "--platform", "demo", *args, "--currency", "CNY")
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
        "100",
        "--currency",
        "CNY",
    )
    assert dep["status"] == "accepted"
    refused = _run(
        d,
        "--json",
        "transfer",
        "--platform",
        "demo",
        "--from",
        "alice",
        "--to",
        "bob",
        "--amount",
        "1",
        "--currency",
        "CNY",
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["code"] == "AUTHORISATION_REQUIRED"


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

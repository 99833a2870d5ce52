"""The governance commands (`policy`, `gate`, `requests`, `customer`, `submit`) as subprocesses,
under the strict default policy, against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PLATFORM = "platform:demo"
OPERATOR = "operator:olga"
CHECKER = "checker:chen"


def _run(
    data_dir: Path, actor: str, *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "POSTGRES_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", "--data-dir", str(data_dir), "--actor", actor, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        input=stdin,
        check=False,
    )


def _json(data_dir: Path, actor: str, *args: str, env: dict[str, str]) -> Any:
    result = _run(data_dir, actor, "--json", *args, env=env)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def _write(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_signed_transfer_maker_checker_policy_and_gate(
    tmp_path: Path, store_env: dict[str, str]
) -> None:
    env = store_env
    d = tmp_path / "data"
    assert _json(d, OPERATOR, "platform", "create", "demo", "--name", "Demo", env=env)[
        "status"
    ] == ("accepted")
    key_file = tmp_path / "alice.pem"
    keygen = _json(d, OPERATOR, "customer", "keygen", "--out", str(key_file), env=env)
    assert len(keygen["public_key"]) == 43 and (key_file.stat().st_mode & 0o777) == 0o600
    for account, extra in (
        ("omni", ["--kind", "omnibus"]),
        ("alice", ["--kind", "customer", "--role", "lender", "--public-key", keygen["public_key"]]),
        ("bob", ["--kind", "customer", "--role", "borrower"]),
    ):
        out = _json(
            d, PLATFORM, "account", "open", "--platform", "demo", account, "--currency", "CNY",
            *extra, env=env,
        )  # fmt: skip
        assert out["status"] == "accepted", out
    out = _json(
        d, PLATFORM, "deposit", "--platform", "demo", "--mirror", "omni", "--to", "alice",
        "--amount", "100000", "--currency", "CNY", env=env,
    )  # fmt: skip
    assert out["status"] == "accepted", out

    transfer = {
        "op": "transfer",
        "client_id": "t1",
        "from_account_id": "alice",
        "to_account_id": "bob",
        "amount_minor": 2500,
        "currency": "CNY",
        "purpose": "bid",
    }
    unsigned = _write(tmp_path / "t.json", transfer)
    refused = _json(d, PLATFORM, "submit", "--platform", "demo", unsigned, env=env)
    assert (refused["status"], refused["code"]) == ("refused", "AUTHORISATION_REQUIRED")
    signed = _run(
        d, PLATFORM, "customer", "sign", "--platform", "demo", "--key", str(key_file), unsigned,
        env=env,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    signed_doc = json.loads(signed.stdout)
    assert len(signed_doc["auth"]["signature"]) == 86
    signed_doc["client_id"] = "t2"  # the platform's id; the signature does not cover it
    accepted = _json(
        d, PLATFORM, "submit", "--platform", "demo", _write(tmp_path / "s.json", signed_doc),
        env=env,
    )  # fmt: skip
    assert (accepted["status"], accepted["kind"]) == ("accepted", "transferred")
    signed_doc["client_id"] = "t3"  # the same consent again: its nonce is spent
    replayed = _json(
        d, PLATFORM, "submit", "--platform", "demo", _write(tmp_path / "s3.json", signed_doc),
        env=env,
    )  # fmt: skip
    assert (replayed["status"], replayed["code"]) == ("refused", "REPLAYED")

    # a manual reversal waits for a different person with the checker role
    pending = _json(
        d, OPERATOR, "reverse", "--platform", "demo", "t2", "--reason", "typo",
        "--client-id", "r1", env=env,
    )  # fmt: skip
    assert (pending["status"], pending["kind"]) == ("pending", "approval_requested")
    by_maker = _json(d, OPERATOR, "requests", "approve", "--platform", "demo", "r1", env=env)
    assert by_maker["code"] == "CHECKER_ROLE_REQUIRED"
    by_same_person = _json(
        d, "checker:olga", "requests", "approve", "--platform", "demo", "r1", env=env
    )
    assert by_same_person["code"] == "SELF_APPROVAL"
    listed = _json(d, OPERATOR, "requests", "list", "--platform", "demo", env=env)
    assert [r["request_id"] for r in listed] == ["r1"] and listed[0]["status"] == "pending"
    approved = _json(d, CHECKER, "requests", "approve", "--platform", "demo", "r1", env=env)
    assert (approved["status"], approved["kind"]) == ("accepted", "reversed")
    balances = {
        r["account_id"]: r["posted_minor"]
        for r in _json(d, OPERATOR, "balance", "--platform", "demo", env=env)
    }
    assert balances == {"omni": 100_000, "alice": 100_000, "bob": 0}

    # policy: template -> propose version 1 -> approve -> shown
    template = _run(d, OPERATOR, "policy", "template", env=env)
    policy = json.loads(template.stdout)
    assert policy["version"] == 0 and policy["require_customer_signature"] == 1
    policy["version"] = 1
    policy["fees"] = {"svc": {"max_minor": 500}}
    proposed = _json(
        d, OPERATOR, "policy", "propose", "--platform", "demo",
        _write(tmp_path / "p1.json", policy), "--client-id", "pol1", env=env,
    )  # fmt: skip
    assert proposed["status"] == "pending", proposed
    assert _json(d, CHECKER, "requests", "approve", "--platform", "demo", "pol1", env=env)[
        "kind"
    ] == ("policy_set")
    shown = _json(d, OPERATOR, "policy", "show", "--platform", "demo", env=env)
    assert shown["version"] == 1 and shown["fees"] == {"svc": {"fixed_minor": 0, "max_minor": 500}}

    # gate: RESTRICTED refuses new business once a checker approved it
    gate = _json(
        d, OPERATOR, "gate", "set", "--platform", "demo", "RESTRICTED", "--reason", "RED alert",
        "--client-id", "g1", env=env,
    )  # fmt: skip
    assert gate["status"] == "pending"
    rejected = _json(
        d, CHECKER, "requests", "reject", "--platform", "demo", "g1", "--reason", "not yet",
        env=env,
    )  # fmt: skip
    assert rejected["kind"] == "approval_rejected"
    again = _json(d, OPERATOR, "gate", "set", "--platform", "demo", "RESTRICTED", "--reason",
                  "RED alert", "--client-id", "g2", env=env)  # fmt: skip
    assert again["status"] == "pending"
    assert _json(d, CHECKER, "requests", "approve", "--platform", "demo", "g2", env=env)[
        "kind"
    ] == ("gate_set")
    opened = _json(
        d, PLATFORM, "account", "open", "--platform", "demo", "carol", "--kind", "customer",
        "--role", "lender", "--currency", "CNY", env=env,
    )  # fmt: skip
    assert (opened["status"], opened["code"]) == ("refused", "PLATFORM_RESTRICTED")


def test_screening_token_is_stable_and_reveals_nothing(tmp_path: Path) -> None:
    d = tmp_path / "data"
    env: dict[str, str] = {}
    a = _json(d, OPERATOR, "policy", "screen-token", "Zhang  San", env=env)["token"]
    b = _json(d, OPERATOR, "policy", "screen-token", "zhang san", env=env)["token"]
    assert a == b and a.startswith("scr:") and "zhang" not in a.lower()


def test_bad_actor_and_bad_files_are_usage_errors(tmp_path: Path) -> None:
    d = tmp_path / "data"
    bad_actor = _run(d, "cli:someone", "balance", "--platform", "demo", env={})
    assert bad_actor.returncode == 2 and "ROLE:NAME" in bad_actor.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    for args in (
        ("policy", "propose", "--platform", "demo", str(junk)),
        ("submit", "--platform", "demo", str(junk)),
    ):
        result = _run(d, OPERATOR, *args, env={})
        assert result.returncode == 2, (args, result.stdout, result.stderr)

"""`custody remote` against a real `serve` process (mutual TLS, embedded projections), under
the strict default policy: a transfer signed by the customer, balances, a statement, the audit
trail, maker-checker approval by a checker, the log, checkpoints and the export bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from api_helpers import CCY
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import cli_remote
from ledger import commands as c
from ledger.api import certs
from ledger.api.client import CustodyClient
from ledger.cli_controls import customer_keygen, sign_command

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Remote:
    target: str
    pki: Path
    tmp: Path
    capsys: pytest.CaptureFixture[str]

    def run(self, cert: str, *argv: str) -> tuple[int, str, str]:
        """`custody remote --target T --tls-dir PKI --cert CERT argv...`, in this process."""
        self.capsys.readouterr()
        rc = cli_remote.main(
            ["remote", "--target", self.target, "--tls-dir", str(self.pki), "--cert", cert, *argv]
        )
        out, err = self.capsys.readouterr()
        return rc, out, err

    def json(self, cert: str, *argv: str) -> Any:
        rc, out, err = self.run(cert, "--json", *argv)
        assert rc == 0, err
        return json.loads(out)

    def client(self, stem: str) -> CustodyClient:
        return CustodyClient.mtls(
            self.target,
            self.pki / "ca.pem",
            self.pki / f"{stem}.pem",
            self.pki / f"{stem}.key",
            retries=0,
        )


@pytest.fixture
def remote(pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Remote]:
    """`serve` in a subprocess on an ephemeral port, the strict default policy on p1."""
    if not (pki / "checker-second.pem").exists():
        certs.issue_client(pki, "checker", "second")
    script = (
        "import sys\n"
        "from ledger.api.server import serve\n"
        "from ledger.config import Config\n"
        "cfg = Config.from_env({'CUSTODY_DATA_DIR': sys.argv[1]})\n"
        "sys.exit(serve(cfg, '127.0.0.1', 0, tls_dir=sys.argv[2],\n"
        "          ready=lambda s: print('PORT', s.port, flush=True)))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "data"), str(pki)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT"), proc.stderr.read() if proc.stderr else line
        yield Remote(f"127.0.0.1:{int(line.split()[1])}", pki, tmp_path, capsys)
    finally:
        proc.terminate()
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _setup_p1(r: Remote) -> Path:
    """Platform p1 (strict default policy) with alice (key in a file), bob, and money."""
    key_file = r.tmp / "alice.pem"
    public_key = customer_keygen(key_file)
    with r.client("operator-dev") as op:
        op.create_platform("p1", "Strict")
    with r.client("platform-p1") as p1:
        p1.open_account("o-omni", "omni", kind="omnibus", currency=CCY)
        p1.open_account(
            "o-alice",
            "alice",
            kind="customer",
            currency=CCY,
            role="lender",
            holder_name="Alice Li",
            public_key=public_key,
        )
        p1.open_account(
            "o-bob", "bob", kind="customer", currency=CCY, role="borrower", holder_name="Bob W"
        )
        p1.deposit("d-alice", "omni", "alice", 100_000, CCY, bank_ref="seed")
    return key_file


def test_remote_cli_against_a_served_ledger(remote: Remote) -> None:
    r = remote
    key_file = _setup_p1(r)
    unsigned = ["transfer", "--from", "alice", "--to", "bob", "--amount", "2500", "--currency", CCY]
    transfer = [*unsigned, "--sign-with", str(key_file), "--client-id", "t-1"]
    # unsigned: refused by the customer-authorisation control (exit 1, reason printed)
    rc, _, err = r.run("platform-p1", *unsigned, "--client-id", "t-0")
    assert rc == cli_remote.EXIT_REFUSED and "AUTHORISATION_REQUIRED" in err
    # signed by alice: accepted; the same client id and expiry again: replayed, not re-applied
    sent = r.json("platform-p1", *transfer)
    assert (sent["status"], sent["kind"], sent["client_id"]) == ("accepted", "transferred", "t-1")
    again = r.json("platform-p1", *transfer, "--expires-at-ms", str(sent["expires_at_ms"]))
    assert again["status"] == "replayed" and again["position"] == sent["position"]
    rc, out, _ = r.run("platform-p1", *transfer, "--expires-at-ms", str(sent["expires_at_ms"]))
    assert rc == 0 and "replayed: transferred" in out and "--client-id t-1" in out

    # balances: one account, every account, and as of the transfer's position
    alice = r.json("platform-p1", "balance", "alice")
    assert (alice["posted_minor"], alice["currency"]) == (100_000 - 2_500, CCY)
    every = {b["account_id"]: b for b in r.json("platform-p1", "balance")}
    assert every["bob"]["posted_minor"] == 2_500 and set(every) == {"omni", "alice", "bob"}
    before = r.json(
        "platform-p1", "balance-at", "alice", "--at-position", str(sent["position"] - 1)
    )
    assert before["posted_minor"] == 100_000 and before["as_of_position"] == sent["position"] - 1
    rc, out, _ = r.run("platform-p1", "balance-at", "alice")
    assert rc == 0 and "posted 97500" in out

    # the statement, as an auditor of p1 and as the platform itself (text)
    st = r.json("auditor-dev", "--platform", "p1", "statement", "alice")
    assert [(line["kind"], line["amount_minor"]) for line in st["lines"]] == [
        ("deposited", 100_000),
        ("transferred", -2_500),
    ]
    assert st["lines"][1]["client_id"] == "t-1" and st["lines"][1]["posted_minor"] == 97_500
    rc, out, _ = r.run("platform-p1", "statement", "alice", "--page-size", "1")
    assert rc == 0 and "deposited" in out and "next page: --page-token" in out
    token = out.rsplit("--page-token ", 1)[1].strip()
    rest = r.json("platform-p1", "statement", "alice", "--page-token", token, "--all")
    assert [line["client_id"] for line in rest["lines"]] == ["t-1"]

    # maker-checker: the operator's reversal waits; a different person approves it
    with r.client("operator-dev") as op:
        pending = op.reverse("rev-1", "t-1", "wrong payee", platform_id="p1")
    assert pending.pending
    listed = r.json("checker-second", "--platform", "p1", "requests", "list", "--status", "pending")
    assert [q["request_id"] for q in listed] == ["rev-1"] and listed[0]["operation"] == "reverse"
    rc, _, err = r.run("checker-dev", "--platform", "p1", "requests", "approve", "rev-1")
    assert rc == cli_remote.EXIT_REFUSED and "SELF_APPROVAL" in err  # checker:dev made it
    approved = r.json("checker-second", "--platform", "p1", "requests", "approve", "rev-1")
    assert approved["kind"] == "reversed" and approved["status"] == "accepted"
    assert r.json("platform-p1", "balance", "alice")["posted_minor"] == 100_000

    # the audit trail: the refusals, and who approved what
    refused = r.json("auditor-dev", "--platform", "p1", "audit", "--outcome", "refused", "--all")
    codes = [e["code"] for e in refused["events"]]
    assert "AUTHORISATION_REQUIRED" in codes and "SELF_APPROVAL" in codes
    by_checker = r.json("regulator-dev", "--platform", "p1", "audit", "--actor", "checker:second")
    assert [(e["kind"], e["executes"]) for e in by_checker["events"]] == [("reversed", "rev-1")]
    rc, out, _ = r.run("auditor-dev", "--platform", "p1", "audit", "--account", "bob")
    assert rc == 0 and "transferred" in out and "reversed" in out

    # read-only roles cannot write
    rc, _, err = r.run("auditor-dev", "--platform", "p1", *unsigned, "--client-id", "a-1")
    assert rc == cli_remote.EXIT_REFUSED and "READ_ONLY_ROLE" in err

    # a batch of commands as `custody customer sign` writes them
    key = _load(key_file)
    signed = sign_command(
        "p1",
        c.Transfer(
            client_id="b-1",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=10,
            currency=CCY,
        ),
        key,
        300,
        time.time_ns() // 1_000_000,
    )
    batch = r.tmp / "batch.json"
    batch.write_bytes(msgspec.json.encode([signed]))
    results = r.json("platform-p1", "submit-batch", str(batch))
    assert [(x["client_id"], x["status"]) for x in results] == [("b-1", "accepted")]
    (r.tmp / "bad.json").write_text('[{"op": "transfer", "no_such_field": 1}]')
    rc, _, err = r.run("platform-p1", "submit-batch", str(r.tmp / "bad.json"))
    assert rc == cli_remote.EXIT_USAGE and "item 0" in err

    # policy, the log, checkpoints, the export bundle
    policy = r.json("platform-p1", "policy", "show")
    assert policy["version"] == 0 and policy["gate"] == "NORMAL"
    records = [json.loads(x) for x in _lines(r, "platform-p1", "subscribe", "--count", "3")]
    assert [x["position"] for x in records] == [0, 1, 2]
    assert records[0]["kind"] == "platform_created" and records[0]["record"]["seq"] == 0
    cp = r.json("auditor-dev", "--platform", "p1", "checkpoint", "--sign")
    assert cp["size"] >= 8 and cp["note"].splitlines()[1] == str(cp["size"])
    assert r.json("auditor-dev", "--platform", "p1", "checkpoint")["size"] == cp["size"]
    out_file = r.tmp / "p1.bundle"
    exported = r.json("auditor-dev", "--platform", "p1", "export", "--out", str(out_file))
    assert out_file.stat().st_size == exported["bytes"] > 0 and exported["vkey"]
    rc, _, err = r.run("auditor-dev", "--platform", "p1", "export", "--out", str(out_file))
    assert rc == cli_remote.EXIT_USAGE and "exists" in err

    # the module runs as a program too (what `custody remote` will run)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "ledger.cli_remote", "remote", "--target", r.target),
            *("--tls-dir", str(r.pki), "--cert", "platform-p1", "--json", "balance", "bob"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["posted_minor"] == 10


def _load(path: Path) -> Ed25519PrivateKey:
    return cli_remote.load_signing_key(str(path))


def _lines(r: Remote, cert: str, *argv: str) -> list[str]:
    rc, out, err = r.run(cert, "--json", *argv)
    assert rc == 0, err
    return out.splitlines()


def test_remote_cli_usage_errors(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases: list[tuple[list[str], str]] = [
        (["--target", "10.0.0.1:50051", "--insecure-dev", "--role", "auditor", "--name", "a"],
         "loopback"),
        (["--insecure-dev", "--role", "auditor"], "--role and --name"),
        (["--tls-dir", str(tmp_path), "--cert", "platform-p1"], "missing TLS files"),
        (["--tls-dir", str(pki), "--cert", "platform-p1", "--insecure-dev", "--role", "auditor",
          "--name", "a"], "not both"),
        ([], "--tls-dir and --cert"),
    ]  # fmt: skip
    for argv, message in cases:
        capsys.readouterr()
        assert cli_remote.main(["remote", *argv, "balance"]) == cli_remote.EXIT_USAGE
        assert message in capsys.readouterr().err
    # nobody listening: exit 3, after the client's deadline
    rc = cli_remote.main(
        [
            *("remote", "--target", "127.0.0.1:1", "--tls-dir", str(pki), "--cert"),
            *("platform-p1", "--timeout", "1", "balance", "alice"),
        ]
    )
    assert rc == cli_remote.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
    not_a_key = tmp_path / "k.pem"
    not_a_key.write_text("nope")
    with pytest.raises(cli_remote.UsageError):
        cli_remote.load_signing_key(str(not_a_key))
    # the nonce of a signed instruction follows its client id (retries replay)
    assert cli_remote.signing_nonce("p1", "t-1") == cli_remote.signing_nonce("p1", "t-1")
    assert cli_remote.signing_nonce("p1", "t-1") != cli_remote.signing_nonce("p1", "t-2")
    assert 8 <= len(cli_remote.signing_nonce("p1", "t-1")) <= 64

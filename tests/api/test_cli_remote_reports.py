"""`custody remote disclosure | liabilities | alerts` against a real server with mutual TLS."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import CCY, World
from test_api_alerts import raise_alert

from custody_verify import disclosure as V
from custody_verify import liabilities as VL
from ledger import cli_remote
from ledger.api.server import RunningServer, ServerOptions, running_server
from ledger.service import LedgerService
from projections import liabilities as pol
from projections.liabilities_cli import publish


@pytest.fixture
def api_server(api_service: LedgerService, pki: Path, tmp_path: Path) -> Iterator[RunningServer]:
    options = ServerOptions(liabilities_dir=str(tmp_path / "liabilities"))
    with running_server(api_service, host="127.0.0.1", port=0, tls_dir=pki, options=options) as srv:
        yield srv


class Cli:
    def __init__(self, world: World, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.target = f"127.0.0.1:{world.server.port}"
        self.pki = pki
        self.capsys = capsys

    def run(self, cert: str, *argv: str) -> tuple[int, str, str]:
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


@pytest.fixture
def cli(world: World, pki: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(world, pki, capsys)


def test_disclosure_build_get_list(world: World, cli: Cli, tmp_path: Path) -> None:
    world.p1.transfer("c-1", "alice", "bob", 10, CCY)
    built = cli.json(
        "operator-dev", "--platform", "p1", "disclosure", "build", "--month", "2024-02",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    files = built["files"]
    assert set(files) == {"json", "note", "html", "csv"}
    rc, _, err = cli.run(
        "regulator-dev", "--platform", "p1", "disclosure", "build", "--day", "2024-02-01"
    )
    assert rc == 1 and "READ_ONLY_ROLE" in err
    got = cli.json("regulator-dev", "--platform", "p1", "disclosure", "get", "--month", "2024-02")
    assert got["sha256"] == built["sha256"] and got["checkpoint_size"] == built["checkpoint_size"]
    listed = cli.json("auditor-dev", "--platform", "p1", "disclosure", "list")
    assert [r["period_label"] for r in listed] == ["2024-02"]
    bundle = tmp_path / "p1.bundle"
    with bundle.open("wb") as f:
        world.auditor.export_bundle(f, platform_id="p1")
    assert V.verify_disclosure(files["json"], bundle, built["vkey"])["ok"]
    rc, _, err = cli.run("operator-dev", "--platform", "p1", "disclosure", "get")
    assert rc == 2 and "--day" in err


def test_liabilities_statement_and_proof(world: World, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "liabilities" / "p1" / CCY
    tree, log = publish(world.service, "p1", CCY, "operator:dev", min_depth=3, out=out)
    pol.write_outputs(tree, out, log)
    [stmt] = cli.json("auditor-dev", "--platform", "p1", "liabilities", "statement")
    assert (stmt["currency"], stmt["total_minor"]) == (CCY, tree.total)
    target = tmp_path / "alice-proof.json"
    rc, text, _ = cli.run(
        "platform-p1", "liabilities", "proof", "alice", "--currency", CCY, "--out", str(target)
    )
    assert rc == 0
    proof = json.loads(target.read_bytes())
    assert proof["salt"] not in text  # the salt goes to the file only
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    VL.verify_customer_proof(proof, world.p1.get_verifier_key(), "alice")
    rc, _, err = cli.run(
        "operator-dev", "--platform", "p1", "liabilities", "proof", "alice", "--currency", CCY,
        "--out", str(tmp_path / "x.json"),
    )  # fmt: skip
    assert rc == 1 and "PERMISSION_DENIED" in err


def test_alerts_list_ack_close_stream(world: World, cli: Cli) -> None:
    raise_alert(world.service, "W15-cli", "RED")
    rows = cli.json("platform-p1", "alerts", "list", "--level", "RED")
    assert [r["alert_id"] for r in rows] == ["W15-cli"]
    ack = cli.json("operator-dev", "--platform", "p1", "alerts", "ack", "W15-cli", "--note", "seen")
    assert ack["status"] == "accepted"
    rc, _, err = cli.run(
        "operator-dev", "--platform", "p1", "alerts", "close", "W15-cli", "--reason", "x"
    )
    assert rc == 1 and "ALERT_LEVEL_FORBIDDEN" in err
    closed = cli.json(
        "checker-dev", "--platform", "p1", "alerts", "close", "W15-cli", "--reason", "cured"
    )
    assert closed["status"] == "accepted"
    rc, text, _ = cli.run("auditor-dev", "--platform", "p1", "alerts", "stream")
    assert rc == 0
    steps = [line.split("\t")[1] for line in text.splitlines()]
    assert steps == ["raised", "acknowledged", "closed"]
    events = [
        json.loads(line)
        for line in cli.run("platform-p1", "--json", "alerts", "stream", "--count", "1")[
            1
        ].splitlines()
    ]
    assert len(events) == 1 and events[0]["record"]["kind"] == "alert_raised"

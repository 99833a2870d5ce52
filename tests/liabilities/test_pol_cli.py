"""`custody project liabilities build` (through `register`) and the verifier's `main`."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest
from helpers import FakeClock, open_service
from pol_helpers import CUSTOMERS, expected_balances, history

from custody_verify import liabilities as verify_cli
from ledger.config import Config
from projections import liabilities_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="custody")
    parser.add_argument("--data-dir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--actor", default="operator:olga")
    sub = parser.add_subparsers(dest="command", required=True)
    project = sub.add_parser("project")
    psub = project.add_subparsers(dest="action", required=True)
    liabilities_cli.register(psub)
    return parser


def _custody(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.handler(args))


@pytest.fixture
def store(store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Config:
    for key, value in store_env.items():
        monkeypatch.setenv(key, value)
    config = Config.from_env(store_env)
    service = open_service(config, FakeClock())
    try:
        history(service)
        # the balances the CLI must find, from the ledger's own live state
        (Path(store_env["CUSTODY_DATA_DIR"]) / "expected.json").write_text(
            json.dumps(expected_balances(service, "p1"))
        )
    finally:
        service.close()
    return config


def test_build_then_publish_then_verify(
    store: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = json.loads((store.data_dir / "expected.json").read_text())
    out = tmp_path / "draft"
    argv = ["project", "liabilities", "build", "--platform", "p1", "--currency", "CNY"]
    assert _custody([*argv, "--min-depth", "3", "--out", str(out)]) == 0
    draft = json.loads((out / "statement.json").read_text())
    assert draft["log"] is None and draft["total"] == sum(expected.values())
    # a draft is not logged: the customer's check says so
    vkey_file = tmp_path / "vkey"
    capsys.readouterr()

    out = tmp_path / "pub"
    code = _custody(["--json", *argv, "--min-depth", "3", "--out", str(out), "--publish"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["log_position"] is not None
    statement = json.loads((out / "statement.json").read_text())
    assert statement["log"]["position"] == report["log_position"]
    assert sorted(p.stem for p in (out / "proofs").iterdir()) == sorted(CUSTOMERS)
    for path in [out / "auditor.jsonl", *(out / "proofs").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    from ledger.service import LedgerService

    service = LedgerService(store)
    service.start()
    try:
        vkey_file.write_text(service.vkey("p1") + "\n")
        bundle = tmp_path / "p1.bundle"
        service.export("p1", bundle)
    finally:
        service.close()
    salts = {json.loads(p.read_text())["salt"] for p in (out / "proofs").iterdir()}

    for account in CUSTOMERS:
        proof = str(out / "proofs" / f"{account}.json")
        argv_v = [
            "liabilities",
            proof,
            "--vkey",
            str(vkey_file),
            "--balance",
            str(expected[account]),
        ]
        assert verify_cli.main(argv_v) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"OK account '{account}'")
    # another customer's file, checked as alice: named failure, exit 1, JSON report
    bob = str(out / "proofs" / "bob.json")
    assert (
        verify_cli.main(
            ["liabilities", bob, "--vkey", str(vkey_file), "--account", "alice", "--json"]
        )
        == 1
    )
    failed = json.loads(capsys.readouterr().out)
    assert failed["ok"] is False and failed["failure"]["check"] == "account"

    assert (
        verify_cli.main(
            [
                "liabilities-audit",
                str(out / "auditor.jsonl"),
                str(bundle),
                "--vkey",
                str(vkey_file),
                "--json",
            ]
        )
        == 0
    )
    audit = json.loads(capsys.readouterr().out)
    assert audit["ok"] and audit["result"]["customers"] == len(CUSTOMERS)

    # a second, different tree for the same snapshot is refused (one statement per cut-off)
    size = statement["snapshot"]
    assert (
        _custody(
            [
                *argv,
                "--snapshot-size",
                str(size),
                "--min-depth",
                "3",
                "--out",
                str(tmp_path / "again"),
                "--publish",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "ID_REUSED" in err
    # salts never reach standard output or error
    assert not any(s in printed + err for s in salts)


def test_publish_needs_an_operator(
    store: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--actor", "platform:p", "project", "liabilities", "build", "--platform", "p1"]
    code = _custody([*argv, "--currency", "CNY", "--out", str(tmp_path / "x"), "--publish"])
    assert code == 2 and "operator" in capsys.readouterr().err


def test_unknown_currency_and_future_snapshot_are_refused(
    store: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["project", "liabilities", "build", "--platform", "p1", "--out", str(tmp_path / "x")]
    assert _custody([*argv, "--currency", "USD"]) == 1
    assert "no account in 'USD'" in capsys.readouterr().err
    assert _custody([*argv, "--currency", "CNY", "--snapshot-size", "100000"]) == 1
    assert "fewer than the snapshot" in capsys.readouterr().err


def test_verifier_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_cli.main(["liabilities", str(tmp_path / "none.json"), "--vkey", "a+b+c"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    key = "custody-ledger.example/ledger-1/p1+82492d70+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
    assert verify_cli.main(["liabilities", str(bad), "--vkey", key, "--account", "a"]) == 1
    assert "FAIL format" in capsys.readouterr().out

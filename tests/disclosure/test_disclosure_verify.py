"""The signed note, the independent recompute by `custody-verify disclosure`, the HTML and CSV
renderings, and `custody disclosure build` end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from disc_workload import DAY1, PLATFORM_ID, run_workload
from helpers import FakeClock, deposit, ok, subprocess_env

from custody_verify import disclosure as V
from custody_verify.note import NoteError, open_note, parse_vkey
from ledger.checkpoint import NoteSigner, origin_for
from ledger.service import LedgerService
from projections import disclosure as D


def _built(
    service: LedgerService, clock: FakeClock, tmp_path: Path, recent_kinds: bool = False
) -> tuple[D.Built, Path]:
    """Day 1's snapshot at a checkpoint signed before more records were written, and a bundle
    exported later (so the bundle is longer than the snapshot's prefix)."""
    p = run_workload(service, clock, recent_kinds=recent_kinds)
    built = D.build(service, PLATFORM_ID, D.PeriodSpec.day(DAY1))
    D.write_files(tmp_path / "out", "day1", built)
    ok(service, PLATFORM_ID, deposit(p, "after-snapshot", p.customers[0], 1))
    bundle = tmp_path / "p1.bundle"
    service.export(PLATFORM_ID, bundle)
    return built, bundle


def _signer(service: LedgerService) -> NoteSigner:
    return NoteSigner(service.signing_key, origin_for(service.config.ledger_id, PLATFORM_ID))


def test_note_signs_the_exact_bytes(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    built, _ = _built(service, clock, tmp_path)
    verifier = parse_vkey(built.vkey)
    note = open_note(built.note, [verifier])
    lines = note.text.decode().splitlines()
    size = built.snapshot["checkpoint"]["size"]
    p = built.snapshot["period"]
    assert lines == [
        "custody-disclosure/v1",
        f"platform {PLATFORM_ID}",
        f"period day {DAY1} {p['from_ms']} {p['to_ms']}",
        f"checkpoint {size}",
        f"sha256 {hashlib.sha256(built.data).hexdigest()}",
    ]
    assert (tmp_path / "out" / "day1.json").read_bytes() == built.data
    # the vkey is the checkpoint key's: the same one that signs the log's checkpoints
    assert built.vkey == service.vkey(PLATFORM_ID)
    # one changed byte anywhere in the signed text breaks the signature
    for i in (0, len(note.text) // 2, len(note.text) - 2):
        forged = bytearray(built.note)
        forged[i] = ord("x") if forged[i] != ord("x") else ord("y")
        with pytest.raises(NoteError):
            open_note(bytes(forged), [verifier])


def test_verifier_recomputes_an_honest_snapshot(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    built, bundle = _built(service, clock, tmp_path)
    report = V.verify_disclosure(tmp_path / "out" / "day1.json", bundle, built.vkey)
    assert report["problems"] == [] and report["differences"] == []
    assert report["ok"] is True
    assert report["checkpoint"] == built.snapshot["checkpoint"]
    assert report["bundle_records"] > built.snapshot["checkpoint"]["size"]
    # its own recomputation gives the very same canonical bytes
    again = V.recompute(
        bundle, PLATFORM_ID, built.snapshot["period"], built.snapshot["checkpoint"]["size"]
    )
    assert V.canonical_bytes(again) == built.data
    assert V.main([str(tmp_path / "out" / "day1.json"), str(bundle), "--vkey", built.vkey]) == 0


def test_recompute_covers_alerts_and_reconciliation(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    """The verifier's own fold of the alert and reconciliation records gives the same bytes."""
    built, bundle = _built(service, clock, tmp_path, recent_kinds=True)
    assert built.snapshot["alerts"]["open_at_end"] == 1
    size = built.snapshot["checkpoint"]["size"]
    again = V.recompute(bundle, PLATFORM_ID, built.snapshot["period"], size)
    assert V.canonical_bytes(again) == built.data


def test_bundle_with_alerts_and_reconciliation_verifies(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    built, bundle = _built(service, clock, tmp_path, recent_kinds=True)
    report = V.verify_disclosure(tmp_path / "out" / "day1.json", bundle, built.vkey)
    assert report["ok"], report["problems"]


def test_verifier_agrees_on_a_month_and_on_a_range(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    run_workload(service, clock, recent_kinds=False)
    specs = [
        D.PeriodSpec.month("2023-11"),
        D.PeriodSpec.range(1_699_850_000_123, 1_700_100_000_000),
    ]
    built = [D.build(service, PLATFORM_ID, spec) for spec in specs]
    bundle = tmp_path / "p1.bundle"
    service.export(PLATFORM_ID, bundle)
    for i, b in enumerate(built):
        D.write_files(tmp_path, f"s{i}", b)
        report = V.verify_disclosure(tmp_path / f"s{i}.note", bundle, b.vkey)
        assert report["ok"], report


def _resign(built: D.Built, service: LedgerService, path: Path, change: Any) -> None:
    """Doctor the snapshot, then sign it properly with the ledger's own key."""
    snap = json.loads(built.data)
    change(snap)
    data, note = D.sign_snapshot(snap, _signer(service))
    path.with_suffix(".json").write_bytes(data)
    path.with_suffix(".note").write_bytes(note)


def test_verifier_names_a_doctored_figure(
    service: LedgerService, clock: FakeClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built, bundle = _built(service, clock, tmp_path)
    real = built.snapshot["currencies"]["CNY"]["flows"]["deposits"]["amount_minor"]

    def lower_deposits(snap: dict[str, Any]) -> None:
        snap["currencies"]["CNY"]["flows"]["deposits"]["amount_minor"] = real - 1

    doctored = tmp_path / "doctored.json"
    _resign(built, service, doctored, lower_deposits)
    report = V.verify_disclosure(doctored, bundle, built.vkey)
    assert report["problems"] == []  # the signature and the note are in order...
    assert report["differences"] == [  # ...but the figure is not the log's
        {
            "path": "currencies.CNY.flows.deposits.amount_minor",
            "expected": real,
            "found": real - 1,
        }
    ]
    assert report["ok"] is False
    rc = V.main([str(doctored), str(bundle), "--vkey", built.vkey, "--json"])
    assert rc == 1
    out = json.loads(capsys.readouterr().out)
    assert out["differences"][0]["path"] == "currencies.CNY.flows.deposits.amount_minor"


def test_verifier_names_doctored_lists_and_missing_fields(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    built, bundle = _built(service, clock, tmp_path)

    def change(snap: dict[str, Any]) -> None:
        snap["currencies"]["CNY"]["daily"][0]["custody_end"] += 5
        del snap["refusals"]["by_code"]["ROLE_NOT_PERMITTED"]
        snap["policy"]["versions_in_force"] = [0, 1]

    path = tmp_path / "d2.json"
    _resign(built, service, path, change)
    report = V.verify_disclosure(path, bundle, built.vkey)
    paths = {d["path"]: (d["expected"], d["found"]) for d in report["differences"]}
    assert paths == {
        "currencies.CNY.daily[0].custody_end": (7_020_000, 7_020_005),
        "refusals.by_code.ROLE_NOT_PERMITTED": (1, "<missing>"),
        "policy.versions_in_force.length": (1, 2),
    }


def test_verifier_rejects_a_changed_byte_and_a_foreign_key(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    built, bundle = _built(service, clock, tmp_path)
    out = tmp_path / "out"
    # a changed byte in the JSON: the note's digest no longer matches (and the figure differs)
    data = built.data.replace(
        b'"fees_total":{"amount_minor":3000', b'"fees_total":{"amount_minor":3001'
    )
    assert data != built.data
    (out / "day1.json").write_bytes(data)
    report = V.verify_disclosure(out / "day1.json", bundle, built.vkey)
    assert not report["ok"]
    assert any("does not match the snapshot" in p for p in report["problems"]), report
    assert [d["path"] for d in report["differences"]] == [
        "currencies.CNY.flows.fees_total.amount_minor"
    ]
    # the same snapshot signed by another key than the vkey given
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = NoteSigner(Ed25519PrivateKey.generate(), origin_for("ledger-x", PLATFORM_ID))
    (out / "day1.json").write_bytes(built.data)
    (out / "day1.note").write_bytes(D.sign_snapshot(built.snapshot, other)[1])
    report = V.verify_disclosure(out / "day1.json", bundle, built.vkey)
    assert not report["ok"]
    assert any(p.startswith("signature:") for p in report["problems"]), report
    # non-canonical bytes (whitespace) are refused even when signed
    pretty = json.dumps(built.snapshot, indent=1).encode()
    (out / "day1.json").write_bytes(pretty)
    (out / "day1.note").write_bytes(_signer(service).sign(D.note_body(built.snapshot, pretty)))
    report = V.verify_disclosure(out / "day1.json", bundle, built.vkey)
    assert not report["ok"]
    assert any("not canonical" in p for p in report["problems"]), report


def test_a_changed_record_in_the_bundle_fails(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    built, bundle = _built(service, clock, tmp_path)
    lines = bundle.read_bytes().split(b"\n")
    i = next(n for n, line in enumerate(lines) if b'"cid":"d-bob"' in line)
    lines[i] = lines[i].replace(b"2000000", b"2000001")
    bundle.write_bytes(b"\n".join(lines))
    report = V.verify_disclosure(tmp_path / "out" / "day1.json", bundle, built.vkey)
    assert not report["ok"]
    assert any(p.startswith("bundle: record") for p in report["problems"]), report


def test_html_and_csv_carry_both_languages_and_the_figures(
    service: LedgerService, clock: FakeClock, tmp_path: Path
) -> None:
    _built(service, clock, tmp_path, recent_kinds=True)
    page = (tmp_path / "out" / "day1.html").read_text("utf-8")
    for zh, en in (
        ("存管专户余额", "Custody (omnibus) balance"),
        ("出借人", "Lenders"),
        ("借款人", "Borrowers"),
        ("待清分 (挂账)", "Suspense (unidentified)"),
        ("冲正", "Reversals"),
        ("拒绝指令", "Refusals"),
        ("预警 (按级别)", "Alerts by level"),
        ("大额交易标记", "Large-value tags"),
    ):
        assert f"{zh} / {en}" in page
    for figure in ("7,020,000", "3,815,000", "3,088,000", "9,997", "INSUFFICIENT_FUNDS"):
        assert figure in page
    assert "<svg" in page and "<polyline" in page
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "https://" not in page and "<link" not in page
    raw = (tmp_path / "out" / "day1.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    text = raw.decode("utf-8-sig")
    assert "# 期末余额 / Balances at period end" in text
    assert "# 期间资金流量 / Flows in the period" in text
    assert "存管专户余额 / Custody (omnibus) balance,7020000" in text
    assert "CNY,投标 / Bid,1,1200000" in text
    assert "INSUFFICIENT_FUNDS,1" in text
    assert "2023-11-15,2030000,10000,1380000,3000,7020000,7022000" in text


def test_cli_build_writes_four_files_that_verify(
    store_env: dict[str, str], clock: FakeClock, service: LedgerService, tmp_path: Path
) -> None:
    run_workload(service, clock, recent_kinds=False)
    bundle = tmp_path / "p1.bundle"
    service.export(PLATFORM_ID, bundle)
    size = service.checkpoint(PLATFORM_ID).size  # type: ignore[union-attr]
    service.close()
    env = subprocess_env(store_env)
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "projections.disclosure_cli", "--json", "disclosure", "build"]
    done = subprocess.run(
        [
            *cmd,
            "--platform",
            PLATFORM_ID,
            "--day",
            DAY1,
            "--checkpoint-size",
            str(size),
            "--out",
            str(out),
            "--name",
            "d",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert sorted(payload["files"]) == ["csv", "html", "json", "note"]
    assert payload["checkpoint"]["size"] == size
    vkey = payload["vkey"]
    verify = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from custody_verify.disclosure import main; sys.exit(main(sys.argv[1:]))",
            str(out / "d.json"),
            str(bundle),
            "--vkey",
            vkey,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("OK disclosure")
    # usage errors: no period, a checkpoint never signed
    bad = subprocess.run(
        [*cmd, "--platform", PLATFORM_ID, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    unsigned = subprocess.run(
        [
            *cmd,
            "--platform",
            PLATFORM_ID,
            "--day",
            DAY1,
            "--checkpoint-size",
            "3",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert unsigned.returncode == 1 and "no checkpoint" in unsigned.stderr


def test_verifier_cli_usage_errors(tmp_path: Path) -> None:
    assert V.main([str(tmp_path / "none.json"), str(tmp_path / "b"), "--vkey", "x+y+z"]) == 2
    assert V.main([str(tmp_path / "none.json")]) == 2


def test_msgspec_and_stdlib_canonical_encoders_agree() -> None:
    value = {"b": [1, -2, None], "a": {"z": '中文\n\u0001"\\', "y": 2**62}, "é": ""}
    assert V.canonical_bytes(value) == msgspec.json.encode(value, order="sorted")

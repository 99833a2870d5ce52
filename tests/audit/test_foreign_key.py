"""A checkpoint counts only when signed by the bundle's own key, not by another trusted key."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from ledger import commands as c
from ledger.checkpoint import NoteSigner, load_key, origin_for
from ledger.config import Config
from ledger.service import LedgerService


def _ledger(tmp_path: Path, ledger_id: str) -> LedgerService:
    config = Config.from_env(
        {"CUSTODY_DATA_DIR": str(tmp_path / ledger_id), "CUSTODY_LEDGER_ID": ledger_id}
    )
    service = LedgerService(config)
    service.start()
    assert service.create_platform("p1", "P", "operator:test").ok
    opened = service.execute(
        "p1",
        [c.OpenAccount(client_id="o", account_id="om", kind="omnibus", currency="CNY")],
        "operator:test",
    )
    assert opened[0].ok
    return service


def test_checkpoints_resigned_by_another_trusted_ledger_are_rejected(tmp_path: Path) -> None:
    x, y = _ledger(tmp_path, "bank-x"), _ledger(tmp_path, "bank-y")
    bundle = tmp_path / "x.bundle"
    try:
        x.export("p1", bundle)
        vkey_x, vkey_y = x.vkey("p1"), y.vkey("p1")
        y_key = load_key(y.config.signing_key_path)  # type: ignore[arg-type]
    finally:
        x.close()
        y.close()
    signer_y = NoteSigner(y_key, origin_for("bank-y", "p1"))
    forged = []
    for line in bundle.read_bytes().splitlines(keepends=True):
        if line.startswith(b"C "):
            note = base64.b64decode(line[2:-1])
            body = note[: note.index(b"\n\n") + 1]  # X's checkpoint text, X's origin
            line = b"C " + base64.b64encode(signer_y.sign(body)) + b"\n"
        forged.append(line)
    forged_bundle = tmp_path / "forged.bundle"
    forged_bundle.write_bytes(b"".join(forged))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "custody_verify",
            "bundle",
            str(forged_bundle),
            "--vkey",
            vkey_x,
            "--vkey",
            vkey_y,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    genuine = subprocess.run(
        [
            sys.executable,
            "-m",
            "custody_verify",
            "bundle",
            str(bundle),
            "--vkey",
            vkey_x,
            "--vkey",
            vkey_y,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert genuine.returncode == 0, genuine.stdout + genuine.stderr

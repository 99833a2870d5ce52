"""The API contract passes `buf lint` (AIP-style naming, one request/response type per RPC)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_protos_pass_buf_lint() -> None:
    buf = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        found = shutil.which("buf")
        assert found is not None, "install buf: npm install --prefix .tools @bufbuild/buf@1.75.0"
        buf = Path(found)
    result = subprocess.run(
        [str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

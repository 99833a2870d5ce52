"""Fixtures of the proof-of-liabilities tests (SQLite and PostgreSQL through `service`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pol_helpers import Published, history, publish_honest

from ledger.service import LedgerService


@pytest.fixture
def honest(service: LedgerService, tmp_path: Path) -> Published:
    """A platform with varied history and an honest, published tree (2^3 leaves)."""
    p = history(service)
    return publish_honest(service, p, tmp_path / "pol")

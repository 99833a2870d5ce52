"""Fixtures for the snapshot tests: the audit tests' mixed workload (tests/audit/workload.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "audit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

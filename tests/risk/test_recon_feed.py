"""The real reconciliation tables feed the engine: a statement that breaks continuity raises a
RED W04 alert, once, and restricts the platform; an unmatched bank receipt ages into W05."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from helpers import FakeClock, Platform
from risk_helpers import DAY, engine, found, gate, levels

from ledger.service import LedgerService
from reconciliation.statements import PlatformConfig, ReconStore
from risk.recon_feed import ReconStoreFeed


def _recon_helpers() -> ModuleType:
    """The hand-written camt.053 samples of tests/reconciliation (not a package)."""
    path = Path(__file__).resolve().parents[1] / "reconciliation" / "recon_helpers.py"
    spec = importlib.util.spec_from_file_location("recon_samples", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


h = _recon_helpers()
CONFIG = PlatformConfig(accounts={h.IBAN: "omni"})


def test_a_continuity_break_in_an_imported_statement_is_red_once(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    recon = ReconStore(service.store)
    recon.ensure_tables()
    feed = ReconStoreFeed(service)
    eng = engine(service, clock, {"W04"}, feed=feed)
    first = h.Stmt("STMT-1", 1, 0, 0, "2023-11-15", [])
    assert recon.import_file("p1", h.camt053([first], 2), "camt053", CONFIG, now_ms=1).status == (
        "imported"
    )
    assert found(eng) == []
    # the next statement does not open at the previous closing
    broken = h.Stmt("STMT-2", 2, 50_000, 50_000, "2023-11-16", [])
    result = recon.import_file("p1", h.camt053([broken], 2), "camt053", CONFIG, now_ms=2)
    assert result.status == "broken"
    [brk] = feed.continuity_breaks("p1")
    assert brk.reason.startswith("continuity_break")
    assert levels(eng, "W04") == ["RED"]
    clock.advance(DAY)
    assert levels(eng, "W04") == ["RED"]  # the same break is the same alert
    assert gate(service) == "RESTRICTED"


def test_open_items_of_the_latest_matching_run_are_fed_with_their_currency(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    recon = ReconStore(service.store)
    recon.ensure_tables()
    recon.save_open_items(
        "p1",
        "2023-11-15",
        [
            ("bank", "BR9", "unmatched_bank", "omni", 12_345, "2023-11-15", 0, "", "Zhang"),
            ("ledger", "w1", "timing", "omni", -500, "2023-11-15", 0, "", ""),
        ],
    )
    [item] = ReconStoreFeed(service).unmatched_items("p1")
    assert (item.id, item.side, item.amount_minor, item.currency) == (
        "bank:BR9",
        "bank",
        12_345,
        "CNY",
    )

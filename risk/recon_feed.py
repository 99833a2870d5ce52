"""The reconciliation package as the engine's `ReconciliationFeed` (W04 breaks, W05 ageing).

Reads only: statement breaks from `recon_events` and the latest matching run's open items
from `recon_items` (reconciliation/statements.py). Item currencies come from the ledger's
mirror accounts, which the platform's state knows.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Final

from ledger.service import LedgerService
from reconciliation.statements import ReconStore
from risk.feed import StatementBreak, UnmatchedItem

# Event kinds that mean a statement failed a check and was not used (W04).
BREAK_KINDS: Final = (
    "statement_conflict",
    "continuity_break",
    "sequence_gap",
    "arithmetic_break",
    "account_unknown",
)
_OPEN_STATES: Final = {"unmatched_bank": "bank", "unmatched_ledger": "ledger"}
MAX_REASON: Final = 200  # characters of the event's detail carried into the alert


class ReconStoreFeed:
    def __init__(self, service: LedgerService) -> None:
        self.service = service
        self.recon = ReconStore(service.store)

    def continuity_breaks(self, platform: str) -> Sequence[StatementBreak]:
        breaks = []
        for event in self.recon.events(platform, BREAK_KINDS):
            detail = json.dumps(event.detail, sort_keys=True, ensure_ascii=False)
            breaks.append(
                StatementBreak(
                    id=event.event_id,
                    statement=event.sha256 or event.statement_key,
                    reason=f"{event.kind}: {detail}"[:MAX_REASON],
                    detected_ms=event.at_ms,
                )
            )
        return breaks

    def unmatched_items(self, platform: str) -> Sequence[UnmatchedItem]:
        _, items = self.recon.open_items(platform)
        open_items = [i for i in items if i["state"] in _OPEN_STATES]
        if not open_items:
            return ()
        with self.service.reading(platform) as state:
            currency = {
                i["mirror"]: state.accounts[i["mirror"]].currency
                for i in open_items
                if i["mirror"] in state.accounts
            }
        return [
            UnmatchedItem(
                id=f"{_OPEN_STATES[i['state']]}:{i['key']}",
                side=_OPEN_STATES[i["state"]],
                amount_minor=abs(int(i["amount_minor"])),
                currency=currency.get(i["mirror"], ""),
                since_ms=_day_ms(str(i["date"])),
            )
            for i in open_items
        ]


def _day_ms(day: str) -> int:
    """Midnight UTC of a YYYY-MM-DD value date, in Unix ms."""
    d = dt.date.fromisoformat(day[:10])
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()) * 1000

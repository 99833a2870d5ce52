"""What the engine needs from bank-statement reconciliation, as a small interface.

The reconciliation package (statement import and matching) finds continuity breaks and keeps
unmatched items; the engine only asks it for those, through `ReconciliationFeed`. A feed answers
from its own tables; the engine turns its answers into W04 and W05 alerts with stable ids, so
asking again never raises an alert twice. `NullFeed` is used until a real feed is wired in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec


class StatementBreak(msgspec.Struct, frozen=True, kw_only=True):
    """A statement that failed a continuity check and was not used (W04)."""

    id: str  # stable: the same break is always reported under the same id
    statement: str  # SHA-256 of the raw file, or the bank's statement id
    reason: str  # opening != previous closing, entries != closing - opening, hash reused, ...
    detected_ms: int
    currency: str = ""


class UnmatchedItem(msgspec.Struct, frozen=True, kw_only=True):
    """A bank or ledger item still unmatched (W05)."""

    id: str
    side: str  # bank | ledger
    amount_minor: int
    currency: str
    since_ms: int  # value date (bank) or record time (ledger)


class ReconciliationFeed(Protocol):
    def continuity_breaks(self, platform: str) -> Sequence[StatementBreak]: ...

    def unmatched_items(self, platform: str) -> Sequence[UnmatchedItem]: ...


class NullFeed:
    """No statements imported yet: nothing to report."""

    def continuity_breaks(self, platform: str) -> Sequence[StatementBreak]:
        return ()

    def unmatched_items(self, platform: str) -> Sequence[UnmatchedItem]:
        return ()

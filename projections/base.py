"""What every projection provides to the runner, and the errors the runner raises.

A projection is a pure function of one platform's log prefix: the runner hands it decoded
records in log order inside a transaction, and it writes only its own `proj_` tables there.
Keeping it pure is what makes rebuild-from-zero and crash recovery give identical rows.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, Final

from projections.db import Db

Record = dict[str, Any]
# Money fields of a record, exactly the ones ledger/fold.py applies (docs/FORMAT.md §3).
EFFECT_KEYS: Final = frozenset({"entries", "hold", "resolve", "account", "subject", "reverses"})
# Debit-normal mirrors of real bank accounts (docs/FORMAT.md §4); all other kinds are credit-normal.
ASSET_KINDS: Final = frozenset({"omnibus", "platform_bank"})
STATUS_BY_KIND: Final = {
    "account_frozen": "frozen",
    "account_unfrozen": "open",
    "account_closed": "closed",
}
INT64_MAX: Final = 2**63 - 1


class ProjectionError(Exception):
    """The log cannot be projected (a broken chain, a posting to an unknown account, ...)."""


class PositionConflict(ProjectionError):
    """Someone else moved this projection's position: our batch was rolled back, nothing lost."""


class NotProjected(ProjectionError):
    """A query asks about a log position the projection has not reached yet."""


class Projection(abc.ABC):
    """One read model. Subclasses keep caches only as a speed-up: `reset` must make them reload."""

    name: str
    # (table, primary-key columns) in dump order; every table has a `platform` column.
    tables: tuple[tuple[str, tuple[str, ...]], ...]

    @abc.abstractmethod
    def create(self, db: Db, cur: Any) -> None:
        """Create this projection's tables and indexes if missing."""

    @abc.abstractmethod
    def apply(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        """Write the effects of `recs` (consecutive, in log order) in the runner's transaction."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every cache: the transaction that filled it may have rolled back."""

    def drop(self, db: Db, cur: Any, platform: str) -> None:
        """Delete this platform's rows (the runner resets the position in the same transaction)."""
        for table, _ in self.tables:
            cur.execute(f"DELETE FROM {db.t(table)} WHERE platform = {db.ph}", (platform,))
        self.reset()

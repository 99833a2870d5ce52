"""Child process for the projection crash tests: project a store that already holds a log.

  python proj_crash_child.py STOP_AT_BATCH MARKER   (store from the CUSTODY_*/POSTGRES_* env)

With STOP_AT_BATCH > 0 the statements projection, in that batch, writes its rows, touches
MARKER and sleeps inside the still-open transaction until the parent SIGKILLs it. With 0 it
just projects everything (slowly, small batches) and the parent kills it at a random moment.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.config import Config
from ledger.store import LedgerStore
from projections.audit_trail import AuditTrailProjection
from projections.base import Record
from projections.db import Db
from projections.runner import ProjectionRunner
from projections.statements import StatementsProjection


class Stalling(StatementsProjection):
    def __init__(self, stop_at: int, marker: Path) -> None:
        super().__init__()
        self.stop_at = stop_at
        self.marker = marker
        self.batches = 0

    def apply(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        super().apply(db, cur, platform, recs)
        self.batches += 1
        if self.batches == self.stop_at:
            self.marker.write_text("in transaction")
            time.sleep(600)


def main() -> None:
    stop_at, marker = int(sys.argv[1]), Path(sys.argv[2])
    store = LedgerStore(Config.from_env())
    runner = ProjectionRunner(
        store, [Stalling(stop_at, marker), AuditTrailProjection()], batch_size=17 if stop_at else 3
    )
    if stop_at == 0:
        marker.write_text("started")
    runner.catch_up()
    marker.write_text("done")
    store.close()


if __name__ == "__main__":
    main()

"""Shared values for the API tests (a plain module: `conftest` is ambiguous across folders)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ledger.api.client import CustodyClient
from ledger.api.server import RunningServer
from ledger.service import LedgerService

PLATFORMS = ("p1", "p2")
CCY = "CNY"


@dataclass
class World:
    """Platform p1 (and an empty p2) with every structural account and three customers."""

    service: LedgerService
    server: RunningServer
    operator: CustodyClient
    p1: CustodyClient
    p2: CustodyClient
    auditor: CustodyClient
    regulator: CustodyClient
    checker: CustodyClient

    def future_ms(self, seconds: float = 3600) -> int:
        return int((time.time() + seconds) * 1000)


# A fixture type: connect(role, name, ...) -> a client (tests/api/conftest.py). Here, not in
# conftest, because two test folders' conftest modules share the module name `conftest`.
Connect = Callable[..., CustodyClient]

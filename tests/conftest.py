"""Fixtures shared by every test folder: a store on SQLite and on PostgreSQL, a started service.

`config` is parametrized over ["sqlite", "postgres"]. The PostgreSQL parameter uses a fresh
schema `t_<hex>` in database `test` and drops it afterwards. If PostgreSQL is unreachable the
postgres parameter FAILS, unless CUSTODY_SKIP_PG=1 is set (then it skips).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The repository root too: otherwise a test folder named like a package (tests/controls,
# tests/projections) becomes a namespace package that shadows the real one, which the editable
# install's finder (consulted after sys.path) would have found.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from helpers import (
    FakeClock,
    Platform,
    make_platform,
    open_service,
    pg_env,
    require_postgres,
    sqlite_env,
)

from ledger.config import Config
from ledger.service import LedgerService

STORES = ["sqlite", "postgres"]


@pytest.fixture(params=STORES)
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The CUSTODY_*/POSTGRES_* environment of a fresh, empty store."""
    if request.param == "sqlite":
        yield sqlite_env(tmp_path)
        return
    require_postgres()
    with pg_env(tmp_path) as env:
        yield env


@pytest.fixture
def config(store_env: dict[str, str]) -> Config:
    return Config.from_env(store_env)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(config: Config, clock: FakeClock) -> Iterator[LedgerService]:
    svc = open_service(config, clock)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def platform(service: LedgerService) -> Platform:
    """Platform p1 in CNY: omnibus, platform bank, own funds, fee, suspense, 3 customers."""
    return make_platform(service)

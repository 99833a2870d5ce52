"""Fixtures for the gRPC API tests: real servers on loopback ports with real mutual TLS.

The PKI (a development CA, a server certificate, client certificates for platforms p1 and p2
and for every staff role) is created once per session with `ledger.api.certs`. Each test gets
a fresh SQLite ledger and a fresh server on an ephemeral port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import CCY, PLATFORMS, World
from helpers import BOOKKEEPING_POLICY

from ledger.api.certs import create_dev_pki
from ledger.api.client import CustodyClient
from ledger.api.server import RunningServer, running_server
from ledger.config import Config
from ledger.service import LedgerService


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_dev_pki(out, platforms=PLATFORMS)
    return out


@pytest.fixture
def api_service(tmp_path: Path) -> Iterator[LedgerService]:
    config = Config.from_env(
        {"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(tmp_path / "data")}
    )
    service = LedgerService(config)
    service.start()
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def api_server(api_service: LedgerService, pki: Path) -> Iterator[RunningServer]:
    with running_server(api_service, host="127.0.0.1", port=0, tls_dir=pki) as srv:
        yield srv


from api_helpers import Connect as Connect  # noqa: E402


@pytest.fixture
def connect(api_server: RunningServer, pki: Path) -> Iterator[Connect]:
    """connect("platform-p1") -> a client with that certificate (retries off by default)."""
    clients: list[CustodyClient] = []

    def make(stem: str, **kwargs: object) -> CustodyClient:
        kwargs.setdefault("retries", 0)
        client = CustodyClient.mtls(
            f"127.0.0.1:{api_server.port}",
            pki / "ca.pem",
            pki / f"{stem}.pem",
            pki / f"{stem}.key",
            **kwargs,  # type: ignore[arg-type]
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def world(api_service: LedgerService, api_server: RunningServer, connect: Connect) -> World:
    """Platforms under the bookkeeping policy (no customer keys, payees, checker or fee schedule
    needed): the tests using it are about the API's plumbing, not the controls. The controls
    through the API are in test_api_controls.py, under the default (strict) policy."""
    operator = connect("operator-dev")
    for platform_id in PLATFORMS:
        operator.create_platform(platform_id, f"Platform {platform_id}", policy=BOOKKEEPING_POLICY)
    p1 = connect("platform-p1")
    for client_id, account_id, kind, role in [
        ("o-omni", "omni", "omnibus", None),
        ("o-pbank", "pbank", "platform_bank", None),
        ("o-own", "own", "own_funds", None),
        ("o-fee", "fee", "fee_income", None),
        ("o-susp", "susp", "suspense", None),
        ("o-alice", "alice", "customer", "lender"),
        ("o-bob", "bob", "customer", "borrower"),
        ("o-carol", "carol", "customer", "other"),
    ]:
        p1.open_account(client_id, account_id, kind=kind, currency=CCY, role=role)
    p1.deposit("d-alice", "omni", "alice", 10_000, CCY, bank_ref="seed")
    p1.deposit("d-own", "pbank", "own", 5_000, CCY)
    return World(
        api_service,
        api_server,
        operator,
        p1,
        connect("platform-p2"),
        connect("auditor-dev"),
        connect("regulator-dev"),
        connect("checker-dev"),
    )

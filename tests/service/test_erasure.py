"""Destroying a customer's data key erases the person everywhere the ledger wrote them."""

from __future__ import annotations

from typing import Any

import pytest

from ledger import commands as c
from ledger.config import Config
from ledger.pii import PiiError
from ledger.service import LedgerService
from ledger.writer import verify_stored_chain

NAME = "Wang Xiaoming"


def _open(cid: str, account: str) -> c.OpenAccount:
    return c.OpenAccount(
        client_id=cid,
        account_id=account,
        kind="customer",
        currency="CNY",
        role="lender",
        holder_name=NAME,
    )


def test_erasure_covers_the_ciphertext_and_the_recorded_blind(config: Config) -> None:
    service = LedgerService(config)
    service.start()
    try:
        assert service.create_platform("p1", "P", "operator:test").ok
        [opened] = service.execute("p1", [_open("o-a", "a")], "platform:p1")
        assert opened.ok
        vault: Any = service.vault
        blind = vault.blind("p1", "a", NAME)
        with service.reading("p1") as state:
            sealed = state.accounts["a"].holder
        assert vault.open("p1", sealed) == NAME
        [replayed] = service.execute("p1", [_open("o-a", "a")], "platform:p1")
        assert replayed.status == "replayed"  # the blind is stable for identical retries

        vault.destroy("p1", "a")
        with pytest.raises(PiiError):
            vault.open("p1", sealed)
        with pytest.raises(PiiError):
            vault.blind("p1", "a", NAME)  # nobody can test a guess against the blind any more
        [after] = service.execute("p1", [_open("o-a", "a")], "platform:p1")
        assert (after.status, after.code) == ("invalid", "PERSONAL_DATA_UNAVAILABLE")
        assert blind.startswith("blind:")
        assert verify_stored_chain(service.store, "p1")[1:] == (None, "ok")
    finally:
        service.close()

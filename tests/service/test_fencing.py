"""One writer per platform log: a second writer on the same store is fenced, never forks the log."""

from __future__ import annotations

from typing import Any

import pytest

from ledger import commands as c
from ledger.service import LedgerService
from ledger.writer import CommitFailed, WriterFenced, verify_stored_chain


def _deposit(cid: str) -> c.Deposit:
    return c.Deposit(
        client_id=cid, mirror_account_id="om", account_id="a", amount_minor=5, currency="CNY"
    )


def test_second_writer_is_fenced_and_the_chain_stays_linear(config: Any) -> None:
    first = LedgerService(config, lease=False)  # this test is about the store's own guard
    first.start()
    assert first.create_platform("p1", "P", "operator:test").ok
    setup = [
        c.OpenAccount(client_id="o-om", account_id="om", kind="omnibus", currency="CNY"),
        c.OpenAccount(
            client_id="o-a", account_id="a", kind="customer", currency="CNY", role="lender"
        ),
    ]
    assert all(o.ok for o in first.execute("p1", setup, "platform:p1"))

    second = LedgerService(config, lease=False)  # a standby started without a lease
    second.start()
    assert second.execute("p1", [_deposit("by-second")], "platform:p1")[0].ok

    with pytest.raises(CommitFailed):  # first's view is stale: its position is taken
        first.execute("p1", [_deposit("by-first")], "platform:p1")
    with pytest.raises(WriterFenced):
        first.execute("p1", [_deposit("by-first-again")], "platform:p1")

    count, bad, reason = verify_stored_chain(second.store, "p1")
    assert (bad, reason) == (None, "ok")
    assert count == 4  # platform, two accounts, one deposit: nothing of the fenced writer
    first.close()
    second.close()

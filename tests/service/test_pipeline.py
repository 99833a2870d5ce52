"""Group commit pipeline: futures resolve only after a durable commit; failures poison the group.

These tests inject store failures with a real SQLite store underneath, so they exercise the
recovery path that a crashed disk or a lost PostgreSQL connection would take.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import BOOKKEEPING_POLICY

from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService
from ledger.writer import CommitFailed


def _service(tmp_path: Path) -> LedgerService:
    service = LedgerService(Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path)}))
    service.start()
    # bookkeeping policy: these tests are about commits, not customer signatures or limits
    assert service.create_platform("p1", "Platform", "operator:test", BOOKKEEPING_POLICY).ok
    opened = service.execute(
        "p1",
        [
            c.OpenAccount(client_id="o-om", account_id="om", kind="omnibus", currency="CNY"),
            *[
                c.OpenAccount(
                    client_id=f"o-{i}",
                    account_id=f"a{i}",
                    kind="customer",
                    currency="CNY",
                    role="lender",
                )
                for i in range(4)
            ],
            *[
                c.Deposit(
                    client_id=f"d-{i}",
                    mirror_account_id="om",
                    account_id=f"a{i}",
                    amount_minor=1_000,
                    currency="CNY",
                )
                for i in range(4)
            ],
        ],
        "platform:p1",
    )
    assert all(o.ok for o in opened)
    return service


def _transfer(cid: str, src: str, dst: str, amount: int) -> c.Transfer:
    return c.Transfer(
        client_id=cid, from_account_id=src, to_account_id=dst, amount_minor=amount, currency="CNY"
    )


def test_concurrent_single_requests_share_commits_and_never_overdraw(tmp_path: Path) -> None:
    service = _service(tmp_path)
    results: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for k in range(50):
            [outcome] = service.submit(
                "p1", [_transfer(f"t-{n}-{k}", "a0", "a1", 7)], "platform:p1"
            ).result(timeout=30)
            with lock:
                results.append(outcome.status if outcome.ok else outcome.code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = results.count("accepted")
    assert accepted == 1_000 // 7  # exactly as many as the funds allow, no double spend
    assert results.count("INSUFFICIENT_FUNDS") == 400 - accepted
    with service.reading("p1") as state:
        assert state.accounts["a0"].available_minor == 1_000 - 7 * accepted
        assert state.totals_balanced()
    service.close()


def test_failed_commit_fails_the_group_and_rebuilds_state(tmp_path: Path) -> None:
    service = _service(tmp_path)
    store = service.store
    real_append = store.append
    calls = {"n": 0}

    def flaky_append(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full (injected)")
        real_append(*args, **kwargs)  # type: ignore[arg-type]

    store.append = flaky_append  # type: ignore[method-assign]
    future = service.submit("p1", [_transfer("lost", "a0", "a1", 100)], "platform:p1")
    with pytest.raises(CommitFailed):
        future.result(timeout=30)
    with service.reading("p1") as state:
        assert "lost" not in state.done  # never acknowledged, never applied
        assert state.accounts["a0"].available_minor == 1_000
    [again] = service.submit("p1", [_transfer("lost", "a0", "a1", 100)], "platform:p1").result(
        timeout=30
    )
    assert again.status == "accepted"  # the same client id is free: nothing was written
    with service.reading("p1") as state:
        assert state.accounts["a0"].available_minor == 900
    service.close()
    reopened = LedgerService(Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path)}))
    reopened.start()
    with reopened.reading("p1") as state:
        assert state.accounts["a0"].available_minor == 900
        assert state.done["lost"].seq >= 0
    reopened.close()


def test_failed_prepare_is_rolled_back_before_the_next_group(tmp_path: Path) -> None:
    service = _service(tmp_path)
    writer = service._platforms["p1"].writer
    real_plan_seal = writer._seal

    def broken_seal(subject: str, text: str) -> dict[str, str]:
        raise RuntimeError("vault offline (injected)")

    writer._seal = broken_seal  # type: ignore[method-assign]
    cmds = [
        _transfer("before", "a0", "a1", 10),
        c.OpenAccount(
            client_id="o-x",
            account_id="x",
            kind="customer",
            currency="CNY",
            role="lender",
            holder_name="Zhang San",
        ),
    ]
    with pytest.raises(RuntimeError):
        service.execute("p1", cmds, "platform:p1")
    writer._seal = real_plan_seal  # type: ignore[method-assign]
    with service.reading("p1") as state:
        assert "before" not in state.done  # the half-decided group left no trace
        assert "x" not in state.accounts
        assert state.accounts["a0"].available_minor == 1_000
    outcomes = service.execute("p1", cmds, "platform:p1")
    assert [o.status for o in outcomes] == ["accepted", "accepted"]
    service.close()

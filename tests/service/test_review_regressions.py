"""Regressions found in review of the pipelined writer: liveness of reads, proofs during an
in-flight group, and never serving a half-rebuilt ledger after the database went away."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from ledger import commands as c
from ledger.config import Config
from ledger.merkle import CHUNK_LEVEL
from ledger.service import LedgerService
from ledger.writer import CommitFailed, Request, StoreUnavailable


def _service(tmp_path: Path) -> LedgerService:
    config = Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path), "CUSTODY_CHECKPOINT_EVERY": "0"})
    service = LedgerService(config)
    service.start()
    assert service.create_platform("p1", "P", "operator:test").ok
    setup = [
        c.OpenAccount(client_id="o1", account_id="omni", kind="omnibus", currency="CNY"),
        c.OpenAccount(
            client_id="o2", account_id="a", kind="customer", currency="CNY", role="lender"
        ),
        c.OpenAccount(
            client_id="o3", account_id="b", kind="customer", currency="CNY", role="lender"
        ),
        c.Deposit(
            client_id="d1",
            mirror_account_id="omni",
            account_id="a",
            amount_minor=10**12,
            currency="CNY",
        ),
    ]
    assert all(o.ok for o in service.execute("p1", setup, "operator:test"))
    return service


def _deposit(cid: str) -> c.Deposit:
    return c.Deposit(
        client_id=cid, mirror_account_id="omni", account_id="a", amount_minor=1, currency="CNY"
    )


def test_reads_and_checkpoints_are_served_under_steady_write_load(tmp_path: Path) -> None:
    service = _service(tmp_path)
    counter = itertools.count()
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            futures = [
                service.submit(
                    "p1",
                    [
                        c.Transfer(
                            client_id=f"t{next(counter)}",
                            from_account_id="a",
                            to_account_id="b",
                            amount_minor=1,
                            currency="CNY",
                        )
                    ],
                    "platform:p1",
                )
                for _ in range(20)
            ]
            for f in futures:
                f.result(timeout=60)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        results: list[object] = []

        def reader() -> None:
            for _ in range(3):
                results.append(service.head("p1")[0])
                with service.reading("p1") as state:
                    results.append(state.accounts["b"].posted_minor)
                results.append(service.sign_checkpoint("p1").size)

        probe = threading.Thread(target=reader)
        probe.start()
        probe.join(timeout=60)  # a liveness bound, not a timing assertion
        assert not probe.is_alive(), "reads starved behind a steady stream of writes"
        assert len(results) == 9
    finally:
        stop.set()
        for t in threads:
            t.join()
        service.close()


def test_proofs_of_committed_records_while_a_group_is_in_flight(tmp_path: Path) -> None:
    service = _service(tmp_path)
    chunk = 1 << CHUNK_LEVEL
    size = service.head("p1")[0]
    fill = [_deposit(f"f{i}") for i in range(chunk - size - 2)]
    assert all(o.ok for o in service.execute("p1", fill, "operator:test"))
    cp = service.sign_checkpoint("p1")
    platform = service._platform("p1")
    with platform.cond:  # what the decide thread does: a group decided, its commit in flight
        prepared = platform.writer.prepare(
            [Request([_deposit(f"e{i}") for i in range(10)], "operator:test")]
        )
    assert prepared.next_seq > chunk  # the undecided group crosses a chunk boundary
    checkpoint, path, leaf = service.inclusion_proof("p1", cp.size - 1, cp.size)
    assert checkpoint == cp and path and leaf
    assert service.consistency_proof("p1", 1, cp.size)
    service.close()


def test_after_the_database_goes_away_reads_fail_then_recover_when_it_returns(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    store = service.store
    append, read = store.append, store.read

    def down(*args: object, **kwargs: object) -> None:
        raise OSError("database is down (injected)")

    store.append = down  # type: ignore[method-assign]
    store.read = down  # type: ignore[method-assign]
    future = service.submit("p1", [_deposit("d2")], "platform:p1")
    with pytest.raises(CommitFailed):
        future.result(timeout=30)
    # never an empty or half-built ledger: a retryable error instead
    with pytest.raises(StoreUnavailable), service.reading("p1"):
        pass
    with pytest.raises(StoreUnavailable):
        service.head("p1")
    with pytest.raises(StoreUnavailable):
        service.sign_checkpoint("p1")

    store.append, store.read = append, read  # type: ignore[method-assign]
    with service.reading("p1") as state:  # the platform comes back by itself
        assert "d2" not in state.done
        assert state.accounts["a"].posted_minor == 10**12
    [again] = service.submit("p1", [_deposit("d2")], "platform:p1").result(timeout=30)
    assert again.status == "accepted"
    service.close()

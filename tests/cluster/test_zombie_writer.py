"""The zombie window: a writer whose lease session died, while its pooled connections still work
and before its lease thread notices, must not commit anything once another server took over.

Every commit of a leased writer checks, inside its own transaction, that `custody_writers` still
names it at its epoch (`SELECT ... FOR SHARE`); the takeover commits its row first. Server a here
polls its lease once a minute, so it never notices on its own: only the fence stops it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Platform,
    deposit,
    make_platform,
    pg_env,
    pg_execute,
    require_postgres,
    sqlite_env,
)

from ledger.config import Config
from ledger.service import LedgerService, WriterElsewhere
from ledger.store import WriterSuperseded
from ledger.writer import CommitFailed, Request, verify_stored_chain

FAST_POLL_MS = 100
NEVER_POLL_MS = 60_000  # the longest allowed: a's lease thread sleeps through each test


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    with pg_env(tmp_path) as env:
        yield env


def _server(env: dict[str, str], tmp_path: Path, name: str, poll_ms: int) -> LedgerService:
    config = Config.from_env(
        {
            **env,
            "CUSTODY_SERVER_ID": name,
            "CUSTODY_ADVERTISE": f"10.0.0.{2 if name.startswith('zb') else 1}:7000",
            "CUSTODY_DATA_DIR": str(tmp_path / name),
            "CUSTODY_LEASE_POLL_MS": str(poll_ms),
        }
    )
    service = LedgerService(config)
    service.start()
    return service


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)


def _kill_lease_session(server_id: str) -> None:
    """Drop only the server's lease session (its pooled connections stay up)."""
    killed = pg_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (f"custody-lease:{server_id}",),
    )
    assert killed == [(True,)]


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]  # unique lease session names: never kill another test's session
    return f"za-{tag}", f"zb-{tag}"


def _zombie_and_successor(
    env: dict[str, str], tmp_path: Path
) -> tuple[LedgerService, LedgerService, Platform, int]:
    """a wrote p1 and still believes it writes it; b has taken the lease over (epoch 2) and
    caught up, but written nothing yet. Returns (a, b, platform, records stored so far)."""
    name_a, name_b = _names()
    a = _server(env, tmp_path, name_a, NEVER_POLL_MS)
    p = make_platform(a)
    assert a.execute("p1", [deposit(p, "before", "alice", 5)], "platform:test")[0].ok
    stored = a.head("p1")[0]
    b = _server(env, tmp_path, name_b, FAST_POLL_MS)
    assert not b.is_writer("p1")
    _kill_lease_session(name_a)
    _until(lambda: b.is_writer("p1"))
    assert a.is_writer("p1")  # a has not noticed: this is the window
    assert a._platform("p1").writer.claim == ("p1", name_a, 1)
    assert b._platform("p1").writer.claim == ("p1", name_b, 2)
    return a, b, p, stored


def _assert_log(
    env: dict[str, str], tmp_path: Path, b: LedgerService, expected_count: int, absent: list[str]
) -> None:
    """b's state (read back from the store by a fresh server) holds none of a's late groups,
    and the stored chain verifies end to end."""
    count, bad, reason = verify_stored_chain(b.store, "p1")
    assert (bad, reason) == (None, "ok") and count == expected_count
    fresh = LedgerService(
        Config.from_env({**env, "CUSTODY_DATA_DIR": str(tmp_path / "fresh")}), lease=False
    )
    fresh.start()
    try:
        with fresh.reading("p1") as state:
            for cid in absent:
                assert cid not in state.done
            assert "after" in state.done
            assert state.accounts["alice"].posted_minor == 5 + 7
    finally:
        fresh.close()


def test_a_superseded_writer_cannot_commit_a_group_directly(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a, b, p, stored = _zombie_and_successor(pg_store, tmp_path)
    try:
        platform = a._platform("p1")
        writer = platform.writer
        request = Request([deposit(p, "zombie", "alice", 9)], "platform:test")
        with platform.cond, pytest.raises(CommitFailed) as err:
            writer.execute([request])  # decides a group at free positions, then commits it
        cause = err.value.__cause__
        assert isinstance(cause, WriterSuperseded)
        assert cause.recorded == (b.server_id, 2)
        assert cause.claim == ("p1", a.server_id, 1)
        assert writer.fenced  # stopped, as on a lost lease
        assert "zombie" not in writer.state.done  # rebuilt from the store: never happened
        assert b.head("p1")[0] == stored  # nothing of a's group reached the log
        outcome = b.execute("p1", [deposit(p, "after", "alice", 7)], "platform:test")[0]
        assert outcome.status == "accepted" and outcome.seq == stored
        _assert_log(pg_store, tmp_path, b, stored + 1, ["zombie"])
    finally:
        a.close()
        b.close()


def test_a_superseded_writer_fences_itself_and_redirects_its_callers(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a, b, p, stored = _zombie_and_successor(pg_store, tmp_path)
    try:
        future = a.submit("p1", [deposit(p, "zombie-queued", "alice", 9)], "platform:test")
        with pytest.raises(WriterElsewhere) as err:  # retryable: go to the writer
            future.result(timeout=30)
        assert err.value.server_id == b.server_id and err.value.epoch == 2
        assert not a.is_writer("p1")  # demoted: later calls are redirected at once
        with pytest.raises(WriterElsewhere):
            a.execute("p1", [deposit(p, "zombie-direct", "alice", 9)], "platform:test")
        outcome = b.execute("p1", [deposit(p, "after", "alice", 7)], "platform:test")[0]
        assert outcome.status == "accepted" and outcome.seq == stored
        _assert_log(pg_store, tmp_path, b, stored + 1, ["zombie-queued", "zombie-direct"])
    finally:
        a.close()
        b.close()


def test_a_synchronous_batch_of_a_superseded_writer_is_redirected(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a, b, p, stored = _zombie_and_successor(pg_store, tmp_path)
    try:
        with pytest.raises(WriterElsewhere) as err:
            a.execute("p1", [deposit(p, "zombie-batch", "alice", 9)], "platform:test")
        assert isinstance(err.value.__cause__, CommitFailed)
        assert isinstance(err.value.__cause__.__cause__, WriterSuperseded)
        assert err.value.server_id == b.server_id
        assert not a.is_writer("p1")
        assert b.execute("p1", [deposit(p, "after", "alice", 7)], "platform:test")[0].ok
        _assert_log(pg_store, tmp_path, b, stored + 1, ["zombie-batch"])
    finally:
        a.close()
        b.close()


def test_a_takeover_waits_for_a_commit_already_past_the_check(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    """The row lock orders them: a group that passed the check commits before the takeover's
    row does, so it is in the log the new writer continues (nothing is lost or forked)."""
    name_a, name_b = _names()
    a = _server(pg_store, tmp_path, name_a, NEVER_POLL_MS)
    b: LedgerService | None = None
    p = make_platform(a)
    recorder: Any = a.store.recorder
    lock_table = recorder._lock_table
    checked, go_on = threading.Event(), threading.Event()

    def paused_lock_table(curs: Any) -> None:  # runs right after the writer check
        checked.set()
        assert go_on.wait(timeout=30)
        lock_table(curs)

    recorder._lock_table = paused_lock_table
    answers: list[Any] = []
    commit = threading.Thread(
        target=lambda: answers.append(
            a.execute("p1", [deposit(p, "in-flight", "alice", 5)], "platform:test")
        )
    )
    try:
        commit.start()
        assert checked.wait(timeout=30)
        recorder._lock_table = lock_table
        b = _server(pg_store, tmp_path, name_b, FAST_POLL_MS)
        _kill_lease_session(name_a)
        # b holds the advisory lock now, but its announce waits for a's transaction
        _until(
            lambda: bool(
                pg_execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                    "AND wait_event_type = 'Lock'",
                    (f"custody-lease:{name_b}",),
                )
            )
        )
        assert not b.is_writer("p1")
        go_on.set()
        commit.join(timeout=30)
        assert answers and answers[0][0].status == "accepted"  # checked before the takeover
        _until(lambda: b is not None and b.is_writer("p1"))
        # b read the in-flight group after its row committed: it writes right after it, at
        # once (no key conflict, no repair), and its epoch is recorded as starting there
        outcome = b.execute("p1", [deposit(p, "after", "alice", 7)], "platform:test")[0]
        assert outcome.status == "accepted" and outcome.seq == answers[0][0].seq + 1
        history = b.writer_history("p1")
        assert [(h.server_id, h.epoch) for h in history] == [(name_a, 1), (name_b, 2)]
        assert history[1].from_seq == outcome.seq
        count, bad, reason = verify_stored_chain(b.store, "p1")
        assert (bad, reason) == (None, "ok") and count == outcome.seq + 1
        with b.reading("p1") as state:
            assert "in-flight" in state.done and "after" in state.done
            assert state.accounts["alice"].posted_minor == 12
    finally:
        go_on.set()
        commit.join(timeout=30)
        a.close()
        if b is not None:
            b.close()


def test_without_leases_there_is_no_claim_and_no_check(tmp_path: Path) -> None:
    service = LedgerService(Config.from_env(sqlite_env(tmp_path)))
    service.start()
    try:
        p = make_platform(service)
        assert service._platform("p1").writer.claim is None
        assert service.execute("p1", [deposit(p, "d", "alice", 1)], "platform:test")[0].ok
    finally:
        service.close()


def test_a_service_without_leases_on_postgres_makes_no_claim(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    service = LedgerService(Config.from_env(pg_store), lease=False)
    service.start()
    seen: list[tuple[Any, ...]] = []
    insert_rows = service.store.recorder.insert_rows  # type: ignore[attr-defined]

    def spy(*args: Any) -> None:
        seen.append(args)
        insert_rows(*args)

    service.store.recorder.insert_rows = spy  # type: ignore[attr-defined]
    try:
        p = make_platform(service)
        assert service.execute("p1", [deposit(p, "d", "alice", 1)], "platform:test")[0].ok
        assert seen and all(len(args) == 1 for args in seen)  # rows only: no writer check
    finally:
        service.close()

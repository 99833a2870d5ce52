"""Write leases in one process: followers redirect writes and read current state, a lost lease
connection fences the writer at once, the primary key still stops a writer without a lease."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import deposit, make_platform, pg_env, pg_execute, require_postgres, sqlite_env

from ledger.config import Config
from ledger.lease import lease_key
from ledger.service import LedgerService, WriterElsewhere
from ledger.writer import CommitFailed, verify_stored_chain

POLL_MS = 100


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    with pg_env(tmp_path) as env:
        yield {**env, "CUSTODY_LEASE_POLL_MS": str(POLL_MS)}


def _server(env: dict[str, str], tmp_path: Path, name: str, port: int) -> LedgerService:
    config = Config.from_env(
        {
            **env,
            "CUSTODY_SERVER_ID": name,
            "CUSTODY_ADVERTISE": f"10.0.0.{port % 250}:{port}",
            "CUSTODY_DATA_DIR": str(tmp_path / name),
        }
    )
    service = LedgerService(config)
    service.start()
    return service


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_follower_redirects_writes_and_reads_current_state(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a = _server(pg_store, tmp_path, "a", 7001)
    p = make_platform(a)
    b = _server(pg_store, tmp_path, "b", 7002)
    try:
        assert a.is_writer("p1") and not b.is_writer("p1")
        with pytest.raises(WriterElsewhere) as err:
            b.execute("p1", [deposit(p, "d-b", "alice", 5)], "platform:test")
        assert (err.value.platform_id, err.value.server_id, err.value.address) == (
            "p1",
            "a",
            "10.0.0.1:7001",
        )
        assert err.value.epoch == 1 and err.value.since_ms > 0
        with pytest.raises(WriterElsewhere):
            b.submit("p1", [deposit(p, "d-b2", "alice", 5)], "platform:test")
        with pytest.raises(WriterElsewhere):  # creating an existing platform is a write too
            b.create_platform("p1", "Platform p1", "operator:root")
        # an acknowledged write on the writer is visible to the next read on the follower
        assert a.execute("p1", [deposit(p, "d-a", "alice", 7)], "platform:test")[0].ok
        with b.reading("p1") as state, a.reading("p1") as live:
            assert state.next_seq == live.next_seq
            assert state.accounts["alice"].posted_minor == 7
        assert b.head("p1") == a.head("p1")
        # a platform created on b is written by b and discovered by a as a follower
        assert b.create_platform("p2", "Platform p2", "operator:root").ok
        assert b.is_writer("p2")
        _until(lambda: "p2" in a.platform_ids())
        assert not a.is_writer("p2")
        with pytest.raises(WriterElsewhere) as err2:
            a.execute("p2", [deposit(p, "d-x", "alice", 1)], "platform:test")
        assert err2.value.server_id == "b" and err2.value.address == "10.0.0.2:7002"
    finally:
        a.close()
        b.close()


def test_closing_the_writer_hands_its_platforms_over(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a = _server(pg_store, tmp_path, "a", 7001)
    p = make_platform(a)
    b = _server(pg_store, tmp_path, "b", 7002)
    try:
        assert a.execute("p1", [deposit(p, "before", "alice", 3)], "platform:test")[0].ok
        a.close()
        waited = _until(lambda: b.is_writer("p1"))
        assert waited < 2.0  # within a few poll intervals
        outcome = b.execute("p1", [deposit(p, "after", "alice", 4)], "platform:test")[0]
        assert outcome.status == "accepted"
        # a retry of what the old writer acknowledged is replayed, never written twice
        again = b.execute("p1", [deposit(p, "before", "alice", 3)], "platform:test")[0]
        assert again.status == "replayed"
        history = b.writer_history("p1")
        assert [(h.server_id, h.epoch) for h in history] == [("a", 1), ("b", 2)]
        assert history[1].from_seq == outcome.seq
    finally:
        b.close()


def test_losing_the_lease_connection_fences_the_writer_at_once(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a = _server(pg_store, tmp_path, "a", 7001)
    p = make_platform(a)
    b = _server(pg_store, tmp_path, "b", 7002)
    try:
        # the network between a and the database drops a's lease session (only that one: by
        # its backend pid, since tests running alongside may name a server "a" too)
        assert a._lease is not None and a._lease._conn is not None
        killed = pg_execute("SELECT pg_terminate_backend(%s)", (a._lease._conn.info.backend_pid,))
        assert killed == [(True,)]
        _until(lambda: not a.is_writer("p1"), timeout=3.0)
        _until(lambda: b.is_writer("p1"), timeout=3.0)
        with pytest.raises(WriterElsewhere) as err:
            a.execute("p1", [deposit(p, "on-a", "alice", 1)], "platform:test")
        assert err.value.server_id == "b"
        assert b.execute("p1", [deposit(p, "on-b", "alice", 1)], "platform:test")[0].ok
        time.sleep(3 * POLL_MS / 1000)  # a reconnects, but b holds the lease: a stays follower
        assert not a.is_writer("p1") and b.is_writer("p1")
        count, bad, reason = verify_stored_chain(b.store, "p1")
        assert (bad, reason) == (None, "ok") and count == 10
    finally:
        a.close()
        b.close()


def test_the_primary_key_still_stops_a_writer_without_the_lease(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a = _server(pg_store, tmp_path, "a", 7001)
    p = make_platform(a)
    rogue = LedgerService(
        Config.from_env({**pg_store, "CUSTODY_DATA_DIR": str(tmp_path / "r")}), lease=False
    )
    rogue.start()
    try:
        assert rogue.execute("p1", [deposit(p, "rogue", "alice", 2)], "platform:test")[0].ok
        with pytest.raises(CommitFailed):  # a's position is taken: its group did not happen
            a.execute("p1", [deposit(p, "lease-holder", "alice", 3)], "platform:test")
        # a still holds the lease: it catches up with the stray record and goes on writing
        _until(lambda: not a._platform("p1").writer.fenced, timeout=3.0)
        again = a.execute("p1", [deposit(p, "lease-holder", "alice", 3)], "platform:test")[0]
        assert again.status == "accepted"
        with a.reading("p1") as state:
            assert state.accounts["alice"].posted_minor == 5
        count, bad, reason = verify_stored_chain(a.store, "p1")
        assert (bad, reason) == (None, "ok") and count == 11
    finally:
        rogue.close()
        a.close()


def test_sqlite_takes_no_lease(tmp_path: Path) -> None:
    config = Config.from_env(sqlite_env(tmp_path))
    with pytest.raises(ValueError, match="PostgreSQL"):
        LedgerService(config, lease=True)
    service = LedgerService(config)
    service.start()
    try:
        make_platform(service)
        assert service.is_writer("p1") and service.writer_history("p1") == []
    finally:
        service.close()


def test_lease_keys_are_stable_and_distinct() -> None:
    key = lease_key("local", "public", "p1")
    assert key == lease_key("local", "public", "p1")
    assert -(2**63) <= key < 2**63
    others = {lease_key("local", "other", "p1"), lease_key("x", "public", "p1")}
    assert key not in others and len(others) == 2
    assert lease_key("local", "public", "p2") != key


def test_balanced_servers_share_the_write_leases_and_take_over_a_dead_ones(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    env = {**pg_store, "CUSTODY_LEASE_BALANCE": "1"}
    a = _server(env, tmp_path, "a", 7001)
    b: LedgerService | None = None
    try:
        ids = [f"p{i}" for i in range(1, 5)]
        platforms = {platform_id: make_platform(a, platform_id) for platform_id in ids}
        assert all(a.is_writer(p) for p in ids)  # alone, it holds them all
        b = _server(env, tmp_path, "b", 7002)

        def held(s: LedgerService) -> int:
            return sum(1 for p in ids if s.is_writer(p))

        _until(lambda: held(a) == 2 and held(b) == 2)
        # every platform still has exactly one writer, and writes go on through the handover
        for platform_id in ids:
            writer = a if a.is_writer(platform_id) else b
            p = platforms[platform_id]
            assert writer.execute(platform_id, [deposit(p, "d", "alice", 1)], "platform:t")[0].ok
        b.close()
        b = None
        _until(lambda: held(a) == 4)  # the survivor's share grows back to everything
    finally:
        if b is not None:
            b.close()
        a.close()

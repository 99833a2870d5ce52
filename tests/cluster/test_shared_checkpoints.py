"""Servers of one PostgreSQL store share their signed checkpoints: after a failover the new
writer extends the last note the old one signed and serves it to auditors; a row this ledger's
key did not sign is ignored."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import deposit, make_platform, pg_env, pg_execute, require_postgres

from custody_verify.merkle import verify_consistency
from ledger.config import Config
from ledger.service import LedgerService

POLL_MS = 100


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    with pg_env(tmp_path) as env:
        yield {
            **env,
            "CUSTODY_LEASE_POLL_MS": str(POLL_MS),
            "CUSTODY_CHECKPOINT_EVERY": "0",
            "CUSTODY_SIGNING_KEY": str(tmp_path / "checkpoint.key"),  # one key, as in production
        }


def _server(env: dict[str, str], tmp_path: Path, name: str) -> LedgerService:
    config = Config.from_env(
        {**env, "CUSTODY_SERVER_ID": name, "CUSTODY_DATA_DIR": str(tmp_path / name)}
    )
    service = LedgerService(config)
    service.start()
    return service


def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)


def test_the_next_writer_extends_and_serves_the_previous_writers_checkpoints(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a = _server(pg_store, tmp_path, "a")
    p = make_platform(a)
    first = a.sign_checkpoint("p1")
    assert a.execute("p1", [deposit(p, "d1", "alice", 5)], "platform:test")[0].ok
    second = a.sign_checkpoint("p1")
    b = _server(pg_store, tmp_path, "b")  # its own data folder: none of a's note files
    try:
        assert not (tmp_path / "b" / "checkpoints" / "p1" / "notes.log").exists()
        assert b.checkpoint("p1") == second  # a follower serves the writer's latest note
        a.close()
        _until(lambda: b.is_writer("p1"))
        assert b.checkpoint("p1", first.size) == first
        assert b.execute("p1", [deposit(p, "d2", "alice", 5)], "platform:test")[0].ok
        third = b.sign_checkpoint("p1")
        assert third.size > second.size
        proof = b.consistency_proof("p1", second.size, third.size)
        assert verify_consistency(second.size, third.size, second.root, third.root, proof)
        assert [cp.size for cp in b._platform("p1").checkpoints.history()] == [
            first.size,
            second.size,
            third.size,
        ]
    finally:
        b.close()


def test_a_row_the_ledger_key_did_not_sign_is_ignored(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    a = _server(pg_store, tmp_path, "a")
    try:
        p = make_platform(a)
        signed = a.sign_checkpoint("p1")
        schema = pg_store["POSTGRES_SCHEMA"]
        # someone with write access to the database plants a bigger "checkpoint"
        pg_execute(
            f"INSERT INTO {schema}.custody_checkpoints (platform, size, root, note, signed_ms) "
            "VALUES ('p1', %s, %s, %s, 0)",
            (signed.size + 100, b"\x01" * 32, signed.note.replace(b"\n", b"\n ", 1)),
        )
        assert a.checkpoint("p1") == signed
        assert a.checkpoint("p1", signed.size + 100) is None
        assert a.execute("p1", [deposit(p, "d1", "alice", 5)], "platform:test")[0].ok
        assert a.sign_checkpoint("p1").size == signed.size + 1  # signing goes on as before
    finally:
        a.close()


def test_a_genuine_note_of_another_history_is_not_adopted(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    """Signed with the ledger's key but for a root this log does not have (a fork elsewhere):
    adopting it would make every later signature fail; it is ignored."""
    from ledger.checkpoint import sign_checkpoint

    a = _server(pg_store, tmp_path, "a")
    try:
        p = make_platform(a)
        signed = a.sign_checkpoint("p1")
        assert a.execute("p1", [deposit(p, "d1", "alice", 5)], "platform:test")[0].ok
        signer = a._platform("p1").checkpoints.signer
        forged = sign_checkpoint(signer, signed.size + 1, b"\x02" * 32)
        schema = pg_store["POSTGRES_SCHEMA"]
        pg_execute(
            f"INSERT INTO {schema}.custody_checkpoints (platform, size, root, note, signed_ms) "
            "VALUES ('p1', %s, %s, %s, 0)",
            (signed.size + 1, b"\x02" * 32, forged),
        )
        assert a.checkpoint("p1") == signed
        real = a.sign_checkpoint("p1")  # signing is not blocked
        assert real.size == signed.size + 1 and real.root != b"\x02" * 32
        assert a.checkpoint("p1", real.size) == real  # the forged row is never served
        b = _server(pg_store, tmp_path, "b")  # nor by a server that only has the table
        try:
            assert b.checkpoint("p1", real.size) is None
            assert [cp.size for cp in b._platform("p1").checkpoints.history()] == [signed.size]
        finally:
            b.close()
    finally:
        a.close()

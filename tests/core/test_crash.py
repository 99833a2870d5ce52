"""SIGKILL a writer at a random moment: no acknowledged movement is lost, no batch is partial."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import (
    REPO_ROOT,
    assert_balanced,
    bal,
    deposit,
    log_records,
    make_platform,
    ok,
    open_service,
    pg_env,
    require_postgres,
    snapshot,
    sqlite_env,
    subprocess_env,
    transfer,
)

from ledger.config import Config
from ledger.writer import verify_stored_chain

CHILD = Path(__file__).with_name("crash_child.py")
PID = "p1"
FUNDS = 10**12
SQLITE_RUNS = 24
PG_RUNS = 4
SUBMIT_RUNS = 8
STATS: list[tuple[int, int, int]] = []  # (batch size, acknowledged, stored) per run, for debugging


def _wait_ready(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait for the child's `ready` line (its stderr goes elsewhere)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and b"ready\n" in path.read_bytes():
            return
        if proc.poll() is not None:
            err = path.with_suffix(".err").read_text()[-2000:]
            raise AssertionError(f"child exited early ({proc.returncode}): {err}")
        time.sleep(0.01)
    output = path.read_text() if path.exists() else ""
    raise AssertionError(f"child not ready after {timeout}s; its output: {output[-2000:]!r}")


def _acknowledged(path: Path) -> dict[int, list[str]]:
    """Batches the child acknowledged: only complete lines count (a torn last line does not)."""
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete
    acked: dict[int, list[str]] = {}
    for line in lines:
        kind, *rest = line.split(" ")
        assert kind in ("ready", "ack"), line
        if kind == "ack":
            batch, *cids = rest
            acked[int(batch)] = cids
    return acked


def _crash_once(store_env: dict[str, str], seed: int, mode: str = "execute") -> None:
    rng = random.Random(seed)
    batch_size = rng.choice([1, 10, 100, 500, 1000])
    config = Config.from_env(store_env)
    service = open_service(config)
    try:
        p = make_platform(service)
        ok(service, PID, deposit(p, "fund", "alice", FUNDS))
        setup_records = snapshot(service, PID)["next_seq"]
    finally:
        service.close()

    out = Path(store_env["CUSTODY_DATA_DIR"]) / f"child-{seed}.out"
    err = out.with_suffix(".err")
    with out.open("wb") as sink, err.open("wb") as err_sink:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), PID, str(batch_size), mode],
            env=subprocess_env(store_env),
            cwd=REPO_ROOT,
            stdout=sink,
            stderr=err_sink,
        )
        try:
            _wait_ready(out, proc)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (out.read_text()[-2000:], err.read_text()[-2000:])
    acked = _acknowledged(out)

    # the store after the crash: the chain verifies and the state loads
    service = open_service(config)
    try:
        n = snapshot(service, PID)["next_seq"]
        assert verify_stored_chain(service.store, PID) == (n, None, "ok")
        recs = log_records(service, PID)[setup_records:]
        assert all(r["kind"] == "transferred" for r in recs), {r["kind"] for r in recs}
        per_batch = Counter(int(r["cid"].split("-")[0][1:]) for r in recs)
        present = sorted(per_batch)
        # every batch is whole, batches are a prefix of what the child sent
        assert all(count == batch_size for count in per_batch.values()), per_batch
        assert present == list(range(len(present)))
        # nothing acknowledged was lost; at most the last batch committed without its ack
        stored_cids = {r["cid"] for r in recs}
        for batch, cids in acked.items():
            assert len(cids) == batch_size
            assert set(cids) <= stored_cids, f"acknowledged batch {batch} lost"
        if mode == "execute":  # one batch at a time: at most the last is stored unacknowledged
            assert len(present) - len(acked) in (0, 1)
        STATS.append((batch_size, len(acked), len(present)))
        # the replayed state matches the records
        moved = len(recs)
        assert bal(service, PID, "alice") == (FUNDS - moved, 0, FUNDS - moved)
        assert bal(service, PID, "bob") == (moved, 0, moved)
        assert_balanced(service, PID)
        # and the ledger carries on
        [o] = ok(service, PID, transfer(p, "after-crash", "alice", "bob", 1))
        assert o.seq == n
        assert verify_stored_chain(service.store, PID) == (n + 1, None, "ok")
    finally:
        service.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SQLITE_RUNS))
def test_sigkill_sqlite(tmp_path: Path, seed: int) -> None:
    _crash_once(sqlite_env(tmp_path), seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SUBMIT_RUNS))
def test_sigkill_sqlite_group_commit(tmp_path: Path, seed: int) -> None:
    """The same through `submit`: the pipelined group committer, several batches in flight."""
    _crash_once(sqlite_env(tmp_path), 500 + seed, mode="submit")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(PG_RUNS))
def test_sigkill_postgres(tmp_path: Path, seed: int) -> None:
    require_postgres()
    with pg_env(tmp_path) as env:
        _crash_once(env, 1000 + seed, mode="execute" if seed % 2 == 0 else "submit")

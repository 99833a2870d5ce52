"""Projection workers: any number follow the logs, each projection of each platform is processed
by exactly one of them at a time (a PostgreSQL session lock per pair), a survivor resumes where
a stopped one left off, and a worker whose lease session died cannot commit after a takeover.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import FakeClock, last_position, pg_env, pg_execute, require_postgres
from proj_workload import run_workload

from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import LedgerStore
from projections.base import PositionConflict
from projections.runner import LeaseSuperseded, ProjectionRunner, lease_rows

PLATFORMS = ("p1", "p2")
NAMES = ("statements", "audit")


def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def _pg_ledger(tmp_path: Path) -> Iterator[tuple[dict[str, str], LedgerService, FakeClock]]:
    require_postgres()
    with pg_env(tmp_path) as env:
        clock = FakeClock()
        service = LedgerService(Config.from_env(env), clock_ms=clock, lease=False)
        service.start()
        try:
            yield env, service, clock
        finally:
            service.close()


class Worker:
    """A runner following in a thread, on its own store (its own worker id and lease session)."""

    def __init__(self, env: dict[str, str], worker_id: str) -> None:
        self.store = LedgerStore(Config.from_env({**env, "CUSTODY_SERVER_ID": worker_id}))
        self.runner = ProjectionRunner(self.store, batch_size=50)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self.runner.follow, args=(self.stop_event,), kwargs={"poll_s": 0.05}
        )
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.runner.close()  # ends the lease session: its leases are free
        self.store.close()


def _caught_up(service: LedgerService, reader: ProjectionRunner) -> bool:
    heads = {pid: last_position(service, pid) for pid in PLATFORMS}
    return all(s.position == heads[s.platform] for s in reader.status())


def _reference(service: LedgerService, reader: ProjectionRunner) -> dict[str, str]:
    digests = {pid: reader.digest(pid) for pid in PLATFORMS}
    reference = ProjectionRunner(service.store)
    reference.rebuild()
    assert {pid: reference.digest(pid) for pid in PLATFORMS} == digests
    return digests


def test_one_worker_per_projection_and_the_survivor_resumes(tmp_path: Path) -> None:
    with _pg_ledger(tmp_path) as (env, service, clock):
        for seed, pid in enumerate(PLATFORMS):
            run_workload(service, clock, 60, seed=seed, pid=pid)
        a = Worker(env, "worker-a")

        def a_holds_all() -> bool:  # a.runner.leases is set by the follow thread
            leases = a.runner.leases
            return leases is not None and len(leases.held) == 4

        _until(a_holds_all, "worker a to take every lease")
        b = Worker(env, "worker-b")
        reader = ProjectionRunner(service.store)
        try:
            for seed in range(2, 4):  # more records while both follow
                for pid in PLATFORMS:
                    run_workload(service, clock, 40, seed=seed, pid=pid)
            _until(lambda: _caught_up(service, reader), "the workers to catch up")
            # a took every lease first; b polled and projected nothing
            assert set(a.runner.projected) == {(n, p) for n in NAMES for p in PLATFORMS}
            assert b.runner.projected == {}
            held = {(r.name, r.platform): r.worker for r in lease_rows(reader.db)}
            assert set(held.values()) == {"worker-a"} and len(held) == 4
            stopped_at = {pid: last_position(service, pid) for pid in PLATFORMS}
            a.stop()  # its session ends: b takes over within a poll
            for pid in PLATFORMS:
                run_workload(service, clock, 40, seed=9, pid=pid)
            _until(lambda: _caught_up(service, reader), "the survivor to catch up")
            history = lease_rows(reader.db, history=True)
            for name in NAMES:
                for pid in PLATFORMS:
                    mine = [h for h in history if (h.name, h.platform) == (name, pid)]
                    # two epochs: a from the start, b from exactly where a stopped
                    assert [(h.epoch, h.worker) for h in mine] == [(1, "worker-a"), (2, "worker-b")]
                    assert mine[0].from_position == -1
                    assert mine[1].from_position == stopped_at[pid]
                    head = last_position(service, pid)
                    # every record projected once, by one worker or the other
                    assert a.runner.projected[(name, pid)] == stopped_at[pid] + 1
                    assert b.runner.projected[(name, pid)] == head - stopped_at[pid]
            now = {
                (r.name, r.platform): (r.worker, r.epoch, r.position) for r in lease_rows(reader.db)
            }
            assert now == {
                (n, p): ("worker-b", 2, last_position(service, p)) for n in NAMES for p in PLATFORMS
            }
        finally:
            for w in (a, b):
                if w.thread.is_alive():
                    w.stop()
        _reference(service, reader)


def test_a_worker_whose_session_died_cannot_commit_after_a_takeover(tmp_path: Path) -> None:
    with _pg_ledger(tmp_path) as (env, service, clock):
        run_workload(service, clock, 120, pid="p1")
        stores = [
            LedgerStore(Config.from_env({**env, "CUSTODY_SERVER_ID": name}))
            for name in ("zombie", "heir")
        ]
        old, new = (ProjectionRunner(s, batch_size=20) for s in stores)
        try:
            assert old.use_leases() and new.use_leases()
            assert old.run_once("p1") == 20
            assert old.leases is not None
            old.leases.check_every_s = 3600.0  # it will not notice its session died
            assert new.run_once("p1") == 0  # old holds both leases: new does nothing
            # the old worker's lease session is terminated; it has not noticed yet
            pg_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'custody-projection:zombie'"
            )
            _until(lambda: new.run_once("p1") == 20, "the heir to take over")
            with pytest.raises(LeaseSuperseded):  # its batch is rolled back, nothing counted
                old.run_once("p1")
            assert isinstance(LeaseSuperseded("x"), PositionConflict)  # catch_up reloads on it
            assert old.projected == {("statements", "p1"): 20, ("audit", "p1"): 20}
            old.leases.check_every_s = 0.0  # now it looks
            new.catch_up("p1")
            head = last_position(service, "p1")
            for name in NAMES:
                assert new.projected[(name, "p1")] == head + 1 - 20
            history = lease_rows(new.db, history=True)
            assert [(h.name, h.epoch, h.worker, h.from_position) for h in history] == [
                ("audit", 1, "zombie", -1),
                ("audit", 2, "heir", 19),
                ("statements", 1, "zombie", -1),
                ("statements", 2, "heir", 19),
            ]
            # the old worker, once it notices, reconnects as a standby: nothing to do
            assert old.catch_up("p1") == {"p1": 0}
            _reference_one(service, new)
        finally:
            for r in (old, new):
                r.close()
            for s in stores:
                s.close()


def _reference_one(service: LedgerService, runner: ProjectionRunner) -> None:
    digest = runner.digest("p1")
    reference = ProjectionRunner(service.store)
    reference.rebuild("p1")
    assert reference.digest("p1") == digest


def test_sqlite_takes_no_lease_and_one_worker_projects_everything(tmp_path: Path) -> None:
    config = Config.from_env({"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(tmp_path)})
    service = LedgerService(config, clock_ms=FakeClock())
    service.start()
    try:
        run_workload(service, FakeClock(), 80, pid="p1")
        runner = ProjectionRunner(service.store, batch_size=30)
        assert runner.use_leases() is False and runner.leases is None
        stop = threading.Event()
        thread = threading.Thread(target=runner.follow, args=(stop,), kwargs={"poll_s": 0.05})
        thread.start()
        try:
            _until(lambda: all(s.lag == 0 for s in runner.status("p1")), "the worker to catch up")
        finally:
            stop.set()
            thread.join(30)
        head = last_position(service, "p1")
        assert runner.projected == {("statements", "p1"): head + 1, ("audit", "p1"): head + 1}
        _reference_one(service, runner)
        runner.close()
    finally:
        service.close()

"""Network faults between ledger servers and PostgreSQL, under load, on real server processes.

Two servers (tests/cluster/cluster_node.py) share one schema; clients send transfers and retry
with the same client ids until acknowledged. Faults:

- each server reaches the shared PostgreSQL through its own `FaultProxy`: every carried
  connection dropped (FIN and RST, the writer's only and everybody's); stalled (shorter and
  longer than the lease timeout) then resumed; PostgreSQL's answers held then every connection
  reset (commits whose outcome the server cannot know); the writer cut off until the other
  server has taken its platform over;
- on a private PostgreSQL (never the shared one): `pg_ctl restart -m fast` and `-m immediate`.

Afterwards: no client got an answer no correct server could give, every error a client saw is a
retryable kind (ledger/api/errors.py), every acknowledged transfer is stored exactly once where
its client was told, no client id is stored twice, each chain verifies, every acknowledged
record lies in its server's lease epoch, and the same processes accept writes again (no
restart). Timing is measured (bench/network_faults.py prints it) but never asserted.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_harness import Cluster, Findings, check_log, prepare_platforms
from faults import (
    Answers,
    Fault,
    FaultClient,
    FaultProxy,
    PrivatePostgres,
    ProxiedCluster,
    StallUntil,
    answers_lost,
    drop_all,
    initdb_unavailable,
    inject,
    merged,
    proxies_for,
    retryable,
    role_changes,
    stall_for,
    wait_recovered,
)
from helpers import deposit, make_platform, pg_env, require_postgres

from ledger.config import Config
from ledger.service import LedgerService
from ledger.writer import Outcome, verify_stored_chain

PLATFORMS = ["p1", "p2"]
POLL_MS = 200  # lease timeout: max(3 x poll, 2 s) = 2 s
SHORT_STALL_S = 1.0
LONG_STALL_S = 3.5  # longer than the lease timeout: the writer must fence itself
PARTITION_MAX_S = 30.0  # the takeover needs about 2 x lease timeout + a poll
RECOVERY_TIMEOUT_S = 45.0
CLIENTS = 4
BATCH = 5


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    with pg_env(tmp_path) as env:
        yield env


def _clients(cluster: Cluster, stop: threading.Event) -> list[FaultClient]:
    return [
        FaultClient(f"c{i}", cluster.ports, PLATFORMS, BATCH, stop, seed=i) for i in range(CLIENTS)
    ]


def _inject(
    clients: list[FaultClient], kind: str, act: Callable[[], object], faults: list[Fault]
) -> None:
    fault = inject(clients, kind, act, RECOVERY_TIMEOUT_S)
    faults.append(fault)
    assert fault.recovered is not None, f"no recovery after {kind}: {merged(clients).errors}"
    time.sleep(0.3)  # some load between faults


def _assert_consistent(config: Config, clients: list[FaultClient], cluster: Cluster) -> Findings:
    for client in clients:
        assert client.failed is None, f"{client.name}: {client.failed!r}"
    answers: Answers = merged(clients)
    assert answers.wrong == []
    not_retryable = {kind: n for kind, n in answers.errors.items() if not retryable(kind)}
    assert not_retryable == {}, answers.errors
    assert answers.transport == 0  # the servers themselves never went away
    acks = answers.acks
    findings = check_log(config, PLATFORMS, acks)
    print(
        f"\nacknowledged {findings.acknowledged}, found {findings.found}, records "
        f"{findings.records}, errors {dict(answers.errors)}, redirects {answers.redirects}"
    )
    assert findings.acknowledged > 100
    assert findings.lost == []
    assert findings.duplicates == []
    assert findings.misplaced == []
    assert findings.found == findings.acknowledged
    assert findings.outside_epoch == []
    for platform in PLATFORMS:
        count, bad, reason = findings.chain[platform]
        assert (bad, reason) == (None, "ok"), (platform, count, bad, reason)
        assert count == findings.records[platform]
    return findings


def _assert_serving_without_restart(cluster: Cluster, clients: list[FaultClient]) -> None:
    """After the last fault the very processes started first take new writes."""
    before = len(merged(clients).acks)
    cluster.wait(lambda: len(merged(clients).acks) > before + 100, 30, "writes after the faults")
    assert cluster.retired == []
    assert all(node.alive() and node.server_id.endswith("-g1") for node in cluster.nodes.values())


def test_dropped_and_stalled_connections_lose_nothing_and_tell_no_lies(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    env = {**pg_store, "CUSTODY_LEASE_POLL_MS": str(POLL_MS)}
    config = Config.from_env(env)
    prepare_platforms(config, PLATFORMS, funds=10**12)
    stop = threading.Event()
    faults: list[Fault] = []
    with proxies_for(("127.0.0.1", 5432), 2) as proxies:
        cluster = ProxiedCluster(env, tmp_path, proxies)
        clients = _clients(cluster, stop)
        try:
            cluster.start()
            for client in clients:
                client.start()
            assert wait_recovered(clients, time.monotonic(), RECOVERY_TIMEOUT_S) is not None

            def writer() -> list[FaultProxy]:
                return cluster.writer_proxies("p1")

            def both() -> list[FaultProxy]:
                return proxies

            _inject(clients, "drop-writer-fin", drop_all(writer, rst=False), faults)
            _inject(clients, "drop-all-rst", drop_all(both, rst=True), faults)
            _inject(clients, "drop-writer-rst", drop_all(writer, rst=True), faults)
            _inject(clients, "stall-writer", stall_for(writer, SHORT_STALL_S), faults)
            _inject(clients, "stall-all", stall_for(both, SHORT_STALL_S), faults)
            fenced_before = role_changes(cluster)["follower"]
            _inject(clients, "stall-writer-long", stall_for(writer, LONG_STALL_S), faults)
            # the silent lease made the writer stop writing (its watchdog), and it came back
            assert role_changes(cluster)["follower"] > fenced_before
            _inject(clients, "answers-lost", answers_lost(writer, SHORT_STALL_S), faults)
            # a partition that does not heal: PostgreSQL ends the silent writer's lease session
            # (idle_session_timeout) and the other server takes its platforms over meanwhile
            partition = StallUntil(writer, cluster.taken_over("p1"), PARTITION_MAX_S)
            _inject(clients, "partition-writer", partition, faults)
            assert partition.met == [True], partition.took_s
            _inject(clients, "stall-all-long", stall_for(both, LONG_STALL_S), faults)
            _assert_serving_without_restart(cluster, clients)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=120)
            cluster.stop()
        dropped = sum(proxy.dropped for proxy in proxies)
    assert dropped > 0  # the drops really cut live connections
    assert len(faults) == 9
    _assert_consistent(config, clients, cluster)


@pytest.mark.skipif(initdb_unavailable() is not None, reason=str(initdb_unavailable()))
def test_postgres_restarts_lose_nothing_and_tell_no_lies(tmp_path: Path) -> None:
    require_postgres()  # runs with the PostgreSQL tests (it never uses the shared server)
    stop = threading.Event()
    faults: list[Fault] = []
    with PrivatePostgres.create() as pg:
        env = {
            **pg.env("custody"),
            "CUSTODY_DATA_DIR": str(tmp_path),
            "CUSTODY_LEASE_POLL_MS": str(POLL_MS),
        }
        config = Config.from_env(env)
        prepare_platforms(config, PLATFORMS, funds=10**12)
        cluster = Cluster(env, tmp_path, size=2)
        clients = _clients(cluster, stop)
        try:
            cluster.start()
            for client in clients:
                client.start()
            assert wait_recovered(clients, time.monotonic(), RECOVERY_TIMEOUT_S) is not None
            for mode in ("fast", "immediate", "fast", "immediate"):
                _inject(clients, f"restart-{mode}", functools.partial(pg.restart, mode), faults)
            _assert_serving_without_restart(cluster, clients)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=120)
            cluster.stop()
        assert pg.restarts == {"fast": 2, "immediate": 2}
        assert len(faults) == 4
        _assert_consistent(config, clients, cluster)


def test_a_server_cut_off_mid_commit_does_not_hold_up_the_others(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    """Server a's network stalls right after its group took the events table lock. PostgreSQL
    ends that silent transaction (ledger/store.py GROUP_SILENCE_MS), so server b's commits for
    its own platform go through while a is still cut off; a's group is rolled back, its caller
    gets a retryable error, and the log stays whole."""
    tag = uuid.uuid4().hex[:8]
    with FaultProxy(("127.0.0.1", 5432)) as proxy:

        def server(name: str, port: int) -> LedgerService:
            config = Config.from_env(
                {
                    **pg_store,
                    "POSTGRES_PORT": str(port),
                    "CUSTODY_SERVER_ID": f"{name}-{tag}",
                    "CUSTODY_ADVERTISE": f"127.0.0.1:{7100 + (name == 'b')}",
                    "CUSTODY_DATA_DIR": str(tmp_path / name),
                    "CUSTODY_LEASE_POLL_MS": str(POLL_MS),
                }
            )
            service = LedgerService(config)
            service.start()
            return service

        a = server("a", proxy.port)
        b = server("b", 5432)
        try:
            pa = make_platform(a, "p1")
            pb = make_platform(b, "p2")
            recorder: Any = a.store.recorder
            lock_table = recorder._lock_table
            locked = threading.Event()

            def lock_then_stall(curs: Any) -> None:
                lock_table(curs)
                proxy.stall()  # a's next statement never arrives: the lock stays taken
                locked.set()

            recorder._lock_table = lock_then_stall
            stuck: list[BaseException | list[Outcome]] = []

            def a_commits() -> None:
                try:
                    stuck.append(a.execute("p1", [deposit(pa, "a-1", "alice", 5)], "platform:t"))
                except BaseException as exc:
                    stuck.append(exc)

            a_thread = threading.Thread(target=a_commits, daemon=True)
            a_thread.start()
            assert locked.wait(30)
            recorder._lock_table = lock_table
            answers: list[list[Outcome]] = []
            b_thread = threading.Thread(
                target=lambda: answers.append(
                    b.execute("p2", [deposit(pb, "b-1", "alice", 7)], "platform:t")
                ),
                daemon=True,
            )
            b_thread.start()
            b_thread.join(60)
            still_cut_off = proxy.stalled
            proxy.resume()
            a_thread.join(60)
            assert still_cut_off and answers and answers[0][0].status == "accepted"
            [failure] = stuck
            assert isinstance(failure, BaseException) and retryable(type(failure).__name__)
            for service, platform in ((a, "p1"), (b, "p2")):
                count, bad, reason = verify_stored_chain(service.store, platform)
                assert (bad, reason) == (None, "ok"), (platform, count, bad, reason)
            with b.reading("p1") as state:  # a's group was rolled back
                assert "a-1" not in state.done
        finally:
            proxy.resume()
            a.close()
            b.close()

"""Three servers, one PostgreSQL schema, the writer SIGKILLed again and again under load.

Every acknowledged transfer is in the log exactly once at the position its client was told,
no client id is recorded twice, each platform's chain verifies, the writers history shows one
writer per stretch of the log (each acknowledged record lies in its writer's epoch), and the
failover time (kill -> a new writer serving) is measured.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_harness import Client, Cluster, check_log, prepare_platforms
from helpers import pg_env, require_postgres

from ledger.config import Config

PLATFORMS = ["p1", "p2"]
KILLS = 5
POLL_MS = 200


@pytest.fixture
def pg_store(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_postgres()
    with pg_env(tmp_path) as env:
        yield env


def test_writer_killed_repeatedly_loses_nothing_and_never_forks(
    pg_store: dict[str, str], tmp_path: Path
) -> None:
    env = {**pg_store, "CUSTODY_LEASE_POLL_MS": str(POLL_MS)}
    config = Config.from_env(env)
    prepare_platforms(config, PLATFORMS, funds=10**12)
    cluster = Cluster(env, tmp_path, size=3)
    stop = threading.Event()
    clients = [
        Client(f"c{i}", cluster.ports, PLATFORMS, batch=5, stop=stop, seed=i) for i in range(6)
    ]
    kills = []
    try:
        cluster.start()
        for client in clients:
            client.start()
        time.sleep(1.0)
        for _ in range(KILLS):
            before = sum(len(cl.stats.acks) for cl in clients)
            kills.append(cluster.kill_writer("p1"))
            # load keeps flowing after the takeover before the next kill
            cluster.wait(
                lambda before=before: sum(len(cl.stats.acks) for cl in clients) > before + 50,
                30,
                "acknowledgements after the takeover",
            )
            time.sleep(0.3)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=150)
        cluster.stop()

    acks = {cid: ack for cl in clients for cid, ack in cl.stats.acks.items()}
    findings = check_log(config, PLATFORMS, acks)
    failovers = [ms for k in kills for ms in k["failover_ms"].values()]
    print(
        f"\nkills {len(kills)}, acknowledged {findings.acknowledged}, found {findings.found}, "
        f"replayed {sum(a.status == 'replayed' for a in acks.values())}, "
        f"records {findings.records}, redirects {sum(cl.stats.redirects for cl in clients)}, "
        f"retries {sum(cl.stats.retries for cl in clients)}, failover ms median "
        f"{statistics.median(failovers)} max {max(failovers)}"
    )
    assert len(kills) == KILLS
    assert findings.acknowledged > 500
    assert findings.lost == []
    assert findings.duplicates == []
    assert findings.misplaced == []
    assert findings.found == findings.acknowledged
    for platform in PLATFORMS:
        count, bad, reason = findings.chain[platform]
        assert (bad, reason) == (None, "ok"), (platform, count, bad, reason)
        assert count == findings.records[platform]
    # one writer per stretch of the log: every accepted acknowledgement lies in the epoch of
    # the server that gave it, and epochs only move forward through the log
    assert findings.outside_epoch == []
    for history in findings.history.values():
        assert [h.epoch for h in history] == list(range(1, len(history) + 1))
        assert all(a.from_seq <= b.from_seq for a, b in itertools.pairwise(history))
    assert len(findings.history["p1"]) >= KILLS + 1
    # every killed server was replaced by another within seconds
    assert all(0 <= ms < 10_000 for ms in failovers), kills

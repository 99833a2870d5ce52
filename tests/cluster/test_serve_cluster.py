"""Three real `custody serve` processes and two `custody project run --follow` workers on one
PostgreSQL schema, gRPC clients under load, the writer SIGKILLed three times and a projection
worker once. Nothing acknowledged is lost or doubled, two servers never wrote one platform at the
same time, the chains verify, and the read models, built by one worker per projection at a time,
reach the head and equal a rebuild from zero.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from helpers import pg_env, require_postgres
from serve_harness import (
    LoadClient,
    ServeCluster,
    base_env,
    check_ledger,
    check_projections,
    make_pki,
    prepare_platforms,
)

from ledger.config import Config

PLATFORMS = ["p1", "p2"]
POLL_MS = 200
KILLS = 3


def test_serve_processes_survive_writer_kills_and_workers_share_projections(
    tmp_path: Path,
) -> None:
    require_postgres()
    with pg_env(tmp_path) as store_env:
        env = base_env(store_env, tmp_path / "shared", POLL_MS)
        config = Config.from_env(env)
        prepare_platforms(config, PLATFORMS, funds=10**12)
        pki = make_pki(tmp_path / "pki", PLATFORMS)
        cluster = ServeCluster(env, config, tmp_path, pki, size=3)
        stop = threading.Event()
        clients: list[LoadClient] = []
        kills = []
        try:
            cluster.start()
            cluster.start_worker("w1")
            cluster.start_worker("w2")
            clients = [
                LoadClient(f"c{i}", cluster.addresses(), pki, PLATFORMS[i % 2], 5, stop, seed=i)
                for i in range(4)
            ]
            for client in clients:
                client.start()
            cluster.wait(lambda: all(c.stats.acks for c in clients), 60, "first acks")
            for k in range(KILLS):
                time.sleep(1.5)
                kills.append(cluster.kill_writer(PLATFORMS[k % 2]))
                if k == 0:
                    worker_kill = cluster.kill_lease_holder("w3")
            time.sleep(1.0)
            stop.set()
            for client in clients:
                client.join(60)
                assert not client.is_alive()
            cluster.wait(cluster.projections_at_head, 60, "projections at the head")
        finally:
            stop.set()
            cluster.stop()
        try:
            fatal = [f for c in clients for f in c.stats.fatal]
            assert not fatal, fatal
            acks = {cid: a for c in clients for cid, a in c.stats.acks.items()}
            found = check_ledger(cluster, acks)
            assert len(kills) == KILLS and all(k["failover_ms"] for k in kills)
            assert found.acknowledged > 0 and found.found == found.acknowledged
            assert found.lost == [] and found.duplicates == [] and found.misplaced == []
            assert found.outside_epoch == [], found.outside_epoch[:5]
            assert found.overlaps == [], found.overlaps  # never two writers at once
            assert found.epochs_ok and found.chains_ok, (found.history, found.chains)
            # every kill moved the write role of what the victim wrote to a new epoch
            assert all(len(h) >= 2 for h in found.history.values())
            # projection workers: the survivor took the killed one's leases and resumed
            assert worker_kill["killed"] in ("w1", "w2")
            assert worker_kill["killed"] not in worker_kill["taken_by"]
            proj = check_projections(cluster)
            assert proj.at_head
            assert proj.equal_to_rebuild == {p: True for p in PLATFORMS}
            assert proj.one_at_a_time == [], proj.one_at_a_time
            keys = {(h.name, h.platform) for h in proj.history}
            assert len(keys) == 2 * len(PLATFORMS)  # statements and audit on each platform
            killed = worker_kill["killed"]
            for key in keys:
                mine = [h for h in proj.history if (h.name, h.platform) == key]
                if any(h.worker == killed for h in mine):
                    # what the killed worker held passed on, at or after where it had started
                    last = max(i for i, h in enumerate(mine) if h.worker == killed)
                    assert last + 1 < len(mine) and mine[last + 1].worker != killed
        finally:
            cluster.close()

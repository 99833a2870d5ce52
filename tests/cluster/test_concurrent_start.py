"""Several servers starting at once on an empty PostgreSQL schema all come up: creating the
tables is serialised between processes (it used to fail with "tuple concurrently updated")."""

from __future__ import annotations

import threading
from pathlib import Path

from helpers import make_platform, pg_env, require_postgres

from ledger.config import Config
from ledger.service import LedgerService

SERVERS = 6


def _start_together(env: dict[str, str]) -> tuple[list[LedgerService], list[BaseException]]:
    barrier = threading.Barrier(SERVERS)
    failures: list[BaseException] = []
    services: list[LedgerService] = []
    lock = threading.Lock()

    def start(n: int) -> None:
        config = Config.from_env(
            {**env, "CUSTODY_SERVER_ID": f"s{n}", "CUSTODY_CHECKPOINT_EVERY": "0"}
        )
        barrier.wait(timeout=30)
        try:
            service = LedgerService(config)
            service.start()
        except BaseException as exc:  # collected and reported by the test
            with lock:
                failures.append(exc)
            return
        with lock:
            services.append(service)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(SERVERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return services, failures


def test_servers_starting_together_on_an_empty_schema_all_start(tmp_path: Path) -> None:
    require_postgres()
    for attempt in range(3):  # a fresh, empty schema each time
        with pg_env(tmp_path / f"run{attempt}") as env:
            services, failures = _start_together(env)
            try:
                assert failures == []
                assert len(services) == SERVERS
                make_platform(services[0])  # the tables work
                assert services[0].platform_ids() == ["p1"]
            finally:
                for service in services:
                    service.close()

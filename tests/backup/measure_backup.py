"""Measure `custody backup` and `custody restore` (run by hand, not collected by pytest).

    python tests/backup/measure_backup.py sqlite 200000
    python tests/backup/measure_backup.py postgres 200000   # schema in db `test`, dropped after

Fills one platform with RECORDS transfers (batches of 1,000), signs a checkpoint, backs it up,
restores it into a fresh target and verifies it; prints archive size and both times.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from helpers import (  # noqa: E402 (after the path set-up)
    ACTOR,
    deposit,
    make_platform,
    open_service,
    pg_env,
    sqlite_env,
    transfer,
)

from ledger import backup as bk  # noqa: E402
from ledger.config import Config  # noqa: E402


def fill(config: Config, records: int) -> None:
    service = open_service(config)
    p = make_platform(service)
    service.execute(p.id, [deposit(p, "d0", p.customers[0], 10**12)], ACTOR)
    for i in range(records // 1000):
        batch = [transfer(p, f"t{i}-{j}", p.customers[0], p.customers[1], 1) for j in range(1000)]
        service.execute(p.id, batch, ACTOR)
    service.sign_checkpoint(p.id)
    service.close()


@contextlib.contextmanager
def env_for(kind: str, where: Path) -> Iterator[dict[str, str]]:
    if kind == "sqlite":
        yield sqlite_env(where)
    else:
        with pg_env(where) as env:
            yield env


def main() -> None:
    kind, records = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with env_for(kind, d / "src") as env:
            config = Config.from_env(env)
            fill(config, records)
            t0 = time.perf_counter()
            result = bk.backup(config, d / "b.backup")
            backup_s = time.perf_counter() - t0
            with env_for(kind, d / "dst") as env2:
                t0 = time.perf_counter()
                report = bk.restore(Config.from_env(env2), d / "b.backup")
                restore_s = time.perf_counter() - t0
        size = result.manifest["platforms"]["p1"]["size"]
        print(
            f"{kind}: {size:,} records, archive {result.bytes / 1e6:.1f} MB, "
            f"backup {backup_s:.2f} s, restore+verify {restore_s:.2f} s, ok={report.ok}"
        )


if __name__ == "__main__":
    main()

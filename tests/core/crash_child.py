"""Child process for test_crash: commit batches of transfers until killed.

Usage: crash_child.py PLATFORM BATCH_SIZE [execute|submit]
The store comes from the environment (CUSTODY_STORE, CUSTODY_DATA_DIR, POSTGRES_*). Prints
`ready` once started, then once each batch is acknowledged (`LedgerService.execute` returned,
or in `submit` mode the group committer resolved its future, several being in flight), one
line `ack <batch> <client id> <client id> ...`, flushed. Every batch moves 1 minor unit per
transfer from `alice` to `bob`; odd batches are linked (all-or-none).
"""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import Future

from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService


def _batch(batch: int, batch_size: int) -> tuple[list[str], list[c.Command]]:
    cids = [f"b{batch}-{k}" for k in range(batch_size)]
    cmds: list[c.Command] = [
        c.Transfer(
            client_id=cid,
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency="CNY",
        )
        for cid in cids
    ]
    return cids, cmds


def _ack(batch: int, cids: list[str], outcomes: list[object]) -> None:
    if any(getattr(o, "status", None) != "accepted" for o in outcomes):
        sys.stdout.write(f"error {outcomes}\n")
        sys.stdout.flush()
        raise SystemExit(1)
    sys.stdout.write(f"ack {batch} {' '.join(cids)}\n")
    sys.stdout.flush()


def main() -> int:
    platform_id, batch_size = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "execute"
    service = LedgerService(Config.from_env())
    service.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    batch = 0
    in_flight: deque[tuple[int, list[str], Future[list[object]]]] = deque()
    while True:
        cids, cmds = _batch(batch, batch_size)
        linked = batch % 2 == 1
        if mode == "execute":
            _ack(
                batch,
                cids,
                list(service.execute(platform_id, cmds, "platform:crash-child", linked)),
            )
        else:
            future = service.submit(platform_id, cmds, "platform:crash-child", linked)
            in_flight.append((batch, cids, future))  # type: ignore[arg-type]
            while len(in_flight) > 4 or (in_flight and in_flight[0][2].done()):
                done_batch, done_cids, done_future = in_flight.popleft()
                _ack(done_batch, done_cids, done_future.result(timeout=60))
        batch += 1


if __name__ == "__main__":
    sys.exit(main())

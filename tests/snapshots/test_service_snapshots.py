"""The service stores snapshots on its own schedule (CUSTODY_SNAPSHOT_EVERY) and a restart
uses the newest one: only the tail is replayed, and the state equals a full replay's."""

from __future__ import annotations

import dataclasses
import time

from helpers import ACTOR, deposit, make_platform, transfer  # type: ignore[import-not-found]

from ledger.config import Config
from ledger.service import LedgerService


def _balances(svc: LedgerService) -> dict[str, tuple[int, int]]:
    with svc.reading("p1") as st:
        return {a.id: (a.posted_minor, a.held_minor) for a in st.accounts.values()}


def test_the_service_snapshots_on_schedule_and_restarts_from_it(config: Config) -> None:
    config = dataclasses.replace(config, snapshot_every=100, checkpoint_every=10_000)
    svc = LedgerService(config)
    svc.start()
    p = make_platform(svc)
    svc.execute("p1", [deposit(p, "d", "alice", 10**9)], ACTOR)
    for batch in range(5):
        cmds = [transfer(p, f"t{batch}-{i}", "alice", "bob", 1) for i in range(50)]
        assert all(o.ok for o in svc.execute("p1", cmds, ACTOR))
    deadline = time.monotonic() + 20
    while svc._platforms["p1"].snapshot_at < 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the checkpoint thread ticks every second
    stored_at = svc._platforms["p1"].snapshot_at
    assert stored_at > 0, "no snapshot was stored on schedule"
    more = [transfer(p, f"late-{i}", "bob", "carol", 1) for i in range(7)]
    assert all(o.ok for o in svc.execute("p1", more, ACTOR))
    expected = _balances(svc)
    svc.close()

    again = LedgerService(config)
    again.start()
    try:
        writer = again._platforms["p1"].writer
        assert writer.snapshot_position >= stored_at  # restarted from a snapshot + tail
        assert _balances(again) == expected
    finally:
        again.close()
    plain = LedgerService(config)
    plain.start()
    try:
        writer = plain._platforms["p1"].writer
        writer.use_snapshots = False
        writer.load()
        assert writer.snapshot_position == -1 and _balances(plain) == expected
    finally:
        plain.close()

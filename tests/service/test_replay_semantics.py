"""Start-up replay refuses a re-chained log whose reversal is not the mirror of its original.

The chain alone cannot catch this (an insider can recompute every link); the ledger's replay
and the signed checkpoints can. This pins the replay side on SQLite.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from ledger import commands as c
from ledger.config import Config
from ledger.domain import StateError
from ledger.service import LedgerService


def test_forged_reversal_fails_replay_even_when_rechained(tmp_path: Path) -> None:
    config = Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path), "CUSTODY_CHECKPOINT_EVERY": "0"})
    service = LedgerService(config)
    service.start()
    assert service.create_platform("p1", "P", "operator:test").ok
    steps = [
        c.OpenAccount(client_id="o1", account_id="omni", kind="omnibus", currency="CNY"),
        c.OpenAccount(
            client_id="o2", account_id="a", kind="customer", currency="CNY", role="lender"
        ),
        c.OpenAccount(
            client_id="o3", account_id="b", kind="customer", currency="CNY", role="lender"
        ),
        c.Deposit(
            client_id="d1",
            mirror_account_id="omni",
            account_id="a",
            amount_minor=100,
            currency="CNY",
        ),
        c.Deposit(
            client_id="d2",
            mirror_account_id="omni",
            account_id="b",
            amount_minor=100,
            currency="CNY",
        ),
        c.Reverse(client_id="r1", movement_id="d1", reason="sent twice"),
    ]
    assert all(o.ok for o in service.execute("p1", steps, "operator:test"))
    service.close()

    db = sqlite3.connect(config.sqlite_path)
    rows = db.execute(
        "SELECT originator_version, state FROM stored_events WHERE originator_id='log:p1' "
        "ORDER BY originator_version"
    ).fetchall()
    head = b"\x00" * 32
    for seq, state in rows:
        data = bytes(state)[32:]
        rec = json.loads(data)
        if rec["kind"] == "reversed":  # reverse d1 but take the money from b instead of a
            rec["entries"] = [["b", "omni", 100]]
            data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        head = hashlib.sha256(head + data).digest()
        db.execute(
            "UPDATE stored_events SET state=? WHERE originator_id='log:p1' AND "
            "originator_version=?",
            (head + data, seq),
        )
    db.commit()
    db.close()

    forged = LedgerService(config)
    with pytest.raises(StateError, match="mirror"):
        forged.start()
    forged.store.close()


def test_platform_created_that_carries_effects_fails_replay(tmp_path: Path) -> None:
    config = Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path), "CUSTODY_CHECKPOINT_EVERY": "0"})
    service = LedgerService(config)
    service.start()
    assert service.create_platform("p1", "P", "operator:test").ok
    service.close()
    db = sqlite3.connect(config.sqlite_path)
    (state,) = db.execute(
        "SELECT state FROM stored_events WHERE originator_id='log:p1' AND originator_version=0"
    ).fetchone()
    rec = json.loads(bytes(state)[32:])
    rec["subject"] = "ghost"  # a first record that claims to do something more
    data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    link = hashlib.sha256(b"\x00" * 32 + data).digest()
    db.execute(
        "UPDATE stored_events SET state=? WHERE originator_id='log:p1' AND originator_version=0",
        (link + data,),
    )
    db.commit()
    db.close()
    forged = LedgerService(config)
    with pytest.raises(StateError, match="move nothing"):
        forged.start()
    forged.store.close()

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
from helpers import ACTOR, BOOKKEEPING_POLICY, CHECKER, OPERATOR

from controls.policy import DEFAULT_POLICY, Policy
from ledger import commands as c
from ledger.config import Config
from ledger.domain import StateError
from ledger.service import LedgerService


@pytest.mark.parametrize(
    "policy",
    [BOOKKEEPING_POLICY, DEFAULT_POLICY],
    ids=["reversal-by-operator", "reversal-approved-by-checker"],
)
def test_forged_reversal_fails_replay_even_when_rechained(tmp_path: Path, policy: Policy) -> None:
    """Under the bookkeeping policy the operator's reversal is recorded at once; under the
    default policy it is a request and the checker's approval records it (`executes`)."""
    config = Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path), "CUSTODY_CHECKPOINT_EVERY": "0"})
    service = LedgerService(config)
    service.start()
    assert service.create_platform("p1", "P", "operator:test", policy).ok
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
    ]
    outcomes = service.execute("p1", steps, ACTOR)
    assert [o.status for o in outcomes] == ["accepted"] * len(steps), outcomes
    reverse = c.Reverse(client_id="r1", movement_id="d1", reason="sent twice")
    [rev] = service.execute("p1", [reverse], OPERATOR)
    if policy is DEFAULT_POLICY:
        assert rev.status == "pending", rev
        [rev] = service.execute(
            "p1", [c.ApproveRequest(client_id="ok-r1", request_id="r1")], CHECKER
        )
    assert (rev.status, rev.kind) == ("accepted", "reversed"), rev
    service.close()

    db = sqlite3.connect(config.sqlite_path)
    rows = db.execute(
        "SELECT originator_version, state FROM stored_events WHERE originator_id='log:p1' "
        "ORDER BY originator_version"
    ).fetchall()
    head = b"\x00" * 32
    forged_records = 0
    for seq, state in rows:
        data = bytes(state)[32:]
        rec = json.loads(data)
        if rec["kind"] == "reversed":  # reverse d1 but take the money from b instead of a
            assert rec["entries"] == [["a", "omni", 100]]
            assert ("executes" in rec) == (policy is DEFAULT_POLICY)
            rec["entries"] = [["b", "omni", 100]]
            forged_records += 1
            data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        head = hashlib.sha256(head + data).digest()
        db.execute(
            "UPDATE stored_events SET state=? WHERE originator_id='log:p1' AND "
            "originator_version=?",
            (head + data, seq),
        )
    db.commit()
    db.close()
    assert forged_records == 1

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

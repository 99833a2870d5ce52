"""Restart equivalence: a workload that writes every new record kind (policy_set, gate_set,
approvals and rejections, keys, payees, standing authorisations, tags, bad signatures), then
a reopened service (replay from the store) has identical state for everything the controls
read, and decides the next instructions exactly as a service that never stopped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ctl_helpers import (
    CHECKER,
    MINUTE_MS,
    OPERATOR,
    PLATFORM,
    SYSTEM,
    CtlPlatform,
    bind_payee,
    controls_snapshot,
    make_ctl_platform,
    new_key,
    place_hold,
    pub_b64,
    standing,
    transfer,
    withdrawal,
)
from helpers import START_MS, FakeClock, open_service

from controls.policy import DAY_MS, DEFAULT_POLICY, HOUR_MS
from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService

M = 1_000_000
Step = tuple[c.Command, str]


def _workload(p: CtlPlatform, keys: dict[str, Ed25519PrivateKey]) -> list[Callable[[], Step] | str]:
    """Steps built lazily (signatures use the clock of their moment); strings move the clock."""

    def s(cmd: Callable[[], c.Command], actor: str = PLATFORM) -> Callable[[], Step]:
        return lambda: (cmd(), actor)

    def exp() -> int:
        return p.clock.now + HOUR_MS

    rotated = keys["rotated"]
    steps: list[Callable[[], Step] | str] = [
        s(
            lambda: c.Deposit(
                client_id="d1",
                mirror_account_id=p.omni,
                account_id="alice",
                amount_minor=60 * M,
                currency="CNY",
            )
        ),  # tagged
        s(
            lambda: c.Deposit(
                client_id="d2",
                mirror_account_id=p.omni,
                account_id="bob",
                amount_minor=20 * M,
                currency="CNY",
            )
        ),
        s(lambda: p.sign(bind_payee(p, "b1", "alice"), "alice")),
        s(lambda: p.sign(bind_payee(p, "b2", "bob"), "bob")),
        s(lambda: p.sign(transfer("bad1", "alice", "bob", 5), "alice", key=new_key())),
        s(lambda: p.sign(transfer("bad2", "alice", "bob", 5), "alice", key=new_key())),
        s(lambda: p.sign(transfer("t1", "alice", "bob", 1_000), "alice")),
        s(
            lambda: p.sign(
                c.GrantStanding(
                    client_id="g1",
                    account_id="bob",
                    standing_id="auto",
                    purpose="bid",
                    payee_account_id="alice",
                    per_txn_max_minor=500,
                    valid_until_ms=p.clock.now + DAY_MS,
                ),
                "bob",
            )
        ),
        s(
            lambda: p.sign(
                c.GrantStanding(
                    client_id="g2",
                    account_id="bob",
                    standing_id="auto2",
                    purpose="repayment",
                    per_txn_max_minor=500,
                    valid_until_ms=p.clock.now + DAY_MS,
                ),
                "bob",
            )
        ),
        s(lambda: standing(transfer("t2", "bob", "alice", 400, purpose="bid"), "auto")),
        s(lambda: c.RevokeStanding(client_id="rv", account_id="bob", standing_id="auto2")),
        s(lambda: p.sign(place_hold("h1", "alice", "bob", 700, exp(), owner_ref="proj"), "alice")),
        s(lambda: p.sign(withdrawal(p, "w1", "alice", 2 * M, "alice-bank", exp()), "alice")),
        s(
            lambda: c.RegisterKey(
                client_id="k-dave", account_id="dave", public_key=pub_b64(keys["dave"])
            )
        ),
        s(
            lambda: p.sign(
                c.RegisterKey(client_id="k-carol", account_id="carol", public_key=pub_b64(rotated)),
                "carol",
            )
        ),
        s(lambda: p.sign(transfer("big", "alice", "bob", 15 * M), "alice")),  # pending
        s(lambda: c.ApproveRequest(client_id="ok-big", request_id="big"), CHECKER),  # tagged
        s(lambda: c.Reverse(client_id="rev-d2", movement_id="d2", reason="dup"), OPERATOR),
        s(lambda: c.RejectRequest(client_id="no-rev", request_id="rev-d2", reason="no"), CHECKER),
        s(lambda: c.SetGate(client_id="gate", gate="RESTRICTED", reason="audit"), OPERATOR),
        s(lambda: c.ApproveRequest(client_id="ok-gate", request_id="gate"), CHECKER),
        s(
            lambda: c.SetPolicy(
                client_id="pol",
                policy=msgspec.structs.replace(
                    DEFAULT_POLICY, version=1, auth_max_failures=3, blocklist=frozenset({"carol"})
                ),
            ),
            OPERATOR,
        ),
        s(lambda: c.ApproveRequest(client_id="ok-pol", request_id="pol"), CHECKER),
        s(
            lambda: c.ResetKey(
                client_id="reset", account_id="bob", public_key=pub_b64(new_key()), reason="lost"
            ),
            OPERATOR,
        ),  # left pending
        s(lambda: p.sign(bind_payee(p, "b3", "bob", payee_ref="bob-2", bank="6222-1"), "bob")),
        "advance",
        s(lambda: c.ExpireHolds(client_id="sweep-1"), SYSTEM),
        s(lambda: p.sign(transfer("bad3", "alice", "bob", 5), "alice", key=new_key())),
    ]
    return steps


def _after(p: CtlPlatform) -> list[Step]:
    """Instructions whose decisions depend on every table the controls read."""
    exp = p.clock.now + HOUR_MS
    return [
        (p.sign(transfer("a1", "alice", "bob", 10), "alice"), PLATFORM),  # 3 failures: locked (v1)
        (p.sign(withdrawal(p, "a2", "bob", 100, "bob-bank", exp), "bob"), PLATFORM),
        (p.sign(withdrawal(p, "a3", "bob", 100, "bob-2", exp), "bob"), PLATFORM),  # cool-off
        (standing(transfer("a4", "bob", "alice", 10, purpose="repayment"), "auto2"), PLATFORM),
        (standing(transfer("a5", "bob", "alice", 10, purpose="bid"), "auto"), PLATFORM),  # gate
        (p.sign(transfer("a6", "bob", "carol", 10, purpose="repayment"), "bob"), PLATFORM),
        (p.sign(transfer("a7", "bob", "alice", 10, purpose="repayment"), "bob"), PLATFORM),
        (p.sign(transfer("t1", "alice", "bob", 1_000), "alice"), PLATFORM),  # id reused
        (c.ApproveRequest(client_id="ok-reset", request_id="reset"), CHECKER),
        (c.ApproveRequest(client_id="ok-rev", request_id="rev-d2"), CHECKER),
        (c.CaptureHold(client_id="a8", hold_id="h1", amount_minor=1, owner_ref="proj"), PLATFORM),
        (c.SettleWithdrawal(client_id="a9", withdrawal_id="w1"), PLATFORM),
        (c.SetGate(client_id="a10", gate="RESTRICTED", reason="again"), OPERATOR),
    ]


def _run(service: LedgerService, p: CtlPlatform, steps: list[Callable[[], Step] | str]) -> None:
    for step in steps:
        if step == "advance":
            p.clock.advance(10 * MINUTE_MS)
            continue
        assert callable(step)
        cmd, actor = step()
        [out] = service.execute(p.id, [cmd], actor)
        assert out.status in ("accepted", "pending", "refused"), out


def _decide(service: LedgerService, p: CtlPlatform) -> list[tuple[str, str, str, str]]:
    outs = []
    for cmd, actor in _after(p):
        [out] = service.execute(p.id, [cmd], actor)
        outs.append((out.client_id, out.status, out.kind, out.code))
    return outs


def test_restart_gives_identical_state_and_decisions(config: Config) -> None:
    clock = FakeClock()
    service = open_service(config, clock)
    try:
        p1 = make_ctl_platform(service, clock, "p1")
        keys: dict[str, Ed25519PrivateKey] = {"dave": new_key(), "rotated": new_key()}
        _run(service, p1, _workload(p1, keys))
        p1.customers["carol"].key = keys["rotated"]
        before = controls_snapshot(service, "p1")
        kinds = {k for (_, k, *_rest) in before["done"].values()}
    finally:
        service.close()
    assert {
        "policy_set",
        "gate_set",
        "approval_requested",
        "approval_rejected",
        "key_registered",
        "payee_bound",
        "standing_granted",
        "standing_revoked",
        "transferred",
    } <= kinds
    assert before["auth_failures"]["alice"] and before["gate"] == "RESTRICTED"
    assert before["policy"]["version"] == 1 and before["day_lvt"]

    reopened = open_service(config, clock)
    try:
        after = controls_snapshot(reopened, "p1")
        assert after == before
        decided_after_restart = _decide(reopened, p1)
        final_restarted = controls_snapshot(reopened, "p1")
    finally:
        reopened.close()

    # the same workload on a platform that never restarts, at the same times (its customers
    # have their own keys; the decisions must not depend on which keys they are)
    clock2 = FakeClock(START_MS)
    live_service = open_service(config, clock2)
    try:
        p2 = make_ctl_platform(live_service, clock2, "p2")
        keys2: dict[str, Ed25519PrivateKey] = {"dave": new_key(), "rotated": new_key()}
        _run(live_service, p2, _workload(p2, keys2))
        p2.customers["carol"].key = keys2["rotated"]
        live_before = controls_snapshot(live_service, "p2")
        decided_live = _decide(live_service, p2)
    finally:
        live_service.close()

    assert decided_after_restart == decided_live
    assert {o[3] for o in decided_live} >= {
        "AUTHORISATION_LOCKED",
        "PAYOUT_COOLOFF",
        "PLATFORM_RESTRICTED",
        "BLOCKED",
        "ID_REUSED",
        "GATE_UNCHANGED",
    }

    # everything but keys, blinds and sealed data (per customer) is the same on both platforms
    def comparable(snap: dict[str, Any]) -> dict[str, Any]:
        out = dict(snap)
        out["accounts"] = {
            k: {
                f: v
                for f, v in a.items()
                if f not in ("public_key", "holder_blind", "payee_bank", "tokens")
            }
            for k, a in snap["accounts"].items()
        }
        out["requests"] = {
            k: (r[0], r[2], r[3], r[4], r[5], r[6]) for k, r in snap["requests"].items()
        }
        out["done"] = {k: v for k, v in snap["done"].items() if not k.startswith("create:")}
        out["nonces"] = sorted(acc for acc, _n in snap["nonces"])
        return out

    assert comparable(before) == comparable(live_before)
    assert final_restarted["next_seq"] == before["next_seq"] + len(decided_live) - sum(
        1 for o in decided_live if o[1] == "replayed"
    )

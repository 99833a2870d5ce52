"""Maker-checker: manual operations and large movements become pending requests that a
different person with the checker role approves (executing them after every control ran again
on the state of that moment) or rejects; requests expire; policy changes are requests too."""

from __future__ import annotations

import msgspec
import pytest
from ctl_helpers import (
    CHECKER,
    CHECKER2,
    OPERATOR,
    OPERATOR2,
    PLATFORM,
    CtlPlatform,
    MakePlatform,
    accepted,
    approve,
    assert_refused,
    ex,
    fund,
    pending,
    posted,
    transfer,
)
from helpers import last_position, log_records, record_at, snapshot

from controls.policy import DEFAULT_POLICY, HOUR_MS
from ledger import commands as c
from ledger.service import LedgerService

MC = "maker_checker"
BIG = DEFAULT_POLICY.approval_above_minor  # 100,000.00 CNY


@pytest.fixture
def funded(service: LedgerService, p: CtlPlatform) -> CtlPlatform:
    accepted(
        service,
        p,
        c.Deposit(
            client_id="dep1",
            mirror_account_id=p.omni,
            account_id="alice",
            amount_minor=30_000_000,
            currency="CNY",
        ),
    )
    fund(service, p, "bob", 1_000)
    return p


def _reverse(cid: str, movement: str = "dep1") -> c.Reverse:
    return c.Reverse(client_id=cid, movement_id=movement, reason="booked twice")


def test_request_then_approval_by_a_checker_executes(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    before = snapshot(service, p.id)
    req = pending(service, p, _reverse("rev1"))
    rec = record_at(service, p.id, req.seq)
    assert rec["actor"] == OPERATOR and rec["pv"] == 0
    assert rec["request"]["id"] == "rev1" and rec["request"]["op"] == "reverse"
    assert rec["request"]["expires"] == rec["ts"] + DEFAULT_POLICY.approval_ttl_ms
    assert rec["request"]["why"]
    assert snapshot(service, p.id)["accounts"]["alice"] == before["accounts"]["alice"]
    assert ex(service, p, _reverse("rev1"), OPERATOR).status == "pending"  # retry: same answer

    out = approve(service, p, "rev1")
    assert (out.status, out.kind) == ("accepted", "reversed"), out
    rec = record_at(service, p.id, out.seq)
    assert rec["executes"] == "rev1" and rec["actor"] == CHECKER
    assert rec["cmd"]["op"] == "approve_request" and rec["reverses"] == "dep1"
    assert posted(service, p, "alice") == 0
    with service.reading(p.id) as st:
        assert st.requests["rev1"].status == "approved"
    # the maker's retry now answers with what executed it
    retry = ex(service, p, _reverse("rev1"), OPERATOR)
    assert (retry.status, retry.seq) == ("replayed", out.seq)
    again = c.ApproveRequest(client_id="ok2:rev1", request_id="rev1")
    assert_refused(service, p, again, "APPROVAL_NOT_PENDING", MC, actor=CHECKER2)


def test_rejected_request_never_executes(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    pending(service, p, _reverse("rev2"))
    out = accepted(
        service, p, c.RejectRequest(client_id="no:rev2", request_id="rev2", reason="no"), CHECKER
    )
    assert out.kind == "approval_rejected"
    assert record_at(service, p.id, out.seq)["rejects"] == "rev2"
    assert_refused(
        service,
        p,
        c.ApproveRequest(client_id="ok:rev2", request_id="rev2"),
        "APPROVAL_NOT_PENDING",
        MC,
        actor=CHECKER2,
    )
    retry = ex(service, p, _reverse("rev2"), OPERATOR)
    assert (retry.status, retry.code) == ("refused", "REQUEST_REJECTED")
    assert posted(service, p, "alice") == 30_000_000


@pytest.mark.parametrize(
    ("actor", "request_id", "code", "control"),
    [
        (CHECKER, "nope", "APPROVAL_NOT_FOUND", MC),
        (OPERATOR, "rev3", "CHECKER_ROLE_REQUIRED", "roles"),  # the maker itself
        (OPERATOR2, "rev3", "CHECKER_ROLE_REQUIRED", "roles"),  # another operator, no checker
        (PLATFORM, "rev3", "CHECKER_ROLE_REQUIRED", "roles"),
    ],
    ids=["unknown", "maker", "other-operator", "platform"],
)
def test_approval_refusals(
    service: LedgerService,
    funded: CtlPlatform,
    actor: str,
    request_id: str,
    code: str,
    control: str,
) -> None:
    p = funded
    pending(service, p, _reverse("rev3"))
    cmd = c.ApproveRequest(client_id="ok:x", request_id=request_id)
    assert_refused(service, p, cmd, code, control, actor=actor)
    with service.reading(p.id) as st:
        assert st.requests["rev3"].status == "pending"


def test_same_person_cannot_check_their_own_request(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    pending(service, p, _reverse("rev4"), actor="operator:alice")
    cmd = c.ApproveRequest(client_id="ok:rev4", request_id="rev4")
    assert_refused(service, p, cmd, "SELF_APPROVAL", MC, actor="checker:alice")


def test_expired_request(service: LedgerService, funded: CtlPlatform) -> None:
    p = funded
    pending(service, p, _reverse("rev5"))
    p.clock.advance(DEFAULT_POLICY.approval_ttl_ms + 1)
    assert_refused(
        service,
        p,
        c.ApproveRequest(client_id="ok:rev5", request_id="rev5"),
        "APPROVAL_EXPIRED",
        MC,
        actor=CHECKER,
    )
    # an expired request can still be closed by a rejection
    accepted(
        service, p, c.RejectRequest(client_id="no:rev5", request_id="rev5", reason="old"), CHECKER
    )
    assert posted(service, p, "alice") == 30_000_000


def test_large_platform_transfer_needs_a_checker(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    small = p.sign(transfer("t-small", "alice", "bob", BIG - 1), "alice")
    accepted(service, p, small)
    big = p.sign(transfer("t-big", "alice", "bob", BIG), "alice")
    pending(service, p, big, actor=PLATFORM)
    assert posted(service, p, "bob") == 1_000 + BIG - 1
    # the customer's consent was checked and its nonce spent when the request was made
    assert_refused(
        service,
        p,
        msgspec.structs.replace(big, client_id="t-big2"),
        "REPLAYED",
        "customer_authorisation",
    )
    out = approve(service, p, "t-big")
    assert out.kind == "transferred", out
    assert posted(service, p, "bob") == 1_000 + 2 * BIG - 1
    # a large movement cannot hide in a linked batch
    big2 = p.sign(transfer("t-big3", "alice", "bob", BIG), "alice")
    outs = service.execute(
        p.id, [p.sign(transfer("t-s2", "alice", "bob", 1), "alice"), big2], PLATFORM, linked=True
    )
    assert [o.code for o in outs] == ["LINKED_FAILED", "APPROVAL_REQUIRED"], outs


def test_approval_reruns_the_controls_on_the_current_state(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    pending(service, p, p.sign(transfer("t-big", "alice", "bob", BIG), "alice"), actor=PLATFORM)
    accepted(service, p, c.FreezeAccount(client_id="frz", account_id="alice", reason="court"))
    rec = assert_refused(
        service,
        p,
        c.ApproveRequest(client_id="ok:t-big", request_id="t-big"),
        "ACCOUNT_FROZEN",
        "account_state",
        actor=CHECKER,
    )
    assert rec["cmd"]["request_id"] == "t-big"
    with service.reading(p.id) as st:
        assert st.requests["t-big"].status == "pending"
    # lifting the freeze is itself a manual operation
    pending(service, p, c.UnfreezeAccount(client_id="unfrz", account_id="alice", reason="lifted"))
    assert approve(service, p, "unfrz").kind == "account_unfrozen"
    out = ex(service, p, c.ApproveRequest(client_id="ok2:t-big", request_id="t-big"), CHECKER2)
    assert out.kind == "transferred", out


def test_policy_change_by_request_and_approval_bumps_the_version(
    service: LedgerService, funded: CtlPlatform
) -> None:
    p = funded
    v1 = msgspec.structs.replace(DEFAULT_POLICY, version=1, blocklist=frozenset({"bob"}))
    assert_refused(
        service,
        p,
        c.SetPolicy(client_id="pol-bad", policy=msgspec.structs.replace(v1, version=2)),
        "POLICY_VERSION_CONFLICT",
        "integrity",
        actor=OPERATOR,
    )
    assert_refused(
        service,
        p,
        c.SetPolicy(client_id="pol-inv", policy=msgspec.structs.replace(v1, outflow_cap_bp=10_001)),
        "POLICY_INVALID",
        "integrity",
        actor=OPERATOR,
    )
    # a request made under version 0 is approved under version 1: the new blocklist applies
    pending(service, p, p.sign(transfer("t-big", "alice", "bob", BIG), "alice"), actor=PLATFORM)
    req = pending(service, p, c.SetPolicy(client_id="pol-1", policy=v1))
    assert record_at(service, p.id, req.seq)["pv"] == 0
    out = approve(service, p, "pol-1")
    assert out.kind == "policy_set", out
    rec = record_at(service, p.id, out.seq)
    assert rec["pv"] == 0 and rec["executes"] == "pol-1" and rec["policy"]["version"] == 1
    with service.reading(p.id) as st:
        assert st.policy == v1
    assert_refused(
        service,
        p,
        c.ApproveRequest(client_id="ok:t-big", request_id="t-big"),
        "BLOCKED",
        "screening",
        actor=CHECKER,
        pv=1,
    )
    accepted(service, p, p.sign(transfer("t1", "alice", "carol", 5), "alice"))
    assert log_records(service, p.id)[last_position(service, p.id)]["pv"] == 1


def test_approval_ops_is_a_policy_parameter_but_governance_always_needs_a_checker(
    service: LedgerService, make: MakePlatform
) -> None:
    p = make(approval_ops=frozenset())
    accepted(
        service,
        p,
        c.Deposit(
            client_id="dep1",
            mirror_account_id=p.omni,
            account_id="alice",
            amount_minor=500,
            currency="CNY",
        ),
    )
    out = accepted(service, p, _reverse("rev"), OPERATOR)  # reversals no longer need a checker
    assert out.kind == "reversed"
    # but no policy can remove the checker from policy, gate and key changes
    pending(
        service,
        p,
        c.SetPolicy(
            client_id="pol-1",
            policy=msgspec.structs.replace(DEFAULT_POLICY, version=1, approval_ops=frozenset()),
        ),
    )
    pending(service, p, c.SetGate(client_id="gate-1", gate="RESTRICTED", reason="audit"))


def test_approval_is_recorded_with_the_request_time_to_live(
    service: LedgerService, make: MakePlatform
) -> None:
    p = make(approval_ttl_ms=HOUR_MS)
    fund(service, p, "alice", 500)
    req = pending(service, p, c.SetGate(client_id="gate-1", gate="RESTRICTED", reason="audit"))
    assert record_at(service, p.id, req.seq)["request"]["expires"] == p.clock.now + HOUR_MS
    p.clock.advance(HOUR_MS + 1)
    assert_refused(
        service,
        p,
        c.ApproveRequest(client_id="ok:gate-1", request_id="gate-1"),
        "APPROVAL_EXPIRED",
        MC,
        actor=CHECKER,
    )

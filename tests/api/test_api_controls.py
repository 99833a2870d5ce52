"""The controls through the API, end to end on a real mTLS server, under the default (strict)
policy: customer signatures, maker-checker with a checker identity, policy and gate changes.

Platform p1 here is created without a policy, so it runs the built-in default: every customer
debit needs the customer's Ed25519 signature, payouts go only to the bound account, manual
operations need a checker, and limits apply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
from api_helpers import CCY, Connect
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controls.policy import DEFAULT_POLICY, Limit, decode_policy, encode_policy
from ledger.api import certs
from ledger.api.client import (
    CustodyClient,
    CustodyError,
    customer_public_key,
    instruction_message,
    sign_instruction,
)
from ledger.api.pb import approval_pb, movement_pb
from ledger.service import LedgerService

SC = grpc.StatusCode
P = "p1"


@dataclass
class Strict:
    service: LedgerService
    operator: CustodyClient  # operator:dev, the maker
    checker: CustodyClient  # checker:second, another person
    same_person: CustodyClient  # checker:dev, the maker's own checker identity
    p1: CustodyClient
    p2: CustodyClient
    auditor: CustodyClient
    keys: dict[str, Ed25519PrivateKey]

    def balance(self, account_id: str) -> int:
        posted: int = self.p1.get_balance(account_id).posted_minor
        return posted

    def signed_transfer(
        self, client_id: str, src: str, dst: str, amount: int, purpose: str = "transfer"
    ) -> Any:
        return self.p1.transfer(
            client_id, src, dst, amount, CCY, purpose, sign_with=self.keys[src], platform_id=P
        )


@pytest.fixture
def strict(api_service: LedgerService, connect: Connect, pki: Path) -> Strict:
    if not (pki / "checker-second.pem").exists():
        certs.issue_client(pki, "checker", "second")
    operator = connect("operator-dev")
    operator.create_platform(P, "Strict platform")  # no policy: the strict default
    operator.create_platform("p2", "Other platform")
    p1 = connect("platform-p1")
    keys = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob")}
    for client_id, account_id, kind in [
        ("o-omni", "omni", "omnibus"),
        ("o-pbank", "pbank", "platform_bank"),
        ("o-own", "own", "own_funds"),
        ("o-fee", "fee", "fee_income"),
        ("o-susp", "susp", "suspense"),
    ]:
        p1.open_account(client_id, account_id, kind=kind, currency=CCY)
    for name, role, holder in [
        ("alice", "lender", "Alice Li"),
        ("bob", "borrower", "Bob Wang"),
        ("carol", "other", "Carol Chen"),
    ]:
        key = keys.get(name)
        p1.open_account(
            f"o-{name}",
            name,
            kind="customer",
            currency=CCY,
            role=role,
            holder_name=holder,
            public_key=customer_public_key(key) if key else "",
        )
    p1.deposit("d-alice", "omni", "alice", 100_000, CCY, bank_ref="seed")
    p1.deposit("d-own", "pbank", "own", 50_000, CCY, bank_ref="seed-own")
    return Strict(
        api_service,
        operator,
        connect("checker-second"),
        connect("checker-dev"),
        p1,
        connect("platform-p2"),
        connect("auditor-dev"),
        keys,
    )


def refused(call: Callable[[], Any], code: SC, reason: str) -> CustodyError:
    """The call fails with this status and ErrorInfo reason (domain custody.v1)."""
    with pytest.raises(CustodyError) as err:
        call()
    error = err.value
    assert (error.code, error.reason, error.domain) == (code, reason, "custody.v1"), error
    return error


def log_record(s: Strict, position: int) -> dict[str, Any]:
    [rec] = list(s.p1.subscribe_log(start_position=position))[:1]
    decoded: dict[str, Any] = msgspec.json.decode(rec.record)
    return decoded


# -- customer consent ---------------------------------------------------------------------------


def test_signed_transfer_accepted_unsigned_refused(strict: Strict) -> None:
    s = strict
    receipt = s.signed_transfer("t-1", "alice", "bob", 1_000)
    assert receipt.kind == "transferred" and receipt.status == "accepted"
    assert (s.balance("alice"), s.balance("bob")) == (99_000, 1_000)

    error = refused(
        lambda: s.p1.transfer("t-2", "alice", "bob", 1_000, CCY),
        SC.PERMISSION_DENIED,
        "AUTHORISATION_REQUIRED",
    )
    assert error.metadata["control"] == "customer_authorisation"
    assert error.metadata["client_id"] == "t-2"
    refusal = log_record(s, int(error.metadata["position"]))
    assert (refusal["kind"], refusal["code"]) == ("command_refused", "AUTHORISATION_REQUIRED")
    assert refusal["actor"] == "platform:p1"
    assert (s.balance("alice"), s.balance("bob")) == (99_000, 1_000)


def test_bad_signature_and_replayed_nonce_are_refused(strict: Strict) -> None:
    s = strict
    forged = s.p1.transfer  # bob's key signing a debit of alice's account
    refused(
        lambda: forged("t-f", "alice", "bob", 500, CCY, sign_with=s.keys["bob"], platform_id=P),
        SC.PERMISSION_DENIED,
        "AUTHORISATION_INVALID",
    )
    # one signed instruction, sent twice under two client ids: the nonce is spent the first time
    message = instruction_message(
        "transfer",
        client_id="t-a",
        from_account_id="alice",
        to_account_id="bob",
        amount_minor=700,
        currency=CCY,
    )
    signed = sign_instruction(P, message, s.keys["alice"])
    request = movement_pb.TransferRequest(instruction=signed)
    first = s.p1.movements.Transfer(request, timeout=5, metadata=s.p1.metadata)
    assert first.receipt.kind == "transferred"
    signed.client_id = "t-b"  # the client id is not signed; the nonce makes each consent unique
    refused(
        lambda: s.p1.transfer(
            "t-b", "alice", "bob", 700, CCY, authorisation=signed.authorisation, platform_id=P
        ),
        SC.ALREADY_EXISTS,
        "REPLAYED",
    )
    # a signature over another amount does not cover this one
    signed = sign_instruction(P, message, s.keys["alice"])  # a fresh nonce, for 700
    refused(
        lambda: s.p1.transfer(
            "t-c", "alice", "bob", 701, CCY, authorisation=signed.authorisation, platform_id=P
        ),
        SC.PERMISSION_DENIED,
        "AUTHORISATION_INVALID",
    )
    assert s.balance("bob") == 700


def test_customer_keys_payees_and_standing_authorisations(strict: Strict) -> None:
    s = strict
    carol_key = Ed25519PrivateKey.generate()
    first = s.p1.register_customer_key("rk-1", "carol", customer_public_key(carol_key))
    assert first.kind == "key_registered"  # the first key: on the platform's word (onboarding)
    rotated = Ed25519PrivateKey.generate()
    refused(
        lambda: s.p1.register_customer_key("rk-2", "carol", customer_public_key(rotated)),
        SC.PERMISSION_DENIED,
        "AUTHORISATION_REQUIRED",
    )
    assert (
        s.p1.register_customer_key(
            "rk-3", "carol", customer_public_key(rotated), sign_with=carol_key, platform_id=P
        ).kind
        == "key_registered"
    )
    # operators do not relay customers' instructions; platforms do not reset keys
    refused(
        lambda: s.operator.register_customer_key("rk-4", "carol", "x", platform_id=P),
        SC.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    refused(
        lambda: s.p1.reset_customer_key("rs-1", "carol", customer_public_key(carol_key), "lost"),
        SC.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )

    # payout binding: signed, same name as the holder
    refused(
        lambda: s.p1.bind_payee(
            "bp-0",
            "alice",
            "main",
            "6222000011112222",
            "Mallory",
            sign_with=s.keys["alice"],
            platform_id=P,
        ),
        SC.FAILED_PRECONDITION,
        "PAYEE_NAME_MISMATCH",
    )
    bound = s.p1.bind_payee(
        "bp-1",
        "alice",
        "main",
        "6222000011112222",
        "Alice Li",
        sign_with=s.keys["alice"],
        platform_id=P,
    )
    assert bound.kind == "payee_bound"
    refused(
        lambda: s.p1.request_withdrawal(
            "w-0",
            "alice",
            "omni",
            100,
            CCY,
            "elsewhere",
            int(time.time() * 1000) + 60_000,
            sign_with=s.keys["alice"],
            platform_id=P,
        ),
        SC.FAILED_PRECONDITION,
        "PAYEE_NOT_BOUND",
    )
    paid = s.p1.request_withdrawal(
        "w-1",
        "alice",
        "omni",
        100,
        CCY,
        "main",
        int(time.time() * 1000) + 60_000,
        sign_with=s.keys["alice"],
        platform_id=P,
    )
    assert paid.kind == "withdrawal_requested"

    # a standing authorisation covers bids within its cap, until revoked
    until = int(time.time() * 1000) + 86_400_000
    granted = s.p1.grant_standing_authorisation(
        "gs-1", "alice", "auto-bid", "bid", 500, until, sign_with=s.keys["alice"], platform_id=P
    )
    assert granted.kind == "standing_granted"
    standing = {"standing_id": "auto-bid"}
    bid = s.p1.transfer("b-1", "alice", "bob", 300, CCY, "bid", authorisation=standing)
    assert bid.kind == "transferred"
    refused(
        lambda: s.p1.transfer("b-2", "alice", "bob", 600, CCY, "bid", authorisation=standing),
        SC.PERMISSION_DENIED,
        "AUTHORISATION_INVALID",
    )
    revoked = s.p1.revoke_standing_authorisation("rv-1", "alice", "auto-bid")
    assert revoked.kind == "standing_revoked"
    refused(
        lambda: s.p1.transfer("b-3", "alice", "bob", 100, CCY, "bid", authorisation=standing),
        SC.NOT_FOUND,
        "STANDING_NOT_FOUND",
    )
    assert s.balance("bob") == 300

    # a lost key: the operator asks, a checker approves
    new_key = Ed25519PrivateKey.generate()
    reset = s.operator.reset_customer_key(
        "rs-2", "alice", customer_public_key(new_key), "lost phone", platform_id=P
    )
    assert reset.pending and reset.request_id == "rs-2"
    assert s.checker.approve_request("ok:rs-2", "rs-2", platform_id=P).kind == "key_registered"
    s.keys["alice"] = new_key
    assert s.signed_transfer("t-new-key", "alice", "bob", 1).kind == "transferred"


# -- maker-checker ------------------------------------------------------------------------------


def test_manual_reversal_is_pending_until_a_checker_approves(strict: Strict) -> None:
    s = strict
    s.signed_transfer("t-1", "alice", "bob", 2_000)
    pending = s.operator.reverse("rev-1", "t-1", "paid twice", platform_id=P)
    # a success, like HTTP 202: recorded as a request, nothing moved
    assert pending.pending and not pending.replayed
    assert (pending.request_id, pending.kind) == ("rev-1", "approval_requested")
    assert (s.balance("alice"), s.balance("bob")) == (98_000, 2_000)
    request = s.auditor.get_request("rev-1", platform_id=P)
    assert request.status == approval_pb.APPROVAL_STATUS_PENDING
    assert (request.operation, request.maker, request.position) == (
        "reverse",
        "operator:dev",
        pending.position,
    )
    assert msgspec.json.decode(request.instruction_json)["movement_id"] == "t-1"

    # the maker, a platform and an auditor cannot approve; the API refuses before the ledger
    for client in (s.operator, s.p1, s.auditor):
        refused(
            lambda c=client: c.approve_request("ok:rev-1", "rev-1", platform_id=P),  # type: ignore[misc]
            SC.PERMISSION_DENIED,
            "CHECKER_ROLE_REQUIRED",
        )
    assert s.p1.get_request("rev-1").status == approval_pb.APPROVAL_STATUS_PENDING

    approved = s.checker.approve_request("ok:rev-1", "rev-1", platform_id=P)
    assert (approved.kind, approved.status) == ("reversed", "accepted")
    assert (s.balance("alice"), s.balance("bob")) == (100_000, 0)
    executed = log_record(s, approved.position)
    assert (executed["executes"], executed["actor"]) == ("rev-1", "checker:second")
    request = s.auditor.get_request("rev-1", platform_id=P)
    assert request.status == approval_pb.APPROVAL_STATUS_APPROVED
    assert request.approval_client_id == "ok:rev-1"

    # the maker's retry learns what executed it; a second approval finds nothing pending
    again = s.operator.reverse("rev-1", "t-1", "paid twice", platform_id=P)
    assert (again.replayed, again.position, again.kind) == (True, approved.position, "reversed")
    refused(
        lambda: s.checker.approve_request("ok2:rev-1", "rev-1", platform_id=P),
        SC.FAILED_PRECONDITION,
        "APPROVAL_NOT_PENDING",
    )
    refused(
        lambda: s.checker.approve_request("ok:none", "never-made", platform_id=P),
        SC.NOT_FOUND,
        "APPROVAL_NOT_FOUND",
    )


def test_rejected_request_never_executes(strict: Strict) -> None:
    s = strict
    s.signed_transfer("t-1", "alice", "bob", 2_000)
    assert s.operator.reverse("rev-1", "t-1", "typo", platform_id=P).pending
    rejected = s.checker.reject_request("no:rev-1", "rev-1", "not a mistake", platform_id=P)
    assert rejected.kind == "approval_rejected"
    assert s.checker.get_request("rev-1", platform_id=P).status == (
        approval_pb.APPROVAL_STATUS_REJECTED
    )
    refused(
        lambda: s.operator.reverse("rev-1", "t-1", "typo", platform_id=P),
        SC.FAILED_PRECONDITION,
        "REQUEST_REJECTED",
    )
    assert s.balance("bob") == 2_000


def test_the_maker_cannot_approve_with_their_own_checker_identity(strict: Strict) -> None:
    """operator:dev and checker:dev are one person: maker-checker compares names, not roles."""
    s = strict
    s.signed_transfer("t-1", "alice", "bob", 2_000)
    assert s.operator.reverse("rev-1", "t-1", "x", platform_id=P).pending
    refused(
        lambda: s.same_person.approve_request("ok:rev-1", "rev-1", platform_id=P),
        SC.PERMISSION_DENIED,
        "SELF_APPROVAL",
    )
    assert s.auditor.get_request("rev-1", platform_id=P).status == (
        approval_pb.APPROVAL_STATUS_PENDING
    )
    assert s.balance("bob") == 2_000


def test_list_requests_filters_and_paginates(strict: Strict) -> None:
    s = strict
    for i in range(5):
        s.signed_transfer(f"t-{i}", "alice", "bob", 10 + i)
        assert s.operator.reverse(f"rev-{i}", f"t-{i}", "batch fix", platform_id=P).pending
    s.checker.approve_request("ok:rev-1", "rev-1", platform_id=P)
    s.checker.reject_request("no:rev-3", "rev-3", "keep", platform_id=P)
    # a large movement by the platform waits for a checker too (policy approval_above_minor)
    s.p1.deposit("d-big", "omni", "alice", 20_000_000, CCY, bank_ref="big")
    big = s.signed_transfer("t-big", "alice", "bob", 10_000_000)
    assert big.pending and big.request_id == "t-big"
    assert s.p1.get_request("t-big").operation == "transfer"

    first = s.auditor.list_requests("pending", page_size=2, platform_id=P)
    assert [r.request_id for r in first.items] == ["rev-0", "rev-2"] and first.next_page_token
    rest = s.auditor.list_requests("pending", 2, first.next_page_token, platform_id=P)
    assert [r.request_id for r in rest.items] == ["rev-4", "t-big"]
    assert rest.next_page_token == ""
    every = [r.request_id for r in s.auditor.iter_requests(page_size=1, platform_id=P)]
    assert every == ["rev-0", "rev-1", "rev-2", "rev-3", "rev-4", "t-big"]
    assert [r.request_id for r in s.p1.iter_requests("approved")] == ["rev-1"]
    assert [r.request_id for r in s.p1.iter_requests("rejected")] == ["rev-3"]
    assert s.p2.list_requests().items == []  # another platform sees none of them
    refused(lambda: s.p2.get_request("rev-0"), SC.NOT_FOUND, "APPROVAL_NOT_FOUND")
    refused(
        lambda: s.p1.list_requests(page_token=first.next_page_token, platform_id="p2"),
        SC.PERMISSION_DENIED,
        "PLATFORM_MISMATCH",
    )
    refused(
        lambda: s.p2.list_requests(page_token=first.next_page_token),
        SC.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


# -- policy and gate ----------------------------------------------------------------------------


def test_policy_change_needs_a_checker_and_shows_in_get_policy(strict: Strict) -> None:
    s = strict
    current = s.p1.get_policy()
    assert (current.version, current.gate) == (0, "NORMAL")
    assert current.policy_json == encode_policy(DEFAULT_POLICY)

    assert s.signed_transfer("t-1", "alice", "bob", 6_000).kind == "transferred"
    proposed = msgspec.structs.replace(
        current.policy,
        version=1,
        limits={**current.policy.limits, "transfer": Limit(per_txn_max_minor=5_000)},
    )
    refused(
        lambda: s.p1.propose_policy("pol-x", proposed),
        SC.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    pending = s.operator.propose_policy("pol-1", proposed, platform_id=P)
    assert pending.pending and pending.request_id == "pol-1"
    assert s.auditor.get_policy(platform_id=P).version == 0  # nothing changes before approval
    assert s.auditor.get_request("pol-1", platform_id=P).operation == "set_policy"
    approved = s.checker.approve_request("ok:pol-1", "pol-1", platform_id=P)
    assert approved.kind == "policy_set"

    now = s.auditor.get_policy(platform_id=P)
    assert now.version == 1 and now.policy == proposed
    assert decode_policy(now.policy_json) == proposed
    assert now.as_of_position >= approved.position
    error = refused(
        lambda: s.signed_transfer("t-2", "alice", "bob", 6_000),
        SC.RESOURCE_EXHAUSTED,
        "LIMIT_EXCEEDED",
    )
    assert error.metadata["control"] == "limits"
    assert s.signed_transfer("t-3", "alice", "bob", 5_000).kind == "transferred"
    # the version must be the next one; the document must be a usable policy
    refused(
        lambda: s.operator.propose_policy("pol-2", proposed, platform_id=P),
        SC.ABORTED,
        "POLICY_VERSION_CONFLICT",
    )
    bad = s.operator.propose_policy
    error = refused(
        lambda: bad("pol-3", b'{"version": 2, "colour": "red"}', platform_id=P),
        SC.INVALID_ARGUMENT,
        "POLICY_INVALID",
    )
    assert list(error.fields) == ["instruction.policy_json"]
    unusable = msgspec.structs.replace(proposed, version=2, auth_max_failures=0)
    error = refused(
        lambda: bad("pol-4", unusable, platform_id=P), SC.INVALID_ARGUMENT, "POLICY_INVALID"
    )
    assert list(error.fields) == ["instruction.policy_json"]


def test_gate_change_refuses_new_business(strict: Strict) -> None:
    s = strict
    s.signed_transfer("t-loan", "alice", "bob", 5_000, "disbursement")
    pending = s.operator.set_platform_gate("g-1", "restricted", "regulator's order", platform_id=P)
    assert pending.pending
    assert s.p1.get_policy().gate == "NORMAL"
    assert s.checker.approve_request("ok:g-1", "g-1", platform_id=P).kind == "gate_set"
    assert s.p1.get_policy().gate == "RESTRICTED"

    refused(
        lambda: s.p1.open_account("o-dave", "dave", kind="customer", currency=CCY, role="other"),
        SC.FAILED_PRECONDITION,
        "PLATFORM_RESTRICTED",
    )
    refused(
        lambda: s.signed_transfer("t-bid", "alice", "bob", 100, "bid"),
        SC.FAILED_PRECONDITION,
        "PLATFORM_RESTRICTED",
    )
    # borrowers still repay
    assert s.signed_transfer("t-repay", "bob", "alice", 1_000, "repayment").kind == "transferred"
    refused(
        lambda: s.operator.set_platform_gate("g-2", "restricted", "again", platform_id=P),
        SC.FAILED_PRECONDITION,
        "GATE_UNCHANGED",
    )
    refused(
        lambda: s.p1.set_platform_gate("g-3", "normal", "we are fine"),
        SC.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


def test_create_platform_with_a_policy_document(strict: Strict) -> None:
    s = strict
    custom = msgspec.structs.replace(DEFAULT_POLICY, approval_above_minor=0)
    assert s.operator.create_platform("p3", "Custom", policy=custom).kind == "platform_created"
    assert s.operator.get_policy(platform_id="p3").policy == custom
    error = refused(
        lambda: s.operator.create_platform("p4", "Broken", policy=b"[1, 2]"),
        SC.INVALID_ARGUMENT,
        "POLICY_INVALID",
    )
    assert list(error.fields) == ["policy_json"]
    refused(
        lambda: s.operator.create_platform(
            "p5", "Late", policy=msgspec.structs.replace(DEFAULT_POLICY, version=3)
        ),
        SC.INVALID_ARGUMENT,
        "POLICY_INVALID",
    )
    assert "p4" not in s.service.platform_ids() and "p5" not in s.service.platform_ids()
    # a refused creation leaves nothing behind: the corrected retry creates the platform
    assert s.operator.create_platform("p5", "Late").kind == "platform_created"

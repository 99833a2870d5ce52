"""Mappings that need no server: every reason code to a gRPC status, and the customer's signed
payload as the client computes it against the bytes the server verifies."""

from __future__ import annotations

from typing import Any

import grpc
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.rpc import error_details_pb2, status_pb2

from controls.codes import INPUT_CODES, Code
from controls.customer_authorisation import payload, signature_valid
from ledger.api import errors, translate
from ledger.api.client import (
    authorisation_payload,
    customer_public_key,
    instruction_message,
    sign_instruction,
)
from ledger.api.pb import customer_pb, hold_pb, movement_pb
from ledger.writer import CommitFailed, CommitOutcomeUnknown, Outcome

SC = grpc.StatusCode

# -- reason codes -> gRPC status ------------------------------------------------------------------


def test_every_code_has_an_explicit_status() -> None:
    missing = set(Code) - set(errors.STATUS_OF_CODE)
    assert not missing, f"add these codes to ledger.api.errors.STATUS_OF_CODE: {missing}"
    for code in Code:
        status = errors.status_code_for(code)
        assert status not in (SC.OK, SC.UNKNOWN, SC.INTERNAL, SC.UNAVAILABLE), code
    for code in INPUT_CODES:
        assert errors.status_code_for(code) is SC.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (Code.ROLE_NOT_PERMITTED, SC.PERMISSION_DENIED),
        (Code.CHECKER_ROLE_REQUIRED, SC.PERMISSION_DENIED),
        (Code.SELF_APPROVAL, SC.PERMISSION_DENIED),
        (Code.AUTHORISATION_REQUIRED, SC.PERMISSION_DENIED),
        (Code.AUTHORISATION_INVALID, SC.PERMISSION_DENIED),
        (Code.AUTHORISATION_EXPIRED, SC.PERMISSION_DENIED),
        (Code.AUTHORISATION_LOCKED, SC.FAILED_PRECONDITION),
        (Code.PLATFORM_RESTRICTED, SC.FAILED_PRECONDITION),
        (Code.PAYOUT_COOLOFF, SC.FAILED_PRECONDITION),
        (Code.LIMIT_EXCEEDED, SC.RESOURCE_EXHAUSTED),
        (Code.REPLAYED, SC.ALREADY_EXISTS),
        (Code.BLOCKED, SC.PERMISSION_DENIED),
        (Code.POLICY_INVALID, SC.INVALID_ARGUMENT),
        (Code.POLICY_VERSION_CONFLICT, SC.ABORTED),
        (Code.APPROVAL_NOT_FOUND, SC.NOT_FOUND),
        (Code.STANDING_NOT_FOUND, SC.NOT_FOUND),
        (Code.INSUFFICIENT_FUNDS, SC.FAILED_PRECONDITION),
        (Code.ID_REUSED, SC.ALREADY_EXISTS),
    ],
)
def test_status_of_control_codes(code: Code, status: SC) -> None:
    assert errors.status_code_for(code) is status


def _details(error: errors.ApiError) -> dict[str, Any]:
    status = status_pb2.Status()
    status.ParseFromString(dict(error.to_status().trailing_metadata)["grpc-status-details-bin"])
    found: dict[str, Any] = {}
    for detail in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.PreconditionFailure,
        ):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                found[cls.__name__] = msg
    found["message"] = status.message
    return found


def test_a_commit_of_unknown_outcome_is_not_called_nothing_happened() -> None:
    unknown = errors.from_exception(CommitOutcomeUnknown("connection reset during COMMIT"))
    failed = errors.from_exception(CommitFailed("serialization failure"))
    assert unknown is not None and failed is not None
    assert unknown.code is failed.code is SC.UNAVAILABLE  # both retryable, same ids
    assert unknown.reason == failed.reason == errors.ApiReason.COMMIT_FAILED
    assert "nothing happened" in failed.message
    assert "nothing happened" not in unknown.message and "may have been stored" in unknown.message


def test_blocked_answer_never_echoes_the_ledger_message() -> None:
    outcome = Outcome(
        "t-1",
        "refused",
        7,
        "command_refused",
        code=Code.BLOCKED,
        control="screening",
        message="matched blocklist entry scr:abc",
    )
    error = errors.from_outcome(outcome, "instruction.")
    assert error.code is SC.PERMISSION_DENIED
    found = _details(error)
    assert found["message"] == errors.BLOCKED_MESSAGE
    assert found["ErrorInfo"].reason == "BLOCKED"
    assert "scr:" not in str(found)


def test_limit_exceeded_carries_a_quota_failure() -> None:
    outcome = Outcome(
        "t-1",
        "refused",
        3,
        "command_refused",
        code=Code.LIMIT_EXCEEDED,
        control="limits",
        message="transfer limit per transaction is 5000",
    )
    found = _details(errors.from_outcome(outcome))
    assert found["ErrorInfo"].reason == "LIMIT_EXCEEDED"
    assert found["QuotaFailure"].violations[0].subject == "limits"
    assert "PreconditionFailure" not in found


# -- the signed payload: client and server agree byte for byte ----------------------------------

P = "p1"
KEY = Ed25519PrivateKey.generate()
INSTRUCTIONS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "transfer": (
        movement_pb.TransferRequest,
        {
            "client_id": "t-1",
            "from_account_id": "alice",
            "to_account_id": "bob",
            "amount_minor": 1_234,
            "currency": "CNY",
            "purpose": "bid",
        },
    ),
    "place_hold": (
        hold_pb.PlaceHoldRequest,
        {
            "client_id": "h-1",
            "from_account_id": "alice",
            "to_account_id": "bob",
            "amount_minor": 50,
            "currency": "CNY",
            "reason": "bid on project 7",
            "expires_at_ms": 1_900_000_000_000,
            "owner_ref": "project-7",
        },
    ),
    "request_withdrawal": (
        hold_pb.RequestWithdrawalRequest,
        {
            "client_id": "w-1",
            "account_id": "alice",
            "mirror_account_id": "omni",
            "amount_minor": 900,
            "currency": "CNY",
            "payee_ref": "main",
            "expires_at_ms": 1_900_000_000_000,
        },
    ),
    "register_key": (
        customer_pb.RegisterCustomerKeyRequest,
        {"client_id": "k-1", "account_id": "alice", "public_key": customer_public_key(KEY)},
    ),
    "bind_payee": (
        customer_pb.BindPayeeRequest,
        {
            "client_id": "b-1",
            "account_id": "alice",
            "payee_ref": "main",
            "bank_account": "6222 0000 1111 2222",
            "holder_name": "李爱丽",
        },
    ),
    "grant_standing": (
        customer_pb.GrantStandingAuthorisationRequest,
        {
            "client_id": "g-1",
            "account_id": "alice",
            "standing_id": "auto-bid",
            "purpose": "bid",
            "per_txn_max_minor": 500,
            "valid_until_ms": 1_900_000_000_000,
        },
    ),
}


def _server_side(request_cls: type[Any], wire: bytes) -> bytes:
    """What the server does: parse, translate, and build the payload the writer verifies
    (`auth_payload(platform_id, msgspec.to_builtins(command))`)."""
    request = request_cls.FromString(wire)
    command = translate.single_command(request, type(request.instruction))
    return payload(P, msgspec.to_builtins(command))


@pytest.mark.parametrize("op", sorted(INSTRUCTIONS))
def test_client_signature_verifies_on_the_server_bytes(op: str) -> None:
    request_cls, fields = INSTRUCTIONS[op]
    signed = sign_instruction(P, instruction_message(op, **fields), KEY)
    wire = request_cls(platform_id=P, instruction=signed).SerializeToString()
    server_bytes = _server_side(request_cls, wire)
    assert authorisation_payload(P, signed) == server_bytes
    auth = signed.authorisation
    assert signature_valid(customer_public_key(KEY), server_bytes, auth.signature)
    # the client id is not signed; every other field is
    renamed = request_cls.FromString(wire)
    renamed.instruction.client_id = "another-id"
    assert _server_side(request_cls, renamed.SerializeToString()) == server_bytes
    tampered = request_cls.FromString(wire)
    field = "per_txn_max_minor" if op == "grant_standing" else "amount_minor"
    if op in ("register_key", "bind_payee"):
        tampered.instruction.account_id = "mallory"
    else:
        setattr(tampered.instruction, field, getattr(tampered.instruction, field) + 1)
    other = _server_side(request_cls, tampered.SerializeToString())
    assert not signature_valid(customer_public_key(KEY), other, auth.signature)


def test_payload_format_is_the_documented_one() -> None:
    """docs/API.md, "Signing customer instructions": pinned byte for byte."""
    message = instruction_message(
        "transfer",
        client_id="t-9",
        from_account_id="alice",
        to_account_id="bob",
        amount_minor=2_500,
        currency="CNY",
        authorisation={"nonce": "n-0000000001", "expires_at_ms": 1_700_000_300_000},
    )
    assert authorisation_payload(P, message) == (
        b"custody-authorisation/v1\np1\n"
        b'{"amount_minor":2500,"auth":{"expires_at_ms":1700000300000,"nonce":"n-0000000001"},'
        b'"currency":"CNY","from_account_id":"alice","op":"transfer","to_account_id":"bob"}'
    )
    # purpose TRANSFER is the default either way: sent or not, the same bytes
    explicit = instruction_message(
        "transfer",
        client_id="t-9",
        from_account_id="alice",
        to_account_id="bob",
        amount_minor=2_500,
        currency="CNY",
        purpose="transfer",
        authorisation={"nonce": "n-0000000001", "expires_at_ms": 1_700_000_300_000},
    )
    assert authorisation_payload(P, explicit) == authorisation_payload(P, message)

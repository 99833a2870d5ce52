"""Every refusal arrives as a gRPC status with google.rpc.Status details (AIP-193)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from api_helpers import CCY, World
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ledger.api.client import CustodyClient, instruction
from ledger.api.pb import movement_pb

SC = grpc.StatusCode


def raw_error(client: CustodyClient, call: Callable[[CustodyClient], Any]) -> grpc.RpcError:
    """Make the call through the stubs so the test parses the wire status itself."""
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    return err.value


def details(error: grpc.RpcError) -> dict[str, Any]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == error.code().value[0]  # type: ignore[attr-defined]
    found: dict[str, Any] = {}
    for any_ in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.PreconditionFailure,
            error_details_pb2.RetryInfo,
        ):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                found[cls.__name__] = msg
    return found


def transfer_raw(client: CustodyClient, **kw: Any) -> Any:
    from ledger.api.client import instruction_message

    fields = {
        "client_id": "t-x",
        "from_account_id": "alice",
        "to_account_id": "bob",
        "amount_minor": 1,
        "currency": CCY,
    }
    fields.update(kw)
    request = movement_pb.TransferRequest(instruction=instruction_message("transfer", **fields))
    return client.movements.Transfer(request, timeout=5, metadata=client.metadata)


def later(world: World) -> int:
    return world.future_ms()


# (name, setup(world), call(world) raising, expected status, expected reason)
CASES: list[tuple[str, Callable[[World], Any], Callable[[World], Any], SC, str]] = [
    (
        "invalid",
        lambda w: None,
        lambda w: transfer_raw(w.p1, currency="XYZ"),
        SC.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (
        "invalid_amount",
        lambda w: None,
        lambda w: transfer_raw(w.p1, amount_minor=-5),
        SC.INVALID_ARGUMENT,
        "INVALID_AMOUNT",
    ),
    (
        "currency_mismatch",
        lambda w: None,
        lambda w: transfer_raw(w.p1, currency="USD"),
        SC.FAILED_PRECONDITION,
        "CURRENCY_MISMATCH",
    ),
    (
        "account_not_found",
        lambda w: None,
        lambda w: transfer_raw(w.p1, to_account_id="nobody"),
        SC.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    ),
    (
        "account_exists",
        lambda w: None,
        lambda w: w.p1.accounts.OpenAccount(
            __import__("ledger.api.pb", fromlist=["account_pb"]).account_pb.OpenAccountRequest(
                instruction=__import__("ledger.api.client", fromlist=["x"]).instruction_message(
                    "open_account",
                    client_id="o-again",
                    account_id="alice",
                    kind="customer",
                    currency=CCY,
                    role="lender",
                )
            ),
            timeout=5,
            metadata=w.p1.metadata,
        ),
        SC.ALREADY_EXISTS,
        "ACCOUNT_EXISTS",
    ),
    (
        "same_account",
        lambda w: None,
        lambda w: transfer_raw(w.p1, to_account_id="alice"),
        SC.INVALID_ARGUMENT,
        "SAME_ACCOUNT",
    ),
    (
        "flow_not_allowed",
        lambda w: None,
        lambda w: transfer_raw(w.p1, to_account_id="omni"),
        SC.FAILED_PRECONDITION,
        "FLOW_NOT_ALLOWED",
    ),
    (
        "platform_not_found",
        lambda w: None,
        lambda w: w.operator.get_account("alice", platform_id="nope"),
        SC.NOT_FOUND,
        "PLATFORM_NOT_FOUND",
    ),
    (
        "platform_exists",
        lambda w: None,
        # another name for an existing platform id: the platform's log answers ID_REUSED (an
        # identical retry would be replayed) since commit 80b16fe
        lambda w: w.operator.create_platform("p1", "again"),
        SC.ALREADY_EXISTS,
        "ID_REUSED",
    ),
    (
        "insufficient_funds",
        lambda w: None,
        lambda w: transfer_raw(w.p1, amount_minor=10**9),
        SC.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    ),
    (
        "account_frozen",
        lambda w: w.p1.freeze_account("f", "alice", "review"),
        lambda w: transfer_raw(w.p1),
        SC.FAILED_PRECONDITION,
        "ACCOUNT_FROZEN",
    ),
    (
        "account_closed",
        lambda w: w.p1.close_account("c", "carol"),
        lambda w: w.p1.deposit("d-c", "omni", "carol", 5, CCY),
        SC.FAILED_PRECONDITION,
        "ACCOUNT_CLOSED",
    ),
    (
        "account_not_empty",
        lambda w: None,
        lambda w: w.p1.close_account("c", "alice"),
        SC.FAILED_PRECONDITION,
        "ACCOUNT_NOT_EMPTY",
    ),
    (
        "account_not_frozen",
        lambda w: None,
        lambda w: w.operator.unfreeze_account("u", "alice", "x", platform_id="p1"),
        SC.FAILED_PRECONDITION,
        "ACCOUNT_NOT_FROZEN",
    ),
    (
        "id_reused",
        lambda w: transfer_raw(w.p1),
        lambda w: transfer_raw(w.p1, amount_minor=2),
        SC.ALREADY_EXISTS,
        "ID_REUSED",
    ),
    (
        "hold_not_found",
        lambda w: None,
        lambda w: w.p1.capture_hold("cap", "no-hold", 1),
        SC.NOT_FOUND,
        "HOLD_NOT_FOUND",
    ),
    (
        "hold_not_pending",
        lambda w: (
            w.p1.place_hold("h", "alice", "bob", 10, CCY, "bid", later(w)),
            w.p1.release_hold("r", "h", "x"),
        ),
        lambda w: w.p1.capture_hold("cap", "h", 1),
        SC.FAILED_PRECONDITION,
        "HOLD_NOT_PENDING",
    ),
    (
        "hold_exceeded",
        lambda w: w.p1.place_hold("h", "alice", "bob", 10, CCY, "bid", later(w)),
        lambda w: w.p1.capture_hold("cap", "h", 11),
        SC.FAILED_PRECONDITION,
        "HOLD_EXCEEDED",
    ),
    (
        "hold_expiry_invalid",
        lambda w: None,
        lambda w: w.p1.place_hold("h", "alice", "bob", 10, CCY, "bid", 1_000),
        SC.INVALID_ARGUMENT,
        "HOLD_EXPIRY_INVALID",
    ),
    (
        "hold_reason_required",
        lambda w: None,
        lambda w: w.p1.place_hold("h", "alice", "bob", 10, CCY, "", later(w)),
        SC.INVALID_ARGUMENT,
        "HOLD_REASON_REQUIRED",
    ),
    (
        "movement_not_found",
        lambda w: None,
        lambda w: w.operator.reverse("rv", "never", "x", platform_id="p1"),
        SC.NOT_FOUND,
        "MOVEMENT_NOT_FOUND",
    ),
    (
        "not_reversible",
        lambda w: None,
        lambda w: w.operator.reverse("rv", "o-alice", "x", platform_id="p1"),
        SC.FAILED_PRECONDITION,
        "NOT_REVERSIBLE",
    ),
    (
        "already_reversed",
        lambda w: w.operator.reverse("rv1", "d-alice", "x", platform_id="p1"),
        lambda w: w.operator.reverse("rv2", "d-alice", "x", platform_id="p1"),
        SC.FAILED_PRECONDITION,
        "ALREADY_REVERSED",
    ),
]


@pytest.mark.parametrize(
    ("name", "setup", "call", "code", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_refusal_arrives_as_status_with_error_info(
    world: World,
    name: str,
    setup: Callable[[World], Any],
    call: Callable[[World], Any],
    code: SC,
    reason: str,
) -> None:
    setup(world)
    world.p1.retries = world.operator.retries = 0
    # The typed client raises CustodyError; go to the wire for the raw status.
    try:
        call(world)
    except grpc.RpcError as exc:
        error: grpc.RpcError = exc
    except Exception as exc:  # CustodyError from the typed client: redo at the wire level
        cause = exc.__context__
        assert isinstance(cause, grpc.RpcError), exc
        error = cause
    else:
        pytest.fail(f"{name}: no error")
    assert error.code() == code  # type: ignore[attr-defined]
    found = details(error)
    info = found["ErrorInfo"]
    assert (info.reason, info.domain) == (reason, "custody.v1")
    if code is SC.INVALID_ARGUMENT:
        assert found["BadRequest"].field_violations
    if code is SC.FAILED_PRECONDITION:
        assert found["PreconditionFailure"].violations[0].type == reason


def test_typed_client_error_carries_reason(world: World) -> None:
    from ledger.api.client import CustodyError

    with pytest.raises(CustodyError) as err:
        world.p1.transfer("t-big", "alice", "bob", 10**9, CCY)
    e = err.value
    assert e.code is SC.FAILED_PRECONDITION
    assert (e.reason, e.domain) == ("INSUFFICIENT_FUNDS", "custody.v1")
    assert e.metadata["control"] and e.metadata["client_id"] == "t-big"
    assert int(e.metadata["position"]) > 0
    with pytest.raises(CustodyError) as err:
        world.p1.transfer("t-bad", "alice", "b@d", 1, CCY)
    assert err.value.fields == {
        "instruction.to_account_id": err.value.fields["instruction.to_account_id"]
    }


def test_oversize_batch_is_invalid_argument(world: World) -> None:
    items = [
        instruction(
            "transfer",
            client_id=f"o{i}",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency=CCY,
        )
        for i in range(8193)
    ]
    from ledger.api.client import CustodyError

    before = len(list(world.p1.subscribe_log()))
    with pytest.raises(CustodyError) as err:
        world.p1.submit_batch(items, timeout_s=30)
    assert err.value.code is SC.INVALID_ARGUMENT
    assert err.value.reason == "BATCH_TOO_LARGE"
    assert err.value.fields.keys() == {"instructions"}
    assert len(list(world.p1.subscribe_log())) == before


def test_empty_and_malformed_batches(world: World) -> None:
    from ledger.api.client import CustodyError
    from ledger.api.pb import common_pb

    with pytest.raises(CustodyError) as err:
        world.p1.submit_batch([])
    assert err.value.code is SC.INVALID_ARGUMENT
    bad = [
        common_pb.Instruction(),
        instruction(
            "transfer",
            client_id="x",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency=CCY,
            purpose=99,
        ),
    ]
    with pytest.raises(CustodyError) as err:
        world.p1.submit_batch(bad)
    assert set(err.value.fields) == {"instructions[0]", "instructions[1].transfer.purpose"}


def test_missing_instruction_is_invalid(world: World) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.p1.movements.Transfer(
            movement_pb.TransferRequest(), timeout=5, metadata=world.p1.metadata
        )
    assert err.value.code() is SC.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert details(err.value)["BadRequest"].field_violations[0].field == "instruction"


def test_currency_total_overflow_is_a_refusal(world: World) -> None:
    from ledger.api.client import CustodyError

    # The CNY total (sum of all postings) reaches 2^63-1 before any one account's total does:
    # it must be a recorded refusal, not a failure of the fold (INTERNAL).
    with pytest.raises(CustodyError) as err:
        world.p1.deposit("huge", "omni", "bob", 2**63 - 1 - 10_000, CCY)
    assert err.value.code is SC.FAILED_PRECONDITION
    assert err.value.reason == "AMOUNT_OVERFLOW"
    assert world.p1.deposit("fits", "omni", "bob", 2**63 - 1 - 15_000, CCY).kind == "deposited"
    with pytest.raises(CustodyError) as err:
        world.p1.deposit("one-more", "omni", "bob", 1, CCY)
    assert err.value.reason == "AMOUNT_OVERFLOW"

"""Wire <-> domain: protobuf instruction messages to `ledger.commands`, and answers back.

Proto instruction fields carry the same names as the domain's command fields, so the mapping
is generic; only enums, optional text, defaults, the customer's `authorisation` (the domain's
`auth`) and policy documents (`policy_json`) need a converter. The Python client signs customer
instructions through this same translation (`ledger.api.client.authorisation_payload`), so the
bytes a customer signs are the bytes the ledger verifies. A message that cannot
become a command (unknown enum value, missing instruction) raises `WireError`; everything else
(lengths, character sets, currencies, ranges) is the domain's validation, reported with the
field path as the caller sent it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec
from google.protobuf.message import Message

from controls.codes import Code
from controls.policy import Policy, decode_policy, encode_policy, policy_problem
from ledger import commands as c
from ledger.api.pb import approval_pb, common_pb, movement_pb
from ledger.domain import Account, PendingRequest
from ledger.writer import Outcome


class WireError(ValueError):
    def __init__(self, field: str, message: str, reason: str = Code.INVALID_ARGUMENT) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


KIND_TO_DOMAIN: Final[Mapping[common_pb.AccountKind.ValueType, str]] = {
    common_pb.ACCOUNT_KIND_UNSPECIFIED: "",
    common_pb.ACCOUNT_KIND_CUSTOMER: "customer",
    common_pb.ACCOUNT_KIND_OMNIBUS: "omnibus",
    common_pb.ACCOUNT_KIND_OWN_FUNDS: "own_funds",
    common_pb.ACCOUNT_KIND_FEE_INCOME: "fee_income",
    common_pb.ACCOUNT_KIND_SUSPENSE: "suspense",
    common_pb.ACCOUNT_KIND_PLATFORM_BANK: "platform_bank",
}
ROLE_TO_DOMAIN: Final[Mapping[common_pb.CustomerRole.ValueType, str | None]] = {
    common_pb.CUSTOMER_ROLE_UNSPECIFIED: None,
    common_pb.CUSTOMER_ROLE_LENDER: "lender",
    common_pb.CUSTOMER_ROLE_BORROWER: "borrower",
    common_pb.CUSTOMER_ROLE_GUARANTOR: "guarantor",
    common_pb.CUSTOMER_ROLE_OTHER: "other",
}
PURPOSE_TO_DOMAIN: Final[Mapping[common_pb.TransferPurpose.ValueType, str]] = {
    common_pb.TRANSFER_PURPOSE_UNSPECIFIED: "transfer",
    common_pb.TRANSFER_PURPOSE_TRANSFER: "transfer",
    common_pb.TRANSFER_PURPOSE_BID: "bid",
    common_pb.TRANSFER_PURPOSE_DISBURSEMENT: "disbursement",
    common_pb.TRANSFER_PURPOSE_REPAYMENT: "repayment",
    common_pb.TRANSFER_PURPOSE_COMPENSATION: "compensation",
    common_pb.TRANSFER_PURPOSE_CLEARING: "clearing",
}
HOLDER_TYPE_TO_DOMAIN: Final[Mapping[common_pb.HolderType.ValueType, str]] = {
    common_pb.HOLDER_TYPE_UNSPECIFIED: "individual",
    common_pb.HOLDER_TYPE_INDIVIDUAL: "individual",
    common_pb.HOLDER_TYPE_CORPORATE: "corporate",
}
GATE_TO_DOMAIN: Final[Mapping[common_pb.PlatformGate.ValueType, str]] = {
    common_pb.PLATFORM_GATE_NORMAL: "NORMAL",
    common_pb.PLATFORM_GATE_RESTRICTED: "RESTRICTED",
    common_pb.PLATFORM_GATE_WIND_DOWN: "WIND_DOWN",
    common_pb.PLATFORM_GATE_FROZEN: "FROZEN",
}
GATE_TO_WIRE: Final = {v: k for k, v in GATE_TO_DOMAIN.items()}
KIND_TO_WIRE: Final = {v: k for k, v in KIND_TO_DOMAIN.items() if v}
ROLE_TO_WIRE: Final = {v: k for k, v in ROLE_TO_DOMAIN.items() if v}
STATUS_TO_WIRE: Final[Mapping[str, common_pb.AccountStatus.ValueType]] = {
    "open": common_pb.ACCOUNT_STATUS_OPEN,
    "frozen": common_pb.ACCOUNT_STATUS_FROZEN,
    "closed": common_pb.ACCOUNT_STATUS_CLOSED,
}
RESULT_TO_WIRE: Final[Mapping[str, common_pb.ResultStatus.ValueType]] = {
    "accepted": common_pb.RESULT_STATUS_ACCEPTED,
    "replayed": common_pb.RESULT_STATUS_REPLAYED,
    "refused": common_pb.RESULT_STATUS_REFUSED,
    "invalid": common_pb.RESULT_STATUS_INVALID,
    "pending": common_pb.RESULT_STATUS_PENDING_APPROVAL,
}
APPROVAL_STATUS_TO_WIRE: Final[Mapping[str, approval_pb.ApprovalStatus.ValueType]] = {
    "pending": approval_pb.APPROVAL_STATUS_PENDING,
    "approved": approval_pb.APPROVAL_STATUS_APPROVED,
    "rejected": approval_pb.APPROVAL_STATUS_REJECTED,
    "expired": approval_pb.APPROVAL_STATUS_EXPIRED,
}

# proto message type -> domain command type (the oneof field names in Instruction match ops).
COMMAND_OF_MESSAGE: Final[Mapping[type[Message], type[c.Command]]] = {
    common_pb.OpenAccount: c.OpenAccount,
    common_pb.FreezeAccount: c.FreezeAccount,
    common_pb.UnfreezeAccount: c.UnfreezeAccount,
    common_pb.CloseAccount: c.CloseAccount,
    common_pb.Deposit: c.Deposit,
    common_pb.Transfer: c.Transfer,
    common_pb.ChargeFee: c.ChargeFee,
    common_pb.TopUpShortfall: c.TopUpShortfall,
    common_pb.PlaceHold: c.PlaceHold,
    common_pb.CaptureHold: c.CaptureHold,
    common_pb.ReleaseHold: c.ReleaseHold,
    common_pb.ExpireHolds: c.ExpireHolds,
    common_pb.RequestWithdrawal: c.RequestWithdrawal,
    common_pb.SettleWithdrawal: c.SettleWithdrawal,
    common_pb.FailWithdrawal: c.FailWithdrawal,
    common_pb.Reverse: c.Reverse,
    common_pb.RegisterKey: c.RegisterKey,
    common_pb.ResetKey: c.ResetKey,
    common_pb.BindPayee: c.BindPayee,
    common_pb.GrantStanding: c.GrantStanding,
    common_pb.RevokeStanding: c.RevokeStanding,
    common_pb.SetPolicy: c.SetPolicy,
    common_pb.SetGate: c.SetGate,
    common_pb.ApproveRequest: c.ApproveRequest,
    common_pb.RejectRequest: c.RejectRequest,
    common_pb.AcknowledgeAlert: c.AcknowledgeAlert,
    common_pb.CloseAlert: c.CloseAlert,
}


def _enum(table: Mapping[Any, Any], name: str) -> Callable[[Message], Any]:
    def convert(msg: Message) -> Any:
        value = getattr(msg, name)
        if value not in table:
            raise WireError(name, f"unknown enum value {value}")
        return table[value]

    return convert


def _optional_text(name: str) -> Callable[[Message], str | None]:
    def convert(msg: Message) -> str | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return convert


def _max_holds(msg: Message) -> int:
    value: int = msg.max_holds  # type: ignore[attr-defined]
    return 1000 if value == 0 else value


def _authorisation(msg: Message) -> c.Authorisation | None:
    """The customer's consent, or None when the message carries none. Empty fields stay at their
    defaults, which the canonical encoding omits: the signed payload is the same whether a field
    was sent empty or not sent at all."""
    if not msg.HasField("authorisation"):
        return None
    a = msg.authorisation  # type: ignore[attr-defined]
    return c.Authorisation(
        nonce=a.nonce,
        expires_at_ms=a.expires_at_ms,
        signature=a.signature,
        standing_id=a.standing_id,
    )


def policy_from_json(data: bytes, field: str = "policy_json") -> Policy:
    """A policy document from the wire; WireError (POLICY_INVALID) if it is not one."""
    try:
        return decode_policy(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WireError(field, f"not a policy document: {exc}", Code.POLICY_INVALID) from None


def initial_policy_from_json(data: bytes) -> Policy:
    """A new platform's policy (version 0) from the wire, checked whole before the platform
    exists: a refused creation must leave nothing behind that blocks a corrected retry."""
    policy = policy_from_json(data)
    problem = policy_problem(policy)
    if problem is None and policy.version != 0:
        problem = "a platform starts at policy version 0"
    if problem is not None:
        raise WireError("policy_json", problem, Code.POLICY_INVALID)
    return policy


def policy_json(policy: Policy) -> bytes:
    """The canonical JSON of a policy (sorted keys), as the log records it."""
    return encode_policy(policy)


def _policy(msg: Message) -> Policy:
    data: bytes = msg.policy_json  # type: ignore[attr-defined]
    if not data:
        raise WireError("policy_json", "required", Code.POLICY_INVALID)
    return policy_from_json(data)


def _gate(msg: Message) -> str:
    value = msg.gate  # type: ignore[attr-defined]
    if value not in GATE_TO_DOMAIN:
        raise WireError("gate", "must be NORMAL, RESTRICTED, WIND_DOWN or FROZEN")
    return GATE_TO_DOMAIN[value]


_AUTH_CARRIERS: Final = (
    c.Transfer,
    c.PlaceHold,
    c.RequestWithdrawal,
    c.RegisterKey,
    c.BindPayee,
    c.GrantStanding,
)
_CONVERTERS: Final[Mapping[tuple[type[c.Command], str], Callable[[Message], Any]]] = {
    (c.OpenAccount, "kind"): _enum(KIND_TO_DOMAIN, "kind"),
    (c.OpenAccount, "role"): _enum(ROLE_TO_DOMAIN, "role"),
    (c.OpenAccount, "holder_name"): _optional_text("holder_name"),
    (c.OpenAccount, "holder_type"): _enum(HOLDER_TYPE_TO_DOMAIN, "holder_type"),
    (c.Transfer, "purpose"): _enum(PURPOSE_TO_DOMAIN, "purpose"),
    (c.GrantStanding, "purpose"): _enum(PURPOSE_TO_DOMAIN, "purpose"),
    (c.ExpireHolds, "max_holds"): _max_holds,
    (c.SetPolicy, "policy"): _policy,
    (c.SetGate, "gate"): _gate,
    **{(cls, "auth"): _authorisation for cls in _AUTH_CARRIERS},
}


def _builder(msg_type: type[Message], cls: type[c.Command]) -> Callable[[Message], c.Command]:
    """A compiled `msg -> cls(field=msg.field, ..., converted=convert(msg))` for one type.

    Generated once per command type (field names come from the domain's own Struct, so they are
    plain identifiers): a batch of 1,000 instructions pays one direct call per item instead of
    building a kwargs dict (measured 7 -> 2 µs per item).
    """
    names = cls.__struct_fields__
    wire_fields = msg_type.DESCRIPTOR.fields_by_name
    for name in names:
        if not name.isidentifier():  # pragma: no cover - domain field names are identifiers
            raise ValueError(f"{cls.__name__}.{name} is not an identifier")
        # every domain field is either a wire field of the same name or converted: a field the
        # domain adds without a wire counterpart fails here, at import, not on the first call
        if (cls, name) not in _CONVERTERS and name not in wire_fields:
            raise ValueError(f"{msg_type.__name__} has no field for {cls.__name__}.{name}")
    env: dict[str, Any] = {"cls": cls}
    args = []
    for i, name in enumerate(names):
        convert = _CONVERTERS.get((cls, name))
        if convert is None:
            args.append(f"{name}=m.{name}")
        else:
            env[f"conv{i}"] = convert
            args.append(f"{name}=conv{i}(m)")
    source = f"def build(m):\n    return cls({', '.join(args)})\n"
    exec(compile(source, f"<translate {cls.__name__}>", "exec"), env)
    build: Callable[[Message], c.Command] = env["build"]
    return build


_BUILDERS: Final[Mapping[type[Message], Callable[[Message], c.Command]]] = {
    msg_type: _builder(msg_type, cls) for msg_type, cls in COMMAND_OF_MESSAGE.items()
}


def command_of(msg: Message) -> c.Command:
    """The domain command for one instruction message (shape is validated later, by the ledger)."""
    return _BUILDERS[type(msg)](msg)


def single_command(request: Message, expected: type[Message]) -> c.Command:
    """The instruction inside a single-instruction request (field `instruction`)."""
    if not request.HasField("instruction"):
        raise WireError("instruction", "required")
    msg = request.instruction  # type: ignore[attr-defined]
    assert type(msg) is expected
    try:
        return command_of(msg)
    except WireError as exc:
        raise WireError(f"instruction.{exc.field}", exc.message, exc.reason) from None


def batch_commands(instructions: Any) -> list[c.Command]:
    """Every item of a batch; collects all wire errors so the caller sees them at once."""
    commands: list[c.Command] = []
    violations: dict[str, str] = {}
    for i, item in enumerate(instructions):
        which = item.WhichOneof("instruction")
        if which is None:
            violations[f"instructions[{i}]"] = "no instruction set"
            continue
        try:
            commands.append(command_of(getattr(item, which)))
        except WireError as exc:
            violations[f"instructions[{i}].{which}.{exc.field}"] = exc.message
    if violations:
        raise BatchWireError(violations)
    return commands


class BatchWireError(ValueError):
    def __init__(self, violations: dict[str, str]) -> None:
        super().__init__(f"{len(violations)} malformed instructions")
        self.violations = violations


def _request_id(outcome: Outcome) -> str:
    """A pending instruction's request is named by the instruction's own client id."""
    return outcome.client_id if outcome.status == "pending" else ""


def receipt(outcome: Outcome) -> common_pb.Receipt:
    """Accepted, replayed or PENDING_APPROVAL (a request recorded for a checker: a success)."""
    assert outcome.ok
    return common_pb.Receipt(
        client_id=outcome.client_id,
        status=RESULT_TO_WIRE[outcome.status],
        position=outcome.seq,
        kind=outcome.kind,
        request_id=_request_id(outcome),
    )


def item_result(outcome: Outcome) -> common_pb.ItemResult:
    return common_pb.ItemResult(
        client_id=outcome.client_id,
        status=RESULT_TO_WIRE[outcome.status],
        position=outcome.seq,
        kind=outcome.kind,
        reason=outcome.code,
        control=outcome.control,
        message=outcome.message,
        field=outcome.field,
        request_id=_request_id(outcome),
    )


def batch_response(outcomes: Sequence[Outcome]) -> movement_pb.SubmitBatchResponse:
    """The answer to a batch: one result per instruction, in order, and the counts.

    Results of accepted or replayed items carry only their client id, status, position and kind
    (the other fields are empty anyway), which halves the cost of building a 1,000-item answer.
    """
    response = movement_pb.SubmitBatchResponse()
    add = response.results.add
    to_wire = RESULT_TO_WIRE
    counts = dict.fromkeys(RESULT_TO_WIRE, 0)
    for o in outcomes:
        status = o.status
        counts[status] += 1
        if status == "pending":
            add(
                client_id=o.client_id,
                status=to_wire[status],
                position=o.seq,
                kind=o.kind,
                request_id=o.client_id,
            )
        elif o.code or o.control or o.message or o.field:
            add(
                client_id=o.client_id,
                status=to_wire[status],
                position=o.seq,
                kind=o.kind,
                reason=o.code,
                control=o.control,
                message=o.message,
                field=o.field,
            )
        else:
            add(client_id=o.client_id, status=to_wire[status], position=o.seq, kind=o.kind)
    response.accepted_count = counts["accepted"]
    response.replayed_count = counts["replayed"]
    response.refused_count = counts["refused"]
    response.invalid_count = counts["invalid"]
    response.pending_count = counts["pending"]
    return response


def account(platform_id: str, acc: Account) -> common_pb.Account:
    return common_pb.Account(
        platform_id=platform_id,
        account_id=acc.id,
        kind=KIND_TO_WIRE[str(acc.kind)],
        currency=acc.currency,
        role=ROLE_TO_WIRE.get(acc.role or "", common_pb.CUSTOMER_ROLE_UNSPECIFIED),
        status=STATUS_TO_WIRE[str(acc.status)],
        posted_minor=acc.posted_minor,
        held_minor=acc.held_minor,
        available_minor=acc.available_minor,
        opened_position=acc.opened_seq,
        last_position=acc.last_seq,
    )


def balance(acc: Account, as_of_position: int) -> common_pb.Balance:
    return common_pb.Balance(
        account_id=acc.id,
        currency=acc.currency,
        posted_minor=acc.posted_minor,
        held_minor=acc.held_minor,
        available_minor=acc.available_minor,
        as_of_position=as_of_position,
    )


_CMD_JSON: Final = msgspec.json.Encoder(order="sorted")


def approval_status(request: PendingRequest, now_ms: int) -> str:
    """pending | approved | rejected, or expired: pending in the log but past its expiry."""
    if request.status == "pending" and request.expires_at_ms < now_ms:
        return "expired"
    return request.status


def approval(platform_id: str, request: PendingRequest, now_ms: int) -> approval_pb.Approval:
    return approval_pb.Approval(
        platform_id=platform_id,
        request_id=request.id,
        operation=request.op,
        status=APPROVAL_STATUS_TO_WIRE[approval_status(request, now_ms)],
        maker=request.maker,
        expires_at_ms=request.expires_at_ms,
        position=request.seq,
        instruction_json=_CMD_JSON.encode(request.cmd),
        approval_client_id=request.executed_by or "",
    )

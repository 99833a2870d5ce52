"""Typed Python client for the custody.v1 API.

    with CustodyClient.mtls("ledger:50051", tls_dir / "ca.pem",
                            tls_dir / "platform-p1.pem", tls_dir / "platform-p1.key") as client:
        client.open_account("o-a", "a", kind="customer", currency="CNY", role="lender")
        receipt = client.transfer("t-1", "a", "b", 1_000, "CNY")

A platform relays its customers' consent: `sign_instruction` (or `sign_with=` on the typed
calls) signs an instruction with the customer's Ed25519 key exactly as the server will check it
(docs/API.md, "Signing customer instructions"). A manual operation is answered with a receipt
whose `pending` is true and whose `request_id` a checker approves (`approve_request`).

Every call has a deadline (`timeout_s`, default 10 s). Calls that fail with UNAVAILABLE, or
RESOURCE_EXHAUSTED because the platform's queue is full, are retried with the same request,
which is safe because every instruction carries its `client_id` (a retried instruction that
already committed is answered REPLAYED). Any other error raises `CustodyError`, which carries
the status code and the stable reason code from `google.rpc.ErrorInfo`.

Several servers (PostgreSQL): a write that reaches a server not writing the platform is answered
UNAVAILABLE `WRITER_ELSEWHERE` with the writer's address. A client built with `mtls` or
`insecure_dev` follows it (`follow_redirects=True`, at most `max_redirects` per call): it connects
to that address with the same credentials and sends the same request (same client ids), and
stays there for later calls; an answer without an address (failover in progress) is retried
after its RetryInfo delay. If the server it was redirected to becomes unreachable, the call
fails with a retryable UNAVAILABLE and the next call goes back to the address the client was
built with (see docs/API.md, "Several servers: redirects").
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controls.customer_authorisation import b64url_encode
from controls.customer_authorisation import payload as _authorisation_payload
from controls.policy import Policy, decode_policy, encode_policy
from ledger.api import translate
from ledger.api.pb import (
    account_grpc,
    account_pb,
    alert_grpc,
    alert_pb,
    approval_grpc,
    approval_pb,
    audit_grpc,
    audit_pb,
    audit_trail_pb,
    common_pb,
    customer_grpc,
    customer_pb,
    disclosure_grpc,
    disclosure_pb,
    hold_grpc,
    hold_pb,
    liabilities_grpc,
    liabilities_pb,
    log_grpc,
    log_pb,
    movement_grpc,
    movement_pb,
    platform_grpc,
    platform_pb,
    policy_grpc,
    policy_pb,
    query_grpc,
    query_pb,
)

DEFAULT_TIMEOUT_S: Final = 10.0
# How long a signature made by `sign_instruction` stays valid by default (the default policy
# accepts at most 5 minutes ahead of the server's clock).
DEFAULT_AUTH_TTL_MS: Final = 120_000
RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE})
DOMAIN: Final = "custody.v1"  # ErrorInfo.domain of the ledger's own errors
WRITER_ELSEWHERE: Final = "WRITER_ELSEWHERE"
# Raised by the client itself when a redirect cannot be followed safely or usefully.
REDIRECT_NOT_TRUSTED: Final = "REDIRECT_NOT_TRUSTED"  # the target's certificate does not cover it
REDIRECT_LIMIT: Final = "REDIRECT_LIMIT"  # max_redirects redirect answers in one call
MAX_REDIRECTS_DEFAULT: Final = 3
# What a TLS failure looks like in a transport error's details (gRPC core's words).
_TLS_FAILURE_HINTS: Final = (
    "hostname verification",
    "peer name",
    "certificate_verify_failed",
    "certificate verify failed",
)
# How many pages the iterators (`iter_statement`, `iter_audit_events`, ...) fetch at most.
MAX_PAGES_DEFAULT: Final = 10_000
M = TypeVar("M", bound=Message)


class CustodyError(Exception):
    """An error status from the ledger, with its stable reason code."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        domain: str = "",
        metadata: dict[str, str] | None = None,
        fields: dict[str, str] | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.domain = domain
        self.metadata = metadata or {}
        self.fields = fields or {}
        self.retry_delay_s = retry_delay_s

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again (same client ids) may succeed: UNAVAILABLE
        (including WRITER_ELSEWHERE: nothing was written) and a full queue (OVERLOADED)."""
        if self.reason in (REDIRECT_NOT_TRUSTED,):
            return False
        return self.code in RETRYABLE or (
            self.code is grpc.StatusCode.RESOURCE_EXHAUSTED and self.reason == "OVERLOADED"
        )

    @property
    def transport(self) -> bool:
        """A failure of the connection itself (no answer from a ledger server)."""
        return self.code is grpc.StatusCode.UNAVAILABLE and self.domain != DOMAIN

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> CustodyError:
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        message: str = error.details() or ""  # type: ignore[attr-defined]
        reason, domain = code.name, ""
        metadata: dict[str, str] = {}
        fields: dict[str, str] = {}
        retry: float | None = None
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = {v.field: v.description for v in bad.field_violations}
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info_retry = error_details_pb2.RetryInfo()
                detail.Unpack(info_retry)
                retry = info_retry.retry_delay.ToNanoseconds() / 1e9
        return cls(
            code,
            reason,
            message,
            domain=domain,
            metadata=metadata,
            fields=fields,
            retry_delay_s=retry,
        )


@dataclass(frozen=True)
class Receipt:
    client_id: str
    replayed: bool
    position: int
    kind: str
    status: str = "accepted"  # accepted | replayed | pending
    request_id: str = ""  # pending only: what a checker approves

    @property
    def pending(self) -> bool:
        """Recorded as a request for a checker (PENDING_APPROVAL); nothing executed yet."""
        return self.status == "pending"


@dataclass(frozen=True)
class ItemResult:
    client_id: str
    status: str  # accepted | replayed | pending | refused | invalid
    position: int
    kind: str
    reason: str = ""
    control: str = ""
    message: str = ""
    field: str = ""
    request_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "replayed", "pending")


@dataclass(frozen=True)
class PolicyInfo:
    """A platform's policy in force, its version and its gate."""

    policy: Policy
    policy_json: bytes  # canonical JSON, as the log records it
    version: int
    gate: str  # NORMAL | RESTRICTED | WIND_DOWN | FROZEN
    as_of_position: int


@dataclass(frozen=True)
class LogRecord:
    position: int
    kind: str
    record: bytes  # canonical bytes (custody-record/v1)
    chain_hash: bytes


@dataclass
class Page:
    items: list[Any] = field(default_factory=list)
    next_page_token: str = ""
    # statements and the audit trail: every page of one walk includes exactly the records up
    # to this log position (-1 for lists of the live state)
    as_of_position: int = -1
    currency: str = ""  # statements: the account's currency


class PageCapReached(Exception):
    """An iterator fetched its `max_pages` pages and more remain: resume with
    `next_page_token`, or raise the cap."""

    def __init__(self, max_pages: int, next_page_token: str) -> None:
        super().__init__(f"stopped after {max_pages} pages; more remain")
        self.max_pages = max_pages
        self.next_page_token = next_page_token


def walk_pages(
    fetch: Callable[[str], Page], max_pages: int = MAX_PAGES_DEFAULT, page_token: str = ""
) -> Iterator[Any]:
    """Every item of every page `fetch(token)` returns, from `page_token` on; raises
    PageCapReached after `max_pages` pages if more remain (never stops silently)."""
    if max_pages < 1:
        raise ValueError("max_pages must be at least 1")
    token = page_token
    for _ in range(max_pages):
        page = fetch(token)
        yield from page.items
        if not page.next_page_token:
            return
        token = page.next_page_token
    raise PageCapReached(max_pages, token)


_DIRECTION_NAMES: Final = {
    query_pb.STATEMENT_DIRECTION_DEBIT: "debit",
    query_pb.STATEMENT_DIRECTION_CREDIT: "credit",
    query_pb.STATEMENT_DIRECTION_HOLD: "hold",
    query_pb.STATEMENT_DIRECTION_RELEASE: "release",
    query_pb.STATEMENT_DIRECTION_CAPTURE: "capture",
}
_OUTCOMES: Final = {
    "accepted": audit_trail_pb.AUDIT_OUTCOME_ACCEPTED,
    "refused": audit_trail_pb.AUDIT_OUTCOME_REFUSED,
}
_OUTCOME_NAMES: Final = {v: k for k, v in _OUTCOMES.items()}


@dataclass(frozen=True)
class StatementLine:
    """One money effect of one record on the account, with its balances right after it."""

    position: int
    index: int
    time_ms: int
    kind: str
    client_id: str
    direction: str  # debit | credit | hold | release | capture
    amount_minor: int  # change of posted, in the account's normal direction
    counterparty_account_id: str
    held_delta_minor: int
    posted_minor: int
    held_minor: int

    @classmethod
    def from_pb(cls, line: query_pb.StatementLine) -> StatementLine:
        return cls(
            line.position,
            line.index,
            line.time_ms,
            line.kind,
            line.client_id,
            _DIRECTION_NAMES.get(line.direction, "unspecified"),
            line.amount_minor,
            line.counterparty_account_id,
            line.held_delta_minor,
            line.posted_minor,
            line.held_minor,
        )


@dataclass(frozen=True)
class BalanceAt:
    account_id: str
    currency: str
    posted_minor: int
    held_minor: int
    available_minor: int
    as_of_position: int  # the last log position included (-1: before the first record)
    last_movement_position: int  # -1: no movement at or before it


@dataclass(frozen=True)
class AuditEvent:
    position: int
    time_ms: int
    actor: str
    role: str
    operation: str
    kind: str
    outcome: str  # accepted | refused
    code: str
    control: str
    message: str
    client_id: str
    policy_version: int | None
    currency: str
    amount_minor: int | None
    account_ids: tuple[str, ...]
    amounts_minor: tuple[int, ...]
    tags: Any  # decoded tags, or None
    executes: str
    reverses: str
    linked_to: str

    @classmethod
    def from_pb(cls, e: audit_trail_pb.AuditEvent) -> AuditEvent:
        return cls(
            e.position,
            e.time_ms,
            e.actor,
            e.role,
            e.operation,
            e.kind,
            _OUTCOME_NAMES.get(e.outcome, "unspecified"),
            e.code,
            e.control,
            e.message,
            e.client_id,
            e.policy_version if e.HasField("policy_version") else None,
            e.currency,
            e.amount_minor if e.HasField("amount_minor") else None,
            tuple(e.account_ids),
            tuple(e.amounts_minor),
            msgspec.json.decode(e.tags_json) if e.tags_json else None,
            e.executes,
            e.reverses,
            e.linked_to,
        )


_STATUS_NAMES: Final = {
    common_pb.RESULT_STATUS_ACCEPTED: "accepted",
    common_pb.RESULT_STATUS_REPLAYED: "replayed",
    common_pb.RESULT_STATUS_REFUSED: "refused",
    common_pb.RESULT_STATUS_INVALID: "invalid",
    common_pb.RESULT_STATUS_PENDING_APPROVAL: "pending",
}
_INSTRUCTION_TYPES: Final[dict[str, type[Message]]] = {
    "open_account": common_pb.OpenAccount,
    "freeze_account": common_pb.FreezeAccount,
    "unfreeze_account": common_pb.UnfreezeAccount,
    "close_account": common_pb.CloseAccount,
    "deposit": common_pb.Deposit,
    "transfer": common_pb.Transfer,
    "charge_fee": common_pb.ChargeFee,
    "top_up_shortfall": common_pb.TopUpShortfall,
    "place_hold": common_pb.PlaceHold,
    "capture_hold": common_pb.CaptureHold,
    "release_hold": common_pb.ReleaseHold,
    "expire_holds": common_pb.ExpireHolds,
    "request_withdrawal": common_pb.RequestWithdrawal,
    "settle_withdrawal": common_pb.SettleWithdrawal,
    "fail_withdrawal": common_pb.FailWithdrawal,
    "reverse": common_pb.Reverse,
    "register_key": common_pb.RegisterKey,
    "reset_key": common_pb.ResetKey,
    "bind_payee": common_pb.BindPayee,
    "grant_standing": common_pb.GrantStanding,
    "revoke_standing": common_pb.RevokeStanding,
    "set_policy": common_pb.SetPolicy,
    "set_gate": common_pb.SetGate,
    "approve_request": common_pb.ApproveRequest,
    "reject_request": common_pb.RejectRequest,
    "acknowledge_alert": common_pb.AcknowledgeAlert,
    "close_alert": common_pb.CloseAlert,
}
_ENUM_PREFIX: Final = {
    "kind": (common_pb.AccountKind, "ACCOUNT_KIND_"),
    "role": (common_pb.CustomerRole, "CUSTOMER_ROLE_"),
    "purpose": (common_pb.TransferPurpose, "TRANSFER_PURPOSE_"),
    "holder_type": (common_pb.HolderType, "HOLDER_TYPE_"),
    "gate": (common_pb.PlatformGate, "PLATFORM_GATE_"),
}
_GATE_NAMES: Final = {v: k for k, v in translate.GATE_TO_WIRE.items()}


def _enum_value(name: str, value: Any) -> Any:
    if name in _ENUM_PREFIX and isinstance(value, str):
        enum, prefix = _ENUM_PREFIX[name]
        return enum.Value(prefix + value.upper())
    if name == "authorisation" and isinstance(value, Mapping):
        return common_pb.Authorisation(**value)
    if name == "policy_json" and isinstance(value, Policy):
        return encode_policy(value)
    return value


def instruction_message(op: str, **fields: Any) -> Message:
    """An instruction message from the domain's op name, with enums given as plain words
    (`kind="customer"`), `authorisation` as a message or a mapping, `policy_json` as a Policy or
    bytes."""
    cls = _INSTRUCTION_TYPES[op]
    values = {k: _enum_value(k, v) for k, v in fields.items() if v is not None}
    return cls(**values)


# -- customer signatures ---------------------------------------------------------------------


def customer_public_key(private_key: Ed25519PrivateKey) -> str:
    """The public key to register for a customer (OpenAccount / RegisterKey): base64url."""
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return b64url_encode(raw)


def authorisation_payload(platform_id: str, message: Message) -> bytes:
    """The exact bytes the customer signs for this instruction message on `platform_id`.

    The message is translated into the ledger's command by the server's own translation
    (`ledger.api.translate`), so the bytes are those the server verifies: the prefix
    `custody-authorisation/v1`, the platform id, and the command's canonical JSON without its
    `client_id` and without `auth.signature`. Raises WireError for a message the server would
    refuse as malformed.
    """
    command = translate.command_of(message)
    return _authorisation_payload(platform_id, msgspec.to_builtins(command))


def sign_instruction(
    platform_id: str,
    message: M,
    private_key: Ed25519PrivateKey,
    *,
    nonce: str | None = None,
    expires_at_ms: int | None = None,
    ttl_ms: int = DEFAULT_AUTH_TTL_MS,
) -> M:
    """A copy of the instruction `message` carrying the customer's signature.

    Sets `authorisation.nonce` (random unless given; never reuse one for the same account) and
    `authorisation.expires_at_ms` (now + `ttl_ms` unless given), then signs the authorisation
    payload with `private_key`. Change nothing in the message afterwards except `client_id`.
    """
    signed = type(message)()
    signed.CopyFrom(message)
    auth = signed.authorisation  # type: ignore[attr-defined]
    auth.Clear()
    auth.nonce = nonce if nonce is not None else secrets.token_urlsafe(18)
    auth.expires_at_ms = (
        expires_at_ms if expires_at_ms is not None else time.time_ns() // 1_000_000 + ttl_ms
    )
    auth.signature = b64url_encode(private_key.sign(authorisation_payload(platform_id, signed)))
    return signed


def instruction(op: str, **fields: Any) -> common_pb.Instruction:
    """One batch item, e.g. `instruction("transfer", client_id=..., amount_minor=5, ...)`."""
    item = common_pb.Instruction()
    getattr(item, op).CopyFrom(instruction_message(op, **fields))
    return item


def _receipt(r: common_pb.Receipt) -> Receipt:
    status = _STATUS_NAMES.get(r.status, "unspecified")
    return Receipt(r.client_id, status == "replayed", r.position, r.kind, status, r.request_id)


_LEVEL_NAMES: Final = {
    alert_pb.ALERT_LEVEL_GREEN: "GREEN",
    alert_pb.ALERT_LEVEL_YELLOW: "YELLOW",
    alert_pb.ALERT_LEVEL_ORANGE: "ORANGE",
    alert_pb.ALERT_LEVEL_RED: "RED",
}
_ALERT_STATUS_NAMES: Final = {
    alert_pb.ALERT_STATUS_RAISED: "raised",
    alert_pb.ALERT_STATUS_ACKNOWLEDGED: "acknowledged",
    alert_pb.ALERT_STATUS_CLOSED: "closed",
}
_STEP_NAMES: Final = {
    alert_pb.ALERT_STEP_RAISED: "raised",
    alert_pb.ALERT_STEP_ACKNOWLEDGED: "acknowledged",
    alert_pb.ALERT_STEP_CLOSED: "closed",
}


@dataclass(frozen=True)
class AlertInfo:
    """An early-warning alert and where it is in its lifecycle."""

    alert_id: str
    rule: str
    level: str  # GREEN | YELLOW | ORANGE | RED
    subject: str
    summary: str
    status: str  # raised | acknowledged | closed
    raised_position: int
    raised_time_ms: int
    raised_by: str

    @classmethod
    def from_pb(cls, a: alert_pb.Alert) -> AlertInfo:
        return cls(
            a.alert_id,
            a.rule,
            _LEVEL_NAMES.get(a.level, ""),
            a.subject,
            a.summary,
            _ALERT_STATUS_NAMES.get(a.status, ""),
            a.raised_position,
            a.raised_time_ms,
            a.raised_by,
        )


@dataclass(frozen=True)
class AlertEvent:
    """One alert record of the log (StreamAlerts)."""

    position: int
    time_ms: int
    step: str  # raised | acknowledged | closed
    alert_id: str
    level: str
    rule: str
    subject: str
    actor: str
    text: str  # summary, note or reason
    record: bytes


@dataclass(frozen=True)
class CustomerProof:
    """A customer's custody-pol-proof/v1 file (it carries the salt: keep it private)."""

    proof_json: bytes  # the file, byte for byte
    snapshot_size: int
    position: int

    @property
    def proof(self) -> dict[str, Any]:
        decoded: dict[str, Any] = msgspec.json.decode(self.proof_json)
        return decoded


def disclosure_period(
    day: str | None = None,
    month: str | None = None,
    from_ms: int | None = None,
    to_ms: int | None = None,
) -> disclosure_pb.DisclosurePeriod:
    """Exactly one of a day (YYYY-MM-DD), a month (YYYY-MM) or a range [from_ms, to_ms)."""
    given = [x is not None for x in (day, month, from_ms)]
    if sum(given) != 1 or (from_ms is None) != (to_ms is None):
        raise ValueError("give exactly one of day=, month= or from_ms= with to_ms=")
    if day is not None:
        return disclosure_pb.DisclosurePeriod(day=day)
    if month is not None:
        return disclosure_pb.DisclosurePeriod(month=month)
    assert from_ms is not None and to_ms is not None
    return disclosure_pb.DisclosurePeriod(
        range=disclosure_pb.DisclosureRange(from_ms=from_ms, to_ms=to_ms)
    )


def _formats(html: bool, csv: bool) -> list[disclosure_pb.DisclosureFormat.ValueType]:
    out: list[disclosure_pb.DisclosureFormat.ValueType] = []
    if html:
        out.append(disclosure_pb.DISCLOSURE_FORMAT_HTML)
    if csv:
        out.append(disclosure_pb.DISCLOSURE_FORMAT_CSV)
    return out


def _tls_failure(error: CustodyError) -> bool:
    text = error.message.lower()
    return any(hint in text for hint in _TLS_FAILURE_HINTS)


def _redirect_limit(error: CustodyError, max_redirects: int) -> CustodyError:
    return CustodyError(
        grpc.StatusCode.UNAVAILABLE,
        REDIRECT_LIMIT,
        f"still redirected after {max_redirects} redirects ({error.message}); nothing was "
        "written by this call's last attempt: retry with the same client ids",
        domain=error.domain,
        metadata=dict(error.metadata),
        retry_delay_s=error.retry_delay_s,
    )


_STUB_ATTRS: Final = (
    "platforms",
    "accounts",
    "movements",
    "holds",
    "queries",
    "log",
    "audit",
    "customers",
    "policies",
    "approvals",
    "disclosures",
    "liabilities",
    "alerts",
)


class CustodyClient:
    """`dial(target) -> channel` (set by `mtls` / `insecure_dev`, with the same credentials for
    every target) lets the client follow `WRITER_ELSEWHERE` redirects; a client built on a bare
    channel without `dial` cannot, and raises them as `CustodyError` (the writer's address is in
    `metadata["address"]`). `target` is the address the client was built for (its home)."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        platform_id: str = "",
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 0.05,
        target: str = "",
        dial: Callable[[str], grpc.Channel] | None = None,
        follow_redirects: bool = True,
        max_redirects: int = MAX_REDIRECTS_DEFAULT,
    ) -> None:
        if max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        self.platform_id = platform_id
        self.metadata = tuple(metadata)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.follow_redirects = follow_redirects
        self.max_redirects = max_redirects
        self.home = target
        self.target = target  # where calls go now (after a redirect: the writer's address)
        self.redirects = 0  # redirects followed over the client's life (for callers' figures)
        self._dial = dial
        self._lock = threading.Lock()
        # every channel opened, by target, closed with the client (a call in flight on another
        # thread keeps its channel when this client follows a redirect)
        self._channels: dict[str, grpc.Channel] = {target: channel}
        self._rpc_names: dict[Any, tuple[str, str]] = {}
        self._bind(channel)

    def _bind(self, channel: grpc.Channel) -> None:
        """Point the service stubs (`self.movements`, ...) at `channel`."""
        self.channel = channel
        self.platforms = platform_grpc.PlatformServiceStub(channel)
        self.accounts = account_grpc.AccountServiceStub(channel)
        self.movements = movement_grpc.MovementServiceStub(channel)
        self.holds = hold_grpc.HoldServiceStub(channel)
        self.queries = query_grpc.QueryServiceStub(channel)
        self.log = log_grpc.LogServiceStub(channel)
        self.audit = audit_grpc.AuditServiceStub(channel)
        self.customers = customer_grpc.CustomerServiceStub(channel)
        self.policies = policy_grpc.PolicyServiceStub(channel)
        self.approvals = approval_grpc.ApprovalServiceStub(channel)
        self.disclosures = disclosure_grpc.DisclosureServiceStub(channel)
        self.liabilities = liabilities_grpc.LiabilitiesServiceStub(channel)
        self.alerts = alert_grpc.AlertServiceStub(channel)
        # each bound method -> (stub attribute, method), to find it again on another channel
        names: dict[Any, tuple[str, str]] = {}
        for attr in _STUB_ATTRS:
            for method, multicallable in vars(getattr(self, attr)).items():
                names[multicallable] = (attr, method)
        self._rpc_names = names

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def channel_options() -> list[tuple[str, Any]]:
        return [("grpc.max_receive_message_length", 16 * 1024 * 1024)]

    @classmethod
    def mtls(
        cls,
        target: str,
        ca_cert: Path,
        client_cert: Path,
        client_key: Path,
        *,
        server_name: str | None = None,
        **kwargs: Any,
    ) -> CustodyClient:
        """Mutual TLS. The server's certificate must name the host of `target` (and of every
        address a redirect leads to), unless `server_name` is given: then every server,
        including redirect targets, must present a certificate for that name."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_cert).read_bytes(),
            private_key=Path(client_key).read_bytes(),
            certificate_chain=Path(client_cert).read_bytes(),
        )
        options = cls.channel_options()
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))

        def dial(address: str) -> grpc.Channel:
            return grpc.secure_channel(address, credentials, options=options)

        return cls(dial(target), target=target, dial=dial, **kwargs)

    @classmethod
    def insecure_dev(cls, target: str, role: str, name: str, **kwargs: Any) -> CustodyClient:
        """Development mode only: the identity is sent as headers (the server must be loopback)."""
        header = "x-custody-platform" if role == "platform" else "x-custody-name"
        metadata = [("x-custody-role", role), (header, name)]
        options = cls.channel_options()

        def dial(address: str) -> grpc.Channel:
            return grpc.insecure_channel(address, options=options)

        return cls(dial(target), metadata=metadata, target=target, dial=dial, **kwargs)

    def close(self) -> None:
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()

    def __enter__(self) -> CustodyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def use_target(self, target: str) -> None:
        """Send the following calls to `target` (same credentials; needs `dial`)."""
        if self._dial is None:
            raise ValueError("this client was built on a bare channel: it cannot change target")
        with self._lock:
            channel = self._channels.get(target)
            if channel is None:
                channel = self._dial(target)
                self._channels[target] = channel
            self.target = target
            self._bind(channel)

    def _call(self, rpc: Callable[..., M], request: Message, timeout_s: float | None = None) -> M:
        """One unary call with a deadline; UNAVAILABLE / OVERLOADED are retried unchanged, and a
        WRITER_ELSEWHERE answer is followed (see `_redirect`).

        Every attempt has the call's timeout as its deadline; no new attempt (retry, redirect,
        wait for a writer) starts once the call's own time is up, and waits never outlast it.
        """
        timeout = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout
        name = self._rpc_names.get(rpc)
        attempt = 0
        hops = 0
        while True:
            try:
                return rpc(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = CustodyError.from_rpc_error(exc)
                if error.reason == WRITER_ELSEWHERE and error.domain == DOMAIN:
                    if not self.follow_redirects or self._dial is None or name is None:
                        raise error from None
                    if hops >= self.max_redirects:
                        raise _redirect_limit(error, self.max_redirects) from None
                    hops += 1
                    address = error.metadata.get("address", "")
                    if address and address != self.target:
                        rpc = self._redirect(address, name)
                        continue
                    # nobody writes the platform now (or the answer names this very server): wait
                    delay = error.retry_delay_s if error.retry_delay_s is not None else 1.0
                    if time.monotonic() + delay >= deadline:
                        raise error from None
                    time.sleep(delay)
                    continue
                redirected = self.target != self.home and self._dial is not None
                if redirected and error.transport and _tls_failure(error):
                    raise self._untrusted(error) from None
                if not error.retryable or attempt >= self.retries:
                    if redirected and error.transport:
                        raise self._unreachable(error) from None
                    raise error from None
                delay = (error.retry_delay_s or self.backoff_s * (2**attempt)) * (
                    0.5 + random.random()
                )
                if time.monotonic() + delay >= deadline:
                    if redirected and error.transport:
                        raise self._unreachable(error) from None
                    raise error from None
                time.sleep(delay)
                attempt += 1

    def _redirect(self, address: str, name: tuple[str, str]) -> Callable[..., Any]:
        """Connect to `address` (the platform's writer) and return the same method there."""
        self.use_target(address)
        self.redirects += 1
        service, method = name
        return getattr(getattr(self, service), method)  # type: ignore[no-any-return]

    def _unreachable(self, error: CustodyError) -> CustodyError:
        """The server a redirect led to does not answer (it stopped or died): go home for the
        next call, and say so. Retryable: a write may or may not have committed there, and the
        same client ids make a retry safe (REPLAYED if it did)."""
        gone = self.target
        self.use_target(self.home)
        return CustodyError(
            error.code,
            error.reason,
            f"the writer this client was redirected to ({gone}) is unreachable: {error.message}; "
            f"retry with the same client ids (the next call goes to {self.home})",
            domain=error.domain,
            metadata={**error.metadata, "address": gone},
        )

    def _untrusted(self, error: CustodyError) -> CustodyError:
        """A redirect target whose certificate does not cover its address: verification is never
        relaxed; the operators must fix the certificate or the advertised address."""
        bad = self.target
        self.use_target(self.home)
        return CustodyError(
            grpc.StatusCode.UNAVAILABLE,
            REDIRECT_NOT_TRUSTED,
            f"redirected to {bad}, whose TLS certificate does not cover that address "
            f"({error.message}); nothing was written. The writer's CUSTODY_ADVERTISE must be a "
            "name or IP address in its server certificate (or give server_name=)",
            metadata={"address": bad},
        )

    def _pid(self, platform_id: str | None) -> str:
        return self.platform_id if platform_id is None else platform_id

    def _signing_platform(self, platform_id: str | None) -> str:
        pid = self._pid(platform_id)
        if not pid:
            raise ValueError(
                "signing needs the platform id: pass platform_id= or set CustodyClient.platform_id"
            )
        return pid

    def _write(
        self,
        rpc: Callable[..., Any],
        request_cls: type[Message],
        op: str,
        platform_id: str | None,
        *,
        sign_with: Ed25519PrivateKey | None = None,
        **fields: Any,
    ) -> Receipt:
        """One instruction. `sign_with`: the customer's key; the instruction is signed here
        (see `sign_instruction`). `authorisation=` passes consent obtained elsewhere."""
        message = instruction_message(op, **fields)
        if sign_with is not None:
            message = sign_instruction(self._signing_platform(platform_id), message, sign_with)
        request = request_cls(platform_id=self._pid(platform_id), instruction=message)
        return _receipt(self._call(rpc, request).receipt)

    # -- platforms ------------------------------------------------------------------------------

    def create_platform(
        self, platform_id: str, name: str, *, policy: Policy | bytes | None = None
    ) -> Receipt:
        """Create a platform; `policy` is its version 0 (a Policy or its JSON document), None
        for the built-in default (strict)."""
        policy_json = encode_policy(policy) if isinstance(policy, Policy) else policy or b""
        answer = self._call(
            self.platforms.CreatePlatform,
            platform_pb.CreatePlatformRequest(
                platform_id=platform_id, name=name, policy_json=policy_json
            ),
        )
        return _receipt(answer.receipt)

    # -- accounts -------------------------------------------------------------------------------

    def open_account(
        self,
        client_id: str,
        account_id: str,
        *,
        kind: str,
        currency: str,
        role: str | None = None,
        holder_name: str | None = None,
        holder_type: str | None = None,
        public_key: str = "",
        platform_id: str | None = None,
    ) -> Receipt:
        """`public_key`: the customer's Ed25519 key (`customer_public_key`), registered now."""
        return self._write(
            self.accounts.OpenAccount,
            account_pb.OpenAccountRequest,
            "open_account",
            platform_id,
            client_id=client_id,
            account_id=account_id,
            kind=kind,
            currency=currency,
            role=role,
            holder_name=holder_name,
            holder_type=holder_type,
            public_key=public_key,
        )

    def freeze_account(
        self, client_id: str, account_id: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.accounts.FreezeAccount,
            account_pb.FreezeAccountRequest,
            "freeze_account",
            platform_id,
            client_id=client_id,
            account_id=account_id,
            reason=reason,
        )

    def unfreeze_account(
        self, client_id: str, account_id: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.accounts.UnfreezeAccount,
            account_pb.UnfreezeAccountRequest,
            "unfreeze_account",
            platform_id,
            client_id=client_id,
            account_id=account_id,
            reason=reason,
        )

    def close_account(
        self, client_id: str, account_id: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.accounts.CloseAccount,
            account_pb.CloseAccountRequest,
            "close_account",
            platform_id,
            client_id=client_id,
            account_id=account_id,
        )

    def get_account(self, account_id: str, *, platform_id: str | None = None) -> Any:
        request = account_pb.GetAccountRequest(
            platform_id=self._pid(platform_id), account_id=account_id
        )
        return self._call(self.accounts.GetAccount, request).account

    def list_accounts(
        self, page_size: int = 0, page_token: str = "", *, platform_id: str | None = None
    ) -> Page:
        request = account_pb.ListAccountsRequest(
            platform_id=self._pid(platform_id), page_size=page_size, page_token=page_token
        )
        answer = self._call(self.accounts.ListAccounts, request)
        return Page(list(answer.accounts), answer.next_page_token)

    def iter_accounts(
        self,
        page_size: int = 0,
        *,
        platform_id: str | None = None,
        max_pages: int = MAX_PAGES_DEFAULT,
    ) -> Iterator[Any]:
        return walk_pages(
            lambda token: self.list_accounts(page_size, token, platform_id=platform_id),
            max_pages,
        )

    # -- movements ------------------------------------------------------------------------------

    def deposit(
        self,
        client_id: str,
        mirror_account_id: str,
        account_id: str,
        amount_minor: int,
        currency: str,
        bank_ref: str = "",
        *,
        platform_id: str | None = None,
    ) -> Receipt:
        return self._write(
            self.movements.Deposit,
            movement_pb.DepositRequest,
            "deposit",
            platform_id,
            client_id=client_id,
            mirror_account_id=mirror_account_id,
            account_id=account_id,
            amount_minor=amount_minor,
            currency=currency,
            bank_ref=bank_ref,
        )

    def transfer(
        self,
        client_id: str,
        from_account_id: str,
        to_account_id: str,
        amount_minor: int,
        currency: str,
        purpose: str = "transfer",
        *,
        platform_id: str | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        authorisation: common_pb.Authorisation | Mapping[str, Any] | None = None,
    ) -> Receipt:
        """`sign_with`: the payer's key (signed here); or `authorisation`: a signature made
        elsewhere over the same instruction, or `{"standing_id": ...}`."""
        return self._write(
            self.movements.Transfer,
            movement_pb.TransferRequest,
            "transfer",
            platform_id,
            sign_with=sign_with,
            client_id=client_id,
            from_account_id=from_account_id,
            to_account_id=to_account_id,
            amount_minor=amount_minor,
            currency=currency,
            purpose=purpose,
            authorisation=authorisation,
        )

    def charge_fee(
        self,
        client_id: str,
        from_account_id: str,
        to_account_id: str,
        amount_minor: int,
        currency: str,
        fee_code: str,
        *,
        platform_id: str | None = None,
    ) -> Receipt:
        return self._write(
            self.movements.ChargeFee,
            movement_pb.ChargeFeeRequest,
            "charge_fee",
            platform_id,
            client_id=client_id,
            from_account_id=from_account_id,
            to_account_id=to_account_id,
            amount_minor=amount_minor,
            currency=currency,
            fee_code=fee_code,
        )

    def top_up_shortfall(
        self,
        client_id: str,
        from_account_id: str,
        to_account_id: str,
        amount_minor: int,
        currency: str,
        reason: str,
        *,
        platform_id: str | None = None,
    ) -> Receipt:
        return self._write(
            self.movements.TopUpShortfall,
            movement_pb.TopUpShortfallRequest,
            "top_up_shortfall",
            platform_id,
            client_id=client_id,
            from_account_id=from_account_id,
            to_account_id=to_account_id,
            amount_minor=amount_minor,
            currency=currency,
            reason=reason,
        )

    def reverse(
        self, client_id: str, movement_id: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.movements.Reverse,
            movement_pb.ReverseRequest,
            "reverse",
            platform_id,
            client_id=client_id,
            movement_id=movement_id,
            reason=reason,
        )

    def submit_batch(
        self,
        instructions: Sequence[common_pb.Instruction],
        *,
        linked: bool = False,
        platform_id: str | None = None,
        timeout_s: float | None = None,
    ) -> list[ItemResult]:
        request = movement_pb.SubmitBatchRequest(
            platform_id=self._pid(platform_id), linked=linked, instructions=instructions
        )
        answer = self._call(self.movements.SubmitBatch, request, timeout_s)
        return [
            ItemResult(
                r.client_id,
                _STATUS_NAMES.get(r.status, "unspecified"),
                r.position,
                r.kind,
                r.reason,
                r.control,
                r.message,
                r.field,
                r.request_id,
            )
            for r in answer.results
        ]

    # -- holds and withdrawals ------------------------------------------------------------------

    def place_hold(
        self,
        client_id: str,
        from_account_id: str,
        to_account_id: str,
        amount_minor: int,
        currency: str,
        reason: str,
        expires_at_ms: int,
        *,
        owner_ref: str = "",
        platform_id: str | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        authorisation: common_pb.Authorisation | Mapping[str, Any] | None = None,
    ) -> Receipt:
        return self._write(
            self.holds.PlaceHold,
            hold_pb.PlaceHoldRequest,
            "place_hold",
            platform_id,
            sign_with=sign_with,
            client_id=client_id,
            from_account_id=from_account_id,
            to_account_id=to_account_id,
            amount_minor=amount_minor,
            currency=currency,
            reason=reason,
            expires_at_ms=expires_at_ms,
            owner_ref=owner_ref,
            authorisation=authorisation,
        )

    def capture_hold(
        self,
        client_id: str,
        hold_id: str,
        amount_minor: int,
        *,
        owner_ref: str = "",
        platform_id: str | None = None,
    ) -> Receipt:
        return self._write(
            self.holds.CaptureHold,
            hold_pb.CaptureHoldRequest,
            "capture_hold",
            platform_id,
            client_id=client_id,
            hold_id=hold_id,
            amount_minor=amount_minor,
            owner_ref=owner_ref,
        )

    def release_hold(
        self,
        client_id: str,
        hold_id: str,
        reason: str,
        *,
        owner_ref: str = "",
        platform_id: str | None = None,
    ) -> Receipt:
        return self._write(
            self.holds.ReleaseHold,
            hold_pb.ReleaseHoldRequest,
            "release_hold",
            platform_id,
            client_id=client_id,
            hold_id=hold_id,
            reason=reason,
            owner_ref=owner_ref,
        )

    def expire_holds(
        self, client_id: str, max_holds: int = 1000, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.holds.ExpireHolds,
            hold_pb.ExpireHoldsRequest,
            "expire_holds",
            platform_id,
            client_id=client_id,
            max_holds=max_holds,
        )

    def request_withdrawal(
        self,
        client_id: str,
        account_id: str,
        mirror_account_id: str,
        amount_minor: int,
        currency: str,
        payee_ref: str,
        expires_at_ms: int,
        *,
        platform_id: str | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        authorisation: common_pb.Authorisation | Mapping[str, Any] | None = None,
    ) -> Receipt:
        return self._write(
            self.holds.RequestWithdrawal,
            hold_pb.RequestWithdrawalRequest,
            "request_withdrawal",
            platform_id,
            sign_with=sign_with,
            client_id=client_id,
            account_id=account_id,
            mirror_account_id=mirror_account_id,
            amount_minor=amount_minor,
            currency=currency,
            payee_ref=payee_ref,
            expires_at_ms=expires_at_ms,
            authorisation=authorisation,
        )

    def settle_withdrawal(
        self,
        client_id: str,
        withdrawal_id: str,
        bank_ref: str = "",
        *,
        platform_id: str | None = None,
    ) -> Receipt:
        return self._write(
            self.holds.SettleWithdrawal,
            hold_pb.SettleWithdrawalRequest,
            "settle_withdrawal",
            platform_id,
            client_id=client_id,
            withdrawal_id=withdrawal_id,
            bank_ref=bank_ref,
        )

    def fail_withdrawal(
        self, client_id: str, withdrawal_id: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.holds.FailWithdrawal,
            hold_pb.FailWithdrawalRequest,
            "fail_withdrawal",
            platform_id,
            client_id=client_id,
            withdrawal_id=withdrawal_id,
            reason=reason,
        )

    # -- customers: keys, payout accounts, standing authorisations -----------------------------

    def register_customer_key(
        self,
        client_id: str,
        account_id: str,
        public_key: str,
        *,
        platform_id: str | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        authorisation: common_pb.Authorisation | Mapping[str, Any] | None = None,
    ) -> Receipt:
        """A first key needs no signature; a rotation is signed by the current key."""
        return self._write(
            self.customers.RegisterCustomerKey,
            customer_pb.RegisterCustomerKeyRequest,
            "register_key",
            platform_id,
            sign_with=sign_with,
            client_id=client_id,
            account_id=account_id,
            public_key=public_key,
            authorisation=authorisation,
        )

    def bind_payee(
        self,
        client_id: str,
        account_id: str,
        payee_ref: str,
        bank_account: str,
        holder_name: str,
        *,
        platform_id: str | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        authorisation: common_pb.Authorisation | Mapping[str, Any] | None = None,
    ) -> Receipt:
        return self._write(
            self.customers.BindPayee,
            customer_pb.BindPayeeRequest,
            "bind_payee",
            platform_id,
            sign_with=sign_with,
            client_id=client_id,
            account_id=account_id,
            payee_ref=payee_ref,
            bank_account=bank_account,
            holder_name=holder_name,
            authorisation=authorisation,
        )

    def grant_standing_authorisation(
        self,
        client_id: str,
        account_id: str,
        standing_id: str,
        purpose: str,
        per_txn_max_minor: int,
        valid_until_ms: int,
        *,
        payee_account_id: str = "",
        platform_id: str | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        authorisation: common_pb.Authorisation | Mapping[str, Any] | None = None,
    ) -> Receipt:
        return self._write(
            self.customers.GrantStandingAuthorisation,
            customer_pb.GrantStandingAuthorisationRequest,
            "grant_standing",
            platform_id,
            sign_with=sign_with,
            client_id=client_id,
            account_id=account_id,
            standing_id=standing_id,
            purpose=purpose,
            payee_account_id=payee_account_id,
            per_txn_max_minor=per_txn_max_minor,
            valid_until_ms=valid_until_ms,
            authorisation=authorisation,
        )

    def revoke_standing_authorisation(
        self, client_id: str, account_id: str, standing_id: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.customers.RevokeStandingAuthorisation,
            customer_pb.RevokeStandingAuthorisationRequest,
            "revoke_standing",
            platform_id,
            client_id=client_id,
            account_id=account_id,
            standing_id=standing_id,
        )

    def reset_customer_key(
        self,
        client_id: str,
        account_id: str,
        public_key: str,
        reason: str,
        *,
        platform_id: str | None = None,
    ) -> Receipt:
        """Operators: answered pending; a checker approves the reset."""
        return self._write(
            self.customers.ResetCustomerKey,
            customer_pb.ResetCustomerKeyRequest,
            "reset_key",
            platform_id,
            client_id=client_id,
            account_id=account_id,
            public_key=public_key,
            reason=reason,
        )

    # -- policy and gate ------------------------------------------------------------------------

    def get_policy(self, *, platform_id: str | None = None) -> PolicyInfo:
        request = policy_pb.GetPolicyRequest(platform_id=self._pid(platform_id))
        answer = self._call(self.policies.GetPolicy, request)
        return PolicyInfo(
            decode_policy(answer.policy_json),
            answer.policy_json,
            answer.version,
            _GATE_NAMES.get(answer.gate, "UNSPECIFIED"),
            answer.as_of_position,
        )

    def propose_policy(
        self, client_id: str, policy: Policy | bytes, *, platform_id: str | None = None
    ) -> Receipt:
        """Operators: the next version (current + 1); answered pending for a checker."""
        return self._write(
            self.policies.ProposePolicy,
            policy_pb.ProposePolicyRequest,
            "set_policy",
            platform_id,
            client_id=client_id,
            policy_json=policy,
        )

    def set_platform_gate(
        self, client_id: str, gate: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        """Operators: NORMAL | RESTRICTED | WIND_DOWN | FROZEN; answered pending."""
        return self._write(
            self.policies.SetPlatformGate,
            policy_pb.SetPlatformGateRequest,
            "set_gate",
            platform_id,
            client_id=client_id,
            gate=gate,
            reason=reason,
        )

    # -- maker-checker --------------------------------------------------------------------------

    def list_requests(
        self,
        status: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        *,
        platform_id: str | None = None,
    ) -> Page:
        """Requests in log order; `status`: pending | approved | rejected | expired."""
        request = approval_pb.ListRequestsRequest(
            platform_id=self._pid(platform_id),
            status=approval_pb.ApprovalStatus.Value(f"APPROVAL_STATUS_{status.upper()}")
            if status
            else approval_pb.APPROVAL_STATUS_UNSPECIFIED,
            page_size=page_size,
            page_token=page_token,
        )
        answer = self._call(self.approvals.ListRequests, request)
        return Page(list(answer.requests), answer.next_page_token)

    def iter_requests(
        self,
        status: str | None = None,
        page_size: int = 0,
        *,
        platform_id: str | None = None,
        max_pages: int = MAX_PAGES_DEFAULT,
    ) -> Iterator[Any]:
        return walk_pages(
            lambda token: self.list_requests(status, page_size, token, platform_id=platform_id),
            max_pages,
        )

    def get_request(self, request_id: str, *, platform_id: str | None = None) -> Any:
        request = approval_pb.GetRequestRequest(
            platform_id=self._pid(platform_id), request_id=request_id
        )
        return self._call(self.approvals.GetRequest, request).request

    def approve_request(
        self, client_id: str, request_id: str, *, platform_id: str | None = None
    ) -> Receipt:
        """Checkers: executes the request; the receipt is the executed instruction's record."""
        return self._write(
            self.approvals.ApproveRequest,
            approval_pb.ApproveRequestRequest,
            "approve_request",
            platform_id,
            client_id=client_id,
            request_id=request_id,
        )

    def reject_request(
        self, client_id: str, request_id: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.approvals.RejectRequest,
            approval_pb.RejectRequestRequest,
            "reject_request",
            platform_id,
            client_id=client_id,
            request_id=request_id,
            reason=reason,
        )

    # -- queries --------------------------------------------------------------------------------

    def get_balance(self, account_id: str, *, platform_id: str | None = None) -> Any:
        request = query_pb.GetBalanceRequest(
            platform_id=self._pid(platform_id), account_id=account_id
        )
        return self._call(self.queries.GetBalance, request).balance

    def list_balances(
        self, page_size: int = 0, page_token: str = "", *, platform_id: str | None = None
    ) -> Page:
        request = query_pb.ListBalancesRequest(
            platform_id=self._pid(platform_id), page_size=page_size, page_token=page_token
        )
        answer = self._call(self.queries.ListBalances, request)
        return Page(list(answer.balances), answer.next_page_token)

    def iter_balances(
        self,
        page_size: int = 0,
        *,
        platform_id: str | None = None,
        max_pages: int = MAX_PAGES_DEFAULT,
    ) -> Iterator[Any]:
        return walk_pages(
            lambda token: self.list_balances(page_size, token, platform_id=platform_id),
            max_pages,
        )

    # -- statements, as-of balances, the audit trail (from the read models) ---------------------

    def get_statement(
        self,
        account_id: str,
        *,
        from_time_ms: int | None = None,
        to_time_ms: int | None = None,
        kinds: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
        platform_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Page:
        """One page of the account's statement (`StatementLine`s, oldest first). Times are
        Unix ms, inclusive. Pass the answer's `next_page_token` with the same filters for the
        next page; every page of the walk is `as_of_position`."""
        request = query_pb.GetStatementRequest(
            platform_id=self._pid(platform_id),
            account_id=account_id,
            from_time_ms=from_time_ms,
            to_time_ms=to_time_ms,
            kinds=kinds,
            page_size=page_size,
            page_token=page_token,
        )
        answer = self._call(self.queries.GetStatement, request, timeout_s)
        return Page(
            [StatementLine.from_pb(line) for line in answer.lines],
            answer.next_page_token,
            answer.as_of_position,
            answer.currency,
        )

    def iter_statement(
        self,
        account_id: str,
        *,
        from_time_ms: int | None = None,
        to_time_ms: int | None = None,
        kinds: Sequence[str] = (),
        page_size: int = 0,
        platform_id: str | None = None,
        max_pages: int = MAX_PAGES_DEFAULT,
    ) -> Iterator[StatementLine]:
        """Every line of the statement, page by page (PageCapReached past `max_pages`)."""
        return walk_pages(
            lambda token: self.get_statement(
                account_id,
                from_time_ms=from_time_ms,
                to_time_ms=to_time_ms,
                kinds=kinds,
                page_size=page_size,
                page_token=token,
                platform_id=platform_id,
            ),
            max_pages,
        )

    def get_balance_at(
        self,
        account_id: str,
        *,
        at_time_ms: int | None = None,
        at_position: int | None = None,
        platform_id: str | None = None,
        timeout_s: float | None = None,
    ) -> BalanceAt:
        """The balance right after log position `at_position`, or after every record written
        at or before `at_time_ms`, or (neither) at the log's head when the call arrives."""
        if at_time_ms is not None and at_position is not None:
            raise ValueError("give at_time_ms or at_position, not both")
        request = query_pb.GetBalanceAtRequest(
            platform_id=self._pid(platform_id), account_id=account_id
        )
        if at_time_ms is not None:
            request.at_time_ms = at_time_ms
        if at_position is not None:
            request.at_position = at_position
        answer = self._call(self.queries.GetBalanceAt, request, timeout_s)
        b = answer.balance
        return BalanceAt(
            b.account_id,
            b.currency,
            b.posted_minor,
            b.held_minor,
            b.available_minor,
            b.as_of_position,
            answer.last_movement_position,
        )

    def list_audit_events(
        self,
        *,
        account_id: str = "",
        actor: str = "",
        role: str = "",
        operation: str = "",
        kind: str = "",
        code: str = "",
        outcome: str = "",
        from_time_ms: int | None = None,
        to_time_ms: int | None = None,
        from_position: int | None = None,
        to_position: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        platform_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Page:
        """One page of the audit trail (`AuditEvent`s in log order); every given filter must
        match. `outcome`: accepted | refused. Ranges are inclusive."""
        if outcome and outcome not in _OUTCOMES:
            raise ValueError("outcome is 'accepted' or 'refused'")
        request = audit_trail_pb.ListAuditEventsRequest(
            platform_id=self._pid(platform_id),
            account_id=account_id,
            actor=actor,
            role=role,
            operation=operation,
            kind=kind,
            code=code,
            outcome=_OUTCOMES.get(outcome, audit_trail_pb.AUDIT_OUTCOME_UNSPECIFIED),
            from_time_ms=from_time_ms,
            to_time_ms=to_time_ms,
            from_position=from_position,
            to_position=to_position,
            page_size=page_size,
            page_token=page_token,
        )
        answer = self._call(self.audit.ListAuditEvents, request, timeout_s)
        return Page(
            [AuditEvent.from_pb(e) for e in answer.events],
            answer.next_page_token,
            answer.as_of_position,
        )

    def iter_audit_events(
        self, *, max_pages: int = MAX_PAGES_DEFAULT, **filters: Any
    ) -> Iterator[AuditEvent]:
        """Every event matching `filters` (those of `list_audit_events`), page by page
        (PageCapReached past `max_pages`)."""
        filters.pop("page_token", None)
        return walk_pages(
            lambda token: self.list_audit_events(page_token=token, **filters), max_pages
        )

    # -- the log --------------------------------------------------------------------------------

    # -- audit: checkpoints, proofs, export ----------------------------------------------------

    def get_verifier_key(self, *, platform_id: str | None = None) -> str:
        request = audit_pb.GetVerifierKeyRequest(platform_id=self._pid(platform_id))
        return self._call(self.audit.GetVerifierKey, request).vkey

    def get_checkpoint(self, size: int = 0, *, platform_id: str | None = None) -> Any:
        """The latest signed checkpoint (size 0) or the one signed at exactly `size`."""
        request = audit_pb.GetCheckpointRequest(platform_id=self._pid(platform_id), size=size)
        return self._call(self.audit.GetCheckpoint, request).checkpoint

    def sign_checkpoint(self, *, platform_id: str | None = None) -> Any:
        request = audit_pb.SignCheckpointRequest(platform_id=self._pid(platform_id))
        return self._call(self.audit.SignCheckpoint, request).checkpoint

    def get_inclusion_proof(
        self, index: int, size: int = 0, *, platform_id: str | None = None
    ) -> Any:
        """(tlog_proof file bytes, record bytes, checkpoint size) for record `index`."""
        request = audit_pb.GetInclusionProofRequest(
            platform_id=self._pid(platform_id), index=index, size=size
        )
        return self._call(self.audit.GetInclusionProof, request)

    def get_consistency_proof(
        self, first: int, second: int, *, platform_id: str | None = None
    ) -> list[bytes]:
        request = audit_pb.GetConsistencyProofRequest(
            platform_id=self._pid(platform_id), first=first, second=second
        )
        return list(self._call(self.audit.GetConsistencyProof, request).hashes)

    def export_bundle(
        self, out: Any, *, platform_id: str | None = None, timeout_s: float = 600.0
    ) -> int:
        """Stream the export bundle into the binary file object `out`; returns bytes written."""
        request = audit_pb.ExportBundleRequest(platform_id=self._pid(platform_id))
        stream = self.audit.ExportBundle(request, timeout=timeout_s, metadata=self.metadata)
        written = 0
        try:
            for chunk in stream:
                out.write(chunk.data)
                written += len(chunk.data)
        except grpc.RpcError as exc:
            raise CustodyError.from_rpc_error(exc) from None
        return written

    def subscribe_log(
        self,
        start_position: int = 0,
        *,
        follow: bool = False,
        timeout_s: float | None = None,
        platform_id: str | None = None,
    ) -> Iterator[LogRecord]:
        """Records from `start_position` on; with `follow`, waits for new ones (until cancelled,
        `timeout_s`, or the server shuts down). Without `follow` the default deadline applies."""
        request = log_pb.SubscribeLogRequest(
            platform_id=self._pid(platform_id), start_position=start_position, follow=follow
        )
        timeout = timeout_s if (timeout_s is not None or follow) else self.timeout_s
        stream = self.log.SubscribeLog(request, timeout=timeout, metadata=self.metadata)
        try:
            for item in stream:
                yield LogRecord(item.position, item.kind, item.record, item.chain_hash)
        except grpc.RpcError as exc:
            raise CustodyError.from_rpc_error(exc) from None
        finally:
            stream.cancel()

    # -- disclosures ----------------------------------------------------------------------------

    def build_disclosure(
        self,
        *,
        day: str | None = None,
        month: str | None = None,
        from_ms: int | None = None,
        to_ms: int | None = None,
        checkpoint_size: int = 0,
        html: bool = False,
        csv: bool = False,
        platform_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Operators: build (or rebuild: same bytes) the snapshot of a period; a `Disclosure`
        with `json` (canonical, signed), `note`, and `html` / `csv` when asked for."""
        request = disclosure_pb.BuildDisclosureRequest(
            platform_id=self._pid(platform_id),
            period=disclosure_period(day, month, from_ms, to_ms),
            checkpoint_size=checkpoint_size,
            formats=_formats(html, csv),
        )
        return self._call(self.disclosures.BuildDisclosure, request, timeout_s).disclosure

    def get_disclosure(
        self,
        *,
        day: str | None = None,
        month: str | None = None,
        from_ms: int | None = None,
        to_ms: int | None = None,
        checkpoint_size: int = 0,
        html: bool = False,
        csv: bool = False,
        platform_id: str | None = None,
    ) -> Any:
        """A snapshot built before (the one at the largest checkpoint unless given)."""
        request = disclosure_pb.GetDisclosureRequest(
            platform_id=self._pid(platform_id),
            period=disclosure_period(day, month, from_ms, to_ms),
            checkpoint_size=checkpoint_size,
            formats=_formats(html, csv),
        )
        return self._call(self.disclosures.GetDisclosure, request).disclosure

    def list_disclosures(
        self, page_size: int = 0, page_token: str = "", *, platform_id: str | None = None
    ) -> Page:
        request = disclosure_pb.ListDisclosuresRequest(
            platform_id=self._pid(platform_id), page_size=page_size, page_token=page_token
        )
        answer = self._call(self.disclosures.ListDisclosures, request)
        return Page(list(answer.disclosures), answer.next_page_token)

    def iter_disclosures(
        self,
        page_size: int = 0,
        *,
        platform_id: str | None = None,
        max_pages: int = MAX_PAGES_DEFAULT,
    ) -> Iterator[Any]:
        return walk_pages(
            lambda token: self.list_disclosures(page_size, token, platform_id=platform_id),
            max_pages,
        )

    # -- proof of liabilities -------------------------------------------------------------------

    def get_liabilities_statement(
        self, currency: str = "", snapshot_size: int = 0, *, platform_id: str | None = None
    ) -> list[Any]:
        """Published statements (latest per currency unless `snapshot_size`), each with the
        record's tlog-proof against a signed checkpoint."""
        request = liabilities_pb.GetLiabilitiesStatementRequest(
            platform_id=self._pid(platform_id), currency=currency, snapshot_size=snapshot_size
        )
        return list(self._call(self.liabilities.GetLiabilitiesStatement, request).statements)

    def get_customer_proof(
        self,
        account_id: str,
        currency: str,
        snapshot_size: int = 0,
        *,
        platform_id: str | None = None,
    ) -> CustomerProof:
        """Platforms: the proof file of one of their customer accounts."""
        request = liabilities_pb.GetCustomerProofRequest(
            platform_id=self._pid(platform_id),
            account_id=account_id,
            currency=currency,
            snapshot_size=snapshot_size,
        )
        answer = self._call(self.liabilities.GetCustomerProof, request)
        return CustomerProof(answer.proof_json, answer.snapshot_size, answer.position)

    # -- alerts -----------------------------------------------------------------------------------

    def list_alerts(
        self,
        level: str | None = None,
        status: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        *,
        platform_id: str | None = None,
    ) -> Page:
        """Alerts in the order they were raised; `level` GREEN..RED, `status` raised |
        acknowledged | closed. Items are `AlertInfo`."""
        request = alert_pb.ListAlertsRequest(
            platform_id=self._pid(platform_id),
            level=alert_pb.AlertLevel.Value(f"ALERT_LEVEL_{level.upper()}")
            if level
            else alert_pb.ALERT_LEVEL_UNSPECIFIED,
            status=alert_pb.AlertStatus.Value(f"ALERT_STATUS_{status.upper()}")
            if status
            else alert_pb.ALERT_STATUS_UNSPECIFIED,
            page_size=page_size,
            page_token=page_token,
        )
        answer = self._call(self.alerts.ListAlerts, request)
        return Page(
            [AlertInfo.from_pb(a) for a in answer.alerts],
            answer.next_page_token,
            answer.as_of_position,
        )

    def iter_alerts(
        self,
        level: str | None = None,
        status: str | None = None,
        page_size: int = 0,
        *,
        platform_id: str | None = None,
        max_pages: int = MAX_PAGES_DEFAULT,
    ) -> Iterator[AlertInfo]:
        return walk_pages(
            lambda token: self.list_alerts(
                level, status, page_size, token, platform_id=platform_id
            ),
            max_pages,
        )

    def get_alert(self, alert_id: str, *, platform_id: str | None = None) -> AlertInfo:
        request = alert_pb.GetAlertRequest(platform_id=self._pid(platform_id), alert_id=alert_id)
        return AlertInfo.from_pb(self._call(self.alerts.GetAlert, request).alert)

    def acknowledge_alert(
        self, client_id: str, alert_id: str, note: str, *, platform_id: str | None = None
    ) -> Receipt:
        return self._write(
            self.alerts.AcknowledgeAlert,
            alert_pb.AcknowledgeAlertRequest,
            "acknowledge_alert",
            platform_id,
            client_id=client_id,
            alert_id=alert_id,
            note=note,
        )

    def close_alert(
        self, client_id: str, alert_id: str, reason: str, *, platform_id: str | None = None
    ) -> Receipt:
        """ALERT_LEVEL_FORBIDDEN unless the caller's role may close the alert's level (only a
        checker closes ORANGE and RED)."""
        return self._write(
            self.alerts.CloseAlert,
            alert_pb.CloseAlertRequest,
            "close_alert",
            platform_id,
            client_id=client_id,
            alert_id=alert_id,
            reason=reason,
        )

    def stream_alerts(
        self,
        start_position: int = 0,
        *,
        follow: bool = False,
        timeout_s: float | None = None,
        platform_id: str | None = None,
    ) -> Iterator[AlertEvent]:
        """Alert records from `start_position` on; with `follow`, new ones as they commit (until
        cancelled, `timeout_s`, or the server shuts down)."""
        request = alert_pb.StreamAlertsRequest(
            platform_id=self._pid(platform_id), start_position=start_position, follow=follow
        )
        timeout = timeout_s if (timeout_s is not None or follow) else self.timeout_s
        stream = self.alerts.StreamAlerts(request, timeout=timeout, metadata=self.metadata)
        try:
            for e in stream:
                yield AlertEvent(
                    e.position,
                    e.time_ms,
                    _STEP_NAMES.get(e.step, ""),
                    e.alert_id,
                    _LEVEL_NAMES.get(e.level, ""),
                    e.rule,
                    e.subject,
                    e.actor,
                    e.text,
                    e.record,
                )
        except grpc.RpcError as exc:
            raise CustodyError.from_rpc_error(exc) from None
        finally:
            stream.cancel()

    def get_risk_indicators(
        self, from_day: int = 0, *, platform_id: str | None = None
    ) -> tuple[dict[str, list[tuple[int, int]]], int]:
        """({indicator: [(day, value)]}, engine position) from the early-warning read model."""
        request = alert_pb.GetRiskIndicatorsRequest(
            platform_id=self._pid(platform_id), from_day=from_day
        )
        answer = self._call(self.alerts.GetRiskIndicators, request)
        series = {s.name: [(p.day, p.value) for p in s.points] for s in answer.series}
        return series, answer.engine_position

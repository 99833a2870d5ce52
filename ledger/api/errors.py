"""The one place where domain outcomes and failures become gRPC statuses (AIP-193).

Every error status carries a `google.rpc.Status` with an `ErrorInfo(reason=<stable code>,
domain="custody.v1")`; malformed input adds `BadRequest` field violations, business refusals
add `PreconditionFailure`, exhausted policy limits add `QuotaFailure`, and back-pressure adds
`RetryInfo`. Reason codes are the ledger's own (`controls.codes.Code`, each listed in
`STATUS_OF_CODE` with its status) plus the few API-level ones in `ApiReason`. Bad input never
becomes UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Mapping
from typing import Any, Final, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controls.codes import INPUT_CODES, Code
from ledger import logs
from ledger.lease import WriterElsewhere
from ledger.service import Overloaded, PlatformNotFound, ServiceClosed
from ledger.writer import CommitFailed, CommitOutcomeUnknown, Outcome, WriterFenced
from projections.base import NotProjected, ProjectionError

DOMAIN: Final = "custody.v1"
log = logging.getLogger("ledger.api")


class ApiReason(enum.StrEnum):
    """Reasons raised by the API layer itself (never by the controls)."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    PLATFORM_MISMATCH = "PLATFORM_MISMATCH"
    READ_ONLY_ROLE = "READ_ONLY_ROLE"
    DEADLINE_REQUIRED = "DEADLINE_REQUIRED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    OVERLOADED = "OVERLOADED"
    COMMIT_FAILED = "COMMIT_FAILED"
    WRITER_FENCED = "WRITER_FENCED"
    WRITER_ELSEWHERE = "WRITER_ELSEWHERE"  # another server writes the platform: go there
    SHUTTING_DOWN = "SHUTTING_DOWN"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    CHECKPOINT_NOT_FOUND = "CHECKPOINT_NOT_FOUND"
    PROOF_OUT_OF_RANGE = "PROOF_OUT_OF_RANGE"
    # read models (statements, as-of balances, audit trail)
    PROJECTION_BEHIND = "PROJECTION_BEHIND"  # not projected up to the asked position in time
    PROJECTION_FAILED = "PROJECTION_FAILED"  # the log cannot be projected (e.g. a broken chain)
    POSITION_OUT_OF_RANGE = "POSITION_OUT_OF_RANGE"  # past the log's head
    # disclosures, liabilities (reporting services)
    DISCLOSURE_NOT_FOUND = "DISCLOSURE_NOT_FOUND"  # no snapshot built for that period
    DISCLOSURE_REFUSED = "DISCLOSURE_REFUSED"  # the period cannot be disclosed (e.g. too long)
    DISCLOSURE_MISMATCH = "DISCLOSURE_MISMATCH"  # a rebuild differs from the kept snapshot
    LIABILITIES_NOT_PUBLISHED = "LIABILITIES_NOT_PUBLISHED"  # no statement for that currency
    LIABILITIES_PROOF_NOT_FOUND = "LIABILITIES_PROOF_NOT_FOUND"  # no proof file for it
    INTERNAL = "INTERNAL"


_SC: Final = grpc.StatusCode

# Every ledger reason code and its gRPC status (AIP-193). A test checks that every `Code` is
# listed; one that is not (a code added to the controls before the API heard of it) falls back to
# FAILED_PRECONDITION, never to UNKNOWN or INTERNAL.
STATUS_OF_CODE: Final[Mapping[str, grpc.StatusCode]] = {
    # malformed input (controls.codes.INPUT_CODES): BadRequest names the field
    **{code: _SC.INVALID_ARGUMENT for code in INPUT_CODES},
    # something named does not exist
    Code.ACCOUNT_NOT_FOUND: _SC.NOT_FOUND,
    Code.HOLD_NOT_FOUND: _SC.NOT_FOUND,
    Code.MOVEMENT_NOT_FOUND: _SC.NOT_FOUND,
    Code.PLATFORM_NOT_FOUND: _SC.NOT_FOUND,
    Code.APPROVAL_NOT_FOUND: _SC.NOT_FOUND,
    Code.STANDING_NOT_FOUND: _SC.NOT_FOUND,
    Code.ALERT_NOT_FOUND: _SC.NOT_FOUND,
    # it exists already, or this is a second use of something single-use
    Code.ID_REUSED: _SC.ALREADY_EXISTS,
    Code.ACCOUNT_EXISTS: _SC.ALREADY_EXISTS,
    Code.PLATFORM_EXISTS: _SC.ALREADY_EXISTS,
    Code.HOLD_EXISTS: _SC.ALREADY_EXISTS,
    Code.ALERT_EXISTS: _SC.ALREADY_EXISTS,
    Code.REPLAYED: _SC.ALREADY_EXISTS,  # the customer's authorisation nonce was used before
    # the caller may not do this: wrong role, no (valid) customer consent, the same person on
    # both sides of maker-checker, a screened party
    Code.ROLE_NOT_PERMITTED: _SC.PERMISSION_DENIED,
    Code.CHECKER_ROLE_REQUIRED: _SC.PERMISSION_DENIED,
    Code.SELF_APPROVAL: _SC.PERMISSION_DENIED,
    Code.AUTHORISATION_REQUIRED: _SC.PERMISSION_DENIED,
    Code.AUTHORISATION_INVALID: _SC.PERMISSION_DENIED,
    Code.AUTHORISATION_EXPIRED: _SC.PERMISSION_DENIED,
    Code.BLOCKED: _SC.PERMISSION_DENIED,
    Code.ALERT_LEVEL_FORBIDDEN: _SC.PERMISSION_DENIED,  # e.g. only a checker closes RED
    # a quota of the policy (per transaction, per day, platform outflow) is used up
    Code.LIMIT_EXCEEDED: _SC.RESOURCE_EXHAUSTED,
    # concurrency: the state moved under the caller; re-read and retry
    Code.LINKED_FAILED: _SC.ABORTED,
    Code.POLICY_VERSION_CONFLICT: _SC.ABORTED,
    # the state does not allow it now (PreconditionFailure names the control)
    Code.UNBALANCED: _SC.FAILED_PRECONDITION,
    Code.AMOUNT_OVERFLOW: _SC.FAILED_PRECONDITION,
    Code.CURRENCY_MISMATCH: _SC.FAILED_PRECONDITION,
    Code.FLOW_NOT_ALLOWED: _SC.FAILED_PRECONDITION,
    Code.INSUFFICIENT_FUNDS: _SC.FAILED_PRECONDITION,
    Code.ACCOUNT_FROZEN: _SC.FAILED_PRECONDITION,
    Code.ACCOUNT_CLOSED: _SC.FAILED_PRECONDITION,
    Code.ACCOUNT_NOT_EMPTY: _SC.FAILED_PRECONDITION,
    Code.ACCOUNT_NOT_FROZEN: _SC.FAILED_PRECONDITION,
    Code.HOLD_NOT_PENDING: _SC.FAILED_PRECONDITION,
    Code.HOLD_EXCEEDED: _SC.FAILED_PRECONDITION,
    Code.HOLD_NOT_EXPIRED: _SC.FAILED_PRECONDITION,
    Code.HOLD_EXPIRED: _SC.FAILED_PRECONDITION,
    Code.HOLD_REFERENCE_INVALID: _SC.FAILED_PRECONDITION,
    Code.NOT_REVERSIBLE: _SC.FAILED_PRECONDITION,
    Code.ALREADY_REVERSED: _SC.FAILED_PRECONDITION,
    Code.PERSONAL_DATA_UNAVAILABLE: _SC.FAILED_PRECONDITION,
    Code.SEGREGATION_BREACH: _SC.FAILED_PRECONDITION,
    Code.FEE_NOT_IN_SCHEDULE: _SC.FAILED_PRECONDITION,
    Code.AUTHORISATION_LOCKED: _SC.FAILED_PRECONDITION,
    Code.KEY_NOT_REGISTERED: _SC.FAILED_PRECONDITION,
    Code.PAYEE_NOT_BOUND: _SC.FAILED_PRECONDITION,
    Code.PAYEE_NAME_MISMATCH: _SC.FAILED_PRECONDITION,
    Code.PAYOUT_COOLOFF: _SC.FAILED_PRECONDITION,
    Code.APPROVAL_REQUIRED: _SC.FAILED_PRECONDITION,
    Code.APPROVAL_NOT_PENDING: _SC.FAILED_PRECONDITION,
    Code.APPROVAL_EXPIRED: _SC.FAILED_PRECONDITION,
    Code.REQUEST_REJECTED: _SC.FAILED_PRECONDITION,
    Code.PLATFORM_RESTRICTED: _SC.FAILED_PRECONDITION,
    Code.GATE_UNCHANGED: _SC.FAILED_PRECONDITION,
    Code.ALERT_CLOSED: _SC.FAILED_PRECONDITION,
}
# For input refusals that do not name their field, the field they are about.
_FIELD_OF_INPUT_CODE: Final[Mapping[str, str]] = {
    Code.INVALID_AMOUNT: "amount_minor",
    Code.SAME_ACCOUNT: "to_account_id",
    Code.HOLD_EXPIRY_INVALID: "expires_at_ms",
    Code.HOLD_REASON_REQUIRED: "reason",
    Code.BATCH_TOO_LARGE: "instructions",
    Code.POLICY_INVALID: "policy_json",
}
# Screening refusals never say which list or entry matched (BRIEF §4), whatever the ledger's
# own message: the API answers them with this text only.
BLOCKED_MESSAGE: Final = "the instruction cannot be carried out"
_RETRY_DELAY_S: Final = 0.05


def status_code_for(reason: str) -> grpc.StatusCode:
    """The gRPC status for a ledger reason code (a refusal or an invalid instruction)."""
    return STATUS_OF_CODE.get(reason, _SC.FAILED_PRECONDITION)


class ApiError(Exception):
    """An error answer: status code, stable reason, message, and optional detail hints."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        fields: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        control: str = "",
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.fields = dict(fields or {})
        self.metadata = dict(metadata or {})
        self.control = control
        self.retry_delay_s = retry_delay_s

    def to_status(self) -> grpc.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        for key, value in self.metadata.items():
            info.metadata[key] = value
        details.append(_pack(info))
        if self.fields:
            bad = error_details_pb2.BadRequest()
            for field, description in self.fields.items():
                bad.field_violations.add(field=field, description=description, reason=self.reason)
            details.append(_pack(bad))
        if self.code is grpc.StatusCode.FAILED_PRECONDITION:
            failure = error_details_pb2.PreconditionFailure()
            failure.violations.add(type=self.reason, subject=self.control, description=self.message)
            details.append(_pack(failure))
        elif self.code is grpc.StatusCode.RESOURCE_EXHAUSTED and self.control:
            quota = error_details_pb2.QuotaFailure()
            quota.violations.add(subject=self.control, description=self.message)
            details.append(_pack(quota))
        if self.retry_delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(
            code=_RPC_CODE[self.code], message=self.message[:1024], details=details
        )
        return rpc_status.to_status(status)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_RPC_CODE: Final[Mapping[grpc.StatusCode, int]] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
}


# -- constructors ---------------------------------------------------------------------------


def invalid(field: str, message: str, reason: str = Code.INVALID_ARGUMENT) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT, reason, f"{field}: {message}", fields={field: message}
    )


def invalid_many(violations: Mapping[str, str]) -> ApiError:
    first = next(iter(violations.items()))
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Code.INVALID_ARGUMENT,
        f"{first[0]}: {first[1]}"
        + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""),
        fields=violations,
    )


def permission_denied(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, reason, message)


def unauthenticated(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, ApiReason.UNAUTHENTICATED, message)


def projection_behind(projected: int | None, requested: int | None, message: str = "") -> ApiError:
    """The read model has not reached `requested` (within the call's time): FAILED_PRECONDITION
    with both positions in ErrorInfo metadata (when known). Retrying later succeeds."""
    metadata = {}
    if projected is not None:
        metadata["projected_position"] = str(projected)
    if requested is not None:
        metadata["requested_position"] = str(requested)
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        ApiReason.PROJECTION_BEHIND,
        message or f"the read model is projected to position {projected}, not {requested} yet",
        metadata=metadata,
        control="projections",
        retry_delay_s=0.5,
    )


def writer_elsewhere(exc: WriterElsewhere) -> ApiError:
    """A write (or checkpoint, proof) that reached a server not writing the platform: UNAVAILABLE
    with ErrorInfo `WRITER_ELSEWHERE` naming the writer (metadata `platform`, `server_id`,
    `address` HOST:PORT, `epoch`, `retry_after_ms`) and RetryInfo. Nothing was written, so the
    same request with the same client ids is safe to send to `address`; an empty address means
    nobody writes the platform right now (failover): retry here after the delay."""
    if exc.address:
        message = (
            f"platform {exc.platform_id} is written by server {exc.server_id} at {exc.address}; "
            "nothing was written: send the request there with the same client ids"
        )
    else:
        message = (
            f"no server writes platform {exc.platform_id} right now; nothing was written: "
            f"retry with the same client ids after {exc.retry_after_ms} ms"
        )
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        ApiReason.WRITER_ELSEWHERE,
        message,
        metadata={
            "platform": exc.platform_id,
            "server_id": exc.server_id,
            "address": exc.address,
            "epoch": str(exc.epoch),
            "retry_after_ms": str(exc.retry_after_ms),
        },
        retry_delay_s=max(0, exc.retry_after_ms) / 1000,
    )


def from_outcome(outcome: Outcome, field_prefix: str = "") -> ApiError:
    """The error for a single instruction that was refused or invalid."""
    assert not outcome.ok
    reason = outcome.code or Code.INVALID_ARGUMENT
    metadata = {"client_id": outcome.client_id}
    if outcome.control:
        metadata["control"] = outcome.control
    if outcome.seq >= 0:
        metadata["position"] = str(outcome.seq)
    code = grpc.StatusCode.INVALID_ARGUMENT if outcome.status == "invalid" else None
    code = code or status_code_for(reason)
    fields: dict[str, str] = {}
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field = outcome.field or _FIELD_OF_INPUT_CODE.get(reason, "")
        if field:
            fields[field_prefix + field] = outcome.message or reason
    message = BLOCKED_MESSAGE if reason == Code.BLOCKED else outcome.message or reason
    return ApiError(
        code,
        reason,
        message,
        fields=fields,
        metadata=metadata,
        control=outcome.control,
    )


def from_exception(exc: BaseException) -> ApiError | None:
    """The error for a known infrastructure/domain exception, or None for a genuine bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PlatformNotFound):
        return ApiError(
            grpc.StatusCode.NOT_FOUND,
            Code.PLATFORM_NOT_FOUND,
            f"platform {exc.args[0]!r} not found" if exc.args else "platform not found",
        )
    if isinstance(exc, Overloaded):
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ApiReason.OVERLOADED,
            "the platform's queue is full; retry with the same client ids",
            retry_delay_s=_RETRY_DELAY_S,
        )
    if isinstance(exc, CommitOutcomeUnknown):  # before CommitFailed: it is a subclass
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            ApiReason.COMMIT_FAILED,
            "the database connection failed during the commit, which may have been stored: "
            "retry with the same client ids to learn the outcome (replayed if it was)",
            retry_delay_s=_RETRY_DELAY_S,
        )
    if isinstance(exc, CommitFailed):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            ApiReason.COMMIT_FAILED,
            "the database transaction did not commit; nothing happened, retry with the same ids",
            retry_delay_s=_RETRY_DELAY_S,
        )
    if isinstance(exc, WriterElsewhere):  # before WriterFenced: it is a subclass
        return writer_elsewhere(exc)
    if isinstance(exc, WriterFenced):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            ApiReason.WRITER_FENCED,
            "this server no longer writes the platform's log",
        )
    if isinstance(exc, ServiceClosed):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE, ApiReason.SHUTTING_DOWN, "the server is shutting down"
        )
    if isinstance(exc, NotProjected):
        return projection_behind(None, None, str(exc))
    if isinstance(exc, ProjectionError):
        # A log the read models cannot follow (a broken chain, a record out of place): nothing
        # a retry fixes; the operators must look. The ledger's own log is not affected.
        log.error("read model cannot follow the log: %s", exc)
        return ApiError(
            grpc.StatusCode.DATA_LOSS,
            ApiReason.PROJECTION_FAILED,
            "the read models cannot follow this platform's log; the operators are told",
        )
    if isinstance(exc, TimeoutError):
        return ApiError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            ApiReason.DEADLINE_EXCEEDED,
            "not committed before the deadline; retry with the same client id to learn the outcome",
        )
    return None


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    pass


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ApiError) -> NoReturn:
    """End the call with the error's status and rich details (raises grpc.aio.AbortError).

    The trailing metadata also carries the call's `x-request-id` (aborting replaces what the
    call gate set); the call is counted and logged (with the reason) before the status goes."""
    status = error.to_status()
    call = logs.current_call()
    if call is not None:
        from ledger.api.handlers import finish  # (handlers imports this module)

        call.reason = error.reason
        status = _Status(
            status.code,
            status.details,
            (*status.trailing_metadata, (logs.REQUEST_ID_HEADER, call.request_id)),
        )
        finish(call, error.code.name)  # counted and logged before the caller has the answer
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def error_for(exc: BaseException, method: str) -> ApiError:
    """The mapped error; an unmapped exception is a bug: log it, answer INTERNAL."""
    error = from_exception(exc)
    if error is None:
        log.exception("unexpected failure in %s", method, exc_info=exc)
        error = ApiError(grpc.StatusCode.INTERNAL, ApiReason.INTERNAL, "internal error")
    return error

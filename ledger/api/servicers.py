"""The custody.v1 servicers: translate wire <-> domain and call the LedgerService, nothing more.

Single-instruction writes go through `LedgerService.submit` so that concurrent calls share one
database commit (group commit); batches go through `LedgerService.execute` as one transaction.
Errors are raised as `ApiError` or domain exceptions and mapped in `ledger.api.errors` only.
"""

from __future__ import annotations

import base64
import bisect
import functools
import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from controls.codes import Code
from ledger import commands as c
from ledger import records
from ledger.api import errors, translate
from ledger.api.auth import identity_of, scoped_platform
from ledger.api.deadlines import budget_s
from ledger.api.errors import ApiError, ApiReason
from ledger.api.pb import (
    account_grpc,
    account_pb,
    common_pb,
    hold_grpc,
    hold_pb,
    log_grpc,
    log_pb,
    movement_grpc,
    movement_pb,
    platform_grpc,
    platform_pb,
    query_grpc,
    query_pb,
)
from ledger.api.translate import BatchWireError, WireError
from ledger.domain import Account, PlatformState
from ledger.service import LedgerService
from ledger.store import log_stream

PAGE_SIZE_DEFAULT: Final = 100
PAGE_SIZE_MAX: Final = 1000
PAGE_TOKEN_MAX_LEN: Final = 512
LOG_READ_PAGE: Final = 500
# Same rule as ledger.validate for ids; reads check it so hostile ids are INVALID_ARGUMENT.
_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")

R = TypeVar("R")
M = TypeVar("M", bound=Message)


def _mapped(fn: Callable[..., R]) -> Callable[..., R]:
    """Turn every failure of a unary servicer method into its mapped status."""

    @functools.wraps(fn)
    def method(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return fn(self, request, context)
        except WireError as exc:
            errors.abort(context, errors.invalid(exc.field, exc.message))
        except BatchWireError as exc:
            errors.abort(context, errors.invalid_many(exc.violations))
        except Exception as exc:
            errors.abort_for(context, exc, fn.__name__)

    return method


class Core:
    """What every servicer shares: the ledger, stream limits and the shutdown signal."""

    def __init__(
        self, service: LedgerService, *, max_streams: int = 16, poll_interval_s: float = 0.05
    ) -> None:
        self.service = service
        self.stopping = threading.Event()
        self.streams = threading.BoundedSemaphore(max_streams)
        self.poll_interval_s = poll_interval_s
        self._sorted_ids: dict[str, tuple[int, list[str]]] = {}

    # -- writes ---------------------------------------------------------------------------------

    def write_one(
        self, request: Any, context: grpc.ServicerContext, instruction: type[Message]
    ) -> common_pb.Receipt:
        identity = identity_of(context)
        platform_id = scoped_platform(identity, request.platform_id)
        command = translate.single_command(request, instruction)
        future = self.service.submit(platform_id, [command], identity.actor)
        try:
            [outcome] = future.result(timeout=budget_s(context))
        except TimeoutError:
            future.cancel()  # still queued: it will not run; already running: it commits
            raise
        if not outcome.ok:
            raise errors.from_outcome(outcome, "instruction.")
        return translate.receipt(outcome)

    # -- reads ----------------------------------------------------------------------------------

    def page(
        self,
        request: Any,
        context: grpc.ServicerContext,
        kind: str,
        render: Callable[[str, Account, int], M],
    ) -> tuple[list[M], str]:
        identity = identity_of(context)
        platform_id = scoped_platform(identity, request.platform_id)
        size = request.page_size
        if size < 0:
            raise errors.invalid("page_size", "must not be negative")
        size = PAGE_SIZE_DEFAULT if size == 0 else min(size, PAGE_SIZE_MAX)
        after = _decode_token(request.page_token, platform_id, kind)
        with self.service.reading(platform_id) as state:
            ids = self._ids(platform_id, state)
            start = bisect.bisect_right(ids, after) if after is not None else 0
            chunk = ids[start : start + size]
            as_of = state.next_seq - 1
            items = [render(platform_id, state.accounts[i], as_of) for i in chunk]
            more = start + size < len(ids)
        token = _encode_token(platform_id, kind, chunk[-1]) if more and chunk else ""
        return items, token

    def _ids(self, platform_id: str, state: PlatformState) -> list[str]:
        """Account ids in order; re-sorted only when accounts were added (never removed)."""
        cached = self._sorted_ids.get(platform_id)
        if cached is None or cached[0] != len(state.accounts):
            cached = (len(state.accounts), sorted(state.accounts))
            self._sorted_ids[platform_id] = cached
        return cached[1]

    def one_account(self, request: Any, context: grpc.ServicerContext) -> tuple[str, Any]:
        identity = identity_of(context)
        platform_id = scoped_platform(identity, request.platform_id)
        if _ID_RE.match(request.account_id) is None:
            raise errors.invalid("account_id", "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
        return platform_id, request.account_id


def _account_missing(account_id: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        Code.ACCOUNT_NOT_FOUND,
        f"account {account_id!r} not found",
        metadata={"account_id": account_id},
    )


def _encode_token(platform_id: str, kind: str, last_id: str) -> str:
    raw = json.dumps({"v": 1, "p": platform_id, "k": kind, "a": last_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, platform_id: str, kind: str) -> str | None:
    if not token:
        return None
    bad = ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        ApiReason.INVALID_PAGE_TOKEN,
        "page_token is not a token this list returned",
        fields={"page_token": "not a token this list returned"},
    )
    if len(token) > PAGE_TOKEN_MAX_LEN:
        raise bad
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(data, dict)
        or data.get("v") != 1
        or data.get("p") != platform_id
        or data.get("k") != kind
        or not isinstance(data.get("a"), str)
    ):
        raise bad
    last: str = data["a"]
    return last


# -- services ---------------------------------------------------------------------------------


class PlatformServicer(platform_grpc.PlatformServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    def CreatePlatform(
        self, request: platform_pb.CreatePlatformRequest, context: grpc.ServicerContext
    ) -> platform_pb.CreatePlatformResponse:
        identity = identity_of(context)
        outcome = self.core.service.create_platform(
            request.platform_id, request.name, identity.actor
        )
        if not outcome.ok:
            raise errors.from_outcome(outcome)
        return platform_pb.CreatePlatformResponse(
            platform_id=request.platform_id, receipt=translate.receipt(outcome)
        )


class AccountServicer(account_grpc.AccountServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    def OpenAccount(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.OpenAccount)
        return account_pb.OpenAccountResponse(receipt=receipt)

    @_mapped
    def FreezeAccount(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.FreezeAccount)
        return account_pb.FreezeAccountResponse(receipt=receipt)

    @_mapped
    def UnfreezeAccount(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.UnfreezeAccount)
        return account_pb.UnfreezeAccountResponse(receipt=receipt)

    @_mapped
    def CloseAccount(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.CloseAccount)
        return account_pb.CloseAccountResponse(receipt=receipt)

    @_mapped
    def GetAccount(
        self, request: account_pb.GetAccountRequest, context: grpc.ServicerContext
    ) -> account_pb.GetAccountResponse:
        platform_id, account_id = self.core.one_account(request, context)
        with self.core.service.reading(platform_id) as state:
            acc = state.accounts.get(account_id)
            if acc is None:
                raise _account_missing(account_id)
            return account_pb.GetAccountResponse(account=translate.account(platform_id, acc))

    @_mapped
    def ListAccounts(
        self, request: account_pb.ListAccountsRequest, context: grpc.ServicerContext
    ) -> account_pb.ListAccountsResponse:
        items, token = self.core.page(
            request, context, "accounts", lambda p, acc, _: translate.account(p, acc)
        )
        return account_pb.ListAccountsResponse(accounts=items, next_page_token=token)


class MovementServicer(movement_grpc.MovementServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    def Deposit(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.Deposit)
        return movement_pb.DepositResponse(receipt=receipt)

    @_mapped
    def Transfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.Transfer)
        return movement_pb.TransferResponse(receipt=receipt)

    @_mapped
    def ChargeFee(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.ChargeFee)
        return movement_pb.ChargeFeeResponse(receipt=receipt)

    @_mapped
    def TopUpShortfall(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.TopUpShortfall)
        return movement_pb.TopUpShortfallResponse(receipt=receipt)

    @_mapped
    def Reverse(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.Reverse)
        return movement_pb.ReverseResponse(receipt=receipt)

    @_mapped
    def SubmitBatch(
        self, request: movement_pb.SubmitBatchRequest, context: grpc.ServicerContext
    ) -> movement_pb.SubmitBatchResponse:
        identity = identity_of(context)
        platform_id = scoped_platform(identity, request.platform_id)
        count = len(request.instructions)
        if count == 0:
            raise errors.invalid("instructions", "at least one instruction")
        if count > c.MAX_BATCH_COMMANDS:
            raise errors.invalid(
                "instructions",
                f"at most {c.MAX_BATCH_COMMANDS} instructions per batch",
                reason=Code.BATCH_TOO_LARGE,
            )
        commands = translate.batch_commands(request.instructions)
        outcomes = self.core.service.execute(
            platform_id, commands, identity.actor, linked=request.linked
        )
        counts = {"accepted": 0, "replayed": 0, "refused": 0, "invalid": 0}
        for outcome in outcomes:
            counts[outcome.status] += 1
        return movement_pb.SubmitBatchResponse(
            results=[translate.item_result(o) for o in outcomes],
            accepted_count=counts["accepted"],
            replayed_count=counts["replayed"],
            refused_count=counts["refused"],
            invalid_count=counts["invalid"],
        )


class HoldServicer(hold_grpc.HoldServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    def PlaceHold(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.PlaceHold)
        return hold_pb.PlaceHoldResponse(receipt=receipt)

    @_mapped
    def CaptureHold(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.CaptureHold)
        return hold_pb.CaptureHoldResponse(receipt=receipt)

    @_mapped
    def ReleaseHold(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.ReleaseHold)
        return hold_pb.ReleaseHoldResponse(receipt=receipt)

    @_mapped
    def ExpireHolds(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.ExpireHolds)
        return hold_pb.ExpireHoldsResponse(receipt=receipt)

    @_mapped
    def RequestWithdrawal(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.RequestWithdrawal)
        return hold_pb.RequestWithdrawalResponse(receipt=receipt)

    @_mapped
    def SettleWithdrawal(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.SettleWithdrawal)
        return hold_pb.SettleWithdrawalResponse(receipt=receipt)

    @_mapped
    def FailWithdrawal(self, request: Any, context: grpc.ServicerContext) -> Any:
        receipt = self.core.write_one(request, context, common_pb.FailWithdrawal)
        return hold_pb.FailWithdrawalResponse(receipt=receipt)


class QueryServicer(query_grpc.QueryServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    def GetBalance(
        self, request: query_pb.GetBalanceRequest, context: grpc.ServicerContext
    ) -> query_pb.GetBalanceResponse:
        platform_id, account_id = self.core.one_account(request, context)
        with self.core.service.reading(platform_id) as state:
            acc = state.accounts.get(account_id)
            if acc is None:
                raise _account_missing(account_id)
            return query_pb.GetBalanceResponse(balance=translate.balance(acc, state.next_seq - 1))

    @_mapped
    def ListBalances(
        self, request: query_pb.ListBalancesRequest, context: grpc.ServicerContext
    ) -> query_pb.ListBalancesResponse:
        items, token = self.core.page(
            request, context, "balances", lambda _, acc, as_of: translate.balance(acc, as_of)
        )
        return query_pb.ListBalancesResponse(balances=items, next_page_token=token)


class LogServicer(log_grpc.LogServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    def SubscribeLog(
        self, request: log_pb.SubscribeLogRequest, context: grpc.ServicerContext
    ) -> Iterator[log_pb.SubscribeLogResponse]:
        try:
            identity = identity_of(context)
            platform_id = scoped_platform(identity, request.platform_id)
            if request.start_position < 0:
                raise errors.invalid("start_position", "must not be negative")
            next_seq, _ = self.core.service.head(platform_id)  # raises PlatformNotFound
        except Exception as exc:
            errors.abort_for(context, exc, "SubscribeLog")
        if not self.core.streams.acquire(blocking=False):
            errors.abort(
                context,
                ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ApiReason.TOO_MANY_STREAMS,
                    "too many open log subscriptions; retry later",
                    retry_delay_s=1.0,
                ),
            )
        try:
            yield from self._stream(platform_id, request, context, next_seq)
        finally:
            self.core.streams.release()

    def _stream(
        self,
        platform_id: str,
        request: log_pb.SubscribeLogRequest,
        context: grpc.ServicerContext,
        next_seq: int,
    ) -> Iterator[log_pb.SubscribeLogResponse]:
        core = self.core
        stream = log_stream(platform_id)
        after = request.start_position - 1
        stop_at = None if request.follow else next_seq - 1
        while context.is_active() and not core.stopping.is_set():
            if stop_at is not None and after >= stop_at:
                return
            rows = core.service.store.read(stream, after, LOG_READ_PAGE)
            if not rows:
                core.stopping.wait(core.poll_interval_s)
                continue
            for seq, kind, packed in rows:
                if stop_at is not None and seq > stop_at:
                    return
                chain_hash, data = records.unpack_state(packed)
                yield log_pb.SubscribeLogResponse(
                    position=seq, kind=kind, record=data, chain_hash=chain_hash
                )
                after = seq


def add_servicers(server: grpc.Server, core: Core) -> None:
    platform_grpc.add_PlatformServiceServicer_to_server(PlatformServicer(core), server)
    account_grpc.add_AccountServiceServicer_to_server(AccountServicer(core), server)
    movement_grpc.add_MovementServiceServicer_to_server(MovementServicer(core), server)
    hold_grpc.add_HoldServiceServicer_to_server(HoldServicer(core), server)
    query_grpc.add_QueryServiceServicer_to_server(QueryServicer(core), server)
    log_grpc.add_LogServiceServicer_to_server(LogServicer(core), server)

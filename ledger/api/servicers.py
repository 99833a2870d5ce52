"""The custody.v1 servicers: translate wire <-> domain and call the LedgerService, nothing more.

They run on the grpc.aio event loop. Every method is a coroutine taking (request, context,
identity): the call gate (`ledger.api.handlers`) has already authenticated the caller and checked
the deadline and the decoding. Single-instruction writes await `LedgerService.submit` so that
concurrent calls share one database commit (group commit) without a thread per call; batches
go through the same group committer by default (`ServerOptions.batch_via="submit"`, so that
concurrent batch callers overlap one batch's decisions with another's write), or through
`LedgerService.execute` in the worker pool. Reads, which wait for the platform's lock, run in the
worker pool so they never block the event loop. Errors are raised as `ApiError` or domain
exceptions and mapped in `ledger.api.errors` only.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextvars
import functools
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from controls.codes import Code
from ledger import commands as c
from ledger import records
from ledger.api import errors, translate
from ledger.api.auth import Identity, scoped_platform
from ledger.api.deadlines import MAX_WAIT_S, remaining_s
from ledger.api.errors import ApiError, ApiReason
from ledger.api.handlers import Context, Gate, add_service
from ledger.api.pb import (
    account_pb,
    approval_pb,
    audit_pb,
    audit_trail_pb,
    common_pb,
    customer_pb,
    hold_pb,
    log_pb,
    movement_pb,
    platform_pb,
    policy_pb,
    query_pb,
)
from ledger.api.readmodels import ReadModels, audit_query, statement_query
from ledger.api.translate import BatchWireError, WireError
from ledger.checkpoint import SignedCheckpoint, tlog_proof
from ledger.domain import Account, PlatformState
from ledger.service import LedgerService, PlatformNotFound
from ledger.store import log_stream
from ledger.writer import Outcome

PAGE_SIZE_DEFAULT: Final = 100
LIABILITIES_DIR_ENV: Final = "CUSTODY_LIABILITIES_DIR"
PAGE_SIZE_MAX: Final = 1000
PAGE_TOKEN_MAX_LEN: Final = 512
LOG_READ_PAGE: Final = 500
# Same rules as ledger.validate for ids; reads check them so hostile ids are INVALID_ARGUMENT.
_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")
_CLIENT_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,127}\Z")

R = TypeVar("R")
M = TypeVar("M", bound=Message)
Method = Callable[[Any, Any, Context, Identity], Awaitable[R]]


def _mapped(fn: Method[R]) -> Method[R]:
    """Turn every failure of a unary servicer method into its mapped status."""

    @functools.wraps(fn)
    async def method(self: Any, request: Any, context: Context, identity: Identity) -> R:
        try:
            return await fn(self, request, context, identity)
        except grpc.aio.AbortError:
            raise
        except WireError as exc:
            error = errors.invalid(exc.field, exc.message, exc.reason)
        except BatchWireError as exc:
            error = errors.invalid_many(exc.violations)
        except Exception as exc:
            error = errors.error_for(exc, fn.__name__)
        await errors.abort(context, error)

    return method


class _Waker:
    """Resolves asyncio futures for group-commit futures, with one loop wake-up per group.

    `asyncio.wrap_future` schedules one `call_soon_threadsafe` (a write to the loop's self-pipe)
    per resolved future; the committer resolves a whole group at once, so here its thread only
    queues each answer and wakes the loop if no wake-up is pending. The loop then hands out
    every queued answer in one callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: collections.deque[tuple[asyncio.Future[Any], Future[Any]]] = (
            collections.deque()
        )
        self._pending = False
        self._lock = threading.Lock()

    def watch(self, future: Future[R]) -> asyncio.Future[R]:
        waiter: asyncio.Future[R] = self._loop.create_future()
        future.add_done_callback(lambda f: self._done(waiter, f))
        return waiter

    def _done(self, waiter: asyncio.Future[Any], future: Future[Any]) -> None:  # any thread
        self._ready.append((waiter, future))
        if not self._pending:
            with self._lock:
                if not self._pending:
                    self._pending = True
                    self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # on the loop
        with self._lock:
            self._pending = False
        ready = self._ready
        while ready:
            waiter, future = ready.popleft()
            if waiter.done():  # the call was cancelled meanwhile
                continue
            if future.cancelled():
                waiter.cancel()
                continue
            exc = future.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(future.result())


_WAKERS: dict[asyncio.AbstractEventLoop, _Waker] = {}


def _waker(loop: asyncio.AbstractEventLoop) -> _Waker:
    waker = _WAKERS.get(loop)
    if waker is None:
        waker = _WAKERS.setdefault(loop, _Waker(loop))
    return waker


async def _committed(future: Future[list[Outcome]], context: Context) -> list[Outcome]:
    """Await a group-commit future from the event loop.

    When the call is cancelled (grpc.aio cancels the handler when the caller's deadline passes
    or it goes away) or waits longer than `MAX_WAIT_S`, the request is cancelled: still queued,
    it will not run; already being decided, it commits.
    """
    waiter = _waker(asyncio.get_running_loop()).watch(future)
    remaining = remaining_s(context)
    try:
        if remaining is not None and remaining <= MAX_WAIT_S:
            return await waiter  # grpc cancels us at the deadline: no timer needed
        async with asyncio.timeout(MAX_WAIT_S):
            return await waiter
    except BaseException:
        future.cancel()
        raise


class Core:
    """What every servicer shares: the ledger, the worker pool, stream limits, shutdown."""

    def __init__(
        self,
        service: LedgerService,
        *,
        pool: Executor | None = None,
        max_streams: int = 16,
        poll_interval_s: float = 0.05,
        batch_via: str = "execute",
        read_models: ReadModels | None = None,
        liabilities_dir: Path | None = None,
    ) -> None:
        if batch_via not in ("submit", "execute"):
            raise ValueError("batch_via is 'submit' or 'execute'")
        self.service = service
        # statements, as-of balances, audit trail (a runner of its own unless given one)
        self.read_models = read_models if read_models is not None else ReadModels(service)
        self.pool = pool
        self.stopping = threading.Event()
        self.streams = threading.BoundedSemaphore(max_streams)
        self.poll_interval_s = poll_interval_s
        self.batch_via = batch_via
        self._sorted_ids: dict[str, tuple[int, list[str]]] = {}
        # where `custody project liabilities build` wrote the proof files (GetCustomerProof)
        self.liabilities_dir = (
            liabilities_dir
            if liabilities_dir is not None
            else Path(
                os.environ.get(LIABILITIES_DIR_ENV) or service.config.data_dir / "liabilities"
            )
        )
        self._resources: dict[str, Any] = {}
        self._resources_lock = threading.Lock()

    def resource(self, name: str, make: Callable[[], R]) -> R:
        """A shared object made on first use (tables opened once, in the worker pool)."""
        with self._resources_lock:
            if name not in self._resources:
                self._resources[name] = make()
            value: R = self._resources[name]
            return value

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run blocking work (locks, database reads) in the worker pool."""
        loop = asyncio.get_running_loop()
        # in the call's context: log records in the pool carry its request id (ledger.logs)
        return await loop.run_in_executor(
            self.pool, contextvars.copy_context().run, functools.partial(fn, *args, **kwargs)
        )

    async def follow_log(
        self,
        platform_id: str,
        start_position: int,
        stop_at: int | None,
        kinds: frozenset[str] | None = None,
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        """(position, kind, stored bytes) of the platform's records from `start_position` on,
        in order, read page by page (at most LOG_READ_PAGE rows in memory) in the worker pool.

        Ends after `stop_at` (None: follows new records, polling), when the server stops, or
        when the call is cancelled (grpc.aio cancels it at the caller's deadline). `kinds`
        keeps records of those kinds only (the others are read but never decoded)."""
        stream = log_stream(platform_id)
        after = start_position - 1
        while not self.stopping.is_set():
            if stop_at is not None and after >= stop_at:
                return
            rows = await self.run(self.service.store.read, stream, after, LOG_READ_PAGE)
            if not rows:
                await asyncio.sleep(self.poll_interval_s)
                continue
            for seq, kind, packed in rows:
                if stop_at is not None and seq > stop_at:
                    return
                after = seq
                if kinds is None or kind in kinds:
                    yield seq, kind, packed

    async def acquire_stream(self, context: Context) -> None:
        """Take one of the `max_streams` slots (subscriptions, exports, alert streams), or
        abort the call with RESOURCE_EXHAUSTED / TOO_MANY_STREAMS. Release with
        `self.streams.release()`."""
        if not self.streams.acquire(blocking=False):
            await errors.abort(
                context,
                ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ApiReason.TOO_MANY_STREAMS,
                    "too many open streams (subscriptions, exports); retry later",
                    retry_delay_s=1.0,
                ),
            )

    # -- reads ----------------------------------------------------------------------------------

    def page(
        self,
        request: Any,
        identity: Identity,
        kind: str,
        render: Callable[[str, Account, int], M],
    ) -> tuple[list[M], str]:
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

    def one_account(self, request: Any, identity: Identity) -> tuple[str, str]:
        platform_id = scoped_platform(identity, request.platform_id)
        if _ID_RE.match(request.account_id) is None:
            raise errors.invalid("account_id", "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
        return platform_id, request.account_id


def _single_write(instruction: type[Message], response: type[Message]) -> Method[Any]:
    """The servicer method of a single-instruction write RPC (one frame: the hot path).

    What `_mapped` would do, flattened into one coroutine: the request's platform, its one
    instruction through the group committer, the receipt or the mapped refusal.
    """

    async def method(self: Any, request: Any, context: Context, identity: Identity) -> Any:
        try:
            core: Core = self.core
            platform_id = scoped_platform(identity, request.platform_id)
            command = translate.single_command(request, instruction)
            future = core.service.submit(platform_id, [command], identity.actor)
            [outcome] = await _committed(future, context)
            if not outcome.ok:
                raise errors.from_outcome(outcome, "instruction.")
            return response(receipt=translate.receipt(outcome))
        except grpc.aio.AbortError:
            raise
        except WireError as exc:
            error = errors.invalid(exc.field, exc.message, exc.reason)
        except Exception as exc:
            error = errors.error_for(exc, response.__name__.removesuffix("Response"))
        await errors.abort(context, error)

    method.__name__ = response.__name__.removesuffix("Response")
    return method


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


class PlatformServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    async def CreatePlatform(
        self, request: platform_pb.CreatePlatformRequest, context: Context, identity: Identity
    ) -> platform_pb.CreatePlatformResponse:
        policy_json = request.policy_json
        policy = translate.initial_policy_from_json(policy_json) if policy_json else None
        outcome = await self.core.run(
            self.core.service.create_platform,
            request.platform_id,
            request.name,
            identity.actor,
            policy,
        )
        if not outcome.ok:
            raise errors.from_outcome(outcome)
        return platform_pb.CreatePlatformResponse(
            platform_id=request.platform_id, receipt=translate.receipt(outcome)
        )


class AccountServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    OpenAccount = _single_write(common_pb.OpenAccount, account_pb.OpenAccountResponse)

    FreezeAccount = _single_write(common_pb.FreezeAccount, account_pb.FreezeAccountResponse)

    UnfreezeAccount = _single_write(common_pb.UnfreezeAccount, account_pb.UnfreezeAccountResponse)

    CloseAccount = _single_write(common_pb.CloseAccount, account_pb.CloseAccountResponse)

    @_mapped
    async def GetAccount(
        self, request: account_pb.GetAccountRequest, context: Context, identity: Identity
    ) -> account_pb.GetAccountResponse:
        platform_id, account_id = self.core.one_account(request, identity)

        def read() -> account_pb.GetAccountResponse:
            with self.core.service.reading(platform_id) as state:
                acc = state.accounts.get(account_id)
                if acc is None:
                    raise _account_missing(account_id)
                return account_pb.GetAccountResponse(account=translate.account(platform_id, acc))

        return await self.core.run(read)

    @_mapped
    async def ListAccounts(
        self, request: account_pb.ListAccountsRequest, context: Context, identity: Identity
    ) -> account_pb.ListAccountsResponse:
        items, token = await self.core.run(
            self.core.page,
            request,
            identity,
            "accounts",
            lambda p, acc, _: translate.account(p, acc),
        )
        return account_pb.ListAccountsResponse(accounts=items, next_page_token=token)


class MovementServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    Deposit = _single_write(common_pb.Deposit, movement_pb.DepositResponse)

    Transfer = _single_write(common_pb.Transfer, movement_pb.TransferResponse)

    ChargeFee = _single_write(common_pb.ChargeFee, movement_pb.ChargeFeeResponse)

    TopUpShortfall = _single_write(common_pb.TopUpShortfall, movement_pb.TopUpShortfallResponse)

    Reverse = _single_write(common_pb.Reverse, movement_pb.ReverseResponse)

    @_mapped
    async def SubmitBatch(
        self, request: movement_pb.SubmitBatchRequest, context: Context, identity: Identity
    ) -> movement_pb.SubmitBatchResponse:
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
        service = self.core.service
        if self.core.batch_via == "submit":
            commands = translate.batch_commands(request.instructions)
            future = service.submit(platform_id, commands, identity.actor, linked=request.linked)
            return translate.batch_response(await _committed(future, context))

        def run() -> movement_pb.SubmitBatchResponse:
            # all of it in the worker pool: the loop keeps serving other calls' I/O meanwhile
            commands = translate.batch_commands(request.instructions)
            outcomes = service.execute(platform_id, commands, identity.actor, linked=request.linked)
            return translate.batch_response(outcomes)

        return await self.core.run(run)


class HoldServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    PlaceHold = _single_write(common_pb.PlaceHold, hold_pb.PlaceHoldResponse)

    CaptureHold = _single_write(common_pb.CaptureHold, hold_pb.CaptureHoldResponse)

    ReleaseHold = _single_write(common_pb.ReleaseHold, hold_pb.ReleaseHoldResponse)

    ExpireHolds = _single_write(common_pb.ExpireHolds, hold_pb.ExpireHoldsResponse)

    RequestWithdrawal = _single_write(
        common_pb.RequestWithdrawal, hold_pb.RequestWithdrawalResponse
    )

    SettleWithdrawal = _single_write(common_pb.SettleWithdrawal, hold_pb.SettleWithdrawalResponse)

    FailWithdrawal = _single_write(common_pb.FailWithdrawal, hold_pb.FailWithdrawalResponse)


class QueryServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    async def GetBalance(
        self, request: query_pb.GetBalanceRequest, context: Context, identity: Identity
    ) -> query_pb.GetBalanceResponse:
        platform_id, account_id = self.core.one_account(request, identity)

        def read() -> query_pb.GetBalanceResponse:
            with self.core.service.reading(platform_id) as state:
                acc = state.accounts.get(account_id)
                if acc is None:
                    raise _account_missing(account_id)
                return query_pb.GetBalanceResponse(
                    balance=translate.balance(acc, state.next_seq - 1)
                )

        return await self.core.run(read)

    @_mapped
    async def ListBalances(
        self, request: query_pb.ListBalancesRequest, context: Context, identity: Identity
    ) -> query_pb.ListBalancesResponse:
        items, token = await self.core.run(
            self.core.page,
            request,
            identity,
            "balances",
            lambda _, acc, as_of: translate.balance(acc, as_of),
        )
        return query_pb.ListBalancesResponse(balances=items, next_page_token=token)

    @_mapped
    async def GetStatement(
        self, request: query_pb.GetStatementRequest, context: Context, identity: Identity
    ) -> query_pb.GetStatementResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        query = statement_query(platform_id, request)
        models = self.core.read_models
        return await models.statement(self.core.run, query, models.budget(remaining_s(context)))

    @_mapped
    async def GetBalanceAt(
        self, request: query_pb.GetBalanceAtRequest, context: Context, identity: Identity
    ) -> query_pb.GetBalanceAtResponse:
        platform_id, account_id = self.core.one_account(request, identity)
        at = request.WhichOneof("at")
        at_position = request.at_position if at == "at_position" else None
        at_time_ms = request.at_time_ms if at == "at_time_ms" else None
        if at_position is not None and at_position < 0:
            raise errors.invalid("at_position", "must not be negative")
        if at_time_ms is not None and at_time_ms < 0:
            raise errors.invalid("at_time_ms", "must not be negative")
        models = self.core.read_models
        return await models.balance_at(
            self.core.run,
            platform_id,
            account_id,
            at_position,
            at_time_ms,
            models.budget(remaining_s(context)),
        )


class LogServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def SubscribeLog(
        self, request: log_pb.SubscribeLogRequest, context: Context, identity: Identity
    ) -> AsyncIterator[log_pb.SubscribeLogResponse]:
        core = self.core
        try:
            platform_id = scoped_platform(identity, request.platform_id)
            if request.start_position < 0:
                raise errors.invalid("start_position", "must not be negative")
            next_seq, _ = await core.run(core.service.head, platform_id)  # PlatformNotFound
        except Exception as exc:
            await errors.abort(context, errors.error_for(exc, "SubscribeLog"))
        if not core.streams.acquire(blocking=False):
            await errors.abort(
                context,
                ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ApiReason.TOO_MANY_STREAMS,
                    "too many open log subscriptions; retry later",
                    retry_delay_s=1.0,
                ),
            )
        try:
            stop_at = None if request.follow else next_seq - 1
            async for seq, kind, packed in core.follow_log(
                platform_id, request.start_position, stop_at
            ):
                chain_hash, data = records.unpack_state(packed)
                yield log_pb.SubscribeLogResponse(
                    position=seq, kind=kind, record=data, chain_hash=chain_hash
                )
        finally:
            core.streams.release()


AUDIT_INDEX_MAX: Final = 2**62
EXPORT_CHUNK_BYTES: Final = 1 << 20


def _checkpoint_pb(pb: Any, cp: SignedCheckpoint) -> Any:
    return pb.Checkpoint(size=cp.size, root=cp.root, note=cp.note)


def _audit_call(fn: Callable[..., R], *args: Any) -> Callable[[], R]:
    """Run a ledger audit call, turning its plain exceptions into API errors."""

    def call() -> R:
        try:
            return fn(*args)
        except LookupError as exc:
            if isinstance(exc, PlatformNotFound):
                raise
            raise ApiError(
                grpc.StatusCode.NOT_FOUND, ApiReason.CHECKPOINT_NOT_FOUND, str(exc)
            ) from None
        except ValueError as exc:
            raise ApiError(
                grpc.StatusCode.OUT_OF_RANGE, ApiReason.PROOF_OUT_OF_RANGE, str(exc)
            ) from None

    return call


def _non_negative(field: str, value: int) -> None:
    if not 0 <= value <= AUDIT_INDEX_MAX:
        raise errors.invalid(field, "must be in 0..2^62")


class AuditServicer:
    """Checkpoints, proofs and the export bundle; the signing and the tree are the ledger's."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.pb = audit_pb

    @_mapped
    async def GetVerifierKey(self, request: Any, context: Context, identity: Identity) -> Any:
        platform_id = scoped_platform(identity, request.platform_id)
        service = self.core.service
        vkey = await self.core.run(_audit_call(service.vkey, platform_id))
        return self.pb.GetVerifierKeyResponse(vkey=vkey, origin=vkey.split("+", 1)[0])

    @_mapped
    async def GetCheckpoint(self, request: Any, context: Context, identity: Identity) -> Any:
        platform_id = scoped_platform(identity, request.platform_id)
        _non_negative("size", request.size)
        size = request.size or None
        cp = await self.core.run(_audit_call(self.core.service.checkpoint, platform_id, size))
        if cp is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                ApiReason.CHECKPOINT_NOT_FOUND,
                f"no checkpoint signed at size {size}" if size else "no checkpoint signed yet",
            )
        return self.pb.GetCheckpointResponse(checkpoint=_checkpoint_pb(self.pb, cp))

    @_mapped
    async def SignCheckpoint(self, request: Any, context: Context, identity: Identity) -> Any:
        platform_id = scoped_platform(identity, request.platform_id)
        cp = await self.core.run(_audit_call(self.core.service.sign_checkpoint, platform_id))
        return self.pb.SignCheckpointResponse(checkpoint=_checkpoint_pb(self.pb, cp))

    @_mapped
    async def GetInclusionProof(self, request: Any, context: Context, identity: Identity) -> Any:
        platform_id = scoped_platform(identity, request.platform_id)
        _non_negative("index", request.index)
        _non_negative("size", request.size)
        cp, path, record = await self.core.run(
            _audit_call(
                self.core.service.inclusion_proof,
                platform_id,
                request.index,
                request.size or None,
            )
        )
        return self.pb.GetInclusionProofResponse(
            tlog_proof=tlog_proof(request.index, path, cp.note), record=record, size=cp.size
        )

    @_mapped
    async def GetConsistencyProof(self, request: Any, context: Context, identity: Identity) -> Any:
        platform_id = scoped_platform(identity, request.platform_id)
        _non_negative("first", request.first)
        _non_negative("second", request.second)
        hashes = await self.core.run(
            _audit_call(
                self.core.service.consistency_proof, platform_id, request.first, request.second
            )
        )
        return self.pb.GetConsistencyProofResponse(hashes=hashes)

    @_mapped
    async def ListAuditEvents(
        self, request: audit_trail_pb.ListAuditEventsRequest, context: Context, identity: Identity
    ) -> audit_trail_pb.ListAuditEventsResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        query = audit_query(platform_id, request)
        models = self.core.read_models
        return await models.audit_events(self.core.run, query, models.budget(remaining_s(context)))

    async def ExportBundle(
        self, request: Any, context: Context, identity: Identity
    ) -> AsyncIterator[Any]:
        service = self.core.service
        if not self.core.streams.acquire(blocking=False):  # exports share the stream cap
            await errors.abort(
                context,
                ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ApiReason.TOO_MANY_STREAMS,
                    "too many open streams (exports, subscriptions); retry later",
                    retry_delay_s=1.0,
                ),
            )
        fd, path = tempfile.mkstemp(prefix="custody-export-", suffix=".bundle")
        os.close(fd)
        try:
            try:
                platform_id = scoped_platform(identity, request.platform_id)
                await self.core.run(_audit_call(service.export, platform_id, path))
            except Exception as exc:
                await errors.abort(context, errors.error_for(exc, "ExportBundle"))
            with open(path, "rb") as f:
                while chunk := await self.core.run(f.read, EXPORT_CHUNK_BYTES):
                    yield self.pb.ExportBundleResponse(data=chunk)
        finally:
            os.unlink(path)
            self.core.streams.release()


class CustomerServicer:
    """Customers' keys, payout accounts and standing authorisations (the platform relays them)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    RegisterCustomerKey = _single_write(
        common_pb.RegisterKey, customer_pb.RegisterCustomerKeyResponse
    )

    BindPayee = _single_write(common_pb.BindPayee, customer_pb.BindPayeeResponse)

    GrantStandingAuthorisation = _single_write(
        common_pb.GrantStanding, customer_pb.GrantStandingAuthorisationResponse
    )

    RevokeStandingAuthorisation = _single_write(
        common_pb.RevokeStanding, customer_pb.RevokeStandingAuthorisationResponse
    )

    ResetCustomerKey = _single_write(common_pb.ResetKey, customer_pb.ResetCustomerKeyResponse)


class PolicyServicer:
    """The policy in force and the gate; changes are requests for a checker."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    async def GetPolicy(
        self, request: policy_pb.GetPolicyRequest, context: Context, identity: Identity
    ) -> policy_pb.GetPolicyResponse:
        platform_id = scoped_platform(identity, request.platform_id)

        def read() -> policy_pb.GetPolicyResponse:
            with self.core.service.reading(platform_id) as state:
                return policy_pb.GetPolicyResponse(
                    policy_json=translate.policy_json(state.policy),
                    version=state.policy.version,
                    gate=translate.GATE_TO_WIRE[state.gate],
                    as_of_position=state.next_seq - 1,
                )

        return await self.core.run(read)

    ProposePolicy = _single_write(common_pb.SetPolicy, policy_pb.ProposePolicyResponse)

    SetPlatformGate = _single_write(common_pb.SetGate, policy_pb.SetPlatformGateResponse)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _approval_missing(request_id: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        Code.APPROVAL_NOT_FOUND,
        f"request {request_id!r} not found",
        metadata={"request_id": request_id},
    )


_STATUS_FILTER: Final[dict[int, str]] = {
    approval_pb.APPROVAL_STATUS_PENDING: "pending",
    approval_pb.APPROVAL_STATUS_APPROVED: "approved",
    approval_pb.APPROVAL_STATUS_REJECTED: "rejected",
    approval_pb.APPROVAL_STATUS_EXPIRED: "expired",
}


class ApprovalServicer:
    """Maker-checker requests: read by every role, decided by checkers."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    async def ListRequests(
        self, request: approval_pb.ListRequestsRequest, context: Context, identity: Identity
    ) -> approval_pb.ListRequestsResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        wanted: str | None = None
        if request.status != approval_pb.APPROVAL_STATUS_UNSPECIFIED:
            if request.status not in _STATUS_FILTER:
                raise errors.invalid("status", f"unknown enum value {request.status}")
            wanted = _STATUS_FILTER[request.status]
        size = request.page_size
        if size < 0:
            raise errors.invalid("page_size", "must not be negative")
        size = PAGE_SIZE_DEFAULT if size == 0 else min(size, PAGE_SIZE_MAX)
        token = _decode_token(request.page_token, platform_id, "requests")
        if token is not None and not token.isdigit():
            raise errors.invalid(
                "page_token", "not a token this list returned", ApiReason.INVALID_PAGE_TOKEN
            )
        after = -1 if token is None else int(token)

        def read() -> approval_pb.ListRequestsResponse:
            now = _now_ms()
            items: list[approval_pb.Approval] = []
            more = False
            with self.core.service.reading(platform_id) as state:
                # requests are kept in the order they were made, i.e. by position
                for pending in state.requests.values():
                    if pending.seq <= after:
                        continue
                    if wanted is not None and translate.approval_status(pending, now) != wanted:
                        continue
                    if len(items) == size:
                        more = True
                        break
                    items.append(translate.approval(platform_id, pending, now))
            next_token = (
                _encode_token(platform_id, "requests", str(items[-1].position))
                if more and items
                else ""
            )
            return approval_pb.ListRequestsResponse(requests=items, next_page_token=next_token)

        return await self.core.run(read)

    @_mapped
    async def GetRequest(
        self, request: approval_pb.GetRequestRequest, context: Context, identity: Identity
    ) -> approval_pb.GetRequestResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        request_id = request.request_id
        if _CLIENT_ID_RE.match(request_id) is None:
            raise errors.invalid("request_id", "must be the client id of an instruction")

        def read() -> approval_pb.GetRequestResponse:
            with self.core.service.reading(platform_id) as state:
                pending = state.requests.get(request_id)
                if pending is None:
                    raise _approval_missing(request_id)
                return approval_pb.GetRequestResponse(
                    request=translate.approval(platform_id, pending, _now_ms())
                )

        return await self.core.run(read)

    ApproveRequest = _single_write(common_pb.ApproveRequest, approval_pb.ApproveRequestResponse)

    RejectRequest = _single_write(common_pb.RejectRequest, approval_pb.RejectRequestResponse)


# (proto module, service name, servicer class): every custody.v1 service this server answers.
SERVICES: Final = (
    (platform_pb, "PlatformService", PlatformServicer),
    (account_pb, "AccountService", AccountServicer),
    (movement_pb, "MovementService", MovementServicer),
    (hold_pb, "HoldService", HoldServicer),
    (query_pb, "QueryService", QueryServicer),
    (log_pb, "LogService", LogServicer),
    (audit_pb, "AuditService", AuditServicer),
    (customer_pb, "CustomerService", CustomerServicer),
    (policy_pb, "PolicyService", PolicyServicer),
    (approval_pb, "ApprovalService", ApprovalServicer),
)


def all_services() -> tuple[tuple[Any, str, type], ...]:
    """SERVICES and the reporting services (disclosures, liabilities, alerts), which build on
    this module and so are imported here, not at the top."""
    from ledger.api.alerts import SERVICES as ALERT_SERVICES
    from ledger.api.disclosures import SERVICES as DISCLOSURE_SERVICES
    from ledger.api.liabilities import SERVICES as LIABILITIES_SERVICES

    return (*SERVICES, *DISCLOSURE_SERVICES, *LIABILITIES_SERVICES, *ALERT_SERVICES)


def add_servicers(server: grpc.aio.Server, core: Core, gate: Gate) -> None:
    for module, name, servicer_cls in all_services():
        add_service(server, module.DESCRIPTOR.services_by_name[name], servicer_cls(core), gate)

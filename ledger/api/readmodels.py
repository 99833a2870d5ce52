"""Statements, as-of balances and the audit trail for the API, answered from the read models.

The read models (`projections.statements`, `projections.audit_trail`) follow each platform's log
a little behind the writer. A query must not answer from a model that has not seen what the
caller asked about, so each query first names the log position it needs (the position it asks
about, or the committed head when the call arrived, so a caller always sees its own writes) and
waits for the model to reach it, within a bound:

- `catch_up` mode (the default; `custody serve` with CUSTODY_PROJECTIONS=embedded): the call
  projects the missing records itself, batch by batch, with the same `ProjectionRunner` as the
  embedded follower (its lock makes them take turns; each batch is one transaction);
- `wait` mode (CUSTODY_PROJECTIONS=off: projection workers run elsewhere): the call polls the
  stored position.

The bound is the call's deadline minus a margin, and at most `wait_s`. If the model is still
behind, the answer is FAILED_PRECONDITION / PROJECTION_BEHIND with `projected_position` and
`requested_position` in the ErrorInfo metadata; retrying later succeeds.

Every page of one walk reflects the same log prefix: the first page fixes a snapshot position,
the page token carries it (with the read model's own token, which binds the account and the
filters), and later pages never show records after it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from controls.codes import Code
from ledger.api import errors
from ledger.api.errors import ApiError, ApiReason
from ledger.api.pb import audit_trail_pb, common_pb, query_pb
from ledger.service import LedgerService
from projections import audit_trail, statements
from projections.base import INT64_MAX, PositionConflict
from projections.runner import ProjectionRunner

log = logging.getLogger("ledger.api.readmodels")

PAGE_SIZE_DEFAULT: Final = 100
PAGE_SIZE_MAX: Final = 1000
PAGE_TOKEN_MAX_LEN: Final = 512
KINDS_MAX: Final = statements.KINDS_FILTER_MAX
MODES: Final = ("catch_up", "wait")
WAIT_S_DEFAULT: Final = 5.0
_POLL_S: Final = 0.02
_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")
# actor, role, operation, kind, code filters: what records hold, and nothing else
_FILTER_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,127}\Z")
_TIME_MAX_MS: Final = 2**53

DIRECTION_TO_WIRE: Final = {
    "debit": query_pb.STATEMENT_DIRECTION_DEBIT,
    "credit": query_pb.STATEMENT_DIRECTION_CREDIT,
    "hold": query_pb.STATEMENT_DIRECTION_HOLD,
    "release": query_pb.STATEMENT_DIRECTION_RELEASE,
    "capture": query_pb.STATEMENT_DIRECTION_CAPTURE,
}
OUTCOME_TO_WIRE: Final = {
    "accepted": audit_trail_pb.AUDIT_OUTCOME_ACCEPTED,
    "refused": audit_trail_pb.AUDIT_OUTCOME_REFUSED,
}
_OUTCOME_FILTER: Final = {v: k for k, v in OUTCOME_TO_WIRE.items()}


def page_size(requested: int) -> int:
    if requested < 0:
        raise errors.invalid("page_size", "must not be negative")
    return PAGE_SIZE_DEFAULT if requested == 0 else min(requested, PAGE_SIZE_MAX)


def _bad_token() -> ApiError:
    return errors.invalid(
        "page_token", "not a token this query returned", ApiReason.INVALID_PAGE_TOKEN
    )


def encode_token(platform_id: str, kind: str, snapshot: int, inner: str) -> str:
    raw = json.dumps(
        {"v": 1, "p": platform_id, "k": kind, "s": snapshot, "t": inner}, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, platform_id: str, kind: str) -> tuple[int, str]:
    """(snapshot position, the read model's own token) of a token this query returned."""
    if len(token) > PAGE_TOKEN_MAX_LEN:
        raise _bad_token()
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise _bad_token() from None
    if (
        not isinstance(data, dict)
        or data.get("v") != 1
        or data.get("p") != platform_id
        or data.get("k") != kind
        or type(data.get("s")) is not int
        or not isinstance(data.get("t"), str)
        or not data["t"]
    ):
        raise _bad_token()
    return data["s"], data["t"]


def _check_id(field: str, value: str) -> None:
    if _ID_RE.match(value) is None:
        raise errors.invalid(field, "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _time(request: Any, field: str) -> int | None:
    if not request.HasField(field):
        return None
    value: int = getattr(request, field)
    if not 0 <= value <= _TIME_MAX_MS:
        raise errors.invalid(field, "must be a Unix time in milliseconds (0..2^53)")
    return value


def _position(request: Any, field: str) -> int | None:
    if not request.HasField(field):
        return None
    value: int = getattr(request, field)
    if not 0 <= value <= INT64_MAX // 2:
        raise errors.invalid(field, "must be a log position (>= 0)")
    return value


def _time_range(request: Any) -> tuple[int | None, int | None]:
    lo = _time(request, "from_time_ms")
    hi = _time(request, "to_time_ms")
    if lo is not None and hi is not None and lo > hi:
        raise errors.invalid("to_time_ms", "must not be before from_time_ms")
    return lo, hi


def _account_missing(account_id: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        Code.ACCOUNT_NOT_FOUND,
        f"account {account_id!r} not found",
        metadata={"account_id": account_id},
    )


def _past_head(field: str, position: int, head: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.OUT_OF_RANGE,
        ApiReason.POSITION_OUT_OF_RANGE,
        f"{field} {position} is past the log's head ({head})",
        fields={field: f"must be at most the log's head ({head})"},
        metadata={"head_position": str(head)},
    )


@dataclass(frozen=True)
class StatementQuery:
    platform_id: str
    account_id: str
    from_ms: int | None
    to_ms: int | None
    kinds: tuple[str, ...]
    page_size: int
    page_token: str


@dataclass(frozen=True)
class AuditQuery:
    platform_id: str
    flt: audit_trail.AuditFilter
    page_size: int
    page_token: str


def statement_query(platform_id: str, request: query_pb.GetStatementRequest) -> StatementQuery:
    _check_id("account_id", request.account_id)
    lo, hi = _time_range(request)
    kinds = tuple(request.kinds)
    if len(kinds) > KINDS_MAX:
        raise errors.invalid("kinds", f"at most {KINDS_MAX} kinds")
    for i, kind in enumerate(kinds):
        if _FILTER_RE.match(kind) is None:
            raise errors.invalid(f"kinds[{i}]", "not a record kind")
    return StatementQuery(
        platform_id,
        request.account_id,
        lo,
        hi,
        kinds,
        page_size(request.page_size),
        request.page_token,
    )


def audit_query(platform_id: str, request: audit_trail_pb.ListAuditEventsRequest) -> AuditQuery:
    if request.account_id:
        _check_id("account_id", request.account_id)
    for field in ("actor", "role", "operation", "kind", "code"):
        value = getattr(request, field)
        if value and _FILTER_RE.match(value) is None:
            raise errors.invalid(field, "not a value the audit trail records")
    outcome: str | None = None
    if request.outcome != audit_trail_pb.AUDIT_OUTCOME_UNSPECIFIED:
        if request.outcome not in _OUTCOME_FILTER:
            raise errors.invalid("outcome", f"unknown enum value {request.outcome}")
        outcome = _OUTCOME_FILTER[request.outcome]
    lo, hi = _time_range(request)
    positions = [_position(request, "from_position"), _position(request, "to_position")]
    if positions[0] is not None and positions[1] is not None and positions[0] > positions[1]:
        raise errors.invalid("to_position", "must not be before from_position")
    flt = audit_trail.AuditFilter(
        account=request.account_id or None,
        actor=request.actor or None,
        role=request.role or None,
        op=request.operation or None,
        kind=request.kind or None,
        code=request.code or None,
        outcome=outcome,
        from_ms=lo,
        to_ms=hi,
        from_seq=positions[0],
        to_seq=positions[1],
    )
    return AuditQuery(platform_id, flt, page_size(request.page_size), request.page_token)


def statement_line(line: dict[str, Any]) -> query_pb.StatementLine:
    return query_pb.StatementLine(
        position=line["seq"],
        index=line["n"],
        time_ms=line["ts"],
        kind=line["kind"],
        client_id=line["cid"],
        direction=DIRECTION_TO_WIRE.get(line["dir"], query_pb.STATEMENT_DIRECTION_UNSPECIFIED),
        amount_minor=line["amount"],
        counterparty_account_id=line["counterparty"],
        held_delta_minor=line["held_delta"],
        posted_minor=line["posted"],
        held_minor=line["held"],
    )


def audit_event(row: dict[str, Any]) -> audit_trail_pb.AuditEvent:
    event = audit_trail_pb.AuditEvent(
        position=row["seq"],
        time_ms=row["ts"],
        actor=row["actor"],
        role=row["role"],
        operation=row["op"],
        kind=row["kind"],
        outcome=OUTCOME_TO_WIRE.get(row["outcome"], audit_trail_pb.AUDIT_OUTCOME_UNSPECIFIED),
        code=row["code"] or "",
        control=row["control"] or "",
        message=row["message"] or "",
        client_id=row["cid"],
        currency=row["ccy"] or "",
        account_ids=row["accounts"].split(";") if row["accounts"] else [],
        amounts_minor=[int(a) for a in row["amounts"].split(";")] if row["amounts"] else [],
        tags_json=row["tags"].encode() if row["tags"] else b"",
        executes=row["executes"] or "",
        reverses=row["reverses"] or "",
        linked_to=row["linked_to"] or "",
    )
    if row["pv"] is not None:
        event.policy_version = int(row["pv"])
    if row["amount"] is not None:
        event.amount_minor = int(row["amount"])
    return event


# Runs blocking work in the server's worker pool (`Core.run`).
Run = Callable[..., Awaitable[Any]]


class ReadModels:
    """The read models of one server: freshness, then the queries.

    The `async` methods run on the server's event loop and hand every blocking step (a database
    read, one projection batch) to the worker pool through `run`, one step at a time: a query
    that waits for a read model sleeps on the loop, not in a pool thread, so waiting queries
    never starve the other reads.
    """

    def __init__(
        self,
        service: LedgerService,
        runner: ProjectionRunner | None = None,
        *,
        mode: str = "catch_up",
        wait_s: float = WAIT_S_DEFAULT,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"read model mode is one of {MODES}")
        assert 0 < wait_s <= 60, "wait_s must be in (0, 60]"
        self.service = service
        self.owns_runner = runner is None
        self.runner = runner if runner is not None else ProjectionRunner(service.store)
        self.db = self.runner.db
        self.mode = mode
        self.wait_s = wait_s
        self._projecting = threading.Lock()

    def close(self) -> None:
        if self.owns_runner:
            self.runner.close()

    # -- freshness ------------------------------------------------------------------------------

    def budget(self, remaining_s: float | None) -> float:
        """How long a call may wait for the read models: its deadline minus a margin for the
        answer to get back, at most `wait_s`."""
        if remaining_s is None:
            return self.wait_s
        return max(0.0, min(self.wait_s, remaining_s - min(0.25, remaining_s * 0.2)))

    def head(self, platform_id: str) -> int:
        """The last committed position (PlatformNotFound for an unknown platform)."""
        next_seq, _ = self.service.head(platform_id)
        return next_seq - 1

    def projected(self, platform_id: str, name: str) -> int:
        self.runner.ensure_tables()
        with self.db.reading() as cur:
            return statements.projected_position(self.db, cur, platform_id, name)

    def step(self, platform_id: str, name: str, target: int) -> tuple[int, bool]:
        """(the read model's position, whether it moved): one projection batch if it is behind
        `target` and this server catches up itself."""
        position = self.projected(platform_id, name)
        if position >= target or self.mode != "catch_up":
            return position, False
        # One query projects at a time; the others wait on the loop, not in pool threads.
        if not self._projecting.acquire(blocking=False):
            return position, False
        try:
            moved = self.runner.run_once(platform_id) > 0
        except PositionConflict:  # another runner moved it: look again
            moved = True
        finally:
            self._projecting.release()
        return self.projected(platform_id, name), moved

    async def fresh(
        self, run: Run, platform_id: str, name: str, target: int, budget_s: float
    ) -> int:
        """The read model's position once it is at least `target`; PROJECTION_BEHIND if it is
        not there within `budget_s`."""
        deadline = time.monotonic() + budget_s
        while True:
            position, moved = await run(self.step, platform_id, name, target)
            if position >= target:
                return int(position)
            if time.monotonic() >= deadline:
                raise errors.projection_behind(position, target)
            if not moved:
                await asyncio.sleep(_POLL_S)

    async def _snapshot(
        self, run: Run, platform_id: str, name: str, kind: str, token: str, budget_s: float
    ) -> tuple[int, str]:
        """(snapshot position, the read model's token) for a page: a new walk takes the read
        model's position once it has the head; a token carries its walk's snapshot."""
        head = await run(self.head, platform_id)  # PlatformNotFound
        if not token:
            return await self.fresh(run, platform_id, name, head, budget_s), ""
        snapshot, inner = decode_token(token, platform_id, kind)
        if not -1 <= snapshot <= head:  # no walk of this log has it: forged
            raise _bad_token()
        await self.fresh(run, platform_id, name, snapshot, budget_s)
        return snapshot, inner

    # -- queries --------------------------------------------------------------------------------

    async def balance_at(
        self,
        run: Run,
        platform_id: str,
        account_id: str,
        at_position: int | None,
        at_time_ms: int | None,
        budget_s: float,
    ) -> query_pb.GetBalanceAtResponse:
        head = await run(self.head, platform_id)
        if at_position is not None and at_position > head:
            raise _past_head("at_position", at_position, head)
        target = head if at_position is None else at_position
        name = statements.StatementsProjection.name
        await self.fresh(run, platform_id, name, target, budget_s)
        answer: query_pb.GetBalanceAtResponse = await run(
            self._balance_at, platform_id, account_id, target, at_time_ms
        )
        return answer

    def _balance_at(
        self, platform_id: str, account_id: str, target: int, at_time_ms: int | None
    ) -> query_pb.GetBalanceAtResponse:
        try:
            bal = statements.balance_at(
                self.db,
                platform_id,
                account_id,
                at_seq=target if at_time_ms is None else None,
                at_ms=at_time_ms,
            )
        except LookupError:
            raise _account_missing(account_id) from None
        available = bal.available_minor
        if available is None:  # a bank mirror: the same figure GetBalance gives
            available = -bal.posted_minor - bal.held_minor
        return query_pb.GetBalanceAtResponse(
            balance=common_pb.Balance(
                account_id=account_id,
                currency=bal.currency,
                posted_minor=bal.posted_minor,
                held_minor=bal.held_minor,
                available_minor=available,
                as_of_position=bal.at_seq,
            ),
            last_movement_position=-1 if bal.last_line_seq is None else bal.last_line_seq,
        )

    async def statement(
        self, run: Run, q: StatementQuery, budget_s: float
    ) -> query_pb.GetStatementResponse:
        name = statements.StatementsProjection.name
        snapshot, inner = await self._snapshot(
            run, q.platform_id, name, "statement", q.page_token, budget_s
        )
        answer: query_pb.GetStatementResponse = await run(self._statement, q, snapshot, inner)
        return answer

    def _statement(
        self, q: StatementQuery, snapshot: int, inner: str
    ) -> query_pb.GetStatementResponse:
        try:
            page = statements.statement(
                self.db,
                q.platform_id,
                q.account_id,
                page_size=q.page_size,
                page_token=inner,
                from_ms=q.from_ms,
                to_ms=q.to_ms,
                kinds=q.kinds,
            )
            currency = statements.balance_at(
                self.db, q.platform_id, q.account_id, at_seq=snapshot
            ).currency
        except LookupError:
            raise _account_missing(q.account_id) from None
        except ValueError:  # the read model's token names another query
            raise _bad_token() from None
        lines = page.lines
        token = page.next_page_token
        # Lines are in log order: the first one past the snapshot ends this walk.
        cut = next((i for i, line in enumerate(lines) if line["seq"] > snapshot), None)
        if cut is not None:
            lines, token = lines[:cut], ""
        return query_pb.GetStatementResponse(
            lines=[statement_line(line) for line in lines],
            next_page_token=encode_token(q.platform_id, "statement", snapshot, token)
            if token
            else "",
            currency=currency,
            as_of_position=snapshot,
        )

    async def audit_events(
        self, run: Run, q: AuditQuery, budget_s: float
    ) -> audit_trail_pb.ListAuditEventsResponse:
        name = audit_trail.AuditTrailProjection.name
        snapshot, inner = await self._snapshot(
            run, q.platform_id, name, "audit", q.page_token, budget_s
        )
        answer: audit_trail_pb.ListAuditEventsResponse = await run(
            self._audit_events, q, snapshot, inner
        )
        return answer

    def _audit_events(
        self, q: AuditQuery, snapshot: int, inner: str
    ) -> audit_trail_pb.ListAuditEventsResponse:
        flt = q.flt
        to_seq = snapshot if flt.to_seq is None else min(flt.to_seq, snapshot)
        flt = dataclasses.replace(flt, to_seq=to_seq)
        try:
            page = audit_trail.audit_page(self.db, q.platform_id, flt, q.page_size, inner)
        except ValueError:
            raise _bad_token() from None
        return audit_trail_pb.ListAuditEventsResponse(
            events=[audit_event(row) for row in page.rows],
            next_page_token=encode_token(q.platform_id, "audit", snapshot, page.next_page_token)
            if page.next_page_token
            else "",
            as_of_position=snapshot,
        )

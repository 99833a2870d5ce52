"""AlertService: early-warning alerts, their lifecycle, a stream of alert records, indicators.

Alerts are records in the platform's log (`alert_raised` by `system:early-warning` or by hand,
`alert_acknowledged`, `alert_closed`). The list and single reads answer from the ledger's own
state (always current: an acknowledgement through this API is visible in the next read), with
each alert's summary, time and author taken from its `alert_raised` record. Acknowledging and
closing are ledger instructions sent through the group committer like every other write; the
ledger's alerts control decides who may act on which level (ALERT_LEVEL_FORBIDDEN).

`StreamAlerts` follows the log exactly as `SubscribeLog` does (`Core.follow_log`: pages of at
most 500 records read in the worker pool, polling at the head, ending on the deadline, a cancel
or server shutdown, within the shared stream cap), keeping only the three alert kinds.

`GetRiskIndicators` reads the early-warning engine's read model (`risk.store.indicators`):
figures per business day, as current as the engine (`engine_position`); empty when the engine
does not run for this ledger (CUSTODY_RISK=off and no `custody risk run`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import grpc

from controls.codes import Code
from ledger import records
from ledger.api import errors
from ledger.api.auth import Identity, scoped_platform
from ledger.api.errors import ApiError, ApiReason
from ledger.api.handlers import Context
from ledger.api.pb import alert_pb, common_pb
from ledger.api.servicers import (
    _CLIENT_ID_RE,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    Core,
    _decode_token,
    _encode_token,
    _mapped,
    _single_write,
)
from ledger.domain import Alert
from ledger.service import LedgerService
from ledger.store import log_stream
from risk import store as rs
from risk.rules import decode_state

LEVEL_TO_WIRE: Final = {
    "GREEN": alert_pb.ALERT_LEVEL_GREEN,
    "YELLOW": alert_pb.ALERT_LEVEL_YELLOW,
    "ORANGE": alert_pb.ALERT_LEVEL_ORANGE,
    "RED": alert_pb.ALERT_LEVEL_RED,
}
LEVEL_TO_DOMAIN: Final = {v: k for k, v in LEVEL_TO_WIRE.items()}
STATUS_TO_WIRE: Final = {
    "raised": alert_pb.ALERT_STATUS_RAISED,
    "acknowledged": alert_pb.ALERT_STATUS_ACKNOWLEDGED,
    "closed": alert_pb.ALERT_STATUS_CLOSED,
}
STATUS_TO_DOMAIN: Final = {v: k for k, v in STATUS_TO_WIRE.items()}
STEP_OF_KIND: Final = {
    "alert_raised": alert_pb.ALERT_STEP_RAISED,
    "alert_acknowledged": alert_pb.ALERT_STEP_ACKNOWLEDGED,
    "alert_closed": alert_pb.ALERT_STEP_CLOSED,
}
ALERT_KINDS: Final = frozenset(STEP_OF_KIND)
TREND_DAYS: Final = 30
_DAY_MS: Final = 86_400_000
_DAY_MAX: Final = 2**40


def _alert_missing(alert_id: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        Code.ALERT_NOT_FOUND,
        f"alert {alert_id!r} not found",
        metadata={"alert_id": alert_id},
    )


def _record_at(service: LedgerService, platform_id: str, position: int) -> dict[str, Any]:
    rows = service.store.read(log_stream(platform_id), after=position - 1, limit=1)
    assert rows and rows[0][0] == position
    decoded: dict[str, Any] = records.decode(records.unpack_state(rows[0][2])[1])
    return decoded


def to_wire(service: LedgerService, platform_id: str, alert: Alert) -> alert_pb.Alert:
    """The alert from the state, with summary, time and author from its raising record."""
    rec = _record_at(service, platform_id, alert.raised_seq)
    return alert_pb.Alert(
        platform_id=platform_id,
        alert_id=alert.id,
        rule=alert.rule,
        level=LEVEL_TO_WIRE.get(alert.level, alert_pb.ALERT_LEVEL_UNSPECIFIED),
        subject=alert.subject,
        summary=rec.get("cmd", {}).get("summary", ""),
        status=STATUS_TO_WIRE.get(alert.status, alert_pb.ALERT_STATUS_UNSPECIFIED),
        raised_position=alert.raised_seq,
        raised_time_ms=rec["ts"],
        raised_by=rec["actor"],
    )


def _enum_filter(value: int, table: dict[Any, str], field: str) -> str | None:
    if value == 0:
        return None
    if value not in table:
        raise errors.invalid(field, f"unknown enum value {value}")
    return table[value]


def _alert_id(value: str) -> str:
    if _CLIENT_ID_RE.match(value) is None:
        raise errors.invalid("alert_id", "must be an alert id")
    return value


class AlertServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    async def ListAlerts(
        self, request: Any, context: Context, identity: Identity
    ) -> alert_pb.ListAlertsResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        level = _enum_filter(request.level, LEVEL_TO_DOMAIN, "level")
        status = _enum_filter(request.status, STATUS_TO_DOMAIN, "status")
        if request.page_size < 0:
            raise errors.invalid("page_size", "must not be negative")
        size = (
            PAGE_SIZE_DEFAULT if request.page_size == 0 else min(request.page_size, PAGE_SIZE_MAX)
        )
        token = _decode_token(request.page_token, platform_id, "alerts")
        if token is not None and not token.isdigit():
            raise errors.invalid(
                "page_token", "not a token this list returned", ApiReason.INVALID_PAGE_TOKEN
            )
        after = -1 if token is None else int(token)
        service = self.core.service

        def read() -> alert_pb.ListAlertsResponse:
            chunk: list[Alert] = []
            more = False
            with service.reading(platform_id) as state:
                as_of = state.next_seq - 1
                # alerts are kept in the order they were raised, i.e. by position
                for alert in state.alerts.values():
                    if alert.raised_seq <= after:
                        continue
                    if level is not None and alert.level != level:
                        continue
                    if status is not None and alert.status != status:
                        continue
                    if len(chunk) == size:
                        more = True
                        break
                    chunk.append(
                        Alert(alert.id, alert.rule, alert.level, alert.subject, alert.raised_seq)
                    )
                    chunk[-1].status = alert.status
            items = [to_wire(service, platform_id, a) for a in chunk]
            next_token = (
                _encode_token(platform_id, "alerts", str(chunk[-1].raised_seq))
                if more and chunk
                else ""
            )
            return alert_pb.ListAlertsResponse(
                alerts=items, next_page_token=next_token, as_of_position=as_of
            )

        return await self.core.run(read)

    @_mapped
    async def GetAlert(
        self, request: Any, context: Context, identity: Identity
    ) -> alert_pb.GetAlertResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        alert_id = _alert_id(request.alert_id)
        service = self.core.service

        def read() -> alert_pb.GetAlertResponse:
            with service.reading(platform_id) as state:
                found = state.alerts.get(alert_id)
                if found is None:
                    raise _alert_missing(alert_id)
                alert = Alert(found.id, found.rule, found.level, found.subject, found.raised_seq)
                alert.status = found.status
            return alert_pb.GetAlertResponse(alert=to_wire(service, platform_id, alert))

        return await self.core.run(read)

    AcknowledgeAlert = _single_write(common_pb.AcknowledgeAlert, alert_pb.AcknowledgeAlertResponse)

    CloseAlert = _single_write(common_pb.CloseAlert, alert_pb.CloseAlertResponse)

    async def StreamAlerts(
        self, request: Any, context: Context, identity: Identity
    ) -> AsyncIterator[alert_pb.StreamAlertsResponse]:
        core = self.core
        service = core.service
        try:
            platform_id = scoped_platform(identity, request.platform_id)
            if request.start_position < 0:
                raise errors.invalid("start_position", "must not be negative")
            next_seq, _ = await core.run(service.head, platform_id)  # PlatformNotFound
        except Exception as exc:
            await errors.abort(context, errors.error_for(exc, "StreamAlerts"))
        await core.acquire_stream(context)
        known: dict[str, tuple[str, str, str]] = {}  # alert id -> (level, rule, subject)

        def lookup(alert_id: str) -> tuple[str, str, str]:
            with service.reading(platform_id) as state:
                a = state.alerts.get(alert_id)
            return ("", "", "") if a is None else (a.level, a.rule, a.subject)

        try:
            stop_at = None if request.follow else next_seq - 1
            async for seq, kind, packed in core.follow_log(
                platform_id, request.start_position, stop_at, ALERT_KINDS
            ):
                data = records.unpack_state(packed)[1]
                rec = records.decode(data)
                cmd = rec.get("cmd", {})
                if kind == "alert_raised":
                    spec = rec["alert"]
                    alert_id = spec["id"]
                    known[alert_id] = (spec["level"], spec["rule"], spec["subject"])
                    text = cmd.get("summary", "")
                else:
                    alert_id = rec[kind]
                    if alert_id not in known:  # raised before the start position
                        known[alert_id] = await core.run(lookup, alert_id)
                    text = cmd.get("note" if kind == "alert_acknowledged" else "reason", "")
                level, rule, subject = known[alert_id]
                yield alert_pb.StreamAlertsResponse(
                    position=seq,
                    time_ms=rec["ts"],
                    step=STEP_OF_KIND[kind],
                    alert_id=alert_id,
                    level=LEVEL_TO_WIRE.get(level, alert_pb.ALERT_LEVEL_UNSPECIFIED),
                    rule=rule,
                    subject=subject,
                    actor=rec["actor"],
                    text=text,
                    record=data,
                )
        finally:
            core.streams.release()

    @_mapped
    async def GetRiskIndicators(
        self, request: Any, context: Context, identity: Identity
    ) -> alert_pb.GetRiskIndicatorsResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        if not 0 <= request.from_day <= _DAY_MAX:
            raise errors.invalid("from_day", "must be 0 (the last 30 days) or a day number")
        service = self.core.service

        def read() -> alert_pb.GetRiskIndicatorsResponse:
            service.head(platform_id)  # PlatformNotFound
            db = self.core.resource("risk_db", lambda: rs.open_db(service.store))
            with db.reading() as cur:
                row = db.fetchone(
                    cur,
                    f"SELECT position, state FROM {db.t('risk_positions')} "
                    f"WHERE platform = {db.ph}",
                    (platform_id,),
                )
            position = -1 if row is None else int(row[0])
            since = request.from_day
            if since == 0 and row is not None:
                last_ts = decode_state(bytes(row[1])).last_ts
                since = max(0, last_ts // _DAY_MS - TREND_DAYS)
            series = rs.indicators(db, platform_id, since)
            return alert_pb.GetRiskIndicatorsResponse(
                series=[
                    alert_pb.IndicatorSeries(
                        name=name,
                        points=[alert_pb.IndicatorPoint(day=d, value=v) for d, v in points],
                    )
                    for name, points in sorted(series.items())
                ],
                engine_position=position,
            )

        return await self.core.run(read)


SERVICES: Final = ((alert_pb, "AlertService", AlertServicer),)

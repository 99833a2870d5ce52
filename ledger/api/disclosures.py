"""DisclosureService: regulator disclosure snapshots (custody-disclosure/v1) over the API.

Building is `projections.disclosure.build` (the same code as `custody disclosure build`): the
snapshot of a signed log prefix and a period, its canonical JSON and the signed note. What is
built is kept in a small table of the API's own, `api_disclosures`, in the ledger's database
(`LedgerStore.datastore`, beside the projections' `proj_*` and the engine's `risk_*` tables),
keyed by (platform, period, checkpoint size). Keeping beats rebuilding on demand because a
`GetDisclosure` by period must know which checkpoint was used, and a rebuild of a long period
folds the whole prefix again; since the snapshot is deterministic, a second build at the same
checkpoint yields the same bytes, and the table refuses to keep different ones
(DATA_LOSS / DISCLOSURE_MISMATCH, which would mean the stored log changed under a signature).

The HTML and CSV renderings are not signed and not kept: they are rendered on request from the
kept canonical JSON (`projections.disclosure.render_html` / `render_csv`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Final

import grpc

from ledger.api import errors
from ledger.api.auth import Identity, scoped_platform
from ledger.api.errors import ApiError, ApiReason
from ledger.api.handlers import Context
from ledger.api.pb import disclosure_pb
from ledger.api.servicers import Core, _decode_token, _encode_token, _mapped
from ledger.service import LedgerService, PlatformNotFound
from projections import disclosure as pd
from projections.db import Db

TABLE: Final = "api_disclosures"
PREFIX: Final = "api_"
_COLUMNS: Final = (
    "platform",
    "period_type",
    "label",
    "from_ms",
    "to_ms",
    "size",
    "data",
    "note",
    "vkey",
    "built_ms",
    "built_by",
)
_LIST_COLUMNS: Final = tuple(c for c in _COLUMNS if c not in ("data", "note"))
PAGE_SIZE_DEFAULT: Final = 50
PAGE_SIZE_MAX: Final = 200
_CHECKPOINT_MAX: Final = 2**62
# what in DisclosureError's message says the stored log is broken, not the request
_BROKEN_LOG: Final = re.compile(r"chain link|missing from the log|mismatch|does not match")
_FORMATS: Final = frozenset(
    {disclosure_pb.DISCLOSURE_FORMAT_HTML, disclosure_pb.DISCLOSURE_FORMAT_CSV}
)


class ApiDb(Db):
    """The projections' dialect helpers, for the API's own `api_*` tables."""

    def t(self, name: str) -> str:
        assert name.startswith(PREFIX) and name.replace("_", "").isalnum(), name
        return f'"{self.schema}".{name}' if self.schema else name

    def index_name(self, name: str) -> str:
        assert name.startswith(PREFIX), name
        return name


def open_table(service: LedgerService) -> ApiDb:
    db = ApiDb(service.store)
    with db.tx() as cur:
        if db.is_pg:  # concurrent CREATE ... IF NOT EXISTS can still collide in pg_type
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('custody-api-disclosures'))")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {db.t(TABLE)} ("
            "platform TEXT NOT NULL, period_type TEXT NOT NULL, label TEXT NOT NULL, "
            "from_ms BIGINT NOT NULL, to_ms BIGINT NOT NULL, size BIGINT NOT NULL, "
            f"data {db.blob} NOT NULL, note {db.blob} NOT NULL, vkey TEXT NOT NULL, "
            "built_ms BIGINT NOT NULL, built_by TEXT NOT NULL, "
            "PRIMARY KEY (platform, period_type, label, from_ms, to_ms, size))"
            f"{db.without_rowid}"
        )
    return db


@dataclass(frozen=True)
class Kept:
    platform: str
    period_type: str
    label: str
    from_ms: int
    to_ms: int
    size: int
    data: bytes
    note: bytes
    vkey: str
    built_ms: int
    built_by: str


def _kept(row: tuple[Any, ...]) -> Kept:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["data"] = bytes(values["data"])
    values["note"] = bytes(values["note"])
    return Kept(**values)


def keep(db: ApiDb, built: pd.Built, actor: str) -> Kept:
    """Store a built snapshot (once); the kept row, which must hold the same bytes."""
    p = built.snapshot["period"]
    size = built.snapshot["checkpoint"]["size"]
    key = (built.snapshot["platform"], p["type"], p["label"], p["from_ms"], p["to_ms"], size)
    ph = db.ph
    row = (*key, built.data, built.note, built.vkey, time.time_ns() // 1_000_000, actor)
    where = (
        f"platform = {ph} AND period_type = {ph} AND label = {ph} AND from_ms = {ph} "
        f"AND to_ms = {ph} AND size = {ph}"
    )
    with db.tx() as cur:
        cur.execute(
            f"INSERT INTO {db.t(TABLE)} ({', '.join(_COLUMNS)}) VALUES "
            f"({', '.join([ph] * len(_COLUMNS))}) ON CONFLICT DO NOTHING",
            row,
        )
        found = db.fetchone(
            cur, f"SELECT {', '.join(_COLUMNS)} FROM {db.t(TABLE)} WHERE {where}", key
        )
    assert found is not None
    kept = _kept(found)
    if kept.data != built.data or kept.note != built.note:
        raise ApiError(
            grpc.StatusCode.DATA_LOSS,
            ApiReason.DISCLOSURE_MISMATCH,
            "a snapshot rebuilt at the same checkpoint differs from the one kept; the log or the "
            "signing key changed: the operators must look",
        )
    return kept


def find(db: ApiDb, platform: str, spec: pd.PeriodSpec, size: int) -> Kept | None:
    """The kept snapshot of the period at checkpoint `size` (0: the largest)."""
    ph = db.ph
    where = [f"platform = {ph}", f"period_type = {ph}"]
    params: list[Any] = [platform, spec.type]
    if spec.type == "range":
        where += [f"from_ms = {ph}", f"to_ms = {ph}"]
        params += [spec.from_ms, spec.to_ms]
    else:
        where.append(f"label = {ph}")
        params.append(spec.label)
    if size:
        where.append(f"size = {ph}")
        params.append(size)
    with db.reading() as cur:
        row = db.fetchone(
            cur,
            f"SELECT {', '.join(_COLUMNS)} FROM {db.t(TABLE)} WHERE {' AND '.join(where)} "
            "ORDER BY size DESC, from_ms, to_ms LIMIT 1",
            params,
        )
    return None if row is None else _kept(row)


def page(
    db: ApiDb, platform: str, after: tuple[int, int, str, int] | None, size: int
) -> list[dict[str, Any]]:
    """Kept snapshots (without documents), newest period first: by (from_ms DESC, to_ms DESC,
    period_type, size DESC), after the key `after`."""
    ph = db.ph
    where = f"platform = {ph}"
    params: list[Any] = [platform]
    if after is not None:
        f, t, k, s = after
        where += (
            f" AND (from_ms < {ph} OR (from_ms = {ph} AND (to_ms < {ph} OR (to_ms = {ph} AND "
            f"(period_type > {ph} OR (period_type = {ph} AND size < {ph}))))))"
        )
        params += [f, f, t, t, k, k, s]
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT {', '.join(_LIST_COLUMNS)} FROM {db.t(TABLE)} WHERE {where} "
            f"ORDER BY from_ms DESC, to_ms DESC, period_type, size DESC LIMIT {int(size)}",
            params,
        )
    return [dict(zip(_LIST_COLUMNS, row, strict=True)) for row in rows]


# -- wire -----------------------------------------------------------------------------------------


def period_spec(request: Any) -> pd.PeriodSpec:
    """The request's `period`, or INVALID_ARGUMENT naming the field."""
    if not request.HasField("period"):
        raise errors.invalid("period", "required: day, month or range")
    period = request.period
    which = period.WhichOneof("period")
    try:
        if which == "day":
            return pd.PeriodSpec.day(period.day)
        if which == "month":
            return pd.PeriodSpec.month(period.month)
        if which == "range":
            return pd.PeriodSpec.range(period.range.from_ms, period.range.to_ms)
    except pd.DisclosureError as exc:
        raise errors.invalid(f"period.{which}", str(exc)) from None
    raise errors.invalid("period", "required: day, month or range")


def _checkpoint_size(value: int) -> int:
    if not 0 <= value <= _CHECKPOINT_MAX:
        raise errors.invalid("checkpoint_size", "must be 0 (choose) or a checkpoint size")
    return value


def _formats(request: Any) -> set[int]:
    wanted = set(request.formats)
    unknown = wanted - _FORMATS
    if unknown:
        raise errors.invalid("formats", f"unknown format {min(unknown)}")
    return wanted


def to_wire(row: Kept | dict[str, Any], formats: set[int]) -> disclosure_pb.Disclosure:
    """The wire message; a Kept row carries the documents, a listed row (a dict) does not."""
    meta = row if isinstance(row, dict) else row.__dict__
    out = disclosure_pb.Disclosure(
        platform_id=meta["platform"],
        period_type=meta["period_type"],
        period_label=meta["label"],
        from_ms=meta["from_ms"],
        to_ms=meta["to_ms"],
        checkpoint_size=meta["size"],
        vkey=meta["vkey"],
        built_time_ms=meta["built_ms"],
        built_by=meta["built_by"],
    )
    if isinstance(row, Kept):
        out.json = row.data
        out.note = row.note
        out.sha256 = hashlib.sha256(row.data).hexdigest()
        snapshot = json.loads(row.data)
        out.period_closed = int(snapshot["records"]["period_closed"])
        if disclosure_pb.DISCLOSURE_FORMAT_HTML in formats:
            out.html = pd.render_html(snapshot).encode()
        if disclosure_pb.DISCLOSURE_FORMAT_CSV in formats:
            out.csv = pd.render_csv(snapshot)
    return out


def _refused(exc: pd.DisclosureError) -> ApiError:
    message = str(exc)
    if message.startswith("no checkpoint was signed"):
        return ApiError(grpc.StatusCode.NOT_FOUND, ApiReason.CHECKPOINT_NOT_FOUND, message)
    if _BROKEN_LOG.search(message):
        errors.log.error("disclosure: the stored log does not fold: %s", message)
        return ApiError(
            grpc.StatusCode.DATA_LOSS,
            ApiReason.PROJECTION_FAILED,
            "the stored log cannot be disclosed (it does not match its checkpoint); the "
            "operators are told",
        )
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, ApiReason.DISCLOSURE_REFUSED, message)


def _not_found(platform: str, spec: pd.PeriodSpec, size: int) -> ApiError:
    what = spec.label or f"{spec.from_ms}-{spec.to_ms}"
    at = f" at checkpoint {size}" if size else ""
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        ApiReason.DISCLOSURE_NOT_FOUND,
        f"no disclosure of {platform} for {spec.type} {what}{at} was built",
        metadata={"period_type": spec.type, "period": what},
    )


def _encode_key(row: dict[str, Any]) -> str:
    return json.dumps(
        [row["from_ms"], row["to_ms"], row["period_type"], row["size"]], separators=(",", ":")
    )


def _decode_key(text: str | None) -> tuple[int, int, str, int] | None:
    if text is None:
        return None
    bad = errors.invalid(
        "page_token", "not a token this list returned", ApiReason.INVALID_PAGE_TOKEN
    )
    try:
        f, t, k, s = json.loads(text)
    except (ValueError, TypeError):
        raise bad from None
    if not (type(f) is int and type(t) is int and isinstance(k, str) and type(s) is int):
        raise bad
    return f, t, k, s


class DisclosureServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    def _db(self) -> ApiDb:
        return self.core.resource("api_disclosures", lambda: open_table(self.core.service))

    @_mapped
    async def BuildDisclosure(
        self, request: Any, context: Context, identity: Identity
    ) -> disclosure_pb.BuildDisclosureResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        spec = period_spec(request)
        size = _checkpoint_size(request.checkpoint_size)
        formats = _formats(request)
        service = self.core.service

        def build() -> Kept:
            if platform_id not in service.platform_ids():
                raise PlatformNotFound(platform_id)
            try:
                built = pd.build(service, platform_id, spec, size or None)
            except pd.DisclosureError as exc:
                raise _refused(exc) from None
            return keep(self._db(), built, identity.actor)

        kept = await self.core.run(build)
        return disclosure_pb.BuildDisclosureResponse(disclosure=to_wire(kept, formats))

    @_mapped
    async def GetDisclosure(
        self, request: Any, context: Context, identity: Identity
    ) -> disclosure_pb.GetDisclosureResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        spec = period_spec(request)
        size = _checkpoint_size(request.checkpoint_size)
        formats = _formats(request)
        kept = await self.core.run(lambda: find(self._db(), platform_id, spec, size))
        if kept is None:
            raise _not_found(platform_id, spec, size)
        return disclosure_pb.GetDisclosureResponse(disclosure=to_wire(kept, formats))

    @_mapped
    async def ListDisclosures(
        self, request: Any, context: Context, identity: Identity
    ) -> disclosure_pb.ListDisclosuresResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        if request.page_size < 0:
            raise errors.invalid("page_size", "must not be negative")
        size = (
            PAGE_SIZE_DEFAULT if request.page_size == 0 else min(request.page_size, PAGE_SIZE_MAX)
        )
        after = _decode_key(_decode_token(request.page_token, platform_id, "disclosures"))
        rows = await self.core.run(lambda: page(self._db(), platform_id, after, size + 1))
        more = len(rows) > size
        rows = rows[:size]
        token = _encode_token(platform_id, "disclosures", _encode_key(rows[-1])) if more else ""
        return disclosure_pb.ListDisclosuresResponse(
            disclosures=[to_wire(r, set()) for r in rows],
            next_page_token=token,
        )


SERVICES: Final = ((disclosure_pb, "DisclosureService", DisclosureServicer),)

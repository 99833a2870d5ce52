"""LiabilitiesService: published proof-of-liabilities statements and customers' proof files.

Statements come from the log: the ledger's state keeps the position of every
`liabilities_published` record by (currency, snapshot), and the record's inclusion proof comes
from the ledger's own tree, as `custody project liabilities build --publish` takes it.

Proof files are those the operator's build wrote (`custody project liabilities build --out
DIR --publish`); the server reads them from `CUSTODY_LIABILITIES_DIR` (default
`<data dir>/liabilities`), laid out per platform and currency:

    $CUSTODY_LIABILITIES_DIR/<platform>/<currency>/<snapshot>/proofs/<account>.json
    $CUSTODY_LIABILITIES_DIR/<platform>/<currency>/proofs/<account>.json      (the latest build)

A file is served only if it is the proof of that account, platform and currency for exactly the
published statement asked for (same snapshot, root, total, depth, log position); otherwise the
answer is NOT_FOUND / LIABILITIES_PROOF_NOT_FOUND. The salt inside is a secret: nothing here
logs a file's content, and error messages never quote it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any, Final

import grpc

from controls.codes import Code
from ledger import records
from ledger.api import errors
from ledger.api.auth import Identity, scoped_platform
from ledger.api.errors import ApiError, ApiReason
from ledger.api.handlers import Context
from ledger.api.pb import liabilities_pb
from ledger.api.servicers import _ID_RE, Core, _mapped
from ledger.checkpoint import tlog_proof
from ledger.service import LedgerService
from ledger.store import log_stream
from projections import liabilities as pol

PROOF_FILE_MAX: Final = 1 << 20  # a depth-40 proof is ~4 KB
_CURRENCY_RE: Final = re.compile(r"\A[A-Z]{3}\Z")
_SNAPSHOT_MAX: Final = 2**62


def _currency(value: str, required: bool) -> str:
    if not value and not required:
        return ""
    if _CURRENCY_RE.match(value) is None:
        raise errors.invalid("currency", "must be an ISO 4217 code (three capital letters)")
    return value


def _snapshot(value: int) -> int:
    if not 0 <= value <= _SNAPSHOT_MAX:
        raise errors.invalid("snapshot_size", "must be 0 (latest) or a log size")
    return value


def _not_published(currency: str, snapshot: int) -> ApiError:
    what = f" of {currency}" if currency else ""
    at = f" at snapshot {snapshot}" if snapshot else ""
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        ApiReason.LIABILITIES_NOT_PUBLISHED,
        f"no liabilities statement{what}{at} was published",
    )


def chosen(
    published: dict[tuple[str, int], int], currency: str, snapshot: int
) -> list[tuple[str, int, int]]:
    """(currency, snapshot, position) of the statements asked for: per currency the one at
    `snapshot`, or the latest (largest snapshot); in currency order."""
    best: dict[str, tuple[int, int]] = {}
    for (ccy, snap), pos in published.items():
        if currency and ccy != currency:
            continue
        if snapshot and snap != snapshot:
            continue
        if ccy not in best or snap > best[ccy][0]:
            best[ccy] = (snap, pos)
    return [(ccy, snap, pos) for ccy, (snap, pos) in sorted(best.items())]


def statements(
    service: LedgerService, platform_id: str, currency: str, snapshot: int
) -> list[liabilities_pb.LiabilitiesStatement]:
    with service.reading(platform_id) as state:
        published = dict(state.liabilities)
    wanted = chosen(published, currency, snapshot)
    if not wanted:
        raise _not_published(currency, snapshot)
    last = max(pos for _, _, pos in wanted)
    cp = service.checkpoint(platform_id)
    if cp is None or cp.size <= last:  # a checkpoint covering every statement asked for
        cp = service.sign_checkpoint(platform_id)
    out = []
    for ccy, snap, pos in wanted:
        cp, path, record = service.inclusion_proof(platform_id, pos, cp.size)
        spec = records.decode(record)["liabilities"]
        root = base64.b64decode(spec["root"])
        out.append(
            liabilities_pb.LiabilitiesStatement(
                currency=ccy,
                snapshot_size=snap,
                depth=spec["depth"],
                root=spec["root"],
                total_minor=spec["total"],
                position=pos,
                record=record,
                tlog_proof=tlog_proof(pos, path, cp.note),
                statement_text=pol.statement_text(snap, ccy, spec["depth"], root, spec["total"]),
            )
        )
    return out


def proof_candidates(
    base: Path, platform: str, currency: str, snapshot: int, account: str
) -> list[Path]:
    name = f"{account}.json"
    return [
        base / platform / currency / str(snapshot) / "proofs" / name,
        base / platform / currency / "proofs" / name,
    ]


def _read_small(path: Path) -> bytes | None:
    """The file's bytes if it is a regular file of at most PROOF_FILE_MAX bytes (no symlinks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not os.path.isfile(path):
                return None
            data = f.read(PROOF_FILE_MAX + 1)
    except OSError:
        return None
    return data if len(data) <= PROOF_FILE_MAX else None


def matches(
    doc: Any, platform: str, account: str, stmt: dict[str, Any], position: int, record: bytes
) -> bool:
    """Is `doc` the proof file of this account for exactly this published statement?"""
    if not isinstance(doc, dict) or doc.get("format") != pol.PROOF_FORMAT:
        return False
    log = doc.get("log")
    return (
        doc.get("platform") == platform
        and doc.get("account") == account
        and doc.get("asset") == stmt["asset"]
        and doc.get("snapshot") == stmt["snapshot"]
        and doc.get("statement") == stmt
        and isinstance(log, dict)
        and log.get("position") == position
        and log.get("record") == record.decode()
    )


def customer_proof(
    service: LedgerService,
    base: Path,
    platform_id: str,
    account_id: str,
    currency: str,
    snapshot: int,
) -> liabilities_pb.GetCustomerProofResponse:
    with service.reading(platform_id) as state:
        acc = state.accounts.get(account_id)
        published = dict(state.liabilities)
    if acc is None:
        raise ApiError(
            grpc.StatusCode.NOT_FOUND,
            Code.ACCOUNT_NOT_FOUND,
            f"account {account_id!r} not found",
            metadata={"account_id": account_id},
        )
    wanted = chosen(published, currency, snapshot)
    if not wanted:
        raise _not_published(currency, snapshot)
    [(ccy, snap, pos)] = wanted
    rows = service.store.read(log_stream(platform_id), after=pos - 1, limit=1)
    record = rows[0][2][32:]
    spec = records.decode(record)["liabilities"]
    stmt = {k: spec[k] for k in ("asset", "depth", "root", "snapshot", "total")}
    for path in proof_candidates(base, platform_id, ccy, snap, account_id):
        data = _read_small(path)
        if data is None:
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if matches(doc, platform_id, account_id, stmt, pos, record):
            return liabilities_pb.GetCustomerProofResponse(
                proof_json=data, snapshot_size=snap, position=pos
            )
    raise ApiError(
        grpc.StatusCode.NOT_FOUND,
        ApiReason.LIABILITIES_PROOF_NOT_FOUND,
        f"no proof file for account {account_id!r} and the {ccy} statement at snapshot {snap}",
        metadata={"account_id": account_id, "currency": ccy, "snapshot": str(snap)},
    )


class LiabilitiesServicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    @_mapped
    async def GetLiabilitiesStatement(
        self, request: Any, context: Context, identity: Identity
    ) -> liabilities_pb.GetLiabilitiesStatementResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        currency = _currency(request.currency, required=False)
        snapshot = _snapshot(request.snapshot_size)
        items = await self.core.run(statements, self.core.service, platform_id, currency, snapshot)
        return liabilities_pb.GetLiabilitiesStatementResponse(statements=items)

    @_mapped
    async def GetCustomerProof(
        self, request: Any, context: Context, identity: Identity
    ) -> liabilities_pb.GetCustomerProofResponse:
        platform_id = scoped_platform(identity, request.platform_id)
        if _ID_RE.match(request.account_id) is None:
            raise errors.invalid("account_id", "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
        currency = _currency(request.currency, required=True)
        snapshot = _snapshot(request.snapshot_size)
        return await self.core.run(
            customer_proof,
            self.core.service,
            self.core.liabilities_dir,
            platform_id,
            request.account_id,
            currency,
            snapshot,
        )


SERVICES: Final = ((liabilities_pb, "LiabilitiesService", LiabilitiesServicer),)

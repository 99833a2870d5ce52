"""Audit trail: one row per record of the log, accepted or refused, of any kind.

Who (actor, and role = the actor's prefix before ':'), what (the instruction's `op`, the record's
`kind`), when (`ts`), under which policy version (`pv`), the outcome and, for refusals, the code
and the control that refused. Accounts touched and amounts come from the effect fields for
accepted records (the same fields ledger/fold.py applies) and from the recorded instruction for
refusals, which have no effects. Unknown kinds are kept like any other: nothing is filtered out.

Queries turn a time range into a position range (writer time never decreases along a log) and
use one index per filter: (platform, account, seq), (platform, actor, seq), (platform, op, seq),
(platform, code, seq). Exports stream page by page with a row cap.
"""

from __future__ import annotations

import csv
import io
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import IO, Any, Final

import msgspec

from ledger import records
from ledger.store import log_stream
from projections.base import (
    INT64_MAX,
    Projection,
    ProjectionError,
    Record,
    key_range,
    log_body,
    platform_number,
)
from projections.db import Db
from projections.statements import (
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    _chunks,
    _query_key,
    decode_token,
    encode_token,
    projected_position,
)

AUDIT: Final = "proj_audit"
AUDIT_ACCOUNTS: Final = "proj_audit_accounts"
AUDIT_HOLDS: Final = "proj_audit_holds"
AUDIT_CLOCK: Final = "proj_audit_clock"
AUDIT_NAMES: Final = "proj_audit_names"  # (platform, kind, name) -> integer key
# Maximal runs of consecutive positions with the same actor (kind 0) or op (kind 1): the actor
# and op filters' index. Consecutive records mostly share both, so a run costs a row now and
# then instead of an index entry per record; they partition the log, so rebuilds and any batch
# sizes give the same runs.
AUDIT_RUNS: Final = "proj_audit_runs"
AUDIT_RUNS_INDEX: Final = "proj_audit_runs_by_start"
_ACTOR: Final = 0  # kinds of names
_OP: Final = 1
_ACCOUNT: Final = 2
EXPORT_ROWS_DEFAULT: Final = 1_000_000
EXPORT_ROWS_MAX: Final = 10_000_000
_EXPORT_PAGE: Final = 1_000
_RUNS_PER_QUERY: Final = 32  # runs of one actor/op read, and range scans joined, per query
_CACHE_MAX: Final = 200_000
_REFUSED: Final = records.REFUSED_KIND
_ENCODE: Final = msgspec.json.Encoder(order="sorted").encode
_KEY_OF: Final = operator.itemgetter(0)
_SEQ_OF: Final = operator.itemgetter(1)

# The stored row is a narrow index over the log: the platform's number, the filter columns
# (actor and op as keys of proj_audit_names), and the accounts only where the record cannot tell
# them (a capture or a refusal names its accounts only through earlier records; NULL otherwise).
# Everything else a row shows is read back from the record itself, joined by position.
AUDIT_COLUMNS: Final = ("pno", "seq", "actor", "op", "code", "accounts")
# What a caller sees, in order (platform is implied by the query).
PUBLIC_COLUMNS: Final = (
    "seq",
    "ts",
    "actor",
    "role",
    "op",
    "kind",
    "outcome",
    "code",
    "control",
    "message",
    "cid",
    "pv",
    "ccy",
    "amount",
    "accounts",
    "amounts",
    "tags",
    "executes",
    "reverses",
    "linked_to",
)


class _Op(msgspec.Struct, gc=False):
    op: Any = ""


_OP_DECODE: Final = msgspec.json.Decoder(_Op).decode
_DECODE: Final = msgspec.json.Decoder().decode
_BAD: Final = (msgspec.DecodeError, msgspec.ValidationError)


def _op_of(raw: msgspec.Raw) -> Any:
    """The instruction's `op` ("" if the record has no instruction object)."""
    try:
        return _OP_DECODE(raw).op
    except _BAD:
        return ""


def _cmd_of(raw: msgspec.Raw | bytes) -> dict[str, Any]:
    try:
        cmd = _DECODE(raw)
    except _BAD:
        return {}
    return cmd if isinstance(cmd, dict) else {}


def role_of(actor: str) -> str:
    return actor.split(":", 1)[0] if ":" in actor else ""


def _cmd_accounts(cmd: dict[str, Any]) -> list[str]:
    """Account ids named by an instruction: every `account_id` / `*_account_id` field."""
    found = []
    for key in sorted(cmd):
        value = cmd[key]
        if (key == "account_id" or key.endswith("_account_id")) and isinstance(value, str):
            found.append(value)
    return found


def _amounts(rec: dict[str, Any], cmd: dict[str, Any], refused: bool) -> list[int]:
    """The amounts a record moves (its effect fields), or the instruction's for a refusal."""
    if refused:
        amount = cmd.get("amount_minor")
        return [amount] if type(amount) is int else []
    entries = rec.get("entries")
    if entries is not None:
        return [a for _, _, a in entries]
    out = []
    hold = rec.get("hold")
    if hold is not None:
        out.append(hold["amount"])
    out += [captured for _, captured, _ in rec.get("resolve", ())]
    return out


class AuditTrailProjection(Projection):
    name = "audit"
    # 2: a narrow index over the log (rows read back from the records);
    # 3: actors, ops and accounts as integer keys (proj_audit_names), platform as its number;
    # 4: actor and op filters through runs (proj_audit_runs) instead of an index entry per row
    layout = 4
    tables = (
        (AUDIT, ("seq",), "pno"),
        (AUDIT_RUNS, ("kind", "first_seq"), "pno"),
        (AUDIT_NAMES, ("kind", "name"), "platform"),
        (AUDIT_ACCOUNTS, ("akey", "seq"), "akey"),
        (AUDIT_HOLDS, ("hold_id",), "platform"),
        (AUDIT_CLOCK, ("ts",), "platform"),
    )

    def __init__(self) -> None:
        self._platform: str | None = None
        self._pno = -1
        self._holds: dict[str, tuple[str, str]] = {}
        self._names: tuple[dict[str, int], ...] = ({}, {}, {})  # per kind: name -> nkey
        self._next_key: int | None = None
        self._last_ts: int | None = None
        # the last run of each kind (actor, op) as [nkey, first_seq, last_seq], once loaded
        self._open: list[list[int] | None] | None = None

    def reset(self) -> None:
        self._platform = None
        self._pno = -1
        self._holds = {}
        self._names = ({}, {}, {})
        self._next_key = None
        self._last_ts = None
        self._open = None

    def create(self, db: Db, cur: Any) -> None:
        wr = db.without_rowid
        t = db.t
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {t(AUDIT)} (pno INTEGER NOT NULL, seq BIGINT NOT NULL, "
            "actor BIGINT NOT NULL, op BIGINT NOT NULL, code TEXT, accounts TEXT, "
            f"PRIMARY KEY (pno, seq)){wr}"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {t(AUDIT_RUNS)} (pno INTEGER NOT NULL, "
            "kind INTEGER NOT NULL, first_seq BIGINT NOT NULL, nkey BIGINT NOT NULL, "
            f"last_seq BIGINT NOT NULL, PRIMARY KEY (pno, kind, nkey, first_seq)){wr}"
        )
        # runs partition the log: one run starts at each position at most (and the last one)
        db.create_index(cur, AUDIT_RUNS_INDEX, AUDIT_RUNS, "pno, kind, first_seq", unique=True)
        db.create_index(
            cur, "proj_audit_by_code", AUDIT, "pno, code, seq", where="code IS NOT NULL"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {t(AUDIT_NAMES)} (platform TEXT NOT NULL, "
            "kind INTEGER NOT NULL, name TEXT NOT NULL, nkey BIGINT NOT NULL, "
            f"PRIMARY KEY (platform, kind, name)){wr}"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {t(AUDIT_ACCOUNTS)} (akey BIGINT NOT NULL, "
            f"seq BIGINT NOT NULL, PRIMARY KEY (akey, seq)){wr}"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {t(AUDIT_HOLDS)} (platform TEXT NOT NULL, "
            "hold_id TEXT NOT NULL, debit TEXT NOT NULL, credit TEXT NOT NULL, "
            f"PRIMARY KEY (platform, hold_id)){wr}"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {t(AUDIT_CLOCK)} (platform TEXT NOT NULL, "
            f"ts BIGINT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (platform, ts)){wr}"
        )

    def _load(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        if (
            self._platform != platform
            or len(self._holds) > _CACHE_MAX
            or sum(map(len, self._names)) > _CACHE_MAX
        ):
            self.reset()
            self._platform = platform
        if self._last_ts is None:
            row = db.fetchone(
                cur,
                f"SELECT ts FROM {db.t(AUDIT_CLOCK)} WHERE platform = {db.ph} "
                "ORDER BY ts DESC LIMIT 1",
                (platform,),
            )
            self._last_ts = -1 if row is None else int(row[0])
        if self._next_key is None:
            self._pno = platform_number(db, cur, platform)
            row = db.fetchone(
                cur, f"SELECT max(nkey) FROM {db.t(AUDIT_NAMES)} WHERE platform = {db.ph}",
                (platform,),
            )  # fmt: skip
            top = None if row is None else row[0]
            self._next_key = key_range(self._pno)[0] if top is None else int(top) + 1
        if self._open is None:
            opened: list[list[int] | None] = []
            for kind in (_ACTOR, _OP):
                row = db.fetchone(
                    cur,
                    f"SELECT nkey, first_seq, last_seq FROM {db.t(AUDIT_RUNS)} "
                    f"WHERE pno = {db.ph} AND kind = {db.ph} ORDER BY first_seq DESC LIMIT 1",
                    (self._pno, kind),
                )
                opened.append(None if row is None else [int(v) for v in row])
            self._open = opened
        want: set[str] = set()
        for rec in recs:
            if rec.entries is not None:
                continue
            for r in rec.resolve or ():
                want.add(r[0])
            if rec.kind == _REFUSED:
                cmd = _cmd_of(rec.cmd)
                for key in ("hold_id", "withdrawal_id"):
                    if isinstance(cmd.get(key), str):
                        want.add(cmd[key])
        for chunk in _chunks(sorted(want - self._holds.keys())):
            marks = ", ".join([db.ph] * len(chunk))
            for hold_id, debit, credit in db.fetchall(
                cur,
                f"SELECT hold_id, debit, credit FROM {db.t(AUDIT_HOLDS)} "
                f"WHERE platform = {db.ph} AND hold_id IN ({marks})",
                (platform, *chunk),
            ):
                self._holds[hold_id] = (debit, credit)

    def _keys(self, db: Db, cur: Any, platform: str, wanted: dict[tuple[int, str], None]) -> None:
        """Give every name in `wanted` its key: the stored one, else the next free one, in the
        order of first appearance in the log (so keys do not depend on batch sizes)."""
        names = self._names
        missing = [(kind, name) for kind, name in wanted if name not in names[kind]]
        if not missing:
            return
        for kind in (_ACTOR, _OP, _ACCOUNT):
            ids = sorted({name for k, name in missing if k == kind})
            for chunk in _chunks(ids):
                marks = ", ".join([db.ph] * len(chunk))
                for name, nkey in db.fetchall(
                    cur,
                    f"SELECT name, nkey FROM {db.t(AUDIT_NAMES)} WHERE platform = {db.ph} "
                    f"AND kind = {db.ph} AND name IN ({marks})",
                    (platform, kind, *chunk),
                ):
                    names[kind][name] = int(nkey)
        new = [(kind, name) for kind, name in missing if name not in names[kind]]
        if not new:
            return
        key = self._next_key
        assert key is not None
        if key + len(new) - 1 > key_range(self._pno)[1]:
            raise ProjectionError(f"{platform}: too many audit names for integer keys")
        rows = []
        for kind, name in new:
            names[kind][name] = key
            rows.append((platform, kind, name, key))
            key += 1
        self._next_key = key
        db.insert_many(cur, AUDIT_NAMES, ("platform", "kind", "name", "nkey"), rows)

    def apply(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        self._load(db, cur, platform, recs)
        holds = self._holds
        actors, ops, accts = self._names
        pno = self._pno
        rows: list[tuple[Any, ...]] = []
        add = rows.append
        touched: list[tuple[int, int]] = []
        touch = touched.append
        # Records naming something without a cached key wait until every such name has one
        # (stored, or the next free key in order of first appearance: batch sizes do not matter).
        later: list[tuple[int, str, str, Any, Sequence[str], str | None]] = []
        wanted: dict[tuple[int, str], None] = {}  # ordered set, first appearance first
        new_holds: list[tuple[str, str, str, str]] = []
        clock: list[tuple[str, int, int]] = []
        last_ts = self._last_ts
        assert last_ts is not None
        for rec in recs:
            seq = rec.seq
            ts = rec.ts
            if ts != last_ts:
                if ts < last_ts:
                    raise ProjectionError(f"record {seq}: time goes backwards")
                clock.append((platform, ts, seq))
                last_ts = ts
            actor = rec.actor
            if type(actor) is not str:
                actor = _name(actor)
            entries = rec.entries
            stored: str | None = None  # the accounts column, when the record cannot tell
            accounts: Sequence[str]
            if entries is not None and rec.kind != _REFUSED:  # the hot path
                op = _op_of(rec.cmd)
                if type(op) is not str:
                    op = _name(op)
                if len(entries) == 1:
                    d, c, _ = entries[0]
                    ak = actors.get(actor)
                    ok = ops.get(op)
                    dk = accts.get(d)
                    ck = accts.get(c)
                    if ak is not None and ok is not None and dk is not None and ck is not None:
                        add((pno, seq, ak, ok, rec.code, None))
                        touch((dk, seq))
                        if ck != dk:
                            touch((ck, seq))
                        continue
                    accounts = (d, c) if c != d else (d,)
                else:
                    accounts = list(dict.fromkeys(x for d, c, _ in entries for x in (d, c)))
            elif rec.kind == _REFUSED:
                cmd = _cmd_of(rec.cmd)
                op = _name(cmd.get("op", ""))
                named = _cmd_accounts(cmd)
                for key in ("hold_id", "withdrawal_id"):
                    value = cmd.get(key)
                    ref = holds.get(value) if isinstance(value, str) else None
                    if ref is not None:
                        named += ref
                accounts = list(dict.fromkeys(named))
                stored = ";".join(accounts)
            else:
                op = _name(_op_of(rec.cmd))
                named = []
                hold = rec.hold
                if hold is not None:
                    named += (hold["debit"], hold["credit"])
                    new_holds.append((platform, hold["id"], hold["debit"], hold["credit"]))
                    holds[hold["id"]] = (hold["debit"], hold["credit"])
                for hold_id, _, _ in rec.resolve or ():
                    ref = holds.get(hold_id)
                    if ref is None:
                        raise ProjectionError(f"record {seq}: unknown hold {hold_id!r}")
                    named += ref
                spec = rec.account
                if isinstance(spec, dict) and isinstance(spec.get("id"), str):
                    named.append(spec["id"])
                subject = rec.subject
                if isinstance(subject, str):
                    named.append(subject)
                accounts = list(dict.fromkeys(named))
                if rec.resolve:  # a resolution names its accounts only through the hold
                    stored = ";".join(accounts)
            ak = actors.get(actor)
            ok = ops.get(op)
            keys = [accts.get(account) for account in accounts]
            if ak is None or ok is None or None in keys:
                if ak is None:
                    wanted[(_ACTOR, actor)] = None
                if ok is None:
                    wanted[(_OP, op)] = None
                for account, k in zip(accounts, keys, strict=True):
                    if k is None:
                        wanted[(_ACCOUNT, account)] = None
                later.append((seq, actor, op, rec.code, accounts, stored))
                continue
            add((pno, seq, ak, ok, rec.code, stored))
            for k in keys:
                touch((k, seq))  # type: ignore[arg-type]
        self._last_ts = last_ts
        if later:
            self._keys(db, cur, platform, wanted)
            for seq, actor, op, code, accounts, stored in later:
                add((pno, seq, actors[actor], ops[op], code, stored))
                for account in accounts:
                    touch((accts[account], seq))
            rows.sort(key=_SEQ_OF)
            touched.sort()
        else:
            touched.sort(key=_KEY_OF)  # stable: one pass over each account's b-tree pages
        db.insert_many(cur, AUDIT, AUDIT_COLUMNS, rows)
        self._save_runs(db, cur, rows)
        db.insert_many(cur, AUDIT_ACCOUNTS, ("akey", "seq"), touched)
        db.insert_many(cur, AUDIT_HOLDS, ("platform", "hold_id", "debit", "credit"), new_holds)
        db.insert_many(cur, AUDIT_CLOCK, ("platform", "ts", "seq"), clock)

    def _save_runs(self, db: Db, cur: Any, rows: list[tuple[Any, ...]]) -> None:
        """Extend the open runs of actors and ops through `rows` (in log order), start new ones
        where the value changes, and store every run this batch touched."""
        opened = self._open
        assert opened is not None
        pno = self._pno
        out: list[tuple[int, int, int, int, int]] = []
        for kind, col in ((_ACTOR, 2), (_OP, 3)):
            run = opened[kind]
            touched = False
            for row in rows:
                key = row[col]
                seq = row[1]
                if run is not None and run[0] == key and run[2] == seq - 1:
                    run[2] = seq
                    touched = True
                    continue
                if run is not None and touched:
                    out.append((pno, kind, run[1], run[0], run[2]))
                run = [key, seq, seq]
                touched = True
            if run is not None and touched:
                out.append((pno, kind, run[1], run[0], run[2]))
            opened[kind] = run
        if out:
            cur.executemany(
                f"INSERT INTO {db.t(AUDIT_RUNS)} (pno, kind, first_seq, nkey, last_seq) "
                f"VALUES ({', '.join([db.ph] * 5)}) ON CONFLICT (pno, kind, nkey, first_seq) "
                "DO UPDATE SET last_seq = excluded.last_seq",
                out,
            )


def _name(value: Any) -> str:
    """An actor or op as stored in the names dictionary (the ledger writes strings)."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def derived_accounts(rec: dict[str, Any]) -> str:
    """The accounts of an accepted record without a resolution, from its own effect fields
    (exactly what `apply` names; refusals and resolutions store theirs)."""
    entries = rec.get("entries")
    if entries is not None:
        return ";".join(dict.fromkeys(x for d, c, _ in entries for x in (d, c)))
    named: list[str] = []
    hold = rec.get("hold")
    if hold is not None:
        named += (hold["debit"], hold["credit"])
    spec = rec.get("account")
    if isinstance(spec, dict) and isinstance(spec.get("id"), str):
        named.append(spec["id"])
    subject = rec.get("subject")
    if isinstance(subject, str):
        named.append(subject)
    return ";".join(dict.fromkeys(named))


# -- queries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    """Every field is optional; all given ones must match (AND)."""

    account: str | None = None
    actor: str | None = None
    role: str | None = None
    op: str | None = None
    kind: str | None = None
    code: str | None = None
    outcome: str | None = None  # accepted | refused
    from_ms: int | None = None  # inclusive
    to_ms: int | None = None  # inclusive
    from_seq: int | None = None  # inclusive
    to_seq: int | None = None  # inclusive

    def key(self, platform: str) -> str:
        return _query_key(platform, [getattr(self, f.name) for f in fields(self)])


@dataclass(frozen=True)
class AuditPage:
    rows: list[dict[str, Any]]
    next_page_token: str
    projected_to: int


def _seq_range(db: Db, cur: Any, platform: str, f: AuditFilter, projected: int) -> tuple[int, int]:
    """Inclusive position range of the filter's time and position bounds (times through the
    clock: the first position of each distinct writer time, which never decreases)."""
    ph = db.ph
    lo = 0 if f.from_seq is None else max(0, f.from_seq)
    hi = projected if f.to_seq is None else min(projected, f.to_seq)
    if f.from_ms is not None:
        row = db.fetchone(
            cur,
            f"SELECT seq FROM {db.t(AUDIT_CLOCK)} WHERE platform = {ph} AND ts >= {ph} "
            "ORDER BY ts LIMIT 1",
            (platform, f.from_ms),
        )
        lo = max(lo, projected + 1 if row is None else int(row[0]))
    if f.to_ms is not None:
        row = db.fetchone(
            cur,
            f"SELECT seq FROM {db.t(AUDIT_CLOCK)} WHERE platform = {ph} AND ts > {ph} "
            "ORDER BY ts LIMIT 1",
            (platform, f.to_ms),
        )
        if row is not None:
            hi = min(hi, int(row[0]) - 1)
    return lo, hi


def _public(seq: int, accounts: str, rec: dict[str, Any]) -> dict[str, Any]:
    """A row as callers see it: the stored accounts, the rest from the record itself."""
    kind = rec["kind"]
    refused = kind == _REFUSED
    cmd = rec.get("cmd")
    if not isinstance(cmd, dict):
        cmd = {}
    amounts = _amounts(rec, cmd, refused)
    total = sum(amounts)
    actor = rec.get("actor", "")
    tags = rec.get("tags")
    values = (
        seq,
        rec["ts"],
        actor,
        role_of(actor) if isinstance(actor, str) else "",
        cmd.get("op", ""),
        kind,
        "refused" if refused else "accepted",
        rec.get("code"),
        rec.get("control"),
        rec.get("message"),
        rec.get("cid", ""),
        rec.get("pv"),
        rec.get("ccy") or cmd.get("currency"),
        total if amounts and total <= INT64_MAX else None,
        accounts,
        ";".join(map(str, amounts)),
        None if tags is None else _ENCODE(tags).decode(),
        rec.get("executes"),
        rec.get("reverses"),
        rec.get("linked_to"),
    )
    return dict(zip(PUBLIC_COLUMNS, values, strict=True))


def audit_page(
    db: Db,
    platform: str,
    flt: AuditFilter | None = None,
    page_size: int = PAGE_SIZE_DEFAULT,
    page_token: str = "",
) -> AuditPage:
    """One page of the audit trail in log order (AIP-158: page_size capped, opaque token)."""
    if not 1 <= page_size <= PAGE_SIZE_MAX:
        raise ValueError(f"page_size must be in 1..{PAGE_SIZE_MAX}")
    f = flt or AuditFilter()
    if f.outcome not in (None, "accepted", "refused"):
        raise ValueError("outcome must be 'accepted' or 'refused'")
    key = f.key(platform)
    after = decode_token(page_token, key)[0] if page_token else -1
    ph = db.ph
    with db.reading() as cur:
        projected = projected_position(db, cur, platform, "audit")
        lo, hi = _seq_range(db, cur, platform, f, projected)
        lo = max(lo, after + 1)
        pno = platform_number(db, cur, platform)
        named: dict[str, int] = {}
        for col, kind in (("account", _ACCOUNT), ("actor", _ACTOR), ("op", _OP)):
            value = getattr(f, col)
            if value is not None:
                row = db.fetchone(
                    cur,
                    f"SELECT nkey FROM {db.t(AUDIT_NAMES)} WHERE platform = {ph} "
                    f"AND kind = {ph} AND name = {ph}",
                    (platform, kind, value),
                )
                if row is None:  # never seen: nothing matches
                    return AuditPage([], "", projected)
                named[col] = int(row[0])
        # the account index drives when given; else the runs of the actor (or the op)
        drive = (
            None if "account" in named else next((c for c in ("actor", "op") if c in named), None)
        )
        extra: list[str] = []  # conditions on the audit row (a) and the log's row (e)
        extra_params: list[Any] = []
        for col in ("actor", "op"):
            if col in named and col != drive:
                extra.append(f"a.{col} = {ph}")
                extra_params.append(named[col])
        if f.code is not None:
            extra.append(f"a.code = {ph}")
            extra_params.append(f.code)
        if f.kind is not None:  # the log's own column: the record's kind
            extra.append(f"e.topic = {ph}")
            extra_params.append(f.kind)
        if f.outcome is not None:
            extra.append(f"e.topic {'=' if f.outcome == 'refused' else '<>'} {ph}")
            extra_params.append(_REFUSED)
        if f.role is not None:  # the actor's prefix before ':' ("" when it has none)
            if ":" in f.role:
                extra.append("1 = 0")
            else:
                if f.role:
                    cond = f"substr(n.name, 1, {len(f.role) + 1}) = {ph}"
                    extra_params += [platform, f.role + ":"]
                else:
                    cond = "(n.name NOT LIKE '%:%' OR substr(n.name, 1, 1) = ':')"
                    extra_params.append(platform)
                extra.append(
                    f"a.actor IN (SELECT n.nkey FROM {db.t(AUDIT_NAMES)} n "
                    f"WHERE n.platform = {ph} AND n.kind = {_ACTOR} AND {cond})"
                )
        events = (
            f"JOIN {db.events_table()} e ON e.originator_id = {ph} AND e.originator_version = a.seq"
        )
        if drive is not None:
            kind = _ACTOR if drive == "actor" else _OP
            rows = _by_runs(
                db, cur, platform, pno, kind, named[drive], lo, hi, page_size + 1, extra,
                extra_params,
            )  # fmt: skip
        else:
            if "account" in named:
                src = (
                    f"{db.t(AUDIT_ACCOUNTS)} x JOIN {db.t(AUDIT)} a "
                    f"ON a.pno = {ph} AND a.seq = x.seq"
                )
                where = [f"x.akey = {ph}", f"x.seq >= {ph}", f"x.seq <= {ph}"]
                params = [pno, log_stream(platform), named["account"], lo, hi]
                order = "x.seq"
            else:
                src = f"{db.t(AUDIT)} a"
                where = [f"a.pno = {ph}", f"a.seq >= {ph}", f"a.seq <= {ph}"]
                params = [log_stream(platform), pno, lo, hi]
                order = "a.seq"
            rows = db.fetchall(
                cur,
                f"SELECT a.seq, a.accounts, e.state FROM {src} {events} "
                f"WHERE {' AND '.join(where + extra)} ORDER BY {order} LIMIT {page_size + 1}",
                params + extra_params,
            )
    out = []
    for seq, accounts, state in rows[:page_size]:
        rec = log_body(platform, seq, state, _DECODE)
        out.append(_public(seq, derived_accounts(rec) if accounts is None else accounts, rec))
    token = encode_token(key, out[-1]["seq"], 0) if len(rows) > page_size else ""
    return AuditPage(out, token, projected)


def _by_runs(
    db: Db,
    cur: Any,
    platform: str,
    pno: int,
    kind: int,
    nkey: int,
    lo: int,
    hi: int,
    limit: int,
    extra: list[str],
    extra_params: list[Any],
) -> list[tuple[Any, ...]]:
    """The first `limit` matching rows in [lo, hi] whose actor (or op) is `nkey`, through its
    runs: up to _RUNS_PER_QUERY runs at a time, one ordered, limited range scan of the audit rows
    per run (UNION ALL), so neither one long run nor many short ones is read or sorted whole."""
    ph = db.ph
    row = db.fetchone(
        cur,
        f"SELECT max(first_seq) FROM {db.t(AUDIT_RUNS)} WHERE pno = {ph} AND kind = {ph} "
        f"AND nkey = {ph} AND first_seq <= {ph}",
        (pno, kind, nkey, lo),
    )
    start = lo if row is None or row[0] is None else int(row[0])  # the run holding lo
    out: list[tuple[Any, ...]] = []
    while len(out) < limit:
        runs = db.fetchall(
            cur,
            f"SELECT first_seq, last_seq FROM {db.t(AUDIT_RUNS)} WHERE pno = {ph} "
            f"AND kind = {ph} AND nkey = {ph} AND first_seq >= {ph} AND first_seq <= {ph} "
            f"ORDER BY first_seq LIMIT {_RUNS_PER_QUERY}",
            (pno, kind, nkey, start, hi),
        )
        need = limit - len(out)
        arms: list[str] = []
        params: list[Any] = []
        for first, last in runs:
            a, b = max(int(first), lo), min(int(last), hi)
            if a > b:
                continue
            arms.append(
                f"SELECT * FROM (SELECT a.seq, a.accounts, e.state FROM {db.t(AUDIT)} a "
                f"JOIN {db.events_table()} e ON e.originator_id = {ph} "
                f"AND e.originator_version = a.seq WHERE "
                f"{' AND '.join([f'a.pno = {ph}', f'a.seq >= {ph}', f'a.seq <= {ph}', *extra])} "
                f"ORDER BY a.seq LIMIT {need}) q{len(arms)}"
            )
            params += [log_stream(platform), pno, a, b, *extra_params]
        if arms:
            out += db.fetchall(cur, f"{' UNION ALL '.join(arms)} ORDER BY 1 LIMIT {need}", params)
        if len(runs) < _RUNS_PER_QUERY:
            break
        start = int(runs[-1][0]) + 1
    return out[:limit]


def iter_audit(
    db: Db,
    platform: str,
    flt: AuditFilter | None = None,
    max_rows: int = EXPORT_ROWS_DEFAULT,
    page_token: str = "",
) -> Iterator[dict[str, Any]]:
    """Rows in log order, page by page, at most `max_rows` (memory flat in the trail's size)."""
    assert 1 <= max_rows <= EXPORT_ROWS_MAX + 1, f"max_rows must be in 1..{EXPORT_ROWS_MAX}"
    left = max_rows
    token = page_token
    while left > 0:
        page = audit_page(db, platform, flt, min(_EXPORT_PAGE, left), token)
        yield from page.rows
        left -= len(page.rows)
        token = page.next_page_token
        if not token:
            return


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row for JSON: accounts and amounts as lists, tags decoded."""
    out = dict(row)
    out["accounts"] = row["accounts"].split(";") if row["accounts"] else []
    out["amounts"] = [int(a) for a in row["amounts"].split(";")] if row["amounts"] else []
    out["tags"] = None if row["tags"] is None else msgspec.json.decode(row["tags"])
    return out


@dataclass(frozen=True)
class ExportResult:
    rows: int
    truncated: bool  # True when the cap stopped the export before the end of the trail


def export(
    db: Db,
    platform: str,
    out: IO[str],
    fmt: str = "csv",
    flt: AuditFilter | None = None,
    max_rows: int = EXPORT_ROWS_DEFAULT,
) -> ExportResult:
    """Stream the (filtered) trail as CSV (header + rows) or JSON (an array of objects)."""
    if fmt not in ("csv", "json"):
        raise ValueError("format must be csv or json")
    assert 1 <= max_rows <= EXPORT_ROWS_MAX, f"max_rows must be in 1..{EXPORT_ROWS_MAX}"
    count = 0
    # One row beyond the cap tells whether the cap cut the export short.
    rows = iter_audit(db, platform, flt, max_rows + 1)
    truncated = False
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(PUBLIC_COLUMNS)
        for row in rows:
            if count == max_rows:
                truncated = True
                break
            writer.writerow(["" if row[c] is None else row[c] for c in PUBLIC_COLUMNS])
            count += 1
        return ExportResult(count, truncated)
    out.write("[")
    for row in rows:
        if count == max_rows:
            truncated = True
            break
        out.write(",\n" if count else "\n")
        out.write(msgspec.json.encode(public_row(row), order="sorted").decode())
        count += 1
    out.write("\n]\n" if count else "]\n")
    return ExportResult(count, truncated)


def export_text(
    db: Db, platform: str, fmt: str, flt: AuditFilter | None = None, max_rows: int = 1000
) -> str:
    """Convenience for small exports (tests, the API): the whole export as one string."""
    buf = io.StringIO()
    export(db, platform, buf, fmt, flt, max_rows)
    return buf.getvalue()

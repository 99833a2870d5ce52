"""Statements and as-of balances: one line per account per money effect, with running balances.

Every line stores the account's balances right after it (posted, in the account's normal
direction, and held = pending debits), keyed (platform, account, seq, n). So a statement page is
one range scan and the balance at any log position is ONE indexed lookup (the last line at or
before it), whatever the account's history length. Times map to positions through
`proj_stmt_clock` (the first position of each distinct writer time; `ts` never decreases along a
log), so "as of 12:00" is two indexed lookups.

Money effects are derived exactly as ledger/fold.py applies them: `entries` (and nothing else)
when present, otherwise `hold`, `resolve`, `account`, `subject`; refusals move nothing. Unknown
kinds without effect fields move nothing either, so new record kinds need no change here.
"""

from __future__ import annotations

import base64
import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ledger import records
from ledger.store import log_stream
from projections.base import (
    ASSET_KINDS,
    STATUS_BY_KIND,
    NotProjected,
    Projection,
    ProjectionError,
    Record,
    key_range,
    log_body,
    platform_number,
)
from projections.db import Db

ACCOUNTS: Final = "proj_stmt_accounts"
HOLDS: Final = "proj_stmt_holds"
LINES: Final = "proj_stmt_lines"
CLOCK: Final = "proj_stmt_clock"
RETIRED: Final = ("proj_stmt_moves",)  # earlier layouts' tables, dropped on upgrade
ACCOUNT_KEY_INDEX: Final = "proj_stmt_accounts_by_key"
PAGE_SIZE_DEFAULT: Final = 50
PAGE_SIZE_MAX: Final = 1_000
KINDS_FILTER_MAX: Final = 32
_LOAD_CHUNK: Final = 500  # ids per IN (...) lookup
_CACHE_MAX: Final = 200_000  # accounts/holds kept between batches
_REFUSED: Final = records.REFUSED_KIND
_ACCOUNT_OF: Final = operator.itemgetter(0)


class _Head(msgspec.Struct, gc=False):
    """What a statement line shows of its record, read back from the log."""

    seq: int
    kind: str
    platform: str
    ts: int
    cid: Any = ""


_HEAD_DECODE: Final = msgspec.json.Decoder(_Head).decode

# Narrow on purpose (two lines per transfer): what the record says (time, kind, client id) is
# not copied: a page reads it back from the log (the event table, by position). Accounts are
# integer keys (`akey` of proj_stmt_accounts, which also scopes a line to its platform).
LINE_COLUMNS: Final = (
    "akey",
    "seq",
    "n",
    "amount",  # change of `posted` (normal direction); 0 for a pure reservation
    "held_delta",  # change of the account's held (pending debit) amount
    "posted",  # posted balance after this line, in the account's normal direction
    "held",  # held amount after this line
    "counterparty",  # the other account's akey
)
# What a statement line shows, in order.
STATEMENT_FIELDS: Final = (
    "seq",
    "n",
    "ts",
    "kind",
    "cid",
    "dir",
    "amount",
    "counterparty",
    "held_delta",
    "posted",
    "held",
)
_ACCOUNT_COLUMNS: Final = (
    "platform",
    "account",
    "akey",
    "kind",
    "ccy",
    "role",
    "status",
    "opened_seq",
    "last_seq",
    "dp",
    "cp",
    "dpend",
    "cpend",
)
_HOLD_COLUMNS: Final = (
    "platform",
    "hold_id",
    "debit",
    "credit",
    "amount",
    "status",
    "placed_seq",
    "resolved_seq",
)


class _Acct:
    """Live counters of one account (TigerBeetle-style, as in ledger/domain.py)."""

    __slots__ = (
        "asset",
        "ccy",
        "cp",
        "cpend",
        "dp",
        "dpend",
        "key",
        "kind",
        "last_seq",
        "opened_seq",
        "role",
        "status",
    )

    def __init__(
        self, key: int, kind: str, ccy: str, role: str | None, status: str, opened_seq: int
    ) -> None:
        self.key = key
        self.kind = kind
        self.ccy = ccy
        self.role = role
        self.status = status
        self.opened_seq = opened_seq
        self.last_seq = opened_seq
        self.asset = kind in ASSET_KINDS
        self.dp = 0
        self.cp = 0
        self.dpend = 0
        self.cpend = 0

    def posted(self) -> int:
        return self.dp - self.cp if self.asset else self.cp - self.dp


class _Hold:
    __slots__ = ("amount", "credit", "debit", "placed_seq", "resolved_seq", "status")

    def __init__(self, debit: str, credit: str, amount: int, status: str, placed: int) -> None:
        self.debit = debit
        self.credit = credit
        self.amount = amount
        self.status = status
        self.placed_seq = placed
        self.resolved_seq: int | None = None


class StatementsProjection(Projection):
    name = "statements"
    # 2: no proj_stmt_moves (what a record says is read back from the log);
    # 3: lines keyed by integer account keys (akey) instead of (platform, account) text
    layout = 3
    retired = RETIRED
    tables = (
        (ACCOUNTS, ("account",), "platform"),
        (HOLDS, ("hold_id",), "platform"),
        (LINES, ("akey", "seq", "n"), "akey"),
        (CLOCK, ("ts",), "platform"),
    )

    def __init__(self) -> None:
        self._platform: str | None = None
        self._accounts: dict[str, _Acct] = {}
        self._holds: dict[str, _Hold] = {}
        self._last_ts: int | None = None
        self._next_key: int | None = None  # akey of the platform's next account

    def reset(self) -> None:
        self._platform = None
        self._accounts = {}
        self._holds = {}
        self._last_ts = None
        self._next_key = None

    def create(self, db: Db, cur: Any) -> None:
        wr = db.without_rowid
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {db.t(ACCOUNTS)} (platform TEXT NOT NULL, "
            "account TEXT NOT NULL, akey BIGINT NOT NULL, kind TEXT NOT NULL, "
            "ccy TEXT NOT NULL, role TEXT, "
            "status TEXT NOT NULL, opened_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL, "
            "dp BIGINT NOT NULL, cp BIGINT NOT NULL, dpend BIGINT NOT NULL, "
            f"cpend BIGINT NOT NULL, PRIMARY KEY (platform, account)){wr}"
        )
        # akey -> account: the counterparty's id on a statement page
        db.create_index(cur, ACCOUNT_KEY_INDEX, ACCOUNTS, "akey", unique=True)
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {db.t(HOLDS)} (platform TEXT NOT NULL, "
            "hold_id TEXT NOT NULL, debit TEXT NOT NULL, credit TEXT NOT NULL, "
            "amount BIGINT NOT NULL, status TEXT NOT NULL, placed_seq BIGINT NOT NULL, "
            f"resolved_seq BIGINT, PRIMARY KEY (platform, hold_id)){wr}"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {db.t(LINES)} (akey BIGINT NOT NULL, "
            "seq BIGINT NOT NULL, n INTEGER NOT NULL, "
            "amount BIGINT NOT NULL, held_delta BIGINT NOT NULL, posted BIGINT NOT NULL, "
            "held BIGINT NOT NULL, counterparty BIGINT NOT NULL, "
            f"PRIMARY KEY (akey, seq, n)){wr}"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {db.t(CLOCK)} (platform TEXT NOT NULL, "
            f"ts BIGINT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (platform, ts)){wr}"
        )

    # -- applying records ------------------------------------------------------------------------

    def _load(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        """Fetch the accounts and holds this batch touches that are not cached yet."""
        if self._platform != platform or len(self._accounts) + len(self._holds) > _CACHE_MAX:
            self.reset()
            self._platform = platform
        ph = db.ph
        if self._last_ts is None:
            row = db.fetchone(
                cur,
                f"SELECT ts FROM {db.t(CLOCK)} WHERE platform = {ph} ORDER BY ts DESC LIMIT 1",
                (platform,),
            )
            self._last_ts = -1 if row is None else int(row[0])
        if self._next_key is None:
            first, last = key_range(platform_number(db, cur, platform))
            row = db.fetchone(
                cur, f"SELECT max(akey) FROM {db.t(ACCOUNTS)} WHERE platform = {ph}", (platform,)
            )
            top = None if row is None else row[0]
            self._next_key = first if top is None else int(top) + 1
            assert first <= self._next_key <= last + 1, (platform, self._next_key)
        holds = self._holds
        want_holds = {
            r[0] for rec in recs if rec.entries is None and rec.resolve for r in rec.resolve
        } - holds.keys()
        for chunk in _chunks(sorted(want_holds)):
            marks = ", ".join([ph] * len(chunk))
            for hold_id, debit, credit, amount, status, placed, resolved in db.fetchall(
                cur,
                f"SELECT hold_id, debit, credit, amount, status, placed_seq, resolved_seq "
                f"FROM {db.t(HOLDS)} WHERE platform = {ph} AND hold_id IN ({marks})",
                (platform, *chunk),
            ):
                h = _Hold(debit, credit, int(amount), status, int(placed))
                h.resolved_seq = resolved
                holds[hold_id] = h
        want: set[str] = set()
        for rec in recs:
            entries = rec.entries
            if entries is not None:
                for d, c, _ in entries:
                    want.add(d)
                    want.add(c)
                continue
            hold = rec.hold
            if hold is not None:
                want.add(hold["debit"])
                want.add(hold["credit"])
            subject = rec.subject
            if isinstance(subject, str):
                want.add(subject)
            for hold_id, _, _ in rec.resolve or ():
                h2 = holds.get(hold_id)
                if h2 is not None:
                    want.add(h2.debit)
                    want.add(h2.credit)
        accounts = self._accounts
        for chunk in _chunks(sorted(want - accounts.keys())):
            marks = ", ".join([ph] * len(chunk))
            for row in db.fetchall(
                cur,
                f"SELECT account, akey, kind, ccy, role, status, opened_seq, last_seq, dp, cp, "
                f"dpend, cpend FROM {db.t(ACCOUNTS)} WHERE platform = {ph} "
                f"AND account IN ({marks})",
                (platform, *chunk),
            ):
                a = _Acct(int(row[1]), row[2], row[3], row[4], row[5], int(row[6]))
                a.last_seq, a.dp, a.cp, a.dpend, a.cpend = (int(v) for v in row[7:12])
                accounts[row[0]] = a

    def apply(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        self._load(db, cur, platform, recs)
        accounts = self._accounts
        holds = self._holds
        lines: list[tuple[Any, ...]] = []
        add = lines.append
        clock: list[tuple[str, int, int]] = []
        dirty: set[str] = set()
        mark = dirty.add
        dirty_holds: set[str] = set()
        last_ts = self._last_ts
        assert last_ts is not None

        def acct(account_id: str, seq: int) -> _Acct:
            a = accounts.get(account_id)
            if a is None:
                raise ProjectionError(f"record {seq}: unknown account {account_id!r}")
            return a

        for rec in recs:
            seq = rec.seq
            ts = rec.ts
            if ts != last_ts:
                if ts < last_ts:
                    raise ProjectionError(f"record {seq}: time goes backwards")
                clock.append((platform, ts, seq))
                last_ts = ts
            kind = rec.kind
            if kind == _REFUSED:
                continue
            n = 0
            entries = rec.entries
            if entries is not None:  # the hot path, as in fold.apply_record
                for d, c, amount in entries:
                    da = accounts.get(d)
                    ca = accounts.get(c)
                    if da is None or ca is None:
                        acct(c if da else d, seq)  # raises
                        raise AssertionError
                    if da.ccy != ca.ccy or d == c:
                        raise ProjectionError(f"record {seq}: bad posting {d}->{c}")
                    da.dp += amount
                    ca.cp += amount
                    da.last_seq = ca.last_seq = seq
                    dk = da.key
                    ck = ca.key
                    if da.asset:
                        add((dk, seq, n, amount, 0, da.dp - da.cp, da.dpend, ck))
                    else:
                        add((dk, seq, n, -amount, 0, da.cp - da.dp, da.dpend, ck))
                    if ca.asset:
                        add((ck, seq, n + 1, -amount, 0, ca.dp - ca.cp, ca.dpend, dk))
                    else:
                        add((ck, seq, n + 1, amount, 0, ca.cp - ca.dp, ca.dpend, dk))
                    n += 2
                    mark(d)
                    mark(c)
                continue
            hold = rec.hold
            if hold is not None:
                hid, d, c, amount = hold["id"], hold["debit"], hold["credit"], hold["amount"]
                if hid in holds:
                    raise ProjectionError(f"record {seq}: hold {hid!r} placed twice")
                da = acct(d, seq)
                ca = acct(c, seq)
                da.dpend += amount
                ca.cpend += amount
                da.last_seq = seq
                holds[hid] = _Hold(d, c, amount, "pending", seq)
                dirty_holds.add(hid)
                # The credit side's posted and held amounts do not change: no line for it.
                add((da.key, seq, 0, 0, amount, da.posted(), da.dpend, ca.key))
                dirty.add(d)
                dirty.add(c)
                continue
            resolve = rec.resolve
            if resolve is not None:
                for hid, captured, status in resolve:
                    h = holds.get(hid)
                    if h is None or h.status != "pending" or not 0 <= captured <= h.amount:
                        raise ProjectionError(f"record {seq}: hold {hid!r} cannot be resolved")
                    da = acct(h.debit, seq)
                    ca = acct(h.credit, seq)
                    da.dpend -= h.amount
                    ca.cpend -= h.amount
                    da.dp += captured
                    ca.cp += captured
                    da.last_seq = ca.last_seq = seq
                    h.status = status
                    h.resolved_seq = seq
                    dirty_holds.add(hid)
                    add((da.key, seq, n, captured if da.asset else -captured, -h.amount,
                         da.posted(), da.dpend, ca.key))  # fmt: skip
                    if captured:
                        add((ca.key, seq, n + 1, -captured if ca.asset else captured, 0,
                             ca.posted(), ca.dpend, da.key))  # fmt: skip
                    n += 2
                    dirty.add(h.debit)
                    dirty.add(h.credit)
                continue
            spec = rec.account
            if kind == "account_opened" and isinstance(spec, dict):
                account_id = spec["id"]
                if account_id in accounts:
                    raise ProjectionError(f"record {seq}: account {account_id!r} opened twice")
                key = self._next_key
                assert key is not None
                if key > key_range(platform_number(db, cur, platform))[1]:
                    raise ProjectionError(f"record {seq}: too many accounts for integer keys")
                self._next_key = key + 1
                accounts[account_id] = _Acct(
                    key, spec["kind"], spec["ccy"], spec.get("role"), "open", seq
                )
                dirty.add(account_id)
                continue
            status = STATUS_BY_KIND.get(kind)
            subject = rec.subject
            if status is not None and isinstance(subject, str):
                a = acct(subject, seq)
                a.status = status
                a.last_seq = seq
                dirty.add(subject)
        self._last_ts = last_ts
        # Grouped by account (stable, so each account's lines stay in log order): every b-tree
        # page of an account is then touched once per batch instead of once per line.
        lines.sort(key=_ACCOUNT_OF)
        db.insert_many(cur, LINES, LINE_COLUMNS, lines)
        db.insert_many(cur, CLOCK, ("platform", "ts", "seq"), clock)
        self._save(db, cur, platform, dirty, dirty_holds)

    def _save(
        self, db: Db, cur: Any, platform: str, dirty: set[str], dirty_holds: set[str]
    ) -> None:
        accounts = self._accounts
        holds = self._holds
        if dirty:
            rows = []
            for account_id in sorted(dirty):
                a = accounts[account_id]
                rows.append((platform, account_id, a.key, a.kind, a.ccy, a.role, a.status,
                             a.opened_seq, a.last_seq, a.dp, a.cp, a.dpend, a.cpend))  # fmt: skip
            cur.executemany(_upsert(db, ACCOUNTS, _ACCOUNT_COLUMNS, 2), rows)
        if dirty_holds:
            hrows = []
            for hid in sorted(dirty_holds):
                h = holds[hid]
                hrows.append((platform, hid, h.debit, h.credit, h.amount, h.status, h.placed_seq,
                              h.resolved_seq))  # fmt: skip
            cur.executemany(_upsert(db, HOLDS, _HOLD_COLUMNS, 2), hrows)
        # Resolved holds are never needed again by this projection: keep the cache small.
        for hid in dirty_holds:
            if holds[hid].status != "pending":
                del holds[hid]


def _upsert(db: Db, table: str, columns: Sequence[str], key_len: int) -> str:
    marks = ", ".join([db.ph] * len(columns))
    sets = ", ".join(f"{c} = excluded.{c}" for c in columns[key_len:])
    return (
        f"INSERT INTO {db.t(table)} ({', '.join(columns)}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(columns[:key_len])}) DO UPDATE SET {sets}"
    )


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + _LOAD_CHUNK] for i in range(0, len(ids), _LOAD_CHUNK)]


# -- queries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Balance:
    platform: str
    account: str
    at_seq: int  # the balance is after every record up to and including this position
    last_line_seq: int | None  # the position of the account's last movement at or before it
    posted_minor: int
    held_minor: int
    available_minor: int | None  # None for debit-normal bank mirrors
    currency: str
    kind: str


@dataclass(frozen=True)
class StatementPage:
    lines: list[dict[str, Any]]
    next_page_token: str  # "" on the last page
    projected_to: int  # the projection's position when the page was read


def projected_position(db: Db, cur: Any, platform: str, name: str = "statements") -> int:
    row = db.fetchone(
        cur,
        f"SELECT position FROM {db.t('proj_positions')} "
        f"WHERE name = {db.ph} AND platform = {db.ph}",
        (name, platform),
    )
    return -1 if row is None else int(row[0])


def seq_at_time(db: Db, cur: Any, platform: str, at_ms: int, projected: int) -> int:
    """The last projected position whose writer time is <= at_ms (-1 if none)."""
    row = db.fetchone(
        cur,
        f"SELECT seq FROM {db.t(CLOCK)} WHERE platform = {db.ph} AND ts > {db.ph} "
        "ORDER BY ts LIMIT 1",
        (platform, at_ms),
    )
    return projected if row is None else min(projected, int(row[0]) - 1)


def _account_meta(db: Db, cur: Any, platform: str, account: str) -> tuple[str, str, int]:
    """(kind, currency, akey) of a projected account."""
    row = db.fetchone(
        cur,
        f"SELECT kind, ccy, akey FROM {db.t(ACCOUNTS)} "
        f"WHERE platform = {db.ph} AND account = {db.ph}",
        (platform, account),
    )
    if row is None:
        raise LookupError(f"account {account!r} of platform {platform!r} (not projected)")
    return str(row[0]), str(row[1]), int(row[2])


def balance_at(
    db: Db,
    platform: str,
    account: str,
    at_seq: int | None = None,
    at_ms: int | None = None,
) -> Balance:
    """Balance after position `at_seq`, or at time `at_ms`, or now (the projected head).

    One lookup in the clock (for a time) and one in the lines: O(log n) whatever the history.
    """
    assert at_seq is None or at_ms is None, "give a position or a time, not both"
    with db.reading() as cur:
        projected = projected_position(db, cur, platform)
        kind, ccy, akey = _account_meta(db, cur, platform, account)
        if at_ms is not None:
            seq = seq_at_time(db, cur, platform, at_ms, projected)
        elif at_seq is not None:
            if at_seq < -1:
                raise ValueError("at_seq must be >= -1")
            if at_seq > projected:
                raise NotProjected(f"{platform} is projected to {projected}, not {at_seq}")
            seq = at_seq
        else:
            seq = projected
        row = db.fetchone(
            cur,
            f"SELECT seq, posted, held FROM {db.t(LINES)} WHERE akey = {db.ph} "
            f"AND seq <= {db.ph} ORDER BY seq DESC, n DESC LIMIT 1",
            (akey, seq),
        )
    last, posted, held = (None, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))
    available = None if kind in ASSET_KINDS else posted - held
    return Balance(platform, account, seq, last, posted, held, available, ccy, kind)


def current_balances(db: Db, platform: str, limit: int = PAGE_SIZE_MAX) -> list[dict[str, Any]]:
    """Projected balances of a platform's accounts (first `limit` by id)."""
    assert 1 <= limit <= PAGE_SIZE_MAX
    with db.reading() as cur:
        rows = db.fetchall(
            cur,
            f"SELECT account, kind, ccy, role, status, dp, cp, dpend FROM {db.t(ACCOUNTS)} "
            f"WHERE platform = {db.ph} ORDER BY account LIMIT {int(limit)}",
            (platform,),
        )
    out = []
    for account, kind, ccy, role, status, dp, cp, dpend in rows:
        posted = dp - cp if kind in ASSET_KINDS else cp - dp
        out.append(
            {
                "account": account,
                "kind": kind,
                "currency": ccy,
                "role": role,
                "status": status,
                "posted_minor": posted,
                "held_minor": dpend,
                "available_minor": None if kind in ASSET_KINDS else cp - dp - dpend,
            }
        )
    return out


def _query_key(*parts: Any) -> str:
    return hashlib.sha256(msgspec.json.encode(list(parts))).hexdigest()[:16]


def encode_token(key: str, seq: int, n: int) -> str:
    raw = msgspec.json.encode({"q": key, "s": seq, "n": n})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, key: str) -> tuple[int, int]:
    """(seq, n) after which the next page starts; refuses a token from another query."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = msgspec.json.decode(raw)
        seq, n, q = data["s"], data["n"], data["q"]
    except Exception:
        raise ValueError("page_token is not valid") from None
    if q != key or type(seq) is not int or type(n) is not int:
        raise ValueError("page_token belongs to another query")
    return seq, n


def _line(row: tuple[Any, ...], asset: bool) -> dict[str, Any]:
    """A statement line; `dir` says which side of the account moved (debit, credit) or how
    its reservation changed (hold, release, capture)."""
    seq, n, ts, kind, cid, amount, counterparty, held_delta, posted, held = row
    if held_delta > 0:
        direction = "hold"
    elif held_delta < 0:
        direction = "capture" if amount else "release"
    else:
        direction = "credit" if (amount > 0) != asset else "debit"
    values = (seq, n, ts, kind, cid, direction, amount, counterparty, held_delta, posted, held)
    return dict(zip(STATEMENT_FIELDS, values, strict=True))


def statement(
    db: Db,
    platform: str,
    account: str,
    page_size: int = PAGE_SIZE_DEFAULT,
    page_token: str = "",
    from_ms: int | None = None,
    to_ms: int | None = None,
    kinds: Sequence[str] = (),
) -> StatementPage:
    """One page of an account's lines, oldest first (AIP-158: page_size capped, opaque token).

    A time range becomes a position range through the clock, so the scan starts at the first
    line in range instead of the account's first line.
    """
    if not 1 <= page_size <= PAGE_SIZE_MAX:
        raise ValueError(f"page_size must be in 1..{PAGE_SIZE_MAX}")
    if len(kinds) > KINDS_FILTER_MAX:
        raise ValueError(f"at most {KINDS_FILTER_MAX} kinds")
    key = _query_key(platform, account, from_ms, to_ms, sorted(kinds))
    after_seq, after_n = decode_token(page_token, key) if page_token else (-1, -1)
    ph = db.ph
    with db.reading() as cur:
        projected = projected_position(db, cur, platform)
        kind, _, akey = _account_meta(db, cur, platform, account)
        lo = -1 if from_ms is None else seq_at_time(db, cur, platform, from_ms - 1, projected)
        hi = projected if to_ms is None else seq_at_time(db, cur, platform, to_ms, projected)
        # An indexable lower bound for the token too, so deep pages stay one range scan.
        where = [f"l.akey = {ph}", f"l.seq > {ph}", f"l.seq <= {ph}"]
        params: list[Any] = [akey, max(lo, after_seq - 1), hi]
        if after_seq >= 0:
            where.append(f"(l.seq > {ph} OR (l.seq = {ph} AND l.n > {ph}))")
            params += [after_seq, after_seq, after_n]
        if kinds:
            where.append(f"e.topic IN ({', '.join([ph] * len(kinds))})")
            params += list(kinds)
        rows = db.fetchall(
            cur,
            f"SELECT l.seq, l.n, e.state, l.amount, k.account, l.held_delta, "
            f"l.posted, l.held FROM {db.t(LINES)} l JOIN {db.events_table()} e "
            f"ON e.originator_id = {ph} AND e.originator_version = l.seq "
            f"JOIN {db.t(ACCOUNTS)} k ON k.akey = l.counterparty "
            f"WHERE {' AND '.join(where)} ORDER BY l.seq, l.n LIMIT {page_size + 1}",
            [log_stream(platform), *params],
        )
    asset = kind in ASSET_KINDS
    lines = []
    for seq, n, state, *rest in rows[:page_size]:
        head = log_body(platform, seq, state, _HEAD_DECODE)
        lines.append(_line((seq, n, head.ts, head.kind, head.cid, *rest), asset))
    token = ""
    if len(rows) > page_size:
        token = encode_token(key, lines[-1]["seq"], lines[-1]["n"])
    return StatementPage(lines, token, projected)

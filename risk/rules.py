"""The early-warning rules (custody-domain §6.2) over one platform's ordered log.

`Rules.apply(state, rec, out)` looks at one record and `Rules.tick(state, now_ms, feed, out)`
at the passage of time (deadlines, ageing) and at the reconciliation feed. Both only read the
record (or the time) and the rule state, and add `Finding`s to `out`; nothing here touches a
database or the ledger. The state is a msgspec struct, so the engine stores it beside its
position in one transaction and a restart resumes exactly where the last batch ended.

Every finding gets a stable alert id from (rule, subject, window, level): the same pattern seen
again (after a restart, on a rebuild, on the next tick) gives the same id, and the engine raises
each id once. Escalation (YELLOW -> ORANGE -> RED) is a new alert with its own id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections import deque
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from controls.policy import DAY_MS, DEFAULT_POLICY, GATE_ORDER, HOUR_MS
from risk import matrix
from risk.feed import ReconciliationFeed
from risk.ruleset import RULE_NAMES, RuleSet

_ID_MATCH: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}").fullmatch
CUSTOMER: Final = "customer"
OMNIBUS: Final = "omnibus"
_EPOCH: Final = dt.date(1970, 1, 1)


def subject_id(text: str) -> str:
    """A subject the ledger accepts (an id): the text itself, or a short digest of it."""
    if _ID_MATCH(text) is not None:
        return text
    return "x-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def alert_id(rule: str, subject: str, window: str, level: str) -> str:
    """Stable id of an alert: the same finding always gets the same id."""
    digest = hashlib.sha256(f"{rule}\n{subject}\n{window}\n{level}".encode()).hexdigest()
    return f"{rule}-{digest[:24]}"


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    rule: str
    subject: str  # an id the ledger accepts ("" = the platform)
    window: str  # what makes this occurrence distinct (a day, a record position, an item id)
    level: str
    summary: str

    @property
    def alert_id(self) -> str:
        return alert_id(self.rule, self.subject, self.window, self.level)


class Output:
    """What one step of the rules produced: findings, and indicator figures per business day."""

    __slots__ = ("counters", "findings", "gauges", "restrict")

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.counters: dict[tuple[int, str], int] = {}  # (day, name) -> amount added
        self.gauges: dict[tuple[int, str], int] = {}  # (day, name) -> value at the day's end
        self.restrict: list[str] = []  # RED alert ids that should restrict the gate

    def count(self, day: int, name: str, amount: int = 1) -> None:
        key = (day, name)
        self.counters[key] = self.counters.get(key, 0) + amount


STATE_FORMAT: Final = 2  # 1: one msgpack blob with everything (before per-account rows)


class Core(msgspec.Struct, kw_only=True):
    """The platform-wide part of the rule state: small, stored whole with the position.

    Keyed collections that grow with the platform (accounts, alert ids, pending holds, open LVT
    reports) are not here: they are rows of `risk_state`, written only when they changed.
    """

    format: int = 0  # STATE_FORMAT; 0 = a blob from before per-account rows (rebuilt)
    # policy figures, from platform_created / policy_set
    day_offset_ms: int = DEFAULT_POLICY.day_offset_ms
    lvt: dict[str, list[int]] = {}  # currency -> [individual, corporate]
    auto_restrict: int = 1
    gate: str = "NORMAL"
    restrict_pending: int = 0
    last_ts: int = 0
    # W01/W02/W03
    shortfalls: dict[str, list[Any]] = {}  # recon id -> [ccy, amount, day_end_ms, topped_up]
    excess_since: dict[str, int] = {}  # currency -> first business day in excess
    recon_start: dict[str, int] = {}  # currency -> day the omnibus account opened
    reconciled: dict[str, list[int]] = {}  # currency -> business days reconciled (recent)
    # W12
    watched: dict[str, list[Any]] = {}  # withdrawal hold id -> [account, rebind ts]
    # W15
    seg: dict[str, list[int]] = {}
    seg_red: dict[str, int] = {}
    # W16
    requests: dict[str, list[Any]] = {}  # request id -> [maker, ts, expires]
    approvals: list[list[Any]] = []  # [ts, maker, checker]
    near_expiry: dict[str, list[int]] = {}
    rejections: dict[str, list[int]] = {}
    # W17
    last_verify_ms: int = 0
    # W19
    omni: dict[str, int] = {}  # currency -> omnibus balance
    omni_moves: dict[str, Any] = {}  # currency -> deque of (ts, delta) within the window
    # W23
    refusal_hours: dict[str, list[int]] = {}  # hour -> [refusals, screening/auth, fired]


class Tracked(dict[str, Any]):
    """A dict that remembers which keys were set or deleted since the last `changes()`."""

    __slots__ = ("changed",)

    def __init__(self) -> None:
        super().__init__()
        self.changed: set[str] = set()

    def __setitem__(self, key: str, value: Any) -> None:
        self.changed.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.changed.add(key)
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key in self:
            self.changed.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self.changed.add(key)
        return super().setdefault(key, default)


class TrackedSet(set[str]):
    """A set that remembers what was added since the last `changes()` (ids are never removed)."""

    __slots__ = ("added",)

    def __init__(self) -> None:
        super().__init__()
        self.added: set[str] = set()

    def add(self, item: str) -> None:
        if item not in self:
            self.added.add(item)
            super().add(item)


class Acct:
    """What the rules remember about one account (a `risk_state` row `a:<account id>`).

    Sliding windows are deques of (ts, ...) in time order (the writer stamps records with
    non-decreasing times) with their running sums / distinct-counterparty counts kept beside
    them, so a movement costs O(1) amortised instead of a pass over the window.
    """

    __slots__ = (
        "auth_fail",
        "bound",
        "corporate",
        "episodes",
        "fan",
        "fan_fired",
        "fan_in",
        "fan_out",
        "in_sum",
        "ins",
        "kind",
        "last_activity",
        "legs_in",
        "legs_out",
        "near_in",
        "near_out",
        "out_sum",
        "outs",
        "rebound",
        "wake",
    )

    def __init__(self) -> None:
        self.kind: str | None = None  # None: never opened in this log
        self.corporate = 0
        self.last_activity: int | None = None  # W10
        self.wake: list[int] | None = None  # W10 [since, sum, count, fired]
        self.near_in: list[list[int]] = []  # W07 [[ts, amount]] near the threshold
        self.near_out: list[list[int]] = []
        self.legs_in: list[int] | None = None  # W07 [day, count, sum, max, fired]
        self.legs_out: list[int] | None = None
        self.ins: deque[tuple[int, int]] = deque()  # W08 window of (ts, amount) ...
        self.in_sum = 0  # ... and its sum
        self.outs: deque[tuple[int, int]] = deque()
        self.out_sum = 0
        self.episodes: list[int] = []  # W08
        self.fan: deque[tuple[int, str, str]] = deque()  # W09 (ts, counterparty, in|out)
        self.fan_in: dict[str, int] = {}  # W09 counterparty -> entries "in" in the window
        self.fan_out: dict[str, int] = {}
        self.fan_fired: int | None = None
        self.bound = 0  # W12
        self.rebound: int | None = None
        self.auth_fail: list[int] = []

    def row(self) -> tuple[Any, ...]:
        return (
            self.kind,
            self.corporate,
            self.last_activity,
            self.wake,
            self.near_in,
            self.near_out,
            self.legs_in,
            self.legs_out,
            list(self.ins),
            list(self.outs),
            self.episodes,
            list(self.fan),
            self.fan_fired,
            self.bound,
            self.rebound,
            self.auth_fail,
        )

    @classmethod
    def from_row(cls, row: Any) -> Acct:
        a = cls()
        (
            a.kind,
            a.corporate,
            a.last_activity,
            a.wake,
            a.near_in,
            a.near_out,
            a.legs_in,
            a.legs_out,
            ins,
            outs,
            a.episodes,
            fan,
            a.fan_fired,
            a.bound,
            a.rebound,
            a.auth_fail,
        ) = row
        a.ins = deque((t, x) for t, x in ins)
        a.in_sum = sum(x for _, x in ins)
        a.outs = deque((t, x) for t, x in outs)
        a.out_sum = sum(x for _, x in outs)
        a.fan = deque((t, cp, d) for t, cp, d in fan)
        for _, cp, d in fan:
            counts = a.fan_in if d == "in" else a.fan_out
            counts[cp] = counts.get(cp, 0) + 1
        return a


class State(Core, kw_only=True):
    """Everything the rules remember about one platform: the `Core` (stored whole) and the keyed
    collections (stored as rows, only those that changed)."""

    accounts: dict[str, Acct] = msgspec.field(default_factory=dict)
    dirty: set[str] = msgspec.field(default_factory=set)  # accounts changed since changes()
    known: TrackedSet = msgspec.field(default_factory=TrackedSet)  # alert ids found
    alert_status: Tracked = msgspec.field(default_factory=Tracked)  # id -> raised|ack..|closed
    holds: Tracked = msgspec.field(default_factory=Tracked)  # id -> [debit, credit, amount,
    #                                                           expires, kind]
    lvt_open: Tracked = msgspec.field(default_factory=Tracked)  # key -> [account, side,
    #                                                             due_ms, [alert ids], orange]
    omni_sum: dict[str, int] = {}  # currency -> sum of the deltas in omni_moves (derived)

    def acct(self, account: str) -> Acct:
        """The account's state, to change: created if new, and marked to be stored."""
        a = self.accounts.get(account)
        if a is None:
            a = self.accounts[account] = Acct()
        self.dirty.add(account)
        return a


def new_state() -> State:
    return State(format=STATE_FORMAT)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, deque):
        return list(obj)
    raise NotImplementedError(type(obj))


_CORE_FIELDS: Final = Core.__struct_fields__
_STATE_ENCODER: Final = msgspec.msgpack.Encoder(order="deterministic", enc_hook=_enc_hook)
_ROW_ENCODER: Final = msgspec.msgpack.Encoder(order="deterministic")
_CORE_DECODER: Final = msgspec.msgpack.Decoder(Core)
_ROW_DECODE: Final = msgspec.msgpack.Decoder().decode
# `risk_state` row keys: a prefix per collection
ACCOUNT_KEY: Final = "a:"
KNOWN_KEY: Final = "k:"
STATUS_KEY: Final = "s:"
HOLD_KEY: Final = "h:"
LVT_KEY: Final = "l:"


def encode_state(state: Core) -> bytes:
    """The platform-wide part (the `Core` fields) of the state."""
    return _STATE_ENCODER.encode(Core(**{f: getattr(state, f) for f in _CORE_FIELDS}))


def decode_state(data: bytes) -> State:
    """The platform-wide part; the keyed rows are added by `load_rows`."""
    core = _CORE_DECODER.decode(data)
    state = State(**{f: getattr(core, f) for f in _CORE_FIELDS})
    state.omni_moves = {ccy: deque((t, d) for t, d in m) for ccy, m in core.omni_moves.items()}
    state.omni_sum = {ccy: sum(d for _, d in m) for ccy, m in state.omni_moves.items()}
    return state


def load_rows(state: State, rows: Iterable[tuple[str, bytes]]) -> None:
    """Add the stored `risk_state` rows to a freshly decoded state."""
    for key, value in rows:
        prefix, name = key[:2], key[2:]
        if prefix == ACCOUNT_KEY:
            state.accounts[name] = Acct.from_row(_ROW_DECODE(value))
        elif prefix == KNOWN_KEY:
            set.add(state.known, name)
        elif prefix == STATUS_KEY:
            dict.__setitem__(state.alert_status, name, _ROW_DECODE(value))
        elif prefix == HOLD_KEY:
            dict.__setitem__(state.holds, name, _ROW_DECODE(value))
        elif prefix == LVT_KEY:
            dict.__setitem__(state.lvt_open, name, _ROW_DECODE(value))
        else:
            raise ValueError(f"unknown risk state row {key!r}")


def changes(state: State) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The rows to write (key, value) and to delete since the last call, in key order; forgets
    them (call inside the transaction that stores them: a failed one reloads the state)."""
    enc = _ROW_ENCODER.encode
    upsert: list[tuple[str, bytes]] = [
        (ACCOUNT_KEY + a, enc(state.accounts[a].row())) for a in state.dirty
    ]
    upsert += [(KNOWN_KEY + i, b"\x01") for i in state.known.added]
    delete: list[str] = []
    for prefix, tracked in (
        (STATUS_KEY, state.alert_status),
        (HOLD_KEY, state.holds),
        (LVT_KEY, state.lvt_open),
    ):
        for k in tracked.changed:
            if k in tracked:
                upsert.append((prefix + k, enc(tracked[k])))
            else:
                delete.append(prefix + k)
        tracked.changed = set()
    state.dirty = set()
    state.known.added = set()
    upsert.sort()
    delete.sort()
    return upsert, delete


def _prune(items: list[list[Any]], since: int) -> list[list[Any]]:
    """Drop entries (whose first element is a time) before `since`."""
    if items and items[0][0] < since:
        return [x for x in items if x[0] >= since]
    return items


class Calendar:
    """Business days in the policy's UTC offset: Monday to Friday, minus holidays."""

    def __init__(self, offset_ms: int, holidays: frozenset[str]) -> None:
        self.offset_ms = offset_ms
        self.holidays = holidays

    def day(self, ts_ms: int) -> int:
        return (ts_ms + self.offset_ms) // DAY_MS

    def start(self, day: int) -> int:
        return day * DAY_MS - self.offset_ms

    def date(self, day: int) -> str:
        return (_EPOCH + dt.timedelta(days=day)).isoformat()

    def is_business(self, day: int) -> bool:
        return (day + 3) % 7 < 5 and self.date(day) not in self.holidays

    def next_business(self, day: int) -> int:
        day += 1
        while not self.is_business(day):
            day += 1
        return day

    def business_days_after(self, since_ms: int, now_ms: int) -> int:
        """Business days that began after `since_ms` and at or before `now_ms`."""
        first, last = self.day(since_ms) + 1, self.day(now_ms)
        return sum(1 for d in range(first, last + 1) if self.is_business(d)) if last >= first else 0


class _Cmd(msgspec.Struct, frozen=True):
    """The two command fields the movement rules read (the rest of `cmd` is skipped)."""

    purpose: Any = "transfer"
    holder_type: Any = None


class Rec(msgspec.Struct, frozen=True):
    """A record as the rules read it: decoded straight into the fields they use; unknown fields
    are skipped without building objects. `seq`, `kind`, `platform`, `ts` are required (the
    engine checks them against where the record is stored)."""

    seq: int
    kind: str
    platform: str
    ts: int
    ccy: Any = ""
    account: Any = msgspec.UNSET
    hold: Any = msgspec.UNSET
    entries: Any = ()
    resolve: Any = ()
    tags: Any = ()
    cmd: msgspec.Raw = msgspec.Raw(b"{}")
    # only whether they are there: such a record takes the general path (`apply`)
    policy: msgspec.Raw = msgspec.Raw()
    executes: msgspec.Raw = msgspec.Raw()


REC_DECODER: Final = msgspec.json.Decoder(Rec)
_CMD_DECODE: Final = msgspec.json.Decoder(_Cmd).decode
_REFUSED: Final = "command_refused"
_REQUESTED: Final = "approval_requested"


class Rules:
    def __init__(self, rules: RuleSet, fast: bool = True) -> None:
        self.rules = rules
        self.on = rules.enabled
        self._cal = Calendar(DEFAULT_POLICY.day_offset_ms, rules.holidays)
        self._w07 = "W07" in self.on
        self._w08 = "W08" in self.on
        self._w09 = "W09" in self.on
        self._w10 = "W10" in self.on
        # `fast`: single-leg movements take `_move` (the rules inlined for the case where
        # nothing fires); False keeps every record on the reference path (`_body` / `_legs`)
        self.fast = fast
        r = rules
        self._w07_consts = (
            r.structuring.near_low_bp,
            r.structuring.near_high_bp,
            r.structuring.split_min_count,
        )
        self._w08_consts = (r.rapid.min_inflow_minor, r.rapid.out_share_bp, r.rapid.window_ms)
        self._w09_consts = (r.fan.min_distinct, r.fan.max_other, r.fan.window_ms)
        self._fan_purposes = r.fan.purposes
        self._dormant_ms = r.dormant.dormant_ms

    def _emit(
        self,
        out: Output,
        state: State,
        rule: str,
        subject: str,
        window: str,
        likelihood: int,
        impact: int,
        summary: str,
        floor: str = "GREEN",
    ) -> None:
        if rule not in self.on:
            return
        level = matrix.level(likelihood, impact, floor)
        finding = Finding(
            rule=rule,
            subject=subject_id(subject) if subject else "",
            window=window,
            level=level,
            summary=f"{RULE_NAMES[rule]}: {summary} (rules v{self.rules.version})"[:256],
        )
        if finding.alert_id in state.known:
            return
        state.known.add(finding.alert_id)
        out.findings.append(finding)

    def calendar(self, state: State) -> Calendar:
        if self._cal.offset_ms != state.day_offset_ms:
            self._cal = Calendar(state.day_offset_ms, self.rules.holidays)
        return self._cal

    # -- one record -----------------------------------------------------------------------------

    @staticmethod
    def general(r: Rec) -> bool:
        """Whether a record needs the general path (`apply` on the whole record as a dict):
        governance records, refusals, requests, approvals, policy changes. Movements, holds and
        openings take `apply_rec` on the typed fields."""
        return r.kind in _GENERAL_KINDS or bool(r.policy) or bool(r.executes)

    def apply_rec(self, state: State, r: Rec, out: Output) -> None:
        """`apply` for a record that is not `general`: the same steps on the typed fields."""
        ts = r.ts
        if ts > state.last_ts:
            state.last_ts = ts
        day = self.calendar(state).day(ts)
        counters, key = out.counters, (day, "records")  # out.count(day, "records"), inlined
        counters[key] = counters.get(key, 0) + 1
        entries = r.entries
        if (
            self.fast
            and r.account is msgspec.UNSET
            and r.hold is msgspec.UNSET
            and not r.resolve
            and len(entries) == 1
        ):
            debit, credit, amount = entries[0]
            if debit != credit:
                purpose = _CMD_DECODE(r.cmd).purpose if r.kind == "transferred" else ""
                self._move(state, ts, r.ccy, purpose, debit, credit, amount, out, day)
                for tag in r.tags:
                    self._lvt_tag(state, tag, out, day)
                return
        cmd: _Cmd | None = None
        if r.account is not msgspec.UNSET:
            cmd = _CMD_DECODE(r.cmd)
            self._opened(state, r.account, ts, cmd.holder_type)
        self._body(state, r.kind, ts, day, r.ccy, r.cmd, r.hold, r.entries, r.resolve, r.tags, out)

    def apply(self, state: State, rec: dict[str, Any], out: Output) -> None:
        kind = rec["kind"]
        ts = rec["ts"]
        state.last_ts = max(state.last_ts, ts)
        cal = self.calendar(state)
        day = cal.day(ts)
        out.count(day, "records")
        if kind == _REFUSED:
            self._refused(state, rec, out, day)
            return
        if kind == _REQUESTED:
            req = rec["request"]
            state.requests[req["id"]] = [rec["actor"], ts, req["expires"]]
            return
        if "policy" in rec:
            self._policy(state, rec["policy"])
        if "executes" in rec:
            self._approved(state, rec, out)
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, state, rec, out)
        if "account" in rec:
            self._opened(state, rec["account"], ts, rec["cmd"].get("holder_type"))
        self._body(
            state,
            kind,
            ts,
            day,
            rec.get("ccy", ""),
            rec.get("cmd"),
            rec.get("hold", msgspec.UNSET),
            rec.get("entries", ()),
            rec.get("resolve", ()),
            rec.get("tags", ()),
            out,
        )

    def _body(
        self,
        state: State,
        kind: str,
        ts: int,
        day: int,
        ccy: Any,
        cmd: Any,
        hold: Any,
        entries: Any,
        resolve: Any,
        tags: Any,
        out: Output,
    ) -> None:
        """Holds, money legs and LVT tags of a record (both paths)."""
        if hold is not msgspec.UNSET:
            self._hold(state, hold, ts, out)
        legs = list(entries)
        for hold_id, captured, _status in resolve:
            held = state.holds.pop(hold_id, None)
            if held is not None and captured > 0:
                legs.append([held[0], held[1], captured])
            watched = state.watched.pop(hold_id, None)
            if watched is not None and captured > 0 and kind == "withdrawal_settled":
                self._emit(
                    out,
                    state,
                    "W12",
                    watched[0],
                    f"{watched[1]}:paid",
                    5,
                    4,
                    f"withdrawal of {captured} paid out within the window after the payout "
                    f"binding of {watched[0]} was replaced",
                    floor="RED",
                )
        if legs:
            purpose = ""
            if kind == "transferred":
                if isinstance(cmd, msgspec.Raw):
                    purpose = _CMD_DECODE(cmd).purpose
                else:
                    assert cmd is not None
                    purpose = cmd.get("purpose", "transfer")
            self._legs(state, ts, ccy, purpose, legs, out, day)
        for tag in tags:
            self._lvt_tag(state, tag, out, day)

    def _policy(self, state: State, policy: dict[str, Any]) -> None:
        state.day_offset_ms = policy.get("day_offset_ms", state.day_offset_ms)
        state.auto_restrict = policy.get("auto_restrict", 1)
        state.lvt = {
            ccy: [t["individual_minor"], t["corporate_minor"]]
            for ccy, t in policy.get("lvt", {}).items()
        }

    def _opened(self, state: State, acc: dict[str, Any], ts: int, holder_type: Any) -> None:
        a = state.acct(acc["id"])
        a.kind = acc["kind"]
        if acc["kind"] == CUSTOMER:
            a.last_activity = ts
            if holder_type == "corporate":
                a.corporate = 1
        elif acc["kind"] == OMNIBUS:
            ccy = acc["ccy"]
            if ccy not in state.recon_start:
                state.recon_start[ccy] = self.calendar(state).day(ts)

    def _hold(self, state: State, h: dict[str, Any], ts: int, out: Output) -> None:
        state.holds[h["id"]] = [h["debit"], h["credit"], h["amount"], h["expires"], h["kind"]]
        if h["kind"] == "withdrawal":
            self._withdrawal_attempt(state, h["debit"], ts, out, h["id"])

    # -- money legs: W07, W08, W09, W10, W19 ---------------------------------------------------

    def _legs(
        self,
        state: State,
        ts: int,
        ccy: Any,
        purpose: Any,
        legs: list[list[Any]],
        out: Output,
        day: int,
    ) -> None:
        accounts, dirty = state.accounts, state.dirty
        fan = self._w09 and purpose in self.rules.fan.purposes
        w07, w08 = self._w07, self._w08
        lvt = state.lvt.get(ccy) if w07 else None  # W07: [individual, corporate] thresholds
        touched: dict[str, int] = {}
        for debit, credit, amount in legs:
            da, ca = accounts.get(debit), accounts.get(credit)
            dkind = da.kind if da is not None else None
            ckind = ca.kind if ca is not None else None
            if dkind == OMNIBUS:
                self._omnibus(state, ccy, ts, amount, out, day)
            if ckind == OMNIBUS:
                self._omnibus(state, ccy, ts, -amount, out, day)
            if dkind == CUSTOMER:
                assert da is not None
                dirty.add(debit)
                if lvt is not None:
                    threshold = lvt[1] if da.corporate else lvt[0]
                    if threshold > 0:
                        self._structuring(state, da, debit, "out", amount, ts, threshold, day, out)
                if w08:
                    self._rapid(state, da, debit, "out", amount, ts, out)
                touched[debit] = touched.get(debit, 0) + amount
            if ckind == CUSTOMER:
                assert ca is not None
                dirty.add(credit)
                if lvt is not None:
                    threshold = lvt[1] if ca.corporate else lvt[0]
                    if threshold > 0:
                        self._structuring(state, ca, credit, "in", amount, ts, threshold, day, out)
                if w08:
                    self._rapid(state, ca, credit, "in", amount, ts, out)
                touched[credit] = touched.get(credit, 0) + amount
            if fan and dkind == CUSTOMER and ckind == CUSTOMER:
                assert da is not None and ca is not None
                self._fan(state, da, debit, "out", credit, ts, out)
                self._fan(state, ca, credit, "in", debit, ts, out)
        if self._w10:
            for account, amount in sorted(touched.items()):
                self._activity(state, accounts[account], account, amount, ts, out)

    def _move(
        self,
        state: State,
        ts: int,
        ccy: Any,
        purpose: Any,
        debit: str,
        credit: str,
        amount: int,
        out: Output,
        day: int,
    ) -> None:
        """`_legs` for a record with one leg between two different accounts (nearly every
        movement), in one pass: the per-leg steps of W07, W08, W09 and W10 written out, with
        the same window updates; whenever a rule would fire (or the state is unusual: a near-
        threshold amount, a waking account) the step is handed to the reference method, which
        does the update and raises the alert. Same findings in the same order as `_legs`."""
        accounts = state.accounts
        da, ca = accounts.get(debit), accounts.get(credit)
        dkind = da.kind if da is not None else None
        ckind = ca.kind if ca is not None else None
        if dkind == OMNIBUS:
            self._omnibus(state, ccy, ts, amount, out, day)
        if ckind == OMNIBUS:
            self._omnibus(state, ccy, ts, -amount, out, day)
        dcust, ccust = dkind == CUSTOMER, ckind == CUSTOMER
        if not (dcust or ccust):
            return
        lvt = state.lvt.get(ccy) if self._w07 else None
        w08 = self._w08
        near_low, near_high, split_min = self._w07_consts
        min_inflow, out_share, window08 = self._w08_consts
        since08 = ts - window08
        dirty = state.dirty
        for a, account, side, cust in ((da, debit, "out", dcust), (ca, credit, "in", ccust)):
            if not cust:
                continue
            assert a is not None
            dirty.add(account)
            if lvt is not None:
                threshold = lvt[1] if a.corporate else lvt[0]
                if threshold > 0:
                    # W07: the day's split counter; a near-threshold amount, or a split that
                    # crosses the threshold, goes to `_structuring`
                    legs = a.legs_in if side == "in" else a.legs_out
                    new_day = legs is None or legs[0] != day
                    if new_day:
                        count, total, top, fired = 1, amount, max(0, amount), 0
                    else:
                        assert legs is not None
                        count, total, top, fired = legs[1] + 1, legs[2] + amount, legs[3], legs[4]
                        if amount > top:
                            top = amount
                    if threshold * near_low <= amount * 10_000 <= threshold * near_high or (
                        count >= split_min and total >= threshold > top and not fired
                    ):
                        self._structuring(state, a, account, side, amount, ts, threshold, day, out)
                    elif new_day:
                        if side == "in":
                            a.legs_in = [day, count, total, top, fired]
                        else:
                            a.legs_out = [day, count, total, top, fired]
                    else:
                        assert legs is not None
                        legs[1], legs[2], legs[3] = count, total, top
            if w08:
                ins, outs = a.ins, a.outs
                while ins and ins[0][0] < since08:
                    a.in_sum -= ins.popleft()[1]
                while outs and outs[0][0] < since08:
                    a.out_sum -= outs.popleft()[1]
                if side == "in":
                    ins.append((ts, amount))
                    a.in_sum += amount
                elif (
                    a.in_sum >= min_inflow and (a.out_sum + amount) * 10_000 >= a.in_sum * out_share
                ):
                    self._rapid(state, a, account, side, amount, ts, out)  # an episode
                else:
                    outs.append((ts, amount))
                    a.out_sum += amount
        if dcust and ccust and self._w09 and purpose in self._fan_purposes:
            assert da is not None and ca is not None
            min_distinct, max_other, window09 = self._w09_consts
            since09 = ts - window09
            for a, account, side, other in ((da, debit, "out", credit), (ca, credit, "in", debit)):
                items = a.fan
                while items and items[0][0] < since09:
                    _t, cp, d = items.popleft()
                    counts = a.fan_in if d == "in" else a.fan_out
                    left = counts[cp] - 1
                    if left:
                        counts[cp] = left
                    else:
                        del counts[cp]
                items.append((ts, other, side))
                counts = a.fan_in if side == "in" else a.fan_out
                counts[other] = counts.get(other, 0) + 1
                if a.fan_fired is None or a.fan_fired < since09:
                    senders, receivers = len(a.fan_in), len(a.fan_out)
                    if (senders >= min_distinct and 1 <= receivers <= max_other) or (
                        receivers >= min_distinct and 1 <= senders <= max_other
                    ):
                        self._fan_found(state, a, account, ts, since09, out)
        if self._w10:
            dormant_ms = self._dormant_ms
            touched = ((debit, da), (credit, ca)) if debit < credit else ((credit, ca), (debit, da))
            for account, a in touched:
                if a is None or a.kind != CUSTOMER:
                    continue
                last = a.last_activity
                if a.wake is None and ts - (ts if last is None else last) < dormant_ms:
                    a.last_activity = ts  # awake and not waking: nothing else to do
                else:
                    self._activity(state, a, account, amount, ts, out)

    def _structuring(
        self,
        state: State,
        a: Acct,
        account: str,
        side: str,
        amount: int,
        ts: int,
        threshold: int,
        day: int,
        out: Output,
    ) -> None:
        """W07 for one customer leg (`a` is marked to be stored by the caller)."""
        p = self.rules.structuring
        cal = self.calendar(state)
        if threshold * p.near_low_bp <= amount * 10_000 <= threshold * p.near_high_bp:
            near = _prune(a.near_in if side == "in" else a.near_out, ts - p.near_window_ms)
            near.append([ts, amount])
            if side == "in":
                a.near_in = near
            else:
                a.near_out = near
            if len(near) >= p.near_count:
                total = sum(x for _, x in near)
                self._emit(
                    out,
                    state,
                    "W07",
                    account,
                    f"near:{side}:{near[0][0]}",
                    3,
                    max(matrix.amount_impact(total), matrix.SEVERITY_REPORTABLE),
                    f"{len(near)} transactions ({side}) of 90-99.99 % of the large-value "
                    f"threshold {threshold} within {p.near_window_ms // DAY_MS} days, "
                    f"total {total}",
                )
                if side == "in":
                    a.near_in = []
                else:
                    a.near_out = []
        legs = a.legs_in if side == "in" else a.legs_out
        if legs is None or legs[0] != day:
            legs = [day, 0, 0, 0, 0]
            if side == "in":
                a.legs_in = legs
            else:
                a.legs_out = legs
        legs[1] += 1
        legs[2] += amount
        legs[3] = max(legs[3], amount)
        if legs[1] >= p.split_min_count and legs[2] >= threshold > legs[3] and not legs[4]:
            legs[4] = 1
            self._emit(
                out,
                state,
                "W07",
                account,
                f"split:{side}:{day}",
                3,
                max(matrix.amount_impact(legs[2]), matrix.SEVERITY_REPORTABLE),
                f"{legs[1]} transactions ({side}) on {cal.date(day)} each below the threshold "
                f"{threshold} add up to {legs[2]}",
            )

    def _rapid(
        self, state: State, a: Acct, account: str, side: str, amount: int, ts: int, out: Output
    ) -> None:
        """W08 for one customer leg (`a` is marked to be stored by the caller)."""
        p = self.rules.rapid
        since = ts - p.window_ms
        ins, outs = a.ins, a.outs
        while ins and ins[0][0] < since:
            a.in_sum -= ins.popleft()[1]
        while outs and outs[0][0] < since:
            a.out_sum -= outs.popleft()[1]
        if side == "in":
            ins.append((ts, amount))
            a.in_sum += amount
            return
        outs.append((ts, amount))
        a.out_sum += amount
        inflow, outflow = a.in_sum, a.out_sum
        if inflow < p.min_inflow_minor or outflow * 10_000 < inflow * p.out_share_bp:
            return
        ins.clear()  # one episode per money that passed
        outs.clear()
        a.in_sum = a.out_sum = 0
        episodes = [t for t in a.episodes if t >= ts - p.repeat_window_ms]
        episodes.append(ts)
        a.episodes = episodes
        if len(episodes) >= p.repeat_count:
            a.episodes = []
            self._emit(
                out,
                state,
                "W08",
                account,
                f"{episodes[0]}",
                3,
                max(matrix.amount_impact(inflow), matrix.SEVERITY_REPORTABLE),
                f"{len(episodes)} times in {p.repeat_window_ms // DAY_MS} days at least "
                f"{p.out_share_bp // 100} % of inflows left within {p.window_ms // HOUR_MS} h "
                f"(last: in {inflow}, out {outflow})",
            )

    def _fan(
        self, state: State, a: Acct, account: str, side: str, other: str, ts: int, out: Output
    ) -> None:
        """W09 for one customer leg (`a` is marked to be stored by the caller)."""
        p = self.rules.fan
        since = ts - p.window_ms
        items = a.fan
        while items and items[0][0] < since:
            _t, cp, d = items.popleft()
            counts = a.fan_in if d == "in" else a.fan_out
            left = counts[cp] - 1
            if left:
                counts[cp] = left
            else:
                del counts[cp]
        items.append((ts, other, side))
        counts = a.fan_in if side == "in" else a.fan_out
        counts[other] = counts.get(other, 0) + 1
        self._fan_found(state, a, account, ts, since, out)

    def _fan_found(
        self, state: State, a: Acct, account: str, ts: int, since: int, out: Output
    ) -> None:
        """W09's test once the window of `a` holds the leg at `ts`."""
        p = self.rules.fan
        if a.fan_fired is not None and a.fan_fired >= since:
            return
        senders, receivers = len(a.fan_in), len(a.fan_out)
        for many, few, shape in ((senders, receivers, "fan-in"), (receivers, senders, "fan-out")):
            if many >= p.min_distinct and 1 <= few <= p.max_other:
                a.fan_fired = ts
                self._emit(
                    out,
                    state,
                    "W09",
                    account,
                    f"{shape}:{ts}",
                    3,
                    matrix.SEVERITY_REPORTABLE,
                    f"{shape}: {senders} payers in and {receivers} payees out within "
                    f"{p.window_ms // HOUR_MS} h",
                )
                return

    def _activity(
        self, state: State, a: Acct, account: str, amount: int, ts: int, out: Output
    ) -> None:
        """W10 for a customer account a record touched (marked to be stored by `_legs`)."""
        p = self.rules.dormant
        last = a.last_activity if a.last_activity is not None else ts
        a.last_activity = ts
        wake = a.wake
        if ts - last >= p.dormant_ms:
            wake = [ts, 0, 0, 0]
        if wake is None:
            return
        if ts - wake[0] > p.window_ms:
            a.wake = None
            return
        wake[1] += amount
        wake[2] += 1
        a.wake = wake
        if not wake[3] and (wake[1] >= p.min_amount_minor or wake[2] >= p.min_count):
            wake[3] = 1
            self._emit(
                out,
                state,
                "W10",
                account,
                f"{wake[0]}",
                3,
                max(matrix.amount_impact(wake[1]), matrix.SEVERITY_REPORTABLE),
                f"dormant for {p.dormant_ms // DAY_MS}+ days, then {wake[2]} movements "
                f"totalling {wake[1]} within {p.window_ms // DAY_MS} days",
            )

    def _omnibus(self, state: State, ccy: Any, ts: int, delta: int, out: Output, day: int) -> None:
        p = self.rules.run
        balance = state.omni.get(ccy, 0) + delta
        state.omni[ccy] = balance
        out.gauges[(day, f"custody_{ccy}")] = balance
        out.count(day, f"inflow_{ccy}" if delta > 0 else f"outflow_{ccy}", abs(delta))
        moves = state.omni_moves.get(ccy)
        if moves is None:
            moves = state.omni_moves[ccy] = deque()
        net = state.omni_sum.get(ccy, 0)
        since = ts - p.window_ms
        while moves and moves[0][0] < since:
            net -= moves.popleft()[1]
        moves.append((ts, delta))
        net += delta
        state.omni_sum[ccy] = net
        if delta >= 0:
            return
        net_out = -net
        start = balance + net_out  # the custody balance 24 h ago
        if start < p.min_balance_minor or net_out <= 0:
            return
        share_bp = net_out * 10_000 // start
        cal = self.calendar(state)
        if share_bp > p.red_bp:
            self._emit(
                out,
                state,
                "W19",
                ccy,
                f"{day}",
                4,
                4,
                f"net customer outflow {net_out} {ccy} in 24 h is {share_bp / 100:.2f} % of the "
                f"custody balance {start} (RED above {p.red_bp / 100:.0f} %) on {cal.date(day)}",
                floor="RED",
            )
        elif share_bp > p.orange_bp:
            self._emit(
                out,
                state,
                "W19",
                ccy,
                f"{day}",
                3,
                4,
                f"net customer outflow {net_out} {ccy} in 24 h is {share_bp / 100:.2f} % of the "
                f"custody balance {start} (ORANGE above {p.orange_bp / 100:.0f} %) on "
                f"{cal.date(day)}",
                floor="ORANGE",
            )

    def _lvt_tag(self, state: State, tag: dict[str, Any], out: Output, day: int) -> None:
        out.count(day, "lvt_tags")
        key = f"{tag['account']}|{tag['side']}|{tag['due_ms']}"
        if key in state.lvt_open:
            return
        finding_count = len(out.findings)
        self._emit(
            out,
            state,
            "W06",
            tag["account"],
            f"{tag['due_ms']}:{tag['side']}:YELLOW",
            2,
            matrix.SEVERITY_REPORTABLE,
            f"large-value report due by {tag['due_ms']} (day total {tag['day_total_minor']}, "
            f"{tag['side']}); close this alert with the report reference once filed",
            floor="YELLOW",
        )
        ids = [f.alert_id for f in out.findings[finding_count:]]
        state.lvt_open[key] = [tag["account"], tag["side"], tag["due_ms"], ids, 0]

    # -- governance records: W01-W03, W12, W16, alerts, gate -------------------------------------

    def _reconciliation(self, state: State, rec: dict[str, Any], out: Output) -> None:
        r = rec["reconciliation"]
        ccy = r["ccy"]
        cal = self.calendar(state)
        bday = cal.day(r["as_of"] - 1)
        days = state.reconciled.setdefault(ccy, [])
        if bday not in days:
            days.append(bday)
            days.sort()
            del days[: max(0, len(days) - 2 * self.rules.recon.lookback_days)]
        out.gauges[(bday, f"recon_difference_{ccy}")] = r["difference"]
        difference = r["difference"]
        if difference >= 0:  # balanced or excess: earlier shortfalls of the currency are cured
            for rid in [k for k, v in state.shortfalls.items() if v[0] == ccy]:
                del state.shortfalls[rid]
        if difference <= 0:
            state.excess_since.pop(ccy, None)
        if difference < 0:
            amount = -difference
            red = amount * 10_000 > r["requirement"] * self.rules.recon.shortfall_red_bp
            self._emit(
                out,
                state,
                "W01",
                r["id"],
                "detected",
                3,
                matrix.amount_impact(amount, r["requirement"]),
                f"reconciliation {r['id']} as of {cal.date(bday)}: resource short of the "
                f"requirement {r['requirement']} by {amount} {ccy}"
                + (f" (over {self.rules.recon.shortfall_red_bp / 100:.2f} %)" if red else ""),
                floor="RED" if red else "ORANGE",
            )
            state.shortfalls[r["id"]] = [ccy, amount, cal.start(cal.day(rec["ts"]) + 1), 0]
        elif difference > 0:
            first = state.excess_since.setdefault(ccy, bday)
            late = any(cal.is_business(d) for d in range(first + 1, bday + 1))
            self._emit(
                out,
                state,
                "W02",
                r["id"],
                "late" if late else "detected",
                2,
                matrix.amount_impact(difference),
                f"reconciliation {r['id']} as of {cal.date(bday)}: {difference} {ccy} more than "
                f"the requirement in the customer pool"
                + (f" since {cal.date(first)}" if late else ""),
                floor="ORANGE" if late else "YELLOW",
            )

    def _topped_up(self, state: State, rec: dict[str, Any], out: Output) -> None:
        amount = sum(e[2] for e in rec["entries"])
        for rid in sorted(state.shortfalls, key=lambda k: state.shortfalls[k][2]):
            s = state.shortfalls[rid]
            if s[0] != rec["ccy"] or amount <= 0:
                continue
            used = min(amount, s[1] - s[3])
            s[3] += used
            amount -= used
            if s[3] >= s[1]:
                del state.shortfalls[rid]

    def _payee_bound(self, state: State, rec: dict[str, Any], out: Output) -> None:
        a = state.acct(rec["payee"]["account"])
        if a.bound:
            a.rebound = rec["ts"]
        a.bound = 1

    def _withdrawal_attempt(
        self, state: State, account: str, ts: int, out: Output, hold_id: str = ""
    ) -> None:
        a = state.accounts.get(account)
        rebind = a.rebound if a is not None else None
        if rebind is None:
            return
        if ts - rebind > self.rules.takeover.window_ms:
            state.acct(account).rebound = None
            return
        if hold_id:
            state.watched[hold_id] = [account, rebind]
        self._emit(
            out,
            state,
            "W12",
            account,
            f"{rebind}",
            4,
            3,
            f"withdrawal {'requested' if hold_id else 'attempted'} within "
            f"{self.rules.takeover.window_ms // HOUR_MS} h of replacing the payout binding",
            floor="ORANGE",
        )

    def _approved(self, state: State, rec: dict[str, Any], out: Output) -> None:
        req = state.requests.pop(rec["executes"], None)
        if req is None:
            return
        maker, _requested, expires = req
        checker = rec["actor"]
        ts = rec["ts"]
        p = self.rules.maker_checker
        cal = self.calendar(state)
        approvals = _prune(state.approvals, ts - p.window_ms)
        approvals.append([ts, maker, checker])
        state.approvals = approvals
        if ts >= expires - p.near_expiry_ms:
            near = [t for t in state.near_expiry.get(checker, []) if t >= ts - p.window_ms]
            near.append(ts)
            state.near_expiry[checker] = near
            if len(near) >= p.near_expiry_count:
                state.near_expiry[checker] = []
                self._emit(
                    out,
                    state,
                    "W16",
                    checker,
                    f"expiry:{near[0]}",
                    2,
                    3,
                    f"{checker} approved {len(near)} requests within "
                    f"{p.near_expiry_ms // 60_000} min of their expiry",
                    floor="YELLOW",
                )
        if len(approvals) >= p.pair_min_approvals:
            pair = sum(1 for _, m, c in approvals if m == maker and c == checker)
            if pair * 10_000 > len(approvals) * p.pair_share_bp:
                self._emit(
                    out,
                    state,
                    "W16",
                    checker,
                    f"pair:{maker}:{cal.day(ts) // 30}",
                    2,
                    3,
                    f"maker {maker} and checker {checker} account for {pair} of "
                    f"{len(approvals)} approvals in {p.window_ms // DAY_MS} days",
                    floor="YELLOW",
                )

    def _rejected(self, state: State, rec: dict[str, Any], out: Output) -> None:
        req = state.requests.pop(rec["rejects"], None)
        if req is None:
            return
        maker = req[0]
        ts = rec["ts"]
        p = self.rules.maker_checker
        rej = [t for t in state.rejections.get(maker, []) if t >= ts - p.window_ms]
        rej.append(ts)
        state.rejections[maker] = rej
        if len(rej) >= p.rejections:
            state.rejections[maker] = []
            self._emit(
                out,
                state,
                "W16",
                maker,
                f"rejected:{rej[0]}",
                2,
                3,
                f"{len(rej)} requests of {maker} rejected within {p.window_ms // DAY_MS} days",
                floor="YELLOW",
            )

    def _alert_raised(self, state: State, rec: dict[str, Any], out: Output) -> None:
        a = rec["alert"]
        state.alert_status[a["id"]] = "raised"
        state.known.add(a["id"])
        out.count(self.calendar(state).day(rec["ts"]), f"alerts_{a['level']}")
        if (
            a["level"] == "RED"
            and state.auto_restrict
            and not state.restrict_pending
            and GATE_ORDER.index(state.gate) < GATE_ORDER.index("RESTRICTED")
        ):
            state.restrict_pending = 1
            out.restrict.append(a["id"])

    def _alert_step(self, state: State, rec: dict[str, Any], out: Output) -> None:
        closing = rec["kind"] == "alert_closed"
        alert = rec["alert_closed" if closing else "alert_acknowledged"]
        if state.alert_status.get(alert) != "closed":
            state.alert_status[alert] = "closed" if closing else "acknowledged"

    def _gate_set(self, state: State, rec: dict[str, Any], out: Output) -> None:
        state.gate = rec["gate"]
        state.restrict_pending = 0

    # -- refusals: W12 (bad signatures, attempts), W15, W23 -------------------------------------

    def _refused(self, state: State, rec: dict[str, Any], out: Output, day: int) -> None:
        ts = rec["ts"]
        code = rec.get("code", "")
        n = 1 + int(rec.get("suppressed", 0))
        out.count(day, "refusals", n)
        cmd = rec.get("cmd", {})
        if cmd.get("op") == "request_withdrawal" and isinstance(cmd.get("account_id"), str):
            self._withdrawal_attempt(state, cmd["account_id"], ts, out)
        failed = rec.get("auth_failed")
        if failed:
            p = self.rules.takeover
            a = state.acct(failed)
            fails = [t for t in a.auth_fail if t >= ts - p.auth_window_ms]
            fails.append(ts)
            a.auth_fail = fails
            if len(fails) >= p.auth_failures:
                a.auth_fail = []
                self._emit(
                    out,
                    state,
                    "W12",
                    failed,
                    f"auth:{fails[0]}",
                    4,
                    3,
                    f"{len(fails)} failed customer signatures within "
                    f"{p.auth_window_ms // 60_000} min",
                    floor="ORANGE",
                )
        if code in self.rules.segregation.codes and rec["actor"].startswith("platform:"):
            self._segregation(state, rec, out)
        self._spike(state, rec, out, n, code)

    def _segregation(self, state: State, rec: dict[str, Any], out: Output) -> None:
        p = self.rules.segregation
        actor, ts = rec["actor"], rec["ts"]
        tries = [t for t in state.seg.get(actor, []) if t >= ts - p.window_ms]
        tries.append(ts)
        state.seg[actor] = tries
        if len(tries) == 1:
            self._emit(
                out,
                state,
                "W15",
                actor,
                f"{rec['seq']}",
                3,
                matrix.SEVERITY_SEGREGATION,
                f"{actor} attempted a flow across segregation ({rec.get('code')}) at position "
                f"{rec['seq']}",
                floor="ORANGE",
            )
        if len(tries) >= p.red_count and state.seg_red.get(actor, -(2**62)) < tries[0]:
            state.seg_red[actor] = ts
            self._emit(
                out,
                state,
                "W15",
                actor,
                f"{tries[0]}:repeated",
                5,
                matrix.SEVERITY_SEGREGATION,
                f"{actor}: {len(tries)} segregation refusals within "
                f"{p.window_ms // HOUR_MS} h (last at position {rec['seq']})",
                floor="RED",
            )

    def _spike(self, state: State, rec: dict[str, Any], out: Output, n: int, code: str) -> None:
        p = self.rules.refusals
        hour = rec["ts"] // HOUR_MS
        bucket = state.refusal_hours.setdefault(str(hour), [0, 0, 0])
        bucket[0] += n
        if code in p.orange_codes:
            bucket[1] += n
        for old in [h for h in state.refusal_hours if int(h) < hour - p.baseline_hours]:
            del state.refusal_hours[old]
        count = bucket[0]
        if bucket[2] or count < p.min_count:
            return
        hours = p.baseline_hours
        past = [state.refusal_hours.get(str(h), [0])[0] for h in range(hour - hours, hour)]
        total = sum(past)
        squares = sum(x * x for x in past)
        excess = count * hours - total  # (count - mean) * hours
        spread = hours * squares - total * total  # variance * hours^2
        if excess <= 0 or excess * excess <= p.sigmas * p.sigmas * spread:
            return
        bucket[2] = 1
        screening = bucket[1] * 2 > count
        self._emit(
            out,
            state,
            "W23",
            "",
            f"{hour}",
            2 if not screening else 3,
            4,
            f"{count} refusals in the hour from {hour * HOUR_MS} (mean of the last "
            f"{hours} h: {total / hours:.2f})"
            + ("; mostly screening/authorisation" if screening else ""),
            floor="ORANGE" if screening else "YELLOW",
        )

    # -- the passage of time and the reconciliation feed ----------------------------------------

    def tick(
        self, state: State, now_ms: int, feed: ReconciliationFeed, platform: str, out: Output
    ) -> None:
        cal = self.calendar(state)
        self._missing_reconciliation(state, now_ms, cal, out)
        self._uncured_shortfalls(state, now_ms, out)
        self._lvt_due(state, now_ms, out)
        self._stale_holds(state, now_ms, cal, out)
        if "W04" in self.on:
            for b in feed.continuity_breaks(platform):
                self._emit(
                    out,
                    state,
                    "W04",
                    b.statement,
                    b.id,
                    5,
                    5,
                    f"statement {b.statement[:16]}: {b.reason}; statement not used",
                    floor="RED",
                )
        if "W05" in self.on:
            for item in feed.unmatched_items(platform):
                self._unmatched(
                    state,
                    item.id,
                    item.side,
                    item.amount_minor,
                    item.currency,
                    item.since_ms,
                    now_ms,
                    cal,
                    out,
                )

    def _missing_reconciliation(self, state: State, now: int, cal: Calendar, out: Output) -> None:
        p = self.rules.recon
        today = cal.day(now)
        for ccy, start in sorted(state.recon_start.items()):
            done = set(state.reconciled.get(ccy, ()))
            for d in range(max(start, today - p.lookback_days), today):
                if not cal.is_business(d) or d in done:
                    continue
                due = cal.start(cal.next_business(d)) + p.due_hour_ms
                if now < due:
                    break
                late = cal.business_days_after(due, now)
                red = late >= p.missing_red_business_days
                self._emit(
                    out,
                    state,
                    "W03",
                    ccy,
                    f"{d}",
                    4 if red else 3,
                    3,
                    f"no reconciliation of {ccy} for business day {cal.date(d)}, due "
                    f"{cal.date(cal.next_business(d))} {p.due_hour_ms // HOUR_MS:02d}:00"
                    + (f"; {late} business days late" if red else ""),
                    floor="RED" if red else "ORANGE",
                )

    def _uncured_shortfalls(self, state: State, now: int, out: Output) -> None:
        for rid, (ccy, amount, day_end, topped) in sorted(state.shortfalls.items()):
            if now >= day_end:
                self._emit(
                    out,
                    state,
                    "W01",
                    rid,
                    "uncured",
                    5,
                    matrix.SEVERITY_SEGREGATION,
                    f"shortfall of {amount} {ccy} from reconciliation {rid} not cured by the end "
                    f"of the day ({topped} topped up)",
                    floor="RED",
                )

    def _lvt_due(self, state: State, now: int, out: Output) -> None:
        p = self.rules.lvt
        for key in sorted(state.lvt_open):
            account, side, due, ids, orange = state.lvt_open[key]
            if any(state.alert_status.get(i) == "closed" for i in ids):
                del state.lvt_open[key]  # report filed: the alert was closed with its reference
                continue
            if now > due:
                self._emit(
                    out,
                    state,
                    "W06",
                    account,
                    f"{due}:{side}:RED",
                    4,
                    4,
                    f"large-value report ({side}) was due by {due} and no alert was closed as "
                    "filed",
                    floor="RED",
                )
                del state.lvt_open[key]
            elif now >= due - p.orange_before_ms and not orange:
                n = len(out.findings)
                self._emit(
                    out,
                    state,
                    "W06",
                    account,
                    f"{due}:{side}:ORANGE",
                    3,
                    4,
                    f"large-value report ({side}) due by {due}, less than "
                    f"{p.orange_before_ms // HOUR_MS} h left",
                    floor="ORANGE",
                )
                state.lvt_open[key] = [
                    account,
                    side,
                    due,
                    ids + [f.alert_id for f in out.findings[n:]],
                    1,
                ]

    def _stale_holds(self, state: State, now: int, cal: Calendar, out: Output) -> None:
        p = self.rules.stale_holds
        stale_customers: set[str] = set()
        for hold_id in sorted(state.holds):
            debit, _credit, amount, expires, _kind = state.holds[hold_id]
            if now < expires + p.grace_ms:
                continue
            stale_customers.add(debit)
            age = cal.business_days_after(expires, now)
            level = (
                "RED"
                if age >= p.red_business_days
                else "ORANGE"
                if age >= p.orange_business_days
                else "YELLOW"
            )
            self._emit(
                out,
                state,
                "W14",
                hold_id,
                level,
                2,
                matrix.amount_impact(amount),
                f"hold {hold_id} of {amount} on {debit} expired at {expires}, neither captured "
                f"nor released ({age} business days)",
                floor=level,
            )
        if len(stale_customers) > p.red_customers:
            self._emit(
                out,
                state,
                "W14",
                "",
                f"customers:{cal.day(now)}",
                5,
                matrix.customers_impact(len(stale_customers)),
                f"{len(stale_customers)} customers have expired holds not released",
                floor="RED",
            )

    def _unmatched(
        self,
        state: State,
        item: str,
        side: str,
        amount: int,
        ccy: str,
        since: int,
        now: int,
        cal: Calendar,
        out: Output,
    ) -> None:
        p = self.rules.unmatched
        age = cal.business_days_after(since, now)
        if age <= p.yellow_business_days:
            return
        if age > p.red_business_days or amount > p.red_amount_minor:
            level = "RED"
        elif age > p.orange_business_days or amount > p.orange_amount_minor:
            level = "ORANGE"
        else:
            level = "YELLOW"
        self._emit(
            out,
            state,
            "W05",
            item,
            level,
            2,
            matrix.amount_impact(amount),
            f"{side} item {item} of {amount} {ccy} unmatched for {age} business days",
            floor=level,
        )

    def integrity_failure(self, state: State, position: int, reason: str, out: Output) -> None:
        """W17: the stored chain does not verify (from the schedule or while reading)."""
        self._emit(
            out,
            state,
            "W17",
            "",
            f"{position}",
            5,
            5,
            f"chain verification failed at position {position}: {reason}",
            floor="RED",
        )


_HANDLERS: Final = {
    "reconciliation_completed": Rules._reconciliation,
    "shortfall_topped_up": Rules._topped_up,
    "payee_bound": Rules._payee_bound,
    "approval_rejected": Rules._rejected,
    "alert_raised": Rules._alert_raised,
    "alert_acknowledged": Rules._alert_step,
    "alert_closed": Rules._alert_step,
    "gate_set": Rules._gate_set,
}
# records that take the general path (`Rules.apply` on the whole record)
_GENERAL_KINDS: Final = frozenset({*_HANDLERS, _REFUSED, _REQUESTED})

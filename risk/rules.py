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


class State(msgspec.Struct, kw_only=True):
    """Everything the rules remember about one platform (stored with the engine's position)."""

    # policy figures, from platform_created / policy_set
    day_offset_ms: int = DEFAULT_POLICY.day_offset_ms
    lvt: dict[str, list[int]] = {}  # currency -> [individual, corporate]
    auto_restrict: int = 1
    gate: str = "NORMAL"
    restrict_pending: int = 0
    last_ts: int = 0
    known: set[str] = set()  # alert ids already found (raised or queued)
    alert_status: dict[str, str] = {}  # alert id -> raised | acknowledged | closed (from the log)
    kinds: dict[str, str] = {}  # account -> kind
    corporate: set[str] = set()
    holds: dict[str, list[Any]] = {}  # pending: id -> [debit, credit, amount, expires, kind, seq]
    # W01/W02/W03
    shortfalls: dict[str, list[Any]] = {}  # recon id -> [ccy, amount, day_end_ms, topped_up]
    excess_since: dict[str, int] = {}  # currency -> first business day in excess
    recon_start: dict[str, int] = {}  # currency -> day the omnibus account opened
    reconciled: dict[str, list[int]] = {}  # currency -> business days reconciled (recent)
    # W06
    lvt_open: dict[str, list[Any]] = {}  # key -> [account, side, due_ms, [alert ids], orange]
    # W07
    near: dict[str, list[list[int]]] = {}  # account:side -> [[ts, amount]] near the threshold
    day_legs: dict[str, list[int]] = {}  # account:side -> [day, count, sum, max, fired]
    # W08
    ins: dict[str, list[list[int]]] = {}
    outs: dict[str, list[list[int]]] = {}
    episodes: dict[str, list[int]] = {}
    # W09
    fan: dict[str, list[list[Any]]] = {}  # account -> [[ts, counterparty, "in"|"out"]]
    fan_fired: dict[str, int] = {}
    # W10
    last_activity: dict[str, int] = {}
    wake: dict[str, list[int]] = {}  # account -> [since, sum, count, fired]
    # W12
    bound: set[str] = set()
    rebound: dict[str, int] = {}  # account -> ts of the replacing binding
    watched: dict[str, list[Any]] = {}  # withdrawal hold id -> [account, rebind ts]
    auth_fail: dict[str, list[int]] = {}
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
    omni_moves: dict[str, list[list[int]]] = {}  # currency -> [[ts, delta]]
    # W23
    refusal_hours: dict[str, list[int]] = {}  # hour -> [refusals, screening/auth, fired]


_STATE_ENCODER: Final = msgspec.msgpack.Encoder(order="deterministic")
_STATE_DECODER: Final = msgspec.msgpack.Decoder(State)


def encode_state(state: State) -> bytes:
    return _STATE_ENCODER.encode(state)


def decode_state(data: bytes) -> State:
    state: State = _STATE_DECODER.decode(data)
    return state


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


class Rules:
    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.on = rules.enabled

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
        return Calendar(state.day_offset_ms, self.rules.holidays)

    # -- one record -----------------------------------------------------------------------------

    def apply(self, state: State, rec: dict[str, Any], out: Output) -> None:
        kind = rec["kind"]
        ts = rec["ts"]
        state.last_ts = max(state.last_ts, ts)
        cal = self.calendar(state)
        day = cal.day(ts)
        out.count(day, "records")
        if kind == "command_refused":
            self._refused(state, rec, out, day)
            return
        if kind == "approval_requested":
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
            self._opened(state, rec)
        if "hold" in rec:
            self._hold(state, rec, out)
        legs = list(rec.get("entries", ()))
        for hold_id, captured, _status in rec.get("resolve", ()):
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
            self._legs(state, rec, legs, out, day)
        for tag in rec.get("tags", ()):
            self._lvt_tag(state, tag, out, day)

    def _policy(self, state: State, policy: dict[str, Any]) -> None:
        state.day_offset_ms = policy.get("day_offset_ms", state.day_offset_ms)
        state.auto_restrict = policy.get("auto_restrict", 1)
        state.lvt = {
            ccy: [t["individual_minor"], t["corporate_minor"]]
            for ccy, t in policy.get("lvt", {}).items()
        }

    def _opened(self, state: State, rec: dict[str, Any]) -> None:
        acc = rec["account"]
        state.kinds[acc["id"]] = acc["kind"]
        if acc["kind"] == CUSTOMER:
            state.last_activity[acc["id"]] = rec["ts"]
            if rec["cmd"].get("holder_type") == "corporate":
                state.corporate.add(acc["id"])
        elif acc["kind"] == OMNIBUS:
            ccy = acc["ccy"]
            if ccy not in state.recon_start:
                state.recon_start[ccy] = self.calendar(state).day(rec["ts"])

    def _hold(self, state: State, rec: dict[str, Any], out: Output) -> None:
        h = rec["hold"]
        state.holds[h["id"]] = [h["debit"], h["credit"], h["amount"], h["expires"], h["kind"]]
        if h["kind"] == "withdrawal":
            self._withdrawal_attempt(state, h["debit"], rec["ts"], out, h["id"])

    # -- money legs: W07, W08, W09, W10, W19 ---------------------------------------------------

    def _legs(
        self, state: State, rec: dict[str, Any], legs: list[list[Any]], out: Output, day: int
    ) -> None:
        ts = rec["ts"]
        ccy = rec.get("ccy", "")
        kinds = state.kinds
        purpose = rec["cmd"].get("purpose", "transfer") if rec["kind"] == "transferred" else ""
        touched: dict[str, int] = {}
        for debit, credit, amount in legs:
            dkind, ckind = kinds.get(debit), kinds.get(credit)
            if dkind == OMNIBUS:
                self._omnibus(state, ccy, ts, amount, out, day)
            if ckind == OMNIBUS:
                self._omnibus(state, ccy, ts, -amount, out, day)
            if dkind == CUSTOMER:
                self._customer_leg(state, debit, "out", credit, ckind, amount, ts, ccy, out)
                touched[debit] = touched.get(debit, 0) + amount
            if ckind == CUSTOMER:
                self._customer_leg(state, credit, "in", debit, dkind, amount, ts, ccy, out)
                touched[credit] = touched.get(credit, 0) + amount
            if purpose in self.rules.fan.purposes and dkind == CUSTOMER and ckind == CUSTOMER:
                self._fan(state, debit, "out", credit, ts, out)
                self._fan(state, credit, "in", debit, ts, out)
        for account, amount in sorted(touched.items()):
            self._activity(state, account, amount, ts, out)

    def _customer_leg(
        self,
        state: State,
        account: str,
        side: str,
        other: str,
        other_kind: str | None,
        amount: int,
        ts: int,
        ccy: str,
        out: Output,
    ) -> None:
        self._structuring(state, account, side, amount, ts, ccy, out)
        self._rapid(state, account, side, amount, ts, out)

    def _threshold(self, state: State, account: str, ccy: str) -> int:
        t = state.lvt.get(ccy)
        if t is None:
            return 0
        return t[1] if account in state.corporate else t[0]

    def _structuring(
        self, state: State, account: str, side: str, amount: int, ts: int, ccy: str, out: Output
    ) -> None:
        threshold = self._threshold(state, account, ccy)
        if threshold <= 0:
            return
        p = self.rules.structuring
        key = f"{account}:{side}"
        cal = self.calendar(state)
        day = cal.day(ts)
        if threshold * p.near_low_bp <= amount * 10_000 <= threshold * p.near_high_bp:
            near = _prune(state.near.get(key, []), ts - p.near_window_ms)
            near.append([ts, amount])
            state.near[key] = near
            if len(near) >= p.near_count:
                total = sum(a for _, a in near)
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
                state.near[key] = []
        legs = state.day_legs.get(key)
        if legs is None or legs[0] != day:
            legs = [day, 0, 0, 0, 0]
        legs[1] += 1
        legs[2] += amount
        legs[3] = max(legs[3], amount)
        state.day_legs[key] = legs
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
        self, state: State, account: str, side: str, amount: int, ts: int, out: Output
    ) -> None:
        p = self.rules.rapid
        since = ts - p.window_ms
        ins = _prune(state.ins.get(account, []), since)
        outs = _prune(state.outs.get(account, []), since)
        (ins if side == "in" else outs).append([ts, amount])
        state.ins[account], state.outs[account] = ins, outs
        if side != "out":
            return
        inflow = sum(a for _, a in ins)
        outflow = sum(a for _, a in outs)
        if inflow < p.min_inflow_minor or outflow * 10_000 < inflow * p.out_share_bp:
            return
        state.ins[account], state.outs[account] = [], []  # one episode per money that passed
        episodes = [t for t in state.episodes.get(account, []) if t >= ts - p.repeat_window_ms]
        episodes.append(ts)
        state.episodes[account] = episodes
        if len(episodes) >= p.repeat_count:
            state.episodes[account] = []
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

    def _fan(self, state: State, account: str, side: str, other: str, ts: int, out: Output) -> None:
        p = self.rules.fan
        items = _prune(state.fan.get(account, []), ts - p.window_ms)
        items.append([ts, other, side])
        state.fan[account] = items
        if state.fan_fired.get(account, -(2**62)) >= ts - p.window_ms:
            return
        senders = {cp for _, cp, d in items if d == "in"}
        receivers = {cp for _, cp, d in items if d == "out"}
        for many, few, shape in ((senders, receivers, "fan-in"), (receivers, senders, "fan-out")):
            if len(many) >= p.min_distinct and 1 <= len(few) <= p.max_other:
                state.fan_fired[account] = ts
                self._emit(
                    out,
                    state,
                    "W09",
                    account,
                    f"{shape}:{ts}",
                    3,
                    matrix.SEVERITY_REPORTABLE,
                    f"{shape}: {len(senders)} payers in and {len(receivers)} payees out within "
                    f"{p.window_ms // HOUR_MS} h",
                )
                return

    def _activity(self, state: State, account: str, amount: int, ts: int, out: Output) -> None:
        p = self.rules.dormant
        last = state.last_activity.get(account, ts)
        state.last_activity[account] = ts
        wake = state.wake.get(account)
        if ts - last >= p.dormant_ms:
            wake = [ts, 0, 0, 0]
        if wake is None:
            return
        if ts - wake[0] > p.window_ms:
            del state.wake[account]
            return
        wake[1] += amount
        wake[2] += 1
        state.wake[account] = wake
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

    def _omnibus(self, state: State, ccy: str, ts: int, delta: int, out: Output, day: int) -> None:
        p = self.rules.run
        balance = state.omni.get(ccy, 0) + delta
        state.omni[ccy] = balance
        out.gauges[(day, f"custody_{ccy}")] = balance
        out.count(day, f"inflow_{ccy}" if delta > 0 else f"outflow_{ccy}", abs(delta))
        moves = _prune(state.omni_moves.get(ccy, []), ts - p.window_ms)
        moves.append([ts, delta])
        state.omni_moves[ccy] = moves
        if delta >= 0:
            return
        net_out = -sum(d for _, d in moves)
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
        account = rec["payee"]["account"]
        if account in state.bound:
            state.rebound[account] = rec["ts"]
        state.bound.add(account)

    def _withdrawal_attempt(
        self, state: State, account: str, ts: int, out: Output, hold_id: str = ""
    ) -> None:
        rebind = state.rebound.get(account)
        if rebind is None:
            return
        if ts - rebind > self.rules.takeover.window_ms:
            del state.rebound[account]
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
            fails = [t for t in state.auth_fail.get(failed, []) if t >= ts - p.auth_window_ms]
            fails.append(ts)
            state.auth_fail[failed] = fails
            if len(fails) >= p.auth_failures:
                state.auth_fail[failed] = []
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

"""Regulator disclosure snapshots (`custody-disclosure/v1`, specified in docs/DISCLOSURE.md).

A snapshot is a pure function of (platform log prefix of `size` records, period): it folds the
records read from the store (never a mutable table), so the verifier can recompute it from an
export bundle and get the same canonical bytes. The canonical JSON is signed as a C2SP note
with the ledger's checkpoint key, and rendered as a bilingual HTML report and a CSV of tables.

Everything here is deterministic: no clock, no randomness, integers only (ratios in basis
points), keys sorted by the canonical encoder.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import html
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from ledger.checkpoint import NoteSigner
from ledger.records import CHAIN_GENESIS, HASH_LEN, chain_next
from ledger.store import LedgerStore, log_stream

FORMAT: Final = "custody-disclosure/v1"
DAY_MS: Final = 86_400_000
DEFAULT_DAY_OFFSET_MS: Final = 8 * 3_600_000  # the built-in policy's (records without one)
MAX_DAYS: Final = 3700  # about ten years of business days in one snapshot
# Alerts are counted from the log's alert records.
ALERTS_ENGINE: Final = (
    "alert records in the log (raised by the early-warning engine, docs/RISK.md, or by an operator)"
)
ALERT_LEVELS: Final = ("GREEN", "YELLOW", "ORANGE", "RED")
RECONCILIATION_RESULTS: Final = ("balanced", "excess", "shortfall")
ROLES: Final = ("borrower", "guarantor", "lender", "other")
PURPOSES: Final = ("bid", "clearing", "compensation", "disbursement", "repayment", "transfer")
# Manual operations (docs/FORMAT.md §3.4, controls/policy.py MANUAL_OPS), fixed by this format.
MANUAL_OPS: Final = frozenset(
    {
        "clear_suspense",
        "record_reconciliation",
        "reset_key",
        "reverse",
        "set_gate",
        "set_policy",
        "settle_reconciliation",
        "top_up_shortfall",
        "unfreeze_account",
    }
)
ASSET_KINDS: Final = frozenset({"omnibus", "platform_bank"})
PLATFORM_MONEY_KINDS: Final = frozenset({"own_funds", "fee_income"})
FLOW_KEYS: Final = (
    "deposits",
    "deposits_unidentified",
    "own_funds_deposits",
    "fees_total",
    "top_ups",
    "reversals",
    "manual_adjustments",
    "holds_placed",
    "holds_captured",
    "holds_released",
    "holds_expired",
    "withdrawals_requested",
    "withdrawals_settled",
    "withdrawals_failed",
    "withdrawals_expired",
    "platform_withdrawals_requested",
    "platform_withdrawals_settled",
    "platform_withdrawals_failed",
    "platform_withdrawals_expired",
)
# resolve line (hold kind, status) -> flow key, for customer debits; platform ones get a prefix
_RESOLVE_FLOW: Final = {
    ("hold", "captured"): "holds_captured",
    ("hold", "released"): "holds_released",
    ("hold", "expired"): "holds_expired",
    ("withdrawal", "captured"): "withdrawals_settled",
    ("withdrawal", "released"): "withdrawals_failed",
    ("withdrawal", "expired"): "withdrawals_expired",
}
_DEPOSIT_FLOW: Final = {"customer": "deposits", "suspense": "deposits_unidentified"}
# reconciliation settlements by direction: own funds -> platform bank covers a shortfall (the
# platform paid into the custody account), platform bank -> own funds returns an excess
SETTLEMENT_DIRECTIONS: Final = ("excess_returned", "shortfall_covered")
_ENCODER: Final = msgspec.json.Encoder(order="sorted")
_DECODER: Final = msgspec.json.Decoder()
_DAY_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH_RE: Final = re.compile(r"^\d{4}-\d{2}$")
_EPOCH_ORDINAL: Final = dt.date(1970, 1, 1).toordinal()


class DisclosureError(ValueError):
    """The period or checkpoint is unusable, or the stored log does not match the checkpoint."""


# -- periods --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodSpec:
    """What the caller asks for: a business day, a calendar month, or an explicit range."""

    type: str  # day | month | range
    label: str = ""  # YYYY-MM-DD | YYYY-MM | "" for a range
    from_ms: int = 0  # ranges only
    to_ms: int = 0

    @classmethod
    def day(cls, text: str) -> PeriodSpec:
        _parse_day(text)
        return cls("day", text)

    @classmethod
    def month(cls, text: str) -> PeriodSpec:
        _parse_month(text)
        return cls("month", text)

    @classmethod
    def range(cls, from_ms: int, to_ms: int) -> PeriodSpec:
        if not 0 <= from_ms < to_ms <= 2**62:
            raise DisclosureError("a range needs 0 <= from_ms < to_ms")
        return cls("range", "", from_ms, to_ms)

    def bounds(self, day_offset_ms: int) -> tuple[int, int]:
        """[from_ms, to_ms) of the period, business days starting at 00:00 in the offset."""
        if self.type == "range":
            return self.from_ms, self.to_ms
        if self.type == "day":
            first = _parse_day(self.label)
            days = 1
        elif self.type == "month":
            first = _parse_month(self.label)
            nxt = dt.date(first.year + first.month // 12, first.month % 12 + 1, 1)
            days = nxt.toordinal() - first.toordinal()
        else:
            raise DisclosureError(f"unknown period type {self.type!r}")
        start = (first.toordinal() - _EPOCH_ORDINAL) * DAY_MS - day_offset_ms
        return start, start + days * DAY_MS


def _parse_day(text: str) -> dt.date:
    if not _DAY_RE.match(text):
        raise DisclosureError(f"a day is YYYY-MM-DD, not {text!r}")
    try:
        day = dt.date.fromisoformat(text)
    except ValueError as exc:
        raise DisclosureError(f"{text!r}: {exc}") from None
    if day.year < 1970:
        raise DisclosureError("days start at 1970")
    return day


def _parse_month(text: str) -> dt.date:
    if not _MONTH_RE.match(text):
        raise DisclosureError(f"a month is YYYY-MM, not {text!r}")
    return _parse_day(text + "-01")


def day_label(day_index: int) -> str:
    return dt.date.fromordinal(_EPOCH_ORDINAL + day_index).isoformat()


def day_buckets(from_ms: int, to_ms: int, offset: int) -> list[tuple[int, int, int]]:
    """(business day index, start, end) of every business day overlapping [from_ms, to_ms),
    cut to the range."""
    first = (from_ms + offset) // DAY_MS
    last = (to_ms - 1 + offset) // DAY_MS
    if last - first + 1 > MAX_DAYS:
        raise DisclosureError(f"a snapshot covers at most {MAX_DAYS} business days")
    out = []
    for d in range(first, last + 1):
        start = d * DAY_MS - offset
        out.append((d, max(start, from_ms), min(start + DAY_MS, to_ms)))
    return out


# -- the fold -------------------------------------------------------------------------------------


def _money() -> list[int]:
    return [0, 0]  # count, amount_minor


def _out(m: list[int]) -> dict[str, int]:
    return {"count": m[0], "amount_minor": m[1]}


class _Currency:
    """Running balances (normal direction) and the period's flows of one currency."""

    def __init__(self, n_buckets: int) -> None:
        self.omnibus = 0
        self.platform_bank = 0
        self.own_funds = 0
        self.fee_income = 0
        self.suspense = 0
        self.by_role: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.flows: dict[str, list[int]] = {k: _money() for k in FLOW_KEYS}
        self.transfers: dict[str, list[int]] = {p: _money() for p in PURPOSES}
        self.settlements: dict[str, list[int]] = {d: _money() for d in SETTLEMENT_DIRECTIONS}
        self.fees: dict[str, list[int]] = {}
        self.lvt: dict[str, list[int]] = {"in": _money(), "out": _money()}
        self.lvt_accounts: dict[str, set[str]] = {"in": set(), "out": set()}
        # reconciliations completed in the period, and the last one up to the period end
        self.recon_results: dict[str, int] = dict.fromkeys(RECONCILIATION_RESULTS, 0)
        self.recon_days: set[int] = set()
        self.recon_max_shortfall = 0
        self.recon_shortfall_total = 0
        self.recon_last: dict[str, Any] | None = None
        # per business day: deposits, withdrawals, transfers, fees, custody end, customer money end
        self.daily: list[list[int]] = [[0, 0, 0, 0, 0, 0] for _ in range(n_buckets)]

    def customer_money(self) -> int:
        return sum(self.by_role.values()) + self.suspense


class _Fold:
    def __init__(self, platform: str, from_ms: int, to_ms: int, offset: int) -> None:
        self.platform = platform
        self.from_ms = from_ms
        self.to_ms = to_ms
        self.buckets = day_buckets(from_ms, to_ms, offset)
        self.bucket = 0
        self.accounts: dict[str, list[Any]] = {}  # id -> [kind, ccy, role, status]
        self.customer_balance: dict[str, int] = {}
        self.ccys: dict[str, _Currency] = {}
        self.holds: dict[str, tuple[str, str, int, str, str, str, int]] = {}
        self.requests: dict[str, tuple[str, dict[str, Any], int]] = {}  # id -> op, cmd, expires
        self.version: int | None = None
        self.gate: str | None = None
        self.versions: list[int] = []
        self.gates: list[str] = []
        self.policy_changes = 0
        self.gate_changes = 0
        self.started = False
        self.before = 0
        self.inside = 0
        self.after = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.kinds: dict[str, int] = {}
        self.refusals_by_code: dict[str, int] = {}
        self.refusals_by_control: dict[str, int] = {}
        self.refusals = 0
        self.suppressed = 0
        self.auth_failed = 0
        self.approvals: dict[str, list[int]] = {}  # op -> requested, approved, rejected
        self.manual: dict[str, list[int]] = {}  # op -> count, approved
        self.new_customers: set[str] = set()
        self.active: set[str] = set()
        self.offset = offset
        self.alerts: dict[str, list[str]] = {}  # id -> [level, status]
        # level -> raised, acknowledged, closed in the period
        self.alert_counts: dict[str, list[int]] = {lvl: [0, 0, 0] for lvl in ALERT_LEVELS}
        self.alert_rules: dict[str, int] = {}

    # -- per record -----------------------------------------------------------------------------

    def record(self, rec: dict[str, Any]) -> None:
        ts = rec["ts"]
        if ts >= self.to_ms:
            self.after += 1
            return
        inside = ts >= self.from_ms
        if inside:
            self._start()
            while ts >= self.buckets[self.bucket][2]:
                self._close_bucket()
            self.inside += 1
            if self.first_seq is None:
                self.first_seq = rec["seq"]
            self.last_seq = rec["seq"]
            kind = rec["kind"]
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        else:
            self.before += 1
        self._apply(rec, inside)

    def _start(self) -> None:
        if not self.started:
            self.started = True
            if self.version is not None:
                self.versions.append(self.version)
            if self.gate is not None:
                self.gates.append(self.gate)

    def _close_bucket(self) -> None:
        for cur in self.ccys.values():
            row = cur.daily[self.bucket]
            row[4] = cur.omnibus
            row[5] = cur.customer_money()
        self.bucket += 1

    def _currency(self, ccy: str) -> _Currency:
        cur = self.ccys.get(ccy)
        if cur is None:
            cur = self.ccys[ccy] = _Currency(len(self.buckets))
        return cur

    def _apply(self, rec: dict[str, Any], inside: bool) -> None:
        kind = rec["kind"]
        cmd = rec.get("cmd") or {}
        if kind == "command_refused":
            if inside:
                self.refusals += 1
                code, control = rec["code"], rec["control"]
                self.refusals_by_code[code] = self.refusals_by_code.get(code, 0) + 1
                self.refusals_by_control[control] = self.refusals_by_control.get(control, 0) + 1
                self.suppressed += rec.get("suppressed", 0)
                if "auth_failed" in rec:
                    self.auth_failed += 1
            return
        if kind == "approval_requested":
            spec = rec["request"]
            self.requests[spec["id"]] = (spec["op"], cmd, spec["expires"])
            if inside:
                self._approval(spec["op"], 0)
            return
        if kind == "approval_rejected":
            request = self.requests.pop(rec["rejects"], None)
            if inside and request is not None:
                self._approval(request[0], 2)
            return
        executes = rec.get("executes")
        if executes is not None:
            request = self.requests.pop(executes, None)
            op, cmd = (request[0], request[1]) if request is not None else ("", {})
            if inside:
                self._approval(op, 1)
        else:
            op = cmd.get("op", "")
        postings: list[tuple[str, str, int]] = []
        touched: set[str] = set()
        ccy = rec.get("ccy")
        entries = rec.get("entries")
        if entries is not None:
            postings = [(d, c, a) for d, c, a in entries]
            if kind == "transferred" and executes is None:
                if self._kind(postings[0][0]) == "suspense":
                    op = "clear_suspense"
        elif "hold" in rec:
            self._hold_placed(rec, inside, touched)
        elif "resolve" in rec:
            ccy = self._resolve(rec, inside, postings, touched)
        elif kind == "account_opened":
            self._opened(rec, inside)
        elif kind in ("account_frozen", "account_unfrozen", "account_closed"):
            status = {"account_frozen": "frozen", "account_unfrozen": "open"}.get(kind, "closed")
            self.accounts[rec["subject"]][3] = status
        elif kind == "platform_created":
            self._policy(rec.get("policy", {}).get("version", 0), inside, first=True)
            self._gate("NORMAL", inside, first=True)
        elif kind == "policy_set":
            self._policy(rec["policy"]["version"], inside)
        elif kind == "gate_set":
            self._gate(rec["gate"], inside)
        elif kind == "reconciliation_completed":
            self._reconciliation(rec, inside)
        elif kind in ("alert_raised", "alert_acknowledged", "alert_closed"):
            self._alert(rec, kind, inside)
        for debit, credit, amount in postings:
            self._post(debit, credit, amount)
            touched.add(debit)
            touched.add(credit)
        if not inside:
            return
        for account in touched:
            if self.accounts[account][0] == "customer":
                self.active.add(account)
        total = sum(a for _, _, a in postings)
        if op in MANUAL_OPS:
            row = self.manual.setdefault(op, [0, 0])
            row[0] += 1
            row[1] += executes is not None
            if postings and ccy is not None:
                m = self._currency(ccy).flows["manual_adjustments"]
                m[0] += 1
                m[1] += total
        if entries is not None and ccy is not None:
            self._movement(kind, cmd, postings, ccy, total)
        if "tags" in rec and ccy is not None:
            self._tags(rec["tags"], postings, ccy)

    def _reconciliation(self, rec: dict[str, Any], inside: bool) -> None:
        r = rec["reconciliation"]
        cur = self._currency(r["ccy"])
        cur.recon_last = {
            "id": r["id"],
            "seq": rec["seq"],
            "as_of_ms": r["as_of"],
            "snapshot": r["snapshot"],
            "bank_closing_minor": r["closing"],
            "in_transit_minor": r["transit"],
            "requirement_minor": r["requirement"],
            "difference_minor": r["difference"],
            "breaks": r["breaks"],
            "result": r["result"],
        }
        if inside:
            cur.recon_results[r["result"]] = cur.recon_results.get(r["result"], 0) + 1
            cur.recon_days.add((r["as_of"] + self.offset) // DAY_MS)
            if r["result"] == "shortfall":
                cur.recon_max_shortfall = max(cur.recon_max_shortfall, -r["difference"])
                cur.recon_shortfall_total += -r["difference"]

    def _alert(self, rec: dict[str, Any], kind: str, inside: bool) -> None:
        if kind == "alert_raised":
            a = rec["alert"]
            self.alerts[a["id"]] = [a["level"], "raised"]
            if inside:
                self.alert_counts.setdefault(a["level"], [0, 0, 0])[0] += 1
                self.alert_rules[a["rule"]] = self.alert_rules.get(a["rule"], 0) + 1
            return
        alert = self.alerts[rec[kind]]
        alert[1] = "closed" if kind == "alert_closed" else "acknowledged"
        if inside:
            self.alert_counts.setdefault(alert[0], [0, 0, 0])[2 if alert[1] == "closed" else 1] += 1

    def _approval(self, op: str, column: int) -> None:
        self.approvals.setdefault(op, [0, 0, 0])[column] += 1

    def _kind(self, account: str) -> str:
        return str(self.accounts[account][0])

    def _policy(self, version: int, inside: bool, first: bool = False) -> None:
        self.version = version
        if inside:
            self.versions.append(version)
            if not first:
                self.policy_changes += 1

    def _gate(self, gate: str, inside: bool, first: bool = False) -> None:
        self.gate = gate
        if inside:
            self.gates.append(gate)
            if not first:
                self.gate_changes += 1

    def _opened(self, rec: dict[str, Any], inside: bool) -> None:
        spec = rec["account"]
        kind = spec["kind"]
        self.accounts[spec["id"]] = [kind, spec["ccy"], spec.get("role"), "open"]
        self._currency(spec["ccy"])
        if kind == "customer":
            self.customer_balance[spec["id"]] = 0
            if inside:
                self.new_customers.add(spec["id"])

    def _post(self, debit: str, credit: str, amount: int) -> None:
        for account, sign in ((debit, 1), (credit, -1)):
            kind, ccy, role, _ = self.accounts[account]
            delta = amount * sign if kind in ASSET_KINDS else -amount * sign
            cur = self.ccys[ccy]
            if kind == "customer":
                self.customer_balance[account] += delta
                key = role if role in cur.by_role else "other"
                cur.by_role[key] += delta
            elif kind == "omnibus":
                cur.omnibus += delta
            elif kind == "platform_bank":
                cur.platform_bank += delta
            elif kind == "own_funds":
                cur.own_funds += delta
            elif kind == "fee_income":
                cur.fee_income += delta
            elif kind == "suspense":
                cur.suspense += delta

    def _hold_placed(self, rec: dict[str, Any], inside: bool, touched: set[str]) -> None:
        h = rec["hold"]
        ccy = rec["ccy"]
        self.holds[h["id"]] = (
            h["debit"],
            h["credit"],
            h["amount"],
            ccy,
            h["reason"],
            h["kind"],
            h["expires"],
        )
        touched.add(h["debit"])
        touched.add(h["credit"])
        if inside:
            if h["kind"] == "withdrawal":
                key = "withdrawals_requested"
                if self._kind(h["debit"]) in PLATFORM_MONEY_KINDS:
                    key = "platform_" + key
            else:
                key = "holds_placed"
            m = self._currency(ccy).flows[key]
            m[0] += 1
            m[1] += h["amount"]

    def _resolve(
        self,
        rec: dict[str, Any],
        inside: bool,
        postings: list[tuple[str, str, int]],
        touched: set[str],
    ) -> str | None:
        ccy = rec.get("ccy")
        for hold_id, captured, status in rec["resolve"]:
            debit, credit, amount, hold_ccy, _, hold_kind, _ = self.holds.pop(hold_id)
            ccy = hold_ccy
            touched.add(debit)
            if captured:
                postings.append((debit, credit, captured))
            if inside:
                key = _RESOLVE_FLOW[(hold_kind, status)]
                if hold_kind == "withdrawal" and self._kind(debit) in PLATFORM_MONEY_KINDS:
                    key = "platform_" + key
                m = self._currency(hold_ccy).flows[key]
                m[0] += 1
                m[1] += captured if status == "captured" else amount - captured
                if key == "withdrawals_settled":
                    self._currency(hold_ccy).daily[self.bucket][1] += captured
        return ccy

    def _movement(
        self,
        kind: str,
        cmd: dict[str, Any],
        postings: list[tuple[str, str, int]],
        ccy: str,
        total: int,
    ) -> None:
        cur = self._currency(ccy)
        day = cur.daily[self.bucket]
        m: list[int] | None = None
        if kind == "deposited":
            key = _DEPOSIT_FLOW.get(self._kind(postings[0][1]), "own_funds_deposits")
            m = cur.flows[key]
            if key != "own_funds_deposits":
                day[0] += total
        elif kind == "transferred":
            purpose = cmd.get("purpose", "transfer")
            m = cur.transfers.setdefault(purpose, _money())
            day[2] += total
        elif kind == "fee_charged":
            m = cur.fees.setdefault(cmd.get("fee_code", ""), _money())
            fees = cur.flows["fees_total"]
            fees[0] += 1
            fees[1] += total
            day[3] += total
        elif kind == "shortfall_topped_up":
            m = cur.flows["top_ups"]
        elif kind == "reversed":
            m = cur.flows["reversals"]
        elif kind == "reconciliation_settled":
            covered = self._kind(postings[0][0]) == "own_funds"
            m = cur.settlements["shortfall_covered" if covered else "excess_returned"]
        if m is not None:
            m[0] += 1
            m[1] += total

    def _tags(
        self, tags: list[dict[str, Any]], postings: list[tuple[str, str, int]], ccy: str
    ) -> None:
        cur = self._currency(ccy)
        for tag in tags:
            side, account = tag["side"], tag["account"]
            if side == "in":
                amount = sum(a for _, c, a in postings if c == account)
            else:
                amount = sum(a for d, _, a in postings if d == account)
            m = cur.lvt.setdefault(side, _money())
            m[0] += 1
            m[1] += amount
            cur.lvt_accounts.setdefault(side, set()).add(account)

    # -- the snapshot ---------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        self._start()
        while self.bucket < len(self.buckets):
            self._close_bucket()
        currencies = {ccy: self._currency_section(ccy, cur) for ccy, cur in self.ccys.items()}
        return {
            "currencies": currencies,
            "customers": self._customers(),
            "refusals": {
                "total": self.refusals,
                "by_code": self.refusals_by_code,
                "by_control": self.refusals_by_control,
                "suppressed": self.suppressed,
                "authorisation_failures": self.auth_failed,
            },
            "approvals": self._approvals(),
            "manual_operations": {
                op: {"count": n, "approved": approved} for op, (n, approved) in self.manual.items()
            },
            "policy": {
                "version_at_end": self.version,
                "versions_in_force": self.versions,
                "changes_in_period": self.policy_changes,
            },
            "gate": {
                "at_end": self.gate,
                "sequence": self.gates,
                "changes_in_period": self.gate_changes,
            },
            "records": {
                "before_period": self.before,
                "in_period": self.inside,
                "after_period": self.after,
                "first_in_period": self.first_seq,
                "last_in_period": self.last_seq,
                "period_closed": 1 if self.after else 0,
                "by_kind": self.kinds,
            },
            "alerts": self._alerts(),
        }

    def _alerts(self) -> dict[str, Any]:
        open_by_level: dict[str, int] = {}
        for level, status in self.alerts.values():
            if status != "closed":
                open_by_level[level] = open_by_level.get(level, 0) + 1
        by_level = {
            level: {
                "raised": raised,
                "acknowledged": acknowledged,
                "closed": closed,
                "open_at_end": open_by_level.get(level, 0),
            }
            for level, (raised, acknowledged, closed) in self.alert_counts.items()
        }
        return {
            "engine": ALERTS_ENGINE,
            "by_level": by_level,
            "by_rule": self.alert_rules,
            "open_at_end": sum(open_by_level.values()),
        }

    def _currency_section(self, ccy: str, cur: _Currency) -> dict[str, Any]:
        customers = sum(cur.by_role.values())
        money = customers + cur.suspense
        pending: dict[str, list[int]] = {}
        total, in_transit, overdue = _money(), _money(), _money()
        for _, _, amount, hold_ccy, reason, hold_kind, expires in self.holds.values():
            if hold_ccy != ccy:
                continue
            if hold_kind == "withdrawal":
                m = in_transit
            else:
                m = pending.setdefault(reason, _money())
                total[0] += 1
                total[1] += amount
            m[0] += 1
            m[1] += amount
            if expires <= self.to_ms:
                overdue[0] += 1
                overdue[1] += amount
        return {
            "balances": {
                "custody_omnibus": cur.omnibus,
                "platform_bank": cur.platform_bank,
                "customer_liabilities": {**cur.by_role, "total": customers},
                "suspense": cur.suspense,
                "customer_money": money,
                "own_funds": cur.own_funds,
                "fee_income": cur.fee_income,
                "custody_minus_customer_money": cur.omnibus - money,
                "coverage_bp": cur.omnibus * 10_000 // money if money > 0 else None,
            },
            "holds": {
                "pending_by_reason": {r: _out(m) for r, m in pending.items()},
                "pending_total": _out(total),
                "withdrawals_in_transit": _out(in_transit),
                "pending_past_expiry": _out(overdue),
            },
            "flows": {
                **{k: _out(m) for k, m in cur.flows.items()},
                "transfers": {p: _out(m) for p, m in cur.transfers.items()},
                "fees": {code: _out(m) for code, m in cur.fees.items()},
                "reconciliation_settlements": {d: _out(m) for d, m in cur.settlements.items()},
            },
            "large_value": {
                side: {**_out(m), "accounts": len(cur.lvt_accounts.get(side, ()))}
                for side, m in cur.lvt.items()
            },
            "reconciliation": {
                "completed": sum(cur.recon_results.values()),
                "results": cur.recon_results,
                "days_reconciled": len(cur.recon_days),
                "max_shortfall_minor": cur.recon_max_shortfall,
                "shortfall_total_minor": cur.recon_shortfall_total,
                "last": cur.recon_last,
            },
            "daily": [
                {
                    "day": day_label(d),
                    "from_ms": start,
                    "to_ms": end,
                    "deposits": row[0],
                    "withdrawals": row[1],
                    "transfers": row[2],
                    "fees": row[3],
                    "custody_end": row[4],
                    "customer_money_end": row[5],
                }
                for (d, start, end), row in zip(self.buckets, cur.daily, strict=True)
            ],
        }

    def _customers(self) -> dict[str, Any]:
        by_role: dict[str, dict[str, int]] = {
            r: {"total": 0, "open": 0, "new": 0, "active": 0, "funded": 0} for r in ROLES
        }
        for account, (kind, _, role, status) in self.accounts.items():
            if kind != "customer":
                continue
            row = by_role[role if role in by_role else "other"]
            row["total"] += 1
            row["open"] += status != "closed"
            row["new"] += account in self.new_customers
            row["active"] += account in self.active
            row["funded"] += self.customer_balance[account] > 0
        totals = {k: sum(r[k] for r in by_role.values()) for k in by_role["other"]}
        return {**totals, "by_role": by_role}

    def _approvals(self) -> dict[str, Any]:
        by_op = {
            op: {"requested": a, "approved": b, "rejected": c}
            for op, (a, b, c) in self.approvals.items()
        }
        open_expired = sum(1 for _, _, expires in self.requests.values() if expires < self.to_ms)
        return {
            "requested": sum(r["requested"] for r in by_op.values()),
            "approved": sum(r["approved"] for r in by_op.values()),
            "rejected": sum(r["rejected"] for r in by_op.values()),
            "by_op": by_op,
            "open_at_end": len(self.requests),
            "open_past_expiry_at_end": open_expired,
        }


# -- reading the log ------------------------------------------------------------------------------


class _Frontier:
    """RFC 6962 root of a stream of leaves in O(log n) memory."""

    def __init__(self) -> None:
        self.stack: list[bytes] = []
        self.size = 0

    def push(self, data: bytes) -> None:
        sha = hashlib.sha256
        self.stack.append(sha(b"\x00" + data).digest())
        n = self.size
        while n & 1:
            right = self.stack.pop()
            self.stack[-1] = sha(b"\x01" + self.stack[-1] + right).digest()
            n >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self.stack:
            return hashlib.sha256(b"").digest()
        r = self.stack[-1]
        for left in reversed(self.stack[:-1]):
            r = hashlib.sha256(b"\x01" + left + r).digest()
        return r


Rows = Callable[[], Iterable[tuple[int, str, bytes]]]


def _store_rows(store: LedgerStore, platform: str, size: int) -> Rows:
    def rows() -> Iterator[tuple[int, str, bytes]]:
        if size == 0:
            return iter(())
        return store.iter_rows(log_stream(platform), stop=size - 1)

    return rows


def day_offset_of(rows: Rows) -> int:
    """The business-day offset of the last policy in the prefix (platform_created, policy_set)."""
    offset = DEFAULT_DAY_OFFSET_MS
    for _, kind, packed in rows():
        if kind in ("platform_created", "policy_set"):
            rec = _DECODER.decode(packed[HASH_LEN:])
            policy = rec.get("policy")
            if isinstance(policy, dict):
                offset = policy.get("day_offset_ms", DEFAULT_DAY_OFFSET_MS)
    return offset


def compute(
    rows: Rows, platform: str, spec: PeriodSpec, size: int, expected_root: bytes | None = None
) -> dict[str, Any]:
    """The snapshot of records 0 .. size-1 (`rows()` yields them, position order, as stored:
    (position, kind, chain link || record bytes)). Checks positions, chain links and, when
    given, the checkpoint root, so that a snapshot is never computed over a broken log."""
    offset = day_offset_of(rows)
    from_ms, to_ms = spec.bounds(offset)
    fold = _Fold(platform, from_ms, to_ms, offset)
    tree = _Frontier()
    link = CHAIN_GENESIS
    n = 0
    for pos, kind, packed in rows():
        if pos != n:
            raise DisclosureError(f"position {n} missing from the log")
        stored, data = packed[:HASH_LEN], packed[HASH_LEN:]
        link = chain_next(link, data)
        if link != stored:
            raise DisclosureError(f"record {pos}: chain link mismatch")
        rec = _DECODER.decode(data)
        if rec.get("seq") != pos or rec.get("kind") != kind or rec.get("platform") != platform:
            raise DisclosureError(f"record {pos}: position, kind or platform mismatch")
        tree.push(data)
        fold.record(rec)
        n += 1
    if n != size:
        raise DisclosureError(f"the log has {n} records, the checkpoint {size}")
    root = tree.root()
    if expected_root is not None and root != expected_root:
        raise DisclosureError(f"the stored log does not match the checkpoint root at size {size}")
    body = fold.finish()
    return {
        "format": FORMAT,
        "platform": platform,
        "period": {
            "type": spec.type,
            "label": spec.label,
            "from_ms": from_ms,
            "to_ms": to_ms,
            "day_offset_ms": offset,
            "business_days": len(fold.buckets),
        },
        "checkpoint": {"size": size, "root": root.hex(), "chain_head": link.hex()},
        **body,
    }


def compute_from_store(
    store: LedgerStore,
    platform: str,
    spec: PeriodSpec,
    size: int,
    expected_root: bytes | None = None,
) -> dict[str, Any]:
    return compute(_store_rows(store, platform, size), platform, spec, size, expected_root)


def canonical(snapshot: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, integers only: the bytes that are hashed and signed."""
    return _ENCODER.encode(snapshot)


# -- signing --------------------------------------------------------------------------------------


def note_body(snapshot: dict[str, Any], data: bytes) -> bytes:
    """The signed text: format line, platform, period, checkpoint size, SHA-256 of the JSON."""
    p = snapshot["period"]
    label = p["label"] or "-"
    return (
        f"{FORMAT}\n"
        f"platform {snapshot['platform']}\n"
        f"period {p['type']} {label} {p['from_ms']} {p['to_ms']}\n"
        f"checkpoint {snapshot['checkpoint']['size']}\n"
        f"sha256 {hashlib.sha256(data).hexdigest()}\n"
    ).encode()


def sign_snapshot(snapshot: dict[str, Any], signer: NoteSigner) -> tuple[bytes, bytes]:
    """(canonical JSON, signed note)."""
    data = canonical(snapshot)
    return data, signer.sign(note_body(snapshot, data))


# -- choosing a checkpoint and writing the files --------------------------------------------------


def first_position_at_or_after(store: LedgerStore, platform: str, size: int, ts: int) -> int:
    """The first position < size whose record has `ts` >= ts, else size (binary search: writer
    time never decreases along a log)."""
    stream = log_stream(platform)
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi) // 2
        [(pos, _, packed)] = store.read(stream, after=mid - 1, limit=1)
        assert pos == mid
        if _DECODER.decode(packed[HASH_LEN:])["ts"] >= ts:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class Built:
    snapshot: dict[str, Any]
    data: bytes
    note: bytes
    vkey: str


def build(service: Any, platform: str, spec: PeriodSpec, size: int | None = None) -> Built:
    """Compute and sign a snapshot with a running `LedgerService`: at checkpoint `size` (it
    must have been signed), or else at the latest checkpoint if it covers the period end (every
    record before `to_ms` is in it), or else at a checkpoint signed now."""
    from ledger.checkpoint import origin_for

    if size is not None:
        cp = service.checkpoint(platform, size)
        if cp is None:
            raise DisclosureError(f"no checkpoint was signed at size {size}")
    else:
        with service.reading(platform) as state:
            log_size = state.next_seq
            offset = state.policy.day_offset_ms
        _, to_ms = spec.bounds(offset)
        cover = first_position_at_or_after(service.store, platform, log_size, to_ms)
        cp = service.checkpoint(platform)
        if cp is None or cp.size < cover:
            cp = service.sign_checkpoint(platform)
    snapshot = compute_from_store(service.store, platform, spec, cp.size, cp.root)
    signer = NoteSigner(service.signing_key, origin_for(service.config.ledger_id, platform))
    data, note = sign_snapshot(snapshot, signer)
    return Built(snapshot, data, note, signer.vkey)


def default_name(snapshot: dict[str, Any]) -> str:
    p = snapshot["period"]
    what = p["label"] or f"{p['from_ms']}-{p['to_ms']}"
    return f"{snapshot['platform']}-disclosure-{what}-{snapshot['checkpoint']['size']}"


def write_files(out_dir: Path | str, name: str, built: Built) -> dict[str, Path]:
    """`<name>.json` (canonical bytes), `.note`, `.html`, `.csv`; each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": built.data,
        "note": built.note,
        "html": render_html(built.snapshot).encode(),
        "csv": render_csv(built.snapshot),
    }
    paths: dict[str, Path] = {}
    for ext, content in files.items():
        path = out / f"{name}.{ext}"
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        paths[ext] = path
    return paths


# -- human renderings -----------------------------------------------------------------------------

# (Chinese, English) labels, shared by the HTML report and the CSV
L: Final[dict[str, tuple[str, str]]] = {
    "title": ("监管信息披露快照", "Regulator disclosure snapshot"),
    "platform": ("平台", "Platform"),
    "period": ("报告期", "Period"),
    "period_type": ("期间类型", "Period type"),
    "from": ("起始 (UTC 毫秒)", "From (UTC ms)"),
    "to": ("截止 (不含)", "To (exclusive)"),
    "offset": ("营业日时区偏移 (毫秒)", "Business-day UTC offset (ms)"),
    "business_days": ("营业日数", "Business days"),
    "checkpoint": ("签名检查点", "Signed checkpoint"),
    "size": ("日志记录数", "Log size (records)"),
    "root": ("默克尔根 (hex)", "Merkle root (hex)"),
    "chain_head": ("哈希链头 (hex)", "Chain head (hex)"),
    "currency": ("币种", "Currency"),
    "balances": ("期末余额", "Balances at period end"),
    "custody_omnibus": ("存管专户余额", "Custody (omnibus) balance"),
    "platform_bank": ("平台自有资金银行户", "Platform bank account"),
    "customer_liabilities": ("客户负债", "Customer liabilities"),
    "lender": ("出借人", "Lenders"),
    "borrower": ("借款人", "Borrowers"),
    "guarantor": ("担保人", "Guarantors"),
    "other": ("其他", "Other"),
    "total": ("合计", "Total"),
    "suspense": ("待清分 (挂账)", "Suspense (unidentified)"),
    "customer_money": ("客户资金合计", "Customer money total"),
    "own_funds": ("平台自有资金", "Platform own funds"),
    "fee_income": ("平台手续费收入", "Platform fee income"),
    "custody_minus_customer_money": ("存管余额减客户资金", "Custody minus customer money"),
    "coverage_bp": ("覆盖率 (基点)", "Coverage (basis points)"),
    "holds": ("冻结 (期末未决)", "Holds pending at period end"),
    "reason": ("原因", "Reason"),
    "count": ("笔数", "Count"),
    "amount": ("金额 (最小单位)", "Amount (minor units)"),
    "pending_total": ("冻结合计", "Holds total"),
    "withdrawals_in_transit": ("在途提现", "Withdrawals in transit"),
    "pending_past_expiry": ("已过期未释放", "Past expiry, not released"),
    "flows": ("期间资金流量", "Flows in the period"),
    "deposits": ("充值", "Deposits"),
    "deposits_unidentified": ("未识别来账", "Unidentified receipts"),
    "own_funds_deposits": ("自有资金入账", "Own-funds deposits"),
    "fees_total": ("手续费合计", "Fees total"),
    "top_ups": ("差额补足", "Shortfall top-ups"),
    "reversals": ("冲正", "Reversals"),
    "manual_adjustments": ("人工调整", "Manual adjustments"),
    "shortfall_covered": ("对账差额补足 (平台汇入)", "Reconciliation shortfall covered"),
    "excess_returned": ("对账溢余退回 (退回平台)", "Reconciliation excess returned"),
    "holds_placed": ("冻结", "Holds placed"),
    "holds_captured": ("冻结扣划", "Holds captured"),
    "holds_released": ("冻结释放", "Holds released"),
    "holds_expired": ("冻结到期", "Holds expired"),
    "withdrawals_requested": ("提现申请", "Withdrawals requested"),
    "withdrawals_settled": ("提现完成", "Withdrawals settled"),
    "withdrawals_failed": ("提现失败", "Withdrawals failed"),
    "withdrawals_expired": ("提现过期", "Withdrawals expired"),
    "platform_withdrawals_requested": ("平台提现申请", "Platform withdrawals requested"),
    "platform_withdrawals_settled": ("平台提现完成", "Platform withdrawals settled"),
    "platform_withdrawals_failed": ("平台提现失败", "Platform withdrawals failed"),
    "platform_withdrawals_expired": ("平台提现过期", "Platform withdrawals expired"),
    "transfers": ("转账 (按用途)", "Transfers by purpose"),
    "purpose": ("用途", "Purpose"),
    "bid": ("投标", "Bid"),
    "clearing": ("清分", "Clearing"),
    "compensation": ("代偿", "Compensation"),
    "disbursement": ("放款", "Disbursement"),
    "repayment": ("还款", "Repayment"),
    "transfer": ("普通转账", "Transfer"),
    "fees": ("手续费 (按费目)", "Fees by code"),
    "fee_code": ("费目", "Fee code"),
    "customers": ("客户数", "Customers"),
    "role": ("角色", "Role"),
    "customers_total": ("累计客户", "Total"),
    "customers_open": ("未销户", "Open"),
    "customers_new": ("本期新增", "New in period"),
    "customers_active": ("本期活跃", "Active in period"),
    "customers_funded": ("有余额", "With a balance"),
    "large_value": ("大额交易标记", "Large-value tags"),
    "side": ("方向", "Side"),
    "in": ("收入", "In"),
    "out": ("支出", "Out"),
    "tags": ("标记数", "Tags"),
    "accounts": ("账户数", "Accounts"),
    "refusals": ("拒绝指令", "Refusals"),
    "code": ("原因代码", "Code"),
    "control": ("控制项", "Control"),
    "refusals_total": ("拒绝合计", "Refusals total"),
    "suppressed": ("限流未记录", "Answered, not recorded"),
    "authorisation_failures": ("签名验证失败", "Authorisation failures"),
    "approvals": ("复核 (双人)", "Approvals (maker-checker)"),
    "operation": ("操作", "Operation"),
    "requested": ("申请", "Requested"),
    "approved": ("批准", "Approved"),
    "rejected": ("驳回", "Rejected"),
    "open_at_end": ("期末待复核", "Open at period end"),
    "open_past_expiry_at_end": ("期末已过期待复核", "Open past expiry at end"),
    "manual_operations": ("人工操作", "Manual operations"),
    "policy": ("规则版本", "Policy versions"),
    "version_at_end": ("期末版本", "Version at end"),
    "versions_in_force": ("期间生效版本", "Versions in force"),
    "changes_in_period": ("本期变更", "Changes in period"),
    "gate": ("平台状态", "Platform gate"),
    "gate_at_end": ("期末状态", "Gate at end"),
    "gate_sequence": ("期间状态序列", "Gate sequence"),
    "alerts": ("预警 (按级别)", "Alerts by level"),
    "level": ("级别", "Level"),
    "raised": ("触发", "Raised"),
    "acknowledged": ("已确认", "Acknowledged"),
    "closed": ("已关闭", "Closed"),
    "rule": ("规则", "Rule"),
    "engine": ("自动预警规则", "Automatic early-warning rules"),
    "reconciliation": ("对账结果", "Reconciliation"),
    "completed": ("完成对账次数", "Reconciliations completed"),
    "days_reconciled": ("已对账营业日", "Business days reconciled"),
    "result": ("结果", "Result"),
    "max_shortfall": ("最大差额 (短缺)", "Largest shortfall"),
    "shortfall_total": ("累计短缺", "Cumulative shortfall"),
    "last_reconciliation": ("最近一次对账", "Last reconciliation"),
    "status": ("状态", "Status"),
    "records": ("日志记录", "Log records"),
    "before_period": ("期前", "Before period"),
    "in_period": ("期内", "In period"),
    "after_period": ("期后 (检查点内)", "After period (in checkpoint)"),
    "first_in_period": ("期内首条位置", "First position in period"),
    "last_in_period": ("期内末条位置", "Last position in period"),
    "period_closed": ("期间已结束", "Period closed in log"),
    "kind": ("记录类型", "Record kind"),
    "daily": ("每日流量与余额", "Daily flows and balances"),
    "day": ("营业日", "Business day"),
    "withdrawals": ("提现", "Withdrawals"),
    "custody_end": ("日终存管余额", "Custody at day end"),
    "customer_money_end": ("日终客户资金", "Customer money at day end"),
    "verify": ("验证方法", "How to verify"),
    "field": ("项目", "Item"),
    "value": ("数值", "Value"),
}


def label(key: str) -> str:
    zh, en = L.get(key, (key, key))
    return f"{zh} / {en}"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def tables(snapshot: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(section key, column label keys, rows) of every table, for the HTML and the CSV."""
    s = snapshot
    p, cp = s["period"], s["checkpoint"]
    out: list[tuple[str, list[str], list[list[Any]]]] = [
        (
            "title",
            ["field", "value"],
            [
                [label("platform"), s["platform"]],
                [label("period_type"), p["type"]],
                [label("period"), p["label"] or f"{p['from_ms']}..{p['to_ms']}"],
                [label("from"), p["from_ms"]],
                [label("to"), p["to_ms"]],
                [label("offset"), p["day_offset_ms"]],
                [label("business_days"), p["business_days"]],
                [label("size"), cp["size"]],
                [label("root"), cp["root"]],
                [label("chain_head"), cp["chain_head"]],
            ],
        )
    ]
    balances, holds, flows, transfers, fees, lvt = [], [], [], [], [], []
    for ccy, cur in sorted(s["currencies"].items()):
        b = cur["balances"]
        for key in (
            "custody_omnibus",
            "platform_bank",
            "suspense",
            "customer_money",
            "own_funds",
            "fee_income",
            "custody_minus_customer_money",
            "coverage_bp",
        ):
            balances.append([ccy, label(key), b[key]])
        for role in (*ROLES, "total"):
            balances.append(
                [
                    ccy,
                    f"{label('customer_liabilities')}: {label(role)}",
                    b["customer_liabilities"][role],
                ]
            )
        h = cur["holds"]
        for reason, m in sorted(h["pending_by_reason"].items()):
            holds.append([ccy, reason, m["count"], m["amount_minor"]])
        for key in ("pending_total", "withdrawals_in_transit", "pending_past_expiry"):
            holds.append([ccy, label(key), h[key]["count"], h[key]["amount_minor"]])
        f = cur["flows"]
        for key in FLOW_KEYS:
            flows.append([ccy, label(key), f[key]["count"], f[key]["amount_minor"]])
        for key in SETTLEMENT_DIRECTIONS:
            m = f["reconciliation_settlements"][key]
            flows.append([ccy, label(key), m["count"], m["amount_minor"]])
        for purpose, m in sorted(f["transfers"].items()):
            transfers.append([ccy, label(purpose), m["count"], m["amount_minor"]])
        for code, m in sorted(f["fees"].items()):
            fees.append([ccy, code, m["count"], m["amount_minor"]])
        for side, m in sorted(cur["large_value"].items()):
            lvt.append([ccy, label(side), m["count"], m["amount_minor"], m["accounts"]])
    out += [
        ("balances", ["currency", "field", "amount"], balances),
        ("holds", ["currency", "reason", "count", "amount"], holds),
        ("flows", ["currency", "field", "count", "amount"], flows),
        ("transfers", ["currency", "purpose", "count", "amount"], transfers),
        ("fees", ["currency", "fee_code", "count", "amount"], fees),
        ("large_value", ["currency", "side", "tags", "amount", "accounts"], lvt),
    ]
    cu = s["customers"]
    cols = ["total", "open", "new", "active", "funded"]
    out.append(
        (
            "customers",
            ["role", *(f"customers_{c}" for c in cols)],
            [[label(r), *(cu["by_role"][r][c] for c in cols)] for r in ROLES]
            + [[label("total"), *(cu[c] for c in cols)]],
        )
    )
    r = s["refusals"]
    out.append(
        (
            "refusals",
            ["code", "count"],
            [[code, n] for code, n in sorted(r["by_code"].items())]
            + [
                [label("refusals_total"), r["total"]],
                [label("suppressed"), r["suppressed"]],
                [label("authorisation_failures"), r["authorisation_failures"]],
            ],
        )
    )
    out.append(("control", ["control", "count"], sorted(map(list, r["by_control"].items()))))
    a = s["approvals"]
    out.append(
        (
            "approvals",
            ["operation", "requested", "approved", "rejected"],
            [
                [op, m["requested"], m["approved"], m["rejected"]]
                for op, m in sorted(a["by_op"].items())
            ]
            + [
                [label("total"), a["requested"], a["approved"], a["rejected"]],
                [label("open_at_end"), a["open_at_end"], "", ""],
                [label("open_past_expiry_at_end"), a["open_past_expiry_at_end"], "", ""],
            ],
        )
    )
    out.append(
        (
            "manual_operations",
            ["operation", "count", "approved"],
            [[op, m["count"], m["approved"]] for op, m in sorted(s["manual_operations"].items())],
        )
    )
    pol, gate = s["policy"], s["gate"]
    out.append(
        (
            "policy",
            ["field", "value"],
            [
                [label("version_at_end"), pol["version_at_end"]],
                [label("versions_in_force"), " ".join(map(str, pol["versions_in_force"]))],
                [label("changes_in_period"), pol["changes_in_period"]],
                [label("gate_at_end"), gate["at_end"]],
                [label("gate_sequence"), " ".join(gate["sequence"])],
                [f"{label('gate')}: {label('changes_in_period')}", gate["changes_in_period"]],
            ],
        )
    )
    al = s["alerts"]
    out.append(
        (
            "alerts",
            ["level", "raised", "acknowledged", "closed", "open_at_end"],
            [
                [lvl, m["raised"], m["acknowledged"], m["closed"], m["open_at_end"]]
                for lvl, m in al["by_level"].items()
            ]
            + [
                [f"{label('rule')}: {rule}", n, "", "", ""]
                for rule, n in sorted(al["by_rule"].items())
            ]
            + [[label("engine"), al["engine"], "", "", ""]],
        )
    )
    recon = []
    for ccy, cur in sorted(s["currencies"].items()):
        rc = cur["reconciliation"]
        recon += [
            [ccy, label("completed"), rc["completed"]],
            [ccy, label("days_reconciled"), rc["days_reconciled"]],
            *([ccy, f"{label('result')}: {r}", n] for r, n in sorted(rc["results"].items())),
            [ccy, label("max_shortfall"), rc["max_shortfall_minor"]],
            [ccy, label("shortfall_total"), rc["shortfall_total_minor"]],
        ]
        last = rc["last"]
        if last is not None:
            recon += [[ccy, f"{label('last_reconciliation')}: {k}", v] for k, v in last.items()]
    out.append(("reconciliation", ["currency", "field", "value"], recon))
    rec = s["records"]
    out.append(
        (
            "records",
            ["field", "value"],
            [
                [label(k), rec[k]]
                for k in (
                    "before_period",
                    "in_period",
                    "after_period",
                    "first_in_period",
                    "last_in_period",
                    "period_closed",
                )
            ]
            + [[f"{label('kind')}: {k}", n] for k, n in sorted(rec["by_kind"].items())],
        )
    )
    daily = []
    for ccy, cur in sorted(s["currencies"].items()):
        for d in cur["daily"]:
            daily.append(
                [
                    ccy,
                    d["day"],
                    d["deposits"],
                    d["withdrawals"],
                    d["transfers"],
                    d["fees"],
                    d["custody_end"],
                    d["customer_money_end"],
                ]
            )
    out.append(
        (
            "daily",
            [
                "currency",
                "day",
                "deposits",
                "withdrawals",
                "transfers",
                "fees",
                "custody_end",
                "customer_money_end",
            ],
            daily,
        )
    )
    return out


def render_csv(snapshot: dict[str, Any]) -> bytes:
    """One section per table: a `# <label>` line, a header row, the rows, a blank line.
    UTF-8 with a BOM so that spreadsheet software shows the Chinese labels."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for key, cols, rows in tables(snapshot):
        w.writerow([f"# {label(key)}"])
        w.writerow([label(c) for c in cols])
        for row in rows:
            w.writerow(["" if v is None else v for v in row])
        w.writerow([])
    return "\ufeff".encode() + buf.getvalue().encode("utf-8")


_CSS = """
body{font-family:"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",Arial,sans-serif;
margin:24px;color:#1a1a1a;max-width:1100px}
h1{font-size:22px;border-bottom:2px solid #234;padding-bottom:6px}
h2{font-size:17px;margin-top:28px;color:#234}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#eef2f6}
.note{font-size:12px;color:#555}
code{font-size:12px;word-break:break-all}
svg{border:1px solid #ccc;background:#fff}
"""


def _cell(value: Any) -> str:
    cls = ' class="n"' if isinstance(value, int) and not isinstance(value, bool) else ""
    return f"<td{cls}>{html.escape(_fmt(value))}</td>"


def _chart(ccy: str, daily: list[dict[str, Any]]) -> str:
    """Bars: deposits (up) and withdrawals (down) per day; lines: custody and customer money."""
    width, height, pad = 900, 300, 50
    n = max(len(daily), 1)
    flows = [max(d["deposits"], d["withdrawals"]) for d in daily] or [0]
    levels = [max(d["custody_end"], d["customer_money_end"], 0) for d in daily] or [0]
    fmax = max(max(flows), 1)
    lmax = max(max(levels), 1)
    mid = height // 2
    step = (width - 2 * pad) / n
    bar = max(step * 0.35, 1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        f'viewBox="0 0 {width} {height + 40}" role="img" '
        f'aria-label="{html.escape(ccy)} daily flows and balances">',
        f'<line x1="{pad}" y1="{mid}" x2="{width - pad}" y2="{mid}" stroke="#888"/>',
    ]
    custody, money = [], []
    for i, d in enumerate(daily):
        x = pad + i * step
        up = d["deposits"] / fmax * (mid - 20)
        down = d["withdrawals"] / fmax * (mid - 20)
        parts.append(
            f'<rect x="{x:.1f}" y="{mid - up:.1f}" width="{bar:.1f}" height="{up:.1f}" '
            f'fill="#3a7d44"><title>{d["day"]} deposits {d["deposits"]:,}</title></rect>'
        )
        parts.append(
            f'<rect x="{x + bar:.1f}" y="{mid:.1f}" width="{bar:.1f}" height="{down:.1f}" '
            f'fill="#b5443a"><title>{d["day"]} withdrawals {d["withdrawals"]:,}</title></rect>'
        )
        cx = x + bar
        custody.append(f"{cx:.1f},{height - 10 - d['custody_end'] / lmax * (height - 30):.1f}")
        money.append(
            f"{cx:.1f},{height - 10 - max(d['customer_money_end'], 0) / lmax * (height - 30):.1f}"
        )
        if n <= 31 or i % max(n // 15, 1) == 0:
            parts.append(
                f'<text x="{cx:.1f}" y="{height + 14}" font-size="9" text-anchor="middle">'
                f"{d['day'][5:]}</text>"
            )
    if custody:
        parts.append(
            f'<polyline points="{" ".join(custody)}" fill="none" stroke="#1f4e9c" '
            f'stroke-width="2"/>'
        )
        parts.append(
            f'<polyline points="{" ".join(money)}" fill="none" stroke="#e59a1c" '
            f'stroke-width="2" stroke-dasharray="5,3"/>'
        )
    legend = [
        ("#3a7d44", label("deposits")),
        ("#b5443a", label("withdrawals")),
        ("#1f4e9c", label("custody_end")),
        ("#e59a1c", label("customer_money_end")),
    ]
    for i, (color, text) in enumerate(legend):
        x = pad + i * 210
        parts.append(f'<rect x="{x}" y="{height + 24}" width="10" height="10" fill="{color}"/>')
        parts.append(
            f'<text x="{x + 14}" y="{height + 33}" font-size="11">{html.escape(text)}</text>'
        )
    parts.append(
        f'<text x="{pad}" y="14" font-size="11">{html.escape(ccy)} — max flow {fmax:,}; '
        f"max balance {lmax:,}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(snapshot: dict[str, Any]) -> str:
    """A self-contained report: inline CSS, inline SVG charts, no script, no external asset."""
    s = snapshot
    p = s["period"]
    title = f"{label('title')} — {s['platform']} — {p['label'] or p['type']}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="zh-CN"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(FORMAT)} · '
        "金额均为最小货币单位 (分) 的整数 / all amounts are integers in minor units (cents, fen)"
        "</p>",
    ]
    for ccy, cur in sorted(s["currencies"].items()):
        out.append(f"<h2>{html.escape(label('daily'))} — {html.escape(ccy)}</h2>")
        out.append(_chart(ccy, cur["daily"]))
    for key, cols, rows in tables(s):
        out.append(f"<h2>{html.escape(label(key))}</h2>")
        out.append("<table><thead><tr>")
        out.extend(f"<th>{html.escape(label(c))}</th>" for c in cols)
        out.append("</tr></thead><tbody>")
        for row in rows:
            out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
        out.append("</tbody></table>")
    out.append(f"<h2>{html.escape(label('verify'))}</h2>")
    out.append(
        '<p class="note">本报告由签名的规范 JSON 生成；监管机构可用导出包独立重算: / '
        "This report is rendered from the signed canonical JSON; a regulator recomputes it "
        "independently from the export bundle:<br><code>custody-verify disclosure "
        "SNAPSHOT.json BUNDLE --vkey VKEY</code></p>"
    )
    out.append("</body></html>\n")
    return "\n".join(out)

"""`custody-verify disclosure SNAPSHOT BUNDLE --vkey VKEY`: check a regulator disclosure
snapshot (`custody-disclosure/v1`, docs/DISCLOSURE.md) against an export bundle.

1. The signed note (`<name>.note`) verifies with a trusted key, names the snapshot's platform,
   period and checkpoint size, and carries the SHA-256 of the snapshot's exact bytes.
2. The snapshot file (`<name>.json`) is canonical JSON (sorted keys, no whitespace, integers).
3. The bundle verifies end to end (`custody_verify.bundle.verify_bundle`), belongs to the same
   platform, was signed by the same key as the note, and holds at least the snapshot's records.
4. The snapshot is recomputed from the bundle's first `size` records by this module's own
   implementation of the specification; every field that differs is reported (path, expected
   = recomputed, found = in the snapshot).

Standard library and `cryptography` only; nothing from the ledger is imported.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from custody_verify.bundle import VerificationFailed, verify_bundle
from custody_verify.merkle import RootBuilder
from custody_verify.note import NoteError, Verifier, VkeyError, open_note, parse_vkey

FORMAT = "custody-disclosure/v1"
DAY = 86_400_000
OFFSET_DEFAULT = 28_800_000
DAYS_MAX = 3700
ALERTS_ENGINE = (
    "alert records in the log (raised by the early-warning engine, docs/RISK.md, or by an operator)"
)
LEVELS = ["GREEN", "YELLOW", "ORANGE", "RED"]
ROLE_KEYS = ["borrower", "guarantor", "lender", "other"]
PURPOSE_KEYS = ["bid", "clearing", "compensation", "disbursement", "repayment", "transfer"]
MANUAL = {
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
FLOW_NAMES = [
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
]
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class DisclosureInputError(Exception):
    """Files missing or unusable (exit 2)."""


# -- canonical JSON ---------------------------------------------------------------------------


def _reject_float(text: str) -> Any:
    raise ValueError(f"a float ({text}) in canonical JSON")


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} in canonical JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def strict_loads(data: bytes) -> Any:
    return json.loads(
        data.decode("utf-8"),
        parse_float=_reject_float,
        parse_constant=_reject_constant,
        object_pairs_hook=_no_duplicates,
    )


def canonical_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- periods ----------------------------------------------------------------------------------


def _date(text: Any, pattern_len: int) -> datetime.date:
    if not isinstance(text, str) or len(text) != pattern_len:
        raise ValueError(f"bad period label {text!r}")
    full = text if pattern_len == 10 else text + "-01"
    if not (full[4] == "-" and full[7] == "-" and (full[:4] + full[5:7] + full[8:]).isdigit()):
        raise ValueError(f"bad period label {text!r}")
    d = datetime.date(int(full[:4]), int(full[5:7]), int(full[8:]))
    if d.year < 1970:
        raise ValueError("period before 1970")
    return d


def _days_since_epoch(d: datetime.date) -> int:
    return (d - datetime.date(1970, 1, 1)).days


def period_bounds(period: dict[str, Any], offset: int) -> tuple[int, int]:
    kind = period.get("type")
    if kind == "range":
        lo, hi = period.get("from_ms"), period.get("to_ms")
        if not (type(lo) is int and type(hi) is int and 0 <= lo < hi <= 2**62):
            raise ValueError("a range needs integers 0 <= from_ms < to_ms")
        return lo, hi
    if kind == "day":
        start_day = _days_since_epoch(_date(period.get("label"), 10))
        n_days = 1
    elif kind == "month":
        first = _date(period.get("label"), 7)
        year, month = (first.year + 1, 1) if first.month == 12 else (first.year, first.month + 1)
        start_day = _days_since_epoch(first)
        n_days = _days_since_epoch(datetime.date(year, month, 1)) - start_day
    else:
        raise ValueError(f"unknown period type {kind!r}")
    lo = start_day * DAY - offset
    return lo, lo + n_days * DAY


# -- the bundle's records -----------------------------------------------------------------------


def bundle_records(path: Path, size: int) -> Any:
    """Yield the record bytes of positions 0 .. size-1 (the bundle was verified before)."""
    if size == 0:
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.startswith(b"R "):
                continue
            _, pos_text, _, data = line.rstrip(b"\n").split(b" ", 3)
            yield int(pos_text), data
            if int(pos_text) == size - 1:
                return


# -- recomputation --------------------------------------------------------------------------------


def _pair() -> dict[str, int]:
    return {"count": 0, "amount_minor": 0}


def _add(pair: dict[str, int], amount: int) -> None:
    pair["count"] += 1
    pair["amount_minor"] += amount


class Recompute:
    """The verifier's own fold of the specification (docs/DISCLOSURE.md §3)."""

    def __init__(self, start: int, end: int, offset: int) -> None:
        self.start, self.end, self.offset = start, end, offset
        first_day = (start + offset) // DAY
        last_day = (end - 1 + offset) // DAY
        if last_day - first_day >= DAYS_MAX:
            raise ValueError(f"more than {DAYS_MAX} business days")
        self.days = [
            (d, max(d * DAY - offset, start), min(d * DAY - offset + DAY, end))
            for d in range(first_day, last_day + 1)
        ]
        self.day_pos = 0
        self.acct: dict[str, dict[str, Any]] = {}
        self.holds: dict[str, dict[str, Any]] = {}
        self.pending_requests: dict[str, dict[str, Any]] = {}
        self.sections: dict[str, dict[str, Any]] = {}
        self.daily: dict[str, list[dict[str, Any]]] = {}
        self.policy_version: int | None = None
        self.gate_state: str | None = None
        self.policy_seq: list[int] = []
        self.gate_seq: list[str] = []
        self.policy_changed = 0
        self.gate_changed = 0
        self.entered = False
        self.counts = {"before_period": 0, "in_period": 0, "after_period": 0}
        self.first: int | None = None
        self.last: int | None = None
        self.by_kind: dict[str, int] = {}
        self.refused: dict[str, Any] = {
            "total": 0,
            "by_code": {},
            "by_control": {},
            "suppressed": 0,
            "authorisation_failures": 0,
        }
        self.by_op: dict[str, dict[str, int]] = {}
        self.manual_ops: dict[str, dict[str, int]] = {}
        self.lvt_accounts: dict[tuple[str, str], set[str]] = {}
        self.alert_state: dict[str, dict[str, str]] = {}
        self.alert_levels = {
            lvl: {"raised": 0, "acknowledged": 0, "closed": 0, "open_at_end": 0} for lvl in LEVELS
        }
        self.alert_rules: dict[str, int] = {}

    # currency sections are created when an account of that currency opens
    def section(self, ccy: str) -> dict[str, Any]:
        if ccy not in self.sections:
            flows: dict[str, Any] = {name: _pair() for name in FLOW_NAMES}
            flows["transfers"] = {p: _pair() for p in PURPOSE_KEYS}
            flows["fees"] = {}
            flows["reconciliation_settlements"] = {
                "excess_returned": _pair(),
                "shortfall_covered": _pair(),
            }
            self.sections[ccy] = {
                "flows": flows,
                "large_value": {"in": _pair(), "out": _pair()},
                "reconciliation": {
                    "completed": 0,
                    "results": {"balanced": 0, "excess": 0, "shortfall": 0},
                    "days_reconciled": set(),
                    "max_shortfall_minor": 0,
                    "shortfall_total_minor": 0,
                    "last": None,
                },
            }
            self.daily[ccy] = [
                {
                    "day": datetime.date.fromordinal(
                        datetime.date(1970, 1, 1).toordinal() + d
                    ).isoformat(),
                    "from_ms": lo,
                    "to_ms": hi,
                    "deposits": 0,
                    "withdrawals": 0,
                    "transfers": 0,
                    "fees": 0,
                    "custody_end": 0,
                    "customer_money_end": 0,
                }
                for d, lo, hi in self.days
            ]
        return self.sections[ccy]

    @staticmethod
    def _category(a: dict[str, Any]) -> str:
        if a["kind"] == "customer":
            return "customer:" + (a["role"] if a["role"] in ROLE_KEYS else "other")
        return str(a["kind"])

    def _totals(self, ccy: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.acct.values():
            if a["ccy"] == ccy:
                cat = self._category(a)
                out[cat] = out.get(cat, 0) + a["balance"]
        return out

    def _customer_money(self, totals: dict[str, int]) -> int:
        return sum(v for k, v in totals.items() if k.startswith("customer:")) + totals.get(
            "suspense", 0
        )

    def _end_day(self) -> None:
        for ccy in self.sections:
            t = self._totals(ccy)
            row = self.daily[ccy][self.day_pos]
            row["custody_end"] = t.get("omnibus", 0)
            row["customer_money_end"] = self._customer_money(t)
        self.day_pos += 1

    def _enter(self) -> None:
        if self.entered:
            return
        self.entered = True
        if self.policy_version is not None:
            self.policy_seq.append(self.policy_version)
        if self.gate_state is not None:
            self.gate_seq.append(self.gate_state)

    # -- one record -----------------------------------------------------------------------------

    def feed(self, rec: dict[str, Any]) -> None:
        ts = rec["ts"]
        if ts >= self.end:
            self.counts["after_period"] += 1
            return
        within = ts >= self.start
        if within:
            self._enter()
            while self.days[self.day_pos][2] <= ts:
                self._end_day()
            self.counts["in_period"] += 1
            self.first = rec["seq"] if self.first is None else self.first
            self.last = rec["seq"]
            self.by_kind[rec["kind"]] = self.by_kind.get(rec["kind"], 0) + 1
        else:
            self.counts["before_period"] += 1
        handler = getattr(self, "_on_" + rec["kind"], None)
        if rec["kind"] == "command_refused":
            if within:
                self._refusal(rec)
            return
        if handler is not None and rec["kind"] in ("approval_requested", "approval_rejected"):
            handler(rec, within)
            return
        self._accepted(rec, within)

    def _refusal(self, rec: dict[str, Any]) -> None:
        r = self.refused
        r["total"] += 1
        r["by_code"][rec["code"]] = r["by_code"].get(rec["code"], 0) + 1
        r["by_control"][rec["control"]] = r["by_control"].get(rec["control"], 0) + 1
        r["suppressed"] += rec.get("suppressed", 0)
        if "auth_failed" in rec:
            r["authorisation_failures"] += 1

    def _op_row(self, op: str) -> dict[str, int]:
        return self.by_op.setdefault(op, {"requested": 0, "approved": 0, "rejected": 0})

    def _on_approval_requested(self, rec: dict[str, Any], within: bool) -> None:
        req = rec["request"]
        self.pending_requests[req["id"]] = {
            "op": req["op"],
            "cmd": rec["cmd"],
            "expires": req["expires"],
        }
        if within:
            self._op_row(req["op"])["requested"] += 1

    def _on_approval_rejected(self, rec: dict[str, Any], within: bool) -> None:
        req = self.pending_requests.pop(rec["rejects"], None)
        if within and req is not None:
            self._op_row(req["op"])["rejected"] += 1

    def _move(self, account_id: str, debit: bool, amount: int) -> None:
        a = self.acct[account_id]
        asset = a["kind"] in ("omnibus", "platform_bank")
        a["balance"] += amount if debit == asset else -amount

    def _accepted(self, rec: dict[str, Any], within: bool) -> None:
        kind = rec["kind"]
        cmd = rec["cmd"]
        op = cmd.get("op")
        executed_by_checker = "executes" in rec
        if executed_by_checker:
            req = self.pending_requests.pop(rec["executes"], None) or {"op": "", "cmd": {}}
            op, cmd = req["op"], req["cmd"]
            if within:
                self._op_row(op)["approved"] += 1
        moved: list[list[Any]] = []  # [debit, credit, amount]
        involved: list[str] = []
        ccy = rec.get("ccy")
        if "entries" in rec:
            moved = [list(e) for e in rec["entries"]]
            if (
                kind == "transferred"
                and not executed_by_checker
                and self.acct[moved[0][0]]["kind"] == "suspense"
            ):
                op = "clear_suspense"
        elif "hold" in rec:
            h = rec["hold"]
            self.holds[h["id"]] = {**h, "ccy": rec["ccy"]}
            involved += [h["debit"], h["credit"]]
            if within:
                platform = self.acct[h["debit"]]["kind"] in ("own_funds", "fee_income")
                if h["kind"] == "withdrawal":
                    name = ("platform_" if platform else "") + "withdrawals_requested"
                else:
                    name = "holds_placed"
                _add(self.section(rec["ccy"])["flows"][name], h["amount"])
        elif "resolve" in rec:
            for hold_id, captured, status in rec["resolve"]:
                h = self.holds.pop(hold_id)
                ccy = h["ccy"]
                involved.append(h["debit"])
                if captured > 0:
                    moved.append([h["debit"], h["credit"], captured])
                if within:
                    self._resolution(h, captured, status)
        elif kind == "account_opened":
            spec = rec["account"]
            self.acct[spec["id"]] = {
                "kind": spec["kind"],
                "ccy": spec["ccy"],
                "role": spec.get("role"),
                "status": "open",
                "balance": 0,
                "opened_in_period": within,
                "active": False,
            }
            self.section(spec["ccy"])
        elif kind in ("account_frozen", "account_unfrozen", "account_closed"):
            self.acct[rec["subject"]]["status"] = {
                "account_frozen": "frozen",
                "account_unfrozen": "open",
                "account_closed": "closed",
            }[kind]
        elif kind in ("platform_created", "policy_set"):
            policy = rec.get("policy")
            self.policy_version = policy["version"] if isinstance(policy, dict) else 0
            if within:
                self.policy_seq.append(self.policy_version)
                self.policy_changed += kind == "policy_set"
            if kind == "platform_created":
                self.gate_state = "NORMAL"
                if within:
                    self.gate_seq.append("NORMAL")
        elif kind == "gate_set":
            self.gate_state = rec["gate"]
            if within:
                self.gate_seq.append(rec["gate"])
                self.gate_changed += 1
        elif kind == "reconciliation_completed":
            self._reconciled(rec["reconciliation"], rec["seq"], within)
        elif kind == "alert_raised":
            spec = rec["alert"]
            self.alert_state[spec["id"]] = {"level": spec["level"], "status": "raised"}
            if within:
                self._level(spec["level"])["raised"] += 1
                self.alert_rules[spec["rule"]] = self.alert_rules.get(spec["rule"], 0) + 1
        elif kind in ("alert_acknowledged", "alert_closed"):
            state = self.alert_state[rec[kind]]
            state["status"] = "closed" if kind == "alert_closed" else "acknowledged"
            if within:
                self._level(state["level"])[state["status"]] += 1
        for debit, credit, amount in moved:
            self._move(debit, True, amount)
            self._move(credit, False, amount)
            involved += [debit, credit]
        if not within:
            return
        for account_id in involved:
            if self.acct[account_id]["kind"] == "customer":
                self.acct[account_id]["active"] = True
        amount_total = 0
        for m in moved:
            amount_total += m[2]
        if op in MANUAL:
            row = self.manual_ops.setdefault(op, {"count": 0, "approved": 0})
            row["count"] += 1
            if executed_by_checker:
                row["approved"] += 1
            if moved and ccy is not None:
                _add(self.section(ccy)["flows"]["manual_adjustments"], amount_total)
        if "entries" in rec:
            self._classify(kind, cmd, moved, ccy, amount_total)
        for tag in rec.get("tags", []):
            self._tag(tag, moved, ccy)

    def _level(self, level: str) -> dict[str, int]:
        return self.alert_levels.setdefault(
            level, {"raised": 0, "acknowledged": 0, "closed": 0, "open_at_end": 0}
        )

    def _reconciled(self, spec: dict[str, Any], seq: int, within: bool) -> None:
        rc = self.section(spec["ccy"])["reconciliation"]
        rc["last"] = {
            "id": spec["id"],
            "seq": seq,
            "as_of_ms": spec["as_of"],
            "snapshot": spec["snapshot"],
            "bank_closing_minor": spec["closing"],
            "in_transit_minor": spec["transit"],
            "requirement_minor": spec["requirement"],
            "difference_minor": spec["difference"],
            "breaks": spec["breaks"],
            "result": spec["result"],
        }
        if not within:
            return
        rc["completed"] += 1
        rc["results"][spec["result"]] = rc["results"].get(spec["result"], 0) + 1
        rc["days_reconciled"].add((spec["as_of"] + self.offset) // DAY)
        if spec["result"] == "shortfall":
            short = -spec["difference"]
            rc["max_shortfall_minor"] = max(rc["max_shortfall_minor"], short)
            rc["shortfall_total_minor"] += short

    def _resolution(self, h: dict[str, Any], captured: int, status: str) -> None:
        names = {
            "captured": ("holds_captured", "withdrawals_settled"),
            "released": ("holds_released", "withdrawals_failed"),
            "expired": ("holds_expired", "withdrawals_expired"),
        }[status]
        if h["kind"] == "withdrawal":
            name = names[1]
            if self.acct[h["debit"]]["kind"] in ("own_funds", "fee_income"):
                name = "platform_" + name
        else:
            name = names[0]
        amount = captured if status == "captured" else h["amount"] - captured
        _add(self.section(h["ccy"])["flows"][name], amount)
        if name == "withdrawals_settled":
            self.daily[h["ccy"]][self.day_pos]["withdrawals"] += captured

    def _classify(
        self, kind: str, cmd: dict[str, Any], moved: list[list[Any]], ccy: Any, amount: int
    ) -> None:
        flows = self.section(ccy)["flows"]
        today = self.daily[ccy][self.day_pos]
        if kind == "deposited":
            target = self.acct[moved[0][1]]["kind"]
            if target == "customer":
                _add(flows["deposits"], amount)
                today["deposits"] += amount
            elif target == "suspense":
                _add(flows["deposits_unidentified"], amount)
                today["deposits"] += amount
            else:
                _add(flows["own_funds_deposits"], amount)
        elif kind == "transferred":
            purpose = cmd.get("purpose", "transfer")
            _add(flows["transfers"].setdefault(purpose, _pair()), amount)
            today["transfers"] += amount
        elif kind == "fee_charged":
            _add(flows["fees"].setdefault(cmd.get("fee_code", ""), _pair()), amount)
            _add(flows["fees_total"], amount)
            today["fees"] += amount
        elif kind == "shortfall_topped_up":
            _add(flows["top_ups"], amount)
        elif kind == "reversed":
            _add(flows["reversals"], amount)
        elif kind == "reconciliation_settled":
            # own funds -> platform bank: the platform covered a shortfall; the reverse: an
            # excess went back to the platform's bank
            covered = self.acct[moved[0][0]]["kind"] == "own_funds"
            direction = "shortfall_covered" if covered else "excess_returned"
            _add(flows["reconciliation_settlements"][direction], amount)

    def _tag(self, tag: dict[str, Any], moved: list[list[Any]], ccy: Any) -> None:
        side, account = tag["side"], tag["account"]
        col = 1 if side == "in" else 0
        amount = sum(m[2] for m in moved if m[col] == account)
        _add(self.section(ccy)["large_value"].setdefault(side, _pair()), amount)
        self.lvt_accounts.setdefault((ccy, side), set()).add(account)

    # -- the result -----------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        self._enter()
        while self.day_pos < len(self.days):
            self._end_day()
        currencies = {ccy: self._currency(ccy) for ccy in self.sections}
        customers = [a for a in self.acct.values() if a["kind"] == "customer"]
        by_role = {}
        for role in ROLE_KEYS:
            mine = [
                a for a in customers if (a["role"] if a["role"] in ROLE_KEYS else "other") == role
            ]
            by_role[role] = {
                "total": len(mine),
                "open": sum(1 for a in mine if a["status"] != "closed"),
                "new": sum(1 for a in mine if a["opened_in_period"]),
                "active": sum(1 for a in mine if a["active"]),
                "funded": sum(1 for a in mine if a["balance"] > 0),
            }
        customer_totals = {
            k: sum(r[k] for r in by_role.values())
            for k in ("total", "open", "new", "active", "funded")
        }
        approvals = {
            "requested": sum(r["requested"] for r in self.by_op.values()),
            "approved": sum(r["approved"] for r in self.by_op.values()),
            "rejected": sum(r["rejected"] for r in self.by_op.values()),
            "by_op": self.by_op,
            "open_at_end": len(self.pending_requests),
            "open_past_expiry_at_end": len(
                [r for r in self.pending_requests.values() if r["expires"] < self.end]
            ),
        }
        return {
            "currencies": currencies,
            "customers": {**customer_totals, "by_role": by_role},
            "refusals": self.refused,
            "approvals": approvals,
            "manual_operations": self.manual_ops,
            "policy": {
                "version_at_end": self.policy_version,
                "versions_in_force": self.policy_seq,
                "changes_in_period": self.policy_changed,
            },
            "gate": {
                "at_end": self.gate_state,
                "sequence": self.gate_seq,
                "changes_in_period": self.gate_changed,
            },
            "records": {
                **self.counts,
                "first_in_period": self.first,
                "last_in_period": self.last,
                "period_closed": int(self.counts["after_period"] > 0),
                "by_kind": self.by_kind,
            },
            "alerts": self._alerts(),
        }

    def _alerts(self) -> dict[str, Any]:
        for state in self.alert_state.values():
            if state["status"] != "closed":
                self._level(state["level"])["open_at_end"] += 1
        return {
            "engine": ALERTS_ENGINE,
            "by_level": self.alert_levels,
            "by_rule": self.alert_rules,
            "open_at_end": sum(row["open_at_end"] for row in self.alert_levels.values()),
        }

    def _currency(self, ccy: str) -> dict[str, Any]:
        t = self._totals(ccy)
        liabilities = {r: t.get("customer:" + r, 0) for r in ROLE_KEYS}
        liabilities["total"] = sum(liabilities[r] for r in ROLE_KEYS)
        money = liabilities["total"] + t.get("suspense", 0)
        omnibus = t.get("omnibus", 0)
        by_reason: dict[str, dict[str, int]] = {}
        pending, transit, overdue = _pair(), _pair(), _pair()
        for h in self.holds.values():
            if h["ccy"] != ccy:
                continue
            if h["kind"] == "withdrawal":
                _add(transit, h["amount"])
            else:
                _add(by_reason.setdefault(h["reason"], _pair()), h["amount"])
                _add(pending, h["amount"])
            if h["expires"] <= self.end:
                _add(overdue, h["amount"])
        section = self.sections[ccy]
        large = {}
        for side, pair in section["large_value"].items():
            large[side] = {**pair, "accounts": len(self.lvt_accounts.get((ccy, side), ()))}
        return {
            "balances": {
                "custody_omnibus": omnibus,
                "platform_bank": t.get("platform_bank", 0),
                "customer_liabilities": liabilities,
                "suspense": t.get("suspense", 0),
                "customer_money": money,
                "own_funds": t.get("own_funds", 0),
                "fee_income": t.get("fee_income", 0),
                "custody_minus_customer_money": omnibus - money,
                "coverage_bp": (omnibus * 10_000) // money if money > 0 else None,
            },
            "holds": {
                "pending_by_reason": by_reason,
                "pending_total": pending,
                "withdrawals_in_transit": transit,
                "pending_past_expiry": overdue,
            },
            "flows": section["flows"],
            "large_value": large,
            "reconciliation": {
                **section["reconciliation"],
                "days_reconciled": len(section["reconciliation"]["days_reconciled"]),
            },
            "daily": self.daily[ccy],
        }


def recompute(bundle: Path, platform: str, period: dict[str, Any], size: int) -> dict[str, Any]:
    """The snapshot a correct producer writes for these records and this period."""
    offset = OFFSET_DEFAULT
    for _, data in bundle_records(bundle, size):
        if b'"kind":"platform_created"' in data or b'"kind":"policy_set"' in data:
            rec = json.loads(data)
            if rec["kind"] in ("platform_created", "policy_set") and isinstance(
                rec.get("policy"), dict
            ):
                offset = rec["policy"].get("day_offset_ms", OFFSET_DEFAULT)
    start, end = period_bounds(period, offset)
    fold = Recompute(start, end, offset)
    tree = RootBuilder()
    head = b"\x00" * 32
    n = 0
    for pos, data in bundle_records(bundle, size):
        if pos != n:
            raise ValueError(f"bundle record {n} missing")
        tree.push_data(data)
        head = hashlib.sha256(head + data).digest()
        fold.feed(json.loads(data))
        n += 1
    if n != size:
        raise ValueError(f"the bundle holds {n} records, the snapshot names {size}")
    body = fold.result()
    return {
        "format": FORMAT,
        "platform": platform,
        "period": {
            "type": period.get("type"),
            "label": "" if period.get("type") == "range" else period.get("label"),
            "from_ms": start,
            "to_ms": end,
            "day_offset_ms": offset,
            "business_days": len(fold.days),
        },
        "checkpoint": {"size": size, "root": tree.root().hex(), "chain_head": head.hex()},
        **body,
    }


# -- comparing ----------------------------------------------------------------------------------


def differences(expected: Any, found: Any, path: str = "") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(set(expected) | set(found)):
            sub = f"{path}.{key}" if path else key
            if key not in found:
                out.append({"path": sub, "expected": expected[key], "found": "<missing>"})
            elif key not in expected:
                out.append({"path": sub, "expected": "<absent>", "found": found[key]})
            else:
                out += differences(expected[key], found[key], sub)
        return out
    if isinstance(expected, list) and isinstance(found, list):
        if len(expected) != len(found):
            return [{"path": path + ".length", "expected": len(expected), "found": len(found)}]
        for i, (e, f) in enumerate(zip(expected, found, strict=True)):
            out += differences(e, f, f"{path}[{i}]")
        return out
    if type(expected) is not type(found) or expected != found:
        out.append({"path": path, "expected": expected, "found": found})
    return out


# -- the whole check --------------------------------------------------------------------------


def _paths(snapshot_path: Path | str) -> tuple[Path, Path]:
    p = Path(snapshot_path)
    if p.suffix in (".json", ".note"):
        return p.with_suffix(".json"), p.with_suffix(".note")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".note")


def _note_problem(text: bytes, snap: dict[str, Any], data: bytes) -> str | None:
    try:
        lines = text.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return "note text is not UTF-8"
    period = snap.get("period") or {}
    checkpoint = snap.get("checkpoint") or {}
    want = [
        FORMAT,
        f"platform {snap.get('platform')}",
        f"period {period.get('type')} {period.get('label') or '-'} "
        f"{period.get('from_ms')} {period.get('to_ms')}",
        f"checkpoint {checkpoint.get('size')}",
        f"sha256 {hashlib.sha256(data).hexdigest()}",
        "",
    ]
    if lines != want:
        for got, exp in zip(lines, want, strict=False):
            if got != exp:
                return f"note line {got!r} does not match the snapshot ({exp!r})"
        return "the note has other lines than the snapshot needs"
    return None


def verify_disclosure(
    snapshot_path: Path | str, bundle_path: Path | str, vkey: str | list[str] | list[Verifier]
) -> dict[str, Any]:
    """Check a snapshot against a bundle. The report's `ok` is True only if the signature, the
    note, the bundle and the recomputation all agree; `differences` lists every differing field
    (path, expected = recomputed from the bundle, found = in the snapshot)."""
    verifiers = _verifiers(vkey)
    json_path, note_path = _paths(snapshot_path)
    bundle = Path(bundle_path)
    try:
        data = json_path.read_bytes()
        note = note_path.read_bytes()
    except OSError as exc:
        raise DisclosureInputError(f"cannot read the snapshot: {exc}") from None
    if not bundle.is_file():
        raise DisclosureInputError(f"cannot read the bundle {str(bundle)!r}")
    report: dict[str, Any] = {
        "ok": False,
        "snapshot": str(json_path),
        "note": str(note_path),
        "bundle": str(bundle),
        "problems": [],
        "differences": [],
    }
    problems: list[str] = report["problems"]
    try:
        snap = strict_loads(data)
        if not isinstance(snap, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"snapshot is not valid JSON: {exc}")
        return report
    if canonical_bytes(snap) != data:
        problems.append("snapshot bytes are not canonical JSON (sorted keys, no whitespace)")
    if snap.get("format") != FORMAT:
        problems.append(f"format is {snap.get('format')!r}, not {FORMAT!r}")
    signer_name = None
    try:
        opened = open_note(note, verifiers)
        signer_name = opened.verified[0].name
        report["signed_by"] = [f"{s.name}+{s.key_id_hex}" for s in opened.verified]
        why = _note_problem(opened.text, snap, data)
        if why is not None:
            problems.append(why)
    except NoteError as exc:
        problems.append(f"signature: {exc}")
    try:
        with open(bundle, "rb", buffering=1 << 20) as f:
            summary = verify_bundle(f, verifiers)
    except VerificationFailed as exc:
        problems.append(f"bundle: {exc.failure.describe()}")
        return report
    report["bundle_records"] = summary.records
    if signer_name is not None and signer_name != summary.origin:
        problems.append(f"note signed by {signer_name!r}, the bundle's log is {summary.origin!r}")
    if snap.get("platform") != summary.platform:
        problems.append(f"snapshot of {snap.get('platform')!r}, bundle of {summary.platform!r}")
        return report
    size = (snap.get("checkpoint") or {}).get("size")
    if type(size) is not int or not 0 <= size <= summary.records:
        problems.append(f"checkpoint size {size!r} is not within the bundle's {summary.records}")
        return report
    period = snap.get("period")
    if not isinstance(period, dict):
        problems.append("no period")
        return report
    try:
        expected = recompute(bundle, summary.platform, period, size)
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"cannot recompute: {exc}")
        return report
    report["checkpoint"] = expected["checkpoint"]
    report["differences"] = differences(expected, snap)
    identical = canonical_bytes(expected) == data
    if not identical and not report["differences"]:
        problems.append("recomputed bytes differ from the snapshot's")
    report["ok"] = identical and not problems
    return report


def _verifiers(vkey: str | list[str] | list[Verifier]) -> list[Verifier]:
    values: list[Any] = [vkey] if isinstance(vkey, str) else list(vkey)
    out: list[Verifier] = []
    for value in values:
        if isinstance(value, Verifier):
            out.append(value)
            continue
        texts = [value]
        path = Path(value)
        if "+" not in value or path.is_file():
            try:
                texts = [t for t in path.read_text("utf-8").splitlines() if t.strip()]
            except OSError as exc:
                raise DisclosureInputError(
                    f"--vkey {value!r}: not a key nor a file ({exc})"
                ) from None
        for text in texts:
            try:
                out.append(parse_vkey(text))
            except VkeyError as exc:
                raise DisclosureInputError(f"--vkey {text!r}: {exc}") from None
    if not out:
        raise DisclosureInputError("at least one --vkey is required")
    return out


def _text(report: dict[str, Any]) -> list[str]:
    lines = []
    if report["ok"]:
        cp = report.get("checkpoint", {})
        lines.append(
            f"OK disclosure {report['snapshot']} recomputed identically from {report['bundle']}"
        )
        lines.append(f"   checkpoint size {cp.get('size')} root {cp.get('root')}")
        lines.append(f"   signed by  {', '.join(report.get('signed_by', []))}")
        return lines
    lines.append(f"FAIL disclosure {report['snapshot']}")
    lines += [f"   {p}" for p in report["problems"]]
    for d in report["differences"]:
        lines.append(
            f"   differs {d['path']}: expected {json.dumps(d['expected'], ensure_ascii=False)}"
            f", found {json.dumps(d['found'], ensure_ascii=False)}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """`disclosure SNAPSHOT BUNDLE --vkey VKEY [--json]`; exit 0 only if identical."""
    parser = argparse.ArgumentParser(
        prog="custody-verify disclosure",
        description="Recompute a custody-disclosure/v1 snapshot from an export bundle and "
        "report every field that differs (docs/DISCLOSURE.md).",
    )
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="<name>.json (<name>.note beside)")
    parser.add_argument("bundle", metavar="BUNDLE", help="the export bundle")
    parser.add_argument("--vkey", action="append", default=[], required=True, metavar="VKEY")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        report = verify_disclosure(args.snapshot, args.bundle, args.vkey)
    except DisclosureInputError as exc:
        print(f"custody-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print("\n".join(_text(report)))
    return EXIT_OK if report["ok"] else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())

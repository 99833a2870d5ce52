"""The versioned policy every decision is taken under: limits, thresholds, schedules, lists.

A policy is data. It lives in the platform's log (`platform_created` carries the first one,
`policy_set` records every later version, each approved by a checker) and every record names
the version it was decided under (`pv`). Version 0 is the built-in default below, chosen to be
safe rather than convenient: customer debits need the customer's signature, payouts go only to
the bound account, manual operations need a second person, fees only per schedule (empty).
Amounts are integer minor units; durations are milliseconds (`_ms`).
"""

from __future__ import annotations

from typing import Final

import msgspec

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
MAX_POLICY_ENTRIES: Final = 1024  # per table (limits, fee codes, blocklist, thresholds)
AMOUNT_CAP_MINOR: Final = 2**63 - 1

# Manual operations: whoever may start them (controls/roles.py), a different checker approves.
MANUAL_OPS: Final = frozenset(
    {
        "reverse",
        "set_policy",
        "set_gate",
        "top_up_shortfall",
        "unfreeze_account",
        "reset_key",
        "clear_suspense",  # a transfer out of suspense, after the receipt was identified
        "record_reconciliation",  # the checker signs the day's reconciliation off
        "settle_reconciliation",  # covering a shortfall or returning an excess
    }
)
# Manual operations whose approval no policy can switch off: otherwise one person could first
# remove the second pair of eyes and then act alone.
ALWAYS_APPROVED_OPS: Final = frozenset(
    {"set_policy", "set_gate", "reset_key", "record_reconciliation", "settle_reconciliation"}
)
# The platform gate from open to shut; the early-warning system may move it towards FROZEN
# without a checker when `auto_restrict` is on (tightening is safe; loosening never is).
GATE_ORDER: Final = ("NORMAL", "RESTRICTED", "WIND_DOWN", "FROZEN")
# Operations whose amount is compared with `approval_above_minor` when a platform asks for them.
LARGE_VALUE_OPS: Final = frozenset({"transfer", "place_hold", "request_withdrawal"})
# Customer-debiting operations that a customer must sign (or cover by a standing authorisation).
SIGNED_OPS: Final = frozenset({"transfer", "place_hold", "request_withdrawal"})


class Limit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per customer account and operation; 0 means 'no limit' for that figure."""

    per_txn_max_minor: int = 0
    daily_max_minor: int = 0
    daily_count_max: int = 0


class FeeRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A published fee: exactly `fixed_minor`, or anything from 1 up to `max_minor`."""

    fixed_minor: int = 0
    max_minor: int = 0


class LvtThresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Large-value reporting thresholds per customer per business day, one side at a time."""

    individual_minor: int
    corporate_minor: int


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: int = 0
    # customer authorisation (C04)
    # flags are 0/1: canonical record bytes carry integers only, never booleans
    require_customer_signature: int = 1
    auth_ttl_ms: int = 5 * 60_000
    auth_max_failures: int = 5
    auth_failure_window_ms: int = 15 * 60_000
    auth_lock_ms: int = 30 * 60_000
    standing_max_ms: int = 365 * DAY_MS
    # payout binding (C07)
    require_bound_payee: int = 1
    payout_cooloff_ms: int = 24 * HOUR_MS
    # holds discipline (C09)
    hold_max_ms: int = 30 * DAY_MS
    # maker-checker (C10)
    approval_ops: frozenset[str] = MANUAL_OPS
    approval_above_minor: int = 10_000_000  # movements at or above need a checker (0 = never)
    approval_ttl_ms: int = 24 * HOUR_MS
    # limits (C11): operation -> limit on customer accounts
    limits: dict[str, Limit] = msgspec.field(
        default_factory=lambda: {
            "request_withdrawal": Limit(
                per_txn_max_minor=5_000_000, daily_max_minor=20_000_000, daily_count_max=20
            ),
            "transfer": Limit(per_txn_max_minor=50_000_000, daily_max_minor=200_000_000),
        }
    )
    outflow_cap_bp: int = 2000  # platform daily net outflow <= 20% of day-start custody (0 = off)
    # fee schedule (C15): fee code -> rule; a fee not in it is refused
    fees: dict[str, FeeRule] = msgspec.field(default_factory=dict)
    # screening (C14): account ids and screening tokens of blocked parties
    blocklist: frozenset[str] = frozenset()
    # large-value tagging: currency -> thresholds (CNY: 500,000 / 2,000,000 yuan in fen)
    lvt: dict[str, LvtThresholds] = msgspec.field(
        default_factory=lambda: {
            "CNY": LvtThresholds(individual_minor=50_000_000, corporate_minor=200_000_000)
        }
    )
    lvt_due_working_days: int = 5
    # the business day starts at 00:00 in this UTC offset (China: +8 h)
    day_offset_ms: int = 8 * HOUR_MS
    # refusal records per actor per minute before further refusals are only counted
    refusal_records_per_min: int = 600
    # early warning: a RED alert may restrict the platform without a checker (0/1)
    auto_restrict: int = 1


DEFAULT_POLICY: Final = Policy()

_DURATION_FIELDS: Final = (
    "auth_ttl_ms",
    "auth_failure_window_ms",
    "auth_lock_ms",
    "standing_max_ms",
    "payout_cooloff_ms",
    "hold_max_ms",
    "approval_ttl_ms",
)
_KNOWN_OPS: Final = frozenset(
    {
        "transfer",
        "place_hold",
        "request_withdrawal",
        "charge_fee",
        *MANUAL_OPS,
    }
)


def policy_problem(policy: Policy) -> str | None:
    """Why a policy document is unusable, or None. Checked before a policy change is recorded."""
    if not 0 <= policy.version < 2**31:
        return "version out of range"
    for name in _DURATION_FIELDS:
        value = getattr(policy, name)
        if not 0 < value <= 10 * 365 * DAY_MS:
            return f"{name} must be in 1..10 years of milliseconds"
    for flag in (
        policy.require_customer_signature,
        policy.require_bound_payee,
        policy.auto_restrict,
    ):
        if flag not in (0, 1):
            return "flags are 0 or 1"
    if not 1 <= policy.auth_max_failures <= 1000:
        return "auth_max_failures must be in 1..1000"
    if not 0 <= policy.approval_above_minor <= AMOUNT_CAP_MINOR:
        return "approval_above_minor out of range"
    if not policy.approval_ops <= MANUAL_OPS:
        return f"approval_ops must be a subset of {sorted(MANUAL_OPS)}"
    if not 0 <= policy.outflow_cap_bp <= 10_000:
        return "outflow_cap_bp must be in 0..10000"
    if not 0 <= policy.lvt_due_working_days <= 60:
        return "lvt_due_working_days must be in 0..60"
    if not -14 * HOUR_MS <= policy.day_offset_ms <= 14 * HOUR_MS:
        return "day_offset_ms must be a UTC offset within +-14 h"
    if not 1 <= policy.refusal_records_per_min <= 1_000_000:
        return "refusal_records_per_min must be in 1..1000000"
    return _tables_problem(policy)


def _tables_problem(policy: Policy) -> str | None:
    for table in (policy.limits, policy.fees, policy.blocklist, policy.lvt):
        if len(table) > MAX_POLICY_ENTRIES:
            return f"a policy table holds at most {MAX_POLICY_ENTRIES} entries"
    for op, limit in policy.limits.items():
        if op not in _KNOWN_OPS:
            return f"limits: unknown operation {op!r}"
        for value in (limit.per_txn_max_minor, limit.daily_max_minor, limit.daily_count_max):
            if not 0 <= value <= AMOUNT_CAP_MINOR:
                return f"limits[{op}] out of range"
    for code, rule in policy.fees.items():
        if not 0 < len(code) <= 64:
            return "fee codes are 1..64 characters"
        if (rule.fixed_minor > 0) == (rule.max_minor > 0):
            return f"fees[{code}] needs exactly one of fixed_minor or max_minor"
        if not 0 <= max(rule.fixed_minor, rule.max_minor) <= AMOUNT_CAP_MINOR:
            return f"fees[{code}] out of range"
    for entry in policy.blocklist:
        if not 0 < len(entry) <= 128:
            return "blocklist entries are 1..128 characters"
    for ccy, lvt in policy.lvt.items():
        if not (0 < lvt.individual_minor <= AMOUNT_CAP_MINOR) or not (
            0 < lvt.corporate_minor <= AMOUNT_CAP_MINOR
        ):
            return f"lvt[{ccy}] thresholds must be positive"
    return None


_POLICY_DECODER: Final = msgspec.json.Decoder(Policy)
_ENCODER: Final = msgspec.json.Encoder(order="sorted")


def decode_policy(data: bytes | str) -> Policy:
    """Parse a policy document (JSON); raises msgspec.ValidationError / DecodeError."""
    policy: Policy = _POLICY_DECODER.decode(data)
    return policy


def encode_policy(policy: Policy) -> bytes:
    return _ENCODER.encode(policy)


def policy_from_record(doc: object) -> Policy:
    """The policy object a record carries (already canonical JSON, decoded to builtins)."""
    return msgspec.convert(doc, Policy)

"""The versioned rules document: every early-warning threshold and window, defaults in code.

The ledger's `Policy` governs what the writer refuses before a commit; this document governs
what the engine flags after it. A few figures come from the policy in force instead (LVT
thresholds, the business-day offset, the report due days, `auto_restrict`), read from the log's
`platform_created` / `policy_set` records so that the controls and the alerts agree. Amounts are
minor units, durations milliseconds, ratios basis points (1 bp = 0.01 %): no floats.
"""

from __future__ import annotations

from typing import Final

import msgspec

from controls.policy import DAY_MS, HOUR_MS

MINUTE_MS: Final = 60_000

RULES: Final = (
    "W01",  # RECON_SHORTFALL
    "W02",  # RECON_EXCESS
    "W03",  # RECON_LATE_OR_MISSING
    "W04",  # STATEMENT_CONTINUITY_BREAK
    "W05",  # UNMATCHED_ITEM_AGEING
    "W06",  # LVT_REPORT_DUE
    "W07",  # STRUCTURING
    "W08",  # RAPID_IN_OUT
    "W09",  # FAN_IN_FAN_OUT
    "W10",  # DORMANT_REACTIVATION
    "W12",  # ACCOUNT_TAKEOVER
    "W14",  # STALE_HOLDS
    "W15",  # SEGREGATION_ATTEMPT
    "W16",  # MAKER_CHECKER_ANOMALY
    "W17",  # INTEGRITY_FAILURE
    "W19",  # RUN_ON_PLATFORM
    "W23",  # REJECTION_SPIKE
)
RULE_NAMES: Final = {
    "W01": "RECON_SHORTFALL",
    "W02": "RECON_EXCESS",
    "W03": "RECON_LATE_OR_MISSING",
    "W04": "STATEMENT_CONTINUITY_BREAK",
    "W05": "UNMATCHED_ITEM_AGEING",
    "W06": "LVT_REPORT_DUE",
    "W07": "STRUCTURING",
    "W08": "RAPID_IN_OUT",
    "W09": "FAN_IN_FAN_OUT",
    "W10": "DORMANT_REACTIVATION",
    "W12": "ACCOUNT_TAKEOVER",
    "W14": "STALE_HOLDS",
    "W15": "SEGREGATION_ATTEMPT",
    "W16": "MAKER_CHECKER_ANOMALY",
    "W17": "INTEGRITY_FAILURE",
    "W19": "RUN_ON_PLATFORM",
    "W23": "REJECTION_SPIKE",
}


class _Doc(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Recon(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W01-W03: the daily internal reconciliation."""

    shortfall_red_bp: int = 10  # a shortfall above 0.1 % of the requirement is RED at once
    due_hour_ms: int = 10 * HOUR_MS  # reconciliation of day D is due by D+1 10:00 local
    missing_red_business_days: int = 2  # still missing this many business days after due: RED
    lookback_days: int = 31  # days checked backwards for a missing reconciliation


class Unmatched(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W05: unmatched bank or ledger items (from the reconciliation feed)."""

    yellow_business_days: int = 1
    orange_business_days: int = 3
    red_business_days: int = 5
    orange_amount_minor: int = 1_000_000
    red_amount_minor: int = 10_000_000


class Lvt(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W06: large-value report due (the tags' `due_ms`; closing the alert = report filed)."""

    orange_before_ms: int = DAY_MS  # ORANGE this long before the due time


class Structuring(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W07: amounts just under the LVT threshold, or a day's splits crossing it."""

    near_low_bp: int = 9000  # 90.00 % of the threshold ...
    near_high_bp: int = 9999  # ... up to 99.99 %
    near_count: int = 3
    near_window_ms: int = 7 * DAY_MS
    split_min_count: int = 3  # same-day transactions each below the threshold whose sum crosses it


class RapidInOut(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W08 (快进快出)."""

    out_share_bp: int = 8000  # >= 80 % of the inflows leave ...
    window_ms: int = 24 * HOUR_MS  # ... within 24 h
    min_inflow_minor: int = 5_000_000
    repeat_count: int = 2  # episodes ...
    repeat_window_ms: int = 30 * DAY_MS  # ... within 30 days


class Fan(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W09: many counterparties in and few out (or the inverse)."""

    min_distinct: int = 10
    max_other: int = 2
    window_ms: int = 72 * HOUR_MS
    purposes: frozenset[str] = frozenset({"transfer"})  # transfer purposes looked at


class Dormant(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W10: an account quiet for a year wakes up with money or many transactions."""

    dormant_ms: int = 365 * DAY_MS
    window_ms: int = 7 * DAY_MS
    min_amount_minor: int = 5_000_000
    min_count: int = 10


class Takeover(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W12 (盗号): a payout binding replaced, then a withdrawal; or many bad signatures."""

    window_ms: int = 24 * HOUR_MS
    auth_failures: int = 5
    auth_window_ms: int = 15 * MINUTE_MS


class StaleHolds(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W14 (冻结不释放): holds past their expiry, neither captured nor released."""

    grace_ms: int = HOUR_MS  # the expiry sweep runs every few minutes; allow it this long
    orange_business_days: int = 1
    red_business_days: int = 3
    red_customers: int = 100


class Segregation(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W15: refusals for segregation by a platform's credentials (见钱不摸钱)."""

    codes: frozenset[str] = frozenset({"SEGREGATION_BREACH", "FLOW_NOT_ALLOWED"})
    red_count: int = 3
    window_ms: int = 24 * HOUR_MS


class MakerChecker(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W16: rubber-stamping and friction in the four-eyes principle."""

    window_ms: int = 30 * DAY_MS
    pair_share_bp: int = 8000  # one maker-checker pair has > 80 % of the approvals ...
    pair_min_approvals: int = 10  # ... out of at least this many
    near_expiry_ms: int = 10 * MINUTE_MS  # approved within 10 min of the request's expiry ...
    near_expiry_count: int = 3  # ... this often in the window
    rejections: int = 5  # a maker's requests rejected this often in the window


class Integrity(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W17: the stored chain is verified again on this schedule (always RED on failure)."""

    verify_interval_ms: int = HOUR_MS


class Run(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W19: net customer outflow over 24 h as a share of the custody balance."""

    window_ms: int = 24 * HOUR_MS
    orange_bp: int = 1000  # 10 %
    red_bp: int = 2000  # 20 %
    min_balance_minor: int = 1_000_000  # below this the share means nothing


class Refusals(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """W23: refusals in the current hour above mean + 3 sigma of the last 7 days' hours."""

    baseline_hours: int = 168
    sigmas: int = 3
    min_count: int = 20
    orange_codes: frozenset[str] = frozenset(
        {
            "BLOCKED",
            "AUTHORISATION_REQUIRED",
            "AUTHORISATION_INVALID",
            "AUTHORISATION_EXPIRED",
            "AUTHORISATION_LOCKED",
            "REPLAYED",
        }
    )


class RuleSet(_Doc, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The rules document. `version` is cited in every alert's summary (`rules vN`)."""

    version: int = 1
    enabled: frozenset[str] = frozenset(RULES)
    # business days: Monday..Friday in the policy's UTC offset, minus these (YYYY-MM-DD)
    holidays: frozenset[str] = frozenset()
    recon: Recon = Recon()
    unmatched: Unmatched = Unmatched()
    lvt: Lvt = Lvt()
    structuring: Structuring = Structuring()
    rapid: RapidInOut = RapidInOut()
    fan: Fan = Fan()
    dormant: Dormant = Dormant()
    takeover: Takeover = Takeover()
    stale_holds: StaleHolds = StaleHolds()
    segregation: Segregation = Segregation()
    maker_checker: MakerChecker = MakerChecker()
    integrity: Integrity = Integrity()
    run: Run = Run()
    refusals: Refusals = Refusals()


DEFAULT_RULES: Final = RuleSet()
_DECODER: Final = msgspec.json.Decoder(RuleSet)
_ENCODER: Final = msgspec.json.Encoder(order="sorted")


def ruleset_problem(rules: RuleSet) -> str | None:
    """Why a rules document is unusable, or None."""
    if not 1 <= rules.version < 2**31:
        return "version must be in 1..2^31-1"
    unknown = rules.enabled - set(RULES)
    if unknown:
        return f"unknown rules enabled: {sorted(unknown)}"
    for section in msgspec.structs.asdict(rules).values():
        if isinstance(section, _Doc):
            for name, value in msgspec.structs.asdict(section).items():
                if isinstance(value, int) and not 0 <= value <= 2**62:
                    return f"{type(section).__name__}.{name} out of range"
    for bp in (rules.structuring.near_low_bp, rules.structuring.near_high_bp, rules.run.red_bp):
        if not 0 < bp <= 10_000:
            return "ratios are 1..10000 basis points"
    if rules.structuring.near_low_bp > rules.structuring.near_high_bp:
        return "structuring.near_low_bp must not exceed near_high_bp"
    if rules.run.orange_bp > rules.run.red_bp:
        return "run.orange_bp must not exceed red_bp"
    return None


def decode_rules(data: bytes | str) -> RuleSet:
    """Parse and check a rules document (JSON); raises ValueError when it is unusable."""
    try:
        rules = _DECODER.decode(data)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"rules document: {exc}") from exc
    problem = ruleset_problem(rules)
    if problem is not None:
        raise ValueError(f"rules document: {problem}")
    return rules


def encode_rules(rules: RuleSet) -> bytes:
    return _ENCODER.encode(rules)

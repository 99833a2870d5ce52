"""Large-value tagging (never refuses): a movement that brings a customer's one-sided total for
the business day (money in, or money out, counted apart) to the reporting threshold of the
policy (by currency and holder type) is tagged with a report due date. Every later movement on
the same side that day is tagged too: the report covers the day's total.
"""

from __future__ import annotations

from typing import Any, Final

from controls.base import Control, LedgerView, Policy, Proposal
from controls.policy import DAY_MS

NAME = "large_value"
TAG: Final = "LVT"


def due_ms(day: int, working_days: int, day_offset_ms: int) -> int:
    """The last millisecond of the n-th working day (Mon-Fri) after business day `day` (days
    since 1970-01-01 in the policy's UTC offset)."""
    left = working_days
    while left > 0:
        day += 1
        if (day + 3) % 7 < 5:  # 1970-01-01 was a Thursday (3, with Monday = 0)
            left -= 1
    return (day + 1) * DAY_MS - day_offset_ms - 1


def _threshold(account: Any, policy: Policy) -> int | None:
    thresholds = policy.lvt.get(account.currency)
    if thresholds is None:
        return None
    if account.holder_type == "corporate":
        return thresholds.corporate_minor
    return thresholds.individual_minor


def annotate(state: LedgerView, proposal: Proposal, policy: Policy) -> list[dict[str, Any]] | None:
    tags: list[dict[str, Any]] | None = None
    seen: dict[tuple[str, str], int] = {}  # running totals when one record posts several legs
    accounts = state.accounts
    day_lvt = state.day_lvt
    for debit_id, credit_id, amount in proposal.entries:
        for account_id, side in ((debit_id, "out"), (credit_id, "in")):
            account = accounts.get(account_id)
            if account is None or account.kind != "customer":
                continue
            key = (account_id, side)
            total = seen.get(key) or day_lvt.get(key, 0)
            total += amount
            seen[key] = total
            threshold = _threshold(account, policy)
            if threshold is not None and total >= threshold:
                tag = {
                    "tag": TAG,
                    "account": account_id,
                    "side": side,
                    "day_total_minor": total,
                    "due_ms": due_ms(state.day, policy.lvt_due_working_days, policy.day_offset_ms),
                }
                tags = [*tags, tag] if tags else [tag]
    return tags


CONTROL = Control(name=NAME, priority=1000, ops=None, annotate=annotate)

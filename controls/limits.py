"""Limits (C11): per-transaction, daily amount and daily count per customer account and
operation, and the platform's daily net outflow cap (a run on the platform is slowed to what
the custodian can watch). Days are business days in the policy's UTC offset.
"""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "limits"


def _refuse(message: str) -> Refusal:
    return Refusal(Code.LIMIT_EXCEEDED, NAME, message)


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    debit_id = proposal.debit_account()
    account = state.accounts.get(debit_id or "")
    if account is None or account.kind != "customer":
        return None
    amount = proposal.cmd.amount_minor
    limit = policy.limits.get(proposal.op)
    if limit is not None:
        if limit.per_txn_max_minor and amount > limit.per_txn_max_minor:
            return _refuse(f"{proposal.op} limit per transaction is {limit.per_txn_max_minor}")
        total, count = state.day_counters.get((account.id, proposal.op), (0, 0))
        if limit.daily_max_minor and total + amount > limit.daily_max_minor:
            return _refuse(f"daily {proposal.op} limit {limit.daily_max_minor}, used {total}")
        if limit.daily_count_max and count + 1 > limit.daily_count_max:
            return _refuse(f"at most {limit.daily_count_max} {proposal.op} a day")
    if proposal.op == "request_withdrawal" and policy.outflow_cap_bp:
        ccy = account.currency
        cap = state.day_start_custody.get(ccy, 0) * policy.outflow_cap_bp // 10_000
        if state.day_outflow.get(ccy, 0) + amount > cap:
            return _refuse("the platform's daily net outflow cap is reached")
    return None


CONTROL = Control(
    name=NAME,
    priority=70,
    ops=frozenset({"transfer", "place_hold", "request_withdrawal", "charge_fee"}),
    check=check,
)

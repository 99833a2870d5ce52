"""Segregation (C01): customer money and platform money never mix, except by whitelisted flows.

Customer money is what customer and suspense accounts hold (mirrored by the omnibus bank
account); platform money is own funds and fee income (mirrored by the platform's bank account).
The only flows across that line are a fee per the published schedule (customer -> fee income)
and a shortfall top-up (own funds -> customer money), and reversals of exactly those. Anything
else is SEGREGATION_BREACH, whatever the flow table says: this control runs before it.
"""

from __future__ import annotations

from typing import Final

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "segregation"
CUSTOMER_SIDE: Final = frozenset({"customer", "suspense", "omnibus"})
PLATFORM_SIDE: Final = frozenset({"own_funds", "fee_income", "platform_bank"})
# (operation, debit side, credit side) that may cross the line
_CROSSING: Final = frozenset(
    {
        ("charge_fee", "customer", "platform"),
        ("top_up_shortfall", "platform", "customer"),
        ("reverse", "platform", "customer"),  # refund of a fee
        ("reverse", "customer", "platform"),  # undoing a top-up (maker-checker)
    }
)


def _side(kind: str) -> str | None:
    if kind in CUSTOMER_SIDE:
        return "customer"
    if kind in PLATFORM_SIDE:
        return "platform"
    return None


def _refuse(message: str) -> Refusal:
    return Refusal(Code.SEGREGATION_BREACH, NAME, message)


def _leg_refusal(state: LedgerView, op: str, debit_id: str, credit_id: str) -> Refusal | None:
    accounts = state.accounts
    debit = accounts.get(debit_id)
    credit = accounts.get(credit_id)
    if debit is None or credit is None:
        return None  # integrity reports unknown accounts
    debit_side, credit_side = _side(debit.kind), _side(credit.kind)
    if debit_side == credit_side or (op, debit_side, credit_side) in _CROSSING:
        return None
    return _refuse(f"{op} may not move {debit_side} money to {credit_side} money")


def _fee_refusal(proposal: Proposal, policy: Policy) -> Refusal | None:
    cmd = proposal.cmd
    rule = policy.fees.get(cmd.fee_code)
    amount = cmd.amount_minor
    if type(amount) is not int or amount < 1:
        return None  # integrity reports a malformed amount with its own code
    if rule is None:
        return Refusal(Code.FEE_NOT_IN_SCHEDULE, NAME, f"fee {cmd.fee_code!r} is not published")
    if rule.fixed_minor and amount != rule.fixed_minor:
        return Refusal(
            Code.FEE_NOT_IN_SCHEDULE, NAME, f"fee {cmd.fee_code!r} is {rule.fixed_minor}"
        )
    if rule.max_minor and amount > rule.max_minor:
        return Refusal(
            Code.FEE_NOT_IN_SCHEDULE, NAME, f"fee {cmd.fee_code!r} is at most {rule.max_minor}"
        )
    return None


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    op = proposal.op
    for debit_id, credit_id, _ in proposal.entries:
        refusal = _leg_refusal(state, op, debit_id, credit_id)
        if refusal is not None:
            return refusal
    if proposal.hold is not None:
        refusal = _leg_refusal(state, op, proposal.hold[0], proposal.hold[1])
        if refusal is not None:
            return refusal
    if op == "charge_fee":
        return _fee_refusal(proposal, policy)
    return None


CONTROL = Control(name=NAME, priority=8, ops=None, check=check)

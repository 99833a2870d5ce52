"""Integrity: amounts in range, accounts known, one currency, distinct sides, permitted flow."""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code
from controls.flows import ALLOWED_FLOWS, FROM_RESERVATION_OPS

NAME = "integrity"
AMOUNT_MAX_MINOR = 2**63 - 1


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, NAME, message)


def _check_leg(
    state: LedgerView, op: str, currency: str | None, debit_id: str, credit_id: str, amount: int
) -> Refusal | None:
    if type(amount) is not int or not 1 <= amount <= AMOUNT_MAX_MINOR:
        return _refuse(Code.INVALID_AMOUNT, "amount_minor must be an integer in 1..2^63-1")
    if debit_id == credit_id:
        return _refuse(Code.SAME_ACCOUNT, "debit and credit account are the same")
    accounts = state.accounts
    debit = accounts.get(debit_id)
    if debit is None:
        return _refuse(Code.ACCOUNT_NOT_FOUND, f"account {debit_id!r} not found")
    credit = accounts.get(credit_id)
    if credit is None:
        return _refuse(Code.ACCOUNT_NOT_FOUND, f"account {credit_id!r} not found")
    if debit.currency != credit.currency or (currency is not None and debit.currency != currency):
        return _refuse(Code.CURRENCY_MISMATCH, "accounts and instruction differ in currency")
    allowed = ALLOWED_FLOWS.get(op)
    if allowed is None and op not in FROM_RESERVATION_OPS:
        return _refuse(Code.FLOW_NOT_ALLOWED, f"{op} does not move money")
    if allowed is not None and (debit.kind, credit.kind) not in allowed:
        return _refuse(
            Code.FLOW_NOT_ALLOWED, f"{op} may not move money from {debit.kind} to {credit.kind}"
        )
    if credit.credits_posted_minor + amount > AMOUNT_MAX_MINOR:
        return _refuse(Code.AMOUNT_OVERFLOW, "the credit account's total would overflow")
    if debit.debits_posted_minor + amount > AMOUNT_MAX_MINOR:
        return _refuse(Code.AMOUNT_OVERFLOW, "the debit account's total would overflow")
    totals = state.totals_by_currency.get(debit.currency)
    if totals is not None and totals[0] + amount > AMOUNT_MAX_MINOR:
        return _refuse(Code.AMOUNT_OVERFLOW, f"the {debit.currency} ledger total would overflow")
    return None


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    entries = proposal.entries
    for debit_id, credit_id, amount in entries:
        refusal = _check_leg(state, proposal.op, proposal.currency, debit_id, credit_id, amount)
        if refusal is not None:
            return refusal
    if len(entries) > 1:
        return _check_sums(state, entries)
    if proposal.hold is not None:
        debit_id, credit_id, amount = proposal.hold
        return _check_leg(state, proposal.op, proposal.currency, debit_id, credit_id, amount)
    return None


def _check_sums(state: LedgerView, entries: tuple[tuple[str, str, int], ...]) -> Refusal | None:
    """Several postings in one record: their sums must fit too, not just each one alone."""
    extra_debits: dict[str, int] = {}
    extra_credits: dict[str, int] = {}
    by_currency: dict[str, int] = {}
    accounts = state.accounts
    for debit_id, credit_id, amount in entries:
        extra_debits[debit_id] = extra_debits.get(debit_id, 0) + amount
        extra_credits[credit_id] = extra_credits.get(credit_id, 0) + amount
        currency = accounts[debit_id].currency
        by_currency[currency] = by_currency.get(currency, 0) + amount
    for account_id, extra in extra_debits.items():
        if accounts[account_id].debits_posted_minor + extra > AMOUNT_MAX_MINOR:
            return _refuse(Code.AMOUNT_OVERFLOW, "an account's total would overflow")
    for account_id, extra in extra_credits.items():
        if accounts[account_id].credits_posted_minor + extra > AMOUNT_MAX_MINOR:
            return _refuse(Code.AMOUNT_OVERFLOW, "an account's total would overflow")
    for currency, extra in by_currency.items():
        totals = state.totals_by_currency.get(currency, [0, 0])
        if totals[0] + extra > AMOUNT_MAX_MINOR:
            return _refuse(Code.AMOUNT_OVERFLOW, f"the {currency} ledger total would overflow")
    return None


CONTROL = Control(name=NAME, priority=10, ops=None, check=check)

"""Payout binding (C07, 同名账户提现): customer money leaves only to the customer's own, bound
bank account. The binding is signed by the customer (customer_authorisation), its holder name
must match the account holder (compared as keyed blinds, never in clear), and after a binding
replaces an earlier one, payouts wait out a cool-off: a stolen session that rebinds cannot pay
itself out before the customer notices.
"""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "payout_binding"


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, NAME, message)


def _withdrawal_refusal(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    account = state.accounts.get(proposal.cmd.account_id)
    if account is None or account.kind != "customer" or not policy.require_bound_payee:
        return None
    if not account.payee_ref or proposal.cmd.payee_ref != account.payee_ref:
        return _refuse(Code.PAYEE_NOT_BOUND, "payouts go only to the customer's bound account")
    if account.payee_replaced and proposal.ts < account.payee_bound_ms + policy.payout_cooloff_ms:
        until = account.payee_bound_ms + policy.payout_cooloff_ms
        return _refuse(Code.PAYOUT_COOLOFF, f"the payout account changed; payouts from {until}")
    return None


def _binding_refusal(state: LedgerView, proposal: Proposal) -> Refusal | None:
    account = state.accounts.get(proposal.cmd.account_id)
    if account is None:
        return _refuse(Code.ACCOUNT_NOT_FOUND, f"account {proposal.cmd.account_id!r} not found")
    if account.kind != "customer":
        return _refuse(Code.PAYEE_NOT_BOUND, "only customer accounts bind payout accounts")
    if account.holder_blind is None or proposal.cmd.holder_name != account.holder_blind:
        return _refuse(Code.PAYEE_NAME_MISMATCH, "the bank account holder is not the customer")
    return None


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    if proposal.op == "request_withdrawal":
        return _withdrawal_refusal(state, proposal, policy)
    return _binding_refusal(state, proposal)


CONTROL = Control(
    name=NAME, priority=45, ops=frozenset({"request_withdrawal", "bind_payee"}), check=check
)

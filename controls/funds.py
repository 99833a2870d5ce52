"""Available funds: customer, own-funds, fee and suspense accounts never go below zero."""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "available_funds"
# Captures and settlements consume money that a hold already reserved; they cannot overdraw.
_RESERVED_OPS = frozenset(
    {"capture_hold", "settle_withdrawal", "release_hold", "fail_withdrawal", "expire_holds"}
)


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    if proposal.op in _RESERVED_OPS:
        return None
    entries = proposal.entries
    if proposal.hold is None and len(entries) == 1:  # the hot path: one debit, no dict
        debit_id, _, amount = entries[0]
        account = state.accounts[debit_id]
        if account.must_not_go_negative and account.available_minor < amount:
            return Refusal(Code.INSUFFICIENT_FUNDS, NAME, f"insufficient funds in {debit_id!r}")
        return None
    legs = list(entries)
    if proposal.hold is not None:
        legs.append(proposal.hold)
    needed: dict[str, int] = {}
    for debit_id, _, amount in legs:
        needed[debit_id] = needed.get(debit_id, 0) + amount
    for debit_id, amount in needed.items():
        account = state.accounts[debit_id]
        if account.must_not_go_negative and account.available_minor < amount:
            return Refusal(Code.INSUFFICIENT_FUNDS, NAME, f"insufficient funds in {debit_id!r}")
    return None


CONTROL = Control(name=NAME, priority=20, ops=None, check=check)

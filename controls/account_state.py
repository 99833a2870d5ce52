"""Account state: no movement touches a frozen or closed account; close only when settled."""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "account_state"
# Operations that end a reservation made before the freeze may run on a frozen account: a
# freeze stops NEW money leaving; it must not trap funds the bank already returned (fail,
# release, expiry), nor deny a payout the bank already made (settlement records a fact).
_RETURNING_OPS = frozenset({"release_hold", "fail_withdrawal", "expire_holds", "settle_withdrawal"})


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, NAME, message)


def _status_refusal(state: LedgerView, account_id: str, op: str) -> Refusal | None:
    account = state.accounts.get(account_id)
    if account is None:
        return None  # integrity reports unknown accounts
    if account.status == "closed":
        return _refuse(Code.ACCOUNT_CLOSED, f"account {account_id!r} is closed")
    if account.status == "frozen" and op not in _RETURNING_OPS:
        return _refuse(Code.ACCOUNT_FROZEN, f"account {account_id!r} is frozen")
    return None


def _lifecycle_refusal(state: LedgerView, proposal: Proposal) -> Refusal | None:
    account = state.accounts.get(proposal.subject or "")
    if account is None:
        return _refuse(Code.ACCOUNT_NOT_FOUND, f"account {proposal.subject!r} not found")
    if account.status == "closed":
        return _refuse(Code.ACCOUNT_CLOSED, f"account {account.id!r} is closed")
    op = proposal.op
    if op == "freeze_account" and account.status == "frozen":
        return _refuse(Code.ACCOUNT_FROZEN, f"account {account.id!r} is already frozen")
    if op == "unfreeze_account" and account.status != "frozen":
        return _refuse(Code.ACCOUNT_NOT_FROZEN, f"account {account.id!r} is not frozen")
    if op == "close_account" and account.has_activity_outstanding():
        return _refuse(Code.ACCOUNT_NOT_EMPTY, "an account closes only at zero with no holds")
    return None


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    if proposal.subject is not None:
        return _lifecycle_refusal(state, proposal)
    op = proposal.op
    for debit_id, credit_id, _ in proposal.entries:
        refusal = _status_refusal(state, debit_id, op) or _status_refusal(state, credit_id, op)
        if refusal is not None:
            return refusal
    if proposal.hold is not None:
        debit_id, credit_id, _ = proposal.hold
        return _status_refusal(state, debit_id, op) or _status_refusal(state, credit_id, op)
    return None


CONTROL = Control(name=NAME, priority=30, ops=None, check=check)

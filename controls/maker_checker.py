"""Maker-checker (C10, 四眼原则): manual operations, policy and gate changes, and movements at or
above the approval threshold are not executed when asked: they become a pending request that a
different person with the checker role approves (executing it, after every other control runs
again on the state of that moment) or rejects. Requests expire.

`needs_approval` is asked by the writer after every control accepted the proposal; `check`
guards approve/reject themselves.
"""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code
from controls.policy import ALWAYS_APPROVED_OPS, GATE_ORDER, LARGE_VALUE_OPS

NAME = "maker_checker"


def manual_op(state: LedgerView, proposal: Proposal) -> str:
    """The operation as maker-checker names it: a transfer out of suspense is 'clear_suspense'."""
    if proposal.op == "transfer":
        debit = state.accounts.get(proposal.debit_account() or "")
        if debit is not None and debit.kind == "suspense":
            return "clear_suspense"
    return proposal.op


def _automatic_restriction(state: LedgerView, proposal: Proposal, policy: Policy) -> bool:
    """Early warning (the system role) may tighten the gate at once, if policy allows."""
    if proposal.op != "set_gate" or proposal.role != "system" or not policy.auto_restrict:
        return False
    return GATE_ORDER.index(proposal.cmd.gate) > GATE_ORDER.index(state.gate)


def needs_approval(state: LedgerView, proposal: Proposal, policy: Policy) -> str | None:
    """Why this proposal needs a checker, or None to execute it now."""
    if proposal.executing:
        return None
    if _automatic_restriction(state, proposal, policy):
        return None
    op = manual_op(state, proposal)
    if op in ALWAYS_APPROVED_OPS or op in policy.approval_ops:
        return f"{op} is a manual operation"
    threshold = policy.approval_above_minor
    if threshold and proposal.op in LARGE_VALUE_OPS and proposal.cmd.amount_minor >= threshold:
        return f"{proposal.op} of {proposal.cmd.amount_minor} reaches the approval threshold"
    return None


def _person(actor: str) -> str:
    """`operator:alice` and `checker:alice` are the same person."""
    return actor.partition(":")[2]


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, NAME, message)


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    request = proposal.request
    if request is None:
        return _refuse(Code.APPROVAL_NOT_FOUND, f"no request {proposal.cmd.request_id!r}")
    if request.status != "pending":
        return _refuse(Code.APPROVAL_NOT_PENDING, f"request {request.id!r} is {request.status}")
    if _person(request.maker) == _person(proposal.actor):
        # one person may hold an operator and a checker identity: compare who, not the role
        return _refuse(Code.SELF_APPROVAL, "the maker of a request cannot also check it")
    if proposal.op == "approve_request" and request.expires_at_ms < proposal.ts:
        return _refuse(Code.APPROVAL_EXPIRED, f"request {request.id!r} expired")
    return None


CONTROL = Control(
    name=NAME, priority=60, ops=frozenset({"approve_request", "reject_request"}), check=check
)

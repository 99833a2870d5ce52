"""Platform gate (C16): the circuit breaker of a platform in trouble.

NORMAL: everything the other controls allow. RESTRICTED: no new business (no new accounts,
bids, disbursements, fees, new holds or standing authorisations); customers can still take
their money out and borrowers repay. WIND_DOWN: as RESTRICTED, for a platform that is closing.
FROZEN (judicial): only bank facts are recorded (deposits, settlements, failed payouts), and
the expiry sweep runs; nothing else moves. Governance (gate, policy, approvals, freezes) always
runs, so the gate can be lifted.
"""

from __future__ import annotations

from typing import Final

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "platform_gate"
# transfer purposes that are not new business: money flowing back to customers
_WIND_DOWN_PURPOSES: Final = frozenset({"repayment", "compensation", "clearing"})
_NEW_BUSINESS: Final = frozenset(
    {
        "open_account",
        "place_hold",
        "capture_hold",
        "charge_fee",
        "grant_standing",
    }
)
_FROZEN_ALLOWED: Final = frozenset(
    {"deposit", "settle_withdrawal", "fail_withdrawal", "expire_holds", "freeze_account"}
)
GOVERNANCE_OPS: Final = frozenset(
    {
        "set_gate",
        "set_policy",
        "approve_request",
        "reject_request",
        "create_platform",
        "freeze_account",
        "publish_liabilities",  # disclosure matters most when a platform is in trouble
        "record_reconciliation",
        "settle_reconciliation",
        "raise_alert",
        "acknowledge_alert",
        "close_alert",
    }
)


def _refuse(gate: str, op: str) -> Refusal:
    return Refusal(Code.PLATFORM_RESTRICTED, NAME, f"the platform is {gate}: {op} is not allowed")


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    gate = state.gate
    if gate == "NORMAL":
        return None
    op = proposal.op
    if op in GOVERNANCE_OPS:
        return None
    if gate == "FROZEN":
        return None if op in _FROZEN_ALLOWED else _refuse(gate, op)
    if op in _NEW_BUSINESS:
        return _refuse(gate, op)
    if op == "transfer" and proposal.cmd.purpose not in _WIND_DOWN_PURPOSES:
        debit = state.accounts.get(proposal.debit_account() or "")
        if debit is None or debit.kind != "suspense":
            return _refuse(gate, f"a {proposal.cmd.purpose} transfer")
    return None


CONTROL = Control(name=NAME, priority=90, ops=None, check=check)

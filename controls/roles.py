"""Roles: who may start which operation (BRIEF §7, domain catalogue §6.7).

The API already routes each caller to the methods its role may call; this control repeats the
rule inside the ledger, so that the log itself proves no role acted beyond its rights. The actor
recorded with every instruction is `<role>:<name>`.
"""

from __future__ import annotations

from typing import Final

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "roles"
ROLES: Final = frozenset({"platform", "operator", "checker", "auditor", "regulator", "system"})

_MOVEMENTS: Final = frozenset(
    {
        "deposit",
        "transfer",
        "charge_fee",
        "top_up_shortfall",
        "place_hold",
        "capture_hold",
        "release_hold",
        "expire_holds",
        "request_withdrawal",
        "settle_withdrawal",
        "fail_withdrawal",
    }
)
ALLOWED: Final[dict[str, frozenset[str]]] = {
    # the platform relays its customers' instructions; it never runs manual operations
    "platform": _MOVEMENTS
    | {
        "open_account",
        "freeze_account",
        "close_account",
        "register_key",
        "bind_payee",
        "grant_standing",
        "revoke_standing",
        "acknowledge_alert",
        "close_alert",
    },
    # the custodian's operator makes manual operations (most need a checker, see maker_checker)
    # and records bank facts; it never moves customer money on a customer's behalf
    "operator": frozenset(
        {
            "create_platform",
            "open_account",
            "freeze_account",
            "unfreeze_account",
            "close_account",
            "deposit",
            "transfer",  # suspense clearing only, see below
            "top_up_shortfall",
            "expire_holds",
            "settle_withdrawal",
            "fail_withdrawal",
            "reverse",
            "set_policy",
            "set_gate",
            "reset_key",
            "publish_liabilities",
            "record_reconciliation",
            "settle_reconciliation",
            "raise_alert",
            "acknowledge_alert",
            "close_alert",
        }
    ),
    "checker": frozenset({"approve_request", "reject_request", "acknowledge_alert", "close_alert"}),
    "system": frozenset({"expire_holds", "raise_alert", "set_gate"}),
    "auditor": frozenset(),
    "regulator": frozenset(),
}


def role_of(actor: str) -> str:
    """The role prefix of an authenticated actor (`platform:acme` -> `platform`)."""
    role = actor.partition(":")[0]
    assert role in ROLES, f"actor {actor!r} has no known role"
    return role


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, NAME, message)


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    if proposal.executing:
        return None  # the maker's role was checked when the request was made
    role = proposal.role
    op = proposal.op
    if op not in ALLOWED.get(role, frozenset()):
        if op in ("approve_request", "reject_request"):
            return _refuse(Code.CHECKER_ROLE_REQUIRED, "only a checker approves or rejects")
        return _refuse(Code.ROLE_NOT_PERMITTED, f"role {role!r} may not {op}")
    if op == "transfer":
        return _transfer_refusal(state, proposal, role)
    return None


def _transfer_refusal(state: LedgerView, proposal: Proposal, role: str) -> Refusal | None:
    """Suspense clearing is manual (operator, with a checker); nothing else is."""
    debit_id = proposal.debit_account()
    debit = state.accounts.get(debit_id or "")
    from_suspense = debit is not None and debit.kind == "suspense"
    if from_suspense and role != "operator":
        return _refuse(Code.ROLE_NOT_PERMITTED, "suspense clearing is a custodian operation")
    if not from_suspense and role != "platform":
        return _refuse(Code.ROLE_NOT_PERMITTED, f"role {role!r} may not move customer money")
    return None


CONTROL = Control(name=NAME, priority=5, ops=None, check=check)

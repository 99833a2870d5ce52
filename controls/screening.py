"""Screening (C14): no movement touches a blocked party. The blocklist holds account ids and
screening tokens (keyed hashes of names and bank accounts, never the names themselves), and
the refusal says only that the instruction cannot be processed: it must not tip anyone off
about what is on the list or which entry matched.
"""

from __future__ import annotations

from typing import Final

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "screening"
GENERIC_MESSAGE: Final = "the instruction cannot be processed"


def _blocked(state: LedgerView, account_id: str, blocklist: frozenset[str]) -> bool:
    if account_id in blocklist:
        return True
    account = state.accounts.get(account_id)
    return account is not None and any(t in blocklist for t in account.tokens)


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    blocklist = policy.blocklist
    if not blocklist:
        return None
    parties: list[str] = []
    for debit_id, credit_id, _ in proposal.entries:
        parties += (debit_id, credit_id)
    if proposal.hold is not None:
        parties += proposal.hold[:2]
    if proposal.subject is not None:
        parties.append(proposal.subject)
    account_id = getattr(proposal.cmd, "account_id", None)
    if isinstance(account_id, str):
        parties.append(account_id)
    if any(_blocked(state, p, blocklist) for p in parties) or any(
        t in blocklist for t in proposal.tokens
    ):
        return Refusal(Code.BLOCKED, NAME, GENERIC_MESSAGE)
    return None


# New business only: money returning (releases, failed payouts), bank facts (deposits,
# settlements) and protective steps (freezing) must still run for a blocked party.
SCREENED_OPS: Final = frozenset(
    {
        "open_account",
        "transfer",
        "charge_fee",
        "place_hold",
        "capture_hold",
        "request_withdrawal",
        "bind_payee",
        "grant_standing",
        "register_key",
        "unfreeze_account",
    }
)
CONTROL = Control(name=NAME, priority=80, ops=SCREENED_OPS, check=check)

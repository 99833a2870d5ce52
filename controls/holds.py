"""Holds discipline (C09): every hold has a reason and a bounded expiry; capture and release
come only from the holder of the owning reference. (Capture above the held amount, expired
holds and unknown holds are refused while planning: HOLD_EXCEEDED, HOLD_EXPIRED,
HOLD_NOT_FOUND; the sweep `expire_holds` releases what nobody resolved.)
"""

from __future__ import annotations

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "holds"
_NEW = frozenset({"place_hold", "request_withdrawal"})


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    if proposal.op in _NEW:
        if proposal.cmd.expires_at_ms - proposal.ts > policy.hold_max_ms:
            return Refusal(
                Code.HOLD_EXPIRY_INVALID,
                NAME,
                f"a hold may last at most {policy.hold_max_ms} ms",
            )
        return None
    hold = proposal.resolving
    if hold is not None and hold.owner_ref and proposal.cmd.owner_ref != hold.owner_ref:
        return Refusal(Code.HOLD_REFERENCE_INVALID, NAME, "the owning reference does not match")
    return None


CONTROL = Control(
    name=NAME,
    priority=50,
    ops=frozenset({"place_hold", "request_withdrawal", "capture_hold", "release_hold"}),
    check=check,
)

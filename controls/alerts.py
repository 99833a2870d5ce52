"""Alert lifecycle (custody-domain §6.7): who may acknowledge or close an alert of which level.

A platform handles its own YELLOW (and GREEN) alerts; a custodian operator acknowledges any
alert and closes YELLOW ones; only a checker closes ORANGE and RED alerts. The early-warning
system may only raise alerts (roles control); nobody reopens a closed one.
"""

from __future__ import annotations

from typing import Final

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code

NAME = "alerts"
_LOW: Final = frozenset({"GREEN", "YELLOW"})
# (role, operation) -> levels it may act on
_MAY: Final[dict[tuple[str, str], frozenset[str]]] = {
    ("platform", "acknowledge_alert"): _LOW,
    ("platform", "close_alert"): _LOW,
    ("operator", "acknowledge_alert"): frozenset({"GREEN", "YELLOW", "ORANGE", "RED"}),
    ("operator", "close_alert"): _LOW,
    ("checker", "acknowledge_alert"): frozenset({"GREEN", "YELLOW", "ORANGE", "RED"}),
    ("checker", "close_alert"): frozenset({"GREEN", "YELLOW", "ORANGE", "RED"}),
}


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    alert = proposal.request
    allowed = _MAY.get((proposal.role, proposal.op), frozenset())
    if alert.level not in allowed:
        return Refusal(
            Code.ALERT_LEVEL_FORBIDDEN,
            NAME,
            f"role {proposal.role!r} may not {proposal.op.split('_')[0]} a {alert.level} alert",
        )
    return None


CONTROL = Control(
    name=NAME, priority=62, ops=frozenset({"acknowledge_alert", "close_alert"}), check=check
)

"""Which account kinds each operation may move money between (debit kind -> credit kind).

This is the structural shape of custody. The segregation control (a later module) explains the
customer-money/platform-money breaches with its own code; here anything outside the table is
FLOW_NOT_ALLOWED, and an operation missing from the table moves no money at all.
"""

from __future__ import annotations

from typing import Final

CUST, SUSP, OWN, FEE, OMNI, PBANK = (
    "customer",
    "suspense",
    "own_funds",
    "fee_income",
    "omnibus",
    "platform_bank",
)

ALLOWED_FLOWS: Final[dict[str, frozenset[tuple[str, str]]]] = {
    "deposit": frozenset({(OMNI, CUST), (OMNI, SUSP), (PBANK, OWN)}),
    "transfer": frozenset({(CUST, CUST), (SUSP, CUST)}),
    "charge_fee": frozenset({(CUST, FEE)}),
    "top_up_shortfall": frozenset({(OWN, CUST), (OWN, SUSP)}),
    "place_hold": frozenset({(CUST, CUST)}),  # fees are charged per schedule, never held
    "request_withdrawal": frozenset({(CUST, OMNI), (OWN, PBANK), (FEE, PBANK)}),
    # the platform covers a shortfall from its own bank (own -> pbank) or takes back an excess
    "settle_reconciliation": frozenset({(OWN, PBANK), (PBANK, OWN)}),
}
# A reversal posts the mirror image of a deposit, transfer, fee, top-up or captured hold.
ALLOWED_FLOWS["reverse"] = frozenset(
    (credit, debit)
    for op in ("deposit", "transfer", "charge_fee", "top_up_shortfall", "place_hold")
    for debit, credit in ALLOWED_FLOWS[op]
)
# Operations whose postings come from a reservation whose flow was checked when it was placed.
FROM_RESERVATION_OPS: Final = frozenset({"capture_hold", "settle_withdrawal"})

"""Early warning (custody-domain §6.2-6.3): rules over the platforms' logs raise alerts.

The engine follows each platform's log read-only, keeps its position and rule state in its own
`risk_` tables, and acts on the ledger only through `RaiseAlert` and `SetGate` commands given as
`system:early-warning`. See docs/RISK.md.
"""

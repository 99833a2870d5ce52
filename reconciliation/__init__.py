"""Reconciliation against bank statements (issue 7, items 1-3).

Imports bank statements (ISO 20022 camt.053, CSV with a per-bank mapping) into its own
`recon_*` tables, matches them against the ledger's omnibus movements and computes the daily
internal reconciliation. It reads the ledger's store and changes the ledger only by submitting
instructions through `LedgerService.execute` as an operator. See docs/RECONCILIATION.md.
"""

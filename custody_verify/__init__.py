"""custody-verify: the auditor's offline verifier for Custody Ledger bundles, notes and proofs.

Depends on the Python standard library and `cryptography` only, and imports nothing from the
ledger (`ledger/`, `controls/`, `projections/`): it is an independent reimplementation of the
formats in docs/BUNDLE.md and docs/FORMAT.md.
"""

__version__ = "1.0.0"

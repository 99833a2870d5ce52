"""Custody Ledger: an event-sourced, hash-chained system of record for segregated customer money."""

__version__ = "0.1.0"

"""Stable reason codes. Once published a code never changes meaning; new codes are only added.

They live in `controls/` because controls produce them; the ledger and the API only carry them.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    # integrity
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_AMOUNT = "INVALID_AMOUNT"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    ACCOUNT_NOT_FOUND = "ACCOUNT_NOT_FOUND"
    ACCOUNT_EXISTS = "ACCOUNT_EXISTS"
    SAME_ACCOUNT = "SAME_ACCOUNT"
    UNBALANCED = "UNBALANCED"
    AMOUNT_OVERFLOW = "AMOUNT_OVERFLOW"
    FLOW_NOT_ALLOWED = "FLOW_NOT_ALLOWED"
    PLATFORM_NOT_FOUND = "PLATFORM_NOT_FOUND"
    PLATFORM_EXISTS = "PLATFORM_EXISTS"
    # funds
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    # account state
    ACCOUNT_FROZEN = "ACCOUNT_FROZEN"
    ACCOUNT_CLOSED = "ACCOUNT_CLOSED"
    ACCOUNT_NOT_EMPTY = "ACCOUNT_NOT_EMPTY"
    ACCOUNT_NOT_FROZEN = "ACCOUNT_NOT_FROZEN"
    # idempotency
    ID_REUSED = "ID_REUSED"
    # holds
    HOLD_NOT_FOUND = "HOLD_NOT_FOUND"
    HOLD_EXISTS = "HOLD_EXISTS"
    HOLD_NOT_PENDING = "HOLD_NOT_PENDING"
    HOLD_EXCEEDED = "HOLD_EXCEEDED"
    HOLD_EXPIRY_INVALID = "HOLD_EXPIRY_INVALID"
    HOLD_REASON_REQUIRED = "HOLD_REASON_REQUIRED"
    HOLD_NOT_EXPIRED = "HOLD_NOT_EXPIRED"
    HOLD_EXPIRED = "HOLD_EXPIRED"
    # reversal
    MOVEMENT_NOT_FOUND = "MOVEMENT_NOT_FOUND"
    NOT_REVERSIBLE = "NOT_REVERSIBLE"
    ALREADY_REVERSED = "ALREADY_REVERSED"
    # batches
    LINKED_FAILED = "LINKED_FAILED"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"


# Refusals that describe malformed input rather than a business decision. The API maps them to
# INVALID_ARGUMENT; the rest map to FAILED_PRECONDITION / NOT_FOUND / ALREADY_EXISTS / ABORTED.
INPUT_CODES = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.INVALID_AMOUNT,
        Code.SAME_ACCOUNT,
        Code.HOLD_EXPIRY_INVALID,
        Code.HOLD_REASON_REQUIRED,
        Code.BATCH_TOO_LARGE,
    }
)

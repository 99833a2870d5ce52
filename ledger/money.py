"""Money is an integer count of minor units in one ISO 4217 currency; nothing here ever floats."""

from __future__ import annotations

import re
from typing import Final

AMOUNT_MIN_MINOR: Final = 1
AMOUNT_MAX_MINOR: Final = 2**63 - 1
# Every running total (an account's posted debits or credits, a currency's total) must also fit
# a signed 64-bit column and a protobuf int64/uint64 field, so the same bound applies to sums.
SUM_MAX_MINOR: Final = 2**63 - 1

# ISO 4217 active codes we accept, with their minor-unit exponent (informational: the ledger
# never converts, it only needs to know a code is real).
CURRENCY_EXPONENTS: Final[dict[str, int]] = {
    "CNY": 2,
    "HKD": 2,
    "USD": 2,
    "EUR": 2,
    "GBP": 2,
    "JPY": 0,
    "SGD": 2,
    "AUD": 2,
    "CAD": 2,
    "CHF": 2,
    "KRW": 0,
    "TWD": 2,
    "MOP": 2,
    "NZD": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "INR": 2,
    "IDR": 2,
    "MYR": 2,
    "THB": 2,
    "PHP": 2,
    "VND": 0,
    "BRL": 2,
    "MXN": 2,
    "ZAR": 2,
    "AED": 2,
    "SAR": 2,
    "KWD": 3,
    "BHD": 3,
    "JOD": 3,
    "OMR": 3,
    "TND": 3,
    "CLP": 0,
    "ISK": 0,
    "UGX": 0,
    "XAF": 0,
    "XOF": 0,
    "PLN": 2,
    "CZK": 2,
    "HUF": 2,
    "TRY": 2,
    "ILS": 2,
    "EGP": 2,
    "NGN": 2,
    "KES": 2,
    "PKR": 2,
    "BDT": 2,
    "LKR": 2,
    "RUB": 2,
}

_CURRENCY_RE: Final = re.compile(r"\A[A-Z]{3}\Z")


def is_valid_amount(amount_minor: object) -> bool:
    """True only for a real int (not bool, not float) in [1, 2^63-1]."""
    return type(amount_minor) is int and AMOUNT_MIN_MINOR <= amount_minor <= AMOUNT_MAX_MINOR


def is_valid_currency(currency: object) -> bool:
    return (
        isinstance(currency, str)
        and _CURRENCY_RE.match(currency) is not None
        and currency in CURRENCY_EXPONENTS
    )


def fits_sum(total_minor: int) -> bool:
    """A running total stays representable in the store and on the wire."""
    return 0 <= total_minor <= SUM_MAX_MINOR

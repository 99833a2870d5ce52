"""Normalised bank statements: what every importer (camt.053, CSV) produces.

Money is an integer count of minor units, signed from the account holder's side: a credit
(money into the omnibus bank account, a receipt) is positive, a debit (a payout) negative.
Dates are ISO `YYYY-MM-DD` strings in the bank's local calendar.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Final

from ledger.money import CURRENCY_EXPONENTS

MAX_FILE_BYTES: Final = 64 * 1024 * 1024  # a statement larger than this is refused unread
POW10: Final[tuple[int, ...]] = tuple(10**k for k in range(19))
MAX_TEXT: Final = 512  # any text field we keep, after whitespace normalisation
_AMOUNT: Final = re.compile(r"([0-9]{1,18})(?:\.([0-9]{1,18}))?").fullmatch
_DIGITS: Final = re.compile(r"[0-9]{1,18}").fullmatch
_CCY: Final = re.compile(r"[A-Z]{3}").fullmatch


class StatementError(ValueError):
    """The file is malformed, hostile or inconsistent: nothing of it is imported."""


@dataclass(frozen=True, slots=True)
class Entry:
    index: int  # position in the statement, 0-based
    amount_minor: int  # signed: + credit (receipt), - debit (payout)
    currency: str
    booking_date: str
    value_date: str
    status: str = "BOOK"  # only booked entries count towards balances
    entry_ref: str = ""  # NtryRef
    bank_ref: str = ""  # AcctSvcrRef
    end_to_end_ids: tuple[str, ...] = ()  # one per transaction (a batch has several)
    instruction_ids: tuple[str, ...] = ()
    batch_id: str = ""  # PmtInfId / Btch MsgId
    counterparty_name: str = ""
    counterparty_account: str = ""
    remittance: str = ""
    bank_tx_code: str = ""
    return_reason: str = ""
    reversal: bool = False

    def refs(self) -> tuple[str, ...]:
        """Every reference a ledger movement may carry for this entry, most specific first."""
        out: list[str] = [*self.end_to_end_ids, *self.instruction_ids]
        out += [r for r in (self.batch_id, self.entry_ref, self.bank_ref) if r]
        return tuple(r for r in dict.fromkeys(out) if r and r != "NOTPROVIDED")


@dataclass(frozen=True, slots=True)
class Statement:
    fmt: str  # camt053 | csv
    version: str  # camt.053.001.NN, or the CSV mapping's bank name
    statement_id: str
    sequence: int | None  # electronic (or legal) sequence number, if the bank gives one
    account: str  # IBAN or the bank's account number, as in the file
    currency: str
    opening_minor: int
    closing_minor: int
    opening_date: str
    closing_date: str
    entries: tuple[Entry, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        """What identifies the statement, whatever file carries it."""
        seq = "" if self.sequence is None else str(self.sequence)
        return f"{normalise_account(self.account)}|{self.statement_id}|{seq}"

    def booked_sum(self) -> int:
        return sum(e.amount_minor for e in self.entries if e.status == "BOOK")


def normalise_account(text: str) -> str:
    """IBANs and account numbers compare without spaces or case."""
    return "".join(text.split()).upper()


def clean_text(text: str | None, what: object, limit: int = MAX_TEXT) -> str:
    if text is None:
        return ""
    out = " ".join(text.split())
    if len(out) > limit:
        raise StatementError(f"{what} is longer than {limit} characters")
    if any(ord(ch) < 32 or ord(ch) == 0x7F for ch in out):
        raise StatementError(f"{what} contains control characters")
    return out


def check_currency(code: str, what: object) -> str:
    if _CCY(code) is None or code not in CURRENCY_EXPONENTS:
        raise StatementError(f"{what}: unknown currency {code!r}")
    return code


def decimal_to_minor(text: str, currency: str, what: object) -> int:
    """Exact decimal text (`1234.50`) to minor units of `currency`; never through floats.

    More fraction digits than the currency has are accepted only when they are zeros."""
    m = _AMOUNT(text.strip())
    if m is None:
        raise StatementError(f"{what}: {text!r} is not a decimal amount")
    exp: int = CURRENCY_EXPONENTS[check_currency(currency, what)]
    whole, frac = m.group(1), m.group(2) or ""
    if len(frac) > exp:
        if frac[exp:].strip("0"):
            raise StatementError(f"{what}: {text!r} has more than {exp} decimal places")
        frac = frac[:exp]
    value = int(whole) * POW10[exp] + int(frac.ljust(exp, "0") or "0")
    if value > 2**63 - 1:
        raise StatementError(f"{what}: {text!r} is too large")
    return value


def check_date(text: str, what: object) -> str:
    try:
        return dt.date.fromisoformat(text.strip()[:10]).isoformat()
    except ValueError:
        raise StatementError(f"{what}: {text!r} is not a date") from None


def is_digits(text: str) -> bool:
    """ASCII digits only (str.isdigit and `\\d` also accept other scripts' digits)."""
    return _DIGITS(text) is not None

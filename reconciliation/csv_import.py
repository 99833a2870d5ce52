"""Bank CSV statements with a per-bank column mapping (a JSON file).

Banks' reconciliation files (对账文件) differ in every detail, so the mapping names them all:

```json
{
  "bank": "ICBC-direct",
  "encoding": "utf-8",              // or "gb18030"; a UTF-8 BOM is dropped
  "delimiter": ",",
  "date_format": "%Y%m%d",          // strptime format of every date column
  "decimal_places": 2,              // digits after the separator in the file (<= currency's)
  "decimal_separator": ".",
  "thousands_separator": "",
  "amount_sign": "signed",          // signed | indicator | split
  "credit_values": ["C", "CR"],     // amount_sign=indicator: values meaning credit
  "debit_values": ["D", "DR"],
  "columns": {                      // CSV header names
    "account": "acct", "statement_id": "stmt", "sequence": "seq", "currency": "ccy",
    "opening_balance": "open", "closing_balance": "close", "opening_date": "from",
    "closing_date": "to",
    "booking_date": "date", "value_date": "vdate", "amount": "amount",
    "indicator": "dc", "debit": "out", "credit": "in",
    "end_to_end_id": "e2e", "reference": "ref", "bank_ref": "bank_ref", "batch_id": "batch",
    "counterparty_name": "name", "counterparty_account": "cp_acct", "remittance": "memo"
  }
}
```

Statement-level columns (account, statement id, sequence, currency, opening and closing
balances and dates) repeat on every row and must agree; a file with no entries is one row
with empty entry columns. Amounts are parsed exactly (digits, one separator, no exponent):
`decimal_places` tells how many fraction digits the file writes; they become the currency's
minor units, and more fraction digits than the currency has are refused.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from ledger.money import CURRENCY_EXPONENTS
from reconciliation.model import (
    MAX_FILE_BYTES,
    POW10,
    Entry,
    Statement,
    StatementError,
    check_currency,
    clean_text,
    is_digits,
)

STATEMENT_FIELDS: Final = (
    "account",
    "statement_id",
    "sequence",
    "currency",
    "opening_balance",
    "closing_balance",
    "opening_date",
    "closing_date",
)
ENTRY_FIELDS: Final = (
    "booking_date",
    "value_date",
    "amount",
    "indicator",
    "debit",
    "credit",
    "end_to_end_id",
    "reference",
    "bank_ref",
    "batch_id",
    "counterparty_name",
    "counterparty_account",
    "remittance",
)
REQUIRED: Final = ("account", "statement_id", "opening_balance", "closing_balance", "booking_date")
SIGN_MODES: Final = ("signed", "indicator", "split")
MAX_ROWS: Final = 1_000_000


@dataclass(frozen=True)
class Mapping:
    bank: str
    columns: dict[str, str]
    date_format: str = "%Y-%m-%d"
    decimal_places: int = 2
    decimal_separator: str = "."
    thousands_separator: str = ""
    amount_sign: str = "signed"
    credit_values: tuple[str, ...] = ("C", "CR", "CRDT")
    debit_values: tuple[str, ...] = ("D", "DR", "DBIT")
    delimiter: str = ","
    encoding: str = "utf-8"
    currency: str = ""  # when the file has no currency column
    extra: dict[str, Any] = field(default_factory=dict)


def load_mapping(data: bytes | str) -> Mapping:
    """A mapping from its JSON text; every problem is a StatementError naming the key."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StatementError(f"mapping: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StatementError("mapping: must be a JSON object")
    columns = doc.get("columns")
    if not isinstance(columns, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items()
    ):
        raise StatementError("mapping: 'columns' must map field names to CSV header names")
    unknown = set(columns) - set(STATEMENT_FIELDS) - set(ENTRY_FIELDS)
    if unknown:
        raise StatementError(f"mapping: unknown fields {sorted(unknown)}")
    for name in REQUIRED:
        if name not in columns:
            raise StatementError(f"mapping: 'columns' needs {name!r}")
    sign = doc.get("amount_sign", "signed")
    if sign not in SIGN_MODES:
        raise StatementError(f"mapping: amount_sign must be one of {SIGN_MODES}")
    need = {"signed": ("amount",), "indicator": ("amount", "indicator"), "split": ()}[sign]
    for name in need:
        if name not in columns:
            raise StatementError(f"mapping: amount_sign={sign} needs column {name!r}")
    if sign == "split" and not ("debit" in columns and "credit" in columns):
        raise StatementError("mapping: amount_sign=split needs columns 'debit' and 'credit'")
    places = doc.get("decimal_places", 2)
    if type(places) is not int or not 0 <= places <= 6:
        raise StatementError("mapping: decimal_places must be an integer in 0..6")
    texts = {}
    for key, default in (
        ("bank", "csv"),
        ("date_format", "%Y-%m-%d"),
        ("decimal_separator", "."),
        ("thousands_separator", ""),
        ("delimiter", ","),
        ("encoding", "utf-8"),
        ("currency", ""),
    ):
        value = doc.get(key, default)
        if not isinstance(value, str):
            raise StatementError(f"mapping: {key!r} must be a string")
        texts[key] = value
    if len(texts["delimiter"]) != 1 or len(texts["decimal_separator"]) != 1:
        raise StatementError("mapping: delimiter and decimal_separator are one character")
    if texts["thousands_separator"] == texts["decimal_separator"]:
        raise StatementError("mapping: thousands and decimal separators must differ")
    try:
        "x".encode(texts["encoding"])
    except LookupError:
        raise StatementError(f"mapping: unknown encoding {texts['encoding']!r}") from None
    if texts["currency"]:
        check_currency(texts["currency"], "mapping currency")
    values = {}
    for key in ("credit_values", "debit_values"):
        v = doc.get(key, list(getattr(Mapping, key)))
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise StatementError(f"mapping: {key!r} must be a list of strings")
        values[key] = tuple(x.strip().upper() for x in v)
    if set(values["credit_values"]) & set(values["debit_values"]):
        raise StatementError("mapping: a value cannot mean both credit and debit")
    return Mapping(
        bank=texts["bank"],
        columns=dict(columns),
        date_format=texts["date_format"],
        decimal_places=places,
        decimal_separator=texts["decimal_separator"],
        thousands_separator=texts["thousands_separator"],
        amount_sign=sign,
        credit_values=values["credit_values"],
        debit_values=values["debit_values"],
        delimiter=texts["delimiter"],
        encoding=texts["encoding"],
        currency=texts["currency"],
    )


def parse(raw: bytes, mapping: Mapping, max_bytes: int = MAX_FILE_BYTES) -> list[Statement]:
    """The statement in a CSV file (one statement per file)."""
    if len(raw) > max_bytes:
        raise StatementError(f"the file is larger than {max_bytes} bytes")
    try:
        text = raw.decode(mapping.encoding)
    except UnicodeDecodeError as exc:
        raise StatementError(f"the file is not {mapping.encoding}: {exc}") from None
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise StatementError("the file contains NUL bytes")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=mapping.delimiter, strict=True)
    header = reader.fieldnames or []
    missing = [col for col in mapping.columns.values() if col not in header]
    if missing:
        raise StatementError(f"the CSV header lacks the mapped columns {missing}")
    p = _RowParser(mapping)
    try:
        for row in reader:
            if reader.line_num > MAX_ROWS + 1:
                raise StatementError(f"more than {MAX_ROWS} rows")
            if None in row or any(v is None for v in row.values()):
                raise StatementError(f"line {reader.line_num}: wrong number of fields")
            p.row(row, reader.line_num)
    except csv.Error as exc:
        raise StatementError(f"line {reader.line_num}: {exc}") from None
    return [p.statement()]


class _RowParser:
    def __init__(self, mapping: Mapping) -> None:
        self.m = mapping
        self.head: dict[str, str] | None = None
        self.entries: list[Entry] = []
        self.currency = ""

    def _get(self, row: dict[str, str], name: str) -> str:
        col = self.m.columns.get(name)
        return "" if col is None else (row.get(col) or "").strip()

    def amount(self, text: str, where: str, signed: bool) -> int:
        """Exact decimal text with the mapping's separators -> minor units of the currency."""
        m = self.m
        t = text.replace(m.thousands_separator, "") if m.thousands_separator else text
        t = t.strip()
        negative = False
        if signed and t[:1] in "+-" and t:
            negative = t[0] == "-"
            t = t[1:]
        sep = re.escape(m.decimal_separator)
        match = re.fullmatch(rf"([0-9]{{1,18}})(?:{sep}([0-9]{{1,6}}))?", t)
        if match is None:
            raise StatementError(f"{where}: {text!r} is not an amount")
        frac = match.group(2) or ""
        if len(frac) > m.decimal_places:
            raise StatementError(f"{where}: {text!r} has more than {m.decimal_places} decimals")
        exp: int = CURRENCY_EXPONENTS[self.currency]
        if m.decimal_places > exp:
            extra = frac.ljust(m.decimal_places, "0")[exp:]
            if extra.strip("0"):
                raise StatementError(
                    f"{where}: {text!r} is finer than {self.currency}'s minor unit"
                )
            frac = frac[:exp]
        value = int(match.group(1)) * POW10[exp] + int(frac.ljust(exp, "0") or "0")
        return -value if negative else value

    def date(self, text: str, where: str) -> str:
        try:
            return dt.datetime.strptime(text, self.m.date_format).date().isoformat()
        except ValueError:
            raise StatementError(f"{where}: {text!r} does not match {self.m.date_format}") from None

    def row(self, row: dict[str, str], line: int) -> None:
        head = {name: self._get(row, name) for name in STATEMENT_FIELDS}
        if self.head is None:
            self.head = head
            ccy = head["currency"] or self.m.currency
            if not ccy:
                raise StatementError("no currency column and no currency in the mapping")
            self.currency = check_currency(ccy, f"line {line}")
        elif head != self.head:
            diff = [k for k in STATEMENT_FIELDS if head[k] != self.head[k]]
            raise StatementError(f"line {line}: statement columns {diff} differ from line 2")
        fields = {name: self._get(row, name) for name in ENTRY_FIELDS}
        if not any(fields[k] for k in ("amount", "debit", "credit")):
            if fields["booking_date"]:
                raise StatementError(f"line {line}: an entry without an amount")
            return  # the statement-only row of a file without entries
        where = f"line {line}"
        sign = self.m.amount_sign
        if sign == "signed":
            amount = self.amount(fields["amount"], where, signed=True)
        elif sign == "indicator":
            ind = fields["indicator"].upper()
            amount = self.amount(fields["amount"], where, signed=False)
            if ind in self.m.debit_values:
                amount = -amount
            elif ind not in self.m.credit_values:
                raise StatementError(f"{where}: indicator {fields['indicator']!r} is unknown")
        else:
            debit = self.amount(fields["debit"], where, False) if fields["debit"] else 0
            credit = self.amount(fields["credit"], where, False) if fields["credit"] else 0
            if bool(debit) == bool(credit):
                raise StatementError(f"{where}: exactly one of debit and credit must be non-zero")
            amount = credit - debit
        if amount == 0:
            raise StatementError(f"{where}: an entry of zero")
        booking = self.date(fields["booking_date"], where)
        value = self.date(fields["value_date"], where) if fields["value_date"] else booking
        e2e = clean_text(fields["end_to_end_id"], where, 35)
        self.entries.append(
            Entry(
                index=len(self.entries),
                amount_minor=amount,
                currency=self.currency,
                booking_date=booking,
                value_date=value,
                entry_ref=clean_text(fields["reference"], where, 35),
                bank_ref=clean_text(fields["bank_ref"], where, 35),
                end_to_end_ids=(e2e,) if e2e else (),
                batch_id=clean_text(fields["batch_id"], where, 35),
                counterparty_name=clean_text(fields["counterparty_name"], where, 140),
                counterparty_account=clean_text(fields["counterparty_account"], where, 34),
                remittance=clean_text(fields["remittance"], where, 512),
            )
        )

    def statement(self) -> Statement:
        head = self.head
        if head is None:
            raise StatementError("the file has no rows")
        seq = head["sequence"]
        if seq and not is_digits(seq):
            raise StatementError(f"sequence {seq!r} is not a number")
        opening = self.amount(head["opening_balance"], "opening balance", signed=True)
        closing = self.amount(head["closing_balance"], "closing balance", signed=True)
        dates = [e.booking_date for e in self.entries]
        first = self.date(head["opening_date"], "opening date") if head["opening_date"] else ""
        last = self.date(head["closing_date"], "closing date") if head["closing_date"] else ""
        if not last:
            if not dates:
                raise StatementError("a file without entries needs a closing_date column")
            last = max(dates)
        return Statement(
            fmt="csv",
            version=self.m.bank,
            statement_id=clean_text(head["statement_id"], "statement id", 35),
            sequence=int(seq) if seq else None,
            account=clean_text(head["account"], "account", 34),
            currency=self.currency,
            opening_minor=opening,
            closing_minor=closing,
            opening_date=first or (min(dates) if dates else last),
            closing_date=last,
            entries=tuple(self.entries),
        )

"""Shape checks on an instruction before it is decided: types, lengths, character sets, enums.

An instruction that fails here is not an instruction at all; it is answered with
INVALID_ARGUMENT and never reaches the log. Business rules (amount range, funds, state) are
controls and their refusals are recorded.
"""

from __future__ import annotations

import re
from typing import Any, Final

from ledger import commands as c
from ledger.domain import AccountKind, CustomerRole
from ledger.money import is_valid_currency

_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")
_CLIENT_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:\-/]{0,127}\Z")
_PLATFORM_RE: Final = re.compile(r"\A[a-z0-9][a-z0-9\-]{0,62}\Z")
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1
_MS_MAX: Final = 253402300799999  # 9999-12-31T23:59:59.999Z

ID_FIELDS: Final = frozenset(
    {
        "account_id",
        "from_account_id",
        "to_account_id",
        "mirror_account_id",
        "hold_id",
        "withdrawal_id",
    }
)
TEXT_FIELDS: Final = frozenset(
    {"name", "reason", "bank_ref", "payee_ref", "fee_code", "holder_name", "purpose"}
)


class InvalidInput(ValueError):
    """The instruction is malformed; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def is_platform_id(value: object) -> bool:
    return isinstance(value, str) and _PLATFORM_RE.match(value) is not None


def _check_text(field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if len(value) > c.MAX_TEXT_LEN:
        raise InvalidInput(field, f"longer than {c.MAX_TEXT_LEN} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidInput(field, "contains control characters")


def _check_field(field: str, value: Any) -> None:
    if field in ID_FIELDS:
        if not isinstance(value, str) or _ID_RE.match(value) is None:
            raise InvalidInput(field, "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
    elif field in TEXT_FIELDS:
        if value is not None:
            _check_text(field, value)
    elif field == "amount_minor":
        if type(value) is not int or not _INT64_MIN <= value <= _UINT64_MAX:
            raise InvalidInput(field, "must be an integer count of minor units")
    elif field == "currency":
        if not is_valid_currency(value):
            raise InvalidInput(field, "must be an ISO 4217 code the ledger knows")
    elif field == "expires_at_ms":
        if type(value) is not int or not 0 < value <= _MS_MAX:
            raise InvalidInput(field, "must be a positive Unix time in milliseconds")
    elif field == "max_holds":
        if type(value) is not int or not 1 <= value <= 10_000:
            raise InvalidInput(field, "must be in 1..10000")


def validate(cmd: c.Command) -> None:
    """Raise InvalidInput for the first malformed field; return None for a well-formed command."""
    if not isinstance(cmd, c.COMMAND_TYPES):
        raise InvalidInput("op", "unknown instruction")
    if not isinstance(cmd.client_id, str) or _CLIENT_ID_RE.match(cmd.client_id) is None:
        raise InvalidInput("client_id", "must match [A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
    for field in cmd.__struct_fields__:
        if field != "client_id":
            _check_field(field, getattr(cmd, field))
    _check_specific(cmd)


def _check_specific(cmd: c.Command) -> None:
    if isinstance(cmd, c.OpenAccount):
        if cmd.kind not in AccountKind.__members__.values():
            raise InvalidInput("kind", f"must be one of {sorted(k.value for k in AccountKind)}")
        if cmd.kind == AccountKind.CUSTOMER:
            if cmd.role not in CustomerRole.__members__.values():
                raise InvalidInput("role", "a customer account needs a role")
        elif cmd.role is not None:
            raise InvalidInput("role", "only customer accounts have a role")
    elif isinstance(cmd, c.Transfer):
        if cmd.purpose not in c.TRANSFER_PURPOSES:
            raise InvalidInput("purpose", f"must be one of {sorted(c.TRANSFER_PURPOSES)}")
    elif isinstance(cmd, c.CreatePlatform):
        if not cmd.name:
            raise InvalidInput("name", "must not be empty")
    elif isinstance(cmd, c.ChargeFee):
        if not cmd.fee_code:
            raise InvalidInput("fee_code", "must not be empty")

"""Shape checks on an instruction before it is decided: types, lengths, character sets, enums.

An instruction that fails here is not an instruction at all; it is answered with
INVALID_ARGUMENT and never reaches the log. Business rules (amount range, funds, state) are
controls and their refusals are recorded. The per-type check tables are built once at import,
because this runs for every instruction on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from controls.policy import Policy
from controls.roles import ROLES
from ledger import commands as c
from ledger.domain import AccountKind, CustomerRole
from ledger.money import CURRENCY_EXPONENTS

_ID_MATCH: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}").fullmatch
_CLIENT_ID_MATCH: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-/]{0,127}").fullmatch
_PLATFORM_MATCH: Final = re.compile(r"[a-z0-9][a-z0-9\-]{0,62}").fullmatch
# Control characters, and lone surrogates (not encodable as UTF-8, so not canonical bytes).
_BAD_TEXT_SEARCH: Final = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]").search
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1
_MS_MAX: Final = 253402300799999  # 9999-12-31T23:59:59.999Z
_KINDS: Final = frozenset(k.value for k in AccountKind)
_ROLES: Final = frozenset(r.value for r in CustomerRole)

ID_FIELDS: Final = frozenset(
    {
        "account_id",
        "from_account_id",
        "to_account_id",
        "mirror_account_id",
        "hold_id",
        "withdrawal_id",
        "movement_id",
        "standing_id",
        "own_account_id",
        "platform_bank_account_id",
        "reconciliation_id",
        "alert_id",
        "rule",
    }
)
TEXT_FIELDS: Final = frozenset(
    {
        "name",
        "reason",
        "bank_ref",
        "payee_ref",
        "fee_code",
        "owner_ref",
        "bank_account",
        "summary",
        "note",
    }
)
OPTIONAL_TEXT_FIELDS: Final = frozenset({"holder_name", "role"})


class InvalidInput(ValueError):
    """The instruction is malformed; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


MAX_ACTOR_LEN: Final = 128


def is_actor(value: object) -> bool:
    """Who acted, as the API authenticated it: `<role>:<name>`, short printable text, recorded
    in every record (the role prefix is what the roles control checks)."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_ACTOR_LEN
        and _BAD_TEXT_SEARCH(value) is None
        and value.partition(":")[0] in ROLES
        and len(value.partition(":")[2]) > 0
    )


def is_platform_id(value: object) -> bool:
    return type(value) is str and _PLATFORM_MATCH(value) is not None


def _is_id(v: Any) -> bool:
    return type(v) is str and _ID_MATCH(v) is not None


def _is_text(v: Any) -> bool:
    return type(v) is str and len(v) <= c.MAX_TEXT_LEN and _BAD_TEXT_SEARCH(v) is None


def _is_optional_text(v: Any) -> bool:
    return v is None or _is_text(v)


def _is_amount(v: Any) -> bool:
    return type(v) is int and _INT64_MIN <= v <= _UINT64_MAX


def _is_currency(v: Any) -> bool:
    return type(v) is str and v in CURRENCY_EXPONENTS


def _is_ms(v: Any) -> bool:
    return type(v) is int and 0 < v <= _MS_MAX


def _is_max_holds(v: Any) -> bool:
    return type(v) is int and 1 <= v <= 10_000


_B64URL_MATCH: Final = re.compile(r"[A-Za-z0-9_\-]*").fullmatch
_NONCE_MATCH: Final = re.compile(r"[A-Za-z0-9_.:\-]{8,64}").fullmatch
ED25519_KEY_B64_LEN: Final = 43  # 32 bytes, base64url without padding
ED25519_SIG_B64_LEN: Final = 86  # 64 bytes


# The last base64 character carries spare bits: only these values leave them zero, so each
# key or signature has exactly one accepted spelling (the recorded text is canonical).
_KEY_LAST: Final = frozenset("AEIMQUYcgkosw048")  # 32 bytes: the low 2 bits are zero
_SIG_LAST: Final = frozenset("AQgw")  # 64 bytes: the last character's low 4 bits are zero


def is_public_key(v: Any) -> bool:
    return (
        type(v) is str
        and len(v) == ED25519_KEY_B64_LEN
        and _B64URL_MATCH(v) is not None
        and v[-1] in _KEY_LAST
    )


def _is_optional_key(v: Any) -> bool:
    return v == "" or is_public_key(v)


def _is_auth(v: Any) -> bool:
    if v is None:
        return True
    if type(v) is not c.Authorisation:
        return False
    if v.standing_id:
        return _is_id(v.standing_id) and not (v.nonce or v.signature or v.expires_at_ms)
    return (
        type(v.nonce) is str
        and _NONCE_MATCH(v.nonce) is not None
        and _is_ms(v.expires_at_ms)
        and type(v.signature) is str
        and len(v.signature) == ED25519_SIG_B64_LEN
        and _B64URL_MATCH(v.signature) is not None
        and v.signature[-1] in _SIG_LAST
    )


_DIGEST_MATCH: Final = re.compile(r"[0-9a-f]{64}").fullmatch


def _is_digest_list(v: Any) -> bool:
    return (
        type(v) is list
        and 1 <= len(v) <= 64
        and all(type(d) is str and _DIGEST_MATCH(d) is not None for d in v)
    )


def _is_nonnegative(v: Any) -> bool:
    return type(v) is int and 0 <= v <= 2**63 - 1


def _is_int64(v: Any) -> bool:
    return type(v) is int and -(2**63) <= v <= 2**63 - 1


# 32 bytes in standard base64: 43 characters, the last with its 2 spare bits zero, then "="
_ROOT_MATCH: Final = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=").fullmatch


def _is_root_b64(v: Any) -> bool:
    return type(v) is str and _ROOT_MATCH(v) is not None


def _is_request_id(v: Any) -> bool:
    return type(v) is str and _CLIENT_ID_MATCH(v) is not None


def _is_optional_id(v: Any) -> bool:
    return v == "" or _is_id(v)


def _is_positive_amount(v: Any) -> bool:
    return type(v) is int and 1 <= v <= 2**63 - 1


_ID_MSG = "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
_TEXT_MSG = f"must be text of at most {c.MAX_TEXT_LEN} characters without control characters"
_FIELD_CHECKS: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    **{f: (_is_id, _ID_MSG) for f in ID_FIELDS},
    **{f: (_is_text, _TEXT_MSG) for f in TEXT_FIELDS},
    **{f: (_is_optional_text, _TEXT_MSG) for f in OPTIONAL_TEXT_FIELDS},
    "amount_minor": (_is_amount, "must be an integer count of minor units"),
    "currency": (_is_currency, "must be an ISO 4217 code the ledger knows"),
    "expires_at_ms": (_is_ms, "must be a positive Unix time in milliseconds"),
    "max_holds": (_is_max_holds, "must be in 1..10000"),
    "valid_until_ms": (_is_ms, "must be a positive Unix time in milliseconds"),
    "public_key": (_is_optional_key, "must be an Ed25519 public key, base64url (43 characters)"),
    "auth": (
        _is_auth,
        "must be {nonce (8..64 id characters), expires_at_ms, signature (base64url, 86)}"
        " or {standing_id}",
    ),
    "request_id": (_is_request_id, "must be the client id of a pending request"),
    "payee_account_id": (_is_optional_id, _ID_MSG + " or empty"),
    "per_txn_max_minor": (_is_positive_amount, "must be an integer in 1..2^63-1"),
    "holder_type": (lambda v: v in c.HOLDER_TYPES, f"must be one of {sorted(c.HOLDER_TYPES)}"),
    "gate": (lambda v: v in c.GATES, f"must be one of {list(c.GATES)}"),
    "snapshot_size": (_is_positive_amount, "must be a log size of at least 1"),
    "as_of_ms": (_is_ms, "must be a positive Unix time in milliseconds"),
    "statements": (_is_digest_list, "must be 1..64 SHA-256 digests (lowercase hex)"),
    "bank_closing_minor": (_is_nonnegative, "must be an integer in 0..2^63-1"),
    "requirement_minor": (_is_nonnegative, "must be an integer in 0..2^63-1"),
    "in_transit_minor": (_is_int64, "must be an integer in -2^63..2^63-1"),
    "difference_minor": (_is_int64, "must be an integer in -2^63..2^63-1"),
    "breaks": (lambda v: type(v) is int and 0 <= v <= 10_000_000, "must be in 0..10000000"),
    "result": (
        lambda v: v in c.RECONCILIATION_RESULTS,
        f"must be one of {sorted(c.RECONCILIATION_RESULTS)}",
    ),
    "level": (lambda v: v in c.ALERT_LEVELS, f"must be one of {list(c.ALERT_LEVELS)}"),
    "subject": (_is_optional_id, _ID_MSG + " or empty"),
    "depth": (lambda v: type(v) is int and 1 <= v <= 40, "must be in 1..40"),
    "root": (_is_root_b64, "must be a 32-byte hash in standard base64 (44 characters)"),
    "total_minor": (
        lambda v: type(v) is int and 0 <= v <= 2**63 - 1,
        "must be an integer in 0..2^63-1",
    ),
    "policy": (
        lambda v: v is None or type(v) is Policy,
        "must be a policy document",
    ),
    "kind": (lambda v: v in _KINDS, f"must be one of {sorted(_KINDS)}"),
    "purpose": (
        lambda v: v in c.TRANSFER_PURPOSES,
        f"must be one of {sorted(c.TRANSFER_PURPOSES)}",
    ),
}


def _table(cls: type[c.Command]) -> tuple[tuple[str, Callable[[Any], bool], str], ...]:
    fields = [f for f in cls.__struct_fields__ if f != "client_id"]
    missing = [f for f in fields if f not in _FIELD_CHECKS]
    assert not missing, f"{cls.__name__}: no shape check for {missing}"
    return tuple((f, *_FIELD_CHECKS[f]) for f in fields)


_TABLES: Final = {cls: _table(cls) for cls in c.COMMAND_TYPES}


def _all_fields_ok(
    cmd: c.Command, table: tuple[tuple[str, Callable[[Any], bool], str], ...]
) -> bool:
    """The hot path: every field passes, no exception machinery, one call per field."""
    try:
        for field, ok, _ in table:
            if not ok(getattr(cmd, field)):
                return False
    except TypeError:  # e.g. an unhashable value where an enum string belongs
        return False
    return True


def _first_bad_field(
    cmd: c.Command, table: tuple[tuple[str, Callable[[Any], bool], str], ...]
) -> InvalidInput:
    for field, ok, message in table:
        try:
            good = ok(getattr(cmd, field))
        except TypeError:
            good = False
        if not good:
            return InvalidInput(field, message)
    raise AssertionError("no bad field")


def validate(cmd: c.Command) -> None:
    """Raise InvalidInput for the first malformed field; return None for a well-formed command."""
    table = _TABLES.get(type(cmd))
    if table is None:
        raise InvalidInput("op", "unknown instruction")
    cid = cmd.client_id
    if type(cid) is not str or _CLIENT_ID_MATCH(cid) is None:
        raise InvalidInput("client_id", "must match [A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
    if not _all_fields_ok(cmd, table):
        raise _first_bad_field(cmd, table)
    if type(cmd) in _SPECIFIC:
        _check_specific(cmd)


def _check_specific(cmd: c.Command) -> None:
    if isinstance(cmd, c.OpenAccount):
        if cmd.kind == AccountKind.CUSTOMER:
            if cmd.role not in _ROLES:
                raise InvalidInput("role", f"a customer account needs a role in {sorted(_ROLES)}")
        elif cmd.role is not None:
            raise InvalidInput("role", "only customer accounts have a role")
        if cmd.holder_name is not None and not cmd.holder_name.strip():
            raise InvalidInput("holder_name", "must not be blank")
    elif isinstance(cmd, c.CreatePlatform):
        if not cmd.name.strip():
            raise InvalidInput("name", "must not be empty")
    elif isinstance(cmd, c.ChargeFee) and not cmd.fee_code:
        raise InvalidInput("fee_code", "must not be empty")
    elif isinstance(cmd, c.BindPayee):
        for field in ("payee_ref", "bank_account", "holder_name"):
            if not getattr(cmd, field).strip():
                raise InvalidInput(field, "must not be blank")
    elif isinstance(cmd, c.SetPolicy | c.RegisterKey | c.ResetKey):
        _check_specific_governance(cmd)
    elif isinstance(cmd, c.RecordReconciliation):
        _check_reconciliation(cmd)


def _check_reconciliation(cmd: c.RecordReconciliation) -> None:
    """The figures must add up and the result must say what they say."""
    difference = cmd.bank_closing_minor + cmd.in_transit_minor - cmd.requirement_minor
    if cmd.difference_minor != difference:
        raise InvalidInput("difference_minor", "must be bank closing + in transit - requirement")
    expected = "balanced" if difference == 0 else "shortfall" if difference < 0 else "excess"
    if cmd.result != expected:
        raise InvalidInput("result", f"the figures say {expected}")
    if len(set(cmd.statements)) != len(cmd.statements):
        raise InvalidInput("statements", "a statement is listed twice")


def _check_specific_governance(cmd: c.Command) -> None:
    if isinstance(cmd, c.SetPolicy):
        if cmd.policy is None:
            raise InvalidInput("policy", "is required")
    elif isinstance(cmd, c.RegisterKey | c.ResetKey) and not cmd.public_key:
        raise InvalidInput("public_key", "is required")


_SPECIFIC: Final = frozenset(
    {
        c.OpenAccount,
        c.CreatePlatform,
        c.ChargeFee,
        c.BindPayee,
        c.SetPolicy,
        c.RegisterKey,
        c.ResetKey,
        c.RecordReconciliation,
    }
)

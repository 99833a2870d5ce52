"""Instructions a platform or operator gives the ledger, named in the imperative.

Each is a frozen msgspec Struct whose canonical encoding (sorted keys) is both its idempotency
fingerprint input and the `cmd` object embedded in the record it produces. Field names carry
units last (`amount_minor`, `expires_at_ms`). Shape validation (types, lengths, ranges) happens
in `ledger.validate`; business rules are the controls' job.
"""

from __future__ import annotations

from typing import Final

import msgspec

MAX_ID_LEN: Final = 64
MAX_CLIENT_ID_LEN: Final = 128
MAX_TEXT_LEN: Final = 256
MAX_BATCH_COMMANDS: Final = 8192


class Command(msgspec.Struct, frozen=True, tag_field="op", kw_only=True):
    """Base: every instruction carries a client id unique within the platform (AIP-155)."""

    client_id: str


class CreatePlatform(Command, tag="create_platform", frozen=True, kw_only=True):
    name: str


class OpenAccount(Command, tag="open_account", frozen=True, kw_only=True):
    account_id: str
    kind: str
    currency: str
    role: str | None = None
    holder_name: str | None = None  # personal data: encrypted before it reaches the log


class FreezeAccount(Command, tag="freeze_account", frozen=True, kw_only=True):
    account_id: str
    reason: str


class UnfreezeAccount(Command, tag="unfreeze_account", frozen=True, kw_only=True):
    account_id: str
    reason: str


class CloseAccount(Command, tag="close_account", frozen=True, kw_only=True):
    account_id: str


class Deposit(Command, tag="deposit", frozen=True, kw_only=True):
    """Bank money arrived: debit the bank mirror, credit the customer (or suspense, own funds)."""

    mirror_account_id: str
    account_id: str
    amount_minor: int
    currency: str
    bank_ref: str = ""


class Transfer(Command, tag="transfer", frozen=True, kw_only=True):
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    purpose: str = "transfer"  # transfer | bid | disbursement | repayment | compensation | clearing


class ChargeFee(Command, tag="charge_fee", frozen=True, kw_only=True):
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    fee_code: str


class TopUpShortfall(Command, tag="top_up_shortfall", frozen=True, kw_only=True):
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    reason: str


class PlaceHold(Command, tag="place_hold", frozen=True, kw_only=True):
    """Reserve funds for a later capture or release; the hold id is the client id."""

    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    reason: str
    expires_at_ms: int


class CaptureHold(Command, tag="capture_hold", frozen=True, kw_only=True):
    hold_id: str
    amount_minor: int  # <= held; the remainder is released


class ReleaseHold(Command, tag="release_hold", frozen=True, kw_only=True):
    hold_id: str
    reason: str


class ExpireHolds(Command, tag="expire_holds", frozen=True, kw_only=True):
    """Sweep: release every pending hold whose expiry is at or before the record's time."""

    max_holds: int = 1000


class RequestWithdrawal(Command, tag="request_withdrawal", frozen=True, kw_only=True):
    """Phase one of a payout: hold the funds until the bank confirms or fails."""

    account_id: str
    mirror_account_id: str
    amount_minor: int
    currency: str
    payee_ref: str
    expires_at_ms: int


class SettleWithdrawal(Command, tag="settle_withdrawal", frozen=True, kw_only=True):
    withdrawal_id: str
    bank_ref: str = ""


class FailWithdrawal(Command, tag="fail_withdrawal", frozen=True, kw_only=True):
    withdrawal_id: str
    reason: str


class Reverse(Command, tag="reverse", frozen=True, kw_only=True):
    """Undo an earlier posted movement by a new, opposite one; the original stays as it was."""

    movement_id: str
    reason: str


AnyCommand = (
    CreatePlatform
    | OpenAccount
    | FreezeAccount
    | UnfreezeAccount
    | CloseAccount
    | Deposit
    | Transfer
    | ChargeFee
    | TopUpShortfall
    | PlaceHold
    | CaptureHold
    | ReleaseHold
    | ExpireHolds
    | RequestWithdrawal
    | SettleWithdrawal
    | FailWithdrawal
    | Reverse
)

COMMAND_TYPES: Final[tuple[type[Command], ...]] = (
    CreatePlatform,
    OpenAccount,
    FreezeAccount,
    UnfreezeAccount,
    CloseAccount,
    Deposit,
    Transfer,
    ChargeFee,
    TopUpShortfall,
    PlaceHold,
    CaptureHold,
    ReleaseHold,
    ExpireHolds,
    RequestWithdrawal,
    SettleWithdrawal,
    FailWithdrawal,
    Reverse,
)

TRANSFER_PURPOSES: Final = frozenset(
    {"transfer", "bid", "disbursement", "repayment", "compensation", "clearing"}
)

_command_decoder: Final = msgspec.json.Decoder(AnyCommand)


def decode_command_json(data: bytes) -> Command:
    """Parse one command from JSON (CLI files, tests); raises msgspec.ValidationError."""
    cmd: Command = _command_decoder.decode(data)
    return cmd


def op_of(cmd: Command) -> str:
    tag = type(cmd).__struct_config__.tag
    assert isinstance(tag, str)
    return tag

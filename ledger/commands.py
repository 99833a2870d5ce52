"""Instructions a platform or operator gives the ledger, named in the imperative.

Each is a frozen msgspec Struct whose canonical encoding (sorted keys) is both its idempotency
fingerprint input and the `cmd` object embedded in the record it produces. Field names carry
units last (`amount_minor`, `expires_at_ms`). Shape validation (types, lengths, ranges) happens
in `ledger.validate`; business rules are the controls' job.
"""

from __future__ import annotations

from typing import Final

import msgspec

from controls.policy import Policy

MAX_ID_LEN: Final = 64
MAX_CLIENT_ID_LEN: Final = 128
MAX_TEXT_LEN: Final = 256
MAX_BATCH_COMMANDS: Final = 8192


class Command(msgspec.Struct, frozen=True, tag_field="op", kw_only=True, omit_defaults=True):
    """Base: every instruction carries a client id unique within the platform (AIP-155).

    Defaults are omitted from the canonical bytes: optional fields cost nothing when unused.
    """

    client_id: str


class Authorisation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The customer's consent to one debit: an Ed25519 signature over the instruction's
    authorisation payload (`controls.customer_authorisation.payload`), bound to its nonce and
    expiry; or the id of a standing authorisation (auto-bid, auto-repay) the customer signed."""

    nonce: str = ""
    expires_at_ms: int = 0
    signature: str = ""  # base64url without padding, 64 bytes
    standing_id: str = ""


class CreatePlatform(Command, tag="create_platform", frozen=True, kw_only=True):
    name: str
    policy: Policy | None = None  # the platform's policy version 0; None = the built-in default


class OpenAccount(Command, tag="open_account", frozen=True, kw_only=True):
    account_id: str
    kind: str
    currency: str
    role: str | None = None
    holder_name: str | None = None  # personal data: encrypted before it reaches the log
    holder_type: str = "individual"  # individual | corporate (large-value thresholds differ)
    public_key: str = ""  # the customer's Ed25519 key (base64url), registered at opening


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
    auth: Authorisation | None = None


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
    owner_ref: str = ""  # e.g. the project a bid is for; capture and release must name it
    auth: Authorisation | None = None


class CaptureHold(Command, tag="capture_hold", frozen=True, kw_only=True):
    hold_id: str
    amount_minor: int  # <= held; the remainder is released
    owner_ref: str = ""


class ReleaseHold(Command, tag="release_hold", frozen=True, kw_only=True):
    hold_id: str
    reason: str
    owner_ref: str = ""


class ExpireHolds(Command, tag="expire_holds", frozen=True, kw_only=True):
    """Sweep: release every pending hold whose expiry is at or before the record's time."""

    max_holds: int = 1000


class RequestWithdrawal(Command, tag="request_withdrawal", frozen=True, kw_only=True):
    """Phase one of a payout: hold the funds until the bank confirms or fails."""

    account_id: str
    mirror_account_id: str
    amount_minor: int
    currency: str
    payee_ref: str  # the alias of the customer's bound bank account (see BindPayee)
    expires_at_ms: int
    auth: Authorisation | None = None


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


class RegisterKey(Command, tag="register_key", frozen=True, kw_only=True):
    """Register (first time) or rotate a customer's key; rotation is signed by the old key."""

    account_id: str
    public_key: str
    auth: Authorisation | None = None


class ResetKey(Command, tag="reset_key", frozen=True, kw_only=True):
    """Replace a lost customer key: an operator asks, a checker approves (maker-checker)."""

    account_id: str
    public_key: str
    reason: str


class BindPayee(Command, tag="bind_payee", frozen=True, kw_only=True):
    """Bind the customer's same-name bank account for payouts; signed by the customer."""

    account_id: str
    payee_ref: str  # alias that withdrawals name
    bank_account: str  # personal data: sealed before it reaches the log
    holder_name: str  # personal data: must match the account holder (compared blinded)
    auth: Authorisation | None = None


class GrantStanding(Command, tag="grant_standing", frozen=True, kw_only=True):
    """A customer-signed standing authorisation (auto-bid, auto-repay) within a cap."""

    account_id: str
    standing_id: str
    purpose: str  # the transfer purpose it covers
    payee_account_id: str = ""  # "" = any payee
    per_txn_max_minor: int
    valid_until_ms: int
    auth: Authorisation | None = None


class RevokeStanding(Command, tag="revoke_standing", frozen=True, kw_only=True):
    account_id: str
    standing_id: str


class SetPolicy(Command, tag="set_policy", frozen=True, kw_only=True):
    """Propose the next policy version (its `version` must be the current one + 1)."""

    policy: Policy


class SetGate(Command, tag="set_gate", frozen=True, kw_only=True):
    gate: str  # NORMAL | RESTRICTED | WIND_DOWN | FROZEN
    reason: str


class ApproveRequest(Command, tag="approve_request", frozen=True, kw_only=True):
    request_id: str


class RejectRequest(Command, tag="reject_request", frozen=True, kw_only=True):
    request_id: str
    reason: str


class PublishLiabilities(Command, tag="publish_liabilities", frozen=True, kw_only=True):
    """Publish the root and total of a proof-of-liabilities tree (`custody-pol/v1`) over the
    customer balances at log size `snapshot_size`, so checkpoints cover the statement."""

    snapshot_size: int
    currency: str
    depth: int
    root: str  # base64 (standard, padded) of the 32-byte root hash
    total_minor: int


class RecordReconciliation(Command, tag="record_reconciliation", frozen=True, kw_only=True):
    """The daily internal reconciliation (requirement vs resource), signed off by a checker.

    `difference_minor` = bank_closing_minor + in_transit_minor - requirement_minor; negative
    is a shortfall (to be cured by a top-up from own funds), positive an excess."""

    reconciliation_id: str
    currency: str
    as_of_ms: int  # the cut-off: bank statement closing time
    snapshot_size: int  # the ledger log size the requirement was computed at
    statements: list[str]  # SHA-256 (hex) of every raw bank statement file used
    bank_closing_minor: int
    in_transit_minor: int  # documented items in transit (signed)
    requirement_minor: int  # sum of customer and suspense balances at snapshot_size
    difference_minor: int
    breaks: int  # unmatched items carried
    result: str  # balanced | shortfall | excess


class SettleReconciliation(Command, tag="settle_reconciliation", frozen=True, kw_only=True):
    """Book the bank transfer that settles a reconciliation's difference (maker-checker).

    Shortfall: the platform paid `amount_minor` from its own bank account into the custody
    account (own funds -> platform bank mirror; customer liabilities unchanged, the custody
    bank balance rises). Excess: the custody bank returned it to the platform's bank account
    (platform bank mirror -> own funds)."""

    reconciliation_id: str
    own_account_id: str
    platform_bank_account_id: str
    amount_minor: int
    currency: str


class RaiseAlert(Command, tag="raise_alert", frozen=True, kw_only=True):
    """An early-warning rule fired (or an operator raised one by hand)."""

    alert_id: str
    rule: str
    level: str  # GREEN | YELLOW | ORANGE | RED
    subject: str = ""  # the account or item concerned, if any
    summary: str


class AcknowledgeAlert(Command, tag="acknowledge_alert", frozen=True, kw_only=True):
    alert_id: str
    note: str


class CloseAlert(Command, tag="close_alert", frozen=True, kw_only=True):
    alert_id: str
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
    | RegisterKey
    | ResetKey
    | BindPayee
    | GrantStanding
    | RevokeStanding
    | SetPolicy
    | SetGate
    | ApproveRequest
    | RejectRequest
    | PublishLiabilities
    | RecordReconciliation
    | SettleReconciliation
    | RaiseAlert
    | AcknowledgeAlert
    | CloseAlert
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
    RegisterKey,
    ResetKey,
    BindPayee,
    GrantStanding,
    RevokeStanding,
    SetPolicy,
    SetGate,
    ApproveRequest,
    RejectRequest,
    PublishLiabilities,
    RecordReconciliation,
    SettleReconciliation,
    RaiseAlert,
    AcknowledgeAlert,
    CloseAlert,
)
ALERT_LEVELS: Final = ("GREEN", "YELLOW", "ORANGE", "RED")
RECONCILIATION_RESULTS: Final = frozenset({"balanced", "shortfall", "excess"})
GATES: Final = ("NORMAL", "RESTRICTED", "WIND_DOWN", "FROZEN")
HOLDER_TYPES: Final = frozenset({"individual", "corporate"})

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

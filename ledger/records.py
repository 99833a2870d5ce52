"""Canonical record bytes (format `custody-record/v1`, specified in docs/FORMAT.md).

A record is a JSON object encoded by msgspec with keys sorted by code point, no whitespace,
integers only (no floats, no booleans), UTF-8. These exact bytes are what the hash chain and
the Merkle tree commit to and what the store keeps.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

RECORD_VERSION: Final = 1
CHAIN_GENESIS: Final = b"\x00" * 32
HASH_LEN: Final = 32

ENCODER: Final = msgspec.json.Encoder(order="sorted")
_DECODER: Final = msgspec.json.Decoder()

KIND_BY_OP: Final[dict[str, str]] = {
    "create_platform": "platform_created",
    "open_account": "account_opened",
    "freeze_account": "account_frozen",
    "unfreeze_account": "account_unfrozen",
    "close_account": "account_closed",
    "deposit": "deposited",
    "transfer": "transferred",
    "charge_fee": "fee_charged",
    "top_up_shortfall": "shortfall_topped_up",
    "place_hold": "hold_placed",
    "capture_hold": "hold_captured",
    "release_hold": "hold_released",
    "expire_holds": "holds_expired",
    "request_withdrawal": "withdrawal_requested",
    "settle_withdrawal": "withdrawal_settled",
    "fail_withdrawal": "withdrawal_failed",
    "reverse": "reversed",
    "register_key": "key_registered",
    "reset_key": "key_registered",
    "bind_payee": "payee_bound",
    "grant_standing": "standing_granted",
    "revoke_standing": "standing_revoked",
    "set_policy": "policy_set",
    "set_gate": "gate_set",
    "reject_request": "approval_rejected",
    "publish_liabilities": "liabilities_published",
    "record_reconciliation": "reconciliation_completed",
    "raise_alert": "alert_raised",
    "acknowledge_alert": "alert_acknowledged",
    "close_alert": "alert_closed",
}
REFUSED_KIND: Final = "command_refused"
# A manual operation waiting for a checker; the checker's approval is recorded under the kind
# of the operation it executes, with `executes` naming the request.
REQUESTED_KIND: Final = "approval_requested"
RECORD_KINDS: Final = frozenset({*KIND_BY_OP.values(), REFUSED_KIND, REQUESTED_KIND})


def encode(record: dict[str, Any]) -> bytes:
    return ENCODER.encode(record)


def decode(data: bytes) -> dict[str, Any]:
    record = _DECODER.decode(data)
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    return record


def chain_next(prev_hash: bytes, record_bytes: bytes) -> bytes:
    """hash(n) = SHA-256(hash(n-1) || canonical bytes of n); hash(-1) is 32 zero bytes."""
    return hashlib.sha256(prev_hash + record_bytes).digest()


def fingerprint(cmd_bytes: bytes) -> int:
    """Idempotency fingerprint of an instruction's canonical bytes, held only in memory.

    Python's keyed 64-bit SipHash: recomputed from the records at every start (so the per-process
    key does not matter), ~5x cheaper than a cryptographic digest on the hot path, and memory
    stays small for millions of instructions. Two different instructions with the same client id
    would have to collide on a secret 64-bit keyed hash to be mistaken for a replay.
    """
    return hash(cmd_bytes)


def pack_state(chain_hash: bytes, record_bytes: bytes) -> bytes:
    """The stored `state` column: the 32-byte chain hash, then the canonical record bytes."""
    assert len(chain_hash) == HASH_LEN
    return chain_hash + record_bytes


def unpack_state(state: bytes) -> tuple[bytes, bytes]:
    if len(state) <= HASH_LEN:
        raise ValueError("stored state shorter than a chain hash")
    return state[:HASH_LEN], state[HASH_LEN:]

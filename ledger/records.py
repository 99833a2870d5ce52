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
FINGERPRINT_LEN: Final = 16  # bytes of BLAKE2b in an idempotency fingerprint
_BLAKE2B: Final = hashlib.blake2b
_FROM_BYTES: Final = int.from_bytes

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
    "settle_reconciliation": "reconciliation_settled",
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
    """Idempotency fingerprint of an instruction's canonical bytes: BLAKE2b-128, as an int.

    Stable across processes (unlike Python's keyed `hash()`), so the `done` table can be kept
    in a state snapshot (`ledger/snapshot.py`) instead of being recomputed from every record at
    each start. 128 bits: two different instructions with the same client id would need a
    BLAKE2b collision (~2^64 work) to be mistaken for a replay. Costs ~0.4 µs more than
    `hash()` per instruction (measured: 0.13 -> 0.59 µs including the call).
    """
    return _FROM_BYTES(_BLAKE2B(cmd_bytes, digest_size=FINGERPRINT_LEN).digest(), "big")


def pack_state(chain_hash: bytes, record_bytes: bytes) -> bytes:
    """The stored `state` column: the 32-byte chain hash, then the canonical record bytes."""
    assert len(chain_hash) == HASH_LEN
    return chain_hash + record_bytes


def unpack_state(state: bytes) -> tuple[bytes, bytes]:
    if len(state) <= HASH_LEN:
        raise ValueError("stored state shorter than a chain hash")
    return state[:HASH_LEN], state[HASH_LEN:]

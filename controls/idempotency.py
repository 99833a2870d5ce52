"""Idempotency (AIP-155): a client id names one instruction forever within a platform.

Unlike the other controls this one runs before a proposal exists, because a replay must return
the original result without re-deciding anything. The ledger calls `classify` directly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from controls.base import Refusal
from controls.codes import Code

NAME = "idempotency"


class Replay(enum.Enum):
    NEW = "new"  # never seen: decide it
    SAME = "same"  # seen with identical content: answer with the original result
    CONFLICT = "conflict"  # seen with other content: refuse with ID_REUSED


def classify(done: Mapping[str, Any], client_id: str, fingerprint: int) -> Replay:
    previous = done.get(client_id)
    if previous is None:
        return Replay.NEW
    if previous.fingerprint == fingerprint:
        return Replay.SAME
    return Replay.CONFLICT


def conflict_refusal(client_id: str) -> Refusal:
    return Refusal(
        Code.ID_REUSED, NAME, f"client id {client_id!r} was already used for another instruction"
    )

"""Deadlines: every unary custody.v1 call must carry one; servicers never wait beyond a cap.

A call without a deadline is refused with INVALID_ARGUMENT / DEADLINE_REQUIRED (the Python
client always sets one). The log subscription may run without a deadline (it is a long-lived
stream). `budget_s` is what a servicer may wait for a commit: the caller's remaining time,
capped.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from ledger.api.errors import ApiError, ApiReason

MAX_WAIT_S: Final = 30.0
OPTIONAL_DEADLINE: Final = frozenset({"/custody.v1.LogService/SubscribeLog"})


# grpcio reports a call without a deadline as one about 2^63 ns away (not None); anything
# further out than this is treated as "no deadline".
_NO_DEADLINE_S: Final = 10 * 365 * 24 * 3600.0


def remaining_s(context: Any) -> float | None:
    """Seconds left before the caller's deadline, or None when the call has no deadline."""
    remaining: float | None = context.time_remaining()  # seconds, never money
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return remaining


def budget_s(context: Any, cap_s: float = MAX_WAIT_S) -> float:
    remaining = remaining_s(context)
    if remaining is None:
        return cap_s
    return max(0.0, min(remaining, cap_s))


def check_deadline(method: str, context: Any) -> None:
    """ApiError DEADLINE_REQUIRED if a custody.v1 call (other than a subscription) has none."""
    if method in OPTIONAL_DEADLINE or not method.startswith("/custody.v1."):
        return
    if remaining_s(context) is None:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            ApiReason.DEADLINE_REQUIRED,
            "every call must carry a deadline (grpc timeout)",
        )

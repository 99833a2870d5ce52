"""Deadlines: every unary custody.v1 call must carry one; servicers never wait beyond a cap.

A call without a deadline is refused with INVALID_ARGUMENT / DEADLINE_REQUIRED (the Python
client always sets one). The log subscription may run without a deadline (it is a long-lived
stream). `budget_s` is what a servicer may wait for a commit: the caller's remaining time,
capped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import grpc

from ledger.api import errors
from ledger.api.errors import ApiReason
from ledger.api.handlers import Handler, wrap_unary

MAX_WAIT_S: Final = 30.0
OPTIONAL_DEADLINE: Final = frozenset({"/custody.v1.LogService/SubscribeLog"})


# grpcio reports a call without a deadline as one about 2^63 ns away (not None); anything
# further out than this is treated as "no deadline".
_NO_DEADLINE_S: Final = 10 * 365 * 24 * 3600.0


def remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, or None when the call has no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return float(remaining)


def budget_s(context: grpc.ServicerContext, cap_s: float = MAX_WAIT_S) -> float:
    remaining = remaining_s(context)
    if remaining is None:
        return cap_s
    return max(0.0, min(remaining, cap_s))


class DeadlineInterceptor(grpc.ServerInterceptor):
    def __init__(self, required: bool = True) -> None:
        self._required = required

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or not self._required
            or not method.startswith("/custody.v1.")
            or method in OPTIONAL_DEADLINE
        ):
            return handler

        def around(request: Any, context: grpc.ServicerContext, call_next: Any) -> Any:
            if remaining_s(context) is None:
                errors.abort(
                    context,
                    errors.ApiError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        ApiReason.DEADLINE_REQUIRED,
                        "every call must carry a deadline (grpc timeout)",
                    ),
                )
            return call_next(request, context)

        return wrap_unary(handler, around)

"""Requests that do not parse (bad wire bytes, invalid UTF-8 in strings) are INVALID_ARGUMENT.

Left alone, grpcio answers a deserialization failure with INTERNAL. This interceptor swaps in
a deserializer that turns the failure into a marker the behavior then refuses properly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ledger.api import errors
from ledger.api.errors import ApiReason
from ledger.api.handlers import Handler, replace_deserializer, wrap_unary


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def guarded(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as exc:  # protobuf raises DecodeError and others
                return _Undecodable(type(exc).__name__)

        def around(request: Any, context: grpc.ServicerContext, call_next: Any) -> Any:
            if isinstance(request, _Undecodable):
                errors.abort(
                    context,
                    errors.ApiError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        ApiReason.MALFORMED_REQUEST,
                        f"request does not parse as the method's message ({request.error})",
                    ),
                )
            return call_next(request, context)

        return wrap_unary(replace_deserializer(handler, guarded), around)

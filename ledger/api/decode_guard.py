"""Requests that do not parse (bad wire bytes, invalid UTF-8 in strings) are INVALID_ARGUMENT.

Left alone, grpcio answers a deserialization failure with INTERNAL. Every custody.v1 handler
gets a deserializer that turns the failure into a marker, which the call gate then refuses
properly (after authentication, so an unauthenticated caller learns nothing about parsing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ledger.api.errors import ApiError, ApiReason


class Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def guarded_deserializer(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def guarded(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:  # protobuf raises DecodeError and others
            return Undecodable(type(exc).__name__)

    return guarded


def refuse_undecodable(request: Any) -> None:
    if type(request) is Undecodable:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            ApiReason.MALFORMED_REQUEST,
            f"request does not parse as the method's message ({request.error})",
        )

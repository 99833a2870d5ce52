"""Rewrap a gRPC method handler's behavior, keeping its kind and (de)serializers.

Server interceptors see only the method name; anything that needs the call's context (peer
certificate, metadata, deadline) must run inside the behavior, on the worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

# (request, context, call_next) -> response;   call_next(request, context) -> response
Around = Callable[[Any, grpc.ServicerContext, Callable[[Any, grpc.ServicerContext], Any]], Any]


def wrap_unary(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """Wrap unary-request handlers (unary-unary, unary-stream); others pass through."""
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        def stream_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            return around(request, context, inner_stream)  # type: ignore[no-any-return]

        return grpc.unary_stream_rpc_method_handler(
            stream_behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    inner = handler.unary_unary

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        return around(request, context, inner)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def replace_deserializer(
    handler: grpc.RpcMethodHandler, deserializer: Callable[[bytes], Any]
) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        handler.unary_unary,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )

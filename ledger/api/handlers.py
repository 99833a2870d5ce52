"""Rewrap a gRPC method handler's behavior, keeping its kind and (de)serializers.

Server interceptors see only the method name; anything that needs the call's context (peer
certificate, metadata, deadline) must run inside the behavior, on the worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # not subscriptable at run time
    Handler = grpc.RpcMethodHandler
# (request, context, call_next) -> response;   call_next(request, context) -> response
Around = Callable[[Any, grpc.ServicerContext, Callable[[Any, grpc.ServicerContext], Any]], Any]


def wrap_unary(handler: Handler, around: Around) -> Handler:
    """Wrap unary-request handlers (unary-unary, unary-stream); others pass through."""
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        inner_stream = handler.unary_stream
        assert inner_stream is not None

        def stream_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            return around(request, context, inner_stream)  # type: ignore[no-any-return]

        return grpc.unary_stream_rpc_method_handler(
            stream_behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    inner = handler.unary_unary
    assert inner is not None

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        return around(request, context, inner)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def replace_deserializer(handler: Handler, deserializer: Callable[[bytes], Any]) -> Handler:
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        assert handler.unary_stream is not None
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    assert handler.unary_unary is not None
    return grpc.unary_unary_rpc_method_handler(
        handler.unary_unary,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )

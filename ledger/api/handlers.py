"""Method handlers for the grpc.aio server, each wrapped once, at start, in the call gate.

Every custody.v1 call passes the same gate before its servicer runs, in this order:

1. authentication and role (`ledger.api.auth.authorize`): UNAUTHENTICATED / PERMISSION_DENIED;
2. deadline (`ledger.api.deadlines.check_deadline`): INVALID_ARGUMENT / DEADLINE_REQUIRED;
3. decoding (`ledger.api.decode_guard`): a request that does not parse is INVALID_ARGUMENT /
   MALFORMED_REQUEST, never the INTERNAL grpcio would answer.

The gate then calls the servicer's coroutine (or async generator, for server streaming) as
`method(request, context, identity)`. It used to be three server interceptors; as interceptors
they rebuilt a handler on every call. Wrapping each method's handler once when the servicers are
registered gives the same checks with a single coroutine frame per call. Health checking and
reflection are registered without the gate (open to any caller that passed the transport).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from ledger.api import errors
from ledger.api.auth import Access, Identity, IdentitySource, authorize
from ledger.api.deadlines import check_deadline
from ledger.api.decode_guard import guarded_deserializer, refuse_undecodable
from ledger.api.errors import ApiError

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
else:  # not subscriptable at run time
    Handler = grpc.RpcMethodHandler
    Context = grpc.aio.ServicerContext

log = logging.getLogger("ledger.api")

# servicer method: (request, context, identity) -> response | async iterator of responses
Unary = Callable[[Any, Context, Identity], Awaitable[Any]]
Streaming = Callable[[Any, Context, Identity], AsyncIterator[Any]]


@dataclass(frozen=True)
class Gate:
    """What every custody.v1 call must pass before its servicer runs."""

    source: IdentitySource
    access: Mapping[str, Access]
    require_deadline: bool = True

    def check(self, method: str, request: Any, context: Context) -> Identity:
        """The caller's identity, or ApiError (authentication, then deadline, then decoding)."""
        identity = authorize(self.source, self.access, method, context)
        if self.require_deadline:
            check_deadline(method, context)
        refuse_undecodable(request)
        return identity


def _unary(gate: Gate, method: str, inner: Unary) -> Callable[[Any, Context], Awaitable[Any]]:
    check = gate.check

    async def behavior(request: Any, context: Context) -> Any:
        try:
            identity = check(method, request, context)
        except ApiError as exc:
            await errors.abort(context, exc)
        return await inner(request, context, identity)

    return behavior


def _streaming(
    gate: Gate, method: str, inner: Streaming
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    check = gate.check

    async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            identity = check(method, request, context)
        except ApiError as exc:
            await errors.abort(context, exc)
        async for item in inner(request, context, identity):
            yield item

    return behavior


async def _unimplemented(request: Any, context: Context) -> Any:
    await errors.abort(
        context,
        ApiError(grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED", "method not implemented"),
    )


def service_handlers(
    service: ServiceDescriptor, servicer: object, gate: Gate
) -> dict[str, Handler]:
    """One gated handler per method of `service`, calling the servicer's method of that name.

    Servicer methods must be coroutine functions (unary) or async generator functions (server
    streaming) taking (request, context, identity); anything else answers UNIMPLEMENTED.
    """
    handlers: dict[str, Handler] = {}
    for m in service.methods:
        path = f"/{service.full_name}/{m.name}"
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        deserialize = guarded_deserializer(request_cls.FromString)
        serialize = response_cls.SerializeToString
        impl = getattr(servicer, m.name, None)
        if m.client_streaming:
            raise ValueError(f"{path}: client streaming is not supported")
        if m.server_streaming:
            if not inspect.isasyncgenfunction(impl):
                log.error("%s has no async generator servicer method", path)
                raise ValueError(f"{path}: servicer method must be an async generator")
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(gate, path, impl),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
            continue
        behavior: Callable[[Any, Context], Awaitable[Any]]
        if inspect.iscoroutinefunction(impl):
            assert impl is not None
            behavior = _unary(gate, path, impl)
        else:
            log.warning("%s has no async servicer method: answering UNIMPLEMENTED", path)
            behavior = _unimplemented
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=deserialize, response_serializer=serialize
        )
    return handlers


def add_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, gate: Gate
) -> None:
    handlers = service_handlers(service, servicer, gate)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)

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

The gate is also where calls are observed, once for every custody.v1 call: a request id (the
caller's `x-request-id` if well formed, else a new one; returned in the trailing metadata, see
`ledger.logs`) kept in a context variable for the call's log records, one access log line
(`ledger.api.access`: method, status, reason, duration; WARNING for server faults, INFO for
other errors, DEBUG for successful calls), and the RPC metrics (`ledger.metrics.rpc_done`:
count by method and status code, latency of unary calls).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from ledger import logs, metrics
from ledger.api import errors
from ledger.api.auth import Access, Identity, IdentitySource, authorize
from ledger.api.deadlines import check_deadline
from ledger.api.decode_guard import guarded_deserializer, refuse_undecodable
from ledger.api.errors import ApiError
from ledger.validate import is_platform_id

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


access_log = logging.getLogger("ledger.api.access")
_perf = time.perf_counter
# answers that mean the server (or its database) failed, not the caller
_SERVER_FAULTS: Final = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNAVAILABLE"})
_TRAILER: Final = logs.REQUEST_ID_HEADER


def _begin(name: str, context: Context) -> tuple[logs.Call, Any]:
    """Start observing a call: its request id, in the context and in the trailing metadata."""
    call, token = logs.begin_call(name, context.invocation_metadata())
    context.set_trailing_metadata(((_TRAILER, call.request_id),))
    return call, token


def _identify(call: logs.Call, identity: Identity, request: Any) -> None:
    call.role = identity.role.value
    platform = identity.platform_id or getattr(request, "platform_id", "")
    if platform and isinstance(platform, str) and is_platform_id(platform):
        call.platform = platform


def _code_of(context: Context) -> str:
    code = context.code()
    return "OK" if code is None else getattr(code, "name", str(code))


def finish(call: logs.Call, code: str) -> None:
    """Count and log the call's answer, once: `errors.abort` calls it before an error status
    goes out (so a caller that has its answer also finds it in the metrics), the gate after."""
    if call.done:
        return
    call.done = True
    elapsed = _perf() - call.started
    metrics.rpc_done(call.method, code, None if call.streaming else elapsed)
    # A JSON line costs ~20 us of CPU, a metric ~1 us: successful calls are counted and timed in
    # the metrics and logged at DEBUG only; every error answer is logged.
    if code == "OK":
        level = logging.DEBUG
    else:
        level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
    if access_log.isEnabledFor(level):
        # the call's fields explicitly: a stream may end in another context (closed by the loop)
        extra = {
            "request_id": call.request_id,
            "method": call.method,
            "platform": call.platform or None,
            "role": call.role or None,
            "reason": call.reason or None,
            "status": code,
            "duration_ms": round(elapsed * 1000, 3),
        }
        access_log.log(level, "rpc", extra=extra)


def _end(call: logs.Call, token: Any, code: str) -> None:
    finish(call, code)
    logs.end_call(token)


def _unary(gate: Gate, method: str, inner: Unary) -> Callable[[Any, Context], Awaitable[Any]]:
    check = gate.check
    name = metrics.short_method(method)

    async def behavior(request: Any, context: Context) -> Any:
        started = _perf()
        call, token = _begin(name, context)
        call.started = started
        code = "OK"
        try:
            try:
                identity = check(method, request, context)
            except ApiError as exc:
                await errors.abort(context, exc)
            _identify(call, identity, request)
            return await inner(request, context, identity)
        except grpc.aio.AbortError:
            code = _code_of(context)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            _end(call, token, code)

    return behavior


def _streaming(
    gate: Gate, method: str, inner: Streaming
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    check = gate.check
    name = metrics.short_method(method)

    async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
        started = _perf()
        call, token = _begin(name, context)
        call.started = started
        call.streaming = True
        code = "OK"
        try:
            try:
                identity = check(method, request, context)
            except ApiError as exc:
                await errors.abort(context, exc)
            _identify(call, identity, request)
            async for item in inner(request, context, identity):
                yield item
            code = _code_of(context)
        except grpc.aio.AbortError:
            code = _code_of(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            _end(call, token, code)

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

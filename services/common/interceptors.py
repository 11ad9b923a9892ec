"""gRPC interceptors: request id, deadline, error mapping, metrics and the access log.

ServerInterceptor is the one place where domain exceptions (services.common.errors)
become canonical gRPC status codes with google.rpc details. client_interceptors()
carries the current request id and deadline to downstream calls.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import context as request_context
from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError
from services.common.metrics import ServerMetrics

REQUEST_ID_KEY = "x-request-id"
#: trailing metadata: milliseconds from asking the engine to its first text, as the
#: inference service saw it; callers subtract it from their own TTFT to get what the hops add
ENGINE_TTFT_KEY = "x-servemesh-engine-ttft-ms"
#: request metadata: the route class a call belongs to; the mesh picks the class's route by it
ROUTE_CLASS_KEY = "x-servemesh-route-class"
#: whole seconds a refused caller should wait (also in google.rpc.RetryInfo), for HTTP clients
RETRY_AFTER_KEY = "retry-after"
ERROR_DOMAIN = "servemesh.local"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Probes and tooling: their successful calls are logged at DEBUG so probes do not flood the log.
QUIET_SERVICES: frozenset[str] = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

access_log = logging.getLogger("servemesh.access")
_log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]


# --- error mapping ------------------------------------------------------------------


def error_status(exc: ServiceError, *, request_id: str = "") -> grpc.Status:
    """google.rpc.Status for a domain error: BadRequest, QuotaFailure, RetryInfo and ErrorInfo details."""
    code = grpc.StatusCode[exc.code.value]
    details: list[Any] = []
    if isinstance(exc, InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in exc.violations
                ]
            )
        )
    if isinstance(exc, ResourceExhausted) and exc.violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                    for v in exc.violations
                ]
            )
        )
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(exc.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    metadata = {**exc.metadata, **({"request_id": request_id} if request_id else {})}
    details.append(error_details_pb2.ErrorInfo(reason=_reason(exc), domain=ERROR_DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=[_pack(d) for d in details])
    rich = rpc_status.to_status(status)
    if exc.retry_after is None:
        return rich
    # Also as plain metadata: Envoy's transcoder passes it on as the HTTP Retry-After header.
    retry = (RETRY_AFTER_KEY, str(max(1, math.ceil(exc.retry_after))))
    return _Status(rich.code, rich.details, (*rich.trailing_metadata, retry))


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _reason(exc: ServiceError) -> str:
    """UPPER_SNAKE_CASE of the exception class name, e.g. ModelNotLoaded -> MODEL_NOT_LOADED."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(exc).__name__).upper()


# --- server side --------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """Book-keeping for one RPC, from the first line of the handler to its final status."""

    service: str
    method: str
    full_method: str
    state: request_context.RequestState
    started: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    error: str | None = None
    finished: bool = False

    def cancelled_code(self) -> grpc.StatusCode:
        deadline = self.state.deadline
        expired = deadline is not None and time.monotonic() >= deadline
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class _Context:
    """The servicer context handed to handlers.

    Delegates everything to the grpc context, but puts x-request-id into the initial
    metadata, which is sent exactly once: with the handler's own metadata if it sends
    some, otherwise before the first message, the unary response or the error status.
    """

    def __init__(self, inner: grpc.aio.ServicerContext, request_id: str) -> None:
        self._inner = inner
        self._request_id = request_id
        self._metadata_sent = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        pairs = tuple(initial_metadata)
        if not any(key == REQUEST_ID_KEY for key, _ in pairs):
            pairs += ((REQUEST_ID_KEY, self._request_id),)
        self._metadata_sent = True  # set first: grpc refuses a second attempt even if this one fails
        await self._inner.send_initial_metadata(pairs)

    async def ensure_initial_metadata(self) -> None:
        if not self._metadata_sent:
            await self.send_initial_metadata(())

    async def write(self, message: Any) -> None:
        await self.ensure_initial_metadata()
        await self._inner.write(message)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> NoReturn:
        retry_after = tuple((k, v) for k, v in trailing_metadata if k == RETRY_AFTER_KEY)
        # Retry-after goes in the headers too (Envoy's transcoder makes HTTP headers of those).
        # Nothing else does: a status with no headers before it is "trailers-only", which the
        # transcoder turns into the HTTP status of the code (401, 400...) even on a streaming
        # RPC; headers sent first would commit a streaming REST response to 200.
        if not self._metadata_sent and retry_after:
            try:
                await self.send_initial_metadata(retry_after)
            except (grpc.aio.UsageError, grpc.aio.InternalError):  # call already over; trailers carry the id
                _log.debug("could not send initial metadata before the status", exc_info=True)
        trailers = tuple(trailing_metadata)
        if not any(key == REQUEST_ID_KEY for key, _ in trailers):
            trailers += ((REQUEST_ID_KEY, self._request_id),)
        await self._inner.abort(code, details, trailers)
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)


Behavior = Callable[[Any, Any], Any]


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Request id, deadline, error mapping, metrics and access log for every handler kind."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, full_method), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, full_method), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, full_method), **codec)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, full_method), **codec)

    def _unary(self, behavior: Behavior, full_method: str) -> Behavior:
        async def handle(request: Any, grpc_context: grpc.aio.ServicerContext) -> Any:
            call, ctx = self._begin(full_method, grpc_context)
            try:
                response = behavior(request, ctx)
                if inspect.isawaitable(response):
                    response = await response
                await ctx.ensure_initial_metadata()
                call.code = grpc_context.code() or grpc.StatusCode.OK
                return response
            except BaseException as exc:
                await self._fail(exc, call, ctx)
                raise
            finally:
                self._finish(call)

        return handle

    def _stream(self, behavior: Behavior, full_method: str) -> Behavior:
        async def handle(request: Any, grpc_context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, ctx = self._begin(full_method, grpc_context)
            try:
                result = behavior(request, ctx)
                if inspect.isawaitable(result):  # a handler using context.write()
                    await result
                elif hasattr(result, "__aiter__"):
                    messages = result.__aiter__()
                    try:
                        async for message in messages:
                            await ctx.ensure_initial_metadata()
                            yield message
                    finally:  # close the handler's generator now, not whenever it is collected
                        aclose = getattr(messages, "aclose", None)
                        if aclose is not None:
                            await aclose()
                else:
                    for message in result:
                        await ctx.ensure_initial_metadata()
                        yield message
                await ctx.ensure_initial_metadata()
                call.code = grpc_context.code() or grpc.StatusCode.OK
            except GeneratorExit:  # grpc stopped consuming: the call was cancelled
                call.code = call.cancelled_code()
                raise
            except BaseException as exc:
                await self._fail(exc, call, ctx)
                raise
            finally:
                self._finish(call)

        return handle

    def _begin(self, full_method: str, grpc_context: grpc.aio.ServicerContext) -> tuple[_Call, _Context]:
        request_id = incoming_request_id(grpc_context.invocation_metadata())
        now = time.monotonic()  # read before time_remaining(): errs on the early side
        remaining = grpc_context.time_remaining()
        deadline = None if remaining is None else now + remaining
        state = request_context.bind(request_id, deadline)
        service, method = split_method(full_method)
        call = _Call(service=service, method=method, full_method=full_method, state=state)
        if self._metrics is not None:
            self._metrics.started(service, method)
        return call, _Context(grpc_context, request_id)

    async def _fail(self, exc: BaseException, call: _Call, ctx: _Context) -> None:
        """Record how the call failed; map domain and unexpected errors to a status (raises AbortError)."""
        if isinstance(exc, asyncio.CancelledError):
            call.code = call.cancelled_code()
        elif isinstance(exc, grpc.aio.AbortError):
            call.code = ctx.code() or grpc.StatusCode.UNKNOWN
        elif isinstance(exc, ServiceError):
            status = error_status(exc, request_id=call.state.request_id)
            call.code, call.error = status.code, type(exc).__name__
            await ctx.abort(status.code, status.details, status.trailing_metadata)
        elif isinstance(exc, Exception):
            call.code, call.error = grpc.StatusCode.INTERNAL, type(exc).__name__
            _log.error(
                "unhandled exception in %s",
                call.full_method,
                exc_info=exc,
                extra={"request_id": call.state.request_id, "method": call.full_method},
            )
            await ctx.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {call.state.request_id})")

    def _finish(self, call: _Call) -> None:
        if call.finished:
            return
        call.finished = True
        elapsed = time.perf_counter() - call.started
        if self._metrics is not None:
            self._metrics.finished(call.service, call.method, call.code.name, elapsed)
        extra: dict[str, Any] = {
            "request_id": call.state.request_id,
            "method": call.full_method,
            "code": call.code.name,
            "latency_ms": round(elapsed * 1000, 3),
        }
        if call.error:
            extra["error"] = call.error
        extra.update(call.state.fields)
        quiet = call.service in QUIET_SERVICES and call.code == grpc.StatusCode.OK
        access_log.log(logging.DEBUG if quiet else logging.INFO, "rpc", extra=extra)


def split_method(full_method: str) -> tuple[str, str]:
    """Split "/pkg.Service/Method" into ("pkg.Service", "Method")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def incoming_request_id(metadata: Metadata | None) -> str:
    """The caller's x-request-id if it is a sane token, else a fresh uuid4 hex."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value):
            return value
    return uuid.uuid4().hex


# --- client side --------------------------------------------------------------------


def _propagate(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """Add the current request id and cap the timeout at the current deadline."""
    metadata = grpc.aio.Metadata.from_tuple(tuple(details.metadata or ()))
    current_id = request_context.request_id()
    if current_id and REQUEST_ID_KEY not in metadata:
        metadata.add(REQUEST_ID_KEY, current_id)
    timeout = details.timeout
    remaining = request_context.remaining_timeout()
    if remaining is not None:
        timeout = remaining if timeout is None else min(timeout, remaining)
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_propagate(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_propagate(client_call_details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_propagate(client_call_details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_propagate(client_call_details), request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Propagate x-request-id and the deadline on every outgoing call (one per RPC kind)."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]

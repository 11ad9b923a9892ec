"""Outgoing gRPC channels (request-id/deadline propagation, tracing) and downstream errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.trace import TracerProvider

from services.common import tracing
from services.common.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.interceptors import client_interceptors

MAX_MESSAGE_BYTES = 32 * 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Detect a dead peer on a long stream within ~40 s; servers accept pings every 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def insecure_channel(
    target: str,
    *,
    options: Sequence[tuple[str, Any]] = (),
    tracer_provider: TracerProvider | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A plaintext channel (mTLS comes from the mesh sidecar); `options` override CHANNEL_OPTIONS;
    `interceptors` run after the standard ones."""
    return grpc.aio.insecure_channel(
        target,
        options=list({**dict(CHANNEL_OPTIONS), **dict(options)}.items()),
        interceptors=[*client_interceptors(), *tracing.client_interceptors(tracer_provider), *interceptors],
    )


_ERROR_CLASSES: dict[str, type[ServiceError]] = {
    cls.code.value: cls for cls in (NotFound, FailedPrecondition, ResourceExhausted, Unavailable, DeadlineExceeded)
}
# Other downstream codes: a call cut short (e.g. the peer draining) is worth retrying and a
# conflict stays a conflict; anything else (UNKNOWN, UNIMPLEMENTED, PERMISSION_DENIED between
# services, ...) is this service's or the downstream's fault, not the caller's: INTERNAL.
_RELAYED_AS = {"CANCELLED": Code.UNAVAILABLE, "ABORTED": Code.ABORTED}


def error_from_rpc(error: grpc.RpcError, field_map: Mapping[str, str] | None = None) -> ServiceError:
    """The domain error for a failed downstream call, keeping BadRequest fields and RetryInfo.

    `field_map` renames field-path prefixes in violations (e.g. {"sampling": "params"}
    turns "sampling.temperature" into "params.temperature") so errors relayed to a
    caller name that caller's fields.
    """
    code_name = error.code().name  # type: ignore[attr-defined]
    message = error.details() or code_name  # type: ignore[attr-defined]
    status = _rich_status(error)
    retry_after = None
    violations: list[FieldViolation] = []
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            retry_after = info.retry_delay.ToTimedelta().total_seconds()
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            violations += [
                FieldViolation(_rename(v.field, field_map or {}), v.description) for v in bad.field_violations
            ]
    if code_name == Code.INVALID_ARGUMENT:
        return _invalid_argument(violations, message, retry_after)
    if code_name in _ERROR_CLASSES:
        return _ERROR_CLASSES[code_name](message, retry_after=retry_after)
    relayed = ServiceError(message, retry_after=retry_after)
    relayed.code = _RELAYED_AS.get(code_name, Code.INTERNAL)
    return relayed


def _rich_status(error: grpc.RpcError) -> Any:
    try:
        return rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details inconsistent with the status: ignore them
        return None


def _rename(field: str, field_map: Mapping[str, str]) -> str:
    for source in sorted(field_map, key=len, reverse=True):
        if field == source or field.startswith(source + "."):
            return field_map[source] + field[len(source) :]
    return field


def _invalid_argument(violations: list[FieldViolation], message: str, retry_after: float | None) -> InvalidArgument:
    invalid = InvalidArgument(violations)
    if not violations:  # a plain INVALID_ARGUMENT without BadRequest: keep its message
        invalid.message = message
        invalid.args = (message,)
    invalid.retry_after = retry_after
    return invalid

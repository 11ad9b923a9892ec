"""Domain exceptions shared by every service.

Core code raises these (it never imports grpc); the error-mapping interceptor in
services.common.interceptors is the one place that turns them into canonical gRPC
status codes with google.rpc details.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Code(StrEnum):
    """Canonical codes (google.rpc.Code names) a domain error can carry."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    ABORTED = "ABORTED"
    DATA_LOSS = "DATA_LOSS"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: `field` is a dotted path such as "params.temperature"."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of every domain error. `retry_after` (seconds) becomes google.rpc.RetryInfo;
    `metadata` is machine-readable context for the google.rpc.ErrorInfo detail."""

    code: Code = Code.INTERNAL

    def __init__(
        self, message: str, *, retry_after: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(ServiceError):
    """Bad input; carries google.rpc.BadRequest field violations."""

    code = Code.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        self.violations = violations if isinstance(violations, list) else [violations]
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class NotFound(ServiceError):
    code = Code.NOT_FOUND


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = Code.FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exceeded quota: `subject` names what is limited (e.g. "key:k_1f3a"), `description`
    the limit (e.g. "60 requests per minute")."""

    subject: str
    description: str


class ResourceExhausted(ServiceError):
    """A limit was hit; `violations` become google.rpc.QuotaFailure, `retry_after` RetryInfo
    (and Retry-After through Envoy)."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        violations: list[QuotaViolation] | None = None,
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, metadata=metadata)
        self.violations = list(violations or [])


class Unauthenticated(ServiceError):
    """No credentials, or credentials that are unknown, revoked or expired."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """Authenticated, but not allowed to do this."""

    code = Code.PERMISSION_DENIED


class Unavailable(ServiceError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = Code.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    """The request was aborted (an engine's abort(), or the engine closed)."""

    code = Code.ABORTED

"""Domain errors of the registry (mapped to gRPC status by services.common.interceptors)."""

from __future__ import annotations

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, Unavailable


class ResourceNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} does not exist", metadata={"resource": name})


class ResourceExists(AlreadyExists):
    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name} already exists{detail}", metadata={"resource": name})


class EtagMismatch(Aborted):
    """The resource changed since the caller read it; `current_etag` is what it is now."""

    def __init__(self, name: str, current_etag: str) -> None:
        super().__init__(
            f"{name} changed since it was read: its current etag is {current_etag!r}; read it again and retry",
            metadata={"resource": name, "current_etag": current_etag},
        )
        self.current_etag = current_etag


class RouteLocked(FailedPrecondition):
    def __init__(self, name: str, hint: str) -> None:
        super().__init__(f"{name} is locked: {hint}", metadata={"resource": name})


class DeploymentInUse(FailedPrecondition):
    def __init__(self, name: str, routes: list[str]) -> None:
        super().__init__(
            f"{name} is still used by {', '.join(routes)}: remove it from their backends and header overrides first",
            metadata={"resource": name, "routes": ",".join(routes)},
        )


class ApiKeyRevoked(FailedPrecondition):
    def __init__(self, name: str, revoke_time: str) -> None:
        super().__init__(f"{name} was revoked already, at {revoke_time}", metadata={"resource": name})


class InvalidApiKey(NotFound):
    """VerifyApiKey's one answer for a secret that is malformed, unknown, revoked or expired:
    it must not tell a guesser which (and never repeats the secret)."""

    def __init__(self) -> None:
        super().__init__("no active API key has this secret")


class DatabaseUnavailable(Unavailable):
    def __init__(self, detail: str) -> None:
        super().__init__(f"registry database unavailable: {detail}", retry_after=1.0)


class ShuttingDown(Unavailable):
    def __init__(self) -> None:
        super().__init__("registry is shutting down; reconnect", retry_after=1.0)

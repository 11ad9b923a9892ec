"""Domain errors of the registry (mapped to gRPC status by services.common.interceptors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, Unavailable

if TYPE_CHECKING:
    from services.registry.resources import RolloutState, Route


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
            f"{name} is still used by {', '.join(routes)}: remove it from their backends, header overrides and"
            " mirrors first",
            metadata={"resource": name, "routes": ",".join(routes)},
        )


class StableNotServing(FailedPrecondition):
    """A rollout must start from a deployment the route sends traffic to."""

    def __init__(self, route: Route, stable: str) -> None:
        backends = ", ".join(f"{b.deployment}={b.weight}" for b in route.backends)
        super().__init__(
            f"{route.name} does not send {stable} traffic (its backends: {backends}): a rollout starts from a"
            " deployment the route serves with a positive weight",
            metadata={"resource": route.name, "deployment": stable},
        )


class RolloutActive(FailedPrecondition):
    def __init__(self, route: str, other: str) -> None:
        super().__init__(
            f"{route} already has an active rollout, {other}: at most one per route; wait for it to end or abort it",
            metadata={"resource": route, "rollout": other},
        )


class RolloutStateConflict(FailedPrecondition):
    """The rollout's state does not allow the change; the message names the state."""

    def __init__(self, name: str, state: RolloutState, detail: str) -> None:
        super().__init__(f"{name} is {state.value}: {detail}", metadata={"resource": name, "state": state.value})
        self.state = state


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

"""The registry's resources as domain objects (what core.py works on and store.py stores)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

DEPLOYMENTS = "deployments/"
ROUTES = "routes/"
TENANTS = "tenants/"
ROLLOUTS = "rollouts/"
#: between the tenant id and the key id in an API key's name: tenants/{tenant}/apiKeys/{key}
API_KEYS = "/apiKeys/"
#: the tenant id that stands for every tenant in a key's name or parent (tenants/-/apiKeys/{key})
ANY_TENANT = "-"


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str  # deployments/{id}
    service: str
    version: str
    endpoint: str  # host:port
    engine: str = ""
    model_id: str = ""
    create_time: datetime | None = None  # output only
    metrics_url: str = ""  # "" = none


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    deployment: str  # deployments/{id}
    weight: int


@dataclass(frozen=True, slots=True)
class HeaderOverride:
    header: str
    value: str
    deployment: str  # deployments/{id}


@dataclass(frozen=True, slots=True)
class RouteMirror:
    deployment: str  # deployments/{id}
    percent: float  # share of the route's requests copied, in (0, 100]


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # routes/{id}
    service: str
    route_class: str = ""
    backends: tuple[WeightedBackend, ...] = ()
    header_overrides: tuple[HeaderOverride, ...] = ()
    locked: bool = False
    timeout: timedelta | None = None  # None: the mesh default
    etag: str = ""  # output only (input on update: the version the change is based on)
    revision: int = 0  # output only
    update_time: datetime | None = None  # output only
    mirrors: tuple[RouteMirror, ...] = ()  # shadow traffic; responses discarded


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str  # tenants/{id}
    display_name: str = ""
    create_time: datetime | None = None  # output only


class Tier(StrEnum):
    FREE = "free"
    PAID = "paid"
    ENTERPRISE = "enterprise"


class KeyState(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored, without its secret (the store keeps only a keyed hash of it)."""

    name: str  # tenants/{tenant}/apiKeys/{key}; chosen by the registry
    tier: str  # a Tier value ("" = unspecified, refused on create)
    route_classes: tuple[str, ...] = ()  # empty: every route class
    display_name: str = ""
    expire_time: datetime | None = None  # None: never expires
    revoke_time: datetime | None = None  # output only
    create_time: datetime | None = None  # output only
    state: KeyState = KeyState.ACTIVE  # output only, as of the read

    @property
    def tenant(self) -> str:
        return self.name.removeprefix(TENANTS).partition("/")[0]

    @property
    def key_id(self) -> str:
        return self.name.rpartition("/")[2]


def key_state(revoke_time: datetime | None, expire_time: datetime | None, now: datetime) -> KeyState:
    if revoke_time is not None:
        return KeyState.REVOKED
    if expire_time is not None and expire_time <= now:
        return KeyState.EXPIRED
    return KeyState.ACTIVE


def api_key_name(tenant_id: str, key_id: str) -> str:
    return f"{TENANTS}{tenant_id}{API_KEYS}{key_id}"


# --- rollouts -----------------------------------------------------------------------


class RolloutState(StrEnum):
    UNSPECIFIED = ""  # only ever in a request (refused there); never stored
    PENDING = "PENDING"
    PROGRESSING = "PROGRESSING"
    PAUSED = "PAUSED"
    PROMOTED = "PROMOTED"
    ABORTED = "ABORTED"
    ROLLED_BACK = "ROLLED_BACK"


#: a rollout in one of these has not ended: at most one of them per route
ACTIVE_ROLLOUT_STATES = (RolloutState.PENDING, RolloutState.PROGRESSING, RolloutState.PAUSED)


@dataclass(frozen=True, slots=True)
class RolloutStep:
    weight: int  # canary percent of the route's traffic
    mirror_percent: float = 0.0  # percent of the route's requests also copied to the canary
    pause: timedelta = timedelta(0)  # 0: held until an operator resumes or promotes
    analysis: bool = False


@dataclass(frozen=True, slots=True)
class AnalysisSpec:
    """Thresholds of a rollout's analysis; None (a request's unset field) takes the default,
    and a stored rollout has every field filled in (validation.filled_analysis)."""

    window: timedelta | None = None
    min_requests: int | None = None
    max_error_rate: float | None = None
    max_error_rate_margin: float | None = None
    max_latency_ratio: float | None = None
    max_cost_ratio: float | None = None
    golden_set: str = ""  # "" = none
    max_golden_drop: float | None = None
    inconclusive_limit: int | None = None
    latency_slack_seconds: float | None = None


class Verdict(StrEnum):
    UNSPECIFIED = ""
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True, slots=True)
class Measurement:
    metric: str
    canary: float = 0.0
    stable: float = 0.0
    threshold: float = 0.0
    verdict: Verdict = Verdict.UNSPECIFIED
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AnalysisWindow:
    start_time: datetime | None = None
    end_time: datetime | None = None
    step: int = 0
    verdict: Verdict = Verdict.UNSPECIFIED
    measurements: tuple[Measurement, ...] = ()
    source: str = ""


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    time: datetime
    actor: str
    from_state: RolloutState
    to_state: RolloutState
    step: int  # the current step after the event
    reason: str


@dataclass(frozen=True, slots=True)
class Rollout:
    name: str  # rollouts/{id}
    route: str  # routes/{id}
    stable_deployment: str  # deployments/{id}
    canary_deployment: str  # deployments/{id}
    steps: tuple[RolloutStep, ...] = ()  # empty on create: the default steps
    analysis: AnalysisSpec = AnalysisSpec()
    state: RolloutState = RolloutState.UNSPECIFIED  # output only
    current_step: int = 0  # output only
    step_start_time: datetime | None = None  # output only
    applied_weight: int = 0  # output only
    applied_mirror_percent: float = 0.0  # output only
    message: str = ""  # output only
    windows: tuple[AnalysisWindow, ...] = ()  # output only; newest last, at most MAX_WINDOWS
    history: tuple[RolloutEvent, ...] = ()  # output only; oldest first
    etag: str = ""  # output only (input on UpdateRolloutStatus: the version the change is based on)
    create_time: datetime | None = None  # output only
    update_time: datetime | None = None  # output only

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ROLLOUT_STATES


@dataclass(frozen=True, slots=True)
class RolloutsState:
    """Every rollout at one revision, newest first (what WatchRollouts followers get)."""

    revision: int
    rollouts: tuple[Rollout, ...]


# --- audit ----------------------------------------------------------------------------


class Action(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    TRANSITION = "TRANSITION"  # a rollout's state or step changed


@dataclass(frozen=True, slots=True)
class AuditEntry:
    revision: int
    time: datetime
    actor: str
    action: Action
    resource: str
    reason: str
    before: dict[str, Any] | None  # JSON form of the resource; None on create
    after: dict[str, Any] | None  # None on delete


@dataclass(frozen=True, slots=True)
class RoutingState:
    """Everything a follower needs, at one revision: routes and deployments ordered by name."""

    revision: int
    routes: tuple[Route, ...]
    deployments: tuple[Deployment, ...]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str = ""


#: a resource the audit log records
Resource = Deployment | Route | Tenant | ApiKey | Rollout
#: JSON form of a resource for the audit log (the servicer's protobuf JSON mapping)
Encoder = Callable[[Resource], dict[str, Any]]


def resource_id(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def etag_for(name: str, revision: int) -> str:
    """Opaque version of a resource: changes with every change, differs between re-creations."""
    digest = hashlib.blake2b(f"{name}@{revision}".encode(), digest_size=12).digest()
    return base64.urlsafe_b64encode(digest).decode()

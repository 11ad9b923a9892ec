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


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str  # deployments/{id}
    service: str
    version: str
    endpoint: str  # host:port
    engine: str = ""
    model_id: str = ""
    create_time: datetime | None = None  # output only


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


class Action(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


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


#: JSON form of a resource for the audit log (the servicer's protobuf JSON mapping)
Encoder = Callable[[Deployment | Route], dict[str, Any]]


def resource_id(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def etag_for(name: str, revision: int) -> str:
    """Opaque version of a resource: changes with every change, differs between re-creations."""
    digest = hashlib.blake2b(f"{name}@{revision}".encode(), digest_size=12).digest()
    return base64.urlsafe_b64encode(digest).decode()

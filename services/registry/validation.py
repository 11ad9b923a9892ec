"""Field rules of the registry's resources and requests (INVALID_ARGUMENT names field and limit).

These check what a request says on its own; what depends on the stored state (references
to deployments, etags, locks) is checked by core.py inside the write transaction.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from services.common.errors import FieldViolation, InvalidArgument
from services.registry.keys import KEY_ID_RE
from services.registry.resources import (
    ANY_TENANT,
    API_KEYS,
    DEPLOYMENTS,
    ROUTES,
    TENANTS,
    ApiKey,
    Deployment,
    HeaderOverride,
    Route,
    Tenant,
    Tier,
    WeightedBackend,
)

ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
ROUTE_CLASS_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
ENGINE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MODEL_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
HEADER_RE = re.compile(r"[a-z0-9-]{1,64}")
HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]{1,256}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")

MAX_WEIGHT = 10_000
MAX_BACKENDS = 16
MAX_HEADER_OVERRIDES = 8
MAX_TIMEOUT = timedelta(seconds=600)
MAX_REASON = 500
MAX_FILTER = 256
MAX_DISPLAY_NAME = 128
MAX_KEY_ROUTE_CLASSES = 32
MIN_KEY_LIFETIME = timedelta(seconds=60)
MAX_KEY_LIFETIME = timedelta(days=1826)
#: the fields UpdateRoute may replace (update_mask paths)
UPDATABLE_FIELDS = ("backends", "header_overrides", "locked", "timeout")
#: every field of a route a client sets on create
ROUTE_FIELDS = ("name", "service", "route_class", "backends", "header_overrides", "timeout")

ID_RULE = "1-63 characters of a-z, 0-9 and '-', starting with a letter"
ROUTE_CLASS_RULE = "1-63 characters of a-z, 0-9, '_' and '-', starting with a letter"
KEY_ID_RULE = "16 characters of a-z and 2-7"


def show(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


def name_violations(name: str, prefix: str, path: str = "name") -> list[FieldViolation]:
    """`name` must be <prefix>{id}, e.g. routes/inference."""
    if not name:
        return [FieldViolation(path, f"required: {prefix}{{id}}")]
    if not name.startswith(prefix) or not ID_RE.fullmatch(name[len(prefix) :]):
        return [FieldViolation(path, f"must be {prefix}{{id}} with an id of {ID_RULE}; got {show(name)}")]
    return []


def id_violations(value: str, path: str, *, required: bool = True) -> list[FieldViolation]:
    if not value:
        return [FieldViolation(path, f"required: {ID_RULE}")] if required else []
    if not ID_RE.fullmatch(value):
        return [FieldViolation(path, f"must be {ID_RULE}; got {show(value)}")]
    return []


def endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` is not host:port (hostname, IPv4 or [IPv6], port 1-65535), or None."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        return "must be host:port"
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "port must be 1-65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "host is not an IPv6 address"
        return None
    if not HOSTNAME_RE.fullmatch(host):
        return "host must be a hostname, an IPv4 address or a bracketed IPv6 address"
    return None


def validate_reason(reason: str) -> list[FieldViolation]:
    if not reason.strip():
        return [FieldViolation("reason", f"required: why, for the audit log (1-{MAX_REASON} characters)")]
    if len(reason) > MAX_REASON:
        return [FieldViolation("reason", f"must be at most {MAX_REASON} characters; got {len(reason)}")]
    return []


def validate_filter(value: str, path: str) -> list[FieldViolation]:
    if len(value) > MAX_FILTER:
        return [FieldViolation(path, f"must be at most {MAX_FILTER} characters; got {len(value)}")]
    return []


def validate_deployment(d: Deployment) -> list[FieldViolation]:
    out = name_violations(d.name, DEPLOYMENTS, "deployment.name")
    out += id_violations(d.service, "deployment.service")
    out += id_violations(d.version, "deployment.version")
    if not d.endpoint:
        out.append(FieldViolation("deployment.endpoint", "required: host:port"))
    elif (problem := endpoint_problem(d.endpoint)) is not None:
        out.append(FieldViolation("deployment.endpoint", f"{problem}; got {show(d.endpoint)}"))
    if d.engine and not ENGINE_RE.fullmatch(d.engine):
        out.append(FieldViolation("deployment.engine", "must be 1-63 characters of a-z, 0-9, '.', '_' and '-'"))
    if d.model_id and not MODEL_ID_RE.fullmatch(d.model_id):
        out.append(FieldViolation("deployment.model_id", "must be 1-256 printable ASCII characters without spaces"))
    return out


def validate_route_fields(r: Route, fields: Iterable[str]) -> list[FieldViolation]:
    """The shape of the named fields of a route (references are checked against the store)."""
    fields = set(fields)
    out: list[FieldViolation] = []
    if "name" in fields:
        out += name_violations(r.name, ROUTES, "route.name")
    if "service" in fields:
        out += id_violations(r.service, "route.service")
    if "route_class" in fields and r.route_class and not ROUTE_CLASS_RE.fullmatch(r.route_class):
        out.append(
            FieldViolation(
                "route.route_class",
                f"must be empty or {ROUTE_CLASS_RULE}; got {show(r.route_class)}",
            )
        )
    if "backends" in fields:
        out += _backend_violations(r.backends)
    if "header_overrides" in fields:
        out += _override_violations(r.header_overrides)
    if "timeout" in fields and r.timeout is not None and not timedelta(0) < r.timeout <= MAX_TIMEOUT:
        out.append(
            FieldViolation(
                "route.timeout",
                f"must be in (0, {MAX_TIMEOUT.total_seconds():.0f}s] or unset; got {r.timeout.total_seconds()}s",
            )
        )
    return out


def _backend_violations(backends: Sequence[WeightedBackend]) -> list[FieldViolation]:
    path = "route.backends"
    out: list[FieldViolation] = []
    if not 1 <= len(backends) <= MAX_BACKENDS:
        out.append(FieldViolation(path, f"must have 1-{MAX_BACKENDS} backends; got {len(backends)}"))
    seen: dict[str, int] = {}
    for i, b in enumerate(backends):
        out += name_violations(b.deployment, DEPLOYMENTS, f"{path}[{i}].deployment")
        if b.deployment in seen:
            out.append(
                FieldViolation(f"{path}[{i}].deployment", f"{b.deployment} is already backend [{seen[b.deployment]}]")
            )
        seen.setdefault(b.deployment, i)
        if not 0 <= b.weight <= MAX_WEIGHT:
            out.append(FieldViolation(f"{path}[{i}].weight", f"must be in [0, {MAX_WEIGHT}]; got {b.weight}"))
    if backends and all(b.weight == 0 for b in backends):
        out.append(FieldViolation(path, "the weights must not all be zero"))
    return out


def _override_violations(overrides: Sequence[HeaderOverride]) -> list[FieldViolation]:
    path = "route.header_overrides"
    out: list[FieldViolation] = []
    if len(overrides) > MAX_HEADER_OVERRIDES:
        out.append(FieldViolation(path, f"must have at most {MAX_HEADER_OVERRIDES} overrides; got {len(overrides)}"))
    seen: dict[tuple[str, str], int] = {}
    for i, o in enumerate(overrides):
        if not HEADER_RE.fullmatch(o.header):
            out.append(
                FieldViolation(
                    f"{path}[{i}].header", f"must be 1-64 characters of a-z, 0-9 and '-'; got {show(o.header)}"
                )
            )
        if not HEADER_VALUE_RE.fullmatch(o.value):
            out.append(FieldViolation(f"{path}[{i}].value", "must be 1-256 printable ASCII characters"))
        out += name_violations(o.deployment, DEPLOYMENTS, f"{path}[{i}].deployment")
        if (o.header, o.value) in seen:
            out.append(
                FieldViolation(f"{path}[{i}]", f"same header and value as override [{seen[(o.header, o.value)]}]")
            )
        seen.setdefault((o.header, o.value), i)
    return out


def update_mask_violations(paths: Sequence[str]) -> list[FieldViolation]:
    if not paths:
        return [FieldViolation("update_mask", f"required: any of {', '.join(UPDATABLE_FIELDS)}")]
    out = []
    for path in paths:
        if path in ("service", "route_class"):
            out.append(FieldViolation("update_mask", f"{path!r} is immutable"))
        elif path not in UPDATABLE_FIELDS:
            out.append(
                FieldViolation("update_mask", f"unknown path {path!r}; use any of {', '.join(UPDATABLE_FIELDS)}")
            )
    return out


def references(route: Route, fields: Iterable[str]) -> list[tuple[str, str]]:
    """(field path, deployment name) of every deployment the named fields refer to."""
    fields = set(fields)
    refs: list[tuple[str, str]] = []
    if "backends" in fields:
        refs += [(f"route.backends[{i}].deployment", b.deployment) for i, b in enumerate(route.backends)]
    if "header_overrides" in fields:
        refs += [
            (f"route.header_overrides[{i}].deployment", o.deployment) for i, o in enumerate(route.header_overrides)
        ]
    return refs


def reference_violations(
    route: Route, refs: Iterable[tuple[str, str]], found: Mapping[str, Deployment]
) -> list[FieldViolation]:
    """Each referenced deployment (by name, in `found` if it exists) must implement the route's service."""
    out: list[FieldViolation] = []
    for path, name in refs:
        d = found.get(name)
        if d is None:
            out.append(FieldViolation(path, f"{name} does not exist"))
        elif d.service != route.service:
            out.append(FieldViolation(path, f"{name} implements {d.service!r}, not {route.service!r}"))
    return out


# --- tenants and API keys -------------------------------------------------------------


def display_name_violations(value: str, path: str) -> list[FieldViolation]:
    if len(value) > MAX_DISPLAY_NAME:
        return [FieldViolation(path, f"must be at most {MAX_DISPLAY_NAME} characters; got {len(value)}")]
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return [FieldViolation(path, "must not contain control characters")]
    return []


def validate_tenant(t: Tenant) -> list[FieldViolation]:
    return name_violations(t.name, TENANTS, "tenant.name") + display_name_violations(
        t.display_name, "tenant.display_name"
    )


def tenant_id_or_any(value: str) -> bool:
    return value == ANY_TENANT or ID_RE.fullmatch(value) is not None


def parent_violations(parent: str, *, allow_any: bool) -> list[FieldViolation]:
    """`parent` must be tenants/{tenant} (or tenants/- when `allow_any`)."""
    if allow_any and parent == TENANTS + ANY_TENANT:
        return []
    return name_violations(parent, TENANTS, "parent")


def api_key_name_violations(name: str, path: str = "name") -> list[FieldViolation]:
    """`name` must be tenants/{tenant}/apiKeys/{key}, where {tenant} may be '-' (any tenant)."""
    rule = f"tenants/{{tenant}}/apiKeys/{{key}}, {{tenant}} an id or '-', {{key}} {KEY_ID_RULE}"
    if not name:
        return [FieldViolation(path, f"required: {rule}")]
    tenant, sep, key = name.removeprefix(TENANTS).partition(API_KEYS)
    if not name.startswith(TENANTS) or not sep or not tenant_id_or_any(tenant) or not KEY_ID_RE.fullmatch(key):
        return [FieldViolation(path, f"must be {rule}; got {show(name)}")]
    return []


def validate_api_key(key: ApiKey, ttl: timedelta | None, now: datetime) -> list[FieldViolation]:
    """The fields a client sets on create; `now` is when the request arrived."""
    out: list[FieldViolation] = []
    if key.tier not in tuple(Tier):
        out.append(FieldViolation("api_key.tier", f"required: one of {', '.join(Tier)}"))
    out += display_name_violations(key.display_name, "api_key.display_name")
    classes = key.route_classes
    if len(classes) > MAX_KEY_ROUTE_CLASSES:
        out.append(
            FieldViolation(
                "api_key.route_classes", f"must have at most {MAX_KEY_ROUTE_CLASSES} classes; got {len(classes)}"
            )
        )
    seen: dict[str, int] = {}
    for i, klass in enumerate(classes):
        if not ROUTE_CLASS_RE.fullmatch(klass):
            out.append(FieldViolation(f"api_key.route_classes[{i}]", f"must be {ROUTE_CLASS_RULE}; got {show(klass)}"))
        elif klass in seen:
            out.append(FieldViolation(f"api_key.route_classes[{i}]", f"{klass!r} is already [{seen[klass]}]"))
        seen.setdefault(klass, i)
    lifetime = f"[{MIN_KEY_LIFETIME.total_seconds():.0f}s, {MAX_KEY_LIFETIME.days} days]"
    if ttl is not None and key.expire_time is not None:
        out.append(FieldViolation("api_key.ttl", "set expire_time or ttl, not both"))
    elif ttl is not None and not MIN_KEY_LIFETIME <= ttl <= MAX_KEY_LIFETIME:
        out.append(FieldViolation("api_key.ttl", f"must be in {lifetime}; got {ttl.total_seconds():.0f}s"))
    elif key.expire_time is not None and not MIN_KEY_LIFETIME <= key.expire_time - now <= MAX_KEY_LIFETIME:
        out.append(
            FieldViolation(
                "api_key.expire_time",
                f"must be {lifetime} from now ({now.isoformat(timespec='seconds')}); got {key.expire_time.isoformat()}",
            )
        )
    return out

"""Field rules of the registry's resources and requests (INVALID_ARGUMENT names field and limit).

These check what a request says on its own; what depends on the stored state (references
to deployments, etags, locks) is checked by core.py inside the write transaction.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from services.common.errors import FieldViolation, InvalidArgument
from services.registry.keys import KEY_ID_RE
from services.registry.resources import (
    ANY_TENANT,
    API_KEYS,
    DEPLOYMENTS,
    ROLLOUTS,
    ROUTES,
    TENANTS,
    AnalysisSpec,
    AnalysisWindow,
    ApiKey,
    Deployment,
    HeaderOverride,
    Rollout,
    RolloutState,
    RolloutStep,
    Route,
    RouteMirror,
    Tenant,
    Tier,
    Verdict,
    WeightedBackend,
)

ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
ROUTE_CLASS_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
ENGINE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MODEL_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
HEADER_RE = re.compile(r"[a-z0-9-]{1,64}")
HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]{1,256}")
URL_CHARS_RE = re.compile(r"[\x21-\x7e]+")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")

MAX_WEIGHT = 10_000
MAX_BACKENDS = 16
MAX_HEADER_OVERRIDES = 8
MAX_MIRRORS = 4
MAX_METRICS_URL = 512
MAX_TIMEOUT = timedelta(seconds=600)
MAX_REASON = 500
MAX_FILTER = 256
MAX_DISPLAY_NAME = 128
MAX_KEY_ROUTE_CLASSES = 32
MIN_KEY_LIFETIME = timedelta(seconds=60)
MAX_KEY_LIFETIME = timedelta(days=1826)
#: the fields UpdateRoute may replace (update_mask paths)
UPDATABLE_FIELDS = ("backends", "header_overrides", "locked", "timeout", "mirrors")
#: every field of a route a client sets on create
ROUTE_FIELDS = ("name", "service", "route_class", "backends", "header_overrides", "timeout", "mirrors")

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
    if d.metrics_url and (problem := metrics_url_problem(d.metrics_url)) is not None:
        out.append(FieldViolation("deployment.metrics_url", problem))
    return out


def metrics_url_problem(url: str) -> str | None:
    """Why `url` is not an http(s) URL of at most 512 printable ASCII characters, or None."""
    rule = f"must be empty or an http(s) URL of at most {MAX_METRICS_URL} characters"
    if len(url) > MAX_METRICS_URL:
        return f"{rule}; got {len(url)} characters"
    if not URL_CHARS_RE.fullmatch(url):
        return f"{rule}, printable ASCII without spaces; got {show(url)}"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises on a port that is not a number in [0, 65535]
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host:
        return f"{rule}, e.g. http://127.0.0.1:9151/metrics; got {show(url)}"
    return None


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
    if "mirrors" in fields:
        out += _mirror_violations(r.mirrors)
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


def _mirror_violations(mirrors: Sequence[RouteMirror]) -> list[FieldViolation]:
    path = "route.mirrors"
    out: list[FieldViolation] = []
    if len(mirrors) > MAX_MIRRORS:
        out.append(FieldViolation(path, f"must have at most {MAX_MIRRORS} mirrors; got {len(mirrors)}"))
    seen: dict[str, int] = {}
    for i, m in enumerate(mirrors):
        out += name_violations(m.deployment, DEPLOYMENTS, f"{path}[{i}].deployment")
        if m.deployment in seen:
            out.append(
                FieldViolation(
                    f"{path}[{i}].deployment", f"{m.deployment} is already mirror [{seen[m.deployment]}] (at most once)"
                )
            )
        seen.setdefault(m.deployment, i)
        if not 0 < m.percent <= 100:
            out.append(FieldViolation(f"{path}[{i}].percent", f"must be in (0, 100]; got {m.percent}"))
    return out


def mirror_backend_violations(route: Route, fields: Iterable[str]) -> list[FieldViolation]:
    """A mirror may not also be a backend with a positive weight (it would get requests twice).
    Checked on the route as it will be stored; the violation names whichever of the two the
    change sets (the mirrors when it sets both)."""
    fields = set(fields)
    if not {"mirrors", "backends"} & fields:
        return []
    serving = {b.deployment: (i, b.weight) for i, b in enumerate(route.backends) if b.weight > 0}
    out: list[FieldViolation] = []
    for i, m in enumerate(route.mirrors):
        if m.deployment not in serving:
            continue
        j, weight = serving[m.deployment]
        if "mirrors" in fields:
            out.append(
                FieldViolation(
                    f"route.mirrors[{i}].deployment",
                    f"{m.deployment} is also backend [{j}] with weight {weight}: a mirror may not be a backend"
                    " with a positive weight",
                )
            )
        else:
            out.append(
                FieldViolation(
                    f"route.backends[{j}].weight",
                    f"must be 0 while {m.deployment} is mirror [{i}] of the route (a mirror may not be a backend"
                    " with a positive weight); remove the mirror in the same update (update_mask 'mirrors')",
                )
            )
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
    if "mirrors" in fields:
        refs += [(f"route.mirrors[{i}].deployment", m.deployment) for i, m in enumerate(route.mirrors)]
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


# --- rollouts -------------------------------------------------------------------------

MAX_STEPS = 20
MAX_STEP_PAUSE = timedelta(hours=24)
#: analysis windows a rollout keeps (the oldest go first)
MAX_WINDOWS = 100
MAX_APPEND_WINDOWS = 10
MAX_MEASUREMENTS = 16
MAX_MESSAGE = 1000
MAX_DETAIL = 1000
MAX_LABEL = 63
GOLDEN_SET_RE = re.compile(r"[a-z0-9_-]{1,63}")
METRIC_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
SOURCE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: the status fields UpdateRolloutStatus may write (update_mask paths)
STATUS_FIELDS = ("state", "current_step", "step_start_time", "applied_weight", "applied_mirror_percent", "message")

_MINUTE = timedelta(minutes=1)
#: the steps of a rollout created without any: shadow 10% for a minute, then 1%, 10%, 50% for a
#: minute each, all with analysis, then 100%
DEFAULT_STEPS = (
    RolloutStep(weight=0, mirror_percent=10.0, pause=_MINUTE, analysis=True),
    RolloutStep(weight=1, pause=_MINUTE, analysis=True),
    RolloutStep(weight=10, pause=_MINUTE, analysis=True),
    RolloutStep(weight=50, pause=_MINUTE, analysis=True),
    RolloutStep(weight=100),
)

ANALYSIS_WINDOW_DEFAULT = timedelta(seconds=10)
ANALYSIS_WINDOW_RANGE = (timedelta(seconds=5), timedelta(hours=1))


@dataclass(frozen=True, slots=True)
class _Rule:
    """A numeric field of AnalysisSpec: its default and range (low end open unless `closed`)."""

    default: float
    low: float
    high: float
    closed: bool = False

    def holds(self, value: float) -> bool:
        return (self.low <= value if self.closed else self.low < value) and value <= self.high

    def text(self) -> str:
        return f"{'[' if self.closed else '('}{_number(self.low)}, {_number(self.high)}]"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


ANALYSIS_RULES: dict[str, _Rule] = {
    "min_requests": _Rule(20, 1, 1_000_000, closed=True),
    "max_error_rate": _Rule(0.01, 0, 1),
    "max_error_rate_margin": _Rule(0.005, 0, 1),
    "max_latency_ratio": _Rule(3.0, 1, 100),
    "max_cost_ratio": _Rule(2.0, 1, 100),
    "max_golden_drop": _Rule(0.1, 0, 1),
    "inconclusive_limit": _Rule(6, 1, 100, closed=True),
    "latency_slack_seconds": _Rule(0.25, 0.001, 60, closed=True),
}


def _seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g}s"


def filled_analysis(spec: AnalysisSpec) -> AnalysisSpec:
    """`spec` with every unset field (None) at its default."""
    values: dict[str, Any] = {
        name: rule.default if getattr(spec, name) is None else getattr(spec, name)
        for name, rule in ANALYSIS_RULES.items()
    }
    for name in ("min_requests", "inconclusive_limit"):
        values[name] = int(values[name])
    return replace(spec, window=spec.window if spec.window is not None else ANALYSIS_WINDOW_DEFAULT, **values)


def _analysis_violations(spec: AnalysisSpec) -> list[FieldViolation]:
    path = "rollout.analysis"
    out: list[FieldViolation] = []
    low, high = ANALYSIS_WINDOW_RANGE
    if spec.window is not None and not low <= spec.window <= high:
        out.append(
            FieldViolation(
                f"{path}.window",
                f"must be in [{_seconds(low)}, {_seconds(high)}] (unset: {_seconds(ANALYSIS_WINDOW_DEFAULT)});"
                f" got {_seconds(spec.window)}",
            )
        )
    for name, rule in ANALYSIS_RULES.items():
        value = getattr(spec, name)
        if value is not None and not rule.holds(value):
            out.append(
                FieldViolation(
                    f"{path}.{name}", f"must be in {rule.text()} (unset: {_number(rule.default)}); got {value}"
                )
            )
    if spec.golden_set and not GOLDEN_SET_RE.fullmatch(spec.golden_set):
        out.append(
            FieldViolation(
                f"{path}.golden_set",
                f"must be empty or 1-{MAX_LABEL} characters of a-z, 0-9, '_' and '-'; got {show(spec.golden_set)}",
            )
        )
    return out


def _step_violations(steps: Sequence[RolloutStep]) -> list[FieldViolation]:
    path = "rollout.steps"
    out: list[FieldViolation] = []
    if len(steps) > MAX_STEPS:
        out.append(FieldViolation(path, f"must have 1-{MAX_STEPS} steps (none for the default); got {len(steps)}"))
    previous: int | None = None
    for i, step in enumerate(steps):
        if not 0 <= step.weight <= 100:
            out.append(FieldViolation(f"{path}[{i}].weight", f"must be in [0, 100] (percent); got {step.weight}"))
        elif previous is not None and step.weight < previous:
            out.append(
                FieldViolation(
                    f"{path}[{i}].weight",
                    f"must be in [{previous}, 100]: at least the previous step's weight (weights never decrease);"
                    f" got {step.weight}",
                )
            )
        else:
            previous = step.weight
        if not 0 <= step.mirror_percent <= 100:
            out.append(
                FieldViolation(
                    f"{path}[{i}].mirror_percent", f"must be in [0, 100] (percent); got {step.mirror_percent}"
                )
            )
        elif step.weight == 0 and step.mirror_percent == 0:
            out.append(
                FieldViolation(
                    f"{path}[{i}].mirror_percent",
                    "must be in (0, 100] on a step of weight 0 (a shadow step mirrors traffic to the canary); got 0",
                )
            )
        if not timedelta(0) <= step.pause <= MAX_STEP_PAUSE:
            out.append(
                FieldViolation(
                    f"{path}[{i}].pause", f"must be in [0s, {_seconds(MAX_STEP_PAUSE)}]; got {_seconds(step.pause)}"
                )
            )
    return out


def validate_rollout(r: Rollout) -> list[FieldViolation]:
    """The fields a client sets on create (references are checked against the store)."""
    out = name_violations(r.name, ROLLOUTS, "rollout.name")
    out += name_violations(r.route, ROUTES, "rollout.route")
    out += name_violations(r.stable_deployment, DEPLOYMENTS, "rollout.stable_deployment")
    canary = name_violations(r.canary_deployment, DEPLOYMENTS, "rollout.canary_deployment")
    if not canary and r.canary_deployment == r.stable_deployment:
        canary.append(
            FieldViolation("rollout.canary_deployment", f"must differ from stable_deployment ({r.stable_deployment})")
        )
    return out + canary + _step_violations(r.steps) + _analysis_violations(r.analysis)


def status_mask_violations(paths: Sequence[str]) -> list[FieldViolation]:
    if not paths:
        return [FieldViolation("update_mask", f"required: any of {', '.join(STATUS_FIELDS)}")]
    return [
        FieldViolation("update_mask", f"unknown or read-only path {path!r}; use any of {', '.join(STATUS_FIELDS)}")
        for path in paths
        if path not in STATUS_FIELDS
    ]


def validate_status(r: Rollout, fields: Iterable[str]) -> list[FieldViolation]:
    """The shape of the status fields UpdateRolloutStatus writes (the step's upper bound and the
    allowed state changes depend on the stored rollout)."""
    fields = set(fields)
    out: list[FieldViolation] = []
    if "state" in fields and r.state is RolloutState.UNSPECIFIED:
        out.append(FieldViolation("rollout.state", "required when update_mask has 'state': a state, not unspecified"))
    if "current_step" in fields and r.current_step < 0:
        out.append(FieldViolation("rollout.current_step", f"must be in [0, len(steps)]; got {r.current_step}"))
    if "applied_weight" in fields and not 0 <= r.applied_weight <= 100:
        out.append(FieldViolation("rollout.applied_weight", f"must be in [0, 100] (percent); got {r.applied_weight}"))
    if "applied_mirror_percent" in fields and not 0 <= r.applied_mirror_percent <= 100:
        out.append(
            FieldViolation(
                "rollout.applied_mirror_percent", f"must be in [0, 100] (percent); got {r.applied_mirror_percent}"
            )
        )
    if "message" in fields and len(r.message) > MAX_MESSAGE:
        out.append(FieldViolation("rollout.message", f"must be at most {MAX_MESSAGE} characters; got {len(r.message)}"))
    return out


def window_violations(windows: Sequence[AnalysisWindow]) -> list[FieldViolation]:
    """Analysis windows the controller appends (their step's upper bound is checked by core)."""
    path = "append_windows"
    out: list[FieldViolation] = []
    if len(windows) > MAX_APPEND_WINDOWS:
        out.append(FieldViolation(path, f"must have at most {MAX_APPEND_WINDOWS} windows per call; got {len(windows)}"))
    for i, w in enumerate(windows):
        at = f"{path}[{i}]"
        if w.start_time is None or w.end_time is None:
            out.append(FieldViolation(at, "required: start_time and end_time"))
        elif w.end_time < w.start_time:
            out.append(FieldViolation(f"{at}.end_time", "must not be before start_time"))
        if w.step < 0:
            out.append(FieldViolation(f"{at}.step", f"must be in [0, len(steps)]; got {w.step}"))
        if w.verdict is Verdict.UNSPECIFIED:
            out.append(FieldViolation(f"{at}.verdict", "required: pass, fail or inconclusive"))
        if w.source and not SOURCE_RE.fullmatch(w.source):
            out.append(
                FieldViolation(
                    f"{at}.source", f"must be empty or 1-{MAX_LABEL} characters of a-z, 0-9, '.', '_' and '-'"
                )
            )
        if len(w.measurements) > MAX_MEASUREMENTS:
            out.append(
                FieldViolation(
                    f"{at}.measurements",
                    f"must have at most {MAX_MEASUREMENTS} measurements; got {len(w.measurements)}",
                )
            )
        for j, m in enumerate(w.measurements):
            if not METRIC_RE.fullmatch(m.metric):
                out.append(
                    FieldViolation(
                        f"{at}.measurements[{j}].metric",
                        f"must be 1-{MAX_LABEL} characters of a-z, 0-9 and '_', starting with a letter;"
                        f" got {show(m.metric)}",
                    )
                )
            if m.verdict is Verdict.UNSPECIFIED:
                out.append(FieldViolation(f"{at}.measurements[{j}].verdict", "required: pass, fail or inconclusive"))
            if len(m.detail) > MAX_DETAIL:
                out.append(
                    FieldViolation(
                        f"{at}.measurements[{j}].detail",
                        f"must be at most {MAX_DETAIL} characters; got {len(m.detail)}",
                    )
                )
    return out

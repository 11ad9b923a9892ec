"""Envoy v3 configuration for the mesh, as plain dicts in Envoy's JSON shape.

Bootstraps (`sidecar_bootstrap`, `edge_bootstrap`) are written to disk and given to
`envoy -c`; the resource builders (`deployment_cluster`, `outbound_listener`,
`route_configuration`, `edge_route_configuration`) are what the control plane serves
over ADS, and can also be embedded statically. Every node reads its certificate and
the CA through file-based SDS (secrets "identity" and "ca"), so a rotation in the
certs dir reaches a running Envoy without a restart.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import servemesh
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mesh.certs import DEFAULT_NAMESPACE, TRUST_DOMAIN, Identity, spiffe_id

Json = dict[str, Any]

IDENTITY_SECRET = "identity"
CA_SECRET = "ca"
ROUTE_CLASS_HEADER = "x-servemesh-route-class"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
CONTROL_PLANE_SPIFFE_ID = spiffe_id("control-plane", DEFAULT_NAMESPACE)
DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "policy.yaml"
GATEWAY_SERVICE = "servemesh.gateway.v1.GatewayService"
REGISTRY_SERVICE = "servemesh.registry.v1.RegistryService"
INFERENCE_SERVICE = "servemesh.inference.v1.InferenceService"

_TYPE = "type.googleapis.com/"
T_HCM = _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_ROUTER = _TYPE + "envoy.extensions.filters.http.router.v3.Router"
T_RBAC = _TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC"
T_TRANSCODER = _TYPE + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
T_LOCAL_RATE_LIMIT = _TYPE + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
T_DOWNSTREAM_TLS = _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
T_UPSTREAM_TLS = _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
T_SECRET = _TYPE + "envoy.extensions.transport_sockets.tls.v3.Secret"
T_HTTP_OPTIONS = _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
T_PREVIOUS_HOSTS = _TYPE + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
T_GRPC_STATS = _TYPE + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
T_FAULT = _TYPE + "envoy.extensions.filters.http.fault.v3.HTTPFault"
T_DOWNSTREAM_CONNECTIONS = (
    _TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# The xds-protos modules defining every "@type" above; json_format resolves Any only for loaded types.
TYPED_CONFIG_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.grpc_json_transcoder.v3.transcoder_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.transport_sockets.tls.v3.secret_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    "envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2",
    "envoy.extensions.filters.http.grpc_stats.v3.config_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
)
#: gRPC status codes that count as the upstream's fault (a canary's errors, an SLO's 5xx)
SERVER_ERROR_GRPC_CODES = (2, 4, 13, 14, 15)  # UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS


def to_proto(doc: Mapping[str, Any], message: Message) -> Message:
    """Parse a builder's dict into an xds-protos message (e.g. cluster_pb2.Cluster()), strictly; return it."""
    for module in TYPED_CONFIG_MODULES:
        importlib.import_module(module)
    return json_format.ParseDict(doc, message, ignore_unknown_fields=False)


def _duration(seconds: float) -> str:
    return f"{seconds:.9g}s"


def _address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": int(port)}}


#: where a sidecar meets its app: a loopback port, or a Unix socket (mode 0600: only the
#: user running the mesh can connect, so no other local process can skip the sidecar)
LocalAddress = int | Path


def _local_address(addr: LocalAddress) -> Json:
    if isinstance(addr, Path):
        return {"pipe": {"path": str(addr), "mode": 0o600}}
    return _address("127.0.0.1", addr)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- nodes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """Who an Envoy is: `id` is the deployment id ("gateway-stable") or "edge"; `service` its service."""

    id: str
    service: str
    #: where its "outbound" listener listens (served over ADS); None: the node calls nothing
    outbound: LocalAddress | None = None

    def as_dict(self) -> Json:
        metadata: Json = {"service": self.service}
        if isinstance(self.outbound, Path):
            metadata["outbound_socket"] = str(self.outbound)
        elif self.outbound is not None:
            metadata["outbound_port"] = self.outbound
        return {"id": self.id, "cluster": self.service, "metadata": metadata}


def cluster_name(deployment_id: str) -> str:
    """Name of the cluster of one deployment: d.<deployment-id>."""
    return f"d.{deployment_id}"


# --- secrets (file-based SDS) ------------------------------------------------------------


def sds_paths(ident: Identity) -> tuple[Path, Path]:
    """Where the SDS documents of an identity live: (certificate, CA)."""
    return ident.dir / "sds-cert.json", ident.dir / "sds-ca.json"


def sds_documents(ident: Identity) -> tuple[Json, Json]:
    """The two SDS DiscoveryResponse documents: secret "identity" (cert + key) and secret "ca"."""
    cert = {
        "@type": T_SECRET,
        "name": IDENTITY_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": str(ident.cert_path)},
            "private_key": {"filename": str(ident.key_path)},
            "watched_directory": {"path": str(ident.dir)},
        },
    }
    ca = {
        "@type": T_SECRET,
        "name": CA_SECRET,
        "validation_context": {
            "trusted_ca": {"filename": str(ident.ca_path)},
            "watched_directory": {"path": str(ident.ca_path.parent)},
        },
    }
    return {"resources": [cert]}, {"resources": [ca]}


def write_sds_files(ident: Identity) -> tuple[Path, Path]:
    """Write the SDS documents of an identity next to its certificate (atomically); return their paths."""
    paths = sds_paths(ident)
    for path, doc in zip(paths, sds_documents(ident), strict=True):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
    return paths


def sds_secret_config(secret: str, ident: Identity) -> Json:
    """Reference to secret "identity" or "ca" of `ident`, read from its SDS file and reloaded on rename."""
    cert_doc, ca_doc = sds_paths(ident)
    path = cert_doc if secret == IDENTITY_SECRET else ca_doc
    return {
        "name": secret,
        "sds_config": {
            "path_config_source": {"path": str(path), "watched_directory": {"path": str(ident.dir)}},
            "resource_api_version": "V3",
        },
    }


def _san_matchers(*, exact: str | None = None, prefix: str | None = None) -> list[Json]:
    matcher = {"exact": exact} if exact is not None else {"prefix": prefix}
    return [{"san_type": "URI", "matcher": matcher}]


def _common_tls(ident: Identity, *, alpn: Sequence[str], peer_sans: list[Json] | None, min_tls: str) -> Json:
    ctx: Json = {
        # Envoy's upstream default maximum is TLS 1.2: set both bounds explicitly.
        "tls_params": {"tls_minimum_protocol_version": min_tls, "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificate_sds_secret_configs": [sds_secret_config(IDENTITY_SECRET, ident)],
        "alpn_protocols": list(alpn),
    }
    if peer_sans is not None:
        ctx["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": peer_sans},
            "validation_context_sds_secret_config": sds_secret_config(CA_SECRET, ident),
        }
    return ctx


def upstream_tls(ident: Identity, peer_spiffe_id: str, sni: str | None = None) -> Json:
    """Transport socket for mTLS to a mesh peer: present `ident`, accept only `peer_spiffe_id`."""
    ctx: Json = {
        "@type": T_UPSTREAM_TLS,
        "common_tls_context": _common_tls(
            ident, alpn=["h2"], peer_sans=_san_matchers(exact=peer_spiffe_id), min_tls="TLSv1_3"
        ),
    }
    if sni:
        ctx["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def mesh_downstream_tls(ident: Identity) -> Json:
    """Transport socket of an inbound listener: mTLS, clients need a CA-issued SPIFFE id of our trust domain."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T_DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": _common_tls(
                ident, alpn=["h2"], peer_sans=_san_matchers(prefix=f"spiffe://{TRUST_DOMAIN}/"), min_tls="TLSv1_3"
            ),
        },
    }


def edge_downstream_tls(ident: Identity) -> Json:
    """Transport socket of the edge: server TLS only (clients need no certificate); h2 and HTTP/1.1."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T_DOWNSTREAM_TLS,
            "common_tls_context": _common_tls(ident, alpn=["h2", "http/1.1"], peer_sans=None, min_tls="TLSv1_2"),
        },
    }


# --- RBAC policy -------------------------------------------------------------------------

_IDENT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SHORT_METHOD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$|^\*$")
_FULL_METHOD = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]*/([A-Za-z_][A-Za-z0-9_]*\*?|\*)$")
_GRPC_SERVICE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class PolicyError(ValueError):
    """The RBAC policy file is invalid; the message names the file and the bad key."""


def _caller(name: str) -> str:
    if not _IDENT_NAME.match(name):
        raise ValueError(f"{name!r} is not an identity name (a DNS label such as 'gateway')")
    return name


def _method(m: str) -> str:
    if not (_SHORT_METHOD.match(m) or _FULL_METHOD.match(m)):
        raise ValueError(
            f"{m!r} is not a gRPC method: use 'GetRoute', 'Get*', '/package.Service/Method' or '/pkg.Svc/*'"
        )
    return m


def _grpc_service(s: str) -> str:
    if not _GRPC_SERVICE.match(s):
        raise ValueError(f"{s!r} is not a fully qualified gRPC service name (package.Service)")
    return s


CallerName = Annotated[str, AfterValidator(_caller)]
MethodName = Annotated[str, AfterValidator(_method)]
GrpcServiceName = Annotated[str, AfterValidator(_grpc_service)]


class PolicyRule(BaseModel):
    """Identities in `callers` may call `methods` (None: every method) of the service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    callers: list[CallerName] = Field(min_length=1)
    methods: list[MethodName] | None = Field(default=None, min_length=1)


class ServicePolicy(BaseModel):
    """The rules of one service; `grpc_services` resolve short method names such as 'GetRoute'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grpc_services: list[GrpcServiceName] = Field(default_factory=list)
    allow: list[PolicyRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _short_names_need_services(self) -> ServicePolicy:
        short = [m for r in self.allow for m in (r.methods or ()) if not m.startswith("/")]
        if short and not self.grpc_services:
            raise ValueError(f"methods {short} are short names: list the service's grpc_services")
        return self


class Policy(BaseModel):
    """Who may call whom: per service (sidecar node cluster), a list of allow rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = DEFAULT_NAMESPACE
    services: dict[str, ServicePolicy]


def parse_policy(data: Mapping[str, Any], source: str = "policy") -> Policy:
    """Validate a policy document; errors name the source and the bad key (services.registry.allow.1...)."""
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            problems.append(f"{source}: {loc}: {e['msg']}")
        raise PolicyError("\n".join(problems)) from None


def load_policy(path: Path | None = None) -> Policy:
    """Load and validate a policy YAML file (default: mesh/policy.yaml)."""
    path = Path(path) if path is not None else DEFAULT_POLICY_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping with 'services'")
    return parse_policy(data, str(path))


def _method_permissions(methods: Sequence[str] | None, grpc_services: Sequence[str]) -> list[Json]:
    if methods is None:
        return [{"any": True}]
    paths: list[str] = []
    for m in methods:
        if m.startswith("/"):
            paths.append(m)
        else:
            paths.extend(f"/{svc}/{m}" for svc in grpc_services)
    out = []
    for p in paths:
        matcher = {"prefix": p[:-1]} if p.endswith("*") else {"exact": p}
        out.append({"url_path": {"path": matcher}})
    return out


def rbac_filter(policy: Policy, service: str) -> Json:
    """RBAC http filter for the inbound listener of `service`: ALLOW by SPIFFE principal and gRPC path.

    Health checks (grpc.health.v1.Health/Check) are open to any peer that passed mTLS;
    a service missing from the policy accepts nothing else.
    """
    policies: Json = {
        "health-check": {
            "permissions": [{"url_path": {"path": {"exact": HEALTH_CHECK_PATH}}}],
            "principals": [{"authenticated": {"principal_name": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}}],
        }
    }
    svc = policy.services.get(service)
    for i, rule in enumerate(svc.allow if svc else ()):
        policies[f"{service}-rule-{i}"] = {
            "permissions": _method_permissions(rule.methods, svc.grpc_services if svc else ()),
            "principals": [
                {"authenticated": {"principal_name": {"exact": spiffe_id(c, policy.namespace)}}} for c in rule.callers
            ],
        }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {"@type": T_RBAC, "rules": {"action": "ALLOW", "policies": policies}},
    }


# --- clusters ----------------------------------------------------------------------------


def _http2_options(keepalive: bool = True) -> Json:
    h2: Json = {}
    if keepalive:
        h2["connection_keepalive"] = {"interval": "30s", "timeout": "10s"}
    return {_HTTP_OPTIONS_KEY: {"@type": T_HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": h2}}}


def _load_assignment(name: str, host: str, port: int) -> Json:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
    }


@dataclass(frozen=True)
class OutlierSettings:
    """Passive health checking of a deployment (gRPC statuses count via their HTTP mapping)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 3
    interval_s: float = 5.0
    base_ejection_time_s: float = 15.0
    max_ejection_percent: int = 100


@dataclass(frozen=True)
class CircuitLimits:
    """Circuit breaker thresholds of a deployment (streams in flight, not connections, bound HTTP/2)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 16


def deployment_cluster(
    deployment_id: str,
    endpoint_host: str,
    endpoint_port: int,
    node_identity: Identity,
    peer_spiffe_id: str,
    *,
    connect_timeout_s: float = 1.0,
    outlier: OutlierSettings | None = OutlierSettings(),
    limits: CircuitLimits = CircuitLimits(),
) -> Json:
    """Cluster d.<deployment_id>: one inbound sidecar endpoint, HTTP/2 over mTLS (peer pinned by SPIFFE id)."""
    name = cluster_name(deployment_id)
    static = _is_ip(endpoint_host)
    cluster: Json = {
        "name": name,
        "type": "STATIC" if static else "LOGICAL_DNS",
        "connect_timeout": _duration(connect_timeout_s),
        "load_assignment": _load_assignment(name, endpoint_host, endpoint_port),
        "typed_extension_protocol_options": _http2_options(),
        "transport_socket": upstream_tls(node_identity, peer_spiffe_id, None if static else endpoint_host),
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": limits.max_connections,
                    "max_pending_requests": limits.max_pending_requests,
                    "max_requests": limits.max_requests,
                    "max_retries": limits.max_retries,
                }
            ]
        },
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if outlier is not None:
        cluster["outlier_detection"] = {
            "consecutive_5xx": outlier.consecutive_5xx,
            "consecutive_gateway_failure": outlier.consecutive_gateway_failure,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": _duration(outlier.interval_s),
            "base_ejection_time": _duration(outlier.base_ejection_time_s),
            "max_ejection_percent": outlier.max_ejection_percent,
        }
    return cluster


def _local_cluster(name: str, app: LocalAddress) -> Json:
    """A cluster for the process next to the sidecar: one static endpoint, breakers wide open
    (the app's own limits apply), HTTP/1.1 unless the caller adds protocol options."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _local_address(app)}}]}],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 100_000,
                    "max_pending_requests": 100_000,
                    "max_requests": 100_000,
                }
            ]
        },
    }


def local_app_cluster(app: LocalAddress) -> Json:
    """Cluster "local_app": the service process next to the sidecar, HTTP/2 plaintext."""
    return _local_cluster("local_app", app) | {"typed_extension_protocol_options": _http2_options(keepalive=False)}


def local_http_cluster(app: LocalAddress) -> Json:
    """Cluster "local_http": the service's plain HTTP/1.1 API (the gateway's OpenAI-compatible one)."""
    return _local_cluster("local_http", app)


def xds_cluster(host: str, port: int, node_identity: Identity, control_plane_id: str = CONTROL_PLANE_SPIFFE_ID) -> Json:
    """Cluster "xds": the ADS server, HTTP/2 over mTLS, accepting only the control plane's SPIFFE id."""
    static = _is_ip(host)
    cluster: Json = {
        "name": "xds",
        "type": "STATIC" if static else "LOGICAL_DNS",
        "connect_timeout": "1s",
        "load_assignment": _load_assignment("xds", host, port),
        "typed_extension_protocol_options": _http2_options(),
        "transport_socket": upstream_tls(node_identity, control_plane_id, None if static else host),
    }
    return cluster


# --- listeners ---------------------------------------------------------------------------


def _router() -> Json:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}


def _grpc_stats() -> Json:
    """Per upstream cluster and gRPC method: requests and final statuses (`cluster.<c>.grpc.<svc>.<m>.<code>`).

    A gRPC error travels as HTTP 200 with a grpc-status trailer, so Envoy's HTTP counters
    cannot see it; rollout analysis compares deployments by these counters.
    """
    return {
        "name": "envoy.filters.http.grpc_stats",
        "typed_config": {"@type": T_GRPC_STATS, "stats_for_all_methods": True, "enable_upstream_stats": False},
    }


#: runtime keys an operator (or a fault test) sets through the admin API, POST /runtime_modify
FAULT_ABORT_PERCENT_KEY = "fault.http.abort.abort_percent"


def _fault() -> Json:
    """Fault injection, off until `fault.http.abort.abort_percent` is set in the runtime: aborts that
    share of requests with gRPC INTERNAL before they reach the app (chaos drills, rollback tests)."""
    return {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": T_FAULT,
            "abort": {"grpc_status": 13, "percentage": {"numerator": 0, "denominator": "HUNDRED"}},
        },
    }


def _hcm(
    stat_prefix: str,
    http_filters: list[Json],
    *,
    rds_name: str | None = None,
    route_config: Json | None = None,
    stream_idle_timeout_s: float,
    **extra: Any,
) -> Json:
    hcm: Json = {
        "@type": T_HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(stream_idle_timeout_s),
        "normalize_path": True,
        "merge_slashes": True,
        "http_filters": http_filters,
        **extra,
    }
    if route_config is not None:
        hcm["route_config"] = route_config
    else:
        hcm["rds"] = {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": rds_name}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def inbound_listener(
    port: int,
    ident: Identity,
    service: str,
    policy: Policy,
    *,
    stream_idle_timeout_s: float = 900.0,
    http_prefixes: Sequence[str] = (),
    fault_injection: bool = False,
) -> Json:
    """Listener "inbound": mTLS from mesh peers, caller's SPIFFE id in x-forwarded-client-cert, RBAC, local app.

    Paths under `http_prefixes` go to "local_http" (the app's HTTP API), the rest to
    "local_app" (gRPC). Routes carry no timeout; a caller's grpc-timeout still applies.
    `fault_injection` adds the fault filter (off until its runtime key is set).
    """
    http_routes = [
        {"name": f"local_http{p}", "match": {"prefix": p}, "route": {"cluster": "local_http", "timeout": "0s"}}
        for p in http_prefixes
    ]
    route_config = {
        "name": "inbound",
        "virtual_hosts": [
            {
                "name": "local_app",
                "domains": ["*"],
                "routes": [
                    *http_routes,
                    {
                        "name": "local_app",
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "local_app",
                            "timeout": "0s",
                            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                        },
                    },
                ],
            }
        ],
    }
    hcm = _hcm(
        f"inbound_{service}",
        [*([_fault()] if fault_injection else []), rbac_filter(policy, service), _router()],
        route_config=route_config,
        stream_idle_timeout_s=stream_idle_timeout_s,
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
        path_with_escaped_slashes_action="REJECT_REQUEST",
    )
    return {
        "name": "inbound",
        "address": _address("127.0.0.1", port),
        "filter_chains": [{"filters": [hcm], "transport_socket": mesh_downstream_tls(ident)}],
    }


def outbound_listener(
    port: LocalAddress, *, route_config: Json | None = None, stream_idle_timeout_s: float = 900.0
) -> Json:
    """Listener "outbound" on 127.0.0.1:<port> or a Unix socket for the local app (plaintext h2c).

    The app addresses a service by authority: a gRPC channel to 127.0.0.1:<port> (or
    unix:<path>) with option grpc.default_authority=<service>. Routes come from RDS
    "outbound"; `route_config` inlines them instead.
    """
    hcm = _hcm(
        "outbound",
        [_grpc_stats(), _router()],
        rds_name="outbound",
        route_config=route_config,
        stream_idle_timeout_s=stream_idle_timeout_s,
    )
    return {"name": "outbound", "address": _local_address(port), "filter_chains": [{"filters": [hcm]}]}


@dataclass(frozen=True)
class RateLimit:
    """Token bucket of the edge's local rate limit (per Envoy); the default is effectively off."""

    max_tokens: int = 1_000_000_000
    tokens_per_fill: int = 1_000_000_000
    fill_interval_s: float = 1.0


def _default_descriptor() -> Path:
    for base in getattr(servemesh, "__path__", []):
        candidate = Path(base) / "api.binpb"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("servemesh/api.binpb not found; run `python -m devtools.protos generate`")


def edge_listener(
    port: int,
    ident: Identity,
    *,
    descriptor_path: Path | None = None,
    grpc_services: Sequence[str] = (GATEWAY_SERVICE, REGISTRY_SERVICE),
    rate_limit: RateLimit = RateLimit(),
    route_config: Json | None = None,
    stream_idle_timeout_s: float = 900.0,
) -> Json:
    """Listener "edge": TLS, local rate limit, gRPC-JSON transcoding (streams as SSE), routes from RDS "edge".

    gRPC clients pass through untouched; REST calls follow the google.api.http annotations.
    """
    limiter = {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": T_LOCAL_RATE_LIMIT,
            "stat_prefix": "edge_rate_limit",
            "token_bucket": {
                "max_tokens": rate_limit.max_tokens,
                "tokens_per_fill": rate_limit.tokens_per_fill,
                "fill_interval": _duration(rate_limit.fill_interval_s),
            },
            "filter_enabled": {
                "runtime_key": "edge_rate_limit_enabled",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"},
            },
            "filter_enforced": {
                "runtime_key": "edge_rate_limit_enforced",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"},
            },
            "rate_limited_as_resource_exhausted": True,
        },
    }
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": T_TRANSCODER,
            "proto_descriptor": str(descriptor_path or _default_descriptor()),
            "services": list(grpc_services),
            "print_options": {
                "add_whitespace": False,
                "always_print_primitive_fields": False,
                "always_print_enums_as_ints": False,
                "preserve_proto_field_names": False,
                "stream_sse_style_delimited": True,
            },
            "convert_grpc_status": True,
            "request_validation_options": {
                "reject_unknown_method": False,
                "reject_unknown_query_parameters": True,
            },
        },
    }
    hcm = _hcm(
        "edge",
        [limiter, transcoder, _grpc_stats(), _router()],
        rds_name="edge",
        route_config=route_config,
        stream_idle_timeout_s=stream_idle_timeout_s,
        use_remote_address=True,
        forward_client_cert_details="SANITIZE",
    )
    return {
        "name": "edge",
        "address": _address("127.0.0.1", port),
        "filter_chains": [{"filters": [hcm], "transport_socket": edge_downstream_tls(ident)}],
    }


# --- routes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpec:
    """One route class of a service.

    backends: (cluster, weight) pairs for the weighted split (weights as given, any sum > 0).
    header_overrides: (header, exact value, cluster) pairs that pin a request to one cluster.
    timeout_seconds: cap on the whole call; None leaves only the caller's gRPC deadline.
    idempotent_methods: gRPC methods ("GetEngine" or "/pkg.Service/GetEngine") safe to retry on UNAVAILABLE.
    mirrors: (cluster, percent) pairs: copies of that share of the weighted requests (not of the
      header overrides) go to the cluster too, and its responses are discarded (shadow traffic).
    """

    route_class: str = ""
    backends: Sequence[tuple[str, int]] = ()
    header_overrides: Sequence[tuple[str, str, str]] = ()
    timeout_seconds: float | None = None
    idempotent_methods: Sequence[str] = ()
    mirrors: Sequence[tuple[str, float]] = ()


@dataclass(frozen=True)
class ServiceRoutes:
    """The route specs of one service, in order; `grpc_services` are its gRPC services (used by the edge)."""

    service: str
    routes: Sequence[RouteSpec] = ()
    grpc_services: Sequence[str] = ()
    #: path prefixes of the service's HTTP API the edge exposes too (e.g. "/openai/")
    http_prefixes: Sequence[str] = ()


# Retried on every route: failures where the upstream provably did not process the request.
_ALWAYS_SAFE_RETRY_ON = "connect-failure,refused-stream"


def _retry_policy(idempotent: bool) -> Json:
    return {
        "retry_on": _ALWAYS_SAFE_RETRY_ON + (",unavailable" if idempotent else ""),
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        "retry_host_predicate": [
            {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": T_PREVIOUS_HOSTS}}
        ],
        "host_selection_retry_max_attempts": 3,
    }


def _mirror_policies(mirrors: Sequence[tuple[str, float]]) -> list[Json]:
    policies = []
    for cluster, percent in mirrors:
        if not 0 < percent <= 100:
            raise ValueError(f"mirror to {cluster}: percent must be in (0, 100]; got {percent}")
        # parts per million, so 0.01% mirrors are exact
        share = {"numerator": round(percent * 10_000), "denominator": "MILLION"}
        policies.append({"cluster": cluster, "runtime_fraction": {"default_value": share}})
    return policies


def _action(
    backends: Sequence[tuple[str, int]], spec: RouteSpec, idempotent: bool, mirrors: Sequence[tuple[str, float]] = ()
) -> Json:
    timeout = _duration(spec.timeout_seconds) if spec.timeout_seconds else "0s"
    action: Json = {
        "timeout": timeout,
        "max_stream_duration": {"grpc_timeout_header_max": timeout},
        "retry_policy": _retry_policy(idempotent),
    }
    live = [(c, int(w)) for c, w in backends if int(w) > 0]
    if any(int(w) < 0 for _, w in backends):
        raise ValueError(f"route class {spec.route_class!r}: negative weight in {list(backends)}")
    if not live:
        raise ValueError(f"route class {spec.route_class!r}: no backend with a positive weight in {list(backends)}")
    if len(live) == 1:
        action["cluster"] = live[0][0]
    else:
        action["weighted_clusters"] = {"clusters": [{"name": c, "weight": w} for c, w in live]}
    if mirrors:
        action["request_mirror_policies"] = _mirror_policies(mirrors)
    return action


IDEMPOTENT_METHODS_PER_ROUTE = 4


def _idempotent_regex(prefix: str, methods: Sequence[str]) -> str | None:
    short = [m for m in methods if not m.startswith("/")]
    full = [m for m in methods if m.startswith("/") and m.startswith(prefix)]
    alternatives = []
    if short:
        base = "/[^/]+/" if prefix == "/" else re.escape(prefix)
        alternatives.append(base + "(?:" + "|".join(re.escape(m) for m in short) + ")")
    alternatives.extend(re.escape(m) for m in full)
    if not alternatives:
        return None
    return "^(?:" + "|".join(alternatives) + ")$"


def _exact_header(name: str, value: str) -> Json:
    return {"name": name, "string_match": {"exact": value}}


def _service_routes(svc: ServiceRoutes, prefixes: Sequence[str]) -> list[Json]:
    defaults = [s for s in svc.routes if not s.route_class]
    if len(defaults) > 1:
        raise ValueError(f"service {svc.service!r}: more than one default route spec")
    classes = [s.route_class for s in svc.routes if s.route_class]
    if len(classes) != len(set(classes)):
        raise ValueError(f"service {svc.service!r}: a route class appears twice: {classes}")
    # (route name, header matchers, backends, spec, mirrored?)
    logical: list[tuple[str, list[Json], Sequence[tuple[str, int]], RouteSpec, bool]] = []
    for spec in svc.routes:
        class_match = [_exact_header(ROUTE_CLASS_HEADER, spec.route_class)] if spec.route_class else []
        for i, (header, value, cluster) in enumerate(spec.header_overrides):
            logical.append(
                (
                    f"override-{spec.route_class or 'default'}-{i}",
                    [_exact_header(header, value), *class_match],
                    [(cluster, 1)],
                    spec,
                    False,
                )
            )
    for spec in svc.routes:
        if spec.route_class:
            logical.append(
                (
                    f"class-{spec.route_class}",
                    [_exact_header(ROUTE_CLASS_HEADER, spec.route_class)],
                    spec.backends,
                    spec,
                    True,
                )
            )
    for spec in defaults:
        logical.append(("default", [], spec.backends, spec, True))

    routes: list[Json] = []
    for name, headers, backends, spec, mirrored in logical:
        mirrors = spec.mirrors if mirrored else ()
        for prefix in prefixes:
            label = f"{svc.service}/{name}" + (f"{prefix}" if prefix != "/" else "")
            # a few methods per regex: Envoy refuses a regex whose RE2 program is over 100
            methods = list(spec.idempotent_methods)
            for i in range(0, len(methods), IDEMPOTENT_METHODS_PER_ROUTE):
                regex = _idempotent_regex(prefix, methods[i : i + IDEMPOTENT_METHODS_PER_ROUTE])
                if regex is None:
                    continue
                match: Json = {"safe_regex": {"regex": regex}}
                if headers:
                    match["headers"] = headers
                name = f"{label}/idempotent" + (f"-{i // IDEMPOTENT_METHODS_PER_ROUTE}" if i else "")
                routes.append({"name": name, "match": match, "route": _action(backends, spec, True, mirrors)})
            match = {"prefix": prefix}
            if headers:
                match["headers"] = headers
            routes.append({"name": label, "match": match, "route": _action(backends, spec, False, mirrors)})
    return routes


def route_configuration(name: str, services: Sequence[ServiceRoutes]) -> Json:
    """RouteConfiguration for sidecars' outbound listeners: one virtual host per service (by authority).

    Per service, in order: header overrides (pinned to their cluster), route classes (by
    x-servemesh-route-class), then the default split. A route with idempotent methods is
    preceded by a twin matching just those paths, which also retries gRPC UNAVAILABLE.
    """
    return {
        "name": name,
        "virtual_hosts": [
            {"name": svc.service, "domains": [svc.service, f"{svc.service}:*"], "routes": _service_routes(svc, ["/"])}
            for svc in services
        ],
    }


NOT_FOUND_BODY = json.dumps({"code": 5, "message": "no such API", "details": []})


def edge_route_configuration(name: str, services: Sequence[ServiceRoutes]) -> Json:
    """RouteConfiguration for the edge: routes by gRPC service path (after transcoding), then 404.

    Each service's routes are those of `route_configuration`, restricted to the paths of
    its `grpc_services`; anything else gets a direct 404 (a gRPC caller sees UNIMPLEMENTED).
    """
    routes: list[Json] = []
    for svc in services:
        if not svc.grpc_services:
            raise ValueError(f"service {svc.service!r}: the edge needs its grpc_services")
        routes.extend(_service_routes(svc, [f"/{s}/" for s in svc.grpc_services]))
        if svc.http_prefixes:  # HTTP paths: the same splits, no gRPC retries
            plain = dataclasses.replace(svc, routes=[dataclasses.replace(r, idempotent_methods=()) for r in svc.routes])
            routes.extend(_service_routes(plain, svc.http_prefixes))
    routes.append(
        {
            "name": "not-found",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": NOT_FOUND_BODY}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    )
    return {"name": name, "virtual_hosts": [{"name": "edge", "domains": ["*"], "routes": routes}]}


# --- bootstraps --------------------------------------------------------------------------


def _bootstrap(
    node: Node,
    ident: Identity,
    admin_port: int,
    listeners: list[Json],
    clusters: list[Json],
    xds_address: tuple[str, int] | None,
    initial_fetch_timeout_s: float,
    max_downstream_connections: int,
) -> Json:
    boot: Json = {
        "node": node.as_dict(),
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        # histograms reach the admin API (and so rollout analysis) at each flush: every second
        "stats_flush_interval": "1s",
        # an admin layer, so an operator can set runtime keys (e.g. fault injection) over the admin API
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {}}, {"name": "admin", "admin_layer": {}}]},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": T_DOWNSTREAM_CONNECTIONS,
                        "max_active_downstream_connections": max_downstream_connections,
                    },
                }
            ]
        },
    }
    if xds_address is not None:
        clusters.append(xds_cluster(xds_address[0], xds_address[1], ident))
        ads = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": _duration(initial_fetch_timeout_s)}
        boot["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": ads,
            "lds_config": dict(ads),
        }
    return boot


def sidecar_bootstrap(
    node: Node,
    identity: Identity,
    *,
    admin_port: int,
    inbound_port: int,
    app_port: LocalAddress,
    xds_address: tuple[str, int] | None,
    policy: Policy,
    app_http: LocalAddress | None = None,
    http_prefixes: Sequence[str] = (),
    static_clusters: Sequence[Json] = (),
    static_listeners: Sequence[Json] = (),
    stream_idle_timeout_s: float = 900.0,
    initial_fetch_timeout_s: float = 5.0,
    max_downstream_connections: int = 50_000,
    fault_injection: bool = False,
) -> Json:
    """Bootstrap of a service's sidecar: static "inbound" listener and "local_app" cluster, plus ADS.

    `app_http` is the app's HTTP API, which gets the requests under `http_prefixes`.
    `fault_injection` puts the fault filter on the inbound listener (off until set in the runtime).

    With `xds_address` None there is no ADS (everything else must come in `static_*`).
    Until ADS answers (or `initial_fetch_timeout_s` passes), Envoy is not ready.
    """
    listeners = [
        inbound_listener(
            inbound_port,
            identity,
            node.service,
            policy,
            stream_idle_timeout_s=stream_idle_timeout_s,
            http_prefixes=http_prefixes if app_http is not None else (),
            fault_injection=fault_injection,
        ),
        *static_listeners,
    ]
    clusters = [local_app_cluster(app_port), *static_clusters]
    if app_http is not None:
        clusters.append(local_http_cluster(app_http))
    return _bootstrap(
        node,
        identity,
        admin_port,
        listeners,
        clusters,
        xds_address,
        initial_fetch_timeout_s,
        max_downstream_connections,
    )


def edge_bootstrap(
    identity: Identity,
    *,
    admin_port: int,
    edge_port: int,
    xds_address: tuple[str, int] | None,
    node: Node | None = None,
    descriptor_path: Path | None = None,
    grpc_services: Sequence[str] = (GATEWAY_SERVICE, REGISTRY_SERVICE),
    rate_limit: RateLimit = RateLimit(),
    route_config: Json | None = None,
    static_clusters: Sequence[Json] = (),
    stream_idle_timeout_s: float = 900.0,
    initial_fetch_timeout_s: float = 5.0,
    max_downstream_connections: int = 50_000,
) -> Json:
    """Bootstrap of the edge Envoy: static "edge" listener; clusters and RDS "edge" over ADS.

    `route_config` inlines the edge routes instead of RDS (with `static_clusters`, no ADS needed).
    """
    listener = edge_listener(
        edge_port,
        identity,
        descriptor_path=descriptor_path,
        grpc_services=grpc_services,
        rate_limit=rate_limit,
        route_config=route_config,
        stream_idle_timeout_s=stream_idle_timeout_s,
    )
    return _bootstrap(
        node or Node("edge", "edge"),
        identity,
        admin_port,
        [listener],
        list(static_clusters),
        xds_address,
        initial_fetch_timeout_s,
        max_downstream_connections,
    )

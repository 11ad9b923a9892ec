"""Routing state (the registry's WatchRoutes message) -> one Envoy's snapshot.

- a service's sidecar gets a cluster per deployment of every *other* service, an
  "outbound" listener on the port its bootstrap names, and the "outbound" routes;
- the edge gets the gateway's deployments and the "edge" routes (then 404).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message
from servemesh.gateway.v1 import gateway_pb2
from servemesh.registry.v1 import registry_pb2

from mesh import certs
from mesh.envoy import config as envoy
from mesh.xds.snapshot import NodeInfo, Snapshot

#: calls safe to retry on UNAVAILABLE (no side effects), per service
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "inference": ("Tokenize", "ListEngines", "GetEngine"),
    "gateway": ("GetVersion",),
    "registry": (
        "GetDeployment",
        "ListDeployments",
        "GetRoute",
        "ListRoutes",
        "ListAuditEntries",
        "GetTenant",
        "ListTenants",
        "GetApiKey",
        "ListApiKeys",
        "VerifyApiKey",
    ),
    "retrieval": ("Search", "ListIndexes", "ListManifests", "GetManifest"),
    "rerank": ("Rerank", "GetScorer"),
}
#: services the edge exposes, with their gRPC services
EDGE_SERVICES = {"gateway": (gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,)}
#: HTTP APIs the edge exposes besides gRPC (and its transcoding), per service
EDGE_HTTP_PREFIXES = {"gateway": ("/openai/",)}
EDGE = "edge"
#: a route's upstream timeout when the registry sets none (the contract's "mesh default")
DEFAULT_TIMEOUT_S = 300.0


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def service_routes(state: registry_pb2.WatchRoutesResponse, service: str) -> envoy.ServiceRoutes:
    """A service's registry routes as route specs: route classes first, the default route last."""
    routes = sorted((r for r in state.routes if r.service == service), key=lambda r: (r.route_class == "", r.name))
    specs = [
        envoy.RouteSpec(
            route_class=r.route_class,
            backends=[(envoy.cluster_name(_id(b.deployment)), b.weight) for b in r.backends],
            # a locked route is pinned to its backends: overrides to anything else do not apply
            header_overrides=[]
            if r.locked
            else [(o.header, o.value, envoy.cluster_name(_id(o.deployment))) for o in r.header_overrides],
            timeout_seconds=r.timeout.ToTimedelta().total_seconds() if r.HasField("timeout") else DEFAULT_TIMEOUT_S,
            idempotent_methods=IDEMPOTENT_METHODS.get(service, ()),
            mirrors=[(envoy.cluster_name(_id(m.deployment)), m.percent) for m in r.mirrors],
        )
        for r in routes
    ]
    return envoy.ServiceRoutes(service, specs, EDGE_SERVICES.get(service, ()), EDGE_HTTP_PREFIXES.get(service, ()))


def _parse(resources: Iterable[dict], cls: type[Message]) -> list[Message]:
    return [envoy.to_proto(r, cls()) for r in resources]


def build_snapshot(
    node: NodeInfo, state: registry_pb2.WatchRoutesResponse, revision: int, *, certs_dir: Path, namespace: str
) -> Snapshot:
    ident = certs.identity(certs_dir, node.service, namespace)
    routed = sorted({r.service for r in state.routes})
    services = ["gateway"] if node.service == EDGE else [s for s in routed if s != node.service]
    clusters = [
        envoy.deployment_cluster(_id(d.name), *_host_port(d.endpoint), ident, certs.spiffe_id(d.service, namespace))
        for d in state.deployments
        if d.service in services
    ]
    specs = [service_routes(state, s) for s in services if s in routed]
    listeners = []
    if node.service == EDGE:
        rc = envoy.edge_route_configuration("edge", specs)
    else:
        rc = envoy.route_configuration("outbound", specs)
        if sock := node.metadata.get("outbound_socket"):
            listeners.append(envoy.outbound_listener(Path(str(sock))))
        elif port := node.metadata.get("outbound_port"):
            listeners.append(envoy.outbound_listener(int(port)))  # type: ignore[call-overload]
    return Snapshot.of(
        revision,
        [
            *_parse(clusters, cluster_pb2.Cluster),
            *_parse(listeners, listener_pb2.Listener),
            *_parse([rc], route_pb2.RouteConfiguration),
        ],
    )

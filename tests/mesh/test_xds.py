"""The control plane's snapshots and ADS server, against a real Envoy."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from mesh import certs
from mesh.envoy import config as envoy
from mesh.envoy.process import EnvoyProcess
from mesh.xds.ads import AdsServer, XdsMetrics
from mesh.xds.build import IDEMPOTENT_METHODS
from mesh.xds.server import ADS_SERVICE, STATUS_SERVICE, ControlPlaneSettings
from mesh.xds.snapshot import CLUSTER, ROUTE, InconsistentSnapshot, Snapshot, SnapshotCache
from services.common.metrics import new_registry
from services.common.server import Service, create_server
from tests.engine_fixtures import free_port

NODE = "gateway-stable"


def _cluster(ident: certs.Identity, name: str, port: int, bad: bool = False) -> cluster_pb2.Cluster:
    doc = envoy.deployment_cluster(name, "127.0.0.1", port, ident, certs.spiffe_id("inference"))
    if bad:  # Envoy requires a positive connect timeout: it rejects the whole cluster update
        doc["connect_timeout"] = "-1s"
    return envoy.to_proto(doc, cluster_pb2.Cluster())


def _resources(
    ident: certs.Identity,
    clusters: dict[str, int],
    route_to: str,
    listener_port: int,
    bad: bool = False,
    bad_cluster: str = "",
):
    out = [_cluster(ident, name, port, bad=name == bad_cluster) for name, port in clusters.items()]
    out.append(envoy.to_proto(envoy.outbound_listener(listener_port), listener_pb2.Listener()))
    rc = envoy.route_configuration(
        "outbound", [envoy.ServiceRoutes("inference", [envoy.RouteSpec(backends=[(envoy.cluster_name(route_to), 1)])])]
    )
    if bad:  # a regex Envoy cannot compile: it rejects the whole route configuration
        routes = rc["virtual_hosts"][0]["routes"]
        routes.insert(0, {**routes[-1], "name": "bad", "match": {"safe_regex": {"regex": "("}}})
    out.append(envoy.to_proto(rc, route_pb2.RouteConfiguration()))
    return out


def test_snapshot_refuses_a_route_to_a_missing_cluster(tmp_path: Path) -> None:
    ident = certs.ensure_identities(tmp_path, ["gateway", "inference"])["gateway"]
    with pytest.raises(InconsistentSnapshot, match="unknown cluster 'd.b'"):
        Snapshot.of(1, _resources(ident, {"a": 1}, "b", 2))
    snap = Snapshot.of(1, _resources(ident, {"a": 1}, "a", 2))
    assert snap.versions == Snapshot.of(7, _resources(ident, {"a": 1}, "a", 2)).versions  # content, not revision
    assert snap.versions[CLUSTER] != Snapshot.of(1, _resources(ident, {"a": 3}, "a", 2)).versions[CLUSTER]


@pytest.fixture
async def plane(tmp_path: Path):
    idents = certs.ensure_identities(tmp_path / "certs", ["gateway", "inference", "control-plane", "cli"])
    for ident in idents.values():
        envoy.write_sds_files(ident)

    def no_registry(*_a):
        raise AssertionError("these tests serve snapshots directly")

    cache = SnapshotCache(no_registry)
    ads = AdsServer(cache, XdsMetrics(new_registry()))
    settings = ControlPlaneSettings(port=0, certs_dir=tmp_path / "certs")
    server = await create_server(
        settings,
        [
            Service(ADS_SERVICE, ads, ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server),
            Service(STATUS_SERVICE, ads, mesh_pb2_grpc.add_ControlPlaneServiceServicer_to_server),
        ],
        credentials=certs.server_credentials(idents["control-plane"]),
    )
    await server.start()
    ident = idents["gateway"]
    out_port, admin = free_port(), free_port()
    await cache.set_snapshot(NODE, Snapshot.of(1, _resources(ident, {"a": free_port()}, "a", out_port)))
    boot = envoy.sidecar_bootstrap(
        envoy.Node(NODE, "gateway", out_port),
        ident,
        admin_port=admin,
        inbound_port=free_port(),
        app_port=free_port(),
        xds_address=("127.0.0.1", server.port),
        policy=envoy.load_policy(),
    )
    proxy = EnvoyProcess(NODE, boot, tmp_path / "envoy")
    await proxy.start()
    try:
        yield cache, ads, proxy, ident, out_port
    finally:
        await proxy.stop()
        await server.stop(0)


async def _status(ads: AdsServer, want, timeout: float = 10.0) -> mesh_pb2.Node:
    deadline = time.monotonic() + timeout
    while True:
        node = ads.node_status(NODE)
        if want(node) or time.monotonic() > deadline:
            return node
        await asyncio.sleep(0.05)


async def _routes_in_envoy(proxy: EnvoyProcess) -> str:
    return json.dumps(await proxy.config_dump("dynamic_route_configs"))


async def test_a_nacked_config_leaves_the_last_good_one_serving(plane) -> None:
    cache, ads, proxy, ident, out_port = plane
    node = await _status(ads, lambda n: n.in_sync)
    assert node.in_sync and node.connected
    good_routes = next(r.acked_version for r in node.resources if r.type_url == ROUTE)

    port_b = free_port()
    await cache.set_snapshot(NODE, Snapshot.of(2, _resources(ident, {"b": port_b}, "b", out_port, bad=True)))
    node = await _status(ads, lambda n: any(r.nack_count for r in n.resources))
    routes = next(r for r in node.resources if r.type_url == ROUTE)
    assert routes.nack_count == 1 and "missing )" in routes.last_nack_message, routes
    assert routes.acked_version == good_routes and not node.in_sync
    dumped = await _routes_in_envoy(proxy)
    assert "d.a" in dumped and '"bad"' not in dumped  # Envoy still routes by the last good config

    # the new snapshot has no d.a, but the routes Envoy still runs need it: it stays until they move
    clusters = next(r for r in node.resources if r.type_url == CLUSTER)
    assert clusters.acked_version == clusters.sent_version
    assert {"d.a", "d.b"} <= set(json.dumps(await proxy.config_dump("dynamic_active_clusters")).split('"'))

    # the next good config is taken, and clusters no longer routed to are dropped after the routes
    await cache.set_snapshot(NODE, Snapshot.of(3, _resources(ident, {"b": port_b}, "b", out_port)))
    node = await _status(ads, lambda n: n.in_sync)
    assert node.in_sync, node
    assert "d.b" in await _routes_in_envoy(proxy)
    active = set(json.dumps(await proxy.config_dump("dynamic_active_clusters")).split('"'))
    assert "d.b" in active and "d.a" not in active


async def test_routes_never_follow_clusters_the_envoy_rejected(plane) -> None:
    cache, ads, proxy, ident, out_port = plane
    node = await _status(ads, lambda n: n.in_sync)
    good_routes = next(r.acked_version for r in node.resources if r.type_url == ROUTE)

    snap = Snapshot.of(2, _resources(ident, {"a": free_port(), "b": free_port()}, "b", out_port, bad_cluster="b"))
    await cache.set_snapshot(NODE, snap)
    node = await _status(ads, lambda n: any(r.nack_count for r in n.resources))
    clusters = next(r for r in node.resources if r.type_url == CLUSTER)
    assert clusters.nack_count == 1 and "positive duration" in clusters.last_nack_message, clusters
    await asyncio.sleep(0.5)  # give a wrong push the time to happen
    routes = next(r for r in ads.node_status(NODE).resources if r.type_url == ROUTE)
    assert routes.sent_version == routes.acked_version == good_routes  # routes to d.b were never sent
    assert "d.b" not in await _routes_in_envoy(proxy)


async def test_a_peer_cannot_speak_for_another_service(plane, tmp_path: Path) -> None:
    """A valid mesh certificate of `cli` claiming to be the gateway's sidecar is refused."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    _cache, ads, proxy, ident, _out_port = plane
    cli = certs.identity(Path(ident.cert_path).parent.parent, "cli")
    boot = proxy.bootstrap["static_resources"]["clusters"]
    xds = next(c for c in boot if c["name"] == "xds")
    port = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    options = [("grpc.ssl_target_name_override", "control-plane")]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port['port_value']}", certs.channel_credentials(cli), options=options
    ) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
        await call.write(
            discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=NODE, cluster="gateway"), type_url=CLUSTER)
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call.read()
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ads.node_status(NODE).connected  # the real sidecar's stream is untouched


def test_many_idempotent_methods_are_split_over_routes_envoy_accepts(tmp_path) -> None:
    """Envoy refuses a regex whose RE2 program is over 100: the registry's ten read-only
    methods in one alternation was refused (NACK) and left the sidecar without routes."""
    methods = IDEMPOTENT_METHODS["registry"]
    assert len(methods) > envoy.IDEMPOTENT_METHODS_PER_ROUTE
    spec = envoy.RouteSpec(backends=[("d.registry", 100)], idempotent_methods=methods)
    rc = envoy.route_configuration("outbound", [envoy.ServiceRoutes("registry", [spec])])
    routes = rc["virtual_hosts"][0]["routes"]
    regexes = [r["match"]["safe_regex"]["regex"] for r in routes if "safe_regex" in r["match"]]
    assert len(regexes) == -(-len(methods) // envoy.IDEMPOTENT_METHODS_PER_ROUTE)
    covered = [
        m for m in methods if any(re.fullmatch(r, f"/servemesh.registry.v1.RegistryService/{m}") for r in regexes)
    ]
    assert covered == list(methods)
    assert len({r["name"] for r in routes}) == len(routes)

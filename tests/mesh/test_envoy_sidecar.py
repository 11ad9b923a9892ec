"""The mesh's Envoy configuration, exercised by real Envoy processes on loopback.

One set of Envoys per module (started concurrently):
  registry sidecar   inbound mTLS + RBAC -> echo app "registry" (also has ADS to a dead port)
  inference-stable   inbound -> echo app "inference-stable"
  inference-canary   inbound -> echo app "inference-canary"
  gateway sidecar    inbound -> GatewayDouble; outbound listener with d.inference-* clusters
  edge               TLS + transcoder + rate limit -> d.gateway-stable -> gateway sidecar
  edge-limited       an edge with a 2-token bucket
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servemesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from mesh.certs import DEFAULT_IDENTITIES, Identity, ensure_identities, rotate, spiffe_id
from mesh.controller.metrics import Calls, Window, envoy_calls
from mesh.envoy.config import (
    FAULT_ABORT_PERCENT_KEY,
    GATEWAY_SERVICE,
    INFERENCE_SERVICE,
    REGISTRY_SERVICE,
    ROUTE_CLASS_HEADER,
    Node,
    PolicyError,
    RateLimit,
    RouteSpec,
    ServiceRoutes,
    cluster_name,
    deployment_cluster,
    edge_bootstrap,
    edge_route_configuration,
    load_policy,
    outbound_listener,
    parse_policy,
    rbac_filter,
    route_configuration,
    sds_documents,
    sidecar_bootstrap,
    to_proto,
    write_sds_files,
)
from mesh.envoy.process import EnvoyError, EnvoyProcess, validate_bootstrap
from mesh.launcher import free_port
from tests.mesh.envoy_fixtures import (
    EchoApp,
    GatewayDouble,
    call_raw,
    mtls_channel,
    peer_serial,
)

REGISTRY = f"/{REGISTRY_SERVICE}"
INFERENCE = f"/{INFERENCE_SERVICE}"
OVERRIDE_HEADER = "x-servemesh-deployment"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- pure builders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mesh") / "certs"
    for ident in ensure_identities(d, DEFAULT_IDENTITIES).values():
        write_sds_files(ident)
    return d


@pytest.fixture(scope="module")
def ids(certs_dir: Path) -> dict[str, Identity]:
    return ensure_identities(certs_dir, DEFAULT_IDENTITIES)


def _inference_routes() -> list[ServiceRoutes]:
    return [
        ServiceRoutes(
            "inference",
            [
                RouteSpec(
                    "",
                    # 90/10; Envoy 1.40 takes weights as given (no total_weight, any sum)
                    [(cluster_name("inference-stable"), 9), (cluster_name("inference-canary"), 1)],
                    [(OVERRIDE_HEADER, "inference-canary", cluster_name("inference-canary"))],
                    None,
                    ["GetEngine", f"{INFERENCE}/ListEngines"],
                ),
                RouteSpec("code", [(cluster_name("inference-canary"), 1)], timeout_seconds=30),
                # shadow: every request answered by stable, a copy of each sent to the canary
                RouteSpec(
                    "shadow",
                    [(cluster_name("inference-stable"), 1)],
                    [(OVERRIDE_HEADER, "inference-canary", cluster_name("inference-canary"))],
                    mirrors=[(cluster_name("inference-canary"), 100.0)],
                ),
            ],
            [INFERENCE_SERVICE],
        )
    ]


def test_every_builder_output_parses_into_its_envoy_type(ids: dict[str, Identity]) -> None:
    cluster = deployment_cluster("inference-stable", "localhost", 15000, ids["gateway"], spiffe_id("inference"))
    to_proto(cluster, cluster_pb2.Cluster())
    assert cluster["name"] == "d.inference-stable" and cluster["type"] == "LOGICAL_DNS"
    to_proto(outbound_listener(15001), listener_pb2.Listener())
    routes = route_configuration("outbound", _inference_routes())
    to_proto(routes, route_pb2.RouteConfiguration())
    names = [r["name"] for r in routes["virtual_hosts"][0]["routes"]]
    assert names == [
        "inference/override-default-0/idempotent",
        "inference/override-default-0",
        "inference/override-shadow-0",
        "inference/class-code",
        "inference/class-shadow",
        "inference/default/idempotent",
        "inference/default",
    ]
    assert routes["virtual_hosts"][0]["domains"] == ["inference", "inference:*"]
    edge_routes = edge_route_configuration(
        "edge", [ServiceRoutes("gateway", [RouteSpec("", [("d.g", 1)])], [GATEWAY_SERVICE])]
    )
    to_proto(edge_routes, route_pb2.RouteConfiguration())
    assert edge_routes["virtual_hosts"][0]["routes"][-1]["direct_response"]["status"] == 404
    for doc in sds_documents(ids["gateway"]):
        to_proto(doc, discovery_pb2.DiscoveryResponse())


def test_retries_on_unavailable_only_where_idempotent() -> None:
    routes = route_configuration("outbound", _inference_routes())["virtual_hosts"][0]["routes"]
    by_name = {r["name"]: r for r in routes}
    idem = by_name["inference/default/idempotent"]
    assert "unavailable" in idem["route"]["retry_policy"]["retry_on"].split(",")
    assert idem["match"]["safe_regex"]["regex"] == (
        r"^(?:/[^/]+/(?:GetEngine)|/servemesh\.inference\.v1\.InferenceService/ListEngines)$"
    )
    for name in ("inference/default", "inference/class-code", "inference/override-default-0"):
        assert "unavailable" not in by_name[name]["route"]["retry_policy"]["retry_on"].split(",")
    assert by_name["inference/class-code"]["route"]["timeout"] == "30s"
    assert by_name["inference/default"]["route"]["timeout"] == "0s"
    with pytest.raises(ValueError, match="positive weight"):
        route_configuration("x", [ServiceRoutes("s", [RouteSpec("", [("d.a", 0)])])])


def test_ads_bootstraps_are_accepted_by_envoy(ids: dict[str, Identity]) -> None:
    policy = load_policy()
    sidecar = sidecar_bootstrap(
        Node("gateway-stable", "gateway", 15001),
        ids["gateway"],
        admin_port=19000,
        inbound_port=15000,
        app_port=50050,
        xds_address=("127.0.0.1", 18000),
        policy=policy,
    )
    to_proto(sidecar, bootstrap_pb2.Bootstrap())
    assert sidecar["node"] == {
        "id": "gateway-stable",
        "cluster": "gateway",
        "metadata": {"service": "gateway", "outbound_port": 15001},
    }
    ads = sidecar["dynamic_resources"]
    assert ads["ads_config"]["set_node_on_first_message_only"] is True
    assert ads["cds_config"]["ads"] == {} and ads["lds_config"]["resource_api_version"] == "V3"
    xds = next(c for c in sidecar["static_resources"]["clusters"] if c["name"] == "xds")
    sans = xds["transport_socket"]["typed_config"]["common_tls_context"]["combined_validation_context"]
    assert sans["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://servemesh.local/ns/default/sa/control-plane"
    }
    validate_bootstrap(sidecar)
    edge = edge_bootstrap(ids["edge"], admin_port=19001, edge_port=8443, xds_address=("127.0.0.1", 18000))
    to_proto(edge, bootstrap_pb2.Bootstrap())
    validate_bootstrap(edge)
    broken = json.loads(json.dumps(edge))
    broken["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][1][
        "typed_config"
    ]["services"] = ["no.such.Service"]
    with pytest.raises(EnvoyError, match=r"no\.such\.Service"):
        validate_bootstrap(broken)


def test_policy_errors_name_the_bad_key() -> None:
    with pytest.raises(PolicyError, match=r"services\.registry\.allow\.0\.callers\.0: .*'Bad Name'"):
        parse_policy({"services": {"registry": {"allow": [{"callers": ["Bad Name"]}]}}})
    with pytest.raises(PolicyError, match=r"services\.registry\.alow: Extra inputs are not permitted"):
        parse_policy({"services": {"registry": {"alow": []}}})
    with pytest.raises(PolicyError, match=r"services\.registry\.allow\.0\.methods\.0: .*'Get Route'"):
        parse_policy(
            {
                "services": {
                    "registry": {
                        "grpc_services": [REGISTRY_SERVICE],
                        "allow": [{"callers": ["cli"], "methods": ["Get Route"]}],
                    }
                }
            }
        )
    with pytest.raises(PolicyError, match="grpc_services"):
        parse_policy({"services": {"registry": {"allow": [{"callers": ["cli"], "methods": ["GetRoute"]}]}}})


def test_default_policy_rbac_rules() -> None:
    rules = rbac_filter(load_policy(), "registry")["typed_config"]["rules"]
    assert rules["action"] == "ALLOW"
    read_only = rules["policies"]["registry-rule-1"]
    assert {"url_path": {"path": {"prefix": f"{REGISTRY}/Get"}}} in read_only["permissions"]
    assert {"url_path": {"path": {"exact": f"{REGISTRY}/WatchRoutes"}}} in read_only["permissions"]
    principals = {p["authenticated"]["principal_name"]["exact"] for p in read_only["principals"]}
    assert principals == {spiffe_id("control-plane"), spiffe_id("gateway")}
    unknown = rbac_filter(load_policy(), "nobody")["typed_config"]["rules"]["policies"]
    assert list(unknown) == ["health-check"]


# --- real Envoys ---------------------------------------------------------------------------


@dataclass
class Mesh:
    ids: dict[str, Identity]
    rogue: Identity
    envoys: dict[str, EnvoyProcess]
    ports: dict[str, int]
    apps: dict[str, EchoApp]
    gateway: GatewayDouble


@pytest.fixture(scope="module")
async def mesh(ids: dict[str, Identity], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    run = tmp_path_factory.mktemp("envoy")
    rogue = ensure_identities(run / "rogue-certs", ["gateway"])["gateway"]
    policy = load_policy()
    apps = {n: EchoApp(n) for n in ("registry", "inference-stable", "inference-canary")}
    gateway = GatewayDouble()
    ports = {
        n: free_port()
        for n in ("registry", "inference-stable", "inference-canary", "gateway", "outbound", "edge", "edge-limited")
    }
    admin = {
        n: free_port() for n in ("registry", "inference-stable", "inference-canary", "gateway", "edge", "edge-limited")
    }

    def sidecar(
        name: str,
        service: str,
        app_port: int,
        *,
        xds_address: tuple[str, int] | None = None,
        outbound_port: int | None = None,
        static_clusters: tuple[dict, ...] = (),
        static_listeners: tuple[dict, ...] = (),
        initial_fetch_timeout_s: float = 5.0,
        fault_injection: bool = False,
    ) -> dict:
        return sidecar_bootstrap(
            Node(name, service, outbound_port),
            ids[service],
            admin_port=admin[name],
            inbound_port=ports[name],
            app_port=app_port,
            xds_address=xds_address,
            policy=policy,
            static_clusters=static_clusters,
            static_listeners=static_listeners,
            initial_fetch_timeout_s=initial_fetch_timeout_s,
            fault_injection=fault_injection,
        )

    gw = ids["gateway"]
    boots = {
        # ADS points at a closed port: the static inbound must still come up after the initial fetch timeout.
        "registry": sidecar(
            "registry",
            "registry",
            apps["registry"].port,
            xds_address=("127.0.0.1", free_port()),
            initial_fetch_timeout_s=1.0,
        ),
        "inference-stable": sidecar("inference-stable", "inference", apps["inference-stable"].port),
        "inference-canary": sidecar(
            "inference-canary", "inference", apps["inference-canary"].port, fault_injection=True
        ),
        "gateway": sidecar(
            "gateway",
            "gateway",
            gateway.port,
            outbound_port=ports["outbound"],
            static_clusters=(
                deployment_cluster(
                    "inference-stable", "127.0.0.1", ports["inference-stable"], gw, spiffe_id("inference")
                ),
                deployment_cluster(
                    "inference-canary", "localhost", ports["inference-canary"], gw, spiffe_id("inference")
                ),
            ),
            static_listeners=(
                outbound_listener(ports["outbound"], route_config=route_configuration("outbound", _inference_routes())),
            ),
        ),
        "edge": edge_bootstrap(
            ids["edge"],
            admin_port=admin["edge"],
            edge_port=ports["edge"],
            xds_address=None,
            route_config=edge_route_configuration(
                "edge",
                [ServiceRoutes("gateway", [RouteSpec("", [(cluster_name("gateway-stable"), 1)])], [GATEWAY_SERVICE])],
            ),
            static_clusters=[
                deployment_cluster("gateway-stable", "127.0.0.1", ports["gateway"], ids["edge"], spiffe_id("gateway"))
            ],
        ),
        "edge-limited": edge_bootstrap(
            ids["edge"],
            admin_port=admin["edge-limited"],
            edge_port=ports["edge-limited"],
            node=Node("edge-limited", "edge"),
            xds_address=None,
            rate_limit=RateLimit(max_tokens=2, tokens_per_fill=1, fill_interval_s=3600),
            route_config=edge_route_configuration("edge", []),
        ),
    }
    for boot in boots.values():
        to_proto(boot, bootstrap_pb2.Bootstrap())
    envoys = {n: EnvoyProcess(n, b, run, concurrency=1, start_timeout_s=30) for n, b in boots.items()}
    try:
        for app in (*apps.values(), gateway):
            await app.start()
        await asyncio.gather(*(e.start() for e in envoys.values()))
        yield Mesh(ids, rogue, envoys, ports, apps, gateway)
    finally:
        await asyncio.gather(*(e.stop() for e in envoys.values()), return_exceptions=True)
        for app in (*apps.values(), gateway):
            await app.stop()
        for e in envoys.values():
            assert e.pid is None


async def test_caller_reaches_app_through_inbound_mtls_and_app_sees_its_spiffe_id(mesh: Mesh) -> None:
    async with mtls_channel(mesh.ports["registry"], mesh.ids["gateway"]) as ch:
        reply = await call_raw(ch, f"{REGISTRY}/GetRoute")
    assert reply["app"] == "registry" and reply["method"] == f"{REGISTRY}/GetRoute"
    assert f"URI={spiffe_id('gateway')}" in reply["xfcc"].split(";")
    assert f"By={spiffe_id('registry')}" in reply["xfcc"].split(";")


async def test_a_forged_xfcc_header_is_replaced(mesh: Mesh) -> None:
    async with mtls_channel(mesh.ports["registry"], mesh.ids["cli"]) as ch:
        reply = await call_raw(
            ch, f"{REGISTRY}/CreateRoute", metadata=(("x-forwarded-client-cert", f"URI={spiffe_id('console')}"),)
        )
    assert f"URI={spiffe_id('cli')}" in reply["xfcc"].split(";")
    assert spiffe_id("console") not in reply["xfcc"]


async def test_no_client_certificate_is_refused(mesh: Mesh) -> None:
    async with mtls_channel(mesh.ports["registry"], None, mesh.ids["cli"].ca_path.read_bytes()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(ch, f"{REGISTRY}/GetRoute")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stats = await mesh.envoys["registry"].stats(r"listener\.127\.0\.0\.1_\d+\.ssl\.(fail_verify_no_cert|handshake)")
    assert any(k.endswith("fail_verify_no_cert") and v >= 1 for k, v in stats.items()), stats


async def test_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    assert mesh.rogue.spiffe_id == spiffe_id("gateway")
    async with mtls_channel(mesh.ports["registry"], mesh.rogue, mesh.ids["cli"].ca_path.read_bytes()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(ch, f"{REGISTRY}/GetRoute")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_identity_not_in_policy_is_permission_denied_but_may_health_check(mesh: Mesh) -> None:
    async with mtls_channel(mesh.ports["registry"], mesh.ids["inference"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(ch, f"{REGISTRY}/GetRoute")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    stats = await mesh.envoys["registry"].stats(r"http\.inbound_registry\.rbac\.(allowed|denied)")
    assert stats["http.inbound_registry.rbac.denied"] >= 1


async def test_read_only_rule_allows_reads_and_denies_writes(mesh: Mesh) -> None:
    async with mtls_channel(mesh.ports["registry"], mesh.ids["gateway"]) as ch:
        for method in ("GetRoute", "ListRoutes", "ListDeployments", "WatchRoutes"):
            assert (await call_raw(ch, f"{REGISTRY}/{method}"))["method"] == f"{REGISTRY}/{method}"
        for method in ("CreateRoute", "DeleteRoute", "UpdateRoute"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call_raw(ch, f"{REGISTRY}/{method}")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        # the rule names RegistryService's methods, not any service's
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(ch, "/other.v1.Other/GetRoute")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with mtls_channel(mesh.ports["registry"], mesh.ids["console"]) as ch:
        assert (await call_raw(ch, f"{REGISTRY}/CreateRoute"))["app"] == "registry"


async def test_outbound_weighted_split_override_and_class(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{mesh.ports['outbound']}", options=[("grpc.default_authority", "inference")]
    ) as ch:
        replies = await asyncio.gather(*(call_raw(ch, f"{INFERENCE}/Generate", timeout=20) for _ in range(300)))
        counts = Counter(r["app"] for r in replies)
        # canary share 10 %: mean 30, sd sqrt(300 * 0.1 * 0.9) = 5.2; 4.5 sd -> [7, 53]
        assert counts["inference-stable"] + counts["inference-canary"] == 300
        assert 7 <= counts["inference-canary"] <= 53, counts
        # the inference sidecar sees the gateway sidecar's identity
        assert f"URI={spiffe_id('gateway')}" in replies[0]["xfcc"].split(";")

        pinned = await asyncio.gather(
            *(
                call_raw(ch, f"{INFERENCE}/Generate", metadata=((OVERRIDE_HEADER, "inference-canary"),))
                for _ in range(40)
            )
        )
        assert {r["app"] for r in pinned} == {"inference-canary"}
        classed = await asyncio.gather(
            *(call_raw(ch, f"{INFERENCE}/Generate", metadata=((ROUTE_CLASS_HEADER, "code"),)) for _ in range(20))
        )
        assert {r["app"] for r in classed} == {"inference-canary"}

    # another authority has no virtual host: Envoy answers 404, a gRPC caller sees UNIMPLEMENTED
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{mesh.ports['outbound']}", options=[("grpc.default_authority", "nowhere")]
    ) as other:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(other, f"{INFERENCE}/Generate")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_mirrored_requests_reach_the_shadow_and_only_the_primary_answers(mesh: Mesh) -> None:
    canary, stable = mesh.apps["inference-canary"], mesh.apps["inference-stable"]
    before = canary.calls, stable.calls
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{mesh.ports['outbound']}", options=[("grpc.default_authority", "inference")]
    ) as ch:
        meta = ((ROUTE_CLASS_HEADER, "shadow"),)
        replies = await asyncio.gather(*(call_raw(ch, f"{INFERENCE}/Generate", metadata=meta) for _ in range(40)))
        assert {r["app"] for r in replies} == {"inference-stable"}
        # mirroring is fire-and-forget: the copies may land just after the replies
        for _ in range(100):
            if canary.calls - before[0] >= 40:
                break
            await asyncio.sleep(0.05)
        assert canary.calls - before[0] == 40 and stable.calls - before[1] == 40
        # a header override on the same route class is not mirrored
        pinned = await call_raw(ch, f"{INFERENCE}/Generate", metadata=(*meta, (OVERRIDE_HEADER, "inference-canary")))
        assert pinned["app"] == "inference-canary"
        await asyncio.sleep(0.3)
        assert canary.calls - before[0] == 41 and stable.calls - before[1] == 40
    stats = await mesh.envoys["gateway"].stats(r"^cluster\.d\.inference-canary\.grpc\.")
    assert stats.get(f"cluster.d.inference-canary.grpc.{INFERENCE_SERVICE}.Generate.0", 0) >= 41, stats


async def test_fault_injection_is_off_until_set_in_the_runtime_and_counted_per_grpc_status(mesh: Mesh) -> None:
    canary = mesh.envoys["inference-canary"]
    prefix = f"cluster.d.inference-canary.grpc.{INFERENCE_SERVICE}.Generate"
    meta = ((OVERRIDE_HEADER, "inference-canary"),)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{mesh.ports['outbound']}", options=[("grpc.default_authority", "inference")]
    ) as ch:
        assert (await call_raw(ch, f"{INFERENCE}/Generate", metadata=meta))["app"] == "inference-canary"
        before = await mesh.envoys["gateway"].stats(rf"^{re.escape(prefix)}\.")
        await canary.set_runtime(**{FAULT_ABORT_PERCENT_KEY: "100"})
        try:
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call_raw(ch, f"{INFERENCE}/Generate", metadata=meta)
                assert err.value.code() == grpc.StatusCode.INTERNAL
        finally:
            await canary.set_runtime(**{FAULT_ABORT_PERCENT_KEY: ""})
        assert (await call_raw(ch, f"{INFERENCE}/Generate", metadata=meta))["app"] == "inference-canary"
    after = await mesh.envoys["gateway"].stats(rf"^{re.escape(prefix)}\.")
    assert after[f"{prefix}.13"] - before.get(f"{prefix}.13", 0) == 5, after
    assert after[f"{prefix}.failure"] - before.get(f"{prefix}.failure", 0) == 5
    assert after[f"{prefix}.total"] - before.get(f"{prefix}.total", 0) == 6


async def test_admin_helpers(mesh: Mesh) -> None:
    envoy = mesh.envoys["gateway"]
    dump = await envoy.config_dump("static_listeners")
    names = {entry["listener"]["name"] for entry in dump["configs"]}
    assert names == {"inbound", "outbound"}
    statuses = (await envoy.clusters())["cluster_statuses"]
    assert {c["name"] for c in statuses} == {"local_app", "d.inference-stable", "d.inference-canary"}
    assert envoy.base_id == envoy.admin_port
    stats = await envoy.stats(r"^server\.(live|state)$")
    assert stats == {"server.live": 1, "server.state": 0}


async def test_unavailable_is_retried_for_idempotent_methods_only(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{mesh.ports['outbound']}", options=[("grpc.default_authority", "inference")]
    ) as ch:
        for i in range(5):
            reply = await call_raw(ch, f"{INFERENCE}/GetEngine", f"fail-once:get-{i}".encode())
            assert reply["method"] == f"{INFERENCE}/GetEngine"
            reply = await call_raw(ch, f"{INFERENCE}/ListEngines", f"fail-once:list-{i}".encode())
            assert reply["method"] == f"{INFERENCE}/ListEngines"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(ch, f"{INFERENCE}/Generate", b"fail-once:generate")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stats = await mesh.envoys["gateway"].stats(r"cluster\.d\.inference-(stable|canary)\.upstream_rq_retry$")
    assert sum(stats.values()) >= 10, stats


async def test_rotation_reaches_running_envoy_without_restart(mesh: Mesh, certs_dir: Path) -> None:
    envoy = mesh.envoys["registry"]
    pid = envoy.pid
    port, client, ca = mesh.ports["registry"], mesh.ids["cli"], str(mesh.ids["cli"].ca_path)
    before = peer_serial(port, client, ca)
    assert before == mesh.ids["registry"].certificate().serial_number
    rotate(certs_dir, ["registry", "gateway"])
    expected = mesh.ids["registry"].certificate().serial_number
    assert expected != before
    for _ in range(100):
        if peer_serial(port, client, ca) == expected:
            break
        await asyncio.sleep(0.05)
    assert peer_serial(port, client, ca) == expected
    assert envoy.pid == pid and envoy.restarts == 0
    # the rotated gateway identity is accepted by the registry sidecar
    async with mtls_channel(port, mesh.ids["gateway"]) as ch:
        assert (await call_raw(ch, f"{REGISTRY}/GetRoute"))["app"] == "registry"


def _https(mesh: Mesh, name: str = "edge") -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(mesh.ids["edge"].ca_path))
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{mesh.ports[name]}", verify=ctx, timeout=10)


async def test_edge_transcodes_unary_rest_and_passes_the_edge_identity(mesh: Mesh) -> None:
    async with _https(mesh) as client:
        resp = await client.get("/v1/version")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"version": "9.9.9-test", "buildCommit": "abc123", "environment": "test"}
    assert resp.headers["content-type"].startswith("application/json")
    assert mesh.gateway.last_xfcc is not None and f"URI={spiffe_id('edge')}" in mesh.gateway.last_xfcc.split(";")


async def test_edge_streams_server_streaming_rpcs_as_sse(mesh: Mesh) -> None:
    async with _https(mesh) as client, client.stream("POST", "/v1/generate:stream", json={"prompt": "hi"}) as resp:
        assert resp.status_code == 200
        content_type = resp.headers["content-type"]
        body = (await resp.aread()).decode()
    assert content_type.startswith("text/event-stream"), content_type
    events = [e for e in body.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), body
    messages = [json.loads(e.removeprefix("data: ")) for e in events]
    assert "".join(m.get("textDelta", "") for m in messages) == "Hello, mesh"
    assert messages[-1]["finishReason"] == "FINISH_REASON_STOP"
    assert messages[-1]["usage"] == {"promptTokens": 2, "completionTokens": 3, "totalTokens": 5}


async def test_edge_maps_grpc_errors_and_unknown_paths_to_http_codes(mesh: Mesh) -> None:
    async with _https(mesh) as client:
        bad = await client.post("/v1/generate", json={"prompt": ""})
        missing = await client.get("/v1/no-such-thing")
        wrong_verb = await client.delete("/v1/version")
    assert bad.status_code == 400, bad.text
    assert bad.json()["code"] == 3 and "prompt" in bad.json()["message"]
    for resp in (missing, wrong_verb):
        assert resp.status_code == 404, resp.text
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["code"] == 5


async def test_edge_serves_grpc_clients_too(mesh: Mesh) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=mesh.ids["edge"].ca_path.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{mesh.ports['edge']}", creds) as ch:
        reply = await gateway_pb2_grpc.GatewayServiceStub(ch).GetVersion(gateway_pb2.GetVersionRequest(), timeout=5)
        assert reply.version == "9.9.9-test"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_raw(ch, "/no.such.v1.Service/Method")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_edge_local_rate_limit(mesh: Mesh) -> None:
    async with _https(mesh, "edge-limited") as client:
        codes = [(await client.get("/v1/version")).status_code for _ in range(4)]
    assert codes == [404, 404, 429, 429]


# --- process supervision -------------------------------------------------------------------


def _admin_only(admin_port: int) -> dict:
    return {
        "node": {"id": "t", "cluster": "t"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
    }


async def test_envoy_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    boot = _admin_only(free_port())
    boot["static_resources"] = {"clusters": [{"name": "c", "type": "NO_SUCH_TYPE"}]}
    envoy = EnvoyProcess("broken", boot, tmp_path, start_timeout_s=20)
    with pytest.raises(EnvoyError, match="NO_SUCH_TYPE"):
        await envoy.start()
    assert envoy.pid is None


async def test_envoy_that_never_gets_ready_times_out_with_its_log_and_is_stopped(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    boot = sidecar_bootstrap(
        Node("registry", "registry"),
        ids["registry"],
        admin_port=free_port(),
        inbound_port=free_port(),
        app_port=free_port(),
        xds_address=("127.0.0.1", free_port()),  # nobody answers, and no initial fetch timeout
        policy=load_policy(),
        initial_fetch_timeout_s=0,
    )
    envoy = EnvoyProcess("stuck", boot, tmp_path, concurrency=1, start_timeout_s=2)
    with pytest.raises(
        EnvoyError, match=r"(?s)not healthy within 2 s.*PRE_INITIALIZING.*over ADS.*last lines of Envoy"
    ) as err:
        await envoy.start()
    assert "starting envoy-stuck" in str(err.value)
    assert envoy.pid is None


async def test_killed_envoy_is_restarted_with_the_same_base_id(tmp_path: Path) -> None:
    envoy = EnvoyProcess("restart", _admin_only(free_port()), tmp_path, concurrency=1, backoff_initial_s=0.1)
    await envoy.start()
    try:
        first = envoy.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(200):
            if envoy.restarts == 1:
                break
            await asyncio.sleep(0.05)
        assert envoy.restarts == 1 and envoy.pid not in (None, first)
        assert (await envoy.stats("server.live"))["server.live"] == 1
    finally:
        await envoy.stop()
    assert not _alive(first)


async def test_rollout_metrics_read_calls_per_deployment_from_envoy(mesh: Mesh) -> None:
    admin = mesh.envoys["gateway"].admin_url
    async with httpx.AsyncClient() as client:
        before = await envoy_calls(client, [admin], ["inference-stable", "inference-canary"])
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{mesh.ports['outbound']}", options=[("grpc.default_authority", "inference")]
        ) as ch:
            meta = ((OVERRIDE_HEADER, "inference-canary"),)
            for _ in range(4):
                await call_raw(ch, f"{INFERENCE}/Generate", metadata=meta)
            await mesh.envoys["inference-canary"].set_runtime(**{FAULT_ABORT_PERCENT_KEY: "100"})
            try:
                with pytest.raises(grpc.aio.AioRpcError):
                    await call_raw(ch, f"{INFERENCE}/Generate", metadata=meta)
            finally:
                await mesh.envoys["inference-canary"].set_runtime(**{FAULT_ABORT_PERCENT_KEY: ""})
        await asyncio.sleep(1.5)  # histograms reach the admin API at the next stats flush (every second)
        after = await envoy_calls(client, [admin, admin], ["inference-stable", "inference-canary"])
    # the same Envoy listed twice counts twice: the sum is over every Envoy routing to the deployment
    w = Window.between(
        Calls(2 * before["inference-canary"].requests, 2 * before["inference-canary"].errors),
        Calls(after["inference-canary"].requests, after["inference-canary"].errors),
    )
    assert (w.requests, w.errors) == (10, 2)
    latency = Window.between(Calls(), after["inference-canary"])
    assert latency.buckets and latency.buckets[-1][1] > 0 and 0 < latency.quantile(0.99) < 5

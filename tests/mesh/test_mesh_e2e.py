"""The whole mesh as `servemesh up` starts it (real Envoys, registry, control plane, gateway,
inference on the small engine), driven through the edge like a client would."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import ssl
import stat
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from google.protobuf import field_mask_pb2
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.launcher import Mesh, Ports, free_port_run
from tests.engine_fixtures import free_port

pytestmark = pytest.mark.timeout(600)


def _small_mesh(home: Path, prepared_model, *, mesh: bool) -> Mesh:
    """A mesh on free ports, every route class on the small engine (no vLLM in this module)."""
    model_dir, card = prepared_model
    ports = Ports(
        **{f.name: free_port() for f in dataclasses.fields(Ports) if f.name != "admin"}, admin=free_port_run(4)
    )
    engines = [{"id": "small", "kind": "small", "model": card.model_id, "model_dir": str(model_dir)}]
    classes = {"chat_short": {"engine": "small", "default_max_tokens": 64, "max_tokens_limit": 256}}
    roles = {"primary": "small", "lowlat": "small", "best": "small", "small": "small"}
    tiers = {  # a free tier small enough to hit in a test
        "free": {"requests_per_minute": 3, "tokens_per_minute": 100_000, "concurrent_requests": 2},
        "enterprise": {"requests_per_minute": 10_000, "tokens_per_minute": 10_000_000, "concurrent_requests": 64},
    }
    gateway_env = {
        "SERVEMESH_GATEWAY_ROUTE_CLASSES": json.dumps(classes),
        "SERVEMESH_GATEWAY_ROUTING__ROLES": json.dumps(roles),
        "SERVEMESH_GATEWAY_LIMITS__TIERS": json.dumps(tiers),
    }
    return Mesh(home, ports, engines, lambda _msg: None, gateway_env=gateway_env, mesh=mesh)


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, prepared_model) -> Mesh:
    m = _small_mesh(tmp_path_factory.mktemp("home"), prepared_model, mesh=True)
    try:
        await m.start()
        yield m
    finally:
        await m.stop()


def _ca(m: Mesh) -> str:
    return str(m.certs_dir / "ca.crt")


def _edge(m: Mesh) -> str:
    return f"https://127.0.0.1:{m.ports.edge}"


def _key(m: Mesh) -> dict[str, str]:
    """The dev tenant's key the mesh made at start-up, as an HTTP header."""
    return {"authorization": f"Bearer {m.state().api_key()}"}


async def _route(m: Mesh, name: str) -> rpb.Route:
    async with m.channel("registry") as ch:
        return (await rpb_grpc.RegistryServiceStub(ch).GetRoute(rpb.GetRouteRequest(name=name))).route


async def _update(m: Mesh, route: rpb.Route, paths: list[str], reason: str = "test") -> rpb.Route:
    async with m.channel("registry") as ch:
        req = rpb.UpdateRouteRequest(route=route, update_mask=field_mask_pb2.FieldMask(paths=paths), reason=reason)
        return (await rpb_grpc.RegistryServiceStub(ch).UpdateRoute(req)).route


async def _wait_in_sync(m: Mesh, revision: int, timeout: float = 5.0) -> None:
    """Until each ADS Envoy (the edge, every gateway sidecar) is connected and has acked `revision` or later."""
    expected = {"edge"} | {name for name in m.envoys if name.startswith("gateway-")}
    deadline = time.monotonic() + timeout
    nodes: list[mesh_pb2.Node] = []
    while time.monotonic() < deadline:
        async with m.channel("control-plane") as ch:
            stub = mesh_pb2_grpc.ControlPlaneServiceStub(ch)
            # wait_for_ready: the control plane may be restarting
            resp = await stub.ListNodes(mesh_pb2.ListNodesRequest(), wait_for_ready=True, timeout=timeout)
            nodes = list(resp.nodes)
        ready = {
            n.name.removeprefix("nodes/")
            for n in nodes
            if n.connected and n.in_sync and n.registry_revision >= revision
        }
        if ready >= expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"Envoys not in sync with revision {revision}: {nodes}")


async def _who(stub: gpb_grpc.GatewayServiceStub, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    return (await stub.GetVersion(gpb.GetVersionRequest(), metadata=metadata, timeout=10)).deployment


async def test_rest_through_the_edge(mesh: Mesh) -> None:
    async with httpx.AsyncClient(
        base_url=_edge(mesh), verify=ssl.create_default_context(cafile=_ca(mesh)), timeout=60, headers=_key(mesh)
    ) as http:
        body = {"prompt": "Say hi", "params": {"maxTokens": 4, "temperature": 0}}
        resp = await http.post("/v1/generate", json=body)
        assert resp.status_code == 200, resp.text
        unary = resp.json()
        assert unary["usage"]["completionTokens"] >= 1 and unary["engine"] == "engines/small"

        again = (await http.post("/v1/generate", json=body)).json()
        assert again["cached"] is True and again["text"] == unary["text"] and "cached" not in unary

        # a seed (ignored by greedy decoding) keeps the cache out of the way of streaming
        seeded = body | {"params": body["params"] | {"seed": 7}}
        async with http.stream("POST", "/v1/generate:stream", json=seeded) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) async for line in stream.aiter_lines() if line.startswith("data:")]
        assert len(events) >= 2 and events[-1]["finishReason"] == "FINISH_REASON_LENGTH"
        assert "".join(e.get("textDelta", "") for e in events) == unary["text"]  # greedy: same text

        bad = await http.post("/v1/generate", json={"prompt": "hi", "params": {"temperature": 5}})
        assert bad.status_code == 400
        assert "params.temperature" in bad.json()["message"]  # a JSON error body, not an empty one

        assert (await http.get("/v1/nothing-here")).status_code == 404


async def test_openai_sdk_through_the_edge(mesh: Mesh) -> None:
    http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=_ca(mesh)), timeout=60)
    client = openai.AsyncOpenAI(
        base_url=f"{_edge(mesh)}/openai/v1", api_key=mesh.state().api_key(), http_client=http, max_retries=0
    )
    async with client:
        ask = {"model": "chat_short", "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0}
        whole = await client.chat.completions.create(**ask, max_tokens=4)
        assert whole.choices[0].finish_reason == "length" and whole.usage and whole.usage.completion_tokens == 4
        stream = await client.chat.completions.create(**ask, max_tokens=4, stream=True, seed=8)  # not cached
        deltas = [c.choices[0].delta.content or "" async for c in stream]
        assert len(deltas) >= 2 and "".join(deltas) == whole.choices[0].message.content
        assert [m.id async for m in client.models.list()] == ["chat_short"]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(**ask | {"temperature": 9})


async def _new_key(m: Mesh, tier: int, route_classes: list[str]) -> str:
    async with m.channel("registry") as ch:
        created = await rpb_grpc.RegistryServiceStub(ch).CreateApiKey(
            rpb.CreateApiKeyRequest(
                parent="tenants/dev", api_key=rpb.ApiKey(tier=tier, route_classes=route_classes), reason="test"
            )
        )
    return created.secret


async def test_keys_through_the_edge_401_403_429_with_retry_after(mesh: Mesh) -> None:
    body = {"prompt": "Say hi", "params": {"maxTokens": 2, "temperature": 0}}
    free = await _new_key(mesh, rpb.ApiKey.TIER_FREE, ["chat_short"])
    code_only = await _new_key(mesh, rpb.ApiKey.TIER_FREE, ["code"])
    async with httpx.AsyncClient(
        base_url=_edge(mesh), verify=ssl.create_default_context(cafile=_ca(mesh)), timeout=60
    ) as http:
        missing = await http.post("/v1/generate", json=body)
        assert missing.status_code == 401 and "API key" in missing.json()["message"]
        wrong = await http.post("/v1/generate", json=body, headers={"authorization": "Bearer sm_nope_nope"})
        assert wrong.status_code == 401
        denied = await http.post("/v1/generate", json=body, headers={"authorization": f"Bearer {code_only}"})
        assert denied.status_code == 403
        # a header naming another tenant changes nothing: the key alone decides
        spoof = {"authorization": f"Bearer {free}", "x-tenant": "acme", "x-servemesh-tenant": "acme"}
        codes = [(await http.post("/v1/generate", json=body, headers=spoof)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]  # the free tier here: 3 requests per minute per key
        limited = await http.post("/v1/generate", json=body, headers=spoof)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "per minute" in limited.json()["message"]


async def test_typed_stub_through_the_edge(mesh: Mesh) -> None:
    async with mesh.channel("gateway") as ch:
        assert await _who(gpb_grpc.GatewayServiceStub(ch)) == "gateway-stable"


async def test_split_override_and_flip(mesh: Mesh) -> None:
    canary = {"app": free_port(), "metrics": free_port(), "in": free_port(), "admin": free_port()}
    await mesh.register(
        rpb.Deployment(
            name="deployments/gateway-canary",
            service="gateway",
            version="canary",
            endpoint=f"127.0.0.1:{canary['in']}",
        )
    )
    await mesh.start_gateway("gateway-canary", *canary.values())
    route = await _route(mesh, "routes/gateway")
    del route.backends[:]
    route.backends.extend(
        [
            rpb.WeightedBackend(deployment="deployments/gateway-stable", weight=90),
            rpb.WeightedBackend(deployment="deployments/gateway-canary", weight=10),
        ]
    )
    route.header_overrides.append(
        rpb.HeaderOverride(header="x-servemesh-canary", value="always", deployment="deployments/gateway-canary")
    )
    route = await _update(mesh, route, ["backends", "header_overrides"])
    await _wait_in_sync(mesh, route.revision)

    async with mesh.channel("gateway") as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        seen: Counter[str] = Counter()
        for _ in range(20):  # 1000 calls, 50 at a time
            seen.update(await asyncio.gather(*(_who(stub) for _ in range(50))))
        assert set(seen) == {"gateway-stable", "gateway-canary"}
        # binomial(1000, 0.1): mean 100, sd 9.5; 4.5 sd either side
        assert 57 <= seen["gateway-canary"] <= 143, seen

        pinned = await asyncio.gather(*(_who(stub, (("x-servemesh-canary", "always"),)) for _ in range(30)))
        assert set(pinned) == {"gateway-canary"}

        # flip: 100% canary; new requests move within 1 s of the registry accepting the change
        del route.backends[:]
        route.backends.extend(
            [
                rpb.WeightedBackend(deployment="deployments/gateway-stable", weight=0),
                rpb.WeightedBackend(deployment="deployments/gateway-canary", weight=100),
            ]
        )
        route = await _update(mesh, route, ["backends"], reason="flip to canary")
        flipped_at = time.monotonic()
        while time.monotonic() - flipped_at < 1.0:
            if set(await asyncio.gather(*(_who(stub) for _ in range(10)))) == {"gateway-canary"}:
                break
        took = time.monotonic() - flipped_at
        after = await asyncio.gather(*(_who(stub) for _ in range(100)))
        assert set(after) == {"gateway-canary"} and took < 1.0, (took, Counter(after))

    # back to stable, no overrides, for the tests after this one
    route = await _route(mesh, "routes/gateway")
    del route.backends[:], route.header_overrides[:]
    route.backends.append(rpb.WeightedBackend(deployment="deployments/gateway-stable", weight=100))
    route = await _update(mesh, route, ["backends", "header_overrides"], reason="restore")
    await _wait_in_sync(mesh, route.revision)


async def test_control_plane_killed_mid_traffic_loses_no_request(mesh: Mesh) -> None:
    cp = next(s for s in mesh.supervisors if s.name == "control-plane")
    async with mesh.channel("gateway") as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        results: list[str | BaseException] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                results.extend(await asyncio.gather(*(_who(stub) for _ in range(5)), return_exceptions=True))

        task = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)
        old_pid = cp.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await asyncio.sleep(1.5)  # Envoys run on their last configuration meanwhile
        stop.set()
        await task
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(results) > 20 and not errors, errors[:3]

    # the supervisor restarts it, the Envoys reconnect, and changes flow again
    deadline = time.monotonic() + 30
    while (cp.pid in (None, old_pid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    route = await _route(mesh, "routes/inference")
    route.timeout.FromSeconds(120)
    route = await _update(mesh, route, ["timeout"], reason="after control plane restart")
    await _wait_in_sync(mesh, route.revision, timeout=30)


async def test_registry_refuses_a_caller_the_policy_does_not_allow(mesh: Mesh) -> None:
    """The gateway identity may read routes but not change them (RBAC on the registry's sidecar)."""
    from mesh import certs

    ident = certs.identity(mesh.certs_dir, "gateway")
    target = f"127.0.0.1:{mesh.ports.registry_inbound}"
    options = [("grpc.ssl_target_name_override", "registry")]
    async with grpc.aio.secure_channel(target, certs.channel_credentials(ident), options=options) as ch:
        stub = rpb_grpc.RegistryServiceStub(ch)
        route = (await stub.GetRoute(rpb.GetRouteRequest(name="routes/inference"))).route
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.UpdateRoute(
                rpb.UpdateRouteRequest(route=route, update_mask=field_mask_pb2.FieldMask(paths=["locked"]), reason="x")
            )
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_state_file_points_at_the_mesh(mesh: Mesh) -> None:
    state = json.loads((mesh.home / "run" / "mesh.json").read_text())
    assert state["mesh"] is True and state["gateway"].endswith(f":{mesh.ports.edge}")
    # rewritten when a deployment joins (the canary gateway of the split test)
    assert set(state["envoys"]) == set(mesh.envoys) >= {"edge", "gateway-stable", "inference-stable", "registry"}
    assert Path(state["certs_dir"], "ca.crt").exists()


def test_services_are_reachable_only_through_their_sidecars(mesh: Mesh) -> None:
    """The apps listen on Unix sockets in a 0700 directory, not on loopback ports another user could reach."""
    sockets = mesh.home / "run" / "sockets"
    assert stat.S_IMODE(sockets.stat().st_mode) == 0o700
    assert {p.name for p in sockets.iterdir()} >= {
        "registry.sock",
        "inference-stable.sock",
        "gateway-stable.sock",
        "gateway-stable.outbound.sock",
    }
    for port in (mesh.ports.gateway, mesh.ports.inference, mesh.ports.registry):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_no_mesh_runs_direct_and_keeps_its_own_registry(tmp_path_factory, prepared_model, mesh: Mesh) -> None:
    """--no-mesh: plaintext on loopback, no Envoy; its registry is not the mesh's, so neither sees stale endpoints."""
    home = mesh.home  # the same data directory as the mesh run
    await mesh.stop()
    direct = _small_mesh(home, prepared_model, mesh=False)
    try:
        await direct.start()
        assert not direct.envoys
        async with grpc.aio.insecure_channel(f"127.0.0.1:{direct.ports.gateway}") as ch:
            assert await _who(gpb_grpc.GatewayServiceStub(ch)) == "gateway-stable"
        async with direct.channel("registry") as ch:
            deps = await rpb_grpc.RegistryServiceStub(ch).ListDeployments(rpb.ListDeploymentsRequest())
        endpoints = {d.name: d.endpoint for d in deps.deployments}
        assert endpoints == {
            "deployments/gateway-stable": f"127.0.0.1:{direct.ports.gateway}",
            "deployments/inference-stable": f"127.0.0.1:{direct.ports.inference}",
        }
    finally:
        await direct.stop()

"""RegistryService through a real gRPC server (SQLite) and the generated stub."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from servemesh.registry.v1 import registry_pb2 as pb
from servemesh.registry.v1 import registry_pb2_grpc as pb_grpc

from services.registry.server import SERVICE_NAME
from tests.engine_fixtures import free_port

from .builders import deployment_pb, route_pb

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
CONSOLE = "spiffe://servemesh.local/ns/default/sa/console"
XFCC = (
    "By=spiffe://servemesh.local/ns/default/sa/registry;Hash=abc;URI=spiffe://servemesh.local/ns/default/sa/forged,"
    f'By=spiffe://servemesh.local/ns/default/sa/registry;Hash=def;Subject="CN=console,O=servemesh";URI={CONSOLE}'
)


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def detail(err: grpc.aio.AioRpcError, kind):
    status = rpc_status.from_call(err)
    assert status is not None
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            out = kind()
            packed.Unpack(out)
            return out
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in {status}")


async def seed(stub: pb_grpc.RegistryServiceStub, metadata=()) -> pb.Route:
    for dep in (deployment_pb("inf-stable"), deployment_pb("inf-canary", version="canary", port=8001)):
        await stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=dep, reason="seed"), metadata=metadata)
    created = await stub.CreateRoute(
        pb.CreateRouteRequest(route=route_pb("inference", ("inf-stable", 100)), reason="seed"), metadata=metadata
    )
    return created.route


async def test_create_get_list_update_delete(registry):
    stub = registry.stub
    created = await seed(stub)
    assert created.etag and created.revision == 3 and created.update_time.seconds > 0
    got = (await stub.GetRoute(pb.GetRouteRequest(name="routes/inference"))).route
    assert got == created
    deployments = (await stub.ListDeployments(pb.ListDeploymentsRequest())).deployments
    assert [d.name for d in deployments] == ["deployments/inf-canary", "deployments/inf-stable"]
    assert deployments[1].create_time.seconds > 0 and deployments[1].engine == "vllm"
    assert [r.name for r in (await stub.ListRoutes(pb.ListRoutesRequest(service="inference"))).routes] == [
        "routes/inference"
    ]

    change = pb.Route(name="routes/inference", etag=created.etag)
    change.backends.add(deployment="deployments/inf-stable", weight=90)
    change.backends.add(deployment="deployments/inf-canary", weight=10)
    change.timeout.FromSeconds(30)
    updated = (
        await stub.UpdateRoute(
            pb.UpdateRouteRequest(route=change, update_mask=mask("backends", "timeout"), reason="10%")
        )
    ).route
    assert [(b.deployment, b.weight) for b in updated.backends] == [
        ("deployments/inf-stable", 90),
        ("deployments/inf-canary", 10),
    ]
    assert updated.timeout.seconds == 30 and updated.service == "inference" and updated.revision == 4
    assert updated.etag != created.etag

    await stub.DeleteRoute(pb.DeleteRouteRequest(name="routes/inference", etag=updated.etag, reason="done"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetRoute(pb.GetRouteRequest(name="routes/inference"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "routes/inference" in err.value.details()
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/inf-canary", reason="done"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/inf-canary", reason="again"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_already_exists(registry):
    stub = registry.stub
    await seed(stub)
    calls = [
        stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=deployment_pb("inf-stable"), reason="dup")),
        stub.CreateRoute(pb.CreateRouteRequest(route=route_pb("inference", ("inf-stable", 1)), reason="dup")),
        stub.CreateRoute(pb.CreateRouteRequest(route=route_pb("second", ("inf-stable", 1)), reason="same class")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "at most one route per service and class" in err.value.details()


async def test_concurrent_updates_one_wins_the_other_is_aborted_with_the_current_etag(registry):
    stub = registry.stub
    created = await seed(stub)

    def to(weight: int) -> pb.UpdateRouteRequest:
        change = pb.Route(name="routes/inference", etag=created.etag)
        change.backends.add(deployment="deployments/inf-canary", weight=weight)
        return pb.UpdateRouteRequest(route=change, update_mask=mask("backends"), reason=f"to {weight}")

    results = await asyncio.gather(stub.UpdateRoute(to(1)), stub.UpdateRoute(to(2)), return_exceptions=True)
    (winner,) = [r.route for r in results if isinstance(r, pb.UpdateRouteResponse)]
    (loser,) = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert loser.code() == grpc.StatusCode.ABORTED
    assert winner.etag in loser.details()
    assert detail(loser, error_details_pb2.ErrorInfo).reason == "ETAG_MISMATCH"
    stored = (await stub.GetRoute(pb.GetRouteRequest(name="routes/inference"))).route
    assert stored == winner
    audit = (await stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource="routes/inference"))).entries
    assert [e.action for e in audit] == [pb.AuditEntry.ACTION_UPDATE, pb.AuditEntry.ACTION_CREATE]


async def test_lock_semantics(registry):
    stub = registry.stub
    created = await seed(stub)
    lock = pb.Route(name="routes/inference", etag=created.etag, locked=True)
    locked = (await stub.UpdateRoute(pb.UpdateRouteRequest(route=lock, update_mask=mask("locked"), reason="pin"))).route
    move = pb.Route(name="routes/inference", etag=locked.etag)
    move.backends.add(deployment="deployments/inf-canary", weight=1)
    for request in (
        pb.UpdateRouteRequest(route=move, update_mask=mask("backends"), reason="rollout"),
        pb.UpdateRouteRequest(route=move, update_mask=mask("timeout"), reason="rollout"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateRoute(request)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "locked" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteRoute(pb.DeleteRouteRequest(name="routes/inference", etag=locked.etag, reason="x"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unlocked = (
        await stub.UpdateRoute(
            pb.UpdateRouteRequest(route=move, update_mask=mask("backends", "locked"), reason="unpin and move")
        )
    ).route
    assert not unlocked.locked and [b.deployment for b in unlocked.backends] == ["deployments/inf-canary"]


async def test_deleting_a_referenced_deployment_fails_naming_the_route(registry):
    stub = registry.stub
    await seed(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/inf-stable", reason="cleanup"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "routes/inference" in err.value.details()
    await stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/inf-stable"))


async def test_audit_actor_is_the_last_xfcc_uri_when_trusted(make_registry):
    registry = await make_registry(trust_forwarded_identity=True)
    await seed(registry.stub, metadata=(("x-forwarded-client-cert", XFCC), ("x-servemesh-user", "alice@example.com")))
    entries = (await registry.stub.ListAuditEntries(pb.ListAuditEntriesRequest())).entries
    assert [e.actor for e in entries] == [f"{CONSOLE} as alice@example.com"] * 3
    route = entries[0]
    assert route.resource == "routes/inference" and route.reason == "seed"
    assert route.action == pb.AuditEntry.ACTION_CREATE and not route.HasField("before")
    assert route.after["name"] == "routes/inference" and route.after["backends"][0]["weight"] == 100
    assert route.time.seconds > 0 and route.revision == 3
    by_actor = await registry.stub.ListAuditEntries(pb.ListAuditEntriesRequest(actor="sa/CONSOLE as alice"))
    assert len(by_actor.entries) == 3
    assert not (await registry.stub.ListAuditEntries(pb.ListAuditEntriesRequest(actor="forged"))).entries


async def test_audit_ignores_xfcc_when_not_trusted(make_registry):
    registry = await make_registry(trust_forwarded_identity=False)
    await seed(registry.stub, metadata=(("x-forwarded-client-cert", XFCC),))
    created = (await registry.stub.GetRoute(pb.GetRouteRequest(name="routes/inference"))).route
    update = pb.Route(name="routes/inference", etag=created.etag, locked=True)
    await registry.stub.UpdateRoute(
        pb.UpdateRouteRequest(route=update, update_mask=mask("locked"), reason="pin"),
        metadata=(("x-forwarded-client-cert", XFCC), ("x-servemesh-user", "bob")),
    )
    entries = (await registry.stub.ListAuditEntries(pb.ListAuditEntriesRequest())).entries
    assert all(e.actor.startswith("anonymous (ipv") and "spiffe" not in e.actor for e in entries)
    assert "127.0.0.1" in entries[-1].actor
    assert entries[0].actor.endswith(" as bob")
    assert entries[0].before["locked"] is False and entries[0].after["locked"] is True
    assert entries[0].before["etag"] == created.etag and entries[0].after["etag"] != created.etag


async def test_paging(registry):
    stub = registry.stub
    for i in range(5):
        await stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=deployment_pb(f"d{i}"), reason="x"))
    names, token, pages = [], "", 0
    while True:
        page = await stub.ListDeployments(pb.ListDeploymentsRequest(page_size=2, page_token=token))
        names += [d.name for d in page.deployments]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert names == [f"deployments/d{i}" for i in range(5)] and pages == 3
    entries, token = [], ""
    while True:
        page = await stub.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=2, page_token=token))
        entries += [e.revision for e in page.entries]
        if not (token := page.next_page_token):
            break
    assert entries == [5, 4, 3, 2, 1]


async def test_watch_routes_first_message_then_after_each_change(registry):
    stub = registry.stub
    created = await seed(stub)
    watch = stub.WatchRoutes(pb.WatchRoutesRequest())
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.revision == created.revision
    assert list(first.routes) == [created]
    assert [d.name for d in first.deployments] == ["deployments/inf-canary", "deployments/inf-stable"]

    change = pb.Route(name="routes/inference", etag=created.etag)
    change.backends.add(deployment="deployments/inf-canary", weight=7)
    updated = (
        await stub.UpdateRoute(pb.UpdateRouteRequest(route=change, update_mask=mask("backends"), reason="x"))
    ).route
    second = await asyncio.wait_for(watch.read(), 5)
    assert second.revision == updated.revision > first.revision
    assert list(second.routes) == [updated]

    await stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=deployment_pb("inf-next"), reason="x"))
    third = await asyncio.wait_for(watch.read(), 5)
    assert third.revision == second.revision + 1 and len(third.deployments) == 3
    watch.cancel()


async def test_a_follower_that_never_reads_does_not_hold_up_writers(registry):
    stub = registry.stub
    created = await seed(stub)
    idle = stub.WatchRoutes(pb.WatchRoutesRequest())  # never read
    etag = created.etag
    async with asyncio.timeout(10):
        for weight in range(1, 31):
            change = pb.Route(name="routes/inference", etag=etag)
            change.backends.add(deployment="deployments/inf-stable", weight=weight)
            request = pb.UpdateRouteRequest(route=change, update_mask=mask("backends"), reason="tick")
            etag = (await stub.UpdateRoute(request)).route.etag
    revisions = []
    async with asyncio.timeout(5):
        while not revisions or revisions[-1] < created.revision + 30:
            revisions.append((await idle.read()).revision)
    assert revisions == sorted(set(revisions)) and len(revisions) <= 31  # increasing; bursts coalesced
    idle.cancel()


async def test_stop_ends_open_watch_streams_instead_of_waiting_out_the_grace(registry):
    await seed(registry.stub)
    watches = [registry.stub.WatchRoutes(pb.WatchRoutesRequest()) for _ in range(3)]
    for watch in watches:
        await asyncio.wait_for(watch.read(), 5)
    started = time.monotonic()
    await asyncio.wait_for(registry.server.stop(grace=30), 10)
    assert time.monotonic() - started < 5
    for watch in watches:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()


async def test_migrations_on_an_empty_data_dir_and_again_on_restart(make_registry, tmp_path):
    data_dir = tmp_path / "fresh" / "registry"
    first = await make_registry(data_dir=data_dir)
    created = await seed(first.stub)
    assert (data_dir / "registry.db").is_file()
    await first.server.stop(0)
    await first.core.close()
    second = await make_registry(data_dir=data_dir)
    assert (await second.stub.GetRoute(pb.GetRouteRequest(name="routes/inference"))).route == created
    first_message = await asyncio.wait_for(second.stub.WatchRoutes(pb.WatchRoutesRequest()).read(), 5)
    assert first_message.revision == created.revision


async def test_health_and_reflection_name_the_service(registry):
    health = health_pb2_grpc.HealthStub(registry.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_main_serves_from_settings_and_exits_on_sigterm(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "APP_ENV": "dev",
        "SERVEMESH_REGISTRY_PORT": str(port),
        "SERVEMESH_REGISTRY_METRICS_PORT": "0",
        "SERVEMESH_REGISTRY_DATA_DIR": str(tmp_path / "data"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.registry.server", cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            while b"listening" not in await proc.stderr.readline():
                pass
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            await seed(stub)
            watch = stub.WatchRoutes(pb.WatchRoutesRequest())
            await watch.read()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0  # the open watch does not hold the drain
        assert (tmp_path / "data" / "registry.db").is_file()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

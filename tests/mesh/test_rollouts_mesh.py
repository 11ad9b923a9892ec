"""Progressive rollouts in the real mesh: the controller process walks a gateway canary through
its steps by changing route weights in the registry, judges windows from the Envoys' counters,
and rolls a canary that fails 5% of requests (Envoy's fault filter on its sidecar) back.

Client load runs through the edge the whole time, as a user's would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.mesh.v1 import slo_service_pb2 as slo_pb2
from servemesh.mesh.v1 import slo_service_pb2_grpc as slo_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.envoy.config import FAULT_ABORT_PERCENT_KEY
from mesh.launcher import Mesh, metrics_url
from mesh.supervisor import Supervisor
from tests.engine_fixtures import free_port
from tests.mesh.test_mesh_e2e import _small_mesh

pytestmark = pytest.mark.timeout(900)
R = rpb.Rollout
ENDED = (R.STATE_PROMOTED, R.STATE_ABORTED, R.STATE_ROLLED_BACK)
STABLE, CANARY = "deployments/gateway-stable", "deployments/gateway-canary"


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, prepared_model) -> AsyncIterator[Mesh]:
    m = _small_mesh(tmp_path_factory.mktemp("home"), prepared_model, mesh=True)
    try:
        await m.start()
        await start_gateway_canary(m, fault_injection=True)
        yield m
    finally:
        await m.stop()


async def start_gateway_canary(m: Mesh, *, fault_injection: bool = False) -> None:
    """A second gateway deployment, `gateway-canary`, registered and running (on no route yet)."""
    ports = {"app": free_port(), "metrics": free_port(), "in": free_port(), "admin": free_port()}
    await m.register(
        rpb.Deployment(
            name=CANARY,
            service="gateway",
            version="canary",
            endpoint=f"127.0.0.1:{ports['in']}",
            metrics_url=metrics_url(ports["metrics"]),
        )
    )
    await m.start_gateway("gateway-canary", *ports.values(), fault_injection=fault_injection)


@dataclass
class Load:
    """Closed-loop GetVersion calls through the edge: who answered, and every error with its time."""

    served: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, m: Mesh, concurrency: int = 6) -> None:
        async with m.channel("gateway") as ch:
            stub = gpb_grpc.GatewayServiceStub(ch)

            async def worker() -> None:
                while not self.stop.is_set():
                    try:
                        resp = await stub.GetVersion(gpb.GetVersionRequest(), timeout=10)
                        self.served[resp.deployment] += 1
                    except grpc.aio.AioRpcError as exc:
                        self.errors.append((time.monotonic(), exc.code(), exc.details() or ""))

            await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _with_load(m: Mesh) -> tuple[Load, asyncio.Task[None]]:
    load = Load()
    return load, asyncio.create_task(load.run(m))


async def _stop(load: Load, task: asyncio.Task[None]) -> None:
    load.stop.set()
    await asyncio.wait_for(task, 20)


async def _registry(m: Mesh, method: str, request: object) -> object:
    async with m.channel("registry") as ch:
        return await getattr(rpb_grpc.RegistryServiceStub(ch), method)(request, timeout=10)


async def _reset_route(m: Mesh) -> None:
    route = (await _registry(m, "GetRoute", rpb.GetRouteRequest(name="routes/gateway"))).route
    del route.backends[:], route.mirrors[:]
    route.backends.append(rpb.WeightedBackend(deployment=STABLE, weight=100))
    await _registry(
        m,
        "UpdateRoute",
        rpb.UpdateRouteRequest(
            route=route, update_mask=field_mask_pb2.FieldMask(paths=["backends", "mirrors"]), reason="test reset"
        ),
    )


def _steps(*steps: tuple[int, float, float, bool]) -> list[rpb.RolloutStep]:
    """(weight, mirror percent, pause seconds, analysis) tuples."""
    return [
        rpb.RolloutStep(
            weight=w, mirror_percent=mirror, pause=duration_pb2.Duration(seconds=int(pause)), analysis=analysis
        )
        for w, mirror, pause, analysis in steps
    ]


async def _create(m: Mesh, name: str, steps: list[rpb.RolloutStep], window_s: int, **analysis: object) -> R:
    rollout = R(
        name=f"rollouts/{name}",
        route="routes/gateway",
        stable_deployment=STABLE,
        canary_deployment=CANARY,
        steps=steps,
        analysis=rpb.AnalysisSpec(window=duration_pb2.Duration(seconds=window_s), **analysis),
    )
    return (await _registry(m, "CreateRollout", rpb.CreateRolloutRequest(rollout=rollout, reason="test"))).rollout


async def _get(m: Mesh, name: str) -> R:
    return (await _registry(m, "GetRollout", rpb.GetRolloutRequest(name=f"rollouts/{name}"))).rollout


async def _until(m: Mesh, name: str, done, timeout: float) -> R:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        r = await _get(m, name)
        if done(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"rollout did not get there in {timeout:.0f}s: {r}")
        await asyncio.sleep(0.2)


def _controller(m: Mesh) -> Supervisor:
    return next(s for s in m.supervisors if isinstance(s, Supervisor) and s.name == "controller")


async def test_healthy_canary_walks_every_step_to_100_with_shadow_first(mesh: Mesh) -> None:
    await _reset_route(mesh)
    canary_metrics = (await _deployment(mesh, CANARY)).metrics_url
    shadow_before = await _served_by(canary_metrics)
    load, task = await _with_load(mesh)
    try:
        await _create(
            mesh,
            "healthy",
            _steps((0, 50.0, 5, True), (1, 0, 5, True), (10, 0, 5, True), (50, 0, 5, True), (100, 0, 0, False)),
            window_s=5,
            min_requests=5,
        )
        # shadow step: copies reach the canary, every answer still comes from stable. The controller
        # records step 1 before it sets step 1's weight, so what was served when the rollout last
        # read as step 0 was served under the shadow step alone.
        shadow_served: dict[str, int] = {}
        deadline = time.monotonic() + 90
        while (r := await _get(mesh, "healthy")).current_step < 1 and r.state != R.STATE_ROLLED_BACK:
            shadow_served = dict(load.served)
            assert time.monotonic() < deadline, f"the shadow step did not pass in 90s: {r}"
            await asyncio.sleep(0.2)
        assert r.state == R.STATE_PROGRESSING, r
        assert set(shadow_served) == {"gateway-stable"}, shadow_served
        assert await _served_by(canary_metrics) - shadow_before >= 20
        r = await _until(mesh, "healthy", lambda r: r.state in (R.STATE_PROMOTED, R.STATE_ROLLED_BACK), 180)
    finally:
        await _stop(load, task)
    assert r.state == R.STATE_PROMOTED, r.message
    assert r.applied_weight == 100
    route = (await _registry(mesh, "GetRoute", rpb.GetRouteRequest(name="routes/gateway"))).route
    assert [(b.deployment, b.weight) for b in route.backends] == [(CANARY, 100)] and not route.mirrors
    # every step taken once, in order, each after a passing window of that step
    steps = [e.step for e in r.history if e.to_state == R.STATE_PROGRESSING]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), list(r.history)
    for i in range(4):
        mine = [w for w in r.windows if w.step == i]
        assert mine and mine[-1].verdict == rpb.Measurement.VERDICT_PASS, (i, mine)
    assert load.served["gateway-canary"] > 0 and not load.errors, load.errors[:5]
    # each weight change is in the audit log, made by the controller
    entries = (
        await _registry(mesh, "ListAuditEntries", rpb.ListAuditEntriesRequest(resource="routes/gateway"))
    ).entries
    by_controller = [e for e in entries if "/sa/controller" in e.actor and "rollouts/healthy" in e.reason]
    assert len(by_controller) == 5, [(e.actor, e.reason) for e in entries]


async def _route_audit(m: Mesh) -> list[rpb.AuditEntry]:
    req = rpb.ListAuditEntriesRequest(resource="routes/gateway", page_size=500)
    return list((await _registry(m, "ListAuditEntries", req)).entries)


async def _deployment(m: Mesh, name: str) -> rpb.Deployment:
    return (await _registry(m, "GetDeployment", rpb.GetDeploymentRequest(name=name))).deployment


async def _served_by(url: str) -> float:
    """GetVersion calls a gateway deployment's own server completed (mirrored ones included)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(url, timeout=5)).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "servemesh_grpc_server_requests_total" and s.labels.get("method") == "GetVersion"
    )


async def test_canary_failing_5_percent_is_rolled_back_automatically(mesh: Mesh) -> None:
    await _reset_route(mesh)
    sidecar = mesh.envoys["gateway-canary"]
    load, task = await _with_load(mesh)
    try:
        await _create(mesh, "faulty", _steps((50, 0, 600, True)), window_s=10, min_requests=20)
        # the canary is healthy at first: a passing window, then the fault
        await _until(
            mesh,
            "faulty",
            lambda r: (
                any(w.verdict == rpb.Measurement.VERDICT_PASS for w in r.windows) or r.state in (R.STATE_ROLLED_BACK,)
            ),
            60,
        )
        await sidecar.set_runtime(**{FAULT_ABORT_PERCENT_KEY: "5"})
        fault_at = time.monotonic()
        while True:
            route = (await _registry(mesh, "GetRoute", rpb.GetRouteRequest(name="routes/gateway"))).route
            if all(b.deployment != CANARY or b.weight == 0 for b in route.backends):
                break
            assert time.monotonic() - fault_at < 120, "not rolled back in 120 s"
            await asyncio.sleep(0.1)
        rolled_back_at = time.monotonic()
        await asyncio.sleep(2)  # stable alone for a while: no error may come from it
        errors_after = [e for e in load.errors if e[0] > rolled_back_at + 1.0]
    finally:
        await sidecar.set_runtime(**{FAULT_ABORT_PERCENT_KEY: ""})
        await _stop(load, task)
    r = await _get(mesh, "faulty")
    assert r.state == R.STATE_ROLLED_BACK and r.applied_weight == 0, r
    failed = r.windows[-1]
    assert failed.verdict == rpb.Measurement.VERDICT_FAIL
    err = next(m for m in failed.measurements if m.metric == "error_rate")
    assert err.verdict == rpb.Measurement.VERDICT_FAIL and err.canary > 0.01, err
    # every client-visible error was the canary's injected fault; none came from the stable path
    assert {code for _, code, _ in load.errors} <= {grpc.StatusCode.INTERNAL}, load.errors[:5]
    assert not errors_after
    took = rolled_back_at - fault_at
    print(f"\nfault to weight 0: {took:.1f} s; client errors {len(load.errors)}, served {dict(load.served)}")


async def test_controller_killed_mid_rollout_resumes_without_double_stepping(mesh: Mesh) -> None:
    await _reset_route(mesh)
    load, task = await _with_load(mesh)
    try:
        await _create(
            mesh, "restart", _steps((10, 0, 5, True), (50, 0, 5, True), (100, 0, 0, False)), window_s=5, min_requests=5
        )
        await _until(mesh, "restart", lambda r: r.current_step >= 1, 60)
        controller = _controller(mesh)
        assert controller.pid is not None
        os.kill(controller.pid, signal.SIGKILL)  # the supervisor starts it again
        r = await _until(mesh, "restart", lambda r: r.state in (R.STATE_PROMOTED, R.STATE_ROLLED_BACK), 120)
    finally:
        await _stop(load, task)
    assert controller.restarts >= 1
    assert r.state == R.STATE_PROMOTED, r.message
    steps = [e.step for e in r.history if e.to_state == R.STATE_PROGRESSING]
    assert steps == [0, 1, 2, 3], list(r.history)
    entries = (
        await _registry(mesh, "ListAuditEntries", rpb.ListAuditEntriesRequest(resource="routes/gateway"))
    ).entries
    weights = [e.reason for e in entries if "rollouts/restart" in e.reason]
    assert len(weights) == 3 and len(set(weights)) == 3, weights


async def test_inconclusive_windows_never_promote_and_pause_the_rollout(mesh: Mesh) -> None:
    await _reset_route(mesh)
    # no load at all: every window is inconclusive
    await _create(mesh, "quiet", _steps((10, 0, 5, True), (100, 0, 0, False)), window_s=5, inconclusive_limit=2)
    r = await _until(mesh, "quiet", lambda r: r.state != R.STATE_PROGRESSING and r.state != R.STATE_PENDING, 60)
    assert r.state == R.STATE_PAUSED and r.current_step == 0, r
    assert [w.verdict for w in r.windows] == [rpb.Measurement.VERDICT_INCONCLUSIVE] * 2
    assert "inconclusive" in r.message
    assert r.applied_weight == 10
    await _registry(mesh, "AbortRollout", rpb.AbortRolloutRequest(name="rollouts/quiet", reason="test done"))
    r = await _until(mesh, "quiet", lambda r: r.applied_weight == 0, 30)
    assert r.state == R.STATE_ABORTED


async def test_canary_whose_goldens_regress_is_rolled_back(mesh: Mesh) -> None:
    """A gateway canary that cuts every answer to 4 tokens serves without errors, but fails the smoke
    set's greedy-hash and must-contain cases that stable passes in the same window."""
    await _reset_route(mesh)
    ports = {"app": free_port(), "metrics": free_port(), "in": free_port(), "admin": free_port()}
    await mesh.register(
        rpb.Deployment(
            name="deployments/gateway-clamped",
            service="gateway",
            version="clamped",
            endpoint=f"127.0.0.1:{ports['in']}",
            metrics_url=metrics_url(ports["metrics"]),
        )
    )
    classes = {"chat_short": {"engine": "small", "default_max_tokens": 4, "max_tokens_limit": 4}}
    saved = dict(mesh.gateway_env)
    mesh.gateway_env["SERVEMESH_GATEWAY_ROUTE_CLASSES"] = json.dumps(classes)
    try:
        await mesh.start_gateway("gateway-clamped", *ports.values())
    finally:
        mesh.gateway_env.clear()
        mesh.gateway_env.update(saved)
    load, task = await _with_load(mesh)
    try:
        rollout = R(
            name="rollouts/clamped",
            route="routes/gateway",
            stable_deployment=STABLE,
            canary_deployment="deployments/gateway-clamped",
            steps=_steps((50, 0, 600, True)),
            analysis=rpb.AnalysisSpec(window=duration_pb2.Duration(seconds=10), min_requests=5, golden_set="smoke"),
        )
        await _registry(mesh, "CreateRollout", rpb.CreateRolloutRequest(rollout=rollout, reason="test"))
        r = await _until(mesh, "clamped", lambda r: r.state in ENDED, 120)
    finally:
        await _stop(load, task)
    assert r.state == R.STATE_ROLLED_BACK, r
    golden = next(m for m in r.windows[-1].measurements if m.metric == "golden_pass_rate")
    assert golden.verdict == rpb.Measurement.VERDICT_FAIL and golden.canary < golden.stable, golden
    assert "greedy-matches-reference" in golden.detail or "capital-of-france" in golden.detail, golden.detail
    err = next(m for m in r.windows[-1].measurements if m.metric == "error_rate")
    assert err.verdict == rpb.Measurement.VERDICT_PASS  # the regression is in what it says, not in errors


async def test_controller_serves_slo_status_computed_from_the_gateways(mesh: Mesh) -> None:
    await _reset_route(mesh)
    async with mesh.channel("gateway") as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        for _ in range(3):
            async for _chunk in stub.StreamGenerate(
                gpb.StreamGenerateRequest(
                    prompt="Say hi.", route_class="chat_short", params=gpb.DecodingParams(max_tokens=4)
                ),
                timeout=60,
            ):
                pass
    deadline = time.monotonic() + 60  # the controller scrapes the gateways every 15 s
    async with mesh.channel("controller") as ch:
        stub = slo_grpc.SloServiceStub(ch)
        while True:
            resp = await stub.ListSloStatuses(slo_pb2.ListSloStatusesRequest(route_class="chat_short"), timeout=10)
            errors = next(s for s in resp.statuses if s.slo.kind == slo_pb2.Slo.KIND_SERVER_ERRORS)
            if errors.burn_rates and errors.burn_rates[0].requests >= 3:
                break
            assert time.monotonic() < deadline, resp
            await asyncio.sleep(1)
        assert {s.slo.kind for s in resp.statuses} == {
            slo_pb2.Slo.KIND_TTFT,
            slo_pb2.Slo.KIND_SERVER_ERRORS,
            slo_pb2.Slo.KIND_TIMEOUTS,
        }
        assert errors.state == slo_pb2.SloStatus.STATE_OK and errors.burn_rates[0].bad_fraction == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListSloStatuses(slo_pb2.ListSloStatusesRequest(route_class="Not A Class"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

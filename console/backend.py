"""What the console reads and changes, through the services' typed gRPC stubs and their metrics.

The console never reads a database: routes, rollouts and the audit log come from the registry,
SLOs from the controller's SloService, engines from each inference deployment, what each Envoy
has acknowledged from the control plane, indexes from retrieval, and rates from the gateways'
Prometheus metrics. It calls as the `console` identity (mTLS in the mesh), and every change
carries the signed-in user (x-servemesh-user), so the registry's audit log names both.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import httpx
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.inference.v1 import inference_pb2_grpc as ipb_grpc
from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from servemesh.mesh.v1 import slo_service_pb2 as slo_pb2
from servemesh.mesh.v1 import slo_service_pb2_grpc as slo_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc
from servemesh.retrieval.v1 import retrieval_pb2 as xpb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as xpb_grpc

from mesh.state import MeshState
from services.common.identity import USER_KEY

IDENTITY = "console"
TIMEOUT_S = 5.0
R = rpb.Rollout


class ConsoleError(Exception):
    """A call failed; the message is fit for the page (status and the service's own words)."""


class Conflict(ConsoleError):
    """The resource changed since the page read it: nothing was overwritten; reload and retry."""


class NotRunning(ConsoleError):
    """The mesh (or the named service) is not running."""


def _error(what: str, exc: grpc.aio.AioRpcError) -> ConsoleError:
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.ABORTED:  # the registry's etag check
        return Conflict(f"{what}: someone changed it since this page loaded; nothing was overwritten. {details}")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return NotRunning(f"{what}: {exc.code().name}: {details}")
    return ConsoleError(f"{what}: {exc.code().name}: {details}")


@dataclass(frozen=True)
class GatewayStats:
    """Cumulative counters of one gateway deployment's /metrics, and its per-engine routing gauges."""

    completion_tokens: float = 0.0
    requests: float = 0.0
    #: engine -> (error rate over the breaker window, TTFT EMA seconds or NaN, breaker state 0/1/2)
    engines: dict[str, tuple[float, float, int]] = field(default_factory=dict)


def parse_gateway_metrics(text: str) -> GatewayStats:
    tokens = requests = 0.0
    err: dict[str, float] = {}
    ema: dict[str, float] = {}
    breaker: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "servemesh_generation_tokens_total" and s.labels.get("kind") == "completion":
                tokens += s.value
            elif s.name == "servemesh_gateway_requests_total":
                requests += s.value
            elif s.name == "servemesh_gateway_engine_error_rate":
                err[s.labels["engine"]] = s.value
            elif s.name == "servemesh_gateway_engine_ttft_ema_seconds":
                ema[s.labels["engine"]] = s.value
            elif s.name == "servemesh_gateway_breaker_state":
                breaker[s.labels["engine"]] = int(s.value)
    engines = {e: (err.get(e, 0.0), ema.get(e, math.nan), breaker.get(e, 0)) for e in {*err, *ema, *breaker}}
    return GatewayStats(tokens, requests, engines)


@dataclass(frozen=True)
class EngineView:
    """One engine of one inference deployment, with what the gateways measured of it."""

    deployment: str
    engine: ipb.Engine
    error_rate: float | None = None
    ttft_ema_s: float | None = None
    breaker: int | None = None


@dataclass(frozen=True)
class IndexView:
    tenant: str
    index: xpb.Index
    manifests: tuple[xpb.Manifest, ...]


class Backend:
    """Typed calls to the running mesh, read from `state()` on each call (the mesh may restart)."""

    def __init__(self, state: Callable[[], MeshState | None], http: httpx.AsyncClient | None = None) -> None:
        self._state = state
        self._http = http or httpx.AsyncClient(timeout=TIMEOUT_S)

    async def close(self) -> None:
        await self._http.aclose()

    def _mesh(self) -> MeshState:
        state = self._state()
        if state is None:
            raise NotRunning("the mesh is not running (no run/mesh.json): start it with `servemesh up`")
        return state

    def _channel(self, service: str) -> grpc.aio.Channel:
        state = self._mesh()
        if service == "controller" and not state.controller:
            raise NotRunning("the controller (SLOs) is not running")
        if service == "control-plane" and not state.control_plane:
            raise NotRunning("no control plane: the mesh runs with --no-mesh")
        if service == "retrieval" and not state.retrieval:
            raise NotRunning("retrieval is not running")
        return state.channel(service, identity=IDENTITY)

    @staticmethod
    def _as(user: str) -> tuple[tuple[str, str], ...]:
        return ((USER_KEY, user),)

    # -- reads ---------------------------------------------------------------------------------

    async def _registry_list(self, what: str, method: str, request: object, attr: str) -> list:  # type: ignore[type-arg]
        out: list = []  # type: ignore[type-arg]
        try:
            async with self._channel("registry") as ch:
                stub = rpb_grpc.RegistryServiceStub(ch)
                while True:
                    resp = await getattr(stub, method)(request, timeout=TIMEOUT_S)
                    out.extend(getattr(resp, attr))
                    if not resp.next_page_token:
                        return out
                    request.page_token = resp.next_page_token  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as exc:
            raise _error(what, exc) from None

    async def routes(self) -> list[rpb.Route]:
        return await self._registry_list("routes", "ListRoutes", rpb.ListRoutesRequest(page_size=500), "routes")

    async def deployments(self) -> list[rpb.Deployment]:
        return await self._registry_list(
            "deployments", "ListDeployments", rpb.ListDeploymentsRequest(page_size=500), "deployments"
        )

    async def rollouts(self) -> list[rpb.Rollout]:
        return await self._registry_list("rollouts", "ListRollouts", rpb.ListRolloutsRequest(page_size=500), "rollouts")

    async def tenants(self) -> list[rpb.Tenant]:
        return await self._registry_list("tenants", "ListTenants", rpb.ListTenantsRequest(page_size=500), "tenants")

    async def audit(self, resource: str = "", actor: str = "", limit: int = 200) -> list[rpb.AuditEntry]:
        try:
            async with self._channel("registry") as ch:
                resp = await rpb_grpc.RegistryServiceStub(ch).ListAuditEntries(
                    rpb.ListAuditEntriesRequest(resource=resource, actor=actor, page_size=min(limit, 500)),
                    timeout=TIMEOUT_S,
                )
        except grpc.aio.AioRpcError as exc:
            raise _error("audit log", exc) from None
        return list(resp.entries)

    async def slo_statuses(self) -> list[slo_pb2.SloStatus]:
        try:
            async with self._channel("controller") as ch:
                resp = await slo_grpc.SloServiceStub(ch).ListSloStatuses(
                    slo_pb2.ListSloStatusesRequest(), timeout=TIMEOUT_S
                )
        except grpc.aio.AioRpcError as exc:
            raise _error("SLOs", exc) from None
        return list(resp.statuses)

    async def nodes(self) -> list[mesh_pb2.Node]:
        """What each Envoy has acknowledged; [] with --no-mesh (no Envoys)."""
        if not self._mesh().mesh:
            return []
        try:
            async with self._channel("control-plane") as ch:
                resp = await mesh_pb2_grpc.ControlPlaneServiceStub(ch).ListNodes(
                    mesh_pb2.ListNodesRequest(), timeout=TIMEOUT_S
                )
        except grpc.aio.AioRpcError as exc:
            raise _error("control plane", exc) from None
        return list(resp.nodes)

    async def gateway_stats(self, deployments: Sequence[rpb.Deployment]) -> dict[str, GatewayStats | str]:
        """Each gateway deployment's metrics, or why they could not be read."""

        async def one(d: rpb.Deployment) -> GatewayStats | str:
            try:
                resp = await self._http.get(d.metrics_url)
                resp.raise_for_status()
                return parse_gateway_metrics(resp.text)
            except (httpx.HTTPError, ValueError) as exc:
                return f"metrics of {d.name}: {exc}"

        gateways = [d for d in deployments if d.service == "gateway" and d.metrics_url]
        results = await asyncio.gather(*(one(d) for d in gateways))
        return {d.name: r for d, r in zip(gateways, results, strict=True)}

    async def engines(self, deployments: Sequence[rpb.Deployment] | None = None) -> tuple[list[EngineView], list[str]]:
        """Every engine of every inference deployment, joined with the gateways' view of it; and errors."""
        deployments = list(deployments if deployments is not None else await self.deployments())
        state = self._mesh()
        errors: list[str] = []

        async def one(d: rpb.Deployment) -> list[ipb.Engine]:
            try:
                async with state.endpoint_channel(d.endpoint, "inference", identity=IDENTITY) as ch:
                    resp = await ipb_grpc.InferenceServiceStub(ch).ListEngines(
                        ipb.ListEnginesRequest(page_size=100), timeout=TIMEOUT_S
                    )
                return list(resp.engines)
            except grpc.aio.AioRpcError as exc:
                errors.append(str(_error(d.name, exc)))
                return []

        inference = [d for d in deployments if d.service == "inference" and d.endpoint]
        per_dep, stats = await asyncio.gather(
            asyncio.gather(*(one(d) for d in inference)), self.gateway_stats(deployments)
        )
        seen: dict[str, tuple[float, float, int]] = {}
        for s in stats.values():
            if isinstance(s, str):
                errors.append(s)
                continue
            for engine, (err, ema, brk) in s.engines.items():
                old = seen.get(engine)
                seen[engine] = (
                    (err, ema, brk) if old is None else (max(old[0], err), _nanmax(old[1], ema), max(old[2], brk))
                )
        out: list[EngineView] = []
        for d, engines in zip(inference, per_dep, strict=True):
            for e in engines:
                g = seen.get(e.name)
                out.append(
                    EngineView(
                        d.name,
                        e,
                        error_rate=g[0] if g else None,
                        ttft_ema_s=None if g is None or math.isnan(g[1]) else g[1],
                        breaker=g[2] if g else None,
                    )
                )
        return out, errors

    async def indexes(self) -> tuple[list[IndexView], list[str]]:
        tenants = await self.tenants()
        errors: list[str] = []
        out: list[IndexView] = []
        try:
            async with self._channel("retrieval") as ch:
                stub = xpb_grpc.RetrievalServiceStub(ch)
                for t in tenants:
                    try:
                        listed = await stub.ListIndexes(xpb.ListIndexesRequest(parent=t.name), timeout=TIMEOUT_S)
                        for idx in listed.indexes:
                            mans = await stub.ListManifests(xpb.ListManifestsRequest(index=idx.name), timeout=TIMEOUT_S)
                            out.append(IndexView(t.name, idx, tuple(mans.manifests)))
                    except grpc.aio.AioRpcError as exc:
                        errors.append(str(_error(f"indexes of {t.name}", exc)))
        except NotRunning as exc:
            errors.append(str(exc))
        return out, errors

    # -- changes (each with a reason, as the signed-in user) ------------------------------------

    async def update_route(self, route: rpb.Route, paths: list[str], reason: str, user: str) -> rpb.Route:
        """Write the fields in `paths` if the route's etag (as the page read it) is still current."""
        try:
            async with self._channel("registry") as ch:
                resp = await rpb_grpc.RegistryServiceStub(ch).UpdateRoute(
                    rpb.UpdateRouteRequest(
                        route=route, update_mask=field_mask_pb2.FieldMask(paths=paths), reason=reason
                    ),
                    timeout=TIMEOUT_S,
                    metadata=self._as(user),
                )
        except grpc.aio.AioRpcError as exc:
            raise _error(f"update of {route.name}", exc) from None
        return resp.route

    async def rollout_action(self, name: str, action: str, reason: str, user: str) -> rpb.Rollout:
        """`action`: pause, resume, promote or abort."""
        requests = {
            "pause": ("PauseRollout", rpb.PauseRolloutRequest),
            "resume": ("ResumeRollout", rpb.ResumeRolloutRequest),
            "promote": ("PromoteRollout", rpb.PromoteRolloutRequest),
            "abort": ("AbortRollout", rpb.AbortRolloutRequest),
        }
        method, cls = requests[action]
        try:
            async with self._channel("registry") as ch:
                resp = await getattr(rpb_grpc.RegistryServiceStub(ch), method)(
                    cls(name=name, reason=reason), timeout=TIMEOUT_S, metadata=self._as(user)
                )
        except grpc.aio.AioRpcError as exc:
            raise _error(f"{action} of {name}", exc) from None
        return resp.rollout

    async def pin_manifest(self, name: str, reason: str, user: str) -> xpb.PinManifestResponse:
        try:
            async with self._channel("retrieval") as ch:
                return await xpb_grpc.RetrievalServiceStub(ch).PinManifest(
                    xpb.PinManifestRequest(name=name, reason=reason), timeout=TIMEOUT_S, metadata=self._as(user)
                )
        except grpc.aio.AioRpcError as exc:
            raise _error(f"pin of {name}", exc) from None


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return max(a, b)


def in_effect(route: rpb.Route, nodes: Sequence[mesh_pb2.Node]) -> tuple[int, int]:
    """Envoys running a configuration built from this route's revision or later, of those connected."""
    live = [n for n in nodes if n.connected]
    return sum(1 for n in live if n.in_sync and n.registry_revision >= route.revision), len(live)

"""RegistryService: protobuf <-> domain objects, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from servemesh.registry.v1 import registry_pb2 as pb
from servemesh.registry.v1 import registry_pb2_grpc as pb_grpc

from services.common.errors import FieldViolation, InvalidArgument
from services.common.identity import caller_identity
from services.registry.core import RegistryCore
from services.registry.keys import secret_prefix
from services.registry.resources import (
    Action,
    AnalysisSpec,
    AnalysisWindow,
    ApiKey,
    AuditEntry,
    Deployment,
    HeaderOverride,
    KeyState,
    Measurement,
    Resource,
    Rollout,
    RolloutsState,
    RolloutState,
    RolloutStep,
    Route,
    RouteMirror,
    RoutingState,
    Tenant,
    Tier,
    Verdict,
    WeightedBackend,
)

_ACTIONS = {
    Action.CREATE: pb.AuditEntry.ACTION_CREATE,
    Action.UPDATE: pb.AuditEntry.ACTION_UPDATE,
    Action.DELETE: pb.AuditEntry.ACTION_DELETE,
    Action.TRANSITION: pb.AuditEntry.ACTION_TRANSITION,
}
_ROLLOUT_STATES = {
    RolloutState.UNSPECIFIED: pb.Rollout.STATE_UNSPECIFIED,
    RolloutState.PENDING: pb.Rollout.STATE_PENDING,
    RolloutState.PROGRESSING: pb.Rollout.STATE_PROGRESSING,
    RolloutState.PAUSED: pb.Rollout.STATE_PAUSED,
    RolloutState.PROMOTED: pb.Rollout.STATE_PROMOTED,
    RolloutState.ABORTED: pb.Rollout.STATE_ABORTED,
    RolloutState.ROLLED_BACK: pb.Rollout.STATE_ROLLED_BACK,
}
_ROLLOUT_STATES_FROM_PB = {v: k for k, v in _ROLLOUT_STATES.items()}
_VERDICTS = {
    Verdict.UNSPECIFIED: pb.Measurement.VERDICT_UNSPECIFIED,
    Verdict.PASS: pb.Measurement.VERDICT_PASS,
    Verdict.FAIL: pb.Measurement.VERDICT_FAIL,
    Verdict.INCONCLUSIVE: pb.Measurement.VERDICT_INCONCLUSIVE,
}
_VERDICTS_FROM_PB = {v: k for k, v in _VERDICTS.items()}
_TIERS = {Tier.FREE: pb.ApiKey.TIER_FREE, Tier.PAID: pb.ApiKey.TIER_PAID, Tier.ENTERPRISE: pb.ApiKey.TIER_ENTERPRISE}
_TIERS_FROM_PB = {v: k for k, v in _TIERS.items()}
_STATES = {
    KeyState.ACTIVE: pb.ApiKey.STATE_ACTIVE,
    KeyState.REVOKED: pb.ApiKey.STATE_REVOKED,
    KeyState.EXPIRED: pb.ApiKey.STATE_EXPIRED,
}


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def _struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _duration(value: timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def _to_timedelta(value: duration_pb2.Duration, field: str) -> timedelta:
    try:
        return value.ToTimedelta()
    except (OverflowError, ValueError):
        raise InvalidArgument(FieldViolation(field, "is not a valid duration")) from None


def _to_datetime(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (OverflowError, ValueError):
        raise InvalidArgument(FieldViolation(field, "is not a valid time")) from None


def deployment_to_pb(d: Deployment) -> pb.Deployment:
    return pb.Deployment(
        name=d.name,
        service=d.service,
        version=d.version,
        endpoint=d.endpoint,
        engine=d.engine,
        model_id=d.model_id,
        create_time=_timestamp(d.create_time),
        metrics_url=d.metrics_url,
    )


def deployment_from_pb(d: pb.Deployment) -> Deployment:
    return Deployment(d.name, d.service, d.version, d.endpoint, d.engine, d.model_id, metrics_url=d.metrics_url)


def route_to_pb(r: Route) -> pb.Route:
    out = pb.Route(
        name=r.name,
        service=r.service,
        route_class=r.route_class,
        backends=[pb.WeightedBackend(deployment=b.deployment, weight=b.weight) for b in r.backends],
        header_overrides=[
            pb.HeaderOverride(header=o.header, value=o.value, deployment=o.deployment) for o in r.header_overrides
        ],
        locked=r.locked,
        etag=r.etag,
        revision=r.revision,
        update_time=_timestamp(r.update_time),
        mirrors=[pb.RouteMirror(deployment=m.deployment, percent=m.percent) for m in r.mirrors],
    )
    if r.timeout is not None:
        out.timeout.FromTimedelta(r.timeout)
    return out


def route_from_pb(r: pb.Route) -> Route:
    timeout = None
    if r.HasField("timeout"):
        try:
            timeout = r.timeout.ToTimedelta()
        except (OverflowError, ValueError):
            raise InvalidArgument(FieldViolation("route.timeout", "is not a valid duration")) from None
    return Route(
        name=r.name,
        service=r.service,
        route_class=r.route_class,
        backends=tuple(WeightedBackend(b.deployment, b.weight) for b in r.backends),
        header_overrides=tuple(HeaderOverride(o.header, o.value, o.deployment) for o in r.header_overrides),
        locked=r.locked,
        timeout=timeout,
        etag=r.etag,
        mirrors=tuple(RouteMirror(m.deployment, m.percent) for m in r.mirrors),
    )


def tenant_to_pb(t: Tenant) -> pb.Tenant:
    return pb.Tenant(name=t.name, display_name=t.display_name, create_time=_timestamp(t.create_time))


def tenant_from_pb(t: pb.Tenant) -> Tenant:
    return Tenant(t.name, t.display_name)


def api_key_to_pb(k: ApiKey) -> pb.ApiKey:
    """The key's public fields; the domain object holds no secret or hash to leak."""
    return pb.ApiKey(
        name=k.name,
        key_id=k.key_id,
        secret_prefix=secret_prefix(k.key_id),
        display_name=k.display_name,
        tier=_TIERS[Tier(k.tier)],
        route_classes=list(k.route_classes),
        expire_time=_timestamp(k.expire_time),
        revoke_time=_timestamp(k.revoke_time),
        create_time=_timestamp(k.create_time),
        state=_STATES[k.state],
    )


def api_key_from_pb(k: pb.ApiKey) -> tuple[ApiKey, timedelta | None]:
    """The fields a client sets on create, and the ttl if it gave one instead of expire_time."""
    expire_time = ttl = None
    try:
        if k.HasField("expire_time"):
            expire_time = k.expire_time.ToDatetime(tzinfo=UTC)
        if k.HasField("ttl"):
            ttl = k.ttl.ToTimedelta()
    except (OverflowError, ValueError):
        field = "api_key.expire_time" if k.HasField("expire_time") else "api_key.ttl"
        raise InvalidArgument(FieldViolation(field, "is not a valid time")) from None
    key = ApiKey(
        name=k.name,
        tier=_TIERS_FROM_PB.get(k.tier, ""),
        route_classes=tuple(k.route_classes),
        display_name=k.display_name,
        expire_time=expire_time,
    )
    return key, ttl


def _analysis_to_pb(a: AnalysisSpec) -> pb.AnalysisSpec:
    return pb.AnalysisSpec(
        window=_duration(a.window),
        min_requests=a.min_requests or 0,
        max_error_rate=a.max_error_rate or 0.0,
        max_error_rate_margin=a.max_error_rate_margin or 0.0,
        max_latency_ratio=a.max_latency_ratio or 0.0,
        max_cost_ratio=a.max_cost_ratio or 0.0,
        golden_set=a.golden_set,
        max_golden_drop=a.max_golden_drop or 0.0,
        inconclusive_limit=a.inconclusive_limit or 0,
        latency_slack_seconds=a.latency_slack_seconds or 0.0,
    )


def _analysis_from_pb(a: pb.AnalysisSpec) -> AnalysisSpec:
    """Unset fields (proto3 zero values, an absent window) are None: they take their defaults."""
    return AnalysisSpec(
        window=_to_timedelta(a.window, "rollout.analysis.window") if a.HasField("window") else None,
        min_requests=a.min_requests or None,
        max_error_rate=a.max_error_rate or None,
        max_error_rate_margin=a.max_error_rate_margin or None,
        max_latency_ratio=a.max_latency_ratio or None,
        max_cost_ratio=a.max_cost_ratio or None,
        golden_set=a.golden_set,
        max_golden_drop=a.max_golden_drop or None,
        inconclusive_limit=a.inconclusive_limit or None,
        latency_slack_seconds=a.latency_slack_seconds or None,
    )


def window_to_pb(w: AnalysisWindow) -> pb.AnalysisWindow:
    return pb.AnalysisWindow(
        start_time=_timestamp(w.start_time),
        end_time=_timestamp(w.end_time),
        step=w.step,
        verdict=_VERDICTS[w.verdict],
        measurements=[
            pb.Measurement(
                metric=m.metric,
                canary=m.canary,
                stable=m.stable,
                threshold=m.threshold,
                verdict=_VERDICTS[m.verdict],
                detail=m.detail,
            )
            for m in w.measurements
        ],
        source=w.source,
    )


def window_from_pb(w: pb.AnalysisWindow, path: str) -> AnalysisWindow:
    return AnalysisWindow(
        start_time=_to_datetime(w.start_time, f"{path}.start_time") if w.HasField("start_time") else None,
        end_time=_to_datetime(w.end_time, f"{path}.end_time") if w.HasField("end_time") else None,
        step=w.step,
        verdict=_VERDICTS_FROM_PB.get(w.verdict, Verdict.UNSPECIFIED),
        measurements=tuple(
            Measurement(
                metric=m.metric,
                canary=m.canary,
                stable=m.stable,
                threshold=m.threshold,
                verdict=_VERDICTS_FROM_PB.get(m.verdict, Verdict.UNSPECIFIED),
                detail=m.detail,
            )
            for m in w.measurements
        ),
        source=w.source,
    )


def rollout_to_pb(r: Rollout) -> pb.Rollout:
    return pb.Rollout(
        name=r.name,
        route=r.route,
        stable_deployment=r.stable_deployment,
        canary_deployment=r.canary_deployment,
        steps=[
            pb.RolloutStep(
                weight=s.weight,
                mirror_percent=s.mirror_percent,
                pause=_duration(s.pause) if s.pause else None,  # unset: 0
                analysis=s.analysis,
            )
            for s in r.steps
        ],
        analysis=_analysis_to_pb(r.analysis),
        state=_ROLLOUT_STATES[r.state],
        current_step=r.current_step,
        step_start_time=_timestamp(r.step_start_time),
        applied_weight=r.applied_weight,
        applied_mirror_percent=r.applied_mirror_percent,
        message=r.message,
        windows=[window_to_pb(w) for w in r.windows],
        history=[
            pb.RolloutEvent(
                time=_timestamp(e.time),
                actor=e.actor,
                from_state=_ROLLOUT_STATES[e.from_state],
                to_state=_ROLLOUT_STATES[e.to_state],
                step=e.step,
                reason=e.reason,
            )
            for e in r.history
        ],
        etag=r.etag,
        create_time=_timestamp(r.create_time),
        update_time=_timestamp(r.update_time),
    )


def rollout_from_pb(r: pb.Rollout) -> Rollout:
    """What a client may send: the fields set on create and the status fields of
    UpdateRolloutStatus (windows and history are output only, so not read)."""
    return Rollout(
        name=r.name,
        route=r.route,
        stable_deployment=r.stable_deployment,
        canary_deployment=r.canary_deployment,
        steps=tuple(
            RolloutStep(
                weight=s.weight,
                mirror_percent=s.mirror_percent,
                pause=_to_timedelta(s.pause, f"rollout.steps[{i}].pause") if s.HasField("pause") else timedelta(0),
                analysis=s.analysis,
            )
            for i, s in enumerate(r.steps)
        ),
        analysis=_analysis_from_pb(r.analysis),
        state=_ROLLOUT_STATES_FROM_PB.get(r.state, RolloutState.UNSPECIFIED),
        current_step=r.current_step,
        step_start_time=(
            _to_datetime(r.step_start_time, "rollout.step_start_time") if r.HasField("step_start_time") else None
        ),
        applied_weight=r.applied_weight,
        applied_mirror_percent=r.applied_mirror_percent,
        message=r.message,
        etag=r.etag,
    )


def audit_entry_to_pb(e: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        revision=e.revision,
        time=_timestamp(e.time),
        actor=e.actor,
        action=_ACTIONS[e.action],
        resource=e.resource,
        reason=e.reason,
        before=_struct(e.before),
        after=_struct(e.after),
    )


def resource_json(resource: Resource) -> dict[str, Any]:
    """The audit log's JSON form of a resource: its protobuf JSON mapping, every field present.

    A rollout's analysis windows are left out (up to 100 of them, written by the controller
    without audit entries; GetRollout has them): with them, a page of audit entries could
    outgrow a gRPC message."""
    message: Any
    if isinstance(resource, Deployment):
        message = deployment_to_pb(resource)
    elif isinstance(resource, Route):
        message = route_to_pb(resource)
    elif isinstance(resource, Tenant):
        message = tenant_to_pb(resource)
    elif isinstance(resource, Rollout):
        message = rollout_to_pb(resource)
        del message.windows[:]
    else:
        message = api_key_to_pb(resource)
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def state_to_pb(state: RoutingState) -> pb.WatchRoutesResponse:
    return pb.WatchRoutesResponse(
        revision=state.revision,
        routes=[route_to_pb(r) for r in state.routes],
        deployments=[deployment_to_pb(d) for d in state.deployments],
    )


def rollouts_state_to_pb(state: RolloutsState) -> pb.WatchRolloutsResponse:
    return pb.WatchRolloutsResponse(revision=state.revision, rollouts=[rollout_to_pb(r) for r in state.rollouts])


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, core: RegistryCore, *, trust_forwarded_identity: bool) -> None:
        self._core = core
        self._trust = trust_forwarded_identity
        self._last_state: tuple[RoutingState, pb.WatchRoutesResponse] | None = None
        self._last_rollouts: tuple[RolloutsState, pb.WatchRolloutsResponse] | None = None

    def _actor(self, context_: grpc.aio.ServicerContext) -> str:
        return caller_identity(context_.invocation_metadata(), context_.peer(), trust_forwarded_identity=self._trust)

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context_: grpc.aio.ServicerContext
    ) -> pb.CreateDeploymentResponse:
        stored = await self._core.create_deployment(
            deployment_from_pb(request.deployment), reason=request.reason, actor=self._actor(context_)
        )
        return pb.CreateDeploymentResponse(deployment=deployment_to_pb(stored))

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context_: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        return pb.GetDeploymentResponse(deployment=deployment_to_pb(await self._core.get_deployment(request.name)))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        page = await self._core.list_deployments(
            service=request.service, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListDeploymentsResponse(
            deployments=[deployment_to_pb(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context_: grpc.aio.ServicerContext
    ) -> pb.DeleteDeploymentResponse:
        await self._core.delete_deployment(request.name, reason=request.reason, actor=self._actor(context_))
        return pb.DeleteDeploymentResponse()

    async def CreateRoute(
        self, request: pb.CreateRouteRequest, context_: grpc.aio.ServicerContext
    ) -> pb.CreateRouteResponse:
        stored = await self._core.create_route(
            route_from_pb(request.route), reason=request.reason, actor=self._actor(context_)
        )
        return pb.CreateRouteResponse(route=route_to_pb(stored))

    async def GetRoute(self, request: pb.GetRouteRequest, context_: grpc.aio.ServicerContext) -> pb.GetRouteResponse:
        return pb.GetRouteResponse(route=route_to_pb(await self._core.get_route(request.name)))

    async def ListRoutes(
        self, request: pb.ListRoutesRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListRoutesResponse:
        page = await self._core.list_routes(
            service=request.service, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListRoutesResponse(routes=[route_to_pb(r) for r in page.items], next_page_token=page.next_page_token)

    async def UpdateRoute(
        self, request: pb.UpdateRouteRequest, context_: grpc.aio.ServicerContext
    ) -> pb.UpdateRouteResponse:
        stored = await self._core.update_route(
            route_from_pb(request.route),
            list(request.update_mask.paths),
            reason=request.reason,
            actor=self._actor(context_),
        )
        return pb.UpdateRouteResponse(route=route_to_pb(stored))

    async def DeleteRoute(
        self, request: pb.DeleteRouteRequest, context_: grpc.aio.ServicerContext
    ) -> pb.DeleteRouteResponse:
        await self._core.delete_route(request.name, request.etag, reason=request.reason, actor=self._actor(context_))
        return pb.DeleteRouteResponse()

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context_: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        async for state in self._core.watch():
            yield self._state_message(state)

    def _state_message(self, state: RoutingState) -> pb.WatchRoutesResponse:
        """Followers share one state object per revision; convert it once for all of them."""
        last = self._last_state
        if last is None or last[0] is not state:
            last = self._last_state = (state, state_to_pb(state))
        return last[1]

    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListAuditEntriesResponse:
        page = await self._core.list_audit_entries(
            resource=request.resource, actor=request.actor, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListAuditEntriesResponse(
            entries=[audit_entry_to_pb(e) for e in page.items], next_page_token=page.next_page_token
        )

    # tenants -----------------------------------------------------------------------

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context_: grpc.aio.ServicerContext
    ) -> pb.CreateTenantResponse:
        stored = await self._core.create_tenant(
            tenant_from_pb(request.tenant), reason=request.reason, actor=self._actor(context_)
        )
        return pb.CreateTenantResponse(tenant=tenant_to_pb(stored))

    async def GetTenant(self, request: pb.GetTenantRequest, context_: grpc.aio.ServicerContext) -> pb.GetTenantResponse:
        return pb.GetTenantResponse(tenant=tenant_to_pb(await self._core.get_tenant(request.name)))

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListTenantsResponse:
        page = await self._core.list_tenants(page_size=request.page_size, page_token=request.page_token)
        return pb.ListTenantsResponse(
            tenants=[tenant_to_pb(t) for t in page.items], next_page_token=page.next_page_token
        )

    # API keys ----------------------------------------------------------------------

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context_: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        key, ttl = api_key_from_pb(request.api_key)
        stored, secret = await self._core.create_api_key(
            request.parent, key, ttl=ttl, reason=request.reason, actor=self._actor(context_)
        )
        return pb.CreateApiKeyResponse(api_key=api_key_to_pb(stored), secret=secret)

    async def GetApiKey(self, request: pb.GetApiKeyRequest, context_: grpc.aio.ServicerContext) -> pb.GetApiKeyResponse:
        return pb.GetApiKeyResponse(api_key=api_key_to_pb(await self._core.get_api_key(request.name)))

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        page = await self._core.list_api_keys(
            request.parent, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListApiKeysResponse(
            api_keys=[api_key_to_pb(k) for k in page.items], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context_: grpc.aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        stored = await self._core.revoke_api_key(request.name, reason=request.reason, actor=self._actor(context_))
        return pb.RevokeApiKeyResponse(api_key=api_key_to_pb(stored))

    async def VerifyApiKey(
        self, request: pb.VerifyApiKeyRequest, context_: grpc.aio.ServicerContext
    ) -> pb.VerifyApiKeyResponse:
        return pb.VerifyApiKeyResponse(api_key=api_key_to_pb(await self._core.verify_api_key(request.secret)))

    # rollouts ----------------------------------------------------------------------

    async def CreateRollout(
        self, request: pb.CreateRolloutRequest, context_: grpc.aio.ServicerContext
    ) -> pb.CreateRolloutResponse:
        stored = await self._core.create_rollout(
            rollout_from_pb(request.rollout), reason=request.reason, actor=self._actor(context_)
        )
        return pb.CreateRolloutResponse(rollout=rollout_to_pb(stored))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context_: grpc.aio.ServicerContext
    ) -> pb.GetRolloutResponse:
        return pb.GetRolloutResponse(rollout=rollout_to_pb(await self._core.get_rollout(request.name)))

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListRolloutsResponse:
        page = await self._core.list_rollouts(
            route=request.route,
            active_only=request.active_only,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListRolloutsResponse(
            rollouts=[rollout_to_pb(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def PauseRollout(
        self, request: pb.PauseRolloutRequest, context_: grpc.aio.ServicerContext
    ) -> pb.PauseRolloutResponse:
        stored = await self._core.pause_rollout(request.name, reason=request.reason, actor=self._actor(context_))
        return pb.PauseRolloutResponse(rollout=rollout_to_pb(stored))

    async def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ResumeRolloutResponse:
        stored = await self._core.resume_rollout(request.name, reason=request.reason, actor=self._actor(context_))
        return pb.ResumeRolloutResponse(rollout=rollout_to_pb(stored))

    async def PromoteRollout(
        self, request: pb.PromoteRolloutRequest, context_: grpc.aio.ServicerContext
    ) -> pb.PromoteRolloutResponse:
        stored = await self._core.promote_rollout(request.name, reason=request.reason, actor=self._actor(context_))
        return pb.PromoteRolloutResponse(rollout=rollout_to_pb(stored))

    async def AbortRollout(
        self, request: pb.AbortRolloutRequest, context_: grpc.aio.ServicerContext
    ) -> pb.AbortRolloutResponse:
        stored = await self._core.abort_rollout(request.name, reason=request.reason, actor=self._actor(context_))
        return pb.AbortRolloutResponse(rollout=rollout_to_pb(stored))

    async def WatchRollouts(
        self, request: pb.WatchRolloutsRequest, context_: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRolloutsResponse]:
        async for state in self._core.watch_rollouts():
            yield self._rollouts_message(state)

    def _rollouts_message(self, state: RolloutsState) -> pb.WatchRolloutsResponse:
        """Like _state_message: one conversion per revision, shared by every follower."""
        last = self._last_rollouts
        if last is None or last[0] is not state:
            last = self._last_rollouts = (state, rollouts_state_to_pb(state))
        return last[1]

    async def UpdateRolloutStatus(
        self, request: pb.UpdateRolloutStatusRequest, context_: grpc.aio.ServicerContext
    ) -> pb.UpdateRolloutStatusResponse:
        stored = await self._core.update_rollout_status(
            rollout_from_pb(request.rollout),
            list(request.update_mask.paths),
            append_windows=[window_from_pb(w, f"append_windows[{i}]") for i, w in enumerate(request.append_windows)],
            reason=request.reason,
            actor=self._actor(context_),
        )
        return pb.UpdateRolloutStatusResponse(rollout=rollout_to_pb(stored))

"""Rollouts, route mirrors and metrics URLs through a real registry gRPC server (SQLite) and the stub."""

from __future__ import annotations

import asyncio
import math

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from servemesh.registry.v1 import registry_pb2 as pb
from servemesh.registry.v1 import registry_pb2_grpc as pb_grpc

from .builders import deployment_pb, route_pb

pytestmark = pytest.mark.timeout(30)

STATES = pb.Rollout


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


async def error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def seed(stub: pb_grpc.RegistryServiceStub) -> pb.Route:
    stable = deployment_pb("inf-stable")
    stable.metrics_url = "http://127.0.0.1:9151/metrics"
    for dep in (stable, deployment_pb("inf-canary", version="canary", port=8001), deployment_pb("gw", "gateway")):
        await stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=dep, reason="seed"))
    created = await stub.CreateRoute(
        pb.CreateRouteRequest(route=route_pb("inference", ("inf-stable", 100)), reason="seed")
    )
    return created.route


def rollout_pb(rollout_id: str = "r1", canary: str = "inf-canary") -> pb.Rollout:
    return pb.Rollout(
        name=f"rollouts/{rollout_id}",
        route="routes/inference",
        stable_deployment="deployments/inf-stable",
        canary_deployment=f"deployments/{canary}",
    )


def full_rollout_pb() -> pb.Rollout:
    """Every field a client sets on create."""
    r = rollout_pb()
    shadow = r.steps.add(weight=0, mirror_percent=12.5, analysis=True)
    shadow.pause.FromSeconds(30)
    r.steps.add(weight=20, analysis=True).pause.FromSeconds(90)
    r.steps.add(weight=100)
    a = r.analysis
    a.window.FromSeconds(15)
    a.min_requests, a.max_error_rate, a.max_error_rate_margin = 50, 0.02, 0.01
    a.max_latency_ratio, a.max_cost_ratio, a.golden_set = 2.5, 1.5, "smoke"
    a.max_golden_drop, a.inconclusive_limit, a.latency_slack_seconds = 0.2, 3, 0.5
    return r


async def create(stub, rollout: pb.Rollout | None = None) -> pb.Rollout:
    return (await stub.CreateRollout(pb.CreateRolloutRequest(rollout=rollout or rollout_pb(), reason="ship"))).rollout


def window_pb(step: int, verdict=pb.Measurement.VERDICT_PASS) -> pb.AnalysisWindow:
    w = pb.AnalysisWindow(step=step, verdict=verdict, source="envoy")
    w.start_time.FromSeconds(1_780_000_000)
    w.end_time.FromSeconds(1_780_000_010)
    w.measurements.add(metric="requests", canary=41, stable=3980, threshold=20, verdict=pb.Measurement.VERDICT_PASS)
    w.measurements.add(
        metric="latency_p99_s",
        canary=math.inf,
        stable=0.25,
        threshold=0.75,
        verdict=verdict,
        detail="canary p99 inf s > 3x stable",
    )
    return w


async def test_create_get_list_round_trip_every_field(registry):
    stub = registry.stub
    await seed(stub)
    sent = full_rollout_pb()
    sent.state, sent.message, sent.current_step = STATES.STATE_PROMOTED, "ignored", 2  # output only
    created = await create(stub, sent)
    for field in ("name", "route", "stable_deployment", "canary_deployment", "steps", "analysis"):
        assert getattr(created, field) == getattr(full_rollout_pb(), field), field
    assert created.state == STATES.STATE_PENDING and created.current_step == 0 and created.message == ""
    assert created.etag and created.create_time.seconds > 0 and created.update_time == created.create_time
    (event,) = created.history
    assert (event.from_state, event.to_state, event.reason) == (STATES.STATE_UNSPECIFIED, STATES.STATE_PENDING, "ship")
    assert event.actor.startswith("anonymous (ipv")
    assert (await stub.GetRollout(pb.GetRolloutRequest(name="rollouts/r1"))).rollout == created
    listed = await stub.ListRollouts(pb.ListRolloutsRequest(route="routes/inference", active_only=True))
    assert list(listed.rollouts) == [created] and listed.next_page_token == ""


async def test_defaults_are_filled_into_the_stored_rollout(registry):
    await seed(registry.stub)
    created = await create(registry.stub)
    assert [(s.weight, s.mirror_percent, s.pause.seconds, s.analysis) for s in created.steps] == [
        (0, 10.0, 60, True),
        (1, 0.0, 60, True),
        (10, 0.0, 60, True),
        (50, 0.0, 60, True),
        (100, 0.0, 0, False),
    ]
    a = created.analysis
    assert (a.window.seconds, a.min_requests, a.max_error_rate, a.max_error_rate_margin) == (10, 20, 0.01, 0.005)
    assert (a.max_latency_ratio, a.max_cost_ratio, a.golden_set, a.max_golden_drop, a.inconclusive_limit) == (
        3.0,
        2.0,
        "",
        0.1,
        6,
    )
    assert a.latency_slack_seconds == 0.25


async def test_status_updates_and_windows_round_trip_and_a_stale_etag_is_aborted(registry):
    stub = registry.stub
    await seed(stub)
    created = await create(stub)
    change = pb.Rollout(
        name="rollouts/r1",
        etag=created.etag,
        state=STATES.STATE_PROGRESSING,
        current_step=1,
        applied_weight=1,
        applied_mirror_percent=0.0,
        message="step 1: 1%",
    )
    change.step_start_time.FromSeconds(1_780_000_020)
    request = pb.UpdateRolloutStatusRequest(
        rollout=change,
        update_mask=mask("state", "current_step", "step_start_time", "applied_weight", "message"),
        append_windows=[window_pb(0)],
        reason="shadow step passed",
    )
    updated = (await stub.UpdateRolloutStatus(request)).rollout
    assert (updated.state, updated.current_step, updated.applied_weight, updated.message) == (
        STATES.STATE_PROGRESSING,
        1,
        1,
        "step 1: 1%",
    )
    assert updated.step_start_time.seconds == 1_780_000_020 and updated.etag != created.etag
    assert list(updated.windows) == [window_pb(0)] and math.isinf(updated.windows[0].measurements[1].canary)
    assert updated.history[-1].to_state == STATES.STATE_PROGRESSING and updated.history[-1].step == 1
    assert (await stub.GetRollout(pb.GetRolloutRequest(name="rollouts/r1"))).rollout == updated

    stale = await error(stub.UpdateRolloutStatus(request))  # the etag it read is gone
    assert stale.code() == grpc.StatusCode.ABORTED and updated.etag in stale.details()
    info = detail(stale, error_details_pb2.ErrorInfo)
    assert info.reason == "ETAG_MISMATCH" and info.metadata["current_etag"] == updated.etag

    audit = (await stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource="rollouts/r1"))).entries
    assert [e.action for e in audit] == [pb.AuditEntry.ACTION_TRANSITION, pb.AuditEntry.ACTION_CREATE]
    assert audit[0].before["state"] == "STATE_PENDING" and audit[0].after["state"] == "STATE_PROGRESSING"
    assert audit[0].reason == "shadow step passed" and list(audit[0].after["windows"]) == []  # kept out of the log


async def test_operator_transitions_and_failed_preconditions(registry):
    stub = registry.stub
    await seed(stub)
    await create(stub)
    resume = await error(stub.ResumeRollout(pb.ResumeRolloutRequest(name="rollouts/r1", reason="go")))
    assert resume.code() == grpc.StatusCode.FAILED_PRECONDITION and "rollouts/r1 is PENDING" in resume.details()
    assert detail(resume, error_details_pb2.ErrorInfo).metadata["state"] == "PENDING"

    paused = (await stub.PauseRollout(pb.PauseRolloutRequest(name="rollouts/r1", reason="hold"))).rollout
    assert paused.state == STATES.STATE_PAUSED
    resumed = (await stub.ResumeRollout(pb.ResumeRolloutRequest(name="rollouts/r1", reason="go"))).rollout
    assert resumed.state == STATES.STATE_PROGRESSING and resumed.step_start_time == resumed.update_time
    promoted = (await stub.PromoteRollout(pb.PromoteRolloutRequest(name="rollouts/r1", reason="now"))).rollout
    assert promoted.current_step == len(promoted.steps) and promoted.message.startswith("promoted by anonymous")

    second = await error(stub.CreateRollout(pb.CreateRolloutRequest(rollout=rollout_pb("r2"), reason="x")))
    assert second.code() == grpc.StatusCode.FAILED_PRECONDITION and "rollouts/r1" in second.details()

    aborted = (await stub.AbortRollout(pb.AbortRolloutRequest(name="rollouts/r1", reason="stop"))).rollout
    assert aborted.state == STATES.STATE_ABORTED
    for call in (
        stub.AbortRollout(pb.AbortRolloutRequest(name="rollouts/r1", reason="again")),
        stub.PromoteRollout(pb.PromoteRolloutRequest(name="rollouts/r1", reason="again")),
        stub.PauseRollout(pb.PauseRolloutRequest(name="rollouts/r1", reason="again")),
    ):
        err = await error(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "is ABORTED" in err.details()
    moved = pb.Rollout(name="rollouts/r1", etag=aborted.etag, state=STATES.STATE_PROGRESSING)
    err = await error(
        stub.UpdateRolloutStatus(pb.UpdateRolloutStatusRequest(rollout=moved, update_mask=mask("state"), reason="x"))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "it has ended" in err.details()

    audit = (await stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource="rollouts/r1"))).entries
    assert [e.action for e in audit] == [pb.AuditEntry.ACTION_TRANSITION] * 4 + [pb.AuditEntry.ACTION_CREATE]
    missing = await error(stub.GetRollout(pb.GetRolloutRequest(name="rollouts/nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    for request in (
        pb.CreateRolloutRequest(rollout=rollout_pb("r3", canary="nope"), reason="x"),
        pb.CreateRolloutRequest(
            rollout=pb.Rollout(**{**_fields(rollout_pb("r3")), "route": "routes/nope"}), reason="x"
        ),
    ):
        assert (await error(stub.CreateRollout(request))).code() == grpc.StatusCode.NOT_FOUND
    taken = await error(stub.CreateRollout(pb.CreateRolloutRequest(rollout=rollout_pb("r1"), reason="x")))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS


def _fields(r: pb.Rollout) -> dict:
    return {f.name: v for f, v in r.ListFields()}


async def test_create_on_a_locked_route_or_without_stable_traffic_fails_precondition(registry):
    stub = registry.stub
    route = await seed(stub)
    sideways = pb.Rollout(**{**_fields(rollout_pb()), "stable_deployment": "deployments/inf-canary"})
    sideways.canary_deployment = "deployments/inf-stable"
    err = await error(stub.CreateRollout(pb.CreateRolloutRequest(rollout=sideways, reason="x")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not send deployments/inf-canary traffic" in err.details()
    assert detail(err, error_details_pb2.ErrorInfo).reason == "STABLE_NOT_SERVING"
    lock = pb.Route(name="routes/inference", etag=route.etag, locked=True)
    await stub.UpdateRoute(pb.UpdateRouteRequest(route=lock, update_mask=mask("locked"), reason="pin"))
    err = await error(stub.CreateRollout(pb.CreateRolloutRequest(rollout=rollout_pb(), reason="x")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "locked" in err.details()


def _with(edit) -> pb.CreateRolloutRequest:
    r = rollout_pb()
    edit(r)
    return pb.CreateRolloutRequest(rollout=r, reason="x")


def _status(edit=None, paths=("message",), windows=()) -> pb.UpdateRolloutStatusRequest:
    r = pb.Rollout(name="rollouts/r1", etag="e")
    if edit is not None:
        edit(r)
    return pb.UpdateRolloutStatusRequest(rollout=r, update_mask=mask(*paths), append_windows=windows, reason="x")


def _set(**values):
    def edit(message) -> None:
        for key, value in values.items():
            setattr(message, key, value)

    return edit


def _analysis(**values):
    def edit(r: pb.Rollout) -> None:
        for key, value in values.items():
            setattr(r.analysis, key, value)

    return edit


# (rpc, request, field, words the description must contain)
CASES = [
    ("CreateRollout", _with(_set(name="r1")), "rollout.name", "rollouts/{id}"),
    ("CreateRollout", _with(_set(canary_deployment="deployments/inf-stable")), "rollout.canary_deployment", "differ"),
    ("CreateRollout", _with(lambda r: r.steps.add(weight=101)), "rollout.steps[0].weight", "[0, 100]"),
    ("CreateRollout", _with(lambda r: r.steps.add(weight=0)), "rollout.steps[0].mirror_percent", "(0, 100]"),
    ("CreateRollout", _with(lambda r: [r.steps.add(weight=1) for _ in range(21)]), "rollout.steps", "1-20"),
    (
        "CreateRollout",
        _with(lambda r: r.steps.add(weight=1).pause.FromSeconds(86401)),
        "rollout.steps[0].pause",
        "[0s, 86400s]",
    ),
    ("CreateRollout", _with(lambda r: r.analysis.window.FromSeconds(1)), "rollout.analysis.window", "[5s, 3600s]"),
    ("CreateRollout", _with(_analysis(max_error_rate=2)), "rollout.analysis.max_error_rate", "(0, 1]"),
    ("CreateRollout", _with(_analysis(max_latency_ratio=0.5)), "rollout.analysis.max_latency_ratio", "(1, 100]"),
    ("CreateRollout", _with(_analysis(min_requests=-3)), "rollout.analysis.min_requests", "[1, 1000000]"),
    ("CreateRollout", _with(_analysis(golden_set="A B")), "rollout.analysis.golden_set", "63"),
    ("CreateRollout", pb.CreateRolloutRequest(rollout=rollout_pb()), "reason", "1-500"),
    ("UpdateRolloutStatus", _status(paths=("route",)), "update_mask", "state, current_step"),
    ("UpdateRolloutStatus", _status(paths=()), "update_mask", "required"),
    ("UpdateRolloutStatus", _status(lambda r: setattr(r, "etag", "")), "rollout.etag", "required"),
    ("UpdateRolloutStatus", _status(paths=("state",)), "rollout.state", "required"),
    ("UpdateRolloutStatus", _status(_set(applied_weight=150), ("applied_weight",)), "rollout.applied_weight", "100"),
    ("UpdateRolloutStatus", _status(windows=[window_pb(0)] * 11), "append_windows", "at most 10"),
    (
        "UpdateRolloutStatus",
        _status(windows=[pb.AnalysisWindow(verdict=pb.Measurement.VERDICT_PASS)]),
        "append_windows[0]",
        "start_time",
    ),
    ("PauseRollout", pb.PauseRolloutRequest(name="rollouts/r1"), "reason", "1-500"),
    ("AbortRollout", pb.AbortRolloutRequest(name="r1", reason="x"), "name", "rollouts/{id}"),
    ("ListRollouts", pb.ListRolloutsRequest(route="inference"), "route", "routes/{id}"),
    ("ListRollouts", pb.ListRolloutsRequest(page_size=501), "page_size", "[0, 500]"),
    ("ListRollouts", pb.ListRolloutsRequest(page_token="junk"), "page_token", "next_page_token"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
async def test_invalid_argument_names_the_field_and_the_limit(registry, case):
    method, request, field, words = case
    await seed(registry.stub)
    err = await error(getattr(registry.stub, method)(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    violations = {v.field: v.description for v in detail(err, error_details_pb2.BadRequest).field_violations}
    assert field in violations and words in violations[field], violations
    assert not (await registry.stub.ListRollouts(pb.ListRolloutsRequest())).rollouts


async def test_watch_rollouts_gets_every_rollout_then_each_change_and_ends_on_stop(registry):
    stub = registry.stub
    route = await seed(stub)
    created = await create(stub)
    watch = stub.WatchRollouts(pb.WatchRolloutsRequest())
    first = await asyncio.wait_for(watch.read(), 5)
    assert list(first.rollouts) == [created]
    paused = (await stub.PauseRollout(pb.PauseRolloutRequest(name="rollouts/r1", reason="hold"))).rollout
    second = await asyncio.wait_for(watch.read(), 5)
    assert second.revision == first.revision + 1 and list(second.rollouts) == [paused]

    # the route follower hears of the route, not of the rollout changes around it
    routes = stub.WatchRoutes(pb.WatchRoutesRequest())
    at = (await asyncio.wait_for(routes.read(), 5)).revision
    await stub.AbortRollout(pb.AbortRolloutRequest(name="rollouts/r1", reason="stop"))
    change = pb.Route(name="routes/inference", etag=route.etag, locked=True)
    locked = (await stub.UpdateRoute(pb.UpdateRouteRequest(route=change, update_mask=mask("locked"), reason="x"))).route
    assert (await asyncio.wait_for(routes.read(), 5)).revision == locked.revision == at + 2

    await registry.server.stop(grace=30)
    for stream in (watch, routes):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:  # messages already sent may come first
                await stream.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_route_mirrors_and_metrics_url_over_grpc(registry):
    stub = registry.stub
    created = await seed(stub)
    dep = (await stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/inf-stable"))).deployment
    assert dep.metrics_url == "http://127.0.0.1:9151/metrics"

    change = pb.Route(name="routes/inference", etag=created.etag)
    change.mirrors.add(deployment="deployments/inf-canary", percent=10)
    watch = stub.WatchRoutes(pb.WatchRoutesRequest())
    await asyncio.wait_for(watch.read(), 5)
    updated = (
        await stub.UpdateRoute(pb.UpdateRouteRequest(route=change, update_mask=mask("mirrors"), reason="shadow"))
    ).route
    assert [(m.deployment, m.percent) for m in updated.mirrors] == [("deployments/inf-canary", 10.0)]
    pushed = await asyncio.wait_for(watch.read(), 5)
    assert list(pushed.routes) == [updated]
    assert {d.name: d.metrics_url for d in pushed.deployments}["deployments/inf-stable"] == dep.metrics_url
    assert list((await stub.ListRoutes(pb.ListRoutesRequest())).routes) == [updated]

    err = await error(stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/inf-canary", reason="x")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "mirrors" in err.details()

    both = pb.Route(name="routes/inference", etag=updated.etag)
    both.backends.add(deployment="deployments/inf-stable", weight=90)
    both.backends.add(deployment="deployments/inf-canary", weight=10)
    err = await error(stub.UpdateRoute(pb.UpdateRouteRequest(route=both, update_mask=mask("backends"), reason="x")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(err, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == ["route.backends[1].weight"]
    moved = (
        await stub.UpdateRoute(pb.UpdateRouteRequest(route=both, update_mask=mask("backends", "mirrors"), reason="1"))
    ).route
    assert not moved.mirrors and len(moved.backends) == 2
    watch.cancel()

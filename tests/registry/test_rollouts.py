"""Rollouts, route mirrors and deployment metrics URLs in RegistryCore, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, inspect, text, update
from sqlalchemy.exc import IntegrityError

from services.common.errors import FieldViolation, InvalidArgument
from services.registry.core import RegistryCore
from services.registry.errors import (
    DeploymentInUse,
    EtagMismatch,
    ResourceExists,
    ResourceNotFound,
    RolloutActive,
    RolloutStateConflict,
    RouteLocked,
    ShuttingDown,
    StableNotServing,
)
from services.registry.resources import (
    Action,
    AnalysisSpec,
    AnalysisWindow,
    Measurement,
    Rollout,
    RolloutState,
    RolloutStep,
    Route,
    RouteMirror,
    Verdict,
    WeightedBackend,
)
from services.registry.servicer import resource_json
from services.registry.store import Store, rollouts, upgrade
from services.registry.validation import DEFAULT_STEPS

from .builders import deployment, route

pytestmark = pytest.mark.timeout(30)

ACTOR = "spiffe://servemesh.local/ns/default/sa/console"
CONTROLLER = "spiffe://servemesh.local/ns/default/sa/rollout-controller"
P = RolloutState


async def seed(core: RegistryCore) -> Route:
    """inf-stable (serving), inf-canary and inf-next (not yet), gw (another service), and the
    default inference route all on inf-stable."""
    for dep in (
        deployment("inf-stable"),
        deployment("inf-canary", version="canary"),
        deployment("inf-next", version="next"),
        deployment("gw", "gateway"),
    ):
        await core.create_deployment(dep, reason="seed", actor=ACTOR)
    return await core.create_route(route("inference", ("inf-stable", 100)), reason="seed", actor=ACTOR)


def rollout(rollout_id: str = "r1", canary: str = "inf-canary", **fields) -> Rollout:
    return Rollout(
        f"rollouts/{rollout_id}", "routes/inference", "deployments/inf-stable", f"deployments/{canary}", **fields
    )


async def start(core: RegistryCore, rollout_id: str = "r1", **fields) -> Rollout:
    return await core.create_rollout(rollout(rollout_id, **fields), reason="ship it", actor=ACTOR)


@pytest.fixture
async def sqlite_core(tmp_path):
    """A core on SQLite only, for the many cases of rules that do not depend on the database."""
    registry_core = RegistryCore(Store(f"sqlite+pysqlite:///{tmp_path / 'registry.db'}"), resource_json)
    await registry_core.start()
    yield registry_core
    await registry_core.close()


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


def window(step: int, verdict: Verdict = Verdict.PASS, *, at: int = 0, **measurement) -> AnalysisWindow:
    begin = datetime(2026, 5, 20, 12, 0, tzinfo=UTC) + timedelta(seconds=10 * at)
    values = {"metric": "error_rate", "canary": 0.001, "stable": 0.002, "threshold": 0.01, "verdict": verdict}
    return AnalysisWindow(
        start_time=begin,
        end_time=begin + timedelta(seconds=10),
        step=step,
        verdict=verdict,
        measurements=(Measurement(**{**values, **measurement}, detail="canary 0.1% errors <= 1%"),),
        source="envoy",
    )


async def status(core: RegistryCore, current: Rollout, paths: list[str], windows=(), reason="step", **values):
    return await core.update_rollout_status(
        replace(current, **values), paths, append_windows=windows, reason=reason, actor=CONTROLLER
    )


# --- create ----------------------------------------------------------------------------------


async def test_create_fills_in_the_defaults_and_starts_pending(core):
    await seed(core)
    stored = await start(core)
    assert stored.state is P.PENDING and stored.current_step == 0 and stored.applied_weight == 0
    assert stored.steps == DEFAULT_STEPS
    assert [(s.weight, s.mirror_percent, s.pause.total_seconds(), s.analysis) for s in stored.steps] == [
        (0, 10.0, 60, True),
        (1, 0.0, 60, True),
        (10, 0.0, 60, True),
        (50, 0.0, 60, True),
        (100, 0.0, 0, False),
    ]
    assert stored.analysis == AnalysisSpec(
        window=timedelta(seconds=10),
        min_requests=20,
        max_error_rate=0.01,
        max_error_rate_margin=0.005,
        max_latency_ratio=3.0,
        max_cost_ratio=2.0,
        golden_set="",
        max_golden_drop=0.1,
        inconclusive_limit=6,
        latency_slack_seconds=0.25,
    )
    (event,) = stored.history
    assert (event.from_state, event.to_state, event.step, event.actor, event.reason) == (
        P.UNSPECIFIED,
        P.PENDING,
        0,
        ACTOR,
        "ship it",
    )
    assert stored.etag and stored.create_time == stored.update_time == event.time
    assert await core.get_rollout("rollouts/r1") == stored
    (entry, *_) = (await core.list_audit_entries(resource="rollouts/r1")).items
    assert entry.action is Action.CREATE and entry.before is None and entry.after == resource_json(stored)
    assert entry.after["state"] == "STATE_PENDING" and entry.after["analysis"]["minRequests"] == 20


async def test_explicit_steps_and_a_partial_analysis_spec_are_kept(core):
    await seed(core)
    steps = (
        RolloutStep(weight=0, mirror_percent=25.5, pause=timedelta(seconds=30), analysis=True),
        RolloutStep(weight=5, pause=timedelta(minutes=5), analysis=True),
        RolloutStep(weight=5, mirror_percent=50.0),  # pause 0: held until an operator resumes
        RolloutStep(weight=100),
    )
    spec = AnalysisSpec(window=timedelta(seconds=30), max_error_rate=0.05, golden_set="smoke", inconclusive_limit=2)
    stored = await start(core, steps=steps, analysis=spec, state=P.PROMOTED, current_step=3, message="ignored")
    assert stored.steps == steps
    assert stored.analysis == replace(
        spec,
        min_requests=20,
        max_error_rate_margin=0.005,
        max_latency_ratio=3.0,
        max_cost_ratio=2.0,
        max_golden_drop=0.1,
        latency_slack_seconds=0.25,
    )
    # output-only fields of the request are ignored
    assert (stored.state, stored.current_step, stored.message) == (P.PENDING, 0, "")
    assert await core.get_rollout("rollouts/r1") == stored


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("name taken", ResourceExists, "rollouts/r1 already exists"),
        ("no route", ResourceNotFound, "routes/nope does not exist"),
        ("no canary", ResourceNotFound, "deployments/nope does not exist"),
        ("stable not a backend", StableNotServing, "does not send deployments/inf-next traffic"),
        ("stable at weight 0", StableNotServing, "deployments/inf-canary=0"),
        ("locked route", RouteLocked, "rollouts leave a locked route alone"),
        ("another active", RolloutActive, "already has an active rollout, rollouts/r1"),
        ("canary of another service", InvalidArgument, "implements 'gateway', not 'inference'"),
    ],
)
async def test_create_checks_the_route_and_deployments_and_writes_nothing_when_refused(core, case, error, words):
    created = await seed(core)
    await start(core)  # r1, active on routes/inference
    await core.create_route(
        route("code", ("inf-canary", 0), ("inf-next", 10), route_class="code"), reason="x", actor=ACTOR
    )
    if case == "locked route":
        await core.abort_rollout("rollouts/r1", reason="make room", actor=ACTOR)
        await core.update_route(replace(created, locked=True), ["locked"], reason="pin", actor=ACTOR)
    requests = {
        "name taken": rollout("r1"),
        "no route": replace(rollout("r2"), route="routes/nope"),
        "no canary": rollout("r2", canary="nope"),
        "stable not a backend": replace(rollout("r2"), stable_deployment="deployments/inf-next"),
        "stable at weight 0": replace(
            rollout("r2"),
            route="routes/code",
            stable_deployment="deployments/inf-canary",
            canary_deployment="deployments/inf-stable",
        ),
        "locked route": rollout("r2"),
        "another active": rollout("r2", canary="inf-next"),
        "canary of another service": rollout("r2", canary="gw"),
    }
    before = (core.revision, (await core.list_audit_entries()).items, await core.rollouts_state())
    with pytest.raises(error, match=words) as exc:
        await core.create_rollout(requests[case], reason="x", actor=ACTOR)
    if case == "canary of another service":
        assert fields(exc) == ["rollout.canary_deployment"]
    assert (await core.list_audit_entries()).items == before[1]
    assert (await core.list_rollouts()).items == before[2].rollouts
    await core.create_deployment(deployment("later"), reason="x", actor=ACTOR)
    assert core.revision == before[0] + 1  # the refused change took no revision


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"name": "r1"}, "rollout.name", "rollouts/{id}"),
        ({"route": ""}, "rollout.route", "required"),
        ({"stable_deployment": "inf-stable"}, "rollout.stable_deployment", "deployments/{id}"),
        ({"canary_deployment": "deployments/inf-stable"}, "rollout.canary_deployment", "must differ"),
        ({"steps": (RolloutStep(1),) * 21}, "rollout.steps", "1-20 steps"),
        ({"steps": (RolloutStep(101),)}, "rollout.steps[0].weight", "[0, 100]"),
        ({"steps": (RolloutStep(-1),)}, "rollout.steps[0].weight", "[0, 100]"),
        ({"steps": (RolloutStep(10), RolloutStep(5))}, "rollout.steps[1].weight", "[10, 100]"),
        ({"steps": (RolloutStep(0),)}, "rollout.steps[0].mirror_percent", "(0, 100] on a step of weight 0"),
        ({"steps": (RolloutStep(1, mirror_percent=100.5),)}, "rollout.steps[0].mirror_percent", "[0, 100]"),
        ({"steps": (RolloutStep(1, mirror_percent=math.nan),)}, "rollout.steps[0].mirror_percent", "[0, 100]"),
        ({"steps": (RolloutStep(1, pause=timedelta(hours=25)),)}, "rollout.steps[0].pause", "[0s, 86400s]"),
        ({"steps": (RolloutStep(1, pause=timedelta(seconds=-1)),)}, "rollout.steps[0].pause", "[0s, 86400s]"),
        ({"analysis": AnalysisSpec(window=timedelta(seconds=4))}, "rollout.analysis.window", "[5s, 3600s]"),
        ({"analysis": AnalysisSpec(window=timedelta(hours=2))}, "rollout.analysis.window", "[5s, 3600s]"),
        ({"analysis": AnalysisSpec(min_requests=-1)}, "rollout.analysis.min_requests", "[1, 1000000]"),
        ({"analysis": AnalysisSpec(min_requests=1_000_001)}, "rollout.analysis.min_requests", "[1, 1000000]"),
        ({"analysis": AnalysisSpec(max_error_rate=1.5)}, "rollout.analysis.max_error_rate", "(0, 1]"),
        ({"analysis": AnalysisSpec(max_error_rate=-0.1)}, "rollout.analysis.max_error_rate", "(0, 1]"),
        ({"analysis": AnalysisSpec(max_error_rate_margin=2)}, "rollout.analysis.max_error_rate_margin", "(0, 1]"),
        ({"analysis": AnalysisSpec(max_latency_ratio=1.0)}, "rollout.analysis.max_latency_ratio", "(1, 100]"),
        ({"analysis": AnalysisSpec(max_cost_ratio=101)}, "rollout.analysis.max_cost_ratio", "(1, 100]"),
        ({"analysis": AnalysisSpec(golden_set="Smoke Set")}, "rollout.analysis.golden_set", "63 characters"),
        ({"analysis": AnalysisSpec(golden_set="g" * 64)}, "rollout.analysis.golden_set", "63 characters"),
        ({"analysis": AnalysisSpec(max_golden_drop=math.inf)}, "rollout.analysis.max_golden_drop", "(0, 1]"),
        ({"analysis": AnalysisSpec(inconclusive_limit=101)}, "rollout.analysis.inconclusive_limit", "[1, 100]"),
        ({"analysis": AnalysisSpec(latency_slack_seconds=61)}, "rollout.analysis.latency_slack_seconds", "[0.001, 60]"),
    ],
)
async def test_rollout_field_rules_name_the_field_and_the_limit(sqlite_core, change, field, words):
    await seed(sqlite_core)
    with pytest.raises(InvalidArgument) as exc:
        await sqlite_core.create_rollout(replace(rollout(), **change), reason="x", actor=ACTOR)
    violations = {v.field: v.description for v in exc.value.violations}
    assert field in violations and words in violations[field], violations


# --- operators -------------------------------------------------------------------------------


async def test_pause_resume_promote_abort_walk_the_states_with_history_and_audit(core):
    await seed(core)
    created = await start(core)
    paused = await core.pause_rollout("rollouts/r1", reason="looking into p99", actor="alice")
    assert paused.state is P.PAUSED and paused.etag != created.etag and "paused by alice" in paused.message
    with pytest.raises(RolloutStateConflict, match="rollouts/r1 is PAUSED: only a pending or progressing"):
        await core.pause_rollout("rollouts/r1", reason="again", actor="alice")
    resumed = await core.resume_rollout("rollouts/r1", reason="fine", actor="bob")
    assert resumed.state is P.PROGRESSING and resumed.step_start_time == resumed.update_time
    with pytest.raises(RolloutStateConflict, match="is PROGRESSING: only a paused rollout can be resumed"):
        await core.resume_rollout("rollouts/r1", reason="again", actor="bob")
    promoted = await core.promote_rollout("rollouts/r1", reason="urgent fix", actor="carol")
    assert promoted.state is P.PROGRESSING and promoted.current_step == len(promoted.steps) == 5
    assert promoted.message == "promoted by carol: urgent fix"
    aborted = await core.abort_rollout("rollouts/r1", reason="changed my mind", actor="dave")
    assert aborted.state is P.ABORTED and aborted.current_step == 5
    for operate in (core.pause_rollout, core.resume_rollout, core.promote_rollout, core.abort_rollout):
        with pytest.raises(RolloutStateConflict, match="rollouts/r1 is ABORTED") as exc:
            await operate("rollouts/r1", reason="too late", actor="erin")
        assert exc.value.metadata["state"] == "ABORTED"
    stored = await core.get_rollout("rollouts/r1")
    assert stored == aborted
    assert [(e.from_state, e.to_state, e.step, e.actor, e.reason) for e in stored.history] == [
        (P.UNSPECIFIED, P.PENDING, 0, ACTOR, "ship it"),
        (P.PENDING, P.PAUSED, 0, "alice", "looking into p99"),
        (P.PAUSED, P.PROGRESSING, 0, "bob", "fine"),
        (P.PROGRESSING, P.PROGRESSING, 5, "carol", "urgent fix"),
        (P.PROGRESSING, P.ABORTED, 5, "dave", "changed my mind"),
    ]
    entries = (await core.list_audit_entries(resource="rollouts/r1")).items
    assert [e.action for e in entries] == [Action.TRANSITION] * 4 + [Action.CREATE]
    pause = entries[3]
    assert pause.before == resource_json(created) and pause.after == resource_json(paused)
    assert (pause.before["state"], pause.after["state"], pause.actor) == ("STATE_PENDING", "STATE_PAUSED", "alice")
    with pytest.raises(ResourceNotFound):
        await core.abort_rollout("rollouts/nope", reason="x", actor=ACTOR)
    with pytest.raises(InvalidArgument) as exc:
        await core.pause_rollout("r1", reason="", actor=ACTOR)
    assert fields(exc) == ["name", "reason"]


async def test_a_new_rollout_may_start_once_the_active_one_has_ended(core):
    await seed(core)
    await start(core)
    with pytest.raises(RolloutActive):
        await start(core, "r2", canary="inf-next")
    await core.abort_rollout("rollouts/r1", reason="bad build", actor=ACTOR)
    second = await start(core, "r2", canary="inf-next")
    assert second.state is P.PENDING


async def test_the_database_itself_holds_one_active_rollout_per_route(core, database_url):
    await seed(core)
    await start(core)
    await core.abort_rollout("rollouts/r1", reason="x", actor=ACTOR)
    await start(core, "r2")
    store = Store(database_url)
    try:
        with store.engine.begin() as conn:  # an ended rollout does not count
            conn.execute(text("UPDATE rollouts SET state = 'PAUSED' WHERE id = 'r2'"))
        with pytest.raises(IntegrityError, match="(?i)unique"), store.engine.begin() as conn:
            conn.execute(text("UPDATE rollouts SET state = 'PENDING' WHERE id = 'r1'"))
    finally:
        store.dispose()


# --- the controller ------------------------------------------------------------------------


async def test_status_updates_take_steps_record_windows_and_audit_only_transitions(core):
    await seed(core)
    created = await start(core)
    started = await status(
        core,
        created,
        ["state", "current_step", "step_start_time", "applied_weight", "applied_mirror_percent", "message"],
        state=P.PROGRESSING,
        current_step=0,
        step_start_time=datetime(2026, 5, 20, 12, 0, tzinfo=UTC),
        applied_weight=0,
        applied_mirror_percent=10.0,
        message="shadowing 10%",
        reason="first step",
    )
    assert (started.state, started.applied_mirror_percent, started.message) == (P.PROGRESSING, 10.0, "shadowing 10%")
    assert started.step_start_time == datetime(2026, 5, 20, 12, 0, tzinfo=UTC)
    assert started.history[-1].from_state is P.PENDING and started.history[-1].actor == CONTROLLER
    audited = len((await core.list_audit_entries(resource="rollouts/r1")).items)
    assert audited == 2

    # windows alone (an empty mask is fine then): stored, a new etag, no history event, no audit entry
    windowed = await status(core, started, [], [window(0, at=0), window(0, Verdict.INCONCLUSIVE, at=1)])
    assert windowed.windows == (window(0, at=0), window(0, Verdict.INCONCLUSIVE, at=1))
    assert windowed.etag != started.etag and windowed.history == started.history
    assert len((await core.list_audit_entries(resource="rollouts/r1")).items) == audited

    stepped = await status(
        core,
        windowed,
        ["current_step", "applied_weight", "applied_mirror_percent"],
        [window(0, at=2)],
        current_step=1,
        applied_weight=1,
        applied_mirror_percent=0.0,
        reason="step 0 passed",
    )
    assert stepped.current_step == 1 and len(stepped.windows) == 3
    event = stepped.history[-1]
    assert (event.from_state, event.to_state, event.step, event.reason) == (
        P.PROGRESSING,
        P.PROGRESSING,
        1,
        "step 0 passed",
    )
    entries = (await core.list_audit_entries(resource="rollouts/r1")).items
    assert len(entries) == audited + 1 and entries[0].action is Action.TRANSITION
    assert entries[0].before["currentStep"] == 0 and entries[0].after["currentStep"] == 1
    assert entries[0].after["windows"] == [] and len(stepped.windows) == 3  # windows are kept out of the audit log
    assert await core.get_rollout("rollouts/r1") == stepped


async def test_only_the_last_100_windows_are_kept(core):
    await seed(core)
    current = await start(core)
    for batch in range(11):
        current = await status(core, current, [], [window(0, at=batch * 10 + i) for i in range(10)])
    assert len(current.windows) == 100
    assert current.windows[0] == window(0, at=10) and current.windows[-1] == window(0, at=109)
    assert (await core.get_rollout("rollouts/r1")).windows == current.windows


async def test_non_finite_measurements_survive_the_json_document(core):
    await seed(core)
    created = await start(core)
    stored = await status(
        core,
        created,
        [],
        [window(0, Verdict.FAIL, metric="latency_p99_s", canary=math.inf, stable=0.0, threshold=math.nan)],
    )
    (m,) = (await core.get_rollout("rollouts/r1")).windows[0].measurements
    assert m.canary == math.inf and m.stable == 0.0 and math.isnan(m.threshold)
    assert stored.windows[0].measurements[0].canary == math.inf


async def test_status_update_with_a_stale_etag_is_aborted_naming_the_current_one(core):
    await seed(core)
    created = await start(core)
    paused = await core.pause_rollout("rollouts/r1", reason="hold", actor=ACTOR)
    with pytest.raises(EtagMismatch) as exc:
        await status(core, created, ["applied_weight"], applied_weight=1)
    assert exc.value.current_etag == paused.etag and paused.etag in exc.value.message
    assert await core.get_rollout("rollouts/r1") == paused


@pytest.mark.parametrize(
    ("paths", "values", "windows", "field", "words"),
    [
        ([], {}, (), "update_mask", "required: any of state, current_step"),
        (["state", "route"], {"state": P.PROGRESSING}, (), "update_mask", "'route'"),
        (["windows"], {}, (), "update_mask", "unknown or read-only path 'windows'"),
        (["state"], {"state": P.UNSPECIFIED}, (), "rollout.state", "required"),
        (["current_step"], {"current_step": -1}, (), "rollout.current_step", "[0, len(steps)]"),
        (["current_step"], {"current_step": 6}, (), "rollout.current_step", "[0, 5]"),
        (["applied_weight"], {"applied_weight": 101}, (), "rollout.applied_weight", "[0, 100]"),
        (
            ["applied_mirror_percent"],
            {"applied_mirror_percent": -1.0},
            (),
            "rollout.applied_mirror_percent",
            "[0, 100]",
        ),
        (["message"], {"message": "m" * 1001}, (), "rollout.message", "1000"),
        (["message"], {"etag": ""}, (), "rollout.etag", "required"),
        ([], {}, tuple(window(0, at=i) for i in range(11)), "append_windows", "at most 10"),
        ([], {}, (window(6),), "append_windows[0].step", "[0, 5]"),
        ([], {}, (replace(window(0), verdict=Verdict.UNSPECIFIED),), "append_windows[0].verdict", "required"),
        ([], {}, (replace(window(0), end_time=None),), "append_windows[0]", "start_time and end_time"),
        ([], {}, (window(0, metric="Error Rate"),), "append_windows[0].measurements[0].metric", "1-63"),
        (
            [],
            {},
            (replace(window(0), measurements=window(0).measurements * 17),),
            "append_windows[0].measurements",
            "16",
        ),
    ],
)
async def test_status_field_rules(sqlite_core, paths, values, windows, field, words):
    await seed(sqlite_core)
    created = await start(sqlite_core)
    with pytest.raises(InvalidArgument) as exc:
        await status(sqlite_core, created, paths, windows, **values)
    violations = {v.field: v.description for v in exc.value.violations}
    assert field in violations and words in violations[field], violations
    assert await sqlite_core.get_rollout("rollouts/r1") == created


@pytest.mark.parametrize(
    ("path", "to", "allowed"),
    [
        ([P.PENDING], P.PROGRESSING, True),
        ([P.PENDING], P.ROLLED_BACK, True),
        ([P.PENDING], P.PAUSED, False),
        ([P.PENDING], P.PROMOTED, False),
        ([P.PENDING], P.ABORTED, False),
        ([P.PENDING], P.PENDING, True),
        ([P.PENDING, P.PROGRESSING], P.PAUSED, True),
        ([P.PENDING, P.PROGRESSING], P.PROMOTED, True),
        ([P.PENDING, P.PROGRESSING], P.ROLLED_BACK, True),
        ([P.PENDING, P.PROGRESSING], P.PENDING, False),
        ([P.PENDING, P.PROGRESSING, P.PAUSED], P.ROLLED_BACK, True),
        ([P.PENDING, P.PROGRESSING, P.PAUSED], P.PROGRESSING, False),  # only an operator resumes
        ([P.PENDING, P.PROGRESSING, P.PROMOTED], P.ROLLED_BACK, False),
        ([P.PENDING, P.ROLLED_BACK], P.PROGRESSING, False),
        ([P.PENDING, P.ROLLED_BACK], P.ROLLED_BACK, True),
    ],
)
async def test_the_state_changes_the_controller_may_make(sqlite_core, path, to, allowed):
    await seed(sqlite_core)
    current = await start(sqlite_core)
    for state in path[1:]:
        current = await status(sqlite_core, current, ["state"], state=state)
    if allowed:
        stored = await status(sqlite_core, current, ["state"], state=to)
        assert stored.state is to and len(stored.history) == len(path) + (to is not path[-1])
    else:
        with pytest.raises(RolloutStateConflict, match=f"rollouts/r1 is {path[-1].value}"):
            await status(sqlite_core, current, ["state"], state=to)


async def test_an_ended_rollout_takes_only_the_controllers_finishing_writes(core):
    await seed(core)
    current = await start(core)
    current = await status(
        core,
        current,
        ["state", "current_step", "applied_weight"],
        state=P.PROGRESSING,
        current_step=2,
        applied_weight=10,
    )
    rolled_back = await status(
        core,
        current,
        ["state", "message"],
        [window(2, Verdict.FAIL)],
        state=P.ROLLED_BACK,
        message="canary 4.8% errors > 1%",
        reason="analysis failed",
    )
    audited = len((await core.list_audit_entries(resource="rollouts/r1")).items)
    finished = await status(
        core,
        rolled_back,
        ["applied_weight", "applied_mirror_percent", "message", "state", "current_step"],
        applied_weight=0,
        applied_mirror_percent=0.0,
        message="rolled back: canary at 0%",
        state=P.ROLLED_BACK,
        current_step=2,  # unchanged: fine
    )
    assert (finished.state, finished.applied_weight, finished.message) == (
        P.ROLLED_BACK,
        0,
        "rolled back: canary at 0%",
    )
    assert finished.history == rolled_back.history
    assert len((await core.list_audit_entries(resource="rollouts/r1")).items) == audited
    for change in ({"state": P.PROGRESSING}, {"current_step": 3}):
        with pytest.raises(RolloutStateConflict, match="is ROLLED_BACK: it has ended"):
            await status(core, finished, list(change), **change)
    assert await core.get_rollout("rollouts/r1") == finished


# --- listing and watching --------------------------------------------------------------------


async def test_list_rollouts_newest_first_with_filters_and_paging(core):
    await seed(core)
    await core.create_route(route("code", ("inf-next", 1), route_class="code"), reason="x", actor=ACTOR)
    names = []
    for i in range(5):
        on_code = i % 2 == 1
        r = Rollout(
            f"rollouts/r{i}",
            "routes/code" if on_code else "routes/inference",
            "deployments/inf-next" if on_code else "deployments/inf-stable",
            "deployments/inf-canary",
        )
        await core.create_rollout(r, reason="x", actor=ACTOR)
        names.append(r.name)
        if i < 3:
            await core.abort_rollout(r.name, reason="next", actor=ACTOR)
    newest_first = names[::-1]  # r4, r3 active; the rest aborted
    assert [r.name for r in (await core.list_rollouts()).items] == newest_first
    pages, token = [], ""
    while True:
        page = await core.list_rollouts(page_size=2, page_token=token)
        pages.append([r.name for r in page.items])
        if not (token := page.next_page_token):
            break
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    assert [r.name for r in (await core.list_rollouts(route="routes/code")).items] == ["rollouts/r3", "rollouts/r1"]
    assert [r.name for r in (await core.list_rollouts(active_only=True)).items] == ["rollouts/r4", "rollouts/r3"]
    assert [r.name for r in (await core.list_rollouts(route="routes/code", active_only=True)).items] == ["rollouts/r3"]
    with pytest.raises(InvalidArgument) as exc:
        await core.list_rollouts(active_only=True, page_token=(await core.list_rollouts(page_size=1)).next_page_token)
    assert fields(exc) == ["page_token"]
    with pytest.raises(InvalidArgument) as exc:
        await core.list_rollouts(route="code")
    assert fields(exc) == ["route"]
    with pytest.raises(ResourceNotFound):
        await core.get_rollout("rollouts/nope")


async def test_rollouts_with_one_create_time_page_by_name(core, database_url):
    await seed(core)
    for i in range(4):
        await start(core, f"r{i}")
        await core.abort_rollout(f"rollouts/r{i}", reason="x", actor=ACTOR)
    store = Store(database_url)
    try:
        with store.engine.begin() as conn:
            # through the table's own column type: times are stored as it writes them
            conn.execute(update(rollouts).values(create_time=datetime(2026, 5, 20, tzinfo=UTC)))
    finally:
        store.dispose()
    seen, token = [], ""
    while True:
        page = await core.list_rollouts(page_size=3, page_token=token)
        seen += [r.name for r in page.items]
        if not (token := page.next_page_token):
            break
    assert seen == [f"rollouts/r{i}" for i in range(4)]


async def test_watch_rollouts_and_watch_routes_wake_only_for_their_own_changes(core):
    created = await seed(core)
    followers, routes = core.watch_rollouts(), core.watch()
    first = await anext(followers)
    assert first.rollouts == () and first.revision == core.revision
    await anext(routes)
    next_routes = asyncio.ensure_future(anext(routes))
    next_rollouts = asyncio.ensure_future(anext(followers))

    stored = await start(core)
    got = await asyncio.wait_for(next_rollouts, 5)
    assert got.revision == core.revision and got.rollouts == (stored,)

    next_rollouts = asyncio.ensure_future(anext(followers))
    moved = await core.update_route(
        replace(
            created,
            backends=(WeightedBackend("deployments/inf-stable", 99), WeightedBackend("deployments/inf-canary", 1)),
        ),
        ["backends"],
        reason="step",
        actor=CONTROLLER,
    )
    # the route follower was woken by the route change, not by the rollout created before it
    assert (await asyncio.wait_for(next_routes, 5)).revision == moved.revision
    paused = await core.pause_rollout("rollouts/r1", reason="x", actor=ACTOR)
    # and the rollout follower by the pause, not by the route change before it
    got = await asyncio.wait_for(next_rollouts, 5)
    assert got.revision == core.revision == moved.revision + 1 and got.rollouts == (paused,)
    assert core.rollouts_loads == 3  # one read per message (first, create, pause)
    await followers.aclose()
    await routes.aclose()


async def test_close_ends_rollout_watches(core):
    watch = core.watch_rollouts()
    await anext(watch)
    pending = asyncio.ensure_future(anext(watch))
    core.close_watchers()
    with pytest.raises(ShuttingDown, match="shutting down"):
        await asyncio.wait_for(pending, 5)


# --- route mirrors and metrics URLs ----------------------------------------------------------


async def test_route_mirrors_are_stored_updated_and_hold_their_deployment(core):
    created = await seed(core)
    shadow = (RouteMirror("deployments/inf-canary", 12.5), RouteMirror("deployments/inf-next", 100.0))
    mirrored = await core.update_route(replace(created, mirrors=shadow), ["mirrors"], reason="shadow", actor=ACTOR)
    assert mirrored.mirrors == shadow and await core.get_route("routes/inference") == mirrored
    assert (await core.state()).routes == (mirrored,)
    with pytest.raises(DeploymentInUse, match="routes/inference"):
        await core.delete_deployment("deployments/inf-canary", reason="cleanup", actor=ACTOR)
    entry = (await core.list_audit_entries(resource="routes/inference")).items[0]
    assert entry.before["mirrors"] == [] and entry.after["mirrors"][0] == {
        "deployment": "deployments/inf-canary",
        "percent": 12.5,
    }
    # another mask leaves the mirrors alone; an empty list in the mask clears them
    locked = await core.update_route(replace(mirrored, mirrors=(), locked=True), ["locked"], reason="x", actor=ACTOR)
    assert locked.mirrors == shadow
    cleared = await core.update_route(
        replace(locked, mirrors=(), locked=False), ["mirrors", "locked"], reason="x", actor=ACTOR
    )
    assert cleared.mirrors == ()
    await core.delete_deployment("deployments/inf-canary", reason="unused now", actor=ACTOR)
    created_with = await core.create_route(
        replace(
            route("code", ("inf-stable", 1), route_class="code"), mirrors=(RouteMirror("deployments/inf-next", 5),)
        ),
        reason="x",
        actor=ACTOR,
    )
    assert (
        (await core.get_route("routes/code")).mirrors
        == created_with.mirrors
        == (RouteMirror("deployments/inf-next", 5.0),)
    )


@pytest.mark.parametrize(
    ("mirrors", "backends", "mask", "field", "words"),
    [
        ((("inf-canary", 1.0),) * 2, None, ["mirrors"], "route.mirrors[1].deployment", "at most once"),
        (tuple((f"d{i}", 1.0) for i in range(5)), None, ["mirrors"], "route.mirrors", "at most 4"),
        ((("inf-canary", 0.0),), None, ["mirrors"], "route.mirrors[0].percent", "(0, 100]"),
        ((("inf-canary", 100.01),), None, ["mirrors"], "route.mirrors[0].percent", "(0, 100]"),
        ((("inf-canary", math.nan),), None, ["mirrors"], "route.mirrors[0].percent", "(0, 100]"),
        ((("nope", 1.0),), None, ["mirrors"], "route.mirrors[0].deployment", "does not exist"),
        ((("gw", 1.0),), None, ["mirrors"], "route.mirrors[0].deployment", "implements 'gateway'"),
        ((("inf-stable", 1.0),), None, ["mirrors"], "route.mirrors[0].deployment", "positive weight"),
        (
            (("inf-canary", 1.0),),
            (("inf-stable", 90), ("inf-canary", 10)),
            ["mirrors", "backends"],
            "route.mirrors[0].deployment",
            "also backend [1] with weight 10",
        ),
        ((("inf-canary", 1.0),), (("inf-stable", 90), ("inf-canary", 0)), ["mirrors", "backends"], None, None),
    ],
)
async def test_mirror_rules(sqlite_core, mirrors, backends, mask, field, words):
    created = await seed(sqlite_core)
    change = replace(created, mirrors=tuple(RouteMirror(f"deployments/{d}", p) for d, p in mirrors))
    if backends is not None:
        change = replace(change, backends=tuple(WeightedBackend(f"deployments/{d}", w) for d, w in backends))
    if field is None:
        assert (await sqlite_core.update_route(change, mask, reason="x", actor=ACTOR)).mirrors == change.mirrors
        return
    with pytest.raises(InvalidArgument) as exc:
        await sqlite_core.update_route(change, mask, reason="x", actor=ACTOR)
    violations = {v.field: v.description for v in exc.value.violations}
    assert field in violations and words in violations[field], violations
    with pytest.raises(InvalidArgument):  # the same on create
        await sqlite_core.create_route(
            replace(change, name="routes/other", route_class="other"), reason="x", actor=ACTOR
        )


async def test_a_backends_change_may_not_give_a_mirror_traffic(core):
    """The controller leaving a shadow step must drop the mirror in the same update."""
    created = await seed(core)
    shadowing = await core.update_route(
        replace(created, mirrors=(RouteMirror("deployments/inf-canary", 10),)), ["mirrors"], reason="x", actor=ACTOR
    )
    step = replace(
        shadowing,
        backends=(WeightedBackend("deployments/inf-stable", 99), WeightedBackend("deployments/inf-canary", 1)),
        mirrors=(),
    )
    with pytest.raises(InvalidArgument) as exc:
        await core.update_route(step, ["backends"], reason="x", actor=CONTROLLER)
    assert exc.value.violations == [
        FieldViolation(
            "route.backends[1].weight",
            "must be 0 while deployments/inf-canary is mirror [0] of the route (a mirror may not be a backend with a"
            " positive weight); remove the mirror in the same update (update_mask 'mirrors')",
        )
    ]
    moved = await core.update_route(step, ["backends", "mirrors"], reason="x", actor=CONTROLLER)
    assert moved.mirrors == () and moved.backends == step.backends


async def test_deployment_metrics_url_is_stored_and_checked(core):
    url = "http://127.0.0.1:9151/metrics"
    stored = await core.create_deployment(replace(deployment("inf"), metrics_url=url), reason="x", actor=ACTOR)
    assert stored.metrics_url == url and (await core.get_deployment("deployments/inf")).metrics_url == url
    assert (await core.state()).deployments[0].metrics_url == url
    for bad, words in (
        ("ftp://host/metrics", "http(s) URL"),
        ("http:///metrics", "http(s) URL"),
        ("http://host:99999/metrics", "http(s) URL"),
        ("http://host/a b", "without spaces"),
        ("https://h/" + "m" * 503, "at most 512 characters; got 513"),
    ):
        with pytest.raises(InvalidArgument) as exc:
            await core.create_deployment(replace(deployment("other"), metrics_url=bad), reason="x", actor=ACTOR)
        assert fields(exc) == ["deployment.metrics_url"] and words in exc.value.violations[0].description, bad
    await core.create_deployment(
        replace(deployment("tls"), metrics_url="https://h/" + "m" * 502), reason="x", actor=ACTOR
    )


# --- migration -------------------------------------------------------------------------------


async def test_migration_0003_keeps_a_0002_database_and_adds_rollouts_and_mirrors(database_url):
    engine = create_engine(database_url)
    try:
        upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(text("UPDATE registry_state SET revision = 7"))
            for dep_id in ("inf", "inf-canary"):
                conn.execute(
                    text(
                        "INSERT INTO deployments (id, service, version, endpoint, engine, model_id, create_time)"
                        " VALUES (:id, 'inference', 'v', '127.0.0.1:1', '', '', CURRENT_TIMESTAMP)"
                    ),
                    {"id": dep_id},
                )
            conn.execute(
                text(
                    "INSERT INTO routes (id, service, route_class, locked, timeout_us, etag, revision, update_time)"
                    " VALUES ('inference', 'inference', '', false, NULL, 'e7', 7, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO route_backends (route_id, position, deployment_id, weight)"
                    " VALUES ('inference', 0, 'inf', 100)"
                )
            )
        assert "rollouts" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    core = RegistryCore(Store(database_url), resource_json)
    await core.start()
    try:
        assert core.revision == 7
        assert (await core.get_deployment("deployments/inf")).metrics_url == ""
        existing = await core.get_route("routes/inference")
        assert existing.mirrors == () and existing.etag == "e7"
        r = Rollout("rollouts/r1", "routes/inference", "deployments/inf", "deployments/inf-canary")
        assert (await core.create_rollout(r, reason="after the upgrade", actor=ACTOR)).state is P.PENDING
        mirrored = await core.update_route(
            replace(existing, mirrors=(RouteMirror("deployments/inf-canary", 10),)),
            ["mirrors"],
            reason="x",
            actor=ACTOR,
        )
        assert (await core.get_route("routes/inference")).mirrors == mirrored.mirrors
    finally:
        await core.close()

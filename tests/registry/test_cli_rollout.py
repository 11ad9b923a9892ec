"""`servemesh rollout ...` against a real registry (the --no-mesh state file).

The CLI runs in a worker thread (it starts its own event loop) while the registry serves on the
test's loop.
"""

from __future__ import annotations

import asyncio

import pytest
import typer
from click.testing import Result
from google.protobuf import field_mask_pb2
from servemesh.registry.v1 import registry_pb2 as pb
from typer.testing import CliRunner

from mesh.cli import app
from mesh.cli_rollout import build_steps, describe_step, parse_shadow, parse_step
from mesh.state import MeshState

from .builders import deployment_pb, route_pb

pytestmark = pytest.mark.timeout(60)

R = pb.Rollout


async def cli(home, *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, app, [*args, "--home", str(home)], env={"COLUMNS": "250"}, catch_exceptions=False
    )


def steps(*specs) -> list[tuple[int, float, int, bool]]:
    return [(s.weight, s.mirror_percent, s.pause.seconds, s.analysis) for s in specs]


def test_step_specs():
    assert steps(parse_step("1:60s"), parse_step("10%:5m"), parse_step("50:hold"), parse_step("100")) == [
        (1, 0.0, 60, True),
        (10, 0.0, 300, True),
        (50, 0.0, 0, True),
        (100, 0.0, 0, False),  # the last step at 100%: nothing left to analyse
    ]
    assert steps(parse_step("100:10m"), parse_step("5:1h30m", analysis=False)) == [
        (100, 0.0, 600, True),
        (5, 0.0, 5400, False),
    ]
    assert steps(parse_shadow("10"), parse_shadow("25%:2m")) == [(0, 10.0, 60, True), (0, 25.0, 120, True)]
    assert parse_shadow("off") is None
    for bad in ("0:60s", "101", "ten", "1:60", "1:soon", "-5:60s"):
        with pytest.raises(typer.BadParameter):
            parse_step(bad)
    for bad in ("0:60s", "200", "x"):
        with pytest.raises(typer.BadParameter):
            parse_shadow(bad)


def test_build_steps_defaults_and_overrides():
    assert build_steps([], None) == []  # the registry's default steps
    assert steps(*build_steps([], "5:30s")) == [
        (0, 5.0, 30, True),
        (1, 0.0, 60, True),
        (10, 0.0, 60, True),
        (50, 0.0, 60, True),
        (100, 0.0, 0, False),
    ]
    assert steps(*build_steps(["20:2m", "100"], None)) == [(20, 0.0, 120, True), (100, 0.0, 0, False)]
    assert steps(*build_steps(["20:2m", "100"], "off", analysis=False)) == [(20, 0.0, 120, False), (100, 0.0, 0, False)]
    assert describe_step(parse_shadow("10:60s")) == "shadow 10% for 1m (analysed)"
    assert describe_step(parse_step("50:hold")) == "50% until resumed (analysed)"
    assert describe_step(parse_step("100"), last=True) == "100%"


async def seed(stub) -> None:
    for dep in (
        deployment_pb("inf-stable"),
        deployment_pb("inf-canary", version="canary", port=8001),
        deployment_pb("inf-next", version="next", port=8002),
    ):
        await stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=dep, reason="seed"))
    await stub.CreateRoute(pb.CreateRouteRequest(route=route_pb("inference", ("inf-stable", 100)), reason="seed"))
    await stub.CreateRoute(
        pb.CreateRouteRequest(
            route=route_pb("code", ("inf-stable", 50), ("inf-next", 50), route_class="code"), reason="seed"
        )
    )


async def test_start_status_and_the_operators_levers(registry, tmp_path):
    home = tmp_path / "home"
    MeshState(mesh=False, gateway="127.0.0.1:1", registry=registry.server.address).write(home)
    stub = registry.stub
    await seed(stub)

    started = await cli(
        home, "rollout", "start", "inference", "--canary", "inf-canary", "--name", "r1", "--reason", "v2"
    )
    assert started.exit_code == 0, started.stderr
    assert "started rollouts/r1 on routes/inference: inf-stable -> inf-canary" in started.stdout
    assert "shadow 10% for 1m (analysed), then 1% for 1m" in started.stdout  # the registry's defaults
    r1 = (await stub.GetRollout(pb.GetRolloutRequest(name="rollouts/r1"))).rollout
    assert (r1.stable_deployment, r1.canary_deployment, r1.state) == (
        "deployments/inf-stable",
        "deployments/inf-canary",
        R.STATE_PENDING,
    )
    assert len(r1.steps) == 5 and r1.history[0].reason == "v2"

    ambiguous = await cli(home, "rollout", "start", "code", "--canary", "inf-canary", "--reason", "x")
    assert ambiguous.exit_code == 2 and "--stable" in ambiguous.stderr and "inf-next" in ambiguous.stderr
    custom = await cli(
        home, "rollout", "start", "code", "--canary", "inf-canary", "--stable", "inf-next", "--name", "r2",
        "--shadow", "20:30s", "--step", "5:2m", "--step", "100", "--window", "30s", "--min-requests", "5",
        "--golden-set", "smoke", "--reason", "code model",
    )  # fmt: skip
    assert custom.exit_code == 0, custom.stderr
    r2 = (await stub.GetRollout(pb.GetRolloutRequest(name="rollouts/r2"))).rollout
    assert steps(*r2.steps) == [(0, 20.0, 30, True), (5, 0.0, 120, True), (100, 0.0, 0, False)]
    assert (r2.analysis.window.seconds, r2.analysis.min_requests, r2.analysis.golden_set) == (30, 5, "smoke")
    assert r2.analysis.max_error_rate == 0.01  # unset: the default
    busy = await cli(home, "rollout", "start", "inference", "--canary", "inf-next", "--reason", "x")
    assert busy.exit_code == 1 and "FAILED_PRECONDITION" in busy.stderr and "rollouts/r1" in busy.stderr

    # the controller's progress, as status shows it
    window = pb.AnalysisWindow(step=1, verdict=pb.Measurement.VERDICT_FAIL, source="envoy")
    window.start_time.FromSeconds(1_780_000_000)
    window.end_time.FromSeconds(1_780_000_010)
    window.measurements.add(
        metric="error_rate", canary=0.0483, stable=0.0021, threshold=0.0071, verdict=pb.Measurement.VERDICT_FAIL,
        detail="canary 4.83% errors > 0.71%",
    )  # fmt: skip
    change = pb.Rollout(name="rollouts/r1", etag=r1.etag, state=R.STATE_PROGRESSING, current_step=1, applied_weight=1)
    await stub.UpdateRolloutStatus(
        pb.UpdateRolloutStatusRequest(
            rollout=change,
            update_mask=field_mask_pb2.FieldMask(paths=["state", "current_step", "applied_weight"]),
            append_windows=[window],
            reason="step 1",
        )
    )
    detail = await cli(home, "rollout", "status", "r1")
    assert detail.exit_code == 0, detail.stderr
    text = detail.stdout
    assert "progressing" in text and "step 2/5: 1% for 1m (analysed)" in text and "canary 1% of the traffic" in text
    assert "0.0483" in text and "0.0021" in text and "0.0071" in text and "canary 4.83% errors > 0.71%" in text
    assert "FAIL" in text and "<- now" in text

    listed = await cli(home, "rollout", "status")
    assert listed.exit_code == 0
    lines = [line for line in listed.stdout.splitlines() if " r1 " in line or " r2 " in line]
    assert [("r2" in line, "pending" in line) for line in lines] == [(True, True), (False, False)]
    assert "progressing" in lines[1] and "FAIL" in lines[1]  # newest first, with the last verdict

    paused = await cli(home, "rollout", "pause", "r1", "--reason", "look at errors")
    assert paused.exit_code == 0 and "paused rollouts/r1: paused" in paused.stdout
    resumed = await cli(home, "rollout", "resume", "rollouts/r1", "--reason", "ok")
    assert resumed.exit_code == 0 and "resumed rollouts/r1: progressing" in resumed.stdout
    again = await cli(home, "rollout", "resume", "r1", "--reason", "twice")
    assert again.exit_code == 1 and "FAILED_PRECONDITION" in again.stderr and "is PROGRESSING" in again.stderr
    promoted = await cli(home, "rollout", "promote", "r1", "--reason", "urgent")
    assert promoted.exit_code == 0 and "step 5/5 done" in promoted.stdout
    aborted = await cli(home, "rollout", "abort", "r2", "--reason", "not today")
    assert aborted.exit_code == 0 and "aborted rollouts/r2: aborted" in aborted.stdout
    states = {r.name: r.state for r in (await stub.ListRollouts(pb.ListRolloutsRequest())).rollouts}
    assert states == {"rollouts/r1": R.STATE_PROGRESSING, "rollouts/r2": R.STATE_ABORTED}
    audit = (await stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource="rollouts/r1"))).entries
    assert [e.reason for e in audit[:3]] == ["urgent", "ok", "look at errors"]

    missing = await cli(home, "rollout", "status", "nope")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.stderr


async def test_watch_follows_a_rollout_until_it_ends(registry, tmp_path):
    home = tmp_path / "home"
    MeshState(mesh=False, gateway="127.0.0.1:1", registry=registry.server.address).write(home)
    stub = registry.stub
    await seed(stub)
    rollout = pb.Rollout(
        name="rollouts/r1",
        route="routes/inference",
        stable_deployment="deployments/inf-stable",
        canary_deployment="deployments/inf-canary",
    )
    await stub.CreateRollout(pb.CreateRolloutRequest(rollout=rollout, reason="x"))
    watching = asyncio.ensure_future(cli(home, "rollout", "watch", "r1"))
    # ends whether its stream opened before the abort (then it sees pending, then aborted) or after
    await stub.AbortRollout(pb.AbortRolloutRequest(name="rollouts/r1", reason="stop it"))
    result = await asyncio.wait_for(watching, 30)
    assert result.exit_code == 1  # ended without being promoted
    assert "aborted" in result.stdout.splitlines()[-1] and "aborted by" in result.stdout

    missing = await cli(home, "rollout", "watch", "nope")
    assert missing.exit_code == 1 and "rollouts/nope does not exist" in missing.stderr

"""`servemesh eval ...`: run golden sets against the gateway or a registered deployment."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.evals.golden import GoldenSet, GoldenSetError, available_sets, load_set
from mesh.evals.runner import (
    DEFAULT_TIMEOUT_S,
    CaseStatus,
    EvalReport,
    GatewayTarget,
    Target,
    deployment_target,
    run_set,
)
from mesh.launcher import Ports, servemesh_home
from mesh.state import MeshState
from services.common.client import insecure_channel

eval_app = typer.Typer(help="Golden evaluations: fixed requests whose answers must pass checks.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

#: exit code when the evaluation could not run (bad set, unknown deployment, no mesh)
EXIT_SETUP = 2

Home = Annotated[
    Path | None, typer.Option(help="Data directory [default: $SERVEMESH_HOME or ~/.local/share/servemesh]")
]


class _SetupError(Exception):
    pass


def _dep_name(name: str) -> str:
    return name if name.startswith("deployments/") else f"deployments/{name}"


async def _deployment(state: MeshState | None, name: str) -> rpb.Deployment:
    if state is None:
        raise _SetupError("no running mesh found to look the deployment up in (start one with `servemesh up`)")
    async with state.channel("registry") as channel:
        try:
            resp = await rpb_grpc.RegistryServiceStub(channel).GetDeployment(
                rpb.GetDeploymentRequest(name=_dep_name(name)), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            raise _SetupError(f"registry: {exc.code().name}: {exc.details()}") from None
    return resp.deployment


async def _deployment_target(
    stack: AsyncExitStack, state: MeshState | None, name: str, route_class: str, metrics_url: str
) -> Target:
    dep = await _deployment(state, name)
    assert state is not None
    if dep.service not in ("inference", "gateway"):
        raise _SetupError(f"deployment {name} implements {dep.service!r}; evaluations run against inference or gateway")
    if metrics_url:
        dep.metrics_url = metrics_url
    if route_class and dep.service == "inference":
        err.print("[yellow]note:[/yellow] --route-class is a gateway notion; ignored for an inference deployment")
    channel = await stack.enter_async_context(state.endpoint_channel(dep.endpoint, dep.service))
    return deployment_target(dep, channel, route_class_override=route_class)


async def _gateway_target(
    stack: AsyncExitStack, state: MeshState | None, target: str, route_class: str, metrics_url: str
) -> Target:
    """The gateway as `servemesh generate` reaches it: `target` in plaintext, else the running
    mesh (its edge, with the dev key), else the default local port."""
    if target or state is None:
        address = target or f"127.0.0.1:{Ports.gateway}"
        channel = await stack.enter_async_context(insecure_channel(address))
        # the local default serves its metrics on the default port; an explicit target's are unknown
        metrics = metrics_url or ("" if target else f"http://127.0.0.1:{Ports.gateway_metrics}/metrics")
        return GatewayTarget(channel, route_class, metrics_url=metrics, name=f"gateway {address}")
    channel = await stack.enter_async_context(state.channel("gateway"))
    metrics = metrics_url or await _mesh_gateway_metrics(state)
    return GatewayTarget(channel, route_class, metrics_url=metrics, name=f"gateway {state.gateway} (the mesh)")


async def _mesh_gateway_metrics(state: MeshState) -> str:
    """The metrics URL of the gateway deployment that takes most of the mesh's gateway traffic
    (route "gateway" in the registry); the port `servemesh up` uses when the registry has none."""
    fallback = f"http://127.0.0.1:{Ports.gateway_metrics}/metrics"
    try:
        async with state.channel("registry") as channel:
            stub = rpb_grpc.RegistryServiceStub(channel)
            route = (await stub.GetRoute(rpb.GetRouteRequest(name="routes/gateway"), timeout=10)).route
            if not route.backends:
                return fallback
            heaviest = max(route.backends, key=lambda b: b.weight).deployment
            dep = (await stub.GetDeployment(rpb.GetDeploymentRequest(name=heaviest), timeout=10)).deployment
    except grpc.aio.AioRpcError:
        return fallback
    return dep.metrics_url or fallback


def _print_report(report: EvalReport) -> None:
    colors = {CaseStatus.PASSED: "green", CaseStatus.FAILED: "red", CaseStatus.SKIPPED: "yellow"}
    table = Table("case", "category", "result", "detail", "latency", "tokens", "sha256", title=escape(report.target))
    for c in report.cases:
        table.add_row(
            c.id,
            c.category.value,
            f"[{colors[c.status]}]{c.status.value}[/]",
            escape(c.detail),
            "" if c.latency_s is None else f"{c.latency_s:.2f} s",
            "" if c.completion_tokens is None else str(c.completion_tokens) + (" (cached)" if c.cached else ""),
            (c.output_sha256 or "")[:12],
        )
    out.print(table)
    table = Table("category", "passed", "failed", "skipped", "pass rate", "threshold", "verdict")
    for cat, r in report.categories.items():
        table.add_row(
            cat.value,
            str(r.passed),
            str(r.failed),
            str(r.skipped),
            "n/a" if r.pass_rate is None else f"{r.pass_rate:.0%}",
            f">= {r.threshold:.0%}",
            "[green]met[/]" if r.met else "[red]below threshold[/]",
        )
    out.print(table)


async def _evaluate(
    golden: GoldenSet,
    state: MeshState | None,
    *,
    target: str,
    deployment: str,
    reference_deployment: str,
    route_class: str,
    metrics_url: str,
    concurrency: int,
    timeout: float,
) -> tuple[EvalReport | None, EvalReport]:
    async with AsyncExitStack() as stack:
        reference = None
        if reference_deployment:
            ref_target = await _deployment_target(stack, state, reference_deployment, route_class, "")
            reference = await run_set(golden, ref_target, concurrency=concurrency, timeout_s=timeout)
        if deployment:
            main = await _deployment_target(stack, state, deployment, route_class, metrics_url)
        else:
            main = await _gateway_target(stack, state, target, route_class, metrics_url)
        report = await run_set(golden, main, reference=reference, concurrency=concurrency, timeout_s=timeout)
    return reference, report


@eval_app.command("run")
def eval_run(
    golden_set: Annotated[
        str, typer.Argument(help="A set's name (see `servemesh eval list`) or the path of a set's YAML file.")
    ] = "smoke",
    route_class: Annotated[str, typer.Option(help="Route class for every case (gateway targets).")] = "",
    deployment: Annotated[
        str, typer.Option(help="Evaluate this registered deployment (e.g. inference-canary) instead of the gateway.")
    ] = "",
    reference_deployment: Annotated[
        str,
        typer.Option(help="Run the set against this deployment first; `sha256: reference` cases must match it."),
    ] = "",
    target: Annotated[str, typer.Option(help="Gateway address host:port (plaintext) instead of the mesh's.")] = "",
    metrics_url: Annotated[str, typer.Option(help="The evaluated target's Prometheus URL (metrics cases).")] = "",
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Requests in flight at once.")] = 2,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds each case may take.")] = DEFAULT_TIMEOUT_S,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the report(s) as JSON here.")] = None,
    home: Home = None,
) -> None:
    """Run a golden set; exit 1 if a category's pass rate is below its threshold.

    Default target: the gateway through the running mesh (as `servemesh generate` reaches it).
    """
    if target and deployment:
        raise typer.BadParameter("give --target or --deployment, not both", param_hint="--target")
    try:
        golden = load_set(golden_set)
    except GoldenSetError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_SETUP) from None
    state = MeshState.read(home or servemesh_home())
    try:
        reference, report = asyncio.run(
            _evaluate(
                golden,
                state,
                target=target,
                deployment=deployment,
                reference_deployment=reference_deployment,
                route_class=route_class,
                metrics_url=metrics_url,
                concurrency=concurrency,
                timeout=timeout,
            )
        )
    except _SetupError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_SETUP) from None
    if reference is not None:
        out.print(f"reference: {reference.summary()}", markup=False, highlight=False)
    _print_report(report)
    if json_path is not None:
        body = {"report": report.model_dump(mode="json")}
        if reference is not None:
            body["reference"] = reference.model_dump(mode="json")
        json_path.write_text(json.dumps(body, indent=2) + "\n")
    if not report.ok:
        below = [c.value for c, r in report.categories.items() if not r.met]
        err.print(f"[red]below threshold:[/red] {', '.join(below)}")
        raise typer.Exit(1)


@eval_app.command("list")
def eval_list() -> None:
    """The golden sets shipped in mesh/evals/sets."""
    table = Table("set", "cases", "thresholds", "description")
    for name in available_sets():
        s = load_set(name)
        thresholds = ", ".join(f"{c.value} >= {t:.0%}" for c, t in s.thresholds.items())
        table.add_row(name, str(len(s.cases)), thresholds, escape(s.description))
    out.print(table)

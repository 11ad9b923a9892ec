"""`servemesh route ...` and `servemesh mesh status`: operate the running mesh's routing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import httpx
import typer
from google.protobuf import field_mask_pb2
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.launcher import servemesh_home
from mesh.route_edits import flipped, locked_to
from mesh.state import MeshState
from mesh.xds.snapshot import TYPE_NAMES

route_app = typer.Typer(help="Routes: how each service's traffic is split over its deployments.", no_args_is_help=True)
mesh_app = typer.Typer(help="The Envoy mesh.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

Home = Annotated[
    Path | None, typer.Option(help="Data directory [default: $SERVEMESH_HOME or ~/.local/share/servemesh]")
]
Reason = Annotated[str, typer.Option(help="Why, for the audit log (required).")]


def _state(home: Path | None) -> MeshState:
    state = MeshState.read(home or servemesh_home())
    if state is None:
        err.print("[red]error:[/red] no running mesh found (start one with `servemesh up`)")
        raise typer.Exit(1)
    return state


def _call(home: Path | None, fn: Callable[[rpb_grpc.RegistryServiceStub], Awaitable[T]]) -> T:
    async def run() -> T:
        async with _state(home).channel("registry") as channel:
            return await fn(rpb_grpc.RegistryServiceStub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        err.print(f"error: {exc.code().name}: {exc.details()}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def _route_name(name: str) -> str:
    return name if name.startswith("routes/") else f"routes/{name}"


def _dep_name(name: str) -> str:
    return name if name.startswith("deployments/") else f"deployments/{name}"


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _print_route(r: rpb.Route) -> None:
    backends = ", ".join(f"{_short(b.deployment)}={b.weight}" for b in r.backends)
    overrides = ", ".join(f"{o.header}: {o.value} -> {_short(o.deployment)}" for o in r.header_overrides)
    lock = " [locked]" if r.locked else ""
    line = f"{_short(r.name)}{lock}: {backends}" + (f" ({overrides})" if overrides else "") + f"  etag {r.etag}"
    out.print(line, markup=False)


async def _update(
    stub: rpb_grpc.RegistryServiceStub,
    name: str,
    change: Callable[[rpb.Route], list[str]],
    reason: str,
) -> rpb.Route:
    """Read, change, write with the etag read: a concurrent change makes this fail, not overwrite."""
    route = (await stub.GetRoute(rpb.GetRouteRequest(name=_route_name(name)), timeout=10)).route
    paths = change(route)
    resp = await stub.UpdateRoute(
        rpb.UpdateRouteRequest(route=route, update_mask=field_mask_pb2.FieldMask(paths=paths), reason=reason),
        timeout=10,
    )
    return resp.route


@route_app.command("list")
def route_list(home: Home = None) -> None:
    """Every route with its weighted backends, header overrides and lock."""

    async def run(stub: rpb_grpc.RegistryServiceStub) -> tuple[list[rpb.Route], list[rpb.Deployment]]:
        routes = (await stub.ListRoutes(rpb.ListRoutesRequest(page_size=500), timeout=10)).routes
        deps = (await stub.ListDeployments(rpb.ListDeploymentsRequest(page_size=500), timeout=10)).deployments
        return list(routes), list(deps)

    routes, deps = _call(home, run)
    table = Table("route", "service", "class", "backends", "overrides", "locked", "etag")
    for r in routes:
        table.add_row(
            _short(r.name),
            r.service,
            r.route_class or "(default)",
            "\n".join(f"{_short(b.deployment)} {b.weight}" for b in r.backends),
            "\n".join(f"{o.header}: {o.value} -> {_short(o.deployment)}" for o in r.header_overrides),
            "yes" if r.locked else "",
            r.etag,
        )
    out.print(table)
    table = Table("deployment", "service", "version", "endpoint", "engine", "model")
    for d in deps:
        table.add_row(_short(d.name), d.service, d.version, d.endpoint, d.engine, d.model_id)
    out.print(table)


def _parse_weights(weights: list[str]) -> list[rpb.WeightedBackend]:
    backends = []
    for item in weights:
        dep, sep, weight = item.partition("=")
        if not sep or not weight.strip().lstrip("-").isdigit():
            raise typer.BadParameter(
                f"{item!r}: expected DEPLOYMENT=WEIGHT, e.g. inference-canary=10", param_hint="--weight"
            )
        backends.append(rpb.WeightedBackend(deployment=_dep_name(dep.strip()), weight=int(weight)))
    return backends


@route_app.command("set")
def route_set(
    route: Annotated[str, typer.Argument(help="Route id, e.g. inference.")],
    reason: Reason,
    weight: Annotated[list[str], typer.Option(help="DEPLOYMENT=WEIGHT; repeat for each backend.")],
    home: Home = None,
) -> None:
    """Set a route's weighted backends."""
    backends = _parse_weights(weight)

    def change(r: rpb.Route) -> list[str]:
        del r.backends[:]
        r.backends.extend(backends)
        return ["backends"]

    _print_route(_call(home, lambda stub: _update(stub, route, change, reason)))


@route_app.command("flip")
def route_flip(
    route: Annotated[str, typer.Argument(help="Route id, e.g. inference.")],
    reason: Reason,
    to: Annotated[str, typer.Option(help="Deployment to send 100% to [default: the backup: the other backend].")] = "",
    home: Home = None,
) -> None:
    """Send all of a route's traffic to one backend (by default the one not taking most of it now)."""

    def change(r: rpb.Route) -> list[str]:
        try:
            r.CopyFrom(flipped(r, _dep_name(to) if to else ""))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--to") from None
        return ["backends"]

    _print_route(_call(home, lambda stub: _update(stub, route, change, reason)))


@route_app.command("lock")
def route_lock(
    route: Annotated[str, typer.Argument(help="Route id, e.g. inference.")],
    to: Annotated[str, typer.Option(help="Deployment to pin the route to.")],
    reason: Reason,
    home: Home = None,
) -> None:
    """Pin a route to one deployment; it refuses other changes until unlocked."""

    def change(r: rpb.Route) -> list[str]:
        r.CopyFrom(locked_to(r, _dep_name(to)))
        return ["backends", "locked"]

    _print_route(_call(home, lambda stub: _update(stub, route, change, reason)))


@route_app.command("unlock")
def route_unlock(
    route: Annotated[str, typer.Argument(help="Route id, e.g. inference.")],
    reason: Reason,
    home: Home = None,
) -> None:
    """Allow changes to a locked route again (its weights stay as they are)."""

    def change(r: rpb.Route) -> list[str]:
        r.locked = False
        return ["locked"]

    _print_route(_call(home, lambda stub: _update(stub, route, change, reason)))


def _upstream_health(admin_port: int) -> str:
    """`d.<deployment>` clusters of one Envoy with healthy/total hosts, from its admin /clusters."""
    try:
        text = httpx.get(f"http://127.0.0.1:{admin_port}/clusters", timeout=2.0).text
    except httpx.HTTPError as exc:
        return f"admin unreachable ({exc.__class__.__name__})"
    hosts: dict[str, list[bool]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0].startswith("d.") and parts[2] == "health_flags":
            hosts.setdefault(parts[0][2:], []).append(parts[3] == "healthy")
    return ", ".join(f"{c} {sum(h)}/{len(h)}" for c, h in sorted(hosts.items())) or "-"


@mesh_app.command("status")
def mesh_status(home: Home = None) -> None:
    """Per Envoy: the configuration version it acked, NACKs, and its upstreams' health."""
    state = _state(home)
    if not state.mesh:
        out.print("the mesh runs with --no-mesh: no Envoys, services talk directly")
        return

    async def run() -> mesh_pb2.ListNodesResponse:
        async with state.channel("control-plane") as channel:
            return await mesh_pb2_grpc.ControlPlaneServiceStub(channel).ListNodes(
                mesh_pb2.ListNodesRequest(), timeout=5
            )

    try:
        nodes = asyncio.run(run()).nodes
    except grpc.aio.AioRpcError as exc:
        err.print(f"error: control plane: {exc.code().name}: {exc.details()}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    table = Table(
        "envoy", "connected", "in sync", "revision", "acked (clusters / listeners / routes)", "NACKs", "upstreams"
    )
    for n in nodes:
        acked = " / ".join(r.acked_version[:8] or "-" for r in n.resources)
        nacks = "; ".join(
            f"{TYPE_NAMES[r.type_url]} x{r.nack_count}"
            + (f": {r.last_nack_message[:80]}" if r.last_nack_message else "")
            for r in n.resources
            if r.nack_count
        )
        node_id = n.name.removeprefix("nodes/")
        port = state.envoys.get(node_id)
        table.add_row(
            escape(node_id),
            "yes" if n.connected else "[red]no[/red]",
            "yes" if n.in_sync else "[yellow]no[/yellow]",
            str(n.registry_revision),
            acked,
            escape(nacks or "0"),
            _upstream_health(port) if port else "-",
        )
    out.print(table)


@mesh_app.command("bench")
def mesh_bench(
    home: Home = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,16,64",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds over all paths and levels.")] = 2,
    unary_requests: Annotated[
        int, typer.Option(help="Unary calls per path, level and round (at least 4x the level).")
    ] = 200,
    stream_requests: Annotated[int, typer.Option(help="Streams per path, level and round (at least the level).")] = 24,
    max_tokens: Annotated[int, typer.Option(help="Tokens per StreamGenerate; the echo streams as many chunks.")] = 4,
    flips: Annotated[int, typer.Option(help="Route flips to time (in pairs, spread over the rounds).")] = 50,
    budget: Annotated[
        float, typer.Option(help="Seconds of measuring after start-up; then what ran is printed, marked partial.")
    ] = 480.0,
) -> None:
    """The mesh's added latency against --no-mesh and a bare Envoy chain, and route flip-to-effect time.

    Starts its own mesh, --no-mesh services and echo chain on free loopback ports (small engine only).

    Prints markdown tables to stdout, stops everything, exits 1 if a target was missed.
    """
    from mesh.bench_mesh import run_mesh_bench

    levels = [int(x) for x in concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or rounds < 1 or flips < 0:
        raise typer.BadParameter("concurrency levels and rounds must be >= 1, flips >= 0")
    try:
        met = asyncio.run(
            run_mesh_bench(
                home or servemesh_home(),
                levels,
                rounds=rounds,
                unary_requests=unary_requests,
                stream_requests=stream_requests,
                max_tokens=max_tokens,
                flips=flips,
                budget_s=budget,
                log=lambda m: err.print(m, markup=False, highlight=False),
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted: everything it started is stopped")
        raise typer.Exit(130) from None
    raise typer.Exit(0 if met else 1)

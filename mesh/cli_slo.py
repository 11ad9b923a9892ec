"""`servemesh slo ...`: the SLOs' status as the controller computes it, and the Prometheus rules."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from servemesh.mesh.v1 import slo_service_pb2 as pb
from servemesh.mesh.v1 import slo_service_pb2_grpc as pb_grpc

from mesh import certs
from mesh.launcher import servemesh_home
from mesh.slo import rules as slo_rules
from mesh.slo.config import ConfigError, format_duration, load_config
from mesh.state import MeshState
from services.common.client import CHANNEL_OPTIONS, insecure_channel

slo_app = typer.Typer(help="Service level objectives: their status, and the Prometheus rules.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

Home = Annotated[
    Path | None, typer.Option(help="Data directory [default: $SERVEMESH_HOME or ~/.local/share/servemesh]")
]
#: the name the controller's certificate is checked against (its identity in the mesh CA)
CONTROLLER_IDENTITY = "controller"
_STATES = {
    pb.SloStatus.STATE_OK: "[green]OK[/green]",
    pb.SloStatus.STATE_WARNING: "[yellow]WARNING[/yellow]",
    pb.SloStatus.STATE_BREACHED: "[bold red]BREACHED[/bold red]",
    pb.SloStatus.STATE_NO_DATA: "[dim]no data[/dim]",
}


def controller_channel(target: str, home: Path | None) -> grpc.aio.Channel:
    """The controller: at `target` in plaintext, else where the running mesh says (mTLS as
    the "cli" identity in mesh mode, checking the server is "controller")."""
    if target:
        return insecure_channel(target)
    state = MeshState.read(home or servemesh_home())
    if state is None:
        err.print("[red]error:[/red] no running mesh found (start one with `servemesh up`, or pass --target HOST:PORT)")
        raise typer.Exit(1)
    address = getattr(state, "controller", "")
    if not address:
        err.print(
            "[red]error:[/red] the running mesh names no controller (its run/mesh.json has no `controller` "
            "address); pass --target HOST:PORT"
        )
        raise typer.Exit(1)
    if not state.mesh:
        return insecure_channel(address)
    ident = certs.identity(Path(state.certs_dir), "cli", state.namespace)
    return grpc.aio.secure_channel(
        address,
        certs.channel_credentials(ident),
        options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", CONTROLLER_IDENTITY)],
    )


def objective_text(slo: pb.Slo) -> str:
    budget = f"{(1 - slo.objective) * 100:.3g}%"
    if slo.kind == pb.Slo.KIND_TTFT:
        return f"p{slo.objective * 100:.3g} TTFT ≤ {slo.threshold.ToNanoseconds() / 1e6:.4g} ms"
    return f"{'5xx' if slo.kind == pb.Slo.KIND_SERVER_ERRORS else 'timeouts'} < {budget}"


def value_text(status: pb.SloStatus) -> str:
    if status.state == pb.SloStatus.STATE_NO_DATA and not status.value:
        return "-"
    if status.slo.kind == pb.Slo.KIND_TTFT:
        return f"{status.value * 1000:.0f} ms"
    return f"{status.value * 100:.2f}%"


def burn_text(burn: pb.BurnRate) -> str:
    """The burn rate, '*' when its window is not full yet; '-' without requests."""
    if not burn.requests:
        return "-"
    text = f"{burn.burn_rate:.2f}" + ("*" if not burn.complete else "")
    return f"[red]{text}[/red]" if burn.burn_rate > 1 else text


def status_table(response: pb.ListSloStatusesResponse) -> Table:
    windows = [format_duration(b.window.ToNanoseconds() / 1e9) for b in response.statuses[0].burn_rates]
    table = Table("SLO", "objective", "5m value", *(f"burn {w}" for w in windows), "state", "runbook")
    for s in response.statuses:
        state = _STATES.get(s.state, "?")
        if s.HasField("breach_start_time"):
            state += f"\nover since {s.breach_start_time.ToDatetime().astimezone().strftime('%H:%M:%S')}"
        table.add_row(
            escape(s.slo.name),
            escape(objective_text(s.slo)),
            value_text(s),
            *(burn_text(b) for b in s.burn_rates),
            state,
            escape(s.slo.runbook),
        )
    return table


@slo_app.command("status")
def status(
    route_class: Annotated[str, typer.Option(help="Only this route class's SLOs.")] = "",
    target: Annotated[
        str, typer.Option(help="Controller address host:port (plaintext) [default: the running mesh's, over mTLS].")
    ] = "",
    home: Home = None,
) -> None:
    """Each SLO: objective, 5-minute value, burn rates over 5m/30m/1h/6h, state and runbook."""

    async def run() -> pb.ListSloStatusesResponse:
        async with controller_channel(target, home) as channel:
            return await pb_grpc.SloServiceStub(channel).ListSloStatuses(
                pb.ListSloStatusesRequest(route_class=route_class), timeout=10
            )

    try:
        response = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        err.print(f"error: controller: {exc.code().name}: {exc.details()}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    if not response.statuses:
        out.print(f"no SLOs{f' for route class {route_class!r}' if route_class else ''}", markup=False)
        return
    out.print(status_table(response))
    if response.HasField("scrape_time"):
        scraped = response.scrape_time.ToDatetime().timestamp()
        when = datetime.fromtimestamp(scraped).astimezone().strftime("%H:%M:%S")
        out.print(f"gateways scraped at {when} ({time.time() - scraped:.0f} s ago); * = window not full yet")
    else:
        out.print("[yellow]the controller has not scraped the gateways yet[/yellow]")


@slo_app.command("rules")
def rules(
    check: Annotated[
        bool, typer.Option(help="Write nothing; exit 1 if the files differ from what the SLOs generate.")
    ] = False,
    print_: Annotated[bool, typer.Option("--print", help="Print the rules to stdout instead of writing.")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder of the rule files.")] = slo_rules.DEFAULT_DIR,
    config: Annotated[Path | None, typer.Option(help="SLO file [default: mesh/slo/slos.yaml].")] = None,
) -> None:
    """Generate the Prometheus rules and their promtool tests from the SLOs (deploy/prometheus/)."""
    try:
        slos = load_config(config)
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if print_:
        print(slo_rules.render_rules(slos), end="")
        return
    if check:
        stale = slo_rules.stale(slos, out_dir)
        for path in stale:
            err.print(
                f"{path} is out of date: run `servemesh slo rules`", markup=False, highlight=False, soft_wrap=True
            )
        raise typer.Exit(1 if stale else 0)
    for path in slo_rules.write(slos, out_dir):
        out.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)

"""`servemesh certs`: the local CA and the mesh identities in <home>/certs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mesh.certs import DEFAULT_IDENTITIES, DEFAULT_NAMESPACE, CertError, Identity, describe, ensure_identities, rotate
from mesh.launcher import servemesh_home

certs_app = typer.Typer(
    help="Mesh identities: a local CA and one SPIFFE certificate per service.",
    invoke_without_command=True,
    add_completion=False,
)
out = Console()
if not out.is_terminal:
    out.width = 140  # whole SPIFFE ids when piped or captured
err = Console(stderr=True)

Home = Annotated[
    Path | None, typer.Option(help="Data directory [default: $SERVEMESH_HOME or ~/.local/share/servemesh]")
]


def certs_dir(home: Path | None) -> Path:
    return (home or servemesh_home()) / "certs"


def _table(idents: list[Identity], title: str) -> Table:
    table = Table(title=title)
    for column in ("identity", "SPIFFE id", "serial", "expires (UTC)", "in"):
        table.add_column(column, no_wrap=True)
    now = dt.datetime.now(dt.UTC)
    for row in describe(idents):
        not_after = row["not_after"]
        assert isinstance(not_after, dt.datetime)
        left = not_after - now
        table.add_row(
            str(row["name"]),
            str(row["spiffe_id"]),
            str(row["serial"])[:16],
            not_after.strftime("%Y-%m-%d %H:%M"),
            f"{left.days} d" if left.days >= 1 else f"{left.total_seconds() / 3600:.1f} h",
        )
    return table


@certs_app.callback()
def certs(
    ctx: typer.Context,
    home: Home = None,
    namespace: Annotated[str, typer.Option(help="SPIFFE namespace of new identities.")] = DEFAULT_NAMESPACE,
) -> None:
    """Create the CA and the default identities if needed (renewing those close to expiry) and list them."""
    ctx.obj = home
    if ctx.invoked_subcommand is not None:
        return
    directory = certs_dir(home)
    try:
        idents = ensure_identities(directory, DEFAULT_IDENTITIES, namespace)
    except CertError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    out.print(_table(list(idents.values()), f"identities in {directory}"))


@certs_app.command("rotate")
def rotate_cmd(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Identities to rotate [default: all].")] = None,
    home: Home = None,
) -> None:
    """Issue a new key and certificate for each identity; running Envoys and servers pick them up."""
    directory = certs_dir(home or ctx.obj)
    try:
        idents = rotate(directory, names or None)
    except CertError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if not idents:
        err.print(f"no identities in {directory}; run `servemesh certs` first")
        raise typer.Exit(1)
    out.print(_table(list(idents.values()), "rotated"))

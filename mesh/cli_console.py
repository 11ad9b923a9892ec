"""`servemesh console user add | list | remove`: who may sign in to the console, and as what.

Users live in <home>/console/users.yaml (0600) as argon2 hashes; the console re-reads the file
when it changes. A password is read from the terminal (asked twice) or from stdin with
--password-stdin, never from the command line, so it stays out of shell history and `ps`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from console.auth import NAME_RE, Role, UsersFileError, list_users, remove_user, set_user
from mesh.cli_route import Home, err, out
from mesh.launcher import servemesh_home

console_app = typer.Typer(help="The operations console (NiceGUI; `servemesh up` starts it).", no_args_is_help=True)
user_app = typer.Typer(help="Console users: viewers look, operators change.", no_args_is_help=True)
console_app.add_typer(user_app, name="user")


def users_path(home: Path | None) -> Path:
    return (home or servemesh_home()) / "console" / "users.yaml"


def _password(stdin: bool) -> str:
    if stdin:
        return sys.stdin.readline().rstrip("\n")
    first = typer.prompt("Password", hide_input=True)
    if typer.prompt("Again", hide_input=True) != first:
        err.print("error: the passwords differ", highlight=False)
        raise typer.Exit(1)
    return str(first)


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help=f"User name ({NAME_RE.pattern}).")],
    role: Annotated[Role, typer.Option(help="viewer: looks; operator: also changes routes, rollouts, indexes.")],
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin (one line).")] = False,
    home: Home = None,
) -> None:
    """Add a console user, or set an existing one's role and password."""
    path = users_path(home)
    try:
        set_user(path, name, role, _password(password_stdin))
    except (ValueError, UsersFileError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    err.print(f"{name} ({role.value}) can sign in to the console; users in {path}", markup=False, highlight=False)


@user_app.command("list")
def user_list(home: Home = None) -> None:
    """Console users and their roles (never their hashes)."""
    try:
        users = list_users(users_path(home))
    except UsersFileError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    table = Table("user", "role")
    for u in users:
        table.add_row(u.name, u.role.value)
    out.print(table)


@user_app.command("remove")
def user_remove(name: Annotated[str, typer.Argument(help="User name.")], home: Home = None) -> None:
    """Remove a console user; their open sessions end at their next click."""
    if not remove_user(users_path(home), name):
        err.print(f"error: no console user {name!r}", markup=False, highlight=False)
        raise typer.Exit(1)
    err.print(f"removed {name}", markup=False, highlight=False)

"""`servemesh tenants ...` and `servemesh keys ...`: tenants and their API keys in the running mesh's registry.

A key's secret is printed once, by `keys create`, to stdout alone (so a script can capture it);
everything else goes to stderr. No other command can show it: the registry keeps only a hash.
"""

from __future__ import annotations

import re
from datetime import UTC, timedelta
from enum import StrEnum
from typing import Annotated

import typer
from google.protobuf import timestamp_pb2
from rich.table import Table
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.cli_route import Home, Reason, _call, err, out

tenants_app = typer.Typer(help="Tenants: who the platform serves; every API key belongs to one.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: how callers authenticate to the gateway.", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+)([smhdw])")
#: a key id inside a pasted secret (sm_<key id>_<random>): revoke takes it without sending the secret
_SECRET_KEY_ID_RE = re.compile(r"sm_([a-z2-7]{16})_.*")
_KEY_ID_RE = re.compile(r"[a-z2-7]{16}")
_TIER_NAMES = {rpb.ApiKey.TIER_FREE: "free", rpb.ApiKey.TIER_PAID: "paid", rpb.ApiKey.TIER_ENTERPRISE: "enterprise"}
_STATES = {rpb.ApiKey.STATE_ACTIVE: "active", rpb.ApiKey.STATE_REVOKED: "revoked", rpb.ApiKey.STATE_EXPIRED: "expired"}
PAGE = 500


class TierChoice(StrEnum):
    free = "free"
    paid = "paid"
    enterprise = "enterprise"


_TIERS = {
    TierChoice.free: rpb.ApiKey.TIER_FREE,
    TierChoice.paid: rpb.ApiKey.TIER_PAID,
    TierChoice.enterprise: rpb.ApiKey.TIER_ENTERPRISE,
}


def parse_duration(text: str) -> timedelta | None:
    """`30d`, `12h`, `1w2d`, `90m`, `3600s` -> timedelta; `never` -> None."""
    text = text.strip().lower()
    if text == "never":
        return None
    if not text or _DURATION_RE.sub("", text):
        raise typer.BadParameter(
            f"{text!r}: expected a number and a unit (s, m, h, d, w), e.g. 30d or 1w2d, or 'never'",
            param_hint="--expires-in",
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION_RE.findall(text))
    return timedelta(seconds=seconds)


def api_key_name(key: str, tenant: str = "") -> str:
    """A key given as `tenants/T/apiKeys/K`, a key id, or a whole (leaked) secret -> the key's name.

    The secret itself is never sent anywhere: only the key id in it is used."""
    if key.startswith("tenants/"):
        return key
    match = _SECRET_KEY_ID_RE.fullmatch(key)
    key_id = match.group(1) if match else key
    if not _KEY_ID_RE.fullmatch(key_id):
        raise typer.BadParameter("expected a key id (16 characters of a-z and 2-7) or tenants/T/apiKeys/K")
    return f"tenants/{tenant or '-'}/apiKeys/{key_id}"


def _tenant_name(tenant: str) -> str:
    return tenant if tenant.startswith("tenants/") else f"tenants/{tenant}"


def _when(ts: timestamp_pb2.Timestamp, present: bool) -> str:
    if not present:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe_key(k: rpb.ApiKey) -> str:
    """One line about a key; it holds no secret (the ApiKey message has none)."""
    classes = ", ".join(k.route_classes) or "every class"
    expires = _when(k.expire_time, k.HasField("expire_time")) or "never"
    return (
        f"{k.name} ({_TIER_NAMES.get(k.tier, '?')}; route classes: {classes}; expires: {expires};"
        f" {_STATES.get(k.state, '?')})"
    )


# --- tenants ---------------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(
    tenant: Annotated[str, typer.Argument(help="Tenant id: 1-63 characters of a-z, 0-9 and '-'.")],
    display_name: Annotated[str, typer.Option(help="Human-readable name.")] = "",
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "created with `servemesh tenants create`",
    home: Home = None,
) -> None:
    """Create a tenant."""
    request = rpb.CreateTenantRequest(
        tenant=rpb.Tenant(name=_tenant_name(tenant), display_name=display_name), reason=reason
    )
    created = _call(home, lambda stub: stub.CreateTenant(request, timeout=10)).tenant
    out.print(f"created {created.name}", markup=False, highlight=False)


@tenants_app.command("list")
def tenants_list(home: Home = None) -> None:
    """Every tenant."""

    async def run(stub: rpb_grpc.RegistryServiceStub) -> list[rpb.Tenant]:
        found: list[rpb.Tenant] = []
        token = ""
        while True:
            page = await stub.ListTenants(rpb.ListTenantsRequest(page_size=PAGE, page_token=token), timeout=10)
            found += page.tenants
            token = page.next_page_token
            if not token:
                return found

    table = Table("tenant", "display name", "created")
    for t in _call(home, run):
        table.add_row(t.name.removeprefix("tenants/"), t.display_name, _when(t.create_time, True))
    out.print(table)


# --- keys ------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    tier: Annotated[TierChoice, typer.Option(help="Service tier of the key's traffic.")],
    route_class: Annotated[
        list[str] | None, typer.Option(help="A route class the key may use; repeat for each.")
    ] = None,
    all_route_classes: Annotated[
        bool, typer.Option("--all-route-classes", help="Let the key use every route class (instead of --route-class).")
    ] = False,
    expires_in: Annotated[str, typer.Option(help="Lifetime, e.g. 30d, 12h, 1w2d, or 'never'.")] = "90d",
    display_name: Annotated[str, typer.Option("--name", help="What the key is for, e.g. 'nightly evals'.")] = "",
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "created with `servemesh keys create`",
    home: Home = None,
) -> None:
    """Create an API key and print its secret, once: it cannot be shown again."""
    classes = list(route_class or [])
    if bool(classes) == all_route_classes:
        raise typer.BadParameter(
            "give --route-class (once per class) or --all-route-classes", param_hint="--route-class"
        )
    ttl = parse_duration(expires_in)
    key = rpb.ApiKey(tier=_TIERS[tier], route_classes=classes, display_name=display_name)
    if ttl is not None:
        key.ttl.FromTimedelta(ttl)
    request = rpb.CreateApiKeyRequest(parent=_tenant_name(tenant), api_key=key, reason=reason)
    created = _call(home, lambda stub: stub.CreateApiKey(request, timeout=10))
    err.print(f"created {describe_key(created.api_key)}", markup=False, highlight=False)
    err.print(
        "[yellow]This is the only time the secret is shown: store it now. The registry keeps only a hash and"
        " cannot show it again; if it is lost, revoke the key and create a new one.[/yellow]"
    )
    print(created.secret, flush=True)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str, typer.Option(help="Only this tenant's keys [default: every tenant's].")] = "",
    home: Home = None,
) -> None:
    """API keys with their tier, route classes and state (never their secrets)."""
    parent = _tenant_name(tenant) if tenant else "tenants/-"

    async def run(stub: rpb_grpc.RegistryServiceStub) -> list[rpb.ApiKey]:
        found: list[rpb.ApiKey] = []
        token = ""
        while True:
            request = rpb.ListApiKeysRequest(parent=parent, page_size=PAGE, page_token=token)
            page = await stub.ListApiKeys(request, timeout=10)
            found += page.api_keys
            token = page.next_page_token
            if not token:
                return found

    table = Table("key id", "tenant", "tier", "route classes", "state", "created", "expires", "revoked", "name")
    for k in _call(home, run):
        table.add_row(
            k.key_id,
            k.name.removeprefix("tenants/").partition("/")[0],
            _TIER_NAMES.get(k.tier, "?"),
            ", ".join(k.route_classes) or "(every class)",
            _STATES.get(k.state, "?"),
            _when(k.create_time, True),
            _when(k.expire_time, k.HasField("expire_time")) or "never",
            _when(k.revoke_time, k.HasField("revoke_time")),
            k.display_name,
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id (as `keys list` shows it), tenants/T/apiKeys/K, or the secret.")],
    reason: Reason,
    tenant: Annotated[str, typer.Option(help="The key's tenant [default: whichever it is].")] = "",
    home: Home = None,
) -> None:
    """Revoke an API key for good; gateways refuse it within seconds (their cache lifetime)."""
    request = rpb.RevokeApiKeyRequest(name=api_key_name(key, tenant), reason=reason)
    revoked = _call(home, lambda stub: stub.RevokeApiKey(request, timeout=10)).api_key
    out.print(f"revoked {describe_key(revoked)}", markup=False, highlight=False)

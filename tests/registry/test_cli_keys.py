"""`servemesh tenants ...` and `servemesh keys ...` against a real registry (the --no-mesh state file).

The CLI runs in a worker thread (it starts its own event loop) while the registry serves on the
test's loop.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import typer
from click.testing import Result
from servemesh.registry.v1 import registry_pb2 as pb
from typer.testing import CliRunner

from mesh.cli import app
from mesh.cli_keys import api_key_name, parse_duration
from mesh.state import MeshState
from services.registry.keys import SECRET_RE, key_id_of

pytestmark = pytest.mark.timeout(60)


async def cli(home, *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, app, [*args, "--home", str(home)], env={"COLUMNS": "250"}, catch_exceptions=False
    )


def test_parse_duration():
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("1w2d") == timedelta(days=9)
    assert parse_duration(" 12H ") == timedelta(hours=12)
    assert parse_duration("90m") == timedelta(minutes=90) and parse_duration("3600s") == timedelta(hours=1)
    assert parse_duration("never") is None
    for bad in ("", "30", "d", "30 days", "1.5d", "-1d", "30d junk"):
        with pytest.raises(typer.BadParameter):
            parse_duration(bad)


def test_api_key_name_takes_an_id_a_name_or_a_pasted_secret():
    key_id = "abcdefgh23456777"
    secret = f"sm_{key_id}_{'x' * 43}"
    assert api_key_name(key_id) == f"tenants/-/apiKeys/{key_id}"
    assert api_key_name(key_id, "acme") == f"tenants/acme/apiKeys/{key_id}"
    assert api_key_name(secret) == f"tenants/-/apiKeys/{key_id}"  # only the public id is used
    assert api_key_name(f"tenants/acme/apiKeys/{key_id}") == f"tenants/acme/apiKeys/{key_id}"
    with pytest.raises(typer.BadParameter):
        api_key_name("not-a-key")


async def test_keys_create_list_revoke(registry, tmp_path):
    home = tmp_path / "home"
    MeshState(mesh=False, gateway="127.0.0.1:1", registry=registry.server.address).write(home)

    made = await cli(home, "tenants", "create", "acme", "--display-name", "Acme Corp")
    assert made.exit_code == 0 and "tenants/acme" in made.stdout
    listed = await cli(home, "tenants", "list")
    assert "acme" in listed.stdout and "Acme Corp" in listed.stdout

    refused = await cli(home, "keys", "create", "--tenant", "acme", "--tier", "paid")
    assert refused.exit_code != 0 and "--all-route-classes" in refused.stderr  # least privilege is explicit

    created = await cli(
        home,
        "keys",
        "create",
        "--tenant",
        "acme",
        "--tier",
        "paid",
        "--route-class",
        "chat_short",
        "--route-class",
        "code",
        "--expires-in",
        "30d",
        "--name",
        "nightly evals",
    )
    assert created.exit_code == 0, created.stderr
    secret = created.stdout.strip()
    assert SECRET_RE.fullmatch(secret)  # stdout is the secret alone, for scripts
    assert "only time the secret is shown" in created.stderr and secret not in created.stderr
    key_id = key_id_of(secret)
    assert key_id is not None

    key = (await registry.stub.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))).api_key
    assert list(key.route_classes) == ["chat_short", "code"] and key.tier == pb.ApiKey.TIER_PAID
    assert key.expire_time.seconds - key.create_time.seconds == 30 * 86400 and key.display_name == "nightly evals"

    for args in (("keys", "list"), ("keys", "list", "--tenant", "acme")):
        listed = await cli(home, *args)
        assert listed.exit_code == 0 and key_id in listed.stdout and "active" in listed.stdout
        assert secret not in listed.stdout + listed.stderr and secret.rsplit("_", 1)[1] not in listed.stdout

    # a leaked secret pasted as is: revoked by its public id
    revoked = await cli(home, "keys", "revoke", secret, "--reason", "leaked in a CI log")
    assert revoked.exit_code == 0 and f"tenants/acme/apiKeys/{key_id}" in revoked.stdout
    assert "revoked" in revoked.stdout and secret not in revoked.stdout
    audit = (await registry.stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource=key.name))).entries
    assert audit[0].reason == "leaked in a CI log"

    again = await cli(home, "keys", "revoke", key_id, "--reason", "twice")
    assert again.exit_code == 1 and "FAILED_PRECONDITION" in again.stderr
    listed = await cli(home, "keys", "list", "--tenant", "acme")
    assert "revoked" in listed.stdout
    missing = await cli(home, "keys", "list", "--tenant", "nobody")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.stderr

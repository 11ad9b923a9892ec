"""Tenants and API keys: the core on its store (SQLite and PostgreSQL), then RegistryService over gRPC.

Hostile cases: the secret is never in the database, the audit log, a log record or any read of a
key; unknown, wrong, malformed, revoked and expired secrets get one and the same answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from servemesh.registry.v1 import registry_pb2 as pb
from sqlalchemy import create_engine, inspect, select, text, update

from services.common.errors import InvalidArgument
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.registry.core import RegistryCore, _Changes
from services.registry.errors import ApiKeyRevoked, InvalidApiKey, ResourceExists, ResourceNotFound
from services.registry.keys import SECRET_LENGTH, SECRET_RE, SecretHasher, key_id_of, new_key_id, new_secret
from services.registry.resources import ApiKey, KeyState, Tenant
from services.registry.servicer import resource_json
from services.registry.settings import RegistrySettings
from services.registry.store import Store, api_keys, upgrade

from .builders import deployment
from .test_server import detail

pytestmark = pytest.mark.timeout(30)

ACTOR = "spiffe://servemesh.local/ns/default/sa/console"


async def onboard(core: RegistryCore, tenant_id: str = "acme") -> Tenant:
    return await core.create_tenant(Tenant(f"tenants/{tenant_id}", "Acme Corp"), reason="onboard", actor=ACTOR)


async def make_key(
    core: RegistryCore,
    tenant_id: str = "acme",
    *,
    tier: str = "paid",
    classes: tuple[str, ...] = ("chat_short",),
    ttl: timedelta | None = timedelta(days=30),
    expire_time: datetime | None = None,
) -> tuple[ApiKey, str]:
    key = ApiKey("", tier, classes, "nightly evals", expire_time=expire_time)
    return await core.create_api_key(f"tenants/{tenant_id}", key, ttl=ttl, reason="for evals", actor=ACTOR)


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


def secret_parts(secret: str) -> list[str]:
    """The secret and its random part, which must appear nowhere but in CreateApiKey's response."""
    return [secret, secret.rsplit("_", 1)[1]]


def database_dump(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [
                repr(row)
                for table in inspect(conn).get_table_names()
                for row in conn.execute(text(f'SELECT * FROM "{table}"'))
            ]
    finally:
        engine.dispose()
    return "\n".join(rows)


def set_expire_time(url: str, key_id: str, when: datetime) -> None:
    """Time passes: the key's expire time is now `when`."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(expire_time=when))
    finally:
        engine.dispose()


# --- secrets -------------------------------------------------------------------------------------


def test_secret_format_and_key_id():
    key_id = new_key_id()
    secret = new_secret(key_id)
    assert re.fullmatch(r"[a-z2-7]{16}", key_id)
    assert SECRET_RE.fullmatch(secret) and len(secret) == SECRET_LENGTH == 63
    assert key_id_of(secret) == key_id
    assert new_secret(key_id) != secret and new_key_id() != key_id
    for bad in ("", "sm_", f"sm_{key_id}", f"sk_{key_id}_{'a' * 43}", f"sm_{key_id.upper()}_{'a' * 43}", secret + "x"):
        assert key_id_of(bad) is None, bad


def test_hash_is_keyed_by_the_pepper_and_compared_whole():
    secret = new_secret(new_key_id())
    plain, peppered = SecretHasher(), SecretHasher(b"p" * 32)
    assert plain.hash(secret) != peppered.hash(secret) != hashlib.sha256(secret.encode()).hexdigest()
    assert peppered.matches(secret, peppered.hash(secret))
    assert not plain.matches(secret, peppered.hash(secret))
    assert not peppered.matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), peppered.hash(secret))
    assert not peppered.matches(secret, None)


# --- migrations ----------------------------------------------------------------------------------


async def test_migration_0002_adds_the_tables_to_a_0001_database_with_data(database_url):
    engine = create_engine(database_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO deployments (id, service, version, endpoint, engine, model_id, create_time)"
                    " VALUES ('inf', 'inference', 'stable', '127.0.0.1:1', '', '', CURRENT_TIMESTAMP)"
                )
            )
        assert "api_keys" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    core = RegistryCore(Store(database_url), resource_json)
    await core.start()
    try:
        assert (await core.get_deployment("deployments/inf")).service == "inference"
        await onboard(core)
        key, secret = await make_key(core)
        assert await core.verify_api_key(secret) == key
    finally:
        await core.close()


# --- tenants -------------------------------------------------------------------------------------


async def test_create_get_list_tenants(core):
    stored = await onboard(core)
    assert stored.create_time is not None and stored.display_name == "Acme Corp"
    assert await core.get_tenant("tenants/acme") == stored
    await onboard(core, "beta")
    await onboard(core, "cyan")
    first = await core.list_tenants(page_size=2)
    assert [t.name for t in first.items] == ["tenants/acme", "tenants/beta"] and first.next_page_token
    rest = await core.list_tenants(page_size=2, page_token=first.next_page_token)
    assert [t.name for t in rest.items] == ["tenants/cyan"] and not rest.next_page_token
    with pytest.raises(ResourceExists, match="tenants/acme already exists"):
        await onboard(core)
    with pytest.raises(ResourceNotFound):
        await core.get_tenant("tenants/nobody")
    with pytest.raises(InvalidArgument) as exc:
        await core.create_tenant(Tenant("tenants/Bad_Id", "x\x07y"), reason="", actor=ACTOR)
    assert fields(exc) == ["tenant.name", "tenant.display_name", "reason"]
    (entry,) = (await core.list_audit_entries(resource="tenants/acme")).items
    assert (entry.actor, entry.reason, entry.before) == (ACTOR, "onboard", None)
    assert entry.after is not None and entry.after["displayName"] == "Acme Corp"


# --- API keys: create, read, list ----------------------------------------------------------------


async def test_create_key_returns_the_secret_once_and_stores_only_its_hash(core, database_url):
    await onboard(core)
    key, secret = await make_key(core, classes=("chat_short", "code"))
    assert key.name == f"tenants/acme/apiKeys/{key.key_id}" and key.tenant == "acme"
    assert key_id_of(secret) == key.key_id
    assert (key.tier, key.route_classes, key.display_name, key.state) == (
        "paid",
        ("chat_short", "code"),
        "nightly evals",
        KeyState.ACTIVE,
    )
    assert key.create_time is not None and key.expire_time == key.create_time + timedelta(days=30)
    assert key.revoke_time is None
    assert await core.get_api_key(key.name) == key
    assert await core.verify_api_key(secret) == key

    dump = database_dump(database_url)
    assert key.key_id in dump and SecretHasher().hash(secret) in dump  # the row is there, as a hash
    for part in secret_parts(secret):
        assert part not in dump
    audit = repr((await core.list_audit_entries()).items)
    assert key.name in audit
    for part in secret_parts(secret):
        assert part not in audit


async def test_key_fields_are_validated(core):
    await onboard(core)
    now = datetime.now(UTC)
    cases = [
        (dict(tier=""), ["api_key.tier"]),
        (dict(tier="gold"), ["api_key.tier"]),
        (dict(classes=("chat_short", "chat_short")), ["api_key.route_classes[1]"]),
        (dict(classes=("Chat Short",)), ["api_key.route_classes[0]"]),
        (dict(classes=tuple(f"c{i}" for i in range(33))), ["api_key.route_classes"]),
        (dict(ttl=timedelta(seconds=59)), ["api_key.ttl"]),
        (dict(ttl=timedelta(days=1827)), ["api_key.ttl"]),
        (dict(ttl=None, expire_time=now - timedelta(seconds=1)), ["api_key.expire_time"]),
        (dict(ttl=timedelta(days=1), expire_time=now + timedelta(days=1)), ["api_key.ttl"]),
    ]
    for kwargs, expected in cases:
        with pytest.raises(InvalidArgument) as exc:
            await make_key(core, **kwargs)
        assert fields(exc) == expected, kwargs
    with pytest.raises(InvalidArgument) as exc:
        await core.create_api_key("acme", ApiKey("", "free"), reason="", actor=ACTOR)
    assert fields(exc) == ["parent", "reason"]
    with pytest.raises(ResourceNotFound, match="tenants/nobody"):
        await make_key(core, "nobody")
    assert (await core.list_api_keys("tenants/-")).items == ()


async def test_keys_without_expiry_or_classes(core):
    await onboard(core)
    key, secret = await make_key(core, classes=(), ttl=None)
    assert key.expire_time is None and key.route_classes == ()
    when = datetime.now(UTC) + timedelta(days=2)
    dated, _ = await make_key(core, ttl=None, expire_time=when)
    assert dated.expire_time == when
    assert (await core.verify_api_key(secret)).route_classes == ()


async def test_get_and_list_keys_across_tenants(core):
    for tenant_id in ("acme", "beta"):
        await onboard(core, tenant_id)
    made = [(await make_key(core, t))[0] for t in ("acme", "beta", "acme", "beta", "beta")]
    expected = sorted(made, key=lambda k: (k.tenant, k.key_id))
    everything = await core.list_api_keys("tenants/-")
    assert list(everything.items) == expected

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await core.list_api_keys("tenants/-", page_size=2, page_token=token)
        pages.append([k.name for k in page.items])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1] and [n for p in pages for n in p] == [k.name for k in expected]

    beta = await core.list_api_keys("tenants/beta")
    assert [k.tenant for k in beta.items] == ["beta"] * 3
    other_query = (await core.list_api_keys("tenants/-", page_size=1)).next_page_token
    with pytest.raises(InvalidArgument, match="page_token"):  # a token belongs to its query
        await core.list_api_keys("tenants/beta", page_token=other_query)
    with pytest.raises(ResourceNotFound):
        await core.list_api_keys("tenants/nobody")

    key = made[0]
    assert await core.get_api_key(f"tenants/-/apiKeys/{key.key_id}") == key
    with pytest.raises(ResourceNotFound):  # another tenant's name for it
        await core.get_api_key(f"tenants/beta/apiKeys/{key.key_id}")
    with pytest.raises(InvalidArgument):
        await core.get_api_key("tenants/acme/apiKeys/NOT-A-KEY")


# --- API keys: revoke and verify -----------------------------------------------------------------


async def test_revoke_is_final_audited_and_refused_twice(core):
    await onboard(core)
    key, secret = await make_key(core)
    with pytest.raises(ResourceNotFound):  # the right id under the wrong tenant
        await core.revoke_api_key(f"tenants/beta/apiKeys/{key.key_id}", reason="x", actor=ACTOR)
    with pytest.raises(InvalidArgument) as exc:
        await core.revoke_api_key(key.name, reason=" ", actor=ACTOR)
    assert fields(exc) == ["reason"]
    revoked = await core.revoke_api_key(f"tenants/-/apiKeys/{key.key_id}", reason="leaked in a log", actor=ACTOR)
    assert revoked.state is KeyState.REVOKED and revoked.revoke_time is not None
    assert replace(revoked, revoke_time=None, state=KeyState.ACTIVE) == key
    assert await core.get_api_key(key.name) == revoked
    with pytest.raises(ApiKeyRevoked, match="revoked already"):
        await core.revoke_api_key(key.name, reason="again", actor=ACTOR)
    with pytest.raises(InvalidApiKey):
        await core.verify_api_key(secret)

    update_entry, create_entry = (await core.list_audit_entries(resource=key.name)).items
    assert (update_entry.action.value, update_entry.reason, update_entry.actor) == ("UPDATE", "leaked in a log", ACTOR)
    assert update_entry.before is not None and update_entry.after is not None
    assert update_entry.before["state"] == "STATE_ACTIVE" and update_entry.after["state"] == "STATE_REVOKED"
    assert "revokeTime" in update_entry.after and create_entry.action.value == "CREATE"
    for part in secret_parts(secret):
        assert part not in repr(update_entry) + repr(create_entry)


async def test_verify_gives_one_answer_for_every_bad_secret(core, database_url):
    await onboard(core)
    good, good_secret = await make_key(core)
    revoked, revoked_secret = await make_key(core)
    await core.revoke_api_key(revoked.name, reason="rotate", actor=ACTOR)
    expired, expired_secret = await make_key(core)
    set_expire_time(database_url, expired.key_id, datetime.now(UTC) - timedelta(seconds=1))
    random_part = good_secret.rsplit("_", 1)[1]
    wrong = good_secret[:-1] + ("A" if good_secret[-1] != "A" else "B")
    bad = {
        "unknown key id": new_secret(new_key_id()),
        "right key id, wrong secret": wrong,
        "another key's random part": f"sm_{revoked.key_id}_{random_part}",
        "malformed": "sm_nope",
        "too long": good_secret + "x" * 300,
        "revoked": revoked_secret,
        "expired": expired_secret,
    }
    messages = set()
    for why, secret in bad.items():
        with pytest.raises(InvalidApiKey) as exc:
            await core.verify_api_key(secret)
        messages.add(exc.value.message)
        assert secret not in exc.value.message and not exc.value.metadata, why
    assert messages == {"no active API key has this secret"}
    assert (await core.get_api_key(expired.name)).state is KeyState.EXPIRED
    with pytest.raises(InvalidArgument, match="secret"):
        await core.verify_api_key("")
    assert await core.verify_api_key(good_secret) == good


async def test_a_different_pepper_verifies_nothing(database_url):
    first = RegistryCore(Store(database_url), resource_json, hasher=SecretHasher(b"a" * 32))
    await first.start()
    try:
        await onboard(first)
        _, secret = await make_key(first)
        assert (await first.verify_api_key(secret)).tenant == "acme"
    finally:
        await first.close()
    second = RegistryCore(Store(database_url), resource_json, hasher=SecretHasher(b"b" * 32))
    await second.start()
    try:
        with pytest.raises(InvalidApiKey):
            await second.verify_api_key(secret)
    finally:
        await second.close()


# --- revisions and followers ---------------------------------------------------------------------


async def test_key_changes_are_numbered_but_do_not_wake_route_followers(core):
    watch = core.watch()
    first = await anext(watch)
    nxt = asyncio.ensure_future(anext(watch))  # a follower waiting for the next routing state
    await onboard(core)
    key, _ = await make_key(core)
    await core.revoke_api_key(key.name, reason="x", actor=ACTOR)
    assert core.revision == first.revision + 3
    await core.create_deployment(deployment("inf"), reason="x", actor=ACTOR)
    # woken by the deployment, not before: its first message is that revision's
    assert (await nxt).revision == core.revision == first.revision + 4
    revisions = [e.revision for e in (await core.list_audit_entries()).items]
    assert revisions == list(range(core.revision, first.revision, -1))  # one entry per revision
    await watch.aclose()


async def test_advancing_the_revision_wakes_no_one_publishing_does():
    changes = _Changes(0)
    waiter = asyncio.ensure_future(changes.wait_past(0))
    await asyncio.sleep(0)
    changes.advance(1)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiter.done() and changes.revision == 1
    changes.publish(2)
    await asyncio.wait_for(waiter, 5)


# --- over gRPC ---------------------------------------------------------------------------------


async def test_tenants_and_keys_over_grpc_never_show_the_secret_again(make_registry, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    registry = await make_registry(api_key_pepper="pepper-" + "x" * 20)
    stub = registry.stub
    user = (("x-servemesh-user", "alice"),)
    tenant = await stub.CreateTenant(
        pb.CreateTenantRequest(tenant=pb.Tenant(name="tenants/acme", display_name="Acme"), reason="onboard"),
        metadata=user,
    )
    assert tenant.tenant.create_time.seconds > 0
    assert (await stub.GetTenant(pb.GetTenantRequest(name="tenants/acme"))).tenant == tenant.tenant
    assert [t.name for t in (await stub.ListTenants(pb.ListTenantsRequest())).tenants] == ["tenants/acme"]

    request = pb.CreateApiKeyRequest(
        parent="tenants/acme",
        api_key=pb.ApiKey(tier=pb.ApiKey.TIER_ENTERPRISE, route_classes=["chat_short"], display_name="evals"),
        reason="for evals",
    )
    request.api_key.ttl.FromTimedelta(timedelta(days=7))
    created = await stub.CreateApiKey(request, metadata=user)
    key, secret = created.api_key, created.secret
    assert SECRET_RE.fullmatch(secret) and key_id_of(secret) == key.key_id
    assert key.secret_prefix == f"sm_{key.key_id}_" and secret.startswith(key.secret_prefix)
    assert key.tier == pb.ApiKey.TIER_ENTERPRISE and key.state == pb.ApiKey.STATE_ACTIVE
    assert key.expire_time.seconds - key.create_time.seconds == 7 * 86400

    verified = (await stub.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))).api_key
    assert verified == key
    revoked = (
        await stub.RevokeApiKey(
            pb.RevokeApiKeyRequest(name=f"tenants/-/apiKeys/{key.key_id}", reason="rotate"), metadata=user
        )
    ).api_key
    assert revoked.state == pb.ApiKey.STATE_REVOKED and revoked.HasField("revoke_time")

    reads = [
        await stub.GetApiKey(pb.GetApiKeyRequest(name=key.name)),
        await stub.ListApiKeys(pb.ListApiKeysRequest(parent="tenants/acme")),
        await stub.ListApiKeys(pb.ListApiKeysRequest(parent="tenants/-")),
        audit := await stub.ListAuditEntries(pb.ListAuditEntriesRequest()),
    ]
    assert [e.resource for e in audit.entries] == [key.name, key.name, "tenants/acme"]
    assert all(e.actor.startswith("anonymous (") and e.actor.endswith(") as alice") for e in audit.entries)
    assert [e.reason for e in audit.entries] == ["rotate", "for evals", "onboard"]
    for message in reads:
        serialized = message.SerializeToString() + json_format.MessageToJson(message).encode()
        for part in secret_parts(secret):
            assert part.encode() not in serialized

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    revoked_answer = err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.VerifyApiKey(pb.VerifyApiKeyRequest(secret=new_secret(key.key_id)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == revoked_answer
    assert detail(err.value, error_details_pb2.ErrorInfo).reason == "INVALID_API_KEY"

    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "VerifyApiKey" in logged  # the access log saw the calls...
    for part in secret_parts(secret):
        assert part not in logged  # ...and never the secret
    dump = database_dump(f"sqlite+pysqlite:///{tmp_path / 'registry.db'}")
    assert key.key_id in dump
    for part in secret_parts(secret):
        assert part not in dump


async def test_grpc_errors_name_the_field_or_resource(registry):
    stub = registry.stub
    await stub.CreateTenant(pb.CreateTenantRequest(tenant=pb.Tenant(name="tenants/acme"), reason="x"))
    cases = [
        (pb.CreateApiKeyRequest(parent="tenants/acme", api_key=pb.ApiKey(), reason="x"), "INVALID_ARGUMENT"),
        (pb.CreateApiKeyRequest(parent="tenants/nobody", api_key=pb.ApiKey(tier=1), reason="x"), "NOT_FOUND"),
        (pb.CreateTenantRequest(tenant=pb.Tenant(name="tenants/acme"), reason="x"), "ALREADY_EXISTS"),
    ]
    for request, code in cases:
        method = stub.CreateApiKey if isinstance(request, pb.CreateApiKeyRequest) else stub.CreateTenant
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request)
        assert err.value.code().name == code
    bad = await _error(stub.CreateApiKey(cases[0][0]))
    assert [v.field for v in detail(bad, error_details_pb2.BadRequest).field_violations] == ["api_key.tier"]

    past = pb.ApiKey(tier=pb.ApiKey.TIER_FREE)
    past.expire_time.FromDatetime(datetime(2020, 1, 1, tzinfo=UTC))
    bad = await _error(stub.CreateApiKey(pb.CreateApiKeyRequest(parent="tenants/acme", api_key=past, reason="x")))
    assert [v.field for v in detail(bad, error_details_pb2.BadRequest).field_violations] == ["api_key.expire_time"]

    key = (
        await stub.CreateApiKey(
            pb.CreateApiKeyRequest(parent="tenants/acme", api_key=pb.ApiKey(tier=pb.ApiKey.TIER_FREE), reason="x")
        )
    ).api_key
    assert not key.HasField("expire_time") and list(key.route_classes) == []
    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name, reason="x"))
    again = await _error(stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name, reason="x")))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    empty = await _error(stub.VerifyApiKey(pb.VerifyApiKeyRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_the_key_row_holds_its_tenant_and_a_hex_hash(core, database_url):
    await onboard(core)
    await onboard(core, "beta")
    await make_key(core)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            ((tenant_id, secret_hash),) = conn.execute(select(api_keys.c.tenant_id, api_keys.c.secret_hash)).all()
    finally:
        engine.dispose()
    assert tenant_id == "acme" and re.fullmatch(r"[0-9a-f]{64}", secret_hash)
    assert (await core.list_api_keys("tenants/beta")).items == ()


# --- settings ------------------------------------------------------------------------------------


def test_the_pepper_comes_from_the_environment_and_is_never_shown():
    pepper = "pepper-from-a-secret-store"
    config = service_config_dir("registry")
    environ = {"APP_ENV": "prod", "SERVEMESH_REGISTRY_API_KEY_PEPPER": pepper}
    settings = load_settings(RegistrySettings, config_dir=config, environ=environ)
    assert settings.pepper() == pepper.encode() and pepper not in repr(settings)
    assert RegistrySettings().pepper() == b""
    with pytest.raises(SettingsError) as err:
        load_settings(RegistrySettings, config_dir=config, environ={"SERVEMESH_REGISTRY_API_KEY_PEPPER": "too-short"})
    assert "api_key_pepper" in str(err.value) and "too-short" not in str(err.value)

"""The Authenticate policy and the registry-backed key verifier, against a real registry server.

Hostile cases: no header or metadata can choose the tenant; missing, unknown, malformed, revoked
and expired keys are refused (one message for all but "missing"); the failure hook hears of every
refusal; a revocation takes effect once the cache entry is stale; the secret never reaches a log.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest
from pydantic import ValidationError
from servemesh.registry.v1 import registry_pb2 as pb
from sqlalchemy import create_engine, update

from services.common.errors import PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from services.common.generation import Sampling
from services.gateway import auth
from services.gateway.auth import (
    INVALID_KEY,
    MISSING_KEY,
    UNUSABLE_CREDENTIALS,
    AuthConfig,
    Authenticate,
    KeyVerifier,
    RegistryKeyVerifier,
    bearer_credentials,
)
from services.gateway.core import GatewayRequest, Principal
from services.registry import keys as registry_keys
from services.registry.store import api_keys
from tests.engine_fixtures import free_port
from tests.registry.conftest import make_registry, registry  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(30)

DEFAULT_CLASS = "chat_short"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Failures:
    """The on_failure hook: records the addresses it was called with."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    async def __call__(self, address: str) -> None:
        self.addresses.append(address)


def gateway_request(credentials: str = "", route_class: str = "", **extra) -> GatewayRequest:
    return GatewayRequest(
        request_id="r1",
        route_class=route_class,
        prompt="hi",
        messages=(),
        sampling=Sampling(),
        credentials=credentials,
        client_address="203.0.113.7",
        **extra,
    )


async def create_key(
    stub, tenant: str = "acme", *, classes: tuple[str, ...] = ("chat_short",), tier=pb.ApiKey.TIER_PAID, ttl_days=30
) -> tuple[pb.ApiKey, str]:
    try:
        await stub.CreateTenant(pb.CreateTenantRequest(tenant=pb.Tenant(name=f"tenants/{tenant}"), reason="onboard"))
    except grpc.aio.AioRpcError as exc:  # the tenant exists from an earlier key
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
    key = pb.ApiKey(tier=tier, route_classes=list(classes))
    key.ttl.FromTimedelta(timedelta(days=ttl_days))
    created = await stub.CreateApiKey(pb.CreateApiKeyRequest(parent=f"tenants/{tenant}", api_key=key, reason="test"))
    return created.api_key, created.secret


async def revoke(stub, key: pb.ApiKey) -> None:
    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name, reason="test"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(registry, clock) -> RegistryKeyVerifier:  # noqa: F811 - the fixture imported above
    return RegistryKeyVerifier(registry.channel, cache_ttl_s=5.0, negative_cache_ttl_s=30.0, clock=clock)


@pytest.fixture
def failures() -> Failures:
    return Failures()


@pytest.fixture
def policy(verifier, failures) -> Authenticate:
    return Authenticate(verifier, DEFAULT_CLASS, on_failure=failures)


# --- the policy ----------------------------------------------------------------------------------


async def test_a_valid_key_sets_the_principal_and_the_credentials_are_cleared(registry, policy, failures):  # noqa: F811
    key, secret = await create_key(registry.stub, classes=("chat_short", "code"))
    request = gateway_request(secret, route_class="code")
    await policy.admit(request)
    assert request.principal == Principal("acme", key.key_id, "paid", frozenset({"chat_short", "code"}))
    assert request.credentials == "" and failures.addresses == []
    assert secret not in repr(request)


async def test_missing_key_is_unauthenticated_and_reported(policy, failures):
    request = gateway_request("")
    with pytest.raises(Unauthenticated) as exc:
        await policy.admit(request)
    assert exc.value.message == MISSING_KEY and request.principal is None
    assert failures.addresses == ["203.0.113.7"]


async def test_unknown_malformed_revoked_and_expired_keys_get_one_answer(registry, policy, failures, tmp_path):  # noqa: F811
    stub = registry.stub
    _, good_secret = await create_key(stub)
    revoked, revoked_secret = await create_key(stub)
    await revoke(stub, revoked)
    expired, expired_secret = await create_key(stub)
    engine = create_engine(f"sqlite+pysqlite:///{tmp_path / 'registry.db'}")  # time passes: the key expires
    with engine.begin() as conn:
        past = datetime.now(UTC) - timedelta(seconds=1)
        conn.execute(update(api_keys).where(api_keys.c.id == expired.key_id).values(expire_time=past))
    engine.dispose()
    wrong = good_secret[:-1] + ("A" if good_secret[-1] != "A" else "B")
    presented = {
        "unknown": registry_keys.new_secret(registry_keys.new_key_id()),
        "right key id, wrong secret": wrong,
        "malformed": "sm_123",
        "not a key at all": "hunter2",
        "unusable header": UNUSABLE_CREDENTIALS,
        "revoked": revoked_secret,
        "expired": expired_secret,
    }
    for why, secret in presented.items():
        request = gateway_request(secret)
        with pytest.raises(Unauthenticated) as exc:
            await policy.admit(request)
        assert exc.value.message == INVALID_KEY, why
        assert request.principal is None and request.credentials == ""
        assert secret not in str(exc.value) + repr(exc.value.metadata)
    assert failures.addresses == ["203.0.113.7"] * len(presented)
    await policy.admit(gateway_request(good_secret))  # the good one still works


async def test_route_class_not_allowed_is_permission_denied(registry, policy, failures):  # noqa: F811
    _, code_only = await create_key(registry.stub, classes=("code",))
    for route_class in ("chat_short", "", "rag_long"):  # "" will resolve to the default: chat_short
        request = gateway_request(code_only, route_class=route_class)
        with pytest.raises(PermissionDenied) as exc:
            await policy.admit(request)
        assert repr(route_class or DEFAULT_CLASS) in exc.value.message and "code" in exc.value.message
        assert request.principal is not None and request.principal.tenant == "acme"  # authenticated, not allowed
    assert len(failures.addresses) == 3

    _, chat = await create_key(registry.stub, classes=("chat_short",))
    request = gateway_request(chat, route_class="")  # the default class is allowed
    await policy.admit(request)
    assert request.principal is not None and request.principal.route_classes == {"chat_short"}

    _, anything = await create_key(registry.stub, classes=())
    request = gateway_request(anything, route_class="rag_long")  # empty list: every class
    await policy.admit(request)
    assert request.principal is not None and request.principal.route_classes == frozenset()
    assert len(failures.addresses) == 3


async def test_a_failure_hook_that_raises_wins(verifier):
    async def limited(address: str) -> None:
        raise ResourceExhausted(f"too many failed attempts from {address}", retry_after=30)

    with pytest.raises(ResourceExhausted, match="203.0.113.7"):
        await Authenticate(verifier, DEFAULT_CLASS, on_failure=limited).admit(gateway_request("sm_guess"))


# --- spoofing --------------------------------------------------------------------------------------


async def test_no_header_or_metadata_can_choose_the_tenant(registry, policy):  # noqa: F811
    _, acme_secret = await create_key(registry.stub, "acme")
    victim_key, victim_secret = await create_key(registry.stub, "victim", tier=pb.ApiKey.TIER_ENTERPRISE)
    metadata = [
        ("x-tenant", "victim"),
        ("x-servemesh-tenant", "victim"),
        ("x-tenant-id", "victim"),
        ("x-api-key", victim_secret),
        ("x-forwarded-user", "victim"),
        ("x-servemesh-user", "victim"),
        ("authorization", f"Bearer {acme_secret}"),
        ("tenant", "victim"),
    ]
    spoofed = Principal("victim", victim_key.key_id, "enterprise", frozenset())
    request = gateway_request(
        bearer_credentials(metadata), forward=tuple(metadata), principal=spoofed, notes={"tenant": "victim"}
    )
    await policy.admit(request)
    assert request.principal is not None
    assert (request.principal.tenant, request.principal.tier) == ("acme", "paid")

    # a principal someone set before authentication never survives it
    request = gateway_request("", principal=spoofed, forward=tuple(metadata))
    with pytest.raises(Unauthenticated):
        await policy.admit(request)
    assert request.principal is None


async def test_two_authorization_entries_are_refused_not_picked_from(registry, policy):  # noqa: F811
    _, acme_secret = await create_key(registry.stub, "acme")
    _, victim_secret = await create_key(registry.stub, "victim")
    metadata = [("authorization", f"Bearer {acme_secret}"), ("authorization", f"Bearer {victim_secret}")]
    assert bearer_credentials(metadata) == UNUSABLE_CREDENTIALS
    with pytest.raises(Unauthenticated, match=INVALID_KEY):
        await policy.admit(gateway_request(bearer_credentials(metadata)))


def test_bearer_credentials_reads_only_the_authorization_entry():
    secret = registry_keys.new_secret(registry_keys.new_key_id())
    assert bearer_credentials(None) == "" and bearer_credentials([("x-api-key", secret)]) == ""
    assert bearer_credentials([("authorization", f"Bearer {secret}")]) == secret
    assert bearer_credentials([("Authorization", f"bearer  {secret} ")]) == secret
    assert bearer_credentials([("authorization", f"Bearer {secret}".encode())]) == secret
    for bad in (f"Basic {secret}", "Bearer", "Bearer ", secret, "Bearer " + "a" * 300):
        assert bearer_credentials([("authorization", bad)]) == UNUSABLE_CREDENTIALS, bad


# --- the verifier's cache ----------------------------------------------------------------------------


async def test_revocation_takes_effect_when_the_cached_answer_goes_stale(registry, verifier, clock):  # noqa: F811
    key, secret = await create_key(registry.stub)
    assert (await verifier.verify(secret)).key_id == key.key_id
    assert (await verifier.verify(secret)).key_id == key.key_id
    assert verifier.lookups == 1  # the second came from the cache
    await revoke(registry.stub, key)
    clock.now += 4.9
    assert await verifier.verify(secret) is not None  # still cached: at most cache_ttl_s of grace
    assert verifier.lookups == 1
    clock.now += 0.1
    assert await verifier.verify(secret) is None  # stale: the registry says revoked
    assert verifier.lookups == 2
    assert await verifier.verify(secret) is None and verifier.lookups == 2  # refusals are cached too
    clock.now += 30
    assert await verifier.verify(secret) is None and verifier.lookups == 3


async def test_a_cached_key_is_not_served_past_its_expire_time(registry, clock):  # noqa: F811
    key, secret = await create_key(registry.stub)
    expires = key.expire_time.ToDatetime(tzinfo=UTC)
    verifier = RegistryKeyVerifier(
        registry.channel, cache_ttl_s=5.0, clock=clock, wall_clock=lambda: expires - timedelta(seconds=1)
    )
    assert await verifier.verify(secret) is not None and verifier.lookups == 1
    clock.now += 0.5
    await verifier.verify(secret)
    assert verifier.lookups == 1
    clock.now += 0.5  # one second later the key expires: the entry is stale although cache_ttl_s is 5
    await verifier.verify(secret)
    assert verifier.lookups == 2


async def test_malformed_secrets_never_reach_the_registry(verifier):
    for secret in ("", "hunter2", "sm_x", "sm_" + "a" * 16 + "_" + "b" * 44, "x" * 10_000, UNUSABLE_CREDENTIALS):
        assert await verifier.verify(secret) is None
    assert verifier.lookups == 0


async def test_concurrent_checks_of_one_secret_share_one_call(registry, verifier):  # noqa: F811
    _, secret = await create_key(registry.stub)
    unknown = registry_keys.new_secret(registry_keys.new_key_id())
    results = await asyncio.gather(*(verifier.verify(s) for s in [secret] * 8 + [unknown] * 8))
    assert [r is not None for r in results] == [True] * 8 + [False] * 8
    assert verifier.lookups == 2


async def test_guessing_cannot_evict_valid_keys(registry, clock):  # noqa: F811
    verifier = RegistryKeyVerifier(registry.channel, cache_max_entries=2, negative_cache_max_entries=3, clock=clock)
    _, secret = await create_key(registry.stub)
    await verifier.verify(secret)
    for _ in range(10):
        assert await verifier.verify(registry_keys.new_secret(registry_keys.new_key_id())) is None
    assert verifier.cached == (1, 3)
    lookups = verifier.lookups
    assert await verifier.verify(secret) is not None and verifier.lookups == lookups


async def test_registry_unreachable_is_unavailable_not_a_refusal(failures, caplog):
    caplog.set_level(logging.DEBUG)
    config = AuthConfig(enabled=True, registry_target=f"127.0.0.1:{free_port()}", verify_timeout_s=5)
    verifier = RegistryKeyVerifier.from_config(config)
    secret = registry_keys.new_secret(registry_keys.new_key_id())
    try:
        with pytest.raises(Unavailable):
            await Authenticate(verifier, DEFAULT_CLASS, on_failure=failures).admit(gateway_request(secret))
        assert failures.addresses == []  # not the caller's failure
        assert verifier.cached == (0, 0)  # and nothing is remembered
    finally:
        await verifier.close()
    assert "could not verify" in caplog.text and secret not in caplog.text


async def test_from_config_reaches_the_registry_and_nothing_logs_the_secret(registry, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    key, secret = await create_key(registry.stub)
    verifier = RegistryKeyVerifier.from_config(AuthConfig(enabled=True, registry_target=registry.server.address))
    try:
        policy = Authenticate(verifier, DEFAULT_CLASS)
        request = gateway_request(secret)
        await policy.admit(request)
        assert request.principal is not None and request.principal.key_id == key.key_id
        await revoke(registry.stub, key)
        with pytest.raises(Unauthenticated):  # cache_ttl_s 0: every check asks the registry
            await Authenticate(RegistryKeyVerifier(registry.channel, cache_ttl_s=0), DEFAULT_CLASS).admit(
                gateway_request(secret)
            )
    finally:
        await verifier.close()
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "VerifyApiKey" in logged
    for part in (secret, secret.rsplit("_", 1)[1]):
        assert part not in logged


# --- contracts between the pieces ------------------------------------------------------------------


def test_the_gateway_accepts_exactly_the_registrys_secret_format():
    assert auth.SECRET_RE.pattern == registry_keys.SECRET_RE.pattern
    secret = registry_keys.new_secret(registry_keys.new_key_id())
    assert auth.SECRET_RE.fullmatch(secret) and registry_keys.SECRET_RE.fullmatch(secret)
    assert auth.MAX_CREDENTIALS == registry_keys.MAX_PRESENTED_SECRET


def test_auth_config_is_strict_and_frozen():
    config = AuthConfig()
    assert not config.enabled and config.cache_ttl_s == 5.0
    with pytest.raises(ValidationError):
        AuthConfig(cache_ttl=5)  # a typo is an error, not a silent default
    with pytest.raises(ValidationError):
        AuthConfig(cache_ttl_s=-1)
    with pytest.raises(ValidationError):
        config.enabled = True  # type: ignore[misc]


def test_key_verifier_is_abstract():
    with pytest.raises(TypeError):
        KeyVerifier()  # type: ignore[abstract]

"""Authentication: the API key a caller presents -> the principal its request is served as.

The caller sends `authorization: Bearer <secret>` (gRPC metadata, or the HTTP header the
edge turns into metadata); the servicer puts the token in `GatewayRequest.credentials`
(`bearer_credentials` below) and nothing else about the caller's claims. `Authenticate`,
the first policy of the pipeline, resolves the secret through a `KeyVerifier` and sets
`request.principal` (tenant, key id, tier, route classes) from what the registry holds
for the key. The tenant therefore always comes from the key: no header, metadata field
or request field can choose or change it.

Answers: no key -> UNAUTHENTICATED ("missing API key"); a key that is malformed,
unknown, revoked or expired -> UNAUTHENTICATED with one message for all four, so a
guesser learns nothing; a valid key used for a route class it does not allow ->
PERMISSION_DENIED. Every failure is reported to `on_failure` with the caller's address
(the rate limiter uses it to slow down key guessing, by raising ResourceExhausted from it).

`RegistryKeyVerifier` asks the registry (VerifyApiKey) and caches answers, positive and
negative, in two bounded LRU maps (guesses cannot evict valid keys), so the gateway does
not call the registry per request: a revoked key stops working within `cache_ttl_s`, an
expired one at its expire time. Well-formedness is checked locally first, so garbage never
costs a registry call. The cache is keyed by SHA-256 of the secret, not the secret.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import grpc.aio
from pydantic import BaseModel, ConfigDict, Field
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from services.common import context
from services.common.client import insecure_channel
from services.common.errors import PermissionDenied, Unauthenticated, Unavailable
from services.gateway.core import GatewayRequest, Policy, Principal

_log = logging.getLogger(__name__)

#: the registry's secret format (services.registry.keys.SECRET_RE; a test keeps the two equal)
SECRET_RE = re.compile(r"sm_([a-z2-7]{16})_([A-Za-z0-9_-]{43})")
#: longer tokens are refused without looking at them further
MAX_CREDENTIALS = 256
#: what bearer_credentials returns for an authorization header it cannot use: presented, never valid
UNUSABLE_CREDENTIALS = "<unusable authorization>"
MISSING_KEY = "missing API key: send it as `authorization: Bearer <key>`"
INVALID_KEY = "invalid API key"

OnFailure = Callable[[str], Awaitable[None]]


class AuthConfig(BaseModel):
    """API key authentication of every request (GatewaySettings.auth)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: off: requests are served without a principal (local development only)
    enabled: bool = False
    #: host:port of the registry (in the mesh: the sidecar's outbound listener)
    registry_target: str = "127.0.0.1:50052"
    #: :authority of calls to the registry; the sidecar picks the service's routes by it ("" = target)
    registry_authority: str = ""
    #: deadline of one VerifyApiKey call, in seconds (the request's own deadline, when shorter, wins)
    verify_timeout_s: float = Field(1.0, gt=0, le=30)
    #: how long a valid key's answer is reused, in seconds: a revocation takes effect within this
    cache_ttl_s: float = Field(5.0, ge=0, le=300)
    #: how long a refused secret's answer is reused, in seconds
    negative_cache_ttl_s: float = Field(30.0, ge=0, le=3600)
    #: valid keys kept (least recently used are dropped first)
    cache_max_entries: int = Field(10_000, ge=1, le=1_000_000)
    #: refused secrets kept, apart from valid keys, so that guessing cannot evict those
    negative_cache_max_entries: int = Field(10_000, ge=1, le=1_000_000)


def bearer_credentials(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the one `authorization: Bearer <token>` entry: "" when there is none,
    UNUSABLE_CREDENTIALS (refused as an invalid key) when there are several or it is not a
    bearer token. Reads nothing else: no other header can say who the caller is."""
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        return ""
    if len(values) > 1:
        return UNUSABLE_CREDENTIALS
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_CREDENTIALS:
        return UNUSABLE_CREDENTIALS
    return token


class KeyVerifier(abc.ABC):
    """Resolves a presented secret to the principal of its key."""

    @abc.abstractmethod
    async def verify(self, secret: str) -> Principal | None:
        """The principal of the active key with this secret; None when there is no such key
        (malformed, unknown, revoked or expired: the caller cannot tell which). Raises a
        ServiceError (e.g. Unavailable) when it cannot tell at all."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class Authenticate(Policy):
    """Sets request.principal from the API key in request.credentials, then clears those.

    `default_route_class` is what an empty request.route_class will resolve to
    (RouteClassDefaults runs later): the key must allow that class. Against key guessing,
    `before` is awaited with request.client_address before a presented key is verified (it
    raises, e.g. ResourceExhausted, while the address is locked out) and `on_failure` after
    a presented key turned out unknown, revoked or expired; it may raise instead."""

    name = "authenticate"

    def __init__(
        self,
        verifier: KeyVerifier,
        default_route_class: str,
        on_failure: OnFailure | None = None,
        before: OnFailure | None = None,
    ) -> None:
        self._verifier = verifier
        self._default = default_route_class
        self._on_failure = on_failure
        self._before = before

    async def _refuse(self, request: GatewayRequest) -> None:
        if self._on_failure is not None:
            await self._on_failure(request.client_address)

    async def admit(self, request: GatewayRequest) -> None:
        # Taken out first: whatever happens below, no later policy, log or error sees it.
        secret, request.credentials = request.credentials, ""
        request.principal = None
        if not secret:
            await self._refuse(request)
            raise Unauthenticated(MISSING_KEY)
        if self._before is not None:
            await self._before(request.client_address)
        principal = await self._verifier.verify(secret)
        if principal is None:
            await self._refuse(request)
            raise Unauthenticated(INVALID_KEY)
        # Authenticated: who it is stands even if what it asks for is refused (the access log
        # then names the tenant of a refused request too).
        request.principal = principal
        context.annotate(key_id=principal.key_id)
        route_class = request.route_class or self._default
        if principal.route_classes and route_class not in principal.route_classes:
            await self._refuse(request)
            raise PermissionDenied(
                f"this API key may not use route class {route_class!r}; it may use "
                f"{', '.join(sorted(principal.route_classes))}",
                metadata={"route_class": route_class, "key_id": principal.key_id},
            )


# --- the registry-backed verifier -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal | None
    #: clock() value after which the answer is stale
    until: float


class _Lru:
    """At most `max_entries` answers; the least recently used go first."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.until <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


_TIERS = {rpb.ApiKey.TIER_FREE: "free", rpb.ApiKey.TIER_PAID: "paid", rpb.ApiKey.TIER_ENTERPRISE: "enterprise"}


def principal_from_key(key: rpb.ApiKey) -> Principal | None:
    """The principal of an active key as the registry returns it; None if the answer is not one."""
    tenant, sep, key_id = key.name.removeprefix("tenants/").partition("/apiKeys/")
    if not key.name.startswith("tenants/") or not sep or not tenant or not key_id:
        return None
    if key.state != rpb.ApiKey.STATE_ACTIVE or key.tier not in _TIERS:
        return None
    return Principal(tenant=tenant, key_id=key_id, tier=_TIERS[key.tier], route_classes=frozenset(key.route_classes))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RegistryKeyVerifier(KeyVerifier):
    """VerifyApiKey on the registry, with the caches described in the module docstring.

    Concurrent checks of one secret share one registry call. A registry that cannot answer
    (anything but OK or NOT_FOUND) makes verify raise Unavailable, and nothing is cached.
    `clock` (monotonic seconds) and `wall_clock` (for expire times) are for tests."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        cache_ttl_s: float = 5.0,
        negative_cache_ttl_s: float = 30.0,
        cache_max_entries: int = 10_000,
        negative_cache_max_entries: int = 10_000,
        verify_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
        owns_channel: bool = False,
    ) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = rpb_grpc.RegistryServiceStub(channel)
        self._ttl = cache_ttl_s
        self._negative_ttl = negative_cache_ttl_s
        self._positive = _Lru(cache_max_entries)
        self._negative = _Lru(negative_cache_max_entries)
        self._timeout = verify_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._inflight: dict[bytes, asyncio.Future[Principal | None]] = {}
        #: VerifyApiKey calls made (cache misses that reached the registry)
        self.lookups = 0

    @classmethod
    def from_config(cls, config: AuthConfig) -> RegistryKeyVerifier:
        """A verifier with its own channel to config.registry_target (closed by close())."""
        options = [("grpc.default_authority", config.registry_authority)] if config.registry_authority else []
        return cls(
            insecure_channel(config.registry_target, options=options),
            cache_ttl_s=config.cache_ttl_s,
            negative_cache_ttl_s=config.negative_cache_ttl_s,
            cache_max_entries=config.cache_max_entries,
            negative_cache_max_entries=config.negative_cache_max_entries,
            verify_timeout_s=config.verify_timeout_s,
            owns_channel=True,
        )

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    @property
    def cached(self) -> tuple[int, int]:
        """(valid keys, refused secrets) held in the caches."""
        return len(self._positive), len(self._negative)

    async def verify(self, secret: str) -> Principal | None:
        if len(secret) > MAX_CREDENTIALS or not SECRET_RE.fullmatch(secret):
            return None
        key = hashlib.sha256(secret.encode()).digest()
        now = self._clock()
        for cache in (self._positive, self._negative):
            entry = cache.get(key, now)
            if entry is not None:
                return entry.principal
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key, secret))
            self._inflight[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        # shielded: a caller that goes away does not cancel the answer others are waiting for
        return await asyncio.shield(pending)

    def _settled(self, key: bytes, done: asyncio.Future[Principal | None]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved here too, in case every waiter went away

    async def _fetch(self, key: bytes, secret: str) -> Principal | None:
        self.lookups += 1
        try:
            resp = await self._stub.VerifyApiKey(rpb.VerifyApiKeyRequest(secret=secret), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                if self._negative_ttl > 0:
                    self._negative.put(key, _Entry(None, self._clock() + self._negative_ttl))
                return None
            _log.warning("registry could not verify an API key: %s: %s", exc.code().name, exc.details())
            raise Unavailable("cannot check API keys right now; retry", retry_after=1.0) from None
        principal = principal_from_key(resp.api_key)
        if principal is None:
            _log.warning("registry answered VerifyApiKey with a key that is not active: %s", resp.api_key.name)
            return None
        ttl = self._ttl
        if resp.api_key.HasField("expire_time"):
            left = (resp.api_key.expire_time.ToDatetime(tzinfo=UTC) - self._wall_clock()).total_seconds()
            ttl = min(ttl, left)  # never served from the cache past its expire time
        if ttl > 0:
            self._positive.put(key, _Entry(principal, self._clock() + ttl))
        return principal

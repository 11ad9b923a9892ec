"""The rate-limit policy of the gateway pipeline, the key-guessing throttle, their metrics,
and what happens when the shared store fails."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from services.common.errors import QuotaViolation, ResourceExhausted, Unavailable
from services.common.generation import Chunk
from services.gateway.core import GatewayRequest, Policy, Principal
from services.gateway.limits.base import (
    Check,
    Decision,
    Lease,
    Limit,
    LimitsConfig,
    LimitStore,
    Rate,
    Slots,
    StoreUnavailable,
)
from services.gateway.limits.memory import MemoryStore
from services.gateway.limits.redis_store import RedisStore

log = logging.getLogger(__name__)


class LimitMetrics:
    """Refusals by limit (a fixed set) and failed store calls by operation; never ids or addresses."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejections = Counter(
            "servemesh_gateway_limit_rejections_total",
            "Requests refused with RESOURCE_EXHAUSTED, by the limit they hit (one request may hit several).",
            ["limit"],
            registry=registry,
        )
        self.store_errors = Counter(
            "servemesh_gateway_limit_store_errors_total",
            "Calls to the shared limit store (Redis) that failed, by operation; the failure mode then applied.",
            ["operation"],
            registry=registry,
        )
        for limit in Limit:
            self.rejections.labels(limit.value)
        for operation in ("acquire", "charge", "release"):
            self.store_errors.labels(operation)

    def rejected(self, limit: Limit) -> None:
        self.rejections.labels(limit.value).inc()

    def store_error(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()


class FailoverStore(LimitStore):
    """The shared store, and what to do when it fails: "local" answers from an in-process
    store on this replica (limits hold per replica), "open" admits, "closed" refuses with
    UNAVAILABLE. After a failure the shared store is skipped for `retry_s`, so a dead Redis
    costs one timeout per `retry_s`, not one per request. Releases always try the shared store
    (a slot taken there before the failure would otherwise stay held until its lease expires)."""

    def __init__(
        self,
        shared: LimitStore,
        *,
        mode: Literal["local", "open", "closed"],
        retry_s: float,
        lease_ttl_s: float,
        on_error: Callable[[str], None] = lambda _operation: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.local = MemoryStore(lease_ttl_s=lease_ttl_s, clock=clock)
        self._mode = mode
        self._retry_s = retry_s
        self._on_error = on_error
        self._clock = clock
        self._down_until = float("-inf")

    def _up(self) -> bool:
        return self._clock() >= self._down_until

    def _failed(self, operation: str, exc: Exception) -> None:
        if self._up():
            log.warning("limit store failed; %s limits for %.1f s: %s", self._mode, self._retry_s, exc)
        self._down_until = self._clock() + self._retry_s
        self._on_error(operation)

    async def acquire(self, checks: Sequence[Check], slots: Slots | None) -> Decision:
        if self._up():
            try:
                return await self.shared.acquire(checks, slots)
            except StoreUnavailable as exc:
                self._failed("acquire", exc)
        if self._mode == "closed":
            raise Unavailable("rate limits are unavailable", retry_after=self._retry_s)
        if self._mode == "open":
            return Decision(True, tuple(0.0 for _ in checks))
        decision = await self.local.acquire(checks, slots)
        if decision.lease is not None:
            return decision._replace(lease=decision.lease._replace(local=True))
        return decision

    async def charge(self, rate: Rate, amount: int, lease: Lease | None = None) -> None:
        if (lease is None or not lease.local) and self._up():
            try:
                return await self.shared.charge(rate, amount, lease)
            except StoreUnavailable as exc:
                self._failed("charge", exc)
        if self._mode == "local":
            await self.local.charge(rate, amount, lease)

    async def release(self, lease: Lease) -> None:
        if lease.local:
            return await self.local.release(lease)
        try:
            await self.shared.release(lease)
        except StoreUnavailable as exc:
            self._failed("release", exc)

    async def close(self) -> None:
        await self.shared.close()


def open_store(config: LimitsConfig, metrics: LimitMetrics | None = None) -> LimitStore:
    """The store the settings choose: in-process, or Redis behind the configured failure mode.
    Close it at shutdown (`await store.close()`)."""
    if config.redis_url is None:
        return MemoryStore(lease_ttl_s=config.lease_ttl_s)
    shared = RedisStore.connect(
        config.redis_url,
        key_prefix=config.key_prefix,
        lease_ttl_s=config.lease_ttl_s,
        timeout_s=config.redis_timeout_s,
        max_connections=config.redis_max_connections,
    )
    return FailoverStore(
        shared,
        mode=config.on_redis_error,
        retry_s=config.redis_retry_s,
        lease_ttl_s=config.lease_ttl_s,
        on_error=metrics.store_error if metrics is not None else lambda _operation: None,
    )


_PLAIN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@functools.lru_cache(maxsize=65_536)
def address_key(address: str, ipv6_prefix_length: int = 64) -> str:
    """The bucket id of a client address: the canonical IP, an IPv6 address's network of the
    given prefix length, a short plain name ("unix") as is, anything else a hash of it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if _PLAIN.match(address):
            return address
        return "h:" + hashlib.sha256(address.encode()).hexdigest()[:32]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6 and ipv6_prefix_length < 128:
        return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix_length}", strict=False))
    return str(ip)


def _rpm(n: int) -> str:
    return f"{n} requests per minute"


class RateLimit(Policy):
    """Requests per minute per API key and per client address, a token budget per tenant, and
    a concurrency cap per key, checked and reserved together (all or nothing) before dispatch.
    A request without a principal gets only the per-address limit.

    The stream's completion tokens are charged to the tenant as chunks arrive (one per non-empty
    chunk, in batches of `token_flush_tokens`), then set right by the usage on the final chunk;
    a spent budget refuses the tenant's next request, not the stream under way. The concurrency
    slot is given back when the stream ends in any way: final chunk, error, cancellation, or
    aclose() of the wrapped stream even if it never started. If a policy after this one refuses
    the request, the pipeline should call `release(request)` (the slot's lease expires anyway)."""

    name = "rate_limit"

    def __init__(
        self,
        config: LimitsConfig,
        store: LimitStore,
        metrics: LimitMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._clock = clock
        #: id(request) -> (its lease, when admitted), from admit to wrap, oldest first
        self._leases: dict[int, tuple[Lease, float]] = {}

    def _tokens(self, principal: Principal) -> Rate:
        return Rate("tpm:tenant:" + principal.tenant, self._config.tier(principal.tier).tokens_per_minute)

    async def admit(self, request: GatewayRequest) -> None:
        if not self._config.enabled:
            return
        if self._leases:
            # A lease still filed under this id is a dead request's that never reached wrap (a
            # later policy refused it; the id is free again): give its slot back, never hand it on.
            await self.release(request)
        cfg = self._config
        checks: list[Check] = []
        address = ""
        if request.client_address:
            address = address_key(request.client_address, cfg.ipv6_prefix_length)
            checks.append(Check(Rate("rpm:addr:" + address, cfg.address_requests_per_minute)))
        slots = None
        principal = request.principal
        if principal is not None:
            tier = cfg.tier(principal.tier)
            checks.append(Check(Rate("rpm:key:" + principal.key_id, tier.requests_per_minute)))
            checks.append(Check(self._tokens(principal), 1, False))
            slots = Slots("conc:key:" + principal.key_id, tier.concurrent_requests)
        if not checks:
            return
        decision = await self._store.acquire(checks, slots)
        if not decision.admitted:
            raise self._refusal(request.principal, address, decision)
        if decision.lease is not None:
            self._hold(request, decision.lease)

    def _refusal(self, principal: Principal | None, address: str, decision: Decision) -> ResourceExhausted:
        cfg = self._config
        limits: list[tuple[Limit, str, str]] = []  # in the order of the checks
        if address:
            limits.append((Limit.ADDRESS_REQUESTS, f"client:{address}", _rpm(cfg.address_requests_per_minute)))
        if principal is not None:
            tier = cfg.tier(principal.tier)
            limits.append((Limit.KEY_REQUESTS, f"key:{principal.key_id}", _rpm(tier.requests_per_minute)))
            limits.append(
                (Limit.TENANT_TOKENS, f"tenant:{principal.tenant}", f"{tier.tokens_per_minute} tokens per minute")
            )
        violations, waits = [], []
        for (limit, subject, description), wait in zip(limits, decision.waits, strict=True):
            if wait > 0:
                violations.append(QuotaViolation(subject, description))
                waits.append(wait)
                self._count(limit)
        if decision.slots_full and principal is not None:
            tier = cfg.tier(principal.tier)
            violations.append(
                QuotaViolation(f"key:{principal.key_id}", f"{tier.concurrent_requests} concurrent requests")
            )
            waits.append(cfg.concurrency_retry_after_s)
            self._count(Limit.KEY_CONCURRENCY)
        return ResourceExhausted(
            "rate limit exceeded: " + "; ".join(f"{v.subject}: {v.description}" for v in violations),
            violations=violations,
            retry_after=max(waits),
        )

    def _hold(self, request: GatewayRequest, lease: Lease) -> None:
        # A request that a later policy refused never reaches wrap: forget it once its lease
        # has expired in the store anyway, so this map stays bounded without `release`.
        now = self._clock()
        while self._leases:
            oldest = next(iter(self._leases))
            if self._leases[oldest][1] + self._config.lease_ttl_s > now:
                break
            del self._leases[oldest]
        self._leases[id(request)] = (lease, now)

    def pending(self) -> int:
        """Leases taken by admit and not yet handed to wrap."""
        return len(self._leases)

    def _take(self, request: GatewayRequest) -> Lease | None:
        held = self._leases.pop(id(request), None)
        return held[0] if held is not None else None

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        lease = self._take(request)
        if request.principal is None or not self._config.enabled:
            return stream
        return _Metered(
            stream, self._store, lease, self._tokens(request.principal), self._config.token_flush_tokens,
            self._config.count_prompt_tokens,
        )  # fmt: skip

    async def abandon(self, request: GatewayRequest) -> None:
        await self.release(request)

    async def release(self, request: GatewayRequest) -> None:
        """Give back the slot `admit` took for a request that will not be streamed (a later
        policy refused it). A no-op once `wrap` has taken the slot over. Without this call the
        slot is freed when its lease expires or when the request's id() is reused."""
        lease = self._take(request)
        if lease is not None:
            await self._store.release(lease)

    def _count(self, limit: Limit) -> None:
        if self._metrics is not None:
            self._metrics.rejected(limit)


class _Metered:
    """The wrapped stream: charges tokens as they stream and gives the slot back at the end.
    A class rather than an async generator so that aclose() releases the slot even when the
    stream was never iterated (a generator that never started skips its finally)."""

    def __init__(
        self,
        stream: AsyncIterator[Chunk],
        store: LimitStore,
        lease: Lease | None,
        tokens: Rate,
        flush_every: int,
        count_prompt: bool,
    ) -> None:
        self._stream = stream
        self._store = store
        self._lease = lease
        self._tokens = tokens
        self._flush_every = flush_every
        self._count_prompt = count_prompt
        #: completion tokens counted so far, and how many of them are not charged yet
        self._counted = 0
        self._pending = 0
        self._done = False

    def __aiter__(self) -> _Metered:
        return self

    async def __anext__(self) -> Chunk:
        try:
            chunk = await self._stream.__anext__()
        except BaseException:  # the end, an error or a cancellation: charge what streamed, free the slot
            await self._finish()
            raise
        if chunk.text:
            self._counted += 1
            self._pending += 1
        if chunk.usage is not None:  # the final chunk: its usage is the truth
            self._pending += chunk.usage.completion_tokens - self._counted
            self._counted = chunk.usage.completion_tokens
            if self._count_prompt:
                self._pending += chunk.usage.prompt_tokens
            await self._finish()
        elif self._pending >= self._flush_every:
            await self._flush()
        return chunk

    async def _flush(self) -> None:
        amount, self._pending = self._pending, 0
        if amount:
            try:
                await self._store.charge(self._tokens, amount, self._lease)
            except StoreUnavailable as exc:  # a bare shared store; FailoverStore never raises here
                log.warning("could not charge %d tokens: %s", amount, exc)

    async def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        await self._flush()
        if self._lease is not None:
            try:
                await self._store.release(self._lease)
            except StoreUnavailable as exc:  # the lease expires in the store
                log.warning("could not release a concurrency slot: %s", exc)

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._finish()


class AuthThrottle:
    """Limits failed authentication attempts per client address, against key guessing.

    The authentication policy calls `check(address)` before it verifies a presented key (it
    raises ResourceExhausted while the address has used up its failures), and `failed(address)`
    after a presented key turned out unknown, revoked or expired. The first
    `auth_failures_per_minute` failures get UNAUTHENTICATED as usual; every attempt after that,
    with a valid key or not, is refused until a failure has drained (Retry-After says when).
    Successful attempts cost nothing."""

    def __init__(self, config: LimitsConfig, store: LimitStore, metrics: LimitMetrics | None = None) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics

    def _rate(self, address: str) -> Rate:
        key = address_key(address, self._config.ipv6_prefix_length)
        return Rate(f"authfail:addr:{key}", self._config.auth_failures_per_minute)

    async def check(self, address: str) -> None:
        if not address or not self._config.enabled:
            return
        rate = self._rate(address)
        decision = await self._store.acquire([Check(rate, 1, reserve=False)], None)
        if not decision.admitted:
            if self._metrics is not None:
                self._metrics.rejected(Limit.AUTH_FAILURES)
            n = self._config.auth_failures_per_minute
            raise ResourceExhausted(
                f"too many failed authentication attempts from this address ({n} per minute)",
                violations=[QuotaViolation(f"client:{rate.key.split(':', 2)[2]}", f"{n} failed attempts per minute")],
                retry_after=decision.waits[0],
            )

    async def failed(self, address: str) -> None:
        if address and self._config.enabled:
            await self._store.charge(self._rate(address), 1)

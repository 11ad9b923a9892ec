"""Rate limits, token quotas and concurrency caps: in-process on a fake clock (exact edges and
Retry-After), and on a real redis-server shared by two gateway replicas."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.common.errors import ResourceExhausted, Unavailable
from services.common.generation import Chunk, FinishReason, Message, Role, Sampling, Usage
from services.gateway.core import GatewayRequest, Pipeline, Policy, Principal, Safety
from services.gateway.limits import (
    AuthThrottle,
    FailoverStore,
    LimitMetrics,
    LimitsConfig,
    MemoryStore,
    RateLimit,
    RedisStore,
    TierLimits,
    address_key,
    open_store,
)
from services.gateway.settings import SafetyConfig
from tests.gateway.conftest import RedisServer

ADDR = "203.0.113.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(address_rpm: int = 10_000, **tier: int) -> LimitsConfig:
    limits = {"requests_per_minute": 10_000, "tokens_per_minute": 1_000_000, "concurrent_requests": 10_000} | tier
    big = TierLimits(requests_per_minute=50_000, tokens_per_minute=10_000_000, concurrent_requests=50_000)
    return LimitsConfig(
        tiers={"free": TierLimits(**limits), "paid": big},
        address_requests_per_minute=address_rpm,
        token_flush_tokens=1,
        auth_failures_per_minute=3,
    )


def _principal(key: str = "k_1", tenant: str = "t_1", tier: str = "free") -> Principal:
    return Principal(tenant=tenant, key_id=key, tier=tier)


def _req(principal: Principal | None = None, address: str = ADDR, prompt: str = "hi") -> GatewayRequest:
    return GatewayRequest(
        request_id="r",
        route_class="chat_short",
        prompt=None,
        messages=(Message(Role.USER, prompt),),
        sampling=Sampling(),
        client_address=address,
        principal=principal,
    )


class Backend:
    """`n` one-token chunks, then the final chunk with `usage` (default: n completion tokens)."""

    def __init__(self, n: int = 3, usage: Usage | None = None, fail_after: int | None = None, text: str = "x") -> None:
        self.n, self.usage, self.fail_after, self.text = n, usage, fail_after, text
        self.started = self.closed = False

    async def stream(self, request: GatewayRequest | None = None) -> AsyncIterator[Chunk]:
        self.started = True
        try:
            for i in range(self.n):
                if i == self.fail_after:
                    raise RuntimeError("engine died")
                yield Chunk(self.text)
            yield Chunk("", FinishReason.STOP, self.usage or Usage(2, self.n))
        finally:
            self.closed = True


async def _admit(policy: RateLimit, req: GatewayRequest) -> AsyncIterator[Chunk]:
    await policy.admit(req)
    return policy.wrap(req, Backend().stream(req))


async def _refusal(policy: RateLimit, req: GatewayRequest) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as exc:
        await policy.admit(req)
    return exc.value


def _memory(config: LimitsConfig, registry: CollectorRegistry | None = None) -> tuple[RateLimit, Clock]:
    clock = Clock()
    metrics = LimitMetrics(registry) if registry is not None else None
    store = MemoryStore(lease_ttl_s=config.lease_ttl_s, clock=clock)
    return RateLimit(config, store, metrics, clock=clock), clock


def _rejections(registry: CollectorRegistry, limit: str) -> float:
    return registry.get_sample_value("servemesh_gateway_limit_rejections_total", {"limit": limit}) or 0.0


# --- settings --------------------------------------------------------------------------------


def test_settings_name_bad_values() -> None:
    with pytest.raises(ValidationError, match="requests_per_minute"):
        TierLimits(requests_per_minute=0, tokens_per_minute=10, concurrent_requests=1)
    with pytest.raises(ValidationError, match="concurrent_requests"):
        LimitsConfig(tiers={"free": {"requests_per_minute": 1, "tokens_per_minute": 1, "concurrent_requests": -1}})
    with pytest.raises(ValidationError, match="rpm"):
        LimitsConfig(rpm=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="default_tier: 'gold' is not one of"):
        LimitsConfig(default_tier="gold")
    with pytest.raises(ValidationError, match="redis_url"):
        LimitsConfig(redis_url="http://127.0.0.1:6379")
    with pytest.raises(ValidationError, match="key_prefix"):
        LimitsConfig(key_prefix="a{b}")
    config = LimitsConfig()
    assert config.tier("enterprise").requests_per_minute > config.tier("paid").requests_per_minute
    assert config.tier("paid").tokens_per_minute > config.tier("free").tokens_per_minute == 20_000
    assert config.tier("no-such-tier") == config.tier("free")  # an unknown tier gets the default tier's limits
    with pytest.raises(ValidationError):
        config.enabled = False  # type: ignore[misc]


# --- in-process: exact edges and Retry-After ----------------------------------------------------


async def test_key_budget_holds_at_its_exact_edge_and_retry_after_is_when_it_admits_again() -> None:
    registry = CollectorRegistry()
    policy, clock = _memory(_config(requests_per_minute=3), registry)
    for _ in range(3):  # the Nth request at a limit of N is admitted...
        await policy.admit(_req(_principal()))
    refused = await _refusal(policy, _req(_principal()))  # ...and the N+1th refused
    assert [(v.subject, v.description) for v in refused.violations] == [("key:k_1", "3 requests per minute")]
    assert refused.retry_after == pytest.approx(20.0)  # one slot drains in 60 s / 3
    assert _rejections(registry, "key_requests") == 1
    clock.now += 20.0 - 1e-3
    await _refusal(policy, _req(_principal()))
    clock.now += 1e-3
    await policy.admit(_req(_principal()))
    await _refusal(policy, _req(_principal()))
    await policy.admit(_req(_principal("k_2")))  # another key has its own budget


async def test_a_refused_request_costs_nothing_so_limits_are_all_or_nothing() -> None:
    policy, _clock = _memory(_config(requests_per_minute=2, concurrent_requests=1))
    first = await _admit(policy, _req(_principal()))
    refused = await _refusal(policy, _req(_principal()))  # the cap refuses; the key's rpm is not charged
    assert [v.description for v in refused.violations] == ["1 concurrent requests"]
    assert refused.retry_after == 1.0
    await first.aclose()
    await _admit(policy, _req(_principal()))  # the 2nd request of the minute: admitted
    refused = await _refusal(policy, _req(_principal()))
    assert {v.description for v in refused.violations} == {"2 requests per minute", "1 concurrent requests"}
    assert refused.retry_after == pytest.approx(30.0)  # the longest wait of the limits hit


async def test_a_caller_without_principal_gets_only_the_address_limit() -> None:
    registry = CollectorRegistry()
    policy, _clock = _memory(_config(address_rpm=4, requests_per_minute=1), registry)
    for _ in range(4):
        await policy.admit(_req(None))
    refused = await _refusal(policy, _req(None))
    assert [(v.subject, v.description) for v in refused.violations] == [(f"client:{ADDR}", "4 requests per minute")]
    assert refused.retry_after == pytest.approx(15.0)
    refused = await _refusal(policy, _req(_principal()))  # the address is spent for keys too
    assert [v.subject for v in refused.violations] == [f"client:{ADDR}"]
    await policy.admit(_req(_principal(), address="198.51.100.1"))
    assert _rejections(registry, "address_requests") == 2 and _rejections(registry, "key_requests") == 0
    # one IPv6 host holds a /64: its addresses share a budget
    for i in range(4):
        await policy.admit(_req(None, address=f"2001:db8:1:2::{i + 1}"))
    await _refusal(policy, _req(None, address="2001:db8:1:2:ffff::9"))
    await policy.admit(_req(None, address="2001:db8:1:3::1"))


async def test_disabled_limits_admit_everything() -> None:
    config = _config(address_rpm=1, requests_per_minute=1, concurrent_requests=1).model_copy(update={"enabled": False})
    store = MemoryStore()
    policy, throttle = RateLimit(config, store), AuthThrottle(config, store)
    for _ in range(3):
        req = _req(_principal())
        await policy.admit(req)
        stream = Backend().stream(req)
        assert policy.wrap(req, stream) is stream
        await throttle.check(ADDR)
        await throttle.failed(ADDR)
    assert store.size() == 0


def test_address_keys_are_canonical_and_bounded() -> None:
    assert address_key("2001:DB8:0:0:1::1") == "2001:db8::/64"
    assert address_key("2001:db8::1", 128) == "2001:db8::1"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("unix") == "unix"
    odd = address_key("x" * 500 + " {weird}")
    assert re.fullmatch(r"h:[0-9a-f]{32}", odd)


async def test_tier_picks_the_limits() -> None:
    policy, _clock = _memory(_config(requests_per_minute=1))
    await policy.admit(_req(_principal("k_paid", tier="paid")))
    await policy.admit(_req(_principal("k_paid", tier="paid")))
    await policy.admit(_req(_principal("k_odd", tier="platinum")))  # unknown tier: the default tier's limits
    await _refusal(policy, _req(_principal("k_odd", tier="platinum")))


# --- tokens ------------------------------------------------------------------------------------


async def test_tokens_count_as_they_stream_and_refuse_the_next_request_mid_stream() -> None:
    registry = CollectorRegistry()
    policy, clock = _memory(_config(tokens_per_minute=10), registry)
    req = _req(_principal("k_a"))
    await policy.admit(req)
    stream = policy.wrap(req, Backend(n=30).stream(req))
    for _ in range(9):
        await anext(stream)
    other = await _admit(policy, _req(_principal("k_b")))  # 9 of 10 tokens used: one left, admitted
    await other.aclose()
    await anext(stream)  # the 10th token: the budget is spent while the stream is still open
    refused = await _refusal(policy, _req(_principal("k_b")))
    assert [(v.subject, v.description) for v in refused.violations] == [("tenant:t_1", "10 tokens per minute")]
    assert refused.retry_after == pytest.approx(6.0)  # one token drains in 60 s / 10
    rest = [c async for c in stream]  # the stream under way is not cut off
    assert len(rest) == 21 and rest[-1].usage is not None
    # 30 tokens against 10 a minute: in debt until 21 have drained (2.1 minutes)
    clock.now += 126.0 - 1e-3
    assert (await _refusal(policy, _req(_principal("k_b")))).retry_after == pytest.approx(1e-3, abs=1e-6)
    clock.now += 1e-3
    await policy.admit(_req(_principal("k_b")))
    assert _rejections(registry, "tenant_tokens") == 2
    await _admit(policy, _req(_principal("k_c", tenant="t_2")))  # another tenant has its own budget


@pytest.mark.parametrize(
    ("chunks", "usage", "count_prompt", "charged"),
    [
        (3, Usage(5, 12), False, 12),  # the final usage raises the estimate...
        (6, Usage(5, 2), False, 2),  # ...or lowers it
        (3, Usage(5, 3), True, 8),  # prompt tokens count when configured
    ],
)
async def test_the_final_usage_sets_the_token_count_right(
    chunks: int, usage: Usage, count_prompt: bool, charged: int
) -> None:
    config = _config(tokens_per_minute=60).model_copy(update={"count_prompt_tokens": count_prompt})
    policy, _clock = _memory(config)
    req = _req(_principal())
    await policy.admit(req)
    assert len([c async for c in policy.wrap(req, Backend(chunks, usage).stream())]) == chunks + 1
    # `charged` tokens used of 60: admitted while one token is left, exactly
    for _ in range(60 - charged):
        req = _req(_principal())
        await policy.admit(req)
        [c async for c in policy.wrap(req, Backend(1, Usage(0, 1)).stream())]
    refused = await _refusal(policy, _req(_principal()))
    assert refused.retry_after == pytest.approx(1.0)


async def test_tokens_are_charged_in_batches_of_the_flush_size() -> None:
    config = _config(tokens_per_minute=8).model_copy(update={"token_flush_tokens": 4})
    policy, _clock = _memory(config)
    req = _req(_principal("k_a"))
    await policy.admit(req)
    stream = policy.wrap(req, Backend(n=20).stream())
    for _ in range(7):
        await anext(stream)
    await _admit(policy, _req(_principal("k_b")))  # 4 of the 7 charged so far
    await anext(stream)
    await _refusal(policy, _req(_principal("k_b")))  # the 8th token flushed the second batch
    await stream.aclose()


# --- concurrency -------------------------------------------------------------------------------


async def test_the_concurrency_slot_is_released_however_the_stream_ends() -> None:
    registry = CollectorRegistry()
    policy, _clock = _memory(_config(concurrent_requests=1), registry)

    async def hold() -> tuple[GatewayRequest, Backend]:
        req, backend = _req(_principal()), Backend(n=5, fail_after=2)
        await policy.admit(req)
        refused = await _refusal(policy, _req(_principal()))
        assert refused.violations[0].subject == "key:k_1" and refused.retry_after == 1.0
        return req, backend

    # the final chunk; the engine's stream still runs to its own end
    req, _ = await hold()
    backend = Backend(n=2)
    assert len([c async for c in policy.wrap(req, backend.stream())]) == 3
    assert backend.closed
    # an exception from the engine
    req, backend = await hold()
    with pytest.raises(RuntimeError, match="engine died"):
        [c async for c in policy.wrap(req, backend.stream())]
    # aclose() after some chunks, which also closes the engine's stream
    req, backend = await hold()
    stream = policy.wrap(req, backend.stream())
    await anext(stream)
    await stream.aclose()
    assert backend.closed
    # aclose() of a stream that never started (an outer policy answered by itself)
    req, backend = await hold()
    await policy.wrap(req, backend.stream()).aclose()
    assert not backend.started
    # cancellation of the task reading the stream
    req, _ = await hold()
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[Chunk]:
        yield Chunk("x")
        gate.set()
        await asyncio.sleep(3600)
        yield Chunk("never")

    stream = policy.wrap(req, slow())

    async def read() -> None:
        async for _chunk in stream:
            pass

    task = asyncio.create_task(read())
    await gate.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # a later policy refused the request: the pipeline gives the slot back through release()
    req, _ = await hold()
    await policy.release(req)
    await policy.admit(_req(_principal()))
    assert _rejections(registry, "key_concurrency") == 6


async def test_a_stale_lease_under_a_reused_request_id_is_released_not_handed_on() -> None:
    policy, _clock = _memory(_config(concurrent_requests=1))
    req = _req(_principal())
    await policy.admit(req)  # ...and a later policy refuses it: wrap never comes
    req.principal = None  # a new request that happens to have the same id(), and takes no slot
    await policy.admit(req)
    backend = Backend()
    stream = backend.stream(req)
    assert policy.wrap(req, stream) is stream  # nothing to meter, no stale lease picked up
    await policy.admit(_req(_principal()))  # the abandoned slot was given back


async def test_in_the_pipeline_a_refusal_by_safety_still_frees_the_slot() -> None:
    policy, _clock = _memory(_config(concurrent_requests=1))
    safety = Safety(SafetyConfig().rules(), "REFUSED.", lambda _topic: None)

    class Authenticated(Policy):
        name = "auth"

        async def admit(self, request: GatewayRequest) -> None:
            request.principal = _principal()

    backend = Backend()
    pipeline = Pipeline([Authenticated(), policy, safety], backend)
    assert [c.text async for c in pipeline.stream(_req(prompt="how do I build a bomb"))] == ["REFUSED."]
    assert not backend.started
    assert [c.text async for c in pipeline.stream(_req(prompt="hello"))] == ["x", "x", "x", ""]


async def test_concurrent_admissions_on_one_event_loop_respect_the_cap() -> None:
    policy, _clock = _memory(_config(concurrent_requests=5, requests_per_minute=100))

    streaming: list[GatewayRequest] = []  # admitted and still streaming (not dropped)

    async def one() -> bool:
        req = _req(_principal())
        try:
            await policy.admit(req)
        except ResourceExhausted:
            return False
        streaming.append(req)
        await asyncio.sleep(0)
        return True

    results = await asyncio.gather(*(one() for _ in range(50)))
    assert sum(results) == 5 == len(streaming)


async def test_idle_keys_do_not_pile_up_in_memory() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, lease_ttl_s=30)
    policy = RateLimit(_config().model_copy(update={"lease_ttl_s": 30.0}), store, clock=clock)
    never_wrapped = [_req(_principal(f"k_{i}"), address=f"198.51.100.{i}") for i in range(200)]
    for req in never_wrapped:
        await policy.admit(req)
    assert store.size() == 600  # per request: the address and key buckets, the key's leases
    clock.now += 61
    await policy.admit(_req(_principal("k_new"), address="192.0.2.1"))
    assert store.size() == 3  # drained buckets and expired (never released) leases are gone
    assert policy.pending() == 1  # so are the policy's notes of leases that never reached wrap


# --- key guessing ------------------------------------------------------------------------------


async def test_failed_authentication_attempts_are_limited_per_address() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    config = _config()
    throttle = AuthThrottle(config, MemoryStore(clock=clock), LimitMetrics(registry))
    for _ in range(3):  # three wrong keys: each gets UNAUTHENTICATED from the auth policy
        await throttle.check(ADDR)
        await throttle.failed(ADDR)
    with pytest.raises(ResourceExhausted) as exc:  # the fourth attempt is not even verified
        await throttle.check(ADDR)
    assert [(v.subject, v.description) for v in exc.value.violations] == [
        (f"client:{ADDR}", "3 failed attempts per minute")
    ]
    assert exc.value.retry_after == pytest.approx(20.0)
    await throttle.check("198.51.100.1")
    clock.now += 20.0
    await throttle.check(ADDR)
    assert _rejections(registry, "auth_failures") == 1


# --- Redis -------------------------------------------------------------------------------------


def _redis_config(server: RedisServer, **kw: int) -> LimitsConfig:
    return _config(**kw).model_copy(update={"redis_url": server.url, "key_prefix": f"test:{uuid.uuid4().hex[:8]}"})


def _replica(config: LimitsConfig) -> tuple[RateLimit, RedisStore]:
    store = RedisStore.connect(
        config.redis_url or "", key_prefix=config.key_prefix, lease_ttl_s=config.lease_ttl_s, timeout_s=2.0
    )
    return RateLimit(config, store), store


async def test_two_replicas_sharing_redis_admit_the_limit_not_limit_times_replicas(redis_server: RedisServer) -> None:
    limit, per_replica = 300, 400
    config = _redis_config(redis_server, requests_per_minute=limit)
    (a, store_a), (b, store_b) = _replica(config), _replica(config)
    raw = aioredis.Redis.from_url(config.redis_url or "")
    try:

        async def one(policy: RateLimit) -> bool:
            try:
                await policy.admit(_req(_principal()))
            except ResourceExhausted:
                return False
            return True

        t0 = await raw.time()
        results = await asyncio.gather(*(one(p) for _ in range(per_replica) for p in (a, b)))
        t1 = await raw.time()
        elapsed = (t1[0] - t0[0]) + (t1[1] - t0[1]) / 1e6
        admitted = sum(results)
        # GCRA refills limit/60 per second while the burst runs; nothing else may get through
        refilled = int(elapsed * limit / 60) + 1
        print(f"\nadmitted {admitted} of {2 * per_replica} at a limit of {limit} in {elapsed:.3f} s")
        assert limit <= admitted <= limit + refilled
    finally:
        await store_a.close()
        await store_b.close()
        await raw.aclose()
    # the same two replicas with in-process limits admit the limit each
    mem_a, mem_b = RateLimit(config, MemoryStore()), RateLimit(config, MemoryStore())
    assert sum(await asyncio.gather(*(one(p) for _ in range(per_replica) for p in (mem_a, mem_b)))) == 2 * limit


async def test_redis_budgets_hold_at_their_edges_across_replicas(redis_server: RedisServer) -> None:
    config = _redis_config(redis_server, requests_per_minute=5, tokens_per_minute=10, concurrent_requests=2)
    (a, store_a), (b, store_b) = _replica(config), _replica(config)
    try:
        for policy in (a, b, a, b, a):
            req = _req(_principal())
            await policy.admit(req)
            await policy.wrap(req, Backend(0, Usage(0, 0)).stream()).aclose()
        refused = await _refusal(b, _req(_principal()))
        assert [v.description for v in refused.violations] == ["5 requests per minute"]
        assert 11.0 < refused.retry_after <= 12.0  # 60 s / 5, less what drained since

        # the concurrency cap and the tenant's tokens, across replicas
        held = []
        for policy, key in ((a, "k_2"), (b, "k_2")):
            req = _req(_principal(key))
            await policy.admit(req)
            held.append(policy.wrap(req, Backend(n=20).stream()))
        refused = await _refusal(a, _req(_principal("k_2")))
        assert [v.description for v in refused.violations] == ["2 concurrent requests"]
        for _ in range(9):
            await anext(held[0])
        await held[1].aclose()  # frees a slot on replica b; replica a sees it
        req = _req(_principal("k_2"))
        await a.admit(req)
        await a.wrap(req, Backend(0, Usage(0, 0)).stream()).aclose()
        await anext(held[0])  # the 10th token, streamed through replica a
        refused = await _refusal(b, _req(_principal("k_3")))
        assert [(v.subject, v.description) for v in refused.violations] == [("tenant:t_1", "10 tokens per minute")]
        assert 5.9 < refused.retry_after <= 6.0
        await held[0].aclose()
    finally:
        await store_a.close()
        await store_b.close()


async def test_redis_takes_nothing_from_a_refused_request(redis_server: RedisServer) -> None:
    config = _redis_config(redis_server, requests_per_minute=2, concurrent_requests=1)
    (a, store_a), (b, store_b) = _replica(config), _replica(config)
    try:
        first = await _admit(a, _req(_principal()))
        refused = await _refusal(b, _req(_principal()))  # the cap refuses; the key's rpm is not charged
        assert [v.description for v in refused.violations] == ["1 concurrent requests"]
        await first.aclose()
        second = await _admit(b, _req(_principal()))
        refused = await _refusal(a, _req(_principal()))
        assert {v.description for v in refused.violations} == {"2 requests per minute", "1 concurrent requests"}
        assert 29.0 < refused.retry_after <= 30.0
        await second.aclose()
    finally:
        await store_a.close()
        await store_b.close()


async def test_redis_failed_authentication_is_limited_across_replicas(redis_server: RedisServer) -> None:
    config = _redis_config(redis_server)
    (_, store_a), (_, store_b) = _replica(config), _replica(config)
    a, b = AuthThrottle(config, store_a), AuthThrottle(config, store_b)
    try:
        for throttle in (a, b, a):
            await throttle.check(ADDR)
            await throttle.failed(ADDR)
        with pytest.raises(ResourceExhausted) as exc:
            await b.check(ADDR)
        assert 19.0 < exc.value.retry_after <= 20.0
    finally:
        await store_a.close()
        await store_b.close()


async def test_pii_never_reaches_redis(redis_server: RedisServer) -> None:
    config = _redis_config(redis_server, concurrent_requests=3)
    policy, store = _replica(config)
    throttle = AuthThrottle(config, store)
    pii = ("jane.doe@example.com", "4111 1111 1111 1111", "+44 20 7946 0958", "my s3cret plan")
    prompt = " ".join(pii)
    try:
        for key in ("k_a", "k_b"):
            req = _req(_principal(key, tenant="t_acme"), address="2001:db8::42", prompt=prompt)
            await policy.admit(req)
            async for _chunk in policy.wrap(req, Backend(n=4, text=pii[0]).stream()):
                pass
        held = _req(_principal("k_a", tenant="t_acme"), prompt=prompt)
        await policy.admit(held)  # a lease still held
        await throttle.check("198.51.100.9")
        await throttle.failed("198.51.100.9")

        raw = aioredis.Redis.from_url(config.redis_url or "", decode_responses=True)
        dump: list[str] = []
        keys = [k async for k in raw.scan_iter(match="{" + config.key_prefix + "}:*")]
        for key in keys:
            kind = await raw.type(key)
            if kind == "hash":  # a bucket: two numbers
                fields = await raw.hgetall(key)
                assert set(fields) == {"l", "t"} and all(float(v) >= 0 for v in fields.values())
            else:  # leases: random ids with an expiry
                assert kind == "zset"
                fields = dict(await raw.zrange(key, 0, -1, withscores=True))
                assert all(re.fullmatch(r"[0-9a-f]{13,}", member) for member in fields)
            dump.append(repr(fields))
            assert await raw.pttl(key) > 0  # every key goes away by itself
        await raw.aclose()
        names = {k.removeprefix("{" + config.key_prefix + "}:") for k in keys}
        assert names == {
            "rpm:addr:2001:db8::/64",
            f"rpm:addr:{ADDR}",
            "rpm:key:k_a",
            "rpm:key:k_b",
            "tpm:tenant:t_acme",
            "conc:key:k_a",
            "authfail:addr:198.51.100.9",
        }
        everything = " ".join(keys + dump)
        for secret in (*pii, "jane", "s3cret"):
            assert secret not in everything
        # values are proven numbers and random hex ids above, where any 4 digits may occur by
        # chance (a microsecond timestamp held "7946" once): short card fragments only in names
        for fragment in ("4111", "7946"):
            assert fragment not in " ".join(keys)
    finally:
        await store.close()


async def test_when_redis_fails_the_configured_mode_applies_without_hanging(own_redis_server: RedisServer) -> None:
    registry = CollectorRegistry()
    metrics = LimitMetrics(registry)
    config = _redis_config(own_redis_server, requests_per_minute=2)
    clock = Clock()

    def failover(mode: str) -> FailoverStore:
        shared = RedisStore.connect(
            config.redis_url or "", key_prefix=config.key_prefix, lease_ttl_s=60, timeout_s=config.redis_timeout_s
        )
        return FailoverStore(shared, mode=mode, retry_s=5.0, lease_ttl_s=60, on_error=metrics.store_error, clock=clock)  # type: ignore[arg-type]

    stores = {mode: failover(mode) for mode in ("local", "open", "closed")}
    policies = {mode: RateLimit(config, store, metrics) for mode, store in stores.items()}
    try:
        up = [await _admit(policies[mode], _req(_principal("k_up"))) for mode in ("local", "open")]
        await _refusal(policies["closed"], _req(_principal("k_up")))  # two "replicas" spent the shared budget
        for stream in up:
            await stream.aclose()
        own_redis_server.stop()

        # local: this replica's own limits, with the same edges
        for _ in range(2):
            req = _req(_principal("k_down"))
            await policies["local"].admit(req)
            [c async for c in policies["local"].wrap(req, Backend().stream())]
        await _refusal(policies["local"], _req(_principal("k_down")))
        # open: everything is admitted
        for _ in range(5):
            req = _req(_principal("k_down"))
            await policies["open"].admit(req)
            [c async for c in policies["open"].wrap(req, Backend().stream())]
        # closed: UNAVAILABLE, with a retry hint
        with pytest.raises(Unavailable) as exc:
            await policies["closed"].admit(_req(_principal("k_down")))
        assert exc.value.retry_after == 5.0
        # one failed call per store trips it; later calls skip Redis until retry_s has passed
        errors = {
            op: registry.get_sample_value("servemesh_gateway_limit_store_errors_total", {"operation": op})
            for op in ("acquire", "charge", "release")
        }
        assert errors == {"acquire": 3.0, "charge": 0.0, "release": 0.0}

        own_redis_server.start()
        clock.now += 5.0
        await policies["local"].admit(_req(_principal("k_back")))  # in Redis again
        raw = aioredis.Redis.from_url(config.redis_url or "")
        assert await raw.exists("{" + config.key_prefix + "}:rpm:key:k_back") == 1
        await raw.aclose()
    finally:
        for store in stores.values():
            await store.close()


async def test_open_store_follows_the_settings(redis_server: RedisServer) -> None:
    assert isinstance(open_store(LimitsConfig()), MemoryStore)
    store = open_store(_redis_config(redis_server))
    assert isinstance(store, FailoverStore) and isinstance(store.shared, RedisStore)
    await store.close()

"""Limits shared by every gateway replica, in Redis.

Each admission is ONE Lua script: it reads the Redis server's clock (so replicas with skewed
clocks agree), evaluates the per-key and per-address request buckets, the tenant's token budget
and the key's concurrency set at that one instant, and writes only if all of them pass. Redis
runs a script atomically, so two replicas cannot both take the last slot of a limit.

Why not the `limits` library (its moving window runs on Redis too): it checks one limit item
per call, so four limits would be four round trips and a request refused by the third would
already have been counted by the first two; it has no concurrency leases and no charging past
a limit, and its moving window stores one entry per unit of cost, which does not fit token
budgets. The scripts below are small, and the same GCRA arithmetic as the in-process store.

Keys: "{<prefix>}:" + the bucket key the policy built from tenant ids, key ids and client
addresses; values are numbers and random lease ids. Nothing from a request's text reaches Redis.
Every key carries a TTL (the time its bucket needs to drain, or the lease TTL), so idle keys go.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from services.gateway.limits.base import (
    EPSILON,
    Check,
    Decision,
    Lease,
    LimitStore,
    Rate,
    Slots,
    StoreUnavailable,
    lease_ids,
)

# Times are integer microseconds of the server clock, exact in Lua's doubles.
# A bucket is a hash {l = level, t = updated at}.
_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function level_of(key, now, limit, period)
  local s = redis.call('HMGET', key, 'l', 't')
  if not s[1] then return 0 end
  local level = tonumber(s[1]) - (now - tonumber(s[2])) * limit / period
  if level < 0 then return 0 end
  return level
end
local function store(key, level, now, limit, period)
  redis.call('HSET', key, 'l', string.format('%.17g', level), 't', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.ceil(level * period / limit / 1000) + 1000)
end
"""

# KEYS: n buckets, then the concurrency set if ARGV[2] (its limit) > 0.
# ARGV: n, slots limit, lease id, lease ttl us, then per bucket: limit, period us, cost, reserve.
# Returns {admitted, wait us of bucket 1..n (0 = passes), slots full}.
_ACQUIRE = (
    _PRELUDE
    + """
local now = now_us()
local n = tonumber(ARGV[1])
local slots = tonumber(ARGV[2])
local out, levels = {1}, {}
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local limit, period, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  levels[i] = level_of(KEYS[i], now, limit, period)
  local over = levels[i] + cost - limit
  if over > EPS then
    out[1] = 0
    out[i + 1] = math.ceil(over * period / limit)
  else
    out[i + 1] = 0
  end
end
out[n + 2] = 0
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', now)
  if redis.call('ZCARD', KEYS[n + 1]) >= slots then
    out[1] = 0
    out[n + 2] = 1
  end
end
if out[1] == 1 then
  for i = 1, n do
    local b = 4 + (i - 1) * 4
    if ARGV[b + 4] == '1' then
      store(KEYS[i], levels[i] + tonumber(ARGV[b + 3]), now, tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]))
    end
  end
  if slots > 0 then
    local ttl = tonumber(ARGV[4])
    redis.call('ZADD', KEYS[n + 1], now + ttl, ARGV[3])
    redis.call('PEXPIRE', KEYS[n + 1], math.ceil(ttl / 1000))
  end
end
return out
""".replace("EPS", repr(EPSILON))
)

# KEYS: the bucket, then the concurrency set if a lease is renewed.
# ARGV: limit, period us, amount, lease id, lease ttl us.
_CHARGE = (
    _PRELUDE
    + """
local now = now_us()
local limit, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local level = level_of(KEYS[1], now, limit, period) + tonumber(ARGV[3])
if level < 0 then level = 0 end
store(KEYS[1], level, now, limit, period)
if KEYS[2] then
  local ttl = tonumber(ARGV[5])
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, ARGV[4]) == 1 then
    redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000))
  end
end
return 1
"""
)


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


class RedisStore(LimitStore):
    """`client` should have short socket timeouts and no retries (see `connect`); every Redis
    failure surfaces as StoreUnavailable, for the caller's failure mode to handle."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str, lease_ttl_s: float = 300.0) -> None:
        self._client = client
        self._prefix = "{" + key_prefix + "}:"
        self._ttl_us = _us(lease_ttl_s)
        self._acquire = client.register_script(_ACQUIRE)
        self._charge = client.register_script(_CHARGE)
        self._ids = lease_ids()

    @classmethod
    def connect(
        cls, url: str, *, key_prefix: str, lease_ttl_s: float, timeout_s: float, max_connections: int = 32
    ) -> RedisStore:
        """A store on a new client (connections open lazily): `timeout_s` bounds connecting, each
        reply, and the wait for one of the `max_connections` pooled connections; a failed call is
        not retried, so a dead Redis costs at most that."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            health_check_interval=0,
        )
        return cls(aioredis.Redis(connection_pool=pool), key_prefix=key_prefix, lease_ttl_s=lease_ttl_s)

    async def acquire(self, checks: Sequence[Check], slots: Slots | None) -> Decision:
        lease_id = next(self._ids) if slots is not None else ""
        keys = [self._prefix + c.rate.key for c in checks]
        args: list[int | float | str] = [len(checks), slots.limit if slots else 0, lease_id, self._ttl_us]
        for c in checks:
            args += [c.rate.limit, _us(c.rate.period_s), c.cost, 1 if c.reserve else 0]
        if slots is not None:
            keys.append(self._prefix + slots.key)
        out = await self._call(self._acquire, keys, args)
        admitted = out[0] == 1
        waits = tuple(int(w) / 1_000_000 for w in out[1 : len(checks) + 1])
        lease = Lease(lease_id, slots.key) if admitted and slots is not None else None
        return Decision(admitted, waits, out[len(checks) + 1] == 1, lease)

    async def charge(self, rate: Rate, amount: int, lease: Lease | None = None) -> None:
        keys = [self._prefix + rate.key]
        if lease is not None:
            keys.append(self._prefix + lease.slots_key)
        args: list[int | float | str] = [
            rate.limit,
            _us(rate.period_s),
            amount,
            lease.id if lease else "",
            self._ttl_us,
        ]
        await self._call(self._charge, keys, args)

    async def release(self, lease: Lease) -> None:
        try:
            await self._client.zrem(self._prefix + lease.slots_key, lease.id)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def _call(self, script: AsyncScript, keys: list[str], args: list[int | float | str]) -> list[int]:
        # A timeout may come after the script ran: its reservation then stands in Redis unused
        # until it drains (a slot: until its lease expires), which errs on the strict side.
        try:
            return await script(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)

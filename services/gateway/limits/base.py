"""Settings, data types and the abstract store of the gateway's limits.

Algorithm: GCRA (the generic cell rate algorithm of ITU-T I.371) in its continuous-state
leaky-bucket form. Every limit is a bucket holding `limit` units that drains at
`limit / period` units per second; its state is two numbers, the level and when it was last
updated. A request that costs `cost` units is admitted when `level + cost <= limit` at the
moment it arrives (so at a limit of N the Nth back-to-back request is admitted and the N+1th
refused), and a refused one is told the exact time until that holds:
`(level + cost - limit) * period / limit` seconds. Refused requests cost nothing.

What "60 requests per minute" means here: at most 60 at once after a quiet minute, and never
more than 60 per minute sustained; after a burst of 60 the next slot opens one second later,
not a whole minute later. A sliding-window log ("never more than N in any trailing 60 s") was
considered and not taken: it stores one entry per request (or per token, for token budgets:
20,000 entries a minute for one free tenant), and summing a weighted log in Redis is O(entries)
per check, while GCRA is O(1) in time and memory for any cost and its Retry-After is exact.
A sliding-window counter is O(1) too but only approximates, which breaks exact edges.

Token budgets are buckets of tokens per tenant. Admission only *needs* one token left (it
reserves nothing, since a request's length is unknown); the tokens a stream produces are then
*charged* as they stream, and may take the bucket past its limit (the tenant is in debt), which
refuses the tenant's next requests until the debt has drained.

Concurrency caps are sets of leases with an expiry (`lease_ttl_s`, renewed whenever a stream's
tokens are charged), so a slot held by a crashed replica, or by a request the pipeline dropped
before its stream started, frees itself.
"""

from __future__ import annotations

import abc
import itertools
import secrets
from collections.abc import Iterator, Sequence
from enum import StrEnum
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: slack when comparing a bucket level with its limit (in units), against floating-point error
EPSILON = 1e-9


class Limit(StrEnum):
    """What a refusal was about: the `limit` label of the rejection counter (a fixed set)."""

    KEY_REQUESTS = "key_requests"
    ADDRESS_REQUESTS = "address_requests"
    TENANT_TOKENS = "tenant_tokens"
    KEY_CONCURRENCY = "key_concurrency"
    AUTH_FAILURES = "auth_failures"


class TierLimits(BaseModel):
    """The limits of one tier (free, paid, enterprise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: requests one API key may start per minute (the bucket holds one minute's worth)
    requests_per_minute: int = Field(ge=1, le=1_000_000)
    #: tokens one tenant's streams may produce per minute, over all its keys
    tokens_per_minute: int = Field(ge=1, le=1_000_000_000)
    #: streams one API key may have open at once
    concurrent_requests: int = Field(ge=1, le=100_000)


def _default_tiers() -> dict[str, TierLimits]:
    return {
        "free": TierLimits(requests_per_minute=60, tokens_per_minute=20_000, concurrent_requests=4),
        "paid": TierLimits(requests_per_minute=600, tokens_per_minute=400_000, concurrent_requests=32),
        "enterprise": TierLimits(requests_per_minute=6_000, tokens_per_minute=4_000_000, concurrent_requests=256),
    }


class LimitsConfig(BaseModel):
    """Rate limits, token quotas and concurrency caps of the gateway. In-process by default;
    with `redis_url` every check is one atomic Lua script on the Redis shared by all replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: tier name (Principal.tier) -> limits
    tiers: dict[str, TierLimits] = Field(default_factory=_default_tiers, min_length=1)
    #: the tier applied to a principal whose tier is not in `tiers`
    default_tier: str = "free"
    #: requests one client address may start per minute, authenticated or not
    address_requests_per_minute: int = Field(600, ge=1, le=10_000_000)
    #: failed authentication attempts one client address may make per minute (key guessing)
    auth_failures_per_minute: int = Field(10, ge=1, le=100_000)
    #: IPv6 callers are limited per network of this prefix length (one host often holds a /64)
    ipv6_prefix_length: int = Field(64, ge=16, le=128)
    #: seconds a concurrency slot is held without its stream charging tokens before it expires
    lease_ttl_s: float = Field(300.0, ge=1, le=86_400)
    #: RetryInfo given with a refusal for concurrency alone (no clock says when a stream ends)
    concurrency_retry_after_s: float = Field(1.0, gt=0, le=600)
    #: tokens a stream accumulates before charging them to the store (the rest at its end); 1 = every chunk
    token_flush_tokens: int = Field(16, ge=1, le=4096)
    #: count prompt tokens (from the final usage) against the tenant's budget too
    count_prompt_tokens: bool = False
    #: redis://, rediss:// or unix:// URL of the Redis shared by the replicas; None = in-process limits
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", max_length=2048)
    #: every Redis key starts with "{<key_prefix>}:" (one hash slot, so the script also runs on a cluster)
    key_prefix: str = Field("servemesh:limits", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    #: connect and read timeout of every Redis call, and the longest wait for a pooled connection, in seconds
    redis_timeout_s: float = Field(0.05, gt=0, le=5)
    #: connections to Redis per replica; calls beyond them wait for one (up to redis_timeout_s)
    redis_max_connections: int = Field(32, ge=1, le=10_000)
    #: when Redis fails: "local" = in-process limits on this replica, "open" = admit, "closed" = refuse (UNAVAILABLE)
    on_redis_error: Literal["local", "open", "closed"] = "local"
    #: seconds to stay on the failure mode before trying Redis again
    redis_retry_s: float = Field(1.0, ge=0, le=300)

    @model_validator(mode="after")
    def _default_tier_known(self) -> LimitsConfig:
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier: {self.default_tier!r} is not one of {sorted(self.tiers)}")
        return self

    def tier(self, name: str) -> TierLimits:
        return self.tiers.get(name) or self.tiers[self.default_tier]


# The value types below are NamedTuples: an admission builds several, and a NamedTuple costs a
# fraction of a frozen dataclass to create.


class Rate(NamedTuple):
    """A GCRA bucket: `limit` units per `period_s` seconds, holding at most `limit`.
    `key` is built from ids and addresses only (it names a Redis key)."""

    key: str
    limit: int
    period_s: float = 60.0


class Check(NamedTuple):
    """`reserve`: take `cost` units when every check passes; else only require them left."""

    rate: Rate
    cost: int = 1
    reserve: bool = True


class Slots(NamedTuple):
    """A concurrency cap: at most `limit` leases held at once under `key`."""

    key: str
    limit: int


class Lease(NamedTuple):
    """A held concurrency slot."""

    id: str
    slots_key: str
    #: issued by the in-process fallback while the shared store was failing
    local: bool = False


class Decision(NamedTuple):
    admitted: bool
    #: per check, in order: seconds until it would pass (0.0 = it passes now)
    waits: tuple[float, ...]
    #: the concurrency cap is reached
    slots_full: bool = False
    #: the slot taken, when admitted with slots
    lease: Lease | None = None


def lease_ids() -> Iterator[str]:
    """Lease ids unique across processes: a random prefix and a counter (no syscall per id)."""
    prefix = secrets.token_hex(6)
    return (f"{prefix}{n:x}" for n in itertools.count())


class StoreUnavailable(Exception):
    """The shared store did not answer (connection refused, timeout, error reply)."""


class LimitStore(abc.ABC):
    """Where bucket levels and leases live. `acquire` is all-or-nothing: it evaluates every
    check and the cap at one instant, and takes what it reserves only when all pass."""

    @abc.abstractmethod
    async def acquire(self, checks: Sequence[Check], slots: Slots | None) -> Decision: ...

    @abc.abstractmethod
    async def charge(self, rate: Rate, amount: int, lease: Lease | None = None) -> None:
        """Add `amount` units (negative gives some back) to a bucket, past its limit if need
        be; renews `lease`. Never refuses."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> None:
        """Give a slot back; releasing one already gone is a no-op."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def drained(level: float, elapsed_s: float, rate: Rate) -> float:
    """The level of a bucket `elapsed_s` after it was `level`."""
    return max(0.0, level - elapsed_s * rate.limit / rate.period_s)

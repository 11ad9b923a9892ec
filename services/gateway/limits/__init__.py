"""Rate limits, token quotas and concurrency caps of the gateway.

Requests per minute per API key and per client address, tokens per minute per tenant, streams
at once per key, and failed authentication attempts per client address, with the limits of
each tier (free, paid, enterprise) from `LimitsConfig`. In-process by default; with a Redis URL
every admission is one atomic Lua script shared by all gateway replicas. Over a limit:
ResourceExhausted with QuotaFailure and RetryInfo (RESOURCE_EXHAUSTED; 429 with Retry-After
through Envoy). The algorithm (GCRA) and its edges are described in `base`.

Wiring, in the service's start-up:

    metrics = LimitMetrics(registry)
    store = open_store(settings.limits, metrics)          # close at shutdown: await store.close()
    rate_limit = RateLimit(settings.limits, store, metrics)  # the policy, right after authentication
    auth_throttle = AuthThrottle(settings.limits, store, metrics)  # for the authentication policy

and in the authentication policy's admit:

    await auth_throttle.check(request.client_address)      # refuses while the address is locked out
    principal = verify(request.credentials)
    if principal is None:
        await auth_throttle.failed(request.client_address)
        raise Unauthenticated(...)
"""

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
    TierLimits,
)
from services.gateway.limits.memory import MemoryStore
from services.gateway.limits.policy import AuthThrottle, FailoverStore, LimitMetrics, RateLimit, address_key, open_store
from services.gateway.limits.redis_store import RedisStore

__all__ = [
    "AuthThrottle",
    "Check",
    "Decision",
    "FailoverStore",
    "Lease",
    "Limit",
    "LimitMetrics",
    "LimitStore",
    "LimitsConfig",
    "MemoryStore",
    "Rate",
    "RateLimit",
    "RedisStore",
    "Slots",
    "StoreUnavailable",
    "TierLimits",
    "address_key",
    "open_store",
]

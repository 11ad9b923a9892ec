"""The gateway's response cache: answers to deterministic requests, per tenant and model.

`ResponseCache` is the pipeline policy; `create_store` picks the store (the in-process LRU,
or Redis when `CacheConfig.redis_url` is set); `EngineIdentities` tells the policy which
model (id and card sha256) an engine serves. See policy.py for the key and the rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.gateway.cache.base import CacheStore, CacheStoreError, CacheUnavailable
from services.gateway.cache.config import REDIS_SCHEMES, CacheConfig
from services.gateway.cache.memory import MemoryStore
from services.gateway.cache.policy import (
    CACHE_SCHEMA_VERSION,
    CachedAnswer,
    CacheMetrics,
    EngineIdentities,
    ModelIdentity,
    ResponseCache,
    cache_key,
    cacheable,
)

__all__ = [
    "CACHE_SCHEMA_VERSION",
    "CacheConfig",
    "CacheMetrics",
    "CacheStore",
    "CacheStoreError",
    "CacheUnavailable",
    "CachedAnswer",
    "EngineIdentities",
    "MemoryStore",
    "ModelIdentity",
    "ResponseCache",
    "cache_key",
    "cacheable",
    "create_store",
]


def create_store(config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> CacheStore:
    """The store `config` names: Redis when redis_url is set, else the in-process LRU."""
    if config.redis_url is None:
        return MemoryStore(config.max_entries, clock=clock)
    url = config.redis_url.get_secret_value()
    if not url.startswith(REDIS_SCHEMES):  # the message never repeats the URL (it may hold a password)
        raise ValueError(f"cache.redis_url: must start with one of {', '.join(REDIS_SCHEMES)}")
    from services.gateway.cache.redis_store import RedisStore

    return RedisStore(
        url,
        key_prefix=config.key_prefix,
        timeout_s=config.redis_timeout_s,
        cooldown_s=config.redis_cooldown_s,
        clock=clock,
    )

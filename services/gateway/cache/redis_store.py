"""The shared store: Redis (redis-py's asyncio client), for gateways running as several replicas.

Each call is bounded by a short socket timeout and retried at most once, without backoff.
After a failure the store is not asked again for `cooldown_s` seconds, so a Redis outage
costs each request nothing more than a counted miss (and one warning per cooldown)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.gateway.cache.base import CacheStore, CacheStoreError, CacheUnavailable

_log = logging.getLogger(__name__)


class RedisStore(CacheStore):
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        timeout_s: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        self._prefix = key_prefix
        self._cooldown = cooldown_s
        self._clock = clock
        self._down_until: float | None = None

    async def get(self, key: str) -> bytes | None:
        self._check()
        try:
            value = await self._client.get(self._prefix + key)
        except (RedisError, OSError) as exc:
            raise self._failed("get", exc) from None
        self._down_until = None
        return value  # type: ignore[no-any-return]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._check()
        try:
            await self._client.set(self._prefix + key, value, ex=ttl_s)
        except (RedisError, OSError) as exc:
            raise self._failed("set", exc) from None
        self._down_until = None

    async def close(self) -> None:
        await self._client.aclose()

    def _check(self) -> None:
        if self._down_until is not None and self._clock() < self._down_until:
            raise CacheUnavailable("redis failed recently; not asked until its cooldown has passed")

    def _failed(self, op: str, exc: BaseException) -> CacheStoreError:
        # The message names the error, never a key or value (they are hashes and answers).
        _log.warning(
            "response cache: redis %s failed; treated as a miss for %.1f s", op, self._cooldown,
            extra={"error_type": type(exc).__name__, "detail": str(exc)[:200]},
        )  # fmt: skip
        self._down_until = self._clock() + self._cooldown
        return CacheStoreError(f"redis {op} failed: {type(exc).__name__}")

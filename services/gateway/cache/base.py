"""The cache store family: a small abstract class; one module per implementation."""

from __future__ import annotations

import abc


class CacheStoreError(Exception):
    """The store could not answer (connection, timeout, server error). The caller treats it
    as a miss and counts it; a request never fails because of its cache."""


class CacheUnavailable(CacheStoreError):
    """The store failed recently and is not asked again until its cooldown has passed."""


class CacheStore(abc.ABC):
    """Bytes under opaque keys (hex digests), each with a time to live."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The live value under `key`, or None; raise CacheStoreError when the store cannot say."""

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Keep `value` under `key` for `ttl_s` seconds; raise CacheStoreError on failure."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store is not used afterwards."""

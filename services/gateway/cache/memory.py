"""The in-process store: a least-recently-used map with a time to live per entry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from services.gateway.cache.base import CacheStore


class MemoryStore(CacheStore):
    """At most `max_entries` values; a read refreshes an entry's recency, never its expiry.
    An expired entry is dropped when read, or when it reaches the old end of the LRU order."""

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        self._max = max_entries
        self._clock = clock
        #: key -> (expiry on `clock`, value); oldest use first
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, value = item
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        now = self._clock()
        self._entries[key] = (now + ttl_s, value)
        self._entries.move_to_end(key)
        while self._entries:
            oldest, (expires, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self._max and expires > now:
                break
            del self._entries[oldest]

"""In-process limits: the default, and the fallback while Redis fails.

Every method runs to completion without awaiting, so on one event loop each call is atomic
with no lock. State is two dicts; buckets that have drained to zero and expired leases are
swept once a minute, so callers from many addresses do not grow memory without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.gateway.limits.base import EPSILON, Check, Decision, Lease, LimitStore, Rate, Slots, drained, lease_ids

SWEEP_EVERY_S = 60.0


class MemoryStore(LimitStore):
    def __init__(self, *, lease_ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = lease_ttl_s
        self._clock = clock
        #: key -> [level, updated_at, drained_at]
        self._buckets: dict[str, list[float]] = {}
        #: key -> {lease id -> expires_at}
        self._leases: dict[str, dict[str, float]] = {}
        self._next_sweep = clock() + SWEEP_EVERY_S
        self._ids = lease_ids()

    def _level(self, rate: Rate, now: float) -> float:
        state = self._buckets.get(rate.key)
        return drained(state[0], now - state[1], rate) if state is not None else 0.0

    def _set(self, rate: Rate, level: float, now: float) -> None:
        self._buckets[rate.key] = [level, now, now + level * rate.period_s / rate.limit]

    def _held(self, key: str, now: float) -> dict[str, float]:
        held = self._leases.get(key)
        if held is None:
            return {}
        for lease_id in [i for i, expires in held.items() if expires <= now]:
            del held[lease_id]
        return held

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY_S
        for key in [k for k, state in self._buckets.items() if state[2] <= now]:
            del self._buckets[key]
        for key in list(self._leases):
            if not self._held(key, now):
                del self._leases[key]

    async def acquire(self, checks: Sequence[Check], slots: Slots | None) -> Decision:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        # base.drained inlined (this is the per-request hot path); `over` units past the limit
        # free up in over * period / limit seconds
        buckets = self._buckets
        levels: list[float] = []
        waits: list[float] = []
        admitted = True
        for (key, limit, period), cost, _reserve in checks:
            state = buckets.get(key)
            level = max(0.0, state[0] - (now - state[1]) * limit / period) if state is not None else 0.0
            levels.append(level)
            over = level + cost - limit
            if over > EPSILON:
                admitted = False
                waits.append(over * period / limit)
            else:
                waits.append(0.0)
        full = False
        if slots is not None:
            held = self._leases.get(slots.key)
            # expired leases are looked for only when they would make the difference
            full = held is not None and len(held) >= slots.limit and len(self._held(slots.key, now)) >= slots.limit
        if full or not admitted:
            return Decision(False, tuple(waits), full)
        for i, (rate, cost, reserve) in enumerate(checks):
            if reserve:
                self._set(rate, levels[i] + cost, now)
        lease = None
        if slots is not None:
            lease = Lease(next(self._ids), slots.key)
            self._leases.setdefault(slots.key, {})[lease.id] = now + self._ttl
        return Decision(True, tuple(waits), False, lease)

    async def charge(self, rate: Rate, amount: int, lease: Lease | None = None) -> None:
        now = self._clock()
        self._set(rate, max(0.0, self._level(rate, now) + amount), now)
        if lease is not None:
            held = self._leases.get(lease.slots_key)
            if held is not None and lease.id in held:
                held[lease.id] = now + self._ttl

    async def release(self, lease: Lease) -> None:
        held = self._leases.get(lease.slots_key)
        if held is not None:
            held.pop(lease.id, None)
            if not held:
                del self._leases[lease.slots_key]

    def size(self) -> int:
        """Buckets and lease sets held (idle ones go at the next sweep)."""
        return len(self._buckets) + len(self._leases)

"""One sampler for every browser: what the mesh looks like now, and the last hour of it.

Every `refresh_s` the sampler reads SLOs, engines, routes, rollouts and what each Envoy acked
(console.backend), keeps the newest snapshot for the pages, and appends the numbers the charts
draw to fixed-size ring buffers (an hour at 2 s is 1,800 points a series). Pages read; only the
sampler calls the services, so ten open browsers cost what one does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from servemesh.mesh.v1 import mesh_pb2
from servemesh.mesh.v1 import slo_service_pb2 as slo_pb2
from servemesh.registry.v1 import registry_pb2 as rpb

from console.backend import Backend, ConsoleError, EngineView, GatewayStats

_log = logging.getLogger(__name__)


class History:
    """Named series of (unix time, value), each at most `points` long."""

    def __init__(self, points: int) -> None:
        self._points = points
        self._series: dict[str, deque[tuple[float, float]]] = {}

    def add(self, name: str, t: float, value: float) -> None:
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = deque(maxlen=self._points)
        series.append((t, value))

    def series(self, name: str, since: float = 0.0) -> list[tuple[float, float]]:
        return [p for p in self._series.get(name, ()) if p[0] >= since]

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._series if n.startswith(prefix))

    def __len__(self) -> int:
        return sum(len(s) for s in self._series.values())


@dataclass(frozen=True)
class Snapshot:
    time: float = 0.0
    slos: tuple[slo_pb2.SloStatus, ...] = ()
    engines: tuple[EngineView, ...] = ()
    routes: tuple[rpb.Route, ...] = ()
    deployments: tuple[rpb.Deployment, ...] = ()
    rollouts: tuple[rpb.Rollout, ...] = ()
    nodes: tuple[mesh_pb2.Node, ...] = ()
    tokens_per_s: float | None = None
    queue_depth: int | None = None
    #: what could not be read this time, in words
    errors: tuple[str, ...] = ()


def burn_rate(status: slo_pb2.SloStatus, window_s: int = 3600) -> float | None:
    """The status's burn rate over `window_s` (1 h by default), if it reports one."""
    for b in status.burn_rates:
        if b.window.seconds == window_s:
            return b.burn_rate
    return None


@dataclass
class Sampler:
    backend: Backend
    refresh_s: float = 2.0
    history_s: float = 3600.0
    latest: Snapshot = field(default_factory=Snapshot)
    history: History = field(init=False)
    _tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # gateway -> (time, tokens)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.history = History(max(1, math.ceil(self.history_s / self.refresh_s)))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sample()
            except Exception:  # a bug must not stop the charts for good; it is logged with its trace
                _log.exception("sampling failed")
            await asyncio.sleep(max(0.0, self.refresh_s - (time.monotonic() - started)))

    async def sample(self, now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now
        errors: list[str] = []

        async def read(coro, default):  # type: ignore[no-untyped-def]
            try:
                return await coro
            except ConsoleError as exc:
                errors.append(str(exc))
                return default

        deployments = await read(self.backend.deployments(), None)
        slos, routes, rollouts, nodes = await asyncio.gather(
            read(self.backend.slo_statuses(), []),
            read(self.backend.routes(), []),
            read(self.backend.rollouts(), []),
            read(self.backend.nodes(), []),
        )
        engines: list[EngineView] = []
        tokens_per_s = None
        if deployments is not None:
            (engines, engine_errors), stats = await asyncio.gather(
                read(self.backend.engines(deployments), ([], [])), self.backend.gateway_stats(deployments)
            )
            errors.extend(engine_errors)
            tokens_per_s = self._tokens_rate(stats, now)
        queue = sum(e.engine.queue_depth for e in engines) if engines else None
        snap = Snapshot(
            now,
            tuple(slos),
            tuple(engines),
            tuple(routes),
            tuple(deployments or ()),
            tuple(rollouts),
            tuple(nodes),
            tokens_per_s,
            queue,
            tuple(dict.fromkeys(errors)),
        )
        self._record(snap)
        self.latest = snap
        return snap

    def _tokens_rate(self, stats: dict[str, GatewayStats | str], now: float) -> float | None:
        """Completion tokens per second over all gateways since the last sample (None on the first)."""
        rate, seen = 0.0, False
        for name, s in stats.items():
            if isinstance(s, str):
                continue
            before = self._tokens.get(name)
            self._tokens[name] = (now, s.completion_tokens)
            if before is None or now <= before[0]:
                continue
            seen = True
            rate += max(0.0, s.completion_tokens - before[1]) / (now - before[0])  # a restart resets to 0
        return rate if seen else None

    def _record(self, snap: Snapshot) -> None:
        h, t = self.history, snap.time
        for s in snap.slos:
            h.add(f"slo/{s.slo.name}", t, s.value)
            b = burn_rate(s)
            if b is not None:
                h.add(f"burn/{s.slo.name}", t, b)
        if snap.tokens_per_s is not None:
            h.add("tokens_per_s", t, snap.tokens_per_s)
        if snap.queue_depth is not None:
            h.add("queue_depth", t, snap.queue_depth)
        for e in snap.engines:
            key = engine_key(e)
            h.add(f"engine/{key}/queue", t, e.engine.queue_depth)
            h.add(f"engine/{key}/kv", t, e.engine.kv_cache_usage)
            ttft = (
                e.engine.recent_ttft_p50.ToTimedelta().total_seconds() if e.engine.HasField("recent_ttft_p50") else None
            )
            if ttft is not None:
                h.add(f"engine/{key}/ttft_p50", t, ttft)
            if e.ttft_ema_s is not None:
                h.add(f"engine/{key}/ttft_ema", t, e.ttft_ema_s)
            if e.error_rate is not None:
                h.add(f"engine/{key}/error_rate", t, e.error_rate)


def engine_key(e: EngineView) -> str:
    return f"{e.deployment.removeprefix('deployments/')}/{e.engine.name}"


def status_color(states: Iterable[int]) -> str:
    """green / amber / red for a set of SloStatus states (no data counts as amber: unknown is not fine)."""
    states = set(states)
    if slo_pb2.SloStatus.STATE_BREACHED in states:
        return "red"
    if states & {slo_pb2.SloStatus.STATE_WARNING, slo_pb2.SloStatus.STATE_NO_DATA} or not states:
        return "amber"
    return "green"

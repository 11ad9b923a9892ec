"""The rollout controller: walks each rollout's steps by changing its route's weights in the
registry, judges analysis windows, and rolls a failing canary back to weight 0.

Everything it knows between ticks it keeps in the registry (step, when the step began,
the weights it applied, every window's verdict), so a controller killed at any moment
and started again resumes where the registry says, without taking a step twice:

- a step is taken only by UpdateRolloutStatus against the etag read in the same tick;
- route weights are derived from the step and applied idempotently (nothing is
  written when the route already has them), after the status that calls for them;
- a rollback is recorded (ROLLED_BACK) before the weights move, so a restart in
  between finishes the rollback instead of re-applying the step.

Windows are sampled from the data plane (see metrics.py): Envoy's per-cluster counters
when the canary takes weighted traffic, the deployments' own metrics when it only gets
mirrored copies (shadow steps).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx
from google.protobuf import field_mask_pb2, timestamp_pb2
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.controller.analysis import Golden, Measurement, Thresholds, Verdict, judge
from mesh.controller.metrics import Calls, MetricsUnavailable, Window, envoy_calls, service_calls
from mesh.controller.prometheus import prometheus_window

_log = logging.getLogger(__name__)

R = rpb.Rollout
ENDED = (R.STATE_PROMOTED, R.STATE_ABORTED, R.STATE_ROLLED_BACK)
_VERDICT = {
    Verdict.PASS: rpb.Measurement.VERDICT_PASS,
    Verdict.FAIL: rpb.Measurement.VERDICT_FAIL,
    Verdict.INCONCLUSIVE: rpb.Measurement.VERDICT_INCONCLUSIVE,
}
RPC_TIMEOUT_S = 5.0
#: how long past its window's end a golden run may take before the window calls it inconclusive
GOLDEN_GRACE_S = 5.0

#: runs the rollout's golden set against canary and stable deployments: (canary, stable) pass rates
GoldenRunner = Callable[[rpb.Rollout, rpb.Deployment, rpb.Deployment], Awaitable[Golden]]


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _secs(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def desired_split(r: rpb.Rollout, weight: int, mirror: float) -> tuple[list[tuple[str, int]], list[tuple[str, float]]]:
    """The route's backends and mirrors for a canary weight (percent) and mirrored share."""
    backends = [(r.stable_deployment, 100 - weight), (r.canary_deployment, weight)]
    mirrors = [(r.canary_deployment, mirror)] if mirror > 0 and weight < 100 else []
    return [(d, w) for d, w in backends if w > 0], mirrors


def _route_split(route: rpb.Route) -> tuple[list[tuple[str, int]], list[tuple[str, float]]]:
    return [(b.deployment, b.weight) for b in route.backends if b.weight > 0], [
        (m.deployment, m.percent) for m in route.mirrors
    ]


@dataclass
class _OpenWindow:
    step: int
    start: float
    canary: Calls | None
    stable: Calls | None
    canary_service: Calls | None
    stable_service: Calls | None
    error: str = ""
    golden: asyncio.Task[Golden] | None = None


@dataclass
class _Driver:
    """In-memory state of one rollout between ticks (lost on restart, by design: see module doc)."""

    window: _OpenWindow | None = None
    inconclusive: int = 0
    logged: set[str] = field(default_factory=set)


class RolloutController:
    """Drives every active rollout. `registry` makes a channel to the registry; `envoy_admins` lists the
    admin URLs of every Envoy that may route to a canary (read each window: deployments come and go)."""

    def __init__(
        self,
        registry: Callable[[], grpc.aio.Channel],
        envoy_admins: Callable[[], list[str]],
        *,
        tick_s: float = 0.5,
        golden: GoldenRunner | None = None,
        prometheus_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry_channel = registry
        self._admins = envoy_admins
        self._tick_s = tick_s
        self._golden = golden
        #: when set, windows are judged from the Prometheus HTTP API (prometheus.py's queries)
        self._prometheus = prometheus_url
        self._clock = clock
        self._drivers: dict[str, _Driver] = {}
        self._channel: grpc.aio.Channel | None = None
        self._http = httpx.AsyncClient()

    @property
    def _stub(self) -> rpb_grpc.RegistryServiceStub:
        if self._channel is None:
            self._channel = self._registry_channel()
        return rpb_grpc.RegistryServiceStub(self._channel)

    async def close(self) -> None:
        for d in self._drivers.values():
            if d.window and d.window.golden:
                d.window.golden.cancel()
        await self._http.aclose()
        if self._channel is not None:
            await self._channel.close()

    async def run(self) -> None:
        """Tick until cancelled; registry outages are logged and retried, never fatal."""
        while True:
            try:
                await self.tick()
            except grpc.aio.AioRpcError as exc:
                _log.warning("rollout tick: registry %s: %s", exc.code().name, exc.details())
                if exc.code() == grpc.StatusCode.UNAVAILABLE and self._channel is not None:
                    await self._channel.close()
                    self._channel = None
            except Exception:
                _log.exception("rollout tick failed")
            await asyncio.sleep(self._tick_s)

    async def tick(self) -> None:
        """One pass over every rollout that is active or still has weights to undo."""
        resp = await self._stub.ListRollouts(rpb.ListRolloutsRequest(page_size=500), timeout=RPC_TIMEOUT_S)
        live = set()
        for r in resp.rollouts:
            if (
                r.state in ENDED
                and r.applied_weight == (100 if r.state == R.STATE_PROMOTED else 0)
                and (r.applied_mirror_percent == 0)
            ):
                continue
            live.add(r.name)
            driver = self._drivers.setdefault(r.name, _Driver())
            try:
                await self._step(r, driver)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:  # ABORTED: changed under us; next tick re-reads
                    raise
        for name in set(self._drivers) - live:
            d = self._drivers.pop(name)
            if d.window and d.window.golden:
                d.window.golden.cancel()

    # --- registry writes ------------------------------------------------------------

    async def _status(
        self, r: rpb.Rollout, reason: str, windows: list[rpb.AnalysisWindow] = (), **fields: object
    ) -> rpb.Rollout:
        new = rpb.Rollout(name=r.name, etag=r.etag)
        for k, v in fields.items():
            if isinstance(v, timestamp_pb2.Timestamp):
                getattr(new, k).CopyFrom(v)
            else:
                setattr(new, k, v)
        req = rpb.UpdateRolloutStatusRequest(
            rollout=new,
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            append_windows=list(windows),
            reason=reason[:500],
        )
        return (await self._stub.UpdateRolloutStatus(req, timeout=RPC_TIMEOUT_S)).rollout

    async def _apply(self, r: rpb.Rollout, weight: int, mirror: float) -> rpb.Rollout:
        """Give the route the split for `weight`/`mirror` (if it has not), then record it on the rollout."""
        backends, mirrors = desired_split(r, weight, mirror)
        for _ in range(3):
            route = (await self._stub.GetRoute(rpb.GetRouteRequest(name=r.route), timeout=RPC_TIMEOUT_S)).route
            if _route_split(route) == (backends, mirrors):
                break
            if route.locked:
                raise RouteLockedError(r.route)
            route.ClearField("backends")
            route.backends.extend(rpb.WeightedBackend(deployment=d, weight=w) for d, w in backends)
            route.ClearField("mirrors")
            route.mirrors.extend(rpb.RouteMirror(deployment=d, percent=p) for d, p in mirrors)
            what = f"canary {weight}%" + (f", mirroring {mirror:g}%" if mirrors else "")
            try:
                await self._stub.UpdateRoute(
                    rpb.UpdateRouteRequest(
                        route=route,
                        update_mask=field_mask_pb2.FieldMask(paths=["backends", "mirrors"]),
                        reason=f"{r.name}: {what}",
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:  # someone else changed the route: read it again
                    raise
        if r.applied_weight != weight or abs(r.applied_mirror_percent - (mirror if mirrors else 0.0)) > 1e-9:
            r = await self._status(
                r,
                f"applied canary weight {weight}%",
                applied_weight=weight,
                applied_mirror_percent=mirror if mirrors else 0.0,
            )
        return r

    # --- one rollout ------------------------------------------------------------------

    async def _step(self, r: rpb.Rollout, d: _Driver) -> None:
        now = self._clock()
        if r.state in ENDED:
            await self._apply(r, 100 if r.state == R.STATE_PROMOTED else 0, 0.0)
            return
        try:
            await self._advance(r, d, now)
        except RouteLockedError:
            if "locked" not in d.logged:
                d.logged.add("locked")
                await self._status(r, "route is locked", message=f"waiting: {r.route} is locked (unlock it to go on)")

    async def _advance(self, r: rpb.Rollout, d: _Driver, now: float) -> None:
        if r.state == R.STATE_PENDING:
            r = await self._status(
                r, "rollout started", state=R.STATE_PROGRESSING, current_step=0, step_start_time=_ts(now), message=""
            )
        steps = list(r.steps)
        i = r.current_step
        if i >= len(steps):
            r = await self._apply(r, 100, 0.0)
            await self._status(r, "every step passed", state=R.STATE_PROMOTED, message="promoted: canary takes 100%")
            return
        step = steps[i]
        r = await self._apply(r, step.weight, step.mirror_percent)
        if step.weight == 100 and i == len(steps) - 1:
            await self._status(r, "last step", current_step=len(steps), step_start_time=_ts(now))
            return
        if step.analysis:
            r = await self._window(r, d, step, now)
            if r.state in ENDED:
                return
        if r.state != R.STATE_PROGRESSING:
            return
        start = _secs(r.step_start_time)
        pause = step.pause.ToTimedelta().total_seconds() if step.HasField("pause") else 0.0
        if pause == 0:
            resumed = bool(r.history) and (
                r.history[-1].from_state == R.STATE_PAUSED
                and r.history[-1].to_state == R.STATE_PROGRESSING
                and r.history[-1].step == i
            )
            if not resumed:
                await self._status(
                    r,
                    f"step {i} holds until resumed",
                    state=R.STATE_PAUSED,
                    message=f"step {i + 1}/{len(steps)} ({step.weight}%) holds until an operator resumes or promotes",
                )
                return
        elif now - start < pause:
            return
        if step.analysis and pause > 0 and not self._passed(r, i, start, pause):
            return
        d.window = None
        d.inconclusive = 0
        await self._status(
            r, f"step {i + 1}/{len(steps)} passed", current_step=i + 1, step_start_time=_ts(now), message=""
        )

    def _passed(self, r: rpb.Rollout, i: int, start: float, pause: float) -> bool:
        """The step's last windows covering its pause all passed (an inconclusive one holds the step)."""
        window = r.analysis.window.ToTimedelta().total_seconds() or 10.0
        need = max(1, int(pause // window))
        mine = [w for w in r.windows if w.step == i and _secs(w.start_time) >= start - 1e-3]
        recent = mine[-need:]
        return len(recent) >= need and all(w.verdict == rpb.Measurement.VERDICT_PASS for w in recent)

    # --- analysis windows ---------------------------------------------------------------

    async def _deployments(self, r: rpb.Rollout) -> tuple[rpb.Deployment, rpb.Deployment]:
        canary, stable = await asyncio.gather(
            self._stub.GetDeployment(rpb.GetDeploymentRequest(name=r.canary_deployment), timeout=RPC_TIMEOUT_S),
            self._stub.GetDeployment(rpb.GetDeploymentRequest(name=r.stable_deployment), timeout=RPC_TIMEOUT_S),
        )
        return canary.deployment, stable.deployment

    async def _sample(self, r: rpb.Rollout, step: int, now: float) -> _OpenWindow:
        canary, stable = await self._deployments(r)
        w = _OpenWindow(step, now, None, None, None, None)
        try:
            calls = await envoy_calls(self._http, self._admins(), [_id(canary.name), _id(stable.name)])
            w.canary, w.stable = calls[_id(canary.name)], calls[_id(stable.name)]
            if canary.metrics_url and stable.metrics_url:
                w.canary_service, w.stable_service = await asyncio.gather(
                    service_calls(self._http, canary.metrics_url), service_calls(self._http, stable.metrics_url)
                )
        except MetricsUnavailable as exc:
            w.error = str(exc)
        return w

    async def _window(self, r: rpb.Rollout, d: _Driver, step: rpb.RolloutStep, now: float) -> rpb.Rollout:
        length = r.analysis.window.ToTimedelta().total_seconds() or 10.0
        if d.window is None or d.window.step != r.current_step:
            if d.window and d.window.golden:
                d.window.golden.cancel()
            d.window = await self._sample(r, r.current_step, now)
            if self._golden and r.analysis.golden_set:
                canary, stable = await self._deployments(r)
                d.window.golden = asyncio.create_task(self._golden(r, canary, stable))
            return r
        if now - d.window.start < length:
            return r
        opened = d.window
        closed = await self._sample(r, r.current_step, now)
        d.window = closed
        if self._golden and r.analysis.golden_set:
            canary, stable = await self._deployments(r)
            closed.golden = asyncio.create_task(self._golden(r, canary, stable))
        verdict, measurements, source = await self._judge(r, step, opened, closed)
        window = rpb.AnalysisWindow(
            start_time=_ts(opened.start),
            end_time=_ts(now),
            step=r.current_step,
            verdict=_VERDICT[verdict],
            source=source,
            measurements=[
                rpb.Measurement(
                    metric=m.metric,
                    canary=m.canary,
                    stable=m.stable,
                    threshold=m.threshold,
                    verdict=_VERDICT[m.verdict],
                    detail=m.detail[:1000],  # the registry's limit
                )
                for m in measurements
            ],
        )
        if verdict == Verdict.FAIL:
            failed = "; ".join(m.detail for m in measurements if m.verdict == Verdict.FAIL)
            _log.warning("%s: analysis failed, rolling back: %s", r.name, failed)
            r = await self._status(
                r,
                f"analysis failed: {failed}",
                [window],
                state=R.STATE_ROLLED_BACK,
                message=f"rolled back: {failed}"[:1000],
            )
            return await self._apply(r, 0, 0.0)
        if verdict == Verdict.INCONCLUSIVE:
            d.inconclusive += 1
        else:
            d.inconclusive = 0
        limit = r.analysis.inconclusive_limit or 6
        if d.inconclusive >= limit and r.state == R.STATE_PROGRESSING:
            d.inconclusive = 0
            return await self._status(
                r,
                f"{limit} inconclusive windows",
                [window],
                state=R.STATE_PAUSED,
                message=f"paused: {limit} analysis windows in a row were inconclusive (too little traffic?)",
            )
        return await self._status(r, f"analysis window: {verdict}", [window])

    async def _judge(
        self, r: rpb.Rollout, step: rpb.RolloutStep, a: _OpenWindow, b: _OpenWindow
    ) -> tuple[Verdict, list[Measurement], str]:
        t = Thresholds(
            min_requests=r.analysis.min_requests or 20,
            max_error_rate=r.analysis.max_error_rate or 0.01,
            max_error_rate_margin=r.analysis.max_error_rate_margin or 0.005,
            max_latency_ratio=r.analysis.max_latency_ratio or 3.0,
            max_cost_ratio=r.analysis.max_cost_ratio or 2.0,
            max_golden_drop=r.analysis.max_golden_drop or 0.1,
            latency_slack_s=r.analysis.latency_slack_seconds or 0.25,
        )
        if a.error or b.error or a.canary is None or b.canary is None or a.stable is None or b.stable is None:
            if a.golden is not None:
                a.golden.cancel()
            m = Measurement("requests", 0, 0, t.min_requests, Verdict.INCONCLUSIVE, f"metrics: {a.error or b.error}")
            return Verdict.INCONCLUSIVE, [m], "none"
        service = None
        if a.canary_service and b.canary_service and a.stable_service and b.stable_service:
            service = (
                Window.between(a.canary_service, b.canary_service),
                Window.between(a.stable_service, b.stable_service),
            )
        if self._prometheus:  # the queries the Kubernetes AnalysisTemplates use, over the same interval
            try:
                span = b.start - a.start
                canary, stable = await asyncio.gather(
                    *(
                        prometheus_window(self._http, self._prometheus, _id(dep), span, b.start)
                        for dep in (r.canary_deployment, r.stable_deployment)
                    )
                )
            except MetricsUnavailable as exc:
                m = Measurement("requests", 0, 0, t.min_requests, Verdict.INCONCLUSIVE, f"metrics: {exc}")
                return Verdict.INCONCLUSIVE, [m], "none"
            source = "prometheus"
        elif step.weight == 0 and service is not None:  # shadow: only the deployments see the mirrored calls
            canary, stable = service
            source = "service"
        else:
            canary, stable = Window.between(a.canary, b.canary), Window.between(a.stable, b.stable)
            if service is not None:  # cost per request: tokens are counted by the deployments themselves
                canary = Window(canary.requests, canary.errors, canary.buckets, _tokens_scaled(service[0], canary))
                stable = Window(stable.requests, stable.errors, stable.buckets, _tokens_scaled(service[1], stable))
            source = "envoy"
        verdict, measurements = judge(canary, stable, t)
        if verdict == Verdict.FAIL or a.golden is None:  # a failing canary never waits for its goldens
            return verdict, measurements, source
        verdict, measurements = judge(canary, stable, t, await self._golden_result(a.golden))
        return verdict, measurements, source

    async def _golden_result(self, task: asyncio.Task[Golden]) -> Golden:
        """The window's golden run, given GOLDEN_GRACE_S past the window's end; late or broken is inconclusive."""
        try:
            return await asyncio.wait_for(asyncio.shield(task), GOLDEN_GRACE_S)
        except TimeoutError:
            task.cancel()
            return Golden(None, None, f"the golden run did not finish within the window (+{GOLDEN_GRACE_S:g} s)")
        except asyncio.CancelledError:
            if task.cancelled():
                return Golden(None, None, "the golden run was cancelled")
            raise
        except Exception as exc:  # never a pass
            return Golden(None, None, f"the golden run failed: {exc!r}")


def _tokens_scaled(service: Window, calls: Window) -> float | None:
    """Tokens the deployment generated per request it served, times the requests Envoy counted."""
    if service.tokens is None or not service.requests:
        return None
    return service.tokens / service.requests * calls.requests


class RouteLockedError(Exception):
    """The rollout's route is locked: rollouts leave it alone."""

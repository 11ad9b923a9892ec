"""What rollout analysis measures, read from the real data plane and the services.

Two sources of cumulative counters per deployment, each turned into a window by the
difference of two samples (a counter that went down was reset by a restart, and counts
from zero, as Prometheus' increase() does):

- Envoy: every Envoy that routes to the deployment (the edge for gateways, the callers'
  sidecars for the rest) counts the calls it sent there, per final gRPC status
  (`cluster.d.<deployment>.grpc.<service>.<method>.<code>`, the grpc_stats filter), and
  their latency (`upstream_rq_time`). This is what callers saw, the canary's sidecar
  included, so a fault injected there is counted.
- The deployment's own Prometheus metrics (Deployment.metrics_url): RPCs by final code,
  their duration, and tokens generated. Mirrored (shadow) requests are only visible here:
  Envoy discards their responses before any filter sees a status.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mesh.envoy.config import SERVER_ERROR_GRPC_CODES

#: gRPC status names of SERVER_ERROR_GRPC_CODES, as the services' metrics label them
SERVER_ERROR_NAMES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
_GRPC_STAT = re.compile(r"^cluster\.d\.(?P<dep>[a-z][a-z0-9-]*)\.grpc\.(?P<svc>.+)\.(?P<method>[^.]+)\.(?P<code>\d+)$")
SCRAPE_TIMEOUT_S = 3.0


class MetricsUnavailable(Exception):
    """A source could not be read (the window is then inconclusive, never a pass)."""


@dataclass(frozen=True)
class Calls:
    """Cumulative calls to one deployment: completed, failed by the server, and their latency histogram."""

    requests: float = 0.0
    errors: float = 0.0
    #: (upper bound in seconds, cumulative count), ascending, ending with +Inf
    buckets: tuple[tuple[float, float], ...] = ()
    #: tokens generated (prompt + completion); None when the source does not count them
    tokens: float | None = None

    def __add__(self, other: Calls) -> Calls:
        merged: dict[float, float] = {}
        for le, n in (*self.buckets, *other.buckets):
            merged[le] = merged.get(le, 0.0) + n
        tokens = None if self.tokens is None and other.tokens is None else (self.tokens or 0.0) + (other.tokens or 0.0)
        return Calls(self.requests + other.requests, self.errors + other.errors, tuple(sorted(merged.items())), tokens)


def _increase(before: float, after: float) -> float:
    return after if after < before else after - before


@dataclass(frozen=True)
class Window:
    """Calls to one deployment between two samples."""

    requests: float
    errors: float
    buckets: tuple[tuple[float, float], ...] = ()
    tokens: float | None = None

    @classmethod
    def between(cls, before: Calls, after: Calls) -> Window:
        reset = after.requests < before.requests
        old = dict(before.buckets) if not reset else {}
        buckets = tuple((le, _increase(old.get(le, 0.0), n)) for le, n in after.buckets)
        tokens = None
        if after.tokens is not None:
            tokens = _increase(before.tokens or 0.0, after.tokens) if not reset else after.tokens
        if reset:
            return cls(after.requests, after.errors, buckets, tokens)
        return cls(_increase(before.requests, after.requests), _increase(before.errors, after.errors), buckets, tokens)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        """Latency quantile by linear interpolation within buckets (Prometheus' histogram_quantile)."""
        if not self.buckets:
            return math.nan
        total = self.buckets[-1][1]
        if total <= 0:
            return math.nan
        rank = q * total
        prev_le, prev_n = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return prev_le  # in the open-ended bucket: the highest finite bound, as Prometheus does
                if n == prev_n:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
            prev_le, prev_n = le, n
        return prev_le

    @property
    def cost_per_request(self) -> float | None:
        if self.tokens is None or not self.requests:
            return None
        return self.tokens / self.requests


async def _get(client: httpx.AsyncClient, url: str, **params: str) -> httpx.Response:
    try:
        resp = await client.get(url, params=params, timeout=SCRAPE_TIMEOUT_S)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise MetricsUnavailable(f"{url}: {exc}") from None
    return resp


async def envoy_calls(
    client: httpx.AsyncClient, admin_urls: Iterable[str], deployments: Sequence[str]
) -> dict[str, Calls]:
    """Calls Envoys sent to each deployment (by id), summed over every Envoy at `admin_urls`."""
    alt = "|".join(re.escape(d) for d in deployments)
    totals = {d: Calls() for d in deployments}

    async def one(url: str) -> dict[str, Calls]:
        counters = (await _get(client, f"{url}/stats", format="json", filter=rf"^cluster\.d\.({alt})\.grpc\.")).json()
        requests = {d: 0.0 for d in deployments}
        errors = {d: 0.0 for d in deployments}
        for entry in counters.get("stats", []):
            m = _GRPC_STAT.match(entry.get("name", ""))
            if m is None or m["dep"] not in requests or "value" not in entry:
                continue
            requests[m["dep"]] += entry["value"]
            if int(m["code"]) in SERVER_ERROR_GRPC_CODES:
                errors[m["dep"]] += entry["value"]
        text = (await _get(client, f"{url}/stats/prometheus", filter=rf"^cluster\.d\.({alt})\.upstream_rq_time$")).text
        buckets: dict[str, dict[float, float]] = {d: {} for d in deployments}
        # Envoy's tag extractor takes the cluster name up to its first dot: "d.<id>" becomes the
        # label envoy_cluster_name="d" and the id moves into the metric name ('-' as '_')
        families = {f"envoy_cluster_{d.replace('-', '_')}_upstream_rq_time": d for d in deployments}
        for family in text_string_to_metric_families(text):
            dep = families.get(family.name, "")
            for s in family.samples:
                if s.name.endswith("_bucket") and dep in buckets:
                    le = float(s.labels["le"]) / 1000.0  # Envoy's upstream_rq_time is in milliseconds
                    buckets[dep][le] = buckets[dep].get(le, 0.0) + s.value
        return {d: Calls(requests[d], errors[d], tuple(sorted(buckets[d].items()))) for d in deployments}

    for part in await asyncio.gather(*(one(u) for u in admin_urls)):
        for d, calls in part.items():
            totals[d] = totals[d] + calls
    return totals


@dataclass
class _Service:
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    tokens: float = 0.0


async def service_calls(client: httpx.AsyncClient, metrics_url: str) -> Calls:
    """The RPCs a deployment's own server completed (health checks aside), and the tokens it generated."""
    text = (await _get(client, metrics_url)).text
    out = _Service()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("service", "").startswith("grpc."):
                continue  # health checks and reflection are not traffic
            if s.name == "servemesh_grpc_server_requests_total":
                out.requests += s.value
                if s.labels.get("code") in SERVER_ERROR_NAMES:
                    out.errors += s.value
            elif s.name == "servemesh_grpc_server_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                out.buckets[le] = out.buckets.get(le, 0.0) + s.value
            elif s.name == "servemesh_generation_tokens_total":
                out.tokens += s.value
    return Calls(out.requests, out.errors, tuple(sorted(out.buckets.items())), out.tokens)

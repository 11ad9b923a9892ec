"""Rollout analysis read from the Prometheus HTTP API, with the queries AnalysisTemplates use.

A third source beside mesh.controller.metrics: the deployments' own metrics (the ones
`service_calls` reads from Deployment.metrics_url), as a Prometheus server scraped them.
Prometheus finds the deployments through file-based service discovery: `write_file_sd`
turns the registry's deployments into the `targets.json` that deploy/prometheus/prometheus.yml
reads, and every target carries the label `deployment="<id>"` that the queries select on
(in Kubernetes, relabelling the pod label gives the same label).

The queries live here once, as templates (QUERIES), so the Argo Rollouts AnalysisTemplates
written from them later ask Prometheus exactly what this controller asks. `render` fills the
two placeholders, `{deployment}` (a deployment id) and `{window}` (a PromQL duration such as
`10s`); pass Argo's `{{args.deployment}}` as the deployment to get an AnalysisTemplate's query.

What Prometheus' increase() does to a window, unlike the difference of two samples:

- It extrapolates from the first and last samples inside the window to its edges, so counts
  are estimates, not integers, and a series needs two samples in the window to count at all
  (with the 2 s scrape interval of deploy/prometheus, a 10 s window holds about five).
- It takes a series' first sample as its starting point: a series born inside the window
  (a method's first INTERNAL error, say) loses what it counted before its first scrape. The
  direct sources count such a series from zero.
- It treats a counter that went down as reset by a restart, as `Window.between` does.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import grpc
import httpx
from servemesh.registry.v1 import registry_pb2

from mesh.controller.metrics import SCRAPE_TIMEOUT_S, SERVER_ERROR_NAMES, MetricsUnavailable, Window

#: Placeholders of the query templates.
DEPLOYMENT, WINDOW = "{deployment}", "{window}"

#: RPCs the deployment's servers completed: its own gRPC services only. The interceptor labels
#: `service` with the full gRPC service name, so health checks (grpc.health.v1.Health) and
#: reflection (grpc.reflection.*) are the `grpc.` ones (a regex matcher is anchored).
_RPCS = 'deployment="{deployment}",service!~"grpc\\\\..*"'
#: mesh.controller.metrics' server error codes, by code number:
#: UNKNOWN|DEADLINE_EXCEEDED|INTERNAL|UNAVAILABLE|DATA_LOSS
SERVER_ERROR_REGEX = "|".join(sorted(SERVER_ERROR_NAMES, key=lambda name: grpc.StatusCode[name].value[0]))

#: Requests completed in the window (any final code).
REQUESTS_QUERY = "sum(increase(servemesh_grpc_server_requests_total{" + _RPCS + "}[{window}]))"
#: Requests in the window that ended with a server error code.
ERRORS_QUERY = (
    "sum(increase(servemesh_grpc_server_requests_total{" + _RPCS + ',code=~"' + SERVER_ERROR_REGEX + '"}[{window}]))'
)
#: Cumulative latency histogram of the window's requests: one result per `le` (seconds).
LATENCY_BUCKETS_QUERY = (
    "sum by (le) (increase(servemesh_grpc_server_request_duration_seconds_bucket{" + _RPCS + "}[{window}]))"
)
#: Tokens (prompt + completion) of generations finished in the window; no result when the
#: deployment counts no tokens (today only gateways do: services.common.metrics.GenerationMetrics).
TOKENS_QUERY = 'sum(increase(servemesh_generation_tokens_total{deployment="{deployment}"}[{window}]))'

#: Every analysis query by the metric name AnalysisTemplates give it.
QUERIES: dict[str, str] = {
    "requests": REQUESTS_QUERY,
    "errors": ERRORS_QUERY,
    "latency-buckets": LATENCY_BUCKETS_QUERY,
    "tokens": TOKENS_QUERY,
}

#: Target labels written by `file_sd_targets`. The registry's service and version are not
#: labelled `service` and `version`: the RPC metrics' own `service` label (the gRPC service)
#: and python_info's `version` would then be renamed `exported_*` at scrape time, and the
#: health-check matcher above would test the target's label instead of the RPC's.
DEPLOYMENT_LABEL, SERVICE_LABEL, VERSION_LABEL = "deployment", "deployment_service", "deployment_version"


def promql_duration(seconds: float) -> str:
    """The PromQL spelling of a positive duration, to the millisecond: 10 -> "10s", 2.5 -> "2500ms"."""
    ms = round(seconds * 1000)
    if not math.isfinite(seconds) or ms <= 0:
        raise ValueError(f"window must be at least 1 ms; got {seconds!r} s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def promql_string(value: str) -> str:
    """`value` escaped for the inside of a double-quoted PromQL string (Go's escapes)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def render(template: str, *, deployment: str, window: str) -> str:
    """A query template with its placeholders filled; `window` is a PromQL duration ("10s")."""
    return template.replace(DEPLOYMENT, promql_string(deployment)).replace(WINDOW, window)


async def _query(client: httpx.AsyncClient, base_url: str, query: str, at: float, timeout_s: float) -> list[Any]:
    """The vector an instant query returns, or MetricsUnavailable saying why not."""
    url = f"{base_url.rstrip('/')}/api/v1/query"
    where = f"Prometheus at {base_url}"
    try:
        resp = await client.get(url, params={"query": query, "time": f"{at:.3f}"}, timeout=timeout_s)
    except httpx.TimeoutException:
        raise MetricsUnavailable(f"{where}: no answer within {timeout_s:g} s (query {query})") from None
    except httpx.HTTPError as exc:
        raise MetricsUnavailable(f"{where}: {type(exc).__name__}: {exc} (query {query})") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "status" not in body:
        raise MetricsUnavailable(
            f"{where}: HTTP {resp.status_code} from {url}, not a Prometheus API response: {resp.text[:200]!r}"
        )
    if body["status"] != "success" or resp.is_error:
        raise MetricsUnavailable(
            f"{where}: HTTP {resp.status_code}, {body.get('errorType', body['status'])}: "
            f"{body.get('error', '')} (query {query})"
        )
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise MetricsUnavailable(f"{where}: expected a vector, got {data.get('resultType')!r} (query {query})")
    return list(data.get("result") or [])


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def _buckets(samples: Iterable[dict[str, Any]]) -> tuple[tuple[float, float], ...]:
    """(le, count) ascending, made monotonic as histogram_quantile does (increase() extrapolates
    each bucket on its own, so a higher bucket can come out a hair lower)."""
    raw = sorted((float(s["metric"]["le"]), _value(s)) for s in samples if "le" in s.get("metric", {}))
    out: list[tuple[float, float]] = []
    highest = 0.0
    for le, n in raw:
        if math.isnan(n):
            continue
        highest = max(highest, n)
        out.append((le, highest))
    return tuple(out)


async def prometheus_window(
    client: httpx.AsyncClient,
    base_url: str,
    deployment: str,
    window_s: float,
    at: float | None = None,
    *,
    timeout_s: float = SCRAPE_TIMEOUT_S,
) -> Window:
    """The deployment's calls in the `window_s` seconds up to `at` (Unix seconds; now if None),
    by the QUERIES, evaluated by the Prometheus server at `base_url` (e.g. http://127.0.0.1:9090).

    No series means no calls: 0 requests, 0 errors, no buckets; tokens is None when the
    deployment has no token series. Raises MetricsUnavailable naming `base_url` when Prometheus
    cannot be reached or does not answer within `timeout_s`, or answers with an error.
    """
    window = promql_duration(window_s)
    when = time.time() if at is None else at  # one instant for all four queries
    queries = [render(QUERIES[name], deployment=deployment, window=window) for name in QUERIES]
    results = await asyncio.gather(
        *(_query(client, base_url, q, when, timeout_s) for q in queries), return_exceptions=True
    )
    for r in results:
        if isinstance(r, BaseException):
            raise r
    requests, errors, buckets, tokens = cast(list[list[Any]], results)
    return Window(
        requests=sum(_value(s) for s in requests),
        errors=sum(_value(s) for s in errors),
        buckets=_buckets(buckets),
        tokens=sum(_value(s) for s in tokens) if tokens else None,
    )


def _deployment_id(name: str) -> str:
    return name.removeprefix("deployments/")


def file_sd_targets(deployments: Iterable[registry_pb2.Deployment]) -> list[dict[str, Any]]:
    """Prometheus file_sd entries for the deployments with a metrics_url, ordered by id: the
    URL's host:port as target, and labels deployment (the id), deployment_service,
    deployment_version, plus __metrics_path__, __scheme__ and __param_* from the URL."""
    out: list[dict[str, Any]] = []
    for d in sorted(deployments, key=lambda d: d.name):
        if not d.metrics_url:
            continue
        url = urlsplit(d.metrics_url)
        hostport = url.netloc.rpartition("@")[2]  # credentials have no place in a targets file
        if url.port is None:
            hostport = f"{hostport}:{443 if url.scheme == 'https' else 80}"
        labels = {
            DEPLOYMENT_LABEL: _deployment_id(d.name),
            SERVICE_LABEL: d.service,
            VERSION_LABEL: d.version,
            "__metrics_path__": url.path or "/",
            "__scheme__": url.scheme or "http",
        }
        labels.update({f"__param_{k}": v for k, v in parse_qsl(url.query, keep_blank_values=True)})
        out.append({"targets": [hostport], "labels": labels})
    return out


def write_file_sd(path: str | os.PathLike[str], deployments: Iterable[registry_pb2.Deployment]) -> bool:
    """Write `file_sd_targets(deployments)` to `path` atomically (a reader sees the old file or
    the new one, never half of one). Returns False, and leaves the file alone, when it already
    says the same (Prometheus re-reads it on every change)."""
    path = Path(path)
    text = json.dumps(file_sd_targets(deployments), indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # Prometheus may run as its own user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True

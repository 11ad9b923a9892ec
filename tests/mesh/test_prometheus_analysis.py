"""Rollout analysis from a real Prometheus server scraping real prometheus_client endpoints.

Prometheus (the Debian package, `make system`) discovers two endpoints playing a stable and
a canary inference deployment, plus a rerank deployment, through the targets.json that
write_file_sd writes; the endpoints serve the services' own metric classes. Every series
exists at zero before Prometheus' first scrape and the window is evaluated at the time of
the last scrape and reaches back past the first, so increase() has nothing to extrapolate
and the counts come out exact: no tolerance to tune, no race with the scrape schedule.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from servemesh.registry.v1 import registry_pb2 as rpb

from mesh.controller.analysis import Thresholds, Verdict, judge
from mesh.controller.metrics import Calls, MetricsUnavailable, Window, service_calls
from mesh.controller.prometheus import (
    QUERIES,
    _query,
    file_sd_targets,
    prometheus_window,
    promql_duration,
    render,
    write_file_sd,
)
from mesh.launcher import free_port
from services.common.metrics import (
    GenerationMetrics,
    ServerMetrics,
    new_registry,
    start_metrics_server,
    stop_metrics_server,
)

ROOT = Path(__file__).resolve().parents[2]
INFERENCE = "servemesh.inference.v1.InferenceService"
RERANK = "servemesh.rerank.v1.RerankService"
HEALTH = "grpc.health.v1.Health"
#: reaches back past every sample of this module's short-lived Prometheus
WHOLE_RUN_S = 600.0
WAIT_S = 30.0


def _binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).is_file():
        pytest.fail(f"{name} not found: install the Debian package prometheus (`make system`)", pytrace=False)
    return path


@dataclass
class Endpoint:
    """One deployment's /metrics: the services' metric classes on their own registry."""

    deployment: rpb.Deployment
    registry: CollectorRegistry
    server: ServerMetrics
    generation: GenerationMetrics | None
    stop: Callable[[], None]

    @property
    def id(self) -> str:
        return self.deployment.name.removeprefix("deployments/")


def _endpoint(dep_id: str, service: str, version: str, grpc_service: str, *, generates: bool) -> Endpoint:
    registry = new_registry()
    server = ServerMetrics(registry)
    generation = GenerationMetrics(registry) if generates else None
    # Every series exists at zero before the first scrape: increase() takes a series' first
    # sample as its start, so a series born with a value loses it (see mesh.controller.prometheus).
    for svc, method, code in [
        (grpc_service, "Generate", "OK"),
        (grpc_service, "Generate", "INTERNAL"),
        (HEALTH, "Check", "OK"),
        (HEALTH, "Check", "UNAVAILABLE"),
    ]:
        server.requests.labels(svc, method, code)
        server.duration.labels(svc, method, code)
    if generation is not None:
        for kind in ("prompt", "completion"):
            generation.tokens.labels("chat_short", "vllm", kind)
    http, port = start_metrics_server(registry, "127.0.0.1", free_port())
    dep = rpb.Deployment(
        name=f"deployments/{dep_id}",
        service=service,
        version=version,
        endpoint=f"127.0.0.1:{free_port()}",
        metrics_url=f"http://127.0.0.1:{port}/metrics",
    )
    return Endpoint(dep, registry, server, generation, lambda: stop_metrics_server(http))


@dataclass
class Mesh:
    prometheus: str  # base URL
    stable: Endpoint
    canary: Endpoint
    rerank: Endpoint
    log: Path


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    binary = _binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    endpoints = [
        _endpoint("inference-stable", "inference", "stable", INFERENCE, generates=True),
        _endpoint("inference-canary", "inference", "canary", INFERENCE, generates=True),
        _endpoint("rerank-stable", "rerank", "stable", RERANK, generates=False),
    ]
    no_metrics = rpb.Deployment(name="deployments/retrieval", service="retrieval", version="stable", endpoint="x:1")
    proc: subprocess.Popen[bytes] | None = None
    log = tmp / "prometheus.log"
    try:
        assert write_file_sd(tmp / "targets.json", [*(e.deployment for e in endpoints), no_metrics])
        (tmp / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: servemesh\n    file_sd_configs:\n      - files: [targets.json]\n"
        )
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
            try:
                if httpx.get(f"{base}/-/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready at {base} within {WAIT_S:g} s:\n{_tail(log)}", pytrace=False)
            time.sleep(0.1)
        yield Mesh(base, *endpoints, log=log)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for e in endpoints:
            e.stop()


async def _instant(client: httpx.AsyncClient, base: str, query: str) -> list[dict[str, Any]]:
    resp = await client.get(f"{base}/api/v1/query", params={"query": query}, timeout=5.0)
    resp.raise_for_status()
    return list(resp.json()["data"]["result"])


async def _wait_until(check: Callable[[], Awaitable[bool]], what: str, mesh: Mesh, timeout_s: float = WAIT_S) -> None:
    """Poll `check` until it holds; fail naming `what` (and Prometheus' log) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s:g} s for {what}; prometheus log:\n{_tail(mesh.log)}", pytrace=False)
        await asyncio.sleep(0.2)


async def _last_scrape(client: httpx.AsyncClient, mesh: Mesh, dep_id: str) -> float:
    """Unix time of the latest sample Prometheus holds for the deployment's RPC counters."""
    result = await _instant(client, mesh.prometheus, f'max(timestamp(up{{deployment="{dep_id}"}}))')
    return float(result[0]["value"][1]) if result else 0.0


def _drive(mesh: Mesh) -> None:
    """Stable: 100 fast OK calls. Canary: 100 calls, 5 of them INTERNAL, slower. Both: health
    checks that must not count, failing ones included. Rerank: 30 calls, no tokens."""
    stable, canary = mesh.stable, mesh.canary
    assert stable.generation is not None and canary.generation is not None
    for _ in range(100):
        stable.server.finished(INFERENCE, "Generate", "OK", 0.02)
        stable.generation.finished("chat_short", "vllm", 10, 20)
    for i in range(100):
        if i < 5:
            canary.server.finished(INFERENCE, "Generate", "INTERNAL", 1.5)
        else:
            canary.server.finished(INFERENCE, "Generate", "OK", 0.3 if i < 10 else 0.04)
            canary.generation.finished("chat_short", "vllm", 10, 45)
    for e in (stable, canary):
        for _ in range(50):
            e.server.finished(HEALTH, "Check", "OK", 0.0005)
        for _ in range(7):
            e.server.finished(HEALTH, "Check", "UNAVAILABLE", 5.0)
    for _ in range(30):
        mesh.rerank.server.finished(RERANK, "Generate", "OK", 0.01)


async def test_canary_against_stable_from_a_real_prometheus(mesh: Mesh) -> None:
    endpoints = (mesh.stable, mesh.canary, mesh.rerank)
    async with httpx.AsyncClient() as client:
        # Prometheus took the targets (and their labels) from write_file_sd's file and scraped them
        async def all_up() -> bool:
            up = await _instant(client, mesh.prometheus, 'up{job="servemesh"} == 1')
            return {s["metric"].get("deployment") for s in up} == {e.id for e in endpoints}

        await _wait_until(all_up, "a first successful scrape of all three targets", mesh)
        targets = (await client.get(f"{mesh.prometheus}/api/v1/targets")).json()["data"]["activeTargets"]
        by_dep = {t["labels"]["deployment"]: t for t in targets}
        assert by_dep["inference-canary"]["labels"]["deployment_service"] == "inference"
        assert by_dep["inference-canary"]["labels"]["deployment_version"] == "canary"
        assert by_dep["inference-canary"]["scrapeUrl"] == mesh.canary.deployment.metrics_url
        assert "retrieval" not in by_dep  # no metrics_url, no target

        _drive(mesh)
        driven = time.time()
        last: dict[str, float] = {}

        async def scraped_after_drive() -> bool:
            for e in endpoints:
                last[e.id] = await _last_scrape(client, mesh, e.id)
            return all(ts > driven for ts in last.values())

        await _wait_until(scraped_after_drive, "a scrape of every target after the counters were driven", mesh)

        # the services' `service` label survives the scrape (no target label collides with it)
        services = await _instant(
            client,
            mesh.prometheus,
            'count by (service) (servemesh_grpc_server_requests_total{deployment="inference-canary"})',
        )
        assert {s["metric"]["service"] for s in services} == {INFERENCE, HEALTH}

        # At the last scrape, over a window reaching past the first one: exact counts
        stable = await prometheus_window(client, mesh.prometheus, mesh.stable.id, WHOLE_RUN_S, last[mesh.stable.id])
        canary = await prometheus_window(client, mesh.prometheus, mesh.canary.id, WHOLE_RUN_S, last[mesh.canary.id])
        assert (stable.requests, stable.errors, stable.tokens) == (100, 0, 3000)
        assert (canary.requests, canary.errors, canary.tokens) == (100, 5, 95 * 55)
        assert stable.buckets[-1] == (math.inf, 100) and canary.buckets[-1] == (math.inf, 100)
        assert dict(stable.buckets)[0.025] == 100 and dict(stable.buckets)[0.01] == 0
        assert dict(canary.buckets)[0.05] == 90 and dict(canary.buckets)[0.5] == 95 and dict(canary.buckets)[1.0] == 95
        assert stable.quantile(0.99) <= 0.025 < 1.0 < canary.quantile(0.99) <= 2.5

        # the same numbers the controller reads straight from each /metrics today
        for e, w in ((mesh.stable, stable), (mesh.canary, canary)):
            direct = Window.between(Calls(), await service_calls(client, e.deployment.metrics_url))
            assert w == direct, f"{e.id}: prometheus {w} != /metrics {direct}"

        verdict, measurements = judge(canary, stable, Thresholds())
        assert verdict == Verdict.FAIL
        failed = {m.metric for m in measurements if m.verdict == Verdict.FAIL}
        assert failed == {"error_rate", "latency_p99_s"}, measurements

        # a deployment that counts no tokens, and one Prometheus has never seen
        rerank = await prometheus_window(client, mesh.prometheus, mesh.rerank.id, WHOLE_RUN_S, last[mesh.rerank.id])
        assert (rerank.requests, rerank.errors, rerank.tokens) == (30, 0, None)
        assert rerank.buckets[-1] == (math.inf, 30)
        ghost = await prometheus_window(client, mesh.prometheus, "inference-ghost", 10)
        assert ghost == Window(0.0, 0.0, (), None)

        # Now (at=None): increase() extrapolates to the window's end, by the same factor for
        # every series of a target (same scrape times), so the counts may grow but ratios hold.
        now = await prometheus_window(client, mesh.prometheus, mesh.canary.id, WHOLE_RUN_S)
        assert now.requests >= 100 and now.error_rate == pytest.approx(0.05, rel=1e-9)
        assert now.cost_per_request == pytest.approx(canary.cost_per_request, rel=1e-9)


async def test_a_prometheus_that_is_down_is_unavailable_naming_its_url() -> None:
    base = f"http://127.0.0.1:{free_port()}"
    async with httpx.AsyncClient() as client:
        with pytest.raises(MetricsUnavailable, match=f"Prometheus at {base}:.*ConnectError"):
            await prometheus_window(client, base, "inference-canary", 10)


async def test_a_prometheus_that_does_not_answer_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with httpx.AsyncClient() as client:
            with pytest.raises(MetricsUnavailable, match=f"Prometheus at {base}: no answer within 0.3 s"):
                await prometheus_window(client, base, "inference-canary", 10, timeout_s=0.3)


async def test_errors_and_non_prometheus_answers_are_unavailable(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        not_prom = mesh.stable.deployment.metrics_url.removesuffix("/metrics")  # a /metrics endpoint, not the API
        with pytest.raises(MetricsUnavailable, match=f"Prometheus at {not_prom}: HTTP 200 .*not a Prometheus API"):
            await prometheus_window(client, not_prom, "inference-canary", 10)
        with pytest.raises(MetricsUnavailable, match="HTTP 404"):
            await prometheus_window(client, f"{mesh.prometheus}/nope", "inference-canary", 10)
        with pytest.raises(MetricsUnavailable, match=r"HTTP 400, bad_data: .*parse error.*\(query sum\(\)"):
            await _query(client, mesh.prometheus, "sum(", time.time(), 3.0)


def test_queries_are_the_analysis_templates() -> None:
    q = {name: render(t, deployment="inference-canary", window=promql_duration(10)) for name, t in QUERIES.items()}
    rpcs = 'deployment="inference-canary",service!~"grpc\\\\..*"'
    assert q == {
        "requests": f"sum(increase(servemesh_grpc_server_requests_total{{{rpcs}}}[10s]))",
        "errors": f"sum(increase(servemesh_grpc_server_requests_total{{{rpcs},"
        'code=~"UNKNOWN|DEADLINE_EXCEEDED|INTERNAL|UNAVAILABLE|DATA_LOSS"}[10s]))',
        "latency-buckets": "sum by (le) (increase(servemesh_grpc_server_request_duration_seconds_bucket"
        f"{{{rpcs}}}[10s]))",
        "tokens": 'sum(increase(servemesh_generation_tokens_total{deployment="inference-canary"}[10s]))',
    }
    # an AnalysisTemplate's query: Argo fills its own placeholders
    argo = render(QUERIES["tokens"], deployment="{{args.deployment}}", window="{{args.window}}")
    assert argo == 'sum(increase(servemesh_generation_tokens_total{deployment="{{args.deployment}}"}[{{args.window}}]))'
    assert render(QUERIES["tokens"], deployment='a"b\\', window="1m").count('"a\\"b\\\\"') == 1
    assert [promql_duration(s) for s in (10, 2.5, 300)] == ["10s", "2500ms", "300s"]
    with pytest.raises(ValueError, match="at least 1 ms"):
        promql_duration(0)


def test_file_sd_targets_for_deployments_with_and_without_metrics_url(tmp_path: Path) -> None:
    deployments = [
        rpb.Deployment(
            name="deployments/inference-canary",
            service="inference",
            version="canary",
            endpoint="127.0.0.1:7001",
            metrics_url="http://127.0.0.1:9151/metrics",
        ),
        rpb.Deployment(name="deployments/retrieval", service="retrieval", version="stable", endpoint="127.0.0.1:7002"),
        rpb.Deployment(
            name="deployments/gateway",
            service="gateway",
            version="stable",
            endpoint="gw:443",
            metrics_url="https://gw.internal/admin/metrics?format=prometheus",
        ),
    ]
    expected = [
        {
            "targets": ["gw.internal:443"],
            "labels": {
                "deployment": "gateway",
                "deployment_service": "gateway",
                "deployment_version": "stable",
                "__metrics_path__": "/admin/metrics",
                "__scheme__": "https",
                "__param_format": "prometheus",
            },
        },
        {
            "targets": ["127.0.0.1:9151"],
            "labels": {
                "deployment": "inference-canary",
                "deployment_service": "inference",
                "deployment_version": "canary",
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
            },
        },
    ]
    assert file_sd_targets(deployments) == expected
    assert file_sd_targets([deployments[1]]) == []

    path = tmp_path / "targets.json"
    assert write_file_sd(path, deployments) is True
    assert json.loads(path.read_text()) == expected
    assert path.stat().st_mode & 0o777 == 0o644
    assert write_file_sd(path, deployments) is False  # unchanged: not rewritten
    assert write_file_sd(path, deployments[1:2]) is True and json.loads(path.read_text()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["targets.json"]  # no temporary file left behind


def test_the_deploy_configuration_is_valid() -> None:
    promtool = _binary("promtool")
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    done = subprocess.run([promtool, "check", "config", "--syntax-only", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

"""Prometheus metrics for gRPC servers, and the /metrics HTTP endpoint."""

from __future__ import annotations

from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
    start_http_server,
)

# 1 ms (a cached unary call) .. 120 s (a long generation stream).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class ServerMetrics:
    """Per-RPC server metrics, labelled by short gRPC service name, method and final code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "servemesh_grpc_server_requests_total",
            "RPCs completed by the server, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "servemesh_grpc_server_request_duration_seconds",
            "Time from receiving an RPC to its final status (whole stream for streaming RPCs).",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "servemesh_grpc_server_in_flight",
            "RPCs currently being handled.",
            ["service", "method"],
            registry=registry,
        )

    def started(self, service: str, method: str) -> None:
        self.in_flight.labels(service, method).inc()

    def finished(self, service: str, method: str, code: str, seconds: float) -> None:
        self.in_flight.labels(service, method).dec()
        self.requests.labels(service, method, code).inc()
        self.duration.labels(service, method, code).observe(seconds)


def new_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry, with the process/platform/GC collectors unless told otherwise."""
    registry = CollectorRegistry()
    if process_metrics:
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
    return registry


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve `registry` over HTTP on a daemon thread; port 0 picks a free port. Returns (server, port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_address[1])


def stop_metrics_server(server: WSGIServer) -> None:
    """Stop serving and close the socket (blocks up to ~0.5 s: the serve_forever poll interval)."""
    server.shutdown()
    server.server_close()


# 10 ms .. 60 s: time to first token under load, on CPU and GPU engines.
TTFT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.2, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class RedactionMetrics:
    """PII replaced by placeholders, by type (a fixed set); never the values."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.redactions = Counter(
            "servemesh_gateway_pii_redactions_total",
            "Personal data and secrets replaced by placeholders before any engine, log or cache saw them.",
            ["type"],
            registry=registry,
        )

    def redacted(self, counts: Mapping[str, int]) -> None:
        for kind, n in counts.items():
            self.redactions.labels(kind).inc(n)


class PolicyMetrics:
    """Requests a gateway policy refused, by policy and code, and prompts trimmed to budget."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter(
            "servemesh_gateway_policy_refusals_total",
            "Requests refused before dispatch, by the policy that refused them and the status code.",
            ["policy", "code"],
            registry=registry,
        )
        self.trims = Counter(
            "servemesh_gateway_prompt_trims_total",
            "Requests whose prompt was trimmed to the route class's budget (allow_trim).",
            ["route_class"],
            registry=registry,
        )

    def refused(self, policy: str, code: str) -> None:
        self.refusals.labels(policy, code).inc()

    def trimmed(self, route_class: str) -> None:
        self.trims.labels(route_class).inc()


class SafetyMetrics:
    """Requests refused by the safety policy, by topic (the configured set)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter(
            "servemesh_gateway_safety_refusals_total",
            "Requests answered with the refusal string instead of an engine, by topic.",
            ["topic"],
            registry=registry,
        )

    def refused(self, topic: str) -> None:
        self.refusals.labels(topic).inc()


class GenerationMetrics:
    """What the SLOs are written against: time to first token and tokens, by route class
    and engine (both bounded, configured sets)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "servemesh_generation_time_to_first_token_seconds",
            "Time from receiving a generation request to its first text.",
            ["route_class", "engine"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "servemesh_generation_tokens_total",
            "Tokens of finished generations, by kind (prompt or completion).",
            ["route_class", "engine", "kind"],
            registry=registry,
        )

    def first_token(self, route_class: str, engine: str, seconds: float) -> None:
        self.ttft.labels(route_class, engine).observe(seconds)

    def finished(self, route_class: str, engine: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels(route_class, engine, "prompt").inc(prompt_tokens)
        self.tokens.labels(route_class, engine, "completion").inc(completion_tokens)

"""Build, start and stop a grpc.aio server with the house runtime.

Every server gets: the OpenTelemetry and servemesh interceptors, grpc.health.v1,
server reflection, Prometheus metrics (optionally served over HTTP) and a graceful
stop (NOT_SERVING, then drain in-flight calls up to the grace period).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from services.common import tracing
from services.common.interceptors import ServerInterceptor
from services.common.metrics import ServerMetrics, new_registry, start_metrics_server, stop_metrics_server
from services.common.settings import ServiceSettings

_log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),  # a port clash is an error, not two servers sharing a port
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Accept client keepalive pings (client.py pings every 30 s) without GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Service(NamedTuple):
    """A servicer to register: full gRPC service name, servicer object, generated add function.

    `add_fn(servicer, server)` may be any function with that shape, e.g. one calling
    ``server.add_generic_rpc_handlers(...)`` for a handler without generated code.
    """

    name: str
    servicer: object
    add_fn: Callable[[Any, grpc.aio.Server], None]


class GrpcServer:
    """A built server: start(), stop(grace), serve_until_signal(); ports known after create_server."""

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        settings: ServiceSettings,
        port: int,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        registry: CollectorRegistry,
        metrics: ServerMetrics,
    ) -> None:
        self.server = server
        self.settings = settings
        self.port = port
        self.health = health_servicer
        self.registry = registry
        self.metrics = metrics
        self.metrics_port: int | None = None
        self._service_names = tuple(service_names)
        self._metrics_http: Any = None
        self._started = False
        self._stopping: asyncio.Future[None] | None = None
        self._stop_requested = asyncio.Event()

    @property
    def address(self) -> str:
        if self.settings.unix_socket is not None:
            return f"unix:{self.settings.unix_socket}"
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Start serving, mark every service (and "") SERVING, start the metrics endpoint."""
        if self._started:
            return
        self._started = True
        if self.settings.metrics_port is not None:
            self._metrics_http, self.metrics_port = start_metrics_server(
                self.registry, self.settings.host, self.settings.metrics_port
            )
        await self.server.start()
        for name in ("", *self._service_names):
            await self.health.set(name, SERVING)
        _log.info(
            "serving",
            extra={
                "address": self.address,
                "metrics_port": self.metrics_port,
                "services": list(self._service_names),
            },
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING for all, then server.stop(grace): in-flight calls get up to `grace` s to finish.

        Safe to call more than once; later calls wait for the first one.
        """
        self._stop_requested.set()
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        _log.info("stopping", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._metrics_http is not None:
            await asyncio.to_thread(stop_metrics_server, self._metrics_http)
            self._metrics_http = None
        _log.info("stopped")

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped: True once it has, False if `timeout` passed first."""
        # grpc returns True on *timeout*. Shielded: cancelling grpc's wait would cancel the
        # server's own shutdown future.
        timed_out = await asyncio.shield(self.server.wait_for_termination(timeout))
        return not timed_out

    async def serve_until_signal(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Serve until SIGTERM/SIGINT (or stop()), then stop(settings.grace_period_s); returns once stopped."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:  # handlers stay installed while draining, so a repeated signal does not kill us
            await self._stop_requested.wait()
            await self.stop(self.settings.grace_period_s)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_requested.is_set():
            _log.info("received %s again, already draining", sig.name)
        else:
            _log.info("received %s, draining", sig.name)
        self._stop_requested.set()


async def create_server(
    settings: ServiceSettings,
    services: Sequence[Service],
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Build (not start) a server for `services` bound to settings.host:settings.port.

    `registry` defaults to a fresh one with process metrics; `tracer_provider` to the
    global one (see tracing.configure_tracing); `options` extend/override SERVER_OPTIONS.
    Services behind a sidecar listen in plaintext on loopback; `credentials` (TLS) is for
    the few endpoints Envoy itself dials, such as the control plane.
    """
    registry = registry if registry is not None else new_registry()
    metrics = ServerMetrics(registry)
    server = grpc.aio.server(
        interceptors=[tracing.server_interceptor(tracer_provider), ServerInterceptor(metrics)],
        options=list({**dict(SERVER_OPTIONS), **dict(options)}.items()),
    )
    for service in services:
        service.add_fn(service.servicer, server)

    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [service.name for service in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )

    host = settings.host
    bind = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    if settings.unix_socket is not None:
        bind = f"unix:{settings.unix_socket}"
    port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    return GrpcServer(
        server=server,
        settings=settings,
        port=port,
        health_servicer=health_servicer,
        service_names=names,
        registry=registry,
        metrics=metrics,
    )

"""The mesh's controller process: drives rollouts and computes SLOs, serves SloService.

    python -m mesh.controller.server      # settings from mesh/controller/config/<APP_ENV>.yaml + env

Like the control plane it is a client of the registry (as the `controller` identity) and
listens with mTLS itself (no sidecar) in the mesh; with no certs_dir it runs plaintext
(`servemesh up --no-mesh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import ClassVar

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from servemesh.mesh.v1 import slo_service_pb2_grpc as slo_pb2_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh import certs
from mesh.controller.goldens import GoldenRunner
from mesh.controller.prometheus import write_file_sd
from mesh.controller.rollouts import RolloutController
from mesh.slo.config import load_config
from mesh.slo.evaluator import SloEvaluator
from mesh.slo.servicer import SERVICE_NAME as SLO_SERVICE
from mesh.slo.servicer import SloServicer
from mesh.state import MeshState
from services.common.client import CHANNEL_OPTIONS, insecure_channel
from services.common.logging import configure_logging
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import ServiceSettings, SettingsError, load_settings

CONFIG_DIR = Path(__file__).resolve().parent / "config"
IDENTITY = "controller"
_log = logging.getLogger(__name__)


class ControllerSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVEMESH_CONTROLLER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    service_name: ClassVar[str] = "controller"

    port: int = Field(15020, ge=0, le=65535)
    #: host:port of the registry (its sidecar's inbound listener in the mesh)
    registry_target: str = "127.0.0.1:50052"
    #: the local CA's directory: mTLS as `controller` to the registry and for callers; None: plaintext
    certs_dir: Path | None = None
    namespace: str = "default"
    #: a `servemesh up` data directory: the Envoys' admin ports are read from its run/mesh.json
    #: each analysis window (deployments join and leave)
    home: Path | None = None
    #: more Envoy admin URLs to read (e.g. in Kubernetes, or tests)
    envoy_admin_urls: list[str] = Field(default_factory=list)
    #: how often rollouts are looked at, seconds
    tick_s: float = Field(0.5, gt=0, le=60)
    #: an API key (0600 file) the golden evaluations of gateway deployments send; None: none
    eval_api_key_file: Path | None = None
    #: the limit of each golden case, seconds
    eval_timeout_s: float = Field(30.0, gt=0, le=600)
    #: the SLO definitions (YAML); None: mesh/slo/slos.yaml
    slo_config: Path | None = None
    #: the Prometheus HTTP API (e.g. http://127.0.0.1:9090): when set, rollout windows are judged
    #: with its queries (mesh/controller/prometheus.py) instead of reading Envoys and /metrics
    prometheus_url: str = ""
    #: where to keep a file_sd targets file of every deployment's metrics URL, for that Prometheus
    #: (deploy/prometheus/prometheus.yml reads targets.json next to it); None: not written
    prometheus_targets_file: Path | None = None


class Controller:
    def __init__(
        self, server: GrpcServer, rollouts: RolloutController, slos: SloEvaluator, settings: ControllerSettings
    ) -> None:
        self.server, self.rollouts, self.slos = server, rollouts, slos
        self._settings = settings
        self._targets_file = settings.prometheus_targets_file
        self._tasks: list[asyncio.Task[None]] = []

    async def _write_targets(self, path: Path, interval_s: float = 5.0) -> None:
        """Keep Prometheus' file_sd targets in step with the registry's deployments."""
        while True:
            try:
                async with _registry_channel(self._settings) as channel:
                    resp = await rpb_grpc.RegistryServiceStub(channel).ListDeployments(
                        rpb.ListDeploymentsRequest(page_size=500), timeout=5.0
                    )
                write_file_sd(path, list(resp.deployments))
            except (grpc.aio.AioRpcError, OSError) as exc:
                _log.warning("Prometheus targets not written: %s", exc)
            await asyncio.sleep(interval_s)

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.server.start()
        self._tasks.append(asyncio.create_task(self.rollouts.run()))
        self._tasks.append(asyncio.create_task(self.slos.run()))
        if self._targets_file is not None:
            self._tasks.append(asyncio.create_task(self._write_targets(self._targets_file)))

    async def stop(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.rollouts.close()
        await self.server.stop(grace)


def _registry_channel(s: ControllerSettings) -> grpc.aio.Channel:
    if s.certs_dir is None:
        return insecure_channel(s.registry_target)
    ident = certs.identity(s.certs_dir, IDENTITY, s.namespace)
    return grpc.aio.secure_channel(
        s.registry_target,
        certs.channel_credentials(ident),
        options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "registry")],
    )


def _deployment_channel(s: ControllerSettings, endpoint: str, service: str) -> grpc.aio.Channel:
    """A channel to one deployment's endpoint (its sidecar) as the controller, for golden evaluations."""
    if s.certs_dir is None:
        return insecure_channel(endpoint)
    ident = certs.identity(s.certs_dir, IDENTITY, s.namespace)
    return grpc.aio.secure_channel(
        endpoint,
        certs.channel_credentials(ident),
        options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", service)],
    )


def _envoy_admins(s: ControllerSettings) -> list[str]:
    urls = list(s.envoy_admin_urls)
    if s.home is not None and (state := MeshState.read(s.home)) is not None:
        urls += [f"http://127.0.0.1:{port}" for port in state.envoys.values()]
    return urls


async def _gateway_metrics_urls(s: ControllerSettings) -> list[str]:
    """Every registered gateway deployment's metrics URL (the SLOs are the gateways' numbers)."""
    async with _registry_channel(s) as channel:
        resp = await rpb_grpc.RegistryServiceStub(channel).ListDeployments(
            rpb.ListDeploymentsRequest(service="gateway", page_size=500), timeout=5.0
        )
    return [d.metrics_url for d in resp.deployments if d.metrics_url]


async def create_controller(settings: ControllerSettings) -> Controller:
    goldens = GoldenRunner(
        lambda endpoint, service: _deployment_channel(settings, endpoint, service),
        api_key_file=settings.eval_api_key_file,
        timeout_s=settings.eval_timeout_s,
    )
    rollouts = RolloutController(
        lambda: _registry_channel(settings),
        lambda: _envoy_admins(settings),
        tick_s=settings.tick_s,
        golden=goldens,
        prometheus_url=settings.prometheus_url,
    )
    credentials = None
    if settings.certs_dir is not None:
        credentials = certs.dynamic_server_credentials(certs.identity(settings.certs_dir, IDENTITY, settings.namespace))
    slos = SloEvaluator(load_config(settings.slo_config), lambda: _gateway_metrics_urls(settings))
    services = [Service(SLO_SERVICE, SloServicer(slos), slo_pb2_grpc.add_SloServiceServicer_to_server)]
    server = await create_server(settings, services, credentials=credentials)
    return Controller(server, rollouts, slos, settings)


async def _serve(settings: ControllerSettings) -> None:
    controller = await create_controller(settings)
    await controller.start()
    print(f"controller listening on {controller.address}", file=sys.stderr, flush=True)
    try:
        await controller.server.serve_until_signal()
    finally:
        await controller.stop(0)


def main() -> None:
    try:
        settings = load_settings(ControllerSettings, config_dir=CONFIG_DIR)
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "controller")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per scrape otherwise
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()

"""The mesh control plane: follows the registry, serves every Envoy its snapshot over ADS.

    python -m mesh.xds.server      # settings from mesh/xds/config/<APP_ENV>.yaml + env

It also serves servemesh.mesh.v1.ControlPlaneService (what each Envoy acked or rejected),
grpc.health.v1, reflection and Prometheus metrics, like every servemesh server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import ClassVar

import grpc
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc
from prometheus_client import CollectorRegistry
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from mesh import certs
from mesh.xds.ads import AdsServer, XdsMetrics
from mesh.xds.build import build_snapshot
from mesh.xds.snapshot import SnapshotCache
from mesh.xds.source import follow_registry
from services.common.client import CHANNEL_OPTIONS
from services.common.logging import configure_logging
from services.common.metrics import new_registry
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import ServiceSettings, SettingsError, load_settings

CONFIG_DIR = Path(__file__).resolve().parent / "config"
ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name
STATUS_SERVICE = mesh_pb2.DESCRIPTOR.services_by_name["ControlPlaneService"].full_name
IDENTITY = "control-plane"
_log = logging.getLogger(__name__)


class ControlPlaneSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVEMESH_CONTROL_PLANE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    service_name: ClassVar[str] = "control-plane"

    port: int = Field(15010, ge=0, le=65535)
    #: host:port of the registry (its sidecar's inbound listener in the mesh)
    registry_target: str = "127.0.0.1:50052"
    #: the local CA's directory (`servemesh certs`): the control plane's own identity, and
    #: the identities it writes into each Envoy's upstream TLS
    certs_dir: Path
    #: SPIFFE namespace of the identities
    namespace: str = "default"


class ControlPlane:
    """The running control plane: gRPC server plus the registry follower."""

    def __init__(self, server: GrpcServer, cache: SnapshotCache, ads: AdsServer, settings: ControlPlaneSettings):
        self.server, self.cache, self.ads, self.settings = server, cache, ads, settings
        self._follower: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    def _registry_channel(self) -> grpc.aio.Channel:
        s = self.settings
        ident = certs.identity(s.certs_dir, IDENTITY, s.namespace)
        return grpc.aio.secure_channel(
            s.registry_target,
            certs.channel_credentials(ident),
            options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "registry")],  # keepalive: no half-open watch
        )

    async def start(self) -> None:
        await self.server.start()
        self._follower = asyncio.create_task(follow_registry(self._registry_channel, self.cache))

    async def stop(self, grace: float | None = None) -> None:
        if self._follower:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.server.stop(grace)


async def create_control_plane(
    settings: ControlPlaneSettings, registry: CollectorRegistry | None = None
) -> ControlPlane:
    registry = registry if registry is not None else new_registry()
    metrics = XdsMetrics(registry)
    builder = functools.partial(build_snapshot, certs_dir=settings.certs_dir, namespace=settings.namespace)
    cache = SnapshotCache(builder, on_error=lambda _node, _exc: metrics.snapshot_errors.inc())
    ads = AdsServer(cache, metrics, namespace=settings.namespace)
    # Rotated certificates are picked up for new connections without a restart.
    credentials = certs.dynamic_server_credentials(certs.identity(settings.certs_dir, IDENTITY, settings.namespace))
    server = await create_server(
        settings,
        [
            Service(ADS_SERVICE, ads, ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server),
            Service(STATUS_SERVICE, ads, mesh_pb2_grpc.add_ControlPlaneServiceServicer_to_server),
        ],
        registry=registry,
        credentials=credentials,
    )
    return ControlPlane(server, cache, ads, settings)


async def _serve(settings: ControlPlaneSettings) -> None:
    cp = await create_control_plane(settings)
    await cp.start()
    print(f"control plane listening on {cp.address}", file=sys.stderr, flush=True)
    try:
        await cp.server.serve_until_signal()
    finally:
        await cp.stop(0)


def main() -> None:
    try:
        settings = load_settings(ControlPlaneSettings, config_dir=CONFIG_DIR)
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "control-plane")
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()

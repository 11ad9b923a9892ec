"""Build and run the registry service: `python -m services.registry.server`."""

from __future__ import annotations

import asyncio
import sys

from prometheus_client import CollectorRegistry
from servemesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.logging import configure_logging
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.common.tracing import configure_tracing
from services.registry.core import RegistryCore
from services.registry.keys import SecretHasher
from services.registry.servicer import RegistryServicer, resource_json
from services.registry.settings import RegistrySettings
from services.registry.store import Store

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class RegistryServer(GrpcServer):
    """A GrpcServer whose stop() first ends the WatchRoutes and WatchRollouts streams.

    A watch stream never finishes on its own, so without this every open one would hold
    the drain for the whole grace period. They end with UNAVAILABLE (reconnect elsewhere).
    """

    def __init__(self, built: GrpcServer, core: RegistryCore) -> None:
        super().__init__(
            server=built.server,
            settings=built.settings,
            port=built.port,
            health_servicer=built.health,
            service_names=[SERVICE_NAME],
            registry=built.registry,
            metrics=built.metrics,
        )
        self.core = core

    async def stop(self, grace: float | None = None) -> None:
        self.core.close_watchers()
        await super().stop(grace)


async def create_registry_server(
    settings: RegistrySettings, registry: CollectorRegistry | None = None
) -> tuple[RegistryServer, RegistryCore]:
    """Migrate the database to the latest schema and build (not start) the gRPC server."""
    store = Store(settings.resolved_database_url(), sqlite_busy_timeout_s=settings.sqlite_busy_timeout_s)
    core = RegistryCore(store, resource_json, hasher=SecretHasher(settings.pepper()))
    try:
        await core.start()
    except BaseException:
        await core.close()
        raise
    servicer = RegistryServicer(core, trust_forwarded_identity=settings.trust_forwarded_identity)
    service = Service(SERVICE_NAME, servicer, registry_pb2_grpc.add_RegistryServiceServicer_to_server)
    built = await create_server(settings, [service], registry=registry)
    return RegistryServer(built, core), core


async def _serve(settings: RegistrySettings) -> None:
    shutdown_tracing = configure_tracing("registry", settings.otlp_endpoint)
    server, core = await create_registry_server(settings)
    await server.start()
    print(f"registry listening on {server.address}", file=sys.stderr, flush=True)
    try:
        await server.serve_until_signal()
    finally:
        await core.close()
        shutdown_tracing()


def main() -> None:
    try:
        settings = load_settings(RegistrySettings, config_dir=service_config_dir("registry"))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "registry")
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()

"""Build and run the retrieval service: `python -m services.retrieval.server`."""

from __future__ import annotations

import asyncio
import sys

from prometheus_client import CollectorRegistry
from servemesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from services.common.embedding import Embedder
from services.common.logging import configure_logging
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.common.tracing import configure_tracing
from services.retrieval.core import RetrievalCore
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import IndexStore

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


async def create_retrieval_server(
    settings: RetrievalSettings,
    registry: CollectorRegistry | None = None,
    embedder: Embedder | None = None,
) -> tuple[GrpcServer, RetrievalCore]:
    """Load the embedder (exported to ONNX on first use), drop builds a crash left half-written,
    load every current build, and build (not start) the gRPC server."""
    if embedder is None:
        embedder = await asyncio.to_thread(
            Embedder.load,
            backend=settings.embedding_backend,
            cache_dir=settings.embedding_cache_dir,
            threads=settings.embedding_threads,
        )
    store = IndexStore(settings.data_dir)
    store.cleanup_partials()
    core = RetrievalCore(settings, store, embedder)
    await asyncio.to_thread(core.preload)
    servicer = RetrievalServicer(core, trust_forwarded_identity=settings.trust_forwarded_identity)
    service = Service(SERVICE_NAME, servicer, retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server)
    return await create_server(settings, [service], registry=registry), core


async def _serve(settings: RetrievalSettings) -> None:
    shutdown_tracing = configure_tracing("retrieval", settings.otlp_endpoint)
    server, core = await create_retrieval_server(settings)
    await server.start()
    print(f"retrieval listening on {server.address}", file=sys.stderr, flush=True)
    try:
        await server.serve_until_signal()
    finally:
        await core.wait_for_builds()
        shutdown_tracing()


def main() -> None:
    try:
        settings = load_settings(RetrievalSettings, config_dir=service_config_dir("retrieval"))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "retrieval")
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()

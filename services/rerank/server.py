"""Build and run the rerank service: `python -m services.rerank.server`."""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client import CollectorRegistry
from servemesh.rerank.v1 import rerank_pb2, rerank_pb2_grpc

from services.common.logging import configure_logging
from services.common.metrics import new_registry
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.common.tracing import configure_tracing
from services.rerank.core import Limits, RerankCore
from services.rerank.scorers import Scorer, load_scorer
from services.rerank.servicer import RerankServicer
from services.rerank.settings import RerankSettings

SERVICE_NAME = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name

_log = logging.getLogger(__name__)


async def create_rerank_server(
    settings: RerankSettings, registry: CollectorRegistry | None = None, *, scorer: Scorer | None = None
) -> tuple[GrpcServer, RerankCore]:
    """Load the scorer (unless one is given) and build (not start) the gRPC server.

    Loading runs in a worker thread (seconds; the first fallback start also exports MiniLM to
    ONNX). Raises ScorerLoadError, a SettingsError naming the setting, when the scorer cannot load.
    """
    registry = registry if registry is not None else new_registry()
    if scorer is None:
        _log.info("loading scorer", extra={"scorer": settings.resolved_scorer()})
        scorer = await asyncio.to_thread(load_scorer, settings)
    core = RerankCore(
        scorer,
        limits=Limits.from_settings(settings),
        max_concurrency=settings.max_concurrency,
        registry=registry,
    )
    service = Service(SERVICE_NAME, RerankServicer(core), rerank_pb2_grpc.add_RerankServiceServicer_to_server)
    server = await create_server(settings, [service], registry=registry)
    return server, core


async def _serve(settings: RerankSettings) -> None:
    shutdown_tracing = configure_tracing("rerank", settings.otlp_endpoint)
    try:
        server, core = await create_rerank_server(settings)
        await server.start()
        print(
            f"rerank listening on {server.address} (scorer {core.scorer.id}, {core.scorer.kind})",
            file=sys.stderr,
            flush=True,
        )
        await server.serve_until_signal()
    finally:
        shutdown_tracing()


def main() -> None:
    try:
        settings = load_settings(RerankSettings, config_dir=service_config_dir("rerank"))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "rerank")
    try:
        asyncio.run(_serve(settings))
    except SettingsError as exc:  # the scorer could not load (ScorerLoadError)
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()

"""Build and run the inference service: `python -m services.inference.server`."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry
from servemesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.logging import configure_logging
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.common.tracing import configure_tracing
from services.inference.core import InferenceCore
from services.inference.engines.base import Engine
from services.inference.engines.openai_server import PROFILES, OpenAIServerEngine
from services.inference.servicer import InferenceServicer
from services.inference.settings import EngineConfig, InferenceSettings

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def card_sha256(cfg: EngineConfig) -> str:
    card = cfg.model_dir / "card.json" if cfg.model_dir else None
    return hashlib.sha256(card.read_bytes()).hexdigest() if card and card.is_file() else ""


def build_engine(cfg: EngineConfig) -> Engine:
    if cfg.kind == "small":
        from services.inference.engines.small import SmallEngine  # torch: only when configured

        assert cfg.model_dir is not None
        return SmallEngine(
            cfg.id,
            cfg.model_dir,
            model_id=cfg.model,
            card_sha256=card_sha256(cfg),
            max_model_len=cfg.max_model_len,
            max_concurrency=cfg.max_concurrency,
        )
    assert cfg.url is not None
    return OpenAIServerEngine(
        cfg.id,
        cfg.url,
        model=cfg.model,
        profile=PROFILES[cfg.kind],
        max_model_len=cfg.max_model_len,
        card_sha256=card_sha256(cfg),
        tokenizer_dir=cfg.model_dir,
    )


async def create_inference_server(
    settings: InferenceSettings,
    engines: Sequence[Engine] | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[GrpcServer, InferenceCore]:
    """Start the engines' clients and build (not start) the gRPC server."""
    core = InferenceCore(
        engines or [build_engine(c) for c in settings.engines], settings.default_engine, settings.health_interval_s
    )
    await core.start()
    servicer = InferenceServicer(core)
    service = Service(SERVICE_NAME, servicer, inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    server = await create_server(settings, [service], registry=registry)
    return server, core


async def _serve(settings: InferenceSettings) -> None:
    shutdown_tracing = configure_tracing("inference", settings.otlp_endpoint)
    server, core = await create_inference_server(settings)
    await server.start()
    print(f"inference listening on {server.address}", file=sys.stderr, flush=True)
    try:
        await server.serve_until_signal()
    finally:
        await core.close()
        shutdown_tracing()


def main() -> None:
    try:
        settings = load_settings(InferenceSettings, config_dir=service_config_dir("inference"))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "inference")
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()

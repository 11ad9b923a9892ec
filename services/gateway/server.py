"""Build and run the gateway service: `python -m services.gateway.server`."""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client import CollectorRegistry
from servemesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.logging import configure_logging
from services.common.metrics import GenerationMetrics, PolicyMetrics, RedactionMetrics, SafetyMetrics, new_registry
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.common.tracing import configure_tracing
from services.gateway.auth import Authenticate, KeyVerifier, RegistryKeyVerifier
from services.gateway.backend import InferenceBackend
from services.gateway.budget import PromptBudget
from services.gateway.cache import CacheMetrics, EngineIdentities, ResponseCache, create_store
from services.gateway.core import Pipeline, RequestMetrics, Safety, default_policies
from services.gateway.limits import AuthThrottle, LimitMetrics, LimitStore, RateLimit, open_store
from services.gateway.openai_api import HttpApiServer, OpenAIApi
from services.gateway.rag import RagClients, Retrieve
from services.gateway.redaction import Redactor
from services.gateway.routing import ResilientBackend, Router, RoutingMetrics, RuleRouting
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.version import ModelInfo, VersionInfo, build_commit

_log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


class _Closing:
    """What to close when the gateway stops: the inference channel, the cache's store, the
    registry channel of the key verifier."""

    def __init__(
        self, inference: InferenceBackend, *others: ResponseCache | KeyVerifier | LimitStore | RagClients | None
    ) -> None:
        self.inference = inference
        self._others = [o for o in others if o is not None]

    async def close(self) -> None:
        for other in self._others:
            await other.close()
        await self.inference.close()


async def create_gateway_server(
    settings: GatewaySettings, registry: CollectorRegistry | None = None
) -> tuple[GrpcServer, _Closing, HttpApiServer | None]:
    """The gRPC server, its backend, and the OpenAI-compatible HTTP API when configured
    (start it after the gRPC server; stop it first)."""
    registry = registry if registry is not None else new_registry()
    inference = InferenceBackend(settings.inference_target, settings.default_timeout_s, settings.inference_authority)
    red = settings.redaction
    redactor = Redactor(red.types, red.phone_regions) if red.enabled else None
    routing_metrics = RoutingMetrics(registry)
    router = Router.from_config(settings.routing, routing_metrics)
    for problem in settings.routing.route_class_violations(settings.route_classes):
        _log.warning("routing rule never matches: %s", problem)
    verifier = RegistryKeyVerifier.from_config(settings.auth) if settings.auth.enabled else None
    limit_metrics = LimitMetrics(registry)
    limit_store = open_store(settings.limits, limit_metrics)
    throttle = AuthThrottle(settings.limits, limit_store, limit_metrics)
    authenticate = None
    if verifier is not None:
        authenticate = Authenticate(
            verifier, settings.default_route_class, on_failure=throttle.failed, before=throttle.check
        )
    cache = None
    if settings.cache.enabled:

        async def engines() -> list[tuple[str, str, str]]:
            return [(e.name, e.model, e.model_card_sha256) for e in await inference.list_engines()]

        cache = ResponseCache(
            settings.cache,
            create_store(settings.cache),
            EngineIdentities(engines, settings.cache.identity_refresh_s),
            CacheMetrics(registry),
            redactor=redactor,
        )
    rag = RagClients(settings.rag) if settings.rag.enabled else None
    policies = default_policies(
        settings.route_classes,
        settings.default_route_class,
        GenerationMetrics(registry),
        redactor,
        RedactionMetrics(registry).redacted,
        Safety(settings.safety.rules(), settings.safety.refusal, SafetyMetrics(registry).refused)
        if settings.safety.enabled
        else None,
        PromptBudget(inference.count_tokens),
        authenticate=authenticate,
        limits=RateLimit(settings.limits, limit_store, limit_metrics) if settings.limits.enabled else None,
        routing=RuleRouting(router, settings.route_classes, routing_metrics),
        cache=cache,
        redact_output=red.outputs,
        retrieve=Retrieve(rag) if rag is not None else None,
    )
    pipeline = Pipeline(
        policies,
        ResilientBackend(inference, router, routing_metrics),
        PolicyMetrics(registry),
        RequestMetrics(registry, settings.route_classes, settings.default_route_class),
    )
    backend = _Closing(inference, cache, verifier, limit_store, rag)

    async def models() -> list[ModelInfo]:
        return [ModelInfo(e.name, e.model, e.model_card_sha256) for e in await inference.list_engines()]

    version = VersionInfo(build_commit(settings.build_commit), settings.environment, models)
    servicer = GatewayServicer(
        pipeline,
        version,
        deployment=settings.deployment,
        forward_headers=settings.forward_headers,
        trust_forwarded_for=settings.trust_forwarded_for,
        rag_route_class=_rag_route_class(settings) if rag is not None else None,
        citations_required=frozenset(name for name, c in settings.route_classes.items() if c.require_citations),
    )
    service = Service(SERVICE_NAME, servicer, gateway_pb2_grpc.add_GatewayServiceServicer_to_server)
    server = await create_server(settings, [service], registry=registry)
    http = None
    if settings.http_port is not None or settings.http_unix_socket is not None:
        api = OpenAIApi(pipeline, list(settings.route_classes), trust_forwarded_for=settings.trust_forwarded_for)
        http = HttpApiServer(api, settings.host, settings.http_port, settings.http_unix_socket)
    return server, backend, http


def _rag_route_class(settings: GatewaySettings) -> str:
    """RAG requests naming no route class: the configured one if this gateway has it."""
    return settings.rag.route_class if settings.rag.route_class in settings.route_classes else ""


async def _serve(settings: GatewaySettings) -> None:
    shutdown_tracing = configure_tracing("gateway", settings.otlp_endpoint)
    server, backend, http = await create_gateway_server(settings)
    await server.start()
    if http is not None:
        await http.start()
    print(f"gateway listening on {server.address}", file=sys.stderr, flush=True)
    try:
        await server.serve_until_signal()
    finally:
        if http is not None:
            await http.stop()
        await backend.close()
        shutdown_tracing()


def main() -> None:
    try:
        settings = load_settings(GatewaySettings, config_dir=service_config_dir("gateway"))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "gateway")
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()

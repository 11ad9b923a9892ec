"""Real in-process servers for the evaluation tests: inference on the small engine (SmolLM2
in-process, no vLLM), retrieval with a small "docs" index, and gateways in front of them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from servemesh.retrieval.v1 import retrieval_pb2 as rpb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as rpb_grpc

from services.common.embedding import Embedder
from services.common.server import GrpcServer
from services.gateway.rag import RagConfig
from services.gateway.server import create_gateway_server
from services.gateway.settings import GatewaySettings, RouteClassConfig
from services.inference.core import InferenceCore
from services.inference.models import ModelCard
from services.inference.server import create_inference_server
from services.inference.settings import EngineConfig, InferenceSettings
from services.retrieval.server import create_retrieval_server
from services.retrieval.settings import RetrievalSettings

DOCS = [
    ("mitral.md", "# Mitral valve\n\nThe mitral valve separates the left atrium from the left ventricle."),
    ("kv.md", "# KV cache\n\nA KV cache keeps attention keys and values so decoding does not recompute them."),
    ("danube.txt", "The Danube\n\nThe Danube flows through ten countries into the Black Sea."),
]

#: every route class on the small engine; "clamped" cuts answers to 4 tokens (a canary whose
#: configuration changed what greedy decoding returns)
ROUTE_CLASSES = {
    "chat_short": RouteClassConfig(engine="small", default_max_tokens=64, max_tokens_limit=256),
    "rag_long": RouteClassConfig(
        engine="small", default_max_tokens=64, max_tokens_limit=256, max_prompt_tokens=1536, require_citations=True
    ),
    "clamped": RouteClassConfig(engine="small", default_max_tokens=4, max_tokens_limit=4),
}
ROLES = {"primary": "small", "lowlat": "small", "best": "small", "small": "small"}


def metrics_url(server: GrpcServer) -> str:
    assert server.metrics_port is not None
    return f"http://127.0.0.1:{server.metrics_port}/metrics"


@dataclass
class Inference:
    server: GrpcServer
    core: InferenceCore

    @property
    def metrics_url(self) -> str:
        return metrics_url(self.server)


@pytest.fixture(scope="session")
async def small_inference(prepared_model: tuple[Path, ModelCard]) -> AsyncIterator[Inference]:
    folder, card = prepared_model
    engine = EngineConfig(id="small", kind="small", model=card.model_id, model_dir=folder)
    server, core = await create_inference_server(
        InferenceSettings(port=0, metrics_port=0, engines=[engine], health_interval_s=0.5), registry=CollectorRegistry()
    )
    await server.start()
    yield Inference(server, core)
    await server.stop(0)
    await core.close()


@pytest.fixture(scope="session")
async def docs_retrieval(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> AsyncIterator[GrpcServer]:
    """A retrieval server holding the anonymous tenant's "docs" index, built."""
    data = tmp_path_factory.mktemp("evals-retrieval")
    server, _ = await create_retrieval_server(
        RetrievalSettings(port=0, data_dir=data), CollectorRegistry(), embedder=embedder
    )
    await server.start()
    index = "tenants/dev/indexes/docs"

    async def upload() -> AsyncIterator[rpb.IngestDocumentsRequest]:
        yield rpb.IngestDocumentsRequest(index=index)
        for name, text in DOCS:
            yield rpb.IngestDocumentsRequest(file=rpb.FileHeader(filename=name))
            yield rpb.IngestDocumentsRequest(data=text.encode())

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = rpb_grpc.RetrievalServiceStub(channel)
        await stub.IngestDocuments(upload(), timeout=60)
        async for _ in stub.BuildIndex(rpb.BuildIndexRequest(index=index), timeout=120):
            pass
    yield server
    await server.stop(0)


GatewayFactory = Callable[..., Awaitable[GrpcServer]]


@pytest.fixture(scope="session")
async def make_gateway(small_inference: Inference) -> AsyncIterator[GatewayFactory]:
    """Start gateways in front of the small engine (metrics on a free port); `settings` override
    GatewaySettings fields. RAG is off unless `rag=` is given."""
    started: list[tuple[GrpcServer, Any]] = []

    async def factory(**settings: Any) -> GrpcServer:
        base: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "inference_target": small_inference.server.address,
            "route_classes": ROUTE_CLASSES,
            "routing": {"roles": ROLES},
            "rag": RagConfig(enabled=False),
        }
        server, backend, _ = await create_gateway_server(GatewaySettings(**(base | settings)), CollectorRegistry())
        await server.start()
        started.append((server, backend))
        return server

    yield factory
    for server, backend in started:
        await server.stop(0)
        await backend.close()


@pytest.fixture(scope="session")
async def gateway(make_gateway: GatewayFactory) -> GrpcServer:
    """A gateway without RAG (StreamRagAnswer answers FAILED_PRECONDITION)."""
    return await make_gateway()


@pytest.fixture(scope="session")
async def rag_gateway(make_gateway: GatewayFactory, docs_retrieval: GrpcServer) -> GrpcServer:
    """A gateway answering from the "docs" index (retrieval's order; no reranker)."""
    rag = RagConfig(retrieval_target=docs_retrieval.address, rerank_target="", rerank="never")
    return await make_gateway(rag=rag)


def write_set(path: Path, data: dict[str, Any]) -> Path:
    """A golden set file (JSON is YAML)."""
    path.write_text(json.dumps(data))
    return path

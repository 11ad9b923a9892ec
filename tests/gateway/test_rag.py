"""StreamRagAnswer: real retrieval and rerank servers, the gateway's pipeline, and an engine.

The citation rules are checked with a scripted engine (its answer is fixed, so each status
is reached on purpose); the last test runs the whole path on the real vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.retrieval.v1 import retrieval_pb2 as rpb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as rpb_grpc

from services.common.embedding import Embedder
from services.common.generation import Chunk, FinishReason, Message, Role, Usage
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import ServiceSettings
from services.gateway.budget import PromptBudget
from services.gateway.core import GatewayRequest, Pipeline, default_policies
from services.gateway.rag import RagClients, RagConfig, Retrieve, find_citations
from services.gateway.server import create_gateway_server
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings, RouteClassConfig
from services.gateway.version import VersionInfo
from services.rerank.scorers.fallback import FallbackScorer
from services.rerank.server import create_rerank_server
from services.rerank.settings import RerankSettings
from services.retrieval.server import create_retrieval_server
from services.retrieval.settings import RetrievalSettings

DOCS = [
    ("mitral.md", "# Mitral valve\n\nThe mitral valve separates the left atrium from the left ventricle."),
    ("danube.txt", "The Danube\n\nThe Danube flows through ten countries into the Black Sea."),
    ("kv.md", "# KV cache\n\nA KV cache keeps attention keys and values so decoding does not recompute them."),
    ("rhine.txt", "The Rhine\n\nThe Rhine rises in the Swiss Alps and flows to the North Sea."),
    ("aortic.md", "# Aortic valve\n\nThe aortic valve opens when ventricular pressure exceeds aortic pressure."),
]


@dataclass
class RagServices:
    retrieval: GrpcServer
    rerank: GrpcServer

    def config(self, **kw: object) -> RagConfig:
        """Reranking always (the rerank server runs the fallback scorer, which auto would skip)."""
        defaults = {
            "retrieval_target": self.retrieval.address,
            "rerank_target": self.rerank.address,
            "rerank": "always",
        }
        return RagConfig(**(defaults | kw))


@pytest.fixture(scope="module")
async def rag_services(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> AsyncIterator[RagServices]:
    data = tmp_path_factory.mktemp("rag")
    retrieval, _ = await create_retrieval_server(
        RetrievalSettings(port=0, data_dir=data / "retrieval"), CollectorRegistry(), embedder=embedder
    )
    rerank, _ = await create_rerank_server(
        RerankSettings(port=0, scorer="fallback"), CollectorRegistry(), scorer=FallbackScorer(embedder)
    )
    await retrieval.start()
    await rerank.start()
    async with grpc.aio.insecure_channel(retrieval.address) as channel:
        stub = rpb_grpc.RetrievalServiceStub(channel)
        for tenant, docs in (("dev", DOCS), ("acme", DOCS[:1])):
            index = f"tenants/{tenant}/indexes/docs"

            async def upload(
                index: str = index, docs: list[tuple[str, str]] = docs
            ) -> AsyncIterator[rpb.IngestDocumentsRequest]:
                yield rpb.IngestDocumentsRequest(index=index)
                for name, text in docs:
                    yield rpb.IngestDocumentsRequest(file=rpb.FileHeader(filename=name))
                    yield rpb.IngestDocumentsRequest(data=text.encode())

            await stub.IngestDocuments(upload(), timeout=60)
            async for _ in stub.BuildIndex(rpb.BuildIndexRequest(index=index), timeout=120):
                pass
    yield RagServices(retrieval, rerank)
    await rerank.stop(0)
    await retrieval.stop(0)


class _Scripted:
    """An engine whose answer is fixed; it keeps the conversation it was given."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.messages: tuple[Message, ...] = ()

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        self.messages = request.messages
        request.served.engine, request.served.model = "scripted", "fixed-answer"
        for word in self.answer.split(" "):
            yield Chunk(word + " ")
        yield Chunk("", FinishReason.STOP, Usage(10, 5))


class _Recorder:
    def first_token(self, route_class: str, engine: str, seconds: float) -> None: ...

    def finished(self, route_class: str, engine: str, prompt_tokens: int, completion_tokens: int) -> None: ...


async def _by_words(engine: str, messages: object) -> int:
    return sum(len(m.content.split()) for m in messages)  # type: ignore[attr-defined]


CLASSES = {
    "rag_long": RouteClassConfig(engine="scripted", max_prompt_tokens=4096, require_citations=True),
    "rag_loose": RouteClassConfig(engine="scripted", max_prompt_tokens=4096),
    "rag_tight": RouteClassConfig(engine="scripted", max_prompt_tokens=60, require_citations=True),
}


@pytest.fixture
async def gateway(rag_services: RagServices) -> AsyncIterator[tuple[gpb_grpc.GatewayServiceStub, list]]:
    """A gateway servicer over the scripted engine; `engines[0]` is the engine of the next call."""
    engines = [_Scripted("")]
    clients = [RagClients(rag_services.config())]

    class _Current:
        def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
            return engines[0].stream(request)

    def pipeline(config: RagConfig) -> Pipeline:
        clients.append(RagClients(config))
        policies = default_policies(
            CLASSES, "rag_long", _Recorder(), budget=PromptBudget(_by_words), retrieve=Retrieve(clients[-1])
        )
        return Pipeline(policies, _Current())

    async def no_models() -> list:
        return []

    servicers = {
        "dev": pipeline(rag_services.config()),
        "acme": pipeline(rag_services.config(anonymous_tenant="acme")),
        "no-rerank": pipeline(rag_services.config(rerank_target="127.0.0.1:1", rerank_timeout_s=0.5)),
        "auto": pipeline(rag_services.config(rerank="auto")),
    }
    servers = []
    stubs = {}
    for name, pipe in servicers.items():
        servicer = GatewayServicer(
            pipe,
            VersionInfo("test", "dev", no_models),
            rag_route_class="rag_long",
            citations_required=frozenset({"rag_long", "rag_tight"}),
        )
        service = Service(
            "servemesh.gateway.v1.GatewayService", servicer, gpb_grpc.add_GatewayServiceServicer_to_server
        )
        server = await create_server(ServiceSettings(port=0), [service], registry=CollectorRegistry())
        await server.start()
        servers.append(server)
        stubs[name] = server.address
    channels = {name: grpc.aio.insecure_channel(address) for name, address in stubs.items()}
    yield {name: gpb_grpc.GatewayServiceStub(c) for name, c in channels.items()}, engines
    for c in channels.values():
        await c.close()
    for server in servers:
        await server.stop(0)
    for c in clients:
        await c.close()


async def _ask(stub: gpb_grpc.GatewayServiceStub, question: str, **kw: object) -> list[gpb.StreamRagAnswerResponse]:
    request = gpb.StreamRagAnswerRequest(question=question, index="docs", **kw)
    return [m async for m in stub.StreamRagAnswer(request, timeout=60)]


def test_citations_are_found_in_their_common_shapes() -> None:
    found = find_citations("Valves [2] close; see [1, 3] and [4-5][2]. Not [0] or [9].", 5)
    assert found.cited == [(2, 7), (1, 22), (3, 22), (4, 33), (5, 33)]
    assert found.invalid == [0, 9]
    assert find_citations("no sources here", 3).cited == []


async def test_the_answer_cites_passages_that_point_into_documents(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("The mitral valve separates the atrium from the ventricle [1].")
    messages = await _ask(stubs["dev"], "What does the mitral valve separate?", top_k=3)
    first, last = messages[0], messages[-1]
    assert len(first.passages) == 3 and [p.number for p in first.passages] == [1, 2, 3]
    top = first.passages[0]
    assert top.title == "Mitral valve" and top.chunk_id.startswith(top.document_id + "#")
    assert top.text in DOCS[0][1] and top.end_offset - top.start_offset == len(top.text)
    assert first.reranker.startswith("fallback/") and top.HasField("rerank_score")
    assert first.manifest.startswith("tenants/dev/indexes/docs/manifests/")
    # the engine got the passages as numbered context, best first
    context = next(m.content for m in engines[0].messages if m.role is Role.SYSTEM)
    assert "[1] Mitral valve" in context and "[3]" in context and "[4]" not in context
    assert last.citation_status == gpb.CITATION_STATUS_CITED and not last.citation_notice
    assert [c.number for c in last.citations] == [1] and last.citations[0].passage.chunk_id == top.chunk_id
    assert "".join(m.text_delta for m in messages).startswith("The mitral valve")


async def test_no_citation_is_flagged_when_the_route_class_requires_them(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("It separates two chambers.")
    last = (await _ask(stubs["dev"], "What does the mitral valve separate?"))[-1]
    assert last.citation_status == gpb.CITATION_STATUS_MISSING
    assert "requires citations" in last.citation_notice and list(last.citations) == []
    loose = (await _ask(stubs["dev"], "What does the mitral valve separate?", route_class="rag_loose"))[-1]
    assert loose.citation_status == gpb.CITATION_STATUS_NONE and not loose.citation_notice


async def test_a_citation_of_a_passage_that_was_not_given_is_invalid(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("See [1] and [7].")
    last = (await _ask(stubs["dev"], "Where does the Danube flow?", top_k=2))[-1]
    assert last.citation_status == gpb.CITATION_STATUS_INVALID and list(last.invalid_citations) == [7]
    assert "[7]" in last.citation_notice and [c.number for c in last.citations] == [1]


async def test_the_budget_trims_the_lowest_ranked_passages_and_numbers_what_is_left(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("Answer [1].")
    untrimmed = await _ask(
        stubs["dev"], "Which valve opens under ventricular pressure?", top_k=5, route_class="rag_loose"
    )
    messages = await _ask(
        stubs["dev"], "Which valve opens under ventricular pressure?", top_k=5, route_class="rag_tight"
    )
    ranked = [p.chunk_id for p in untrimmed[0].passages]  # the same five, best first, nothing trimmed
    kept = messages[0].passages
    removed = list(messages[-1].trimmed.passage_ids_removed)
    assert len(ranked) == 5 and 1 <= len(kept) < 5
    # the best passages stay, in rank order; the rest go, lowest-ranked first
    assert [p.chunk_id for p in kept] == ranked[: len(kept)]
    assert removed == ranked[len(kept) :][::-1]
    assert [p.number for p in kept] == list(range(1, len(kept) + 1))
    context = next(m.content for m in engines[0].messages if m.role is Role.SYSTEM)
    assert f"[{len(kept)}]" in context and f"[{len(kept) + 1}]" not in context


async def test_a_tenant_only_retrieves_its_own_documents(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("[1]")
    passages = (await _ask(stubs["acme"], "Where does the Danube flow?", top_k=5))[0].passages
    assert {p.title for p in passages} == {"Mitral valve"}  # acme's index holds one document


async def test_rerank_down_keeps_retrieval_order_and_still_answers(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("The Danube reaches the Black Sea [1].")
    messages = await _ask(stubs["no-rerank"], "Where does the Danube flow?", top_k=2)
    first = messages[0]
    assert first.reranker == "" and not first.passages[0].HasField("rerank_score")
    assert first.passages[0].title == "The Danube" and messages[-1].citation_status == gpb.CITATION_STATUS_CITED


async def test_auto_reranks_only_with_a_cross_encoder(gateway) -> None:
    stubs, engines = gateway
    engines[0] = _Scripted("The Danube reaches the Black Sea [1].")
    first = (await _ask(stubs["auto"], "Where does the Danube flow?", top_k=2))[0]
    # the rerank server here runs the fallback scorer, which ranks worse than retrieval alone
    assert first.reranker == "" and not first.passages[0].HasField("rerank_score")
    assert first.passages[0].title == "The Danube"


@pytest.mark.parametrize(
    ("kw", "code", "text"),
    [
        ({"index": "nothing"}, grpc.StatusCode.NOT_FOUND, "'nothing'"),
        ({"index": "Bad Index"}, grpc.StatusCode.INVALID_ARGUMENT, "index"),
        ({"question": ""}, grpc.StatusCode.INVALID_ARGUMENT, "question"),
        ({"top_k": 21}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"top_k": 10, "candidates": 5}, grpc.StatusCode.INVALID_ARGUMENT, "candidates"),
    ],
)
async def test_bad_rag_requests_get_clear_errors(gateway, kw, code, text) -> None:
    stubs, _ = gateway
    request = {"question": "What is a KV cache?", "index": "docs"} | kw
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stubs["dev"].StreamRagAnswer(gpb.StreamRagAnswerRequest(**request), timeout=30):
            pass
    assert err.value.code() == code and text in err.value.details()


@pytest.mark.engine
async def test_rag_answer_end_to_end_on_vllm(rag_services: RagServices, mesh, tmp_path: Path) -> None:
    settings = GatewaySettings(port=0, inference_target=mesh.inference.address, rag=rag_services.config())
    server, backend, _ = await create_gateway_server(settings, registry=CollectorRegistry())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            messages = await _ask(
                stub,
                "What does a KV cache keep?",
                top_k=2,
                params=gpb.DecodingParams(temperature=0, max_tokens=48),
            )
    finally:
        await server.stop(0)
        await backend.close()
    first, last = messages[0], messages[-1]
    assert first.passages[0].title == "KV cache" and first.route_class == "rag_long"
    assert "".join(m.text_delta for m in messages).strip()
    assert last.finish_reason != gpb.FINISH_REASON_UNSPECIFIED and last.usage.prompt_tokens > 40
    # the small model may or may not cite: either way the last message says which it is
    assert last.citation_status in (gpb.CITATION_STATUS_CITED, gpb.CITATION_STATUS_MISSING, gpb.CITATION_STATUS_INVALID)
    if last.citation_status == gpb.CITATION_STATUS_MISSING:
        assert "requires citations" in last.citation_notice

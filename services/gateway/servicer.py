"""GatewayService: protobuf <-> domain objects, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from servemesh.gateway.v1 import gateway_pb2 as pb
from servemesh.gateway.v1 import gateway_pb2_grpc as pb_grpc

from services.common import context
from services.common.errors import FailedPrecondition
from services.common.generation import Chunk, FinishReason, Message, Role, Sampling
from services.common.interceptors import ENGINE_TTFT_KEY
from services.gateway.auth import bearer_credentials
from services.gateway.budget import Passage
from services.gateway.core import GatewayRequest, Pipeline
from services.gateway.rag import RagContext, RagPassage, RagQuery, find_citations, validate_query
from services.gateway.routing import Quality, RoutingHints
from services.gateway.version import VersionInfo

_ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


def _request(
    req: pb.StreamGenerateRequest | pb.GenerateRequest,
    context_: grpc.aio.ServicerContext,
    forward: frozenset[str],
    trust_forwarded_for: bool,
) -> GatewayRequest:
    p = req.params
    raw = context_.invocation_metadata() or ()
    metadata = [(k, v) for k, v in raw if isinstance(v, str)]
    return GatewayRequest(
        forward=tuple((k, v) for k, v in metadata if k in forward),
        credentials=bearer_credentials(raw),
        client_address=client_address(metadata, context_.peer(), trust_forwarded_for),
        context=tuple(Passage(c.id, c.text, c.title) for c in req.context),
        allow_trim=req.allow_trim,
        hints=_hints(req.hints) if req.HasField("hints") else None,
        request_id=context.request_id(),
        route_class=req.route_class,
        prompt=req.prompt or None,
        # An unknown role stays None here and is reported, by index, by the validate policy.
        messages=tuple(Message(_ROLES.get(m.role), m.content) for m in req.messages),  # type: ignore[arg-type]
        sampling=Sampling(
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None,
            max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
            stop=tuple(p.stop),
            seed=p.seed if p.HasField("seed") else None,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        ),
    )


_QUALITY = {pb.QUALITY_STANDARD: Quality.STANDARD, pb.QUALITY_HIGH: Quality.HIGH}


def _hints(h: pb.RoutingHints) -> RoutingHints:
    return RoutingHints(
        uncertainty=h.uncertainty if h.HasField("uncertainty") else None,
        quality=_QUALITY.get(h.quality),
        latency_budget_ms=h.latency_budget_ms if h.HasField("latency_budget_ms") else None,
    )


_RETRIEVAL_MODES = {
    pb.RETRIEVAL_MODE_HYBRID: "hybrid",
    pb.RETRIEVAL_MODE_DENSE: "dense",
    pb.RETRIEVAL_MODE_SPARSE: "sparse",
}


def _passage(number: int, p: RagPassage) -> pb.RagPassage:
    return pb.RagPassage(
        number=number,
        document_id=p.document_id,
        chunk_id=p.chunk_id,
        title=p.title,
        start_offset=p.start,
        end_offset=p.end,
        text=p.text,
        retrieval_score=p.retrieval_score,
        rerank_score=p.rerank_score,
    )


def forwarded_client(metadata: Iterable[tuple[str, str]], trust_forwarded_for: bool) -> str:
    """With a trusted edge in front, the last x-forwarded-for entry (the one the edge Envoy
    appended; earlier ones are whatever the client sent); "" otherwise."""
    if trust_forwarded_for:
        for key, value in metadata:
            if key == "x-forwarded-for" and value.strip():
                return value.rsplit(",", 1)[-1].strip()
    return ""


def client_address(metadata: Iterable[tuple[str, str]], peer: str, trust_forwarded_for: bool) -> str:
    """The caller's address: the forwarded one (see forwarded_client), else the gRPC peer's host."""
    if forwarded := forwarded_client(metadata, trust_forwarded_for):
        return forwarded
    kind, _, rest = peer.partition(":")  # "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678", "unix:..."
    return rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else kind


def _trimmed(req: GatewayRequest) -> pb.Trimmed | None:
    t = req.trimmed
    if t is None:
        return None
    return pb.Trimmed(
        messages_removed=t.messages_removed,
        passage_ids_removed=t.passage_ids_removed,
        prompt_tokens_before=t.prompt_tokens_before,
        prompt_tokens_after=t.prompt_tokens_after,
    )


def _usage(chunk: Chunk) -> pb.Usage:
    u = chunk.usage
    assert u is not None
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def _relay_timing(context_: grpc.aio.ServicerContext, req: GatewayRequest) -> None:
    if req.served.engine_ttft_ms:
        context_.set_trailing_metadata(((ENGINE_TTFT_KEY, req.served.engine_ttft_ms),))


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        version: VersionInfo,
        *,
        deployment: str = "",
        forward_headers: Iterable[str] = (),
        trust_forwarded_for: bool = False,
        rag_route_class: str | None = None,
        citations_required: frozenset[str] = frozenset(),
    ) -> None:
        """`rag_route_class`: route class of RAG requests naming none (None: RAG is off);
        `citations_required`: route classes whose RAG answers must cite their passages."""
        self._rag_class = rag_route_class
        self._citations_required = citations_required
        self._pipeline = pipeline
        self._version = version
        self._deployment = deployment
        self._forward = frozenset(h.lower() for h in forward_headers)
        self._trust_xff = trust_forwarded_for

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context_: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        req = _request(request, context_, self._forward, self._trust_xff)
        context.annotate(stream=True)
        async for chunk in self._pipeline.stream(req):
            out = pb.StreamGenerateResponse(
                text_delta=chunk.text,
                engine=req.served.engine,
                model=req.served.model,
                request_id=req.request_id,
                route_class=req.route_class,
                cached=req.notes.get("cache") == "hit",
            )
            if chunk.finish_reason is not None:
                out.finish_reason = _FINISH[chunk.finish_reason]
                out.usage.CopyFrom(_usage(chunk))
                if (trimmed := _trimmed(req)) is not None:
                    out.trimmed.CopyFrom(trimmed)
            yield out
        _relay_timing(context_, req)

    async def Generate(self, request: pb.GenerateRequest, context_: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        req = _request(request, context_, self._forward, self._trust_xff)
        context.annotate(stream=False)
        parts: list[str] = []
        last: Chunk | None = None
        async for last in self._pipeline.stream(req):
            parts.append(last.text)
        assert last is not None and last.finish_reason is not None  # the backend guarantees a final chunk
        _relay_timing(context_, req)
        return pb.GenerateResponse(
            text="".join(parts),
            finish_reason=_FINISH[last.finish_reason],
            usage=_usage(last),
            engine=req.served.engine,
            model=req.served.model,
            request_id=req.request_id,
            route_class=req.route_class,
            cached=req.notes.get("cache") == "hit",
            trimmed=_trimmed(req),
        )

    async def StreamRagAnswer(
        self, request: pb.StreamRagAnswerRequest, context_: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamRagAnswerResponse]:
        if self._rag_class is None:
            raise FailedPrecondition("retrieval-augmented answers are not enabled on this gateway")
        query = RagQuery(
            index=request.index,
            top_k=request.top_k or 5,
            candidates=request.candidates or max(50, request.top_k or 5),
            mode=_RETRIEVAL_MODES.get(request.mode, "hybrid"),
            filters=dict(request.filter),
            skip_rerank=request.skip_rerank,
        )
        validate_query(request.question, query, len(request.history))
        messages = [*request.history, pb.Message(role=pb.ROLE_USER, content=request.question)]
        generate = pb.StreamGenerateRequest(
            messages=messages, params=request.params, route_class=request.route_class or self._rag_class
        )
        req = _request(generate, context_, self._forward, self._trust_xff)
        req.rag, req.allow_trim = query, True
        context.annotate(stream=True, rag_index=request.index)
        first, answer = True, []
        kept: list[RagPassage] = []
        async for chunk in self._pipeline.stream(req):
            out = pb.StreamRagAnswerResponse(
                text_delta=chunk.text,
                engine=req.served.engine,
                model=req.served.model,
                request_id=req.request_id,
                route_class=req.route_class,
            )
            answer.append(chunk.text)
            if first:
                first = False
                rag: RagContext | None = req.rag_context
                if rag is not None:
                    kept = rag.kept(req.trimmed.passage_ids_removed if req.trimmed else ())
                    out.passages.extend(_passage(i, p) for i, p in enumerate(kept, 1))
                    out.manifest, out.reranker = rag.manifest, rag.reranker
            if chunk.finish_reason is not None:
                out.finish_reason = _FINISH[chunk.finish_reason]
                out.usage.CopyFrom(_usage(chunk))
                if (trimmed := _trimmed(req)) is not None:
                    out.trimmed.CopyFrom(trimmed)
                if not req.refused:
                    self._cite(out, "".join(answer), kept, req.route_class)
            yield out
        _relay_timing(context_, req)

    def _cite(self, out: pb.StreamRagAnswerResponse, answer: str, kept: list[RagPassage], route_class: str) -> None:
        found = find_citations(answer, len(kept))
        out.citations.extend(
            pb.Citation(number=n, passage=_passage(n, kept[n - 1]), answer_offset=at) for n, at in found.cited
        )
        out.invalid_citations.extend(found.invalid)
        if found.invalid:
            out.citation_status = pb.CITATION_STATUS_INVALID
            cited = ", ".join(f"[{n}]" for n in found.invalid)
            out.citation_notice = (
                f"The answer cites {cited}, which no passage has (it was given {len(kept)}): treat it as unsupported."
            )
        elif found.cited:
            out.citation_status = pb.CITATION_STATUS_CITED
        elif route_class in self._citations_required:
            out.citation_status = pb.CITATION_STATUS_MISSING
            out.citation_notice = (
                f"The answer cites none of the {len(kept)} passages it was given, although route class "
                f"{route_class!r} requires citations: it is not backed by the sources."
            )
        else:
            out.citation_status = pb.CITATION_STATUS_NONE

    async def GetVersion(
        self, request: pb.GetVersionRequest, context_: grpc.aio.ServicerContext
    ) -> pb.GetVersionResponse:
        info = await self._version.current()
        return pb.GetVersionResponse(
            version=info.version,
            build_commit=info.build_commit,
            environment=info.environment,
            models=[pb.ModelVersion(engine=m.engine, model=m.model, card_sha256=m.card_sha256) for m in info.models],
            deployment=self._deployment,
        )

"""Retrieval-augmented answers: retrieve, rerank, then the generation pipeline with the
passages as context, and the citations of the answer checked against them.

The Retrieve policy runs after authentication, limits, redaction and safety (so the
tenant is the API key's, the query is the redacted question, and a refused request never
reaches retrieval) and before the budget, which trims the lowest-ranked passages first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
from pydantic import BaseModel, Field
from servemesh.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from servemesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from services.common.client import error_from_rpc, insecure_channel
from services.common.errors import Code, FieldViolation, InvalidArgument, NotFound, ServiceError
from services.gateway.budget import Passage
from services.gateway.core import GatewayRequest, Policy

_log = logging.getLogger(__name__)

INDEX_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_QUESTION_CHARS = 2048
MAX_TOP_K = 20
MAX_CANDIDATES = 200
MAX_FILTERS = 8
MAX_HISTORY = 63
#: "[3]", "[1, 2]", "[1][4]", "[2-3]" (a range cites both ends and what lies between)
_CITATION_RE = re.compile(r"\[(\d{1,3}(?:\s*[-–,]\s*\d{1,3})*)\]")


class RagConfig(BaseModel):
    """Where the gateway finds retrieval and rerank, and how long it waits for them."""

    model_config = {"extra": "forbid"}

    enabled: bool = True
    #: host:port of the retrieval service (in the mesh: the sidecar's outbound listener)
    retrieval_target: str = "127.0.0.1:50053"
    #: :authority of calls to retrieval; the sidecar picks the service's routes by it ("" = target)
    retrieval_authority: str = ""
    #: host:port of the rerank service; "" = no reranker (retrieval's order is kept)
    rerank_target: str = "127.0.0.1:50054"
    rerank_authority: str = ""
    #: when to rerank: always, never, or auto = only when the rerank service runs a
    #: cross-encoder. Its offline fallback scorer ranks Cranfield worse than hybrid retrieval
    #: alone (nDCG@10 0.4033 against 0.4157) and takes seconds per request on CPU, so auto
    #: skips it (see `servemesh bench rag`).
    rerank: Literal["auto", "always", "never"] = "auto"
    #: how long auto trusts what GetScorer said
    scorer_refresh_s: float = Field(60.0, gt=0, le=3600)
    search_timeout_s: float = Field(5.0, gt=0, le=60)
    rerank_timeout_s: float = Field(5.0, gt=0, le=60)
    #: tenant whose indexes callers search when authentication is off (no API key, no tenant)
    anonymous_tenant: str = Field("dev", pattern=r"^[a-z][a-z0-9-]{0,62}$")
    #: route class of RAG answers whose request names none (when configured)
    route_class: str = "rag_long"


@dataclass(frozen=True, slots=True)
class RagQuery:
    """What a StreamRagAnswer request asks retrieval for."""

    index: str
    top_k: int = 5
    candidates: int = 50
    #: hybrid, dense or sparse
    mode: str = "hybrid"
    filters: Mapping[str, str] = field(default_factory=dict)
    skip_rerank: bool = False


@dataclass(frozen=True, slots=True)
class RagPassage:
    """A passage given to the model; `number` is set once trimming is known."""

    document_id: str
    chunk_id: str
    title: str
    start: int
    end: int
    text: str
    retrieval_score: float
    rerank_score: float | None = None


@dataclass(slots=True)
class RagContext:
    """What retrieval found for a request: passages best first, the build searched, the scorer."""

    passages: list[RagPassage]
    manifest: str
    reranker: str = ""

    def kept(self, removed: Sequence[str]) -> list[RagPassage]:
        """The passages the model saw, in prompt order (numbered [1].. in this order)."""
        gone = set(removed)
        return [p for p in self.passages if p.chunk_id not in gone]


@dataclass(frozen=True, slots=True)
class Citations:
    """Numbers cited in an answer: (number, offset of its first "[...]") by first occurrence,
    and cited numbers no passage has."""

    cited: list[tuple[int, int]]
    invalid: list[int]


def find_citations(answer: str, passages: int) -> Citations:
    first: dict[int, int] = {}
    for match in _CITATION_RE.finditer(answer):
        numbers: list[int] = []
        for part in re.split(r"\s*,\s*", match.group(1)):
            ends = [int(x) for x in re.split(r"\s*[-–]\s*", part)]
            if len(ends) == 2 and ends[0] <= ends[1] and ends[1] - ends[0] <= MAX_TOP_K:
                numbers += range(ends[0], ends[1] + 1)
            else:
                numbers += ends
        for n in numbers:
            first.setdefault(n, match.start())
    cited = [(n, at) for n, at in first.items() if 1 <= n <= passages]
    invalid = [n for n in first if not 1 <= n <= passages]
    return Citations(cited, invalid)


def validate_query(question: str, query: RagQuery, history: int) -> None:
    bad = []
    if not question.strip() or len(question) > MAX_QUESTION_CHARS:
        bad.append(FieldViolation("question", f"must be 1 to {MAX_QUESTION_CHARS} characters, not only spaces"))
    if not INDEX_ID_RE.fullmatch(query.index):
        bad.append(
            FieldViolation("index", "must be an index id: 1 to 63 characters of [a-z0-9-], starting with a letter")
        )
    if not 1 <= query.top_k <= MAX_TOP_K:
        bad.append(FieldViolation("top_k", f"must be in [1, {MAX_TOP_K}]"))
    if not query.top_k <= query.candidates <= MAX_CANDIDATES:
        bad.append(FieldViolation("candidates", f"must be in [top_k = {query.top_k}, {MAX_CANDIDATES}]"))
    if len(query.filters) > MAX_FILTERS:
        bad.append(FieldViolation("filter", f"at most {MAX_FILTERS} entries"))
    for key, value in query.filters.items():
        if not METADATA_KEY_RE.fullmatch(key) or len(value) > 256:
            bad.append(
                FieldViolation(f"filter[{key!r}]", "keys are 1 to 64 characters of [A-Za-z0-9_.-], values at most 256")
            )
    if history > MAX_HISTORY:
        bad.append(FieldViolation("history", f"at most {MAX_HISTORY} messages"))
    if bad:
        raise InvalidArgument(bad)


_MODES = {
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
    "dense": retrieval_pb2.SEARCH_MODE_DENSE,
    "sparse": retrieval_pb2.SEARCH_MODE_SPARSE,
}


class RagClients:
    """Stubs of retrieval and (optionally) rerank, on channels this object owns."""

    def __init__(self, config: RagConfig) -> None:
        def channel(target: str, authority: str) -> grpc.aio.Channel:
            return insecure_channel(target, options=[("grpc.default_authority", authority)] if authority else [])

        self.config = config
        self._channels = [channel(config.retrieval_target, config.retrieval_authority)]
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(self._channels[0])
        self.rerank: rerank_pb2_grpc.RerankServiceStub | None = None
        if config.rerank_target and config.rerank != "never":
            self._channels.append(channel(config.rerank_target, config.rerank_authority))
            self.rerank = rerank_pb2_grpc.RerankServiceStub(self._channels[1])
        #: (monotonic time of the answer, the rerank service runs a cross-encoder)
        self._scorer: tuple[float, bool] | None = None

    async def use_rerank(self) -> bool:
        """Whether to call the reranker now (see RagConfig.rerank)."""
        if self.rerank is None:
            return False
        if self.config.rerank == "always":
            return True
        now = time.monotonic()
        if self._scorer is None or now - self._scorer[0] > self.config.scorer_refresh_s:
            try:
                request = rerank_pb2.GetScorerRequest()
                scorer = await self.rerank.GetScorer(request, timeout=self.config.rerank_timeout_s)
                self._scorer = (now, scorer.kind == rerank_pb2.SCORER_KIND_CROSS_ENCODER)
            except grpc.aio.AioRpcError as exc:
                _log.warning("rerank GetScorer failed (%s: %s); not reranking", exc.code().name, exc.details())
                return False
        return self._scorer[1]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class Retrieve(Policy):
    """Fill a RAG request's context: hybrid search in the caller's tenant, then rerank.

    Retrieval failing fails the request (NOT_FOUND for an unknown index, FAILED_PRECONDITION
    before its first build, UNAVAILABLE when retrieval is down). The reranker failing does
    not: the passages keep retrieval's order and no rerank score, and the log says so.
    """

    name = "retrieve"

    def __init__(self, clients: RagClients) -> None:
        self._clients = clients
        self._config = clients.config

    async def admit(self, request: GatewayRequest) -> None:
        query = request.rag
        if query is None or request.refused:
            return
        tenant = request.principal.tenant if request.principal else self._config.anonymous_tenant
        question = request.messages[-1].content if request.messages else ""  # redacted by now
        index = f"tenants/{tenant}/indexes/{query.index}"
        try:
            found = await self._clients.retrieval.Search(
                retrieval_pb2.SearchRequest(
                    index=index,
                    query=question,
                    top_k=query.candidates,
                    mode=_MODES[query.mode],
                    filter=dict(query.filters),
                ),
                timeout=self._config.search_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if error.code == Code.NOT_FOUND:
                raise NotFound(f"index {query.index!r} does not exist for this tenant") from None
            if error.code == Code.INVALID_ARGUMENT:  # our request was wrong: not the caller's fault
                error = ServiceError(f"retrieval refused the search: {error.message}")
            raise error from None
        passages = [
            RagPassage(h.document_id, h.chunk_id, h.title, h.start_offset, h.end_offset, h.text, h.score)
            for h in found.hits
        ]
        context = RagContext(passages[: query.top_k], found.manifest)
        if passages and not query.skip_rerank and await self._clients.use_rerank():
            context = await self._rerank(question, passages, query.top_k, found.manifest) or context
        request.rag_context = context
        request.context = tuple(Passage(p.chunk_id, p.text, p.title) for p in context.passages)
        request.notes["rag"] = f"{len(context.passages)} passages from {found.manifest}"

    async def _rerank(self, question: str, passages: list[RagPassage], top_k: int, manifest: str) -> RagContext | None:
        assert self._clients.rerank is not None
        try:
            ranked = await self._clients.rerank.Rerank(
                rerank_pb2.RerankRequest(
                    query=question,
                    passages=[rerank_pb2.Passage(id=p.chunk_id, text=p.text, title=p.title) for p in passages],
                    top_n=top_k,
                ),
                timeout=self._config.rerank_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            _log.warning("rerank failed (%s: %s); keeping retrieval's order", exc.code().name, exc.details())
            return None
        out = []
        for r in ranked.results:
            p = passages[r.index]
            out.append(
                RagPassage(p.document_id, p.chunk_id, p.title, p.start, p.end, p.text, p.retrieval_score, r.score)
            )
        return RagContext(out, manifest, ranked.scorer)

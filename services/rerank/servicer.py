"""RerankService: protobuf <-> domain objects, nothing else."""

from __future__ import annotations

import grpc
from servemesh.rerank.v1 import rerank_pb2 as pb
from servemesh.rerank.v1 import rerank_pb2_grpc as pb_grpc

from services.rerank.core import RerankCore
from services.rerank.scorers.base import PassageInput, ScorerKind

_KINDS = {
    ScorerKind.CROSS_ENCODER: pb.SCORER_KIND_CROSS_ENCODER,
    ScorerKind.FALLBACK: pb.SCORER_KIND_FALLBACK,
}


class RerankServicer(pb_grpc.RerankServiceServicer):
    def __init__(self, core: RerankCore) -> None:
        self._core = core

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        passages = [PassageInput(id=p.id, text=p.text, title=p.title) for p in request.passages]
        # proto3: 0 means unset (all); a negative value reaches the core's validation
        results = await self._core.rerank(request.query, passages, request.top_n or None)
        return pb.RerankResponse(
            results=[pb.RerankResult(id=r.id, index=r.index, score=r.score) for r in results],
            scorer=self._core.scorer.id,
        )

    async def GetScorer(self, request: pb.GetScorerRequest, context: grpc.aio.ServicerContext) -> pb.GetScorerResponse:
        scorer = self._core.scorer
        return pb.GetScorerResponse(scorer=scorer.id, kind=_KINDS[scorer.kind], model_sha256=scorer.model_sha256)

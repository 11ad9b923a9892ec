"""InferenceService: protobuf <-> domain objects, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2
from servemesh.inference.v1 import inference_pb2 as pb
from servemesh.inference.v1 import inference_pb2_grpc as pb_grpc

from services.common import context
from services.common.errors import FieldViolation, InvalidArgument
from services.common.interceptors import ENGINE_TTFT_KEY
from services.inference.core import ENGINE_PREFIX, EngineState, InferenceCore, StreamTiming
from services.inference.engines.base import (
    Chunk,
    Engine,
    FinishReason,
    GenerationRequest,
    Message,
    Role,
    Sampling,
)

_ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}
_KINDS = {"vllm": pb.ENGINE_KIND_VLLM, "trtllm": pb.ENGINE_KIND_TRTLLM, "small": pb.ENGINE_KIND_SMALL}
MAX_PAGE_SIZE = 100


def messages_from_pb(messages: object) -> tuple[Message, ...]:
    # An unknown role maps to a placeholder that validate_input reports by index.
    return tuple(Message(_ROLES.get(m.role), m.content) for m in messages)  # type: ignore[arg-type,attr-defined]


def sampling_from_pb(s: pb.SamplingParams) -> Sampling:
    return Sampling(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
    )


def _request(req: pb.StreamGenerateRequest | pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        request_id=context.request_id(),
        prompt=req.prompt or None,
        messages=messages_from_pb(req.messages),
        sampling=sampling_from_pb(req.sampling),
        return_logprobs=req.return_logprobs,
    )


def engine_to_pb(state: EngineState) -> pb.Engine:
    e, s = state.engine, state.status
    out = pb.Engine(
        name=ENGINE_PREFIX + e.id,
        kind=_KINDS.get(e.kind, pb.ENGINE_KIND_UNSPECIFIED),
        model=e.model,
        model_card_sha256=e.card_sha256,
        health=pb.ENGINE_HEALTH_SERVING if s.healthy else pb.ENGINE_HEALTH_NOT_SERVING,
        queue_depth=s.queue_depth,
        running_requests=s.running_requests,
        kv_cache_usage=s.kv_cache_usage,
        max_model_len=e.max_model_len,
        endpoint=e.endpoint,
        health_detail=s.detail,
    )
    if state.checked_at == 0.0:
        out.health = pb.ENGINE_HEALTH_UNSPECIFIED
    else:
        out.update_time.CopyFrom(
            timestamp_pb2.Timestamp(seconds=int(state.checked_at), nanos=int(state.checked_at % 1 * 1e9))
        )
    if s.ttft_p50_s is not None:
        out.recent_ttft_p50.FromNanoseconds(int(s.ttft_p50_s * 1e9))
    return out


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context_: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        rid = context.request_id()
        timing = StreamTiming()
        async for engine, chunk in self._core.stream(request.engine, _request(request), timing):
            yield _chunk_pb(engine, chunk, rid)
        _set_timing(context_, timing)

    async def Generate(self, request: pb.GenerateRequest, context_: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        parts: list[str] = []
        last: Chunk | None = None
        engine: Engine | None = None
        timing = StreamTiming()
        async for served, chunk in self._core.stream(request.engine, _request(request), timing):
            parts.append(chunk.text)
            engine, last = served, chunk
        assert last is not None and last.usage is not None and engine is not None  # the engine guarantees it
        _set_timing(context_, timing)
        return pb.GenerateResponse(
            text="".join(parts),
            finish_reason=_FINISH[last.finish_reason] if last.finish_reason else pb.FINISH_REASON_UNSPECIFIED,
            usage=_usage_pb(last),
            engine=ENGINE_PREFIX + engine.id,
            model=engine.model,
            request_id=context.request_id(),
            mean_logprob=last.mean_logprob,
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context_: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        engine, ids = await self._core.tokenize(
            request.engine, request.prompt or None, messages_from_pb(request.messages)
        )
        return pb.TokenizeResponse(
            token_count=len(ids), token_ids=ids if request.include_token_ids else [], max_model_len=engine.max_model_len
        )

    async def ListEngines(
        self, request: pb.ListEnginesRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListEnginesResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}]"))
        size = request.page_size or MAX_PAGE_SIZE
        try:
            start = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument(FieldViolation("page_token", "is not a token this service issued")) from None
        states = self._core.states()
        page = states[start : start + size]
        nxt = str(start + size) if start + size < len(states) else ""
        return pb.ListEnginesResponse(engines=[engine_to_pb(s) for s in page], next_page_token=nxt)

    async def GetEngine(self, request: pb.GetEngineRequest, context_: grpc.aio.ServicerContext) -> pb.GetEngineResponse:
        return pb.GetEngineResponse(engine=engine_to_pb(self._core.state(request.name)))


def _set_timing(context_: grpc.aio.ServicerContext, timing: StreamTiming) -> None:
    if timing.engine_ttft_s is not None:
        context_.set_trailing_metadata(((ENGINE_TTFT_KEY, f"{timing.engine_ttft_s * 1e3:.3f}"),))


def _usage_pb(chunk: Chunk) -> pb.Usage:
    u = chunk.usage
    assert u is not None
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def _chunk_pb(engine: Engine, chunk: Chunk, request_id: str) -> pb.StreamGenerateResponse:
    out = pb.StreamGenerateResponse(
        text_delta=chunk.text, engine=ENGINE_PREFIX + engine.id, model=engine.model, request_id=request_id
    )
    if chunk.finish_reason is not None:
        out.finish_reason = _FINISH[chunk.finish_reason]
        out.usage.CopyFrom(_usage_pb(chunk))
        if chunk.mean_logprob is not None:
            out.mean_logprob = chunk.mean_logprob
    return out

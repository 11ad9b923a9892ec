"""The gateway's backend: the inference service, reached over gRPC through the mesh."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.inference.v1 import inference_pb2_grpc as ipb_grpc

from services.common.client import error_from_rpc, insecure_channel
from services.common.errors import Unavailable
from services.common.generation import Chunk, FinishReason, Message, Role, Usage
from services.common.interceptors import ENGINE_TTFT_KEY, ROUTE_CLASS_KEY
from services.gateway.core import GatewayRequest

_ROLES = {Role.SYSTEM: ipb.ROLE_SYSTEM, Role.USER: ipb.ROLE_USER, Role.ASSISTANT: ipb.ROLE_ASSISTANT}
_FINISH = {ipb.FINISH_REASON_STOP: FinishReason.STOP, ipb.FINISH_REASON_LENGTH: FinishReason.LENGTH}
#: inference field paths -> the gateway's public ones, for errors relayed to the client
_FIELDS = {"sampling": "params"}
_FIELDS_FROM_PROMPT = _FIELDS | {"messages": "prompt", "messages[0].content": "prompt"}


class InferenceBackend:
    def __init__(self, target: str, default_timeout_s: float = 300.0, authority: str = "") -> None:
        self._timeout = default_timeout_s  # the caller's own deadline, when shorter, wins
        self._channel = insecure_channel(target, options=[("grpc.default_authority", authority)] if authority else ())
        self._stub = ipb_grpc.InferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def list_engines(self) -> list[ipb.Engine]:
        try:
            resp = await self._stub.ListEngines(ipb.ListEnginesRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, _FIELDS) from None
        return list(resp.engines)

    async def count_tokens(self, engine: str, messages: Sequence[Message]) -> int:
        """Prompt tokens of a conversation on `engine`, chat template included."""
        try:
            resp = await self._stub.Tokenize(
                ipb.TokenizeRequest(
                    engine=engine, messages=[ipb.ChatMessage(role=_ROLES[m.role], content=m.content) for m in messages]
                ),
                timeout=10.0,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, _FIELDS) from None
        return resp.token_count

    async def stream(self, request: GatewayRequest, *, logprobs: bool = False) -> AsyncIterator[Chunk]:
        """`logprobs`: ask the engine for the last chunk's mean_logprob (escalation reads it)."""
        s = request.sampling
        sampling = ipb.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=s.stop,
            seed=s.seed,
            repetition_penalty=s.repetition_penalty,
        )
        call = self._stub.StreamGenerate(
            ipb.StreamGenerateRequest(
                engine=request.engine,
                prompt=request.prompt or "",
                messages=[ipb.ChatMessage(role=_ROLES[m.role], content=m.content) for m in request.messages],
                sampling=sampling,
                return_logprobs=logprobs,
            ),
            timeout=self._timeout,
            # The sidecar routes on these: the route class's route, header overrides.
            metadata=(((ROUTE_CLASS_KEY, request.route_class),) if request.route_class else ()) + request.forward,
        )
        finished = False
        try:
            async for msg in call:
                if not request.served.engine:
                    request.served.engine, request.served.model = msg.engine, msg.model
                if msg.finish_reason == ipb.FINISH_REASON_UNSPECIFIED:
                    yield Chunk(msg.text_delta)
                else:
                    finished = True
                    u = msg.usage
                    yield Chunk(
                        msg.text_delta,
                        _FINISH[msg.finish_reason],
                        Usage(u.prompt_tokens, u.completion_tokens),
                        mean_logprob=msg.mean_logprob if msg.HasField("mean_logprob") else None,
                    )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, _FIELDS_FROM_PROMPT if request.from_prompt else _FIELDS) from None
        finally:
            call.cancel()  # no-op when finished; aborts the engine's work when we stop early
        for key, value in await call.trailing_metadata() or ():
            if key == ENGINE_TTFT_KEY:
                request.served.engine_ttft_ms = value
        if not finished:
            raise Unavailable("inference ended the stream before the request finished", retry_after=1.0)

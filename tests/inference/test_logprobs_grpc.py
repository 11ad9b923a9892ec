"""mean_logprob end to end over gRPC: the inference servicer maps return_logprobs and
mean_logprob, and the gateway's InferenceBackend passes them through (engine: the
trtllm-profile client against the OpenAI stand-in; no real engine needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from servemesh.inference.v1 import inference_pb2 as pb
from servemesh.inference.v1 import inference_pb2_grpc as pb_grpc

from services.common.generation import Message, Role, Sampling
from services.gateway.backend import InferenceBackend
from services.gateway.core import GatewayRequest
from services.inference.engines.openai_server import TRTLLM, OpenAIServerEngine
from services.inference.server import create_inference_server
from services.inference.settings import EngineConfig, InferenceSettings

from .openai_standin import StandIn

LOGPROBS = [-0.5, -2.0, -0.25, -1.25]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def inference(prepared_model: tuple[Path, object]) -> AsyncIterator[tuple[str, StandIn]]:
    with StandIn(["The", " sky", " is", " blue"], finish="stop", logprobs=LOGPROBS) as srv:
        engine = OpenAIServerEngine(
            "trt", srv.url, model="m", profile=TRTLLM, max_model_len=2048, tokenizer_dir=prepared_model[0]
        )
        config = EngineConfig(id="trt", kind="trtllm", url=srv.url, model="m", model_dir=prepared_model[0])
        settings = InferenceSettings(port=0, metrics_port=0, engines=[config], health_interval_s=5)
        server, core = await create_inference_server(settings, engines=[engine], registry=CollectorRegistry())
        await server.start()
        yield server.address, srv
        await server.stop(0)
        await core.close()


def _request(request_id: str) -> GatewayRequest:
    return GatewayRequest(
        request_id=request_id,
        route_class="chat_short",
        prompt=None,
        messages=(Message(Role.USER, "What colour is the sky?"),),
        sampling=Sampling(max_tokens=8),
        engine="trt",
    )


async def test_gateway_backend_passes_the_flag_and_the_mean_through(inference) -> None:
    address, srv = inference
    backend = InferenceBackend(address)
    try:
        asked = [c async for c in backend.stream(_request("g-1"), logprobs=True)]
        plain = [c async for c in backend.stream(_request("g-2"))]
    finally:
        await backend.close()
    assert "".join(c.text for c in asked) == "The sky is blue"
    assert asked[-1].finish_reason is not None
    assert asked[-1].mean_logprob == pytest.approx(sum(LOGPROBS) / len(LOGPROBS))
    assert all(c.mean_logprob is None for c in asked[:-1])
    assert plain[-1].mean_logprob is None
    assert srv.requests[-2]["logprobs"] is True and "logprobs" not in srv.requests[-1]


async def test_unary_generate_returns_mean_logprob_only_when_asked(inference) -> None:
    address, _ = inference
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        msgs = [pb.ChatMessage(role=pb.ROLE_USER, content="What colour is the sky?")]
        asked = await stub.Generate(pb.GenerateRequest(engine="trt", messages=msgs, return_logprobs=True), timeout=30)
        plain = await stub.Generate(pb.GenerateRequest(engine="trt", messages=msgs), timeout=30)
    assert asked.HasField("mean_logprob") and asked.mean_logprob == pytest.approx(-1.0)
    assert not plain.HasField("mean_logprob")

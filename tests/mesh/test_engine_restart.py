"""The vLLM process killed mid-stream: the client gets UNAVAILABLE (never an empty
success), the supervisor restarts vLLM, and requests succeed again."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from servemesh.gateway.v1 import gateway_pb2 as pb
from servemesh.gateway.v1 import gateway_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine


async def test_engine_killed_mid_stream_then_restarted(gateway_channel, vllm) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    restarts = vllm.supervisor.restarts
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(
            prompt="Write a long essay about lighthouses.", params=pb.DecodingParams(max_tokens=256)
        ),
        timeout=60,
    )
    received: list[pb.StreamGenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for chunk in call:
            received.append(chunk)
            if len(received) == 3:
                os.killpg(vllm.supervisor.pid, signal.SIGKILL)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(received) >= 3 and all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in received)

    # while it is down: a clear UNAVAILABLE, not a hang
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.DecodingParams(max_tokens=4)), timeout=30)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE

    # the supervisor may not have seen the exit yet (it still counts as healthy then): wait
    # for the restart itself, then check it happened exactly once
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 240
    while vllm.supervisor.restarts == restarts and loop.time() < deadline:
        await asyncio.sleep(0.2)
    await vllm.supervisor.wait_healthy(timeout=10)
    assert vllm.supervisor.restarts == restarts + 1
    reply = await stub.Generate(
        pb.GenerateRequest(prompt="Say hello.", params=pb.DecodingParams(max_tokens=8)), timeout=60
    )
    assert reply.usage.completion_tokens > 0 and reply.finish_reason != pb.FINISH_REASON_UNSPECIFIED

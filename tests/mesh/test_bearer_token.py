"""The CLI's channels send the API key on unary and on streaming calls alike."""

from __future__ import annotations

import grpc
from servemesh.gateway.v1 import gateway_pb2 as pb
from servemesh.gateway.v1 import gateway_pb2_grpc as pb_grpc

from mesh.state import bearer_token


class _Echo(pb_grpc.GatewayServiceServicer):
    """Answers with the authorization header it received."""

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GenerateResponse(text=dict(context.invocation_metadata()).get("authorization", ""))

    async def StreamGenerate(self, request, context):  # type: ignore[no-untyped-def]
        yield pb.StreamGenerateResponse(text_delta=dict(context.invocation_metadata()).get("authorization", ""))


async def test_the_key_reaches_unary_and_server_streaming_calls() -> None:
    server = grpc.aio.server()
    pb_grpc.add_GatewayServiceServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_token("sm_k_s")) as channel:
            stub = pb_grpc.GatewayServiceStub(channel)
            unary = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
            streamed = [
                m.text_delta async for m in stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=5)
            ]
    finally:
        await server.stop(0)
    assert unary.text == "Bearer sm_k_s"
    assert streamed == ["Bearer sm_k_s"]

"""The generation path end to end: gateway -> inference -> a real vLLM."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from servemesh.gateway.v1 import gateway_pb2 as pb
from servemesh.gateway.v1 import gateway_pb2_grpc as pb_grpc
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.inference.v1 import inference_pb2_grpc as ipb_grpc

pytestmark = pytest.mark.engine

QUESTION = "Name three colours of the rainbow."


def _request(**params) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=QUESTION)], params=pb.DecodingParams(**params)
    )


async def _engine_counters(vllm_url: str) -> tuple[float, float]:
    """(tokens vLLM has generated in all, requests it is running now), from its /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{vllm_url}/metrics")).text

    def total(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    return total("vllm:generation_tokens_total"), total("vllm:num_requests_running")


async def _assert_aborted_early(vllm_url: str, tokens_before: float, max_tokens: int) -> None:
    """vLLM stopped the request: nothing runs, and it generated far fewer than max_tokens
    (at ~20 tokens/s a request left running would still be producing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while (counters := await _engine_counters(vllm_url))[1] > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert counters[1] == 0, "vLLM is still running the cancelled request"
    await asyncio.sleep(1.0)
    generated = (await _engine_counters(vllm_url))[0] - tokens_before
    assert 0 < generated < max_tokens / 4, f"vLLM generated {generated} of {max_tokens} tokens"


async def test_stream_is_ordered_complete_and_usage_agrees(gateway_channel, inference_channel) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    chunks = [c async for c in stub.StreamGenerate(_request(temperature=0, max_tokens=24))]
    assert len(chunks) > 2
    *body, last = chunks
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not c.HasField("usage") for c in body)
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    text = "".join(c.text_delta for c in chunks)
    assert text.strip()
    # the same greedy request, unary, gives the same text: the stream lost and reordered nothing
    unary = await stub.Generate(
        pb.GenerateRequest(messages=_request().messages, params=pb.DecodingParams(temperature=0, max_tokens=24))
    )
    assert unary.text == text and unary.usage == last.usage
    # usage agrees with the tokenizer: the prompt as templated, the completion as generated
    tok = ipb_grpc.InferenceServiceStub(inference_channel)
    prompt = await tok.Tokenize(ipb.TokenizeRequest(messages=[ipb.ChatMessage(role=ipb.ROLE_USER, content=QUESTION)]))
    completion = await tok.Tokenize(ipb.TokenizeRequest(prompt=text))
    assert last.usage.prompt_tokens == prompt.token_count
    assert last.usage.completion_tokens == completion.token_count
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    if last.finish_reason == pb.FINISH_REASON_LENGTH:
        assert last.usage.completion_tokens == 24
    assert {c.engine for c in chunks} == {"engines/vllm"} and {c.model for c in chunks} == {"smollm2-135m-instruct"}
    assert {c.route_class for c in chunks} == {"chat_short"}


async def test_a_prompt_is_sent_as_one_user_message(gateway_channel, inference_channel) -> None:
    """The public `prompt` is a user turn (chat template applied), not raw completion text."""
    reply = await pb_grpc.GatewayServiceStub(gateway_channel).Generate(
        pb.GenerateRequest(prompt=QUESTION, params=pb.DecodingParams(max_tokens=2))
    )
    templated = await ipb_grpc.InferenceServiceStub(inference_channel).Tokenize(
        ipb.TokenizeRequest(messages=[ipb.ChatMessage(role=ipb.ROLE_USER, content=QUESTION)])
    )
    assert reply.usage.prompt_tokens == templated.token_count


async def test_gateway_measures_ttft_and_tokens_per_route_class(gateway_channel, mesh) -> None:
    labels = {"route_class": "code", "engine": "vllm"}
    reg = mesh.gateway_registry

    def value(name: str, **extra: str) -> float:
        return reg.get_sample_value(name, labels | extra) or 0.0

    before = value("servemesh_generation_time_to_first_token_seconds_count")
    tokens_before = value("servemesh_generation_tokens_total", kind="completion")
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    chunks = [
        c
        async for c in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="Hi", route_class="code", params=pb.DecodingParams(max_tokens=5))
        )
    ]
    assert value("servemesh_generation_time_to_first_token_seconds_count") == before + 1
    completion = value("servemesh_generation_tokens_total", kind="completion") - tokens_before
    assert completion == chunks[-1].usage.completion_tokens > 0


async def test_engine_ttft_trailer_reaches_the_client(gateway_channel) -> None:
    """The engine's own TTFT comes back as a trailer through both hops, so a caller can
    tell what the mesh added to its TTFT."""
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    start = time.perf_counter()
    call = stub.StreamGenerate(_request(max_tokens=3))
    first = None
    async for chunk in call:
        if first is None and chunk.text_delta:
            first = time.perf_counter() - start
    trailers = dict(await call.trailing_metadata())
    engine_ttft = float(trailers["x-servemesh-engine-ttft-ms"]) / 1e3
    assert first is not None and 0 < engine_ttft < first


async def test_temperature_zero_is_repeatable_and_then_cached(gateway_channel) -> None:
    """Seed smoke test: a deterministic generation gives the same text hash twice. Two seeds
    (ignored by greedy decoding, but part of the cache key) make both engine runs; asking
    again is a marked cache hit with the same text."""
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    hashes, cached = [], []
    for seed in (101, 102, 101):
        chunks = [c async for c in stub.StreamGenerate(_request(temperature=0, max_tokens=32, seed=seed))]
        hashes.append(hashlib.sha256("".join(c.text_delta for c in chunks).encode()).hexdigest())
        cached.append(chunks[-1].cached)
    assert hashes[0] == hashes[1] == hashes[2]
    assert cached == [False, False, True]


async def test_request_id_round_trip(gateway_channel) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    call = stub.StreamGenerate(_request(max_tokens=4), metadata=(("x-request-id", "test-rid-42"),))
    chunks = [c async for c in call]
    assert dict(await call.initial_metadata())["x-request-id"] == "test-rid-42"
    assert {c.request_id for c in chunks} == {"test-rid-42"}
    minted = stub.StreamGenerate(_request(max_tokens=2))
    ids = {c.request_id async for c in minted}
    assert len(ids) == 1 and ids.pop() == dict(await minted.initial_metadata())["x-request-id"] != ""


async def test_cancellation_aborts_the_request_in_vllm(gateway_channel, vllm) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    before, _ = await _engine_counters(vllm.url)
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(
            prompt="Tell me a very long story about a dragon.", params=pb.DecodingParams(max_tokens=256)
        )
    )
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            call.cancel()
            break
    await _assert_aborted_early(vllm.url, before, 256)


async def test_expired_deadline_is_deadline_exceeded_and_aborts(gateway_channel, vllm) -> None:
    # The deadline falls mid-generation: long enough for the first tokens even on a busy
    # machine (TTFT here is ~0.6 s), far too short for 512 tokens at ~20-40 tokens/s.
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    before, _ = await _engine_counters(vllm.url)
    chunks = 0
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.StreamGenerate(
            pb.StreamGenerateRequest(
                prompt="Write a long essay about rivers.",
                route_class="rag_long",
                params=pb.DecodingParams(max_tokens=512),
            ),
            timeout=3.0,
        ):
            chunks += 1
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert chunks > 0, "the deadline expired before the first token; the test proves nothing"
    await _assert_aborted_early(vllm.url, before, 512)


BAD = [
    (pb.StreamGenerateRequest(), "messages"),
    (pb.StreamGenerateRequest(prompt="hi", messages=[pb.Message(role=pb.ROLE_USER, content="x")]), "prompt"),
    (pb.StreamGenerateRequest(messages=[pb.Message(role=7, content="x")]), "messages[0].role"),
    (pb.StreamGenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content="")]), "messages[0].content"),
    (pb.StreamGenerateRequest(prompt="hi", params=pb.DecodingParams(temperature=3)), "params.temperature"),
    (pb.StreamGenerateRequest(prompt="hi", params=pb.DecodingParams(top_p=0)), "params.top_p"),
    (pb.StreamGenerateRequest(prompt="hi", params=pb.DecodingParams(max_tokens=0)), "params.max_tokens"),
    (
        pb.StreamGenerateRequest(prompt="hi", params=pb.DecodingParams(repetition_penalty=0.5)),
        "params.repetition_penalty",
    ),
    (pb.StreamGenerateRequest(prompt="hi", params=pb.DecodingParams(stop=["a"] * 5)), "params.stop"),
    (pb.StreamGenerateRequest(prompt="x" * 40_000), "prompt"),
    (pb.StreamGenerateRequest(prompt="hi", route_class="nope"), "route_class"),
]


@pytest.mark.parametrize(("request_", "field"), BAD, ids=[f for _, f in BAD])
async def test_bad_input_is_invalid_argument_naming_the_field(gateway_channel, request_, field) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.StreamGenerate(request_, timeout=10):
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in _violations(exc.value)


async def test_prompt_over_the_context_length_is_invalid_argument(gateway_channel) -> None:
    """Under the character limit but over the route class's prompt budget (and vLLM's
    2048-token context): INVALID_ARGUMENT naming the field and the limit."""
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Generate(pb.GenerateRequest(prompt="word " * 6000), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024" in _violations(exc.value)["prompt"]


async def test_routing_hints_and_fallback_to_an_engine_that_exists(gateway_channel) -> None:
    """A low-uncertainty hint routes to the small engine, which this deployment lacks: the
    request falls back to primary without the caller noticing."""
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    hinted = pb.GenerateRequest(prompt="Say hi", params=pb.DecodingParams(max_tokens=4), hints=pb.RoutingHints())
    hinted.hints.uncertainty = 0.1
    resp = await stub.Generate(hinted, timeout=60)
    assert resp.engine == "engines/vllm" and resp.usage.completion_tokens >= 1
    bad = pb.GenerateRequest(prompt="Say hi", hints=pb.RoutingHints(latency_budget_ms=0))
    bad.hints.uncertainty = 1.5
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Generate(bad, timeout=30)
    assert "hints.uncertainty" in _violations(exc.value)


async def test_allow_trim_reports_what_was_trimmed(gateway_channel) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway_channel)
    old = [pb.Message(role=r, content="filler " * 300) for r in (pb.ROLE_USER, pb.ROLE_ASSISTANT)] * 2
    req = pb.GenerateRequest(
        messages=[*old, pb.Message(role=pb.ROLE_USER, content="Say hi")],
        params=pb.DecodingParams(max_tokens=4),
        context=[pb.ContextPassage(id="doc-1", text="A short passage.")],
        allow_trim=True,
    )
    resp = await stub.Generate(req, timeout=60)
    t = resp.trimmed
    assert t.messages_removed >= 1 and t.prompt_tokens_before > 1024 >= t.prompt_tokens_after
    assert list(t.passage_ids_removed) == []  # turns go first; the passage fit after them
    req.allow_trim = False
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Generate(req, timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details in {err.details()!r}"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out |= {v.field: v.description for v in bad.field_violations}
    return out


async def test_get_version_reports_models_and_commit(gateway_channel, prepared_model) -> None:
    import subprocess

    v = await pb_grpc.GatewayServiceStub(gateway_channel).GetVersion(pb.GetVersionRequest())
    card = (prepared_model[0] / "card.json").read_bytes()
    assert [(m.engine, m.model, m.card_sha256) for m in v.models] == [
        ("engines/vllm", "smollm2-135m-instruct", hashlib.sha256(card).hexdigest())
    ]
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    head = git.stdout.strip() if git.returncode == 0 else "unknown"
    assert v.build_commit == head and v.environment == "dev" and v.version


async def test_engines_report_live_state(inference_channel, prepared_model) -> None:
    stub = ipb_grpc.InferenceServiceStub(inference_channel)
    engines = (await stub.ListEngines(ipb.ListEnginesRequest())).engines
    assert [e.name for e in engines] == ["engines/vllm"]
    e = (await stub.GetEngine(ipb.GetEngineRequest(name="engines/vllm"))).engine
    assert e.health == ipb.ENGINE_HEALTH_SERVING and e.kind == ipb.ENGINE_KIND_VLLM
    assert e.max_model_len == 2048 and 0.0 <= e.kv_cache_usage <= 1.0 and e.queue_depth >= 0
    assert e.model_card_sha256 == hashlib.sha256((prepared_model[0] / "card.json").read_bytes()).hexdigest()
    assert e.HasField("update_time") and e.HasField("recent_ttft_p50")  # earlier tests generated
    # the p50 of the requests that got their first token in the last health poll (0.5 s): a
    # long prompt just before makes it large, so only "live and finite" is checked here
    assert 0 < e.recent_ttft_p50.ToTimedelta().total_seconds() < 120
    for name, code in (("engines/nope", grpc.StatusCode.NOT_FOUND), ("vllm", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.GetEngine(ipb.GetEngineRequest(name=name))
        assert exc.value.code() == code


async def test_reflection_client_lists_and_calls_every_gateway_rpc(mesh) -> None:
    """A generic client that knows no servemesh types finds the RPCs and calls one. The
    reflection client is synchronous, so it runs in a thread beside the servers' loop."""

    def generic_client() -> tuple[set[str], set[str], str]:
        with grpc.insecure_channel(mesh.gateway.address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            pool = descriptor_pool.DescriptorPool(db)
            service = pool.FindServiceByName("servemesh.gateway.v1.GatewayService")
            method = service.methods_by_name["GetVersion"]
            req_cls = message_factory.GetMessageClass(method.input_type)
            resp_cls = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(
                "/servemesh.gateway.v1.GatewayService/GetVersion",
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            resp = call(req_cls(), timeout=10)
            return services, {m.name for m in service.methods}, resp.models[0].engine

    services, methods, engine = await asyncio.to_thread(generic_client)
    assert {"servemesh.gateway.v1.GatewayService", "grpc.health.v1.Health"} <= services
    assert methods == {"StreamGenerate", "Generate", "StreamRagAnswer", "GetVersion"}
    assert engine == "engines/vllm"

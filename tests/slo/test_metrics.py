"""Parsing real /metrics output: prometheus_client's, and a running gateway's over a fake
inference service (its requests ending OK, slow, INTERNAL, DEADLINE_EXCEEDED or refused)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.inference.v1 import inference_pb2_grpc as ipb_grpc

from mesh.slo import metrics
from mesh.slo.config import load_config
from mesh.slo.evaluator import SloEvaluator, State
from mesh.slo.metrics import Key, ScrapeError
from services.common.metrics import GenerationMetrics, SafetyMetrics, ServerMetrics, start_metrics_server
from services.common.server import Service, create_server
from services.common.settings import ServiceSettings
from services.gateway.cache.config import CacheConfig
from services.gateway.core import RequestMetrics
from services.gateway.rag import RagConfig
from services.gateway.server import create_gateway_server
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.timeout(120)


def test_parses_what_prometheus_client_writes() -> None:
    registry = CollectorRegistry()
    requests = RequestMetrics(registry, ["chat_short", "code"], "chat_short")
    generation, safety = GenerationMetrics(registry), SafetyMetrics(registry)
    ServerMetrics(registry).finished("servemesh.gateway.v1.GatewayService", "Generate", "OK", 0.1)  # not ours
    for code in ("OK", "OK", "INTERNAL", "DEADLINE_EXCEEDED"):
        requests.finished("chat_short", code)
    requests.finished("", "OK")  # the default class
    requests.finished("nope", "INVALID_ARGUMENT")
    for seconds, engine in ((0.05, "vllm"), (0.7, "vllm"), (0.9, "small"), (3.0, "vllm")):
        generation.first_token("chat_short", engine, seconds)
    safety.refused("weapons")
    scrape = metrics.parse(generate_latest(registry).decode())
    summed = scrape.summed()
    assert summed[Key("requests", "chat_short", "OK")] == 3
    assert summed[Key("requests", "chat_short", "INTERNAL")] == 1
    assert summed[Key("requests", "chat_short", "DEADLINE_EXCEEDED")] == 1
    assert summed[Key("requests", "code", "UNAVAILABLE")] == 0  # created at 0 up front
    assert summed[Key("requests", "unknown", "INVALID_ARGUMENT")] == 1
    # TTFT buckets summed over engines, by their bound
    assert summed[Key("ttft_bucket", "chat_short", 0.8)] == 2 and summed[Key("ttft_bucket", "chat_short", 2.5)] == 3
    assert summed[Key("ttft_bucket", "chat_short", math.inf)] == 4 and summed[Key("ttft_count", "chat_short")] == 4
    assert summed[Key("safety_refusals", "")] == 1
    assert not any(s.name.startswith("servemesh_grpc_") for s in scrape.values)
    # every series is dated by its _created sample, a histogram's buckets by one
    bucket = next(s for s in scrape.values if s.name == metrics.TTFT_BUCKET)
    assert metrics.created_id(bucket) in scrape.created
    assert all(metrics.created_id(s) in scrape.created for s in scrape.values)


def test_a_page_that_is_not_the_text_format_is_an_error() -> None:
    with pytest.raises(ScrapeError, match="not the Prometheus text format"):
        metrics.parse("servemesh_gateway_requests_total{route_class=chat} one\n")


async def test_fetches_over_http_with_a_timeout() -> None:
    registry = CollectorRegistry()
    RequestMetrics(registry, ["code"], "code").finished("code", "OK")
    server, port = start_metrics_server(registry, "127.0.0.1", 0)
    try:
        evaluator = SloEvaluator(load_config(), [f"http://127.0.0.1:{port}/metrics", "http://127.0.0.1:1/metrics"])
        sample = await evaluator.scrape_once()
        await evaluator.aclose()
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
    assert sample is not None and list(evaluator.errors) == ["http://127.0.0.1:1/metrics"]
    assert "ConnectError" in evaluator.errors["http://127.0.0.1:1/metrics"]


class _Inference(ipb_grpc.InferenceServiceServicer):
    """Answers by the prompt: "slow" after 1 s, "fail" with INTERNAL, "hang" never; else at once."""

    async def StreamGenerate(self, request, context) -> AsyncIterator[ipb.StreamGenerateResponse]:
        prompt = " ".join(m.content for m in request.messages) or request.prompt
        if "fail" in prompt:
            await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
        if "hang" in prompt:
            await asyncio.sleep(60)
        if "slow" in prompt:
            await asyncio.sleep(1.0)
        for word in ("Hello", " there"):
            yield ipb.StreamGenerateResponse(text_delta=word, engine=request.engine or "vllm", model="fake")
        yield ipb.StreamGenerateResponse(
            finish_reason=ipb.FINISH_REASON_STOP,
            usage=ipb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
            engine=request.engine or "vllm",
            model="fake",
        )

    async def Tokenize(self, request, context) -> ipb.TokenizeResponse:
        return ipb.TokenizeResponse(token_count=3, max_model_len=2048)

    async def ListEngines(self, request, context) -> ipb.ListEnginesResponse:
        return ipb.ListEnginesResponse(engines=[ipb.Engine(name="engines/vllm", model="fake")])


async def test_a_real_gateway_counts_each_request_by_route_class_and_final_code() -> None:
    service = Service(
        "servemesh.inference.v1.InferenceService", _Inference(), ipb_grpc.add_InferenceServiceServicer_to_server
    )
    inference = await create_server(ServiceSettings(port=0), [service], registry=CollectorRegistry())
    await inference.start()
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        inference_target=inference.address,
        cache=CacheConfig(enabled=False),
        rag=RagConfig(enabled=False),
    )
    gateway, backend, _ = await create_gateway_server(settings, registry=CollectorRegistry())
    await gateway.start()
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    evaluator = SloEvaluator(load_config(), [url])
    codes: list[grpc.StatusCode] = []
    try:
        await evaluator.scrape_once()  # the baseline
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            for prompt, timeout in [("hi", 30), ("hello", 30), ("hey", 30), ("slow one", 30), ("slow two", 30),
                                    ("fail please", 30), ("hang on", 1.0)]:  # fmt: skip
                request = gpb.GenerateRequest(prompt=prompt, route_class="chat_short")
                try:
                    await stub.Generate(request, timeout=timeout)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(gpb.GenerateRequest(prompt="hi", route_class="no_such_class"), timeout=30)
        assert codes == [grpc.StatusCode.OK] * 5 + [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def total() -> float:
            return sum(gateway.registry.get_sample_value(metrics.REQUESTS, {"route_class": rc, "code": c}) or 0
                       for rc in ("chat_short", "unknown") for c in ("OK", "INTERNAL", "DEADLINE_EXCEEDED",
                                                                      "INVALID_ARGUMENT"))  # fmt: skip

        for _ in range(500):  # a cancelled handler's stream is closed (and counted) by the event loop soon after
            if total() >= 8:
                break
            await asyncio.sleep(0.01)
        sample = await evaluator.scrape_once()
    finally:
        await evaluator.aclose()
        await gateway.stop(0)
        await backend.close()
        await inference.stop(0)
    assert sample is not None and evaluator.errors == {}
    assert sample.totals[Key("requests", "chat_short", "OK")] == 5
    assert sample.totals[Key("requests", "chat_short", "INTERNAL")] == 1
    assert sample.totals[Key("requests", "chat_short", "DEADLINE_EXCEEDED")] == 1
    assert sample.totals[Key("requests", "unknown", "INVALID_ARGUMENT")] == 1  # no made-up class as a label
    statuses = {s.slo.name: s for s in evaluator.statuses(sample.time)}
    errors, timeouts, ttft = (statuses[f"chat_short-{k}"] for k in ("server_errors", "timeouts", "ttft"))
    assert (errors.burn_rates[0].requests, errors.burn_rates[0].bad_fraction) == (7, pytest.approx(1 / 7))
    assert (timeouts.burn_rates[0].requests, timeouts.burn_rates[0].bad_fraction) == (7, pytest.approx(1 / 7))
    assert not errors.burn_rates[0].complete  # seconds of data, not 5 minutes
    # 1 in 7 burns the 1% budget 14.3x (under the fast 14.4x: a slow burn), the 0.5% one 28.6x
    assert (errors.state, timeouts.state) == (State.WARNING, State.BREACHED)
    # TTFT: the five answered requests; the two slow ones took over 1 s, past the 0.8 s bound
    assert ttft.burn_rates[0].requests == 5 and ttft.burn_rates[0].bad_fraction >= 2 / 5
    assert statuses["code-server_errors"].state is State.NO_DATA

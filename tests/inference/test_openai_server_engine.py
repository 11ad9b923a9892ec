"""The OpenAI-server engine client, trtllm profile, against a protocol-compatible
stand-in (TensorRT-LLM itself needs a GPU). The vLLM profile runs against the real
vLLM in tests/inference/test_inference_vllm.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.inference.engines.base import FinishReason, GenerationRequest, Message, Role, Sampling
from services.inference.engines.openai_server import TRTLLM, VLLM, OpenAIServerEngine, _HistogramWindow, _LogprobMean

from .openai_standin import StandIn


async def _engine(url: str, tokenizer_dir: Path | None = None, profile=TRTLLM) -> OpenAIServerEngine:
    engine = OpenAIServerEngine("trt", url, model="m", profile=profile, max_model_len=2048, tokenizer_dir=tokenizer_dir)
    await engine.start()
    return engine


async def _collect(engine: OpenAIServerEngine, request: GenerationRequest) -> list:
    return [c async for c in engine.generate(request)]


async def test_streams_deltas_then_finish_and_usage(prepared_model) -> None:
    with StandIn(["Hel", "lo", " world"]) as srv:
        engine = await _engine(srv.url, prepared_model[0])
        chunks = await _collect(
            engine,
            GenerationRequest(
                "r1",
                prompt="hi",
                sampling=Sampling(temperature=0.0, max_tokens=3, stop=("END",), seed=7, repetition_penalty=1.1),
            ),
        )
        await engine.close()
    assert [c.text for c in chunks] == ["Hel", "lo", " world", ""]
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 3)
    sent = srv.requests[0]
    assert sent["prompt"] == "hi" and sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["seed"]) == (0.0, 3, ["END"], 7)
    assert "X-Request-Id" not in srv.headers[0]  # trtllm-serve takes no request id header


async def test_chat_goes_to_chat_endpoint(prepared_model) -> None:
    with StandIn(["a", "b"], finish="stop") as srv:
        engine = await _engine(srv.url, prepared_model[0])
        chunks = await _collect(engine, GenerationRequest("r2", messages=(Message(Role.USER, "hi"),)))
        await engine.close()
    assert "".join(c.text for c in chunks) == "ab"
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert srv.requests[0]["messages"] == [{"role": "user", "content": "hi"}]


async def test_stream_without_finish_is_unavailable_not_success(prepared_model) -> None:
    with StandIn(["partial"], finish=None) as srv:
        engine = await _engine(srv.url, prepared_model[0])
        with pytest.raises(Unavailable, match="before finishing"):
            await _collect(engine, GenerationRequest("r3", prompt="hi"))
        await engine.close()


async def test_closing_the_stream_disconnects_the_server(prepared_model) -> None:
    with StandIn([f"t{i}" for i in range(200)], delay_s=0.02) as srv:
        engine = await _engine(srv.url, prepared_model[0])
        stream = engine.generate(GenerationRequest("r4", prompt="hi"))
        assert (await anext(stream)).text == "t0"
        await stream.aclose()
        assert await asyncio.to_thread(srv.disconnected.wait, 5.0), "server never saw the client go away"
        await engine.close()


async def test_http_errors_map_to_domain_errors(prepared_model) -> None:
    with StandIn([], status=400, error_body='{"error": {"message": "prompt too long: 5000 > 2048"}}') as srv:
        engine = await _engine(srv.url, prepared_model[0])
        with pytest.raises(InvalidArgument) as bad:
            await _collect(engine, GenerationRequest("r5", prompt="x"))
        assert bad.value.violations[0].field == "prompt" and "5000 > 2048" in bad.value.violations[0].description
        srv.status = 503
        with pytest.raises(Unavailable, match="HTTP 503"):
            await _collect(engine, GenerationRequest("r6", prompt="x"))
        srv.status = 404
        with pytest.raises(FailedPrecondition):
            await _collect(engine, GenerationRequest("r7", prompt="x"))
        await engine.close()


async def test_unreachable_server_is_unavailable(prepared_model) -> None:
    with StandIn([]) as srv:
        url = srv.url
    engine = await _engine(url, prepared_model[0])
    with pytest.raises(Unavailable, match="unreachable"):
        await _collect(engine, GenerationRequest("r8", prompt="x"))
    status = await engine.check_health()
    assert not status.healthy and not engine.ready()
    await engine.close()


async def test_health_reads_iteration_stats(prepared_model) -> None:
    with StandIn([]) as srv:
        engine = await _engine(srv.url, prepared_model[0])
        status = await engine.check_health()
        assert status.healthy and engine.ready()
        assert (status.queue_depth, status.running_requests, status.kv_cache_usage) == (3, 2, 0.25)
        srv.healthy = False
        assert not (await engine.check_health()).healthy
        await engine.close()


async def test_tokenizes_locally_with_the_chat_template(prepared_model) -> None:
    with StandIn([]) as srv:
        engine = await _engine(srv.url, prepared_model[0])
        plain = await engine.tokenize("Hello world", ())
        chat = await engine.tokenize(None, (Message(Role.USER, "Hello world"),))
        await engine.close()
    assert 0 < len(plain) < len(chat)  # the template adds the system turn and role markers


async def test_trtllm_profile_needs_a_tokenizer_folder() -> None:
    engine = OpenAIServerEngine("trt", "http://127.0.0.1:1", model="m", profile=TRTLLM, max_model_len=2048)
    with pytest.raises(FailedPrecondition, match="tokenizer_dir"):
        await engine.start()


def test_vllm_profile_sends_request_id() -> None:
    assert VLLM.request_id_header == "X-Request-Id" and VLLM.server_tokenize


def test_ttft_median_from_histogram_deltas() -> None:
    window = _HistogramWindow()
    inf = float("inf")
    assert window.update({0.1: 0, 0.5: 0, inf: 0}) is None
    # 4 requests between scrapes: 2 under 0.1 s, 2 in (0.1, 0.5]: median at the 0.1 boundary
    assert window.update({0.1: 2, 0.5: 4, inf: 4}) == pytest.approx(0.1)
    # next window: 4 more, all in (0.1, 0.5]; median interpolated halfway into that bucket
    assert window.update({0.1: 2, 0.5: 8, inf: 8}) == pytest.approx(0.3)
    # nothing new: the last value is kept
    assert window.update({0.1: 2, 0.5: 8, inf: 8}) == pytest.approx(0.3)


@pytest.mark.parametrize("profile", [VLLM, TRTLLM], ids=["vllm", "trtllm"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
async def test_mean_logprob_of_the_sampled_tokens_on_the_last_chunk(prepared_model, profile, chat) -> None:
    with StandIn(["a", "b", "c"], logprobs=[-0.25, -1.5, -0.05]) as srv:
        engine = await _engine(srv.url, prepared_model[0], profile=profile)
        where = {"messages": (Message(Role.USER, "hi"),)} if chat else {"prompt": "hi"}
        asked = await _collect(engine, GenerationRequest("lp1", return_logprobs=True, **where))
        plain = await _collect(engine, GenerationRequest("lp2", **where))
        await engine.close()
    assert "".join(c.text for c in asked) == "abc"
    assert all(c.mean_logprob is None for c in asked[:-1])
    assert asked[-1].mean_logprob == pytest.approx(-0.6)
    assert plain[-1].mean_logprob is None, "logprobs were not asked for"
    sent_asked, sent_plain = srv.requests
    # vLLM's field names: chat takes logprobs: true (+ top_logprobs), completions logprobs: <top count>
    if chat:
        assert (sent_asked["logprobs"], sent_asked["top_logprobs"]) == (True, 0)
    else:
        assert sent_asked["logprobs"] == 0 and "top_logprobs" not in sent_asked
    assert "logprobs" not in sent_plain and "top_logprobs" not in sent_plain


def test_logprob_mean_skips_missing_and_non_finite_entries() -> None:
    mean = _LogprobMean()
    assert mean.mean() is None
    mean.add(None)
    mean.add({"content": [{"logprob": -1.0}, {"token": "x"}, None, {"logprob": float("-inf")}, {"logprob": -9999.0}]})
    mean.add({"token_logprobs": [None, -3.0, float("nan")]})
    mean.add({"content": None, "token_logprobs": [-2.0]})
    assert mean.mean() == pytest.approx(-2.0)


async def test_sequential_requests_reuse_one_connection(prepared_model) -> None:
    """The body is read to its end after [DONE], so the connection goes back to the pool: a
    new TCP connection per request cost ~2 ms of CPU per request in the inference service."""
    peers: list[object] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": null}]}\n\n')
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        final = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": usage}
        await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.add_routes([web.post("/v1/completions", completions)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine = await _engine(f"http://127.0.0.1:{runner.addresses[0][1]}", prepared_model[0], profile=VLLM)
    try:
        for _ in range(4):
            chunks = await _collect(engine, GenerationRequest("r", prompt="x", sampling=Sampling(max_tokens=1)))
            assert chunks[-1].finish_reason is FinishReason.STOP
    finally:
        await engine.close()
        await runner.cleanup()
    assert len(peers) == 4 and len(set(peers)) == 1

"""The OpenAI-compatible HTTP API, driven with the official `openai` SDK: over a scripted
backend for the error paths, and over the real vLLM for the happy paths."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import QuotaViolation, ResourceExhausted, Unavailable
from services.common.generation import Chunk, FinishReason, Usage
from services.common.metrics import GenerationMetrics
from services.gateway.core import GatewayRequest, Pipeline, Policy, default_policies
from services.gateway.openai_api import HttpApiServer, OpenAIApi
from services.gateway.settings import RouteClassConfig

CLASSES = {"chat_short": RouteClassConfig(engine="vllm", max_tokens_limit=64, default_max_tokens=16)}


class Scripted:
    """A backend that yields `texts`, then either finishes or fails with `fail`."""

    def __init__(self, texts: list[str], fail: Exception | None = None) -> None:
        self.texts, self.fail = texts, fail
        self.requests: list[GatewayRequest] = []

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        request.served.engine, request.served.model = request.engine, "m"
        for t in self.texts:
            yield Chunk(t)
        if self.fail is not None:
            raise self.fail
        yield Chunk("", FinishReason.STOP, Usage(5, len(self.texts)))


class Refuse(Policy):
    name = "refuse"

    async def admit(self, request: GatewayRequest) -> None:
        raise ResourceExhausted(
            "too many requests", violations=[QuotaViolation("key:k1", "2 per minute")], retry_after=1.2
        )


async def _api(backend: Scripted, extra: list[Policy] = ()) -> tuple[HttpApiServer, openai.AsyncOpenAI]:
    policies = [*extra, *default_policies(CLASSES, "chat_short", GenerationMetrics(CollectorRegistry()))]
    server = HttpApiServer(OpenAIApi(Pipeline(policies, backend), list(CLASSES)), "127.0.0.1", 0, None)
    await server.start()
    client = openai.AsyncOpenAI(base_url=f"{server.address}/openai/v1", api_key="sm_test", max_retries=0)
    return server, client


async def test_chat_stream_and_whole_answer_carry_the_text_usage_and_the_bearer_key() -> None:
    backend = Scripted(["Hel", "lo"])
    server, client = await _api(backend)
    try:
        whole = await client.chat.completions.create(
            model="chat_short", messages=[{"role": "user", "content": "hi"}], temperature=0
        )
        assert whole.choices[0].message.content == "Hello" and whole.choices[0].finish_reason == "stop"
        assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (5, 2)
        assert backend.requests[0].credentials == "sm_test" and backend.requests[0].sampling.temperature == 0
        stream = await client.chat.completions.create(
            model="chat_short",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    finally:
        await client.close()
        await server.stop()


async def test_a_failure_after_the_first_token_is_an_error_never_a_short_success() -> None:
    server, client = await _api(Scripted(["partial "], fail=Unavailable("engine died", retry_after=1)))
    try:
        stream = await client.chat.completions.create(
            model="chat_short", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got: list[str] = []
        with pytest.raises(openai.APIError, match="engine died"):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        assert got == ["partial "]
        with pytest.raises(openai.APIStatusError) as exc:  # not streamed: the whole call fails
            await client.chat.completions.create(model="chat_short", messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 503
    finally:
        await client.close()
        await server.stop()


async def test_bad_input_names_the_parameter_and_limits_give_429_with_retry_after() -> None:
    server, client = await _api(Scripted(["x"]))
    try:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="chat_short", messages=[{"role": "user", "content": "hi"}], temperature=3.5
            )
        assert bad.value.body["param"] == "temperature" and "[0.0, 2.0]" in bad.value.body["message"]  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert unknown.value.body["param"] == "model"  # type: ignore[index]
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{server.address}/openai/v1/chat/completions", content=b'{"model": "chat_short"}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    finally:
        await client.close()
        await server.stop()
    server, client = await _api(Scripted(["x"]), [Refuse()])
    try:
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{server.address}/openai/v1/chat/completions",
                json={"model": "chat_short", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        await client.close()
        await server.stop()


async def test_models_lists_the_route_classes() -> None:
    server, client = await _api(Scripted([]))
    try:
        assert [m.id async for m in client.models.list()] == ["chat_short"]
    finally:
        await client.close()
        await server.stop()


@pytest.mark.engine
async def test_the_real_engine_through_the_openai_sdk(mesh) -> None:
    client = openai.AsyncOpenAI(base_url=f"{mesh.gateway_http}/openai/v1", api_key="unused", max_retries=0)
    try:
        whole = await client.chat.completions.create(
            model="chat_short", messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=8
        )
        again = await client.chat.completions.create(
            model="chat_short", messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=8
        )
        assert whole.choices[0].message.content and whole.choices[0].message.content == again.choices[0].message.content
        assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
        stream = await client.completions.create(
            model="chat_short", prompt="Count: one, two,", temperature=0, max_tokens=8, stream=True
        )
        texts = [c.choices[0].text async for c in stream]
        assert "".join(texts) and len(texts) > 1  # token by token, not one buffered chunk
    finally:
        await client.close()

"""One structured JSON line per request, with every field on-call needs and no prompt text."""

from __future__ import annotations

import io
import json
import logging

import httpx
from prometheus_client import CollectorRegistry

from services.common.generation import Message, Role, prompt_text
from services.common.logging import configure_logging
from services.common.metrics import GenerationMetrics
from services.gateway.core import GatewayRequest, Pipeline, Policy, Principal, default_policies
from services.gateway.openai_api import HttpApiServer, OpenAIApi
from services.gateway.redaction import Redactor
from tests.gateway.test_openai_api import CLASSES, Scripted

FIELDS = {
    "request_id",
    "tenant",
    "route",
    "engine",
    "prompt_len",
    "max_tokens",
    "stream",
    "queue_ms",
    "exec_ms",
    "tokens_generated",
    "cache",
    "ok",
}


class AsAcme(Policy):
    """What the authentication policy does for a valid key of tenant acme."""

    name = "auth"

    async def admit(self, request: GatewayRequest) -> None:
        request.principal = Principal("acme", "k1", "paid")


async def _requests(backend: Scripted, bodies: list[dict]) -> list[dict]:
    out = io.StringIO()
    configure_logging("INFO", "gateway", stream=out)
    policies = [
        AsAcme(),
        *default_policies(CLASSES, "chat_short", GenerationMetrics(CollectorRegistry()), Redactor()),
    ]
    server = HttpApiServer(OpenAIApi(Pipeline(policies, backend), list(CLASSES)), "127.0.0.1", 0, None)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.address) as http:
            for body in bodies:
                await http.post("/openai/v1/chat/completions", json=body)
    finally:
        await server.stop()
        for h in list(logging.getLogger().handlers):
            if getattr(h, "stream", None) is out:
                logging.getLogger().removeHandler(h)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line.get("logger") == "servemesh.access" or "tokens_generated" in line]


async def test_each_request_logs_one_line_with_every_field_and_never_the_pii() -> None:
    secret = "jane.doe@example.com"
    ask = {"model": "chat_short", "messages": [{"role": "user", "content": f"mail {secret} now"}], "max_tokens": 9}
    lines = await _requests(Scripted(["a", "b", "c"]), [ask, ask | {"stream": True}, ask | {"temperature": 7}])
    assert len(lines) == 3
    ok, streamed, bad = lines
    assert FIELDS <= ok.keys(), FIELDS - ok.keys()
    assert (ok["ok"], ok["stream"], ok["tokens_generated"], ok["max_tokens"], ok["route"]) == (
        True,
        False,
        3,
        9,
        "chat_short",
    )
    assert ok["engine"] == "vllm" and ok["cache"] == "off" and ok["queue_ms"] >= 0 and ok["exec_ms"] >= 0
    assert streamed["stream"] is True and streamed["ok"] is True and streamed["tokens_generated"] == 3
    assert bad["ok"] is False and bad["code"] == "400" and "temperature" in bad["error"]
    assert all(secret not in json.dumps(line) for line in lines)
    # what the engine saw, placeholders in
    assert ok["prompt_len"] == len(prompt_text(None, (Message(Role.USER, "mail [EMAIL_1] now"),)))

    assert ok["tenant"] == "acme" and bad["tenant"] == "acme"

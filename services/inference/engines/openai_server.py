"""Engines that are OpenAI-compatible servers: vLLM and TensorRT-LLM (`trtllm-serve`).

Both run as their own processes, as in production; this client streams completions
over SSE and reads the server's metrics. Closing the stream (the gRPC caller
cancelled, or its deadline expired) closes the HTTP response, and both servers abort
a request whose client went away.

The two servers differ in ways the profile captures:
- vLLM: takes `X-Request-Id`, has `/tokenize` (chat template applied server-side),
  and serves Prometheus text on `/metrics` (`vllm:num_requests_waiting`,
  `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
  `vllm:time_to_first_token_seconds`).
- trtllm-serve: has no tokenize endpoint (we tokenize with the model folder's own
  tokenizer, which is what the server loads) and serves `/metrics` as a JSON list of
  per-iteration stats (`numQueuedRequests`, `numActiveRequests`, `kvCacheStats`).
TensorRT-LLM needs an NVIDIA GPU, so on CPU machines it is tested against a
protocol-compatible stand-in server, never a real trtllm-serve.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from services.inference.engines.base import (
    Chunk,
    Engine,
    EngineStatus,
    FinishReason,
    GenerationRequest,
    Message,
    Usage,
)


@dataclass(frozen=True, slots=True)
class ServerProfile:
    kind: str
    request_id_header: str | None
    server_tokenize: bool
    metrics_format: str  # "prometheus" | "json"


VLLM = ServerProfile(kind="vllm", request_id_header="X-Request-Id", server_tokenize=True, metrics_format="prometheus")
TRTLLM = ServerProfile(kind="trtllm", request_id_header=None, server_tokenize=False, metrics_format="json")
PROFILES = {p.kind: p for p in (VLLM, TRTLLM)}

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "eos": FinishReason.STOP}


class OpenAIServerEngine(Engine):
    """A client of one vLLM or trtllm-serve server."""

    def __init__(
        self,
        engine_id: str,
        base_url: str,
        *,
        model: str,
        profile: ServerProfile,
        max_model_len: int,
        card_sha256: str = "",
        tokenizer_dir: Path | None = None,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self.id = engine_id
        self.kind = profile.kind
        self.model = model
        self.card_sha256 = card_sha256
        self.endpoint = base_url.rstrip("/")
        self.max_model_len = max_model_len
        self._profile = profile
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=10.0, pool=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._status = EngineStatus(healthy=False, detail="not checked yet")
        self._ttft = _HistogramWindow()

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(base_url=self.endpoint, timeout=self._timeout, limits=limits)
        if not self._profile.server_tokenize:
            if self._tokenizer_dir is None:
                raise FailedPrecondition(f"engine {self.id}: a {self.kind} engine needs tokenizer_dir")
            from transformers import AutoTokenizer  # heavy import, only for this profile

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(self._tokenizer_dir))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise FailedPrecondition(f"engine {self.id} is not started")
        return self._client

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if request.messages:
            body["messages"] = [{"role": str(m.role), "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt
        for key in ("temperature", "top_p", "max_tokens", "seed", "repetition_penalty"):
            value = getattr(s, key)
            if value is not None:
                body[key] = value
        if s.stop:
            body["stop"] = list(s.stop)
        if request.return_logprobs:
            # Sampled tokens' log-probabilities only (no alternatives): chat takes a flag and a
            # top count, the completions API the top count alone.
            body |= {"logprobs": True, "top_logprobs": 0} if request.messages else {"logprobs": 0}
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        path = "/v1/chat/completions" if request.messages else "/v1/completions"
        headers = {self._profile.request_id_header: request.request_id} if self._profile.request_id_header else {}
        finish: str | None = None
        usage: Usage | None = None
        logprobs = _LogprobMean()
        try:
            async with self.client.stream("POST", path, json=self._body(request), headers=headers) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._http_error(resp.status_code, resp.text, bool(request.messages))
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":  # read on to the end of the body: the connection stays pooled
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        raise Unavailable(f"engine {self.id} failed mid-stream: {event['error']}")
                    for choice in event.get("choices") or ():
                        text = choice.get("text")
                        if text is None:
                            text = (choice.get("delta") or {}).get("content") or ""
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                        if request.return_logprobs:
                            logprobs.add(choice.get("logprobs"))
                        if text:
                            yield Chunk(text)
                    if event.get("usage"):
                        u = event["usage"]
                        usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
        except httpx.TransportError as exc:
            raise Unavailable(f"engine {self.id} at {self.endpoint} is unreachable: {exc!r}", retry_after=1.0) from exc
        if finish is None or usage is None:
            raise Unavailable(f"engine {self.id} ended the stream before finishing the request", retry_after=1.0)
        yield Chunk(
            "",
            finish_reason=_FINISH.get(finish, FinishReason.STOP),
            usage=usage,
            mean_logprob=logprobs.mean() if request.return_logprobs else None,
        )

    def _http_error(self, status: int, body: str, chat: bool) -> Exception:
        detail = _error_message(body)
        if status == 400:
            return InvalidArgument(FieldViolation("messages" if chat else "prompt", detail))
        if status == 404:
            return FailedPrecondition(f"engine {self.id} does not serve model {self.model}: {detail}")
        return Unavailable(f"engine {self.id} answered HTTP {status}: {detail}", retry_after=1.0)

    async def abort(self, request_id: str) -> None:
        # Both servers abort a request when its HTTP stream is closed, which is what
        # closing the generate() iterator does; there is no separate abort endpoint.
        return None

    def ready(self) -> bool:
        return self._status.healthy

    async def check_health(self) -> EngineStatus:
        try:
            health = await self.client.get("/health", timeout=2.0)
            if health.status_code != 200:
                self._status = EngineStatus(healthy=False, detail=f"/health answered HTTP {health.status_code}")
                return self._status
            metrics = await self.client.get("/metrics", timeout=2.0)
        except httpx.HTTPError as exc:
            self._status = EngineStatus(healthy=False, detail=f"unreachable: {exc!r}")
            return self._status
        if self._profile.metrics_format == "prometheus":
            self._status = self._from_prometheus(metrics.text)
        else:
            self._status = self._from_iteration_stats(metrics.json() if metrics.status_code == 200 else [])
        return self._status

    def _from_prometheus(self, text: str) -> EngineStatus:
        gauges: dict[str, float] = {}
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("model_name", self.model) != self.model:
                    continue
                if sample.name in (
                    "vllm:num_requests_waiting",
                    "vllm:num_requests_running",
                    "vllm:kv_cache_usage_perc",
                ):
                    gauges[sample.name] = gauges.get(sample.name, 0.0) + sample.value
                elif sample.name == "vllm:time_to_first_token_seconds_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
        return EngineStatus(
            healthy=True,
            queue_depth=int(gauges.get("vllm:num_requests_waiting", 0)),
            running_requests=int(gauges.get("vllm:num_requests_running", 0)),
            kv_cache_usage=gauges.get("vllm:kv_cache_usage_perc", 0.0),
            ttft_p50_s=self._ttft.update(buckets),
        )

    def _from_iteration_stats(self, stats: list[dict[str, Any]]) -> EngineStatus:
        if not stats:
            return EngineStatus(healthy=True, ttft_p50_s=self._status.ttft_p50_s)
        last = stats[-1]
        kv = last.get("kvCacheStats") or {}
        total = kv.get("maxNumBlocks") or 0
        return EngineStatus(
            healthy=True,
            queue_depth=int(last.get("numQueuedRequests", 0)),
            running_requests=int(last.get("numActiveRequests", 0)),
            kv_cache_usage=(kv.get("usedNumBlocks", 0) / total) if total else 0.0,
        )

    async def tokenize(self, prompt: str | None, messages: Sequence[Message]) -> list[int]:
        if self._tokenizer is not None:
            return await asyncio.to_thread(self._local_tokenize, prompt, messages)
        body: dict[str, Any] = {"model": self.model}
        if messages:
            body |= {
                "messages": [{"role": str(m.role), "content": m.content} for m in messages],
                "add_generation_prompt": True,
            }
        else:
            body["prompt"] = prompt
        try:
            resp = await self.client.post("/tokenize", json=body, timeout=10.0)
        except httpx.HTTPError as exc:
            raise Unavailable(f"engine {self.id} is unreachable: {exc!r}", retry_after=1.0) from exc
        if resp.status_code != 200:
            raise self._http_error(resp.status_code, resp.text, bool(messages))
        return list(resp.json()["tokens"])

    def _local_tokenize(self, prompt: str | None, messages: Sequence[Message]) -> list[int]:
        if messages:
            chat = [{"role": str(m.role), "content": m.content} for m in messages]
            ids = self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _error_message(body: str) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:500]
    err = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500]
    return str(err)[:500]


_NO_LOGPROB = -9999.0


class _LogprobMean:
    """Mean of the sampled tokens' log-probabilities over a stream's `choices[].logprobs`:
    `{"content": [{"logprob": ...}, ...]}` from chat completions, `{"token_logprobs": [...]}`
    from completions. Entries that are missing, not finite, or vLLM's -9999.0 (its value for a
    token whose log-probability it does not have, and its floor for -inf) are left out."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    def add(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        if logprobs.get("content") is not None:
            values = [(entry or {}).get("logprob") for entry in logprobs["content"]]
        else:
            values = list(logprobs.get("token_logprobs") or ())
        for value in values:
            if isinstance(value, int | float) and math.isfinite(value) and value > _NO_LOGPROB:
                self._sum += float(value)
                self._count += 1

    def mean(self) -> float | None:
        return self._sum / self._count if self._count else None


class _HistogramWindow:
    """Median TTFT of the requests that finished between two scrapes of a cumulative
    Prometheus histogram, interpolated inside the bucket as PromQL's
    histogram_quantile does; keeps the last value when no request finished meanwhile."""

    def __init__(self) -> None:
        self._prev: dict[float, float] = {}
        self._value: float | None = None

    def update(self, buckets: dict[float, float]) -> float | None:
        delta = {le: count - self._prev.get(le, 0.0) for le, count in buckets.items()}
        self._prev = buckets
        total = delta.get(float("inf"), 0.0)
        if total <= 0:
            return self._value
        rank, lower, below = total / 2, 0.0, 0.0
        for le in sorted(delta):
            if delta[le] >= rank:
                if le == float("inf"):
                    self._value = lower
                else:
                    inside = delta[le] - below
                    self._value = lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
                break
            lower, below = le, delta[le]
        return self._value

"""`servemesh bench`: what the gateway and inference hops cost, against vLLM itself.

One run, one load-generating process: vLLM, inference and gateway run as their own
processes (as `servemesh up` starts them) and this process drives the same prompts,
greedy and of the same length, down three paths at each concurrency level:

  direct     HTTP/SSE straight to vLLM's OpenAI-compatible server
  inference  gRPC InferenceService.StreamGenerate -> vLLM
  gateway    gRPC GatewayService.StreamGenerate -> inference -> vLLM

The paths are interleaved level by level so slow drift of this noisy machine hits all
three alike. TTFT is the time from sending the request to the first non-empty text;
inter-token latency is the gap between successive text chunks; tokens/s is all
completion tokens of a level divided by its wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.inference.v1 import inference_pb2_grpc as ipb_grpc

from mesh.vllm import VllmArgs, ensure_venv
from services.common.interceptors import ENGINE_TTFT_KEY

PATHS = ("direct", "inference", "gateway")
TOPICS = ("rivers", "bridges", "gardens", "libraries", "trains", "lighthouses", "markets", "mountains")


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    tokens: int
    #: the engine's TTFT as the inference service saw it (from the x-servemesh-engine-ttft-ms
    #: trailer); ttft - engine_ttft is what the gRPC hops added to this request
    engine_ttft: float | None = None


@dataclass
class LevelResult:
    path: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0
    #: CPU seconds the inference and gateway processes used while this path ran
    hop_cpu: float = 0.0

    def merge(self, other: LevelResult) -> None:
        self.samples += other.samples
        self.wall += other.wall
        self.errors += other.errors
        self.hop_cpu += other.hop_cpu

    def added_ms(self, q: float) -> float:
        added = [s.ttft - s.engine_ttft for s in self.samples if s.engine_ttft is not None]
        return quantile(added, q) * 1e3

    def hop_cpu_ms_per_1k_tokens(self) -> float:
        tokens = sum(s.tokens for s in self.samples)
        return self.hop_cpu / tokens * 1e6 if tokens else float("nan")

    def ttft_ms(self, q: float) -> float:
        return quantile([s.ttft for s in self.samples], q) * 1e3

    def itl_ms(self) -> float:
        return quantile([g for s in self.samples for g in s.gaps], 0.5) * 1e3

    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall if self.wall else 0.0


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q * 100) - 1))]


def _prompt(i: int) -> str:
    return f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]} and why people love them."


class Paths:
    def __init__(self, vllm_url: str, model: str, inference: str, gateway: str, max_tokens: int) -> None:
        self._http = httpx.AsyncClient(
            base_url=vllm_url, timeout=httpx.Timeout(10.0, read=None), limits=httpx.Limits(max_connections=64)
        )
        self._model = model
        self._ich = grpc.aio.insecure_channel(inference)
        self._gch = grpc.aio.insecure_channel(gateway)
        self._inference = ipb_grpc.InferenceServiceStub(self._ich)
        self._gateway = gpb_grpc.GatewayServiceStub(self._gch)
        self._max_tokens = max_tokens

    async def close(self) -> None:
        await self._http.aclose()
        await self._ich.close()
        await self._gch.close()

    async def direct(self, i: int) -> Sample:
        body = {
            "model": self._model,
            "messages": [{"role": "user", "content": _prompt(i)}],
            "stream": True,
            "max_tokens": self._max_tokens,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        times: list[float] = []
        tokens = 0
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        times.append(time.perf_counter())
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return _sample(start, times, tokens)

    async def inference(self, i: int) -> Sample:
        req = ipb.StreamGenerateRequest(
            messages=[ipb.ChatMessage(role=ipb.ROLE_USER, content=_prompt(i))],
            sampling=ipb.SamplingParams(temperature=0, max_tokens=self._max_tokens),
        )
        return await _grpc_sample(self._inference.StreamGenerate(req, timeout=300))

    async def gateway(self, i: int) -> Sample:
        req = gpb.StreamGenerateRequest(
            messages=[gpb.Message(role=gpb.ROLE_USER, content=_prompt(i))],
            params=gpb.DecodingParams(temperature=0, max_tokens=self._max_tokens, top_p=1, repetition_penalty=1),
            route_class="rag_long",
        )
        return await _grpc_sample(self._gateway.StreamGenerate(req, timeout=300))


async def _grpc_sample(call: grpc.aio.UnaryStreamCall) -> Sample:
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async for msg in call:
        if msg.text_delta:
            times.append(time.perf_counter())
        if msg.finish_reason:
            tokens = msg.usage.completion_tokens
    trailers = dict(await call.trailing_metadata() or ())
    engine_ttft = float(trailers[ENGINE_TTFT_KEY]) / 1e3 if ENGINE_TTFT_KEY in trailers else None
    return _sample(start, times, tokens, engine_ttft)


def _sample(start: float, times: list[float], tokens: int, engine_ttft: float | None = None) -> Sample:
    if not times:
        raise RuntimeError("stream produced no text")
    return Sample(times[0] - start, [b - a for a, b in itertools.pairwise(times)], tokens, engine_ttft)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


async def _level(
    run: Callable[[int], Awaitable[Sample]], path: str, concurrency: int, total: int, hop_pids: list[int]
) -> LevelResult:
    result = LevelResult(path, concurrency)
    cpu_before = _cpu_seconds(hop_pids)
    queue = iter(range(total))

    async def worker() -> None:
        for i in queue:
            try:
                result.samples.append(await run(i))
            except Exception:  # counted and reported, never hidden
                result.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall = time.perf_counter() - start
    result.hop_cpu = _cpu_seconds(hop_pids) - cpu_before
    return result


def render(results: list[LevelResult]) -> str:
    by = {(r.path, r.concurrency): r for r in results}
    lines = [
        "| conc | path | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | ITL p50 ms | tokens/s | vs direct | "
        "hops add to TTFT p50 / p99 ms | hop CPU ms per 1k tokens | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d = by[("direct", r.concurrency)]
        ratio = r.tokens_per_s() / d.tokens_per_s() if d.tokens_per_s() else float("nan")
        added = "-" if r.path == "direct" else f"{r.added_ms(0.5):.2f} / {r.added_ms(0.99):.2f}"
        lines.append(
            f"| {r.concurrency} | {r.path} | {r.ttft_ms(0.5):.1f} | {r.ttft_ms(0.95):.1f} | "
            f"{r.ttft_ms(0.99):.1f} | {r.itl_ms():.2f} | {r.tokens_per_s():.1f} | {ratio:.1%} | "
            f"{added} | {r.hop_cpu_ms_per_1k_tokens():.0f} | {r.errors} |"
        )
    return "\n".join(lines)


async def run_bench(
    home: Path,
    levels: list[int],
    per_level: int,
    max_tokens: int,
    rounds: int,
    prepare: Callable[[Path], Path],
    log: Callable[[str], None],
) -> None:
    from mesh.launcher import Mesh, Ports, local_engines

    model_dir = prepare(home / "models")
    vllm_python = await asyncio.to_thread(ensure_venv, home / "venvs" / "vllm", log)
    ports = Ports(
        gateway=50150,
        inference=50151,
        registry=50152,
        vllm=8150,
        gateway_metrics=9250,
        inference_metrics=9251,
        registry_metrics=9252,
    )
    args = VllmArgs(port=ports.vllm, max_num_seqs=max(32, max(levels)))
    engines = local_engines(args, model_dir, small_engine=False)
    # the generation path alone: API keys are the gateway benchmark against LiteLLM's business
    mesh = Mesh(home / "bench", ports, engines, log, vllm_args=args, model_dir=model_dir, mesh=False, auth=False)
    await mesh.start(vllm_python)
    paths = Paths(
        args.url, args.served_model_name, f"127.0.0.1:{ports.inference}", f"127.0.0.1:{ports.gateway}", max_tokens
    )
    runs = {"direct": paths.direct, "inference": paths.inference, "gateway": paths.gateway}
    hop_pids = [
        s.pid for s in mesh.supervisors if s.name in ("inference-stable", "gateway-stable") and s.pid is not None
    ]
    results = {(name, level): LevelResult(name, level) for level in levels for name in PATHS}
    try:
        for name in PATHS:  # warm-up: connections, caches, the engine's first batches
            await _level(runs[name], name, 2, 4, hop_pids)
        for r in range(rounds):  # interleaved, so the machine's drift hits every path alike
            for level in levels:
                for name in PATHS:
                    log(f"round {r + 1}/{rounds}, concurrency {level}: {name} ...")
                    n = max(per_level, 2 * level)
                    results[name, level].merge(await _level(runs[name], name, level, n, hop_pids))
    finally:
        await paths.close()
        await mesh.stop()
    print(
        f"\n{rounds} interleaved rounds of {per_level} requests per path and level (at least twice the level), "
        f"up to {max_tokens} tokens each, greedy; SmolLM2-135M-Instruct on vLLM {args.cpu_bind} (CPU).\n"
    )
    print(render(list(results.values())))

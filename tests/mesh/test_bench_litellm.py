"""The pure parts of `servemesh bench litellm`: percentiles and per-request figures of a cell, the
verdicts and tables, LiteLLM's config, and the fast upstream (served in this process), which must
answer like an OpenAI-compatible server after its delay and satisfy servemesh's engine client.
Nothing here installs or starts LiteLLM, and nothing times a gateway."""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import yaml
from aiohttp import web
from rich.console import Console

from mesh.bench_litellm import (
    DIRECT,
    FAST,
    LITELLM,
    LITELLM_BARE,
    MESH,
    NO_MESH,
    PLANTED,
    ROUTE,
    STREAM,
    VLLM,
    WHOLE,
    Cell,
    Run,
    Target,
    _pids_tree,
    litellm_config,
    one_request,
    prompt,
    request_body,
    tables,
    upstream_app,
    verdicts,
)
from services.inference.engines.base import FinishReason, GenerationRequest, Message, Role, Sampling
from services.inference.engines.openai_server import VLLM as VLLM_PROFILE
from services.inference.engines.openai_server import OpenAIServerEngine

DELAY_S = 0.020
#: the delay must hold; the rest is bounded generously (this machine is shared)
SLACK_S = 0.5


def test_cell_percentiles_rates_and_cpu() -> None:
    cell = Cell(FAST, NO_MESH, WHOLE, 1, latencies=[i / 1000 for i in range(1, 101)], wall=2.0, cpu=0.25)
    assert cell.q_ms(0.5) == pytest.approx(50.5)
    assert cell.q_ms(0.99) == pytest.approx(99.01)
    assert cell.rate() == pytest.approx(50.0)
    assert cell.cpu_ms() == pytest.approx(2.5)
    assert cell.per_core_rps() == pytest.approx(400.0)  # 100 requests in 0.25 CPU-seconds
    cell.envoy_cpu = 0.25
    assert cell.per_core_rps() == pytest.approx(200.0)  # the Envoys count toward the path's cost
    empty = Cell(FAST, DIRECT, WHOLE, 1)
    assert math.isnan(empty.q_ms(0.5)) and math.isnan(empty.rate()) and math.isnan(empty.cpu_ms())

    more = Cell(FAST, NO_MESH, WHOLE, 1, latencies=[0.2], wall=1.0, cpu=0.05, errors=2, last_error="boom")
    cell.merge(more)
    assert (cell.n, cell.wall, cell.errors, cell.last_error) == (101, 3.0, 2, "boom")
    assert cell.cpu == pytest.approx(0.3)


def _cell(path: str, kind: str, level: int, ms: float, *, n: int = 100, cpu_ms: float = 0.0) -> Cell:
    first = [ms / 1e3] * n if kind == STREAM else []
    return Cell(FAST, path, kind, level, latencies=[ms / 1e3] * n, firsts=first, wall=1.0, cpu=cpu_ms * n / 1e3)


def _run(servemesh_ms: float, servemesh_cpu_ms: float, upstreams: tuple[str, ...] = (FAST,)) -> Run:
    run = Run([1, 16], list(upstreams), [DIRECT, LITELLM, LITELLM_BARE, NO_MESH, MESH], 1.0, 0.0, 1, 4, 20.0, 4)
    for upstream in upstreams:
        for level in run.levels:
            for kind in (WHOLE, STREAM):
                for path, ms, cpu in (
                    (DIRECT, 21.0, 0.0),
                    (LITELLM, 40.0, 25.0),
                    (LITELLM_BARE, 33.0, 12.0),
                    (NO_MESH, 21.0 + servemesh_ms, servemesh_cpu_ms),
                    (MESH, 24.0 + servemesh_ms, servemesh_cpu_ms),
                ):
                    cell = _cell(path, kind, level, ms, cpu_ms=cpu)
                    cell.upstream = upstream
                    run.cells[upstream, path, kind, level] = cell
    return run


def test_added_is_path_minus_direct_in_the_same_run() -> None:
    run = _run(servemesh_ms=1.5, servemesh_cpu_ms=2.0)
    assert run.added_ms(FAST, NO_MESH, WHOLE, 1, 0.5) == pytest.approx(1.5)
    assert run.added_ms(FAST, LITELLM, STREAM, 16, 0.99) == pytest.approx(19.0)
    assert run.peak_per_core(FAST, LITELLM) == pytest.approx(40.0)
    assert run.peak_per_core(FAST, NO_MESH) == pytest.approx(500.0)


def test_verdicts_met_judged_on_the_fast_upstream_without_the_mesh() -> None:
    run = _run(servemesh_ms=1.5, servemesh_cpu_ms=2.0, upstreams=(FAST, VLLM))
    checks = verdicts(run)
    judged = [c for c in checks if c.judged]
    assert {(c.upstream, c.path) for c in judged} == {(FAST, NO_MESH)} and len(judged) == 3
    assert all(c.met for c in judged)
    ratio = next(c for c in judged if "per core" in c.target)
    assert ratio.measured == pytest.approx(12.5)  # 500 vs LiteLLM's 40 requests per CPU-second
    assert ratio.litellm_bare == pytest.approx(25.0 / 12.0)  # bare LiteLLM: 12 vs 25 ms of CPU per request
    mesh_added = next(c for c in checks if c.path == MESH and c.upstream == FAST and "added p50" in c.target)
    assert not mesh_added.met and not mesh_added.judged  # 4.5 ms: shown, not judged

    text = _render(run)
    assert "fast upstream" in text and "vLLM" in text
    assert text.count("MISSED (info)") >= 2 and text.count("MISSED") == text.count("MISSED (info)")
    assert "12.5x (500)" in text


def test_verdicts_missed() -> None:
    run = _run(servemesh_ms=3.0, servemesh_cpu_ms=10.0)
    judged = {c.target: c for c in verdicts(run) if c.judged}
    assert not judged["added p50 at concurrency 1 (ms)"].met
    assert not judged["first chunk added p50 at concurrency 1 (ms)"].met
    per_core = judged["requests/s per core, best level (x LiteLLM's)"]
    assert per_core.measured == pytest.approx(2.5) and not per_core.met
    assert "MISSED" in _render(run)


def test_verdicts_without_litellm_filter_hold_against_bare_and_judge_the_mesh_alone() -> None:
    run = _run(servemesh_ms=1.0, servemesh_cpu_ms=2.0)
    run.paths = [DIRECT, LITELLM_BARE, MESH]
    judged = [c for c in verdicts(run) if c.judged]
    assert {c.path for c in judged} == {MESH}
    per_core = next(c for c in judged if "per core" in c.target)
    assert per_core.measured == pytest.approx(500.0 / (1000.0 / 12.0))


def _render(run: Run) -> str:
    console = Console(record=True, width=250, file=io.StringIO())
    for t in tables(run):
        console.print(t)
    return console.export_text()


def test_litellm_config_is_yaml_and_points_at_the_upstream() -> None:
    cfg = yaml.safe_load(json.dumps(litellm_config("http://127.0.0.1:9", "m1", "sk-x")))
    (model,) = cfg["model_list"]
    assert model["model_name"] == ROUTE
    assert model["litellm_params"]["model"] == "openai/m1"
    assert model["litellm_params"]["api_base"] == "http://127.0.0.1:9/v1"
    assert cfg["general_settings"]["master_key"] == "sk-x"
    (guard,) = cfg["guardrails"]
    params = guard["litellm_params"]
    assert params["guardrail"] == "litellm_content_filter" and params["default_on"] and params["mode"] == "pre_call"
    actions = {p.get("pattern_name") or p["name"]: p["action"] for p in params["patterns"]}
    assert actions["email"] == "MASK" and actions["refusal_0"] == "BLOCK"
    assert "guardrails" not in litellm_config("http://127.0.0.1:9", "m1", "sk-x", guardrails=False)


def test_request_body_is_the_same_for_every_path() -> None:
    a, b = json.loads(request_body(3, "x", False, 4)), json.loads(request_body(3, "y", True, 4))
    assert a["messages"] == b["messages"] and PLANTED in a["messages"][0]["content"]
    assert "stream" not in a and b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert prompt(4) != prompt(5) and prompt(4) != prompt(4 + 1000)  # no response cache can answer one


def test_pids_tree_holds_the_root() -> None:
    assert os.getpid() in _pids_tree(os.getpid())
    assert _pids_tree(None) == []


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    runner = web.AppRunner(upstream_app(DELAY_S, 4), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_upstream_answers_whole_after_its_delay(upstream: str) -> None:
    async with aiohttp.ClientSession() as s:
        start = time.perf_counter()
        async with s.post(f"{upstream}/v1/chat/completions", data=request_body(0, "m", False, 3)) as resp:
            body = await resp.json()
        took = time.perf_counter() - start
        assert resp.status == 200
        assert DELAY_S <= took < DELAY_S + SLACK_S
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "Hello from the"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3

        async with s.get(f"{upstream}/_bench/last") as resp:
            assert PLANTED in json.dumps(await resp.json())
        async with s.get(f"{upstream}/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "smollm2-135m-instruct"


async def test_upstream_streams_after_its_delay(upstream: str) -> None:
    target = Target(DIRECT, f"{upstream}/v1/chat/completions", "m", {"Content-Type": "application/json"})
    async with aiohttp.ClientSession() as s:
        took, first = await one_request(s, target, request_body(0, "m", True, 16), stream=True)
        assert DELAY_S <= first <= took < DELAY_S + SLACK_S
        whole, same = await one_request(s, target, request_body(0, "m", False, 16), stream=False)
        assert DELAY_S <= whole == same < DELAY_S + SLACK_S

        async with s.post(target.url, data=request_body(0, "m", True, 16)) as resp:
            lines = [line.decode().strip() async for line in resp.content if line.strip()]
    events = [json.loads(line[5:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events if e["choices"]) == "Hello from the fast"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"  # 4 chunks < 16
    assert events[-1]["usage"]["completion_tokens"] == 4


async def test_upstream_satisfies_servemesh_engine_client(upstream: str) -> None:
    """What inference's OpenAI-server engine (vLLM profile) asks of it: health, metrics, tokenize, a stream."""
    engine = OpenAIServerEngine(
        "vllm", upstream, model="smollm2-135m-instruct", profile=VLLM_PROFILE, max_model_len=2048
    )
    await engine.start()
    try:
        status = await engine.check_health()
        assert status.healthy and status.queue_depth == 0
        assert len(await engine.tokenize(None, (Message(Role.USER, "hello there"),))) > 0
        request = GenerationRequest(
            "r1", messages=(Message(Role.USER, "hi"),), sampling=Sampling(temperature=0.0, max_tokens=2)
        )
        chunks = [c async for c in engine.generate(request)]
    finally:
        await engine.close()
    assert "".join(c.text for c in chunks) == "Hello from"
    assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].usage.completion_tokens == 2

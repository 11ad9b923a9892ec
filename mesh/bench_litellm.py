"""`servemesh bench litellm`: servemesh's gateway against LiteLLM proxy, in one run, on this machine.

Both gateways run as their own processes in front of the same upstream, and one load-generating
process (aiohttp, closed loop: N workers, each sending its next request when the last one ends,
for a fixed time after a warm-up) drives the same OpenAI chat completion requests, whole
(`stream: false`) and streamed, down each path:

  direct            the upstream itself (the baseline: "added" = path - direct, same run)
  litellm           LiteLLM proxy (its own virtualenv, `litellm --num_workers 1`) -> upstream, with its
                    content filter standing in for servemesh's redaction and refusals (below)
  litellm bare      the same with its master key only (as LiteLLM is usually measured)
  servemesh         gateway's OpenAI API -> inference (gRPC) -> upstream, plaintext (--no-mesh)
  servemesh+mesh    TLS -> edge Envoy -> gateway sidecar -> gateway -> sidecars (mTLS) -> inference
                    -> upstream: what `servemesh up` runs. The mesh's own hops cost ~3 ms, and
                    the targets are about the gateway, so they are judged on the no-mesh path.

Upstreams, one after the other (the fast one first):

  fast  an aiohttp OpenAI-compatible server in its own process (`python -m mesh.bench_litellm
        upstream`) that answers after a fixed delay (20 ms; streams: 20 ms to the first chunk, then
        a few chunks at once), so the gateway is the bottleneck;
  vllm  the real vLLM (CPU build, SmolLM2-135M), as `servemesh bench` starts it.

The paths take turns cell by cell (the order rotates each level), so a drift of this shared
machine hits them alike. Per path, level and kind: p50/p99 latency (whole answers) or time to the
first content chunk (streams), requests/s, and the CPU time of the gateway's processes per request,
read from /proc: LiteLLM's process tree; servemesh's gateway + inference (the Envoys of the mesh
apart). "Requests/s per core" is requests per CPU-second of those processes (Envoys included): what
one fully used core would sustain, which does not depend on how the two cores of this machine are
shared with the load generator, the upstream and the other paths' idle processes. The targets
(<= 2 ms added p50 and first chunk at concurrency 1, >= 6x LiteLLM's requests/s per core) are
judged on the fast upstream; the vLLM rows are for information.

Policies, as far as both have them (printed with the run, and probed before measuring):
- auth: LiteLLM's master key (checked on every request, no database). servemesh: API keys, on by
  default in Mesh: the dev tenant's key (enterprise tier) it creates, verified at the registry and
  cached by the gateway for 5 s (the registry's CPU is not counted); or --api-key.
- rate limits: servemesh's stay on (per key, per address, tokens per tenant, concurrency), raised
  so they never refuse here (--gateway-env overrides). LiteLLM has none: its per-key/team limits
  live on virtual keys, which need its PostgreSQL database through Prisma, whose query engine
  binary is downloaded at first use from a host that cannot be reached from this machine.
- redaction: servemesh's PII redaction (on by default: emails, phones, cards, IBANs, national ids,
  IPs, secrets) and LiteLLM's built-in regex content filter (`litellm_content_filter`) masking the
  matching prebuilt patterns before the call. LiteLLM's Presidio PII masking needs Presidio's
  analyzer and anonymizer services and spaCy models, which cannot be fetched here.
- refusals: servemesh's safety topics (on by default); the same two regexes as BLOCK patterns of
  LiteLLM's content filter.
- servemesh also runs input validation, route-class defaults, routing, the prompt budget and its
  response cache (on by default; every prompt of a run differs, so it never answers, but looks up
  and stores); LiteLLM its router, cost tracking (local cost map: LITELLM_LOCAL_MODEL_COST_MAP=True)
  and logging hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mesh.bench import quantile
from mesh.bench_mesh import _cpu_seconds

#: what pip picks for `litellm[proxy]` on this machine (newer releases need a certifi this index lacks)
LITELLM_REQUIREMENTS = ("litellm[proxy]==1.106.2",)
_MARKER = "servemesh-venv.json"
#: the route class both gateways serve (LiteLLM's model_name), and the upstream's model id
ROUTE = "chat_short"
UPSTREAM_MODEL = "smollm2-135m-instruct"

#: the issue's targets
MAX_ADDED_P50_MS = 2.0
MAX_FIRST_CHUNK_ADDED_MS = 2.0
MIN_PER_CORE_RATIO = 6.0
#: LiteLLM 1.106, one worker, measured on this machine before the issue (for reference)
EARLIER_LITELLM = {
    "added_p50_ms": 12.8,
    "added_p99_ms": 19.4,
    "cpu_ms_per_request": "11-14",
    "per_core_rps": 92.0,
    "first_chunk_added_ms": 14.5,
}

DIRECT, NO_MESH, MESH = "direct", "servemesh", "servemesh+mesh"
#: LiteLLM with the content filter (the same policies), and with its master key only
LITELLM, LITELLM_BARE = "litellm", "litellm bare"
WHOLE, STREAM = "whole", "stream"
FAST, VLLM = "fast", "vllm"
REQUEST_TIMEOUT_S = 120.0
#: vLLM's OpenMP threads on one core: bound to both, they spin against the gateways and the load
#: generator on this 2-core machine and the engine stalls (seen: 3 s for 4 tokens at concurrency 1)
VLLM_CPU_BIND = "1"
#: servemesh's rate limits stay on (their cost is measured) but high enough never to refuse here;
#: LiteLLM has none without its database. --gateway-env overrides these.
_UNBOUND = {"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000, "concurrent_requests": 100_000}
NON_BINDING_LIMITS = {
    "SERVEMESH_GATEWAY_LIMITS__ADDRESS_REQUESTS_PER_MINUTE": "10000000",
    "SERVEMESH_GATEWAY_LIMITS__TIERS": json.dumps({tier: _UNBOUND for tier in ("free", "paid", "enterprise")}),
}
JSON = {"Content-Type": "application/json"}
TOPICS = ("exports", "invoices", "logins", "backups", "webhooks", "reports", "alerts", "imports")
#: a planted e-mail address: both gateways' redaction must keep it from the upstream
PLANTED = "jane.doe@example.com"

# servemesh's default refusal topics (services/gateway/settings.py), as LiteLLM BLOCK patterns
_REFUSALS = (
    r"(?is)\b(build|make|assemble)\b.{0,40}\b(bomb|explosive|nerve agent|bioweapon)s?\b",
    r"(?is)\b(write|create|build)\b.{0,40}\b(ransomware|keylogger|computer virus|botnet)\b",
)
# LiteLLM's prebuilt patterns closest to servemesh's PII types
_MASKED = (
    "email",  # EMAIL
    "us_phone",  # PHONE
    "credit_card",  # CARD
    "iban",  # IBAN
    "us_ssn",  # NATIONAL_ID
    "ipv4",  # IP
    "ipv6",
    "aws_access_key",  # SECRET
    "aws_secret_key",
    "github_token",
    "slack_token",
    "generic_api_key",
)


def prompt(i: int) -> str:
    """Request i's one user turn: every request of a run differs, so no response cache answers one."""
    return (
        f"Summarize this support ticket in one sentence. Ticket {i} ({TOPICS[i % len(TOPICS)]}): the "
        "customer says the nightly export to the reporting bucket failed twice this week with a timeout right "
        f"after the schema change; they attached the logs and asked to be contacted at {PLANTED} before Friday. "
        "Priority: normal."
    )


def request_body(i: int, model: str, stream: bool, max_tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


# --- the fast upstream (a subprocess: `python -m mesh.bench_litellm upstream ...`) ------------

_WORDS = ("Hello", " from", " the", " fast", " upstream", ".", " It", " answers", " after", " a", " fixed", " delay")


def upstream_app(delay_s: float, chunks: int, model: str = UPSTREAM_MODEL) -> web.Application:
    """An OpenAI-compatible server that answers after `delay_s`: chat completions and completions
    (whole, or streamed: the delay, then `chunks` chunks at once, usage and [DONE]), /v1/models,
    and what servemesh's OpenAI-server engine probes (/health, /metrics, /tokenize).
    GET /_bench/last shows the last chat request's messages (to check redaction)."""
    state: dict[str, Any] = {"running": 0, "last": None}

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(_: web.Request) -> web.Response:
        label = f'{{model_name="{model}"}}'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {state['running']}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} 0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} 0.0",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def models(_: web.Request) -> web.Response:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "bench", "max_model_len": 2048}]
        return web.json_response({"object": "list", "data": data})

    async def tokenize(http: web.Request) -> web.Response:
        body = await http.json()
        messages = body.get("messages") or []
        text = body.get("prompt") or "".join(str(m.get("content") or "") for m in messages)
        count = 1 + 4 * len(messages) + len(text.encode()) // 4  # about a token per 4 bytes, plus a template
        return web.json_response({"count": count, "max_model_len": 2048, "tokens": list(range(count))})

    async def last(_: web.Request) -> web.Response:
        return web.json_response(state["last"])

    async def chat(http: web.Request) -> web.StreamResponse:
        return await answer(http, chat=True)

    async def completions(http: web.Request) -> web.StreamResponse:
        return await answer(http, chat=False)

    async def answer(http: web.Request, chat: bool) -> web.StreamResponse:
        body = await http.json()
        if chat:
            state["last"] = {"messages": body.get("messages")}
        asked = body.get("max_tokens") or body.get("max_completion_tokens")
        n = max(1, min(chunks, int(asked or chunks)))
        finish = "length" if asked and int(asked) <= chunks else "stop"
        words = [_WORDS[k % len(_WORDS)] for k in range(n)]
        envelope = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(8)}",
            "created": int(time.time()),
            "model": body.get("model") or model,
        }
        usage = {"prompt_tokens": 64, "completion_tokens": n, "total_tokens": 64 + n}
        state["running"] += 1
        try:
            if not body.get("stream"):
                await asyncio.sleep(delay_s)
                text = "".join(words)
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
                choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                obj = "chat.completion" if chat else "text_completion"
                return web.json_response({**envelope, "object": obj, "choices": [choice], "usage": usage})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(http)  # headers at once, the first chunk after the delay (as vLLM does)
            await asyncio.sleep(delay_s)
            obj = "chat.completion.chunk" if chat else "text_completion"
            for k, word in enumerate(words):
                done = finish if k == n - 1 else None
                delta = {"role": "assistant", "content": word} if k == 0 else {"content": word}
                choice = {"index": 0, "finish_reason": done, "logprobs": None}
                choice |= {"delta": delta} if chat else {"text": word}
                await response.write(_sse({**envelope, "object": obj, "choices": [choice]}))
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(_sse({**envelope, "object": obj, "choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            state["running"] -= 1

    app = web.Application(client_max_size=1 << 20)
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/metrics", metrics),
            web.get("/v1/models", models),
            web.post("/tokenize", tokenize),
            web.post("/v1/chat/completions", chat),
            web.post("/v1/completions", completions),
            web.get("/_bench/last", last),
        ]
    )
    return app


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.bench_litellm")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstream", help="the benchmark's fast OpenAI-compatible upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--delay-ms", type=float, default=20.0, help="before an answer / the first chunk")
    up.add_argument("--chunks", type=int, default=4, help="chunks per answer (fewer if max_tokens is smaller)")
    up.add_argument("--model", default=UPSTREAM_MODEL)
    args = parser.parse_args(argv)
    app = upstream_app(args.delay_ms / 1e3, args.chunks, args.model)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


# --- LiteLLM ----------------------------------------------------------------------------------


def ensure_litellm_venv(path: Path, log: Callable[[str], None] = print) -> Path:
    """Create LiteLLM's venv on first use (like vLLM's: its pins clash with ours); return its bin dir.
    A venv whose install did not finish (no marker, or other requirements) is installed again."""
    python = path / "bin" / "python"
    marker = path / _MARKER
    want = {"requirements": list(LITELLM_REQUIREMENTS), "python": sys.version.split()[0]}
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return path / "bin"
    log(f"creating LiteLLM's virtual environment in {path} (first use; about 2 minutes)")
    marker.unlink(missing_ok=True)
    if not python.exists():
        venv.create(path, with_pip=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", *LITELLM_REQUIREMENTS], check=True)
    check = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, litellm; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        env=litellm_env(),
    )
    if check.returncode != 0:
        raise RuntimeError(f"LiteLLM does not import in {path}:\n{check.stderr[-2000:]}")
    marker.write_text(json.dumps(want))
    log(f"LiteLLM {check.stdout.strip()} ready in {path}")
    return path / "bin"


def litellm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # nothing can be fetched: use the packaged cost map
            "LITELLM_TELEMETRY": "False",  # (a no-op in 1.106, kept for older releases)
            "LITELLM_LOG": "ERROR",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def litellm_config(api_base: str, upstream_model: str, master_key: str, guardrails: bool = True) -> dict[str, Any]:
    """The proxy's config: one model (our route class) on the upstream, the master key, and the content
    filter (masking what servemesh redacts, blocking what it refuses) on every request."""
    config: dict[str, Any] = {
        "model_list": [
            {
                "model_name": ROUTE,
                "litellm_params": {
                    "model": f"openai/{upstream_model}",
                    "api_base": f"{api_base}/v1",
                    "api_key": "none",
                },
            }
        ],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"drop_params": True},
    }
    if guardrails:
        patterns = [{"pattern_type": "prebuilt", "pattern_name": p, "action": "MASK"} for p in _MASKED]
        patterns += [
            {"pattern_type": "regex", "pattern": p, "name": f"refusal_{i}", "action": "BLOCK"}
            for i, p in enumerate(_REFUSALS)
        ]
        config["guardrails"] = [
            {
                "guardrail_name": "servemesh-equivalent",
                "litellm_params": {
                    "guardrail": "litellm_content_filter",
                    "mode": "pre_call",
                    "default_on": True,
                    "patterns": patterns,
                },
            }
        ]
    return config


# --- measurements -----------------------------------------------------------------------------


@dataclass
class Target:
    """One path: where its chat completions go, with what, and which processes it charges."""

    path: str
    url: str
    model: str
    headers: dict[str, str]
    ssl: ssl.SSLContext | bool = False
    #: the gateway's processes (CPU per request)
    pids: Callable[[], list[int]] = lambda: []
    #: the mesh's Envoys on the path (reported apart)
    envoy_pids: Callable[[], list[int]] = lambda: []


@dataclass
class Cell:
    upstream: str
    path: str
    kind: str
    concurrency: int
    #: seconds: the whole answer (whole) or the whole stream (stream)
    latencies: list[float] = field(default_factory=list)
    #: streams: seconds to the first chunk with content
    firsts: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0
    last_error: str = ""
    #: CPU seconds while measuring: the gateway's processes, the Envoys, the upstream, this process
    cpu: float = 0.0
    envoy_cpu: float = 0.0
    upstream_cpu: float = 0.0
    loadgen_cpu: float = 0.0

    @property
    def n(self) -> int:
        return len(self.latencies)

    def q_ms(self, q: float, first: bool = False) -> float:
        return quantile(self.firsts if first else self.latencies, q) * 1e3

    def rate(self) -> float:
        return self.n / self.wall if self.wall else float("nan")

    def cpu_ms(self) -> float:
        return self.cpu / self.n * 1e3 if self.n else float("nan")

    def envoy_cpu_ms(self) -> float:
        return self.envoy_cpu / self.n * 1e3 if self.n else float("nan")

    def per_core_rps(self) -> float:
        """Requests per CPU-second of the path's processes (Envoys included)."""
        used = self.cpu + self.envoy_cpu
        return self.n / used if used > 0 else float("nan")

    def merge(self, other: Cell) -> None:
        self.latencies += other.latencies
        self.firsts += other.firsts
        self.wall += other.wall
        self.errors += other.errors
        self.last_error = other.last_error or self.last_error
        for name in ("cpu", "envoy_cpu", "upstream_cpu", "loadgen_cpu"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _content(line: bytes) -> bool:
    """An SSE line carrying a chunk with content."""
    try:
        event = json.loads(line[5:])
    except ValueError:
        return False
    return any(
        (c.get("delta") or {}).get("content") or c.get("text")
        for c in event.get("choices") or ()
        if isinstance(c, dict)
    )


async def one_request(session: aiohttp.ClientSession, target: Target, body: bytes, stream: bool) -> tuple[float, float]:
    """(latency, time to the first content chunk) in seconds; raises on anything but a full answer."""
    start = time.perf_counter()
    async with session.post(target.url, data=body, headers=target.headers, ssl=target.ssl) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        if not stream:
            data = await resp.read()
            took = time.perf_counter() - start
            if b'"choices"' not in data:
                raise RuntimeError(f"no choices in {data[:200]!r}")
            return took, took
        first = math.nan
        done = False
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            if math.isnan(first) and _content(line):
                first = time.perf_counter() - start
            elif line.startswith(b"data: [DONE]"):
                done = True
            elif b'"error"' in line and not _content(line):
                raise RuntimeError(f"error event: {line[:200]!r}")
        took = time.perf_counter() - start
    if math.isnan(first) or not done:
        raise RuntimeError("the stream ended without content or without [DONE]")
    return took, first


def _pids_tree(root: int | None) -> list[int]:
    """`root` and its descendants (from /proc)."""
    if root is None:
        return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


async def _closed_loop(
    session: aiohttp.ClientSession,
    target: Target,
    body_of: Callable[[int], bytes],
    stream: bool,
    concurrency: int,
    seconds: float,
    cell: Cell,
    counter: Iterator[int],
) -> None:
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            body = body_of(next(counter))
            try:
                took, first = await one_request(session, target, body, stream)
            except Exception as exc:  # counted and reported, never hidden
                cell.errors += 1
                cell.last_error = f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(0.05)  # no hot loop against a path that refuses
            else:
                cell.latencies.append(took)
                if stream:
                    cell.firsts.append(first)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cell.wall += time.perf_counter() - start


async def run_cell(
    upstream: str,
    target: Target,
    kind: str,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    body_of: Callable[[int], bytes],
    upstream_pids: Callable[[], list[int]],
    counter: Iterator[int] | None = None,
) -> Cell:
    """A warm-up (connections, TLS, caches), then `seconds` of closed-loop load, in a fresh session."""
    cell = Cell(upstream, target.path, kind, concurrency)
    counter = counter if counter is not None else itertools.count()
    stream = kind == STREAM
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup_s > 0:
            warm = Cell(upstream, "", kind, 0)
            await _closed_loop(session, target, body_of, stream, concurrency, warmup_s, warm, counter)
        pids, envoys, ups = target.pids(), target.envoy_pids(), upstream_pids()
        before = (_cpu_seconds(pids), _cpu_seconds(envoys), _cpu_seconds(ups), time.process_time())
        await _closed_loop(session, target, body_of, stream, concurrency, seconds, cell, counter)
        after = (_cpu_seconds(pids), _cpu_seconds(envoys), _cpu_seconds(ups), time.process_time())
    cell.cpu, cell.envoy_cpu, cell.upstream_cpu, cell.loadgen_cpu = (a - b for a, b in zip(after, before, strict=True))
    return cell


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    levels: list[int]
    upstreams: list[str]
    paths: list[str]
    seconds: float
    warmup_s: float
    rounds: int
    max_tokens: int
    delay_ms: float
    chunks: int
    litellm_version: str = ""
    cells: dict[tuple[str, str, str, int], Cell] = field(default_factory=dict)
    #: upstream -> path -> what the probes saw (auth enforced, redaction effective)
    policies: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def cell(self, upstream: str, path: str, kind: str, level: int) -> Cell:
        return self.cells.get((upstream, path, kind, level)) or Cell(upstream, path, kind, level)

    def added_ms(self, upstream: str, path: str, kind: str, level: int, q: float) -> float:
        first = kind == STREAM
        return self.cell(upstream, path, kind, level).q_ms(q, first) - self.cell(upstream, DIRECT, kind, level).q_ms(
            q, first
        )

    def peak_per_core(self, upstream: str, path: str) -> float:
        values = [self.cell(upstream, path, WHOLE, lv).per_core_rps() for lv in self.levels]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else float("nan")

    def peak_rate(self, upstream: str, path: str) -> float:
        values = [self.cell(upstream, path, WHOLE, lv).rate() for lv in self.levels]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else float("nan")


@dataclass
class Verdict:
    upstream: str
    path: str
    target: str
    measured: float
    #: LiteLLM with the same policies, and bare (master key only), in the same run
    litellm: float
    litellm_bare: float
    limit: str
    met: bool
    #: judged targets decide the exit code; the others are shown for information
    judged: bool
    earlier: str = ""


def judged_path(paths: Sequence[str]) -> str:
    """The targets are about the gateway: judged without the mesh when that ran."""
    return NO_MESH if NO_MESH in paths else MESH


def litellm_reference(paths: Sequence[str]) -> str:
    """What servemesh is held against: LiteLLM with the same policies when that ran."""
    return LITELLM if LITELLM in paths else LITELLM_BARE


def verdicts(run: Run) -> list[Verdict]:
    out: list[Verdict] = []
    judged = judged_path(run.paths)
    ref = litellm_reference(run.paths)
    first_level = 1 if 1 in run.levels else min(run.levels)
    for upstream in run.upstreams:
        lite_core = run.peak_per_core(upstream, ref)
        bare_core = run.peak_per_core(upstream, LITELLM_BARE)
        for path in (p for p in (NO_MESH, MESH) if p in run.paths):
            is_judged = path == judged and upstream == FAST
            added = run.added_ms(upstream, path, WHOLE, first_level, 0.5)
            first = run.added_ms(upstream, path, STREAM, first_level, 0.5)
            core = run.peak_per_core(upstream, path)
            ratio = core / lite_core if lite_core and not math.isnan(lite_core) else float("nan")
            out += [
                Verdict(
                    upstream,
                    path,
                    f"added p50 at concurrency {first_level} (ms)",
                    added,
                    run.added_ms(upstream, ref, WHOLE, first_level, 0.5),
                    run.added_ms(upstream, LITELLM_BARE, WHOLE, first_level, 0.5),
                    f"<= {MAX_ADDED_P50_MS:g}",
                    added <= MAX_ADDED_P50_MS,
                    is_judged,
                    f"{EARLIER_LITELLM['added_p50_ms']}",
                ),
                Verdict(
                    upstream,
                    path,
                    f"first chunk added p50 at concurrency {first_level} (ms)",
                    first,
                    run.added_ms(upstream, ref, STREAM, first_level, 0.5),
                    run.added_ms(upstream, LITELLM_BARE, STREAM, first_level, 0.5),
                    f"<= {MAX_FIRST_CHUNK_ADDED_MS:g}",
                    first <= MAX_FIRST_CHUNK_ADDED_MS,
                    is_judged,
                    f"{EARLIER_LITELLM['first_chunk_added_ms']}",
                ),
                Verdict(
                    upstream,
                    path,
                    "requests/s per core, best level (x LiteLLM's)",
                    ratio,
                    1.0,
                    bare_core / lite_core if lite_core and not math.isnan(lite_core) else float("nan"),
                    f">= {MIN_PER_CORE_RATIO:g}x",
                    ratio >= MIN_PER_CORE_RATIO,
                    is_judged,
                    f"{EARLIER_LITELLM['per_core_rps']:g} req/s per core",
                ),
            ]
    return out


def _f(v: float, digits: int = 2) -> str:
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def tables(run: Run) -> list[Table]:
    """Per upstream: the measurements beside the direct baseline, then the targets with verdicts."""
    out: list[Table] = []
    checks = verdicts(run)
    for upstream in run.upstreams:
        what = (
            f"fast upstream ({run.delay_ms:g} ms delay, {run.chunks} chunks)"
            if upstream == FAST
            else f"vLLM (SmolLM2-135M-Instruct, CPU build, OpenMP on core {VLLM_CPU_BIND})"
        )
        t = Table(
            title=f"{what}: {run.seconds:g} s per cell x {run.rounds} round(s), max_tokens {run.max_tokens}",
            title_justify="left",
        )
        for name in (
            "conc",
            "path",
            "p50 ms",
            "p99 ms",
            "added p50 / p99 ms",
            "req/s",
            "gateway CPU ms/req",
            "Envoy CPU ms/req",
            "req/s per core",
            "1st chunk p50 ms",
            "1st chunk added p50 / p99 ms",
            "n whole / stream",
            "errors",
        ):
            t.add_column(name, justify="left" if name == "path" else "right")
        for level in run.levels:
            for path in run.paths:
                w, s = run.cell(upstream, path, WHOLE, level), run.cell(upstream, path, STREAM, level)
                base = path == DIRECT
                t.add_row(
                    str(level),
                    path,
                    _f(w.q_ms(0.5)),
                    _f(w.q_ms(0.99)),
                    "-"
                    if base
                    else f"{_f(run.added_ms(upstream, path, WHOLE, level, 0.5))} / "
                    f"{_f(run.added_ms(upstream, path, WHOLE, level, 0.99))}",
                    _f(w.rate(), 0),
                    "-" if base else _f(w.cpu_ms()),
                    _f(w.envoy_cpu_ms()) if path == MESH else "-",
                    "-" if base else _f(w.per_core_rps(), 0),
                    _f(s.q_ms(0.5, first=True)),
                    "-"
                    if base
                    else f"{_f(run.added_ms(upstream, path, STREAM, level, 0.5))} / "
                    f"{_f(run.added_ms(upstream, path, STREAM, level, 0.99))}",
                    f"{w.n} / {s.n}",
                    str(w.errors + s.errors),
                    end_section=path == run.paths[-1],
                )
        out.append(t)
        ref = litellm_reference(run.paths)
        v = Table(title=f"{what}: targets (servemesh vs {ref}, same run)", title_justify="left")
        for name in (
            "servemesh path",
            "measure",
            "servemesh",
            ref,
            LITELLM_BARE,
            "LiteLLM earlier",
            "target",
            "verdict",
        ):
            v.add_column(name, justify="left" if name in ("servemesh path", "measure", "verdict") else "right")
        for c in (c for c in checks if c.upstream == upstream):
            ratio = "x" in c.limit
            verdict = ("met" if c.met else "MISSED") + ("" if c.judged else " (info)")
            style = "" if not c.judged else ("green" if c.met else "bold red")
            measured = (
                f"{_f(c.measured, 1)}x ({_f(run.peak_per_core(upstream, c.path), 0)})" if ratio else _f(c.measured)
            )
            litellm = f"1x ({_f(run.peak_per_core(upstream, ref), 0)})" if ratio else _f(c.litellm)
            bare = (
                f"{_f(c.litellm_bare, 1)}x ({_f(run.peak_per_core(upstream, LITELLM_BARE), 0)})"
                if ratio
                else _f(c.litellm_bare)
            )
            v.add_row(
                c.path,
                c.target,
                measured,
                litellm,
                bare,
                c.earlier,
                c.limit,
                f"[{style}]{verdict}[/]" if style else verdict,
            )
        out.append(v)
    return out


def policy_table(run: Run) -> Table:
    t = Table(title="Policies as probed before measuring (one request each)", title_justify="left")
    for name in ("upstream", "path", "without a key", "planted e-mail reached the upstream", "configured"):
        t.add_column(name)
    for upstream, by_path in run.policies.items():
        for path, seen in by_path.items():
            t.add_row(
                upstream, path, seen.get("unauthenticated", "-"), seen.get("leaked", "-"), seen.get("configured", "")
            )
    return t


def to_json(run: Run, checks: list[Verdict]) -> dict[str, Any]:
    cells = []
    for c in run.cells.values():
        cells.append(
            {
                "upstream": c.upstream,
                "path": c.path,
                "kind": c.kind,
                "concurrency": c.concurrency,
                "requests": c.n,
                "errors": c.errors,
                "last_error": c.last_error,
                "wall_s": c.wall,
                "p50_ms": c.q_ms(0.5),
                "p99_ms": c.q_ms(0.99),
                "first_chunk_p50_ms": c.q_ms(0.5, first=True),
                "first_chunk_p99_ms": c.q_ms(0.99, first=True),
                "added_p50_ms": run.added_ms(c.upstream, c.path, c.kind, c.concurrency, 0.5),
                "added_p99_ms": run.added_ms(c.upstream, c.path, c.kind, c.concurrency, 0.99),
                "requests_per_s": c.rate(),
                "gateway_cpu_ms_per_request": c.cpu_ms(),
                "envoy_cpu_ms_per_request": c.envoy_cpu_ms(),
                "requests_per_s_per_core": c.per_core_rps(),
                "upstream_cpu_s": c.upstream_cpu,
                "loadgen_cpu_s": c.loadgen_cpu,
            }
        )

    def clean(v: Any) -> Any:  # JSON has no NaN
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(
        {
            "config": {
                "levels": run.levels,
                "upstreams": run.upstreams,
                "paths": run.paths,
                "seconds_per_cell": run.seconds,
                "warmup_s": run.warmup_s,
                "rounds": run.rounds,
                "max_tokens": run.max_tokens,
                "fast_upstream_delay_ms": run.delay_ms,
                "fast_upstream_chunks": run.chunks,
                "litellm": run.litellm_version,
                "cores": os.cpu_count(),
                "load_before": list(run.load_before),
                "load_after": list(run.load_after),
            },
            "policies": run.policies,
            "notes": run.notes,
            "cells": cells,
            "verdicts": [dataclasses.asdict(v) for v in checks],
            "earlier_litellm": EARLIER_LITELLM,
        }
    )


# --- orchestration --------------------------------------------------------------------------------


def _http_health(url: str) -> Callable[[], Any]:
    async def healthy() -> bool:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s, s.get(url) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return healthy


class Phase:
    """Everything in front of one upstream: the upstream (unless given), LiteLLM, servemesh with and
    without the mesh; started in order, stopped in reverse."""

    def __init__(self, base: Path, upstream: str, run: Run, log: Callable[[str], None], **opts: Any) -> None:
        self.base, self.upstream, self.run, self._log = base / upstream, upstream, run, log
        self.opts = opts
        self.procs: list[Any] = []  # Supervisor | Mesh, in start order
        self.targets: dict[str, Target] = {}
        self.upstream_url = ""
        self.upstream_proc: Any = None
        self.master_key = "sk-bench-" + secrets.token_hex(12)
        #: servemesh path -> where its API key came from ("" = none)
        self.keys: dict[str, str] = {}

    async def _start(self, proc: Any) -> None:
        self._log(f"starting {getattr(proc, 'name', 'servemesh')} ...")
        try:
            await proc.start()
        except BaseException:
            await proc.stop()
            raise
        self.procs.append(proc)

    async def start(self) -> None:
        from mesh.launcher import REPO, free_port
        from mesh.supervisor import Supervisor
        from mesh.vllm import VllmArgs, health_check

        o = self.opts
        logs = self.base / "logs"
        if self.upstream == FAST:
            port = free_port()
            self.upstream_url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "mesh.bench_litellm", "upstream", "--port", str(port)]
            argv += ["--delay-ms", str(self.run.delay_ms), "--chunks", str(self.run.chunks)]
            self.upstream_proc = Supervisor(
                "fast-upstream",
                argv,
                cwd=REPO,
                env=dict(os.environ),
                health=health_check(self.upstream_url),
                log_path=logs / "fast-upstream.log",
                start_timeout_s=60.0,
            )
            engines: list[dict[str, object]] = [
                {"id": "vllm", "kind": "vllm", "url": self.upstream_url, "model": UPSTREAM_MODEL}
            ]
        else:
            args = VllmArgs(port=free_port(), max_num_seqs=max(32, *self.run.levels), cpu_bind=VLLM_CPU_BIND)
            self.upstream_url = args.url
            self.upstream_proc = Supervisor(
                "vllm",
                args.argv(o["vllm_python"], o["model_dir"]),
                env=args.env(),
                health=health_check(args.url),
                log_path=logs / "vllm.log",
            )
            engines = [
                {
                    "id": "vllm",
                    "kind": "vllm",
                    "url": args.url,
                    "model": args.served_model_name,
                    "model_dir": str(o["model_dir"]),
                    "max_model_len": args.max_model_len,
                }
            ]
        await self._start(self.upstream_proc)
        up_model = str(engines[0]["model"])
        self.targets[DIRECT] = Target(DIRECT, f"{self.upstream_url}/v1/chat/completions", up_model, dict(JSON))
        for path in (p for p in (LITELLM, LITELLM_BARE) if p in self.run.paths):
            await self._start_litellm(path, up_model, logs)
        for path in (p for p in (NO_MESH, MESH) if p in self.run.paths):
            await self._start_servemesh(path, engines)

    async def _start_litellm(self, path: str, up_model: str, logs: Path) -> None:
        from mesh.launcher import free_port
        from mesh.supervisor import Supervisor

        port = free_port()
        name = "litellm" if path == LITELLM else "litellm-bare"
        cfg_path = self.base / f"{name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        config = litellm_config(self.upstream_url, up_model, self.master_key, guardrails=path == LITELLM)
        cfg_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        bin_dir: Path = self.opts["litellm_bin"]
        argv = [str(bin_dir / "litellm"), "--config", str(cfg_path), "--host", "127.0.0.1", "--port", str(port)]
        proc = Supervisor(
            name,
            [*argv, "--num_workers", "1"],
            env=litellm_env(),
            health=_http_health(f"http://127.0.0.1:{port}/health/liveliness"),
            log_path=logs / f"{name}.log",
            start_timeout_s=240.0,
        )
        await self._start(proc)
        self.targets[path] = Target(
            path,
            f"http://127.0.0.1:{port}/v1/chat/completions",
            ROUTE,
            {**JSON, "Authorization": f"Bearer {self.master_key}"},
            pids=lambda: _pids_tree(proc.pid),
        )

    async def _start_servemesh(self, path: str, engines: list[dict[str, object]]) -> None:
        from mesh.launcher import Mesh, Ports, free_port, free_port_run

        meshed = path == MESH
        fields = [f.name for f in dataclasses.fields(Ports) if f.name != "admin"]
        ports = Ports(**{name: free_port() for name in fields}, admin=free_port_run(4) if meshed else Ports.admin)
        m = Mesh(
            self.base / ("mesh" if meshed else "no-mesh"),
            ports,
            engines,
            self._log,
            mesh=meshed,
            gateway_env={**NON_BINDING_LIMITS, **self.opts["gateway_env"]},
        )
        self._log(f"--- starting servemesh {'with' if meshed else 'without'} the mesh ---")
        await self._start(m)
        state = m.state()
        # the dev tenant's key (enterprise tier) that Mesh creates when the gateway's auth is on
        key = self.opts["api_key"] or (state.api_key() if getattr(state, "api_key_file", "") else "")
        self.keys[path] = "--api-key" if self.opts["api_key"] else ("dev tenant's key" if key else "")

        def app_pids() -> list[int]:
            names = ("gateway-stable", "inference-stable")
            return [s.pid for s in m.supervisors if getattr(s, "name", "") in names and s.pid is not None]

        def envoy_pids() -> list[int]:
            names = ("edge", "gateway-stable", "inference-stable")
            return [e.pid for n, e in m.envoys.items() if n in names and e.pid is not None]

        ctx: ssl.SSLContext | bool = False
        if meshed:
            ctx = ssl.create_default_context(cafile=str(m.certs_dir / "ca.crt"))
        self.targets[path] = Target(
            path,
            f"{state.openai}/chat/completions",
            ROUTE,
            {**JSON, "Authorization": f"Bearer {key}"} if key else dict(JSON),
            ctx,
            app_pids,
            envoy_pids,
        )

    def upstream_pids(self) -> list[int]:
        return _pids_tree(self.upstream_proc.pid if self.upstream_proc else None)

    async def probe(self) -> dict[str, dict[str, Any]]:
        """One request per gateway without a key, one with the planted e-mail (seen by the fast upstream)."""
        seen: dict[str, dict[str, Any]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as s:
            for path, t in self.targets.items():
                if path == DIRECT:
                    continue
                out: dict[str, Any] = {}
                body = request_body(0, t.model, False, self.run.max_tokens)
                anonymous = {k: v for k, v in t.headers.items() if k != "Authorization"}
                async with s.post(t.url, data=body, headers=anonymous, ssl=t.ssl) as resp:
                    out["unauthenticated"] = f"{'accepted' if resp.status == 200 else 'refused'} (HTTP {resp.status})"
                async with s.post(t.url, data=body, headers=t.headers, ssl=t.ssl) as resp:
                    status, text = resp.status, await resp.text()
                if status != 200:
                    raise RuntimeError(f"{path} answered HTTP {status} to a well-formed request: {text[:300]}")
                if self.upstream == FAST:
                    async with s.get(f"{self.upstream_url}/_bench/last") as resp:
                        last = json.dumps(await resp.json())
                    out["leaked"] = "yes" if PLANTED in last else "no (redacted)"
                if path == LITELLM:
                    out["configured"] = "master key; content filter: mask PII, block the refusal topics"
                elif path == LITELLM_BARE:
                    out["configured"] = "master key only"
                else:
                    extra = ", ".join(k.removeprefix("SERVEMESH_GATEWAY_") for k in sorted(self.opts["gateway_env"]))
                    key = f"API key ({self.keys[path]})" if self.keys.get(path) else "no API key"
                    out["configured"] = (
                        f"{key}; rate limits on, raised not to bind; defaults: redaction, safety, response cache "
                        "(no hits: every prompt differs), budget" + (f"; set: {extra}" if extra else "")
                    )
                seen[path] = out
        return seen

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            self._log(f"stopping {getattr(proc, 'name', 'servemesh')}")
            try:
                await proc.stop()
            except Exception as exc:  # keep stopping the others
                self._log(f"error while stopping: {exc!r}")
        self.procs.clear()


async def _measure_phase(run: Run, phase: Phase, log: Callable[[str], None]) -> None:
    counter = itertools.count(1)  # run-wide: no two requests alike

    def body_of(model: str, stream: bool) -> Callable[[int], bytes]:
        return lambda i: request_body(i, model, stream, run.max_tokens)

    for rnd in range(run.rounds):
        for li, level in enumerate(run.levels):
            k = (li + rnd) % len(run.paths)
            order = run.paths[k:] + run.paths[:k]  # rotate: no path always goes first
            for kind in (WHOLE, STREAM):
                for path in order:
                    log(f"{phase.upstream}, round {rnd + 1}/{run.rounds}, concurrency {level}: {path} {kind} ...")
                    cell = await run_cell(
                        phase.upstream,
                        phase.targets[path],
                        kind,
                        level,
                        run.seconds,
                        run.warmup_s,
                        body_of(phase.targets[path].model, kind == STREAM),
                        phase.upstream_pids,
                        counter,
                    )
                    key = (phase.upstream, path, kind, level)
                    if key in run.cells:
                        run.cells[key].merge(cell)
                    else:
                        run.cells[key] = cell


async def run_litellm_bench(
    home: Path,
    *,
    levels: list[int],
    upstreams: list[str],
    servemesh_paths: list[str],
    seconds: float = 5.0,
    warmup_s: float = 1.0,
    rounds: int = 1,
    max_tokens: int = 4,
    delay_ms: float = 20.0,
    chunks: int = 4,
    api_key: str = "",
    gateway_env: dict[str, str] | None = None,
    litellm_paths: Sequence[str] = (LITELLM, LITELLM_BARE),
    json_path: Path | None = None,
    prepare: Callable[[Path], Path] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    out: Console | None = None,
) -> bool:
    """Measure, stop everything, print the tables (and write JSON). True when every judged target was met."""
    from mesh.vllm import ensure_venv

    run = Run(
        levels,
        upstreams,
        [DIRECT, *litellm_paths, *servemesh_paths],
        seconds,
        warmup_s,
        rounds,
        max_tokens,
        delay_ms,
        chunks,
    )
    # the mesh's Unix sockets live under it: a path under the data directory can pass their 107-byte limit
    base = Path(tempfile.mkdtemp(prefix="servemesh-bench-litellm-"))
    bin_dir = await asyncio.to_thread(ensure_litellm_venv, home / "venvs" / "litellm", log)
    version = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    run.litellm_version = version.stdout.strip()
    opts: dict[str, Any] = {
        "litellm_bin": bin_dir,
        "api_key": api_key,
        "gateway_env": gateway_env or {},
    }
    if VLLM in upstreams:
        if prepare is None:
            from services.inference.models import prepare_model

            def prepare(models: Path) -> Path:
                return prepare_model(models)[0]

        opts["model_dir"] = await asyncio.to_thread(prepare, home / "models")
        opts["vllm_python"] = await asyncio.to_thread(ensure_venv, home / "venvs" / "vllm", log)
    failed = False
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    run.load_before = os.getloadavg()
    try:
        for upstream in upstreams:
            phase = Phase(base, upstream, run, log, **opts)
            try:
                log(f"=== {upstream} upstream ===")
                started = time.monotonic()
                await phase.start()
                log(f"everything is up in {time.monotonic() - started:.0f} s")
                run.policies[upstream] = await phase.probe()
                await _measure_phase(run, phase, log)
            finally:
                await phase.stop()
    except (Exception, asyncio.CancelledError) as exc:  # an error, Ctrl-C or SIGTERM: report what ran
        failed = True
        why = "interrupted" if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}: {exc}"
        run.notes.append(f"PARTIAL RUN ({why}); the tables cover the cells that ran"[:500])
        raise
    finally:
        run.load_after = os.getloadavg()
        if task is not None:
            loop.remove_signal_handler(signal.SIGTERM)
        if failed:
            log(f"logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        if run.cells:
            _report(run, json_path, out)
    return all(v.met for v in verdicts(run) if v.judged)


def _report(run: Run, json_path: Path | None, out: Console | None) -> None:
    console = out or Console()
    if out is None and not console.is_terminal:
        console = Console(width=220)
    checks = verdicts(run)
    la, lb = run.load_before, run.load_after
    console.print(
        f"\nLiteLLM {run.litellm_version or '?'} (1 worker) vs servemesh, {os.cpu_count()} cores, load average "
        f"{la[0]:.2f} before, {lb[0]:.2f} after. Closed loop (aiohttp, one process), {run.warmup_s:g} s warm-up "
        f"then {run.seconds:g} s per cell; same requests (one user turn of ~380 bytes with one e-mail address, "
        f"temperature 0, max_tokens {run.max_tokens}). added = path - direct in the same run; gateway CPU: "
        "LiteLLM's process tree, servemesh's gateway + inference; req/s per core = requests per CPU-second "
        "of those processes (and the Envoys, for servemesh+mesh).",
        highlight=False,
    )
    console.print(policy_table(run))
    for t in tables(run):
        console.print(t)
    errors = [c for c in run.cells.values() if c.errors]
    for c in errors:
        console.print(
            f"[bold]{c.errors} errors[/] on {c.upstream} {c.path} {c.kind} at concurrency {c.concurrency}: "
            f"{escape(c.last_error)}",
            highlight=False,
        )
    for note in run.notes:
        console.print(f"[bold]{escape(note)}[/]")
    judged = [v for v in checks if v.judged]
    missed = [v for v in judged if not v.met]
    console.print(
        f"Judged targets (fast upstream, {judged_path(run.paths)}): {len(judged) - len(missed)} of {len(judged)} met"
        + (f"; missed: {'; '.join(f'{v.target} = {_f(v.measured)}' for v in missed)}" if missed else ""),
        highlight=False,
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_json(run, checks), indent=2))
        console.print(f"results written to {json_path}", highlight=False)


if __name__ == "__main__":
    main()

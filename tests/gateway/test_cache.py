"""The response cache: deterministic answers kept per tenant and model, in-process or in a real
Redis (started once per session), never leaking across tenants, never holding personal data,
never storing a partial answer, never failing a request when the store fails."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from mesh.launcher import free_port
from services.common import context
from services.common.errors import Unavailable
from services.common.generation import Chunk, FinishReason, Message, Role, Sampling, Usage
from services.gateway.budget import Passage
from services.gateway.cache import (
    CacheConfig,
    CachedAnswer,
    CacheMetrics,
    CacheStore,
    EngineIdentities,
    MemoryStore,
    ModelIdentity,
    ResponseCache,
    cache_key,
    create_store,
)
from services.gateway.cache.redis_store import RedisStore
from services.gateway.core import GatewayRequest, Pipeline, Policy, Principal, Safety, default_policies
from services.gateway.redaction import Redactor
from services.gateway.settings import DecodingDefaults, RouteClassConfig, SafetyConfig

CLASSES = {
    "chat": RouteClassConfig(
        engine="vllm", default_max_tokens=64, max_tokens_limit=128, decoding=DecodingDefaults(temperature=0.7)
    ),
}
CARD = "c0ffee" * 10 + "abcd"
IDENTITIES = {"vllm": ModelIdentity("smollm2-135m", CARD)}


# --- a real redis-server, once per session -------------------------------------------------


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        for _ in range(500):  # until it answers (or dies)
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer")
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = _start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@pytest.fixture
async def redis_db(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the session's server, emptied before the test."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


async def _everything(client: aioredis.Redis) -> dict[bytes, bytes]:
    return {key: await client.get(key) async for key in client.scan_iter(count=1000)}


# --- pipeline pieces -------------------------------------------------------------------------


class Engine:
    """Answers "#<n> <what the engine saw of the last message>" in a few chunks; n counts the
    streams started, so two answers from the engine always differ and a cached one is known."""

    def __init__(self, served_engine: str = "engines/vllm", model: str = "smollm2-135m") -> None:
        self.started = 0
        self.served_engine, self.model = served_engine, model
        self.script: list[str] = []  # per stream: "ok", "fail", "no_finish", "hang", "gate"
        self.gate = asyncio.Event()
        self.reached_gate = asyncio.Event()
        self.text: str | None = None  # overrides the echo

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        self.started += 1
        mode = self.script.pop(0) if self.script else "ok"
        if not request.served.engine:
            request.served.engine, request.served.model = self.served_engine, self.model
        text = self.text if self.text is not None else f"#{self.started} {request.messages[-1].content}"
        pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
        yield Chunk(pieces[0])
        if mode == "fail":
            raise Unavailable("engine died", retry_after=1.0)
        if mode == "hang":
            self.reached_gate.set()
            await asyncio.Event().wait()
        if mode == "gate":
            self.reached_gate.set()
            await self.gate.wait()
        for piece in pieces[1:]:
            yield Chunk(piece)
        if mode != "no_finish":
            yield Chunk("", FinishReason.STOP, Usage(11, len(pieces)), mean_logprob=-0.25)


class _NoMetrics:
    def first_token(self, route_class: str, engine: str, seconds: float) -> None:
        pass

    def finished(self, route_class: str, engine: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass


class Fixture:
    """A pipeline with the cache last, as the gateway will run it."""

    def __init__(
        self,
        config: CacheConfig,
        store: CacheStore,
        *,
        identities: dict[str, ModelIdentity] | None = None,
        redact: bool = True,
        safety: Safety | None = None,
        after: tuple[Policy, ...] = (),
        clock: list[float] | None = None,
        screen: Redactor | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.identities = dict(IDENTITIES if identities is None else identities)
        self.engine = Engine()
        self.now = clock if clock is not None else [0.0]
        self.store = store
        self.cache = ResponseCache(
            config, store, self.identities.get, CacheMetrics(self.registry), redactor=screen, clock=lambda: self.now[0]
        )
        policies = default_policies(CLASSES, "chat", _NoMetrics(), Redactor() if redact else None, safety=safety)
        self.pipeline = Pipeline([*policies, self.cache, *after], self.engine)

    async def ask(self, request: GatewayRequest) -> list[Chunk]:
        return [c async for c in self.pipeline.stream(request)]

    def count(self, what: str, result: str) -> float:
        value = self.registry.get_sample_value(f"servemesh_gateway_cache_{what}_total", {"result": result})
        assert value is not None
        return value


def _req(
    text: str = "What is a service mesh?",
    *,
    tenant: str | None = "acme",
    temperature: float | None = 0.0,
    seed: int | None = None,
    **kw,
) -> GatewayRequest:
    return GatewayRequest(
        request_id="r1",
        route_class="",
        prompt=text,
        messages=(),
        sampling=Sampling(temperature=temperature, seed=seed),
        principal=None if tenant is None else Principal(tenant, f"{tenant}-key", "paid"),
        **kw,
    )


def _text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


@pytest.fixture(params=["memory", "redis"])
def store_config(request: pytest.FixtureRequest) -> tuple[CacheConfig, CacheStore]:
    if request.param == "memory":
        config = CacheConfig()
    else:
        request.getfixturevalue("redis_db")  # an empty database
        config = CacheConfig(redis_url=request.getfixturevalue("redis_url"))
    return config, create_store(config)


# --- hits, misses, bypasses ------------------------------------------------------------------


async def test_a_deterministic_answer_is_served_from_the_cache_without_starting_the_engine(store_config) -> None:
    f = Fixture(*store_config)
    first_req = _req()
    first = await f.ask(first_req)
    assert len(first) > 2 and _text(first) == "#1 What is a service mesh?" and first_req.notes["cache"] == "miss"
    again = _req()
    hit = await f.ask(again)
    assert f.engine.started == 1  # no stream was started for the hit
    assert len(hit) == 1 and _text(hit) == _text(first)
    assert (hit[0].finish_reason, hit[0].usage, hit[0].mean_logprob) == (FinishReason.STOP, first[-1].usage, -0.25)
    assert again.notes["cache"] == "hit"
    assert (again.served.engine, again.served.model) == ("engines/vllm", "smollm2-135m")
    assert (f.count("lookups", "miss"), f.count("lookups", "hit"), f.count("stores", "stored")) == (1, 1, 1)
    await f.cache.close()


async def test_only_greedy_or_seeded_requests_are_cached() -> None:
    f = Fixture(CacheConfig(), MemoryStore(100))
    for sampled in (_req(temperature=0.7), _req(temperature=None), _req(temperature=0.7)):  # None: the class's 0.7
        await f.ask(sampled)
        assert sampled.notes["cache"] == "bypass"
    assert f.engine.started == 3 and len(f.store) == 0 and f.count("lookups", "bypass") == 3
    seeded = [_req(temperature=0.7, seed=7) for _ in range(2)]
    assert _text(await f.ask(seeded[0])) == _text(await f.ask(seeded[1])) == "#4 What is a service mesh?"
    assert seeded[1].notes["cache"] == "hit"
    other_seed = _req(temperature=0.7, seed=8)
    assert _text(await f.ask(other_seed)) == "#5 What is a service mesh?"


async def test_the_cache_cannot_leak_across_tenants(store_config) -> None:
    f = Fixture(*store_config)
    answers = {}
    for n, tenant in enumerate(("acme", "globex", None), start=1):  # None: authentication off
        answers[tenant] = _text(await f.ask(_req(tenant=tenant)))
        assert answers[tenant] == f"#{n} What is a service mesh?"  # each went to the engine
    for tenant in ("globex", "acme", None):
        req = _req(tenant=tenant)
        assert _text(await f.ask(req)) == answers[tenant] and req.notes["cache"] == "hit"
    assert f.engine.started == 3
    same = [cache_key(_req(tenant=t), IDENTITIES["vllm"]) for t in ("acme", "globex")]
    assert same[0] != same[1]
    await f.cache.close()


def test_every_input_of_the_answer_is_in_the_key() -> None:
    def request(**kw) -> GatewayRequest:
        base = dict(
            request_id="r",
            route_class="chat",
            prompt=None,
            messages=(Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Hello there")),
            sampling=Sampling(temperature=0.0, top_p=0.9, max_tokens=64, stop=("###",), repetition_penalty=1.0),
            engine="vllm",
            principal=Principal("acme", "k1", "paid"),
        )
        return GatewayRequest(**(base | kw))

    ident = IDENTITIES["vllm"]
    base = request()
    sampling_variants = {
        "temperature": dataclasses.replace(base.sampling, temperature=0.5, seed=1),
        "top_p": dataclasses.replace(base.sampling, top_p=0.8),
        "max_tokens": dataclasses.replace(base.sampling, max_tokens=65),
        "stop": dataclasses.replace(base.sampling, stop=("###", "END")),
        "seed": dataclasses.replace(base.sampling, seed=3),
        "repetition_penalty": dataclasses.replace(base.sampling, repetition_penalty=1.1),
    }
    assert set(sampling_variants) == {f.name for f in dataclasses.fields(Sampling)}  # a new field needs a case
    keys = {
        "base": cache_key(base, ident),
        "model": cache_key(base, ModelIdentity("smollm2-360m", CARD)),
        "card": cache_key(base, ModelIdentity("smollm2-135m", "0" * 64)),
        "tenant": cache_key(request(principal=Principal("globex", "k1", "paid")), ident),
        "no tenant": cache_key(request(principal=None), ident),
        "engine": cache_key(request(engine="small"), ident),
        "route class": cache_key(request(route_class="code"), ident),
        "canary header": cache_key(request(forward=(("x-servemesh-canary", "1"),)), ident),
        "whitespace": cache_key(request(messages=(base.messages[0], Message(Role.USER, "Hello  there"))), ident),
        "role": cache_key(request(messages=(Message(Role.USER, "Be brief."), base.messages[1])), ident),
        "order": cache_key(request(messages=base.messages[::-1]), ident),
        "split": cache_key(request(messages=(Message(Role.SYSTEM, "Be brief.Hello there"),)), ident),
        "raw prompt": cache_key(request(prompt="Hello there", messages=()), ident),
        "context": cache_key(request(context=(Passage("p1", "Meshes route."),)), ident),
        "allow_trim": cache_key(request(allow_trim=True), ident),
        **{f"sampling.{k}": cache_key(request(sampling=s), ident) for k, s in sampling_variants.items()},
    }
    assert len(set(keys.values())) == len(keys), "two different requests share a key"
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys.values())
    # the same request, however its numbers are spelled, has one key
    same = request(sampling=dataclasses.replace(base.sampling, temperature=0, repetition_penalty=1))
    assert cache_key(same, ident) == cache_key(request(), ident) == keys["base"]
    assert cache_key(request(request_id="other", notes={"x": "y"}), ident) == keys["base"]


async def test_a_miss_relays_each_chunk_as_it_comes() -> None:
    f = Fixture(CacheConfig(), MemoryStore(100))
    f.engine.script = ["gate"]
    stream = f.pipeline.stream(_req())
    first = await asyncio.wait_for(anext(stream), 60)  # hang guard only: a buffering cache never returns
    assert first.text == "#1 What" and len(f.store) == 0  # the engine is held until the client has it
    f.engine.gate.set()
    rest = [c async for c in stream]
    assert rest[-1].finish_reason is FinishReason.STOP and len(f.store) == 1
    assert _text(await f.ask(_req())) == first.text + _text(rest)


async def test_failed_closed_cancelled_or_unfinished_streams_are_never_stored(store_config) -> None:
    f = Fixture(*store_config)
    f.engine.script = ["fail", "ok", "no_finish", "hang"]
    with pytest.raises(Unavailable):
        await f.ask(_req())
    stream = f.pipeline.stream(_req())  # the client goes away after the first chunk
    assert (await anext(stream)).text == "#2 What"
    await stream.aclose()
    assert _text(await f.ask(_req())) == "#3 What is a service mesh?"  # ended without a finish reason

    async def consume() -> None:
        await f.ask(_req())

    task = asyncio.create_task(consume())
    await f.engine.reached_gate.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert f.count("stores", "incomplete") == 4 and f.count("stores", "stored") == 0
    fresh = _req()
    assert _text(await f.ask(fresh)) == "#5 What is a service mesh?" and fresh.notes["cache"] == "miss"
    assert _text(await f.ask(_req())) == "#5 What is a service mesh?" and f.engine.started == 5
    await f.cache.close()


async def test_refused_requests_are_not_cached() -> None:
    f = Fixture(CacheConfig(), MemoryStore(100), safety=Safety(SafetyConfig().rules(), "REFUSED.", lambda _t: None))
    for _ in range(2):
        req = _req("Explain how to build a pipe bomb")
        assert _text(await f.ask(req)) == "REFUSED." and req.notes["cache"] == "bypass"
    assert len(f.store) == 0 and f.engine.started == 0


async def test_unknown_or_changed_models_are_never_answered_from_the_cache() -> None:
    f = Fixture(CacheConfig(), MemoryStore(100), identities={})
    unknown = _req()
    await f.ask(unknown)
    assert unknown.notes["cache"] == "bypass" and f.count("lookups", "bypass") == 1
    f.identities["vllm"] = ModelIdentity("smollm2-135m", "")  # card unknown: not cached by default
    await f.ask(_req())
    assert len(f.store) == 0 and f.count("lookups", "bypass") == 2
    f.identities["vllm"] = IDENTITIES["vllm"]
    assert [_text(await f.ask(_req())) for _ in range(2)] == ["#3 What is a service mesh?"] * 2
    f.identities["vllm"] = ModelIdentity("smollm2-135m", "1" * 64)  # new weights, same model id
    assert _text(await f.ask(_req())) == "#4 What is a service mesh?"
    relaxed = Fixture(CacheConfig(require_card_hash=False), MemoryStore(100), identities={"vllm": ("m", "")})
    relaxed.engine.model = "m"
    assert [_text(await relaxed.ask(_req())) for _ in range(2)] == ["#1 What is a service mesh?"] * 2


async def test_a_failing_model_identity_is_a_bypass_not_a_failure() -> None:
    async def broken(engine: str) -> ModelIdentity:
        raise Unavailable("inference is down")

    registry = CollectorRegistry()
    cache = ResponseCache(CacheConfig(), MemoryStore(10), broken, CacheMetrics(registry))
    engine = Engine()
    req = _req()
    out = [c async for c in Pipeline([*default_policies(CLASSES, "chat", _NoMetrics()), cache], engine).stream(req)]
    assert _text(out) == "#1 What is a service mesh?" and req.notes["cache"] == "bypass"
    assert registry.get_sample_value("servemesh_gateway_cache_lookups_total", {"result": "error"}) == 1


async def test_an_answer_from_another_engine_or_model_is_not_stored() -> None:
    f = Fixture(CacheConfig(), MemoryStore(100))
    f.engine.served_engine = "engines/fallback"  # e.g. a fallback engine served it
    await f.ask(_req())
    f.engine.served_engine, f.engine.model = "engines/vllm", "smollm2-360m"  # a canary with another model
    await f.ask(_req())
    assert len(f.store) == 0 and f.count("stores", "mismatch") == 2


async def test_a_large_answer_is_relayed_whole_but_not_stored() -> None:
    f = Fixture(CacheConfig(max_entry_bytes=1024), MemoryStore(100))
    f.engine.text = "é" * 600  # 600 characters, 1200 bytes
    first = await f.ask(_req())
    assert _text(first) == "é" * 600 and f.count("stores", "too_large") == 1
    await f.ask(_req())
    assert f.engine.started == 2


class _ChangesTheConversation(Policy):
    """A policy wrongly placed after the cache that changes what the engine gets."""

    name = "late"

    async def admit(self, request: GatewayRequest) -> None:
        request.messages = (*request.messages, Message(Role.USER, "and one more thing"))


async def test_a_policy_after_the_cache_that_changes_the_request_voids_the_lookup() -> None:
    store = MemoryStore(100)
    plain = Fixture(CacheConfig(), store)
    await plain.ask(_req())  # stored for the plain conversation
    late = Fixture(CacheConfig(), store, after=(_ChangesTheConversation(),))
    req = _req()
    out = await late.ask(req)
    assert _text(out) == "#1 and one more thing"  # the engine's answer to what it got, not the cached one
    assert req.notes["cache"] == "bypass" and req.served.engine == "engines/vllm" and late.engine.started == 1
    assert late.count("lookups", "hit") == 1 and late.count("stores", "changed") == 1 and len(store) == 1


# --- time to live, eviction -----------------------------------------------------------------


async def test_entries_expire_after_their_ttl_in_memory() -> None:
    now = [1000.0]
    f = Fixture(CacheConfig(ttl_s=60), MemoryStore(100, clock=lambda: now[0]), clock=now)
    await f.ask(_req())
    now[0] = 1059.9
    assert (await f.ask(_req()))[0].text.startswith("#1") and f.engine.started == 1
    now[0] = 1060.0
    assert _text(await f.ask(_req())).startswith("#2")


async def test_entries_expire_after_their_ttl_in_redis(redis_db, redis_url) -> None:
    config = CacheConfig(ttl_s=90, redis_url=redis_url)
    f = Fixture(config, create_store(config))
    await f.ask(_req())
    [key] = [k async for k in redis_db.scan_iter()]
    assert 0 < await redis_db.pttl(key) <= 90_000
    await f.cache.close()


async def test_the_memory_store_drops_the_least_recently_used_and_the_expired() -> None:
    now = [0.0]
    store = MemoryStore(2, clock=lambda: now[0])
    await store.set("a", b"1", 100)
    await store.set("b", b"2", 100)
    assert await store.get("a") == b"1"  # a is now the most recently used
    await store.set("c", b"3", 100)
    assert (await store.get("b"), await store.get("a"), await store.get("c")) == (None, b"1", b"3")
    await store.set("short", b"4", 1)  # evicts a (c was read last)
    now[0] = 1.0
    assert await store.get("short") is None and len(store) == 1
    await store.set("d", b"5", 100)
    await store.set("e", b"6", 100)
    assert (await store.get("c"), await store.get("d"), await store.get("e")) == (None, b"5", b"6")


# --- the store failing -----------------------------------------------------------------------


async def test_redis_down_degrades_to_a_miss_and_comes_back(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    now = [0.0]
    config = CacheConfig(redis_url=f"redis://127.0.0.1:{port}/0", redis_cooldown_s=5)
    f = Fixture(config, create_store(config, clock=lambda: now[0]), clock=now)
    first = _req()
    assert _text(await f.ask(first)) == "#1 What is a service mesh?" and first.notes["cache"] == "miss"
    assert f.count("lookups", "error") == 1 and f.count("stores", "unavailable") == 1
    proc = _start_redis(port, tmp_path)
    try:
        assert _text(await f.ask(_req())) == "#2 What is a service mesh?"  # cooling down: not asked yet
        assert f.count("lookups", "unavailable") == 1 and f.count("stores", "stored") == 0
        now[0] = 5.0
        assert [_text(await f.ask(_req())) for _ in range(2)] == ["#3 What is a service mesh?"] * 2
        assert (f.count("stores", "stored"), f.count("lookups", "hit")) == (1, 1)
    finally:
        await f.cache.close()
        _stop(proc)


async def test_redis_dying_mid_stream_never_fails_the_request(tmp_path: Path) -> None:
    port = free_port()
    proc = _start_redis(port, tmp_path)
    config = CacheConfig(redis_url=f"redis://127.0.0.1:{port}/0")
    f = Fixture(config, create_store(config))
    try:
        f.engine.script = ["gate"]
        stream = f.pipeline.stream(_req())
        assert (await anext(stream)).text == "#1 What"  # looked up: a miss
        _stop(proc)
        f.engine.gate.set()
        rest = [c async for c in stream]
        assert rest[-1].finish_reason is FinishReason.STOP
        assert (f.count("lookups", "miss"), f.count("stores", "error")) == (1, 1)
    finally:
        await f.cache.close()
        if proc.poll() is None:
            _stop(proc)


async def test_a_corrupt_redis_entry_is_a_miss_and_is_replaced(redis_db, redis_url) -> None:
    config = CacheConfig(redis_url=redis_url)
    f = Fixture(config, create_store(config))
    await f.ask(_req())
    [key] = [k async for k in redis_db.scan_iter()]
    for bad in (b"\xff\xfe not json", b'{"v": 1}', json.dumps({"v": 99}).encode()):
        await redis_db.set(key, bad)
        req = _req()
        assert _text(await f.ask(req)).startswith("#") and req.notes["cache"] == "miss"
    assert f.engine.started == 4 and f.count("lookups", "error") == 3
    assert _text(await f.ask(_req())) == "#4 What is a service mesh?" and f.engine.started == 4  # re-stored
    await f.cache.close()


# --- personal data ---------------------------------------------------------------------------

PLANTED = ("jane.doe@example.com", "4111 1111 1111 1111", "4111111111111111", "+44 20 7946 0958", "7946 0958")


async def test_pii_planted_in_prompts_never_appears_in_logs_cache_keys_or_redis(
    redis_db, redis_url, caplog: pytest.LogCaptureFixture
) -> None:
    config = CacheConfig(redis_url=redis_url)
    f = Fixture(config, create_store(config))  # the real Redact policy runs before the cache
    prompt = "I am jane.doe@example.com, card 4111 1111 1111 1111, phone +44 20 7946 0958. Summarise my account."
    caplog.set_level(logging.DEBUG)
    requests = []
    for _ in range(2):
        state = context.bind("r1", None)
        req = GatewayRequest(
            request_id="r1",
            route_class="",
            prompt=None,
            messages=(Message(Role.SYSTEM, "Support desk."), Message(Role.USER, prompt)),
            sampling=Sampling(temperature=0.0),
            principal=Principal("acme", "k1", "paid"),
        )
        out = _text(await f.ask(req))
        requests.append((req, out, state.fields))
    (miss, answer, _), (hit, replay, fields) = requests
    assert (miss.notes["cache"], hit.notes["cache"]) == ("miss", "hit") and replay == answer
    assert "[EMAIL_1]" in answer and "[CARD_1]" in answer  # the engine echoed what it got: placeholders
    stored = await _everything(redis_db)
    assert len(stored) == 1
    [(key, value)] = stored.items()
    assert re.fullmatch(rb"servemesh:gateway:cache:[0-9a-f]{64}", key)
    assert set(json.loads(value)) == {
        "v", "text", "finish_reason", "prompt_tokens", "completion_tokens", "engine", "model", "mean_logprob",
    }  # fmt: skip
    assert "[EMAIL_1]" in json.loads(value)["text"]  # so the checks below look at the echoed answer
    seen = {
        "redis": b"".join([*stored, *stored.values()]).decode(),
        "logs": caplog.text + repr([r.__dict__ for r in caplog.records]),
        "notes": repr([miss.notes, hit.notes]),
        "access log fields": repr(fields),
        "client": answer + replay,
    }
    for where, text in seen.items():
        for planted in PLANTED:
            assert planted not in text, f"{planted!r} reached the {where}"
    await f.cache.close()


async def test_an_answer_holding_personal_data_is_relayed_but_not_stored() -> None:
    f = Fixture(CacheConfig(), MemoryStore(100), screen=Redactor())
    f.engine.text = "Write to jane.doe@example.com for details."  # made up by the model, not in the prompt
    assert _text(await f.ask(_req())) == "Write to jane.doe@example.com for details."
    assert len(f.store) == 0 and f.count("stores", "pii") == 1
    f.engine.text = "Write to the support desk for details."
    await f.ask(_req())
    assert len(f.store) == 1


# --- pieces ----------------------------------------------------------------------------------


def test_a_cached_answer_holds_only_the_answer_and_rejects_anything_else() -> None:
    answer = CachedAnswer("Hi ☃", FinishReason.LENGTH, Usage(3, 4), "engines/vllm", "smollm2-135m", None)
    assert CachedAnswer.decode(answer.encode()) == answer
    good = json.loads(answer.encode())
    for bad in (
        b"",
        b"[]",
        json.dumps(good | {"prompt": "x"}).encode(),
        json.dumps(good | {"v": 2}).encode(),
        json.dumps(good | {"prompt_tokens": -1}).encode(),
        json.dumps(good | {"finish_reason": "timeout"}).encode(),
        json.dumps(good | {"mean_logprob": "high"}).encode(),
    ):
        with pytest.raises(ValueError, match="corrupt cache entry"):
            CachedAnswer.decode(bad)


async def test_engine_identities_are_read_again_only_after_the_refresh_interval() -> None:
    now = [0.0]
    reads: list[int] = []
    listing: list[tuple[str, str, str]] = [("engines/vllm", "smollm2-135m", CARD)]

    async def list_engines() -> list[tuple[str, str, str]]:
        reads.append(1)
        if not listing:
            raise Unavailable("inference is down")
        return listing

    ids = EngineIdentities(list_engines, 10.0, clock=lambda: now[0])
    assert await ids("vllm") == ModelIdentity("smollm2-135m", CARD) and await ids("small") is None
    assert len(reads) == 1
    listing.clear()
    now[0] = 10.0
    assert await ids("vllm") is None and await ids("vllm") is None and len(reads) == 2  # failed: nothing known
    listing.append(("vllm", "smollm2-360m", "9" * 64))
    now[0] = 20.0
    assert await ids("vllm") == ModelIdentity("smollm2-360m", "9" * 64) and len(reads) == 3


def test_settings_limits_and_the_store_they_choose() -> None:
    with pytest.raises(ValueError, match="extra"):
        CacheConfig(ttl=5)  # type: ignore[call-arg]
    for bad in ({"ttl_s": 0}, {"max_entries": 0}, {"max_entry_bytes": 10}, {"key_prefix": "a b"}):
        with pytest.raises(ValueError):
            CacheConfig(**bad)
    assert isinstance(create_store(CacheConfig()), MemoryStore) and CacheConfig().store == "memory"
    secret = CacheConfig(redis_url="redis://:hunter2@127.0.0.1:1/0")
    assert secret.store == "redis" and "hunter2" not in repr(secret)
    assert isinstance(create_store(secret), RedisStore)
    with pytest.raises(ValueError, match="redis_url") as exc:
        create_store(CacheConfig(redis_url="http://:hunter2@127.0.0.1:1/0"))
    assert "hunter2" not in str(exc.value)

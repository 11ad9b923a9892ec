"""The response cache policy: answers to deterministic requests, kept per tenant and model.

Cacheable: the decoding parameters as the engine will get them (route-class defaults
applied) have temperature 0 or a seed; the safety policy did not refuse the request; and
the engine's model is known: its id and, unless `require_card_hash` is off, the sha256 of
its model card.

The key is the sha256 of a canonical JSON document (sorted keys, ASCII) holding:
  - the cache schema version (CACHE_SCHEMA_VERSION; bump it when key or value change meaning);
  - the tenant (principal.tenant, "" when authentication is off): tenants never share answers;
  - the engine, its model id and model-card sha256: new weights never get old answers;
  - the route class and the forwarded mesh headers (e.g. x-servemesh-canary): in the mesh they
    pick the deployment (stable or canary) behind the engine;
  - the conversation exactly as the engine gets it (after redaction and the prompt budget):
    role and content of every message in order, the raw prompt if any, context passages not
    yet folded in, and allow_trim. Content is not normalised (no whitespace or case folding):
    either changes the tokens and so the answer, and a needless miss is cheap where a wrong
    hit is not;
  - every field of `Sampling` (a field added later joins the key by itself); integers in float
    fields count as floats and -0.0 as 0.0.
Nothing of the prompt is readable in a key. The stored value (CachedAnswer) holds only the
completion text, finish reason, token usage, the engine and model that served it, and the
mean log-probability when the engine reported one.

Where it sits: after routing and the prompt budget (so the key sees the final engine and
conversation) and, best, last of all: on a hit the policies listed before it still admit the
request, but their `wrap`s never run (nothing generates), and a miss stores exactly what the
client got. A policy after it that changes the request makes the lookup void: no hit is
served and nothing is stored (counted as stores{result="changed"}).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter

from services.common.generation import Chunk, FinishReason, Sampling, Usage
from services.gateway.cache.base import CacheStore, CacheStoreError, CacheUnavailable
from services.gateway.cache.config import CacheConfig
from services.gateway.core import GatewayRequest, Policy, Served
from services.gateway.redaction import Redactor

_log = logging.getLogger(__name__)

CACHE_SCHEMA_VERSION = 1
#: how inference names engines in responses and ListEngines ("engines/vllm")
_ENGINE_PREFIX = "engines/"
#: a lookup whose wrap never came (a later policy refused the request) is dropped after
#: this long, or when this many are pending
_PENDING_MAX_AGE_S = 60.0
_PENDING_MAX = 4096

LOOKUP_RESULTS = ("hit", "miss", "bypass", "error", "unavailable")
STORE_RESULTS = ("stored", "too_large", "incomplete", "mismatch", "changed", "pii", "error", "unavailable")


class ModelIdentity(NamedTuple):
    model_id: str
    #: hex sha256 of the model card; "" when the engine does not know it
    card_sha256: str


#: engine id -> its model, or None when the engine is unknown; may be a coroutine function
IdentityProvider = Callable[
    [str], Awaitable[ModelIdentity | tuple[str, str] | None] | ModelIdentity | tuple[str, str] | None
]


class CacheMetrics:
    """Lookups and stores by result (fixed sets; see LOOKUP_RESULTS and STORE_RESULTS)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "servemesh_gateway_cache_lookups_total",
            "Response cache lookups: hit, miss, bypass (not cacheable: sampled, refused, unknown model), "
            "error and unavailable (the store failed or is cooling down; served as a miss).",
            ["result"],
            registry=registry,
        )
        self.stores = Counter(
            "servemesh_gateway_cache_stores_total",
            "Answers after a miss: stored, or why not (too_large, incomplete stream, mismatch: served by "
            "another engine or model, changed: request changed after the lookup, pii in the answer, "
            "error, unavailable).",
            ["result"],
            registry=registry,
        )
        for result in LOOKUP_RESULTS:
            self.lookups.labels(result)
        for result in STORE_RESULTS:
            self.stores.labels(result)

    def lookup(self, result: str) -> None:
        self.lookups.labels(result).inc()

    def store(self, result: str) -> None:
        self.stores.labels(result).inc()


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What the cache keeps of an answer: nothing of the prompt."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    #: the engine and model that served it, as the backend reported them
    engine: str
    model: str
    mean_logprob: float | None = None

    _FIELDS = frozenset(
        {"v", "text", "finish_reason", "prompt_tokens", "completion_tokens", "engine", "model", "mean_logprob"}
    )

    def encode(self) -> bytes:
        value = {
            "v": CACHE_SCHEMA_VERSION,
            "text": self.text,
            "finish_reason": self.finish_reason.value,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "engine": self.engine,
            "model": self.model,
            "mean_logprob": self.mean_logprob,
        }
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8", "surrogatepass"
        )

    @classmethod
    def decode(cls, raw: bytes) -> CachedAnswer:
        """Raise ValueError for anything but a value `encode` wrote with this schema version."""
        try:
            v = json.loads(raw.decode("utf-8", "surrogatepass"))
            if not isinstance(v, dict) or set(v) != cls._FIELDS or v["v"] != CACHE_SCHEMA_VERSION:
                raise ValueError("not a cached answer of this schema version")
            tokens = (v["prompt_tokens"], v["completion_tokens"])
            if not all(type(n) is int and n >= 0 for n in tokens):
                raise ValueError("bad token counts")
            if not all(isinstance(v[k], str) for k in ("text", "engine", "model")):
                raise ValueError("bad text, engine or model")
            logprob = v["mean_logprob"]
            if logprob is not None and (isinstance(logprob, bool) or not isinstance(logprob, int | float)):
                raise ValueError("bad mean_logprob")
            return cls(
                v["text"],
                FinishReason(v["finish_reason"]),
                Usage(*tokens),
                v["engine"],
                v["model"],
                None if logprob is None else float(logprob),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"corrupt cache entry: {type(exc).__name__}") from None


def cacheable(sampling: Sampling) -> bool:
    """Deterministic decoding: greedy (temperature 0) or seeded."""
    return sampling.temperature == 0 or sampling.seed is not None


def cache_key(request: GatewayRequest, identity: ModelIdentity) -> str:
    """The hex sha256 the answer to `request` on `identity`'s model is kept under."""
    return _digest(_inputs(request), identity)


def _inputs(request: GatewayRequest) -> tuple[Any, ...]:
    """Every field of the request that the key covers, comparable with ==."""
    return (
        request.principal.tenant if request.principal is not None else "",
        request.engine,
        request.route_class,
        tuple(sorted(request.forward)),
        request.prompt,
        request.messages,
        request.context,
        request.allow_trim,
        request.sampling,
    )


def _digest(inputs: tuple[Any, ...], identity: ModelIdentity) -> str:
    tenant, engine, route_class, forward, prompt, messages, context, allow_trim, sampling = inputs
    material = {
        "v": CACHE_SCHEMA_VERSION,
        "tenant": tenant,
        "engine": engine,
        "model": identity.model_id,
        "card_sha256": identity.card_sha256,
        "route_class": route_class,
        "forward": [[k, v] for k, v in forward],
        "prompt": prompt,
        "messages": [[str(m.role), m.content] for m in messages],
        "context": [[p.id, p.text, p.title] for p in context],
        "allow_trim": allow_trim,
        "sampling": _sampling(sampling),
    }
    blob = json.dumps(material, ensure_ascii=True, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def _sampling(s: Sampling) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) or (
            isinstance(value, int) and not isinstance(value, bool) and "float" in str(f.type)
        ):
            value = float(value) + 0.0  # 0 and 0.0 alike; -0.0 + 0.0 is 0.0
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


@dataclass(slots=True)
class _Lookup:
    """What admit found, for wrap (a policy instance serves every request)."""

    request: GatewayRequest  # held, so its id() cannot be reused while this is pending
    inputs: tuple[Any, ...]
    key: str
    identity: ModelIdentity
    answer: CachedAnswer | None
    at: float


class ResponseCache(Policy):
    """See the module docstring. `model_identity(engine)` names the model an engine serves
    (EngineIdentities reads it from inference's ListEngines); `redactor`, when given, keeps
    answers in which it finds personal data or secrets out of the cache (they are still
    relayed). Store failures never fail a request: they count, and the request is a miss."""

    name = "cache"

    def __init__(
        self,
        config: CacheConfig,
        store: CacheStore,
        model_identity: IdentityProvider,
        metrics: CacheMetrics,
        *,
        redactor: Redactor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._model_identity = model_identity
        self._metrics = metrics
        self._redactor = redactor
        self._clock = clock
        #: id(request) -> its lookup, oldest first
        self._pending: OrderedDict[int, _Lookup] = OrderedDict()

    async def close(self) -> None:
        await self._store.close()

    async def admit(self, request: GatewayRequest) -> None:
        self._pending.pop(id(request), None)
        self._expire_pending()
        if not self._config.enabled:
            return
        if not cacheable(request.sampling) or request.refused:
            self._bypass(request, "bypass")
            return
        try:
            identity = await self._identity(request.engine)
        except Exception as exc:  # the cache never fails a request
            _log.debug("response cache: model identity of an engine failed", extra={"error_type": type(exc).__name__})
            self._bypass(request, "error")
            return
        if identity is None or not identity.model_id or (self._config.require_card_hash and not identity.card_sha256):
            self._bypass(request, "bypass")
            return
        inputs = _inputs(request)
        key = _digest(inputs, identity)
        answer = None
        try:
            raw = await self._store.get(key)
        except CacheUnavailable:
            result = "unavailable"
        except CacheStoreError:
            result = "error"
        else:
            result = "miss" if raw is None else "hit"
            if raw is not None:
                try:
                    answer = CachedAnswer.decode(raw)
                except ValueError:
                    result = "error"
        self._metrics.lookup(result)
        request.notes["cache"] = "hit" if answer is not None else "miss"
        if answer is not None:
            request.served.engine = answer.engine or request.engine
            request.served.model = answer.model
        self._pending[id(request)] = _Lookup(request, inputs, key, identity, answer, self._clock())

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        lookup = self._pending.pop(id(request), None)
        if lookup is not None and lookup.request is not request:
            lookup = None
        if lookup is None:
            if request.notes.get("cache") == "hit":  # its lookup was dropped (see _expire_pending)
                request.notes["cache"], request.served = "bypass", Served()
            return stream
        if _inputs(request) != lookup.inputs:
            self._metrics.store("changed")
            if lookup.answer is not None:
                request.served = Served()
            request.notes["cache"] = "bypass"
            return stream
        if lookup.answer is not None:
            return _replay(lookup.answer)  # the backend's stream is never started
        return self._relay(request, lookup, stream)

    def _bypass(self, request: GatewayRequest, result: str) -> None:
        self._metrics.lookup(result)
        request.notes["cache"] = "bypass"

    async def _identity(self, engine: str) -> ModelIdentity | None:
        found = self._model_identity(engine)
        if inspect.isawaitable(found):
            found = await found
        if found is None:
            return None
        model_id, card_sha256 = found
        return ModelIdentity(model_id, card_sha256)

    def _expire_pending(self) -> None:
        now = self._clock()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if len(self._pending) < _PENDING_MAX and now - oldest.at < _PENDING_MAX_AGE_S:
                break
            self._pending.popitem(last=False)

    async def _relay(
        self, request: GatewayRequest, lookup: _Lookup, stream: AsyncIterator[Chunk]
    ) -> AsyncIterator[Chunk]:
        """Every chunk goes on at once; the text is kept on the side, up to the entry limit."""
        limit = self._config.max_entry_bytes
        parts: list[str] = []
        chars = 0
        last: Chunk | None = None
        ended = False
        try:
            async for chunk in stream:
                last = chunk
                if chars <= limit:  # past it the answer cannot fit (a character is at least a byte)
                    chars += len(chunk.text)
                    parts.append(chunk.text)
                yield chunk
            ended = True
        finally:
            if not ended:  # failed, cancelled or closed early: never stored
                self._metrics.store("incomplete")
        await self._keep(request, lookup, parts, chars, last)

    async def _keep(
        self, request: GatewayRequest, lookup: _Lookup, parts: list[str], chars: int, last: Chunk | None
    ) -> None:
        if last is None or last.finish_reason is None or last.usage is None:
            self._metrics.store("incomplete")
            return
        if chars > self._config.max_entry_bytes:
            self._metrics.store("too_large")
            return
        served_engine = request.served.engine
        if (served_engine and served_engine.removeprefix(_ENGINE_PREFIX) != request.engine) or (
            request.served.model and request.served.model != lookup.identity.model_id
        ):
            self._metrics.store("mismatch")
            return
        text = "".join(parts)
        if self._redactor is not None and self._redactor.find(text):
            self._metrics.store("pii")
            return
        raw = CachedAnswer(
            text,
            last.finish_reason,
            last.usage,
            served_engine or request.engine,
            request.served.model or lookup.identity.model_id,
            last.mean_logprob,
        ).encode()
        if len(raw) > self._config.max_entry_bytes:
            self._metrics.store("too_large")
            return
        try:
            await self._store.set(lookup.key, raw, self._config.ttl_s)
        except CacheUnavailable:
            self._metrics.store("unavailable")
        except CacheStoreError:
            self._metrics.store("error")
        else:
            self._metrics.store("stored")


async def _replay(answer: CachedAnswer) -> AsyncIterator[Chunk]:
    yield Chunk(answer.text, answer.finish_reason, answer.usage, mean_logprob=answer.mean_logprob)


class EngineIdentities:
    """An IdentityProvider over the inference service's engines: `list_engines()` gives
    (name, model id, model-card sha256) triples (name as "engines/{id}" or the bare id),
    read again at most every `refresh_s` seconds, by one caller at a time. When the read
    fails no engine is known (nothing is cached) until the next one."""

    def __init__(
        self,
        list_engines: Callable[[], Awaitable[Iterable[tuple[str, str, str]]]],
        refresh_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._list = list_engines
        self._refresh_s = refresh_s
        self._clock = clock
        self._known: dict[str, ModelIdentity] = {}
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def __call__(self, engine: str) -> ModelIdentity | None:
        if self._stale():
            async with self._lock:
                if self._stale():
                    await self._refresh()
        return self._known.get(engine)

    def _stale(self) -> bool:
        return self._read_at is None or self._clock() - self._read_at >= self._refresh_s

    async def _refresh(self) -> None:
        self._read_at = self._clock()
        try:
            engines = await self._list()
            self._known = {
                name.removeprefix(_ENGINE_PREFIX): ModelIdentity(model, card) for name, model, card in engines
            }
        except Exception as exc:  # no identity means no caching, never a failed request
            self._known = {}
            _log.warning(
                "response cache: could not list the engines; nothing is cached for %.0f s", self._refresh_s,
                extra={"error_type": type(exc).__name__},
            )  # fmt: skip

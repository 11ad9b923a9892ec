"""The gateway's request pipeline.

A request passes an ordered list of policies, then goes to the backend (the inference
service). Each policy may look at and change the request before dispatch (`admit`)
and may wrap the resulting chunk stream (`wrap`), which is where authentication,
quotas, redaction, budgets, rule routing, fallback and the response cache plug in
without reshaping the pipeline. The stream is relayed chunk by chunk, never buffered.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter

from services.common import context
from services.common.errors import FieldViolation, ServiceError
from services.common.generation import (
    MAX_PROMPT_CHARS,
    Chunk,
    FinishReason,
    GenerationRequest,
    Message,
    Role,
    Sampling,
    Usage,
    prompt_text,
    validate_input,
)
from services.gateway.budget import Passage, PromptBudget, Trimmed, compose
from services.gateway.redaction import Redaction, Redactor

if TYPE_CHECKING:  # settings import the policies' own config models: no runtime cycle
    from services.gateway.rag import RagContext, RagQuery
    from services.gateway.routing import RoutingHints
    from services.gateway.settings import RouteClassConfig


@dataclass(slots=True)
class Served:
    """Where a stream is being served; filled in by the backend when it starts."""

    engine: str = ""
    model: str = ""
    #: milliseconds from the inference service asking the engine to its first text
    engine_ttft_ms: str = ""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the authentication policy established it from the API key
    (never from a header the caller sets)."""

    tenant: str
    #: the key's public id (never the secret)
    key_id: str
    #: free, paid or enterprise
    tier: str
    #: route classes the key may use; empty = every class
    route_classes: frozenset[str] = frozenset()


@dataclass(slots=True)
class GatewayRequest:
    """A request on its way through the pipeline; policies may change it."""

    request_id: str
    route_class: str
    prompt: str | None
    messages: tuple[Message, ...]
    sampling: Sampling
    #: engine id chosen by routing; "" until a routing policy sets it
    engine: str = ""
    #: engines to try, in order, when `engine` fails before its first token
    fallbacks: tuple[str, ...] = ()
    #: the request came as `prompt`, now messages[0]: errors about it must name "prompt"
    from_prompt: bool = False
    #: retrieved passages, best first; the budget policy folds them into `messages`
    context: tuple[Passage, ...] = ()
    #: trim an over-long prompt instead of refusing it
    allow_trim: bool = False
    #: what the budget policy trimmed, if anything
    trimmed: Trimmed | None = None
    #: request headers relayed downstream (mesh routing overrides), lower-case names
    forward: tuple[tuple[str, str], ...] = ()
    #: the bearer token the caller presented ("" = none); only the auth policy reads it
    credentials: str = field(default="", repr=False)
    #: the caller's address as the edge saw it (x-forwarded-for from Envoy, else the peer)
    client_address: str = ""
    #: set by the authentication policy
    principal: Principal | None = None
    #: what the caller says about the request, for rule routing (None = nothing)
    hints: RoutingHints | None = None
    #: free-form notes of the policies (e.g. what was trimmed), for logs and responses
    notes: dict[str, str] = field(default_factory=dict)
    served: Served = field(default_factory=Served)
    #: a StreamRagAnswer request: what to retrieve (the retrieve policy fills `context`)
    rag: RagQuery | None = None
    #: what the retrieve policy found
    rag_context: RagContext | None = None
    #: time.perf_counter() when the gateway received the request
    received_at: float = field(default_factory=time.perf_counter)

    @property
    def refused(self) -> bool:
        """The safety policy answers this request with its refusal: no engine is asked, so
        nothing engine-bound (token counting, caching) applies to it."""
        return "refused" in self.notes

    def generation(self) -> GenerationRequest:
        return GenerationRequest(self.request_id, self.prompt, self.messages, self.sampling)


class Policy(abc.ABC):
    """One step of the pipeline."""

    name: str

    async def admit(self, request: GatewayRequest) -> None:  # noqa: B027 - optional hook
        """Inspect or change the request before dispatch; raise a ServiceError to refuse it."""

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Wrap the response stream (count tokens, redact, cache...); identity by default."""
        return stream

    async def abandon(self, request: GatewayRequest) -> None:  # noqa: B027 - optional hook
        """A later policy refused the request after this one admitted it: undo what `admit`
        took (a concurrency slot...), since `wrap` will not run."""


class Backend(Protocol):
    def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        """Generate on request.engine; set request.served once known. Closing aborts."""
        ...


class ValidateInput(Policy):
    """Structural limits on every field; INVALID_ARGUMENT names the field and the limit.
    A valid `prompt` then becomes the one user message it stands for, so every later
    policy and the engine see a conversation."""

    name = "validate"

    def __init__(self, route_classes: Mapping[str, RouteClassConfig]) -> None:
        self._classes = route_classes

    async def admit(self, request: GatewayRequest) -> None:
        unknown = []
        if request.route_class and request.route_class not in self._classes:
            unknown.append(
                FieldViolation(
                    "route_class", f"{request.route_class!r} is not a route class; use one of {sorted(self._classes)}"
                )
            )
        unknown += _passage_violations(request.context)
        roles = [(m.role if isinstance(m.role, Role) else None, m.content) for m in request.messages]
        validate_input(request.prompt, roles, request.sampling, sampling_field="params", extra=unknown)
        if request.prompt is not None:
            request.messages, request.prompt = (Message(Role.USER, request.prompt),), None
            request.from_prompt = True


MAX_PASSAGES = 64
MAX_PASSAGE_ID_CHARS = 256
MAX_PASSAGE_TITLE_CHARS = 512


def _passage_violations(passages: Sequence[Passage]) -> list[FieldViolation]:
    if len(passages) > MAX_PASSAGES:
        return [FieldViolation("context", f"{len(passages)} passages; at most {MAX_PASSAGES}")]
    bad = []
    for i, p in enumerate(passages):
        if not 1 <= len(p.id) <= MAX_PASSAGE_ID_CHARS:
            bad.append(FieldViolation(f"context[{i}].id", f"must be 1 to {MAX_PASSAGE_ID_CHARS} characters"))
        if not 1 <= len(p.text) <= MAX_PROMPT_CHARS:
            bad.append(FieldViolation(f"context[{i}].text", f"must be 1 to {MAX_PROMPT_CHARS} characters"))
        if len(p.title) > MAX_PASSAGE_TITLE_CHARS:
            bad.append(FieldViolation(f"context[{i}].title", f"at most {MAX_PASSAGE_TITLE_CHARS} characters"))
    return bad


class Redact(Policy):
    """Personal data and secrets in the conversation become typed placeholders ([EMAIL_1], ...)
    before any engine, log or cache sees them; counts by type go to `record`."""

    name = "redact"

    def __init__(self, redactor: Redactor, record: Callable[[Mapping[str, int]], None]) -> None:
        self._redactor = redactor
        self._record = record

    async def admit(self, request: GatewayRequest) -> None:
        redaction = Redaction(self._redactor)
        request.messages = tuple(Message(m.role, redaction(m.content)) for m in request.messages)
        request.context = tuple(
            Passage(p.id, redaction(p.text), redaction(p.title) if p.title else "") for p in request.context
        )
        if redaction.counts:
            request.notes["redacted"] = ",".join(f"{t.value}={n}" for t, n in sorted(redaction.counts.items()))
            self._record({t.value: n for t, n in redaction.counts.items()})


class RedactOutput(Policy):
    """PII the model writes becomes typed placeholders too (off by default). Text is held back
    until HOLD characters follow it, so a value split over chunks is still caught whole: the
    values this redactor finds (emails, cards, IBANs, phones, ids, IPs) fit in that window,
    except an email or secret longer than it. The first text reaches the client that much
    later; the rest is flushed with the final chunk."""

    name = "redact_output"
    HOLD = 64

    def __init__(self, redactor: Redactor, record: Callable[[Mapping[str, int]], None]) -> None:
        self._redactor = redactor
        self._record = record

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        async def redacted() -> AsyncIterator[Chunk]:
            redaction, held = Redaction(self._redactor), ""
            try:
                async for chunk in stream:
                    held += chunk.text
                    if chunk.finish_reason is not None:
                        yield dataclasses.replace(chunk, text=redaction(held))
                        held = ""
                        continue
                    cut = len(held) - self.HOLD
                    for span in self._redactor.find(held) if cut > 0 else ():
                        if span.start < cut < span.end:  # never split a value
                            cut = span.start
                            break
                    if cut > 0:
                        out, held = held[:cut], held[cut:]
                        yield dataclasses.replace(chunk, text=redaction(out))
            finally:
                if redaction.counts:
                    self._record({t.value: n for t, n in redaction.counts.items()})

        return redacted()


class Safety(Policy):
    """A request whose user turns match a refusal rule gets the fixed refusal string, and no
    engine sees it. Rules are (topic, pattern) pairs, checked in order; refusals are
    counted by topic through `record`."""

    name = "safety"
    ENGINE = "safety"

    def __init__(self, rules: Sequence[tuple[str, re.Pattern[str]]], refusal: str, record: Callable[[str], None]):
        self._rules = list(rules)
        self._refusal = refusal
        self._record = record

    async def admit(self, request: GatewayRequest) -> None:
        text = "\n".join(m.content for m in request.messages if m.role is Role.USER)
        for topic, pattern in self._rules:
            if pattern.search(text):
                request.notes["refused"] = topic
                request.engine = self.ENGINE  # routing keeps a chosen engine; metrics label it
                self._record(topic)
                return

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        if not request.refused:
            return stream

        async def refuse() -> AsyncIterator[Chunk]:  # the backend's stream is never started
            request.served.engine = self.ENGINE
            yield Chunk(self._refusal, FinishReason.STOP, Usage(0, 0))

        return refuse()


class RouteClassDefaults(Policy):
    """Resolve the route class and apply its decoding defaults and max_tokens limit."""

    name = "route_class"

    def __init__(self, route_classes: Mapping[str, RouteClassConfig], default_class: str) -> None:
        self._classes = route_classes
        self._default = default_class

    async def admit(self, request: GatewayRequest) -> None:
        request.route_class = request.route_class or self._default
        cfg = self._classes[request.route_class]
        s, d = request.sampling, cfg.decoding
        max_tokens = min(s.max_tokens or cfg.default_max_tokens, cfg.max_tokens_limit)
        if s.max_tokens is not None and s.max_tokens > cfg.max_tokens_limit:
            request.notes["max_tokens"] = f"clamped from {s.max_tokens} to {cfg.max_tokens_limit}"
        request.sampling = dataclasses.replace(
            s,
            temperature=d.temperature if s.temperature is None else s.temperature,
            top_p=d.top_p if s.top_p is None else s.top_p,
            repetition_penalty=d.repetition_penalty if s.repetition_penalty is None else s.repetition_penalty,
            stop=s.stop or d.stop,
            max_tokens=max_tokens,
        )


class StaticRouting(Policy):
    """The engine configured for the route class (rule routing and fallback come later)."""

    name = "routing"

    def __init__(self, route_classes: Mapping[str, RouteClassConfig]) -> None:
        self._classes = route_classes

    async def admit(self, request: GatewayRequest) -> None:
        if not request.engine:
            request.engine = self._classes[request.route_class].engine


class Budget(Policy):
    """The route class's prompt budget (see services.gateway.budget for the rule), then the
    context passages folded into the conversation the engine gets. Needs the engine chosen."""

    name = "budget"

    def __init__(self, route_classes: Mapping[str, RouteClassConfig], budget: PromptBudget) -> None:
        self._classes = route_classes
        self._budget = budget

    async def admit(self, request: GatewayRequest) -> None:
        limit = self._classes[request.route_class].max_prompt_tokens
        if limit is not None and not request.refused:  # a refusal is counted on no engine
            request.messages, request.context, request.trimmed = await self._budget.fit(
                (request.engine, *request.fallbacks),
                limit,
                request.messages,
                request.context,
                request.allow_trim,
                field="prompt" if request.from_prompt else "messages",
            )
        request.messages, request.context = compose(request.messages, request.context), ()
        if request.trimmed is not None:
            t = request.trimmed
            request.notes["trimmed"] = f"messages={t.messages_removed},passages={len(t.passage_ids_removed)}"


class GenerationRecorder(Protocol):
    def first_token(self, route_class: str, engine: str, seconds: float) -> None: ...

    def finished(self, route_class: str, engine: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class MeasureGeneration(Policy):
    """Time to first token and token counts per route class and engine (the SLO inputs)."""

    name = "measure"

    def __init__(self, recorder: GenerationRecorder) -> None:
        self._recorder = recorder

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        async def measured() -> AsyncIterator[Chunk]:
            first = True
            async for chunk in stream:
                if first and chunk.text:
                    first = False
                    elapsed = time.perf_counter() - request.received_at
                    self._recorder.first_token(request.route_class, request.engine, elapsed)
                if chunk.usage is not None:
                    self._recorder.finished(
                        request.route_class, request.engine, chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                    )
                yield chunk

        return measured()


class DecisionRecorder(Protocol):
    def refused(self, policy: str, code: str) -> None: ...

    def trimmed(self, route_class: str) -> None: ...


class OutcomeRecorder(Protocol):
    def finished(self, route_class: str, code: str) -> None: ...


class RequestMetrics:
    """Generation requests by route class and the status code the caller got: what the
    per-route-class error and timeout SLOs are computed from (the server's request counter
    has no route class). Both labels are bounded: a route class this gateway does not have
    (the request was refused for naming it) counts as "unknown"; codes are gRPC code names."""

    UNKNOWN_CLASS = "unknown"
    #: series created at 0 for every route class, so rate() and increase() see the first one
    INITIAL_CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")

    def __init__(self, registry: CollectorRegistry, route_classes: Collection[str], default_class: str) -> None:
        self._classes = frozenset(route_classes)
        self._default = default_class
        self.requests = Counter(
            "servemesh_gateway_requests_total",
            "Generation requests finished (gRPC and the HTTP API), by route class and final gRPC status code.",
            ["route_class", "code"],
            registry=registry,
        )
        for route_class in sorted(self._classes):
            for code in self.INITIAL_CODES:
                self.requests.labels(route_class, code)

    def finished(self, route_class: str, code: str) -> None:
        name = route_class or self._default  # unset: the default class (before it was resolved)
        self.requests.labels(name if name in self._classes else self.UNKNOWN_CLASS, code).inc()


#: a call cancelled this close to its deadline timed out: the caller's own deadline runs out
#: a little before the server's (the server counts from receiving the call), so its cancel
#: usually arrives first
DEADLINE_GRACE_S = 0.25


def outcome_code(exc: BaseException | None, *, answered: bool = False) -> str:
    """The gRPC code name a request ending with `exc` (None: normally) gets, as the server
    interceptor maps it. A stream stopped by its consumer after the final chunk was relayed
    (`answered`) is OK; before it, DEADLINE_EXCEEDED if the request's deadline has passed or
    was at most DEADLINE_GRACE_S away, else CANCELLED."""
    if exc is None:
        return "OK"
    if isinstance(exc, ServiceError):
        return exc.code.value
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        if answered:
            return "OK"
        limit = context.deadline()
        timed_out = limit is not None and time.monotonic() >= limit - DEADLINE_GRACE_S
        return "DEADLINE_EXCEEDED" if timed_out else "CANCELLED"
    return "INTERNAL" if isinstance(exc, Exception) else "UNKNOWN"


class Pipeline:
    """`decisions` counts which policy refused a request (and with what code) and trims;
    `outcomes` counts every request by route class and final code, where it finishes."""

    def __init__(
        self,
        policies: Sequence[Policy],
        backend: Backend,
        decisions: DecisionRecorder | None = None,
        outcomes: OutcomeRecorder | None = None,
    ) -> None:
        self._policies = list(policies)
        self._backend = backend
        self._decisions = decisions
        self._outcomes = outcomes

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        """Admit through every policy, then relay the backend's chunks through their wraps.

        The request's access-log line gets: tenant, route, engine, prompt_len (characters),
        prompt_sha256, max_tokens, queue_ms (admission), exec_ms (dispatch to end),
        tokens_generated, cache, ok; the server adds request_id, code and error."""
        ok, generated = False, 0
        admitted: list[Policy] = []
        try:
            for policy in self._policies:
                await policy.admit(request)
                admitted.append(policy)
        except BaseException as exc:
            for policy in reversed(admitted):
                await policy.abandon(request)
            if self._decisions is not None and isinstance(exc, ServiceError):
                self._decisions.refused(self._policies[len(admitted)].name, exc.code.value)
            self._finished(request, exc)
            _log_outcome(request, ok=False)
            raise
        if self._decisions is not None and request.trimmed is not None:
            self._decisions.trimmed(request.route_class)
        prompt = prompt_text(request.prompt, request.messages)
        dispatched = time.perf_counter()
        context.annotate(
            engine=request.engine,
            prompt_len=len(prompt),
            prompt_sha256=context.prompt_hash(prompt),
            max_tokens=request.sampling.max_tokens,
            queue_ms=round((dispatched - request.received_at) * 1000, 3),
        )
        layers = [self._backend.stream(request)]
        for policy in self._policies:
            layers.append(policy.wrap(request, layers[-1]))
        failure: BaseException | None = None
        try:
            async for chunk in layers[-1]:
                if chunk.usage is not None:
                    generated = chunk.usage.completion_tokens
                    context.annotate(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=generated)
                    ok = chunk.finish_reason is not None
                elif chunk.text:
                    generated += 1
                yield chunk
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._finished(request, failure, answered=ok)
            # Close every layer now, outermost first: a wrap that stops iterating does not
            # close the stream it wraps, and the backend's close is what aborts the engine.
            try:
                for layer in reversed(layers):
                    await layer.aclose()  # type: ignore[attr-defined]
            finally:
                context.annotate(exec_ms=round((time.perf_counter() - dispatched) * 1000, 3))
                _log_outcome(request, ok=ok, tokens_generated=generated)

    def _finished(self, request: GatewayRequest, exc: BaseException | None, *, answered: bool = False) -> None:
        if self._outcomes is not None:
            self._outcomes.finished(request.route_class, outcome_code(exc, answered=answered))


def _log_outcome(request: GatewayRequest, *, ok: bool, tokens_generated: int = 0) -> None:
    context.annotate(
        tenant=request.principal.tenant if request.principal else "",
        route=request.route_class,
        engine=request.served.engine or request.engine,
        tokens_generated=tokens_generated,
        cache=request.notes.get("cache", "off"),
        ok=ok,
    )


def default_policies(
    route_classes: Mapping[str, RouteClassConfig],
    default_class: str,
    recorder: GenerationRecorder,
    redactor: Redactor | None = None,
    record_redactions: Callable[[Mapping[str, int]], None] = lambda _counts: None,
    safety: Safety | None = None,
    budget: PromptBudget | None = None,
    *,
    authenticate: Policy | None = None,
    limits: Policy | None = None,
    routing: Policy | None = None,
    cache: Policy | None = None,
    redact_output: bool = False,
    retrieve: Policy | None = None,
) -> list[Policy]:
    """The pipeline in order. None turns a step off: `authenticate` (every caller is
    anonymous), `limits`, `redactor` (PII redaction), `safety` (refusals), `budget` (prompt
    budgets; context passages are still composed), `cache`; `routing` None routes each
    route class to its configured engine. `redact_output` redacts what engines write too.
    `retrieve` fills RAG requests' context (after safety, before the budget trims it)."""
    optional = [
        authenticate,
        limits,
        Redact(redactor, record_redactions) if redactor is not None else None,
        safety,
        retrieve,
    ]
    return [
        ValidateInput(route_classes),
        *[p for p in optional if p is not None],
        RouteClassDefaults(route_classes, default_class),
        routing or StaticRouting(route_classes),
        Budget(route_classes, budget or PromptBudget(_uncounted)),
        *([RedactOutput(redactor, record_redactions)] if redact_output and redactor is not None else []),
        MeasureGeneration(recorder),
        # last: a hit skips every wrap inside it (engine TTFT metrics stay engine-only), and
        # a miss stores exactly what the client received
        *([cache] if cache is not None else []),
    ]


async def _uncounted(engine: str, messages: Sequence[Message]) -> int:
    return 0

"""The gateway pipeline and its policies, each on its own (no servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from services.common import context
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.generation import Chunk, FinishReason, Message, Role, Sampling, Usage
from services.common.metrics import PolicyMetrics
from services.gateway.budget import PromptBudget
from services.gateway.core import (
    GatewayRequest,
    Pipeline,
    Policy,
    RequestMetrics,
    RouteClassDefaults,
    Safety,
    StaticRouting,
    ValidateInput,
    default_policies,
)
from services.gateway.redaction import Redactor
from services.gateway.settings import DecodingDefaults, GatewaySettings, RouteClassConfig, SafetyConfig

CLASSES = {
    "chat_short": RouteClassConfig(
        engine="vllm",
        default_max_tokens=128,
        max_tokens_limit=256,
        decoding=DecodingDefaults(temperature=0.7, stop=("###",)),
    ),
    "code": RouteClassConfig(engine="small", default_max_tokens=64, max_tokens_limit=512),
}


def _req(**kw) -> GatewayRequest:
    base = dict(request_id="r", route_class="", prompt="hi", messages=(), sampling=Sampling())
    return GatewayRequest(**(base | kw))


async def test_route_class_defaults_fill_unset_params_and_clamp_max_tokens() -> None:
    policy = RouteClassDefaults(CLASSES, "chat_short")
    req = _req(sampling=Sampling(max_tokens=1000, top_p=0.5))
    await policy.admit(req)
    assert req.route_class == "chat_short"
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop) == (256, 0.7, 0.5, ("###",))
    assert req.notes["max_tokens"] == "clamped from 1000 to 256"
    explicit = _req(route_class="code", sampling=Sampling(temperature=0.0))
    await policy.admit(explicit)
    assert (explicit.sampling.max_tokens, explicit.sampling.temperature) == (64, 0.0)  # 0 is kept, not defaulted


async def test_static_routing_uses_the_class_engine_unless_one_is_chosen() -> None:
    routing = StaticRouting(CLASSES)
    req = _req(route_class="code")
    await routing.admit(req)
    assert req.engine == "small"
    chosen = _req(route_class="code", engine="vllm")
    await routing.admit(chosen)
    assert chosen.engine == "vllm"


async def test_validate_names_unknown_route_class_and_bad_fields() -> None:
    with pytest.raises(InvalidArgument) as exc:
        await ValidateInput(CLASSES).admit(
            _req(
                route_class="rag_huge",
                prompt=None,
                messages=(Message(None, "x"),),  # type: ignore[arg-type]
                sampling=Sampling(temperature=-1),
            )
        )
    fields = {v.field for v in exc.value.violations}
    assert fields == {"route_class", "messages[0].role", "params.temperature"}


class _Recorder(Policy):
    name = "recorder"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def admit(self, request: GatewayRequest) -> None:
        self.log.append(f"admit:{request.engine or '-'}")

    def wrap(self, request: GatewayRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        async def wrapped() -> AsyncIterator[Chunk]:
            async for chunk in stream:
                self.log.append(f"chunk:{chunk.text}")
                yield chunk

        return wrapped()


class _Backend:
    def __init__(self) -> None:
        self.closed = False
        self.engine = ""

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        self.engine = request.engine
        self.messages = request.messages
        try:
            for text in ("a", "b", "c"):
                yield Chunk(text)
            yield Chunk("", FinishReason.STOP, Usage(3, 3))
        finally:
            self.closed = True


async def test_pipeline_admits_in_order_relays_each_chunk_and_closes_the_backend_early() -> None:
    log: list[str] = []
    backend = _Backend()
    pipeline = Pipeline(
        [ValidateInput(CLASSES), RouteClassDefaults(CLASSES, "chat_short"), StaticRouting(CLASSES), _Recorder(log)],
        backend,
    )
    out = [c.text async for c in pipeline.stream(_req())]
    assert out == ["a", "b", "c", ""] and backend.engine == "vllm"
    assert log == ["admit:vllm", "chunk:a", "chunk:b", "chunk:c", "chunk:"]
    # a consumer that stops early closes the backend stream (which aborts the engine work)
    # at once, through any wrapping policy, not whenever the garbage collector gets to it
    backend2 = _Backend()
    stream = Pipeline([StaticRouting(CLASSES), _Recorder([])], backend2).stream(_req(route_class="code"))
    assert (await anext(stream)).text == "a"
    await stream.aclose()
    assert backend2.closed


def test_settings_reject_inconsistent_route_classes() -> None:
    with pytest.raises(ValueError, match=r"default_max_tokens \(300\) must be <= max_tokens_limit \(200\)"):
        RouteClassConfig(engine="vllm", default_max_tokens=300, max_tokens_limit=200)
    with pytest.raises(ValueError, match="default_route_class"):
        GatewaySettings(route_classes=CLASSES, default_route_class="nope")
    assert Message(Role.USER, "x").role is Role.USER


async def test_a_prompt_becomes_one_user_message_after_validation() -> None:
    req = _req(prompt="What is a mesh?")
    await ValidateInput(CLASSES).admit(req)
    assert (req.prompt, req.messages) == (None, (Message(Role.USER, "What is a mesh?"),))


class _NoMetrics:
    def first_token(self, route_class: str, engine: str, seconds: float) -> None:
        pass

    def finished(self, route_class: str, engine: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass


async def test_the_engine_sees_placeholders_never_the_pii() -> None:
    counted: list[dict[str, int]] = []
    backend = _Backend()
    policies = default_policies(CLASSES, "chat_short", _NoMetrics(), Redactor(), counted.append)
    req = _req(
        prompt=None,
        messages=(
            Message(Role.SYSTEM, "Support desk."),
            Message(Role.USER, "I am jane@example.com, card 4111 1111 1111 1111, mail jane@example.com back"),
        ),
    )
    out = [c.text async for c in Pipeline(policies, backend).stream(req)]
    assert out[-1] == ""
    sent = " ".join(m.content for m in backend.messages)
    assert "jane@example.com" not in sent and "4111" not in sent
    assert backend.messages[1].content == "I am [EMAIL_1], card [CARD_1], mail [EMAIL_1] back"
    assert counted == [{"EMAIL": 2, "CARD": 1}] and req.notes["redacted"] == "CARD=1,EMAIL=2"


async def test_redaction_can_be_turned_off() -> None:
    backend = _Backend()
    policies = default_policies(CLASSES, "chat_short", _NoMetrics(), None)
    [c async for c in Pipeline(policies, backend).stream(_req(prompt="write to jane@example.com"))]
    assert backend.messages[0].content == "write to jane@example.com"


def _safety(record: list[str]) -> Safety:
    return Safety(SafetyConfig().rules(), "REFUSED.", record.append)


async def test_a_refused_request_gets_the_refusal_string_and_never_reaches_an_engine() -> None:
    refused: list[str] = []
    backend = _Backend()
    policies = default_policies(CLASSES, "chat_short", _NoMetrics(), None, safety=_safety(refused))
    req = _req(prompt="Explain how to build a pipe bomb at home")
    out = [c async for c in Pipeline(policies, backend).stream(req)]
    assert [c.text for c in out] == ["REFUSED."] and out[-1].finish_reason is FinishReason.STOP
    assert not hasattr(backend, "messages") and not backend.closed  # the backend stream never started
    assert refused == ["weapons"] and req.served.engine == "safety" and req.engine == "safety"
    # an ordinary request passes untouched, and only user turns are matched
    allowed = _req(prompt=None, messages=(Message(Role.SYSTEM, "never help build a bomb"), Message(Role.USER, "hi")))
    assert [c.text async for c in Pipeline(policies, backend).stream(allowed)] == ["a", "b", "c", ""]
    assert refused == ["weapons"]


def test_safety_settings_name_a_pattern_that_does_not_compile() -> None:
    with pytest.raises(ValueError, match=r"topics\.fraud\[1\]: not a regular expression"):
        SafetyConfig(topics={"fraud": ("ok", "(unclosed")})


class _Says:
    """A backend whose answer comes in the given pieces."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        for p in self.pieces:
            yield Chunk(p)
        yield Chunk("", FinishReason.STOP, Usage(1, len(self.pieces)))


async def test_output_redaction_catches_values_split_over_chunks_and_keeps_streaming() -> None:
    counted: list[dict[str, int]] = []
    filler = "The support team can be reached any day of the week, " * 3
    pieces = [filler, "write to ja", "ne@exam", "ple.com or call card 4111 11", "11 1111 1111 today.", " Bye."]
    policies = default_policies(CLASSES, "chat_short", _NoMetrics(), Redactor(), counted.append, redact_output=True)
    out = [c async for c in Pipeline(policies, _Says(pieces)).stream(_req(prompt="contact?"))]
    text = "".join(c.text for c in out)
    assert text == filler + "write to [EMAIL_1] or call card [CARD_1] today. Bye."
    assert len([c for c in out if c.text]) >= 2  # still streamed, not one buffered answer
    assert out[-1].finish_reason is FinishReason.STOP and counted[-1] == {"EMAIL": 1, "CARD": 1}
    plain = default_policies(CLASSES, "chat_short", _NoMetrics(), Redactor())  # outputs off by default
    out = [c async for c in Pipeline(plain, _Says(pieces)).stream(_req(prompt="contact?"))]
    assert "jane@example.com" in "".join(c.text for c in out)


async def test_refusals_are_counted_by_the_policy_that_refused_and_its_code() -> None:
    registry = CollectorRegistry()
    pipeline = Pipeline(
        default_policies(CLASSES, "chat_short", _NoMetrics(), None), _Backend(), PolicyMetrics(registry)
    )
    with pytest.raises(InvalidArgument):
        [c async for c in pipeline.stream(_req(route_class="nope"))]
    [c async for c in pipeline.stream(_req())]
    value = registry.get_sample_value(
        "servemesh_gateway_policy_refusals_total", {"policy": "validate", "code": "INVALID_ARGUMENT"}
    )
    assert value == 1.0


async def test_a_refused_request_is_not_counted_on_an_engine_that_does_not_exist() -> None:
    """With prompt budgets on, a refusal used to be token-counted on engine "safety" and came
    back NOT_FOUND instead of the refusal."""

    async def count(engine: str, messages) -> int:
        if engine != "vllm":
            raise NotFound(f"engine {engine!r} does not exist")
        return 10

    classes = {"chat_short": RouteClassConfig(engine="vllm", max_prompt_tokens=100)}
    policies = default_policies(
        classes, "chat_short", _NoMetrics(), None, safety=_safety([]), budget=PromptBudget(count)
    )
    req = _req(prompt="Explain how to build a pipe bomb at home")
    assert [c.text async for c in Pipeline(policies, _Backend()).stream(req)] == ["REFUSED."]


class _Fails:
    """A backend that raises `exc` before its first chunk (after `wait` seconds)."""

    def __init__(self, exc: BaseException | None, wait: float = 0.0) -> None:
        self.exc, self.wait = exc, wait

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        await asyncio.sleep(self.wait)
        if self.exc is not None:
            raise self.exc
        yield Chunk("", FinishReason.STOP, Usage(1, 0))


async def _consume(pipeline: Pipeline, req: GatewayRequest, deadline: float | None = None) -> None:
    """Run one request the way the server does: in its own task, with its deadline bound."""

    async def run() -> None:
        context.bind("r", deadline)
        [c async for c in pipeline.stream(req)]

    await asyncio.create_task(run())


async def test_requests_are_counted_by_route_class_and_the_final_code() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, CLASSES, "chat_short")

    def pipeline(backend) -> Pipeline:
        return Pipeline(default_policies(CLASSES, "chat_short", _NoMetrics(), None), backend, None, metrics)

    def count(route_class: str, code: str) -> float | None:
        return registry.get_sample_value("servemesh_gateway_requests_total", {"route_class": route_class, "code": code})

    # every class's bad codes exist from the start at 0, so the first one is seen by increase()
    assert count("code", "DEADLINE_EXCEEDED") == 0.0 and count("chat_short", "INTERNAL") == 0.0
    await _consume(pipeline(_Backend()), _req())  # no class: the default one
    await _consume(pipeline(_Backend()), _req(route_class="code"))
    await _consume(pipeline(_Backend()), _req(route_class="code"))
    with pytest.raises(Unavailable):
        await _consume(pipeline(_Fails(Unavailable("engine down"))), _req(route_class="code"))
    with pytest.raises(RuntimeError):
        await _consume(pipeline(_Fails(RuntimeError("bug"))), _req(route_class="code"))
    with pytest.raises(InvalidArgument):  # a made-up class is refused and never becomes a label
        await _consume(pipeline(_Backend()), _req(route_class="made_up"))
    # cancelled while the engine works: when the deadline has passed, or nearly (the caller's
    # own deadline comes first, so its cancel can beat the server's), it timed out
    for deadline in (-1.0, 0.1, 60.0):
        task = asyncio.create_task(
            _consume(pipeline(_Fails(None, wait=30)), _req(route_class="code"), deadline=time.monotonic() + deadline)
        )
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (count("chat_short", "OK"), count("code", "OK")) == (1.0, 2.0)
    assert (count("code", "UNAVAILABLE"), count("code", "INTERNAL"), count("code", "DEADLINE_EXCEEDED")) == (1, 1, 2)
    assert count("code", "CANCELLED") == 1
    assert count("unknown", "INVALID_ARGUMENT") == 1.0 and count("made_up", "INVALID_ARGUMENT") is None

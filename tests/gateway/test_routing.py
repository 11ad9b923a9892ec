"""Rule routing, engine health and the circuit breaker, fallback, partial-output errors and
escalation (services.gateway.routing), on a scripted in-test backend and a fake clock."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.common import context
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.generation import Chunk, FinishReason, Sampling, Usage
from services.gateway.core import GatewayRequest, Pipeline, Principal, RouteClassDefaults, ValidateInput
from services.gateway.routing import (
    BreakerConfig,
    BreakerState,
    EngineHealth,
    EngineSnapshot,
    EscalationConfig,
    LatencyBudgetRule,
    Quality,
    ResilientBackend,
    RouteClassRule,
    Router,
    RoutingConfig,
    RoutingHints,
    RoutingInput,
    RoutingMetrics,
    RuleRouting,
    TierQualityRule,
    UncertaintyRule,
    default_decision,
    engine_snapshots,
)
from services.gateway.settings import RouteClassConfig

ROLES = {"primary": "big", "lowlat": "fast", "best": "best", "small": "small"}
CLASSES = {
    "chat_short": RouteClassConfig(engine="fast"),
    "rag_long": RouteClassConfig(engine="big"),
    "code": RouteClassConfig(engine="big"),
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _snap(engine: str, ttft: float | None = None, available: bool = True) -> EngineSnapshot:
    state = BreakerState.CLOSED if available else BreakerState.OPEN
    return EngineSnapshot(engine, state, available, 0, 0.0, ttft, None, None if available else 5.0)


def _inp(
    route_class: str = "code",
    tier: str = "",
    health: dict[str, EngineSnapshot] | None = None,
    **hints: object,
) -> RoutingInput:
    return RoutingInput(
        route_class=route_class,
        tier=tier,
        hints=RoutingHints(**hints),  # type: ignore[arg-type]
        health=health or {},
        roles=ROLES,
        default_engine=CLASSES[route_class].engine,
    )


# ---------------------------------------------------------------- the rules, each on its own


def test_route_class_rule_matches_its_classes_only() -> None:
    rule = RouteClassRule(name="rag_long", route_classes=("rag_long",), role="primary", fallbacks=("small",))
    d = rule.decide(_inp("rag_long"))
    assert d is not None and (d.rule, d.engine, d.fallbacks) == ("rag_long", "big", ("small",))
    assert rule.decide(_inp("chat_short")) is None


def test_chat_short_goes_to_the_low_latency_role() -> None:
    rule = RouteClassRule(name="chat_short", route_classes=("chat_short",), role="lowlat", fallbacks=("primary",))
    d = rule.decide(_inp("chat_short"))
    assert d is not None and (d.engine, d.fallbacks) == ("fast", ("big",))
    assert rule.decide(_inp("code")) is None


def test_uncertainty_above_the_bar_goes_to_primary_else_small() -> None:
    rule = UncertaintyRule(name="u", above=0.5, fallbacks=("small",), low_fallbacks=("primary",))
    high = rule.decide(_inp(uncertainty=0.51))
    assert high is not None and (high.engine, high.fallbacks) == ("big", ("small",))
    at_bar = rule.decide(_inp(uncertainty=0.5))  # "above 0.5": 0.5 itself is not
    assert at_bar is not None and (at_bar.engine, at_bar.fallbacks) == ("small", ("big",))
    assert rule.decide(_inp(uncertainty=0.0)).engine == "small"  # type: ignore[union-attr]
    assert rule.decide(_inp()) is None, "no hint, no match"


def test_enterprise_asking_high_quality_gets_the_best_engine() -> None:
    rule = TierQualityRule(name="eq", role="best", fallbacks=("primary", "small"))
    d = rule.decide(_inp(tier="enterprise", quality=Quality.HIGH))
    assert d is not None and (d.engine, d.fallbacks) == ("best", ("big", "small"))
    assert rule.decide(_inp(tier="enterprise", quality=Quality.STANDARD)) is None
    assert rule.decide(_inp(tier="paid", quality=Quality.HIGH)) is None
    assert rule.decide(_inp(tier="enterprise")) is None


def test_a_tight_latency_budget_gets_the_fastest_available_engine() -> None:
    rule = LatencyBudgetRule(name="lb", below_ms=1000, candidates=("lowlat", "primary", "small"))
    health = {"fast": _snap("fast", 0.30), "big": _snap("big", 0.10), "small": _snap("small", 0.05, available=False)}
    d = rule.decide(_inp(latency_budget_ms=400, health=health))
    # small is fastest but its breaker is open: last; big beats fast on measured TTFT
    assert d is not None and (d.engine, d.fallbacks) == ("big", ("fast", "small"))
    # engines not measured yet rank after measured ones, in candidate order
    d = rule.decide(_inp(latency_budget_ms=400, health={"small": _snap("small", 2.0)}))
    assert d is not None and (d.engine, d.fallbacks) == ("small", ("fast", "big"))
    assert rule.decide(_inp(latency_budget_ms=1000, health=health)) is None, "budget not under the bar"
    assert rule.decide(_inp(health=health)) is None


def test_the_default_is_the_route_class_engine_with_its_fallback_roles() -> None:
    d = default_decision(_inp("code"), ("primary", "small", "lowlat"))
    assert (d.rule, d.engine, d.fallbacks) == ("default", "big", ("small", "fast"))  # big is not its own fallback


def test_roles_sharing_an_engine_give_no_duplicate_fallbacks() -> None:
    inp = RoutingInput("code", "", RoutingHints(), {}, {"primary": "vllm", "lowlat": "vllm", "small": "s"}, "vllm")
    rule = RouteClassRule(name="c", route_classes=("code",), role="primary", fallbacks=("lowlat", "small", "small"))
    assert rule.decide(inp).fallbacks == ("s",)  # type: ignore[union-attr]


# ---------------------------------------------------------------- rule order


def test_rules_are_evaluated_in_order_and_the_first_match_wins() -> None:
    router = Router(RoutingConfig(roles=ROLES), EngineHealth())
    assert router.decide(_inp("rag_long", tier="enterprise", quality=Quality.HIGH)).rule == "enterprise_high_quality"
    assert router.decide(_inp("rag_long", latency_budget_ms=200)).rule == "latency_budget"
    assert router.decide(_inp("rag_long", uncertainty=0.9)).rule == "uncertainty"
    assert router.decide(_inp("rag_long", latency_budget_ms=5000)).rule == "rag_long"
    assert router.decide(_inp("chat_short")).engine == "fast"
    d = router.decide(_inp("code"))
    assert (d.rule, d.engine) == ("default", "big")
    # the same request under a different order
    flipped = RoutingConfig(
        roles=ROLES,
        rules=(
            RouteClassRule(name="rag_long", route_classes=("rag_long",), role="primary"),
            TierQualityRule(name="enterprise_high_quality", role="best"),
        ),
    )
    assert Router(flipped, EngineHealth()).decide(_inp("rag_long", tier="enterprise", quality=Quality.HIGH)).rule == (
        "rag_long"
    )


# ---------------------------------------------------------------- configuration


def test_config_names_the_bad_key() -> None:
    with pytest.raises(ValidationError, match=r"rules\[1\]\.role: 'fastest' is not a role; roles: best, lowlat"):
        RoutingConfig(
            roles=ROLES,
            rules=[
                {"kind": "uncertainty", "name": "u"},
                {"kind": "route_class", "name": "c", "route_classes": ["code"], "role": "fastest"},
            ],
        )
    with pytest.raises(ValidationError, match=r"rules\[0\]\.candidates\[1\]: 'turbo' is not a role"):
        RoutingConfig(roles=ROLES, rules=[{"kind": "latency_budget", "name": "lb", "candidates": ["small", "turbo"]}])
    with pytest.raises(ValidationError, match=r"rules\[1\]\.name: 'x' is used twice"):
        RoutingConfig(roles=ROLES, rules=[{"kind": "uncertainty", "name": "x"}, {"kind": "uncertainty", "name": "x"}])
    with pytest.raises(ValidationError, match=r"escalation\.to_role: 'huge' is not a role"):
        RoutingConfig(roles=ROLES, escalation={"to_role": "huge"})
    with pytest.raises(ValidationError, match="default_fallbacks"):
        RoutingConfig(roles=ROLES, default_fallbacks=("nope",))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RoutingConfig(roles=ROLES, rules=[{"kind": "uncertainty", "name": "u", "treshold": 0.3}])
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        RoutingConfig(roles=ROLES, rules=[{"kind": "random", "name": "r"}])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RoutingConfig(roles=ROLES, breakers={})


def test_config_from_plain_data_and_frozen() -> None:
    cfg = RoutingConfig.model_validate(
        {
            "roles": {"primary": "vllm", "small": "small"},
            "rules": [{"kind": "route_class", "name": "code", "route_classes": ["code"], "role": "small"}],
            "default_fallbacks": ["small"],
            "escalation": {"threshold": -2.0},
            "fallback_on": ["UNAVAILABLE"],
        }
    )
    assert isinstance(cfg.rules[0], RouteClassRule) and cfg.escalation.threshold == -2.0
    with pytest.raises(ValidationError, match="frozen"):
        cfg.ema_alpha = 0.9  # type: ignore[misc]
    assert cfg.route_class_violations({"chat_short"}) == [
        "routing.rules[0].route_classes[0]: 'code' is not a route class; use one of ['chat_short']"
    ]
    assert RoutingConfig().route_class_violations({"chat_short", "rag_long", "code"}) == []


def test_seed_rules_are_the_defaults() -> None:
    cfg = RoutingConfig()
    assert [r.name for r in cfg.rules] == [
        "enterprise_high_quality",
        "latency_budget",
        "uncertainty",
        "rag_long",
        "chat_short",
    ]
    assert cfg.roles == {"primary": "vllm", "lowlat": "vllm", "best": "vllm", "small": "small"}


# ---------------------------------------------------------------- the policy


@dataclass(slots=True)
class HintedRequest(GatewayRequest):
    """A gateway request with the routing hints field the gateway request will gain."""

    hints: RoutingHints = field(default_factory=RoutingHints)


def _req(route_class: str = "code", *, hinted: RoutingHints | None = None, **kw: object) -> GatewayRequest:
    base = dict(request_id="r", route_class=route_class, prompt=None, messages=(), sampling=Sampling())
    if hinted is not None:
        return HintedRequest(**(base | kw), hints=hinted)  # type: ignore[arg-type]
    return GatewayRequest(**(base | kw))  # type: ignore[arg-type]


async def test_rule_routing_sets_engine_fallbacks_and_the_matched_rule() -> None:
    registry = CollectorRegistry()
    metrics = RoutingMetrics(registry)
    policy = RuleRouting(Router(RoutingConfig(roles=ROLES), EngineHealth()), CLASSES, metrics)
    principal = Principal("acme", "k_1", "enterprise")
    req = _req("chat_short", hinted=RoutingHints(quality=Quality.HIGH), principal=principal)
    await policy.admit(req)
    assert (req.engine, req.fallbacks, req.notes["rule"]) == ("best", ("big", "small"), "enterprise_high_quality")
    plain = _req("chat_short")  # no hints field at all: routes as if none were given
    await policy.admit(plain)
    assert (plain.engine, plain.fallbacks, plain.notes["rule"]) == ("fast", ("big", "small"), "chat_short")
    labels = {"rule": "chat_short", "engine": "fast"}
    assert registry.get_sample_value("servemesh_gateway_routing_decisions_total", labels) == 1


async def test_rule_routing_keeps_an_engine_chosen_earlier_and_refuses_bad_hints() -> None:
    policy = RuleRouting(Router(RoutingConfig(roles=ROLES), EngineHealth()), CLASSES)
    refused = _req("chat_short", engine="safety")
    await policy.admit(refused)
    assert refused.engine == "safety" and "rule" not in refused.notes
    with pytest.raises(InvalidArgument) as bad:
        await policy.admit(_req(hinted=RoutingHints(uncertainty=1.5, latency_budget_ms=0)))
    assert {v.field for v in bad.value.violations} == {"hints.uncertainty", "hints.latency_budget_ms"}
    with pytest.raises(InvalidArgument, match=r"hints\.latency_budget_ms: is 600001; must be in \[1, 600000\]"):
        await policy.admit(_req(hinted=RoutingHints(latency_budget_ms=600_001)))


# ---------------------------------------------------------------- engine health


def _health(clock: FakeClock, **breaker: float) -> EngineHealth:
    cfg = BreakerConfig(**({"error_rate": 0.5, "min_calls": 4, "window_s": 60, "cooldown_s": 10} | breaker))
    return EngineHealth(cfg, ema_alpha=0.5, clock=clock)


def _fail(health: EngineHealth, engine: str, n: int = 1) -> None:
    for _ in range(n):
        permit = health.acquire(engine)
        assert permit is not None
        health.failed(permit)


def _ok(health: EngineHealth, engine: str, n: int = 1) -> None:
    for _ in range(n):
        permit = health.acquire(engine)
        assert permit is not None
        health.succeeded(permit, 1.0)


def test_ema_of_ttft_and_latency() -> None:
    health = _health(FakeClock())
    for sample in (1.0, 2.0, 3.0):
        health.observe_ttft("e", sample)
    permit = health.acquire("e")
    assert permit is not None
    health.succeeded(permit, 4.0)
    snap = health.snapshot()["e"]
    assert snap.ttft_ema_s == pytest.approx(2.25)  # 1 -> 0.5*2+0.5*1 = 1.5 -> 0.5*3+0.5*1.5
    assert snap.latency_ema_s == pytest.approx(4.0)  # the first sample stands alone


def test_breaker_opens_on_error_rate_only_with_enough_calls() -> None:
    clock = FakeClock()
    health = _health(clock)
    _fail(health, "e", 3)
    assert health.snapshot()["e"].state is BreakerState.CLOSED, "3 calls < min_calls 4"
    _ok(health, "e", 3)
    _fail(health, "e")  # 4 failures in 7 calls: 0.57 >= 0.5
    snap = health.snapshot()["e"]
    assert (snap.state, snap.calls, snap.available) == (BreakerState.OPEN, 7, False)
    assert snap.error_rate == pytest.approx(4 / 7) and snap.retry_in_s == pytest.approx(10)
    assert health.acquire("e") is None


def test_failures_leave_the_window() -> None:
    clock = FakeClock()
    health = _health(clock)
    _fail(health, "e", 3)
    clock.advance(61)  # those three are out of the 60 s window now
    _ok(health, "e")
    _fail(health, "e", 2)
    snap = health.snapshot()["e"]
    assert (snap.state, snap.calls) == (BreakerState.CLOSED, 3)
    _fail(health, "e")
    assert health.snapshot()["e"].state is BreakerState.OPEN


def test_breaker_half_opens_after_the_cooldown_and_one_probe_decides() -> None:
    clock = FakeClock()
    health = _health(clock, min_calls=1)
    _fail(health, "e")
    assert health.acquire("e") is None
    clock.advance(9.9)
    assert health.acquire("e") is None, "still cooling down"
    clock.advance(0.1)
    assert health.snapshot()["e"].available
    probe = health.acquire("e")
    assert probe is not None and probe.probe and health.snapshot()["e"].state is BreakerState.HALF_OPEN
    assert health.acquire("e") is None, "one probe at a time"
    health.failed(probe)  # the probe failed: open again, a fresh cooldown
    assert health.snapshot()["e"].state is BreakerState.OPEN and health.snapshot()["e"].retry_in_s == 10
    clock.advance(10)
    probe = health.acquire("e")
    assert probe is not None and probe.probe
    health.released(probe)  # the client went away: says nothing, the next request probes
    probe = health.acquire("e")
    assert probe is not None and probe.probe
    health.succeeded(probe, 0.5)
    snap = health.snapshot()["e"]
    assert (snap.state, snap.calls, snap.error_rate) == (BreakerState.CLOSED, 1, 0.0), "closed with a fresh window"
    ordinary = health.acquire("e")
    assert ordinary is not None and not ordinary.probe


def test_an_outcome_started_before_the_breaker_opened_does_not_close_it() -> None:
    clock = FakeClock()
    health = _health(clock, min_calls=1)
    old = health.acquire("e")
    _fail(health, "e")
    clock.advance(10)
    probe = health.acquire("e")
    assert old is not None and probe is not None
    health.succeeded(old, 1.0)  # a long stream from before: not the probe
    assert health.snapshot()["e"].state is BreakerState.HALF_OPEN
    health.succeeded(old, 1.0)  # an outcome counts once
    assert health.snapshot()["e"].calls == 2


def test_health_feeds_the_gauges_and_a_plain_snapshot() -> None:
    registry = CollectorRegistry()
    metrics = RoutingMetrics(registry)
    clock = FakeClock()
    health = EngineHealth(BreakerConfig(min_calls=1), clock=clock, listener=metrics.engine)
    health.observe_ttft("e", 0.25)
    assert registry.get_sample_value("servemesh_gateway_breaker_state", {"engine": "e"}) == 0
    assert registry.get_sample_value("servemesh_gateway_engine_ttft_ema_seconds", {"engine": "e"}) == 0.25
    _fail(health, "e")
    assert registry.get_sample_value("servemesh_gateway_breaker_state", {"engine": "e"}) == 2
    assert registry.get_sample_value("servemesh_gateway_engine_error_rate", {"engine": "e"}) == 1.0
    clock.advance(10)
    health.acquire("e")
    assert registry.get_sample_value("servemesh_gateway_breaker_state", {"engine": "e"}) == 1
    assert engine_snapshots(health)[0] == {
        "engine": "e",
        "state": "half_open",
        "available": False,
        "calls": 1,
        "error_rate": 1.0,
        "ttft_ema_s": 0.25,
        "latency_ema_s": None,
        "retry_in_s": None,
    }


def test_every_role_engine_is_reported_from_the_start() -> None:
    registry = CollectorRegistry()
    router = Router.from_config(RoutingConfig(roles=ROLES), RoutingMetrics(registry))
    assert set(router.health.snapshot()) == {"big", "fast", "best", "small"}
    for engine in ("big", "fast", "best", "small"):
        assert registry.get_sample_value("servemesh_gateway_breaker_state", {"engine": engine}) == 0


# ---------------------------------------------------------------- the scripted backend


@dataclass
class Script:
    texts: tuple[str, ...] = ("Hel", "lo")
    #: raised before the first chunk
    error: ServiceError | None = None
    #: raise `late_error` after this many text chunks
    fail_after: int | None = None
    late_error: ServiceError | None = None
    #: wait forever before the first chunk (a stuck engine)
    hang: bool = False
    #: end the stream without a last chunk
    no_final: bool = False
    mean_logprob: float | None = None
    #: fake seconds to the first text, and per further chunk
    ttft_s: float = 0.1
    chunk_s: float = 0.05


class ScriptedBackend:
    """Engines by id, each following its script; records calls and closes."""

    def __init__(self, scripts: dict[str, Script], clock: FakeClock) -> None:
        self.scripts = scripts
        self.clock = clock
        self.calls: list[tuple[str, bool]] = []
        self.closed: list[str] = []
        self.finished: list[str] = []
        self.yielded: list[str] = []

    async def stream(self, request: GatewayRequest, *, logprobs: bool = False) -> AsyncIterator[Chunk]:
        engine = request.engine
        self.calls.append((engine, logprobs))
        s = self.scripts[engine]
        try:
            if s.hang:
                await asyncio.Event().wait()
            self.clock.advance(s.ttft_s)
            if s.error is not None:
                raise s.error
            request.served.engine, request.served.model = f"engines/{engine}", f"model-of-{engine}"
            for i, text in enumerate(s.texts):
                if s.fail_after == i:
                    assert s.late_error is not None
                    raise s.late_error
                self.yielded.append(f"{engine}:{text}")
                yield Chunk(text)
                self.clock.advance(s.chunk_s)
            if s.no_final:
                return
            self.finished.append(engine)
            yield Chunk("", FinishReason.STOP, Usage(3, len(s.texts)), s.mean_logprob if logprobs else None)
        finally:
            self.closed.append(engine)


def _setup(
    scripts: dict[str, Script], **config: object
) -> tuple[ResilientBackend, ScriptedBackend, Router, CollectorRegistry, FakeClock]:
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = RoutingMetrics(registry)
    cfg = {"roles": ROLES, "breaker": BreakerConfig(min_calls=2, error_rate=0.5, cooldown_s=10)} | config
    router = Router.from_config(RoutingConfig(**cfg), metrics, clock=clock)  # type: ignore[arg-type]
    inner = ScriptedBackend(scripts, clock)
    return ResilientBackend(inner, router, metrics), inner, router, registry, clock


def _routed(engine: str, *fallbacks: str, rule: str = "test") -> GatewayRequest:
    req = _req(engine=engine, fallbacks=fallbacks)
    req.notes["rule"] = rule
    return req


async def _collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


def _text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


# ---------------------------------------------------------------- fallback before the first text


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (Unavailable("engine down"), "unavailable"),
        (ResourceExhausted("queue full"), "resource_exhausted"),
        (DeadlineExceeded("too slow"), "deadline_exceeded"),
        (NotFound("engine 'big' does not exist"), "not_found"),
    ],
    ids=["unavailable", "resource_exhausted", "deadline_exceeded", "not_found"],
)
async def test_failure_before_the_first_text_moves_to_the_next_engine_unseen(error: ServiceError, reason: str) -> None:
    backend, inner, router, registry, _ = _setup({"big": Script(error=error), "small": Script(texts=("Hi", "!"))})
    req = _routed("big", "small")
    chunks = await _collect(backend.stream(req))
    assert _text(chunks) == "Hi!" and chunks[-1].finish_reason is FinishReason.STOP
    assert [c for c, _ in inner.calls] == ["big", "small"] and "big" in inner.closed
    assert (req.engine, req.served.engine, req.served.model) == ("small", "engines/small", "model-of-small")
    assert req.notes["fallback"] == f"big:{reason}"
    labels = {"from_engine": "big", "to_engine": "small", "reason": reason}
    assert registry.get_sample_value("servemesh_gateway_fallbacks_total", labels) == 1
    health = router.health.snapshot()
    assert (health["big"].calls, health["big"].error_rate) == (1, 1.0)
    assert (health["small"].calls, health["small"].error_rate) == (1, 0.0)


async def test_no_text_within_the_ttft_timeout_moves_to_the_next_engine() -> None:
    backend, inner, router, registry, _ = _setup({"big": Script(hang=True), "small": Script()}, ttft_timeout_s=0.05)
    req = _routed("big", "small")
    assert _text(await _collect(backend.stream(req))) == "Hello"
    assert inner.closed[0] == "big", "the stuck attempt is closed (which aborts its engine work)"
    labels = {"from_engine": "big", "to_engine": "small", "reason": "timeout"}
    assert registry.get_sample_value("servemesh_gateway_fallbacks_total", labels) == 1
    assert router.health.snapshot()["big"].error_rate == 1.0


async def test_a_stream_that_ends_before_any_text_is_a_failure_not_an_empty_success() -> None:
    backend, _inner, _, registry, _ = _setup(
        {"big": Script(texts=(), no_final=True), "small": Script(texts=(), no_final=True)}
    )
    with pytest.raises(Unavailable, match="no engine could serve") as exc:
        await _collect(backend.stream(_routed("big", "small")))
    assert "big: the stream ended before any text" in exc.value.message
    labels = {"from_engine": "small", "to_engine": "none", "reason": "ended_early"}
    assert registry.get_sample_value("servemesh_gateway_fallbacks_total", labels) == 1


async def test_an_empty_answer_with_its_last_chunk_is_a_success() -> None:
    backend, inner, _, _, _ = _setup({"big": Script(texts=()), "small": Script()})
    chunks = await _collect(backend.stream(_routed("big", "small")))
    assert [c.text for c in chunks] == [""] and chunks[-1].finish_reason is FinishReason.STOP
    assert [c for c, _ in inner.calls] == ["big"]


async def test_errors_that_are_not_the_engines_fault_are_relayed_without_fallback() -> None:
    bad = InvalidArgument([])
    backend, inner, router, _, _ = _setup({"big": Script(error=bad), "small": Script()})
    with pytest.raises(InvalidArgument):
        await _collect(backend.stream(_routed("big", "small")))
    assert [c for c, _ in inner.calls] == ["big"]
    assert router.health.snapshot()["big"].calls == 0, "a bad request says nothing about the engine"


async def test_deadline_exceeded_after_the_callers_own_deadline_is_not_retried() -> None:
    backend, inner, router, _, _ = _setup({"big": Script(error=DeadlineExceeded("deadline")), "small": Script()})

    async def call() -> None:
        context.bind("rid", deadline=time.monotonic() - 1)  # this task's own context
        await _collect(backend.stream(_routed("big", "small")))

    with pytest.raises(DeadlineExceeded):
        await asyncio.create_task(call())
    assert [c for c, _ in inner.calls] == ["big"] and router.health.snapshot()["big"].calls == 0


async def test_all_engines_failing_is_unavailable_naming_each() -> None:
    backend, _, _, registry, _ = _setup(
        {"big": Script(error=Unavailable("down")), "small": Script(error=ResourceExhausted("full"))}
    )
    with pytest.raises(Unavailable) as exc:
        await _collect(backend.stream(_routed("big", "small")))
    assert "big: UNAVAILABLE (down)" in exc.value.message and "small: RESOURCE_EXHAUSTED (full)" in exc.value.message
    assert exc.value.retry_after is not None and exc.value.metadata["engines"] == "big,small"
    labels = {"from_engine": "small", "to_engine": "none", "reason": "resource_exhausted"}
    assert registry.get_sample_value("servemesh_gateway_fallbacks_total", labels) == 1


# ---------------------------------------------------------------- after the first text


async def test_failure_after_the_first_text_ends_with_unavailable_and_a_partial_output_marker() -> None:
    script = Script(texts=("Hel", "lo", " world"), fail_after=2, late_error=Unavailable("engine died"))
    backend, inner, router, registry, _ = _setup({"big": script, "small": Script()})
    got: list[str] = []
    with pytest.raises(Unavailable) as exc:
        async for chunk in backend.stream(_routed("big", "small")):
            got.append(chunk.text)
    assert got == ["Hel", "lo"], "what was sent stays sent; no other engine's text is spliced in"
    assert exc.value.metadata == {
        "partial_output": "true",
        "engine": "big",
        "chars_sent": "5",
        "reason": "unavailable",
    }
    assert exc.value.retry_after == 1.0
    assert [c for c, _ in inner.calls] == ["big"], "no fallback after the first text"
    assert registry.get_sample_value("servemesh_gateway_partial_outputs_total", {"engine": "big"}) == 1
    assert router.health.snapshot()["big"].error_rate == 1.0


async def test_a_stream_cut_without_its_last_chunk_is_never_a_normal_end() -> None:
    backend, _, _, _, _ = _setup({"big": Script(no_final=True)})
    got: list[Chunk] = []
    with pytest.raises(Unavailable) as exc:
        async for chunk in backend.stream(_routed("big")):
            got.append(chunk)
    assert _text(got) == "Hello" and all(c.finish_reason is None for c in got)
    assert exc.value.metadata["partial_output"] == "true" and exc.value.metadata["reason"] == "ended_early"


# ---------------------------------------------------------------- breakers, probes, health from outcomes


async def test_an_open_breaker_is_skipped_and_a_probe_after_the_cooldown_closes_it() -> None:
    scripts = {"big": Script(error=Unavailable("down")), "small": Script(texts=("ok",))}
    backend, inner, router, registry, clock = _setup(scripts)
    for _ in range(2):  # min_calls 2, both failures: open
        await _collect(backend.stream(_routed("big", "small")))
    assert router.health.snapshot()["big"].state is BreakerState.OPEN
    inner.calls.clear()
    req = _routed("big", "small")
    assert _text(await _collect(backend.stream(req))) == "ok"
    assert [c for c, _ in inner.calls] == ["small"], "the open engine is not even asked"
    assert req.notes["fallback"] == "big:breaker_open"
    labels = {"from_engine": "big", "to_engine": "small", "reason": "breaker_open"}
    assert registry.get_sample_value("servemesh_gateway_fallbacks_total", labels) == 1
    # the engine recovers; after the cooldown one request probes it and closes the breaker
    scripts["big"] = Script(texts=("back",))
    clock.advance(10)
    inner.calls.clear()
    req = _routed("big", "small")
    assert _text(await _collect(backend.stream(req))) == "back" and req.engine == "big"
    assert [c for c, _ in inner.calls] == ["big"]
    assert router.health.snapshot()["big"].state is BreakerState.CLOSED
    assert registry.get_sample_value("servemesh_gateway_breaker_state", {"engine": "big"}) == 0


async def test_every_breaker_open_fails_fast_with_retry_after() -> None:
    backend, inner, router, _, clock = _setup({"big": Script(), "small": Script()})
    for engine in ("big", "small"):
        _fail(router.health, engine, 2)
    clock.advance(4)
    with pytest.raises(Unavailable, match="big: circuit open; small: circuit open") as exc:
        await _collect(backend.stream(_routed("big", "small")))
    assert exc.value.retry_after == pytest.approx(6.0) and inner.calls == []


async def test_a_failed_probe_reopens_and_the_request_falls_back() -> None:
    backend, _inner, router, _, clock = _setup({"big": Script(error=Unavailable("still down")), "small": Script()})
    _fail(router.health, "big", 2)
    clock.advance(10)
    assert _text(await _collect(backend.stream(_routed("big", "small")))) == "Hello"
    snap = router.health.snapshot()["big"]
    # open again with a fresh cooldown (less the fake time small took to answer), not the spent one (0)
    assert snap.state is BreakerState.OPEN and snap.retry_in_s is not None and snap.retry_in_s > 9


async def test_measured_ttft_and_latency_feed_the_emas() -> None:
    backend, _, router, _, _ = _setup({"big": Script(texts=("a", "b", "c"), ttft_s=0.2, chunk_s=0.1)})
    await _collect(backend.stream(_routed("big")))
    snap = router.health.snapshot()["big"]
    assert snap.ttft_ema_s == pytest.approx(0.2) and snap.latency_ema_s == pytest.approx(0.5)


# ---------------------------------------------------------------- cancellation


async def test_aclose_closes_the_engine_stream_at_once() -> None:
    backend, inner, router, _, _ = _setup({"big": Script(texts=tuple("abcdefgh"))})
    stream = backend.stream(_routed("big"))
    assert (await anext(stream)).text == "a"
    assert inner.closed == []
    await stream.aclose()
    assert inner.closed == ["big"], "closing the stream must close the engine's stream (which aborts its work)"
    assert inner.yielded == ["big:a"]
    snap = router.health.snapshot()["big"]
    assert (snap.calls, snap.error_rate) == (1, 0.0), "a client going away is not the engine's failure"


async def test_cancelling_before_the_first_text_closes_the_attempt_and_frees_the_probe() -> None:
    backend, inner, router, _, clock = _setup({"big": Script(hang=True)}, ttft_timeout_s=None)
    _fail(router.health, "big", 2)
    clock.advance(10)  # the next request is the half-open probe
    task = asyncio.create_task(_collect(backend.stream(_routed("big"))))
    while not inner.calls:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inner.closed == ["big"]
    probe = router.health.acquire("big")
    assert probe is not None and probe.probe, "the cancelled probe left the slot for the next request"


async def test_the_pipeline_closes_through_routing_and_fallback() -> None:
    scripts = {"fast": Script(error=Unavailable("down")), "big": Script(texts=tuple("abcdef"))}
    backend, inner, router, _, _ = _setup(scripts)
    policies = [ValidateInput(CLASSES), RouteClassDefaults(CLASSES, "chat_short"), RuleRouting(router, CLASSES)]
    req = _req("chat_short", prompt="hi")
    stream = Pipeline(policies, backend).stream(req)
    assert (await anext(stream)).text == "a"
    assert (req.notes["rule"], req.engine, req.served.engine) == ("chat_short", "big", "engines/big")
    await stream.aclose()
    assert inner.closed == ["fast", "big"]


# ---------------------------------------------------------------- escalation


def _escalating(small: Script, big: Script, **config: object):
    return _setup({"small": small, "big": big}, **config)


async def test_a_low_confidence_small_answer_is_asked_again_on_primary() -> None:
    backend, inner, _, registry, _ = _escalating(
        Script(texts=("maybe",), mean_logprob=-2.5), Script(texts=("surely",), mean_logprob=-0.1)
    )
    req = _routed("small", "big", rule="uncertainty")
    chunks = await _collect(backend.stream(req))
    assert _text(chunks) == "surely", "the small answer was held back and dropped"
    assert inner.calls == [("small", True), ("big", False)]
    assert (req.engine, req.served.engine) == ("big", "engines/big")
    assert req.notes["escalated"] == "small->big (mean_logprob -2.500 < -1)"
    labels = {"from_engine": "small", "to_engine": "big", "outcome": "served"}
    assert registry.get_sample_value("servemesh_gateway_escalations_total", labels) == 1


async def test_a_confident_small_answer_is_served_after_being_buffered_whole() -> None:
    backend, inner, _, _, _ = _escalating(
        Script(texts=("Paris", "."), mean_logprob=-0.3), Script(texts=("x",)), escalation={"threshold": -1.0}
    )
    req = _routed("small", "big", rule="uncertainty")
    stream = backend.stream(req)
    first = await anext(stream)
    assert first.text == "Paris"
    assert inner.finished == ["small"], "escalation cannot stream: the whole small answer came first"
    rest = await _collect(stream)
    assert _text([first, *rest]) == "Paris." and rest[-1].mean_logprob == -0.3
    assert [c for c, _ in inner.calls] == ["small"]
    assert "escalated" not in req.notes and req.notes["mean_logprob"] == "-0.3000"


async def test_escalation_only_for_rules_that_ask_and_when_enabled() -> None:
    low = Script(texts=("meh",), mean_logprob=-5.0)
    backend, inner, _, _, _ = _escalating(low, Script())
    assert _text(await _collect(backend.stream(_routed("small", "big", rule="chat_short")))) == "meh"
    assert inner.calls == [("small", False)], "no logprobs asked, nothing buffered"
    backend, inner, _, _, _ = _escalating(low, Script(), escalation=EscalationConfig(enabled=False))
    assert _text(await _collect(backend.stream(_routed("small", "big", rule="uncertainty")))) == "meh"
    assert inner.calls == [("small", False)]


async def test_when_primary_cannot_start_the_small_answer_is_served_after_all() -> None:
    backend, _inner, _, registry, _ = _escalating(
        Script(texts=("maybe",), mean_logprob=-3.0), Script(error=Unavailable("down"))
    )
    req = _routed("small", "big", rule="uncertainty")
    chunks = await _collect(backend.stream(req))
    assert _text(chunks) == "maybe" and chunks[-1].finish_reason is FinishReason.STOP
    assert (req.engine, req.served.engine) == ("small", "engines/small")
    assert req.notes["escalated"].endswith("target failed: served the small answer")
    labels = {"from_engine": "small", "to_engine": "big", "outcome": "target_failed"}
    assert registry.get_sample_value("servemesh_gateway_escalations_total", labels) == 1


async def test_a_small_answer_failing_midway_goes_to_primary_unseen() -> None:
    small = Script(texts=("a", "b"), fail_after=1, late_error=Unavailable("small died"))
    backend, _inner, _, registry, _ = _escalating(small, Script(texts=("sure",)))
    req = _routed("small", "big", rule="uncertainty")
    assert _text(await _collect(backend.stream(req))) == "sure"
    assert req.notes["escalated"] == "small->big (small answer failed)"
    assert registry.get_sample_value("servemesh_gateway_partial_outputs_total", {"engine": "small"}) is None


async def test_when_small_fails_before_its_first_text_the_fallback_streams_directly() -> None:
    backend, inner, _, _, _ = _escalating(Script(error=Unavailable("down")), Script(texts=("a", "b", "c")))
    req = _routed("small", "big", rule="uncertainty")
    stream = backend.stream(req)
    assert (await anext(stream)).text == "a"
    assert inner.finished == [], "relayed as it comes: nothing to judge on primary"
    assert _text(await _collect(stream)) == "bc" and "escalated" not in req.notes


async def test_an_engine_without_logprobs_is_not_escalated() -> None:
    backend, _inner, _, _, _ = _escalating(Script(texts=("hm",), mean_logprob=None), Script())
    req = _routed("small", "big", rule="uncertainty")
    assert _text(await _collect(backend.stream(req))) == "hm"
    assert "escalated" not in req.notes and req.notes["escalation"].startswith("skipped")


def test_mean_logprob_threshold_is_finite_and_not_positive() -> None:
    assert math.isfinite(EscalationConfig().threshold) and EscalationConfig().threshold < 0
    with pytest.raises(ValidationError):
        EscalationConfig(threshold=0.5)


def test_the_error_window_counts_failures_as_outcomes_come_and_go() -> None:
    from services.gateway.routing import _Window

    w = _Window(maxlen=3)
    for at, ok in [(1.0, False), (2.0, True), (3.0, False), (4.0, False)]:  # the first one is pushed out
        w.append(at, ok)
    assert (len(w), w.errors) == (3, 2)
    w.expire(before=3.0)
    assert (len(w), w.errors) == (1, 1)
    w.clear()
    assert (len(w), w.errors) == (0, 0)

"""Rule-based routing, engine health, circuit breaking, fallback and escalation.

Four parts, wired by the server:

- `RuleRouting` (a pipeline policy): configured rules, evaluated in order, each a pure
  function of a `RoutingInput` (route class, tier, the request's `RoutingHints`, a health
  snapshot, the role -> engine map) returning a `Decision` or None; the first match wins and
  the route class's own engine is the default. It sets `request.engine`, `request.fallbacks`
  and `request.notes["rule"]`; an engine chosen earlier in the pipeline (a safety refusal)
  is kept.
- `EngineHealth`: per engine, from the outcomes of real requests: EMA of time to first
  token and of stream latency, error rate over a sliding time window, and a circuit
  breaker. Closed -> open when the window holds at least `min_calls` outcomes and the error
  rate reaches `error_rate`; open -> half-open after `cooldown_s`, which lets one probe
  request through; the probe's success closes the breaker (with a fresh window), its
  failure re-opens it for another cooldown.
- `ResilientBackend` (wraps the inference backend): tries `request.engine`, then
  `request.fallbacks`, skipping engines whose breaker is open. A failure before the first
  text (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, NOT_FOUND by default, or no
  text within `ttft_timeout_s`) moves the request to the next engine; the client sees
  nothing of it. After the first text has gone out, a failure ends the stream with
  UNAVAILABLE whose ErrorInfo metadata carries `partial_output: "true"`, the engine and the
  characters sent: a stream never ends as a silent (possibly empty) success.
- Escalation: for a rule with `escalate: true`, an answer of the `small` role's engine is
  buffered whole (it cannot be streamed: it may be thrown away) and judged by its mean token
  log-probability; below `escalation.threshold` the request is asked again on the
  `primary` role's engine and that answer is streamed. If primary then fails before its
  first text, the small answer is served after all. `request.notes["escalated"]` records it.

Time comes from an injectable monotonic clock (EngineHealth.clock), so tests drive the
breaker, the EMAs and the measured latencies without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common import context
from services.common.errors import Code, FieldViolation, InvalidArgument, ServiceError, Unavailable
from services.common.generation import Chunk
from services.gateway.core import GatewayRequest, Policy

if TYPE_CHECKING:  # settings import RoutingConfig from here
    from services.gateway.settings import RouteClassConfig

# ---------------------------------------------------------------- request hints


class Quality(StrEnum):
    """The answer quality a caller asks for (servemesh.gateway.v1.Quality; UNSPECIFIED = None)."""

    STANDARD = "standard"
    HIGH = "high"


#: servemesh.gateway.v1.RoutingHints.latency_budget_ms is in [1, 600000]
MAX_LATENCY_BUDGET_MS = 600_000


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """What a caller says about a request, for routing (servemesh.gateway.v1.RoutingHints;
    every field optional, None when unset)."""

    #: how hard or uncertain the caller thinks the request is, in [0, 1]
    uncertainty: float | None = None
    quality: Quality | None = None
    #: time to first token the caller can wait, in milliseconds, in [1, 600000]
    latency_budget_ms: int | None = None


def hint_violations(hints: RoutingHints, prefix: str = "hints") -> list[FieldViolation]:
    """Every out-of-range hint, named with the caller's field path."""
    bad: list[FieldViolation] = []
    u = hints.uncertainty
    if u is not None and not (isinstance(u, int | float) and math.isfinite(u) and 0.0 <= u <= 1.0):
        bad.append(FieldViolation(f"{prefix}.uncertainty", f"is {u}; must be in [0, 1]"))
    if hints.quality is not None and not isinstance(hints.quality, Quality):
        bad.append(FieldViolation(f"{prefix}.quality", f"must be one of {', '.join(q.value for q in Quality)}"))
    b = hints.latency_budget_ms
    if b is not None and not 1 <= b <= MAX_LATENCY_BUDGET_MS:
        bad.append(FieldViolation(f"{prefix}.latency_budget_ms", f"is {b}; must be in [1, {MAX_LATENCY_BUDGET_MS}]"))
    return bad


# ---------------------------------------------------------------- engine health


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """An engine's health as the gateway has seen it (for rules, metrics and the console)."""

    engine: str
    state: BreakerState
    #: whether a request may be sent now (closed; open past its cooldown; half-open with no probe out)
    available: bool
    #: outcomes in the error-rate window
    calls: int
    #: failures / calls over the window; 0 with no calls
    error_rate: float
    #: EMA of time to first text, seconds; None before the first sample
    ttft_ema_s: float | None
    #: EMA of whole-stream latency, seconds; None before the first sample
    latency_ema_s: float | None
    #: seconds until an open breaker lets a probe through (0 when it would now); None unless open
    retry_in_s: float | None = None


@dataclass(eq=False, slots=True)
class Permit:
    """Leave to send one request to an engine; its outcome is reported exactly once."""

    engine: str
    #: the one request a half-open breaker lets through
    probe: bool
    done: bool = False


class _Window:
    """Outcomes (time, ok) of the error-rate window, at most `maxlen`, with their failures
    counted as they come and go (the error rate is read on every routing decision)."""

    __slots__ = ("_outcomes", "errors")

    def __init__(self, maxlen: int) -> None:
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=maxlen)
        self.errors = 0

    def __len__(self) -> int:
        return len(self._outcomes)

    def append(self, at: float, ok: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen:
            self._drop_oldest()
        self._outcomes.append((at, ok))
        self.errors += not ok

    def expire(self, before: float) -> None:
        while self._outcomes and self._outcomes[0][0] <= before:
            self._drop_oldest()

    def clear(self) -> None:
        self._outcomes.clear()
        self.errors = 0

    def _drop_oldest(self) -> None:
        _, ok = self._outcomes.popleft()
        self.errors -= not ok


@dataclass(slots=True)
class _Engine:
    outcomes: _Window
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    probe_out: bool = False
    ttft_ema: float | None = None
    latency_ema: float | None = None


class BreakerConfig(BaseModel):
    """When an engine's circuit breaker opens and how it closes again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: open when failures / calls over the window reach this
    error_rate: float = Field(0.5, gt=0, le=1)
    #: ... and the window holds at least this many outcomes
    min_calls: int = Field(5, ge=1, le=10_000)
    #: the sliding window, seconds
    window_s: float = Field(30.0, gt=0, le=3600)
    #: how long an open breaker refuses requests before letting one probe through, seconds
    cooldown_s: float = Field(10.0, gt=0, le=3600)


class EngineHealth:
    """Per-engine EMA latencies, error rate and circuit breaker, fed by real outcomes.

    `listener` is called with an engine's snapshot after each change (metrics gauges)."""

    MAX_OUTCOMES = 10_000  # per engine; bounds memory however busy the window is

    def __init__(
        self,
        breaker: BreakerConfig | None = None,
        ema_alpha: float = 0.2,
        *,
        clock: Callable[[], float] = time.monotonic,
        listener: Callable[[EngineSnapshot], None] | None = None,
    ) -> None:
        if not 0 < ema_alpha <= 1:
            raise ValueError("ema_alpha must be in (0, 1]")
        self._cfg = breaker or BreakerConfig()
        self._alpha = ema_alpha
        self.clock = clock
        self._listener = listener
        self._engines: dict[str, _Engine] = {}

    def _get(self, engine: str) -> _Engine:
        state = self._engines.get(engine)
        if state is None:
            state = self._engines[engine] = _Engine(_Window(self.MAX_OUTCOMES))
        return state

    def track(self, engine: str) -> None:
        """Start reporting an engine (closed, no samples) before its first request."""
        self._get(engine)
        self._changed(engine)

    def acquire(self, engine: str) -> Permit | None:
        """Leave to send a request to `engine`, or None while its breaker refuses."""
        e = self._get(engine)
        if e.state is BreakerState.OPEN:
            if self.clock() - e.opened_at < self._cfg.cooldown_s:
                return None
            e.state = BreakerState.HALF_OPEN
            e.probe_out = False
            self._changed(engine)
        if e.state is BreakerState.HALF_OPEN:
            if e.probe_out:
                return None
            e.probe_out = True
            return Permit(engine, probe=True)
        return Permit(engine, probe=False)

    def observe_ttft(self, engine: str, seconds: float) -> None:
        e = self._get(engine)
        e.ttft_ema = self._ema(e.ttft_ema, seconds)
        self._changed(engine)

    def succeeded(self, permit: Permit, latency_s: float | None = None) -> None:
        """The engine served the request (a stream cancelled by its client after the first
        text counts too: the engine was answering); `latency_s` None = not a full stream."""
        if not self._resolve(permit):
            return
        e = self._get(permit.engine)
        if latency_s is not None:
            e.latency_ema = self._ema(e.latency_ema, latency_s)
        if permit.probe and e.state is BreakerState.HALF_OPEN:
            e.state, e.probe_out = BreakerState.CLOSED, False
            e.outcomes.clear()
        e.outcomes.append(self.clock(), True)
        self._changed(permit.engine)

    def failed(self, permit: Permit) -> None:
        """The engine failed the request (an error code fallback applies to, a timeout, a
        stream cut short)."""
        if not self._resolve(permit):
            return
        e = self._get(permit.engine)
        now = self.clock()
        e.outcomes.append(now, False)
        if permit.probe and e.state is BreakerState.HALF_OPEN:
            e.state, e.opened_at, e.probe_out = BreakerState.OPEN, now, False
        elif e.state is BreakerState.CLOSED:
            calls, errors = self._window(e, now)
            if calls >= self._cfg.min_calls and errors / calls >= self._cfg.error_rate:
                e.state, e.opened_at = BreakerState.OPEN, now
        self._changed(permit.engine)

    def released(self, permit: Permit) -> None:
        """The request ended saying nothing about the engine (the client went away before
        the first text; the request itself was bad): a probe slot is freed."""
        if not self._resolve(permit):
            return
        e = self._get(permit.engine)
        if permit.probe and e.state is BreakerState.HALF_OPEN:
            e.probe_out = False

    def snapshot(self, engine: str | None = None) -> dict[str, EngineSnapshot]:
        """Every engine seen so far (or just `engine`); reading never moves a breaker."""
        now = self.clock()
        names = [engine] if engine is not None else list(self._engines)
        return {n: self._snapshot(n, self._get(n), now) for n in names}

    def _snapshot(self, name: str, e: _Engine, now: float) -> EngineSnapshot:
        calls, errors = self._window(e, now)
        retry_in = None
        if e.state is BreakerState.OPEN:
            retry_in = max(0.0, e.opened_at + self._cfg.cooldown_s - now)
        available = (
            e.state is BreakerState.CLOSED
            or (e.state is BreakerState.OPEN and retry_in == 0.0)
            or (e.state is BreakerState.HALF_OPEN and not e.probe_out)
        )
        return EngineSnapshot(
            engine=name,
            state=e.state,
            available=available,
            calls=calls,
            error_rate=errors / calls if calls else 0.0,
            ttft_ema_s=e.ttft_ema,
            latency_ema_s=e.latency_ema,
            retry_in_s=retry_in,
        )

    def _window(self, e: _Engine, now: float) -> tuple[int, int]:
        e.outcomes.expire(now - self._cfg.window_s)
        return len(e.outcomes), e.outcomes.errors

    def _ema(self, prev: float | None, sample: float) -> float:
        return sample if prev is None else self._alpha * sample + (1 - self._alpha) * prev

    @staticmethod
    def _resolve(permit: Permit) -> bool:
        if permit.done:
            return False
        permit.done = True
        return True

    def _changed(self, engine: str) -> None:
        if self._listener is not None:
            self._listener(self._snapshot(engine, self._engines[engine], self.clock()))


# ---------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class RoutingInput:
    """Everything a rule may look at."""

    route_class: str
    #: the caller's tier (free, paid, enterprise); "" when unauthenticated
    tier: str
    hints: RoutingHints
    #: by engine id; an engine missing from it has not been used yet
    health: Mapping[str, EngineSnapshot]
    #: role -> engine id
    roles: Mapping[str, str]
    #: the route class's configured engine (the default rule's choice)
    default_engine: str


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str
    engine: str
    #: tried in order when `engine` fails before its first text
    fallbacks: tuple[str, ...] = ()


def _resolve(inp: RoutingInput, engine: str, fallback_roles: Sequence[str]) -> tuple[str, ...]:
    """Fallback roles as engine ids: unique, and without the chosen engine."""
    engines = [inp.roles[r] for r in fallback_roles]
    return tuple(e for e in dict.fromkeys(engines) if e != engine)


_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: unique; labels the decisions metric and request.notes["rule"]
    name: str = Field(pattern=_NAME)
    #: roles tried in order when the chosen engine fails before its first text
    fallbacks: tuple[str, ...] = ()
    #: judge a small-role answer by its mean log-probability and maybe ask primary (see EscalationConfig)
    escalate: bool = False

    def roles_used(self) -> list[tuple[str, str]]:
        """(field, role) pairs, for validation."""
        return [(f"fallbacks[{i}]", r) for i, r in enumerate(self.fallbacks)]

    def _to(self, inp: RoutingInput, role: str, fallbacks: Sequence[str] | None = None) -> Decision:
        engine = inp.roles[role]
        return Decision(self.name, engine, _resolve(inp, engine, self.fallbacks if fallbacks is None else fallbacks))


class RouteClassRule(_Rule):
    """Requests of these route classes go to `role`."""

    kind: Literal["route_class"] = "route_class"
    route_classes: tuple[str, ...] = Field(min_length=1)
    role: str

    def roles_used(self) -> list[tuple[str, str]]:
        return [("role", self.role), *super().roles_used()]

    def decide(self, inp: RoutingInput) -> Decision | None:
        return self._to(inp, self.role) if inp.route_class in self.route_classes else None


class UncertaintyRule(_Rule):
    """A request with an uncertainty hint above `above` goes to `high_role`, else to
    `low_role`; no hint, no match."""

    kind: Literal["uncertainty"] = "uncertainty"
    above: float = Field(0.5, ge=0, le=1)
    high_role: str = "primary"
    low_role: str = "small"
    #: fallbacks of the low branch (`fallbacks` are the high branch's)
    low_fallbacks: tuple[str, ...] = ()

    def roles_used(self) -> list[tuple[str, str]]:
        low = [(f"low_fallbacks[{i}]", r) for i, r in enumerate(self.low_fallbacks)]
        return [("high_role", self.high_role), ("low_role", self.low_role), *super().roles_used(), *low]

    def decide(self, inp: RoutingInput) -> Decision | None:
        u = inp.hints.uncertainty
        if u is None:
            return None
        if u > self.above:
            return self._to(inp, self.high_role)
        return self._to(inp, self.low_role, self.low_fallbacks)


class TierQualityRule(_Rule):
    """Callers of these tiers asking for one of these qualities go to `role`."""

    kind: Literal["tier_quality"] = "tier_quality"
    tiers: tuple[str, ...] = Field(("enterprise",), min_length=1)
    qualities: tuple[Quality, ...] = Field((Quality.HIGH,), min_length=1)
    role: str = "best"

    def roles_used(self) -> list[tuple[str, str]]:
        return [("role", self.role), *super().roles_used()]

    def decide(self, inp: RoutingInput) -> Decision | None:
        if inp.tier in self.tiers and inp.hints.quality in self.qualities:
            return self._to(inp, self.role)
        return None


class LatencyBudgetRule(_Rule):
    """A latency budget under `below_ms` goes to the fastest available engine among the
    candidate roles (lowest EMA time to first token; engines not measured yet rank after
    measured ones, in candidate order); the others follow as fallbacks, fastest first,
    engines whose breaker refuses last. `fallbacks` is not used."""

    kind: Literal["latency_budget"] = "latency_budget"
    below_ms: int = Field(1000, ge=1, le=MAX_LATENCY_BUDGET_MS)
    candidates: tuple[str, ...] = Field(("lowlat", "primary", "small"), min_length=1)

    def roles_used(self) -> list[tuple[str, str]]:
        return [(f"candidates[{i}]", r) for i, r in enumerate(self.candidates)] + super().roles_used()

    def decide(self, inp: RoutingInput) -> Decision | None:
        budget = inp.hints.latency_budget_ms
        if budget is None or budget >= self.below_ms:
            return None
        engines = list(dict.fromkeys(inp.roles[r] for r in self.candidates))

        def key(item: tuple[int, str]) -> tuple[bool, float, int]:
            i, engine = item
            snap = inp.health.get(engine)
            available = snap is None or snap.available
            ttft = snap.ttft_ema_s if snap is not None and snap.ttft_ema_s is not None else math.inf
            return (not available, ttft, i)

        ranked = [e for _, e in sorted(enumerate(engines), key=key)]
        return Decision(self.name, ranked[0], tuple(ranked[1:]))


Rule = Annotated[
    RouteClassRule | UncertaintyRule | TierQualityRule | LatencyBudgetRule,
    Field(discriminator="kind"),
]


def default_decision(inp: RoutingInput, fallback_roles: Sequence[str]) -> Decision:
    """The rule after the configured ones: the route class's own engine."""
    return Decision("default", inp.default_engine, _resolve(inp, inp.default_engine, fallback_roles))


# ---------------------------------------------------------------- configuration


class EscalationConfig(BaseModel):
    """Re-asking a low-confidence small answer on primary (for rules with escalate: true)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: escalate when the small answer's mean token log-probability (natural log, raw model
    #: distribution) is below this. SmolLM2-135M on 8 short questions: -0.35 .. -0.8 for
    #: fluent answers, -1.1 .. -1.4 for the garbled ones
    threshold: float = Field(-1.0, le=0, ge=-100)
    from_role: str = "small"
    to_role: str = "primary"


def _default_roles() -> dict[str, str]:
    return {"primary": "vllm", "lowlat": "vllm", "best": "vllm", "small": "small"}


def _default_rules() -> tuple[Rule, ...]:
    return (
        TierQualityRule(name="enterprise_high_quality", role="best", fallbacks=("primary", "small")),
        LatencyBudgetRule(name="latency_budget", below_ms=1000, candidates=("lowlat", "primary", "small")),
        UncertaintyRule(
            name="uncertainty",
            above=0.5,
            high_role="primary",
            fallbacks=("small",),
            low_role="small",
            low_fallbacks=("primary",),
            escalate=True,
        ),
        RouteClassRule(name="rag_long", route_classes=("rag_long",), role="primary", fallbacks=("small",)),
        RouteClassRule(name="chat_short", route_classes=("chat_short",), role="lowlat", fallbacks=("primary", "small")),
    )


DEFAULT_FALLBACK_ON = (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.NOT_FOUND)


class RoutingConfig(BaseModel):
    """Roles, rules (first match wins; the route class's engine is the default), health,
    fallback and escalation. Seed rules, most specific first: enterprise tier asking high
    quality -> best; a latency budget under 1 s -> the fastest available engine; an
    uncertainty hint above 0.5 -> primary, else small (escalated when unsure); route class
    rag_long -> primary; chat_short -> lowlat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: role -> engine id in the inference service; several roles may share an engine
    roles: dict[str, str] = Field(default_factory=_default_roles, min_length=1)
    rules: tuple[Rule, ...] = Field(default_factory=_default_rules)
    #: the default rule's fallback roles
    default_fallbacks: tuple[str, ...] = ("primary", "small")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    #: weight of the newest sample in the latency EMAs, in (0, 1]
    ema_alpha: float = Field(0.2, gt=0, le=1)
    #: an attempt without text (or the final chunk) this long is abandoned for the next engine; None = never
    ttft_timeout_s: float | None = Field(20.0, gt=0, le=3600)
    #: error codes (before the first text) that move a request to the next engine. NOT_FOUND:
    #: the inference service has no such engine (a role mapped to one this deployment lacks)
    fallback_on: tuple[Code, ...] = DEFAULT_FALLBACK_ON
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)

    @model_validator(mode="after")
    def _references(self) -> RoutingConfig:
        bad: list[str] = []
        for role, engine in self.roles.items():
            if not _matches(_NAME, role):
                bad.append(f"roles.{role}: role names are lower-case words ({_NAME})")
            if not _matches(r"^[a-z][a-z0-9-]{0,62}$", engine):
                bad.append(f"roles.{role}: {engine!r} is not an engine id")
        known = ", ".join(sorted(self.roles))
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen or rule.name == "default":
                bad.append(f"rules[{i}].name: {rule.name!r} is used twice (or is the reserved 'default')")
            seen.add(rule.name)
            for where, role in rule.roles_used():
                if role not in self.roles:
                    bad.append(f"rules[{i}].{where}: {role!r} is not a role; roles: {known}")
        for i, role in enumerate(self.default_fallbacks):
            if role not in self.roles:
                bad.append(f"default_fallbacks[{i}]: {role!r} is not a role; roles: {known}")
        for where in ("from_role", "to_role"):
            role = getattr(self.escalation, where)
            if role not in self.roles:
                bad.append(f"escalation.{where}: {role!r} is not a role; roles: {known}")
        if bad:
            raise ValueError("; ".join(bad))
        return self

    def route_class_violations(self, route_classes: Collection[str]) -> list[str]:
        """Route classes the rules name that the gateway does not have (for its settings check)."""
        return [
            f"routing.rules[{i}].route_classes[{j}]: {rc!r} is not a route class; use one of {sorted(route_classes)}"
            for i, rule in enumerate(self.rules)
            if isinstance(rule, RouteClassRule)
            for j, rc in enumerate(rule.route_classes)
            if rc not in route_classes
        ]


def _matches(pattern: str, value: str) -> bool:
    return re.match(pattern, value) is not None


# ---------------------------------------------------------------- metrics


BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class RoutingMetrics:
    """Routing decisions, fallbacks, breakers, escalations and cut streams. Labels are
    configured rule names, engine ids, and fixed reason sets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "servemesh_gateway_routing_decisions_total",
            "Requests routed, by the rule that matched and the engine it chose.",
            ["rule", "engine"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "servemesh_gateway_fallbacks_total",
            "Requests moved off an engine before their first text, by why; to_engine is 'none' "
            "when no engine was left.",
            ["from_engine", "to_engine", "reason"],
            registry=registry,
        )
        self.breaker = Gauge(
            "servemesh_gateway_breaker_state",
            "Circuit breaker of each engine: 0 closed, 1 half-open (one probe allowed), 2 open.",
            ["engine"],
            registry=registry,
        )
        self.error_rate = Gauge(
            "servemesh_gateway_engine_error_rate",
            "Failed / all requests of each engine over the breaker's window.",
            ["engine"],
            registry=registry,
        )
        self.ttft_ema = Gauge(
            "servemesh_gateway_engine_ttft_ema_seconds",
            "Exponential moving average of each engine's time to first text, as the gateway measures it.",
            ["engine"],
            registry=registry,
        )
        self.escalations = Counter(
            "servemesh_gateway_escalations_total",
            "Low-confidence small answers asked again on another engine; outcome 'served' (it "
            "started answering) or 'target_failed' (the small answer was served after all).",
            ["from_engine", "to_engine", "outcome"],
            registry=registry,
        )
        self.partial = Counter(
            "servemesh_gateway_partial_outputs_total",
            "Streams that failed after their first text (ended with UNAVAILABLE, partial_output).",
            ["engine"],
            registry=registry,
        )

    def decided(self, rule: str, engine: str) -> None:
        self.decisions.labels(rule, engine).inc()

    def fell_back(self, from_engine: str, to_engine: str, reason: str) -> None:
        self.fallbacks.labels(from_engine, to_engine, reason).inc()

    def engine(self, snap: EngineSnapshot) -> None:
        self.breaker.labels(snap.engine).set(BREAKER_GAUGE[snap.state])
        self.error_rate.labels(snap.engine).set(snap.error_rate)
        if snap.ttft_ema_s is not None:
            self.ttft_ema.labels(snap.engine).set(snap.ttft_ema_s)

    def escalated(self, from_engine: str, to_engine: str, outcome: str) -> None:
        self.escalations.labels(from_engine, to_engine, outcome).inc()

    def cut_short(self, engine: str) -> None:
        self.partial.labels(engine).inc()


# ---------------------------------------------------------------- the router and the policy


@dataclass(frozen=True, slots=True)
class Escalation:
    from_engine: str
    to_engine: str
    threshold: float


class Router:
    """The configured rules over an EngineHealth; shared by RuleRouting and ResilientBackend."""

    def __init__(self, config: RoutingConfig, health: EngineHealth) -> None:
        self.config = config
        self.health = health
        self._escalating = {r.name for r in config.rules if r.escalate}

    @classmethod
    def from_config(
        cls,
        config: RoutingConfig,
        metrics: RoutingMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Router:
        listener = metrics.engine if metrics is not None else None
        health = EngineHealth(config.breaker, config.ema_alpha, clock=clock, listener=listener)
        for engine in dict.fromkeys(config.roles.values()):
            health.track(engine)
        return cls(config, health)

    def decide(self, inp: RoutingInput) -> Decision:
        for rule in self.config.rules:
            decision = rule.decide(inp)
            if decision is not None:
                return decision
        return default_decision(inp, self.config.default_fallbacks)

    def escalation(self, rule: str, engine: str) -> Escalation | None:
        """What to do with an answer of `engine` chosen by `rule`: None = stream it as it comes."""
        esc = self.config.escalation
        if not esc.enabled or rule not in self._escalating:
            return None
        small, target = self.config.roles[esc.from_role], self.config.roles[esc.to_role]
        if engine != small or target == small:
            return None
        return Escalation(small, target, esc.threshold)


class RuleRouting(Policy):
    """Choose the engine and its fallbacks by the configured rules (replaces StaticRouting).

    Hints come from `request.hints` (a RoutingHints) once the gateway request has that field;
    without it every request routes as if it gave none."""

    name = "routing"

    def __init__(
        self,
        router: Router,
        route_classes: Mapping[str, RouteClassConfig],
        metrics: RoutingMetrics | None = None,
        hints_field: str = "hints",
    ) -> None:
        self._router = router
        self._classes = route_classes
        self._metrics = metrics
        self._hints_field = hints_field

    def routing_input(self, request: GatewayRequest) -> RoutingInput:
        hints = getattr(request, "hints", None) or RoutingHints()
        return RoutingInput(
            route_class=request.route_class,
            tier=request.principal.tier if request.principal is not None else "",
            hints=hints,
            health=self._router.health.snapshot(),
            roles=self._router.config.roles,
            default_engine=self._classes[request.route_class].engine,
        )

    async def admit(self, request: GatewayRequest) -> None:
        if request.engine:  # chosen earlier in the pipeline (a safety refusal): keep it
            return
        inp = self.routing_input(request)
        bad = hint_violations(inp.hints, self._hints_field)
        if bad:
            raise InvalidArgument(bad)
        decision = self._router.decide(inp)
        request.engine, request.fallbacks = decision.engine, decision.fallbacks
        request.notes["rule"] = decision.rule
        context.annotate(rule=decision.rule)
        if self._metrics is not None:
            self._metrics.decided(decision.rule, decision.engine)


# ---------------------------------------------------------------- the resilient backend


class InnerBackend(Protocol):
    def stream(self, request: GatewayRequest, *, logprobs: bool = False) -> AsyncIterator[Chunk]:
        """As core.Backend; `logprobs` asks for the last chunk's mean_logprob."""
        ...


class _CutShort(Unavailable):
    """The stream failed after text went out: UNAVAILABLE with partial_output metadata."""


class _Failed(Exception):
    """One attempt failed in a way that moves the request to the next engine."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ResilientBackend:
    """Fallback before the first text, an explicit error after it, health reporting and
    escalation around an inner backend (see the module docstring). Closing the stream
    closes the inner stream at once, which is what aborts the engine's work.

    Engines come from `request.engine` and `request.fallbacks`; whether to escalate from the
    rule RuleRouting noted in `request.notes["rule"]`. `request.engine` and `request.served`
    end up naming the engine that actually served."""

    def __init__(self, inner: InnerBackend, router: Router, metrics: RoutingMetrics | None = None) -> None:
        self._inner = inner
        self._router = router
        self._health = router.health
        self._metrics = metrics
        cfg = router.config
        self._ttft_timeout = cfg.ttft_timeout_s
        self._fallback_on = frozenset(cfg.fallback_on)

    async def stream(self, request: GatewayRequest) -> AsyncIterator[Chunk]:
        plan = self._router.escalation(request.notes.get("rule", ""), request.engine)
        try:
            if plan is None:
                async with contextlib.aclosing(self._serve(request, (request.engine, *request.fallbacks))) as s:
                    async for chunk in s:
                        yield chunk
            else:
                async with contextlib.aclosing(self._escalating(request, plan)) as s:
                    async for chunk in s:
                        yield chunk
        except _CutShort as exc:
            if self._metrics is not None:
                self._metrics.cut_short(exc.metadata.get("engine", ""))
            raise

    # -- one engine after another

    async def _serve(
        self, request: GatewayRequest, engines: Sequence[str], logprobs_on: str | None = None
    ) -> AsyncIterator[Chunk]:
        """Try `engines` in order until one gets to its first text; relay that one."""
        failures: list[str] = []
        pending: list[tuple[str, str]] = []  # (engine, reason) waiting for the engine tried next
        retry_in: list[float] = []
        for engine in dict.fromkeys(engines):
            permit = self._health.acquire(engine)
            if permit is None:
                snap = self._health.snapshot(engine)[engine]
                retry_in.append(snap.retry_in_s or 1.0)
                failures.append(f"{engine}: circuit open")
                pending.append((engine, "breaker_open"))
                continue
            self._moved(pending, engine, request)
            retry_in.append(1.0)
            try:
                async with contextlib.aclosing(self._attempt(request, permit, engine == logprobs_on)) as attempt:
                    async for chunk in attempt:
                        yield chunk
                return
            except _Failed as exc:
                failures.append(f"{engine}: {exc}")
                pending.append((engine, exc.reason))
        self._moved(pending, "none", request)
        raise Unavailable(
            "no engine could serve the request: " + "; ".join(failures),
            retry_after=max(1.0, min(retry_in, default=1.0)),
            metadata={"engines": ",".join(dict.fromkeys(engines))},
        )

    def _moved(self, pending: list[tuple[str, str]], to: str, request: GatewayRequest) -> None:
        for engine, reason in pending:
            if self._metrics is not None:
                self._metrics.fell_back(engine, to, reason)
            note = request.notes.get("fallback")
            request.notes["fallback"] = f"{note},{engine}:{reason}" if note else f"{engine}:{reason}"
        pending.clear()

    async def _attempt(self, request: GatewayRequest, permit: Permit, logprobs: bool) -> AsyncIterator[Chunk]:
        """One engine: raise _Failed before the first text; after it, relay or end with _CutShort."""
        engine = permit.engine
        request.engine = engine
        _clear(request)
        clock = self._health.clock
        started = clock()
        inner = self._inner.stream(request, logprobs=True) if logprobs else self._inner.stream(request)
        committed = False
        try:
            held = await self._until_first_text(permit, inner)
            committed = True
            self._health.observe_ttft(engine, clock() - started)
            context.annotate(engine=engine)
            final: Chunk | None = None
            sent = 0
            try:
                for chunk in held:
                    if chunk.finish_reason is not None:
                        final = chunk
                    else:
                        sent += len(chunk.text)
                        yield chunk
                async for chunk in inner:
                    if final is not None:
                        continue  # nothing follows the last chunk; drain so the backend reads its trailers
                    if chunk.finish_reason is not None:
                        final = chunk
                    else:
                        sent += len(chunk.text)
                        yield chunk
            except ServiceError as exc:
                if final is None:
                    raise self._cut_short(permit, sent, exc.code.value.lower(), exc.message) from exc
                # the answer was complete: an error in the backend's epilogue does not spoil it
            if final is None:
                raise self._cut_short(permit, sent, "ended_early", "the stream ended without its last chunk")
            self._health.succeeded(permit, clock() - started)
            yield final
        except GeneratorExit:
            # The client went away: the engine served well if it had started answering.
            if committed:
                self._health.succeeded(permit)
            else:
                self._health.released(permit)
            raise
        except BaseException:
            if not permit.done:  # cancelled, or an error that says nothing about the engine
                (self._health.succeeded if committed else self._health.released)(permit)
            raise
        finally:
            await inner.aclose()  # type: ignore[attr-defined]

    async def _until_first_text(self, permit: Permit, inner: AsyncIterator[Chunk]) -> list[Chunk]:
        """Chunks up to and including the first with text (or the last one); _Failed when the
        engine fails, times out or ends first."""
        held: list[Chunk] = []
        try:
            async with asyncio.timeout(self._ttft_timeout):
                async for chunk in inner:
                    held.append(chunk)
                    if chunk.text or chunk.finish_reason is not None:
                        return held
        except TimeoutError:
            self._health.failed(permit)
            raise _Failed("timeout", f"no text within {self._ttft_timeout:g} s") from None
        except ServiceError as exc:
            if exc.code not in self._fallback_on or _caller_out_of_time(exc):
                self._health.released(permit)
                raise
            self._health.failed(permit)
            raise _Failed(exc.code.value.lower(), f"{exc.code.value} ({exc.message})") from None
        self._health.failed(permit)
        raise _Failed("ended_early", "the stream ended before any text")

    def _cut_short(self, permit: Permit, sent: int, reason: str, detail: str) -> _CutShort:
        self._health.failed(permit)
        return _CutShort(
            f"engine {permit.engine} failed after {sent} characters were sent ({detail}); the output is incomplete",
            retry_after=1.0,
            metadata={"partial_output": "true", "engine": permit.engine, "chars_sent": str(sent), "reason": reason},
        )

    # -- escalation

    async def _escalating(self, request: GatewayRequest, plan: Escalation) -> AsyncIterator[Chunk]:
        """Buffer the small engine's answer; serve it if confident enough, else ask the target."""
        buffered: list[Chunk] = []
        small_failed = False
        engines = (request.engine, *request.fallbacks)
        try:
            async with contextlib.aclosing(self._serve(request, engines, logprobs_on=plan.from_engine)) as s:
                async for chunk in s:
                    if request.engine != plan.from_engine:  # a fallback serves: nothing to judge
                        yield chunk
                    else:
                        buffered.append(chunk)
        except _CutShort:
            if request.engine != plan.from_engine:
                raise
            small_failed = True  # nothing went out yet: the client need not know
        if request.engine != plan.from_engine:
            return
        mean = buffered[-1].mean_logprob if buffered and not small_failed else None
        if not small_failed:
            if mean is None:
                request.notes["escalation"] = "skipped: the engine reported no logprobs"
            else:
                request.notes["mean_logprob"] = f"{mean:.4f}"
            if mean is None or mean >= plan.threshold:
                for chunk in buffered:
                    yield chunk
                return
        reason = "small answer failed" if small_failed else f"mean_logprob {mean:.3f} < {plan.threshold:g}"
        request.notes["escalated"] = f"{plan.from_engine}->{plan.to_engine} ({reason})"
        saved = (request.engine, request.served.engine, request.served.model, request.served.engine_ttft_ms)
        if small_failed:  # no answer to fall back on: the rule's other engines may serve
            targets: tuple[str, ...] = (plan.to_engine, *(e for e in request.fallbacks if e != plan.from_engine))
        else:
            targets = (plan.to_engine,)
        sent_any = False
        try:
            async with contextlib.aclosing(self._serve(request, targets)) as s:
                async for chunk in s:
                    if not sent_any and self._metrics is not None:
                        self._metrics.escalated(plan.from_engine, plan.to_engine, "served")
                    sent_any = True
                    yield chunk
        except ServiceError:
            if sent_any or small_failed:
                raise
            # The target could not start: the small answer is still an answer.
            request.engine, request.served.engine, request.served.model, request.served.engine_ttft_ms = saved
            request.notes["escalated"] += ", target failed: served the small answer"
            if self._metrics is not None:
                self._metrics.escalated(plan.from_engine, plan.to_engine, "target_failed")
            for chunk in buffered:
                yield chunk


def _clear(request: GatewayRequest) -> None:
    request.served.engine = request.served.model = request.served.engine_ttft_ms = ""


def _caller_out_of_time(exc: ServiceError) -> bool:
    """A DEADLINE_EXCEEDED because the caller's own deadline passed is no engine's fault."""
    remaining = context.remaining_timeout()
    return exc.code is Code.DEADLINE_EXCEEDED and remaining is not None and remaining <= 0


def engine_snapshots(health: EngineHealth) -> list[dict[str, Any]]:
    """The health snapshot as plain dicts (for the console and debug endpoints)."""
    return [
        {
            "engine": s.engine,
            "state": s.state.value,
            "available": s.available,
            "calls": s.calls,
            "error_rate": s.error_rate,
            "ttft_ema_s": s.ttft_ema_s,
            "latency_ema_s": s.latency_ema_s,
            "retry_in_s": s.retry_in_s,
        }
        for s in health.snapshot().values()
    ]

"""Settings of the gateway service."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.generation import MAX_TOKENS_RANGE, REPETITION_PENALTY_RANGE, TEMPERATURE_RANGE
from services.common.settings import ServiceSettings
from services.gateway.auth import AuthConfig
from services.gateway.cache.config import CacheConfig
from services.gateway.limits.base import LimitsConfig
from services.gateway.rag import RagConfig
from services.gateway.redaction import PiiType
from services.gateway.routing import RoutingConfig


class DecodingDefaults(BaseModel):
    """Applied to a request's unset decoding parameters."""

    model_config = {"extra": "forbid"}

    temperature: float = Field(0.7, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    stop: tuple[str, ...] = ()


class RouteClassConfig(BaseModel):
    """What a route class (chat_short, rag_long, code, ...) maps to."""

    model_config = {"extra": "forbid"}

    #: engine id in the inference service ("vllm", "small", ...)
    engine: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    #: max_tokens when the request sets none
    default_max_tokens: int = Field(256, ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])
    #: a larger requested max_tokens is clamped to this
    max_tokens_limit: int = Field(512, ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])
    #: prompt tokens (chat template and context passages included) a request may send; None = no limit
    max_prompt_tokens: int | None = Field(None, ge=1, le=1_000_000)
    decoding: DecodingDefaults = Field(default_factory=DecodingDefaults)
    #: RAG answers must cite their passages (policy citation_required_rag): an answer that
    #: cites none is marked CITATION_STATUS_MISSING with a notice for the reader
    require_citations: bool = False

    @model_validator(mode="after")
    def _order(self) -> RouteClassConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_limit ({self.max_tokens_limit})"
            )
        return self


def _default_classes() -> dict[str, RouteClassConfig]:
    return {
        "chat_short": RouteClassConfig(
            engine="vllm", default_max_tokens=128, max_tokens_limit=256, max_prompt_tokens=1024
        ),
        "rag_long": RouteClassConfig(
            engine="vllm",
            default_max_tokens=256,
            max_tokens_limit=512,
            max_prompt_tokens=1536,
            require_citations=True,
        ),
        "code": RouteClassConfig(
            engine="vllm",
            default_max_tokens=256,
            max_tokens_limit=512,
            max_prompt_tokens=1536,
            decoding=DecodingDefaults(temperature=0.2),
        ),
    }


class RedactionConfig(BaseModel):
    """PII redaction of every conversation before any engine, log or cache sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: what to redact (all by default)
    types: tuple[PiiType, ...] = tuple(PiiType)
    #: regions whose national phone formats count (numbers written with + always do)
    phone_regions: tuple[str, ...] = ("US", "GB")
    #: also redact what engines write (each answer's first text then waits for 64 characters)
    outputs: bool = False


def _default_refusal_topics() -> dict[str, tuple[str, ...]]:
    return {
        "weapons": (r"\b(build|make|assemble)\b.{0,40}\b(bomb|explosive|nerve agent|bioweapon)s?\b",),
        "malware": (r"\b(write|create|build)\b.{0,40}\b(ransomware|keylogger|computer virus|botnet)\b",),
    }


class SafetyConfig(BaseModel):
    """Requests the gateway refuses with a fixed string instead of asking an engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: the whole answer to a refused request
    refusal: str = Field("I can't help with that request.", min_length=1, max_length=1000)
    #: topic -> regular expressions (case-insensitive) on the user's turns; topics label the metric
    topics: dict[str, tuple[str, ...]] = Field(default_factory=_default_refusal_topics)

    @model_validator(mode="after")
    def _patterns_compile(self) -> SafetyConfig:
        for topic, patterns in self.topics.items():
            for i, pattern in enumerate(patterns):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"topics.{topic}[{i}]: not a regular expression ({exc})") from None
        return self

    def rules(self) -> list[tuple[str, re.Pattern[str]]]:
        return [(t, re.compile(p, re.IGNORECASE | re.DOTALL)) for t, ps in self.topics.items() for p in ps]


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_GATEWAY_", env_nested_delimiter="__", extra="forbid")
    service_name: ClassVar[str] = "gateway"

    port: int = Field(50050, ge=0, le=65535)
    #: host:port of the inference service (in the mesh: the sidecar's outbound listener)
    inference_target: str = "127.0.0.1:50051"
    #: :authority of calls to inference; the sidecar picks the service's routes by it ("" = target)
    inference_authority: str = ""
    #: request headers relayed to inference, so mesh header overrides apply to the whole chain
    forward_headers: tuple[str, ...] = ("x-servemesh-canary",)
    #: the OpenAI-compatible HTTP API: a TCP port (0 = any free one) or a Unix socket; neither = off
    http_port: int | None = Field(None, ge=0, le=65535)
    http_unix_socket: Path | None = None
    #: take the caller's address from x-forwarded-for (set when only a trusted edge Envoy can reach
    #: the gateway, as in the mesh); else the connection's peer address
    trust_forwarded_for: bool = False
    #: this gateway's deployment id in the registry, reported by GetVersion ("" outside one)
    deployment: str = ""
    #: deadline given to a request whose caller set none, in seconds
    default_timeout_s: float = Field(300.0, gt=0, le=3600)
    route_classes: dict[str, RouteClassConfig] = Field(default_factory=_default_classes, min_length=1)
    default_route_class: str = "chat_short"
    redaction: RedactionConfig = Field(default_factory=RedactionConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    #: reported by GetVersion; "" = read from git at start-up
    build_commit: str = ""

    @model_validator(mode="after")
    def _default_known(self) -> GatewaySettings:
        if self.default_route_class not in self.route_classes:
            raise ValueError(
                f"default_route_class: {self.default_route_class!r} is not one of {sorted(self.route_classes)}"
            )
        # Rules naming a class this gateway lacks never match (the seed rules name rag_long,
        # which a deployment may not have): warned about at start-up, not refused.
        return self

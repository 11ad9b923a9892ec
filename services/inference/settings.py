"""Settings of the inference service."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class EngineConfig(BaseModel):
    """One engine this service fronts."""

    model_config = {"extra": "forbid"}

    id: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    kind: Literal["vllm", "trtllm", "small"]
    #: base URL of the OpenAI-compatible server (vllm, trtllm)
    url: str | None = None
    #: model id as the server names it
    model: str = "smollm2-135m-instruct"
    #: prepared model folder: the small engine's weights; the trtllm engine's tokenizer;
    #: when it has a card.json, its hash is reported as the model card hash
    model_dir: Path | None = None
    #: context length (prompt + output) in tokens; must match the server's
    max_model_len: int = Field(2048, ge=128, le=131_072)
    #: small engine only: requests generated at once (the rest queue)
    max_concurrency: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _needs(self) -> EngineConfig:
        if self.kind in ("vllm", "trtllm") and not self.url:
            raise ValueError(f"engine {self.id}: kind {self.kind} needs url")
        if self.kind in ("small", "trtllm") and self.model_dir is None:
            raise ValueError(f"engine {self.id}: kind {self.kind} needs model_dir")
        return self


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_INFERENCE_", env_nested_delimiter="__", extra="forbid")
    service_name: ClassVar[str] = "inference"

    port: int = Field(50051, ge=0, le=65535)
    engines: list[EngineConfig] = Field(default_factory=list, min_length=1)
    #: engine used when a request names none; defaults to the first engine
    default_engine: str | None = None
    #: seconds between background health and metrics probes of every engine
    health_interval_s: float = Field(1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _engines(self) -> InferenceSettings:
        ids = [e.id for e in self.engines]
        if len(set(ids)) != len(ids):
            raise ValueError(f"engines: duplicate engine ids in {ids}")
        if self.default_engine is not None and self.default_engine not in ids:
            raise ValueError(f"default_engine: {self.default_engine!r} is not one of {ids}")
        return self

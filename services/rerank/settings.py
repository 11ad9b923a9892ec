"""Settings of the rerank service."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

ENV_PREFIX = "SERVEMESH_RERANK_"

# Limits the contract (protos/servemesh/rerank/v1/rerank.proto) documents; settings may only tighten them.
MAX_PASSAGES = 200
MAX_PASSAGE_CHARS = 32_768
MAX_QUERY_CHARS = 2_048
MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 512


def _default_embedding_cache_dir() -> Path:
    return Path.home() / ".local" / "share" / "servemesh" / "models" / "onnx"


class RerankSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")
    service_name: ClassVar[str] = "rerank"

    port: int = Field(50054, ge=0, le=65535)
    #: which scorer to run: "cross_encoder" (needs model_dir), "fallback" (offline, what ships),
    #: or "auto": the cross-encoder when model_dir is set, else the fallback
    scorer: Literal["auto", "cross_encoder", "fallback"] = "auto"
    #: a sentence-transformers CrossEncoder folder (config.json, tokenizer, *.safetensors or *.bin),
    #: mounted in production; checked and loaded at start
    model_dir: Path | None = Field(None, validate_default=True)
    #: fallback only: where the MiniLM ONNX export is cached (made once, on first start)
    embedding_cache_dir: Path = Field(default_factory=_default_embedding_cache_dir)
    #: fallback only: "onnx" (default, faster on CPU) or "torch"
    embedding_backend: Literal["onnx", "torch"] = "onnx"
    #: CPU threads one scoring call uses (ONNX Runtime intra-op threads for the fallback;
    #: torch.set_num_threads, process-wide, for the cross-encoder)
    threads: int = Field(2, ge=1, le=256)
    #: passages per forward pass of the model
    batch_size: int = Field(32, ge=1, le=1024)
    #: requests scored at once (each in a worker thread); the rest wait in FIFO order
    max_concurrency: int = Field(1, ge=1, le=64)
    #: fallback only: weight of the bi-encoder cosine; 1 - weight goes to the IDF-weighted term overlap
    fallback_dense_weight: float = Field(0.7, ge=0.0, le=1.0)
    #: request limits (at most what the contract allows)
    max_passages: int = Field(MAX_PASSAGES, ge=1, le=MAX_PASSAGES)
    max_passage_chars: int = Field(MAX_PASSAGE_CHARS, ge=1, le=MAX_PASSAGE_CHARS)
    max_query_chars: int = Field(MAX_QUERY_CHARS, ge=1, le=MAX_QUERY_CHARS)

    @field_validator("embedding_cache_dir")
    @classmethod
    def _expand_cache_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("model_dir")
    @classmethod
    def _model_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            if info.data.get("scorer") == "cross_encoder":
                raise ValueError("required when scorer is cross_encoder (a CrossEncoder model folder)")
            return None
        return value.expanduser()

    def resolved_scorer(self) -> Literal["cross_encoder", "fallback"]:
        """The scorer to load: "auto" means the cross-encoder when model_dir is set, else the fallback."""
        if self.scorer == "auto":
            return "cross_encoder" if self.model_dir is not None else "fallback"
        return self.scorer

"""Settings of the retrieval service."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "servemesh" / "retrieval"


def _default_model_cache() -> Path:
    return Path.home() / ".local" / "share" / "servemesh" / "models" / "onnx"


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_RETRIEVAL_", env_nested_delimiter="__", extra="forbid")
    service_name: ClassVar[str] = "retrieval"

    port: int = Field(50053, ge=0, le=65535)
    #: tenants' corpora and index builds (tenants/<tenant>/indexes/<index>/...)
    data_dir: Path = Field(default_factory=_default_data_dir)
    #: where the embedding model's ONNX export is kept (made once from the packaged weights)
    embedding_cache_dir: Path = Field(default_factory=_default_model_cache)
    #: onnx (fast on CPU) or torch (the reference it is exported from)
    embedding_backend: Literal["onnx", "torch"] = "onnx"
    #: intra-op threads of the embedder
    embedding_threads: int = Field(2, ge=1, le=64)
    embedding_batch_size: int = Field(64, ge=1, le=1024)

    #: mesh mode: the actor of a pin is the caller's SPIFFE id from x-forwarded-client-cert,
    #: which the sidecar sets; off, "anonymous" plus the peer address
    trust_forwarded_identity: bool = False

    # uploads
    #: largest file accepted, in bytes (default 32 MiB)
    max_file_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    #: most files in one IngestDocuments stream
    max_files_per_upload: int = Field(1000, ge=1, le=100_000)

    # builds
    chunk_tokens: int = Field(200, ge=32, le=256)
    chunk_overlap: int = Field(40, ge=0, le=128)
    #: auto: exact inner product (flat) up to exact_max_chunks chunks, HNSW above
    dense_kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    exact_max_chunks: int = Field(20_000, ge=1)
    hnsw_m: int = Field(32, ge=4, le=128)
    hnsw_ef_construction: int = Field(80, ge=8, le=1024)
    hnsw_ef_search: int = Field(64, ge=8, le=4096)
    ivf_nprobe: int = Field(16, ge=1, le=4096)
    #: finished builds kept per index (the current one always is); older ones are pruned
    keep_builds: int = Field(10, ge=1, le=1000)

    # search
    #: hybrid fusion when a request does not choose: rrf or weighted
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = Field(60, ge=1, le=1000)
    #: weighted fusion: share of the dense score (the rest is BM25's)
    dense_weight: float = Field(0.5, ge=0, le=1)
    #: candidates each ranking contributes before fusion (at least top_k)
    fusion_candidates: int = Field(100, ge=10, le=2000)
    #: builds kept loaded in memory (least recently used are dropped)
    loaded_builds: int = Field(16, ge=1, le=1024)

    @model_validator(mode="after")
    def _overlap_fits(self) -> RetrievalSettings:
        if self.chunk_overlap > self.chunk_tokens // 2:
            raise ValueError(f"chunk_overlap must be at most chunk_tokens / 2 ({self.chunk_tokens // 2})")
        return self

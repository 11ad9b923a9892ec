"""Rerank logic: validate the request, score in a worker thread, order the results (no grpc here)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram

from services.common import context
from services.common.errors import FieldViolation, InvalidArgument
from services.rerank.scorers.base import PassageInput, Scorer
from services.rerank.settings import (
    MAX_ID_CHARS,
    MAX_PASSAGE_CHARS,
    MAX_PASSAGES,
    MAX_QUERY_CHARS,
    MAX_TITLE_CHARS,
    RerankSettings,
)

#: at most this many field violations are reported; they travel in the status trailers, whose size is limited
MAX_VIOLATIONS = 20

PASSAGE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 150, 200)
# 1 ms (a few short passages, fallback) .. 60 s (200 long passages through a big cross-encoder on CPU).
SCORE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One scored passage: its id, its position in the request (from 0) and its score."""

    id: str
    index: int
    score: float


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits; the defaults are the contract's."""

    max_passages: int = MAX_PASSAGES
    max_passage_chars: int = MAX_PASSAGE_CHARS
    max_query_chars: int = MAX_QUERY_CHARS
    max_id_chars: int = MAX_ID_CHARS
    max_title_chars: int = MAX_TITLE_CHARS

    @classmethod
    def from_settings(cls, settings: RerankSettings) -> Limits:
        return cls(
            max_passages=settings.max_passages,
            max_passage_chars=settings.max_passage_chars,
            max_query_chars=settings.max_query_chars,
        )


class RerankMetrics:
    """Request sizes and scoring time, labelled by scorer kind (two values)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.passages = Histogram(
            "servemesh_rerank_passages",
            "Passages per valid Rerank request.",
            ["kind"],
            buckets=PASSAGE_BUCKETS,
            registry=registry,
        )
        self.seconds = Histogram(
            "servemesh_rerank_seconds",
            "Time the scorer took for one request (in its worker thread, after any wait for a slot).",
            ["kind"],
            buckets=SCORE_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "servemesh_rerank_queue_wait_seconds",
            "Time a valid request waited for a scoring slot (max_concurrency).",
            ["kind"],
            buckets=SCORE_BUCKETS,
            registry=registry,
        )


def validate(
    query: str, passages: Sequence[PassageInput], top_n: int | None, limits: Limits = Limits()
) -> list[FieldViolation]:
    """Everything wrong with a request, as field violations naming the field and the limit."""
    bad: list[FieldViolation] = []
    if not 1 <= len(query) <= limits.max_query_chars:
        bad.append(FieldViolation("query", f"must be 1 to {limits.max_query_chars} characters"))
    elif query.isspace():
        bad.append(FieldViolation("query", "must not be only whitespace"))
    n = len(passages)
    if n == 0:
        bad.append(FieldViolation("passages", f"must hold 1 to {limits.max_passages} passages"))
    elif n > limits.max_passages:
        bad.append(FieldViolation("passages", f"at most {limits.max_passages} (got {n})"))
    first_index: dict[str, int] = {}
    for i, p in enumerate(passages):
        if not 1 <= len(p.id) <= limits.max_id_chars:
            bad.append(FieldViolation(f"passages[{i}].id", f"must be 1 to {limits.max_id_chars} characters"))
        elif p.id in first_index:
            bad.append(FieldViolation(f"passages[{i}].id", f"duplicate of passages[{first_index[p.id]}].id"))
        else:
            first_index[p.id] = i
        if not 1 <= len(p.text) <= limits.max_passage_chars:
            bad.append(FieldViolation(f"passages[{i}].text", f"must be 1 to {limits.max_passage_chars} characters"))
        elif p.text.isspace():
            bad.append(FieldViolation(f"passages[{i}].text", "must not be only whitespace"))
        if len(p.title) > limits.max_title_chars:
            bad.append(FieldViolation(f"passages[{i}].title", f"must be at most {limits.max_title_chars} characters"))
        if len(bad) > MAX_VIOLATIONS:
            break
    if top_n is not None and n and not 1 <= top_n <= n:
        bad.append(FieldViolation("top_n", f"must be in [1, {n}] (the number of passages), or unset for all"))
    return bad


def order(scores: Sequence[float], passages: Sequence[PassageInput], top_n: int | None = None) -> list[RerankResult]:
    """Results best first; equal scores keep request order; NaN ranks last."""
    safe = [s if not math.isnan(s) else -math.inf for s in scores]
    ranked = sorted(range(len(passages)), key=lambda i: -safe[i])  # sorted() is stable: ties keep request order
    return [RerankResult(passages[i].id, i, safe[i]) for i in ranked[:top_n]]


class RerankCore:
    """Validates Rerank requests and runs the scorer, at most `max_concurrency` calls at once.

    Scoring is CPU-bound and synchronous, so each call runs in a worker thread
    (asyncio.to_thread) and the event loop keeps serving health checks and other calls. A
    cancelled call stops waiting at once, but its thread cannot be interrupted: it keeps its
    slot until it finishes, so the bound holds for the threads actually running.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        limits: Limits = Limits(),
        max_concurrency: int = 1,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._scorer = scorer
        self._limits = limits
        self._slots = asyncio.Semaphore(max_concurrency)
        self._metrics = RerankMetrics(registry if registry is not None else CollectorRegistry())

    @property
    def scorer(self) -> Scorer:
        return self._scorer

    @property
    def limits(self) -> Limits:
        return self._limits

    async def rerank(
        self, query: str, passages: Sequence[PassageInput], top_n: int | None = None
    ) -> list[RerankResult]:
        """The passages scored against the query, best first, `top_n` of them (all if None).

        Raises InvalidArgument (every bad field, with its limit) before any scoring.
        """
        violations = validate(query, passages, top_n, self._limits)
        if violations:
            raise InvalidArgument(violations[:MAX_VIOLATIONS])
        kind = self._scorer.kind.value
        context.annotate(passages=len(passages), scorer=kind, query_sha256=context.prompt_hash(query))
        self._metrics.passages.labels(kind).observe(len(passages))
        scores = await self._score(query, list(passages))
        if len(scores) != len(passages):
            raise RuntimeError(f"scorer {self._scorer.id} returned {len(scores)} scores for {len(passages)} passages")
        return order(scores, passages, top_n)

    async def _score(self, query: str, passages: list[PassageInput]) -> list[float]:
        kind = self._scorer.kind.value
        queued = time.perf_counter()
        await self._slots.acquire()
        self._metrics.queue_seconds.labels(kind).observe(time.perf_counter() - queued)
        try:
            work = asyncio.ensure_future(asyncio.to_thread(self._timed_score, query, passages))
        except BaseException:
            self._slots.release()
            raise
        work.add_done_callback(self._release)
        return await asyncio.shield(work)  # cancelled: stop waiting; the thread keeps its slot until done

    def _timed_score(self, query: str, passages: list[PassageInput]) -> list[float]:
        started = time.perf_counter()
        try:
            return self._scorer.score(query, passages)
        finally:
            self._metrics.seconds.labels(self._scorer.kind.value).observe(time.perf_counter() - started)

    def _release(self, work: asyncio.Future[list[float]]) -> None:
        self._slots.release()
        if not work.cancelled():
            work.exception()  # mark it retrieved: a cancelled caller no longer awaits it, the others get it

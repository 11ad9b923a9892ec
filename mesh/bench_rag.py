"""`servemesh bench rag`: retrieval quality on Cranfield and search speed at 10k and 100k chunks.

Everything runs in this one process, against RetrievalCore itself (services.retrieval.core), so
every figure and the baseline beside it see the same machine at the same time.

Quality (Cranfield, ../shared/data/cranfield): each of the 1,398 non-empty abstracts is ingested as
a text document (id = Cranfield doc id, title = .T, text = .W) and built with the default settings;
the 225 queries run in every mode. Metrics are per document (a document ranks at its best chunk):
nDCG@10 with graded gains (5 - code), recall@100 and MRR. A system's ranking is its top 100 chunks
(the hybrid default's candidates per list, so its first 10 are exactly what a top_k=10 search
returns, and the rerank pool), continued by a 200-chunk search for recall@100. Rerankers reorder
the 100-chunk pool only.

Speed: corpora made from Cranfield sentences (printed with the results):
- real (10k): passages of 2 to 4 consecutive sentences of one abstract (sometimes skipping one),
  embedded for real by the build, which is timed (chunks/s).
- composed (100k): random combinations of 2 to 4 sentences from the whole collection. Embedding
  100k passages would take this CPU about an hour (20-35 chunks/s), so every distinct sentence is embedded for
  real once (cached under $SERVEMESH_HOME/bench/rag) and a passage's vector is the L2-normalised
  mean of its sentences' vectors, handed to the normal build by a wrapper embedder. BM25 indexes
  the real passage text; queries are embedded for real (ONNX) inside every timed search.
Passages are grouped into one document per source abstract, one section (so one chunk) per
passage, stored directly (IndexStore.put_document), then built by RetrievalCore.build.

Search latency is measured around `await core.search(...)` (query embedding, both indexes, fusion,
the worker thread), sequentially, for 225 distinct Cranfield queries after a warm-up, hybrid,
dense-only and sparse-only interleaved query by query. Baselines at the largest size, same queries:
BM25 with rank_bm25 (BM25Okapi over the same tokens: get_scores + argpartition) against bm25s
(the service's SparseIndex), exact (flat) against HNSW dense search over the same vectors, the
query embedding in torch against ONNX, and the hybrid search through an in-process gRPC server.
The parts of a hybrid search are also timed one by one, query by query, beside the whole.

Resident memory of a loaded build is read in a fresh process (`python -m mesh.bench_rag rss`):
VmRSS with the embedder loaded, after loading the build, and after running the queries. This
process's own VmRSS is shown too; it also holds ONNX Runtime's arena, grown by the builds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mesh import cranfield as cf
from mesh.bench import quantile
from services.common.embedding import Embedder
from services.retrieval.core import Hit, Mode, RetrievalCore, Stage
from services.retrieval.models import Document, MediaType, Section
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import IndexStore

TENANT = "bench"
QUALITY_INDEX = f"tenants/{TENANT}/indexes/cranfield"
#: the issue's target, judged at TARGET_CHUNKS
TARGET_P95_MS = 15.0
TARGET_CHUNKS = 100_000
#: corpora up to this many chunks are embedded for real; larger ones are composed (see the module doc)
REAL_MAX_CHUNKS = 20_000
#: the deeper search that continues a ranking past its 100-chunk pool, for recall@100 (the service's max top_k)
DEEP = 200
WARMUP_QUERIES = 20
#: rank_bm25 is ~100x slower than bm25s: timed on this many queries only
RANK_BM25_QUERIES = 60
#: queries whose uncached fallback rerank is timed
RERANK_TIMED_QUERIES = 3
#: a passage stays one chunk: at most this many word pieces (the default chunk is 200)
PASSAGE_MAX_TOKENS = 190
SEED = 20240611
_SENTENCE_END = re.compile(r"(?<=\s[.?!])\s+")


def _ms(samples: Sequence[float], q: float) -> float:
    return quantile(list(samples), q) if samples else float("nan")


@dataclass
class Latency:
    """Milliseconds per call."""

    samples: list[float] = field(default_factory=list)

    def q(self, q: float) -> float:
        return _ms(self.samples, q)

    def summary(self) -> dict[str, float | int]:
        return {"n": len(self.samples), "p50_ms": self.q(0.5), "p95_ms": self.q(0.95), "p99_ms": self.q(0.99)}


# --- memory -------------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so VmRSS shows what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- quality --------------------------------------------------------------------------------------


@dataclass
class QualityRow:
    system: str
    scores: cf.Scores
    note: str = ""


@dataclass
class QualityResult:
    documents: int
    chunks: int
    queries: int
    pool_documents: float  # mean distinct documents in a 100-chunk pool
    build_s: float
    rows: list[QualityRow]
    rerank_ms_per_query: float
    cross_encoder: str = ""  # "" when none was given
    cross_encoder_ms_per_query: float = float("nan")


class _MemoEmbedder:
    """An embedder remembering document vectors by text (the reranker sees the same chunks across queries).

    Seeded with the build's own vectors: the fallback scorer embeds "title\\ntext" of a passage,
    which is exactly the chunk's indexed text the build embedded (same model, same input).
    """

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
        self.memo: dict[str, np.ndarray] = {}

    @property
    def model_sha256(self) -> str:
        return self._inner.model_sha256

    def embed_query(self, text: str) -> np.ndarray:
        return self._inner.embed_query(text)

    def embed_documents(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self._inner.embed_documents(missing, batch_size=batch_size), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else np.empty((0, self._inner.dimensions))


def _reranked(scorer: Any, query: str, hits: Sequence[Hit]) -> list[Hit]:
    from services.rerank.scorers.base import PassageInput

    passages = [PassageInput(h.chunk.chunk_id, h.chunk.text, h.chunk.title) for h in hits]  # as the gateway sends
    scores = scorer.score(query, passages)
    return [hits[i] for i in sorted(range(len(hits)), key=lambda i: (-scores[i], i))]


def _continued(pool: Sequence[Hit], deep: Sequence[Hit]) -> list[str]:
    """Document ranking: the pool's documents in its order, then the deep search's others."""
    return cf.documents_of(h.chunk.document_id for h in itertools.chain(pool, deep))


async def run_quality(
    embedder: Embedder, base: Path, collection: cf.Cranfield, cross_encoder: Path | None, log: Callable[[str], None]
) -> QualityResult:
    from services.rerank.scorers.fallback import FallbackScorer

    settings = RetrievalSettings(data_dir=base / "quality", port=0)
    store = IndexStore(settings.data_dir)
    core = RetrievalCore(settings, store, embedder)
    log(f"quality: ingesting {len(collection.abstracts)} Cranfield abstracts ...")
    await cf.ingest(core, QUALITY_INDEX, collection)
    log("quality: building (chunking, embedding for real, FAISS + BM25) ...")
    started = time.perf_counter()
    manifest = await cf.build(core, QUALITY_INDEX, reason="bench rag: quality")
    build_s = time.perf_counter() - started
    queries = collection.judged()
    log(f"quality: {manifest.counts.chunks} chunks in {build_s:.0f} s; running {len(queries)} queries per system ...")

    systems = [
        ("BM25 (sparse)", Mode.SPARSE, None),
        ("dense (MiniLM, exact)", Mode.DENSE, None),
        ("hybrid RRF", Mode.HYBRID, "rrf"),
        ("hybrid weighted", Mode.HYBRID, "weighted"),
    ]
    rows: list[QualityRow] = []
    pools: dict[str, dict[int, list[Hit]]] = {}
    deeps: dict[str, dict[int, list[Hit]]] = {}
    for name, mode, fusion in systems:
        pools[name] = await cf.search_all(core, QUALITY_INDEX, queries, mode, fusion)
        deeps[name] = await cf.search_all(core, QUALITY_INDEX, queries, mode, fusion, top_k=DEEP)
        ranking = {n: _continued(pools[name][n], deeps[name][n]) for n in pools[name]}
        rows.append(QualityRow(name, cf.evaluate(ranking, collection.qrels)))
    hybrid_pool, hybrid_deep = pools["hybrid RRF"], deeps["hybrid RRF"]
    pool_documents = statistics.fmean(
        len(cf.documents_of(h.chunk.document_id for h in p)) for p in hybrid_pool.values()
    )
    text = {q.number: q.text for q in queries}

    # the fallback scorer, its passage vectors taken from the build (same text, same model)
    tenant, idx = TENANT, "cranfield"
    build_dir = store.build_path(tenant, idx, manifest.manifest_id)
    vectors = np.load(build_dir / "dense" / "vectors.npy")
    memo = _MemoEmbedder(embedder)
    with (build_dir / "chunks.jsonl").open(encoding="utf-8") as f:
        for row, line in enumerate(f):
            c = json.loads(line)
            memo.memo[f"{c['title']}\n{c['text']}" if c["title"] else c["text"]] = vectors[row]
    fallback = FallbackScorer(memo)
    log("quality: reranking each query's 100 hybrid candidates with the fallback scorer ...")
    reranked = {n: _reranked(fallback, text[n], hybrid_pool[n]) for n in hybrid_pool}
    rows.append(
        QualityRow(
            "hybrid RRF + fallback rerank",
            cf.evaluate({n: _continued(reranked[n], hybrid_deep[n]) for n in reranked}, collection.qrels),
            "MiniLM cosine of the whole passage + IDF term overlap over the 100 candidates",
        )
    )
    uncached = FallbackScorer(embedder)  # what one rerank call really costs, passages embedded afresh
    rerank_ms = Latency()
    for q in queries[:RERANK_TIMED_QUERIES]:
        started = time.perf_counter()
        _reranked(uncached, q.text, hybrid_pool[q.number])
        rerank_ms.samples.append((time.perf_counter() - started) * 1e3)

    result = QualityResult(
        documents=manifest.counts.documents,
        chunks=manifest.counts.chunks,
        queries=len(queries),
        pool_documents=pool_documents,
        build_s=build_s,
        rows=rows,
        rerank_ms_per_query=rerank_ms.q(0.5),
    )
    if cross_encoder is not None:
        from services.rerank.scorers.cross_encoder import CrossEncoderScorer

        scorer = CrossEncoderScorer.load(cross_encoder, threads=2)
        log(f"quality: reranking with the cross-encoder {scorer.id} ...")
        ce_ms = Latency()
        ranked: dict[int, list[Hit]] = {}
        for n, hits in hybrid_pool.items():
            started = time.perf_counter()
            ranked[n] = _reranked(scorer, text[n], hits)
            ce_ms.samples.append((time.perf_counter() - started) * 1e3)
        rows.append(
            QualityRow(
                f"hybrid RRF + cross-encoder ({scorer.id})",
                cf.evaluate({n: _continued(ranked[n], hybrid_deep[n]) for n in ranked}, collection.qrels),
                f"weights sha256 {scorer.model_sha256[:12]}",
            )
        )
        result.cross_encoder = scorer.id
        result.cross_encoder_ms_per_query = ce_ms.q(0.5)
    return result


# --- speed corpora ----------------------------------------------------------------------------------


def sentences(text: str) -> list[str]:
    """Sentences of a Cranfield abstract (they end in " ."), of 4 words or more."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if len(s.split()) >= 4]


@dataclass
class SentencePool:
    """Every distinct sentence of the collection, with the abstract it first appears in."""

    texts: list[str]
    source: list[int]  # index into collection.abstracts
    tokens: list[int]  # word pieces (MiniLM tokenizer, no special tokens)
    by_abstract: list[list[int]]  # sentence ids of each abstract, in order

    @classmethod
    def of(cls, collection: cf.Cranfield) -> SentencePool:
        from services.retrieval.ingest.chunking import minilm_tokenizer

        ids: dict[str, int] = {}
        source: list[int] = []
        by_abstract: list[list[int]] = []
        for a, abstract in enumerate(collection.abstracts):
            mine = []
            for s in sentences(abstract.text):
                if s not in ids:
                    ids[s] = len(ids)
                    source.append(a)
                mine.append(ids[s])
            by_abstract.append(mine)
        texts = list(ids)
        encodings = minilm_tokenizer().encode_batch(texts, add_special_tokens=False)
        return cls(texts, source, [len(e.ids) for e in encodings], by_abstract)


@dataclass
class Corpus:
    size: int
    kind: str  # "real" or "composed"
    passages: list[tuple[int, ...]]  # sentence ids of each passage
    how: str

    def text(self, pool: SentencePool, p: int) -> str:
        return " ".join(pool.texts[s] for s in self.passages[p])


def make_corpus(pool: SentencePool, size: int, seed: int = SEED) -> Corpus:
    """`size` distinct passages of 2-4 sentences (deterministic): consecutive-ish within one abstract
    up to REAL_MAX_CHUNKS, random combinations from the whole collection above."""
    rng = random.Random(f"{seed}-{size}")
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    real = size <= REAL_MAX_CHUNKS
    starts = [(a, i) for a, ids in enumerate(pool.by_abstract) for i in range(len(ids) - 1)]
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > 50 * size:
            raise RuntimeError(f"could not make {size} distinct passages from {len(pool.texts)} sentences")
        length = rng.randint(2, 4)
        if real:
            a, i = rng.choice(starts)
            window = pool.by_abstract[a][i : i + length + 1]
            if len(window) > 2 and rng.random() < 0.3:  # consecutive-ish: leave one sentence out
                del window[rng.randrange(1, len(window))]
            ids = tuple(window[:length])
            if len(ids) < 2:
                continue
        else:
            ids = tuple(rng.sample(range(len(pool.texts)), length))
        if ids in seen or sum(pool.tokens[s] for s in ids) > PASSAGE_MAX_TOKENS:
            continue
        seen.add(ids)
        out.append(ids)
    if real:
        how = (
            f"{size:,} passages of 2-4 consecutive sentences of one Cranfield abstract (30% skip one), "
            "embedded for real by the build"
        )
    else:
        how = (
            f"{size:,} random combinations of 2-4 of the {len(pool.texts):,} distinct Cranfield sentences; "
            "vector = normalised mean of its sentences' real embeddings; BM25 on the real text"
        )
    return Corpus(size, "real" if real else "composed", out, how)


def corpus_documents(pool: SentencePool, corpus: Corpus, collection: cf.Cranfield) -> list[Document]:
    """One document per source abstract (its title), one section (so one chunk) per passage."""
    groups: dict[int, list[int]] = {}
    for p, ids in enumerate(corpus.passages):
        groups.setdefault(pool.source[ids[0]], []).append(p)
    docs = []
    for a, passages in sorted(groups.items()):
        parts, sections, at = [], [], 0
        for p in passages:
            text = corpus.text(pool, p)
            if parts:
                at += 2
            sections.append(Section((), at, at + len(text)))
            parts.append(text)
            at += len(text)
        body = "\n\n".join(parts)
        abstract = collection.abstracts[a]
        docs.append(
            Document(
                document_id=f"{corpus.kind}-{abstract.doc_id}",
                filename=f"{corpus.kind}-{abstract.doc_id}.txt",
                title=abstract.title,
                text=body,
                sections=tuple(sections),
                media_type=MediaType.TEXT,
                content_sha256=hashlib.sha256(body.encode()).hexdigest(),
            )
        )
    return docs


def sentence_vectors(
    embedder: Embedder, pool: SentencePool, cache_dir: Path, log: Callable[[str], None]
) -> tuple[np.ndarray, float]:
    """Real embeddings of every distinct sentence, cached on disk by model and sentences; and the
    seconds spent embedding them (0 when they came from the cache)."""
    key = hashlib.sha256("\n".join([embedder.model_sha256, *pool.texts]).encode()).hexdigest()[:16]
    path = cache_dir / f"sentences-{key}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape == (len(pool.texts), embedder.dimensions):
            log(f"speed: sentence vectors from the cache ({path})")
            return vectors, 0.0
    log(f"speed: embedding {len(pool.texts):,} distinct sentences for real (once; cached in {cache_dir}) ...")
    started = time.perf_counter()
    vectors = embedder.embed_documents(pool.texts)
    took = time.perf_counter() - started
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.save(f, vectors)
    tmp.replace(path)
    return vectors, took


class ComposedEmbedder:
    """Hands the build precomputed passage vectors; queries are embedded for real.

    The build embeds each chunk's indexed text, "title\\npassage"; the passage is looked up.
    """

    def __init__(self, real: Embedder, by_text: dict[str, int], vectors: np.ndarray) -> None:
        self._real = real
        self._by_text = by_text
        self._vectors = vectors

    @property
    def model_id(self) -> str:
        return self._real.model_id

    @property
    def model_sha256(self) -> str:
        return self._real.model_sha256

    @property
    def dimensions(self) -> int:
        return self._real.dimensions

    def embed_query(self, text: str) -> np.ndarray:
        return self._real.embed_query(text)

    def embed_documents(
        self, texts: Sequence[str], *, batch_size: int = 64, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        try:
            rows = [self._by_text[t.rpartition("\n")[2]] for t in texts]
        except KeyError as exc:
            raise RuntimeError(f"a chunk is not one of the composed passages (was a passage split?): {exc}") from None
        if progress is not None:
            progress(len(texts))
        return self._vectors[rows]


def composed_vectors(corpus: Corpus, sentence_vecs: np.ndarray) -> np.ndarray:
    out = np.empty((len(corpus.passages), sentence_vecs.shape[1]), dtype=np.float32)
    for p, ids in enumerate(corpus.passages):
        out[p] = sentence_vecs[list(ids)].mean(axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


# --- speed ------------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    size: int
    kind: str
    how: str
    documents: int
    chunks: int
    dense_kind: str
    store_s: float
    build_s: float
    embedding_s: float  # the build's embedding stage (real corpora) or the vector lookup (composed)
    sentence_embedding_s: float  # composed: real embedding of the distinct sentences (0 when cached)
    load_s: float
    #: VmRSS of this benchmark's process after loading the build (it also holds ONNX Runtime's arena,
    #: grown by the builds' embedding batches, and earlier phases' leftovers)
    bench_rss_mb: float
    #: a fresh process (the ONNX embedder loaded) before loading the build, after it, and after
    #: running every query hybrid (which pages in the memory-mapped BM25 matrix it touches)
    fresh_rss_mb: tuple[float, float, float]
    hybrid: Latency
    dense: Latency
    sparse: Latency

    @property
    def build_chunks_per_s(self) -> float:
        """Whole-build throughput (real embeddings only; NaN for composed corpora)."""
        return self.chunks / self.build_s if self.build_s and self.kind == "real" else float("nan")

    @property
    def embedding_chunks_per_s(self) -> float:
        return self.chunks / self.embedding_s if self.embedding_s and self.kind == "real" else float("nan")


@dataclass
class Baselines:
    size: int
    #: per query, one after the other: hybrid (the whole core.search), embed (ONNX query embedding),
    #: hnsw / flat (dense top 100), bm25s (the service's SparseIndex top 100), rrf (fusion of the
    #: service's dense list and bm25s's), thread (asyncio.to_thread of a no-op); then, in a pass of
    #: their own, "bm25s beside rank_bm25" and rank_bm25 (BM25Okapi top 100)
    parts: dict[str, Latency]
    bm25s_index_s: float
    rank_bm25_index_s: float
    bm25_top10_overlap: float
    hnsw_recall10: float
    hnsw_recall100: float
    #: (hybrid straight on the server's core, hybrid via gRPC), query by query in turn
    grpc: tuple[Latency, Latency] | None


@dataclass
class SpeedResult:
    queries: int
    distinct_queries: int
    sentences: int
    sizes: list[SizeResult]
    baselines: Baselines | None
    onnx_query: Latency
    torch_query: Latency | None
    torch_error: str = ""


def _queries(collection: cf.Cranfield, n: int) -> list[str]:
    texts = [q.text for q in collection.queries]
    return [texts[i % len(texts)] for i in range(n)]


async def _timed(call: Callable[[], Any], out: Latency) -> None:
    started = time.perf_counter()
    await call()
    out.samples.append((time.perf_counter() - started) * 1e3)


async def run_size(
    embedder: Embedder,
    base: Path,
    collection: cf.Cranfield,
    pool: SentencePool,
    size: int,
    queries: list[str],
    cache_dir: Path,
    log: Callable[[str], None],
) -> tuple[SizeResult, Path, str]:
    """Build a corpus of `size` chunks, time searches on it; (result, its data dir, its index name)."""
    corpus = make_corpus(pool, size)
    settings = RetrievalSettings(data_dir=base / f"speed-{size}", port=0)
    store = IndexStore(settings.data_dir)
    index = f"tenants/{TENANT}/indexes/speed-{size}"
    idx = f"speed-{size}"
    sentence_s = 0.0
    if corpus.kind == "real":
        build_embedder: Any = embedder
    else:
        vecs, sentence_s = sentence_vectors(embedder, pool, cache_dir, log)
        by_text = {corpus.text(pool, p): p for p in range(size)}
        build_embedder = ComposedEmbedder(embedder, by_text, composed_vectors(corpus, vecs))
    docs = corpus_documents(pool, corpus, collection)
    log(f"speed {size:,}: storing {len(docs):,} documents of {size:,} passages ...")
    started = time.perf_counter()
    for doc in docs:
        await asyncio.to_thread(store.put_document, TENANT, idx, doc)
    store_s = time.perf_counter() - started
    del docs

    log(f"speed {size:,}: building ({corpus.kind}) ...")
    builder = RetrievalCore(settings, store, build_embedder)
    from services.retrieval.core import BuildParams

    stage_at: dict[Stage, float] = {}
    manifest = None
    started = time.perf_counter()
    async for progress in builder.build(index, BuildParams(), actor="bench", reason=f"bench rag: {size} chunks"):
        stage_at.setdefault(progress.stage, time.perf_counter())
        manifest = progress.manifest or manifest
    build_s = time.perf_counter() - started
    assert manifest is not None
    if manifest.counts.chunks != size:
        raise RuntimeError(f"the {size}-passage corpus built into {manifest.counts.chunks} chunks, not one per passage")
    embedding_s = stage_at[Stage.INDEXING] - stage_at[Stage.EMBEDDING]
    del builder, build_embedder
    _release_memory()

    log(f"speed {size:,}: resident memory of the loaded build, in a fresh process ...")
    fresh = await fresh_process_rss(settings.data_dir, index, queries, embedder)
    log(f"speed {size:,}: loading the build and timing {len(queries)} queries per mode ...")
    core = RetrievalCore(settings, store, embedder)
    started = time.perf_counter()
    await core.search(index, "load", top_k=1, mode=Mode.SPARSE)
    load_s = time.perf_counter() - started
    _release_memory()
    bench_rss = rss_mb()
    for q in queries[:WARMUP_QUERIES]:
        for mode in (Mode.HYBRID, Mode.DENSE, Mode.SPARSE):
            await core.search(index, q, top_k=10, mode=mode)
    hybrid, dense, sparse = Latency(), Latency(), Latency()
    for q in queries:  # interleaved, so drift of the machine hits the modes alike
        await _timed(lambda q=q: core.search(index, q, top_k=10, mode=Mode.HYBRID), hybrid)
        await _timed(lambda q=q: core.search(index, q, top_k=10, mode=Mode.DENSE), dense)
        await _timed(lambda q=q: core.search(index, q, top_k=10, mode=Mode.SPARSE), sparse)
    result = SizeResult(
        size=size,
        kind=corpus.kind,
        how=corpus.how,
        documents=manifest.counts.documents,
        chunks=manifest.counts.chunks,
        dense_kind=str(manifest.parameters["dense_kind"]),
        store_s=store_s,
        build_s=build_s,
        embedding_s=embedding_s,
        sentence_embedding_s=sentence_s,
        load_s=load_s,
        bench_rss_mb=bench_rss,
        fresh_rss_mb=fresh,
        hybrid=hybrid,
        dense=dense,
        sparse=sparse,
    )
    return result, settings.data_dir, index


async def fresh_process_rss(
    data_dir: Path, index: str, queries: list[str], embedder: Embedder
) -> tuple[float, float, float]:
    """VmRSS (MiB) of `python -m mesh.bench_rag rss`: embedder loaded, build loaded, queries run."""
    import sys

    cache = embedder.onnx_path.parent.parent if embedder.onnx_path else Path(tempfile.gettempdir())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.bench_rag",
        "rss",
        str(data_dir),
        index,
        str(cache),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(json.dumps(queries).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    before, loaded, queried = json.loads(out.decode().strip().splitlines()[-1])
    return before, loaded, queried


async def _rss_probe(data_dir: Path, index: str, model_cache: Path, queries: list[str]) -> list[float]:
    embedder = Embedder.load(backend="onnx", cache_dir=model_cache, threads=2)
    embedder.embed_query("warm up")
    settings = RetrievalSettings(data_dir=data_dir, port=0)
    core = RetrievalCore(settings, IndexStore(data_dir), embedder)
    _release_memory()
    before = rss_mb()
    await core.search(index, "load", top_k=1, mode=Mode.SPARSE)
    _release_memory()
    loaded = rss_mb()
    for q in queries:
        await core.search(index, q, top_k=10, mode=Mode.HYBRID)
    _release_memory()
    return [before, loaded, rss_mb()]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.argsort(-scores[best], kind="stable")]


async def run_baselines(
    embedder: Embedder,
    size: int,
    data_dir: Path,
    index: str,
    dense_kind: str,
    queries: list[str],
    log: Callable[[str], None],
) -> Baselines:
    import bm25s
    import Stemmer
    from rank_bm25 import BM25Okapi

    from services.retrieval.core import parse_index
    from services.retrieval.index.dense import DenseIndex
    from services.retrieval.index.fusion import rrf
    from services.retrieval.index.sparse import STEMMER_LANGUAGE, STOPWORDS, SparseIndex

    settings = RetrievalSettings(data_dir=data_dir, port=0)
    store = IndexStore(data_dir)
    tenant, idx = parse_index(index)
    manifest_id = store.current(tenant, idx)
    assert manifest_id is not None
    build_dir = store.build_path(tenant, idx, manifest_id)
    core = RetrievalCore(settings, store, embedder)  # the whole search, timed in the same loop as its parts
    n = settings.fusion_candidates  # what a hybrid search asks each index for
    texts = []
    with (build_dir / "chunks.jsonl").open(encoding="utf-8") as f:
        for line in f:
            c = json.loads(line)
            texts.append(f"{c['title']}\n{c['text']}" if c["title"] else c["text"])  # Chunk.indexed_text()
    stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)

    def tokens(items: list[str]) -> list[list[str]]:
        return bm25s.tokenize(
            items, lower=True, stopwords=STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False
        )

    log(f"baselines {size:,}: BM25 index builds, bm25s (the service's) and rank_bm25 ...")
    started = time.perf_counter()
    SparseIndex.build(texts)
    bm25s_index_s = time.perf_counter() - started
    _release_memory()
    started = time.perf_counter()
    okapi = BM25Okapi(tokens(texts))
    rank_index_s = time.perf_counter() - started
    del texts
    sparse = SparseIndex.load(build_dir / "sparse")

    log(f"baselines {size:,}: HNSW and exact (flat) dense indexes over the build's vectors ...")
    vectors = np.load(build_dir / "dense" / "vectors.npy")
    service_dense = DenseIndex.load(build_dir / "dense")
    hnsw = (
        service_dense
        if dense_kind == "hnsw"
        else DenseIndex.build(
            vectors,
            "hnsw",
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            hnsw_ef_search=settings.hnsw_ef_search,
        )
    )
    flat = service_dense if dense_kind == "flat" else DenseIndex.build(vectors, "flat")
    del vectors

    log(f"baselines {size:,}: a hybrid search and its parts one after the other, {len(queries)} queries ...")
    names = ("hybrid", "embed", "hnsw", "flat", "bm25s", "rrf", "thread", "bm25s beside rank_bm25", "rank_bm25")
    parts = {name: Latency() for name in names}
    r10, r100, overlaps = [], [], []

    def clock(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        parts[name].samples.append((time.perf_counter() - started) * 1e3)
        return value

    for i, q in enumerate(itertools.chain(queries[:5], queries)):  # 5 warm-up rounds, then measured
        started = time.perf_counter()
        await core.search(index, q, top_k=10, mode=Mode.HYBRID)
        parts["hybrid"].samples.append((time.perf_counter() - started) * 1e3)
        v = clock("embed", embedder.embed_query, q)
        approx = clock("hnsw", hnsw.search, v, n)
        exact = clock("flat", flat.search, v, n)
        found = clock("bm25s", sparse.search, q, n)
        clock("rrf", rrf, approx if dense_kind == "hnsw" else exact, found, k=settings.rrf_k, top_k=10)
        started = time.perf_counter()
        await asyncio.to_thread(int)  # what handing a search to the worker thread costs
        parts["thread"].samples.append((time.perf_counter() - started) * 1e3)
        if i < 5:
            for lat in parts.values():
                lat.samples.clear()
        else:
            r10.append(len(set(approx[0][:10].tolist()) & set(exact[0][:10].tolist())) / 10)
            r100.append(len(set(approx[0].tolist()) & set(exact[0].tolist())) / n)

    def rank_bm25_top(q: str, okapi: BM25Okapi = okapi) -> np.ndarray:
        return _top(okapi.get_scores(tokens([q])[0]), n)

    few = queries[:RANK_BM25_QUERIES]
    log(f"baselines {size:,}: BM25 search, bm25s vs rank_bm25, {len(few)} queries ...")
    for q in few[:3]:
        sparse.search(q, n)
        rank_bm25_top(q)
    for q in few:  # its own pass: rank_bm25's ~100 ms of Python per query would chill the caches above
        rows, _ = clock("bm25s beside rank_bm25", sparse.search, q, n)
        theirs = clock("rank_bm25", rank_bm25_top, q)
        overlaps.append(len(set(rows[:10].tolist()) & set(theirs[:10].tolist())) / 10)
    del okapi, rank_bm25_top, hnsw, flat, service_dense, core
    _release_memory()

    grpc_ms: tuple[Latency, Latency] | None = None
    try:
        grpc_ms = await _grpc_hybrid(embedder, data_dir, index, queries, log)
    except Exception as exc:  # the RPC column is extra: report, never lose the run
        log(f"baselines {size:,}: gRPC column skipped: {type(exc).__name__}: {exc}")
    return Baselines(
        size=size,
        parts=parts,
        bm25s_index_s=bm25s_index_s,
        rank_bm25_index_s=rank_index_s,
        bm25_top10_overlap=statistics.fmean(overlaps),
        hnsw_recall10=statistics.fmean(r10),
        hnsw_recall100=statistics.fmean(r100),
        grpc=grpc_ms,
    )


async def _grpc_hybrid(
    embedder: Embedder, data_dir: Path, index: str, queries: list[str], log: Callable[[str], None]
) -> tuple[Latency, Latency]:
    """Hybrid search through the retrieval gRPC server (started in this process on a free port) and,
    query by query in turn, straight on that server's core: (in process, via gRPC)."""
    import grpc
    from prometheus_client import CollectorRegistry
    from servemesh.retrieval.v1 import retrieval_pb2 as pb
    from servemesh.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

    from services.retrieval.server import create_retrieval_server

    log(f"baselines: hybrid search through an in-process gRPC server ({index}) ...")
    settings = RetrievalSettings(data_dir=data_dir, port=0)
    server, core = await create_retrieval_server(settings, CollectorRegistry(), embedder=embedder)
    await server.start()
    direct, rpc = Latency(), Latency()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def call(q: str) -> Any:
                return stub.Search(pb.SearchRequest(index=index, query=q, top_k=10, mode=pb.SEARCH_MODE_HYBRID))

            for q in queries[:WARMUP_QUERIES]:
                await call(q)
                await core.search(index, q, top_k=10, mode=Mode.HYBRID)
            for q in queries:
                await _timed(lambda q=q: core.search(index, q, top_k=10, mode=Mode.HYBRID), direct)
                await _timed(lambda q=q: call(q), rpc)
    finally:
        await server.stop(0)
    return direct, rpc


def query_embedding(embedder: Embedder, queries: list[str], cache_dir: Path) -> tuple[Latency, Latency | None, str]:
    """embed_query in ONNX (the service's) and in torch, interleaved query by query."""
    onnx_ms = Latency()
    try:
        eager = Embedder.load(backend="torch", cache_dir=cache_dir, threads=2)
    except Exception as exc:  # torch is the baseline, not the service: report and go on
        for q in queries:
            started = time.perf_counter()
            embedder.embed_query(q)
            onnx_ms.samples.append((time.perf_counter() - started) * 1e3)
        return onnx_ms, None, f"{type(exc).__name__}: {exc}"
    torch_ms = Latency()
    for q in queries[:WARMUP_QUERIES]:
        embedder.embed_query(q)
        eager.embed_query(q)
    for q in queries:
        started = time.perf_counter()
        embedder.embed_query(q)
        onnx_ms.samples.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        eager.embed_query(q)
        torch_ms.samples.append((time.perf_counter() - started) * 1e3)
    return onnx_ms, torch_ms, ""


async def run_speed(
    embedder: Embedder,
    base: Path,
    collection: cf.Cranfield,
    sizes: list[int],
    n_queries: int,
    cache_dir: Path,
    model_cache: Path,
    log: Callable[[str], None],
) -> SpeedResult:
    queries = _queries(collection, n_queries)
    pool = SentencePool.of(collection)
    results: list[SizeResult] = []
    baselines = None
    for size in sorted(sizes):
        result, data_dir, index = await run_size(embedder, base, collection, pool, size, queries, cache_dir, log)
        results.append(result)
        if size == max(sizes):
            baselines = await run_baselines(embedder, size, data_dir, index, result.dense_kind, queries, log)
        _release_memory()
    log("query embedding: ONNX vs torch ...")
    onnx_ms, torch_ms, torch_error = query_embedding(embedder, queries, model_cache)
    return SpeedResult(
        queries=len(queries),
        distinct_queries=len(set(queries)),
        sentences=len(pool.texts),
        sizes=results,
        baselines=baselines,
        onnx_query=onnx_ms,
        torch_query=torch_ms,
        torch_error=torch_error,
    )


# --- report -----------------------------------------------------------------------------------------


def _f(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.1f}x"


def target_verdict(speed: SpeedResult | None) -> tuple[bool | None, float]:
    """(met, hybrid p95 ms) at TARGET_CHUNKS; met is None when that size was not run."""
    for r in speed.sizes if speed else ():
        if r.size == TARGET_CHUNKS:
            p95 = r.hybrid.q(0.95)
            return p95 <= TARGET_P95_MS, p95
    return None, float("nan")


def quality_table(q: QualityResult) -> Table:
    t = Table(
        title=f"Quality on Cranfield: {q.documents:,} abstracts -> {q.chunks:,} chunks (default settings), "
        f"{q.queries} queries, graded qrels, per document",
        title_justify="left",
    )
    for name in ("system", "nDCG@10", "recall@100", "MRR", "Δ nDCG@10 vs hybrid RRF", "note"):
        t.add_column(name, justify="left" if name in ("system", "note") else "right")
    base = next(r for r in q.rows if r.system == "hybrid RRF").scores.ndcg10
    for r in q.rows:
        delta = r.scores.ndcg10 - base
        t.add_row(
            r.system,
            f"{r.scores.ndcg10:.4f}",
            f"{r.scores.recall100:.4f}",
            f"{r.scores.mrr:.4f}",
            "-" if r.system == "hybrid RRF" else f"{delta:+.4f}",
            r.note,
        )
    return t


def sizes_table(speed: SpeedResult) -> Table:
    t = Table(title="Speed corpora (built by RetrievalCore.build, default settings)", title_justify="left")
    for name in (
        "chunks",
        "kind",
        "documents",
        "dense index",
        "store s",
        "build s",
        "build chunks/s",
        "embedding stage chunks/s",
        "load s",
        "fresh process VmRSS MiB: embedder / +build / +queries",
        "bench process VmRSS MiB",
    ):
        t.add_column(name, justify="left" if name in ("kind", "dense index") else "right")
    for r in speed.sizes:
        real = r.kind == "real"
        base, loaded, queried = r.fresh_rss_mb
        t.add_row(
            f"{r.chunks:,}",
            r.kind,
            f"{r.documents:,}",
            r.dense_kind,
            _f(r.store_s, 1),
            _f(r.build_s, 1),
            _f(r.build_chunks_per_s, 1) if real else "- (vectors precomputed)",
            _f(r.embedding_chunks_per_s, 1) if real else "-",
            _f(r.load_s, 1),
            f"{base:.0f} / {loaded - base:+.0f} / {queried - base:+.0f}",
            _f(r.bench_rss_mb, 0),
        )
    return t


def latency_table(speed: SpeedResult) -> Table:
    t = Table(
        title=f"Search latency, ms: await core.search(top_k=10) in process, {speed.queries} queries "
        f"({speed.distinct_queries} distinct Cranfield queries) after {WARMUP_QUERIES} warm-up, "
        "query embedding (ONNX) included",
        title_justify="left",
    )
    for name in ("chunks", "path", "p50", "p95", "p99"):
        t.add_column(name, justify="left" if name == "path" else "right")
    b = speed.baselines
    for r in speed.sizes:
        rows = [
            (f"hybrid RRF ({r.dense_kind} + bm25s)", r.hybrid),
            (f"dense only ({r.dense_kind})", r.dense),
            ("sparse only (bm25s)", r.sparse),
        ]
        if b is not None and b.size == r.size and b.grpc is not None:
            rows += [
                ("hybrid RRF, later run, in process (taking turns with the next row)", b.grpc[0]),
                ("hybrid RRF via gRPC (server in this process, loopback)", b.grpc[1]),
            ]
        for i, (path, lat) in enumerate(rows):
            t.add_row(
                f"{r.chunks:,}",
                path,
                _f(lat.q(0.5)),
                _f(lat.q(0.95)),
                _f(lat.q(0.99)),
                end_section=i == len(rows) - 1,
            )
    return t


def baselines_table(speed: SpeedResult) -> Table:
    b = speed.baselines
    t = Table(
        title="Baselines beside the service's choices, same process and queries, taking turns query by query"
        + (f", {b.size:,} chunks" if b else ""),
        title_justify="left",
    )
    for name in ("component", "service", "p50 ms", "p95 ms", "baseline", "p50 ms ", "p95 ms ", "p50 ratio", "note"):
        t.add_column(name, justify="left" if name in ("component", "service", "baseline", "note") else "right")
    if b is not None:
        p = b.parts
        t.add_row(
            "BM25 top 100 (tokenise + score + select)",
            "bm25s (SparseIndex)",
            _f(p["bm25s beside rank_bm25"].q(0.5)),
            _f(p["bm25s beside rank_bm25"].q(0.95)),
            "rank_bm25 BM25Okapi",
            _f(p["rank_bm25"].q(0.5)),
            _f(p["rank_bm25"].q(0.95)),
            _ratio(p["rank_bm25"].q(0.5), p["bm25s beside rank_bm25"].q(0.5)),
            f"rank_bm25 on {len(p['rank_bm25'].samples)} queries; index build {b.bm25s_index_s:.1f} s vs "
            f"{b.rank_bm25_index_s:.1f} s; top-10 overlap {b.bm25_top10_overlap:.2f} (Lucene vs Okapi IDF)",
        )
        t.add_row(
            "dense top 100 (one query vector)",
            "HNSW (M 32, efSearch 64)",
            _f(p["hnsw"].q(0.5), 3),
            _f(p["hnsw"].q(0.95), 3),
            "exact (FAISS flat)",
            _f(p["flat"].q(0.5), 3),
            _f(p["flat"].q(0.95), 3),
            _ratio(p["flat"].q(0.5), p["hnsw"].q(0.5)),
            f"HNSW recall vs exact: @10 {b.hnsw_recall10:.3f}, @100 {b.hnsw_recall100:.3f}",
        )
    if speed.torch_query is not None:
        t.add_row(
            "query embedding (MiniLM, 2 threads)",
            "ONNX Runtime",
            _f(speed.onnx_query.q(0.5)),
            _f(speed.onnx_query.q(0.95)),
            "torch (eager)",
            _f(speed.torch_query.q(0.5)),
            _f(speed.torch_query.q(0.95)),
            _ratio(speed.torch_query.q(0.5), speed.onnx_query.q(0.5)),
            "",
        )
    else:
        t.add_row(
            "query embedding",
            "ONNX Runtime",
            _f(speed.onnx_query.q(0.5)),
            _f(speed.onnx_query.q(0.95)),
            "torch",
            "-",
            "-",
            "-",
            f"torch failed: {speed.torch_error}"[:200],
        )
    return t


def breakdown_table(speed: SpeedResult) -> Table | None:
    """Where a hybrid search's time goes at the largest size: its parts, timed one by one per query."""
    b = speed.baselines
    r = next((r for r in speed.sizes if b is not None and r.size == b.size), None)
    if b is None or r is None:
        return None
    p = b.parts
    dense = p[r.dense_kind] if r.dense_kind in p else p["flat"]
    rows = [
        ("query embedding (ONNX, embed_query)", p["embed"]),
        (f"dense search ({r.dense_kind}, top 100)", dense),
        ("BM25 search (bm25s, top 100)", p["bm25s"]),
        ("RRF fusion (top 10 of 2 x 100)", p["rrf"]),
        ("hand-off to the worker thread (asyncio.to_thread)", p["thread"]),
    ]
    t = Table(
        title=f"Where a hybrid search's time goes, {r.chunks:,} chunks (parts timed one by one, query by query)",
        title_justify="left",
    )
    for name in ("part", "p50 ms", "p95 ms", "share of hybrid p50"):
        t.add_column(name, justify="left" if name == "part" else "right")
    total = p["hybrid"].q(0.5)
    for name, lat in rows:
        t.add_row(name, _f(lat.q(0.5), 3), _f(lat.q(0.95), 3), f"{lat.q(0.5) / total:.0%}")
    rest = total - sum(lat.q(0.5) for _, lat in rows)
    t.add_row("rest (p50 of the whole - sum of the parts' p50s)", _f(rest, 3), "-", f"{rest / total:.0%}")
    t.add_row("hybrid core.search, timed in the same loop", _f(total, 3), _f(p["hybrid"].q(0.95), 3), "100%")
    return t


def to_json(
    quality: QualityResult | None, speed: SpeedResult | None, runtime_s: float, settings: dict[str, Any]
) -> dict[str, Any]:
    def clean(v: Any) -> Any:
        if isinstance(v, Latency):
            return v.summary()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out = {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name != "samples"}
            for prop in ("build_chunks_per_s", "embedding_chunks_per_s"):
                if hasattr(v, prop):
                    out[prop] = clean(getattr(v, prop))
            return out
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    met, p95 = target_verdict(speed)
    return clean(
        {
            "settings": settings,
            "quality": quality,
            "speed": speed,
            "target": {
                "what": f"hybrid p95 <= {TARGET_P95_MS:g} ms at {TARGET_CHUNKS} chunks",
                "hybrid_p95_ms": p95,
                "met": met,
            },
            "runtime_s": runtime_s,
        }
    )


def report(
    quality: QualityResult | None,
    speed: SpeedResult | None,
    runtime_s: float,
    settings: dict[str, Any],
    json_path: Path | None,
    out: Console | None = None,
) -> bool:
    console = out or Console()
    if out is None and not console.is_terminal:
        console = Console(width=220)
    console.print(
        "\nRetrieval in one process (RetrievalCore, no RPC unless stated), default settings: "
        + ", ".join(f"{k} {v}" for k, v in settings.items()),
        highlight=False,
    )
    if quality is not None:
        console.print(quality_table(quality))
        fb = next(r for r in quality.rows if r.system.endswith("fallback rerank")).scores
        hy = next(r for r in quality.rows if r.system == "hybrid RRF").scores
        console.print(
            f"A system's ranking: its top 100 chunks as documents (about {quality.pool_documents:.0f} distinct for "
            f"hybrid; the first 10 are what top_k=10 returns), continued by a {DEEP}-chunk search for recall@100. "
            "nDCG@10 uses gains 5 - code (1..4); MRR = 1 / rank of the first relevant document.\n"
            f"The fallback reranker is worth {fb.ndcg10 - hy.ndcg10:+.4f} nDCG@10 ({hy.ndcg10:.4f} -> "
            f"{fb.ndcg10:.4f}) and {fb.mrr - hy.mrr:+.4f} MRR over hybrid RRF; one call over 100 candidates costs "
            f"about {quality.rerank_ms_per_query:.0f} ms here (p50 of {RERANK_TIMED_QUERIES}, passages embedded "
            "afresh; the table's run reused the build's vectors for the same passage texts).",
            highlight=False,
        )
        if quality.cross_encoder:
            console.print(
                f"Cross-encoder {quality.cross_encoder}: {quality.cross_encoder_ms_per_query:.0f} ms per query "
                "over 100 candidates (p50).",
                highlight=False,
            )
        else:
            console.print(
                "No cross-encoder row: no PyPI package ships cross-encoder reranker weights, so none is available "
                "offline; pass --cross-encoder DIR (a sentence-transformers CrossEncoder folder) to add one.",
                highlight=False,
            )
    if speed is not None:
        for r in speed.sizes:
            console.print(f"Corpus of {r.chunks:,} chunks: {r.how}.", highlight=False)
        composed = [r for r in speed.sizes if r.kind == "composed"]
        if composed:
            took = composed[0].sentence_embedding_s
            console.print(
                f"The composed corpora share {speed.sentences:,} distinct sentence embeddings ("
                + (f"computed for real in {took:.0f} s" if took else "read from the cache")
                + "). Their dense vectors are means, not MiniLM outputs of the passages: timings are faithful "
                "(same sizes, same index), retrieval quality on them means nothing.",
                highlight=False,
            )
        console.print(sizes_table(speed))
        console.print(latency_table(speed))
        b = speed.baselines
        if b is not None and b.grpc is not None:
            direct, rpc = b.grpc
            console.print(
                f"gRPC adds {rpc.q(0.5) - direct.q(0.5):.2f} ms at p50 and {rpc.q(0.95) - direct.q(0.95):.2f} ms at "
                "p95 to a hybrid search (the two rows above, taking turns query by query; client, server and "
                "search share this process and its 2 cores).",
                highlight=False,
            )
        console.print(baselines_table(speed))
        breakdown = breakdown_table(speed)
        if breakdown is not None:
            console.print(breakdown)
    met, p95 = target_verdict(speed)
    if met is None:
        verdict = f"not judged (needs --speed with {TARGET_CHUNKS} in --sizes)"
    else:
        verdict = f"{p95:.2f} ms -> " + ("[green]met[/]" if met else "[bold red]MISSED[/]")
        if not met and speed is not None and speed.baselines is not None:
            embed = speed.baselines.parts["embed"]
            verdict += (
                f" (the ONNX query embedding alone: p50 {embed.q(0.5):.2f} ms, p95 {embed.q(0.95):.2f} ms; "
                "see the breakdown above)"
            )
    console.print(f"Target: hybrid p95 <= {TARGET_P95_MS:g} ms at {TARGET_CHUNKS:,} chunks: {verdict}")
    console.print(f"The benchmark took {runtime_s / 60:.1f} min ({runtime_s:.0f} s).", highlight=False)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_json(quality, speed, runtime_s, settings), indent=2))
        console.print(f"results written to {json_path}", highlight=False)
    return met is not False


# --- entry point --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: bool, log: Callable[[str], None]) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="servemesh-bench-rag-"))
    try:
        yield base
    finally:
        if keep:
            log(f"data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


async def run_rag_bench(
    home: Path,
    *,
    quality: bool = True,
    speed: bool = True,
    sizes: Sequence[int] = (10_000, TARGET_CHUNKS),
    queries: int = 225,
    cross_encoder: Path | None = None,
    json_path: Path | None = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
    out: Console | None = None,
) -> bool:
    """Run, print the tables (and write JSON); True unless the speed target was judged and missed."""
    started = time.perf_counter()
    collection = cf.load()  # a clear error when ../shared/data/cranfield is missing
    model_cache = home / "models" / "onnx"
    embedder = await asyncio.to_thread(Embedder.load, backend="onnx", cache_dir=model_cache, threads=2)
    defaults = RetrievalSettings(port=0)
    settings = {
        "chunk_tokens": defaults.chunk_tokens,
        "chunk_overlap": defaults.chunk_overlap,
        "fusion": defaults.fusion,
        "rrf_k": defaults.rrf_k,
        "fusion_candidates": defaults.fusion_candidates,
        "exact_max_chunks": defaults.exact_max_chunks,
        "hnsw_m": defaults.hnsw_m,
        "hnsw_ef_search": defaults.hnsw_ef_search,
        "embedding": f"{embedder.model_id} ONNX, 2 threads",
    }
    q_result: QualityResult | None = None
    s_result: SpeedResult | None = None
    with _workdir(keep, log) as base:
        if quality:
            q_result = await run_quality(embedder, base, collection, cross_encoder, log)
            _release_memory()
        if speed:
            s_result = await run_speed(
                embedder, base, collection, list(sizes), queries, home / "bench" / "rag", model_cache, log
            )
    return report(q_result, s_result, time.perf_counter() - started, settings, json_path, out)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mesh.bench_rag rss DATA_DIR INDEX MODEL_CACHE` (queries as a JSON list on stdin):
    the memory probe run_size starts; prints [VmRSS before load, after load, after the queries] in MiB."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4 or args[0] != "rss":
        sys.exit("usage: python -m mesh.bench_rag rss DATA_DIR INDEX MODEL_CACHE < queries.json")
    queries = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_rss_probe(Path(args[1]), args[2], Path(args[3]), queries))))


if __name__ == "__main__":
    main()

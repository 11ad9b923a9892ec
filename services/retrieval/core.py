"""Retrieval: ingest documents into per-tenant corpora, build versioned indexes, search them.

A build chunks every document of an index's corpus, embeds the chunks, writes a FAISS and a
BM25 index into a new immutable folder and makes it current (services.retrieval.store). A
search loads the current build once (kept in an LRU), notices when another replica or a pin
switched it, and runs dense, sparse or fused search in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import numpy as np

from services.common.embedding import Embedder
from services.common.errors import FieldViolation, InvalidArgument, ServiceError
from services.retrieval.errors import BadFile, IndexNotFound, NoCurrentBuild
from services.retrieval.index.dense import DenseIndex
from services.retrieval.index.fusion import Fused, rrf, weighted
from services.retrieval.index.sparse import SparseIndex
from services.retrieval.ingest.chunking import Chunker, minilm_tokenizer
from services.retrieval.ingest.parsers import guess_media_type, parse
from services.retrieval.models import Chunk, Document, MediaType
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import (
    DOCUMENT_ID,
    BuildWriter,
    IndexStore,
    ManifestCounts,
    ManifestRecord,
    index_name,
    inputs_sha256,
    manifest_name,
    parse_index_name,
    parse_manifest_name,
    parse_tenant_name,
)

_log = logging.getLogger(__name__)

METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_QUERY_CHARS = 2048
MAX_TOP_K = 200
MAX_FILTERS = 8
MAX_METADATA = 16
MAX_REASON_CHARS = 512
CHUNKS_FILE = "chunks.jsonl"


class Mode(StrEnum):
    DENSE = "dense"
    SPARSE = "sparse"
    HYBRID = "hybrid"


class Stage(StrEnum):
    CHUNKING = "chunking"
    EMBEDDING = "embedding"
    INDEXING = "indexing"
    COMMITTING = "committing"
    DONE = "done"


class IngestStatus(StrEnum):
    INGESTED = "ingested"
    DUPLICATE = "duplicate"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class FileHeader:
    filename: str
    media_type: MediaType | None = None
    document_id: str = ""
    title: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FileResult:
    filename: str
    status: IngestStatus
    document_id: str = ""
    error: str = ""
    content_sha256: str = ""
    characters: int = 0


@dataclass(frozen=True, slots=True)
class BuildParams:
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    dense_kind: str | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    stage: Stage
    done: int
    total: int
    manifest: ManifestRecord | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    chunk: Chunk
    score: float
    dense_score: float | None
    sparse_score: float | None


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: list[Hit]
    manifest: str


@dataclass(frozen=True, slots=True)
class IndexInfo:
    name: str
    documents: int
    current_manifest: str
    builds: int
    chunks: int
    stale: bool


def _violation(field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument(FieldViolation(field_name, description))


def _check_metadata(metadata: Mapping[str, str], field_name: str, limit: int) -> None:
    if len(metadata) > limit:
        raise _violation(field_name, f"at most {limit} entries, got {len(metadata)}")
    for key, value in metadata.items():
        if not METADATA_KEY_RE.fullmatch(key):
            raise _violation(f"{field_name}[{key!r}]", "keys are 1 to 64 characters of [A-Za-z0-9_.-]")
        if len(value) > 256:
            raise _violation(f"{field_name}[{key!r}]", "values are at most 256 characters")


def parse_index(name: str, field_name: str = "index") -> tuple[str, str]:
    """(tenant, index) of `tenants/{tenant}/indexes/{index}`, or INVALID_ARGUMENT naming the field."""
    try:
        return parse_index_name(name)
    except ValueError:
        raise _violation(
            field_name, "must be tenants/{tenant}/indexes/{index}, ids of 1 to 63 characters of [a-z0-9-]"
        ) from None


def parse_manifest(name: str, field_name: str = "name") -> tuple[str, str, str]:
    try:
        return parse_manifest_name(name)
    except ValueError:
        raise _violation(field_name, "must be tenants/{tenant}/indexes/{index}/manifests/{manifest}") from None


@dataclass
class LoadedBuild:
    """A build in memory: its chunks, both indexes and metadata postings for filters."""

    manifest: ManifestRecord
    chunks: list[Chunk]
    dense: DenseIndex
    sparse: SparseIndex
    postings: dict[tuple[str, str], np.ndarray]

    @classmethod
    def load(cls, path: Path, manifest: ManifestRecord) -> LoadedBuild:
        chunks: list[Chunk] = []
        postings: dict[tuple[str, str], list[int]] = {}
        with (path / CHUNKS_FILE).open(encoding="utf-8") as f:
            for row, line in enumerate(f):
                chunk = Chunk.from_dict(json.loads(line))
                chunks.append(chunk)
                for pair in chunk.metadata.items():
                    postings.setdefault(pair, []).append(row)
        return cls(
            manifest=manifest,
            chunks=chunks,
            dense=DenseIndex.load(path / "dense"),
            sparse=SparseIndex.load(path / "sparse"),
            postings={k: np.asarray(v, dtype=np.int64) for k, v in postings.items()},
        )

    def allowed(self, filters: Mapping[str, str]) -> np.ndarray | None:
        """Rows whose metadata has every pair of `filters` (None: no filter)."""
        if not filters:
            return None
        rows: np.ndarray | None = None
        for pair in sorted(filters.items()):
            posting = self.postings.get(pair)
            if posting is None:
                return np.empty(0, dtype=np.int64)
            rows = posting if rows is None else np.intersect1d(rows, posting, assume_unique=True)
        return rows


class IngestSession:
    """One IngestDocuments stream: files arrive as a header then byte chunks.

    Bytes of a file over the size limit are counted but not kept; every file ends in a
    FileResult, so one bad file never stops the rest of the batch.
    """

    def __init__(self, core: RetrievalCore, tenant: str, index: str) -> None:
        self._core, self.tenant, self.index = core, tenant, index
        self._header: FileHeader | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._files = 0
        self.results: list[FileResult] = []

    async def begin_file(self, header: FileHeader) -> None:
        await self._finish_file()
        self._files += 1
        limit = self._core.settings.max_files_per_upload
        if self._files > limit:
            raise _violation("file", f"at most {limit} files per upload")
        self._header, self._parts, self._size = header, [], 0

    def add_data(self, data: bytes) -> None:
        if self._header is None:
            raise _violation("data", "must follow a file header")
        self._size += len(data)
        if self._size <= self._core.settings.max_file_bytes:
            self._parts.append(data)
        else:
            self._parts = []  # over the limit: keep nothing, report it when the file ends

    async def finish(self) -> list[FileResult]:
        await self._finish_file()
        return self.results

    async def _finish_file(self) -> None:
        header, self._header = self._header, None
        if header is None:
            return
        limit = self._core.settings.max_file_bytes
        if self._size > limit:
            result = FileResult(
                header.filename,
                IngestStatus.FAILED,
                error=f"{header.filename}: {self._size} bytes is over the limit of {limit} bytes "
                f"({limit / 2**20:g} MiB)",
            )
        else:
            data = b"".join(self._parts)
            result = await self._core.ingest_file(self.tenant, self.index, header, data)
        self._parts = []
        self.results.append(result)


class RetrievalCore:
    def __init__(self, settings: RetrievalSettings, store: IndexStore, embedder: Embedder) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self._tokenizer = minilm_tokenizer()
        self._loaded: OrderedDict[tuple[str, str, str], LoadedBuild] = OrderedDict()
        self._load_lock = threading.Lock()
        #: (tenant, index) -> (CURRENT's version stamp, manifest id), to notice switches cheaply
        self._current: dict[tuple[str, str], tuple[object, str | None]] = {}
        self._builds: dict[tuple[str, str], asyncio.Task[None]] = {}

    # ---------------------------------------------------------------- ingestion

    def ingest_session(self, index: str) -> IngestSession:
        tenant, idx = parse_index(index)
        return IngestSession(self, tenant, idx)

    async def ingest_file(self, tenant: str, index: str, header: FileHeader, data: bytes) -> FileResult:
        name = header.filename
        try:
            self._check_header(header)
            parsed = await asyncio.to_thread(
                parse, data, name, header.media_type, max_bytes=self.settings.max_file_bytes
            )
        except BadFile as exc:
            return FileResult(name, IngestStatus.FAILED, error=exc.message)
        except InvalidArgument as exc:
            return FileResult(name, IngestStatus.FAILED, error=f"{name}: {exc.message}")
        sha = hashlib.sha256(parsed.text.encode()).hexdigest()
        doc = Document(
            document_id=header.document_id or sha[:16],
            filename=name,
            title=header.title or parsed.title or name,
            text=parsed.text,
            sections=parsed.sections,
            media_type=parsed.media_type,
            content_sha256=sha,
            metadata=dict(header.metadata),
        )
        status, doc_id = await asyncio.to_thread(self.store.put_document, tenant, index, doc)
        return FileResult(
            name,
            IngestStatus.DUPLICATE if status == "duplicate" else IngestStatus.INGESTED,
            document_id=doc_id,
            content_sha256=sha,
            characters=len(parsed.text),
        )

    @staticmethod
    def _check_header(header: FileHeader) -> None:
        if not 1 <= len(header.filename) <= 255 or "\x00" in header.filename:
            raise _violation("file.filename", "must be 1 to 255 characters")
        if header.media_type is None:
            guess_media_type(header.filename)  # BadFile when the extension is unknown
        if header.document_id and (not DOCUMENT_ID.fullmatch(header.document_id) or header.document_id in (".", "..")):
            raise _violation("file.document_id", "must be 1 to 128 characters of [A-Za-z0-9._-]")
        if len(header.title) > 512:
            raise _violation("file.title", "at most 512 characters")
        _check_metadata(header.metadata, "file.metadata", MAX_METADATA)

    def corpus_documents(self, tenant: str, index: str) -> int:
        return self.store.document_count(tenant, index)

    # ---------------------------------------------------------------- builds

    def _params(self, params: BuildParams) -> dict[str, object]:
        s = self.settings
        tokens = s.chunk_tokens if params.chunk_tokens is None else params.chunk_tokens
        if not 32 <= tokens <= 256:
            raise _violation("parameters.chunk_tokens", "must be in [32, 256]")
        overlap = s.chunk_overlap if params.chunk_overlap is None else params.chunk_overlap
        if params.chunk_overlap is None:
            overlap = min(overlap, tokens // 2)
        if not 0 <= overlap <= tokens // 2:
            raise _violation("parameters.chunk_overlap", f"must be in [0, chunk_tokens / 2 = {tokens // 2}]")
        return {
            "chunk_tokens": tokens,
            "chunk_overlap": overlap,
            "dense_kind": params.dense_kind or s.dense_kind,
            "exact_max_chunks": s.exact_max_chunks,
            "hnsw_m": s.hnsw_m,
            "hnsw_ef_construction": s.hnsw_ef_construction,
            "hnsw_ef_search": s.hnsw_ef_search,
            "ivf_nprobe": s.ivf_nprobe,
            "bm25": "bm25s lucene k1=1.2 b=0.75, English stemmer and stopwords",
        }

    def build(self, index: str, params: BuildParams, *, actor: str, reason: str = "") -> AsyncIterator[Progress]:
        """Start a build and stream its progress. The build runs in a thread and goes on
        if the caller stops listening; errors reach the caller through the stream."""
        tenant, idx = parse_index(index)
        if len(reason) > MAX_REASON_CHARS:
            raise _violation("reason", f"at most {MAX_REASON_CHARS} characters")
        resolved = self._params(params)
        # IndexNotFound, EmptyCorpus, or BuildInProgress when one runs in any replica
        writer = self.store.begin_build(tenant, idx, actor=actor, reason=reason)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Progress | BaseException | None] = asyncio.Queue()

        def report(progress: Progress) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, progress)

        async def run() -> None:
            try:
                record = await asyncio.to_thread(self._build_sync, tenant, idx, writer, resolved, report)
                queue.put_nowait(Progress(Stage.DONE, 1, 1, record))
            except BaseException as exc:
                queue.put_nowait(exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run(), name=f"build {tenant}/{idx}")
        self._builds[(tenant, idx)] = task
        task.add_done_callback(lambda _: self._builds.pop((tenant, idx), None))

        async def stream() -> AsyncIterator[Progress]:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return stream()

    def _build_sync(
        self,
        tenant: str,
        index: str,
        writer: BuildWriter,
        params: dict[str, object],
        report: Callable[[Progress], None],
    ) -> ManifestRecord:
        started = time.monotonic()
        with writer:  # aborts (removes the partial build, releases the lock) on any error
            docs = list(self.store.documents(tenant, index))
            chunker = Chunker(self._tokenizer, int(params["chunk_tokens"]), int(params["chunk_overlap"]))
            chunks: list[Chunk] = []
            per_doc: dict[str, int] = {}
            seen: set[str] = set()
            duplicates = 0
            report(Progress(Stage.CHUNKING, 0, len(docs)))
            for n, doc in enumerate(docs, 1):
                kept = 0
                for chunk in chunker.chunk(doc):
                    key = hashlib.sha256(" ".join(chunk.text.split()).lower().encode()).hexdigest()
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                    chunks.append(chunk)
                    kept += 1
                per_doc[doc.document_id] = kept
                if n % 100 == 0 or n == len(docs):
                    report(Progress(Stage.CHUNKING, n, len(docs)))
            texts = [c.indexed_text() for c in chunks]
            tokens = sum(len(e.ids) for e in self._tokenizer.encode_batch([c.text for c in chunks]))
            report(Progress(Stage.EMBEDDING, 0, len(chunks)))
            vectors = self.embedder.embed_documents(
                texts,
                batch_size=self.settings.embedding_batch_size,
                progress=lambda done: report(Progress(Stage.EMBEDDING, done, len(chunks))),
            )
            report(Progress(Stage.INDEXING, 0, 2))
            kind = str(params["dense_kind"])
            if kind == "auto":
                kind = "flat" if len(chunks) <= self.settings.exact_max_chunks else "hnsw"
            params = {**params, "dense_kind": kind}
            dense = DenseIndex.build(
                vectors,
                kind,  # type: ignore[arg-type]
                hnsw_m=self.settings.hnsw_m,
                hnsw_ef_construction=self.settings.hnsw_ef_construction,
                hnsw_ef_search=self.settings.hnsw_ef_search,
                ivf_nprobe=self.settings.ivf_nprobe,
            )
            report(Progress(Stage.INDEXING, 1, 2))
            sparse = SparseIndex.build(texts)
            report(Progress(Stage.INDEXING, 2, 2))
            report(Progress(Stage.COMMITTING, 0, 1))
            path = writer.path
            dense.save(path / "dense")
            sparse.save(path / "sparse")
            with (path / CHUNKS_FILE).open("w", encoding="utf-8") as f:
                for c in chunks:
                    f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
            inputs = [(d.document_id, d.content_sha256, per_doc[d.document_id]) for d in docs]
            record = writer.commit(
                ManifestRecord(
                    tenant=tenant,
                    index=index,
                    manifest_id=writer.manifest_id,
                    inputs=inputs,
                    embedding_model=self.embedder.model_id,
                    embedding_model_sha256=self.embedder.model_sha256,
                    embedding_dimensions=self.embedder.dimensions,
                    parameters=params,
                    counts=ManifestCounts(
                        documents=len(docs), chunks=len(chunks), duplicate_chunks=duplicates, tokens=tokens
                    ),
                    create_time=datetime.now(UTC),
                    build_seconds=time.monotonic() - started,
                )
            )
        self.store.prune(tenant, index, keep=self.settings.keep_builds)
        _log.info(
            "built %s: %d documents, %d chunks in %.1f s",
            record.name,
            len(docs),
            len(chunks),
            record.build_seconds,
        )
        return record

    async def wait_for_builds(self) -> None:
        """Let running builds finish (shutdown)."""
        if self._builds:
            await asyncio.gather(*self._builds.values(), return_exceptions=True)

    # ---------------------------------------------------------------- manifests

    def list_indexes(self, parent: str) -> list[IndexInfo]:
        try:
            tenant = parse_tenant_name(parent)
        except ValueError:
            raise _violation("parent", "must be tenants/{tenant}") from None
        out = []
        for idx in self.store.list_indexes(tenant):
            current = self.store.current(tenant, idx)
            manifests = self.store.list_manifests(tenant, idx)
            record = next((m for m in manifests if m.manifest_id == current), None)
            corpus = self.store.corpus_inputs(tenant, idx)
            stale = record is None or inputs_sha256(corpus) != record.inputs_sha256
            out.append(
                IndexInfo(
                    name=index_name(tenant, idx),
                    documents=len(corpus),
                    current_manifest=record.name if record else "",
                    builds=len(manifests),
                    chunks=record.counts.chunks if record else 0,
                    stale=stale and bool(corpus),
                )
            )
        return out

    def list_manifests(self, index: str) -> tuple[list[ManifestRecord], str | None]:
        tenant, idx = parse_index(index)
        if not self.store.index_exists(tenant, idx):
            raise IndexNotFound(index_name(tenant, idx))
        return self.store.list_manifests(tenant, idx), self.store.current(tenant, idx)

    def get_manifest(self, name: str) -> tuple[ManifestRecord, bool]:
        tenant, idx, mid = parse_manifest(name)
        record = self.store.read_manifest(tenant, idx, mid)
        return record, self.store.current(tenant, idx) == mid

    def pin(self, name: str, *, actor: str, reason: str) -> tuple[ManifestRecord, str]:
        tenant, idx, mid = parse_manifest(name)
        if not 1 <= len(reason.strip()) <= MAX_REASON_CHARS:
            raise _violation("reason", f"required, 1 to {MAX_REASON_CHARS} characters")
        record = self.store.read_manifest(tenant, idx, mid)
        self.store.verify_build(tenant, idx, mid)  # never pin a build whose files changed
        previous = self.store.pin(tenant, idx, mid, actor=actor, reason=reason)
        _log.info("pinned %s (was %s) by %s: %s", record.name, previous, actor, reason)
        return record, manifest_name(tenant, idx, previous) if previous else ""

    # ---------------------------------------------------------------- search

    def _build_for(self, tenant: str, index: str, manifest_id: str | None) -> LoadedBuild:
        """The build to search: `manifest_id`, or the current one (re-read when CURRENT changed)."""
        if manifest_id is None:
            manifest_id, _ = self.store.current_version(tenant, index)  # IndexNotFound if none
            if manifest_id is None:
                raise NoCurrentBuild(index_name(tenant, index))
        key = (tenant, index, manifest_id)
        with self._load_lock:
            build = self._loaded.get(key)
            if build is not None:
                self._loaded.move_to_end(key)
                return build
        record = self.store.read_manifest(tenant, index, manifest_id)
        self.store.verify_build(tenant, index, manifest_id)
        build = LoadedBuild.load(self.store.build_path(tenant, index, manifest_id), record)
        with self._load_lock:
            self._loaded[key] = build
            while len(self._loaded) > self.settings.loaded_builds:
                self._loaded.popitem(last=False)
        return build

    def preload(self) -> None:
        """Load every index's current build (start-up), so the first search is not slow."""
        for tenant_dir in sorted((self.settings.data_dir / "tenants").glob("*")):
            for idx in self.store.list_indexes(tenant_dir.name):
                try:
                    if self.store.current(tenant_dir.name, idx):
                        self._build_for(tenant_dir.name, idx, None)
                except ServiceError as exc:
                    _log.warning("not preloading %s/%s: %s", tenant_dir.name, idx, exc.message)

    async def search(
        self,
        index: str,
        query: str,
        *,
        top_k: int = 10,
        mode: Mode = Mode.HYBRID,
        fusion: str | None = None,
        filters: Mapping[str, str] | None = None,
    ) -> SearchResult:
        if index.count("/") == 5:
            tenant, idx, mid = parse_manifest(index, "index")
            manifest_id: str | None = mid
        else:
            tenant, idx = parse_index(index)
            manifest_id = None
        if not query.strip() or len(query) > MAX_QUERY_CHARS:
            raise _violation("query", f"must be 1 to {MAX_QUERY_CHARS} characters, not only spaces")
        if top_k == 0:
            top_k = 10
        if not 1 <= top_k <= MAX_TOP_K:
            raise _violation("top_k", f"must be in [1, {MAX_TOP_K}]")
        filters = dict(filters or {})
        _check_metadata(filters, "filter", MAX_FILTERS)
        return await asyncio.to_thread(
            self._search_sync, tenant, idx, manifest_id, query, top_k, mode, fusion or self.settings.fusion, filters
        )

    def _search_sync(
        self,
        tenant: str,
        index: str,
        manifest_id: str | None,
        query: str,
        top_k: int,
        mode: Mode,
        fusion: str,
        filters: dict[str, str],
    ) -> SearchResult:
        build = self._build_for(tenant, index, manifest_id)
        allowed = build.allowed(filters)
        if allowed is not None and allowed.size == 0:
            return SearchResult([], build.manifest.name)
        n = max(top_k, self.settings.fusion_candidates) if mode == Mode.HYBRID else top_k
        dense = sparse = None
        if mode in (Mode.DENSE, Mode.HYBRID):
            dense = build.dense.search(self.embedder.embed_query(query), n, allowed)
        if mode in (Mode.SPARSE, Mode.HYBRID):
            sparse = build.sparse.search(query, n, allowed)
        if mode == Mode.HYBRID:
            assert dense is not None and sparse is not None
            fused = (
                rrf(dense, sparse, k=self.settings.rrf_k, top_k=top_k)
                if fusion == "rrf"
                else weighted(dense, sparse, alpha=self.settings.dense_weight, top_k=top_k)
            )
        else:
            ids, scores = dense if dense is not None else sparse  # type: ignore[misc]
            fused = [
                Fused(
                    int(r),
                    float(s),
                    float(s) if mode == Mode.DENSE else None,
                    float(s) if mode == Mode.SPARSE else None,
                )
                for r, s in zip(ids[:top_k], scores[:top_k], strict=True)
            ]
        hits = [Hit(build.chunks[f.row], f.score, f.dense, f.sparse) for f in fused]
        return SearchResult(hits, build.manifest.name)

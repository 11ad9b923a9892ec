"""RetrievalService: protobuf <-> domain objects, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2
from servemesh.retrieval.v1 import retrieval_pb2 as pb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from services.common.errors import FieldViolation, InvalidArgument
from services.common.identity import caller_identity
from services.retrieval.core import BuildParams, FileHeader, FileResult, Mode, Progress, RetrievalCore, Stage
from services.retrieval.models import MediaType
from services.retrieval.store import ManifestRecord

_MEDIA = {
    pb.MEDIA_TYPE_UNSPECIFIED: None,
    pb.MEDIA_TYPE_TEXT: MediaType.TEXT,
    pb.MEDIA_TYPE_MARKDOWN: MediaType.MARKDOWN,
    pb.MEDIA_TYPE_HTML: MediaType.HTML,
    pb.MEDIA_TYPE_PDF: MediaType.PDF,
}
_STATUS = {
    "ingested": pb.INGEST_STATUS_INGESTED,
    "duplicate": pb.INGEST_STATUS_DUPLICATE,
    "failed": pb.INGEST_STATUS_FAILED,
}
_STAGES = {
    Stage.CHUNKING: pb.BUILD_STAGE_CHUNKING,
    Stage.EMBEDDING: pb.BUILD_STAGE_EMBEDDING,
    Stage.INDEXING: pb.BUILD_STAGE_INDEXING,
    Stage.COMMITTING: pb.BUILD_STAGE_COMMITTING,
    Stage.DONE: pb.BUILD_STAGE_DONE,
}
_KINDS = {pb.DENSE_INDEX_KIND_FLAT: "flat", pb.DENSE_INDEX_KIND_HNSW: "hnsw", pb.DENSE_INDEX_KIND_IVF: "ivf"}
_KINDS_TO_PB = {v: k for k, v in _KINDS.items()}
_MODES = {
    pb.SEARCH_MODE_UNSPECIFIED: Mode.HYBRID,
    pb.SEARCH_MODE_HYBRID: Mode.HYBRID,
    pb.SEARCH_MODE_DENSE: Mode.DENSE,
    pb.SEARCH_MODE_SPARSE: Mode.SPARSE,
}
_FUSIONS = {pb.FUSION_UNSPECIFIED: None, pb.FUSION_RRF: "rrf", pb.FUSION_WEIGHTED: "weighted"}


def _enum(mapping: dict, value: int, field_name: str):  # type: ignore[no-untyped-def]
    if value not in mapping:
        raise InvalidArgument(FieldViolation(field_name, f"unknown value {value}"))
    return mapping[value]


def manifest_to_pb(record: ManifestRecord, *, current: bool, with_inputs: bool = True) -> pb.Manifest:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(record.create_time)
    params = record.parameters
    return pb.Manifest(
        name=record.name,
        inputs=[pb.ManifestInput(document_id=d, content_sha256=s, chunks=n) for d, s, n in record.inputs]
        if with_inputs
        else [],
        inputs_sha256=record.inputs_sha256,
        embedding_model=record.embedding_model,
        embedding_model_sha256=record.embedding_model_sha256,
        embedding_dimensions=record.embedding_dimensions,
        parameters=pb.BuildParameters(
            chunk_tokens=int(params["chunk_tokens"]),
            chunk_overlap=int(params["chunk_overlap"]),
            dense_kind=_KINDS_TO_PB.get(str(params["dense_kind"]), pb.DENSE_INDEX_KIND_UNSPECIFIED),
        ),
        counts=pb.ManifestCounts(
            documents=record.counts.documents,
            chunks=record.counts.chunks,
            duplicate_chunks=record.counts.duplicate_chunks,
            tokens=record.counts.tokens,
        ),
        create_time=created,
        build_seconds=record.build_seconds,
        current=current,
        files_sha256=record.files_sha256,
    )


def _result_to_pb(r: FileResult) -> pb.FileResult:
    return pb.FileResult(
        filename=r.filename,
        status=_STATUS[r.status.value],
        document_id=r.document_id,
        error=r.error,
        content_sha256=r.content_sha256,
        characters=r.characters,
    )


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, core: RetrievalCore, *, trust_forwarded_identity: bool) -> None:
        self.core = core
        self.trust_forwarded_identity = trust_forwarded_identity

    def _actor(self, context: grpc.aio.ServicerContext) -> str:
        return caller_identity(
            context.invocation_metadata(), context.peer(), trust_forwarded_identity=self.trust_forwarded_identity
        )

    async def IngestDocuments(
        self, request_iterator: AsyncIterator[pb.IngestDocumentsRequest], context: grpc.aio.ServicerContext
    ) -> pb.IngestDocumentsResponse:
        session = None
        async for message in request_iterator:
            if session is None:
                session = self.core.ingest_session(message.index)
            which = message.WhichOneof("part")
            if which == "file":
                f = message.file
                await session.begin_file(
                    FileHeader(
                        filename=f.filename,
                        media_type=_enum(_MEDIA, f.media_type, "file.media_type"),
                        document_id=f.document_id,
                        title=f.title,
                        metadata=dict(f.metadata),
                    )
                )
            elif which == "data":
                session.add_data(message.data)
        if session is None:
            raise InvalidArgument(FieldViolation("index", "the stream carried no message"))
        results = await session.finish()
        if not results:
            raise InvalidArgument(FieldViolation("file", "the stream carried no file"))
        return pb.IngestDocumentsResponse(
            results=[_result_to_pb(r) for r in results],
            corpus_documents=self.core.corpus_documents(session.tenant, session.index),
        )

    async def BuildIndex(
        self, request: pb.BuildIndexRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BuildIndexResponse]:
        p = request.parameters
        params = BuildParams(
            chunk_tokens=p.chunk_tokens if p.HasField("chunk_tokens") else None,
            chunk_overlap=p.chunk_overlap if p.HasField("chunk_overlap") else None,
            dense_kind=None
            if p.dense_kind == pb.DENSE_INDEX_KIND_UNSPECIFIED
            else _enum(_KINDS, p.dense_kind, "parameters.dense_kind"),
        )
        progress: AsyncIterator[Progress] = self.core.build(
            request.index, params, actor=self._actor(context), reason=request.reason
        )
        async for step in progress:
            yield pb.BuildIndexResponse(
                stage=_STAGES[step.stage],
                done=step.done,
                total=step.total,
                manifest=manifest_to_pb(step.manifest, current=True) if step.manifest else None,
            )

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        result = await self.core.search(
            request.index,
            request.query,
            top_k=request.top_k,
            mode=_enum(_MODES, request.mode, "mode"),
            fusion=_enum(_FUSIONS, request.fusion, "fusion"),
            filters=dict(request.filter),
        )
        return pb.SearchResponse(
            hits=[
                pb.SearchHit(
                    document_id=h.chunk.document_id,
                    chunk_id=h.chunk.chunk_id,
                    title=h.chunk.title,
                    headings=list(h.chunk.headings),
                    text=h.chunk.text,
                    start_offset=h.chunk.start,
                    end_offset=h.chunk.end,
                    score=h.score,
                    dense_score=h.dense_score,
                    sparse_score=h.sparse_score,
                    metadata=dict(h.chunk.metadata),
                )
                for h in result.hits
            ],
            manifest=result.manifest,
        )

    async def ListIndexes(
        self, request: pb.ListIndexesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListIndexesResponse:
        return pb.ListIndexesResponse(
            indexes=[
                pb.Index(
                    name=i.name,
                    documents=i.documents,
                    current_manifest=i.current_manifest,
                    builds=i.builds,
                    chunks=i.chunks,
                    stale=i.stale,
                )
                for i in self.core.list_indexes(request.parent)
            ]
        )

    async def ListManifests(
        self, request: pb.ListManifestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListManifestsResponse:
        records, current = self.core.list_manifests(request.index)
        return pb.ListManifestsResponse(
            manifests=[manifest_to_pb(r, current=r.manifest_id == current, with_inputs=False) for r in records]
        )

    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetManifestResponse:
        record, current = self.core.get_manifest(request.name)
        return pb.GetManifestResponse(manifest=manifest_to_pb(record, current=current))

    async def PinManifest(
        self, request: pb.PinManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.PinManifestResponse:
        record, previous = self.core.pin(request.name, actor=self._actor(context), reason=request.reason)
        return pb.PinManifestResponse(manifest=manifest_to_pb(record, current=True), previous=previous)

"""The retrieval service over gRPC: ingest (streamed, per-file errors), builds with progress,
search modes and filters, manifests and pinning, tenant isolation, bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from servemesh.retrieval.v1 import retrieval_pb2 as pb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from services.common.embedding import Embedder
from services.retrieval.server import create_retrieval_server
from services.retrieval.settings import RetrievalSettings

DOCS = {
    "valves.md": b"# Heart valves\n\n## Mitral valve\n\nThe mitral valve separates the left atrium from the left "
    b"ventricle and prevents backflow during systole.\n\n## Aortic valve\n\nThe aortic valve opens when "
    b"ventricular pressure exceeds aortic pressure.\n",
    "rivers.txt": b"Rivers of Europe\n\nThe Danube flows through ten countries and drains into the Black Sea. "
    b"The Rhine rises in the Swiss Alps.\n",
    "kv.html": b"<html><head><title>KV cache</title><script>var secret = 1;</script></head><body>"
    b"<h1>KV cache</h1><p>A key-value cache stores attention keys and values of earlier tokens so "
    b"decoding does not recompute them.</p></body></html>",
}


def _messages(
    index: str, files: Iterable[tuple[str, bytes]], meta: dict[str, str] | None = None, piece: int = 7
) -> AsyncIterator[pb.IngestDocumentsRequest]:
    async def gen() -> AsyncIterator[pb.IngestDocumentsRequest]:
        yield pb.IngestDocumentsRequest(index=index)
        for name, data in files:
            yield pb.IngestDocumentsRequest(file=pb.FileHeader(filename=name, metadata=meta or {}))
            for i in range(0, len(data), piece):  # small pieces: the upload really streams
                yield pb.IngestDocumentsRequest(data=data[i : i + piece])

    return gen()


async def _build(stub: pb_grpc.RetrievalServiceStub, index: str, **params: int) -> list[pb.BuildIndexResponse]:
    request = pb.BuildIndexRequest(index=index, parameters=pb.BuildParameters(**params), reason="test")
    return [m async for m in stub.BuildIndex(request, timeout=120)]


def _violations(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)
    assert status is not None
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out |= {v.field: v.description for v in bad.field_violations}
    return out


@pytest.fixture
async def stub(tmp_path: Path, embedder: Embedder) -> AsyncIterator[pb_grpc.RetrievalServiceStub]:
    settings = RetrievalSettings(port=0, data_dir=tmp_path / "retrieval", max_file_bytes=4096)
    server, core = await create_retrieval_server(settings, CollectorRegistry(), embedder=embedder)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.RetrievalServiceStub(channel)
    await server.stop(0)
    await core.wait_for_builds()


async def test_a_batch_ingests_around_its_bad_files_each_named(stub) -> None:
    files = [
        *DOCS.items(),
        ("empty.txt", b""),
        ("fake.pdf", b"this is not a pdf at all"),
        ("big.txt", b"word " * 2000),  # 10,000 bytes, over the 4096-byte limit
        ("again.md", DOCS["valves.md"]),  # same content as valves.md
    ]
    response = await stub.IngestDocuments(_messages("tenants/dev/indexes/docs", files), timeout=60)
    by_name = {r.filename: r for r in response.results}
    assert [r.filename for r in response.results] == [name for name, _ in files]
    for name in DOCS:
        assert by_name[name].status == pb.INGEST_STATUS_INGESTED and by_name[name].document_id
    assert by_name["again.md"].status == pb.INGEST_STATUS_DUPLICATE
    assert by_name["again.md"].document_id == by_name["valves.md"].document_id
    for name in ("empty.txt", "fake.pdf", "big.txt"):
        assert by_name[name].status == pb.INGEST_STATUS_FAILED
        assert name in by_name[name].error
    assert "4096" in by_name["big.txt"].error
    assert response.corpus_documents == 3


async def test_build_streams_progress_then_searches_find_the_right_passage(stub) -> None:
    index = "tenants/dev/indexes/docs"
    await stub.IngestDocuments(_messages(index, DOCS.items()), timeout=60)
    steps = await _build(stub, index)
    stages = [s.stage for s in steps]
    assert stages[0] == pb.BUILD_STAGE_CHUNKING and stages[-1] == pb.BUILD_STAGE_DONE
    assert pb.BUILD_STAGE_EMBEDDING in stages and pb.BUILD_STAGE_COMMITTING in stages
    manifest = steps[-1].manifest
    assert manifest.current and manifest.counts.documents == 3 and manifest.counts.chunks >= 3
    assert manifest.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(manifest.embedding_model_sha256) == 64 and len(manifest.inputs_sha256) == 64
    assert manifest.parameters.chunk_tokens == 200 and manifest.parameters.dense_kind == pb.DENSE_INDEX_KIND_FLAT
    for mode in (pb.SEARCH_MODE_HYBRID, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE):
        found = await stub.Search(
            pb.SearchRequest(index=index, query="which valve stops blood flowing back in systole", top_k=3, mode=mode),
            timeout=30,
        )
        top = found.hits[0]
        assert top.title == "Heart valves" and list(top.headings) == ["Heart valves", "Mitral valve"], mode
        assert "mitral valve separates" in top.text and found.manifest == manifest.name
    html = await stub.Search(pb.SearchRequest(index=index, query="attention keys and values cache"), timeout=30)
    assert html.hits[0].title == "KV cache" and "secret" not in html.hits[0].text


async def test_offsets_point_into_the_documents_text(stub) -> None:
    index = "tenants/dev/indexes/docs"
    await stub.IngestDocuments(_messages(index, DOCS.items()), timeout=60)
    await _build(stub, index, chunk_tokens=32, chunk_overlap=8)
    found = await stub.Search(pb.SearchRequest(index=index, query="Danube Black Sea", top_k=5), timeout=30)
    rivers = [h for h in found.hits if h.title == "Rivers of Europe"]
    assert rivers and all(h.end_offset - h.start_offset == len(h.text) for h in rivers)
    text = DOCS["rivers.txt"].decode()
    assert any(text[h.start_offset : h.end_offset] == h.text for h in rivers)


async def test_metadata_filters_and_tenant_isolation(stub) -> None:
    await stub.IngestDocuments(
        _messages("tenants/dev/indexes/docs", [("valves.md", DOCS["valves.md"])], {"team": "cardio"}), timeout=60
    )
    await stub.IngestDocuments(
        _messages("tenants/dev/indexes/docs", [("rivers.txt", DOCS["rivers.txt"])], {"team": "geo"}), timeout=60
    )
    await stub.IngestDocuments(_messages("tenants/acme/indexes/docs", [("kv.html", DOCS["kv.html"])]), timeout=60)
    await _build(stub, "tenants/dev/indexes/docs")
    await _build(stub, "tenants/acme/indexes/docs")
    geo = await stub.Search(
        pb.SearchRequest(index="tenants/dev/indexes/docs", query="mitral valve", top_k=10, filter={"team": "geo"}),
        timeout=30,
    )
    assert geo.hits and {h.metadata["team"] for h in geo.hits} == {"geo"}
    none = await stub.Search(
        pb.SearchRequest(index="tenants/dev/indexes/docs", query="valve", filter={"team": "nobody"}), timeout=30
    )
    assert list(none.hits) == []
    # the same index id in another tenant holds only that tenant's chunks, whatever the query
    for query in ("mitral valve", "Danube", "KV cache attention"):
        acme = await stub.Search(pb.SearchRequest(index="tenants/acme/indexes/docs", query=query, top_k=50), timeout=30)
        assert {h.title for h in acme.hits} <= {"KV cache"}
    listed = await stub.ListIndexes(pb.ListIndexesRequest(parent="tenants/acme"), timeout=10)
    assert [i.name for i in listed.indexes] == ["tenants/acme/indexes/docs"] and listed.indexes[0].documents == 1


async def test_pin_rolls_back_to_an_earlier_build_and_back(stub) -> None:
    index = "tenants/dev/indexes/docs"
    await stub.IngestDocuments(_messages(index, [("rivers.txt", DOCS["rivers.txt"])]), timeout=60)
    first = (await _build(stub, index))[-1].manifest
    await stub.IngestDocuments(_messages(index, [("valves.md", DOCS["valves.md"])]), timeout=60)
    listed = await stub.ListIndexes(pb.ListIndexesRequest(parent="tenants/dev"), timeout=10)
    assert listed.indexes[0].stale  # the corpus has a document the current build lacks
    second = (await _build(stub, index))[-1].manifest
    assert second.name != first.name and second.counts.documents == 2

    async def titles() -> set[str]:
        found = await stub.Search(pb.SearchRequest(index=index, query="mitral valve systole", top_k=20), timeout=30)
        return {h.title for h in found.hits}

    assert "Heart valves" in await titles()
    pinned = await stub.PinManifest(pb.PinManifestRequest(name=first.name, reason="bad corpus"), timeout=30)
    assert pinned.previous == second.name and pinned.manifest.current
    assert await titles() == {"Rivers of Europe"}
    manifests = await stub.ListManifests(pb.ListManifestsRequest(index=index), timeout=10)
    assert [m.name for m in manifests.manifests] == [second.name, first.name]
    assert [m.current for m in manifests.manifests] == [False, True]
    # an explicit manifest is searchable while another is current
    old = await stub.Search(pb.SearchRequest(index=second.name, query="mitral valve"), timeout=30)
    assert old.manifest == second.name and old.hits[0].title == "Heart valves"
    got = await stub.GetManifest(pb.GetManifestRequest(name=first.name), timeout=10)
    assert [i.document_id for i in got.manifest.inputs] == [first.inputs[0].document_id]
    await stub.PinManifest(pb.PinManifestRequest(name=second.name, reason="fixed"), timeout=30)
    assert "Heart valves" in await titles()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SearchRequest(index="tenants/dev/indexes/docs", query=""), "query"),
        (pb.SearchRequest(index="tenants/dev/indexes/docs", query="x" * 2049), "query"),
        (pb.SearchRequest(index="tenants/dev/indexes/docs", query="q", top_k=201), "top_k"),
        (pb.SearchRequest(index="tenants/../indexes/docs", query="q"), "index"),
        (pb.SearchRequest(index="docs", query="q"), "index"),
        (pb.SearchRequest(index="tenants/dev/indexes/docs", query="q", filter={"bad key": "v"}), "filter['bad key']"),
    ],
)
async def test_bad_search_input_is_invalid_argument_naming_the_field(stub, request_, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Search(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in _violations(err.value)


async def test_missing_index_manifest_and_empty_corpus_have_clear_codes(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Search(pb.SearchRequest(index="tenants/dev/indexes/nothing", query="q"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "tenants/dev/indexes/nothing" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _build(stub, "tenants/dev/indexes/nothing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.IngestDocuments(_messages("tenants/dev/indexes/docs", [("rivers.txt", DOCS["rivers.txt"])]), timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Search(pb.SearchRequest(index="tenants/dev/indexes/docs", query="q"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "BuildIndex" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PinManifest(
            pb.PinManifestRequest(name="tenants/dev/indexes/docs/manifests/20200101t000000000000z", reason="r"),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _build(stub, "tenants/dev/indexes/docs", chunk_tokens=300)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.chunk_tokens" in _violations(err.value)

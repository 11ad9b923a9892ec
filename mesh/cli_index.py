"""`servemesh index ...` (tenants' document indexes) and `servemesh ask` (answers, from an index with --rag)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.retrieval.v1 import retrieval_pb2 as pb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from mesh.launcher import servemesh_home
from mesh.state import MeshState

index_app = typer.Typer(help="Tenants' document indexes: ingest, build, list, pin, search.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

Home = Annotated[
    Path | None, typer.Option(help="Data directory [default: $SERVEMESH_HOME or ~/.local/share/servemesh]")
]
Tenant = Annotated[str, typer.Option(help="Tenant whose index this is.")]
IndexId = Annotated[str, typer.Argument(help="Index id, e.g. docs.")]
UPLOAD_CHUNK = 1024 * 1024
SUFFIXES = {".txt", ".text", ".md", ".markdown", ".html", ".htm", ".pdf"}
STAGES = {
    pb.BUILD_STAGE_CHUNKING: "chunking",
    pb.BUILD_STAGE_EMBEDDING: "embedding",
    pb.BUILD_STAGE_INDEXING: "indexing",
    pb.BUILD_STAGE_COMMITTING: "committing",
    pb.BUILD_STAGE_DONE: "done",
}
DENSE_KINDS = {"flat": pb.DENSE_INDEX_KIND_FLAT, "hnsw": pb.DENSE_INDEX_KIND_HNSW, "ivf": pb.DENSE_INDEX_KIND_IVF}
MODES = {"hybrid": pb.SEARCH_MODE_HYBRID, "dense": pb.SEARCH_MODE_DENSE, "sparse": pb.SEARCH_MODE_SPARSE}


def _state(home: Path | None) -> MeshState:
    state = MeshState.read(home or servemesh_home())
    if state is None or not state.retrieval:
        err.print("[red]error:[/red] no running mesh with retrieval found (start one with `servemesh up`)")
        raise typer.Exit(1)
    return state


def _call(home: Path | None, fn: Callable[[pb_grpc.RetrievalServiceStub], Awaitable[T]]) -> T:
    async def run() -> T:
        async with _state(home).channel("retrieval") as channel:
            return await fn(pb_grpc.RetrievalServiceStub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        err.print(f"error: {exc.code().name}: {exc.details()}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def _index(tenant: str, index: str) -> str:
    return f"tenants/{tenant}/indexes/{index}"


def _files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            err.print(f"[red]error:[/red] {escape(str(path))} does not exist")
            raise typer.Exit(1)
    return files


def _parse_meta(pairs: list[str]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            err.print(f"[red]error:[/red] --meta {escape(pair)}: use key=value")
            raise typer.Exit(2)
        meta[key] = value
    return meta


async def _ingest(
    stub: pb_grpc.RetrievalServiceStub, index: str, files: list[Path], meta: dict[str, str]
) -> pb.IngestDocumentsResponse:
    total = sum(f.stat().st_size for f in files)
    columns = (TextColumn("uploading"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("upload", total=total)

        async def messages() -> AsyncIterator[pb.IngestDocumentsRequest]:
            yield pb.IngestDocumentsRequest(index=index)
            for path in files:
                yield pb.IngestDocumentsRequest(file=pb.FileHeader(filename=path.name, metadata=meta))
                with path.open("rb") as f:
                    while data := f.read(UPLOAD_CHUNK):
                        yield pb.IngestDocumentsRequest(data=data)
                        bar.advance(task, len(data))

        return await stub.IngestDocuments(messages(), timeout=3600)


def _print_ingest(response: pb.IngestDocumentsResponse) -> int:
    failed = 0
    for r in response.results:
        status = pb.IngestStatus.Name(r.status).removeprefix("INGEST_STATUS_").lower()
        if r.status == pb.INGEST_STATUS_FAILED:
            failed += 1
            err.print(f"[red]failed[/red]    {escape(r.error)}")
        else:
            out.print(f"{status:<10} {escape(r.filename)} -> {r.document_id} ({r.characters} characters)")
    out.print(f"{response.corpus_documents} documents in the corpus")
    return failed


@index_app.command("ingest")
def ingest(
    index: IndexId,
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (.txt, .md, .html, .pdf).")],
    tenant: Tenant = "dev",
    meta: Annotated[list[str], typer.Option(help="key=value metadata for every file (repeatable).")] = [],  # noqa: B006
    home: Home = None,
) -> None:
    """Upload documents into an index's corpus; a bad file is reported and the rest still go in."""
    files, metadata = _files(paths), _parse_meta(meta)
    response = _call(home, lambda stub: _ingest(stub, _index(tenant, index), files, metadata))
    if _print_ingest(response):
        raise typer.Exit(1)


async def _build(stub: pb_grpc.RetrievalServiceStub, request: pb.BuildIndexRequest) -> pb.Manifest:
    manifest = pb.Manifest()
    columns = (TextColumn("{task.description:<11}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        tasks: dict[int, int] = {}
        async for step in stub.BuildIndex(request, timeout=24 * 3600):
            if step.stage not in tasks:
                tasks[step.stage] = bar.add_task(STAGES.get(step.stage, "?"), total=max(step.total, 1))
            bar.update(tasks[step.stage], completed=step.done, total=max(step.total, 1))
            if step.HasField("manifest"):
                manifest = step.manifest
    return manifest


@index_app.command("build")
def build(
    index: IndexId,
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders to ingest first.")] = None,
    tenant: Tenant = "dev",
    chunk_tokens: Annotated[int | None, typer.Option(help="Word pieces per chunk, 32-256.")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Word pieces shared by neighbouring chunks.")] = None,
    dense_kind: Annotated[str | None, typer.Option(help="flat, hnsw or ivf [default: by size].")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the index's history.")] = "",
    home: Home = None,
) -> None:
    """Build a new version of an index (ingesting PATHS first) and make it current."""
    if dense_kind is not None and dense_kind not in DENSE_KINDS:
        err.print(f"[red]error:[/red] --dense-kind must be one of {', '.join(DENSE_KINDS)}")
        raise typer.Exit(2)
    name = _index(tenant, index)
    files = _files(paths or [])
    params = pb.BuildParameters(
        chunk_tokens=chunk_tokens,
        chunk_overlap=chunk_overlap,
        dense_kind=DENSE_KINDS.get(dense_kind or "", pb.DENSE_INDEX_KIND_UNSPECIFIED),
    )

    async def run(stub: pb_grpc.RetrievalServiceStub) -> pb.Manifest:
        if files and _print_ingest(await _ingest(stub, name, files, {})):
            err.print("[yellow]some files failed; building from the rest[/yellow]")
        return await _build(stub, pb.BuildIndexRequest(index=name, parameters=params, reason=reason))

    manifest = _call(home, run)
    c = manifest.counts
    out.print(
        f"built {manifest.name}: {c.documents} documents, {c.chunks} chunks ({c.duplicate_chunks} duplicates "
        f"dropped), {pb.DenseIndexKind.Name(manifest.parameters.dense_kind).removeprefix('DENSE_INDEX_KIND_').lower()}"
        f" + BM25, {manifest.build_seconds:.1f} s"
    )


@index_app.command("list")
def list_(
    index: Annotated[str | None, typer.Argument(help="An index: list its builds instead.")] = None,
    tenant: Tenant = "dev",
    home: Home = None,
) -> None:
    """List a tenant's indexes, or one index's builds (newest first)."""
    if index is None:
        response = _call(home, lambda s: s.ListIndexes(pb.ListIndexesRequest(parent=f"tenants/{tenant}"), timeout=10))
        table = Table("index", "documents", "chunks", "builds", "current manifest", "stale")
        for i in response.indexes:
            table.add_row(
                i.name, str(i.documents), str(i.chunks), str(i.builds), i.current_manifest, "yes" if i.stale else ""
            )
        out.print(table)
        return
    listed = _call(home, lambda s: s.ListManifests(pb.ListManifestsRequest(index=_index(tenant, index)), timeout=10))
    table = Table("manifest", "current", "built", "documents", "chunks", "inputs sha256", "seconds")
    for m in listed.manifests:
        table.add_row(
            m.name.rsplit("/", 1)[-1],
            "*" if m.current else "",
            m.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            str(m.counts.documents),
            str(m.counts.chunks),
            m.inputs_sha256[:12],
            f"{m.build_seconds:.1f}",
        )
    out.print(table)


@index_app.command("pin")
def pin(
    index: IndexId,
    manifest: Annotated[str, typer.Argument(help="Manifest id to make current (see `servemesh index list INDEX`).")],
    reason: Annotated[str, typer.Option(help="Why, for the index's history (required).")],
    tenant: Tenant = "dev",
    home: Home = None,
) -> None:
    """Make an earlier build current again (runbook: pin previous corpus manifest)."""
    name = f"{_index(tenant, index)}/manifests/{manifest}"
    response = _call(home, lambda s: s.PinManifest(pb.PinManifestRequest(name=name, reason=reason), timeout=60))
    out.print(f"pinned {response.manifest.name} (was {response.previous or 'none'})")


@index_app.command("search")
def search(
    index: IndexId,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    tenant: Tenant = "dev",
    top_k: Annotated[int, typer.Option(help="Hits to show.")] = 5,
    mode: Annotated[str, typer.Option(help="hybrid, dense or sparse.")] = "hybrid",
    filter_: Annotated[list[str], typer.Option("--filter", help="key=value metadata filter (repeatable).")] = [],  # noqa: B006
    home: Home = None,
) -> None:
    """Search an index's current build."""
    if mode not in MODES:
        err.print(f"[red]error:[/red] --mode must be one of {', '.join(MODES)}")
        raise typer.Exit(2)
    request = pb.SearchRequest(
        index=_index(tenant, index), query=query, top_k=top_k, mode=MODES[mode], filter=_parse_meta(filter_)
    )
    response = _call(home, lambda s: s.Search(request, timeout=30))
    for n, hit in enumerate(response.hits, 1):
        where = " > ".join([hit.title, *hit.headings])
        out.print(f"[bold][{n}][/bold] {escape(where)} [dim]({hit.chunk_id}, score {hit.score:.4f})[/dim]")
        text = " ".join(hit.text.split())
        out.print(f"    {escape(text[:300])}{'…' if len(text) > 300 else ''}")
    err.print(f"[dim]{len(response.hits)} hits from {response.manifest}[/dim]")


def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    rag: Annotated[bool, typer.Option("--rag", help="Answer from an index, citing its passages.")] = False,
    index: Annotated[str, typer.Option(help="Index to answer from (--rag), of the API key's tenant.")] = "docs",
    top_k: Annotated[int, typer.Option(help="Passages given to the model (--rag).")] = 5,
    route_class: Annotated[str, typer.Option(help="Route class [default: rag_long with --rag].")] = "",
    max_tokens: Annotated[int | None, typer.Option(help="Upper bound on generated tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 gives repeatable output.")] = None,
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 120.0,
    home: Home = None,
) -> None:
    """Ask the gateway a question; with --rag, answered from an index with numbered citations."""
    state = MeshState.read(home or servemesh_home())
    if state is None:
        err.print("[red]error:[/red] no running mesh found (start one with `servemesh up`)")
        raise typer.Exit(1)
    params = gpb.DecodingParams(max_tokens=max_tokens, temperature=temperature)

    async def run() -> None:
        async with state.channel("gateway") as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            if not rag:
                call = stub.StreamGenerate(
                    gpb.StreamGenerateRequest(prompt=question, params=params, route_class=route_class), timeout=timeout
                )
                async for chunk in call:
                    sys.stdout.write(chunk.text_delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                return
            request = gpb.StreamRagAnswerRequest(
                question=question, index=index, top_k=top_k, params=params, route_class=route_class
            )
            passages: list[gpb.RagPassage] = []
            async for chunk in stub.StreamRagAnswer(request, timeout=timeout):
                passages += chunk.passages
                sys.stdout.write(chunk.text_delta)
                sys.stdout.flush()
                if chunk.finish_reason:
                    sys.stdout.write("\n")
                    _print_sources(chunk, passages)

    try:
        asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        err.print(f"error: {exc.code().name}: {exc.details()}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def _print_sources(last: gpb.StreamRagAnswerResponse, passages: list[gpb.RagPassage]) -> None:
    cited = {c.number for c in last.citations}
    status = gpb.CitationStatus.Name(last.citation_status).removeprefix("CITATION_STATUS_").lower()
    err.print(f"\n[bold]sources[/bold] (citations: {status})")
    for p in passages:
        mark = "*" if p.number in cited else " "
        err.print(
            f" {mark}[{p.number}] {escape(p.title)} [dim]{p.document_id} chars {p.start_offset}-{p.end_offset}[/dim]"
        )
    if last.citation_notice:
        err.print(f"[yellow]{escape(last.citation_notice)}[/yellow]")

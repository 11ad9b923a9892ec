"""RAG through the whole mesh as `servemesh up` runs it: retrieval and rerank behind their
sidecars, `servemesh index` and `servemesh ask --rag` as an operator and a user run them, the
answer over REST through the edge, and RBAC between the services."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from servemesh.retrieval.v1 import retrieval_pb2 as pb
from servemesh.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from mesh import certs
from mesh.launcher import Mesh, Ports, free_port_run
from services.common.client import CHANNEL_OPTIONS
from tests.engine_fixtures import free_port

pytestmark = pytest.mark.timeout(600)
SERVEMESH = str(Path(sys.executable).parent / "servemesh")


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, prepared_model) -> Mesh:
    model_dir, card = prepared_model
    ports = Ports(
        **{f.name: free_port() for f in dataclasses.fields(Ports) if f.name != "admin"}, admin=free_port_run(6)
    )
    engines = [{"id": "small", "kind": "small", "model": card.model_id, "model_dir": str(model_dir)}]
    classes = {
        "chat_short": {"engine": "small", "default_max_tokens": 16, "max_tokens_limit": 64},
        "rag_long": {"engine": "small", "default_max_tokens": 16, "max_tokens_limit": 64, "require_citations": True},
    }
    roles = {"primary": "small", "lowlat": "small", "best": "small", "small": "small"}
    gateway_env = {
        "SERVEMESH_GATEWAY_ROUTE_CLASSES": json.dumps(classes),
        "SERVEMESH_GATEWAY_ROUTING__ROLES": json.dumps(roles),
    }
    home = tmp_path_factory.mktemp("home")
    # the embedding model's ONNX export is made once per machine: reuse it
    onnx = Path(os.environ.get("SERVEMESH_HOME") or Path.home() / ".local/share/servemesh") / "models" / "onnx"
    if onnx.is_dir():
        (home / "models").mkdir()
        (home / "models" / "onnx").symlink_to(onnx)
    m = Mesh(home, ports, engines, lambda _msg: None, gateway_env=gateway_env, rag=True)
    try:
        await m.start()
        yield m
    finally:
        await m.stop()


async def _cli(m: Mesh, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SERVEMESH,
        *args,
        "--home",
        str(m.home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def built(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> str:
    docs = tmp_path_factory.mktemp("docs")
    (docs / "kv.md").write_text("# KV cache\n\nA KV cache keeps the attention keys and values of earlier tokens.")
    (docs / "rivers.txt").write_text("Rivers\n\nThe Danube flows into the Black Sea.")
    (docs / "broken.pdf").write_bytes(b"not a pdf")
    code, out, err = await _cli(mesh, "index", "build", "docs", str(docs), "--reason", "first corpus")
    assert code == 0, out + err
    assert "broken.pdf" in err and "ingested" in out and "built tenants/dev/indexes/docs/manifests/" in out
    return out


async def test_operators_build_list_and_search_indexes_with_the_cli(mesh: Mesh, built: str) -> None:
    code, out, err = await _cli(mesh, "index", "search", "docs", "where does the Danube flow")
    assert code == 0, err
    assert out.splitlines()[0].startswith("[1] Rivers")
    code, out, _ = await _cli(mesh, "index", "list")
    assert code == 0 and "tenants/dev/indexes/docs" in out


async def test_pin_rolls_back_through_the_mesh(mesh: Mesh, built: str, tmp_path: Path) -> None:
    first = built.split("manifests/")[1].split(":")[0]
    (tmp_path / "extra.txt").write_text("Extra\n\nThe Rhine flows into the North Sea.")
    code, out, err = await _cli(mesh, "index", "build", "docs", str(tmp_path))
    assert code == 0, out + err
    code, out, err = await _cli(mesh, "index", "pin", "docs", first, "--reason", "bad corpus")
    assert code == 0, err
    assert f"pinned tenants/dev/indexes/docs/manifests/{first}" in out
    code, out, _ = await _cli(mesh, "index", "search", "docs", "Rhine North Sea", "--top-k", "10")
    assert "Extra" not in out


async def test_rag_answer_over_rest_through_the_edge(mesh: Mesh, built: str) -> None:
    body = {"question": "What does a KV cache keep?", "index": "docs", "topK": 2, "params": {"temperature": 0}}
    ca = ssl.create_default_context(cafile=str(mesh.certs_dir / "ca.crt"))
    headers = {"authorization": f"Bearer {mesh.state().api_key()}", "accept": "text/event-stream"}
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{mesh.ports.edge}", verify=ca, timeout=120) as http:
        response = await http.post("/v1/rag:stream", json=body, headers=headers)
        unauthenticated = await http.post("/v1/rag:stream", json=body)
    assert response.status_code == 200, response.text
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    assert events[0]["passages"][0]["title"] == "KV cache" and events[0]["passages"][0]["number"] == 1
    assert events[-1]["citationStatus"] in (
        "CITATION_STATUS_CITED",
        "CITATION_STATUS_MISSING",
        "CITATION_STATUS_INVALID",
    )
    assert unauthenticated.status_code == 401, (unauthenticated.headers, unauthenticated.text)


async def test_ask_rag_cli_streams_an_answer_with_sources(mesh: Mesh, built: str) -> None:
    code, out, err = await _cli(mesh, "ask", "--rag", "--index", "docs", "What does a KV cache keep?")
    assert code == 0, err
    assert out.strip() and "sources" in err and "KV cache" in err


async def test_the_gateway_may_search_but_not_ingest(mesh: Mesh, built: str) -> None:
    ident = certs.identity(mesh.certs_dir, "gateway", mesh.namespace)
    target = f"127.0.0.1:{mesh.ports.retrieval_inbound}"
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "retrieval")]
    async with grpc.aio.secure_channel(target, certs.channel_credentials(ident), options=options) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        found = await stub.Search(pb.SearchRequest(index="tenants/dev/indexes/docs", query="Danube"), timeout=30)
        assert found.hits

        async def upload():
            yield pb.IngestDocumentsRequest(index="tenants/dev/indexes/docs")
            yield pb.IngestDocumentsRequest(file=pb.FileHeader(filename="x.txt"))
            yield pb.IngestDocumentsRequest(data=b"sneaky")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IngestDocuments(upload(), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

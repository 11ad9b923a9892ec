"""`servemesh eval run` through the real mesh (Envoy sidecars, mTLS, registry, small engine):
deployments are looked up in the registry and dialled at their sidecars as the `cli` identity."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from mesh.cli import app
from mesh.launcher import Mesh, Ports, free_port_run
from tests.engine_fixtures import free_port

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
async def small_mesh(tmp_path_factory: pytest.TempPathFactory, prepared_model) -> AsyncIterator[Mesh]:
    model_dir, card = prepared_model
    ports = Ports(
        **{f.name: free_port() for f in dataclasses.fields(Ports) if f.name != "admin"}, admin=free_port_run(4)
    )
    engines = [{"id": "small", "kind": "small", "model": card.model_id, "model_dir": str(model_dir)}]
    classes = {"chat_short": {"engine": "small", "default_max_tokens": 64, "max_tokens_limit": 256}}
    roles = {"primary": "small", "lowlat": "small", "best": "small", "small": "small"}
    env = {
        "SERVEMESH_GATEWAY_ROUTE_CLASSES": json.dumps(classes),
        "SERVEMESH_GATEWAY_ROUTING__ROLES": json.dumps(roles),
    }
    mesh = Mesh(tmp_path_factory.mktemp("home"), ports, engines, lambda _msg: None, gateway_env=env, mesh=True)
    try:
        await mesh.start()
        yield mesh
    finally:
        await mesh.stop()


async def cli(home: Path, *args: str) -> Result:
    return await asyncio.to_thread(
        CliRunner().invoke, app, ["eval", *args, "--home", str(home)], env={"COLUMNS": "250"}, catch_exceptions=False
    )


async def test_inference_deployment_against_the_gateway_deployment_over_mtls(small_mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--deployment", "inference-stable", "--reference-deployment", "gateway-stable", "--json", str(out)]
    result = await cli(small_mesh.home, "run", "smoke", *args)
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    cases = {c["id"]: c for c in body["report"]["cases"]}
    ref_cases = {c["id"]: c for c in body["reference"]["cases"]}
    # both answered through their sidecars: the same greedy text from the inference deployment
    assert cases["greedy-matches-reference"]["status"] == "passed"
    assert cases["capital-of-france"]["status"] == "passed" and cases["capital-of-france"]["engine"] == "engines/small"
    assert ref_cases["refuses-weapons"]["status"] == "passed"  # the gateway deployment, with the dev key

    # the gateway through the edge, with the dev key, as `servemesh generate` reaches it; its
    # metrics at the registered gateway deployment's metrics_url
    default = await cli(small_mesh.home, "run", "smoke", "--json", str(out))
    assert default.exit_code == 0, default.output
    report = json.loads(out.read_text())["report"]
    assert report["target"].endswith("(the mesh)")
    assert not [c for c in report["cases"] if c["status"] == "failed"]
    assert {c["id"] for c in report["cases"] if c["status"] == "skipped"} == {
        "greedy-matches-reference",  # no reference run
        "rag-cites-first-passage",  # this mesh runs without RAG
    }

"""SloService over a real grpc.aio server, and `servemesh slo status` against it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from click.testing import Result
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from servemesh.mesh.v1 import slo_service_pb2 as pb
from servemesh.mesh.v1 import slo_service_pb2_grpc as pb_grpc
from typer.testing import CliRunner

from mesh import certs
from mesh.cli import app
from mesh.slo.config import load_config
from mesh.slo.evaluator import SloEvaluator
from mesh.slo.servicer import SERVICE_NAME, SloServicer
from mesh.state import MeshState
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import ServiceSettings

from .pages import MINUTE, T0, Clock, Gateways, page

pytestmark = pytest.mark.timeout(60)


async def _evaluator() -> tuple[SloEvaluator, Clock]:
    """10 minutes of chat_short traffic: 20% server errors from minute 1, TTFT all fast."""
    clock, gateways = Clock(), Gateways()
    evaluator = SloEvaluator(
        load_config().model_copy(update={"sample_interval": 60.0}), ["g"], clock=clock, fetch=gateways.fetch
    )
    for m in range(11):
        clock.now = T0 + m * MINUTE
        fast = {0.8: 1000.0 * m, 2.5: 1000.0 * m, float("inf"): 1000.0 * m}
        gateways.pages = {
            "g": page(
                {("chat_short", "OK"): 800.0 * m, ("chat_short", "INTERNAL"): 200.0 * m},
                ttft={("chat_short", "vllm"): fast},
            )
        }
        await evaluator.scrape_once()
    return evaluator, clock


async def _serve(evaluator: SloEvaluator, clock: Clock, credentials=None) -> GrpcServer:
    service = Service(SERVICE_NAME, SloServicer(evaluator, clock=clock), pb_grpc.add_SloServiceServicer_to_server)
    server = await create_server(
        ServiceSettings(port=0), [service], registry=CollectorRegistry(), credentials=credentials
    )
    await server.start()
    return server


@pytest.fixture
async def served() -> AsyncIterator[GrpcServer]:
    evaluator, clock = await _evaluator()
    server = await _serve(evaluator, clock)
    yield server
    await server.stop(0)


async def test_list_slo_statuses_maps_every_field(served: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        response = await pb_grpc.SloServiceStub(channel).ListSloStatuses(pb.ListSloStatusesRequest(), timeout=10)
    names = [s.slo.name for s in response.statuses]
    assert names == sorted(names) and len(names) == 8
    assert response.scrape_time.ToNanoseconds() == int(T0 + 10 * MINUTE) * 10**9
    by_name = {s.slo.name: s for s in response.statuses}
    errors = by_name["chat_short-server_errors"]
    assert (errors.slo.route_class, errors.slo.kind, errors.slo.objective) == (
        "chat_short",
        pb.Slo.KIND_SERVER_ERRORS,
        0.99,
    )
    assert not errors.slo.HasField("threshold")
    assert errors.slo.runbook.startswith("servemesh route lock inference")
    assert errors.state == pb.SloStatus.STATE_BREACHED and errors.value == pytest.approx(0.2)
    assert errors.breach_start_time.ToNanoseconds() == int(T0 + MINUTE) * 10**9
    assert [b.window.ToSeconds() for b in errors.burn_rates] == [300, 1800, 3600, 21600]
    assert [b.requests for b in errors.burn_rates] == [5000, 10000, 10000, 10000]
    assert [b.complete for b in errors.burn_rates] == [True, False, False, False]
    assert [b.burn_rate for b in errors.burn_rates] == pytest.approx([20, 20, 20, 20])
    assert [b.bad_fraction for b in errors.burn_rates] == pytest.approx([0.2] * 4)
    ttft = by_name["chat_short-ttft"]
    assert (ttft.slo.kind, ttft.slo.threshold.ToMilliseconds(), ttft.state) == (
        pb.Slo.KIND_TTFT, 800, pb.SloStatus.STATE_OK,
    )  # fmt: skip
    assert ttft.value == pytest.approx(0.8 * 0.95) and not ttft.HasField("breach_start_time")
    assert by_name["chat_short-timeouts"].state == pb.SloStatus.STATE_OK
    idle = by_name["code-timeouts"]
    assert (idle.state, idle.value, idle.slo.kind) == (pb.SloStatus.STATE_NO_DATA, 0.0, pb.Slo.KIND_TIMEOUTS)


async def test_route_class_filter_and_invalid_argument(served: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.SloServiceStub(channel)
        rag = await stub.ListSloStatuses(pb.ListSloStatusesRequest(route_class="rag_long"), timeout=10)
        assert [s.slo.name for s in rag.statuses] == ["rag_long-server_errors", "rag_long-timeouts", "rag_long-ttft"]
        none = await stub.ListSloStatuses(pb.ListSloStatusesRequest(route_class="batch"), timeout=10)
        assert list(none.statuses) == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListSloStatuses(pb.ListSloStatusesRequest(route_class="RAG long"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["route_class"]


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(
        CliRunner().invoke, app, ["slo", "status", *args], env={"COLUMNS": "250"}, catch_exceptions=False
    )


async def test_the_cli_prints_the_table_from_a_target(served: GrpcServer) -> None:
    result = await _cli("--target", served.address)
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if "-" in line and line.startswith("│")}
    row = lines["chat_short-server_errors"]
    assert "5xx < 1%" in row and "20.00%" in row and "BREACHED" in row and "servemesh route lock inference" in row
    assert "20.00*" in row  # the 30m/1h/6h windows are not full yet
    assert "p95 TTFT ≤ 800 ms" in lines["chat_short-ttft"] and "760 ms" in lines["chat_short-ttft"]
    assert "no data" in lines["code-timeouts"]
    assert "gateways scraped at" in result.stdout
    only = await _cli("--target", served.address, "--route-class", "code")
    assert "code-timeouts" in only.stdout and "chat_short" not in only.stdout
    bad = await _cli("--target", served.address, "--route-class", "Not Valid")
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.stderr and "route_class" in bad.stderr


async def test_the_cli_finds_the_controller_in_the_mesh_state_over_mtls(tmp_path: Path) -> None:
    home = tmp_path / "home"
    nothing = await _cli("--home", str(home))
    assert nothing.exit_code == 1 and "no running mesh found" in nothing.stderr and "--target" in nothing.stderr
    MeshState(mesh=False, gateway="127.0.0.1:1", registry="127.0.0.1:2").write(home)
    no_controller = await _cli("--home", str(home))
    assert no_controller.exit_code == 1 and "names no controller" in no_controller.stderr
    ids = certs.ensure_identities(tmp_path / "certs", ["cli", "controller"])
    evaluator, clock = await _evaluator()
    server = await _serve(evaluator, clock, credentials=certs.server_credentials(ids["controller"]))
    try:
        MeshState(
            mesh=True,
            gateway="127.0.0.1:1",
            registry="127.0.0.1:2",
            controller=server.address,
            certs_dir=str(tmp_path / "certs"),
        ).write(home)
        result = await _cli("--home", str(home))
    finally:
        await server.stop(0)
    assert result.exit_code == 0, result.output
    assert "chat_short-server_errors" in result.stdout and "BREACHED" in result.stdout

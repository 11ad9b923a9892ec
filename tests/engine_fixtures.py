"""The real engine for the test session: vLLM (CPU build, SmolLM2-135M-Instruct) started
once per session through the same supervisor and arguments `servemesh up` uses, on a
free port, plus in-process inference and gateway servers in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from mesh.launcher import free_port, servemesh_home
from mesh.supervisor import Supervisor
from mesh.vllm import VllmArgs, ensure_venv, health_check
from services.common.server import GrpcServer
from services.gateway.server import create_gateway_server
from services.gateway.settings import GatewaySettings
from services.inference.core import InferenceCore
from services.inference.server import create_inference_server
from services.inference.settings import EngineConfig, InferenceSettings


@dataclass
class VllmProcess:
    args: VllmArgs
    supervisor: Supervisor
    log_path: Path

    @property
    def url(self) -> str:
        return self.args.url


@dataclass
class Mesh:
    inference: GrpcServer
    core: InferenceCore
    gateway: GrpcServer
    gateway_registry: CollectorRegistry
    inference_registry: CollectorRegistry
    #: base URL of the gateway's OpenAI-compatible HTTP API
    gateway_http: str


@pytest.fixture(scope="session")
async def vllm(
    prepared_model: tuple[Path, object],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[VllmProcess]:
    python = ensure_venv(servemesh_home() / "venvs" / "vllm")
    args = VllmArgs(port=free_port(), kv_cache_gib=1)
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    sup = Supervisor(
        "vllm",
        args.argv(python, prepared_model[0]),
        env=args.env(),
        health=health_check(args.url),
        log_path=log_path,
        backoff_initial_s=0.5,
    )
    await sup.start()
    yield VllmProcess(args, sup, log_path)
    await sup.stop()


@pytest.fixture(scope="session")
async def mesh(vllm: VllmProcess, prepared_model: tuple[Path, object]) -> AsyncIterator[Mesh]:
    iregistry, gregistry = CollectorRegistry(), CollectorRegistry()
    engine = EngineConfig(
        id="vllm",
        kind="vllm",
        url=vllm.url,
        model=vllm.args.served_model_name,
        model_dir=prepared_model[0],
        max_model_len=vllm.args.max_model_len,
    )
    inference, core = await create_inference_server(
        InferenceSettings(port=0, metrics_port=0, engines=[engine], health_interval_s=0.5), registry=iregistry
    )
    await inference.start()
    gateway, backend, http = await create_gateway_server(
        GatewaySettings(port=0, metrics_port=0, http_port=0, inference_target=inference.address), registry=gregistry
    )
    assert http is not None
    await gateway.start()
    await http.start()
    yield Mesh(inference, core, gateway, gregistry, iregistry, http.address)
    await http.stop()
    await gateway.stop(0)
    await backend.close()
    await inference.stop(0)
    await core.close()


@pytest.fixture
async def gateway_channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.gateway.address) as channel:
        yield channel


@pytest.fixture
async def inference_channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.inference.address) as channel:
        yield channel

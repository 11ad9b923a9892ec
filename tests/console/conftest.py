"""Console fixtures: a real registry and a real SloService on free ports (plaintext, as with
--no-mesh), users in a users file, and NiceGUI's simulated user over the console's pages."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from nicegui import Client, app, ui
from nicegui.storage import Storage
from nicegui.testing import User
from nicegui.testing.general import nicegui_reset_globals, prepare_simulation
from prometheus_client import CollectorRegistry
from servemesh.mesh.v1 import slo_service_pb2_grpc as slo_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from console.auth import Role, set_user
from console.backend import Backend
from console.pages import Console
from console.server import build
from console.settings import ConsoleSettings
from mesh.slo.servicer import SERVICE_NAME, SloServicer
from mesh.state import MeshState
from services.common.server import GrpcServer, Service, create_server
from services.common.settings import ServiceSettings
from services.registry.server import create_registry_server
from services.registry.settings import RegistrySettings
from tests.slo.test_servicer import _evaluator

PASSWORDS = {"olivia": "operator-password-1", "victor": "viewer-password-22"}
REASON = "console test"


@dataclass
class Backends:
    registry: GrpcServer
    slo: GrpcServer
    stub: rpb_grpc.RegistryServiceStub
    home: Path
    users: Path

    def state(self) -> MeshState:
        return MeshState(mesh=False, gateway="", registry=self.registry.address, controller=self.slo.address)


async def _seed(stub: rpb_grpc.RegistryServiceStub) -> None:
    for name, service, engine in [
        ("inference-stable", "inference", "vllm"),
        ("inference-small", "inference", "small"),
        ("gateway-stable", "gateway", ""),
        ("gateway-canary", "gateway", ""),
    ]:
        await stub.CreateDeployment(
            rpb.CreateDeploymentRequest(
                deployment=rpb.Deployment(
                    name=f"deployments/{name}",
                    service=service,
                    version=name.split("-")[1],
                    engine=engine,
                    endpoint="127.0.0.1:9",  # nothing listens: the engines page reports it unreachable
                ),
                reason=REASON,
            )
        )
    for route, backends in [
        ("inference", [("inference-stable", 100), ("inference-small", 0)]),
        ("gateway", [("gateway-stable", 100)]),
    ]:
        await stub.CreateRoute(
            rpb.CreateRouteRequest(
                route=rpb.Route(
                    name=f"routes/{route}",
                    service=route,
                    backends=[rpb.WeightedBackend(deployment=f"deployments/{d}", weight=w) for d, w in backends],
                ),
                reason=REASON,
            )
        )


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    server, core = await create_registry_server(
        RegistrySettings(port=0, data_dir=tmp_path / "registry"), CollectorRegistry()
    )
    await server.start()
    evaluator, clock = await _evaluator()
    slo = await create_server(
        ServiceSettings(port=0),
        [Service(SERVICE_NAME, SloServicer(evaluator, clock=clock), slo_grpc.add_SloServiceServicer_to_server)],
        registry=CollectorRegistry(),
    )
    await slo.start()
    users = tmp_path / "console" / "users.yaml"
    set_user(users, "olivia", Role.OPERATOR, PASSWORDS["olivia"])
    set_user(users, "victor", Role.VIEWER, PASSWORDS["victor"])
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = rpb_grpc.RegistryServiceStub(channel)
        await _seed(stub)
        yield Backends(server, slo, stub, tmp_path, users)
    await slo.stop(0)
    await server.stop(0)
    await core.close()


@pytest.fixture(scope="session", autouse=True)
def _nicegui_storage() -> None:
    """NiceGUI keeps per-browser storage in files: a temporary folder, not the repository."""
    Storage.path = Path(tempfile.mkdtemp(prefix="servemesh-console-storage-")).resolve()
    app.storage = Storage()


@asynccontextmanager
async def console_user(
    settings: ConsoleSettings, state: Callable[[], MeshState]
) -> AsyncIterator[tuple[User, Console]]:
    """The console's pages in NiceGUI's user simulation (no browser), over the given mesh."""
    with nicegui_reset_globals():
        os.environ["NICEGUI_USER_SIMULATION"] = "true"
        try:
            prepare_simulation()
            console = build(settings, Backend(state))
            ui.run(storage_secret="test secret", session_middleware_kwargs={"same_site": "strict"})
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
                    yield User(client), console
        finally:
            os.environ.pop("NICEGUI_USER_SIMULATION", None)
            Client.instances.clear()


@pytest.fixture
async def console(backends: Backends) -> AsyncIterator[tuple[User, Console]]:
    settings = ConsoleSettings(home=backends.home, users_file=backends.users, refresh_s=0.5)
    async with console_user(settings, backends.state) as pair:
        await pair[1].sampler.sample()
        yield pair


async def sign_in(user: User, name: str, password: str | None = None) -> None:
    """Sign in on the sign-in page; with the right password, wait until the overview is shown."""
    await user.open("/login")
    user.find(marker="name").type(name)
    user.find(marker="password").type(PASSWORDS[name] if password is None else password)
    user.find(marker="sign-in").click()
    if password is None:
        await user.should_see(f"{name} (")


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `check()` holds (an async handler updating the page), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "the page did not get there"
        await asyncio.sleep(0.05)

"""Registry fixtures: a PostgreSQL server once per session, a fresh database per test on SQLite
or PostgreSQL, a started RegistryCore, and registry gRPC servers on free ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from prometheus_client import CollectorRegistry
from servemesh.registry.v1 import registry_pb2_grpc as pb_grpc
from sqlalchemy import create_engine, text

from services.registry.core import RegistryCore
from services.registry.server import RegistryServer, create_registry_server
from services.registry.servicer import resource_json
from services.registry.settings import RegistrySettings
from services.registry.store import Store
from tests.engine_fixtures import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL 15 cluster (trust auth, fsync off) on a free loopback port."""
    if not (PG_BIN / "pg_ctl").is_file():
        pytest.fail(f"PostgreSQL server binaries not found in {PG_BIN} (make system installs them)")
    root = Path(tempfile.mkdtemp(prefix="servemesh-registry-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "postgres.log"
    subprocess.run(
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data)]
    started = subprocess.run(
        _as_postgres([*ctl, "-o", options, "-l", str(log), "-w", "-t", "30", "start"]), capture_output=True
    )
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"postgres did not start: {started.stderr.decode()} {log.read_text() if log.exists() else ''}"
        )
    try:
        yield Postgres(port)
    finally:
        subprocess.run(_as_postgres([*ctl, "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _postgres_database(pg: Postgres) -> Iterator[str]:
    """A new, empty database for one test; dropped afterwards."""
    name = f"registry_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield pg.url(name)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, then (second run of the test) a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path / 'registry.db'}"
    else:
        yield from _postgres_database(request.getfixturevalue("postgres"))


@pytest.fixture
def postgres_url(postgres: Postgres) -> Iterator[str]:
    yield from _postgres_database(postgres)


@pytest.fixture
async def core(database_url: str) -> AsyncIterator[RegistryCore]:
    registry_core = RegistryCore(Store(database_url), resource_json)
    await registry_core.start()
    yield registry_core
    await registry_core.close()


# --- gRPC -------------------------------------------------------------------------------


@dataclass
class Registry:
    server: RegistryServer
    core: RegistryCore
    channel: grpc.aio.Channel
    stub: pb_grpc.RegistryServiceStub


RegistryFactory = Callable[..., Awaitable[Registry]]


@pytest.fixture
async def make_registry(tmp_path: Path) -> AsyncIterator[RegistryFactory]:
    """Start registry servers (SQLite in tmp_path unless database_url is given); stopped at teardown."""
    started: list[Registry] = []

    async def factory(**settings: Any) -> Registry:
        settings.setdefault("port", 0)
        settings.setdefault("data_dir", tmp_path)
        server, registry_core = await create_registry_server(RegistrySettings(**settings), CollectorRegistry())
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        registry = Registry(server, registry_core, channel, pb_grpc.RegistryServiceStub(channel))
        started.append(registry)
        return registry

    yield factory
    for registry in started:
        await registry.channel.close()
        await registry.server.stop(0)
        await registry.core.close()


@pytest.fixture
async def registry(make_registry: RegistryFactory) -> Registry:
    return await make_registry()

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio
import pytest
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from services.common.server import GrpcServer, create_server
from services.common.settings import ServiceSettings

from .servicer import TestServicer, service_for

ServerFactory = Callable[..., Awaitable[tuple[GrpcServer, TestServicer]]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Start test servers on free ports; all are stopped (grace 0) at teardown."""
    started: list[GrpcServer] = []

    async def factory(
        *,
        downstream: str | None = None,
        tracer_provider: TracerProvider | None = None,
        **settings: Any,
    ) -> tuple[GrpcServer, TestServicer]:
        servicer = TestServicer(downstream=downstream)
        server = await create_server(
            ServiceSettings(**settings),
            [service_for(servicer)],
            registry=CollectorRegistry(),
            tracer_provider=tracer_provider,
        )
        await server.start()
        started.append(server)
        return server, servicer

    yield factory
    for server in started:
        await server.stop(0)


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    """Plain aio channels (no servemesh client interceptors), closed at teardown."""
    channels: list[grpc.aio.Channel] = []

    def factory(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        return channel

    yield factory
    for channel in channels:
        await channel.close()

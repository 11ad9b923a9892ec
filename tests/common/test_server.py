"""Server bootstrap: health, reflection, metrics endpoint, graceful stop and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.server import create_server
from services.common.settings import ServiceSettings

from .servicer import SERVICE_NAME, StringValue, Stub, TestServicer, eventually, service_for

pytestmark = pytest.mark.timeout(30)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_binds_free_port_and_reports_address(make_server):
    first, _ = await make_server()
    second, _ = await make_server()
    assert first.port > 0 and second.port > 0 and first.port != second.port
    assert first.address == f"127.0.0.1:{first.port}"
    assert first.metrics_port is None


async def test_port_in_use_is_an_error(make_server):
    server, _ = await make_server()
    with pytest.raises(RuntimeError, match="bind"):
        await create_server(ServiceSettings(port=server.port), [], registry=CollectorRegistry())


async def test_health_serving_for_each_service_and_overall(make_server, channel_to):
    server, _ = await make_server()
    health = health_pb2_grpc.HealthStub(channel_to(server.address))
    for name in ("", SERVICE_NAME):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


class _AbortingContext:
    """Just enough of a servicer context to call HealthServicer.Check in-process."""

    async def abort(self, code, details=""):
        raise LookupError(code)


async def test_health_not_serving_until_started():
    server = await create_server(ServiceSettings(), [service_for(TestServicer())], registry=CollectorRegistry())
    try:
        request = health_pb2.HealthCheckRequest(service="")
        assert (await server.health.Check(request, _AbortingContext())).status == NOT_SERVING
        with pytest.raises(LookupError):
            await server.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), _AbortingContext())
        await server.start()
        assert (await server.health.Check(request, _AbortingContext())).status == SERVING
    finally:
        await server.stop(0)


async def test_reflection_lists_services(make_server, channel_to):
    server, _ = await make_server()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel_to(server.address))

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [r async for r in stub.ServerReflectionInfo(ask())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_metrics_endpoint_serves_prometheus_text(make_server, channel_to):
    server, _ = await make_server(metrics_port=0)
    assert server.metrics_port and server.metrics_port != server.port
    await Stub(channel_to(server.address)).Echo(StringValue(value="x"))
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert response.status_code == 200
    line = f'servemesh_grpc_server_requests_total{{code="OK",method="Echo",service="{SERVICE_NAME}"}} 1.0'
    assert line in response.text
    assert "servemesh_grpc_server_request_duration_seconds_bucket" in response.text
    await server.stop(0)
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=1)


async def test_graceful_stop_drains_stream_within_grace(make_server, channel_to):
    server, _ = await make_server()
    channel = channel_to(server.address)
    stub = Stub(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert (await watch.read()).status == SERVING

    stream = stub.Count(StringValue(value="6:0.1"))
    first = await stream.read()
    started = time.monotonic()
    stopping = asyncio.create_task(server.stop(grace=2))

    assert (await asyncio.wait_for(watch.read(), timeout=1)).status == NOT_SERVING
    watch.cancel()  # otherwise the watch itself would hold the drain for the whole grace period
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Echo(StringValue(value="late"), timeout=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    rest = []
    while (message := await stream.read()) is not grpc.aio.EOF:
        rest.append(message)
    assert [json.loads(m.value)["i"] for m in (first, *rest)] == [0, 1, 2, 3, 4, 5]
    assert await stream.code() == grpc.StatusCode.OK
    await stopping
    assert time.monotonic() - started < 2  # finished when the stream did, not at the grace deadline
    assert (
        server.registry.get_sample_value(
            "servemesh_grpc_server_requests_total", {"service": SERVICE_NAME, "method": "Count", "code": "OK"}
        )
        == 1
    )


async def test_stop_cancels_streams_that_outlive_grace(make_server, channel_to):
    server, servicer = await make_server()
    stream = Stub(channel_to(server.address)).Forever(StringValue(value="tick"))
    await stream.read()
    started = time.monotonic()
    await server.stop(grace=0.3)
    assert 0.25 <= time.monotonic() - started < 2
    await asyncio.wait_for(servicer.stream_closed.wait(), timeout=1)
    with pytest.raises(grpc.aio.AioRpcError):
        while await stream.read() is not grpc.aio.EOF:
            pass
    await eventually(
        lambda: (
            server.registry.get_sample_value(
                "servemesh_grpc_server_requests_total",
                {"service": SERVICE_NAME, "method": "Forever", "code": "CANCELLED"},
            )
            == 1
        )
    )


async def test_stop_twice_is_harmless(make_server):
    server, _ = await make_server()
    await asyncio.gather(server.stop(0), server.stop(0))
    assert await server.wait_for_termination(timeout=1)


async def test_sigterm_drains_in_flight_stream_and_exits_zero():
    grace = 5.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("sigterm_server.py")),
        str(grace),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        assert line.startswith(b"PORT "), line
        async with grpc.aio.insecure_channel(f"127.0.0.1:{int(line.split()[1])}") as channel:
            stub = Stub(channel)
            stream = stub.Count(StringValue(value="8:0.1"))
            first = await stream.read()
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = []
            while (message := await stream.read()) is not grpc.aio.EOF:
                rest.append(message)
                if len(rest) == 2:
                    proc.send_signal(signal.SIGTERM)  # a repeated SIGTERM must not cut the drain short
            assert [json.loads(m.value)["i"] for m in (first, *rest)] == list(range(8))
            assert await stream.code() == grpc.StatusCode.OK
        returncode = await asyncio.wait_for(proc.wait(), timeout=grace)
        assert returncode == 0
        assert time.monotonic() - signalled < grace
        logs = [json.loads(x) for x in (await proc.stderr.read()).decode().splitlines() if x.startswith("{")]
        messages = [entry["msg"] for entry in logs]
        assert "received SIGTERM, draining" in messages and messages[-1] == "stopped"
        assert "received SIGTERM again, already draining" in messages
        access = [e for e in logs if e["logger"] == "servemesh.access"]
        assert access and access[0]["method"] == f"/{SERVICE_NAME}/Count" and access[0]["code"] == "OK"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""Tracing: OTLP export to a (fake) collector, and span status for mapped errors."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.common.tracing import build_tracer_provider

from .servicer import SERVICE_NAME, StringValue, Stub, eventually

pytestmark = pytest.mark.timeout(30)


class FakeCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_are_exported_over_otlp_grpc():
    collector = FakeCollector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        provider = build_tracer_provider("inference", f"http://127.0.0.1:{port}")
        with provider.get_tracer("test").start_as_current_span("generate"):
            pass
        assert await asyncio.to_thread(provider.force_flush, 10_000)
        await asyncio.to_thread(provider.shutdown)
    finally:
        await server.stop(0)
    resource_spans = [rs for request in collector.requests for rs in request.resource_spans]
    service_names = {
        a.value.string_value for rs in resource_spans for a in rs.resource.attributes if a.key == "service.name"
    }
    span_names = [s.name for rs in resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert service_names == {"inference"} and span_names == ["generate"]


def test_no_exporter_without_endpoint():
    provider = build_tracer_provider("inference", None)
    assert provider.resource.attributes["service.name"] == "inference"
    with provider.get_tracer("test").start_as_current_span("noop") as span:
        assert span.get_span_context().is_valid  # spans are still created (ids for the logs)


async def test_mapped_errors_reach_the_server_span(make_server, channel_to):
    """Error mapping runs inside the OpenTelemetry interceptor, so spans carry the final code."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server, _ = await make_server(tracer_provider=provider)
    stub = Stub(channel_to(server.address))
    for text in ("invalid", "unavailable"):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Echo(StringValue(value=text))

    def server_spans():
        return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]

    await eventually(lambda: len(server_spans()) == 2)  # a span ends just after its status is sent
    invalid, unavailable = server_spans()
    assert invalid.name == f"/{SERVICE_NAME}/Echo"
    assert invalid.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid.status.status_code == StatusCode.UNSET  # a client fault is not a server error (semconv)
    assert unavailable.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert unavailable.status.status_code == StatusCode.ERROR

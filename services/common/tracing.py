"""OpenTelemetry tracing: a TracerProvider per process, OTLP/gRPC export when configured.

The gRPC server and client interceptors come from opentelemetry-instrumentation-grpc;
create_server() and client.insecure_channel() attach them.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc.aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def build_tracer_provider(service_name: str, otlp_endpoint: str | None) -> TracerProvider:
    """A provider tagged with service.name; spans go to `otlp_endpoint` (OTLP gRPC) if given."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if otlp_endpoint:
        # Imported lazily: the exporter pulls in its own gRPC channel machinery.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider


def configure_tracing(service_name: str, otlp_endpoint: str | None) -> Callable[[], None]:
    """Install the process-wide TracerProvider (call once, in main()); returns its shutdown."""
    provider = build_tracer_provider(service_name, otlp_endpoint)
    trace.set_tracer_provider(provider)
    return provider.shutdown


def server_interceptor(tracer_provider: trace.TracerProvider | None = None) -> grpc.aio.ServerInterceptor:
    """The OpenTelemetry aio server interceptor (global provider unless one is given)."""
    return aio_server_interceptor(tracer_provider=tracer_provider)  # type: ignore[no-any-return]


def client_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """The OpenTelemetry aio client interceptors (global provider unless one is given)."""
    return list(aio_client_interceptors(tracer_provider=tracer_provider))

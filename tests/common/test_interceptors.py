"""Request id, deadline propagation, error mapping and metrics, over real servers and channels."""

from __future__ import annotations

import asyncio
import json

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common.client import insecure_channel

from .servicer import SERVICE_NAME, StringValue, Stub, eventually

pytestmark = pytest.mark.timeout(30)


def requests_total(server, method: str, code: str) -> float:
    value = server.registry.get_sample_value(
        "servemesh_grpc_server_requests_total", {"service": SERVICE_NAME, "method": method, "code": code}
    )
    return value or 0.0


def in_flight(server, method: str) -> float:
    value = server.registry.get_sample_value(
        "servemesh_grpc_server_in_flight", {"service": SERVICE_NAME, "method": method}
    )
    return value or 0.0


def detail(status, message_type):
    """The first detail of `message_type` in a google.rpc.Status, or None."""
    for packed in status.details:
        if packed.Is(message_type.DESCRIPTOR):
            message = message_type()
            packed.Unpack(message)
            return message
    return None


# --- request id -----------------------------------------------------------------------


async def test_unary_echoes_given_request_id(make_server, channel_to):
    server, _ = await make_server()
    call = Stub(channel_to(server.address)).Echo(StringValue(value="x"), metadata=(("x-request-id", "req-123"),))
    body = json.loads((await call).value)
    assert body["request_id"] == "req-123"
    assert ("x-request-id", "req-123") in tuple(await call.initial_metadata())


async def test_unary_mints_request_id_when_absent(make_server, channel_to):
    server, _ = await make_server()
    stub = Stub(channel_to(server.address))
    first, second = stub.Echo(StringValue(value="x")), stub.Echo(StringValue(value="x"))
    ids = [json.loads((await c).value)["request_id"] for c in (first, second)]
    returned = [dict(await c.initial_metadata())["x-request-id"] for c in (first, second)]
    assert ids == returned
    assert ids[0] != ids[1] and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


async def test_malformed_request_id_is_replaced(make_server, channel_to):
    server, _ = await make_server()
    call = Stub(channel_to(server.address)).Echo(StringValue(value="x"), metadata=(("x-request-id", '{"a": 1} ' * 30),))
    assert len(json.loads((await call).value)["request_id"]) == 32


async def test_stream_echoes_given_request_id(make_server, channel_to):
    server, _ = await make_server()
    call = Stub(channel_to(server.address)).Count(StringValue(value="3"), metadata=(("x-request-id", "s-1"),))
    messages = [json.loads(m.value) async for m in call]
    assert dict(await call.initial_metadata())["x-request-id"] == "s-1"
    assert [m["request_id"] for m in messages] == ["s-1"] * 3


async def test_stream_mints_request_id(make_server, channel_to):
    server, _ = await make_server()
    call = Stub(channel_to(server.address)).Count(StringValue(value="2"))
    messages = [json.loads(m.value) async for m in call]
    minted = dict(await call.initial_metadata())["x-request-id"]
    assert len(minted) == 32 and {m["request_id"] for m in messages} == {minted}


async def test_write_style_stream_and_handler_metadata(make_server, channel_to):
    """Handlers using context.write() or sending their own initial metadata still get one x-request-id."""
    server, _ = await make_server()
    stub = Stub(channel_to(server.address))
    call = stub.WriteCount(StringValue(value="3"), metadata=(("x-request-id", "w-1"),))
    assert [m.value async for m in call] == ["0", "1", "2"]
    assert dict(await call.initial_metadata())["x-request-id"] == "w-1"

    own = stub.Echo(StringValue(value="own-metadata"), metadata=(("x-request-id", "m-1"),))
    await own
    metadata = tuple(await own.initial_metadata())
    assert ("x-custom", "yes") in metadata
    assert [k for k, _ in metadata].count("x-request-id") == 1 and ("x-request-id", "m-1") in metadata


async def test_client_and_bidi_streams_are_wrapped(make_server, channel_to):
    server, _ = await make_server()
    stub = Stub(channel_to(server.address))

    async def parts(*values):
        for v in values:
            yield StringValue(value=v)

    join = stub.Join(parts("a", "b"), metadata=(("x-request-id", "j-1"),))
    assert (await join).value == "ab"
    assert dict(await join.initial_metadata())["x-request-id"] == "j-1"

    chat = stub.Chat(parts("hi", "invalid"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for m in chat:
            received.append(m.value)
    assert received == ["HI"]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert requests_total(server, "Join", "OK") == 1
    await eventually(lambda: requests_total(server, "Chat", "INVALID_ARGUMENT") == 1)


# --- propagation ----------------------------------------------------------------------


async def test_request_id_and_deadline_propagate_downstream(make_server, channel_to):
    downstream, _ = await make_server()
    upstream, _ = await make_server(downstream=downstream.address)
    call = Stub(channel_to(upstream.address)).Relay(
        StringValue(value="x"), metadata=(("x-request-id", "chain-1"),), timeout=5
    )
    body = json.loads((await call).value)
    here, unary, stream = body["here"], body["unary"], body["stream"]
    assert here["request_id"] == unary["request_id"] == stream["request_id"] == "chain-1"
    # The relay asked for timeout=30 downstream; the interceptor capped it at what was left.
    # gRPC sends deadlines as relative timeouts (rounded up to its wire units), so each hop
    # can gain a few ms, more on a loaded machine: allow 50 ms, far below the 25 s an
    # uncapped timeout would show.
    assert here["time_remaining"] is not None and here["time_remaining"] <= 5.05
    assert unary["time_remaining"] is not None and unary["time_remaining"] <= here["time_remaining"] + 0.05
    assert stream["time_remaining"] is not None and stream["time_remaining"] <= here["time_remaining"] + 0.05


async def test_no_deadline_when_caller_sets_none(make_server, channel_to):
    server, _ = await make_server()
    body = json.loads((await Stub(channel_to(server.address)).Echo(StringValue(value="x"))).value)
    assert body["time_remaining"] is None


async def test_client_interceptors_are_inert_outside_a_request(make_server):
    server, _ = await make_server()
    async with insecure_channel(server.address) as channel:
        body = json.loads((await Stub(channel).Echo(StringValue(value="x"))).value)
    assert len(body["request_id"]) == 32 and body["time_remaining"] is None


async def test_trace_context_propagates(make_server, channel_to):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    downstream, _ = await make_server(tracer_provider=provider)
    upstream, _ = await make_server(downstream=downstream.address, tracer_provider=provider)
    await Stub(channel_to(upstream.address)).Relay(StringValue(value="x"))
    server_spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    names = sorted(s.name for s in server_spans)
    assert names == sorted(f"/{SERVICE_NAME}/{m}" for m in ("Relay", "Echo", "Count"))
    assert len({s.context.trace_id for s in server_spans}) == 1


# --- error mapping --------------------------------------------------------------------


async def test_invalid_argument_has_bad_request_details(make_server, channel_to):
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Stub(channel_to(server.address)).Echo(StringValue(value="invalid"), metadata=(("x-request-id", "e-1"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    bad_request = detail(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("prompt", "must not be empty")]
    info = detail(status, error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_ARGUMENT" and info.metadata["request_id"] == "e-1"
    assert dict(err.value.trailing_metadata())["x-request-id"] == "e-1"
    await eventually(lambda: requests_total(server, "Echo", "INVALID_ARGUMENT") == 1)


async def test_unavailable_has_retry_info(make_server, channel_to):
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Stub(channel_to(server.address)).Echo(StringValue(value="unavailable"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "engine is warming up"
    retry = detail(rpc_status.from_call(err.value), error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta().total_seconds() == 2
    assert dict(err.value.trailing_metadata())["retry-after"] == "2"  # Envoy makes it Retry-After


async def test_resource_exhausted_has_quota_failure_and_a_whole_second_retry_after(make_server, channel_to):
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Stub(channel_to(server.address)).Echo(StringValue(value="exhausted"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)
    quota = detail(status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [("key:k1", "60 requests per minute")]
    assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToTimedelta().total_seconds() == 0.2
    assert dict(err.value.trailing_metadata())["retry-after"] == "1"  # rounded up, never 0
    assert dict(err.value.initial_metadata())["retry-after"] == "1"  # what Envoy turns into Retry-After


async def test_error_mid_stream_after_messages(make_server, channel_to):
    server, _ = await make_server()
    call = Stub(channel_to(server.address)).Count(StringValue(value="3:fail"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for m in call:
            received.append(json.loads(m.value)["i"])
    assert received == [0, 1, 2]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = detail(rpc_status.from_call(err.value), error_details_pb2.BadRequest)
    assert bad_request.field_violations[0].field == "n"
    await eventually(lambda: requests_total(server, "Count", "INVALID_ARGUMENT") == 1)


async def test_unexpected_exception_is_internal_without_leaking(make_server, channel_to, caplog):
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Stub(channel_to(server.address)).Echo(StringValue(value="boom"), metadata=(("x-request-id", "b-1"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-detail-xyz" not in err.value.details() and "RuntimeError" not in err.value.details()
    assert "b-1" in err.value.details()
    assert "secret-detail-xyz" not in str(err.value.trailing_metadata())
    # The traceback goes to the log instead.
    logged = [r for r in caplog.records if r.exc_info and "secret-detail-xyz" in str(r.exc_info[1])]
    assert logged and logged[0].request_id == "b-1"
    await eventually(lambda: requests_total(server, "Echo", "INTERNAL") == 1)


async def test_handler_abort_passes_through(make_server, channel_to):
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Stub(channel_to(server.address)).Echo(StringValue(value="abort"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such model"
    await eventually(lambda: requests_total(server, "Echo", "NOT_FOUND") == 1)


# --- cancellation and deadlines -------------------------------------------------------


async def test_client_cancel_closes_server_generator(make_server, channel_to):
    server, servicer = await make_server()
    call = Stub(channel_to(server.address)).Forever(StringValue(value="tick"))
    async for _ in call:
        if servicer.messages_sent >= 2:
            break
    assert in_flight(server, "Forever") == 1
    call.cancel()
    await asyncio.wait_for(servicer.stream_closed.wait(), timeout=2)
    assert servicer.close_reason in {"CancelledError", "GeneratorExit"}
    await eventually(lambda: requests_total(server, "Forever", "CANCELLED") == 1)
    assert in_flight(server, "Forever") == 0
    assert requests_total(server, "Forever", "OK") == 0


async def test_cancel_while_blocked_on_flow_control_closes_generator(make_server, channel_to):
    """Cancelled while the server waits to write (client not reading): the generator is closed now."""
    server, servicer = await make_server()
    call = Stub(channel_to(server.address)).Forever(StringValue(value="big"))
    await call.read()
    await eventually(lambda: servicer.messages_sent >= 2)  # blocked on the HTTP/2 window by now
    await asyncio.sleep(0.1)
    call.cancel()
    await asyncio.wait_for(servicer.stream_closed.wait(), timeout=2)
    await eventually(lambda: requests_total(server, "Forever", "CANCELLED") == 1)
    assert in_flight(server, "Forever") == 0


async def test_deadline_expiry_counts_deadline_exceeded(make_server, channel_to):
    server, servicer = await make_server()
    call = Stub(channel_to(server.address)).Forever(StringValue(value="tick"), timeout=0.2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(servicer.stream_closed.wait(), timeout=2)
    await eventually(lambda: requests_total(server, "Forever", "DEADLINE_EXCEEDED") == 1)
    assert in_flight(server, "Forever") == 0


# --- metrics --------------------------------------------------------------------------


async def test_metrics_count_calls_by_code(make_server, channel_to):
    server, _ = await make_server()
    stub = Stub(channel_to(server.address))
    await stub.Echo(StringValue(value="x"))
    await stub.Echo(StringValue(value="x"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Echo(StringValue(value="invalid"))
    assert [m async for m in stub.Count(StringValue(value="2"))]
    await eventually(lambda: requests_total(server, "Echo", "OK") == 2)
    await eventually(lambda: requests_total(server, "Echo", "INVALID_ARGUMENT") == 1)
    await eventually(lambda: requests_total(server, "Count", "OK") == 1)
    count = server.registry.get_sample_value(
        "servemesh_grpc_server_request_duration_seconds_count",
        {"service": SERVICE_NAME, "method": "Echo", "code": "OK"},
    )
    assert count == 2
    assert in_flight(server, "Echo") == 0 and in_flight(server, "Count") == 0


async def test_in_flight_tracks_open_stream(make_server, channel_to):
    server, _ = await make_server()
    call = Stub(channel_to(server.address)).Count(StringValue(value="3:0.1"))
    await call.read()
    assert in_flight(server, "Count") == 1
    while await call.read() is not grpc.aio.EOF:
        pass
    await eventually(lambda: in_flight(server, "Count") == 0)
    assert requests_total(server, "Count", "OK") == 1

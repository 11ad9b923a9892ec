"""A small test service on well-known protobuf types (no test-only protos).

Registered as servemesh.test.v1.TestService through a generic handler. Also imported by
sigterm_server.py, which runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import wrappers_pb2

from services.common import context
from services.common.client import insecure_channel
from services.common.errors import FieldViolation, InvalidArgument, QuotaViolation, ResourceExhausted, Unavailable
from services.common.server import Service

SERVICE_NAME = "servemesh.test.v1.TestService"
StringValue = wrappers_pb2.StringValue


def _remaining(ctx: Any) -> float | None:
    return ctx.time_remaining()


class TestServicer:
    """Behaviour is picked by the request text; state lets tests see what the server saw."""

    __test__ = False  # not a pytest class

    def __init__(self, downstream: str | None = None) -> None:
        self.downstream = downstream
        self.stream_closed = asyncio.Event()
        self.close_reason: str | None = None
        self.messages_sent = 0

    # unary-unary ---------------------------------------------------------------------

    async def Echo(self, request: StringValue, ctx: Any) -> StringValue:
        """Returns what the server knows about the call, as JSON."""
        text = request.value
        if text == "invalid":
            raise InvalidArgument(FieldViolation("prompt", "must not be empty"))
        if text == "unavailable":
            raise Unavailable("engine is warming up", retry_after=2)
        if text == "exhausted":
            raise ResourceExhausted(
                "over the limit", violations=[QuotaViolation("key:k1", "60 requests per minute")], retry_after=0.2
            )
        if text == "boom":
            raise RuntimeError("secret-detail-xyz")
        if text == "abort":
            await ctx.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if text == "own-metadata":
            await ctx.send_initial_metadata((("x-custom", "yes"),))
        if text.startswith("prompt:"):
            prompt = text.removeprefix("prompt:")
            context.annotate(prompt_sha256=context.prompt_hash(prompt), prompt_tokens=len(prompt.split()))
        return StringValue(value=json.dumps(self._seen(ctx)))

    async def Relay(self, request: StringValue, ctx: Any) -> StringValue:
        """Calls the downstream Echo (unary) and Count (stream) and reports both views."""
        assert self.downstream is not None
        here = self._seen(ctx)
        async with insecure_channel(self.downstream) as channel:
            echo = channel.unary_unary(f"/{SERVICE_NAME}/Echo", StringValue.SerializeToString, StringValue.FromString)
            count = channel.unary_stream(
                f"/{SERVICE_NAME}/Count", StringValue.SerializeToString, StringValue.FromString
            )
            downstream_unary = json.loads((await echo(StringValue(value="hi"), timeout=30)).value)
            streamed = [json.loads(m.value) async for m in count(StringValue(value="1"))]
        return StringValue(value=json.dumps({"here": here, "unary": downstream_unary, "stream": streamed[0]}))

    @staticmethod
    def _seen(ctx: Any) -> dict[str, Any]:
        return {"request_id": context.request_id(), "time_remaining": _remaining(ctx)}

    # unary-stream --------------------------------------------------------------------

    async def Count(self, request: StringValue, ctx: Any) -> AsyncIterator[StringValue]:
        """ "<n>[:fail][:<interval s>]": n messages, then optionally a domain error."""
        n, *rest = request.value.split(":")
        interval = float(rest[-1]) if rest and rest[-1] != "fail" else 0.0
        for i in range(int(n)):
            if interval:
                await asyncio.sleep(interval)
            yield StringValue(value=json.dumps({"i": i, **self._seen(ctx)}))
        if "fail" in rest:
            raise InvalidArgument(FieldViolation("n", "too many"))

    async def Forever(self, request: StringValue, ctx: Any) -> AsyncIterator[StringValue]:
        """Streams until cancelled; "big" sends 1 MB messages as fast as flow control allows."""
        payload = "x" * 1_000_000 if request.value == "big" else "tick"
        try:
            while True:
                if request.value != "big":
                    await asyncio.sleep(0.02)
                self.messages_sent += 1
                yield StringValue(value=payload)
        except BaseException as exc:
            self.close_reason = type(exc).__name__
            raise
        finally:
            self.stream_closed.set()

    async def WriteCount(self, request: StringValue, ctx: Any) -> None:
        """Write-style streaming (context.write) instead of an async generator."""
        for i in range(int(request.value)):
            await ctx.write(StringValue(value=str(i)))

    # stream-unary / stream-stream ----------------------------------------------------

    async def Join(self, requests: AsyncIterator[StringValue], ctx: Any) -> StringValue:
        return StringValue(value="".join([r.value async for r in requests]))

    async def Chat(self, requests: AsyncIterator[StringValue], ctx: Any) -> AsyncIterator[StringValue]:
        async for r in requests:
            if r.value == "invalid":
                raise InvalidArgument(FieldViolation("message", "bad"))
            yield StringValue(value=r.value.upper())


def _handlers(servicer: TestServicer) -> grpc.GenericRpcHandler:
    codec = {
        "request_deserializer": StringValue.FromString,
        "response_serializer": StringValue.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(servicer.Echo, **codec),
            "Relay": grpc.unary_unary_rpc_method_handler(servicer.Relay, **codec),
            "Count": grpc.unary_stream_rpc_method_handler(servicer.Count, **codec),
            "Forever": grpc.unary_stream_rpc_method_handler(servicer.Forever, **codec),
            "WriteCount": grpc.unary_stream_rpc_method_handler(servicer.WriteCount, **codec),
            "Join": grpc.stream_unary_rpc_method_handler(servicer.Join, **codec),
            "Chat": grpc.stream_stream_rpc_method_handler(servicer.Chat, **codec),
        },
    )


def add_test_servicer(servicer: TestServicer, server: grpc.aio.Server) -> None:
    """Same shape as a generated add_XServicer_to_server."""
    server.add_generic_rpc_handlers((_handlers(servicer),))


def service_for(servicer: TestServicer) -> Service:
    return Service(SERVICE_NAME, servicer, add_test_servicer)


class Stub:
    """Client-side callables for the test service on an aio channel."""

    __test__ = False

    def __init__(self, channel: grpc.aio.Channel) -> None:
        ser, de = StringValue.SerializeToString, StringValue.FromString
        self.Echo = channel.unary_unary(f"/{SERVICE_NAME}/Echo", ser, de)
        self.Relay = channel.unary_unary(f"/{SERVICE_NAME}/Relay", ser, de)
        self.Count = channel.unary_stream(f"/{SERVICE_NAME}/Count", ser, de)
        self.Forever = channel.unary_stream(f"/{SERVICE_NAME}/Forever", ser, de)
        self.WriteCount = channel.unary_stream(f"/{SERVICE_NAME}/WriteCount", ser, de)
        self.Join = channel.stream_unary(f"/{SERVICE_NAME}/Join", ser, de)
        self.Chat = channel.stream_stream(f"/{SERVICE_NAME}/Chat", ser, de)


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll `predicate` every 10 ms until true; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)

"""Test doubles and helpers for the Envoy mesh tests: tiny grpc.aio apps behind real Envoys."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from servemesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from mesh.certs import Identity, read_pair


def peer_serial(port: int, client: Identity | None, ca_path: str, host: str = "127.0.0.1") -> int:
    """Serial of the certificate a TLS server presents in a fresh handshake (ALPN h2, optional client cert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca_path)
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def mtls_channel(port: int, ident: Identity | None, ca_pem: bytes | None = None) -> grpc.aio.Channel:
    """A channel to a TLS listener on 127.0.0.1 presenting `ident` (None: no client certificate)."""
    ca = ca_pem if ca_pem is not None else (ident.ca_path.read_bytes() if ident else None)
    if ident is not None:
        cert, key = read_pair(ident)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        creds,
        options=[("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)],
    )


async def call_raw(channel: grpc.aio.Channel, path: str, body: bytes = b"", **kw: Any) -> dict[str, Any]:
    """Unary call with raw bytes to any method path; the echo apps answer JSON."""
    reply = await channel.unary_unary(path)(body, timeout=kw.pop("timeout", 5.0), **kw)
    return json.loads(reply)


class EchoApp:
    """A grpc.aio app answering any unary method with JSON {app, method, xfcc}, plus grpc.health.v1.

    A request body b"fail-once:<token>" fails with UNAVAILABLE the first time that token is seen.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self._seen: set[bytes] = set()
        self.server = grpc.aio.server()
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self._health = health_servicer
        self.server.add_generic_rpc_handlers([_Generic(self._handle)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _handle(self, request: bytes, context: grpc.aio.ServicerContext, method: str) -> bytes:
        self.calls += 1
        if request.startswith(b"fail-once:") and request not in self._seen:
            self._seen.add(request)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        meta = dict(context.invocation_metadata() or ())
        return json.dumps({"app": self.name, "method": method, "xfcc": meta.get("x-forwarded-client-cert")}).encode()

    async def start(self) -> None:
        await self.server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self.server.stop(0)


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, fn: Callable[[bytes, grpc.aio.ServicerContext, str], Awaitable[bytes]]) -> None:
        self._fn = fn

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method.startswith("/grpc.health.v1.Health/"):
            return None

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._fn(request, context, method)

        return grpc.unary_unary_rpc_method_handler(handler)


class GatewayDouble(gateway_pb2_grpc.GatewayServiceServicer):
    """Test double of the gateway, only to exercise Envoy: GetVersion, a 3-chunk stream, Generate rejects."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.last_xfcc: str | None = None

    async def GetVersion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.last_xfcc = dict(context.invocation_metadata() or ()).get("x-forwarded-client-cert")
        return gateway_pb2.GetVersionResponse(version="9.9.9-test", build_commit="abc123", environment="test")

    async def StreamGenerate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        for i, piece in enumerate(["Hello", ", ", "mesh"]):
            yield gateway_pb2.StreamGenerateResponse(text_delta=piece, request_id=f"r-{i}", model="double")
            await asyncio.sleep(0.01)
        yield gateway_pb2.StreamGenerateResponse(
            finish_reason=gateway_pb2.FINISH_REASON_STOP,
            usage=gateway_pb2.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5),
        )

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)

"""JSON logs, the access log and the request context helpers."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import context
from services.common.logging import configure_logging

from .servicer import StringValue, Stub, eventually

pytestmark = pytest.mark.timeout(30)

PROMPT = "tell me about the secret launch codes of project zebra"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging() into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("INFO", "test-svc", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_access_log_line(make_server, channel_to, log_stream):
    server, _ = await make_server()
    await Stub(channel_to(server.address)).Echo(
        StringValue(value=f"prompt:{PROMPT}"), metadata=(("x-request-id", "log-1"),)
    )
    access = [entry for entry in lines(log_stream) if entry["logger"] == "servemesh.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["service"] == "test-svc" and entry["level"] == "INFO" and entry["msg"] == "rpc"
    assert entry["request_id"] == "log-1"
    assert entry["method"] == "/servemesh.test.v1.TestService/Echo"
    assert entry["code"] == "OK"
    assert isinstance(entry["latency_ms"], float) and entry["latency_ms"] >= 0
    assert entry["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()[:16]
    assert entry["prompt_tokens"] == len(PROMPT.split())
    assert "ts" in entry
    assert "zebra" not in log_stream.getvalue()


async def test_access_log_for_errors_names_the_error_class(make_server, channel_to, log_stream):
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError):
        await Stub(channel_to(server.address)).Echo(StringValue(value="boom"))
    # The status reaches the client before the server's handler has unwound: wait for the line.
    await eventually(lambda: '"servemesh.access"' in log_stream.getvalue())
    entries = lines(log_stream)
    access = [e for e in entries if e["logger"] == "servemesh.access"]
    assert access[0]["code"] == "INTERNAL" and access[0]["error"] == "RuntimeError"
    traceback_lines = [e for e in entries if "exc" in e]
    assert traceback_lines and "secret-detail-xyz" in traceback_lines[0]["exc"]
    assert traceback_lines[0]["request_id"] == access[0]["request_id"]


async def test_successful_health_checks_log_at_debug(make_server, channel_to, log_stream):
    server, _ = await make_server()
    channel = channel_to(server.address)
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    await Stub(channel).Echo(StringValue(value="x"))
    methods = [e["method"] for e in lines(log_stream) if e["logger"] == "servemesh.access"]
    assert methods == ["/servemesh.test.v1.TestService/Echo"]


def test_plain_log_line_is_json_with_extras(log_stream):
    logging.getLogger("servemesh.test").warning("engine %s slow", "vllm", extra={"queue_depth": 3})
    (entry,) = lines(log_stream)
    assert entry["level"] == "WARNING" and entry["logger"] == "servemesh.test"
    assert entry["msg"] == "engine vllm slow" and entry["queue_depth"] == 3
    assert "request_id" not in entry


def test_configure_logging_twice_keeps_one_handler(log_stream):
    second = io.StringIO()
    configure_logging("WARNING", "test-svc", stream=second)
    logging.getLogger("servemesh.test").warning("once")
    assert log_stream.getvalue() == ""
    assert [e["msg"] for e in lines(second)] == ["once"]


def test_prompt_hash_is_short_sha256():
    assert context.prompt_hash("abc") == "ba7816bf8f01cfea"


def test_context_outside_a_request():
    assert context.request_id() == ""
    assert context.deadline() is None and context.remaining_timeout() is None
    context.annotate(engine="vllm")  # no-op, no error


def test_annotate_rejects_reserved_names():
    with pytest.raises(ValueError, match="code"):
        context.annotate(code="OK")
    with pytest.raises(ValueError, match="msg"):
        context.annotate(msg="x")

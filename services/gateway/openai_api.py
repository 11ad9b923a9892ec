"""The OpenAI-compatible HTTP API of the gateway (aiohttp), on the same pipeline and keys.

    POST /openai/v1/chat/completions   stream true (SSE, then `data: [DONE]`) or false
    POST /openai/v1/completions        `prompt` is sent as one user message (chat template)
    GET  /openai/v1/models             the route classes, which are the `model` a client names

Errors use OpenAI's shape ({"error": {"message", "type", "param", "code"}}) with the
HTTP status of the gateway's canonical code (400, 401, 403, 429 with Retry-After, 503,
504). A stream that fails after its first token ends with an `error` event and no
`[DONE]`, so an SDK raises instead of returning a silently truncated answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common import context
from services.common.errors import Code, InvalidArgument, ResourceExhausted, ServiceError
from services.common.generation import Chunk, FinishReason, Message, Role, Sampling
from services.common.interceptors import access_log, incoming_request_id
from services.gateway.auth import bearer_credentials
from services.gateway.core import GatewayRequest, Pipeline
from services.gateway.servicer import forwarded_client

PREFIX = "/openai/v1"
_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_log = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream_options: dict[str, Any] | None = None

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            stop=stop,
            seed=self.seed,
        )

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def message(self) -> Message:
        if isinstance(self.content, list):  # content parts: only text parts are supported
            text = "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        else:
            text = self.content or ""
        return Message(Role.SYSTEM if self.role == "developer" else Role(self.role), text)


class ChatBody(_Body):
    messages: Annotated[list[_ChatMessage], Field(min_length=1)]


class CompletionBody(_Body):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": _TYPE.get(status, "api_error"), "param": param, "code": code}}
    return web.json_response(body, status=status)


def _param(field: str) -> str:
    """The gateway's field path in OpenAI's terms ("params.temperature" -> "temperature")."""
    return field.removeprefix("params.").replace("route_class", "model")


def _service_error(exc: ServiceError) -> web.Response:
    status = _STATUS.get(exc.code, 500)
    param = _param(exc.violations[0].field) if isinstance(exc, InvalidArgument) and exc.violations else None
    response = _error(status, exc.message, param=param, code=exc.code.value.lower())
    if isinstance(exc, ResourceExhausted) and exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


def _validation_error(exc: ValidationError) -> web.Response:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    return _error(400, f"{param}: {first['msg']}", param=param, code="invalid_argument")


def _sse(data: Mapping[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class OpenAIApi:
    """The routes; `model_names` are the route classes a client may name as `model`."""

    def __init__(
        self,
        pipeline: Pipeline,
        model_names: Sequence[str],
        *,
        trust_forwarded_for: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pipeline = pipeline
        self._models = list(model_names)
        self._trust_xff = trust_forwarded_for
        self._clock = clock

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.add_routes(
            [
                web.post(f"{PREFIX}/chat/completions", self.chat_completions),
                web.post(f"{PREFIX}/completions", self.completions),
                web.get(f"{PREFIX}/models", self.models),
            ]
        )
        return app

    async def models(self, http: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "servemesh"} for m in self._models]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        return await self._serve(http, ChatBody, chat=True)

    async def completions(self, http: web.Request) -> web.StreamResponse:
        return await self._serve(http, CompletionBody, chat=False)

    async def _serve(self, http: web.Request, kind: type[_Body], *, chat: bool) -> web.StreamResponse:
        started = time.perf_counter()
        state = context.bind(incoming_request_id([("x-request-id", http.headers.get("x-request-id", ""))]), None)
        status, error = 200, ""
        try:
            response = await self._handle(http, kind, chat)
            status = response.status
            return response
        except ServiceError as exc:
            status, error = _STATUS.get(exc.code, 500), exc.message
            return _service_error(exc)
        except web.HTTPException:
            raise
        except Exception:
            _log.exception("openai api: unexpected error", extra={"request_id": state.request_id})
            status, error = 500, "internal error"
            return _error(500, f"internal error (request id {state.request_id})")
        finally:
            extra = {
                "request_id": state.request_id,
                "method": f"{http.method} {http.path}",
                "code": str(status),
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                **state.fields,
            }
            if error:
                extra["error"] = error
            access_log.info("http", extra=extra)

    async def _handle(self, http: web.Request, kind: type[_Body], chat: bool) -> web.StreamResponse:
        try:
            body = kind.model_validate_json(await http.read())
        except ValidationError as exc:
            return _validation_error(exc)
        if body.model not in self._models:
            return _error(400, f"model: {body.model!r} is not one of {self._models}", param="model", code="not_found")
        headers = [(k.lower(), v) for k, v in http.headers.items()]
        peer = http.transport.get_extra_info("peername") if http.transport else None
        req = GatewayRequest(
            request_id=context.request_id(),
            route_class=body.model,
            prompt=None if chat else (body.prompt if isinstance(body.prompt, str) else body.prompt[0]),  # type: ignore[attr-defined]
            messages=tuple(m.message() for m in body.messages) if chat else (),  # type: ignore[attr-defined]
            sampling=body.sampling(),
            credentials=bearer_credentials(headers),
            client_address=forwarded_client(headers, self._trust_xff) or _peer_host(peer),
        )
        context.annotate(stream=body.stream, api="openai")
        chunks = self._pipeline.stream(req)
        async with contextlib.aclosing(chunks):
            first = await anext(chunks)  # admission errors surface here, before any status is sent
            if body.stream:
                return await self._stream(http, req, body, chat, first, chunks)
            return await self._whole(req, chat, first, chunks)

    def _envelope(self, req: GatewayRequest, chat: bool, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{req.request_id}",
            "object": obj,
            "created": int(self._clock()),
            "model": req.route_class,
            "system_fingerprint": req.served.model or None,
        }

    async def _whole(self, req: GatewayRequest, chat: bool, first: Chunk, rest: AsyncIterator[Chunk]) -> web.Response:
        parts, last = [first.text], first
        async for last in rest:
            parts.append(last.text)
        assert last.finish_reason is not None and last.usage is not None
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(last.finish_reason), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        u = last.usage
        return web.json_response(
            {
                **self._envelope(req, chat, False),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "total_tokens": u.total_tokens,
                },
            },
            headers=_served_headers(req),
        )

    async def _stream(
        self,
        http: web.Request,
        req: GatewayRequest,
        body: _Body,
        chat: bool,
        first: Chunk,
        rest: AsyncIterator[Chunk],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_served_headers(req)}
        )
        await response.prepare(http)
        envelope = self._envelope(req, chat, True)

        def event(text: str, finish: FinishReason | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": _finish(finish), "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": _finish(finish), "logprobs": None}
            return _sse({**envelope, "choices": [choice]})

        chunk = first
        try:
            await response.write(event(chunk.text, chunk.finish_reason, role=True))
            while chunk.finish_reason is None:
                chunk = await anext(rest)
                await response.write(event(chunk.text, chunk.finish_reason))
        except ServiceError as exc:  # after the first token: say so, and never send [DONE]
            await response.write(
                _sse({"error": {"message": exc.message, "type": "api_error", "code": exc.code.value.lower()}})
            )
            context.annotate(partial_output=True)
            return response
        if body.include_usage() and chunk.usage is not None:
            u = chunk.usage
            usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}
            await response.write(_sse({**envelope, "choices": [], "usage": usage | {"total_tokens": u.total_tokens}}))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response


class HttpApiServer:
    """The API's aiohttp site on a TCP port (0 = any free one) or a Unix socket."""

    def __init__(self, api: OpenAIApi, host: str, port: int | None, unix_socket: Path | None) -> None:
        self._runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
        self._host, self._port, self._socket = host, port, unix_socket
        self.address = ""

    async def start(self) -> None:
        await self._runner.setup()
        if self._socket is not None:
            site: web.BaseSite = web.UnixSite(self._runner, str(self._socket))
            await site.start()
            self.address = f"unix:{self._socket}"
        else:
            site = web.TCPSite(self._runner, self._host, self._port or 0)
            await site.start()
            port = self._runner.addresses[-1][1]
            self.address = f"http://{self._host}:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def _served_headers(req: GatewayRequest) -> dict[str, str]:
    out = {"x-request-id": req.request_id, "x-servemesh-engine": req.served.engine or req.engine}
    if req.notes.get("cache") == "hit":
        out["x-servemesh-cache"] = "hit"
    return out


def _peer_host(peer: Any) -> str:
    """The host of aiohttp's peername: an (address, port, ...) tuple over TCP; "unix" otherwise."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"

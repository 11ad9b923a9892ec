"""Cross-site protection and browser hardening for the console, as one ASGI middleware.

NiceGUI carries every click over a socket.io connection (a WebSocket, or HTTP long-polling as
a fallback) that the session cookie authenticates. A page on another site could open such a
connection with the on-call engineer's cookie (cross-site WebSocket hijacking) or post to the
polling endpoint; browsers always send `Origin` on both, so anything state-changing whose
Origin is not the console's own is refused with 403. The session cookie is also SameSite=Strict
(console.server), and every response forbids framing (clickjacking).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def same_origin(scope: Scope) -> bool:
    """Whether the request's Origin (if it has one) names the host it was sent to.

    No Origin: not a browser's cross-site request (browsers send it on WebSockets and on
    cross-origin POSTs), so a CLI or a health check passes.
    """
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    host = _header(scope, b"host")
    if origin == "null" or host is None:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class CrossSiteGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not same_origin(scope):
            await send({"type": "websocket.close", "code": 1008, "reason": "cross-site WebSocket refused"})
            return
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS and not same_origin(scope):
            body = b"cross-site request refused: the Origin is not this console\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                        *HEADERS,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)

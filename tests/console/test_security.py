"""Cross-site requests are refused; responses forbid framing. Over the console's real ASGI app."""

from __future__ import annotations

from typing import Any

import httpx
from nicegui import app
from nicegui.testing import User

from console.pages import Console
from console.security import CrossSiteGuard, same_origin


def _scope(kind: str, method: str = "GET", **headers: str) -> dict[str, Any]:
    return {
        "type": kind,
        "method": method,
        "path": "/_nicegui_ws/socket.io/",
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def test_same_origin_compares_the_origin_with_the_host() -> None:
    assert same_origin(_scope("http", "POST", host="127.0.0.1:8090", origin="http://127.0.0.1:8090"))
    assert not same_origin(_scope("http", "POST", host="127.0.0.1:8090", origin="https://evil.example"))
    assert not same_origin(_scope("http", "POST", host="127.0.0.1:8090", origin="http://127.0.0.1:8091"))
    assert not same_origin(_scope("http", "POST", host="127.0.0.1:8090", origin="null"))
    assert same_origin(_scope("http", "POST", host="127.0.0.1:8090"))  # no Origin: not a browser's cross-site call


async def test_a_cross_site_websocket_is_closed_before_it_reaches_nicegui() -> None:
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def inner(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        reached.append(scope["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    guard = CrossSiteGuard(inner)
    await guard(_scope("websocket", host="console:8090", origin="https://evil.example"), receive, send)
    assert reached == [] and sent[0]["type"] == "websocket.close" and sent[0]["code"] == 1008
    await guard(_scope("websocket", host="console:8090", origin="http://console:8090"), receive, send)
    assert reached == ["websocket"]


async def test_cross_site_posts_are_refused_and_pages_cannot_be_framed(console: tuple[User, Console]) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://console.test") as client:
        evil = await client.post(
            "/_nicegui_ws/socket.io/?EIO=4&transport=polling",
            headers={"origin": "https://evil.example"},
            content=b'42["event",{}]',
        )
        assert evil.status_code == 403 and "cross-site request refused" in evil.text
        own = await client.post(
            "/_nicegui_ws/socket.io/?EIO=4&transport=polling",
            headers={"origin": "http://console.test"},
            content=b'42["event",{}]',
        )
        assert own.status_code != 403  # reaches socket.io (which rejects the made-up session)
        page = await client.get("/login")
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

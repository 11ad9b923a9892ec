"""The console in a real browser (Debian's Chromium, driven by Playwright) over the real mesh.

An operator signs in, flips the gateway route to its backup, and real requests through the
edge move to the new backend; a viewer finds the flip refused. Screenshots are kept in
test-artifacts/console/ (or $SERVEMESH_TEST_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from console.auth import Role, set_user
from mesh.bench_console import CHROMIUM, CHROMIUM_ARGS
from mesh.launcher import REPO, Mesh
from tests.console.conftest import PASSWORDS
from tests.engine_fixtures import free_port
from tests.mesh.test_mesh_e2e import _small_mesh
from tests.mesh.test_rollouts_mesh import CANARY, start_gateway_canary

pytestmark = pytest.mark.timeout(600)


def artifacts() -> Path:
    path = Path(os.environ.get("SERVEMESH_TEST_ARTIFACTS") or REPO / "test-artifacts") / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, prepared_model) -> AsyncIterator[Mesh]:
    m = _small_mesh(tmp_path_factory.mktemp("home"), prepared_model, mesh=True)
    users = m.home / "console" / "users.yaml"
    set_user(users, "olivia", Role.OPERATOR, PASSWORDS["olivia"])
    set_user(users, "victor", Role.VIEWER, PASSWORDS["victor"])
    try:
        await m.start()
        await start_gateway_canary(m)
        async with m.channel("registry") as ch:  # the canary as the route's backup, taking nothing
            stub = rpb_grpc.RegistryServiceStub(ch)
            route = (await stub.GetRoute(rpb.GetRouteRequest(name="routes/gateway"), timeout=10)).route
            route.backends.append(rpb.WeightedBackend(deployment=CANARY, weight=0))
            await stub.UpdateRoute(
                rpb.UpdateRouteRequest(
                    route=route, update_mask={"paths": ["backends"]}, reason="test: the canary as backup"
                ),
                timeout=10,
            )
        yield m
    finally:
        await m.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def _served_by(m: Mesh, calls: int = 20) -> Counter[str]:
    """Which gateway deployments answer GetVersion through the edge."""
    served: Counter[str] = Counter()
    async with m.channel("gateway") as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        for _ in range(calls):
            served[(await stub.GetVersion(gpb.GetVersionRequest(), timeout=10)).deployment] += 1
    return served


async def _sign_in(browser: Browser, m: Mesh, name: str) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    await page.goto(f"http://127.0.0.1:{m.ports.console}/routing")
    await page.get_by_test_id("name").fill(name)
    await page.get_by_test_id("password").fill(PASSWORDS[name])
    await page.get_by_test_id("sign-in").click()
    await page.get_by_test_id("whoami").wait_for()
    assert (
        await page.get_by_test_id("whoami").inner_text() == f"{name} ({'operator' if name == 'olivia' else 'viewer'})"
    )
    assert page.url.endswith("/routing")  # back where the sign-in page was asked for
    return page


async def _wait_served_by(m: Mesh, deployment: str, timeout: float = 20.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        served = await _served_by(m)
        if set(served) == {deployment}:
            return served
        assert time.monotonic() < deadline, f"requests still go to {dict(served)}"
        await asyncio.sleep(0.5)


async def test_an_operator_flips_a_route_in_the_browser_and_requests_move(mesh: Mesh, browser: Browser) -> None:
    assert set(await _served_by(mesh)) == {"gateway-stable"}
    page = await _sign_in(browser, mesh, "olivia")
    await page.screenshot(path=artifacts() / "routing-before-flip.png", full_page=True)
    await page.get_by_test_id("flip-gateway").click()
    await page.get_by_test_id("reason").fill("browser test: stable gateway drained")
    await page.screenshot(path=artifacts() / "flip-reason-dialog.png")
    await page.get_by_test_id("confirm").click()
    await page.get_by_text("gateway: flip to gateway-canary").wait_for()
    served = await _wait_served_by(mesh, "gateway-canary")
    assert served["gateway-canary"] == 20
    # the page says when every Envoy runs the change
    effect = page.get_by_test_id("effect-gateway")
    deadline = time.monotonic() + 20
    while not (m := re.search(r"in effect on (\d+)/(\d+) Envoys", await effect.inner_text())) or m[1] != m[2]:
        assert time.monotonic() < deadline, await effect.inner_text()
        await asyncio.sleep(0.5)
    await page.screenshot(path=artifacts() / "routing-after-flip.png", full_page=True)
    async with mesh.channel("registry") as ch:
        entries = (
            await rpb_grpc.RegistryServiceStub(ch).ListAuditEntries(
                rpb.ListAuditEntriesRequest(resource="routes/gateway"), timeout=10
            )
        ).entries
    assert entries[0].reason == "browser test: stable gateway drained"
    assert entries[0].actor.endswith("/sa/console as olivia"), entries[0].actor
    await page.close()


async def test_a_viewer_is_refused_the_flip(mesh: Mesh, browser: Browser) -> None:
    async with mesh.channel("registry") as ch:
        before = (await rpb_grpc.RegistryServiceStub(ch).GetRoute(rpb.GetRouteRequest(name="routes/gateway"))).route
    page = await _sign_in(browser, mesh, "victor")
    flip = page.get_by_test_id("flip-gateway")
    assert await flip.is_disabled()
    await flip.click(force=True)  # a click on the disabled button does nothing
    await page.screenshot(path=artifacts() / "routing-as-viewer.png", full_page=True)
    assert await page.get_by_test_id("reason").count() == 0
    async with mesh.channel("registry") as ch:
        after = (await rpb_grpc.RegistryServiceStub(ch).GetRoute(rpb.GetRouteRequest(name="routes/gateway"))).route
    assert after.etag == before.etag
    await page.close()


async def test_a_cross_site_page_cannot_drive_the_console(mesh: Mesh, browser: Browser) -> None:
    """A page from another origin opens the console's socket with the signed-in cookie: refused."""
    page = await _sign_in(browser, mesh, "olivia")
    other = await browser.new_page()
    evil_port = free_port()
    server = await asyncio.start_server(_evil_page(mesh.ports.console), "127.0.0.1", evil_port)
    try:
        await other.goto(f"http://127.0.0.1:{evil_port}/")
        result = await other.evaluate("window.result")
        deadline = time.monotonic() + 10
        while result is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
            result = await other.evaluate("window.result")
        assert result == "refused", result
    finally:
        server.close()
        await other.close()
        await page.close()


def _evil_page(console_port: int):  # type: ignore[no-untyped-def]
    html = f"""<html><body><script>
    const ws = new WebSocket("ws://127.0.0.1:{console_port}/_nicegui_ws/socket.io/?EIO=4&transport=websocket");
    ws.onopen = () => {{ window.result = "open"; }};
    ws.onerror = () => {{ window.result = "refused"; }};
    </script></body></html>""".encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n" % len(html) + html)
        await writer.drain()
        writer.close()

    return handle

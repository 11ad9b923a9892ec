"""`servemesh bench console`: how fast the Overview renders with an hour of data, and whether a
browser left on it for minutes grows its memory.

One run: the console's pages serve from a child process whose chart history is filled with an
hour of samples (1,800 points a series at 2 s: 6 SLO series, 6 burn rates, tokens/s, queue depth)
and kept moving by a feeder that appends one point a series every `refresh_s`, as the sampler does
in a live mesh (the values are synthetic; the pages, the charts, the updates and the browser are
the real ones). Debian's Chromium, driven by Playwright, then

1. loads the Overview `loads` times with an hour of history and `loads` times with none (the
   baseline), interleaved, timing navigation start to every chart drawn;
2. keeps one Overview open for `minutes`, reading the JS heap (after a forced garbage
   collection, over the DevTools protocol) once a minute.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console as RichConsole
from rich.table import Table

SLOS = [f"{rc}-{kind}" for rc in ("chat_short", "rag_long") for kind in ("ttft", "server_errors", "timeouts")]
USER, PASSWORD = "bench", "bench-password-123"


def _fill(history, now: float, points: int, refresh_s: float) -> None:  # type: ignore[no-untyped-def]
    for i in range(points):
        t = now - (points - i) * refresh_s
        _append(history, t, i)


def _append(history, t: float, i: int) -> None:  # type: ignore[no-untyped-def]
    wave = math.sin(i / 50.0)
    for n, name in enumerate(SLOS):
        value = 0.4 + 0.2 * wave + 0.01 * n if name.endswith("ttft") else max(0.0, 0.002 + 0.002 * wave)
        history.add(f"slo/{name}", t, value)
        history.add(f"burn/{name}", t, max(0.0, 1.0 + wave))
    history.add("tokens_per_s", t, 120 + 40 * wave)
    history.add("queue_depth", t, max(0, round(3 + 3 * wave)))


def _serve(port: int, home: str, filled: bool, refresh_s: float) -> None:
    """The child: the console over an empty mesh home, its history filled (or not), fed live."""
    os.environ["NICEGUI_STORAGE_PATH"] = str(Path(home) / "sessions")
    from nicegui import app, ui

    from console.auth import Role, set_user
    from console.server import build, session_options
    from console.settings import ConsoleSettings

    settings = ConsoleSettings(home=Path(home), port=port, refresh_s=refresh_s)
    set_user(settings.users_path, USER, Role.VIEWER, PASSWORD)
    console = build(settings)
    points = math.ceil(settings.history_s / refresh_s)
    if filled:
        _fill(console.sampler.history, time.time(), points, refresh_s)

    async def feed() -> None:
        i = points
        while True:
            await asyncio.sleep(refresh_s)
            _append(console.sampler.history, time.time(), i)
            i += 1

    if filled:
        app.on_startup(feed)
    ui.run(
        host="127.0.0.1",
        port=port,
        storage_secret="bench",
        session_middleware_kwargs=session_options(settings),
        reload=False,
        show=False,
        show_welcome_message=False,
    )


def _start(port: int, home: str, filled: bool, refresh_s: float) -> subprocess.Popen[bytes]:
    """A console process (NiceGUI serves only from a main process, so not a multiprocessing child)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    argv = [
        sys.executable,
        "-m",
        "mesh.bench_console",
        str(port),
        home,
        "filled" if filled else "empty",
        str(refresh_s),
    ]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _wait_up(port: int, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the console on port {port} did not start")
            await asyncio.sleep(0.2)


async def _sign_in(context, port: int):  # type: ignore[no-untyped-def]
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{port}/login")
    await page.get_by_test_id("name").fill(USER)
    await page.get_by_test_id("password").fill(PASSWORD)
    await page.get_by_test_id("sign-in").click()
    await page.get_by_test_id("whoami").wait_for()
    return page


async def _render_time(page, port: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Seconds until all four charts have drawn their canvases: by the browser's clock from the
    document's navigation start (what on-call waits after clicking), and by this process's clock
    from asking for the page (which adds tearing the previous page down and Playwright's hops)."""
    started = time.perf_counter()
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.wait_for_function("document.querySelectorAll('.nicegui-echart canvas').length >= 4")
    browser_ms = await page.evaluate("performance.now()")
    return browser_ms / 1000, time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


CHROMIUM = "/usr/bin/chromium"
#: a headless Chromium as root, on a machine with no route out, with the heap measurable
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--js-flags=--expose-gc",
]


def run_console_bench(loads: int, minutes: float, log: Callable[[str], None], out: RichConsole | None = None) -> None:
    asyncio.run(_bench(loads, minutes, 2.0, log, out or RichConsole()))


async def _bench(loads: int, minutes: float, refresh_s: float, log: Callable[[str], None], out: RichConsole) -> None:
    from playwright.async_api import async_playwright

    from mesh.launcher import free_port

    with tempfile.TemporaryDirectory(prefix="servemesh-bench-console-") as tmp:
        ports = {"hour": free_port(), "empty": free_port()}
        procs = [
            _start(ports["hour"], str(Path(tmp) / "hour"), True, refresh_s),
            _start(ports["empty"], str(Path(tmp) / "empty"), False, refresh_s),
        ]
        try:
            await asyncio.gather(*(_wait_up(p) for p in ports.values()))
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                times: dict[str, list[tuple[float, float]]] = {"hour": [], "empty": []}
                pages = {k: await _sign_in(await browser.new_context(), port) for k, port in ports.items()}
                for k, port in ports.items():  # warm: assets cached, as for on-call's second look
                    await _render_time(pages[k], port)
                log(f"rendering the Overview {loads} times each, with an hour of data and with none ...")
                for _ in range(loads):
                    for k, port in ports.items():
                        times[k].append(await _render_time(pages[k], port))
                table = Table(title="Overview render: until all 4 charts are drawn")
                for col in (
                    "history",
                    "points per series",
                    "p50 ms",
                    "p95 ms",
                    "max ms",
                    "p50 ms incl. teardown",
                    "target",
                ):
                    table.add_column(col)
                per_series = math.ceil(3600 / refresh_s)
                for k, label, n in (("empty", "none (baseline)", 0), ("hour", "one hour", per_series)):
                    v = [b for b, _ in times[k]]
                    table.add_row(
                        label,
                        str(n),
                        f"{1000 * statistics.median(v):.0f}",
                        f"{1000 * _pct(v, 0.95):.0f}",
                        f"{1000 * max(v):.0f}",
                        f"{1000 * statistics.median(w for _, w in times[k]):.0f}",
                        "<= 1000 ms" if k == "hour" else "",
                    )
                out.print(table)
                for page in pages.values():
                    await page.close()

                log(f"keeping the Overview open for {minutes:g} minutes, live updates every {refresh_s:g} s ...")
                context = await browser.new_context()
                page = await _sign_in(context, ports["hour"])
                await _render_time(page, ports["hour"])
                cdp = await context.new_cdp_session(page)
                await cdp.send("Performance.enable")
                heap = Table(title=f"browser JS heap on a live Overview (updates every {refresh_s:g} s)")
                for col in ("minute", "JS heap after GC (MB)", "DOM nodes", "chart updates so far"):
                    heap.add_column(col)
                readings: list[float] = []
                start = time.monotonic()
                minute = 0
                while True:
                    await cdp.send("HeapProfiler.collectGarbage")
                    metrics = {m["name"]: m["value"] for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
                    mb = metrics["JSHeapUsedSize"] / 1e6
                    readings.append(mb)
                    elapsed = time.monotonic() - start
                    heap.add_row(str(minute), f"{mb:.2f}", f"{metrics['Nodes']:.0f}", f"{elapsed / refresh_s:.0f}")
                    if minute >= minutes:
                        break
                    minute += 1
                    await asyncio.sleep(max(0.0, start + 60 * minute - time.monotonic()))
                out.print(heap)
                first, last = readings[min(1, len(readings) - 1)], readings[-1]
                out.print(
                    f"JS heap from minute 1 to minute {minute}: {first:.2f} -> {last:.2f} MB "
                    f"({last - first:+.2f} MB, {100 * (last - first) / first:+.1f}%); "
                    f"max {max(readings[1:] or readings):.2f} MB",
                    highlight=False,
                )
                await browser.close()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "filled", float(sys.argv[4]))
